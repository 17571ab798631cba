//! Redis backend. The rate limit is one Lua script (GCRA on Redis's own clock), so it is atomic and
//! agrees across any number of platform replicas without clock synchronisation.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{Cache, CacheError, Quota, RateDecision};

/// KEYS[1]: the limiter key. ARGV[1]: emission interval (µs). ARGV[2]: burst.
/// Stores the theoretical arrival time (TAT) and returns {allowed, remaining, reset_us, retry_us}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), new_tat - now, 0}
";

pub struct RedisCache {
    connection: ConnectionManager,
    prefix: String,
    gcra: Script,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn cache_error(err: &redis::RedisError) -> CacheError {
    CacheError(format!("redis: {err}"))
}

fn micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}

impl RedisCache {
    /// Connects with a managed, auto-reconnecting multiplexed connection. Every key is put under
    /// `prefix`, so deployments (or test runs) can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, CacheError> {
        let client = redis::Client::open(url).map_err(|err| cache_error(&err))?;
        // Quick to give up and quick to come back: while Redis is away the replica's own cache stands
        // in (see `ResilientCache`), and the connection is re-established on the next attempt.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(super::resilient::REDIS_TIMEOUT))
            .set_response_timeout(Some(super::resilient::REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(super::resilient::RETRY_AFTER);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|err| cache_error(&err))?;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            gcra: Script::new(GCRA),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait::async_trait]
impl Cache for RedisCache {
    async fn rate_limit(&self, key: &str, quota: Quota) -> Result<RateDecision, CacheError> {
        let interval = i64::try_from(quota.emission_interval().as_micros()).unwrap_or(i64::MAX);
        let mut connection = self.connection.clone();
        let (allowed, remaining, reset_us, retry_us): (i64, i64, i64, i64) = self
            .gcra
            .key(self.key(&format!("rl:{key}")))
            .arg(interval)
            .arg(quota.burst.max(1))
            .invoke_async(&mut connection)
            .await
            .map_err(|err| cache_error(&err))?;
        Ok(RateDecision {
            allowed: allowed == 1,
            limit: quota.per_minute,
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset_after: micros(reset_us),
            retry_after: micros(retry_us),
        })
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut connection = self.connection.clone();
        connection
            .get(self.key(key))
            .await
            .map_err(|err| cache_error(&err))
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        connection
            .pset_ex(self.key(key), value, ttl_ms)
            .await
            .map_err(|err| cache_error(&err))
    }

    async fn delete(&self, key: &str) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        connection
            .del(self.key(key))
            .await
            .map_err(|err| cache_error(&err))
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(|err| cache_error(&err))
    }
}
