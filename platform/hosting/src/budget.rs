//! Each tenant's share of the replica's time spent loading models.
//!
//! A load reads and screens a whole model file, builds its sessions and warms them up: most of a core
//! for anything from milliseconds to seconds, in the one turn every tenant's loads take. Counting
//! loads would treat a model that loads in 20 ms like one that takes 10 s, so the budget is in time:
//! a tenant's loads may take `per_minute` of each minute, and up to a minute's worth in a row. It is
//! a generic cell rate algorithm whose cost is known only once the load is over, which is why it is
//! written here rather than taken from `governor` (whose cells are paid before, never after): a load
//! is let in while the tenant owes no more than the burst, and its time is charged when it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use plinth_core::id::TenantId;

/// Wall time a tenant may owe and still load: a minute, that is `per_minute` of loading in a row.
const BURST: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct LoadBudget {
    /// Wall time owed for each second of loading (a minute over the share of it a tenant may load).
    cost: f64,
    /// When each tenant with time owed will owe none (tenants owing none are forgotten).
    owed_until: Mutex<HashMap<TenantId, Instant>>,
}

impl LoadBudget {
    /// A budget of `per_minute` of loading a minute for each tenant.
    pub(crate) fn new(per_minute: Duration) -> Self {
        let per_minute = per_minute.clamp(Duration::from_millis(1), Duration::from_secs(60));
        Self {
            cost: 60.0 / per_minute.as_secs_f64(),
            owed_until: Mutex::default(),
        }
    }

    /// `Ok` when `tenant` may load now; otherwise how long until it may.
    pub(crate) fn admit(&self, tenant: &TenantId, now: Instant) -> Result<(), Duration> {
        let owed = self
            .lock()
            .get(tenant)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        match owed.checked_sub(BURST) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Charges `tenant` for a load that took `took`, ending at `now`.
    pub(crate) fn charge(&self, tenant: &TenantId, took: Duration, now: Instant) {
        let owed = took.mul_f64(self.cost);
        let mut owed_until = self.lock();
        owed_until.retain(|_, until| *until > now);
        let until = owed_until.entry(tenant.clone()).or_insert(now);
        *until = (*until).max(now) + owed;
    }

    /// Charges `tenant` for a load starting now, when the returned guard drops (however the load
    /// ends: a load that panics is charged too).
    pub(crate) fn charge_on_drop(self: &Arc<Self>, tenant: TenantId) -> Charge {
        Charge {
            budget: self.clone(),
            tenant,
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Instant>> {
        self.owed_until.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A load in progress, charged to its tenant when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<LoadBudget>,
    tenant: TenantId,
    started: Instant,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let now = Instant::now();
        self.budget.charge(&self.tenant, now - self.started, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_loads_a_minutes_worth_in_a_row_then_its_share_of_each_minute() {
        // 6 s a minute: each second of loading owes 10 s.
        let budget = LoadBudget::new(Duration::from_secs(6));
        let (tenant, other) = (TenantId::new(), TenantId::new());
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        // Loads of a second each, back to back: let in while a minute or less is owed.
        for second in 0..7 {
            assert_eq!(budget.admit(&tenant, at(second)), Ok(()), "at {second} s");
            budget.charge(&tenant, Duration::from_secs(1), at(second + 1));
        }
        // Seven seconds of loading owe 70 s from the first end (1 s): 64 s at 7 s, 4 s past the burst.
        assert_eq!(budget.admit(&tenant, at(7)), Err(Duration::from_secs(4)));
        assert_eq!(budget.admit(&tenant, at(11)), Ok(()));
        // Another tenant owes nothing.
        assert_eq!(budget.admit(&other, at(7)), Ok(()));
    }

    #[test]
    fn a_load_is_charged_however_it_ends() {
        // A millisecond a minute: a load of 2 ms owes two minutes.
        let budget = Arc::new(LoadBudget::new(Duration::from_millis(1)));
        let tenant = TenantId::new();
        let panicked = std::panic::catch_unwind(|| {
            let _charge = budget.charge_on_drop(tenant.clone());
            std::thread::sleep(Duration::from_millis(2));
            panic!("the load panicked");
        });
        assert!(panicked.is_err());
        let wait = budget.admit(&tenant, Instant::now()).expect_err("charged");
        assert!(wait >= Duration::from_secs(59), "{wait:?}");
    }

    #[test]
    fn tenants_owing_nothing_are_forgotten() {
        let budget = LoadBudget::new(Duration::from_secs(30));
        let start = Instant::now();
        for _ in 0..100 {
            budget.charge(&TenantId::new(), Duration::from_millis(10), start);
        }
        budget.charge(
            &TenantId::new(),
            Duration::from_millis(10),
            start + Duration::from_secs(1),
        );
        assert_eq!(budget.lock().len(), 1);
    }
}
