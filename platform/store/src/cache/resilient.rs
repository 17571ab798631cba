//! The production cache: Redis, with each replica's in-process cache standing in while Redis cannot be
//! reached. One policy for an outage, whatever asks:
//!
//! - rate limits are checked by the replica's own limiter (fail open to a per-replica limit, not to
//!   none): sign-up, login and metered calls keep working, each limit holding per replica;
//! - values are read from and written to the replica's own map (they are short-lived hints anyway);
//! - an outage is noticed once (a call that fails or takes longer than [`REDIS_TIMEOUT`]), logged once
//!   and counted on every call it diverts; Redis is tried again after [`RETRY_AFTER`], so a dead Redis
//!   costs at most one slow call per interval (one request probes; the others go on locally meanwhile),
//!   and a Redis that is back is used again without a restart.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Cache, CacheError, MemoryCache, Quota, RateDecision, RedisCache};

/// How long one Redis command may take before the replica stops waiting for it.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// How long the replica uses its own cache after Redis failed, before trying Redis again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct ResilientCache {
    redis: RedisCache,
    local: MemoryCache,
    /// Set while Redis is considered down: when to try it again.
    down_until: Mutex<Option<Instant>>,
    /// Whether a request is trying Redis again after an outage (the others do not wait for it).
    probing: AtomicBool,
}

impl ResilientCache {
    #[must_use]
    pub fn new(redis: RedisCache) -> Self {
        Self {
            redis,
            local: MemoryCache::new(),
            down_until: Mutex::new(None),
            probing: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether Redis should be asked now: it is up (`Some(false)`), or its retry time has come and
    /// this request is the one to probe it (`Some(true)`); `None` while it is down.
    fn redis_usable(&self) -> Option<bool> {
        match *self.state() {
            None => Some(false),
            Some(until) if Instant::now() < until => None,
            Some(_) => self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
                .then_some(true),
        }
    }

    fn succeeded(&self) {
        let mut state = self.state();
        if state.take().is_some() {
            metrics::gauge!("plinth_cache_degraded").set(0.0);
            tracing::info!("the cache (Redis) answers again; shared rate limits resume");
        }
    }

    fn failed(&self, operation: &'static str, err: &CacheError) {
        let mut state = self.state();
        if state.is_none() {
            metrics::gauge!("plinth_cache_degraded").set(1.0);
            tracing::error!(
                error = %err,
                operation,
                "the cache (Redis) is unreachable: rate limits hold per replica until it is back"
            );
        }
        *state = Some(Instant::now() + RETRY_AFTER);
    }

    /// Runs `call` against Redis when it is usable; `None` sends the caller to the local cache.
    async fn try_redis<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, CacheError>>,
    ) -> Option<T> {
        if let Some(probe) = self.redis_usable() {
            // The probe ends however this request does (even dropped half-way).
            let _probe = probe.then_some(Probe(&self.probing));
            let outcome = match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                Ok(outcome) => outcome,
                Err(_) => Err(CacheError(format!("redis: no answer within {REDIS_TIMEOUT:?}"))),
            };
            match outcome {
                Ok(value) => {
                    self.succeeded();
                    return Some(value);
                }
                Err(err) => self.failed(operation, &err),
            }
        }
        metrics::counter!("plinth_cache_fallbacks_total", "operation" => operation).increment(1);
        None
    }
}

/// The one request trying Redis again; lets the next one try when it ends.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[async_trait::async_trait]
impl Cache for ResilientCache {
    async fn rate_limit(&self, key: &str, quota: Quota) -> Result<RateDecision, CacheError> {
        match self
            .try_redis("rate_limit", self.redis.rate_limit(key, quota))
            .await
        {
            Some(decision) => Ok(decision),
            None => self.local.rate_limit(key, quota).await,
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self.try_redis("get", self.redis.get(key)).await {
            Some(value) => Ok(value),
            None => self.local.get(key).await,
        }
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        match self.try_redis("set", self.redis.set(key, value, ttl)).await {
            Some(()) => Ok(()),
            None => self.local.set(key, value, ttl).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        // Both: a value written locally during an outage must not outlive its deletion.
        self.local.delete(key).await?;
        self.try_redis("delete", self.redis.delete(key)).await;
        Ok(())
    }

    /// Redis itself: operators (and `plinth_cache_degraded`) see the outage the callers do not.
    async fn ping(&self) -> Result<(), CacheError> {
        match tokio::time::timeout(REDIS_TIMEOUT, self.redis.ping()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CacheError(format!("redis: no answer within {REDIS_TIMEOUT:?}"))),
        }
    }
}
