//! The usage ledger: one durable event per billable call, exactly once.
//!
//! Handlers call [`Meter::record`] and answer the client only after it returns, so no call is served
//! unbilled. A handler may record while its work runs (hiding the durable commit behind it) and
//! withdraw the event with [`Store::withdraw_usage_event`] if the work then fails. Each event carries an idempotency key, unique per tenant: a retried call (same
//! `Idempotency-Key`) finds the first event and is not billed again, even when both attempts race.
//!
//! Writes use group commit: one writer task drains every event queued while earlier writes were in
//! flight and stores them with a single multi-row `INSERT … ON CONFLICT DO NOTHING`, so the database sees
//! one transaction per batch rather than one per call. On Postgres a few batch commits may overlap, so
//! the commit round trip does not leave the next batch waiting.
//!
//! Events are stamped on the database's clock, as the writer reads it (its own clock, corrected when a
//! reading every few seconds finds it off by more than a second): the usage sync closes meter buckets
//! on that clock too, so a replica whose clock lags cannot stamp events into a bucket already sent to
//! Stripe (billed to nobody, yet counted as collected).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use plinth_core::Micros;
use plinth_core::api::{UsageGrouping, UsageReport, UsageRow};
use plinth_core::id::{EventId, KeyId, TenantId};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, FromQueryResult, QueryFilter, QuerySelect, Set, TryInsertResult,
};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::entity::{TenantScoped, usage_events};
use crate::{Result, Store, StoreError};

/// One billable call, as a handler describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub tenant_id: TenantId,
    pub api_key_id: Option<KeyId>,
    /// What was used: `model`, `plugin`, `echo`…
    pub resource_kind: String,
    /// Which one: a model name, a plugin id…
    pub resource_id: String,
    /// Billed units, e.g. items in a batch.
    pub units: i64,
    pub unit_price: Micros,
    /// The part of the amount owed to a plugin's author (zero for platform resources), fixed now so a
    /// later change of the share applies to later calls only.
    pub author_share: Micros,
    /// Unique per tenant; a second record with the same key is a replay, not a new charge.
    pub idempotency_key: String,
    pub request_id: String,
}

/// The outcome of recording: the event that bills this call, and whether it already existed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub event_id: EventId,
    pub replayed: bool,
}

/// Tuning for the ledger writer.
#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    /// Most events in one INSERT (12 parameters each: well inside SQLite's and Postgres's limits).
    pub max_batch: usize,
    /// Events waiting for the writer before callers wait to enqueue (back-pressure).
    pub queue_capacity: usize,
    /// Batches whose commit may overlap. `None` picks per backend: 1 for SQLite (one writer at a
    /// time anyway), 4 for Postgres (so a commit's round trip does not stall the next batch).
    pub in_flight: Option<usize>,
    /// This replica's own clock, which the database's clock corrects (a setting so that a test can
    /// play a replica whose clock is wrong).
    pub local_clock: fn() -> DateTime<Utc>,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            max_batch: 1_000,
            queue_capacity: 65_536,
            in_flight: None,
            local_clock: Utc::now,
        }
    }
}

struct Pending {
    record: UsageRecord,
    /// Stamped by the writer, on the database's clock, as the batch goes to the database.
    occurred_at_us: i64,
    reply: oneshot::Sender<Result<Recorded>>,
}

/// How often the writer measures its clock against the database's.
const CLOCK_CHECK: Duration = Duration::from_secs(5);
/// How old the last measurement may be before events are refused rather than stamped on a clock
/// nobody checked.
const CLOCK_TRUSTED_FOR: Duration = Duration::from_secs(60);

/// How far this replica's clock may be from the database's and still be used as it is: far less than
/// the usage sync's settle time (minutes), far more than a reading's uncertainty on a busy machine.
const CLOCK_TOLERANCE_US: i64 = 1_000_000;

/// The offset to apply for a reading: the database said `database` between `before` and `after` on
/// this replica's clock, so the true offset lies within half the round trip of the midpoint's. Zero
/// when that range allows a clock within [`CLOCK_TOLERANCE_US`]: the replica's own clock is used as
/// it is, without a reading's noise (a query that waited for a connection reads late by up to its
/// whole wait, and a call stamped even milliseconds ahead is missing from a report made at once).
fn clock_correction(before: i64, database: i64, after: i64) -> i64 {
    let measured = database - before.midpoint(after);
    let uncertainty = (after - before).abs() / 2;
    if measured.abs() <= CLOCK_TOLERANCE_US + uncertainty {
        0
    } else {
        measured
    }
}

/// The database's clock as the writer reads it: `local`, corrected when it is off by more than
/// [`CLOCK_TOLERANCE_US`].
struct DatabaseClock {
    local: fn() -> DateTime<Utc>,
    offset_us: i64,
    /// When the offset was last measured.
    measured: Option<Instant>,
}

impl DatabaseClock {
    /// Now on the database's clock, measuring the offset again when it is older than [`CLOCK_CHECK`].
    /// A failed measurement keeps the last offset and is tried again on the next batch, for up to
    /// [`CLOCK_TRUSTED_FOR`]; with no offset that recent (none yet, say) the batch is refused.
    async fn now_us(&mut self, store: &Store) -> Result<i64> {
        self.now_us_reading(|| store.database_now_us()).await
    }

    /// [`Self::now_us`], reading the database's clock with `read`.
    async fn now_us_reading<F: Future<Output = Result<i64>>>(
        &mut self,
        read: impl FnOnce() -> F,
    ) -> Result<i64> {
        if self.measured.is_none_or(|at| at.elapsed() >= CLOCK_CHECK) {
            let before = (self.local)().timestamp_micros();
            match read().await {
                Ok(database) => {
                    let after = (self.local)().timestamp_micros();
                    self.offset_us = clock_correction(before, database, after);
                    self.measured = Some(Instant::now());
                    metrics::gauge!("plinth_ledger_clock_offset_seconds").set(self.offset_us as f64 / 1e6);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the database's clock; usage keeps the last offset");
                }
            }
        }
        match self.measured {
            Some(at) if at.elapsed() < CLOCK_TRUSTED_FOR => {
                Ok((self.local)().timestamp_micros() + self.offset_us)
            }
            _ => Err(StoreError::Unavailable(
                "the database's clock cannot be read: usage is not recorded".into(),
            )),
        }
    }
}

/// The handle handlers record usage through; cheap to clone.
#[derive(Debug, Clone)]
pub struct Meter {
    queue: mpsc::Sender<Pending>,
    /// Where events are withdrawn (see [`Meter::metered`]).
    store: Store,
    /// Units of capped plans' calls admitted and not yet in the ledger (see `Meter::within_cap`).
    pub(crate) reserved: Arc<std::sync::Mutex<crate::metering::Reserved>>,
}

/// The most units one event may carry: far beyond any real call (a 16 MiB request holds fewer items),
/// and small enough that sums over a period cannot overflow.
pub const MAX_UNITS: i64 = 1_000_000_000;

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The ledger key of a call made without an `Idempotency-Key`: unique, minted here. Ledger keys never
/// come from a client: a keyed request is `req:<id>` (see [`crate::idempotency::Claim::ledger_key`]),
/// so neither a client's header nor its `X-Request-Id` can make two calls share one charge.
#[must_use]
pub fn automatic_key() -> String {
    format!("auto:{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

/// The ledger key of the `sequence`-th model call a plugin makes while serving the attempt `parent`
/// (a server-minted key, so this is bounded and in a namespace no client writes).
#[must_use]
pub fn derived_key(parent: &str, sequence: u32) -> String {
    format!("{parent}:model:{sequence}")
}

fn validate(record: &UsageRecord) -> Result<()> {
    let field_ok = |s: &str| !s.is_empty() && s.len() <= 200;
    if !field_ok(&record.resource_kind) || !field_ok(&record.resource_id) {
        return Err(StoreError::invalid(
            "usage: resource kind and id must be 1-200 bytes",
        ));
    }
    if record.idempotency_key.is_empty() || record.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(StoreError::invalid(format!(
            "Idempotency-Key: must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"
        )));
    }
    if record.units < 0 || record.unit_price.0 < 0 || record.author_share.0 < 0 {
        return Err(StoreError::invalid("usage: units and prices cannot be negative"));
    }
    if record.units > MAX_UNITS {
        return Err(StoreError::invalid(format!(
            "usage: at most {MAX_UNITS} units in one call"
        )));
    }
    Ok(())
}

impl Meter {
    /// Starts the writer task. It runs until every `Meter` clone is dropped, then drains and stops.
    #[must_use]
    pub fn start(store: Store, settings: LedgerSettings) -> (Self, JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(settings.queue_capacity.max(1));
        let in_flight = settings.in_flight.unwrap_or(match store.backend() {
            sea_orm::DbBackend::Sqlite => 1,
            _ => 4,
        });
        let clock = DatabaseClock {
            local: settings.local_clock,
            offset_us: 0,
            measured: None,
        };
        let writer = tokio::spawn(write_loop(
            store.clone(),
            receiver,
            settings.max_batch.max(1),
            in_flight,
            clock,
        ));
        (
            Self {
                queue,
                store,
                reserved: Arc::default(),
            },
            writer,
        )
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Records one billable call and returns once it is durable (or was already recorded).
    pub async fn record(&self, record: UsageRecord) -> Result<Recorded> {
        validate(&record)?;
        record
            .unit_price
            .checked_mul(record.units)
            .ok_or_else(|| StoreError::invalid("usage: amount overflows"))?;
        let (reply, response) = oneshot::channel();
        let pending = Pending {
            record,
            occurred_at_us: 0,
            reply,
        };
        self.queue
            .send(pending)
            .await
            .map_err(|_| StoreError::Unavailable("the usage ledger is shutting down".into()))?;
        response
            .await
            .map_err(|_| StoreError::Unavailable("the usage ledger writer stopped".into()))?
    }
}

/// Gathers batches and writes them, with up to `in_flight` commits overlapping: while one batch waits
/// for its commit, the next gathers every event that arrived meanwhile. On Postgres this keeps batches
/// large under load (and the database merges concurrent WAL flushes); SQLite has one writer anyway.
async fn write_loop(
    store: Store,
    mut receiver: mpsc::Receiver<Pending>,
    max_batch: usize,
    in_flight: usize,
    mut clock: DatabaseClock,
) {
    let permits = Arc::new(Semaphore::new(in_flight.max(1)));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max_batch);
        if receiver.recv_many(&mut batch, max_batch).await == 0 {
            break;
        }
        let now = match clock.now_us(&store).await {
            Ok(now) => now,
            Err(err) => {
                tracing::error!(error = %err, events = batch.len(), "usage events refused");
                for pending in batch {
                    let _ = pending.reply.send(Err(StoreError::Unavailable(
                        "the usage ledger could not be written".into(),
                    )));
                }
                continue;
            }
        };
        for pending in &mut batch {
            pending.occurred_at_us = now;
        }
        let store = store.clone();
        tokio::spawn(async move {
            commit_batch(&store, batch).await;
            drop(permit);
        });
    }
    // Every sender is gone: wait for the batches still being written.
    let _ = permits
        .acquire_many(u32::try_from(in_flight.max(1)).unwrap_or(1))
        .await;
}

async fn commit_batch(store: &Store, batch: Vec<Pending>) {
    let started = Instant::now();
    let size = batch.len();
    let outcome = write_batch(store, &batch).await;
    metrics::histogram!("plinth_ledger_batch_size").record(size as f64);
    metrics::histogram!("plinth_ledger_write_duration_seconds").record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(results) => {
            let replays = results.iter().filter(|r| r.replayed).count();
            metrics::counter!("plinth_ledger_events_total").increment((size - replays) as u64);
            metrics::counter!("plinth_ledger_replays_total").increment(replays as u64);
            for (pending, result) in batch.into_iter().zip(results) {
                // A caller that gave up (client disconnected) is fine: its event is stored either way.
                let _ = pending.reply.send(Ok(result));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, events = size, "usage ledger write failed");
            for pending in batch {
                let _ = pending.reply.send(Err(StoreError::Unavailable(
                    "the usage ledger could not be written".into(),
                )));
            }
        }
    }
}

/// Stores a batch and says, for each pending event in order, which event bills it.
async fn write_batch(store: &Store, batch: &[Pending]) -> Result<Vec<Recorded>> {
    // Within a batch the first event of each (tenant, key) is the candidate; later ones are replays of it.
    let mut first_of: HashMap<(&TenantId, &str), usize> = HashMap::new();
    let mut ids: Vec<EventId> = Vec::with_capacity(batch.len());
    let mut rows = Vec::new();
    for (index, pending) in batch.iter().enumerate() {
        let record = &pending.record;
        let slot = (&record.tenant_id, record.idempotency_key.as_str());
        if let Some(&first) = first_of.get(&slot) {
            ids.push(ids[first].clone());
            continue;
        }
        first_of.insert(slot, index);
        let id = EventId::new();
        ids.push(id.clone());
        rows.push(usage_events::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(record.tenant_id.to_string()),
            api_key_id: Set(record.api_key_id.as_ref().map(ToString::to_string)),
            resource_kind: Set(record.resource_kind.clone()),
            resource_id: Set(record.resource_id.clone()),
            units: Set(record.units),
            unit_price_micros: Set(record.unit_price.0),
            amount_micros: Set(record.unit_price.0 * record.units),
            idempotency_key: Set(record.idempotency_key.clone()),
            request_id: Set(record.request_id.clone()),
            occurred_at_us: Set(pending.occurred_at_us),
            author_share_micros: Set(record.author_share.0),
        });
    }

    let turn = store.write_turn().await;
    let inserted: HashSet<String> = match usage_events::Entity::insert_many(rows)
        .on_conflict_do_nothing_on([
            usage_events::Column::TenantId,
            usage_events::Column::IdempotencyKey,
        ])
        .exec_with_returning_keys(store.db())
        .await?
    {
        TryInsertResult::Inserted(keys) => keys.into_iter().collect(),
        TryInsertResult::Conflicted | TryInsertResult::Empty => HashSet::new(),
    };
    drop(turn);

    // Candidates that conflicted were recorded by an earlier batch: bill them to that event.
    let conflicted: Vec<usize> = first_of
        .values()
        .copied()
        .filter(|&i| !inserted.contains(ids[i].as_str()))
        .collect();
    if !conflicted.is_empty() {
        let mut condition = Condition::any();
        for &i in &conflicted {
            let record = &batch[i].record;
            condition = condition.add(
                Condition::all()
                    .add(usage_events::Column::TenantId.eq(record.tenant_id.as_str()))
                    .add(usage_events::Column::IdempotencyKey.eq(record.idempotency_key.as_str())),
            );
        }
        let existing = usage_events::Entity::find()
            .filter(condition)
            .all(store.db())
            .await?;
        for &i in &conflicted {
            let record = &batch[i].record;
            let row = existing
                .iter()
                .find(|row| {
                    row.tenant_id == record.tenant_id.as_str()
                        && row.idempotency_key == record.idempotency_key
                })
                .ok_or_else(|| StoreError::Internal("conflicting usage event vanished".into()))?;
            ids[i] = crate::accounts::parse_id(&row.id)?;
        }
        // In-batch replays of a conflicted candidate point at the same existing event.
        for (index, pending) in batch.iter().enumerate() {
            let first = first_of[&(&pending.record.tenant_id, pending.record.idempotency_key.as_str())];
            ids[index] = ids[first].clone();
        }
    }

    Ok(batch
        .iter()
        .enumerate()
        .map(|(index, pending)| {
            let first = first_of[&(&pending.record.tenant_id, pending.record.idempotency_key.as_str())];
            Recorded {
                event_id: ids[index].clone(),
                replayed: index != first || !inserted.contains(ids[first].as_str()),
            }
        })
        .collect())
}

#[derive(Debug, FromQueryResult)]
struct AggregateRow {
    key: String,
    calls: i64,
    units: i64,
    amount: i64,
}

const DAY_US: i64 = 86_400_000_000;
/// The longest range one usage query may span.
const MAX_RANGE: chrono::Duration = chrono::Duration::days(400);

impl Store {
    /// Calls, units and amounts for a tenant in `[from, to)`, grouped by UTC day or by resource.
    pub async fn usage_report(
        &self,
        tenant: &TenantId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: UsageGrouping,
    ) -> Result<UsageReport> {
        if from >= to {
            return Err(StoreError::invalid("from: must be before `to`"));
        }
        if to - from > MAX_RANGE {
            return Err(StoreError::invalid("the range may span at most 400 days"));
        }
        let key = match group_by {
            UsageGrouping::Day => format!("CAST(occurred_at_us / {DAY_US} AS TEXT)"),
            UsageGrouping::Resource => "resource_kind || ':' || resource_id".to_owned(),
        };
        let mut rows = usage_events::Entity::find_in(tenant)
            .filter(usage_events::Column::OccurredAtUs.gte(from.timestamp_micros()))
            .filter(usage_events::Column::OccurredAtUs.lt(to.timestamp_micros()))
            .select_only()
            .column_as(Expr::cust(key.clone()), "key")
            .column_as(Expr::cust("COUNT(*)"), "calls")
            .column_as(Expr::cust("CAST(SUM(units) AS BIGINT)"), "units")
            .column_as(Expr::cust("CAST(SUM(amount_micros) AS BIGINT)"), "amount")
            .group_by(Expr::cust(key))
            .into_model::<AggregateRow>()
            .all(self.db())
            .await?;
        if group_by == UsageGrouping::Day {
            rows.sort_by_key(|row| row.key.parse::<i64>().unwrap_or(i64::MAX));
            for row in &mut rows {
                row.key = day_label(row.key.parse().unwrap_or_default());
            }
        } else {
            rows.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let rows: Vec<UsageRow> = rows
            .into_iter()
            .map(|row| UsageRow {
                key: row.key,
                calls: row.calls,
                units: row.units,
                amount_micros: Micros(row.amount),
            })
            .collect();
        let total = UsageRow {
            key: "total".to_owned(),
            calls: rows.iter().map(|row| row.calls).sum(),
            units: rows.iter().map(|row| row.units).sum(),
            amount_micros: Micros::checked_sum(rows.iter().map(|row| row.amount_micros))
                .ok_or_else(|| StoreError::Internal("a usage total overflows".into()))?,
        };
        Ok(UsageReport {
            from,
            to,
            group_by,
            rows,
            total,
        })
    }

    /// Withdraws an event whose call was not served after all (its work failed after the event was
    /// written). Only the call that inserted the event may withdraw it: a replay never does.
    pub async fn withdraw_usage_event(&self, tenant: &TenantId, event: &EventId) -> Result<()> {
        usage_events::Entity::delete_many()
            .filter(usage_events::Column::TenantId.eq(tenant.as_str()))
            .filter(usage_events::Column::Id.eq(event.as_str()))
            .exec(self.db())
            .await?;
        metrics::counter!("plinth_ledger_withdrawn_total").increment(1);
        Ok(())
    }

    /// Whether the ledger holds the event billed under `key` for `tenant`.
    pub async fn usage_event_recorded(&self, tenant: &TenantId, key: &str) -> Result<bool> {
        let events =
            usage_events::Entity::find_in(tenant).filter(usage_events::Column::IdempotencyKey.eq(key));
        Ok(sea_orm::PaginatorTrait::count(events, self.db()).await? > 0)
    }

    /// How many ledger events a tenant has in total; for tests and reconciliation.
    pub async fn usage_event_count(&self, tenant: &TenantId) -> Result<u64> {
        Ok(sea_orm::PaginatorTrait::count(usage_events::Entity::find_in(tenant), self.db()).await?)
    }
}

fn day_label(day: i64) -> String {
    let date = Utc
        .timestamp_opt(day * 86_400, 0)
        .single()
        .map_or(NaiveDate::MIN, |t| t.date_naive());
    date.format("%Y-%m-%d").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_clock_is_corrected_only_when_it_is_surely_off() {
        let second = 1_000_000;
        // A clock ten minutes slow, read in a millisecond: corrected.
        assert_eq!(clock_correction(0, 600 * second + 500, 1_000), 600 * second);
        // A clock that agrees, read after a long wait for a connection: used as it is.
        assert_eq!(clock_correction(0, 1_900_000, 2_000_000), 0);
        // Within the tolerance: used as it is; past it, corrected.
        assert_eq!(clock_correction(0, -900_000, 1_000), 0);
        assert_eq!(clock_correction(0, 1_200_000, 1_000), 1_199_500);
    }

    /// A replica that cannot read the database's clock keeps stamping with the offset it last measured
    /// for a minute, then refuses usage (and so metered calls) rather than stamp on an unchecked
    /// clock, and stamps again as soon as a reading succeeds.
    #[tokio::test]
    async fn usage_is_refused_once_the_databases_clock_has_gone_unread_for_a_minute() {
        fn an_hour_slow() -> DateTime<Utc> {
            Utc::now() - chrono::Duration::hours(1)
        }
        let mut clock = DatabaseClock {
            local: an_hour_slow,
            offset_us: 0,
            measured: None,
        };
        let database = || async { Ok(Utc::now().timestamp_micros()) };
        let unreachable = || async { Err(StoreError::Unavailable("connection refused".into())) };
        let near_now = |stamp: i64| (stamp - Utc::now().timestamp_micros()).abs() < 5_000_000;
        // Never measured: refused.
        assert!(matches!(
            clock.now_us_reading(unreachable).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(near_now(clock.now_us_reading(database).await.unwrap()));
        // Readings fail from now on: the last offset holds for the minute...
        let measured_ago = |seconds: u64| Instant::now().checked_sub(Duration::from_secs(seconds));
        clock.measured = measured_ago(59);
        assert!(near_now(clock.now_us_reading(unreachable).await.unwrap()));
        // ...and no longer.
        clock.measured = measured_ago(61);
        assert!(matches!(
            clock.now_us_reading(unreachable).await,
            Err(StoreError::Unavailable(_))
        ));
        // The database answers again: stamped at once, on its clock.
        assert!(near_now(clock.now_us_reading(database).await.unwrap()));
    }

    #[tokio::test]
    async fn events_are_stamped_on_the_databases_clock_whatever_the_replicas_says() {
        let (store, _dir) = crate::testing::test_store().await;
        let tenant = crate::testing::tenant_with_customer(&store, "cus_1").await;
        // A replica whose clock is ten minutes slow would stamp its calls into meter buckets the
        // usage sync (on another replica) has already closed and sent.
        fn ten_minutes_slow() -> DateTime<Utc> {
            Utc::now() - chrono::Duration::minutes(10)
        }
        let (meter, writer) = Meter::start(
            store.clone(),
            LedgerSettings {
                local_clock: ten_minutes_slow,
                ..LedgerSettings::default()
            },
        );
        let before = store.database_now_us().await.unwrap();
        let recorded = meter
            .record(UsageRecord {
                tenant_id: tenant.clone(),
                api_key_id: None,
                resource_kind: "model".into(),
                resource_id: "sentiment".into(),
                units: 1,
                unit_price: Micros(400),
                author_share: Micros(0),
                idempotency_key: automatic_key(),
                request_id: "req_1".into(),
            })
            .await
            .unwrap();
        let after = store.database_now_us().await.unwrap();
        let event = usage_events::Entity::find_by_id(recorded.event_id.to_string())
            .one(store.db())
            .await
            .unwrap()
            .unwrap();
        assert!(
            (before..=after).contains(&event.occurred_at_us),
            "stamped {} µs from the database's clock",
            event.occurred_at_us - before
        );
        drop(meter);
        writer.await.unwrap();
    }

    #[test]
    fn days_are_labelled_in_utc() {
        assert_eq!(day_label(0), "1970-01-01");
        assert_eq!(day_label(20_415), "2025-11-23");
    }
}
