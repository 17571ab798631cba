//! Password hashing on threads of its own. Each argon2 hash or check takes tens of milliseconds and
//! 19 MiB; run on the shared blocking pool, a flood of logins would take the cores inference runs on.
//! Here at most half the cores hash at once, at most [`MAX_WAITING`] requests wait, and the rest are
//! refused at once (`503`, retry shortly) instead of queueing without bound.
//!
//! Two lanes share the threads. Logins from a network the account has logged in from before
//! ([`Lane::Known`]) go first, but for every [`OPEN_EVERY`]th check when both lanes wait, and may take
//! every waiting place; everything else (sign-ups, logins from new networks or for unknown emails) may
//! take only [`OPEN_WAITING`] of them. A flood of new attempts then delays and refuses other new
//! attempts, not returning users' checks; a flood of logins to an attacker's own accounts from
//! networks it made known meets the store's limit on those (`accounts::RETURNING_KEY`). A check whose
//! caller has gone is skipped.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

use tokio::sync::oneshot;

use crate::{Result, StoreError};

/// Requests that may wait for a hashing thread.
const MAX_WAITING: usize = 64;
/// Of those, requests in the open lane.
const OPEN_WAITING: usize = 48;
/// While both lanes wait, one check in this many is the open lane's, so it is never starved.
const OPEN_EVERY: u32 = 4;

/// Which queue a password check waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// A login from a network the account used before: served first.
    Known,
    /// Anything else.
    Open,
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queues {
    known: VecDeque<Job>,
    open: VecDeque<Job>,
    /// Known checks served in a row while open ones waited.
    known_in_a_row: u32,
}

impl Queues {
    fn next(&mut self) -> Option<Job> {
        let known_turn = self.open.is_empty() || self.known_in_a_row + 1 < OPEN_EVERY;
        if known_turn && let Some(job) = self.known.pop_front() {
            self.known_in_a_row += u32::from(!self.open.is_empty());
            return Some(job);
        }
        self.known_in_a_row = 0;
        self.open.pop_front()
    }
}

struct Pool {
    queues: Mutex<Queues>,
    ready: Condvar,
}

impl Pool {
    /// A pool with `threads` hashing threads (each holds the pool: it lives as long as the process).
    fn start(threads: usize) -> Arc<Self> {
        let pool = Arc::new(Self {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        for index in 0..threads {
            let serving = pool.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("plinth-passwords-{index}"))
                .spawn(move || serving.serve());
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a password-hashing thread");
            }
        }
        pool
    }

    fn serve(&self) {
        loop {
            let job = {
                let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(job) = queues.next() {
                        break job;
                    }
                    queues = self.ready.wait(queues).unwrap_or_else(PoisonError::into_inner);
                }
            };
            job();
        }
    }

    /// Queues `job` in `lane`, or gives it back when that lane has no waiting place left.
    fn submit(&self, lane: Lane, job: Job) -> std::result::Result<(), Job> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = queues.known.len() + queues.open.len();
        let full = waiting >= MAX_WAITING || (lane == Lane::Open && queues.open.len() >= OPEN_WAITING);
        if full {
            return Err(job);
        }
        match lane {
            Lane::Known => queues.known.push_back(job),
            Lane::Open => queues.open.push_back(job),
        }
        drop(queues);
        self.ready.notify_one();
        Ok(())
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        Pool::start(threads)
    })
}

/// Runs `work` on a hashing thread, or refuses when `lane` has too many waiting.
pub(crate) async fn run<T: Send + 'static>(
    lane: Lane,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    run_on(pool(), lane, work).await
}

async fn run_on<T: Send + 'static>(
    pool: &Pool,
    lane: Lane,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (reply, answer) = oneshot::channel();
    let job: Job = Box::new(move || {
        // The caller stopped waiting (a client that hung up): nobody wants the answer.
        if !reply.is_closed() {
            let _ = reply.send(work());
        }
    });
    if pool.submit(lane, job).is_err() {
        let lane = match lane {
            Lane::Known => "known",
            Lane::Open => "open",
        };
        metrics::counter!("plinth_password_checks_refused_total", "lane" => lane).increment(1);
        return Err(StoreError::Unavailable(
            "too many password checks are in progress; retry shortly".into(),
        ));
    }
    answer
        .await
        .map_err(|_| StoreError::Internal("a password-hashing job was dropped".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood in the open lane is refused past its places, while returning users' checks are taken
    /// and served before the flood's, but for one in [`OPEN_EVERY`] (the open lane is never starved).
    #[tokio::test]
    async fn a_flood_of_new_attempts_leaves_room_for_returning_users_and_lets_them_first() {
        let pool = Pool::start(1);
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, busy_now) = std::sync::mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        // The only thread is busy until released.
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move {
                run_on(&pool, Lane::Open, move || {
                    let _ = started.send(());
                    gate.recv().is_ok()
                })
                .await
            }
        });
        while busy_now.try_recv().is_err() {
            tokio::task::yield_now().await;
        }
        let queue = |lane: Lane, name: &'static str| {
            let (pool, order) = (pool.clone(), order.clone());
            tokio::spawn(async move { run_on(&pool, lane, move || order.lock().unwrap().push(name)).await })
        };
        let mut flood = Vec::new();
        for _ in 0..OPEN_WAITING {
            flood.push(queue(Lane::Open, "open"));
        }
        while pool.queues.lock().unwrap().open.len() < OPEN_WAITING {
            tokio::task::yield_now().await;
        }
        let refused = queue(Lane::Open, "refused").await.unwrap();
        assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
        let returning: Vec<_> = (0..6).map(|_| queue(Lane::Known, "known")).collect();
        while pool.queues.lock().unwrap().known.len() < 6 {
            tokio::task::yield_now().await;
        }
        // A caller that gave up: its check is skipped.
        let gone = queue(Lane::Known, "gone");
        while pool.queues.lock().unwrap().known.len() < 7 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        for waiting in returning.into_iter().chain(flood) {
            waiting.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), OPEN_WAITING + 6, "{order:?}");
        assert_eq!(
            order[..8],
            [
                "known", "known", "known", "open", "known", "known", "known", "open"
            ],
            "returning users go first, but for one open check in four"
        );
        assert!(!order.contains(&"refused") && !order.contains(&"gone"));
    }
}
