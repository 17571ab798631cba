//! Admission to publishing: each submission's component is held in memory (up to the component
//! limit, and again while it compiles) until it is compiled, run and stored, and compilation takes
//! one turn at a time. Unbounded, a crowd of authors each within the per-minute limit could hold
//! gigabytes of waiting components; so a replica takes a few at once, one per author, and answers
//! the rest at once, before their bodies are read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plinth_core::ErrorCode;
use plinth_core::id::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::MarketError;

/// Submissions a replica takes at once, every author's together.
pub const PUBLISHES_AT_ONCE: usize = 4;

/// The submissions under way on this replica.
#[derive(Debug)]
pub(crate) struct Publishing {
    slots: Arc<Semaphore>,
    authors: Arc<Mutex<HashSet<TenantId>>>,
}

impl Default for Publishing {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(PUBLISHES_AT_ONCE)),
            authors: Arc::default(),
        }
    }
}

/// One admitted submission: its slot and its author's turn, given back on drop.
#[derive(Debug)]
pub struct PublishTurn {
    _slot: OwnedSemaphorePermit,
    author: TenantId,
    authors: Arc<Mutex<HashSet<TenantId>>>,
}

impl Drop for PublishTurn {
    fn drop(&mut self) {
        self.authors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.author);
    }
}

impl Publishing {
    /// Admits `author`'s submission, or refuses it: `429 rate_limited` while another of the author's
    /// is under way, `503 unavailable` while the replica's slots are taken.
    pub(crate) fn admit(&self, author: &TenantId) -> Result<PublishTurn, MarketError> {
        let mut authors = self.authors.lock().unwrap_or_else(PoisonError::into_inner);
        if authors.contains(author) {
            return Err(MarketError::Refused {
                code: ErrorCode::RateLimited,
                message: "another of your submissions is being checked; send this one when it is done".into(),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
        let slot = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            metrics::counter!("plinth_plugin_publishes_refused_total").increment(1);
            MarketError::Refused {
                code: ErrorCode::Unavailable,
                message: "other submissions are being checked; retry shortly".into(),
                retry_after: Some(Duration::from_secs(10)),
            }
        })?;
        authors.insert(author.clone());
        Ok(PublishTurn {
            _slot: slot,
            author: author.clone(),
            authors: Arc::clone(&self.authors),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_checks_a_few_submissions_at_once_one_per_author() {
        let publishing = Publishing::default();
        let authors: Vec<TenantId> = (0..=PUBLISHES_AT_ONCE).map(|_| TenantId::new()).collect();
        let first = publishing.admit(&authors[0]).unwrap();
        let again = publishing.admit(&authors[0]).unwrap_err();
        assert_eq!(again.code(), ErrorCode::RateLimited);
        let turns: Vec<_> = authors[1..PUBLISHES_AT_ONCE]
            .iter()
            .map(|author| publishing.admit(author).unwrap())
            .collect();
        let last = &authors[PUBLISHES_AT_ONCE];
        assert_eq!(publishing.admit(last).unwrap_err().code(), ErrorCode::Unavailable);
        // A refused submission took nothing: once one ends, the next is admitted.
        drop(first);
        let _last = publishing.admit(last).unwrap();
        assert_eq!(
            publishing.admit(&authors[0]).unwrap_err().code(),
            ErrorCode::Unavailable
        );
        drop(turns);
        publishing.admit(&authors[0]).unwrap();
    }
}
