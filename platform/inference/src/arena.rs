//! The memory tenants' graphs may take while they run.
//!
//! A tenant's graph decides what ONNX Runtime allocates: `ConstantOfShape`, `Expand`, `Tile` or `Range`
//! fed from an input can ask for any size. Left to the system allocator, a run asking for more than the
//! machine has is not refused but killed by the kernel, and every tenant's server with it. So tenants'
//! sessions allocate from one arena of the environment's with a ceiling: past it an allocation fails,
//! ONNX Runtime fails the run, and the caller is told why. The platform's own graphs keep their own
//! allocators.
//!
//! Weights are not counted (ONNX Runtime keeps them apart from the arena); what a run allocates is. The
//! arena grows by what is asked, and each tenant's run gives back what it freed as it ends (see
//! [`SHRINK_AFTER_RUN`]), so a run's peak is not kept.
//!
//! The arena is shared, so a run may find it full of another tenant's runs. Such a run waits for a
//! run to end and tries again, until its callers' deadline (see [`Arena::share`]): a graph that holds
//! most of the arena delays other tenants' calls that need more than is left, rather than failing
//! them. No run ever waits to have the arena to itself, which would have every tenant's runs wait for
//! it. A run refused memory with no other run in the arena asked for more than all of it: that is its
//! caller's error.
//!
//! `ort` does not wrap registering an environment allocator: this module calls ONNX Runtime's C API for
//! it, and is the one place in the workspace that uses `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::sys::{OrtArenaCfg, OrtStatusPtr};

use crate::InferenceError;

/// The arena's ceiling, in bytes, once registered.
static CEILING: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The run option that has a run give its arena's free regions back to the system as it ends.
pub(crate) const SHRINK_AFTER_RUN: (&str, &str) = ("memory.enable_memory_arena_shrinkage", "cpu:0");

/// Registers the CPU arena that sessions built with `with_env_allocators` allocate from: at most
/// `max_bytes` at once, growing by what each allocation asks (not by powers of two, which would take
/// up to twice what is needed).
pub(crate) fn register(environment: &Environment, max_bytes: usize) -> Result<(), String> {
    CEILING.store(max_bytes, Ordering::Relaxed);
    let api = ort::api();
    let memory = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|err| format!("memory info: {err}"))?;
    let keys: [*const c_char; 2] = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    // 1: kSameAsRequested.
    let values: [usize; 2] = [max_bytes, 1];
    let mut config: *mut OrtArenaCfg = std::ptr::null_mut();
    // SAFETY: `keys` and `values` are arrays of the length given, each key a NUL-terminated static
    // string; `config` is written by the call, and only read when it succeeded.
    let created =
        unsafe { (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &raw mut config) };
    status(created)?;
    // SAFETY: the environment and the memory info are live for the call (ONNX Runtime copies what it
    // keeps of them), and `config` was created above; the environment takes no ownership of it.
    let registered = unsafe {
        (api.CreateAndRegisterAllocator)(environment.ptr().cast_mut(), memory.ptr(), config.cast_const())
    };
    // SAFETY: created above, released once, not used after.
    unsafe { (api.ReleaseArenaCfg)(config) };
    status(registered)
}

/// `Ok` for a null status; otherwise its message, and the status released.
fn status(status: OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from ONNX Runtime: its message is a NUL-terminated string owned by the
    // status, copied before the status is released (once).
    unsafe {
        let message = CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        Err(message)
    }
}

/// A run of a tenant's graph that failed: for want of memory, or otherwise.
#[derive(Debug)]
pub(crate) enum Failed {
    /// An allocation found the arena full.
    Full,
    /// The run asked for more than the whole arena: no wait would make room for it.
    Beyond,
    Other(InferenceError),
}

impl Failed {
    /// The caller's error: `Full`, other tenants' runs held the memory for as long as the callers
    /// wait (retry); `Beyond`, invalid input, told `beyond`.
    pub(crate) fn into_error(self, beyond: &str) -> InferenceError {
        match self {
            Self::Full => InferenceError::Overloaded,
            Self::Beyond => InferenceError::InvalidInput(beyond.to_owned()),
            Self::Other(err) => err,
        }
    }
}

impl From<InferenceError> for Failed {
    fn from(err: InferenceError) -> Self {
        Self::Other(err)
    }
}

impl From<ort::Error> for Failed {
    fn from(err: ort::Error) -> Self {
        Self::Other(err.into())
    }
}

/// What ONNX Runtime's message says of the arena's room: `None` where it is not about that.
pub(crate) fn no_room(message: &str) -> Option<Failed> {
    no_room_below(message, CEILING.load(Ordering::Relaxed))
}

/// As [`no_room`], for an arena of at most `ceiling` bytes.
fn no_room_below(message: &str, ceiling: usize) -> Option<Failed> {
    if message.contains("Failed to allocate memory") {
        return Some(Failed::Full);
    }
    // "Available memory of {left} is smaller than requested bytes of {asked}"
    let (_, rest) = message.split_once("Available memory of")?;
    let asked: usize = rest
        .split_once("requested bytes of ")
        .and_then(|(_, asked)| asked.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0);
    Some(if asked > ceiling {
        Failed::Beyond
    } else {
        Failed::Full
    })
}

/// Tries one run of a tenant's graph makes in all, however many runs end while it waits.
const TRIES: usize = 4;

/// The runs of tenants' graphs in an arena: which are in it, and how many have left.
pub(crate) struct Arena {
    runs: Mutex<Runs>,
    left: Condvar,
}

struct Runs {
    /// The runs in the arena, by the number each was given as it came in (few: one per session).
    inside: Vec<u64>,
    next: u64,
    /// Runs that left, however they ended.
    left: u64,
}

/// The arena every tenant's graph allocates from (see the module's doc).
pub(crate) static TENANTS: Arena = Arena::new();

/// One run in the arena: it leaves however it ends, a panic included, and runs waiting for room
/// look again.
struct Inside<'a> {
    arena: &'a Arena,
    run: u64,
    came_after: u64,
}

impl Inside<'_> {
    /// Leaves the arena: whether another run was in it meanwhile (still in it, or left while this
    /// one ran), and the runs still in it.
    fn leave(self) -> (bool, Vec<u64>) {
        let (met, others) = self.arena.leave(self.run, self.came_after);
        std::mem::forget(self);
        (met, others)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.arena.leave(self.run, self.came_after);
    }
}

impl Arena {
    const fn new() -> Self {
        Self {
            runs: Mutex::new(Runs {
                inside: Vec::new(),
                next: 0,
                left: 0,
            }),
            left: Condvar::new(),
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enter(&self) -> Inside<'_> {
        let mut runs = self.runs();
        let run = runs.next;
        runs.next += 1;
        runs.inside.push(run);
        Inside {
            arena: self,
            run,
            came_after: runs.left,
        }
    }

    fn leave(&self, run: u64, came_after: u64) -> (bool, Vec<u64>) {
        let left = {
            let mut runs = self.runs();
            runs.inside.retain(|r| *r != run);
            let met = !runs.inside.is_empty() || runs.left != came_after;
            runs.left += 1;
            (met, runs.inside.clone())
        };
        self.left.notify_all();
        left
    }

    /// Runs one run of a tenant's graph beside other tenants' runs. If an allocation found the
    /// arena full while other runs were in it (or had been, during the run), it waits for one of
    /// the runs in the arena as it left to leave (however that one ends: a run refused memory may
    /// have held much of it) and tries again: at most [`TRIES`] times in all, and not past
    /// `deadline` (none: it does not wait). For want of memory it answers [`Failed::Beyond`] where
    /// the run asked for more than the whole arena (one allocation larger, or refused twice with no
    /// other run in the arena), and [`Failed::Full`] where other runs held the memory until it gave
    /// up.
    pub(crate) fn share<T>(
        &self,
        deadline: Option<Instant>,
        mut run: impl FnMut() -> Result<T, Failed>,
    ) -> Result<T, Failed> {
        let mut tries = 0;
        let mut refused_alone = false;
        loop {
            tries += 1;
            let inside = self.enter();
            let outcome = run();
            let (met_others, others) = inside.leave();
            match outcome {
                // Refused with no other run in the arena: what earlier runs left in it (a region
                // their answers were in as they ended) was given back as this one ended (see
                // `SHRINK_AFTER_RUN`). Refused alone again, it asked for more than all of it.
                Err(Failed::Full) if !met_others => {
                    if refused_alone {
                        return Err(Failed::Beyond);
                    }
                    if tries >= TRIES {
                        return Err(Failed::Full);
                    }
                    refused_alone = true;
                    continue;
                }
                Err(Failed::Full) => {}
                done => return done,
            }
            let Some(deadline) = deadline.filter(|_| tries < TRIES) else {
                return Err(Failed::Full);
            };
            // The runs it met have all left already: it tries again at once.
            if others.is_empty() {
                continue;
            }
            metrics::counter!("plinth_inference_arena_waits_total").increment(1);
            // Until one of the runs in the arena as this one left has left too: runs that came in
            // since, other runs waiting for room trying again among them, do not wake it.
            let (runs, waited) = self
                .left
                .wait_timeout_while(
                    self.runs(),
                    deadline.saturating_duration_since(Instant::now()),
                    |runs| others.iter().all(|run| runs.inside.contains(run)),
                )
                .unwrap_or_else(PoisonError::into_inner);
            drop(runs);
            if waited.timed_out() {
                return Err(Failed::Full);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn full_message(asked: usize) -> String {
        format!(
            "Non-zero status code returned while running ConstantOfShape node. Status Message: \
             bfc_arena.cc:360 AllocateRawInternal Available memory of 532870656 is smaller than \
             requested bytes of {asked}"
        )
    }

    #[test]
    fn the_runtimes_message_tells_a_full_arena_from_an_allocation_larger_than_it() {
        let ceiling = 1 << 30;
        let no_room = |message: &str| no_room_below(message, ceiling);
        assert!(matches!(no_room(&full_message(ceiling)), Some(Failed::Full)));
        assert!(matches!(
            no_room(&full_message(ceiling + 1)),
            Some(Failed::Beyond)
        ));
        assert!(matches!(
            no_room("Failed to allocate memory for requested buffer of size 1024"),
            Some(Failed::Full)
        ));
        assert!(no_room("the model rejected the inputs").is_none());
    }

    /// A run in `arena` until told to end; `ended` is set as it ends.
    fn holding<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        arena: &'s Arena,
        ended: &'s AtomicBool,
    ) -> (
        mpsc::Sender<()>,
        std::thread::ScopedJoinHandle<'s, Result<(), Failed>>,
    ) {
        let (inside, is_inside) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let handle = scope.spawn(move || {
            arena.share(None, || {
                inside.send(()).unwrap();
                // (Not for ever: a failed assertion must end the test, not hang it.)
                let _ = released.recv_timeout(Duration::from_secs(5));
                ended.store(true, Ordering::SeqCst);
                Ok(())
            })
        });
        is_inside.recv().unwrap();
        (release, handle)
    }

    /// Waits for `tries` to reach `count` (not for ever: a run that stopped trying fails the test).
    fn tried(tries: &AtomicUsize, count: usize) {
        let waiting = Instant::now();
        while tries.load(Ordering::SeqCst) < count {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "{} tries of {count}",
                tries.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `tries` to reach `count`, and checks that no run tries again for a while (while
    /// the holder holds the arena).
    fn still_after_trying(tries: &AtomicUsize, count: usize) {
        tried(tries, count);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            tries.load(Ordering::SeqCst),
            count,
            "no run tried again while the holder held the arena"
        );
    }

    #[test]
    fn a_run_that_finds_the_arena_full_of_another_run_tries_again_once_it_ends() {
        let arena = &Arena::new();
        let ended = &AtomicBool::new(false);
        let tries = &AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let (release, holder) = holding(scope, arena, ended);
            let deadline = Instant::now() + Duration::from_secs(10);
            let meeting = scope.spawn(move || {
                arena.share(Some(deadline), || {
                    if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(Failed::Full);
                    }
                    Ok(ended.load(Ordering::SeqCst))
                })
            });
            still_after_trying(tries, 1);
            release.send(()).unwrap();
            assert!(holder.join().unwrap().is_ok());
            assert!(
                matches!(meeting.join().unwrap(), Ok(true)),
                "it tried again once that run ended"
            );
            assert_eq!(tries.load(Ordering::SeqCst), 2);
        });
    }

    #[test]
    fn runs_waiting_for_room_wait_for_the_run_that_holds_it_not_for_each_other() {
        let arena = &Arena::new();
        let ended = &AtomicBool::new(false);
        let tries = &AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let (release, holder) = holding(scope, arena, ended);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Each finds no room while the holder holds the arena.
            let waiting: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(move || {
                        arena.share(Some(deadline), || {
                            tries.fetch_add(1, Ordering::SeqCst);
                            if ended.load(Ordering::SeqCst) {
                                Ok(())
                            } else {
                                Err(Failed::Full)
                            }
                        })
                    })
                })
                .collect();
            // Each may try once more as the other's refused run leaves (it may have held memory),
            // then both wait for the holder.
            tried(tries, 2);
            std::thread::sleep(Duration::from_millis(200));
            let settled = tries.load(Ordering::SeqCst);
            still_after_trying(tries, settled);
            assert!(settled <= 4, "{settled} tries");
            release.send(()).unwrap();
            assert!(holder.join().unwrap().is_ok());
            for run in waiting {
                assert!(run.join().unwrap().is_ok());
            }
        });
    }

    #[test]
    fn a_run_whose_neighbour_left_while_it_ran_tries_again_at_once() {
        let arena = &Arena::new();
        let ended = &AtomicBool::new(false);
        let tries = &AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let (release, holder) = holding(scope, arena, ended);
            let started = Instant::now();
            let outcome = arena.share(Some(started + Duration::from_secs(10)), || {
                if tries.fetch_add(1, Ordering::SeqCst) > 0 {
                    return Ok(());
                }
                // Refused while the holder is in the arena; it leaves before this run does.
                release.send(()).unwrap();
                while !ended.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(Duration::from_millis(50));
                Err(Failed::Full)
            });
            assert!(outcome.is_ok(), "{outcome:?}");
            assert_eq!(tries.load(Ordering::SeqCst), 2);
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "it did not wait for its deadline"
            );
            assert!(holder.join().unwrap().is_ok());
        });
    }

    #[test]
    fn a_run_that_panics_leaves_the_arena() {
        let arena = &Arena::new();
        let panicked =
            std::panic::catch_unwind(|| arena.share(None, || -> Result<(), Failed> { panic!("a run") }));
        assert!(panicked.is_err());
        assert!(arena.runs().inside.is_empty());
        // So a run refused memory next is alone, and told so.
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = arena.share(Some(deadline), || Err::<(), _>(Failed::Full));
        assert!(matches!(outcome, Err(Failed::Beyond)), "{outcome:?}");
    }

    #[test]
    fn a_run_refused_memory_alone_in_the_arena_or_past_its_deadline_does_not_wait() {
        let arena = &Arena::new();
        let tries = &AtomicUsize::new(0);
        let full = || {
            tries.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Failed::Full)
        };
        // Alone, twice (the first may have met what earlier runs left): it asked for more than all
        // of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(arena.share(Some(deadline), full), Err(Failed::Beyond)));
        assert_eq!(tries.swap(0, Ordering::SeqCst), 2);
        // One allocation larger than the arena: no wait would make room.
        let beyond = || {
            tries.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(Failed::Beyond)
        };
        assert!(matches!(arena.share(Some(deadline), beyond), Err(Failed::Beyond)));
        assert_eq!(tries.swap(0, Ordering::SeqCst), 1);

        // Beside a run that holds the arena past the deadline: it gives up at the deadline.
        let ended = &AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (release, holder) = holding(scope, arena, ended);
            let started = Instant::now();
            let outcome = arena.share(Some(started + Duration::from_millis(300)), full);
            assert!(matches!(outcome, Err(Failed::Full)), "{outcome:?}");
            assert_eq!(tries.load(Ordering::SeqCst), 1);
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert!(!ended.load(Ordering::SeqCst));
            release.send(()).unwrap();
            assert!(holder.join().unwrap().is_ok());
        });
    }

    #[test]
    fn a_run_tries_a_few_times_at_most_however_many_runs_end() {
        let arena = &Arena::new();
        let tries = &AtomicUsize::new(0);
        let ended = &AtomicBool::new(false);
        std::thread::scope(|scope| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut holders: Vec<_> = (0..=TRIES).map(|_| holding(scope, arena, ended)).collect();
            let meeting = scope.spawn(move || {
                arena.share(Some(deadline), || {
                    tries.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(Failed::Full)
                })
            });
            // The holders leave one at a time, each after the run tried again.
            for tried in 1..TRIES {
                self::tried(tries, tried);
                let (release, holder) = holders.remove(0);
                release.send(()).unwrap();
                assert!(holder.join().unwrap().is_ok());
            }
            assert!(matches!(meeting.join().unwrap(), Err(Failed::Full)));
            assert_eq!(
                tries.load(Ordering::SeqCst),
                TRIES,
                "not more, with holders left to leave"
            );
            for (release, holder) in holders {
                release.send(()).unwrap();
                assert!(holder.join().unwrap().is_ok());
            }
        });
    }
}
