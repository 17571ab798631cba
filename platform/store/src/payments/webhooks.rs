//! Stripe's webhook events, applied exactly once and in order. Each event id is recorded in the same
//! transaction as its change, so a redelivery changes nothing; each kind of state keeps the `created`
//! time of the newest event applied to it, so an event that arrives late cannot roll state back.

use chrono::{DateTime, Utc};
use plinth_core::api::SubscriptionStatus;
use plinth_core::billing::ProviderInvoice;
use plinth_core::id::TenantId;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};

use super::statements::PAID;
use crate::audit::Who;
use crate::entity::{TenantScoped, author_accounts, invoices, meter_pushes, stripe_events, subscriptions};
use crate::plans::{FREE_PLAN, find_plan, month_after};
use crate::{Result, Store};

/// A Stripe webhook event, reduced to what changes state here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderEvent {
    pub id: String,
    pub kind: String,
    /// Unix seconds; orders events about the same object.
    pub created: i64,
    pub change: ProviderChange,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderChange {
    /// Checkout was paid for (at once, or later for asynchronous payment methods): the customer now
    /// has a subscription to `plan`. A Checkout completed without payment is not this.
    CheckoutCompleted {
        tenant: Option<TenantId>,
        customer: String,
        subscription: String,
        plan: Option<String>,
    },
    /// A subscription's current state (created, updated or deleted).
    Subscription {
        customer: String,
        subscription: String,
        /// The plan its prices belong to, when they are configured here.
        plan: Option<String>,
        status: SubscriptionStatus,
        period_start: Option<DateTime<Utc>>,
        period_end: Option<DateTime<Utc>>,
        cancel_at_period_end: bool,
        /// The subscription ended: the tenant returns to the free plan.
        deleted: bool,
        /// One of its items is the plugin-fees price, so plugin fees sent to the meter are invoiced.
        plugin_fees_item: bool,
        /// One of its items is the training price, so training sent to its meter is invoiced.
        training_item: bool,
    },
    /// An invoice was finalized, paid, voided, marked uncollectible, or its payment failed.
    Invoice {
        customer: String,
        invoice: ProviderInvoice,
        currency: String,
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
        /// When its lines were fixed (`status_transitions.finalized_at`), when Stripe says.
        finalized_at: Option<DateTime<Utc>>,
        /// When it was paid (`status_transitions.paid_at`), when Stripe says.
        paid_at: Option<DateTime<Utc>>,
        /// `Some(true)`: paid, the subscription is in good standing; `Some(false)`: payment failed,
        /// the tenant is past due.
        settled: Option<bool>,
    },
    /// Money an invoice collected was (partly) given back: its period no longer counts as collected,
    /// so plugin earnings in it are not paid out (or are withheld from later payouts).
    Refunded {
        invoice: String,
        /// The customer, when the event names it: a refund of an invoice not seen yet is kept for it.
        customer: Option<String>,
        /// Taken back by the customer's bank (a dispute) rather than given back by the platform. Final
        /// either way: a dispute the platform later wins does not make the period collected again
        /// (its authors' shares stay unpaid rather than risk paying out money that was not kept).
        disputed: bool,
    },
    /// A connected account's capabilities changed.
    Account { account: String, payouts_enabled: bool },
    /// An event this platform does not act on; recorded so it is not reprocessed.
    Ignored,
}

/// The invoice status a refund leaves.
pub const REFUNDED: &str = "refunded";

fn status_text(status: SubscriptionStatus) -> String {
    status.as_str().to_owned()
}

impl Store {
    /// Applies a Stripe event exactly once. Returns `false` for an event id seen before. Events older
    /// than the last one applied to the same subscription, invoice or account change nothing, so
    /// out-of-order delivery cannot roll state back.
    pub async fn apply_provider_event(&self, event: &ProviderEvent) -> Result<bool> {
        let txn = self.write_transaction().await?;
        let inserted = stripe_events::Entity::insert(stripe_events::ActiveModel {
            id: Set(event.id.clone()),
            kind: Set(event.kind.clone()),
            created: Set(event.created),
            received_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::column(stripe_events::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        if inserted == 0 {
            return Ok(false);
        }
        let touched = apply_change(&txn, event).await?;
        txn.commit().await?;
        if let Some(tenant) = touched {
            self.credentials.forget_in_tenant(&tenant, None);
        }
        Ok(true)
    }
}

async fn subscription_of_customer(
    conn: &impl ConnectionTrait,
    customer: &str,
    tenant_hint: Option<&TenantId>,
) -> Result<Option<subscriptions::Model>> {
    if let Some(row) = subscriptions::Entity::find()
        .filter(subscriptions::Column::StripeCustomerId.eq(customer))
        .one(conn)
        .await?
    {
        return Ok(Some(row));
    }
    match tenant_hint {
        Some(tenant) => Ok(subscriptions::Entity::find_in(tenant).one(conn).await?),
        None => Ok(None),
    }
}

/// Records a change of plan or payment status that Stripe made, in the tenant's audit log.
async fn audit_change(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    event: &ProviderEvent,
    action: &str,
    detail: serde_json::Value,
) -> Result<()> {
    let mut detail = detail;
    detail["event"] = serde_json::Value::String(event.id.clone());
    crate::audit::record(
        conn,
        Some(tenant),
        &Who::internal(Who::STRIPE),
        action,
        None,
        detail,
    )
    .await
}

/// Records a payment status change Stripe made (`from` to `to`, `about` the object that said so);
/// nothing when the status stays.
async fn audit_status(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    event: &ProviderEvent,
    from: &str,
    to: SubscriptionStatus,
    about: (&str, &str),
) -> Result<()> {
    if from == to.as_str() {
        return Ok(());
    }
    let mut detail = serde_json::json!({ "from": from, "to": to.as_str() });
    detail[about.0] = serde_json::Value::String(about.1.to_owned());
    audit_change(conn, tenant, event, "subscription.status", detail).await
}

/// Applies one event's change inside the caller's transaction; returns the tenant whose limits may
/// have changed.
async fn apply_change(conn: &impl ConnectionTrait, event: &ProviderEvent) -> Result<Option<TenantId>> {
    let now = Utc::now();
    let fresh = |applied: Option<i64>| applied.is_none_or(|at| event.created >= at);
    match &event.change {
        ProviderChange::Ignored => Ok(None),
        ProviderChange::CheckoutCompleted {
            tenant,
            customer,
            subscription,
            plan,
        } => {
            let Some(row) = subscription_of_customer(conn, customer, tenant.as_ref()).await? else {
                tracing::warn!(event = %event.id, %customer, "checkout for an unknown customer");
                return Ok(None);
            };
            let tenant: TenantId = crate::accounts::parse_id(&row.tenant_id)?;
            if !fresh(row.stripe_event_at) {
                return Ok(None);
            }
            let started = DateTime::<Utc>::from_timestamp(event.created, 0).unwrap_or(now);
            let plan_id = match plan {
                Some(plan) if find_plan(conn, plan).await.is_ok() => plan.clone(),
                _ => row.plan_id.clone(),
            };
            let same_subscription = row.stripe_subscription_id.as_deref() == Some(subscription.as_str());
            let mut model: subscriptions::ActiveModel = row.clone().into();
            model.stripe_customer_id = Set(Some(customer.clone()));
            model.stripe_subscription_id = Set(Some(subscription.clone()));
            model.stripe_event_at = Set(Some(event.created));
            model.updated_at = Set(now);
            if !same_subscription {
                crate::plans::reanchor(conn, &row, &mut model, &plan_id, (started, month_after(started)))
                    .await?;
                if fresh(row.status_event_at) {
                    model.status = Set(status_text(SubscriptionStatus::Active));
                    model.status_event_at = Set(Some(event.created));
                }
                model.cancel_at_period_end = Set(false);
                model.meter_synced_until_us = Set(Some(
                    row.meter_synced_until_us
                        .unwrap_or(i64::MIN)
                        .max(started.timestamp_micros()),
                ));
                audit_change(
                    conn,
                    &tenant,
                    event,
                    "subscription.change_plan",
                    serde_json::json!({ "from": row.plan_id, "to": plan_id, "subscription": subscription }),
                )
                .await?;
            }
            model.update(conn).await?;
            Ok(Some(tenant))
        }
        ProviderChange::Subscription {
            customer,
            subscription,
            plan,
            status,
            period_start,
            period_end,
            cancel_at_period_end,
            deleted,
            plugin_fees_item,
            training_item,
        } => {
            let Some(row) = subscription_of_customer(conn, customer, None).await? else {
                tracing::warn!(event = %event.id, %customer, "subscription event for an unknown customer");
                return Ok(None);
            };
            let tenant: TenantId = crate::accounts::parse_id(&row.tenant_id)?;
            if !fresh(row.stripe_event_at) {
                return Ok(None);
            }
            // An event about a subscription this tenant already replaced changes nothing.
            if *deleted
                && row
                    .stripe_subscription_id
                    .as_deref()
                    .is_some_and(|s| s != subscription)
            {
                return Ok(None);
            }
            let mut model: subscriptions::ActiveModel = row.clone().into();
            model.stripe_event_at = Set(Some(event.created));
            model.updated_at = Set(now);
            let new_plan = if *deleted {
                crate::plans::reanchor(conn, &row, &mut model, FREE_PLAN, (now, month_after(now))).await?;
                model.status = Set(status_text(SubscriptionStatus::Active));
                model.status_event_at = Set(Some(event.created));
                model.stripe_subscription_id = Set(None);
                model.cancel_at_period_end = Set(false);
                model.plugin_fees_item = Set(false);
                model.training_item = Set(false);
                FREE_PLAN.to_owned()
            } else {
                model.stripe_subscription_id = Set(Some(subscription.clone()));
                let plan_id = match plan {
                    Some(plan) if find_plan(conn, plan).await.is_ok() => plan.clone(),
                    _ => row.plan_id.clone(),
                };
                let period = match (period_start, period_end) {
                    (Some(start), Some(end)) => (*start, *end),
                    _ => (row.current_period_start, row.current_period_end),
                };
                crate::plans::reanchor(conn, &row, &mut model, &plan_id, period).await?;
                if fresh(row.status_event_at) {
                    // Payment status turns priced calls and the plan's limits on or off: audited as
                    // an invoice's is.
                    let about = ("subscription", subscription.as_str());
                    audit_status(conn, &tenant, event, &row.status, *status, about).await?;
                    model.status = Set(status_text(*status));
                    model.status_event_at = Set(Some(event.created));
                }
                model.cancel_at_period_end = Set(*cancel_at_period_end);
                model.plugin_fees_item = Set(*plugin_fees_item);
                model.training_item = Set(*training_item);
                if let Some(start) = period_start {
                    let has_pushes = meter_pushes::Entity::find_in(&tenant).one(conn).await?.is_some();
                    let cursor = row.meter_synced_until_us;
                    // The first period decides where metering starts; once buckets are closed the
                    // cursor only moves forward.
                    model.meter_synced_until_us = Set(Some(match cursor {
                        Some(c) if has_pushes => c,
                        Some(c) if row.stripe_subscription_id.as_deref() == Some(subscription) => {
                            c.min(start.timestamp_micros())
                        }
                        Some(c) => c.max(start.timestamp_micros()),
                        None => start.timestamp_micros(),
                    }));
                }
                plan_id
            };
            if new_plan != row.plan_id {
                audit_change(
                    conn,
                    &tenant,
                    event,
                    "subscription.change_plan",
                    serde_json::json!({ "from": row.plan_id, "to": new_plan, "subscription": subscription }),
                )
                .await?;
            }
            model.update(conn).await?;
            Ok(Some(tenant))
        }
        ProviderChange::Invoice {
            customer,
            invoice,
            currency,
            period_start,
            period_end,
            finalized_at,
            paid_at,
            settled,
        } => {
            let Some(row) = subscription_of_customer(conn, customer, None).await? else {
                tracing::warn!(event = %event.id, %customer, "invoice for an unknown customer");
                return Ok(None);
            };
            let tenant: TenantId = crate::accounts::parse_id(&row.tenant_id)?;
            let existing = invoices::Entity::find_by_id(invoice.id.as_str())
                .one(conn)
                .await?;
            // A refund is final: a late event about the same invoice does not make it collected again.
            let refunded = existing.as_ref().is_some_and(|e| e.status == REFUNDED);
            if !refunded
                && existing
                    .as_ref()
                    .is_none_or(|e| event.created >= e.stripe_event_at)
            {
                // Paid stays paid: an `invoice.finalized` (open) stamped in the same second as the
                // payment, delivered after it, does not make it unpaid again.
                let status = match &existing {
                    Some(e) if e.status == PAID && matches!(invoice.status.as_str(), "draft" | "open") => {
                        PAID.to_owned()
                    }
                    _ => invoice.status.clone(),
                };
                // Finalized when Stripe says so; else no later than the first event that shows it
                // past its draft.
                let finalized_at_us = finalized_at
                    .map(|t| t.timestamp_micros())
                    .or_else(|| existing.as_ref().and_then(|e| e.finalized_at_us))
                    .or_else(|| (status != "draft").then(|| event.created.saturating_mul(1_000_000)));
                let paid_at_us = existing.as_ref().and_then(|e| e.paid_at_us).or_else(|| {
                    (status == PAID).then(|| {
                        paid_at.map_or(event.created.saturating_mul(1_000_000), |t| t.timestamp_micros())
                    })
                });
                let model = invoices::ActiveModel {
                    stripe_invoice_id: Set(invoice.id.clone()),
                    tenant_id: Set(tenant.to_string()),
                    period_start_us: Set(period_start.timestamp_micros()),
                    period_end_us: Set(period_end.timestamp_micros()),
                    status: Set(status),
                    currency: Set(currency.to_ascii_lowercase()),
                    total_cents: Set(invoice.total_cents),
                    amount_paid_cents: Set(invoice.amount_paid_cents),
                    hosted_url: Set(invoice.hosted_url.clone()),
                    stripe_event_at: Set(event.created),
                    updated_at: Set(now),
                    finalized_at_us: Set(finalized_at_us),
                    local: Set(false),
                    paid_at_us: Set(paid_at_us),
                };
                if existing.is_some() {
                    model.update(conn).await?;
                } else {
                    model.insert(conn).await?;
                }
            }
            let Some(paid) = settled else {
                return Ok(None);
            };
            // Payment status has its own watermark: a subscription event about the plan does not make
            // an older invoice event current again, nor the reverse.
            if !fresh(row.status_event_at) || row.stripe_subscription_id.is_none() {
                return Ok(None);
            }
            let status = if *paid {
                SubscriptionStatus::Active
            } else {
                SubscriptionStatus::PastDue
            };
            audit_status(
                conn,
                &tenant,
                event,
                &row.status,
                status,
                ("invoice", &invoice.id),
            )
            .await?;
            let mut model: subscriptions::ActiveModel = row.into();
            model.status = Set(status_text(status));
            model.status_event_at = Set(Some(event.created));
            model.updated_at = Set(now);
            model.update(conn).await?;
            Ok(Some(tenant))
        }
        ProviderChange::Refunded {
            invoice,
            customer,
            disputed,
        } => {
            let Some(row) = invoices::Entity::find_by_id(invoice.as_str()).one(conn).await? else {
                // Not seen yet (events arrive in any order): keep the refund, so the invoice is
                // refunded whenever its own events come.
                let owner = match customer {
                    Some(customer) => subscription_of_customer(conn, customer, None).await?,
                    None => None,
                };
                let Some(owner) = owner else {
                    tracing::warn!(event = %event.id, %invoice, "refund of an invoice of an unknown customer");
                    return Ok(None);
                };
                invoices::ActiveModel {
                    stripe_invoice_id: Set(invoice.clone()),
                    tenant_id: Set(owner.tenant_id.clone()),
                    period_start_us: Set(0),
                    period_end_us: Set(0),
                    status: Set(REFUNDED.to_owned()),
                    currency: Set(String::new()),
                    total_cents: Set(0),
                    amount_paid_cents: Set(0),
                    hosted_url: Set(None),
                    stripe_event_at: Set(event.created),
                    updated_at: Set(now),
                    finalized_at_us: Set(None),
                    local: Set(false),
                    paid_at_us: Set(None),
                }
                .insert(conn)
                .await?;
                return Ok(None);
            };
            let tenant: TenantId = crate::accounts::parse_id(&row.tenant_id)?;
            audit_change(
                conn,
                &tenant,
                event,
                if *disputed {
                    "invoice.disputed"
                } else {
                    "invoice.refunded"
                },
                serde_json::json!({ "invoice": invoice, "was": row.status }),
            )
            .await?;
            let mut model: invoices::ActiveModel = row.into();
            model.status = Set(REFUNDED.to_owned());
            model.stripe_event_at = Set(event.created);
            model.updated_at = Set(now);
            model.update(conn).await?;
            Ok(None)
        }
        ProviderChange::Account {
            account,
            payouts_enabled,
        } => {
            let Some(row) = author_accounts::Entity::find()
                .filter(author_accounts::Column::StripeAccountId.eq(account.as_str()))
                .one(conn)
                .await?
            else {
                return Ok(None);
            };
            if event.created >= row.stripe_event_at {
                let mut model: author_accounts::ActiveModel = row.into();
                model.payouts_enabled = Set(*payouts_enabled);
                model.stripe_event_at = Set(event.created);
                model.updated_at = Set(now);
                model.update(conn).await?;
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tenant_with_customer, test_store};

    fn event(id: &str, created: i64, change: ProviderChange) -> ProviderEvent {
        ProviderEvent {
            id: id.to_owned(),
            kind: "test".to_owned(),
            created,
            change,
        }
    }

    fn subscription_state(status: SubscriptionStatus, plan: &str, created_period: i64) -> ProviderChange {
        ProviderChange::Subscription {
            customer: "cus_1".into(),
            subscription: "sub_1".into(),
            plan: Some(plan.into()),
            status,
            period_start: DateTime::from_timestamp(created_period, 0),
            period_end: DateTime::from_timestamp(created_period + 30 * 86_400, 0),
            cancel_at_period_end: false,
            deleted: false,
            plugin_fees_item: true,
            training_item: false,
        }
    }

    fn invoice(id: &str, status: &str, settled: Option<bool>) -> ProviderChange {
        ProviderChange::Invoice {
            customer: "cus_1".into(),
            invoice: ProviderInvoice {
                id: id.into(),
                status: status.into(),
                total_cents: 4_900,
                amount_paid_cents: if status == "paid" { 4_900 } else { 0 },
                hosted_url: None,
            },
            currency: "USD".into(),
            period_start: DateTime::from_timestamp(1_000, 0).unwrap(),
            period_end: DateTime::from_timestamp(2_000, 0).unwrap(),
            finalized_at: None,
            paid_at: None,
            settled,
        }
    }

    async fn status_of(store: &Store, tenant: &TenantId) -> (String, String) {
        let row = subscriptions::Entity::find_in(tenant)
            .one(store.db())
            .await
            .unwrap()
            .unwrap();
        (row.plan_id, row.status)
    }

    async fn invoice_status(store: &Store, id: &str) -> String {
        invoices::Entity::find_by_id(id)
            .one(store.db())
            .await
            .unwrap()
            .unwrap()
            .status
    }

    #[tokio::test]
    async fn each_event_applies_once_and_a_late_older_one_changes_nothing() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        let checkout = ProviderChange::CheckoutCompleted {
            tenant: Some(tenant.clone()),
            customer: "cus_1".into(),
            subscription: "sub_1".into(),
            plan: Some("pro".into()),
        };
        assert!(
            store
                .apply_provider_event(&event("evt_1", 100, checkout.clone()))
                .await
                .unwrap()
        );
        assert!(
            !store
                .apply_provider_event(&event("evt_1", 100, checkout))
                .await
                .unwrap()
        );
        assert_eq!(status_of(&store, &tenant).await, ("pro".into(), "active".into()));

        // Newer: payment failed. Older, delivered later: paid. The newer wins.
        store
            .apply_provider_event(&event("evt_2", 300, invoice("in_1", "open", Some(false))))
            .await
            .unwrap();
        store
            .apply_provider_event(&event("evt_3", 200, invoice("in_0", "paid", Some(true))))
            .await
            .unwrap();
        assert_eq!(status_of(&store, &tenant).await.1, "past_due");

        // A subscription update about the plan has its own watermark: older than the payment event,
        // newer than the last subscription event, it still moves the plan.
        store
            .apply_provider_event(&event(
                "evt_4",
                250,
                subscription_state(SubscriptionStatus::Active, "enterprise", 100),
            ))
            .await
            .unwrap();
        assert_eq!(
            status_of(&store, &tenant).await,
            ("enterprise".into(), "past_due".into())
        );

        // Both plan changes and the status change are in the tenant's audit log, by Stripe.
        let log = store
            .audit_log(&crate::audit::AuditQuery {
                tenant: Some(tenant.clone()),
                limit: 50,
                ..Default::default()
            })
            .await
            .unwrap();
        let actions: Vec<&str> = log
            .entries
            .iter()
            .filter(|e| e.actor == Who::STRIPE)
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(
            actions,
            [
                "subscription.change_plan",
                "subscription.status",
                "subscription.change_plan"
            ]
        );
    }

    #[tokio::test]
    async fn a_refunded_invoice_stays_refunded_whatever_arrives_later() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        store
            .apply_provider_event(&event("evt_1", 100, invoice("in_1", "paid", Some(true))))
            .await
            .unwrap();
        assert_eq!(invoice_status(&store, "in_1").await, "paid");
        store
            .apply_provider_event(&event(
                "evt_2",
                200,
                ProviderChange::Refunded {
                    invoice: "in_1".into(),
                    customer: None,
                    disputed: false,
                },
            ))
            .await
            .unwrap();
        // A redelivered, newer-stamped `invoice.paid` (Stripe retries) does not undo the refund.
        store
            .apply_provider_event(&event("evt_3", 300, invoice("in_1", "paid", Some(true))))
            .await
            .unwrap();
        assert_eq!(invoice_status(&store, "in_1").await, REFUNDED);
        let row = invoices::Entity::find_by_id("in_1")
            .one(store.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            row.currency, "usd",
            "currencies are kept lower-case, as Stripe names them"
        );
        assert!(
            store
                .audit_log(&crate::audit::AuditQuery {
                    tenant: Some(tenant),
                    action_prefix: Some("invoice.refunded".into()),
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .entries
                .len()
                == 1
        );
    }

    #[tokio::test]
    async fn paid_stays_paid_and_a_refund_seen_first_still_counts() {
        let (store, _dir) = test_store().await;
        tenant_with_customer(&store, "cus_1").await;
        store
            .apply_provider_event(&event("evt_1", 100, invoice("in_1", "paid", Some(true))))
            .await
            .unwrap();
        // `invoice.finalized`, stamped the same second, delivered after the payment.
        store
            .apply_provider_event(&event("evt_2", 100, invoice("in_1", "open", None)))
            .await
            .unwrap();
        assert_eq!(invoice_status(&store, "in_1").await, PAID);
        let row = invoices::Entity::find_by_id("in_1")
            .one(store.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (row.paid_at_us, row.finalized_at_us),
            (Some(100_000_000), Some(100_000_000))
        );

        // The refund of an invoice whose own events have not arrived yet.
        store
            .apply_provider_event(&event(
                "evt_3",
                200,
                ProviderChange::Refunded {
                    invoice: "in_2".into(),
                    customer: Some("cus_1".into()),
                    disputed: false,
                },
            ))
            .await
            .unwrap();
        store
            .apply_provider_event(&event("evt_4", 300, invoice("in_2", "paid", Some(true))))
            .await
            .unwrap();
        assert_eq!(invoice_status(&store, "in_2").await, REFUNDED);
    }

    #[tokio::test]
    async fn a_deleted_subscription_returns_the_tenant_to_free_unless_it_was_replaced() {
        let (store, _dir) = test_store().await;
        let tenant = tenant_with_customer(&store, "cus_1").await;
        store
            .apply_provider_event(&event(
                "evt_1",
                100,
                subscription_state(SubscriptionStatus::Active, "pro", 100),
            ))
            .await
            .unwrap();
        // Deletion of some other (replaced) subscription of the same customer: nothing changes.
        let mut other = subscription_state(SubscriptionStatus::Canceled, "pro", 100);
        if let ProviderChange::Subscription {
            subscription,
            deleted,
            ..
        } = &mut other
        {
            *subscription = "sub_old".into();
            *deleted = true;
        }
        store
            .apply_provider_event(&event("evt_2", 150, other))
            .await
            .unwrap();
        assert_eq!(status_of(&store, &tenant).await.0, "pro");

        let mut ended = subscription_state(SubscriptionStatus::Canceled, "pro", 100);
        if let ProviderChange::Subscription { deleted, .. } = &mut ended {
            *deleted = true;
        }
        store
            .apply_provider_event(&event("evt_3", 160, ended))
            .await
            .unwrap();
        assert_eq!(
            status_of(&store, &tenant).await,
            (FREE_PLAN.into(), "active".into())
        );
    }

    #[tokio::test]
    async fn events_for_unknown_customers_are_recorded_and_ignored() {
        let (store, _dir) = test_store().await;
        let applied = store
            .apply_provider_event(&event("evt_1", 100, invoice("in_1", "paid", Some(true))))
            .await
            .unwrap();
        assert!(applied, "the event is recorded as seen");
        assert!(
            invoices::Entity::find_by_id("in_1")
                .one(store.db())
                .await
                .unwrap()
                .is_none()
        );
    }
}
