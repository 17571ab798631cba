//! Plugin authors' connected accounts, what they earned and what of it was collected, and payouts.
//!
//! Each plugin call records the author's share on its ledger event. A share becomes *payable* only
//! when the invoice that charged the call is paid (see [`super::statements`]); a refund makes it
//! unpayable again. An author's balance is everything collected minus everything paid out, so a
//! refund of revenue already paid out is withheld from the next payouts, and a sub-cent rest carries
//! over instead of being lost.
//!
//! A payout is a state machine: `pending` (recorded, with its amount fixed) -> `transferring` (an
//! attempt may have reached Stripe) -> `paid`, or `failed` when Stripe refused it (nothing moved; the
//! next run retries). A `transferring` payout is looked up on Stripe before any new attempt, so no
//! rerun, at any age and on any replica, pays twice.

use chrono::{DateTime, Utc};
use plinth_core::Micros;
use plinth_core::billing::{Payout, PayoutStatus};
use plinth_core::id::TenantId;
use plinth_core::plugins::{Earnings, EarningsRow};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::statements::collected_in;
use crate::audit::Who;
use crate::entity::{TenantScoped, author_accounts, payouts, plugin_versions, plugins, usage_events};
use crate::plugins::USAGE_KIND;
use crate::{Result, Store, StoreError};

/// A payout with what settling it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutClaim {
    pub payout: Payout,
    pub tenant_id: TenantId,
    pub stripe_account_id: String,
    /// Transfer attempts made so far, this one included once claimed by [`Store::begin_transfer`].
    pub attempts: i32,
    /// How many times the payout was armed (1, plus one per retry after a failure).
    pub generation: i32,
}

impl PayoutClaim {
    /// The Stripe Idempotency-Key of the current attempt: shared by every attempt of a generation, so
    /// two attempts racing (a rerun on a replica whose clock runs ahead) are one transfer at Stripe.
    #[must_use]
    pub fn attempt_key(&self) -> String {
        format!("{}-{}", self.payout.id, self.generation)
    }
}

/// An author's money in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorBalance {
    pub currency: String,
    /// Shares whose invoices were paid, all time (up to the cut-off asked for).
    pub collected: Micros,
    /// Payouts made or under way.
    pub paid_out: Micros,
}

impl AuthorBalance {
    /// What may still be paid out (negative after a refund of revenue already paid out).
    #[must_use]
    pub fn available(&self) -> Micros {
        self.collected.checked_sub(self.paid_out).unwrap_or(Micros::ZERO)
    }
}

fn overflow() -> StoreError {
    StoreError::Internal("an earnings total overflows".into())
}

fn to_payout(row: payouts::Model) -> Payout {
    Payout {
        status: PayoutStatus::parse(&row.status).unwrap_or(PayoutStatus::Pending),
        id: row.id,
        period: row.period,
        earnings_micros: Micros(row.earnings_micros),
        amount_cents: row.amount_cents,
        currency: row.currency,
        stripe_transfer_id: row.stripe_transfer_id,
        failure: row.failure,
        created_at: row.created_at,
    }
}

fn to_claim(row: payouts::Model) -> Result<PayoutClaim> {
    Ok(PayoutClaim {
        tenant_id: crate::accounts::parse_id(&row.tenant_id)?,
        stripe_account_id: row.stripe_account_id.clone(),
        attempts: row.attempts,
        generation: row.generation,
        payout: to_payout(row),
    })
}

#[derive(Debug, Default, FromQueryResult)]
struct Sums {
    calls: i64,
    gross: i64,
    share: i64,
}

/// Calls, amounts and author shares of plugin events on `versions`, filtered further by `condition`.
async fn plugin_sums(
    conn: &impl ConnectionTrait,
    versions: &[String],
    condition: sea_orm::Condition,
) -> Result<Sums> {
    if versions.is_empty() {
        return Ok(Sums::default());
    }
    Ok(usage_events::Entity::find()
        .filter(usage_events::Column::ResourceKind.eq(USAGE_KIND))
        .filter(usage_events::Column::ResourceId.is_in(versions.iter().map(String::as_str)))
        .filter(condition)
        .select_only()
        .column_as(Expr::cust("COUNT(*)"), "calls")
        .column_as(
            Expr::cust("CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT)"),
            "gross",
        )
        .column_as(
            Expr::cust("CAST(COALESCE(SUM(author_share_micros), 0) AS BIGINT)"),
            "share",
        )
        .into_model::<Sums>()
        .one(conn)
        .await?
        .unwrap_or_default())
}

/// The ids of every version of `plugin_ids`.
async fn versions_of(conn: &impl ConnectionTrait, plugin_ids: Vec<String>) -> Result<Vec<String>> {
    Ok(plugin_versions::Entity::find()
        .filter(plugin_versions::Column::PluginId.is_in(plugin_ids))
        .all(conn)
        .await?
        .into_iter()
        .map(|v| v.id)
        .collect())
}

/// What payouts of `author` in `currency` have paid or are paying (failed ones moved nothing).
async fn paid_out(conn: &impl ConnectionTrait, author: &TenantId, currency: &str) -> Result<Micros> {
    #[derive(Debug, FromQueryResult)]
    struct Row {
        total: i64,
    }
    let row = payouts::Entity::find_in(author)
        .filter(payouts::Column::Currency.eq(currency))
        .filter(payouts::Column::Status.ne(PayoutStatus::Failed.as_str()))
        .select_only()
        .column_as(
            Expr::cust("CAST(COALESCE(SUM(earnings_micros), 0) AS BIGINT)"),
            "total",
        )
        .into_model::<Row>()
        .one(conn)
        .await?;
    Ok(Micros(row.map_or(0, |r| r.total)))
}

impl Store {
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

    /// Tenants that author at least one plugin.
    pub async fn plugin_authors(&self) -> Result<Vec<TenantId>> {
        let mut authors: Vec<String> = plugins::Entity::find()
            .all(self.db())
            .await?
            .into_iter()
            .map(|p| p.author_tenant_id)
            .collect();
        authors.sort();
        authors.dedup();
        authors.iter().map(|a| crate::accounts::parse_id(a)).collect()
    }

    async fn authored_versions(&self, conn: &impl ConnectionTrait, author: &TenantId) -> Result<Vec<String>> {
        let plugin_ids = plugins::Entity::find()
            .filter(plugins::Column::AuthorTenantId.eq(author.as_str()))
            .all(conn)
            .await?
            .into_iter()
            .map(|p| p.id)
            .collect();
        versions_of(conn, plugin_ids).await
    }

    /// The author's balance in each currency revenue was collected in, counting calls before `until`
    /// whose invoices were paid by `paid_by` (payouts wait a hold after payment, for chargebacks).
    pub async fn author_balances(
        &self,
        author: &TenantId,
        until: DateTime<Utc>,
        paid_by: DateTime<Utc>,
    ) -> Result<Vec<AuthorBalance>> {
        // An author's revenue is the calls other tenants made to its plugins.
        crate::row_security::across_tenants(self.balances_in(self.db(), author, until, paid_by)).await
    }

    /// Reads through `conn`, whose row-security setting is the one it was checked out with (a
    /// transaction keeps it): pass one begun where every tenant is visible, as the payout run's is.
    async fn balances_in(
        &self,
        conn: &impl ConnectionTrait,
        author: &TenantId,
        until: DateTime<Utc>,
        paid_by: DateTime<Utc>,
    ) -> Result<Vec<AuthorBalance>> {
        let versions = self.authored_versions(conn, author).await?;
        // Every currency revenue was collected in, and every one the author was paid in (a refund may
        // have taken all that was collected in it).
        let mut currencies = self.collected_currencies().await?;
        currencies.extend(
            payouts::Entity::find_in(author)
                .all(conn)
                .await?
                .into_iter()
                .map(|p| p.currency),
        );
        currencies.sort();
        currencies.dedup();
        let mut balances = Vec::new();
        for currency in currencies {
            let collected = plugin_sums(
                conn,
                &versions,
                sea_orm::Condition::all()
                    .add(usage_events::Column::OccurredAtUs.lt(until.timestamp_micros()))
                    .add(collected_in(&currency, paid_by.timestamp_micros())),
            )
            .await?;
            balances.push(AuthorBalance {
                paid_out: paid_out(conn, author, &currency).await?,
                currency,
                collected: Micros(collected.share),
            });
        }
        Ok(balances)
    }

    /// What the author's plugins earned in `[from, to)` widened to whole UTC days: the shares the
    /// ledger recorded per call, and how much of them tenants have paid for; with the author's
    /// balance, all time.
    ///
    /// Whole days because the calls counted are other tenants': in a window of the author's choosing
    /// (a minute, a second) the counts would tell it when a particular tenant called.
    pub async fn author_earnings(
        &self,
        author: &TenantId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        share_bps: u32,
    ) -> Result<Earnings> {
        let (from, to) = (start_of_day(from)?, end_of_day(to)?);
        // An author's earnings are the calls other tenants made to its plugins.
        crate::row_security::across_tenants(self.earnings_of(author, from, to, share_bps)).await
    }

    async fn earnings_of(
        &self,
        author: &TenantId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        share_bps: u32,
    ) -> Result<Earnings> {
        let authored = plugins::Entity::find()
            .filter(plugins::Column::AuthorTenantId.eq(author.as_str()))
            .order_by_asc(plugins::Column::Name)
            .all(self.db())
            .await?;
        let currencies = self.collected_currencies().await?;
        let in_range = || {
            sea_orm::Condition::all()
                .add(usage_events::Column::OccurredAtUs.gte(from.timestamp_micros()))
                .add(usage_events::Column::OccurredAtUs.lt(to.timestamp_micros()))
        };
        let mut rows = Vec::new();
        for plugin in authored {
            let versions = versions_of(self.db(), vec![plugin.id.clone()]).await?;
            let sums = plugin_sums(self.db(), &versions, in_range()).await?;
            let mut payable = Micros::ZERO;
            for currency in &currencies {
                let collected = plugin_sums(
                    self.db(),
                    &versions,
                    in_range().add(collected_in(currency, i64::MAX)),
                )
                .await?;
                payable = payable
                    .checked_add(Micros(collected.share))
                    .ok_or_else(overflow)?;
            }
            let earnings = Micros(sums.share);
            rows.push(EarningsRow {
                plugin: plugin.name,
                calls: sums.calls,
                gross: Micros(sums.gross),
                earnings,
                payable,
                pending: earnings.checked_sub(payable).ok_or_else(overflow)?,
            });
        }
        let total = Micros::checked_sum(rows.iter().map(|r| r.earnings)).ok_or_else(overflow)?;
        let payable = Micros::checked_sum(rows.iter().map(|r| r.payable)).ok_or_else(overflow)?;
        let now = Utc::now();
        let balances = self.author_balances(author, now, now).await?;
        Ok(Earnings {
            from,
            to,
            share_bps,
            rows,
            total,
            payable,
            pending: total.checked_sub(payable).ok_or_else(overflow)?,
            balance: Micros::checked_sum(balances.iter().map(AuthorBalance::available))
                .ok_or_else(overflow)?,
            paid_out: Micros::checked_sum(balances.iter().map(|b| b.paid_out)).ok_or_else(overflow)?,
        })
    }

    /// The author's payout of the run for `period` in `currency`: the one recorded before (a `failed`
    /// one re-armed with the balance as it is now), or a new `pending` one for the whole cents of the
    /// balance from calls before `until` whose invoices were paid by `paid_by`. `None` when there is
    /// nothing to pay. Balances are read and payouts recorded under a lock on the author's account, so
    /// concurrent runs (for any periods, on any replicas) never pay the same earnings twice.
    pub async fn open_payout(
        &self,
        author: &TenantId,
        who: &Who,
        period: &str,
        currency: &str,
        until: DateTime<Utc>,
        paid_by: DateTime<Utc>,
    ) -> Result<Option<PayoutClaim>> {
        let txn = self.write_transaction().await?;
        let account = author_accounts::Entity::find_in(author)
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("connected account"))?;
        let existing = payouts::Entity::find_in(author)
            .filter(payouts::Column::Period.eq(period))
            .filter(payouts::Column::Currency.eq(currency))
            .one(&txn)
            .await?;
        if let Some(row) = &existing
            && row.status != PayoutStatus::Failed.as_str()
        {
            return Ok(Some(to_claim(row.clone())?));
        }
        // A failed payout moved nothing and counts for nothing: the balance is what it re-arms with.
        let available = self
            .balances_in(&txn, author, until, paid_by)
            .await?
            .into_iter()
            .find(|b| b.currency == currency)
            .map_or(Micros::ZERO, |b| b.available());
        let cents = available.whole_cents();
        if cents < 1 {
            return match existing {
                Some(row) => Ok(Some(to_claim(row)?)),
                None => Ok(None),
            };
        }
        let amount = Micros(cents.saturating_mul(10_000));
        let now = Utc::now();
        let row = match existing {
            Some(row) => {
                let row_generation = row.generation;
                let mut model: payouts::ActiveModel = row.into();
                model.earnings_micros = Set(amount.0);
                model.amount_cents = Set(cents);
                model.stripe_account_id = Set(account.stripe_account_id.clone());
                model.status = Set(PayoutStatus::Pending.as_str().to_owned());
                model.failure = Set(None);
                model.generation = Set(row_generation + 1);
                model.update(&txn).await?
            }
            None => {
                payouts::ActiveModel {
                    id: Set(format!(
                        "po_{}_{}_{currency}",
                        author.as_str().trim_start_matches("ten_"),
                        period.replace('-', "")
                    )),
                    tenant_id: Set(author.to_string()),
                    period: Set(period.to_owned()),
                    earnings_micros: Set(amount.0),
                    amount_cents: Set(cents),
                    currency: Set(currency.to_owned()),
                    stripe_account_id: Set(account.stripe_account_id.clone()),
                    stripe_transfer_id: Set(None),
                    status: Set(PayoutStatus::Pending.as_str().to_owned()),
                    created_at: Set(now),
                    paid_at: Set(None),
                    attempts: Set(0),
                    last_attempt_at_us: Set(None),
                    failure: Set(None),
                    generation: Set(1),
                }
                .insert(&txn)
                .await?
            }
        };
        crate::audit::record_operator_act(
            &txn,
            author,
            who,
            "payout.open",
            Some(&row.id),
            serde_json::json!({ "period": period, "amount_cents": cents, "currency": currency }),
        )
        .await?;
        txn.commit().await?;
        Ok(Some(to_claim(row)?))
    }

    /// Claims a payout for a transfer attempt: a `pending` one, or a `transferring` one whose last
    /// attempt began before `stale_before_us` (its request has surely ended). `None` when the payout is
    /// settled or another run holds it.
    pub async fn begin_transfer(
        &self,
        id: &str,
        now_us: i64,
        stale_before_us: i64,
    ) -> Result<Option<PayoutClaim>> {
        let claimable = sea_orm::Condition::any()
            .add(payouts::Column::Status.eq(PayoutStatus::Pending.as_str()))
            .add(
                sea_orm::Condition::all()
                    .add(payouts::Column::Status.eq(PayoutStatus::Transferring.as_str()))
                    .add(payouts::Column::LastAttemptAtUs.lt(stale_before_us)),
            );
        let claimed = payouts::Entity::update_many()
            .col_expr(
                payouts::Column::Status,
                Expr::value(PayoutStatus::Transferring.as_str()),
            )
            .col_expr(
                payouts::Column::Attempts,
                Expr::col(payouts::Column::Attempts).add(1),
            )
            .col_expr(payouts::Column::LastAttemptAtUs, Expr::value(now_us))
            .filter(payouts::Column::Id.eq(id))
            .filter(claimable)
            .exec(self.db())
            .await?;
        if claimed.rows_affected != 1 {
            return Ok(None);
        }
        let row = payouts::Entity::find_by_id(id)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("payout"))?;
        Ok(Some(to_claim(row)?))
    }

    /// Settles a claimed payout: paid by `transfer`, or refused by Stripe with `failure`. Only while
    /// the payout is still this claim's (transferring, same generation): a late answer to an old
    /// attempt changes nothing, and the payout is returned as it stands.
    pub async fn finish_payout(
        &self,
        claim: &PayoutClaim,
        who: &Who,
        outcome: Result<&str, &str>,
    ) -> Result<Payout> {
        let txn = self.write_transaction().await?;
        let row = payouts::Entity::find_by_id(claim.payout.id.as_str())
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("payout"))?;
        if row.status != PayoutStatus::Transferring.as_str() || row.generation != claim.generation {
            return Ok(to_payout(row));
        }
        let mut model: payouts::ActiveModel = row.into();
        let action = match outcome {
            Ok(transfer) => {
                model.status = Set(PayoutStatus::Paid.as_str().to_owned());
                model.stripe_transfer_id = Set(Some(transfer.to_owned()));
                model.paid_at = Set(Some(Utc::now()));
                model.failure = Set(None);
                "payout.paid"
            }
            Err(failure) => {
                model.status = Set(PayoutStatus::Failed.as_str().to_owned());
                model.failure = Set(Some(failure.chars().take(500).collect()));
                "payout.failed"
            }
        };
        let row = model.update(&txn).await?;
        crate::audit::record_operator_act(
            &txn,
            &claim.tenant_id,
            who,
            action,
            Some(&row.id),
            serde_json::json!({ "amount_cents": row.amount_cents, "currency": row.currency,
                "transfer": row.stripe_transfer_id, "failure": row.failure, "attempt": row.attempts }),
        )
        .await?;
        txn.commit().await?;
        Ok(to_payout(row))
    }

    /// One payout as stored.
    pub async fn payout(&self, id: &str) -> Result<Payout> {
        payouts::Entity::find_by_id(id)
            .one(self.db())
            .await?
            .map(to_payout)
            .ok_or(StoreError::NotFound("payout"))
    }

    /// The author's payouts, newest run first.
    pub async fn payouts(&self, tenant: &TenantId) -> Result<Vec<Payout>> {
        Ok(payouts::Entity::find_in(tenant)
            .order_by_desc(payouts::Column::Period)
            .order_by_asc(payouts::Column::Currency)
            .all(self.db())
            .await?
            .into_iter()
            .map(to_payout)
            .collect())
    }
}

const DAY_US: i64 = 86_400_000_000;

/// The start of `at`'s UTC day.
fn start_of_day(at: DateTime<Utc>) -> Result<DateTime<Utc>> {
    let day = at.timestamp_micros().div_euclid(DAY_US) * DAY_US;
    DateTime::from_timestamp_micros(day).ok_or_else(|| StoreError::invalid("the period is out of range"))
}

/// The end of `at`'s UTC day (the next midnight), or `at` itself at midnight.
fn end_of_day(at: DateTime<Utc>) -> Result<DateTime<Utc>> {
    let start = start_of_day(at)?;
    if start == at {
        return Ok(at);
    }
    start
        .checked_add_signed(chrono::Duration::days(1))
        .ok_or_else(|| StoreError::invalid("the period is out of range"))
}
