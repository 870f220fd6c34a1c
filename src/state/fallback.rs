//! The `redis` backend as the relay runs it (SC-7): Redis while it answers, this instance's
//! memory while it does not. An outage costs one failed call (refused at once, or cut at
//! [`OP_TIMEOUT`]); from then on every call goes to memory without waiting on Redis, a probe
//! pings it every [`PROBE_EVERY`], and the first answer switches back.
//!
//! What was written to memory during the outage and matters after it is carried over on the
//! way back: operators' overrides, and spend charged to counters. Slots taken from memory stay
//! there until released (their turns end soon); bindings made meanwhile are found by this
//! instance only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;

use super::overrides::Override;
use super::redis::RedisStore;
use super::{MemoryStore, SlotId, StateError, StateStore, WindowVerdict};
use crate::telemetry::metric;

/// A Redis call that takes longer counts as an outage.
const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an unreachable Redis is tried again.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Slot ids from Redis are at least this (see `RedisStore`); smaller ones came from memory.
const REDIS_IDS: SlotId = 1 << 32;

/// Redis with this instance's memory behind it.
pub struct FallbackStore {
    redis: RedisStore,
    memory: Arc<MemoryStore>,
    link: Arc<Link>,
    waiting: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

/// Whether Redis answers, and what to hand over when it does again.
struct Link {
    up: AtomicBool,
    wake_probe: tokio::sync::Notify,
    /// Overrides set during the outage, written to Redis before it is used again.
    overrides: Mutex<HashMap<String, Override>>,
    /// Counter amounts added during the outage, added to Redis's on the way back.
    counters: Mutex<HashMap<String, (u64, Duration)>>,
}

impl FallbackStore {
    /// Starts on Redis (the first failed call says otherwise) with the probe task running.
    pub fn new(redis: RedisStore, memory: Arc<MemoryStore>) -> FallbackStore {
        let link = Arc::new(Link {
            up: AtomicBool::new(true),
            wake_probe: tokio::sync::Notify::new(),
            overrides: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        });
        metrics::gauge!(metric::STATE_DEGRADED).set(0.0);
        tokio::spawn(probe(Arc::downgrade(&link), redis.clone()));
        FallbackStore {
            redis,
            memory,
            link,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// The waiters for `scope`'s Redis slots on this instance. A release wakes one of them, not
    /// all: each woken waiter costs a Redis call, and only one can take the slot.
    fn waiters(&self, scope: &str) -> Arc<tokio::sync::Notify> {
        self.waiting
            .lock()
            .entry(scope.to_string())
            .or_default()
            .clone()
    }

    fn up(&self) -> bool {
        self.link.up.load(Ordering::Acquire)
    }

    /// Runs `call` on Redis while it is up; on an error or a timeout, marks it down and
    /// answers `None` so the caller uses memory.
    async fn on_redis<T>(
        &self,
        what: &str,
        call: BoxFuture<'_, Result<T, StateError>>,
    ) -> Option<T> {
        if !self.up() {
            return None;
        }
        let e = match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => e.0,
            Err(_) => format!("no answer within {OP_TIMEOUT:?}"),
        };
        self.went_down(what, &e);
        None
    }

    /// Redis's answer while it is up, else memory's (`memory` is only called then).
    fn either<'a, T: Send + 'a>(
        &'a self,
        what: &'a str,
        redis: BoxFuture<'a, Result<T, StateError>>,
        memory: impl FnOnce() -> BoxFuture<'a, Result<T, StateError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StateError>> {
        async move {
            match self.on_redis(what, redis).await {
                Some(v) => Ok(v),
                None => memory().await,
            }
        }
        .boxed()
    }

    fn went_down(&self, what: &str, error: &str) {
        if self.link.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                during = what,
                error,
                "redis unreachable: limits and bindings fall back to this instance's memory"
            );
            metrics::gauge!(metric::STATE_DEGRADED).set(1.0);
            metrics::counter!(metric::STATE_OUTAGES).increment(1);
            self.link.wake_probe.notify_one();
        }
    }
}

/// Pings Redis while it is down; when it answers, hands over what the outage left in memory
/// and switches back. Ends with the store.
async fn probe(link: Weak<Link>, redis: RedisStore) {
    loop {
        let Some(l) = link.upgrade() else { return };
        if l.up.load(Ordering::Acquire) {
            // Re-checked now and then, so the task sees the store go away.
            let _ = tokio::time::timeout(Duration::from_secs(5), l.wake_probe.notified()).await;
            continue;
        }
        drop(l);
        tokio::time::sleep(PROBE_EVERY).await;
        if tokio::time::timeout(OP_TIMEOUT, redis.ping())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            let Some(l) = link.upgrade() else { return };
            if hand_over(&l, &redis).await {
                l.up.store(true, Ordering::Release);
                metrics::gauge!(metric::STATE_DEGRADED).set(0.0);
                tracing::info!("redis answers again: shared state restored");
            }
        }
    }
}

/// Writes the outage's overrides and counter amounts to Redis; false (to try again at the next
/// probe) when it fails half-way. What was written is not written twice.
async fn hand_over(link: &Link, redis: &RedisStore) -> bool {
    let overrides: Vec<_> = link.overrides.lock().drain().collect();
    for (i, (account, o)) in overrides.iter().enumerate() {
        if redis.set_override(account, o.clone()).await.is_err() {
            link.overrides.lock().extend(overrides[i..].iter().cloned());
            return false;
        }
    }
    let counters: Vec<_> = link.counters.lock().drain().collect();
    for (i, (name, (amount, ttl))) in counters.iter().enumerate() {
        if redis.counter_add(name, *amount, *ttl).await.is_err() {
            let mut back = link.counters.lock();
            for (name, (amount, ttl)) in &counters[i..] {
                back.entry(name.clone()).or_insert((0, *ttl)).0 += amount;
            }
            return false;
        }
    }
    true
}

impl StateStore for FallbackStore {
    fn try_acquire<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<SlotId>, StateError>> {
        self.either(
            "take a slot",
            self.redis.try_acquire(scope, limit, ttl),
            move || self.memory.try_acquire(scope, limit, ttl),
        )
    }

    fn release(&self, scope: &str, slot: SlotId) {
        if slot >= REDIS_IDS {
            // While Redis is down, its lease runs out by itself. Once Redis has the release, one
            // waiter of this instance looks again at once; other instances' within `RECHECK`.
            let (redis, wake) = (self.redis.clone(), self.waiters(scope));
            let (up, scope) = (self.up(), scope.to_string());
            tokio::spawn(async move {
                if up {
                    redis.release_now(&scope, slot).await;
                }
                wake.notify_one();
            });
        } else {
            self.memory.release(scope, slot);
        }
    }

    fn renew<'a>(
        &'a self,
        scope: &'a str,
        slot: SlotId,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        async move {
            if slot < REDIS_IDS {
                return Ok(true);
            }
            // After an outage the renewal writes the lease again, so the count includes it.
            let call = self.redis.renew(scope, slot, ttl);
            Ok(self.on_redis("renew a slot", call).await.unwrap_or(true))
        }
        .boxed()
    }

    fn leases_expire(&self) -> bool {
        true
    }

    fn lease_ttl(&self) -> Duration {
        self.redis.lease_ttl()
    }

    fn shared(&self) -> bool {
        true
    }

    fn degraded(&self) -> bool {
        !self.up()
    }

    fn held<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<usize, StateError>> {
        self.either("count slots", self.redis.held(scope), move || {
            self.memory.held(scope)
        })
    }

    fn released<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, ()> {
        if !self.up() {
            return self.memory.released(scope);
        }
        // Releases made here are told (see `release`); other instances' are found by the
        // waiters' re-checks.
        let mut notified = Box::pin(self.waiters(scope).notified_owned());
        notified.as_mut().enable();
        notified.boxed()
    }

    fn bind<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        self.either("bind", self.redis.bind(name, value, ttl), move || {
            self.memory.bind(name, value, ttl)
        })
    }

    fn bound<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<String>, StateError>> {
        async move {
            match self
                .on_redis("read a binding", self.redis.bound(name))
                .await
            {
                Some(Some(v)) => Ok(Some(v)),
                // Not in Redis: perhaps bound here during an outage.
                _ => self.memory.bound(name).await,
            }
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
        self.either(
            "check a rate",
            self.redis.window(name, window, amount, limit),
            move || self.memory.window(name, window, amount, limit),
        )
    }

    fn counter_add<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StateError>> {
        async move {
            let call = self.redis.counter_add(name, amount, ttl);
            if let Some(total) = self.on_redis("add to a counter", call).await {
                return Ok(total);
            }
            if amount > 0 {
                let mut owed = self.link.counters.lock();
                let c = owed.entry(name.to_string()).or_insert((0, ttl));
                *c = (c.0 + amount, ttl);
            }
            self.memory.counter_add(name, amount, ttl).await
        }
        .boxed()
    }

    fn counter_seed<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        self.either(
            "seed a counter",
            self.redis.counter_seed(name, amount, ttl),
            move || self.memory.counter_seed(name, amount, ttl),
        )
    }

    fn overrides(&self) -> BoxFuture<'_, Result<HashMap<String, Override>, StateError>> {
        self.either("read overrides", self.redis.overrides(), move || {
            self.memory.overrides()
        })
    }

    fn set_override<'a>(
        &'a self,
        account: &'a str,
        o: Override,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        async move {
            // Kept in the embedded store too, for a start while Redis is down.
            self.memory.set_override(account, o.clone()).await?;
            let call = self.redis.set_override(account, o.clone());
            if self.on_redis("store an override", call).await.is_none() {
                self.link.overrides.lock().insert(account.to_string(), o);
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
#[path = "fallback_tests.rs"]
mod tests;
