//! Each tenant's share of the replica's time spent loading models, and the turns loads take.
//!
//! A load reads and screens a whole model file, builds its sessions and warms them up: most of a core
//! for anything from milliseconds to seconds, in the one turn every tenant's loads take. Counting
//! loads would treat a model that loads in 20 ms like one that takes 10 s, so the budget is in time:
//! a tenant's loads may take `per_minute` of each minute, and up to a minute's worth in a row. It is
//! a generic cell rate algorithm whose cost is known only once the load is over, which is why it is
//! written here rather than taken from `governor` (whose cells are paid before, never after): a load
//! is let in while the tenant owes no more than the burst, and the time it held its turn is charged
//! when it gives the turn back.
//!
//! The turn is not first come, first served: signups are free, and a line of loads from many fresh
//! accounts, each within its own budget, would keep a paying tenant's load waiting behind all of them.
//! A freed turn goes to the waiting load of the heaviest plan (its `scheduling_weight`), then of the
//! tenant owing least loading time (one that has not loaded lately owes nothing), then to the first to
//! ask. No number of free accounts holds up a paying tenant's load beyond the one in progress; a plan's
//! loads hold up lighter plans' at most by the budgets of the tenants on it, which are paid for; and
//! among tenants on one plan, one that loads now and then goes before those loading all the time.
//! (A rank by time owed over weight, tried first, let fresh accounts, owing nothing, go ahead of a
//! paying tenant that had loaded a moment before; virtual finishing times as in the models' fair
//! queues would let a stream of fresh accounts, each starting at the current virtual time, hold
//! everyone else back.)

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use plinth_core::id::TenantId;
use tokio::sync::oneshot;

/// Wall time a tenant may owe and still load: a minute, that is `per_minute` of loading in a row.
const BURST: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct LoadBudget {
    /// Wall time owed for each second of loading (a minute over the share of it a tenant may load).
    cost: f64,
    state: Mutex<State>,
    /// The tenants turns went to, in order.
    #[cfg(test)]
    started: Mutex<Vec<TenantId>>,
}

#[derive(Debug)]
struct State {
    /// When each tenant with time owed will owe none (tenants owing none are forgotten).
    owed_until: HashMap<TenantId, Instant>,
    /// Turns nobody holds.
    free_turns: usize,
    /// Loads waiting for a turn.
    waiting: Vec<Waiter>,
    /// The next waiter's place in line (among equals).
    next_seq: u64,
}

#[derive(Debug)]
struct Waiter {
    tenant: TenantId,
    weight: u32,
    seq: u64,
    hand: oneshot::Sender<Turn>,
}

impl LoadBudget {
    /// A budget of `per_minute` of loading a minute for each tenant, with `turns` loads at once.
    pub(crate) fn new(per_minute: Duration, turns: usize) -> Self {
        let per_minute = per_minute.clamp(Duration::from_millis(1), Duration::from_secs(60));
        Self {
            cost: 60.0 / per_minute.as_secs_f64(),
            state: Mutex::new(State {
                owed_until: HashMap::new(),
                free_turns: turns,
                waiting: Vec::new(),
                next_seq: 0,
            }),
            #[cfg(test)]
            started: Mutex::default(),
        }
    }

    /// `Ok` when `tenant` may load now; otherwise how long until it may.
    pub(crate) fn admit(&self, tenant: &TenantId, now: Instant) -> Result<(), Duration> {
        let owed = self.lock().owed(tenant, now);
        match owed.checked_sub(BURST) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Charges `tenant` for a load that took `took`, ending at `now`.
    pub(crate) fn charge(&self, tenant: &TenantId, took: Duration, now: Instant) {
        let owed = took.mul_f64(self.cost);
        let mut state = self.lock();
        state.owed_until.retain(|_, until| *until > now);
        let until = state.owed_until.entry(tenant.clone()).or_insert(now);
        *until = (*until).max(now) + owed;
    }

    /// A turn to load for `tenant`, whose plan weighs `weight`: at once if one is free, else when a
    /// load ends and this one ranks first among those waiting (see the module's doc). `None` only if
    /// the turn could not be handed (never, while a holder drops its turn). The time the turn is held
    /// is charged to `tenant` when it drops, however the load ends (one that panics too).
    pub(crate) async fn turn(self: &Arc<Self>, tenant: &TenantId, weight: u32) -> Option<Turn> {
        let handed = {
            let mut state = self.lock();
            if state.free_turns > 0 {
                state.free_turns -= 1;
                return Some(Turn::start(self, tenant.clone()));
            }
            // Loads that stopped waiting (their caller left) give up their place.
            state.waiting.retain(|waiter| !waiter.hand.is_closed());
            let (hand, handed) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.waiting.push(Waiter {
                tenant: tenant.clone(),
                weight: weight.max(1),
                seq,
                hand,
            });
            handed
        };
        handed.await.ok()
    }

    /// Hands a turn given back to the first-ranked waiting load, or frees it.
    fn hand_on(self: &Arc<Self>) {
        loop {
            let next = {
                let mut state = self.lock();
                let now = Instant::now();
                let first = state
                    .waiting
                    .iter()
                    .enumerate()
                    .filter(|(_, waiter)| !waiter.hand.is_closed())
                    .min_by_key(|(_, waiter)| {
                        (
                            Reverse(waiter.weight),
                            state.owed(&waiter.tenant, now),
                            waiter.seq,
                        )
                    })
                    .map(|(at, _)| at);
                match first {
                    Some(at) => state.waiting.swap_remove(at),
                    None => {
                        state.waiting.clear();
                        state.free_turns += 1;
                        return;
                    }
                }
            };
            match next.hand.send(Turn::start(self, next.tenant)) {
                Ok(()) => return,
                // It stopped waiting just now: the turn goes to the next, uncharged.
                Err(mut turn) => turn.budget = None,
            }
        }
    }

    /// The tenants turns went to, in order.
    #[cfg(test)]
    pub(crate) fn started(&self) -> Vec<TenantId> {
        self.started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads waiting for a turn (that have not stopped waiting).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock()
            .waiting
            .iter()
            .filter(|waiter| !waiter.hand.is_closed())
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The wall time `tenant` owes at `now`.
    fn owed(&self, tenant: &TenantId, now: Instant) -> Duration {
        self.owed_until
            .get(tenant)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

/// A turn to load, held by a tenant's load; given back, charged and handed on when dropped.
#[derive(Debug)]
pub(crate) struct Turn {
    /// `None` once handed on (or for a turn its waiter never took).
    budget: Option<Arc<LoadBudget>>,
    tenant: TenantId,
    started: Instant,
}

impl Turn {
    fn start(budget: &Arc<LoadBudget>, tenant: TenantId) -> Self {
        #[cfg(test)]
        budget
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tenant.clone());
        Self {
            budget: Some(budget.clone()),
            tenant,
            started: Instant::now(),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            let now = Instant::now();
            budget.charge(&self.tenant, now - self.started, now);
            budget.hand_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Polls a future once: its output if it is ready.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_tenant_loads_a_minutes_worth_in_a_row_then_its_share_of_each_minute() {
        // 6 s a minute: each second of loading owes 10 s.
        let budget = LoadBudget::new(Duration::from_secs(6), 1);
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
    fn a_load_is_charged_the_time_it_held_its_turn_however_it_ends() {
        // A millisecond a minute: a load of 2 ms owes two minutes.
        let budget = Arc::new(LoadBudget::new(Duration::from_millis(1), 1));
        let tenant = TenantId::new();
        let panicked = std::panic::catch_unwind(|| {
            let _turn = poll_once(pin!(budget.turn(&tenant, 1)))
                .flatten()
                .expect("a free turn");
            std::thread::sleep(Duration::from_millis(2));
            panic!("the load panicked");
        });
        assert!(panicked.is_err());
        let wait = budget.admit(&tenant, Instant::now()).expect_err("charged");
        assert!(wait >= Duration::from_secs(59), "{wait:?}");
        // And the turn was given back.
        assert!(poll_once(pin!(budget.turn(&tenant, 1))).flatten().is_some());
    }

    #[test]
    fn a_freed_turn_goes_to_the_heaviest_plan_then_the_tenant_owing_least_not_the_first_in_line() {
        let budget = Arc::new(LoadBudget::new(Duration::from_secs(15), 1));
        let (noisy, quiet, paying, fresh) =
            (TenantId::new(), TenantId::new(), TenantId::new(), TenantId::new());
        let now = Instant::now();
        // The noisy tenant has loaded 5 s lately (it owes 20 s), the quiet one 1 s (4 s), and the
        // paying one 10 s (40 s); the fresh account nothing.
        budget.charge(&noisy, Duration::from_secs(5), now);
        budget.charge(&quiet, Duration::from_secs(1), now);
        budget.charge(&paying, Duration::from_secs(10), now);
        let held = poll_once(pin!(budget.turn(&TenantId::new(), 1)))
            .flatten()
            .expect("a free turn");
        // They queue in this order behind the load in progress.
        let mut noisy_turn = pin!(budget.turn(&noisy, 1));
        let mut quiet_turn = pin!(budget.turn(&quiet, 1));
        let mut paying_turn = pin!(budget.turn(&paying, 4));
        let mut fresh_turn = pin!(budget.turn(&fresh, 1));
        for turn in [
            noisy_turn.as_mut(),
            quiet_turn.as_mut(),
            paying_turn.as_mut(),
            fresh_turn.as_mut(),
        ] {
            assert!(poll_once(turn).is_none());
        }

        // The paying tenant first, owing most; then the free ones by what each owes.
        drop(held);
        let paying_held = poll_once(paying_turn.as_mut())
            .flatten()
            .expect("the paying tenant's turn");
        assert!(poll_once(noisy_turn.as_mut()).is_none());
        assert!(poll_once(quiet_turn.as_mut()).is_none());
        assert!(poll_once(fresh_turn.as_mut()).is_none());
        drop(paying_held);
        let fresh_held = poll_once(fresh_turn.as_mut())
            .flatten()
            .expect("the fresh account's turn");
        assert!(poll_once(noisy_turn.as_mut()).is_none());
        assert!(poll_once(quiet_turn.as_mut()).is_none());
        drop(fresh_held);
        let quiet_held = poll_once(quiet_turn.as_mut())
            .flatten()
            .expect("the quiet tenant's turn");
        assert!(poll_once(noisy_turn.as_mut()).is_none());
        drop(quiet_held);
        assert!(poll_once(noisy_turn.as_mut()).flatten().is_some());
    }

    #[test]
    fn among_equals_owing_nothing_the_first_to_ask_goes_first() {
        let budget = Arc::new(LoadBudget::new(Duration::from_secs(15), 1));
        let (first, second) = (TenantId::new(), TenantId::new());
        let held = poll_once(pin!(budget.turn(&TenantId::new(), 1)))
            .flatten()
            .expect("a free turn");
        let mut first_turn = pin!(budget.turn(&first, 1));
        let mut second_turn = pin!(budget.turn(&second, 1));
        assert!(poll_once(first_turn.as_mut()).is_none());
        assert!(poll_once(second_turn.as_mut()).is_none());
        drop(held);
        let first_held = poll_once(first_turn.as_mut())
            .flatten()
            .expect("the first to ask");
        assert!(poll_once(second_turn.as_mut()).is_none());
        drop(first_held);
        assert!(poll_once(second_turn.as_mut()).flatten().is_some());
    }

    #[test]
    fn a_load_that_stopped_waiting_neither_keeps_nor_loses_the_turn() {
        let budget = Arc::new(LoadBudget::new(Duration::from_secs(15), 1));
        let (gone, next) = (TenantId::new(), TenantId::new());
        let held = poll_once(pin!(budget.turn(&TenantId::new(), 1)))
            .flatten()
            .expect("a free turn");
        {
            let mut gone_turn = Box::pin(budget.turn(&gone, 1));
            assert!(poll_once(gone_turn.as_mut()).is_none());
            // Its caller left (a timeout) before the turn came.
        }
        let mut next_turn = pin!(budget.turn(&next, 1));
        assert!(poll_once(next_turn.as_mut()).is_none());
        drop(held);
        let next_held = poll_once(next_turn.as_mut())
            .flatten()
            .expect("the turn, past the one that left");
        drop(next_held);
        // Handed to a caller that left after it was handed: back at once for the next.
        let held = poll_once(pin!(budget.turn(&TenantId::new(), 1)))
            .flatten()
            .expect("a free turn");
        let mut late = Box::pin(budget.turn(&gone, 1));
        assert!(poll_once(late.as_mut()).is_none());
        drop(held);
        drop(late);
        assert!(poll_once(pin!(budget.turn(&next, 1))).flatten().is_some());
        assert!(budget.lock().waiting.is_empty());
    }

    #[test]
    fn tenants_owing_nothing_are_forgotten() {
        let budget = LoadBudget::new(Duration::from_secs(30), 1);
        let start = Instant::now();
        for _ in 0..100 {
            budget.charge(&TenantId::new(), Duration::from_millis(10), start);
        }
        budget.charge(
            &TenantId::new(),
            Duration::from_millis(10),
            start + Duration::from_secs(1),
        );
        assert_eq!(budget.lock().owed_until.len(), 1);
    }
}
