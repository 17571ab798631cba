//! Payment state, one module per job: Stripe's webhook events applied once and in order
//! ([`webhooks`]), usage closed into meter buckets for Stripe ([`meter_sync`]), statements and the
//! invoices that collect them ([`statements`]), and plugin authors' connected accounts, collected
//! earnings and payouts ([`payouts`]).
//!
//! Stripe talks to these modules only through plain values ([`ProviderEvent`], [`MeterPush`]): parsing
//! Stripe's JSON and calling its API live in `plinth-billing`.

mod meter_sync;
mod payouts;
mod statements;
mod webhooks;

use chrono::{DateTime, TimeZone, Utc};
use plinth_core::api::{Plan, SubscriptionStatus};
use plinth_core::id::TenantId;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QuerySelect,
    Set,
};

pub use self::meter_sync::MeterPush;
pub use self::payouts::{AuthorBalance, PayoutClaim};
pub use self::webhooks::{ProviderChange, ProviderEvent};
use crate::audit::Who;
use crate::entity::{TenantScoped, subscriptions, tenants, usage_events};
use crate::plans::{FREE_PLAN, find_plan};
use crate::{Result, Store, StoreError};

/// The meter for model units at the plan's per-call price (included calls come off in Stripe's tiers).
pub const METER_CALLS: &str = "calls";
/// The meter for plugin fees, in micro-units of the currency.
pub const METER_PLUGIN_FEES: &str = "plugin_fees";
/// The meter for training, in micro-units of the currency.
pub const METER_TRAINING: &str = "training";
/// Every meter usage is pushed to.
pub const METERS: [&str; 3] = [METER_CALLS, METER_PLUGIN_FEES, METER_TRAINING];
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
    /// The Stripe subscription carries the training price (training on its meter is invoiced).
    pub training_item: bool,
}

fn time_us(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Model units and plugin fees in `[from_us, to_us)` for one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromQueryResult)]
pub struct MeterTotals {
    pub calls: i64,
    pub plugin_fees: i64,
    pub training: i64,
}

impl MeterTotals {
    #[must_use]
    pub fn get(&self, meter: &str) -> i64 {
        match meter {
            METER_CALLS => self.calls,
            METER_TRAINING => self.training,
            _ => self.plugin_fees,
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
        .column_as(
            Expr::cust(format!(
                "CAST(COALESCE(SUM(CASE WHEN resource_kind = '{}' THEN amount_micros ELSE 0 END), 0) AS BIGINT)",
                crate::training::USAGE_KIND
            )),
            "training",
        )
        .into_model::<MeterTotals>()
        .one(conn)
        .await?;
    Ok(totals.unwrap_or_default())
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
    pub async fn cancel_at_period_end(&self, tenant: &TenantId, who: &Who) -> Result<()> {
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
            who,
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
        training_item: row.training_item,
    })
}
