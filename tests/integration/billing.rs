//! Money: plan changes, statements, Stripe Checkout, webhooks, the usage sync to Stripe meters,
//! invoices and author payouts, against the Stripe double (which prices invoices itself, as Stripe
//! does) and with real webhook signatures.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use plinth_sdk::{ErrorCode, Micros, PaymentMode, PayoutStatus, Plan, Scope, SubscriptionStatus};
use plinth_tests::stripe_double::{
    CALLS_METER, Failure, PLUGIN_FEES_METER, PLUGIN_FEES_PRICE, Price, StripeDouble, WEBHOOK_SECRET,
    signature,
};
use plinth_tests::{TestApp, TestTenant, built_plugin};
use serde_json::{Value, json};

/// A plan with few included calls and an odd per-call price, so overage and rounding show.
pub fn metered_plan() -> Plan {
    Plan {
        id: "metered".into(),
        name: "Metered".into(),
        currency: "usd".into(),
        monthly_fee_micros: Micros::units(49),
        included_calls: 3,
        price_per_call_micros: Micros(1_234),
        hard_cap: false,
        training_price_micros: Micros(0),
        rate_limit_per_minute: 60_000,
        burst: 1_000,
        isolation: plinth_sdk::PlanIsolation::FREE,
    }
}

/// Stripe's side of the same plans: what the operator set up in the dashboard.
pub fn stripe_prices() -> BTreeMap<String, Price> {
    let metered = |free_units, unit_decimal: &str, meter: &str| Price::Metered {
        meter: meter.to_owned(),
        free_units,
        unit_decimal: unit_decimal.to_owned(),
    };
    BTreeMap::from([
        ("price_metered_flat".to_owned(), Price::Flat { cents: 4_900 }),
        (
            "price_metered_calls".to_owned(),
            metered(3, "0.1234", CALLS_METER),
        ),
        ("price_pro_flat".to_owned(), Price::Flat { cents: 4_900 }),
        (
            "price_pro_calls".to_owned(),
            metered(100_000, "0.04", CALLS_METER),
        ),
        (
            PLUGIN_FEES_PRICE.to_owned(),
            metered(0, "0.0001", PLUGIN_FEES_METER),
        ),
    ])
}

pub const STRIPE_PLANS: &[(&str, &str, &str)] = &[
    ("metered", "price_metered_flat", "price_metered_calls"),
    ("pro", "price_pro_flat", "price_pro_calls"),
];

/// A platform in Stripe mode against `double`, syncing one-second buckets on demand.
pub async fn stripe_app(double: &StripeDouble) -> TestApp {
    let app = TestApp::spawn_with(|config| {
        double.configure(config, STRIPE_PLANS);
        config.billing_sync_bucket_secs = 1;
        config.billing_sync_settle_secs = 0;
        config.billing_sync_interval_secs = 3_600;
    })
    .await;
    app.store().upsert_plan(&metered_plan()).await.unwrap();
    app
}

/// Subscribes through Checkout and the double's webhooks; returns (customer, subscription).
pub async fn subscribe(
    app: &TestApp,
    double: &StripeDouble,
    tenant: &TestTenant,
    plan: &str,
) -> (String, String) {
    let change = tenant.owner.change_plan(plan).await.unwrap();
    assert_eq!(change.mode, PaymentMode::Stripe);
    assert_eq!(
        change.subscription.plan.id, "free",
        "nothing changes before Stripe confirms payment"
    );
    let url = change.checkout_url.expect("a Checkout URL");
    let subscription = double.complete_checkout(&app.url(""), &url).await;
    let customer = double.subscription(&subscription).unwrap().customer;
    let now = tenant.owner.subscription().await.unwrap();
    assert_eq!(
        (now.plan.id.as_str(), now.status),
        (plan, SubscriptionStatus::Active)
    );
    (customer, subscription)
}

fn api_code(err: &plinth_sdk::Error) -> Option<ErrorCode> {
    err.code()
}

pub async fn post_webhook(app: &TestApp, header: Option<String>, body: &str) -> (u16, Value) {
    let mut request = app
        .http()
        .post(app.url("/v1/webhooks/stripe"))
        .header("Content-Type", "application/json")
        .body(body.to_owned());
    if let Some(header) = header {
        request = request.header("Stripe-Signature", header);
    }
    let response = request.send().await.unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn local_billing_changes_plans_at_once_and_states_usage() {
    let app = TestApp::spawn().await;
    app.store().upsert_plan(&metered_plan()).await.unwrap();
    let tenant = app.tenant().await;

    let change = tenant.owner.change_plan("metered").await.unwrap();
    assert_eq!(change.mode, PaymentMode::Local);
    assert_eq!(change.checkout_url, None);
    assert_eq!(change.subscription.plan.id, "metered");
    let unknown = tenant.owner.change_plan("platinum").await.unwrap_err();
    assert_eq!(api_code(&unknown), Some(ErrorCode::NotFound));

    tenant
        .client
        .classify("sentiment", &["good", "bad"])
        .await
        .unwrap();
    tenant
        .client
        .classify("sentiment", &["fine", "awful", "great"])
        .await
        .unwrap();
    tenant.client.embed("minilm-embed", &["one"]).await.unwrap();
    let statement = tenant.owner.upcoming_invoice().await.unwrap();
    assert!(statement.open);
    assert_eq!(statement.plan, "metered");
    assert_eq!(
        (statement.calls, statement.included_calls, statement.overage_calls),
        (6, 3, 3)
    );
    // 3 x 1234 micro-dollars = 0.3702 cents, rounded once.
    assert_eq!(statement.overage_cents, 0);
    assert_eq!(statement.subscription_fee_cents, 4_900);
    assert_eq!(statement.total_cents, 4_900);
    let by_model: BTreeMap<_, _> = statement
        .items
        .iter()
        .map(|i| (i.name.as_str(), i.units))
        .collect();
    assert_eq!(by_model, BTreeMap::from([("minilm-embed", 1), ("sentiment", 5)]));
    assert_eq!(statement.invoice, None);

    // Nothing has closed yet: the free period ended with the change, and is all there is.
    let history = tenant.owner.invoices().await.unwrap();
    assert_eq!(history.mode, PaymentMode::Local);
    let plans: Vec<(&str, i64)> = history
        .invoices
        .iter()
        .map(|s| (s.plan.as_str(), s.total_cents))
        .collect();
    assert_eq!(plans, [("free", 0)]);

    let canceled = tenant.owner.cancel_subscription().await.unwrap();
    assert!(canceled.cancel_at_period_end);
    assert_eq!(
        canceled.plan.id, "metered",
        "the plan runs to the end of the period"
    );
    // Moving to a plan starts a new period (and resumes a canceled one); the one it ends is closed
    // and stated at the plan it ran on.
    let resumed = tenant.owner.change_plan("pro").await.unwrap();
    assert!(!resumed.subscription.cancel_at_period_end);
    let history = tenant.owner.invoices().await.unwrap();
    let closed: Vec<(&str, i64, i64)> = history
        .invoices
        .iter()
        .map(|s| (s.plan.as_str(), s.calls, s.total_cents))
        .collect();
    assert_eq!(closed, [("metered", 6, 4_900), ("free", 0, 0)]);
    assert_eq!(
        history.invoices[0].period_end,
        resumed.subscription.current_period_start
    );
    let upcoming = tenant.owner.upcoming_invoice().await.unwrap();
    assert_eq!((upcoming.plan.as_str(), upcoming.calls), ("pro", 0));

    // Stripe's endpoints answer that payments are not configured.
    let (status, body) = post_webhook(&app, Some("t=1,v1=00".into()), "{}").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("payments_not_configured"))
    );
    let connect = tenant.owner.connect_payouts().await.unwrap_err();
    assert_eq!(api_code(&connect), Some(ErrorCode::PaymentsNotConfigured));
    // Changing plans needs the admin scope.
    let reader = app.tenant_with_scopes(&[Scope::BillingRead]).await;
    let refused = reader.client.change_plan("metered").await.unwrap_err();
    assert_eq!(api_code(&refused), Some(ErrorCode::InsufficientScope));
}

#[tokio::test]
async fn money_round_trips_from_calls_to_the_stripe_invoice_to_the_cent() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let tenant = app.tenant().await;
    let (customer, subscription) = subscribe(&app, &double, &tenant, "metered").await;
    let created = double.customer_metadata(&customer).unwrap();
    assert_eq!(
        created.get("tenant_id").map(String::as_str),
        Some(tenant.session.tenant.id.as_str())
    );

    // Model calls (17 units) and a plugin at an odd price (3 calls).
    let author = app.tenant().await;
    let (mut manifest, component) = built_plugin("hello");
    manifest.name = "priced-hello".into();
    manifest.price_per_call_micros = 2_505;
    let installed = app
        .install_manifest(&author, &tenant, manifest, component, json!({}))
        .await;
    for batch in [&["a"][..], &["b", "c"], &["d", "e", "f", "g"], &["h"; 10]] {
        tenant.client.classify("sentiment", batch).await.unwrap();
    }
    for _ in 0..3 {
        tenant
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap();
    }

    let statement = tenant.owner.upcoming_invoice().await.unwrap();
    assert_eq!((statement.calls, statement.overage_calls), (17, 14));
    // 14 x 1234 = 17276 micro-dollars -> 2 cents; 3 x 2505 = 7515 micro-dollars -> 1 cent.
    assert_eq!((statement.overage_cents, statement.plugin_fees_cents), (2, 1));
    assert_eq!(statement.plugin_fees_micros, Micros(7_515));
    assert_eq!(statement.total_cents, 4_903);
    assert!(
        statement
            .items
            .iter()
            .any(|i| i.kind == "plugin" && i.name == "priced-hello" && i.units == 3)
    );

    // The usage sync (run by an operator here; the server runs it every interval).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let admin = app.platform_admin().await;
    let report = admin.sync_usage().await.unwrap();
    assert!(
        report.events_sent >= 2 && report.events_pending == 0,
        "{report:?}"
    );
    assert_eq!(double.meter_total(CALLS_METER, &customer), 17);
    assert_eq!(double.meter_total(PLUGIN_FEES_METER, &customer), 7_515);
    // Each meter event carries a deterministic identifier, also its Idempotency-Key.
    for request in double
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/billing/meter_events")
    {
        assert_eq!(request.idempotency_key.as_ref(), request.form.get("identifier"));
        assert!(request.form["identifier"].starts_with(&format!("plinth-{}-", tenant.session.tenant.id)));
    }
    let again = admin.sync_usage().await.unwrap();
    assert_eq!(again.events_sent, 0, "nothing new to send");
    let reconciliation = admin.reconciliation().await.unwrap();
    assert!(reconciliation.balanced, "{reconciliation:?}");
    let calls = reconciliation
        .rows
        .iter()
        .find(|r| r.tenant_id == tenant.session.tenant.id.as_str() && r.meter == "calls")
        .unwrap();
    assert_eq!((calls.ledger, calls.sent, calls.pending), (17, 17, 0));

    // Stripe prices the period from its meters and its own price table: the same total, to the cent.
    let invoiced = double.invoice_period(&app.url(""), &subscription, true).await;
    assert_eq!(invoiced, statement.total_cents);
    let statement = tenant.owner.upcoming_invoice().await.unwrap();
    let invoice = statement
        .invoice
        .expect("Stripe's invoice is attached to its period");
    assert_eq!(
        (invoice.total_cents, invoice.status.as_str()),
        (statement.total_cents, "paid")
    );

    // Only operators run syncs.
    let refused = tenant.owner.sync_usage().await.unwrap_err();
    assert_eq!(api_code(&refused), Some(ErrorCode::InsufficientScope));
}

#[tokio::test]
async fn stripe_plan_changes_cancellation_and_unpriced_plans() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let tenant = app.tenant().await;
    let unpriced = tenant.owner.change_plan("enterprise").await.unwrap_err();
    assert_eq!(api_code(&unpriced), Some(ErrorCode::PlanNotPurchasable));
    let (_, subscription) = subscribe(&app, &double, &tenant, "metered").await;

    // A paying tenant moves plans without Checkout: Stripe's items are replaced, a new period starts
    // (Stripe's, to the second), and the period it ends is closed at the plan it ran on.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let change = tenant.owner.change_plan("pro").await.unwrap();
    let stripe_start = double.subscription(&subscription).unwrap().period_start;
    assert_eq!(change.subscription.current_period_start.timestamp(), stripe_start);
    let history = tenant.owner.invoices().await.unwrap();
    assert_eq!(history.invoices[0].plan, "metered");
    assert_eq!(history.invoices[0].period_end.timestamp(), stripe_start);
    assert_eq!(
        (change.checkout_url, change.subscription.plan.id.as_str()),
        (None, "pro")
    );
    let prices: Vec<String> = double
        .subscription(&subscription)
        .unwrap()
        .items
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(prices, ["price_pro_flat", "price_pro_calls", PLUGIN_FEES_PRICE]);

    // Canceling keeps the plan to the period's end, on both sides.
    let canceled = tenant.owner.cancel_subscription().await.unwrap();
    assert!(canceled.cancel_at_period_end && canceled.plan.id == "pro");
    assert!(double.subscription(&subscription).unwrap().cancel_at_period_end);

    // Stripe ends it at the period's end: the tenant is back on free.
    let mut ended = double.subscription_json(&subscription);
    ended["status"] = json!("canceled");
    let event = double.event("customer.subscription.deleted", Utc::now().timestamp() + 5, ended);
    assert!(double.deliver(&app.url(""), &event).await.status().is_success());
    let now = tenant.owner.subscription().await.unwrap();
    assert_eq!((now.plan.id.as_str(), now.cancel_at_period_end), ("free", false));
}

#[tokio::test]
async fn webhooks_are_verified_applied_once_and_in_order() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let tenant = app.tenant().await;
    let (customer, subscription) = subscribe(&app, &double, &tenant, "metered").await;
    let base = Utc::now().timestamp();
    let invoice = |kind: &str, created: i64, id: &str| {
        double.event(
            kind,
            created,
            json!({ "id": id, "object": "invoice", "customer": customer, "subscription": subscription,
                    "status": if kind == "invoice.paid" { "paid" } else { "open" }, "currency": "usd",
                    "total": 4_900, "amount_paid": 0, "period_start": base, "period_end": base + 60 }),
        )
    };

    // Forged, tampered, stale, missing and malformed deliveries change nothing.
    let failed = invoice("invoice.payment_failed", base + 10, "in_a").to_string();
    let now = Utc::now().timestamp();
    for (header, body) in [
        (Some(signature("whsec_wrong", now, &failed)), failed.clone()),
        (Some(signature(WEBHOOK_SECRET, now, "{}")), failed.clone()),
        (
            Some(signature(WEBHOOK_SECRET, now - 301, &failed)),
            failed.clone(),
        ),
        (
            Some(signature(WEBHOOK_SECRET, now + 400, &failed)),
            failed.clone(),
        ),
        (Some("t=abc,v1=zz".into()), failed.clone()),
        (None, failed.clone()),
    ] {
        let (status, body) = post_webhook(&app, header, &body).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_signature")),
            "{body}"
        );
    }
    let garbage = "{\"not\":\"an event\"}";
    let (status, _) = post_webhook(&app, Some(signature(WEBHOOK_SECRET, now, garbage)), garbage).await;
    assert_eq!(status, 422);
    assert_eq!(
        tenant.owner.subscription().await.unwrap().status,
        SubscriptionStatus::Active
    );

    // A valid delivery within tolerance, with several v1 signatures (a secret being rolled).
    let header = format!(
        "{},v1={}",
        signature(WEBHOOK_SECRET, now - 200, &failed),
        "ab".repeat(32)
    );
    let (status, body) = post_webhook(&app, Some(header.clone()), &failed).await;
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(false)));
    assert_eq!(
        tenant.owner.subscription().await.unwrap().status,
        SubscriptionStatus::PastDue
    );

    // Past due: the free plan's limits apply (the policy header names them).
    let free = app.tenant().await;
    let policy = |response: &reqwest::Response| {
        response.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let echo = |key: String| {
        app.http()
            .post(app.url("/v1/echo"))
            .bearer_auth(key)
            .header("Idempotency-Key", ulid::Ulid::new().to_string())
            .json(&json!({}))
            .send()
    };
    let free_policy = policy(&echo(free.key.secret.clone()).await.unwrap());
    assert_eq!(
        policy(&echo(tenant.key.secret.clone()).await.unwrap()),
        free_policy
    );

    // The same event again is acknowledged and ignored.
    let (status, body) = post_webhook(&app, Some(header), &failed).await;
    assert_eq!((status, body["duplicate"].as_bool()), (200, Some(true)));

    // A change of plan does not pay what is past due: still past due, on the free plan's limits.
    tenant.owner.change_plan("pro").await.unwrap();
    let moved = tenant.owner.subscription().await.unwrap();
    assert_eq!(
        (moved.plan.id.as_str(), moved.status),
        ("pro", SubscriptionStatus::PastDue)
    );
    assert_eq!(
        policy(&echo(tenant.key.secret.clone()).await.unwrap()),
        free_policy
    );
    tenant.owner.change_plan("metered").await.unwrap();

    // Out of order: payment succeeds (newer), then a stale failure arrives late: still active.
    let paid = invoice("invoice.paid", base + 30, "in_b");
    assert!(double.deliver(&app.url(""), &paid).await.status().is_success());
    let stale = invoice("invoice.payment_failed", base + 20, "in_c");
    assert!(double.deliver(&app.url(""), &stale).await.status().is_success());
    assert_eq!(
        tenant.owner.subscription().await.unwrap().status,
        SubscriptionStatus::Active
    );
    assert_ne!(
        policy(&echo(tenant.key.secret.clone()).await.unwrap()),
        free_policy
    );

    // A newer subscription update (to pro's prices) wins over an older one delivered after it.
    let mut on_pro = double.subscription_json(&subscription);
    on_pro["items"]["data"][0]["price"]["id"] = json!("price_pro_flat");
    let newer = double.event("customer.subscription.updated", base + 50, on_pro);
    let older = double.event(
        "customer.subscription.updated",
        base + 40,
        double.subscription_json(&subscription),
    );
    assert!(double.deliver(&app.url(""), &newer).await.status().is_success());
    assert!(double.deliver(&app.url(""), &older).await.status().is_success());
    assert_eq!(tenant.owner.subscription().await.unwrap().plan.id, "pro");

    // Watermarks are per kind of state: a plan change older than the last payment event still applies.
    let paid_later = invoice("invoice.paid", base + 70, "in_d");
    assert!(
        double
            .deliver(&app.url(""), &paid_later)
            .await
            .status()
            .is_success()
    );
    let plan_change = double.event(
        "customer.subscription.updated",
        base + 65,
        double.subscription_json(&subscription),
    );
    assert!(
        double
            .deliver(&app.url(""), &plan_change)
            .await
            .status()
            .is_success()
    );
    let now = tenant.owner.subscription().await.unwrap();
    assert_eq!(
        (now.plan.id.as_str(), now.status),
        ("metered", SubscriptionStatus::Active)
    );

    // Stripe says the subscription is past due: the change is Stripe's, and in the audit log.
    let mut unpaid = double.subscription_json(&subscription);
    unpaid["status"] = json!("past_due");
    let overdue = double.event("customer.subscription.updated", base + 80, unpaid);
    assert!(double.deliver(&app.url(""), &overdue).await.status().is_success());
    assert_eq!(
        tenant.owner.subscription().await.unwrap().status,
        SubscriptionStatus::PastDue
    );
    let log = tenant
        .owner
        .audit_log(&plinth_sdk::AuditQuery {
            action: Some("subscription.status".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let latest = &log.entries[0];
    assert_eq!(latest.actor, "stripe", "{latest:?}");
    assert_eq!(
        (latest.detail["from"].as_str(), latest.detail["to"].as_str()),
        (Some("active"), Some("past_due")),
        "{latest:?}"
    );
}

#[tokio::test]
async fn a_sync_cut_short_resumes_without_losing_or_doubling_usage() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let tenant = app.tenant().await;
    let (customer, _) = subscribe(&app, &double, &tenant, "metered").await;
    // Calls spread over several one-second buckets.
    let mut units = 0;
    for round in 0..4 {
        let batch = vec!["text"; round + 1];
        tenant.client.classify("sentiment", &batch).await.unwrap();
        units += i64::try_from(batch.len()).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let admin = app.platform_admin().await;

    // Stripe goes down after accepting one event: the rest stay queued.
    double.fail_meter_events(Failure::OutageAfter(1));
    let report = admin.sync_usage().await.unwrap();
    assert!(
        report.buckets_closed >= 2 && report.events_sent == 1 && report.events_pending >= 1,
        "{report:?}"
    );
    assert!(!admin.reconciliation().await.unwrap().rows.is_empty());

    // The process dies; a new one takes over the same database. Stripe is back but its answers are
    // lost on the way: everything is recorded there, nothing is acknowledged here.
    let config = app.config.clone();
    let restarted = app.replica().await;
    app.stop().await;
    assert_eq!(restarted.config.stripe_api_base, config.stripe_api_base);
    let admin = restarted.platform_admin().await;
    double.fail_meter_events(Failure::LoseResponses);
    let report = admin.sync_usage().await.unwrap();
    assert_eq!(report.events_sent, 0);
    assert!(report.events_pending >= 1);

    // Next run: the same identifiers and Idempotency-Keys; Stripe replays its answers.
    double.fail_meter_events(Failure::None);
    let report = admin.sync_usage().await.unwrap();
    assert_eq!(report.events_pending, 0, "{report:?}");
    assert_eq!(double.meter_total(CALLS_METER, &customer), units);
    assert_eq!(double.duplicate_identifiers(), 0);
    let reconciliation = admin.reconciliation().await.unwrap();
    assert!(reconciliation.balanced, "{reconciliation:?}");
    let owner = restarted.client().with_token(&tenant.session.token);
    assert_eq!(owner.upcoming_invoice().await.unwrap().calls, units);
}

#[tokio::test]
async fn two_replicas_syncing_at_once_push_each_bucket_once() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let replica = app.replica().await;
    let tenant = app.tenant().await;
    let (customer, _) = subscribe(&app, &double, &tenant, "metered").await;
    let mut units = 0;
    for round in 0..3 {
        let batch = vec!["text"; round + 1];
        tenant.client.classify("sentiment", &batch).await.unwrap();
        units += i64::try_from(batch.len()).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // Both replicas close the same tenant's buckets at the same moment, each through its own pool.
    let tenant_id = &tenant.session.tenant.id;
    let until = Utc::now();
    let bucket = Duration::from_secs(1);
    let (a, b) = tokio::join!(
        app.store().close_meter_buckets(tenant_id, until, bucket, 1_000),
        replica
            .store()
            .close_meter_buckets(tenant_id, until, bucket, 1_000)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a + b >= 1, "the usage spans at least one bucket");
    assert!(
        a == 0 || b == 0,
        "one replica closed the buckets, the other found them closed: {a}, {b}"
    );

    let (here, there) = (app.platform_admin().await, replica.platform_admin().await);
    for _ in 0..3 {
        let (a, b) = tokio::join!(here.sync_usage(), there.sync_usage());
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(double.meter_total(CALLS_METER, &customer), units);
    assert_eq!(double.duplicate_identifiers(), 0);
    let reconciliation = here.reconciliation().await.unwrap();
    assert!(reconciliation.balanced, "{reconciliation:?}");
}

#[tokio::test]
async fn stripe_prices_are_checked_against_the_plans_they_sell() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let billing = plinth_server::billing(&app.config, app.store().clone()).unwrap();
    assert_eq!(billing.check_prices().await.unwrap(), Vec::<String>::new());

    // Someone edits prices in the dashboard: a fee, the included calls, the plugin-fees unit.
    double.set_price("price_pro_flat", Price::Flat { cents: 5_900 });
    double.set_price(
        "price_metered_calls",
        Price::Metered {
            meter: CALLS_METER.to_owned(),
            free_units: 10,
            unit_decimal: "0.1234".to_owned(),
        },
    );
    double.set_price(
        PLUGIN_FEES_PRICE,
        Price::Metered {
            meter: PLUGIN_FEES_METER.to_owned(),
            free_units: 0,
            unit_decimal: "0.01".to_owned(),
        },
    );
    // ...and one metered price is moved to a meter the platform does not send to.
    double.set_price(
        "price_pro_calls",
        Price::Metered {
            meter: "api_requests".to_owned(),
            free_units: 100_000,
            unit_decimal: "0.04".to_owned(),
        },
    );
    let problems = billing.check_prices().await.unwrap();
    assert_eq!(problems.len(), 4, "{problems:?}");
    for price in [
        "price_pro_flat",
        "price_metered_calls",
        PLUGIN_FEES_PRICE,
        "price_pro_calls",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(price)),
            "{price} in {problems:?}"
        );
    }
    assert!(
        problems.iter().any(|p| p.contains("api_requests")),
        "{problems:?}"
    );

    // A plan whose numbers change without its prices is caught the same way.
    double.set_price("price_pro_flat", Price::Flat { cents: 4_900 });
    double.set_price("price_pro_calls", stripe_prices()["price_pro_calls"].clone());
    let mut pro = app.store().plan("pro").await.unwrap();
    pro.price_per_call_micros = Micros(500);
    app.store().upsert_plan(&pro).await.unwrap();
    let problems = billing.check_prices().await.unwrap();
    assert!(
        problems.iter().any(|p| p.contains("price_pro_calls")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn authors_are_paid_their_collected_share_once_through_connect() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let author = app.tenant().await;
    let customer = app.tenant().await;
    let (_, subscription) = subscribe(&app, &double, &customer, "metered").await;
    let (mut manifest, component) = built_plugin("hello");
    manifest.name = "paid-hello".into();
    manifest.price_per_call_micros = 125_000; // 12.5 cents; the author's 80% is 10 cents
    let installed = app
        .install_manifest(&author, &customer, manifest, component, json!({}))
        .await;
    for _ in 0..10 {
        customer
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap();
    }
    // Earned, but nobody has paid for it yet.
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (
            earnings.total,
            earnings.payable,
            earnings.pending,
            earnings.balance
        ),
        (Micros(1_000_000), Micros(0), Micros(1_000_000), Micros(0))
    );

    let onboarding = author.owner.connect_payouts().await.unwrap();
    assert!(onboarding.url.contains(&onboarding.account_id) && !onboarding.payouts_enabled);
    let again = author.owner.connect_payouts().await.unwrap();
    assert_eq!(
        again.account_id, onboarding.account_id,
        "one connected account per author"
    );

    // Months are paid once they have ended.
    let today = Utc::now();
    let period = format!("{:04}-{:02}", today.year(), today.month());
    let next_month = Utc
        .with_ymd_and_hms(
            today.year() + i32::from(today.month() == 12),
            today.month() % 12 + 1,
            1,
            0,
            0,
            0,
        )
        .unwrap();
    let admin = app.platform_admin().await;
    let early = admin.run_payouts(&period).await.unwrap_err();
    assert_eq!(api_code(&early), Some(ErrorCode::ValidationFailed));
    let billing = plinth_server::billing(&app.config, app.store().clone()).unwrap();
    let operator = plinth_tests::operator();

    // Uncollected earnings pay nothing, onboarded or not.
    double.enable_payouts(&app.url(""), &onboarding.account_id).await;
    let run = billing.run_payouts(&period, next_month, &operator).await.unwrap();
    assert_eq!((run.payouts.len(), run.waiting_for_onboarding), (0, 0));
    assert!(double.transfers().is_empty());

    // Stripe collects the customer's invoice: the share becomes payable and is paid, once.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    admin.sync_usage().await.unwrap();
    double.invoice_period(&app.url(""), &subscription, true).await;
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.payable, earnings.pending, earnings.balance),
        (Micros(1_000_000), Micros(0), Micros(1_000_000))
    );
    let run = billing.run_payouts(&period, next_month, &operator).await.unwrap();
    assert_eq!(run.payouts.len(), 1);
    let payout = &run.payouts[0];
    assert_eq!(
        (payout.amount_cents, payout.status, payout.currency.as_str()),
        (100, PayoutStatus::Paid, "usd")
    );
    assert_eq!(
        double.transfers(),
        [(
            payout.stripe_transfer_id.clone().unwrap(),
            100,
            onboarding.account_id.clone()
        )]
    );

    // A rerun pays nobody twice.
    let rerun = billing.run_payouts(&period, next_month, &operator).await.unwrap();
    assert_eq!(rerun.payouts, run.payouts);
    assert_eq!(double.transfers().len(), 1);
    assert_eq!(author.owner.payouts().await.unwrap(), run.payouts);
    assert!(customer.owner.payouts().await.unwrap().is_empty());
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.balance, earnings.paid_out),
        (Micros(0), Micros(1_000_000))
    );
}

/// Batches sent at once are counted against the cap together: each is checked with the others that
/// are on their way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sent_at_once_cannot_pass_the_cap_together() {
    let app = TestApp::spawn().await;
    let mut free = app.store().plan("free").await.unwrap();
    free.included_calls = 3;
    app.store().upsert_plan(&free).await.unwrap();
    let tenant = app.tenant().await;
    let batches =
        futures_util::future::join_all((0..4).map(|_| tenant.client.classify("sentiment", &["a", "b"])))
            .await;
    let served = batches.iter().filter(|batch| batch.is_ok()).count();
    assert_eq!(served, 1, "{batches:?}");
    for refused in batches.iter().filter_map(|batch| batch.as_ref().err()) {
        assert_eq!(api_code(refused), Some(ErrorCode::QuotaExceeded), "{refused:?}");
    }
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.units, 2, "{usage:?}");
}

/// A call the cap refused, sent again under its `Idempotency-Key`, is checked again: a refusal is not
/// a pass for the key's next attempt (which takes over the released request as if it had stopped
/// unanswered, with an event already counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_cap_refused_is_refused_again_under_the_same_key() {
    let app = TestApp::spawn().await;
    let mut free = app.store().plan("free").await.unwrap();
    free.included_calls = 3;
    app.store().upsert_plan(&free).await.unwrap();
    let tenant = app.tenant().await;
    let keyed = tenant.client.idempotent("four-texts-past-the-cap");
    for attempt in 0..3 {
        let refused = keyed
            .classify("sentiment", &["a", "b", "c", "d"])
            .await
            .unwrap_err();
        assert_eq!(
            api_code(&refused),
            Some(ErrorCode::QuotaExceeded),
            "attempt {attempt}: {refused:?}"
        );
    }
    // Several retries at once, too.
    let retries =
        futures_util::future::join_all((0..4).map(|_| keyed.classify("sentiment", &["a", "b", "c", "d"])))
            .await;
    assert!(retries.iter().all(Result::is_err), "{retries:?}");
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.units, 0, "{usage:?}");
    // Within the cap, the same request under a key of its own runs and is billed once.
    let within = tenant.client.idempotent("three-texts");
    within.classify("sentiment", &["a", "b", "c"]).await.unwrap();
    within.classify("sentiment", &["a", "b", "c"]).await.unwrap();
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.units, 3, "{usage:?}");
}

#[tokio::test]
async fn the_free_plan_stops_at_its_included_calls_until_the_tenant_upgrades() {
    let app = TestApp::spawn().await;
    let mut free = app.store().plan("free").await.unwrap();
    free.included_calls = 3;
    app.store().upsert_plan(&free).await.unwrap();
    app.store().upsert_plan(&metered_plan()).await.unwrap();
    let tenant = app.tenant().await;
    // A call of more units than the cap leaves is refused whole, through the API or a plugin.
    let batch = tenant
        .client
        .classify("sentiment", &["a", "b", "c", "d"])
        .await
        .unwrap_err();
    assert_eq!(api_code(&batch), Some(ErrorCode::QuotaExceeded), "{batch:?}");
    let author = app.tenant().await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let through_plugin = tenant
        .client
        .invoke(&hostile.id, &json!({ "do": "model-batch", "n": 4 }))
        .await
        .unwrap_err();
    assert!(
        through_plugin.to_string().contains("included calls"),
        "{through_plugin:?}"
    );
    assert_eq!(tenant.owner.upcoming_invoice().await.unwrap().calls, 0);
    for _ in 0..3 {
        tenant.client.classify("sentiment", &["fine"]).await.unwrap();
    }
    // The count is read from the ledger at most every two seconds.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let refused = tenant
        .client
        .classify("sentiment", &["one more"])
        .await
        .unwrap_err();
    assert_eq!(api_code(&refused), Some(ErrorCode::QuotaExceeded));
    assert!(matches!(refused, plinth_sdk::Error::Api { status: 402, .. }));
    assert_eq!(
        tenant.owner.upcoming_invoice().await.unwrap().calls,
        3,
        "refused calls are not billed"
    );
    // Choosing the free plan again does not start a new period, nor the count over.
    let period = tenant.owner.subscription().await.unwrap().current_period_start;
    tenant.owner.change_plan("free").await.unwrap();
    assert_eq!(
        tenant.owner.subscription().await.unwrap().current_period_start,
        period
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let still = tenant
        .client
        .classify("sentiment", &["again for free?"])
        .await
        .unwrap_err();
    assert_eq!(api_code(&still), Some(ErrorCode::QuotaExceeded));

    tenant.owner.change_plan("metered").await.unwrap();
    tenant.client.classify("sentiment", &["paid for"]).await.unwrap();
}
