//! The attacks of THREATS.md, played for real: a free tenant that controls every byte it sends, a plugin
//! author who prices their own plugin, a squatter, a flooder, a harmful plugin. Each test is the
//! attack; it passes when the attack fails.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use futures_util::future::join_all;
use plinth_sdk::{ErrorCode, InferInput, InferRequest, Micros, PayoutStatus, ReviewStatus};
use plinth_server::Config;
use plinth_tests::stripe_double::{Failure, StripeDouble, WEBHOOK_SECRET, signature};
use plinth_tests::{PASSWORD, TestApp, TestTenant, built_plugin, operator, production_limits};
use serde_json::{Value, json};

use crate::billing::{post_webhook, stripe_app, stripe_prices, subscribe};

/// A raw metered call, as an attacker sends it.
async fn classify(
    app: &TestApp,
    tenant: &TestTenant,
    key: Option<&str>,
    request_id: Option<&str>,
    texts: &[&str],
) -> reqwest::Response {
    let mut request = app
        .http()
        .post(app.url("/v1/models/sentiment/classify"))
        .bearer_auth(&tenant.key.secret)
        .json(&json!({ "inputs": texts }));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(id) = request_id {
        request = request.header("X-Request-Id", id);
    }
    request.send().await.unwrap()
}

async fn events(app: &TestApp, tenant: &TestTenant) -> u64 {
    app.store()
        .usage_event_count(&tenant.session.tenant.id)
        .await
        .unwrap()
}

/// Texts the sentiment model has classified since it was loaded.
async fn executions(tenant: &TestTenant) -> u64 {
    tenant
        .client
        .model_statistics("sentiment")
        .await
        .unwrap()
        .inference_count
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_idempotency_key_replays_the_first_answer_and_never_runs_other_work() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;

    let first = classify(&app, &tenant, Some("order-7"), None, &["great product"]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["idempotent-replayed"], "false");
    let first_body = first.bytes().await.unwrap();
    let (billed, ran) = (events(&app, &tenant).await, executions(&tenant).await);
    assert_eq!(billed, 1);

    // The attack: the same key with 64 other texts, to get them classified for free.
    let other: Vec<&str> = vec!["something else entirely"; 64];
    let reused = classify(&app, &tenant, Some("order-7"), None, &other).await;
    assert_eq!(error_code(reused).await, (422, "idempotency_key_reused".into()));
    // ...or with another model, or on another route.
    let elsewhere = app
        .http()
        .post(app.url("/v1/models/minilm-embed/embed"))
        .bearer_auth(&tenant.key.secret)
        .header("Idempotency-Key", "order-7")
        .json(&json!({ "inputs": ["great product"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(elsewhere).await,
        (422, "idempotency_key_reused".into())
    );
    assert_eq!(events(&app, &tenant).await, billed, "nothing billed");
    assert_eq!(executions(&tenant).await, ran, "nothing run");

    // A real retry gets the stored answer, byte for byte, without running the model again. (The
    // answer is stored just after it is sent: until then a retry is told to come back.)
    let (retry, replay_latency) = loop {
        let started = std::time::Instant::now();
        let retry = classify(&app, &tenant, Some("order-7"), None, &["great product"]).await;
        let latency = started.elapsed();
        if retry.status() != 409 {
            break (retry, latency);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["content-type"], "application/json");
    assert_eq!(retry.bytes().await.unwrap(), first_body);
    assert_eq!(executions(&tenant).await, ran);
    assert_eq!(events(&app, &tenant).await, billed);
    println!("replayed answer in {} µs", replay_latency.as_micros());

    // The stored answer is only for callers the route would serve: a key without `inference` gets none.
    let reader = tenant
        .owner
        .create_api_key(&plinth_sdk::CreateApiKeyRequest {
            name: "reports".into(),
            scopes: Some(vec![plinth_sdk::Scope::BillingRead]),
            rate_limit_per_minute: None,
            expires_at: None,
        })
        .await
        .unwrap();
    let peek = app
        .http()
        .post(app.url("/v1/models/sentiment/classify"))
        .bearer_auth(&reader.secret)
        .header("Idempotency-Key", "order-7")
        .json(&json!({ "inputs": ["great product"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(peek).await, (403, "insufficient_scope".into()));

    // Keys are the tenant's own: another tenant's "order-7" is its own call.
    let other_tenant = app.tenant().await;
    let theirs = classify(&app, &other_tenant, Some("order-7"), None, &["fine"]).await;
    assert_eq!(theirs.status(), 200);
    assert_eq!(theirs.headers()["idempotent-replayed"], "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_a_client_chooses_never_merge_two_calls_into_one_charge() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;

    // Three calls without a key, all claiming one X-Request-Id: three calls, three charges.
    for texts in [&["a"][..], &["b", "c"], &["d"]] {
        let response = classify(&app, &tenant, None, Some("req-same"), texts).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["idempotent-replayed"], "false");
    }
    assert_eq!(events(&app, &tenant).await, 3);
    let usage = tenant.client.usage(&Default::default()).await.unwrap();
    assert_eq!(usage.total.units, 4);

    // A plugin's model calls have keys of their own; a client key shaped like one is just a key.
    let author = app.tenant().await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let invoked = app
        .http()
        .post(app.url(&format!("/v1/installations/{}/invoke", hostile.id)))
        .bearer_auth(&tenant.key.secret)
        .header("Idempotency-Key", "K")
        .json(&json!({ "do": "model" }))
        .send()
        .await
        .unwrap();
    assert_eq!(invoked.status(), 200);
    assert_eq!(
        events(&app, &tenant).await,
        5,
        "the invocation and its model call"
    );
    for key in [
        "K:model:0",
        "K:model:1",
        "auto:01jz3k2m4n5p6q7r8s9t0vwxyz",
        "req:x",
    ] {
        let response = classify(&app, &tenant, Some(key), None, &["collide?"]).await;
        assert_eq!(response.headers()["idempotent-replayed"], "false", "{key}");
    }
    assert_eq!(events(&app, &tenant).await, 9, "each billed on its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_on_purpose_pays_for_its_model_calls_on_every_attempt() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    // Each attempt makes its 8 allowed model calls, then fails; its invocation is not billed, its
    // model calls are. A retry under the same key must not get its model calls as "replays".
    for attempt in 1..=3_u64 {
        let failed = app
            .http()
            .post(app.url(&format!("/v1/installations/{}/invoke", hostile.id)))
            .bearer_auth(&tenant.key.secret)
            .header("Idempotency-Key", "fail-on-purpose")
            .json(&json!({ "do": "many-calls" }))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(failed).await, (502, "plugin_failed".into()));
        assert_eq!(events(&app, &tenant).await, 8 * attempt, "attempt {attempt}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_sent_while_the_first_attempt_runs_is_told_to_retry_and_runs_nothing() {
    let app = TestApp::spawn_with(|config| config.plugin_deadline_ms = 5_000).await;
    let author = app.tenant().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let invoke = |body: Value| {
        app.http()
            .post(app.url(&format!("/v1/installations/{}/invoke", hostile.id)))
            .bearer_auth(&tenant.key.secret)
            .header("Idempotency-Key", "slow-1")
            .json(&body)
            .send()
    };
    // The first attempt loops until its deadline; copies keep arriving meanwhile (from a second on,
    // when the first has claimed the key, on a busy machine too).
    let first = tokio::spawn(invoke(json!({ "do": "loop" })));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut refused = 0;
    while !first.is_finished() {
        let copy = invoke(json!({ "do": "loop" })).await.unwrap();
        if first.is_finished() {
            break; // it may have arrived after the first gave its key back
        }
        assert_eq!(
            copy.headers().get("retry-after").map(|v| v.to_str().unwrap()),
            Some("1")
        );
        assert_eq!(error_code(copy).await, (409, "idempotency_in_flight".into()));
        refused += 1;
    }
    assert!(refused >= 2, "{refused} copies refused");
    let first = first.await.unwrap().unwrap();
    assert_eq!(error_code(first).await, (504, "plugin_timeout".into()));
    assert_eq!(events(&app, &tenant).await, 0, "a timed-out call is not billed");
    // It failed, so nothing is stored: the key still names that request, and another is refused.
    let other = invoke(json!({ "do": "echo" })).await.unwrap();
    assert_eq!(error_code(other).await, (422, "idempotency_key_reused".into()));
}

/// A priced copy of the `hello` plugin by `author`, installed in `tenant`.
async fn priced_hello(
    app: &TestApp,
    author: &TestTenant,
    tenant: &TestTenant,
    name: &str,
) -> plinth_sdk::Installation {
    let (mut manifest, component) = built_plugin("hello");
    manifest.name = name.into();
    manifest.price_per_call_micros = 100_000_000; // the most a plugin may charge: 100 dollars a call
    app.install_manifest(author, tenant, manifest, component, json!({}))
        .await
}

#[tokio::test]
async fn free_tenants_cannot_fund_an_author_and_authors_cannot_pay_themselves() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let sybil = app.tenant().await;
    let installed = priced_hello(&app, &author, &sybil, "pricey-hello").await;

    // A free tenant calling a 100-dollar plugin: refused, nothing recorded, nothing earned.
    let refused = sybil
        .client
        .invoke(&installed.id, &json!({ "name": "Ada" }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::PaymentRequired));
    assert!(matches!(refused, plinth_sdk::Error::Api { status: 402, .. }));
    assert_eq!(events(&app, &sybil).await, 0);
    assert_eq!(author.owner.author_earnings().await.unwrap().total, Micros(0));

    // The author, on a paid plan, calling its own plugin: served, but neither charged nor earning.
    app.set_plan(&author.session.tenant.id, "pro").await;
    let (manifest, _) = built_plugin("hello");
    let own = author
        .owner
        .install_plugin(&plinth_sdk::InstallRequest {
            plugin: "pricey-hello".into(),
            version: None,
            approve_capabilities: manifest.capabilities.clone(),
            approve_models: manifest.models.clone(),
            settings: Default::default(),
            secrets: Default::default(),
            record_failures: false,
        })
        .await
        .unwrap();
    let before = chrono::Utc::now();
    for _ in 0..3 {
        author
            .client
            .invoke(&own.id, &json!({ "name": "me" }))
            .await
            .unwrap();
    }
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!((earnings.rows[0].calls, earnings.total), (3, Micros(0)));
    // Counted over whole UTC days: a window of a second after the calls still holds the day's calls
    // (a window of the author's choosing would time other tenants' calls).
    let now = chrono::Utc::now();
    let window: plinth_sdk::Earnings = reqwest::Client::new()
        .get(app.url("/v1/author/earnings"))
        .query(&[
            ("from", now.to_rfc3339()),
            ("to", (now + chrono::Duration::seconds(1)).to_rfc3339()),
        ])
        .bearer_auth(&author.session.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    assert_eq!(window.from, midnight);
    assert!(
        window.to > now && (window.to - window.from).num_hours() % 24 == 0,
        "{window:?}"
    );
    if window.from <= before {
        // (Unless the day turned since the calls.)
        assert_eq!(window.rows[0].calls, 3, "{window:?}");
    }
    let statement = author.owner.upcoming_invoice().await.unwrap();
    assert_eq!(statement.plugin_fees_micros, Micros(0));
}

#[tokio::test]
async fn earnings_become_payable_only_when_the_statement_that_charged_them_is_paid() {
    let app = TestApp::spawn().await;
    let author = app.tenant().await;
    let customer = app.tenant().await;
    app.set_plan(&customer.session.tenant.id, "pro").await;
    let (mut manifest, component) = built_plugin("hello");
    manifest.name = "fair-hello".into();
    manifest.price_per_call_micros = 125_000;
    let installed = app
        .install_manifest(&author, &customer, manifest, component, json!({}))
        .await;
    for _ in 0..4 {
        customer
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap();
    }
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.total, earnings.payable, earnings.pending),
        (Micros(400_000), Micros(0), Micros(400_000))
    );

    // The period closes (a plan change ends it); the tenant pays; an operator records it.
    app.set_plan(&customer.session.tenant.id, "enterprise").await;
    let closed = customer.owner.invoices().await.unwrap().invoices;
    let pro = closed.iter().find(|s| s.plan == "pro").unwrap();
    assert_eq!(pro.plugin_fees_micros, Micros(500_000));
    let admin = app.platform_admin().await;
    // Only operators record payments, and only of closed statements.
    let refused = customer
        .owner
        .mark_statement_paid(&customer.session.tenant.id, pro.period_start)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InsufficientScope));
    let unknown = admin
        .mark_statement_paid(
            &customer.session.tenant.id,
            pro.period_start - chrono::Duration::days(3),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound));
    let invoice = admin
        .mark_statement_paid(&customer.session.tenant.id, pro.period_start)
        .await
        .unwrap();
    assert_eq!(
        (invoice.status.as_str(), invoice.total_cents),
        ("paid", pro.total_cents)
    );
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.payable, earnings.pending, earnings.balance),
        (Micros(400_000), Micros(0), Micros(400_000))
    );
}

#[tokio::test]
async fn a_payout_whose_answer_was_lost_is_found_not_paid_again_a_day_later() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let author = app.tenant().await;
    let customer = app.tenant().await;

    // Free tenants, and tenants put on a paid plan by hand (no Stripe subscription to collect from),
    // cannot call a priced plugin.
    let installed = {
        let (mut manifest, component) = built_plugin("hello");
        manifest.name = "stripe-hello".into();
        manifest.price_per_call_micros = 125_000;
        app.install_manifest(&author, &customer, manifest, component, json!({}))
            .await
    };
    let request = json!({ "name": "Ada" });
    let call = || customer.client.invoke(&installed.id, &request);
    assert_eq!(call().await.unwrap_err().code(), Some(ErrorCode::PaymentRequired));
    app.set_plan(&customer.session.tenant.id, "pro").await;
    assert_eq!(call().await.unwrap_err().code(), Some(ErrorCode::PaymentRequired));
    app.set_plan(&customer.session.tenant.id, "free").await;

    let (_, subscription) = subscribe(&app, &double, &customer, "metered").await;
    for _ in 0..10 {
        call().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let admin = app.platform_admin().await;
    admin.sync_usage().await.unwrap();
    double.invoice_period(&app.url(""), &subscription, true).await;
    let onboarding = author.owner.connect_payouts().await.unwrap();
    double.enable_payouts(&app.url(""), &onboarding.account_id).await;

    let today = Utc::now();
    let period = format!("{:04}-{:02}", today.year(), today.month());
    let month_end = Utc
        .with_ymd_and_hms(
            today.year() + i32::from(today.month() == 12),
            today.month() % 12 + 1,
            1,
            0,
            0,
            0,
        )
        .unwrap();
    let billing = plinth_server::billing(&app.config, app.store().clone()).unwrap();

    // Stripe makes the transfer, but its answer never arrives.
    double.fail_transfers(Failure::LoseResponses);
    let run = billing
        .run_payouts(&period, month_end, &operator())
        .await
        .unwrap();
    assert_eq!(run.payouts[0].status, PayoutStatus::Transferring);
    assert_eq!(double.transfers().len(), 1);
    // A rerun at once does not race the attempt that may still be running.
    double.fail_transfers(Failure::None);
    let run = billing
        .run_payouts(&period, month_end, &operator())
        .await
        .unwrap();
    assert_eq!(run.payouts[0].status, PayoutStatus::Transferring);
    assert_eq!(double.transfers().len(), 1);

    // 25 hours later Stripe has forgotten the idempotency key; the rerun finds the transfer instead.
    double.forget_idempotency_keys();
    let later = month_end + chrono::Duration::hours(25);
    let run = billing.run_payouts(&period, later, &operator()).await.unwrap();
    let payout = &run.payouts[0];
    assert_eq!((payout.status, payout.amount_cents), (PayoutStatus::Paid, 100));
    assert_eq!(double.transfers().len(), 1, "paid once");
    assert_eq!(
        payout.stripe_transfer_id.as_deref(),
        Some(double.transfers()[0].0.as_str())
    );
    let again = billing
        .run_payouts(&period, later + chrono::Duration::days(40), &operator())
        .await
        .unwrap();
    assert_eq!(again.payouts, run.payouts);
    assert_eq!(double.transfers().len(), 1);

    // The customer is refunded: the author's paid-out share is owed back and withheld from what comes.
    double.refund_last_invoice(&app.url("")).await;
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.payable, earnings.balance, earnings.paid_out),
        (Micros(0), Micros(-1_000_000), Micros(1_000_000))
    );
    let next = month_end + chrono::Duration::days(40);
    let next_period = format!("{:04}-{:02}", next.year(), next.month());
    let run = billing
        .run_payouts(&next_period, next + chrono::Duration::days(40), &operator())
        .await
        .unwrap();
    assert!(run.payouts.is_empty());
    assert_eq!(double.transfers().len(), 1);

    // The audit log has the payout's story.
    let log = author
        .owner
        .audit_log(&plinth_sdk::AuditQuery {
            action: Some("payout.".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = log.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["payout.paid", "payout.open"]);
}

/// An author whose plugin a customer on a metered Stripe plan called ten times at $0.125 (the
/// author's share: $1.00), the usage pushed to Stripe and the author onboarded for payouts; the
/// period's invoice not issued yet. Returns (author, customer, subscription).
async fn ten_paid_plugin_calls(app: &TestApp, double: &StripeDouble) -> (TestTenant, TestTenant, String) {
    let author = app.tenant().await;
    let customer = app.tenant().await;
    let installed = {
        let (mut manifest, component) = built_plugin("hello");
        manifest.name = "disputed-hello".into();
        manifest.price_per_call_micros = 125_000;
        app.install_manifest(&author, &customer, manifest, component, json!({}))
            .await
    };
    let (_, subscription) = subscribe(app, double, &customer, "metered").await;
    for _ in 0..10 {
        customer
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.platform_admin().await.sync_usage().await.unwrap();
    let onboarding = author.owner.connect_payouts().await.unwrap();
    double.enable_payouts(&app.url(""), &onboarding.account_id).await;
    (author, customer, subscription)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_the_customers_bank_takes_back_pays_no_author() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let (author, customer, subscription) = ten_paid_plugin_calls(&app, &double).await;
    double.invoice_period(&app.url(""), &subscription, true).await;
    let earned = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        earned.payable,
        Micros(1_000_000),
        "80% of ten calls at $0.125, collected"
    );

    // The card's bank disputes the payment and takes the money back; Stripe sends no refund, only a
    // dispute naming the charge and payment.
    double.dispute_last_invoice(&app.url("")).await;
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!((earnings.payable, earnings.balance), (Micros(0), Micros(0)));
    let next = Utc::now() + chrono::Duration::days(40);
    let period = format!("{:04}-{:02}", Utc::now().year(), Utc::now().month());
    let billing = plinth_server::billing(&app.config, app.store().clone()).unwrap();
    let run = billing.run_payouts(&period, next, &operator()).await.unwrap();
    assert!(run.payouts.is_empty(), "{:?}", run.payouts);
    assert!(double.transfers().is_empty());
    let log = customer
        .owner
        .audit_log(&plinth_sdk::AuditQuery {
            action: Some("invoice.".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        log.entries.iter().any(|e| e.action == "invoice.disputed"),
        "{:?}",
        log.entries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispute_that_arrives_before_its_invoice_is_kept_for_it() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let (author, _customer, subscription) = ten_paid_plugin_calls(&app, &double).await;
    // Stripe's events come in any order: the dispute first, then the invoice it took money from.
    let paid = double.issue_invoice(&subscription, true);
    double.dispute_last_invoice(&app.url("")).await;
    assert!(double.deliver(&app.url(""), &paid).await.status().is_success());
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!((earnings.payable, earnings.balance), (Micros(0), Micros(0)));
}

#[tokio::test]
async fn plugin_fees_stripe_never_invoiced_are_never_paid_out() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let author = app.tenant().await;
    let customer = app.tenant().await;
    let (_, subscription) = subscribe(&app, &double, &customer, "metered").await;
    let installed = {
        let (mut manifest, component) = built_plugin("hello");
        manifest.name = "late-hello".into();
        manifest.price_per_call_micros = 125_000;
        app.install_manifest(&author, &customer, manifest, component, json!({}))
            .await
    };
    for _ in 0..4 {
        customer
            .client
            .invoke(&installed.id, &json!({ "name": "Ada" }))
            .await
            .unwrap();
    }
    // Stripe finalizes and collects the invoice before the plugin fees reached its meters: the paid
    // invoice holds the subscription fee, not these fees.
    double.invoice_period(&app.url(""), &subscription, true).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.platform_admin().await.sync_usage().await.unwrap();
    let earnings = author.owner.author_earnings().await.unwrap();
    assert_eq!(
        (earnings.total, earnings.payable, earnings.pending),
        (Micros(400_000), Micros(0), Micros(400_000))
    );
}

#[tokio::test]
async fn without_a_plugin_fees_price_stripe_mode_sells_no_priced_plugin() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = TestApp::spawn_with(|config| {
        double.configure(config, crate::billing::STRIPE_PLANS);
        config.stripe_plugin_fees_price = None;
    })
    .await;
    app.store()
        .upsert_plan(&crate::billing::metered_plan())
        .await
        .unwrap();
    let author = app.tenant().await;
    let customer = app.tenant().await;
    subscribe(&app, &double, &customer, "metered").await;
    let installed = priced_hello(&app, &author, &customer, "unbillable-hello").await;
    let err = customer
        .client
        .invoke(&installed.id, &json!({ "name": "Ada" }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PaymentRequired));
}

#[tokio::test]
async fn an_unpaid_checkout_does_not_start_the_plan() {
    let double = StripeDouble::start(stripe_prices()).await;
    let app = stripe_app(&double).await;
    let tenant = app.tenant().await;
    let checkout = tenant.owner.change_plan("metered").await.unwrap();
    let session = checkout
        .checkout_url
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let customer = app
        .store()
        .billing_account(&tenant.session.tenant.id)
        .await
        .unwrap()
        .stripe_customer_id
        .unwrap();
    // A delayed payment method: Checkout completes, the money has not arrived.
    let event = double.event(
        "checkout.session.completed",
        Utc::now().timestamp(),
        json!({ "id": session, "object": "checkout.session", "mode": "subscription",
                "payment_status": "unpaid", "customer": customer, "subscription": "sub_unpaid",
                "client_reference_id": tenant.session.tenant.id, "metadata": { "plan_id": "metered" } }),
    );
    let body = event.to_string();
    let (status, _) = post_webhook(
        &app,
        Some(signature(WEBHOOK_SECRET, Utc::now().timestamp(), &body)),
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(tenant.owner.subscription().await.unwrap().plan.id, "free");
    // When it does arrive, Stripe says so and the plan starts.
    let mut paid = event.clone();
    paid["id"] = json!("evt_async_paid");
    paid["type"] = json!("checkout.session.async_payment_succeeded");
    paid["data"]["object"]["payment_status"] = json!("paid");
    assert!(double.deliver(&app.url(""), &paid).await.status().is_success());
    assert_eq!(tenant.owner.subscription().await.unwrap().plan.id, "metered");
}

#[tokio::test]
async fn create_admin_on_a_squatted_email_changes_nothing() {
    let app = TestApp::spawn().await;
    // The attacker registers the address the operator will use.
    let squatter = app
        .client()
        .signup(&plinth_sdk::SignupRequest {
            email: "ops@plinth.example".into(),
            password: "the squatter's own password".into(),
            tenant_name: "Totally the operators".into(),
        })
        .await
        .unwrap();
    let store = app.store();
    let refused = store
        .create_platform_admin(
            "ops@plinth.example",
            "the operator's password",
            false,
            &operator(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::EmailTaken);
    let wrong = store
        .create_platform_admin("ops@plinth.example", "the operator's password", true, &operator())
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), ErrorCode::InvalidLogin);
    let session = app.client().with_token(&squatter.token);
    let denied = session.pending_plugin_versions().await.unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::InsufficientScope));

    // A real operator account, then its rights taken away again.
    let admin = app.platform_admin().await;
    admin.pending_plugin_versions().await.unwrap();
    let who = admin.audit_log(&Default::default()).await.unwrap();
    let granted = who
        .entries
        .iter()
        .find(|e| e.action == "platform_admin.grant")
        .unwrap();
    assert_eq!(granted.actor, "operator");
    let refusals = who
        .entries
        .iter()
        .filter(|e| e.action == "platform_admin.refused")
        .count();
    assert_eq!(refusals, 2);
    let admin_email = granted.detail["email"].as_str().unwrap().to_owned();
    store
        .revoke_platform_admin(&admin_email, &operator())
        .await
        .unwrap();
    let revoked = admin.pending_plugin_versions().await.unwrap_err();
    assert_eq!(revoked.code(), Some(ErrorCode::InsufficientScope));
}

/// A login attempt from `address`, through a proxy the platform trusts.
async fn login_from(app: &TestApp, address: &str, email: &str, password: &str) -> reqwest::Response {
    app.http()
        .post(app.url("/v1/login"))
        .header("X-Forwarded-For", address)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_from_one_address_is_cut_off_while_others_still_log_in() {
    let app = TestApp::spawn_with(|config| {
        production_limits(config);
        // The platform sits behind a proxy on the same machine, which appends the client's address.
        config.trusted_proxies = "127.0.0.1/32, ::1/128".into();
    })
    .await;
    let victim = app.signup().await;

    // Guessing passwords across many emails from one address: 429 after the per-address budget.
    let mut refused_after = None;
    for attempt in 0..40 {
        let response = login_from(
            &app,
            "198.51.100.66",
            &format!("user{attempt}@example.com"),
            "guess-guess",
        )
        .await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            refused_after = Some(attempt);
            break;
        }
        assert_eq!(response.status(), 401);
    }
    // The budget refills one attempt every 60/limit seconds, so a slow machine may squeeze one more in.
    let limit = Config::default().logins_per_address_per_minute as usize;
    assert!(
        refused_after.is_some_and(|n| (limit..=limit + 1).contains(&n)),
        "cut off after {refused_after:?} attempts, not about {limit}"
    );
    // Forging X-Forwarded-For does not help: only the hop the proxy saw counts, whether the proxy
    // appends to the client's line or adds a line of its own.
    let forged = login_from(&app, "203.0.113.1, 198.51.100.66", "x@example.com", "guess-guess").await;
    assert_eq!(forged.status(), 429);
    let two_lines = app
        .http()
        .post(app.url("/v1/login"))
        .header("X-Forwarded-For", "203.0.113.2")
        .header("X-Forwarded-For", "198.51.100.66")
        .json(&json!({ "email": "y@example.com", "password": "guess-guess" }))
        .send()
        .await
        .unwrap();
    assert_eq!(two_lines.status(), 429);
    // Someone else, from another address, still logs in.
    let honest = login_from(&app, "198.51.100.7", &victim.user.email, PASSWORD).await;
    assert_eq!(honest.status(), 200);

    // Sign-ups are limited per address the same way.
    let signup = |n: usize| {
        app.http()
            .post(app.url("/v1/signup"))
            .header("X-Forwarded-For", "198.51.100.99")
            .json(&json!({ "email": format!("sybil{n}@example.com"), "password": PASSWORD, "tenant_name": "Sybil" }))
            .send()
    };
    let mut statuses = Vec::new();
    for n in 0..8 {
        statuses.push(signup(n).await.unwrap().status().as_u16());
    }
    let allowed = Config::default().signups_per_address_per_minute as usize;
    let created = statuses.iter().filter(|s| **s == 201).count();
    assert!((allowed..=allowed + 1).contains(&created), "{statuses:?}");
    assert!(statuses[created..].iter().all(|s| *s == 429), "{statuses:?}");

    // Without the proxy being trusted, X-Forwarded-For is the client's own word and is ignored.
    let direct = TestApp::spawn_with(production_limits).await;
    let mut statuses = Vec::new();
    for n in 0..limit + 3 {
        let response = login_from(
            &direct,
            &format!("198.51.100.{n}"),
            &format!("x{n}@example.com"),
            "guess-guess",
        )
        .await;
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_a_password_from_one_network_does_not_lock_its_owner_out() {
    let app = TestApp::spawn_with(|config| {
        production_limits(config);
        config.trusted_proxies = "127.0.0.1/32, ::1/128".into();
    })
    .await;
    let victim = app.signup().await;
    let email = victim.user.email.as_str();
    // The guesser's network is cut off after ten attempts at this account...
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(
            login_from(&app, "198.51.100.66", email, "guess-guess")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[..10], [401; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    // ...and the owner, from theirs, logs in all the same.
    let owner = login_from(&app, "203.0.113.7", email, PASSWORD).await;
    assert_eq!(owner.status(), 200);
    // Guessing spread over many networks still meets a limit on the account itself.
    let mut refused_at = None;
    for n in 0..60 {
        let response = login_from(&app, &format!("192.0.2.{n}"), email, "guess-guess").await;
        if response.status() == 429 {
            refused_at = Some(n);
            break;
        }
        assert_eq!(response.status(), 401);
    }
    assert!(
        refused_at.is_some_and(|n| n < 40),
        "one guess from each of {refused_at:?} networks before the account's own limit"
    );
    // That limit holds only for networks the account never logged in from: the owner's still works.
    let owner = login_from(&app, "203.0.113.7", email, PASSWORD).await;
    assert_eq!(owner.status(), 200);
    // An IPv6 guesser is one network per /48, however many /64s it spreads over.
    let other = app.signup().await;
    let mut statuses = Vec::new();
    for n in 0..11 {
        let address = format!("2001:db8:77:{n}::1");
        statuses.push(
            login_from(&app, &address, &other.user.email, "guess-guess")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses[10], 429, "{statuses:?}");
}

/// Sign-ups and logins from networks new to their account share one limit, all addresses together. An
/// attacker spending it from many addresses keeps out only other newcomers: returning users log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_keeps_no_returning_user_out() {
    let app = TestApp::spawn_with(|config| {
        production_limits(config);
        config.unauthenticated_per_minute = 12;
        config.trusted_proxies = "127.0.0.1/32, ::1/128".into();
    })
    .await;
    let owner = app.signup().await;
    let email = owner.user.email.as_str();
    assert_eq!(
        login_from(&app, "203.0.113.7", email, PASSWORD).await.status(),
        200
    );
    // Each attempt from an address of its own: no per-address or per-account limit comes into play.
    let mut refused_at = None;
    for n in 0..30 {
        let response = login_from(
            &app,
            &format!("198.51.100.{n}"),
            "nobody@example.com",
            "guess-guess",
        )
        .await;
        if response.status() == 429 {
            refused_at = Some(n);
            break;
        }
        assert_eq!(response.status(), 401);
    }
    assert!(
        refused_at.is_some_and(|n| n <= 12),
        "refused after {refused_at:?} addresses"
    );
    let signup = app
        .http()
        .post(app.url("/v1/signup"))
        .header("X-Forwarded-For", "198.51.100.200")
        .json(&json!({ "email": "newcomer@example.com", "password": PASSWORD, "tenant_name": "Newcomer" }))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), 429, "sign-ups share the spent limit");
    assert_eq!(
        login_from(&app, "192.0.2.9", email, PASSWORD).await.status(),
        429,
        "so do logins from networks new to the account"
    );
    // The owner, from the network they used before, is not held to it.
    assert_eq!(
        login_from(&app, "203.0.113.7", email, PASSWORD).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_unmetered_routes_is_throttled_alone() {
    let app = TestApp::spawn_with(|config| config.unmetered_per_tenant_per_minute = 20).await;
    let flooder = app.tenant().await;
    let neighbour = app.tenant().await;
    let list = |tenant: &TestTenant| {
        app.http()
            .get(app.url("/v1/installations"))
            .bearer_auth(&tenant.key.secret)
            .send()
    };
    let statuses: Vec<u16> = join_all((0..40).map(|_| list(&flooder)))
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert!(throttled >= 15, "{throttled} of 40 throttled: {statuses:?}");
    assert_eq!(list(&neighbour).await.unwrap().status(), 200);
    neighbour.client.installations().await.unwrap();
    neighbour.owner.api_keys().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_version_stops_at_once_on_every_replica() {
    let app = TestApp::spawn().await;
    let replica = app.replica().await;
    let author = app.tenant().await;
    let tenant = app.tenant().await;
    app.set_plan(&tenant.session.tenant.id, "enterprise").await;
    let hostile = app.install_plugin(&author, &tenant, "hostile", json!({})).await;
    let on_replica = replica.client().with_token(&tenant.key.secret);
    on_replica
        .invoke(&hostile.id, &json!({ "do": "echo" }))
        .await
        .unwrap();

    let admin = app.platform_admin().await;
    let revoked = admin
        .revoke_plugin_version(&hostile.version_id, "exfiltrates settings through its answers")
        .await
        .unwrap();
    assert_eq!(revoked.status, ReviewStatus::Revoked);
    for client in [&tenant.client, &on_replica] {
        let err = client
            .invoke(&hostile.id, &json!({ "do": "echo" }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PluginRevoked));
        assert!(matches!(err, plinth_sdk::Error::Api { status: 410, .. }));
    }
    // The tenant sees why; the marketplace no longer offers it; it cannot be approved again.
    let installation = &tenant.client.installations().await.unwrap()[0];
    assert_eq!(installation.version_status, ReviewStatus::Revoked);
    assert_eq!(
        installation.version_note.as_deref(),
        Some("exfiltrates settings through its answers")
    );
    assert!(
        tenant
            .client
            .marketplace(Some("hostile"))
            .await
            .unwrap()
            .is_empty()
    );
    let again = admin
        .review_plugin_version(&hostile.version_id, true, None)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::ValidationFailed));
    // Only platform admins revoke.
    let denied = author
        .owner
        .revoke_plugin_version(&hostile.version_id, "mine")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::InsufficientScope));
}

#[tokio::test]
async fn protocol_inputs_must_agree_on_the_batch_and_are_billed_by_it() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    // "[CLS] love this [SEP]" in the MiniLM vocabulary, `rows` times.
    let tensor = |name: &str, rows: usize| InferInput {
        name: name.into(),
        shape: vec![i64::try_from(rows).unwrap(), 4],
        datatype: "INT64".into(),
        parameters: None,
        data: json!(vec![
            match name {
                "input_ids" => [101, 2293, 2023, 102],
                "attention_mask" => [1, 1, 1, 1],
                _ => [0, 0, 0, 0],
            };
            rows
        ]),
    };
    // One row billed, 32 computed: refused before anything runs.
    let lopsided = InferRequest {
        id: None,
        inputs: vec![
            tensor("input_ids", 1),
            tensor("attention_mask", 32),
            tensor("token_type_ids", 32),
        ],
        outputs: None,
        parameters: None,
    };
    let err = tenant.client.infer("sentiment", &lopsided).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput));
    // A batch no data backs: a trillion rows of nothing, to be billed (and summed) a trillion units.
    let empty = |name: &str| InferInput {
        name: name.into(),
        shape: vec![1_099_511_627_776, 0],
        datatype: "INT64".into(),
        parameters: None,
        data: json!([]),
    };
    let hollow = InferRequest {
        id: None,
        inputs: vec![
            empty("input_ids"),
            empty("attention_mask"),
            empty("token_type_ids"),
        ],
        outputs: None,
        parameters: None,
    };
    let err = tenant.client.infer("sentiment", &hollow).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput));
    assert_eq!(events(&app, &tenant).await, 0);
    let even = InferRequest {
        inputs: vec![
            tensor("input_ids", 3),
            tensor("attention_mask", 3),
            tensor("token_type_ids", 3),
        ],
        ..lopsided
    };
    tenant.client.infer("sentiment", &even).await.unwrap();
    let usage = tenant.client.usage(&Default::default()).await.unwrap();
    assert_eq!((usage.total.calls, usage.total.units), (1, 3));
}
