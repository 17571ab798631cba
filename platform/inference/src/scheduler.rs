//! Each model's queue, shared fairly between tenants: start-time fair queuing. A call is tagged on
//! arrival with a virtual start time, `max(now, when its tenant's previous call finishes)`, and the
//! tenant's finish time moves on by the call's items divided by the tenant's weight; workers take calls
//! in tag order. A tenant that floods a model only pushes its own calls back: another tenant's call is
//! tagged at the present and overtakes the backlog, and under contention each tenant is served items in
//! proportion to its weight. Batches still form from whatever is at the front, across tenants.
//!
//! A light tenant's run carries a few items of heavy tenants beside its own: one, or on a platform model
//! as many as keep it within half as long again as its call alone, timed when the model loads (see
//! `Worker::time_guests`). Where texts are nearly free beside a run (a GPU), that is many; where each
//! costs about as much as a run of one (a small CPU), one. Every text of a run is padded to its
//! longest, so a call of another tenant longer (in tokens) than the texts of the tenant a run is for is
//! sent back to lead a run of its own (see `batcher`), rather than make each of that tenant's texts as
//! costly as its own.
//!
//! Each tenant may queue only so many calls (`429` beyond), so a flood is refused before the shared
//! queue fills and answers everyone `503`. And a tenant's calls may occupy all but one of the model's
//! sessions at once: however hard one tenant pushes, another tenant's call finds a session free
//! instead of waiting behind a run of the flood (with a session per core plus one, a lone tenant
//! still uses every core).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

use crate::InferenceError;
use crate::batcher::Work;

/// Who a call is for, and the share of a contended model their plan gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tenant: Arc<str>,
    /// Relative to other tenants' weights (the plan's `scheduling_weight`).
    pub weight: u32,
    /// The tenant's plan, the only tenant-related label on metrics (a bounded set).
    pub plan: Arc<str>,
}

impl Share {
    /// Calls the platform makes for itself (warm-up, benchmarks): weight 1.
    #[must_use]
    pub fn platform() -> Self {
        Self {
            tenant: Arc::from("platform"),
            weight: 1,
            plan: Arc::from("platform"),
        }
    }
}

/// In what order a model's queued calls are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// Fair share between tenants by weight (start-time fair queuing).
    #[default]
    Fair,
    /// First come, first served, whoever sent them (for comparison; one tenant can delay all).
    Fifo,
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fair" => Ok(Self::Fair),
            "fifo" => Ok(Self::Fifo),
            other => Err(format!("unknown scheduling `{other}` (expected fair or fifo)")),
        }
    }
}

/// How much longer than a run of its call alone a light tenant's run may take for the items of heavy
/// tenants it carries.
pub(crate) const GUEST_SLACK: f64 = 0.5;

/// Items of heavy tenants a light tenant's run may carry: the most, doubling from one up to `most`,
/// for which `within(guests)` finds a light run carrying that many within `1 + GUEST_SLACK` times its
/// call alone; at least one (a session does not idle on single items), as when nothing was timed.
pub(crate) fn most_guests<E>(
    most: usize,
    mut within: impl FnMut(usize) -> Result<bool, E>,
) -> Result<usize, E> {
    let mut guests = 1;
    while guests * 2 <= most && within(guests * 2)? {
        guests *= 2;
    }
    Ok(guests)
}

/// Fixed-point scale of virtual time: one item at weight 1.
const ITEM: u128 = 1 << 20;

/// A queued call with its tag.
pub(crate) struct Queued {
    start: u128,
    /// Arrival order: breaks ties, so equal tags are served first come, first served.
    sequence: u64,
    pub(crate) work: Work,
    pub(crate) share: Share,
    pub(crate) items: usize,
    /// Sent back from another tenant's run for texts longer than that tenant's (see
    /// [`FairQueue::send_back`]): its longest text in tokens. It leads a run, or joins another tenant's
    /// only behind a call sent back with texts at least as long.
    sent_back: Option<usize>,
    pub(crate) queued_at: Instant,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.start, self.sequence) == (other.start, other.sequence)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.start, self.sequence).cmp(&(other.start, other.sequence))
    }
}

#[derive(Debug, Default)]
struct Tenant {
    /// Virtual time at which the tenant's last queued call finishes.
    finish: u128,
    queued: usize,
}

#[derive(Default)]
struct Inner {
    calls: BinaryHeap<Reverse<Queued>>,
    /// Tenants with calls queued; one that has none left is forgotten (it rejoins at the present).
    tenants: HashMap<Arc<str>, Tenant>,
    /// Runs in progress that hold calls of each tenant.
    running: HashMap<Arc<str>, usize>,
    /// The start tag of the call served last.
    now: u128,
    /// Items of heavy tenants a light tenant's run may carry (see [`most_guests`]); at least one.
    guests: usize,
    sequence: u64,
    closed: bool,
}

/// A call of `tenant` has left the queue.
fn release_queued(inner: &mut Inner, tenant: &Arc<str>) {
    if let Some(queued) = inner.tenants.get_mut(tenant) {
        queued.queued -= 1;
        if queued.queued == 0 {
            inner.tenants.remove(tenant);
        }
    }
}

/// What a run holds for each of its tenants, given back when it ends: given back in two parts by a
/// run whose results are ready before its worker has the session back (see `batcher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Both parts.
    Both,
    /// The run no longer counts among the tenant's runs on every model (`runs_in_background`), so the
    /// tenant's next call is judged by what it has in hand now.
    Activity,
    /// The session: one of the runs the tenant may hold on this model at once.
    Session,
}

/// Runs each tenant holds on every model of the engine together: a tenant's run is its only one if it
/// runs nothing else anywhere (see `runs_in_background`).
#[derive(Debug, Default)]
pub(crate) struct TenantRuns(Mutex<HashMap<Arc<str>, usize>>);

impl TenantRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn started(&self, tenant: &Arc<str>) {
        *self.lock().entry(tenant.clone()).or_default() += 1;
    }

    fn ended(&self, tenant: &Arc<str>) {
        let mut runs = self.lock();
        if let Some(count) = runs.get_mut(tenant) {
            *count -= 1;
            if *count == 0 {
                runs.remove(tenant);
            }
        }
    }

    fn count(&self, tenant: &Arc<str>) -> usize {
        self.lock().get(tenant).copied().unwrap_or(0)
    }
}

/// One model's queue.
pub(crate) struct FairQueue {
    inner: Mutex<Inner>,
    /// Shared by the engine's models.
    all_runs: Arc<TenantRuns>,
    ready: Notify,
    capacity: usize,
    tenant_capacity: usize,
    /// Runs one tenant's calls may be part of at once.
    tenant_runs: usize,
    scheduling: Scheduling,
}

impl std::fmt::Debug for FairQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue")
            .field("capacity", &self.capacity)
            .field("tenant_capacity", &self.tenant_capacity)
            .finish_non_exhaustive()
    }
}

impl FairQueue {
    /// A queue for a model with `sessions` workers.
    pub(crate) fn new(
        capacity: usize,
        tenant_capacity: usize,
        sessions: usize,
        scheduling: Scheduling,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                guests: 1,
                ..Inner::default()
            }),
            all_runs: Arc::default(),
            ready: Notify::new(),
            capacity: capacity.max(1),
            tenant_capacity: tenant_capacity.clamp(1, capacity.max(1)),
            tenant_runs: match scheduling {
                Scheduling::Fair => sessions.saturating_sub(1).max(1),
                Scheduling::Fifo => usize::MAX,
            },
            scheduling,
        }
    }

    /// Counts runs together with other models' queues.
    pub(crate) fn sharing_runs(mut self, all_runs: Arc<TenantRuns>) -> Self {
        self.all_runs = all_runs;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a call of `items` for `share`.
    ///
    /// # Errors
    /// [`InferenceError::TenantQueueFull`] when the tenant has its most calls queued,
    /// [`InferenceError::Overloaded`] when the whole queue is full, `Runtime` once the model is unloaded.
    pub(crate) fn push(&self, work: Work, share: Share, items: usize) -> Result<(), InferenceError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(InferenceError::Runtime("the model was unloaded".into()));
        }
        let queued = inner.tenants.get(&share.tenant).map_or(0, |t| t.queued);
        if queued >= self.tenant_capacity {
            return Err(InferenceError::TenantQueueFull(self.tenant_capacity));
        }
        if inner.calls.len() >= self.capacity {
            return Err(InferenceError::Overloaded);
        }
        let now = inner.now;
        inner.sequence += 1;
        let sequence = inner.sequence;
        let fifo = self.scheduling == Scheduling::Fifo;
        let tenant = inner.tenants.entry(share.tenant.clone()).or_default();
        let start = if fifo { 0 } else { tenant.finish.max(now) };
        let cost = ITEM * items.max(1) as u128 / u128::from(share.weight.max(1));
        tenant.finish = start + cost.max(1);
        tenant.queued += 1;
        inner.calls.push(Reverse(Queued {
            start,
            sequence,
            sent_back: None,
            work,
            share,
            items,
            queued_at: Instant::now(),
        }));
        drop(inner);
        self.ready.notify_one();
        Ok(())
    }

    /// Takes the front call, and more while `fits` accepts them (the batch so far and the next),
    /// passing over the calls of tenants whose calls already run in as many runs as they may.
    fn take(&self, inner: &mut Inner, batch: &mut Vec<Queued>, fits: &dyn Fn(&[Queued], &Queued) -> bool) {
        let had = batch.len();
        let mut passed_over = Vec::new();
        // Items of others already in the run (an earlier pass, while it lingered) count as guests.
        let mut guests: usize = batch
            .iter()
            .skip(1)
            .filter(|call| call.share.tenant != batch[0].share.tenant)
            .map(|call| call.items)
            .sum();
        // Whether the tenant leading the batch has more than one run's worth in hand.
        let mut leader_heavy = batch.first().is_some_and(|call| {
            self.all_runs.count(&call.share.tenant) > 1 || inner.tenants.contains_key(&call.share.tenant)
        });
        while let Some(Reverse(call)) = inner.calls.pop() {
            let tenant = &call.share.tenant;
            if call.work.abandoned() {
                // Its caller is gone: it neither runs nor holds a run slot.
                metrics::counter!("plinth_inference_abandoned_total").increment(1);
                release_queued(inner, tenant);
                continue;
            }
            let runs = inner.running.get(tenant).copied().unwrap_or(0);
            if batch.is_empty() {
                if runs >= self.tenant_runs {
                    passed_over.push(Reverse(call));
                    continue;
                }
                leader_heavy = self.heavy(inner, tenant);
            } else if let Some(tokens) = call.sent_back
                && batch[0].share.tenant != *tenant
                && batch[0].sent_back.is_none_or(|leading| leading < tokens)
            {
                passed_over.push(Reverse(call));
                continue;
            } else if self.scheduling == Scheduling::Fair && batch[0].share.tenant != *tenant {
                // Another tenant leads this run. A tenant with only this call in hand never waits
                // inside a heavy tenant's run (which goes at low priority): it leads a run of its
                // own. A heavy one (other calls queued, or runs of its own) fills only a few places
                // in a light tenant's run, which stays short for the tenant it is for, or in anyone's
                // once it holds its most runs; the session does not idle on single items either way.
                let guest_heavy = self.heavy(inner, tenant);
                if leader_heavy && !guest_heavy {
                    passed_over.push(Reverse(call));
                    continue;
                }
                if (guest_heavy && !leader_heavy) || runs >= self.tenant_runs {
                    if guests + call.items > inner.guests {
                        passed_over.push(Reverse(call));
                        continue;
                    }
                    guests += call.items;
                }
            }
            if !batch.is_empty() && !fits(batch, &call) {
                passed_over.push(Reverse(call));
                break;
            }
            inner.now = inner.now.max(call.start);
            release_queued(inner, tenant);
            batch.push(call);
        }
        inner.calls.extend(passed_over);
        // The tenants newly in the batch now hold a run.
        let mut newly: Vec<&Arc<str>> = batch[had..]
            .iter()
            .map(|c| &c.share.tenant)
            .filter(|t| !batch[..had].iter().any(|c| &&c.share.tenant == t))
            .collect();
        newly.sort();
        newly.dedup();
        for tenant in newly {
            *inner.running.entry(tenant.clone()).or_default() += 1;
            self.all_runs.started(tenant);
        }
    }

    /// Whether `tenant`, about to have a call taken, has more than that call in hand: other calls
    /// queued, or runs on any model.
    fn heavy(&self, inner: &Inner, tenant: &Arc<str>) -> bool {
        inner.tenants.get(tenant).is_some_and(|t| t.queued > 1) || self.all_runs.count(tenant) > 0
    }

    /// Whether a run that `tenant`'s call leads goes at a lower priority (see `batcher`): the tenant
    /// holds other runs besides this one, on this model or any other, or has more calls queued behind
    /// it. A tenant whose calls fit in one run at a time keeps normal priority; one sending more than
    /// that still gets every core nobody else wants, but where another tenant's run wants the same
    /// core, that run gets nine tenths of it (see `batcher::BACKGROUND_NICENESS`). First come, first
    /// served does not tell tenants apart: every run keeps normal priority.
    pub(crate) fn runs_in_background(&self, tenant: &Arc<str>) -> bool {
        self.is_fair() && (self.all_runs.count(tenant) > 1 || self.lock().tenants.contains_key(tenant))
    }

    /// A run of `batch` has ended: its tenants may start other runs.
    #[cfg(test)]
    pub(crate) fn finished(&self, batch: &[Arc<str>]) {
        self.given_back(batch, Release::Both);
    }

    /// Gives back what a run of `batch` held for its tenants (see [`Release`]).
    pub(crate) fn given_back(&self, batch: &[Arc<str>], release: Release) {
        if batch.is_empty() {
            return;
        }
        let mut tenants: Vec<&Arc<str>> = batch.iter().collect();
        tenants.sort();
        tenants.dedup();
        let mut inner = self.lock();
        for tenant in tenants {
            // A run's two parts may come back in either order (a worker's task that is stopped drops
            // the session it kept while the run's thread still holds the rest).
            let holds_session = inner.running.contains_key(tenant);
            if release == Release::Activity || (release == Release::Both && holds_session) {
                self.all_runs.ended(tenant);
            }
            if release != Release::Activity
                && let Some(runs) = inner.running.get_mut(tenant)
            {
                *runs -= 1;
                if *runs == 0 {
                    inner.running.remove(tenant);
                }
            }
        }
        let waiting = release != Release::Activity && !inner.calls.is_empty();
        drop(inner);
        if waiting {
            self.ready.notify_one();
        }
    }

    /// The next batch: the front call and those after it that `fits` accepts, waiting up to
    /// `linger` for more to arrive when the batch could grow. `None` once closed and empty.
    pub(crate) async fn next_batch(
        &self,
        linger: std::time::Duration,
        fits: &(dyn Fn(&[Queued], &Queued) -> bool + Sync),
    ) -> Option<Vec<Queued>> {
        let mut batch = Vec::new();
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                self.take(&mut inner, &mut batch, fits);
                if !batch.is_empty() {
                    // More work is waiting: let another worker take it.
                    if !inner.calls.is_empty() {
                        self.ready.notify_one();
                    }
                    break;
                }
                if inner.closed {
                    return None;
                }
            }
            notified.await;
        }
        if linger.is_zero() {
            return Some(batch);
        }
        let deadline = tokio::time::Instant::now() + linger;
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let before = batch.len();
            {
                let mut inner = self.lock();
                self.take(&mut inner, &mut batch, fits);
                let full = inner
                    .calls
                    .peek()
                    .is_some_and(|Reverse(next)| !fits(&batch, next));
                if full || inner.closed {
                    break;
                }
            }
            if batch.len() == before && tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        Some(batch)
    }

    /// Puts a call taken into another tenant's run back in its place (its tag unchanged), to lead a run
    /// of its own (or join one led by a call sent back with texts as long): its texts, the longest of
    /// `tokens` tokens, were longer than those of the tenant the run is for, and every text of a run is
    /// padded to the longest.
    pub(crate) fn send_back(&self, mut call: Queued, tokens: usize) {
        metrics::counter!("plinth_inference_sent_back_total").increment(1);
        call.sent_back = Some(tokens);
        let mut inner = self.lock();
        let tenant = inner.tenants.entry(call.share.tenant.clone()).or_default();
        let cost = ITEM * call.items.max(1) as u128 / u128::from(call.share.weight.max(1));
        tenant.finish = tenant.finish.max(call.start + cost.max(1));
        tenant.queued += 1;
        inner.calls.push(Reverse(call));
        drop(inner);
        self.ready.notify_one();
    }

    /// Lets a light tenant's run carry `guests` items of heavy tenants (one until set, and at least one).
    pub(crate) fn set_guest_items(&self, guests: usize) {
        self.lock().guests = guests.max(1);
    }

    /// Refuses new calls; the workers finish what is queued and stop.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
    }

    /// Whether tenants share the model by weight (rather than first come, first served).
    pub(crate) fn is_fair(&self) -> bool {
        self.scheduling == Scheduling::Fair
    }

    /// Whether the model was unloaded.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().calls.len()
    }

    /// Runs that hold calls of `tenant` now: sessions of this model, and runs on every model as
    /// `runs_in_background` counts them.
    #[cfg(test)]
    pub(crate) fn runs_of(&self, tenant: &str) -> (usize, usize) {
        let sessions = self.lock().running.get(tenant).copied().unwrap_or(0);
        (sessions, self.all_runs.count(&Arc::from(tenant)))
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn share(tenant: &str, weight: u32) -> Share {
        Share {
            tenant: Arc::from(tenant),
            weight,
            plan: Arc::from("test"),
        }
    }

    /// A call whose caller waits (for ever: the test never answers it).
    fn call(texts: usize) -> Work {
        let (reply, waiting) = oneshot::channel();
        std::mem::forget(waiting);
        Work::Text {
            texts: vec![String::new(); texts],
            reply,
        }
    }

    /// A call whose caller has already gone.
    fn abandoned_call() -> Work {
        let (reply, _) = oneshot::channel();
        Work::Text {
            texts: vec![String::new()],
            reply,
        }
    }

    #[tokio::test]
    async fn a_tenant_sending_more_than_one_run_at_a_time_runs_in_the_background() {
        let all_runs = Arc::new(TenantRuns::default());
        let first = FairQueue::new(100, 100, 3, Scheduling::Fair).sharing_runs(all_runs.clone());
        let second = FairQueue::new(100, 100, 3, Scheduling::Fair).sharing_runs(all_runs);
        let tenant: Arc<str> = Arc::from("busy");
        first.push(call(1), share("busy", 1), 1).unwrap();
        second.push(call(1), share("busy", 1), 1).unwrap();
        second.push(call(1), share("other", 1), 1).unwrap();
        let no_wait = std::time::Duration::ZERO;
        first.next_batch(no_wait, &one_at_a_time).await.unwrap();
        assert!(
            !first.runs_in_background(&tenant),
            "its only run, nothing queued behind it"
        );
        second.next_batch(no_wait, &one_at_a_time).await.unwrap();
        assert!(
            second.runs_in_background(&tenant),
            "a second run, on another model"
        );
        let other = second.next_batch(no_wait, &one_at_a_time).await.unwrap();
        assert!(!second.runs_in_background(&other[0].share.tenant));
        first.finished(std::slice::from_ref(&tenant));
        assert!(!second.runs_in_background(&tenant), "its other run ended");
        // Calls queued behind its run: more than one run's worth.
        second.push(call(1), share("busy", 1), 1).unwrap();
        assert!(second.runs_in_background(&tenant), "a call queued behind its run");
    }

    #[tokio::test]
    async fn a_runs_two_parts_come_back_in_either_order() {
        let tenant: Arc<str> = Arc::from("busy");
        for order in [
            [Release::Activity, Release::Session],
            [Release::Session, Release::Activity],
        ] {
            let queue = FairQueue::new(100, 100, 3, Scheduling::Fair);
            queue.push(call(1), share("busy", 1), 1).unwrap();
            queue
                .next_batch(std::time::Duration::ZERO, &one_at_a_time)
                .await
                .unwrap();
            assert_eq!(queue.runs_of("busy"), (1, 1));
            for release in order {
                queue.given_back(std::slice::from_ref(&tenant), release);
            }
            assert_eq!(queue.runs_of("busy"), (0, 0), "{order:?}");
        }
    }

    #[tokio::test]
    async fn a_light_tenants_call_leads_its_own_run_and_a_heavy_tenant_only_visits_it() {
        let queue = FairQueue::new(1_000, 1_000, 3, Scheduling::Fair);
        let eight = |batch: &[Queued], _: &Queued| batch.len() < 8;
        for _ in 0..40 {
            queue.push(call(1), share("heavy", 1), 1).unwrap();
        }
        queue.push(call(1), share("light", 1), 1).unwrap();
        let no_wait = std::time::Duration::ZERO;
        let tenants = |batch: Vec<Queued>| {
            batch
                .iter()
                .map(|c| c.share.tenant.to_string())
                .collect::<Vec<_>>()
        };
        // The heavy tenant's run (at low priority) does not take the light call along.
        let first = tenants(queue.next_batch(no_wait, &eight).await.unwrap());
        assert_eq!(first, vec!["heavy"; 8]);
        assert!(queue.runs_in_background(&Arc::from("heavy")));
        // The light call leads the next run, with one heavy item beside it.
        let second = tenants(queue.next_batch(no_wait, &eight).await.unwrap());
        assert_eq!(second, ["light", "heavy"]);
        assert!(!queue.runs_in_background(&Arc::from("light")));
    }

    #[test]
    fn a_light_run_carries_as_many_guests_as_stay_within_the_slack() {
        let never: Result<usize, ()> = most_guests(31, |_| Ok(false));
        assert_eq!(never, Ok(1), "a small CPU: one, as before any timing");
        let mut asked = Vec::new();
        let twenty: Result<usize, ()> = most_guests(31, |guests| {
            asked.push(guests);
            Ok(guests <= 20)
        });
        assert_eq!(twenty, Ok(16));
        assert_eq!(asked, [2, 4, 8, 16], "doubling, never past a batch of 32");
        let five: Result<usize, ()> = most_guests(31, |guests| Ok(guests <= 5));
        assert_eq!(five, Ok(4));
        let always: Result<usize, ()> = most_guests(7, |_| Ok(true));
        assert_eq!(always, Ok(4), "never past a batch");
        assert_eq!(most_guests::<()>(1, |_| Ok(true)), Ok(1));
        assert_eq!(most_guests(31, |_| Err("timing failed")), Err("timing failed"));
    }

    #[tokio::test]
    async fn a_light_run_takes_no_more_of_the_heavy_backlog_than_its_guests() {
        let eight = |batch: &[Queued], _: &Queued| batch.len() < 8;
        let no_wait = std::time::Duration::ZERO;
        for (guests, expected) in [(0, 2), (1, 2), (3, 4)] {
            let queue = FairQueue::new(1_000, 1_000, 3, Scheduling::Fair);
            queue.set_guest_items(guests);
            for _ in 0..40 {
                queue.push(call(1), share("heavy", 1), 1).unwrap();
            }
            queue.next_batch(no_wait, &eight).await.unwrap();
            queue.push(call(1), share("light", 1), 1).unwrap();
            let light = queue.next_batch(no_wait, &eight).await.unwrap();
            assert_eq!(light[0].share.tenant.as_ref(), "light");
            assert_eq!(light.len(), expected, "{guests} guests");
        }
        // Lingering for company takes again: the guests already in the run count.
        let queue = FairQueue::new(1_000, 1_000, 3, Scheduling::Fair);
        queue.set_guest_items(3);
        for _ in 0..40 {
            queue.push(call(1), share("heavy", 1), 1).unwrap();
        }
        queue.next_batch(no_wait, &eight).await.unwrap();
        queue.push(call(1), share("light", 1), 1).unwrap();
        let light = queue
            .next_batch(std::time::Duration::from_millis(20), &eight)
            .await
            .unwrap();
        assert_eq!(light.len(), 4);
    }

    #[tokio::test]
    async fn a_call_sent_back_keeps_its_place_and_leads_a_run_of_its_own() {
        let all = |_: &[Queued], _: &Queued| true;
        let no_wait = std::time::Duration::ZERO;
        let queue = FairQueue::new(1_000, 1_000, 3, Scheduling::Fair);
        queue.push(call(1), share("light", 1), 1).unwrap();
        queue.push(call(1), share("long", 1), 1).unwrap();
        let mut run = queue.next_batch(no_wait, &all).await.unwrap();
        assert_eq!(run.len(), 2, "two light tenants share a run");
        // The worker found the second call's texts longer than the first's.
        queue.send_back(run.pop().unwrap(), 100);
        queue.push(call(1), share("other", 1), 1).unwrap();
        queue.push(call(1), share("long", 1), 1).unwrap();
        // It is served next, ahead of later calls, leading; no later call of its tenant overtakes it.
        let next = queue.next_batch(no_wait, &all).await.unwrap();
        let tenants: Vec<&str> = next.iter().map(|c| c.share.tenant.as_ref()).collect();
        assert_eq!(tenants[0], "long");
        // While its tenant holds its most runs, a run led by someone else passes over it, however
        // long that run waits for company (and would otherwise take it as a guest).
        let queue = FairQueue::new(1_000, 1_000, 2, Scheduling::Fair);
        queue.push(call(1), share("long", 1), 1).unwrap();
        let taken = queue.next_batch(no_wait, &all).await.unwrap();
        queue.send_back(taken.into_iter().next().unwrap(), 100);
        queue.push(call(1), share("light", 1), 1).unwrap();
        let light = queue
            .next_batch(std::time::Duration::from_millis(20), &all)
            .await
            .unwrap();
        assert_eq!(
            light.len(),
            1,
            "the call sent back does not join a light tenant's run"
        );
        assert_eq!(light[0].share.tenant.as_ref(), "light");
        queue.finished(&[Arc::from("long")]);
        let long = queue.next_batch(no_wait, &all).await.unwrap();
        assert_eq!(long[0].share.tenant.as_ref(), "long");
        // Calls sent back still share runs: behind one sent back with texts at least as long.
        let queue = FairQueue::new(1_000, 1_000, 3, Scheduling::Fair);
        for tenant in ["a", "b", "c"] {
            queue.push(call(1), share(tenant, 1), 1).unwrap();
        }
        let mut sent = queue.next_batch(no_wait, &all).await.unwrap().into_iter();
        let (a, b, c) = (sent.next().unwrap(), sent.next().unwrap(), sent.next().unwrap());
        queue.send_back(a, 60);
        queue.send_back(b, 100);
        queue.send_back(c, 40);
        let run = queue.next_batch(no_wait, &all).await.unwrap();
        let tenants: Vec<&str> = run.iter().map(|c| c.share.tenant.as_ref()).collect();
        assert_eq!(tenants, ["a", "c"], "b's texts are longer than a's");
        assert_eq!(
            queue.next_batch(no_wait, &all).await.unwrap()[0]
                .share
                .tenant
                .as_ref(),
            "b"
        );
        assert_eq!(queue.len(), 0);
    }

    #[tokio::test]
    async fn abandoned_calls_neither_run_nor_keep_their_place_or_a_run_slot() {
        let queue = FairQueue::new(1_000, 2, 3, Scheduling::Fair);
        queue.push(abandoned_call(), share("gone", 1), 1).unwrap();
        queue.push(abandoned_call(), share("gone", 1), 1).unwrap();
        queue.push(call(1), share("live", 1), 1).unwrap();
        let batch = queue
            .next_batch(std::time::Duration::ZERO, &one_at_a_time)
            .await
            .unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].share.tenant.as_ref(), "live");
        // The departed tenant's place in the queue and its run slots are free again.
        queue.push(call(1), share("gone", 1), 1).unwrap();
        queue.push(call(1), share("gone", 1), 1).unwrap();
        for _ in 0..2 {
            let batch = queue
                .next_batch(std::time::Duration::ZERO, &one_at_a_time)
                .await
                .unwrap();
            assert_eq!(batch[0].share.tenant.as_ref(), "gone");
        }
    }

    fn one_at_a_time(_: &[Queued], _: &Queued) -> bool {
        false
    }

    async fn order(queue: &FairQueue, n: usize) -> Vec<String> {
        let mut served = Vec::new();
        for _ in 0..n {
            let batch = queue
                .next_batch(std::time::Duration::ZERO, &one_at_a_time)
                .await
                .expect("batch");
            served.extend(batch.iter().map(|c| c.share.tenant.to_string()));
            queue.finished(&batch.iter().map(|c| c.share.tenant.clone()).collect::<Vec<_>>());
        }
        served
    }

    #[tokio::test]
    async fn a_flooding_tenant_leaves_a_session_for_everyone_else() {
        let queue = FairQueue::new(1_000, 100, 3, Scheduling::Fair);
        for _ in 0..10 {
            queue.push(call(1), share("flood", 1), 1).unwrap();
        }
        let take = || queue.next_batch(std::time::Duration::ZERO, &one_at_a_time);
        // Two of the three sessions run the flood...
        let first = take().await.unwrap();
        let second = take().await.unwrap();
        assert_eq!(first[0].share.tenant.as_ref(), "flood");
        assert_eq!(second[0].share.tenant.as_ref(), "flood");
        // ...and the third does not take a third run of it: it waits for someone else.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), take())
                .await
                .is_err()
        );
        queue.push(call(1), share("quiet", 1), 1).unwrap();
        let third = take().await.unwrap();
        assert_eq!(third[0].share.tenant.as_ref(), "quiet");
        // When one of the flood's runs ends, the flood goes on.
        queue.finished(&[first[0].share.tenant.clone()]);
        assert_eq!(take().await.unwrap()[0].share.tenant.as_ref(), "flood");
    }

    #[tokio::test]
    async fn a_flood_does_not_delay_a_newcomer() {
        let queue = FairQueue::new(1_000, 100, 2, Scheduling::Fair);
        for _ in 0..50 {
            queue.push(call(1), share("flood", 1), 1).unwrap();
        }
        queue.push(call(1), share("quiet", 1), 1).unwrap();
        // The quiet tenant's call is tagged at the present: it goes second, not 51st.
        let served = order(&queue, 3).await;
        assert_eq!(served, ["flood", "quiet", "flood"]);
    }

    #[tokio::test]
    async fn fifo_serves_in_arrival_order() {
        let queue = FairQueue::new(1_000, 100, 2, Scheduling::Fifo);
        for _ in 0..3 {
            queue.push(call(1), share("flood", 1), 1).unwrap();
        }
        queue.push(call(1), share("quiet", 1), 1).unwrap();
        assert!(
            !queue.runs_in_background(&Arc::from("flood")),
            "every run at normal priority, whoever sent more"
        );
        assert_eq!(order(&queue, 4).await, ["flood", "flood", "flood", "quiet"]);
    }

    #[tokio::test]
    async fn contended_tenants_are_served_in_proportion_to_their_weights() {
        let queue = FairQueue::new(1_000, 500, 2, Scheduling::Fair);
        for _ in 0..200 {
            queue.push(call(1), share("pro", 4), 1).unwrap();
            queue.push(call(1), share("free", 1), 1).unwrap();
        }
        let served = order(&queue, 100).await;
        let pro = served.iter().filter(|t| *t == "pro").count();
        assert!((78..=82).contains(&pro), "pro got {pro} of 100");
        // Items count, not calls: a call of 8 texts costs eight of one.
        let queue = FairQueue::new(1_000, 500, 2, Scheduling::Fair);
        for _ in 0..100 {
            queue.push(call(8), share("big", 1), 8).unwrap();
            queue.push(call(1), share("small", 1), 1).unwrap();
        }
        let served = order(&queue, 45).await;
        let big = served.iter().filter(|t| *t == "big").count();
        assert!((4..=6).contains(&big), "big got {big} of 45 calls");
    }

    #[tokio::test]
    async fn a_tenant_is_refused_at_its_bound_before_the_queue_fills() {
        let queue = FairQueue::new(10, 4, 2, Scheduling::Fair);
        for _ in 0..4 {
            queue.push(call(1), share("flood", 1), 1).unwrap();
        }
        assert!(matches!(
            queue.push(call(1), share("flood", 1), 1),
            Err(InferenceError::TenantQueueFull(4))
        ));
        for tenant in ["a", "b", "c", "d", "e", "f"] {
            queue.push(call(1), share(tenant, 1), 1).unwrap();
        }
        assert!(matches!(
            queue.push(call(1), share("g", 1), 1),
            Err(InferenceError::Overloaded)
        ));
        assert_eq!(queue.len(), 10);
        // Served calls give the tenant its room back.
        order(&queue, 1).await;
        queue.push(call(1), share("flood", 1), 1).unwrap();
    }

    #[tokio::test]
    async fn batches_mix_tenants_and_closing_drains_then_stops() {
        let queue = FairQueue::new(100, 100, 2, Scheduling::Fair);
        for tenant in ["a", "b", "c"] {
            queue.push(call(2), share(tenant, 1), 2).unwrap();
        }
        let fits =
            |batch: &[Queued], next: &Queued| batch.iter().map(|c| c.items).sum::<usize>() + next.items <= 4;
        let batch = queue.next_batch(std::time::Duration::ZERO, &fits).await.unwrap();
        let tenants: Vec<_> = batch.iter().map(|c| c.share.tenant.to_string()).collect();
        assert_eq!(tenants, ["a", "b"]);
        queue.finished(&batch.iter().map(|c| c.share.tenant.clone()).collect::<Vec<_>>());
        queue.close();
        assert!(queue.push(call(1), share("a", 1), 1).is_err());
        assert_eq!(
            queue
                .next_batch(std::time::Duration::ZERO, &fits)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(queue.next_batch(std::time::Duration::ZERO, &fits).await.is_none());
    }
}
