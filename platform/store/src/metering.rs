//! A billable call: its usage recorded in the ledger beside its work, and withdrawn when the work
//! fails, so that only served calls are billed and a retried call is billed once. What the HTTP API's
//! metered routes and a plugin's model calls share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use plinth_core::id::TenantId;
use plinth_core::timing;
use plinth_core::{ErrorCode, Micros};

use crate::StoreError;
use crate::auth::Principal;
use crate::ledger::{Meter, Recorded, UsageRecord, automatic_key, derived_key};

/// The ledger keys of one call, chosen by the platform, never by the client.
#[derive(Debug, Clone)]
pub struct CallKeys {
    /// The call's own event: the same for every attempt at a keyed request, so it is billed once.
    pub call: String,
    /// This attempt: what the call's own sub-calls (a plugin's model calls) are keyed under. Each
    /// attempt's sub-calls are work of their own, billed as such: were they keyed like the call, an
    /// attempt that fails on purpose would let the next one run different sub-calls as "replays".
    pub attempt: String,
    /// This attempt took the call over from one that stopped unanswered: the call's event may be that
    /// attempt's, and this one withdraws it if it fails too (nobody was answered).
    pub inherited: bool,
}

impl CallKeys {
    /// A call made without an idempotency key: keys of its own, minted here.
    #[must_use]
    pub fn unkeyed() -> Self {
        let key = automatic_key();
        Self {
            attempt: key.clone(),
            call: key,
            inherited: false,
        }
    }

    /// The `sequence`-th sub-call (a plugin's model call) of the attempt `parent`.
    #[must_use]
    pub fn derived(parent: &str, sequence: u32) -> Self {
        let key = derived_key(parent, sequence);
        Self {
            attempt: key.clone(),
            call: key,
            inherited: false,
        }
    }
}

/// What one call bills: `units` of a resource at `unit_price` each.
#[derive(Debug, Clone)]
pub struct Billable<'a> {
    pub kind: &'a str,
    pub resource: &'a str,
    pub units: usize,
    pub unit_price: Micros,
    /// What of the amount accrues to a plugin's author.
    pub author_share: Micros,
}

impl<'a> Billable<'a> {
    /// A model call: one unit per item, at the plan's per-call price.
    #[must_use]
    pub fn model(auth: &Principal, name: &'a str, units: usize) -> Self {
        Self {
            kind: "model",
            resource: name,
            units,
            unit_price: auth.price_per_call,
            author_share: Micros::ZERO,
        }
    }
}

impl Meter {
    /// Records one billable call for `auth`'s tenant and returns once it is durable.
    pub async fn charge(
        &self,
        auth: &Principal,
        keys: CallKeys,
        request_id: String,
        billable: Billable<'_>,
    ) -> Result<Recorded, StoreError> {
        let _reserved = self.within_cap(auth, &keys, billable.units).await?;
        self.record_charge(auth, keys, request_id, billable).await
    }

    /// Refuses a call of several units that would take a capped plan past its included calls, and
    /// reserves its units until its event is in the ledger, so calls admitted together cannot pass
    /// the cap together (on this replica: replicas do not share reservations). A call of one is
    /// refused at admission once the cap is reached (from a count cached briefly); a call of many (a
    /// batch, a plugin's model call) could otherwise take any number past it at once. A retry that
    /// takes over an attempt whose event is in the ledger is not checked again: its units are counted.
    /// One taking over an attempt that left no event (refused here, or failed and withdrawn) is
    /// checked as any call: a refusal is not a pass for the key's next attempt.
    async fn within_cap(
        &self,
        auth: &Principal,
        keys: &CallKeys,
        units: usize,
    ) -> Result<Option<Reservation>, StoreError> {
        let Some(cap) = auth.call_cap else {
            return Ok(None);
        };
        if units <= 1
            || keys.inherited
                && self
                    .store()
                    .usage_event_recorded(&auth.tenant_id, &keys.call)
                    .await?
        {
            return Ok(None);
        }
        let units = i64::try_from(units).unwrap_or(i64::MAX);
        let mut tries = 0;
        loop {
            let releases = self
                .reserved
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .releases;
            let used = self.store().units_this_period(&auth.tenant_id).await?;
            let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
            // A reservation given back while the count was read may or may not be in it (its event
            // was written just before): read again.
            tries += 1;
            if reserved.releases != releases && tries < 5 {
                continue;
            }
            let in_flight = reserved.units.get(&auth.tenant_id).copied().unwrap_or(0);
            if used.saturating_add(in_flight).saturating_add(units) > cap {
                return Err(StoreError::Refused(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "this call's {units} units would pass the plan's {cap} included calls for this period ({used} used, {in_flight} on their way); send fewer, or upgrade the plan (POST /v1/subscription)"
                    ),
                ));
            }
            *reserved.units.entry(auth.tenant_id.clone()).or_default() += units;
            break;
        }
        Ok(Some(Reservation {
            reserved: Arc::clone(&self.reserved),
            tenant: auth.tenant_id.clone(),
            units,
        }))
    }

    async fn record_charge(
        &self,
        auth: &Principal,
        keys: CallKeys,
        request_id: String,
        billable: Billable<'_>,
    ) -> Result<Recorded, StoreError> {
        let record = self.record(UsageRecord {
            tenant_id: auth.tenant_id.clone(),
            api_key_id: auth.api_key_id().cloned(),
            resource_kind: billable.kind.to_owned(),
            resource_id: billable.resource.to_owned(),
            units: i64::try_from(billable.units).unwrap_or(i64::MAX),
            unit_price: billable.unit_price,
            author_share: billable.author_share,
            idempotency_key: keys.call,
            request_id,
        });
        timing::time("ledger", record).await
    }

    /// Runs `work` and records its usage; returns when both are done, so the answer still waits for a
    /// durable event, but the event's commit (an fsync) overlaps the work instead of following it.
    ///
    /// Work that fails before it waits for anything (bad input, a full queue) is refused without
    /// touching the ledger. Work that fails later has its event withdrawn, so only served calls are
    /// billed. A replay (the event was already there) withdraws it only when this attempt inherited the
    /// call from one that stopped unanswered: attempts at one keyed request run one at a time, so then
    /// nobody was served.
    pub async fn metered<T, E: From<StoreError>>(
        &self,
        auth: &Principal,
        keys: CallKeys,
        request_id: String,
        billable: Billable<'_>,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<(T, Recorded), E> {
        let _reserved = self.within_cap(auth, &keys, billable.units).await?;
        let inherited = keys.inherited;
        let work = timing::time("model", work);
        let mut work = std::pin::pin!(work);
        // One poll: does the work finish (or fail) without waiting?
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        if let Poll::Ready(outcome) = first {
            let value = outcome?;
            let recorded = self.record_charge(auth, keys, request_id, billable).await?;
            return Ok((value, recorded));
        }
        let (outcome, recorded) = tokio::join!(work, self.record_charge(auth, keys, request_id, billable));
        match (outcome, recorded) {
            (Ok(value), Ok(recorded)) => Ok((value, recorded)),
            (Err(err), Ok(recorded)) => {
                if (!recorded.replayed || inherited)
                    && let Err(withdraw) = self
                        .store()
                        .withdraw_usage_event(&auth.tenant_id, &recorded.event_id)
                        .await
                {
                    metrics::counter!("plinth_usage_withdrawals_failed_total").increment(1);
                    tracing::error!(error = %withdraw, event = %recorded.event_id,
                        "a failed call's usage event could not be withdrawn");
                }
                Err(err)
            }
            (_, Err(err)) => Err(err.into()),
        }
    }
}

/// Units of capped plans' calls admitted and not yet in the ledger, by tenant, and how many
/// reservations were given back (each after its call's event was written, or its call failed).
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    units: HashMap<TenantId, i64>,
    releases: u64,
}

/// Units reserved under a capped plan until the call's event is in the ledger (or the call failed).
struct Reservation {
    reserved: Arc<Mutex<Reserved>>,
    tenant: TenantId,
    units: i64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        reserved.releases += 1;
        if let Some(held) = reserved.units.get_mut(&self.tenant) {
            *held -= self.units;
            if *held <= 0 {
                reserved.units.remove(&self.tenant);
            }
        }
    }
}
