//! Tenants' models loaded on demand, one place in line per tenant: calls for the same version wait
//! for one load and share it, and a tenant loads one model version at a time, so asking for many
//! versions in turn cannot fill the line of loads that every tenant shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use plinth_core::id::TenantId;

type Version = (TenantId, String, u32);

#[derive(Debug, Default)]
pub(crate) struct LoadGate {
    loading: Mutex<HashMap<Version, Arc<tokio::sync::Mutex<()>>>>,
}

/// A place in line for one version's load; the last to leave frees the tenant to load another.
pub(crate) struct Place<'a> {
    gate: &'a LoadGate,
    version: Version,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl LoadGate {
    /// A place in line to load `version` of the tenant's `name`; `None` while the tenant is loading
    /// another model or version.
    pub(crate) fn enter(&self, tenant: &TenantId, name: &str, version: u32) -> Option<Place<'_>> {
        let key = (tenant.clone(), name.to_owned(), version);
        let mut loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(turn) = loading.get(&key) {
            let turn = Arc::clone(turn);
            return Some(Place {
                gate: self,
                version: key,
                turn,
            });
        }
        if loading.keys().any(|(owner, _, _)| owner == tenant) {
            return None;
        }
        let turn = Arc::<tokio::sync::Mutex<()>>::default();
        loading.insert(key.clone(), Arc::clone(&turn));
        Some(Place {
            gate: self,
            version: key,
            turn,
        })
    }
}

impl Place<'_> {
    /// Waits for the load of the same version ahead, if any (then it is usually loaded).
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut loading = self.gate.loading.lock().unwrap_or_else(PoisonError::into_inner);
        // Counted under the map's lock, where places are handed out: the map's and this one's.
        if Arc::strong_count(&self.turn) == 2 {
            loading.remove(&self.version);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_loads_one_version_at_a_time_and_shares_it() {
        let gate = LoadGate::default();
        let (a, b) = (TenantId::new(), TenantId::new());
        let first = gate.enter(&a, "tone", 1).expect("a place");
        let same = gate
            .enter(&a, "tone", 1)
            .expect("the same version shares the place");
        assert!(
            gate.enter(&a, "tone", 2).is_none(),
            "another version waits its turn"
        );
        assert!(gate.enter(&a, "other", 1).is_none(), "another model too");
        assert!(
            gate.enter(&b, "tone", 1).is_some(),
            "other tenants are not held up"
        );
        drop(first);
        assert!(
            gate.enter(&a, "tone", 2).is_none(),
            "one is still waiting for version 1"
        );
        drop(same);
        assert!(gate.enter(&a, "tone", 2).is_some(), "free once everyone left");
    }
}
