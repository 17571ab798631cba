//! Password hashing on threads of its own. Each argon2 hash or check takes tens of milliseconds and
//! 19 MiB; run on the shared blocking pool, a flood of logins would take the cores inference runs on.
//! Here at most half the cores hash at once, at most [`MAX_WAITING`] requests wait, and the rest are
//! refused at once (`503`, retry shortly) instead of queueing without bound.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::oneshot;

use crate::{Result, StoreError};

/// Requests that may wait for a hashing thread.
const MAX_WAITING: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: SyncSender<Job>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        let (jobs, receiver) = sync_channel::<Job>(MAX_WAITING);
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..threads {
            let receiver: Arc<Mutex<Receiver<Job>>> = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("plinth-passwords-{index}"))
                .spawn(move || {
                    loop {
                        let job = {
                            let Ok(receiver) = receiver.lock() else { return };
                            receiver.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a password-hashing thread");
            }
        }
        Pool { jobs }
    })
}

/// Runs `work` on a hashing thread, or refuses when too many are waiting.
pub(crate) async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (reply, answer) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = reply.send(work());
    });
    match pool().jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            metrics::counter!("plinth_password_checks_refused_total").increment(1);
            return Err(StoreError::Unavailable(
                "too many password checks are in progress; retry shortly".into(),
            ));
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(StoreError::Internal(
                "the password-hashing threads stopped".into(),
            ));
        }
    }
    answer
        .await
        .map_err(|_| StoreError::Internal("a password-hashing job was dropped".into()))
}
