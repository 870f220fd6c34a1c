//! The `redis` backend (SC-7): the same state as `memory`, shared by every relay instance that
//! points at one Redis. Each operation that reads and then writes is one Lua script, so two
//! instances never both take the last slot or both pass a rate limit. Time inside the scripts is
//! the Redis server's, so the instances' clocks need not agree.
//!
//! Slots are expiring leases: a sorted set per scope, scored by expiry. A holder renews its
//! lease while it holds the slot ([`super::Slot`] does this every third of the TTL), so a crashed
//! instance's slots free themselves within the TTL.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands, Script};
use deadpool_redis::{Config, Pool, Runtime};
use futures::future::BoxFuture;
use futures::FutureExt;

use super::overrides::Override;
use super::{SlotId, StateError, StateStore, WindowVerdict};

/// Server time in ms, for the scripts.
const NOW: &str = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)";

/// KEYS: scope. ARGV: ttl ms, limit, slot id. Returns 1 when the slot is taken, 0 when all are.
const ACQUIRE: &str = "
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1";

/// KEYS: scope. ARGV: slot id, ttl ms. Extends the lease, writing it again when it was gone
/// (run out during a pause, or lost with a Redis restart: the turn holding it is still running,
/// so the count must include it). Returns 1 when the lease was still there.
const RENEW: &str = "
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
if not exp or tonumber(exp) <= now then return 0 end
return 1";

/// KEYS: scope. Returns the slots held now.
const HELD: &str = "
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])";

/// KEYS: window, sequence. ARGV: window ms, amount, limit (-1: none).
/// Returns {allowed 0|1, total, retry after ms}. Members are `seq:amount`, scored by time.
const WINDOW: &str = "
local w = tonumber(ARGV[1]) local amount = tonumber(ARGV[2]) local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - w)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local function amount_of(m) return tonumber(string.match(m, ':(%d+)$')) end
local total = 0
for i = 1, #entries, 2 do total = total + amount_of(entries[i]) end
local need = math.max(amount, 1)
if limit >= 0 and total + need > limit then
  local left = total local at = now
  for i = 1, #entries, 2 do
    if left + need <= limit then break end
    left = left - amount_of(entries[i])
    at = tonumber(entries[i + 1]) + w
  end
  return {0, total, at - now}
end
if amount > 0 then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[1], now, seq .. ':' .. amount)
  redis.call('PEXPIRE', KEYS[1], w)
  redis.call('PEXPIRE', KEYS[2], w)
end
return {1, total + amount, 0}";

/// Connections to Redis per instance: every turn start takes one for a round trip, and a turn
/// must not wait for another's (deadpool's default is 4 per core).
const POOL_SIZE: usize = 64;

/// Shared state in Redis.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    lease_ttl: Duration,
    /// Every key starts with it, so several deployments (or tests) can share one Redis.
    prefix: String,
    acquire: Script,
    renew: Script,
    held: Script,
    window: Script,
}

impl RedisStore {
    /// A store on `url` (e.g. `redis://127.0.0.1:6379`) whose keys start with `prefix:`. No
    /// connection is made yet: an unreachable Redis shows up as errors of the calls.
    pub fn new(url: &str, prefix: &str, lease_ttl: Duration) -> Result<RedisStore, StateError> {
        let mut cfg = Config::from_url(url);
        cfg.pool = Some(deadpool_redis::PoolConfig::new(POOL_SIZE));
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StateError(format!("redis pool for {url}: {e}")))?;
        let script = |body: &str| Script::new(&format!("{NOW}\n{body}"));
        Ok(RedisStore {
            pool,
            lease_ttl,
            prefix: prefix.to_string(),
            acquire: script(ACQUIRE),
            renew: script(RENEW),
            held: script(HELD),
            window: script(WINDOW),
        })
    }

    /// Gives a slot back and answers once Redis has it (a failure is logged: the lease runs
    /// out by itself within its TTL).
    pub async fn release_now(&self, scope: &str, slot: SlotId) {
        let key = self.key(&format!("slots:{scope}"));
        let done = match self.conn().await {
            Ok(mut c) => c.zrem::<_, _, ()>(&key, slot).await.map_err(redis_err),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, scope = %key, "slot release not written to redis");
        }
    }

    /// Whether Redis answers (`PING`).
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
            .map_err(redis_err)
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, StateError> {
        self.pool
            .get()
            .await
            .map_err(|e| StateError(format!("redis: {e}")))
    }
}

fn redis_err(e: redis::RedisError) -> StateError {
    StateError(format!("redis: {e}"))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl StateStore for RedisStore {
    fn try_acquire<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<SlotId>, StateError>> {
        async move {
            let mut c = self.conn().await?;
            // Random, so ids stay unique across instances and Redis restarts; above 2^32, so
            // they never meet the `memory` backend's counted ids (see `fallback`).
            let id: SlotId = rand::random_range(1u64 << 32..1u64 << 52);
            let taken: u64 = self
                .acquire
                .key(self.key(&format!("slots:{scope}")))
                .arg(ms(ttl))
                .arg(limit)
                .arg(id)
                .invoke_async(&mut c)
                .await
                .map_err(redis_err)?;
            Ok((taken == 1).then_some(id))
        }
        .boxed()
    }

    fn release(&self, scope: &str, slot: SlotId) {
        let (store, scope) = (self.clone(), scope.to_string());
        tokio::spawn(async move { store.release_now(&scope, slot).await });
    }

    fn renew<'a>(
        &'a self,
        scope: &'a str,
        slot: SlotId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        async move {
            let mut c = self.conn().await?;
            let held: u64 = self
                .renew
                .key(self.key(&format!("slots:{scope}")))
                .arg(slot)
                .arg(ms(ttl))
                .invoke_async(&mut c)
                .await
                .map_err(redis_err)?;
            Ok(held == 1)
        }
        .boxed()
    }

    fn leases_expire(&self) -> bool {
        true
    }

    fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn shared(&self) -> bool {
        true
    }

    fn held<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<usize, StateError>> {
        async move {
            let mut c = self.conn().await?;
            self.held
                .key(self.key(&format!("slots:{scope}")))
                .invoke_async(&mut c)
                .await
                .map_err(redis_err)
        }
        .boxed()
    }

    fn released<'a>(&'a self, _scope: &'a str) -> BoxFuture<'a, ()> {
        // No release hint across instances: waiters re-check on their own schedule.
        std::future::pending().boxed()
    }

    fn bind<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        async move {
            let mut c = self.conn().await?;
            c.pset_ex::<_, _, ()>(self.key(&format!("bind:{name}")), value, ms(ttl))
                .await
                .map_err(redis_err)
        }
        .boxed()
    }

    fn bound<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<String>, StateError>> {
        async move {
            let mut c = self.conn().await?;
            c.get(self.key(&format!("bind:{name}")))
                .await
                .map_err(redis_err)
        }
        .boxed()
    }

    fn window<'a>(
        &'a self,
        name: &'a str,
        window: Duration,
        amount: u64,
        limit: Option<u64>,
    ) -> BoxFuture<'a, Result<WindowVerdict, StateError>> {
        async move {
            let mut c = self.conn().await?;
            let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
            let (allowed, total, retry): (u64, u64, u64) = self
                .window
                .key(self.key(&format!("win:{name}")))
                .key(self.key(&format!("win:{name}:seq")))
                .arg(ms(window))
                .arg(amount)
                .arg(limit)
                .invoke_async(&mut c)
                .await
                .map_err(redis_err)?;
            Ok(WindowVerdict {
                allowed: allowed == 1,
                total,
                retry_after: Duration::from_millis(retry),
            })
        }
        .boxed()
    }

    fn counter_add<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StateError>> {
        async move {
            let mut c = self.conn().await?;
            let key = self.key(&format!("count:{name}"));
            if amount == 0 {
                let v: Option<u64> = c.get(&key).await.map_err(redis_err)?;
                return Ok(v.unwrap_or(0));
            }
            let (total, _): (u64, ()) = redis::pipe()
                .atomic()
                .incr(&key, amount)
                .pexpire(&key, i64::try_from(ms(ttl)).unwrap_or(i64::MAX))
                .query_async(&mut c)
                .await
                .map_err(redis_err)?;
            Ok(total)
        }
        .boxed()
    }

    fn counter_seed<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        async move {
            let mut c = self.conn().await?;
            let opts = redis::SetOptions::default()
                .conditional_set(redis::ExistenceCheck::NX)
                .with_expiration(redis::SetExpiry::PX(ms(ttl)));
            let set: Option<String> = c
                .set_options(self.key(&format!("count:{name}")), amount, opts)
                .await
                .map_err(redis_err)?;
            Ok(set.is_some())
        }
        .boxed()
    }

    fn overrides(&self) -> BoxFuture<'_, Result<HashMap<String, Override>, StateError>> {
        async move {
            let mut c = self.conn().await?;
            let raw: HashMap<String, String> =
                c.hgetall(self.key("overrides")).await.map_err(redis_err)?;
            raw.into_iter()
                .map(|(id, json)| {
                    serde_json::from_str(&json)
                        .map(|o| (id, o))
                        .map_err(|e| StateError(format!("override in redis: {e}")))
                })
                .collect()
        }
        .boxed()
    }

    fn set_override<'a>(
        &'a self,
        account: &'a str,
        o: Override,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        async move {
            let mut c = self.conn().await?;
            let key = self.key("overrides");
            if o.is_empty() {
                c.hdel::<_, _, ()>(&key, account).await.map_err(redis_err)
            } else {
                let json = serde_json::to_string(&o).map_err(|e| StateError(e.to_string()))?;
                c.hset::<_, _, _, ()>(&key, account, json)
                    .await
                    .map_err(redis_err)
            }
        }
        .boxed()
    }
}

#[cfg(test)]
#[path = "redis_tests.rs"]
mod tests;
