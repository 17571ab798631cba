//! Admission to publishing. Each submission's component is held in memory (up to the component
//! limit, and again while it compiles) until it is compiled, run and stored, and compilation takes
//! one turn at a time. Unbounded, a crowd of authors each within the per-minute limit could hold
//! gigabytes of components, arriving or waiting for that turn. So:
//! - an author sends one submission at a time (the next is refused before its body is read);
//! - the bodies arriving on a replica take at most [`PUBLISH_MEMORY`] together (past it, `503`);
//! - a replica checks [`PUBLISHES_AT_ONCE`] at once, taking the slot once a body is in (`503`), so a
//!   slow sender holds none.
//!
//! Signups are free, so authors without a paid subscription together take at most three quarters
//! of the slots and of the memory: a crowd of free accounts, each within its limits, leaves paying
//! authors a quarter (as with plugin instances).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plinth_core::ErrorCode;
use plinth_core::id::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::MarketError;

/// Submissions a replica checks at once, every author's together.
pub const PUBLISHES_AT_ONCE: usize = 4;

/// What the bodies of submissions arriving on a replica may take in memory together, in bytes.
pub const PUBLISH_MEMORY: usize = 256 << 20;

/// Slots, or KiB of memory: every author's, and the share of those without a paid subscription.
#[derive(Debug)]
struct Shared {
    all: Arc<Semaphore>,
    unpaid: Arc<Semaphore>,
}

impl Shared {
    fn new(all: usize) -> Self {
        Self {
            all: Arc::new(Semaphore::new(all)),
            unpaid: Arc::new(Semaphore::new(all * 3 / 4)),
        }
    }

    /// `n` of them, from the unpaid share too unless `paying`.
    fn take(&self, n: u32, paying: bool) -> Option<Held> {
        let unpaid = if paying {
            None
        } else {
            Some(Arc::clone(&self.unpaid).try_acquire_many_owned(n).ok()?)
        };
        let all = Arc::clone(&self.all).try_acquire_many_owned(n).ok()?;
        Some(Held { all, unpaid })
    }
}

/// What [`Shared::take`] took; given back on drop.
#[derive(Debug)]
struct Held {
    all: OwnedSemaphorePermit,
    unpaid: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn merge(&mut self, more: Self) {
        self.all.merge(more.all);
        match (&mut self.unpaid, more.unpaid) {
            (Some(unpaid), Some(more)) => unpaid.merge(more),
            (None, more) => self.unpaid = more,
            (Some(_), None) => {}
        }
    }
}

/// The submissions under way on this replica.
#[derive(Debug)]
pub(crate) struct Publishing {
    slots: Shared,
    authors: Arc<Mutex<HashSet<TenantId>>>,
    /// [`PUBLISH_MEMORY`], in KiB.
    memory: Shared,
}

impl Default for Publishing {
    fn default() -> Self {
        Self {
            slots: Shared::new(PUBLISHES_AT_ONCE),
            authors: Arc::default(),
            memory: Shared::new(PUBLISH_MEMORY >> 10),
        }
    }
}

/// The room one arriving body holds in the replica's budget, grown with it (see
/// [`crate::Marketplace::publish_room`]); given back on drop.
#[derive(Debug)]
pub struct BodyRoom {
    publishing: Arc<Publishing>,
    paying: bool,
    held: Option<Held>,
    /// What `held` covers, in bytes (whole KiB).
    bytes: usize,
}

impl BodyRoom {
    /// Holds room for `bytes` in all, taking only what is not held yet.
    ///
    /// # Errors
    /// `unavailable` while the bodies arriving take [`PUBLISH_MEMORY`].
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), MarketError> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let more = self.publishing.memory(bytes - self.bytes, self.paying)?;
        self.bytes += more.all.num_permits() << 10;
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }
}

/// One of a replica's slots to check a submission in (see [`crate::Marketplace::publish_slot`]).
#[derive(Debug)]
pub struct PublishSlot(#[allow(dead_code, reason = "held, not read")] Held);

/// An author's one submission under way, from before its body is read; given back on drop.
#[derive(Debug)]
pub struct AuthorTurn {
    author: TenantId,
    authors: Arc<Mutex<HashSet<TenantId>>>,
}

impl Drop for AuthorTurn {
    fn drop(&mut self) {
        self.authors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.author);
    }
}

impl Publishing {
    /// `author`'s turn to submit, or `429 rate_limited` while another of its submissions is under way.
    pub(crate) fn author_turn(&self, author: &TenantId) -> Result<AuthorTurn, MarketError> {
        let mut authors = self.authors.lock().unwrap_or_else(PoisonError::into_inner);
        if !authors.insert(author.clone()) {
            return Err(MarketError::Refused {
                code: ErrorCode::RateLimited,
                message: "another of your submissions is being checked; send this one when it is done".into(),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
        Ok(AuthorTurn {
            author: author.clone(),
            authors: Arc::clone(&self.authors),
        })
    }

    /// Room for `bytes` more of a body arriving (rounded up to KiB), or `503 unavailable` while the
    /// bodies arriving take [`PUBLISH_MEMORY`] (three quarters of it unless `paying`).
    fn memory(&self, bytes: usize, paying: bool) -> Result<Held, MarketError> {
        let kib = u32::try_from(bytes.div_ceil(1 << 10)).unwrap_or(u32::MAX);
        self.memory.take(kib, paying).ok_or_else(|| {
            metrics::counter!("plinth_plugin_publishes_refused_total").increment(1);
            MarketError::Refused {
                code: ErrorCode::Unavailable,
                message: "too many submissions are arriving; retry shortly".into(),
                retry_after: Some(Duration::from_secs(10)),
            }
        })
    }

    /// Room for one arriving body, none held yet.
    pub(crate) fn room(publishing: &Arc<Self>, paying: bool) -> BodyRoom {
        BodyRoom {
            publishing: Arc::clone(publishing),
            paying,
            held: None,
            bytes: 0,
        }
    }

    /// One of the replica's slots to check a submission in, or `503 unavailable` while all are taken
    /// (three quarters of them unless `paying`).
    pub(crate) fn slot(&self, paying: bool) -> Result<PublishSlot, MarketError> {
        self.slots.take(1, paying).map(PublishSlot).ok_or_else(|| {
            metrics::counter!("plinth_plugin_publishes_refused_total").increment(1);
            MarketError::Refused {
                code: ErrorCode::Unavailable,
                message: "other submissions are being checked; retry shortly".into(),
                retry_after: Some(Duration::from_secs(10)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_checks_a_few_submissions_at_once_one_per_author() {
        let publishing = Publishing::default();
        let author = TenantId::new();
        let turn = publishing.author_turn(&author).unwrap();
        let again = publishing.author_turn(&author).unwrap_err();
        assert_eq!(again.code(), ErrorCode::RateLimited);
        // Others' turns are theirs.
        let _other = publishing.author_turn(&TenantId::new()).unwrap();
        drop(turn);
        let _next = publishing.author_turn(&author).unwrap();

        let slots: Vec<_> = (0..PUBLISHES_AT_ONCE)
            .map(|_| publishing.slot(true).unwrap())
            .collect();
        assert_eq!(publishing.slot(true).unwrap_err().code(), ErrorCode::Unavailable);
        // A refused submission took nothing: once one ends, the next is admitted.
        drop(slots);
        let _slot = publishing.slot(true).unwrap();

        // Bodies arriving together take at most the budget; what a refused chunk asked for is not
        // kept, and a body let go gives its room back.
        let mut body = publishing.memory(1, true).unwrap();
        body.merge(publishing.memory(PUBLISH_MEMORY - 2048, true).unwrap());
        assert_eq!(
            publishing.memory(2048, true).unwrap_err().code(),
            ErrorCode::Unavailable
        );
        let _last = publishing.memory(1024, true).unwrap();
        drop(body);
        let _next = publishing.memory(PUBLISH_MEMORY - 1024, true).unwrap();
    }

    #[test]
    fn authors_without_a_paid_subscription_leave_paying_ones_a_quarter() {
        let publishing = Arc::new(Publishing::default());
        let unpaid: Vec<_> = (0..PUBLISHES_AT_ONCE * 3 / 4)
            .map(|_| publishing.slot(false).unwrap())
            .collect();
        assert_eq!(publishing.slot(false).unwrap_err().code(), ErrorCode::Unavailable);
        let paying = publishing.slot(true).unwrap();
        assert_eq!(publishing.slot(true).unwrap_err().code(), ErrorCode::Unavailable);
        // Paying authors may take the whole, leaving the unpaid share only what is left of it.
        drop(unpaid);
        let _more_paying: Vec<_> = (1..PUBLISHES_AT_ONCE - 1)
            .map(|_| publishing.slot(true).unwrap())
            .collect();
        let _unpaid = publishing.slot(false).unwrap();
        assert_eq!(publishing.slot(false).unwrap_err().code(), ErrorCode::Unavailable);
        drop(paying);

        let mut crowd = Publishing::room(&publishing, false);
        crowd.grow_to(PUBLISH_MEMORY * 3 / 4).unwrap();
        let mut another = Publishing::room(&publishing, false);
        assert_eq!(another.grow_to(1).unwrap_err().code(), ErrorCode::Unavailable);
        let mut paying = Publishing::room(&publishing, true);
        paying.grow_to(PUBLISH_MEMORY / 4).unwrap();
        assert_eq!(
            paying.grow_to(PUBLISH_MEMORY / 4 + 1).unwrap_err().code(),
            ErrorCode::Unavailable
        );
        drop(crowd);
        another.grow_to(PUBLISH_MEMORY / 2).unwrap();
    }

    #[test]
    fn a_body_holds_room_for_what_has_arrived_charged_once() {
        let publishing = Arc::new(Publishing::default());
        let mut room = Publishing::room(&publishing, false);
        // Tiny chunks take a KiB between them, not a KiB each.
        for total in 1..=1024 {
            room.grow_to(total).unwrap();
        }
        assert_eq!(room.bytes, 1024);
        room.grow_to(PUBLISH_MEMORY * 3 / 4).unwrap();
        assert_eq!(
            publishing.memory(1, false).unwrap_err().code(),
            ErrorCode::Unavailable
        );
        drop(room);
        let _all = publishing.memory(PUBLISH_MEMORY * 3 / 4, false).unwrap();
    }
}
