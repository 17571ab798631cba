//! Admission to publishing. Each submission's component is held in memory (up to the component
//! limit, and again while it compiles) until it is compiled, run and stored, and compilation takes
//! one turn at a time. Unbounded, a crowd of authors each within the per-minute limit could hold
//! gigabytes of components, arriving or waiting for that turn. So:
//! - an author sends one submission at a time (the next is refused before its body is read);
//! - the bodies arriving on a replica take at most [`PUBLISH_MEMORY`] together (past it, `503`);
//! - a replica checks [`PUBLISHES_AT_ONCE`] at once, taking the slot once a body is in (`503`), so a
//!   slow sender holds none.

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

/// The submissions under way on this replica.
#[derive(Debug)]
pub(crate) struct Publishing {
    slots: Arc<Semaphore>,
    authors: Arc<Mutex<HashSet<TenantId>>>,
    /// [`PUBLISH_MEMORY`], in KiB.
    memory: Arc<Semaphore>,
}

impl Default for Publishing {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(PUBLISHES_AT_ONCE)),
            authors: Arc::default(),
            memory: Arc::new(Semaphore::new(PUBLISH_MEMORY >> 10)),
        }
    }
}

/// The room one arriving body holds in the replica's budget, grown with it (see
/// [`crate::Marketplace::publish_room`]); given back on drop.
#[derive(Debug)]
pub struct BodyRoom {
    publishing: Arc<Publishing>,
    held: Option<OwnedSemaphorePermit>,
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
        let more = self.publishing.memory(bytes - self.bytes)?;
        self.bytes += more.num_permits() << 10;
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }
}

/// One of a replica's slots to check a submission in (see [`crate::Marketplace::publish_slot`]).
#[derive(Debug)]
pub struct PublishSlot(#[allow(dead_code, reason = "held, not read")] OwnedSemaphorePermit);

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
    /// bodies arriving take [`PUBLISH_MEMORY`].
    pub(crate) fn memory(&self, bytes: usize) -> Result<OwnedSemaphorePermit, MarketError> {
        let kib = u32::try_from(bytes.div_ceil(1 << 10)).unwrap_or(u32::MAX);
        Arc::clone(&self.memory).try_acquire_many_owned(kib).map_err(|_| {
            metrics::counter!("plinth_plugin_publishes_refused_total").increment(1);
            MarketError::Refused {
                code: ErrorCode::Unavailable,
                message: "too many submissions are arriving; retry shortly".into(),
                retry_after: Some(Duration::from_secs(10)),
            }
        })
    }

    /// Room for one arriving body, none held yet.
    pub(crate) fn room(publishing: &Arc<Self>) -> BodyRoom {
        BodyRoom {
            publishing: Arc::clone(publishing),
            held: None,
            bytes: 0,
        }
    }

    /// One of the replica's slots to check a submission in, or `503 unavailable` while all are taken.
    pub(crate) fn slot(&self) -> Result<PublishSlot, MarketError> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map(PublishSlot)
            .map_err(|_| {
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
            .map(|_| publishing.slot().unwrap())
            .collect();
        assert_eq!(publishing.slot().unwrap_err().code(), ErrorCode::Unavailable);
        // A refused submission took nothing: once one ends, the next is admitted.
        drop(slots);
        let _slot = publishing.slot().unwrap();

        // Bodies arriving together take at most the budget; what a refused chunk asked for is not
        // kept, and a body let go gives its room back.
        let mut body = publishing.memory(1).unwrap();
        body.merge(publishing.memory(PUBLISH_MEMORY - 2048).unwrap());
        assert_eq!(
            publishing.memory(2048).unwrap_err().code(),
            ErrorCode::Unavailable
        );
        let _last = publishing.memory(1024).unwrap();
        drop(body);
        let _next = publishing.memory(PUBLISH_MEMORY - 1024).unwrap();
    }

    #[test]
    fn a_body_holds_room_for_what_has_arrived_charged_once() {
        let publishing = Arc::new(Publishing::default());
        let mut room = Publishing::room(&publishing);
        // Tiny chunks take a KiB between them, not a KiB each.
        for total in 1..=1024 {
            room.grow_to(total).unwrap();
        }
        assert_eq!(room.bytes, 1024);
        room.grow_to(PUBLISH_MEMORY).unwrap();
        assert_eq!(publishing.memory(1).unwrap_err().code(), ErrorCode::Unavailable);
        drop(room);
        let _all = publishing.memory(PUBLISH_MEMORY).unwrap();
    }
}
