//! The last few billable API calls of each tenant that failed, for the portal's overview: what was
//! called, the status and code it got, and the request id to look it up by. Kept in the shared cache
//! (Redis in production, so every replica sees the same list) for a week, at most [`KEPT`] per tenant.
//!
//! A tenant hammering a refused route must not turn each refusal into cache writes: each replica
//! records at most one failure per tenant per second, off the request path.

use std::time::Duration;

use chrono::{DateTime, Utc};
use plinth_core::id::TenantId;
use plinth_store::cache::SharedCache;
use serde::{Deserialize, Serialize};

/// Failures kept per tenant.
pub(crate) const KEPT: usize = 10;
const KEPT_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
const AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// Tenants whose last recording time one replica remembers.
const THROTTLED_TENANTS: u64 = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FailedCall {
    pub(crate) at: DateTime<Utc>,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    /// The error code, when the failure carried one.
    pub(crate) code: Option<String>,
    pub(crate) request_id: String,
}

/// Records failures (see the module's documentation).
#[derive(Debug, Clone)]
pub struct RecentErrors {
    throttle: moka::sync::Cache<TenantId, ()>,
}

impl Default for RecentErrors {
    fn default() -> Self {
        Self {
            throttle: moka::sync::Cache::builder()
                .max_capacity(THROTTLED_TENANTS)
                .time_to_live(AT_MOST_EVERY)
                .build(),
        }
    }
}

fn key(tenant: &TenantId) -> String {
    format!("recent-errors:{tenant}")
}

impl RecentErrors {
    /// Adds `call` to `tenant`'s list in the background, unless this replica recorded one for the
    /// tenant within the last second.
    pub(crate) fn record(&self, cache: &SharedCache, tenant: &TenantId, call: FailedCall) {
        if self.throttle.contains_key(tenant) {
            return;
        }
        self.throttle.insert(tenant.clone(), ());
        let (cache, tenant) = (cache.clone(), tenant.clone());
        tokio::spawn(async move {
            // Two replicas recording at once may each drop the other's entry: a list of recent
            // failures to look at, not a record anyone is billed by.
            let mut calls = list(&cache, &tenant).await;
            calls.insert(0, call);
            calls.truncate(KEPT);
            let stored = match serde_json::to_vec(&calls) {
                Ok(stored) => stored,
                Err(err) => return tracing::warn!(error = %err, "cannot encode recent errors"),
            };
            if let Err(err) = cache.set(&key(&tenant), &stored, KEPT_FOR).await {
                tracing::warn!(error = %err, "cannot record a failed call in the cache");
            }
        });
    }
}

/// `tenant`'s recent failures, newest first; none when the cache cannot say.
pub(crate) async fn list(cache: &SharedCache, tenant: &TenantId) -> Vec<FailedCall> {
    match cache.get(&key(tenant)).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Ok(None) => Vec::new(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read recent errors from the cache");
            Vec::new()
        }
    }
}
