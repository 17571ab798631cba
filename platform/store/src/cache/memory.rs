//! In-process backend: governor's GCRA limiters, one per key and quota, and a TTL map, both in moka
//! caches so idle keys are evicted and memory stays bounded.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::RateLimiter;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use moka::Expiry;
use moka::sync::Cache as Moka;

use super::{Cache, CacheError, Quota, RateDecision};

/// A limiter that reports its remaining capacity with each decision.
type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

#[derive(Debug, Clone)]
struct Entry {
    value: Arc<[u8]>,
    ttl: Duration,
}

struct EntryTtl;

impl Expiry<String, Entry> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Entry,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    /// Setting a key again starts its time to live again, as Redis's `SET ... PX` does.
    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

pub struct MemoryCache {
    limiters: Moka<(String, Quota), Arc<Limiter>>,
    values: Moka<String, Entry>,
    clock: DefaultClock,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("limiters", &self.limiters.entry_count())
            .finish()
    }
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCache {
    #[must_use]
    pub fn new() -> Self {
        Self {
            // A limiter idle for ten minutes is full again anyway; dropping it loses nothing.
            limiters: Moka::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            values: Moka::builder()
                .max_capacity(1_000_000)
                .expire_after(EntryTtl)
                .build(),
            clock: DefaultClock::default(),
        }
    }
}

fn governor_quota(quota: Quota) -> governor::Quota {
    let burst = NonZeroU32::new(quota.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    governor::Quota::with_period(quota.emission_interval())
        .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

#[async_trait::async_trait]
impl Cache for MemoryCache {
    async fn rate_limit(&self, key: &str, quota: Quota) -> Result<RateDecision, CacheError> {
        let limiter = self.limiters.get_with((key.to_owned(), quota), || {
            Arc::new(
                RateLimiter::direct(governor_quota(quota)).with_middleware::<StateInformationMiddleware>(),
            )
        });
        let interval = quota.emission_interval();
        let burst = quota.burst.max(1);
        Ok(match limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                RateDecision {
                    allowed: true,
                    limit: quota.per_minute,
                    remaining,
                    reset_after: interval * (burst - remaining),
                    retry_after: Duration::ZERO,
                }
            }
            Err(not_until) => RateDecision {
                allowed: false,
                limit: quota.per_minute,
                remaining: 0,
                reset_after: interval * burst,
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.values.get(key).map(|entry| entry.value.to_vec()))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        self.values.insert(
            key.to_owned(),
            Entry {
                value: value.into(),
                ttl,
            },
        );
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        self.values.invalidate(key);
        Ok(())
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_holds_at_the_highest_rate() {
        let quota = Quota {
            per_minute: u32::MAX,
            burst: 1_000_000,
        };
        // A million requests ahead of the sustained rate are a second of it: a request whose thread
        // read the clock milliseconds before another's is still inside the burst.
        assert!(governor_quota(quota).burst_size_replenished_in() >= Duration::from_secs(1));
        let cache = MemoryCache::new();
        let first = cache.rate_limit("tenant", quota).await.unwrap();
        assert!(first.allowed);
        assert_eq!(first.remaining, 999_999);
        assert_eq!(first.reset_after, Duration::from_micros(1));
    }

    #[tokio::test]
    async fn setting_a_key_again_restarts_its_time_to_live() {
        let cache = MemoryCache::default();
        let ttl = Duration::from_millis(300);
        cache.set("k", b"1", ttl).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        cache.set("k", b"2", ttl).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"2"[..]));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(cache.get("k").await.unwrap(), None);
    }
}
