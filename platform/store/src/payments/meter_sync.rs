//! Usage closed into meter buckets for Stripe: per tenant and bucket, the ledger's totals become meter
//! events with deterministic identifiers, stored before they are sent, so a crash at any point neither
//! loses a bucket nor sends a second, different one; and the reconciliation of what was sent against
//! the ledger.

use chrono::{DateTime, Utc};
use plinth_core::billing::ReconciliationRow;
use plinth_core::id::TenantId;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::{METERS, meter_totals, time_us};
use crate::entity::{TenantScoped, meter_pushes, subscriptions};
use crate::{Result, Store, StoreError};

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
            for meter in METERS {
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
                    sent_at_us: Set(None),
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

    /// Records that Stripe acknowledged a bucket's meter event (once: a later acknowledgement of the
    /// same identifier keeps the first time, which is when the usage reached Stripe). Stamped on the
    /// database's clock, as usage is: a replica whose own clock lags would date the acknowledgement
    /// before an invoice that Stripe finalized without it, and the fees it never charged would count
    /// as collected (and be paid out).
    pub async fn mark_meter_push_sent(&self, identifier: &str) -> Result<()> {
        let now_us = self.database_now_us().await?;
        meter_pushes::Entity::update_many()
            .col_expr(meter_pushes::Column::SentAt, Expr::value(time_us(now_us)))
            .col_expr(meter_pushes::Column::SentAtUs, Expr::value(now_us))
            .filter(meter_pushes::Column::SentAt.is_null())
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
            for meter in METERS {
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
