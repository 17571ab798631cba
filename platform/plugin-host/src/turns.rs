//! Turns on a set of plugin threads: which guests compute now, shared fairly among tenants.
//!
//! Busy guests on one set of threads would otherwise take turns with each other at every epoch
//! tick, so a tenant's share of the threads would be its share of the busy guests: a tenant looping
//! in every instance its plan allows would leave another tenant's plugin a sliver of them and push
//! it past its deadline. Here the threads are as many turns; a guest computes only with one, and
//! while any guest waits, a turn held for a [`SLICE`] is passed on at the next tick: the tenants
//! waiting take turns one after another (round robin), and a tenant's own guests first come, first
//! served. A slice counts from when its turn was given, so a turn handed over just before a tick is
//! not passed on at that tick.
//!
//! No thread idles while a guest is ready to compute. A guest whose invocation is blocked in the
//! host (a sleep, or a model or key-value call, which goes on apart from the guest) keeps
//! its turn only while nobody else wants one, and takes one back, through the queue, before it goes
//! on. A guest that is merely in a host call (a memory copy, a clock read) keeps its turn.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The least a turn lasts before it is passed on (at the next epoch tick after it).
pub(crate) const SLICE: Duration = Duration::from_millis(10);

/// Holds no turn.
const IDLE: u8 = 0;
/// Holds a turn and computes (guest code, or the host setting it up).
const COMPUTING: u8 = 1;
/// Holds a turn in a host call.
const IN_HOST: u8 = 2;
/// Holds a turn while its invocation is blocked in a host call: another guest may take it.
const PARKED: u8 = 3;

/// The turns of one set of threads.
#[derive(Debug)]
pub(crate) struct Turns {
    /// Guests waiting for a turn: read without the lock at every tick and every park.
    waiting: AtomicUsize,
    /// What the times turns are given are counted from.
    began: Instant,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    free: usize,
    holders: Vec<Arc<Slot>>,
    /// Tenants with guests waiting, in the order they take their next turn.
    tenants: VecDeque<String>,
    waiters: HashMap<String, VecDeque<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    slot: Arc<Slot>,
    wake: oneshot::Sender<()>,
}

/// One guest's hold on a turn. Its own host calls and its invocation's task change it without the
/// lock, by compare and swap (so a turn taken from a parked guest is never also kept by it); the
/// queue, under the lock, gives and takes it.
#[derive(Debug)]
pub(crate) struct Slot {
    tenant: String,
    state: AtomicU8,
    /// When its turn was given, in microseconds from [`Turns::began`].
    given_us: AtomicU64,
}

/// A guest of one invocation: gives back its turn and its place in the queue when dropped, however
/// the invocation ends.
#[derive(Debug)]
pub(crate) struct Guest {
    turn: Turn,
}

/// What a guest's invocation, host calls and ticks take and mark its turn with.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    turns: Arc<Turns>,
    slot: Arc<Slot>,
}

/// What a guest waits on for its turn (`'static`, as the epoch callback's yield needs).
pub(crate) type TurnWait = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Turns {
    pub(crate) fn new(threads: usize) -> Arc<Self> {
        Arc::new(Self {
            waiting: AtomicUsize::new(0),
            began: Instant::now(),
            queue: Mutex::new(Queue {
                free: threads.max(1),
                ..Queue::default()
            }),
        })
    }

    /// A guest of `tenant`, holding no turn yet.
    pub(crate) fn guest(self: &Arc<Self>, tenant: String) -> Guest {
        Guest {
            turn: Turn {
                turns: self.clone(),
                slot: Arc::new(Slot {
                    tenant,
                    state: AtomicU8::new(IDLE),
                    given_us: AtomicU64::new(0),
                }),
            },
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a turn for `slot`; with `pass`, a turn it holds first goes to whoever waits.
    fn take(self: Arc<Self>, slot: Arc<Slot>, pass: bool) -> TurnWait {
        Box::pin(async move {
            let wake = {
                let mut queue = self.lock();
                if slot.holds() {
                    if !pass || queue.waiters.is_empty() {
                        return;
                    }
                    queue.release(&slot);
                }
                let (wake, woken) = oneshot::channel();
                let tenant = slot.tenant.clone();
                let waiters = queue.waiters.entry(tenant.clone()).or_default();
                waiters.push_back(Waiter { slot, wake });
                if waiters.len() == 1 {
                    queue.tenants.push_back(tenant);
                }
                self.waiting.fetch_add(1, Ordering::SeqCst);
                self.dispatch(&mut queue);
                woken
            };
            let queued = std::time::Instant::now();
            // Closed only when the guest itself is dropped, which ends this wait too.
            let _ = wake.await;
            metrics::histogram!("plinth_plugin_turn_wait_seconds").record(queued.elapsed().as_secs_f64());
        })
    }

    /// Hands turns to the waiting tenants in turn: free ones, and those of parked guests.
    fn dispatch(&self, queue: &mut Queue) {
        while let Some(tenant) = queue.tenants.front().cloned() {
            if queue.free == 0 && !queue.revoke_parked() {
                return;
            }
            queue.tenants.pop_front();
            let Some(waiters) = queue.waiters.get_mut(&tenant) else {
                continue;
            };
            let Some(waiter) = waiters.pop_front() else {
                continue;
            };
            if waiters.is_empty() {
                queue.waiters.remove(&tenant);
            } else {
                queue.tenants.push_back(tenant);
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            waiter.slot.state.store(COMPUTING, Ordering::SeqCst);
            waiter.slot.given_us.store(self.now_us(), Ordering::SeqCst);
            queue.free -= 1;
            queue.holders.push(waiter.slot.clone());
            if waiter.wake.send(()).is_err() {
                // The wait was given up (the invocation ended): the turn goes on.
                queue.release(&waiter.slot);
            }
        }
    }
}

impl Queue {
    /// Frees the turn `slot` holds.
    fn release(&mut self, slot: &Arc<Slot>) {
        slot.state.store(IDLE, Ordering::SeqCst);
        if let Some(at) = self.holders.iter().position(|held| Arc::ptr_eq(held, slot)) {
            self.holders.swap_remove(at);
            self.free += 1;
        }
    }

    /// Frees a turn held by a parked guest, if any is.
    fn revoke_parked(&mut self) -> bool {
        let taken = self.holders.iter().position(|held| {
            held.state
                .compare_exchange(PARKED, IDLE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if let Some(at) = taken {
            self.holders.swap_remove(at);
            self.free += 1;
        }
        taken.is_some()
    }
}

impl Slot {
    fn holds(&self) -> bool {
        self.state.load(Ordering::SeqCst) != IDLE
    }

    /// Moves a turn held from one state to another (nothing when it is not in `from`).
    fn shift(&self, from: u8, to: u8) -> Result<u8, u8> {
        self.state
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
    }
}

impl Turn {
    /// The guest calls into the host.
    pub(crate) fn calling_host(&self) {
        let _ = self.slot.shift(COMPUTING, IN_HOST);
    }

    /// The guest returns from the host.
    pub(crate) fn returning_from_host(&self) {
        let _ = self.slot.shift(IN_HOST, COMPUTING);
    }

    /// Runs `invocation` (instantiating the guest, its code and its host calls) with a turn: takes
    /// one first; while the invocation is blocked in the host, lets whoever waits take it, and then
    /// takes one back before the invocation goes on.
    pub(crate) fn run<F: Future>(self, invocation: F) -> impl Future<Output = F::Output> {
        let Self { turns, slot } = self;
        let mut taking = Some(turns.clone().take(slot.clone(), false));
        let (mut parked, mut resuming) = (false, false);
        async move {
            let mut invocation = std::pin::pin!(invocation);
            std::future::poll_fn(move |cx| {
                if parked {
                    parked = false;
                    if slot.shift(PARKED, IN_HOST).is_err() {
                        // Taken meanwhile: back to the host call with a turn of its own.
                        taking = Some(turns.clone().take(slot.clone(), false));
                        resuming = true;
                    }
                }
                if let Some(turn) = taking.as_mut() {
                    if turn.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    taking = None;
                    if std::mem::take(&mut resuming) {
                        let _ = slot.shift(COMPUTING, IN_HOST);
                    }
                }
                let polled = invocation.as_mut().poll(cx);
                if polled.is_pending() && slot.shift(IN_HOST, PARKED).is_ok() {
                    parked = true;
                    if turns.waiting.load(Ordering::SeqCst) > 0 {
                        turns.dispatch(&mut turns.lock());
                    }
                }
                polled
            })
            .await
        }
    }

    /// At an epoch tick: what to wait on before computing on, when another guest waits for a turn
    /// and this one has had its slice (or it holds none).
    pub(crate) fn at_tick(&self) -> Option<TurnWait> {
        let Self { turns, slot } = self;
        let had_its_slice = turns
            .now_us()
            .saturating_sub(slot.given_us.load(Ordering::SeqCst))
            >= u64::try_from(SLICE.as_micros()).unwrap_or(u64::MAX);
        // It keeps its turn, computing, through the yield that follows (a guest that the yield lets
        // in waits for the next tick rather than take it).
        if (turns.waiting.load(Ordering::SeqCst) == 0 || !had_its_slice)
            && matches!(slot.shift(IN_HOST, COMPUTING), Ok(_) | Err(COMPUTING))
        {
            return None;
        }
        Some(turns.clone().take(slot.clone(), true))
    }
}

impl Guest {
    /// What the invocation, its host calls and its ticks take and mark this guest's turn with.
    pub(crate) fn turn(&self) -> Turn {
        self.turn.clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let Turn { turns, slot } = &self.turn;
        let mut queue = turns.lock();
        queue.release(slot);
        let tenant = &slot.tenant;
        if let Some(waiters) = queue.waiters.get_mut(tenant) {
            let before = waiters.len();
            waiters.retain(|waiter| !Arc::ptr_eq(&waiter.slot, slot));
            turns.waiting.fetch_sub(before - waiters.len(), Ordering::SeqCst);
            if waiters.is_empty() {
                queue.waiters.remove(tenant);
                queue.tenants.retain(|waiting| waiting != tenant);
            }
        }
        turns.dispatch(&mut queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `wait` has ended: polled once, briefly.
    async fn ended<F: Future + Unpin>(wait: &mut F) -> bool {
        tokio::time::timeout(Duration::from_millis(20), wait)
            .await
            .is_ok()
    }

    /// Whether `wait` ends when polled once.
    async fn ends_at_once(wait: &mut TurnWait) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx).is_ready())).await
    }

    /// Waits for `guest`'s first turn.
    fn take(guest: &Guest) -> TurnWait {
        guest.turn.turns.clone().take(guest.turn.slot.clone(), false)
    }

    #[tokio::test]
    async fn tenants_waiting_take_turns_one_after_another_whatever_their_guests() {
        let turns = Turns::new(1);
        // Four guests of one tenant, then one of another.
        let guests: Vec<Guest> = (0..5)
            .map(|at| turns.guest(if at < 4 { "hog" } else { "other" }.into()))
            .collect();
        take(&guests[0]).await;
        let mut waits: Vec<Option<TurnWait>> = vec![None];
        for guest in &guests[1..] {
            let mut wait = take(guest);
            assert!(!ended(&mut wait).await, "every turn is taken");
            waits.push(Some(wait));
        }
        // Each tick, the guest computing passes its turn on: the other tenant has every other one.
        let mut holder = 0;
        let mut others_turns = Vec::new();
        for _ in 0..8 {
            let mut passing = guests[holder].turn.at_tick().expect("others wait");
            assert!(!ended(&mut passing).await, "it passed its turn on");
            waits[holder] = Some(passing);
            let mut next = None;
            for (at, wait) in waits.iter_mut().enumerate() {
                if let Some(waiting) = wait
                    && ended(waiting).await
                {
                    assert!(next.is_none(), "two guests hold the one turn");
                    next = Some(at);
                    *wait = None;
                }
            }
            holder = next.expect("the turn went on");
            others_turns.push(holder == 4);
        }
        assert_eq!(others_turns, [false, true, false, true, false, true, false, true]);
    }

    #[tokio::test]
    async fn a_turn_given_lasts_its_slice_before_it_is_passed_on() {
        let turns = Turns::new(1);
        let (first, second) = (turns.guest("a".into()), turns.guest("b".into()));
        take(&first).await;
        let mut waiting = take(&second);
        assert!(!ended(&mut waiting).await);
        tokio::time::sleep(SLICE).await;
        let mut passing = first.turn.at_tick().expect("it has had its slice");
        let given = std::time::Instant::now();
        assert!(!ends_at_once(&mut passing).await);
        assert!(ends_at_once(&mut waiting).await);
        // Given just now (say, by a guest that blocked in the host just before a tick): kept at the
        // tick, though another waits, until it has had a slice of its own. (Unless this thread was
        // held up for a slice since, as a loaded machine may.)
        let kept = second.turn.at_tick().is_none();
        assert!(kept || given.elapsed() >= SLICE, "passed on before its slice");
        tokio::time::sleep(SLICE).await;
        assert!(second.turn.at_tick().is_some());
    }

    #[tokio::test]
    async fn a_guest_blocked_in_the_host_lets_another_compute_and_takes_a_turn_back_to_go_on() {
        let turns = Turns::new(1);
        let (sleeper, worker) = (turns.guest("a".into()), turns.guest("b".into()));
        // The sleeper takes the turn, goes into the host and is blocked there until woken.
        let (wake, woken) = oneshot::channel::<()>();
        let turn = sleeper.turn();
        let mut sleeping = Box::pin(sleeper.turn().run(async move {
            turn.calling_host();
            let _ = woken.await;
            turn.returning_from_host();
        }));
        assert!(!ended(&mut sleeping).await);
        // A guest that would compute takes its turn at once...
        let (stop, stopped) = oneshot::channel::<()>();
        let mut working = Box::pin(worker.turn().run(async move {
            let _ = stopped.await;
        }));
        assert!(!ended(&mut working).await);
        assert!(
            worker.turn.slot.holds() && !sleeper.turn.slot.holds(),
            "the worker waited behind a sleeper"
        );
        // ...and the sleeper, woken, waits for one before it goes on: at the worker's next tick.
        wake.send(()).unwrap();
        assert!(!ended(&mut sleeping).await, "it went on without a turn");
        let mut passing = worker.turn.at_tick().expect("the sleeper waits");
        assert!(!ended(&mut passing).await, "the worker passed its turn on");
        assert!(ended(&mut sleeping).await, "it has a turn again");
        assert!(sleeper.turn.slot.holds());
        drop(sleeping);
        drop(sleeper);
        assert!(
            ended(&mut passing).await,
            "the turn came back when the sleeper ended"
        );
        stop.send(()).unwrap();
        assert!(ended(&mut working).await);
    }

    #[tokio::test]
    async fn a_guest_that_blocks_in_the_host_while_another_waits_lets_it_have_the_turn_at_once() {
        let turns = Turns::new(1);
        let (blocking, waiting) = (turns.guest("a".into()), turns.guest("b".into()));
        // It computes (here: waits outside any host call) until told to go into the host.
        let ((go, gone), (wake, woken)) = (oneshot::channel::<()>(), oneshot::channel::<()>());
        let turn = blocking.turn();
        let mut computing = Box::pin(blocking.turn().run(async move {
            let _ = gone.await;
            turn.calling_host();
            let _ = woken.await;
            turn.returning_from_host();
        }));
        assert!(!ended(&mut computing).await);
        let mut wait = take(&waiting);
        assert!(!ended(&mut wait).await, "the turn is in use");
        go.send(()).unwrap();
        assert!(!ended(&mut computing).await);
        assert!(
            ended(&mut wait).await,
            "the turn stayed with a guest blocked in the host"
        );
        wake.send(()).unwrap();
        assert!(!ended(&mut computing).await, "it went on without a turn");
        drop(waiting);
        assert!(ended(&mut computing).await);
    }

    #[tokio::test]
    async fn a_turn_is_kept_while_nobody_waits_and_an_ended_guest_leaves_nothing_behind() {
        let turns = Turns::new(2);
        let (first, second, third) = (
            turns.guest("a".into()),
            turns.guest("a".into()),
            turns.guest("b".into()),
        );
        take(&first).await;
        // Nobody waits: a guest computing keeps its turn at a tick, one blocked in the host keeps it.
        assert!(first.turn.at_tick().is_none());
        let (wake, woken) = oneshot::channel::<()>();
        let turn = second.turn();
        let mut sleeping = Box::pin(second.turn().run(async move {
            turn.calling_host();
            let _ = woken.await;
            turn.returning_from_host();
        }));
        assert!(!ended(&mut sleeping).await);
        assert_eq!(second.turn.slot.state.load(Ordering::SeqCst), PARKED);
        wake.send(()).unwrap();
        assert!(ended(&mut sleeping).await);
        assert_eq!(second.turn.slot.state.load(Ordering::SeqCst), COMPUTING);
        // A guest in a host call, not blocked in it, keeps its turn when another comes.
        second.turn.calling_host();
        let mut waiting = take(&third);
        assert!(!ended(&mut waiting).await);
        // An invocation that ends (its guest dropped) frees its turn for whoever waits...
        drop(first);
        assert!(ended(&mut waiting).await);
        // ...and one that ends while it waits leaves no place in the queue behind.
        let fourth = turns.guest("c".into());
        let mut given_up = take(&fourth);
        assert!(!ended(&mut given_up).await);
        drop(given_up);
        drop(fourth);
        assert_eq!(turns.waiting.load(Ordering::SeqCst), 0);
        drop((second, third));
        let queue = turns.lock();
        assert_eq!((queue.free, queue.holders.len(), queue.tenants.len()), (2, 0, 0));
    }
}
