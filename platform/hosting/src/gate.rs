//! Tenants' models loaded on demand take turns twice before the turns every tenant shares: calls for
//! the same version line up behind one load and find it done, and a tenant's loads line up behind
//! each other. Asking for many versions at once then queues only the tenant's own calls: it has one
//! load at a time in the line every tenant shares (see `budget`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use plinth_core::id::TenantId;
use tokio::sync::OwnedMutexGuard;

/// A tenant's model version.
pub(crate) type Version = (TenantId, String, u32);

#[derive(Debug, Default)]
pub(crate) struct LoadGate {
    pub(crate) versions: Arc<Lines<Version>>,
    pub(crate) tenants: Arc<Lines<TenantId>>,
}

/// Lines to wait in, one per key, made when someone waits and gone when nobody does.
#[derive(Debug)]
pub(crate) struct Lines<K> {
    lines: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for Lines<K> {
    fn default() -> Self {
        Self {
            lines: Mutex::default(),
        }
    }
}

/// A turn in a line (or a place in it, while waiting); the last to leave removes the line.
pub(crate) struct Turn<K: Eq + Hash> {
    lines: Arc<Lines<K>>,
    key: K,
    line: Arc<tokio::sync::Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Lines<K> {
    /// Waits for `key`'s turn: callers with the same key take turns, in order.
    pub(crate) async fn turn(self: &Arc<Self>, key: K) -> Turn<K> {
        let line = Arc::clone(
            self.lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.clone())
                .or_default(),
        );
        // In line from here: dropped while it waits, it still leaves the line.
        let mut turn = Turn {
            lines: Arc::clone(self),
            key,
            line: Arc::clone(&line),
            held: None,
        };
        turn.held = Some(line.lock_owned().await);
        turn
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// How many hold on to `key`'s line (a place in it, a turn), the map aside.
    #[cfg(test)]
    fn holds(&self, key: &K) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .map_or(0, |line| Arc::strong_count(line) - 1)
    }
}

impl<K: Eq + Hash> Drop for Turn<K> {
    fn drop(&mut self) {
        self.held = None;
        let mut lines = self.lines.lines.lock().unwrap_or_else(PoisonError::into_inner);
        // Counted under the lock the lines are handed out under: the map's and this one's.
        if Arc::strong_count(&self.line) == 2 {
            lines.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_line_serves_its_callers_in_turn_and_goes_when_nobody_waits() {
        let lines = Arc::new(Lines::<&str>::default());
        let first = lines.turn("a").await;
        // Another key has its own line.
        let other = tokio::time::timeout(Duration::from_secs(1), lines.turn("b")).await;
        assert!(other.is_ok());
        drop(other);
        // The same key waits for the first to finish.
        let second = tokio::spawn({
            let lines = lines.clone();
            async move { lines.turn("a").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lines.len(), 1);
        drop(second);
        assert_eq!(lines.len(), 0);
        // A caller that gives up while it waits leaves no line behind.
        let holder = lines.turn("c").await;
        let held = lines.holds(&"c");
        let gave_up = tokio::time::timeout(Duration::from_millis(20), lines.turn("c")).await;
        assert!(gave_up.is_err());
        assert_eq!(lines.holds(&"c"), held);
        drop(holder);
        assert_eq!(lines.len(), 0);
    }
}
