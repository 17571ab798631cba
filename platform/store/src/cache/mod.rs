//! Shared fast state: rate limits, and short-lived values. One trait, two backends: in-process memory for
//! the embedded single-machine mode, Redis in production so that limits hold across replicas.

mod memory;
mod redis;
mod resilient;

use std::sync::Arc;
use std::time::Duration;

pub use self::memory::MemoryCache;
pub use self::redis::RedisCache;
pub use self::resilient::ResilientCache;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CacheError(pub String);

/// A GCRA (token-bucket equivalent) limit: `per_minute` sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub per_minute: u32,
    pub burst: u32,
}

/// The most requests a minute a limit can hold apart: one a microsecond, the resolution both
/// limiters count in (Redis's clock). A plan may not ask for more.
pub const MAX_PER_MINUTE: u32 = 60_000_000;

impl Quota {
    /// The time one request "costs": a minute divided by the sustained rate, and at least a
    /// microsecond. Never zero: a burst is what the limiter tolerates of requests ahead of the
    /// sustained rate, the interval times the burst, and with a zero interval a request whose thread
    /// read the clock a moment before another's would be refused at any rate.
    #[must_use]
    pub fn emission_interval(self) -> Duration {
        Duration::from_micros((60_000_000 / u64::from(self.per_minute.max(1))).max(1))
    }
}

/// The verdict of one rate-limit check, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    pub limit: u32,
    /// Requests that could still be made right now.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: how long until one request would be allowed.
    pub retry_after: Duration,
}

#[async_trait::async_trait]
pub trait Cache: Send + Sync + std::fmt::Debug {
    /// Counts one request against `key` under `quota`, atomically.
    async fn rate_limit(&self, key: &str, quota: Quota) -> Result<RateDecision, CacheError>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError>;
    async fn delete(&self, key: &str) -> Result<(), CacheError>;
    /// Whether the backend answers; used by the readiness probe.
    async fn ping(&self) -> Result<(), CacheError>;
}

pub type SharedCache = Arc<dyn Cache>;

/// Connects the backend a URL names: `redis://...` (with the replica's own cache standing in while
/// Redis is unreachable, see [`ResilientCache`]) or `memory`.
pub async fn connect(url: Option<&str>, key_prefix: &str) -> Result<SharedCache, CacheError> {
    match url {
        None | Some("" | "memory") => Ok(Arc::new(MemoryCache::new())),
        Some(url) => Ok(Arc::new(ResilientCache::new(
            RedisCache::connect(url, key_prefix).await?,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emission_interval_divides_a_minute() {
        assert_eq!(
            Quota {
                per_minute: 60,
                burst: 1
            }
            .emission_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Quota {
                per_minute: 6_000,
                burst: 1
            }
            .emission_interval(),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn no_rate_makes_the_interval_zero() {
        for per_minute in [MAX_PER_MINUTE, MAX_PER_MINUTE + 1, u32::MAX] {
            let quota = Quota { per_minute, burst: 1 };
            assert_eq!(
                quota.emission_interval(),
                Duration::from_micros(1),
                "{per_minute}"
            );
        }
    }
}
