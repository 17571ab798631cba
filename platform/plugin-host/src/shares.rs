//! Each tenant's share of the threads its guest code runs on.
//!
//! Busy guest code yields every epoch tick, and the threads then run the guests that are ready in
//! turn, each for a tick: left at that, a tenant's share of the threads would be its share of the
//! busy guests, and one tenant looping in as many instances as its plan allows would leave another
//! tenant's plugin a sliver of them (and push it past its deadline). So a guest runs on after a
//! yield only with a slice of the tick it resumes in, and a tenant's guests take at most its share
//! of the slices of the last [`WINDOW`] ticks: the threads' slices over the tenants busy in that
//! window, rounded up. Past it, a guest waits for a later tick, and the thread goes to the next
//! guest ready. A tenant alone is not held back at all, and a guest waiting in the host (a model
//! call, a sleep) takes no slice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use plinth_core::id::TenantId;
use tokio::sync::Notify;

/// The ticks a tenant's share is measured over, and it counts as busy for after its last slice.
const WINDOW: u64 = 16;

/// The epoch ticks, counted and announced (the epoch thread advances it as it ticks the engine).
#[derive(Debug, Default)]
pub(crate) struct Clock {
    ticks: AtomicU64,
    ticked: Notify,
}

impl Clock {
    pub(crate) fn advance(&self) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        self.ticked.notify_waiters();
    }

    fn now(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
}

/// The tenants' shares of one set of threads.
#[derive(Debug)]
pub(crate) struct Shares {
    threads: u64,
    clock: Arc<Clock>,
    /// The ticks of each busy tenant's slices in the window (the tenant stays until they age out).
    slices: Mutex<HashMap<TenantId, VecDeque<u64>>>,
}

impl Shares {
    pub(crate) fn new(threads: usize, clock: Arc<Clock>) -> Self {
        Self {
            threads: u64::try_from(threads.max(1)).unwrap_or(u64::MAX),
            clock,
            slices: Mutex::default(),
        }
    }

    /// Takes a slice of this tick for one of `tenant`'s guests (`always` past its share too), or
    /// names the tick in which its guests have had their share.
    fn take(&self, tenant: &TenantId, always: bool) -> Result<(), u64> {
        let mut slices = self.slices.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock: a guest that read the clock just before another took a slice of the
        // next tick must not judge by the tick before.
        let now = self.clock.now();
        slices.retain(|_, ticks| {
            while ticks.front().is_some_and(|tick| tick + WINDOW <= now) {
                ticks.pop_front();
            }
            !ticks.is_empty()
        });
        let busy = slices.len() + usize::from(!slices.contains_key(tenant));
        let taken = slices.entry(tenant.clone()).or_default();
        // Alone, a tenant has nobody to share with.
        let share = (WINDOW * self.threads).div_ceil(u64::try_from(busy).unwrap_or(u64::MAX));
        if always || busy <= 1 || (taken.len() as u64) < share {
            taken.push_back(now);
            Ok(())
        } else {
            Err(now)
        }
    }

    /// An invocation starting: counted as a slice, never held back (a tenant making many short
    /// calls is not slowed, but its busy guests then wait the longer).
    pub(crate) fn start(&self, tenant: &TenantId) {
        let _ = self.take(tenant, true);
    }

    /// A guest's turn to run on after a tick: it yields to the others ready, then takes a slice of
    /// the tick it resumes in, waiting for a later tick while its tenant has had its share. Taken on
    /// resuming, not before yielding: among many guests ready, a guest may resume ticks after it
    /// yielded, and then runs for a tick.
    pub(crate) async fn turn(self: Arc<Self>, tenant: TenantId) {
        tokio::task::yield_now().await;
        let Err(mut refused_in) = self.take(&tenant, false) else {
            return;
        };
        loop {
            let ticked = self.clock.ticked.notified();
            tokio::pin!(ticked);
            // Registered before looking, so that a tick between the two is not missed.
            ticked.as_mut().enable();
            if self.clock.now() > refused_in {
                match self.take(&tenant, false) {
                    Ok(()) => return,
                    Err(tick) => refused_in = tick,
                }
            }
            ticked.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slices `tenant` can take in this tick.
    fn slices(shares: &Shares, tenant: &TenantId) -> u64 {
        std::iter::from_fn(|| shares.take(tenant, false).ok())
            .take(1000)
            .count() as u64
    }

    #[test]
    fn the_slices_of_a_window_are_shared_among_the_tenants_busy_in_it() {
        let clock = Arc::new(Clock::default());
        // Two threads: 32 slices a window.
        let shares = Shares::new(2, Arc::clone(&clock));
        let (hog, other, third) = (TenantId::new(), TenantId::new(), TenantId::new());
        shares.start(&other);
        // Two busy: half the window's slices each, however they are spread over its ticks.
        assert_eq!(slices(&shares, &hog), WINDOW);
        assert_eq!(slices(&shares, &other), WINDOW - 1);
        // A third: a third each, rounded up (the first two have had theirs in this window).
        assert_eq!(slices(&shares, &third), (2 * WINDOW).div_ceil(3));
        assert_eq!(slices(&shares, &hog), 0);
        // Slices age out of the window: a tick later, still none...
        clock.advance();
        assert_eq!(slices(&shares, &hog), 0);
        // ...and once the window has passed, nobody else is busy: alone, a tenant is not held back.
        for _ in 1..WINDOW {
            clock.advance();
        }
        assert_eq!(slices(&shares, &hog), 1000);
        // Starts are counted, past the share too.
        shares.start(&other);
        clock.advance();
        assert_eq!(
            slices(&shares, &hog),
            0,
            "a thousand slices in the window already"
        );
        assert_eq!(slices(&shares, &other), WINDOW - 1);
    }

    #[tokio::test]
    async fn a_guest_past_its_tenants_share_waits_for_a_later_tick() {
        let clock = Arc::new(Clock::default());
        let shares = Arc::new(Shares::new(1, Arc::clone(&clock)));
        let (tenant, other) = (TenantId::new(), TenantId::new());
        shares.start(&other);
        assert_eq!(slices(&shares, &tenant), WINDOW / 2);
        let mut waiting = tokio::spawn(Arc::clone(&shares).turn(tenant.clone()));
        tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting)
            .await
            .expect_err("no slice while the tenant has had its share");
        // Its first slice ages out of the window.
        for _ in 0..WINDOW {
            clock.advance();
        }
        waiting.await.unwrap();
    }
}
