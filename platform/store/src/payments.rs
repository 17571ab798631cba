//! Payment state: Stripe events applied once and in order, usage closed into meter buckets for Stripe,
//! invoices as Stripe reports them, and plugin authors' connected accounts and payouts.
//!
//! Stripe talks to this module only through plain values ([`ProviderEvent`], [`MeterPush`]): parsing
//! Stripe's JSON and calling its API live in `plinth-billing`.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use plinth_core::Micros;
use plinth_core::api::{Plan, SubscriptionStatus};
use plinth_core::billing::{Payout, ProviderInvoice, ReconciliationRow, StatementItem};
use plinth_core::id::TenantId;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::entity::{
    TenantScoped, author_accounts, invoices, meter_pushes, payouts, plugin_versions, plugins, stripe_events,
    subscriptions, tenants, usage_events,
};
use crate::plans::{FREE_PLAN, find_plan, month_after};
use crate::{Result, Store, StoreError};

/// The meter for model units at the plan's per-call price (included calls come off in Stripe's tiers).
pub const METER_CALLS: &str = "calls";
/// The meter for plugin fees, in micro-units of the currency.
pub const METER_PLUGIN_FEES: &str = "plugin_fees";
/// Ledger kinds each meter counts.
pub const MODEL_KIND: &str = "model";

/// A tenant's subscription with its payment state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingAccount {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub plan: Plan,
    pub status: SubscriptionStatus,
    /// The current billing period (the stored one rolled forward monthly).
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    pub stripe_customer_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    pub meter_synced_until_us: Option<i64>,
}

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
    /// Checkout finished: the customer now has a subscription to `plan`.
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
    },
    /// An invoice was finalized, paid, or its payment failed.
    Invoice {
        customer: String,
        invoice: ProviderInvoice,
        currency: String,
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
        /// `Some(true)`: paid, the subscription is in good standing; `Some(false)`: payment failed,
        /// the tenant is past due.
        settled: Option<bool>,
    },
    /// A connected account's capabilities changed.
    Account { account: String, payouts_enabled: bool },
    /// An event this platform does not act on; recorded so it is not reprocessed.
    Ignored,
}

/// Usage of one tenant in one bucket, closed and waiting for (or acknowledged by) Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterPush {
    /// Stable across retries and restarts: the meter event's identifier and Idempotency-Key.
    pub identifier: String,
    pub tenant_id: TenantId,
    pub stripe_customer_id: String,
    pub meter: String,
    pub bucket_start: DateTime<Utc>,
    pub value: i64,
}

/// A payout row: opened before the transfer is requested, completed when Stripe confirms it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRecord {
    pub payout: Payout,
    pub tenant_id: TenantId,
    pub stripe_account_id: String,
}

fn time_us(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn status_text(status: SubscriptionStatus) -> String {
    status.as_str().to_owned()
}

/// Model units and plugin fees in `[from_us, to_us)` for one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromQueryResult)]
pub struct MeterTotals {
    pub calls: i64,
    pub plugin_fees: i64,
}

impl MeterTotals {
    #[must_use]
    pub fn get(&self, meter: &str) -> i64 {
        if meter == METER_CALLS {
            self.calls
        } else {
            self.plugin_fees
        }
    }
}

async fn meter_totals(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    from_us: i64,
    to_us: i64,
) -> Result<MeterTotals> {
    let totals = usage_events::Entity::find_in(tenant)
        .filter(usage_events::Column::OccurredAtUs.gte(from_us))
        .filter(usage_events::Column::OccurredAtUs.lt(to_us))
        .select_only()
        .column_as(
            Expr::cust(format!(
                "CAST(COALESCE(SUM(CASE WHEN resource_kind = '{MODEL_KIND}' THEN units ELSE 0 END), 0) AS BIGINT)"
            )),
            "calls",
        )
        .column_as(
            Expr::cust(format!(
                "CAST(COALESCE(SUM(CASE WHEN resource_kind = '{}' THEN amount_micros ELSE 0 END), 0) AS BIGINT)",
                crate::plugins::USAGE_KIND
            )),
            "plugin_fees",
        )
        .into_model::<MeterTotals>()
        .one(conn)
        .await?;
    Ok(totals.unwrap_or_default())
}

/// The deterministic identifier of a bucket's meter event.
fn push_identifier(tenant: &TenantId, meter: &str, bucket_start_us: i64) -> String {
    format!("plinth-{tenant}-{meter}-{bucket_start_us}")
}

/// Where the bucket starting at `start` ends: the next multiple of `width`, the end of the sync range,
/// or a billing-period boundary in between (a bucket never spans two invoices).
fn bucket_end(start: i64, width: i64, until: i64, boundaries: &[i64]) -> i64 {
    let grid = (start.div_euclid(width) + 1) * width;
    boundaries
        .iter()
        .copied()
        .filter(|&b| b > start)
        .fold(grid.min(until), i64::min)
}

/// Period boundaries (microseconds) around the stored period, which rolls monthly.
fn period_boundaries(first: crate::plans::Period, until_us: i64) -> Vec<i64> {
    let mut boundaries = Vec::new();
    for (start, end) in crate::plans::monthly_periods(first) {
        boundaries.push(start.timestamp_micros());
        if end.timestamp_micros() > until_us {
            boundaries.push(end.timestamp_micros());
            break;
        }
    }
    boundaries
}

impl Store {
    pub async fn billing_account(&self, tenant: &TenantId) -> Result<BillingAccount> {
        billing_account(self.db(), tenant).await
    }

    pub async fn set_stripe_customer(&self, tenant: &TenantId, customer: &str) -> Result<()> {
        subscriptions::Entity::update_many()
            .col_expr(subscriptions::Column::StripeCustomerId, Expr::value(customer))
            .filter(subscriptions::Column::TenantId.eq(tenant.as_str()))
            .exec(self.db())
            .await?;
        Ok(())
    }

    /// Marks the subscription to be canceled at the end of its current period. The stored period is
    /// rolled forward to the current one first, so "the end" is this period's.
    pub async fn cancel_at_period_end(&self, tenant: &TenantId, actor: &str) -> Result<()> {
        let txn = self.write_transaction().await?;
        let row = subscriptions::Entity::find_in(tenant)
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("subscription"))?;
        let now = Utc::now();
        let current = crate::plans::current_period(row.current_period_start, row.current_period_end, now);
        let mut model: subscriptions::ActiveModel = row.clone().into();
        crate::plans::reanchor(&txn, &row, &mut model, &row.plan_id, current).await?;
        model.cancel_at_period_end = Set(true);
        model.updated_at = Set(now);
        model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            actor,
            "subscription.cancel",
            Some(&row.plan_id),
            serde_json::json!({ "cancel_at_period_end": true, "period_end": current.1 }),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Model units the tenant has used in its current billing period.
    pub async fn units_this_period(&self, tenant: &TenantId) -> Result<i64> {
        let row = subscriptions::Entity::find_in(tenant)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("subscription"))?;
        let now = Utc::now();
        let (start, _) = crate::plans::current_period(row.current_period_start, row.current_period_end, now);
        Ok(
            meter_totals(self.db(), tenant, start.timestamp_micros(), i64::MAX)
                .await?
                .calls,
        )
    }

    /// Usage in `[from, to)` by model and by plugin (named), largest amount first.
    pub async fn statement_items(
        &self,
        tenant: &TenantId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StatementItem>> {
        #[derive(Debug, FromQueryResult)]
        struct Row {
            resource_kind: String,
            resource_id: String,
            units: i64,
            amount: i64,
        }
        let rows = usage_events::Entity::find_in(tenant)
            .filter(usage_events::Column::OccurredAtUs.gte(from.timestamp_micros()))
            .filter(usage_events::Column::OccurredAtUs.lt(to.timestamp_micros()))
            .filter(usage_events::Column::ResourceKind.is_in([MODEL_KIND, crate::plugins::USAGE_KIND]))
            .select_only()
            .column(usage_events::Column::ResourceKind)
            .column(usage_events::Column::ResourceId)
            .column_as(Expr::cust("CAST(SUM(units) AS BIGINT)"), "units")
            .column_as(Expr::cust("CAST(SUM(amount_micros) AS BIGINT)"), "amount")
            .group_by(usage_events::Column::ResourceKind)
            .group_by(usage_events::Column::ResourceId)
            .into_model::<Row>()
            .all(self.db())
            .await?;
        // Plugin usage is keyed by version: name it after its plugin, summing versions.
        let version_ids: Vec<&str> = rows
            .iter()
            .filter(|r| r.resource_kind == crate::plugins::USAGE_KIND)
            .map(|r| r.resource_id.as_str())
            .collect();
        let mut plugin_of: HashMap<String, String> = HashMap::new();
        if !version_ids.is_empty() {
            let versions = plugin_versions::Entity::find()
                .filter(plugin_versions::Column::Id.is_in(version_ids))
                .all(self.db())
                .await?;
            let plugin_ids: Vec<String> = versions.iter().map(|v| v.plugin_id.clone()).collect();
            let names: HashMap<String, String> = plugins::Entity::find()
                .filter(plugins::Column::Id.is_in(plugin_ids))
                .all(self.db())
                .await?
                .into_iter()
                .map(|p| (p.id, p.name))
                .collect();
            for version in versions {
                let name = names
                    .get(&version.plugin_id)
                    .cloned()
                    .unwrap_or(version.plugin_id);
                plugin_of.insert(version.id, name);
            }
        }
        let mut items: Vec<StatementItem> = Vec::new();
        for row in rows {
            let name = if row.resource_kind == crate::plugins::USAGE_KIND {
                plugin_of
                    .get(&row.resource_id)
                    .cloned()
                    .unwrap_or(row.resource_id)
            } else {
                row.resource_id
            };
            match items
                .iter_mut()
                .find(|i| i.kind == row.resource_kind && i.name == name)
            {
                Some(item) => {
                    item.units += row.units;
                    item.amount_micros += Micros(row.amount);
                }
                None => items.push(StatementItem {
                    kind: row.resource_kind,
                    name,
                    units: row.units,
                    amount_micros: Micros(row.amount),
                }),
            }
        }
        items.sort_by(|a, b| {
            b.amount_micros
                .cmp(&a.amount_micros)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(items)
    }

    /// Stripe invoices a tenant has received, with the period whose usage they bill (Unix µs).
    pub async fn provider_invoices(&self, tenant: &TenantId) -> Result<Vec<(i64, i64, ProviderInvoice)>> {
        let rows = invoices::Entity::find_in(tenant)
            .order_by_desc(invoices::Column::PeriodStartUs)
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.period_start_us,
                    row.period_end_us,
                    ProviderInvoice {
                        id: row.stripe_invoice_id,
                        status: row.status,
                        total_cents: row.total_cents,
                        amount_paid_cents: row.amount_paid_cents,
                        hosted_url: row.hosted_url,
                    },
                )
            })
            .collect())
    }

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

    /// Tenants whose usage goes to Stripe: those with a live Stripe subscription.
    pub async fn metered_tenants(&self) -> Result<Vec<TenantId>> {
        let rows = subscriptions::Entity::find()
            .filter(subscriptions::Column::StripeSubscriptionId.is_not_null())
            .filter(subscriptions::Column::StripeCustomerId.is_not_null())
            .filter(subscriptions::Column::MeterSyncedUntilUs.is_not_null())
            .all(self.db())
            .await?;
        rows.iter()
            .map(|r| crate::accounts::parse_id(&r.tenant_id))
            .collect()
    }

    /// Closes a tenant's usage up to `until` into buckets of `width` (split at billing-period
    /// boundaries): in one transaction, each bucket's ledger totals become meter pushes and the sync
    /// cursor moves past them. Sending happens afterwards, from the stored pushes, so a crash at any
    /// point neither loses a bucket nor produces a second, different one. Returns the buckets closed.
    pub async fn close_meter_buckets(
        &self,
        tenant: &TenantId,
        until: DateTime<Utc>,
        width: std::time::Duration,
        max_buckets: usize,
    ) -> Result<u64> {
        let width_us = i64::try_from(width.as_micros()).unwrap_or(i64::MAX).max(1);
        let until_us = until.timestamp_micros();
        let txn = self.write_transaction().await?;
        // Another replica's sync may be closing the same tenant: the row lock makes it wait, then read
        // the cursor this one moved (SQLite's write transaction already serialises them).
        let row = subscriptions::Entity::find_in(tenant)
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("subscription"))?;
        let (Some(customer), Some(_), Some(mut cursor)) = (
            row.stripe_customer_id.clone(),
            row.stripe_subscription_id.clone(),
            row.meter_synced_until_us,
        ) else {
            return Ok(0);
        };
        if cursor >= until_us {
            return Ok(0);
        }
        let boundaries = period_boundaries((row.current_period_start, row.current_period_end), until_us);
        let mut closed = 0_u64;
        let now = Utc::now();
        while cursor < until_us && closed < max_buckets as u64 {
            let end = bucket_end(cursor, width_us, until_us, &boundaries);
            let totals = meter_totals(&txn, tenant, cursor, end).await?;
            for meter in [METER_CALLS, METER_PLUGIN_FEES] {
                let value = totals.get(meter);
                if value == 0 {
                    continue;
                }
                meter_pushes::ActiveModel {
                    identifier: Set(push_identifier(tenant, meter, cursor)),
                    tenant_id: Set(tenant.to_string()),
                    stripe_customer_id: Set(customer.clone()),
                    meter: Set(meter.to_owned()),
                    bucket_start_us: Set(cursor),
                    bucket_end_us: Set(end),
                    value: Set(value),
                    created_at: Set(now),
                    sent_at: Set(None),
                }
                .insert(&txn)
                .await?;
            }
            cursor = end;
            closed += 1;
        }
        subscriptions::Entity::update_many()
            .col_expr(subscriptions::Column::MeterSyncedUntilUs, Expr::value(cursor))
            .filter(subscriptions::Column::TenantId.eq(tenant.as_str()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(closed)
    }

    /// Closed buckets Stripe has not acknowledged yet, oldest first.
    pub async fn unsent_meter_pushes(&self, limit: u64) -> Result<Vec<MeterPush>> {
        let rows = meter_pushes::Entity::find()
            .filter(meter_pushes::Column::SentAt.is_null())
            .order_by_asc(meter_pushes::Column::BucketStartUs)
            .order_by_asc(meter_pushes::Column::Identifier)
            .limit(limit)
            .all(self.db())
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(MeterPush {
                    tenant_id: crate::accounts::parse_id(&row.tenant_id)?,
                    identifier: row.identifier,
                    stripe_customer_id: row.stripe_customer_id,
                    meter: row.meter,
                    bucket_start: time_us(row.bucket_start_us),
                    value: row.value,
                })
            })
            .collect()
    }

    pub async fn mark_meter_push_sent(&self, identifier: &str) -> Result<()> {
        meter_pushes::Entity::update_many()
            .col_expr(meter_pushes::Column::SentAt, Expr::value(Utc::now()))
            .filter(meter_pushes::Column::Identifier.eq(identifier))
            .exec(self.db())
            .await?;
        Ok(())
    }

    /// For every metered tenant and meter: the ledger's total over the range the sync has covered,
    /// against what Stripe acknowledged and what is still queued.
    pub async fn reconciliation(&self) -> Result<Vec<ReconciliationRow>> {
        #[derive(Debug, FromQueryResult)]
        struct Sent {
            tenant_id: String,
            meter: String,
            sent: i64,
            pending: i64,
            first_us: i64,
        }
        let pushed = meter_pushes::Entity::find()
            .select_only()
            .column(meter_pushes::Column::TenantId)
            .column(meter_pushes::Column::Meter)
            .column_as(
                Expr::cust(
                    "CAST(COALESCE(SUM(CASE WHEN sent_at IS NOT NULL THEN value ELSE 0 END), 0) AS BIGINT)",
                ),
                "sent",
            )
            .column_as(
                Expr::cust(
                    "CAST(COALESCE(SUM(CASE WHEN sent_at IS NULL THEN value ELSE 0 END), 0) AS BIGINT)",
                ),
                "pending",
            )
            .column_as(Expr::cust("CAST(MIN(bucket_start_us) AS BIGINT)"), "first_us")
            .group_by(meter_pushes::Column::TenantId)
            .group_by(meter_pushes::Column::Meter)
            .into_model::<Sent>()
            .all(self.db())
            .await?;
        let mut rows = Vec::new();
        for tenant_pushes in pushed.chunk_by(|a, b| a.tenant_id == b.tenant_id) {
            let tenant: TenantId = crate::accounts::parse_id(&tenant_pushes[0].tenant_id)?;
            let synced_until = subscriptions::Entity::find_in(&tenant)
                .one(self.db())
                .await?
                .and_then(|row| row.meter_synced_until_us);
            let from = tenant_pushes.iter().map(|p| p.first_us).min().unwrap_or(0);
            let to = synced_until.unwrap_or(from);
            let totals = meter_totals(self.db(), &tenant, from, to).await?;
            for meter in [METER_CALLS, METER_PLUGIN_FEES] {
                let pushes = tenant_pushes.iter().find(|p| p.meter == meter);
                rows.push(ReconciliationRow {
                    tenant_id: tenant.to_string(),
                    meter: meter.to_owned(),
                    synced_until: synced_until.map(time_us),
                    ledger: totals.get(meter),
                    sent: pushes.map_or(0, |p| p.sent),
                    pending: pushes.map_or(0, |p| p.pending),
                });
            }
        }
        Ok(rows)
    }

    // ---- plugin authors ----

    /// The author's connected Stripe account and whether Stripe lets it receive payouts.
    pub async fn author_account(&self, tenant: &TenantId) -> Result<Option<(String, bool)>> {
        Ok(author_accounts::Entity::find_in(tenant)
            .one(self.db())
            .await?
            .map(|row| (row.stripe_account_id, row.payouts_enabled)))
    }

    pub async fn save_author_account(&self, tenant: &TenantId, account: &str) -> Result<()> {
        author_accounts::Entity::insert(author_accounts::ActiveModel {
            tenant_id: Set(tenant.to_string()),
            stripe_account_id: Set(account.to_owned()),
            payouts_enabled: Set(false),
            stripe_event_at: Set(0),
            updated_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::column(author_accounts::Column::TenantId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(self.db())
        .await?;
        Ok(())
    }

    /// Authors' recorded shares of plugin fees in `[from, to)`, per author.
    pub async fn earnings_by_author(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(TenantId, Micros)>> {
        #[derive(Debug, FromQueryResult)]
        struct Row {
            resource_id: String,
            share: i64,
        }
        let rows = usage_events::Entity::find()
            .filter(usage_events::Column::ResourceKind.eq(crate::plugins::USAGE_KIND))
            .filter(usage_events::Column::OccurredAtUs.gte(from.timestamp_micros()))
            .filter(usage_events::Column::OccurredAtUs.lt(to.timestamp_micros()))
            .select_only()
            .column(usage_events::Column::ResourceId)
            .column_as(Expr::cust("CAST(SUM(author_share_micros) AS BIGINT)"), "share")
            .group_by(usage_events::Column::ResourceId)
            .into_model::<Row>()
            .all(self.db())
            .await?;
        let versions: HashMap<String, String> = plugin_versions::Entity::find()
            .all(self.db())
            .await?
            .into_iter()
            .map(|v| (v.id, v.plugin_id))
            .collect();
        let authors: HashMap<String, String> = plugins::Entity::find()
            .all(self.db())
            .await?
            .into_iter()
            .map(|p| (p.id, p.author_tenant_id))
            .collect();
        let mut by_author: HashMap<String, i64> = HashMap::new();
        for row in rows {
            if let Some(author) = versions
                .get(&row.resource_id)
                .and_then(|plugin| authors.get(plugin))
            {
                *by_author.entry(author.clone()).or_default() += row.share;
            }
        }
        let mut out: Vec<(TenantId, Micros)> = by_author
            .into_iter()
            .filter(|(_, share)| *share > 0)
            .map(|(author, share)| Ok((crate::accounts::parse_id(&author)?, Micros(share))))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(out)
    }

    /// The author's payout for `period`, created on first call (`pending`), returned as stored after.
    pub async fn open_payout(
        &self,
        tenant: &TenantId,
        period: &str,
        earnings: Micros,
        currency: &str,
        account: &str,
    ) -> Result<PayoutRecord> {
        let id = format!(
            "po_{}_{}",
            tenant.as_str().trim_start_matches("ten_"),
            period.replace('-', "")
        );
        payouts::Entity::insert(payouts::ActiveModel {
            id: Set(id),
            tenant_id: Set(tenant.to_string()),
            period: Set(period.to_owned()),
            earnings_micros: Set(earnings.0),
            // Whole cents only: the sub-cent remainder stays with the platform.
            amount_cents: Set(earnings.0.div_euclid(10_000)),
            currency: Set(currency.to_owned()),
            stripe_account_id: Set(account.to_owned()),
            stripe_transfer_id: Set(None),
            status: Set("pending".to_owned()),
            created_at: Set(Utc::now()),
            paid_at: Set(None),
        })
        .on_conflict(
            OnConflict::columns([payouts::Column::TenantId, payouts::Column::Period])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(self.db())
        .await?;
        let row = payouts::Entity::find_in(tenant)
            .filter(payouts::Column::Period.eq(period))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("payout"))?;
        Ok(PayoutRecord {
            tenant_id: tenant.clone(),
            stripe_account_id: row.stripe_account_id.clone(),
            payout: to_payout(row),
        })
    }

    pub async fn complete_payout(&self, id: &str, transfer: &str) -> Result<Payout> {
        let row = payouts::Entity::find_by_id(id)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("payout"))?;
        let mut model: payouts::ActiveModel = row.into();
        model.stripe_transfer_id = Set(Some(transfer.to_owned()));
        model.status = Set("paid".to_owned());
        model.paid_at = Set(Some(Utc::now()));
        Ok(to_payout(model.update(self.db()).await?))
    }

    pub async fn payouts(&self, tenant: &TenantId) -> Result<Vec<Payout>> {
        Ok(payouts::Entity::find_in(tenant)
            .order_by_desc(payouts::Column::Period)
            .all(self.db())
            .await?
            .into_iter()
            .map(to_payout)
            .collect())
    }
}

fn to_payout(row: payouts::Model) -> Payout {
    Payout {
        id: row.id,
        period: row.period,
        earnings_micros: Micros(row.earnings_micros),
        amount_cents: row.amount_cents,
        currency: row.currency,
        status: row.status,
        stripe_transfer_id: row.stripe_transfer_id,
        created_at: row.created_at,
    }
}

async fn billing_account(conn: &impl ConnectionTrait, tenant: &TenantId) -> Result<BillingAccount> {
    let row = subscriptions::Entity::find_in(tenant)
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("subscription"))?;
    let owner = tenants::Entity::find_by_id(tenant.as_str())
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("tenant"))?;
    let now = Utc::now();
    let plan_id = if crate::plans::lapsed(&row, now) {
        FREE_PLAN
    } else {
        row.plan_id.as_str()
    };
    let (period_start, period_end) =
        crate::plans::current_period(row.current_period_start, row.current_period_end, now);
    Ok(BillingAccount {
        tenant_id: tenant.clone(),
        tenant_name: owner.name,
        plan: find_plan(conn, plan_id).await?,
        status: SubscriptionStatus::parse(&row.status).unwrap_or(SubscriptionStatus::Active),
        period_start,
        period_end,
        cancel_at_period_end: row.cancel_at_period_end,
        stripe_customer_id: row.stripe_customer_id,
        stripe_subscription_id: row.stripe_subscription_id,
        meter_synced_until_us: row.meter_synced_until_us,
    })
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
            if *deleted {
                crate::plans::reanchor(conn, &row, &mut model, FREE_PLAN, (now, month_after(now))).await?;
                model.status = Set(status_text(SubscriptionStatus::Active));
                model.status_event_at = Set(Some(event.created));
                model.stripe_subscription_id = Set(None);
                model.cancel_at_period_end = Set(false);
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
                    model.status = Set(status_text(*status));
                    model.status_event_at = Set(Some(event.created));
                }
                model.cancel_at_period_end = Set(*cancel_at_period_end);
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
            if existing
                .as_ref()
                .is_none_or(|e| event.created >= e.stripe_event_at)
            {
                let model = invoices::ActiveModel {
                    stripe_invoice_id: Set(invoice.id.clone()),
                    tenant_id: Set(tenant.to_string()),
                    period_start_us: Set(period_start.timestamp_micros()),
                    period_end_us: Set(period_end.timestamp_micros()),
                    status: Set(invoice.status.clone()),
                    currency: Set(currency.clone()),
                    total_cents: Set(invoice.total_cents),
                    amount_paid_cents: Set(invoice.amount_paid_cents),
                    hosted_url: Set(invoice.hosted_url.clone()),
                    stripe_event_at: Set(event.created),
                    updated_at: Set(now),
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
            let mut model: subscriptions::ActiveModel = row.into();
            model.status = Set(status_text(status));
            model.status_event_at = Set(Some(event.created));
            model.updated_at = Set(now);
            model.update(conn).await?;
            Ok(Some(tenant))
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

    #[test]
    fn buckets_follow_the_grid_and_stop_at_boundaries() {
        let hour = 3_600_000_000;
        // On the grid.
        assert_eq!(bucket_end(0, hour, 10 * hour, &[]), hour);
        // From mid-hour to the next full hour.
        assert_eq!(bucket_end(hour / 2, hour, 10 * hour, &[]), hour);
        // Never past the sync range.
        assert_eq!(bucket_end(0, hour, hour / 4, &[]), hour / 4);
        // A period boundary inside the hour splits it.
        assert_eq!(bucket_end(0, hour, 10 * hour, &[hour / 3]), hour / 3);
        assert_eq!(bucket_end(hour / 3, hour, 10 * hour, &[hour / 3]), hour);
    }

    #[test]
    fn period_boundaries_roll_monthly_past_the_range() {
        let start = "2026-01-15T10:30:00Z".parse::<DateTime<Utc>>().unwrap();
        let end = "2026-02-15T10:30:00Z".parse::<DateTime<Utc>>().unwrap();
        let until = "2026-03-20T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let b = period_boundaries((start, end), until.timestamp_micros());
        assert_eq!(b.first(), Some(&start.timestamp_micros()));
        assert!(
            b.contains(
                &"2026-03-15T10:30:00Z"
                    .parse::<DateTime<Utc>>()
                    .unwrap()
                    .timestamp_micros()
            )
        );
        assert!(b.last().copied().unwrap() > until.timestamp_micros());
    }
}
