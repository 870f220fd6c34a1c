//! The `memory` backend: state of this process only, behind the same interface as a shared
//! one. A slot lives until it is released: its ttl guards against a crashed instance holding
//! shared slots forever, and here the only holder that could crash is this process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::overrides::{self, Override};
use super::{SlotId, StateError, StateStore, WindowVerdict};
use crate::usage::store::Store;

#[derive(Default)]
struct Scope {
    held: HashSet<SlotId>,
    freed: Arc<Notify>,
}

/// In-process state; overrides are also written to the embedded store when it has one.
#[derive(Default)]
pub struct MemoryStore {
    scopes: Mutex<HashMap<String, Scope>>,
    next: Mutex<SlotId>,
    overrides: Mutex<HashMap<String, Override>>,
    persist: Option<Arc<Mutex<Store>>>,
    bindings: Mutex<Bindings>,
    windows: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
    counters: Mutex<HashMap<String, (u64, Instant)>>,
}

/// Named values with an expiry, dropped lazily: an expired one reads as absent, and each bind
/// sweeps the expired ones from the front of the insertion order.
#[derive(Default)]
struct Bindings {
    values: HashMap<String, (String, Instant)>,
    order: VecDeque<(Instant, String)>,
}

impl Bindings {
    fn sweep(&mut self, now: Instant) {
        while let Some((at, name)) = self.order.front() {
            if *at > now {
                break;
            }
            // Re-bound later with a later expiry: that entry stays.
            if self.values.get(name).is_some_and(|(_, exp)| exp <= &now) {
                self.values.remove(name);
            }
            self.order.pop_front();
        }
    }
}

impl MemoryStore {
    /// The overrides held now (for the registry's first copy).
    pub fn overrides_now(&self) -> HashMap<String, Override> {
        self.overrides.lock().clone()
    }

    /// A memory store whose overrides persist in `store` (loaded from it now).
    pub fn persistent(store: Arc<Mutex<Store>>) -> Result<MemoryStore, StateError> {
        let loaded = overrides::load(&mut store.lock()).map_err(|e| StateError(e.to_string()))?;
        Ok(MemoryStore {
            overrides: Mutex::new(loaded),
            persist: Some(store),
            ..MemoryStore::default()
        })
    }

    fn next_id(&self) -> SlotId {
        let mut n = self.next.lock();
        *n += 1;
        *n
    }
}

impl StateStore for MemoryStore {
    fn try_acquire<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<SlotId>, StateError>> {
        let id = self.next_id();
        let mut scopes = self.scopes.lock();
        let s = scopes.entry(scope.to_string()).or_default();
        let got = (s.held.len() < limit).then(|| {
            s.held.insert(id);
            id
        });
        futures::future::ready(Ok(got)).boxed()
    }

    fn release(&self, scope: &str, slot: SlotId) {
        let mut scopes = self.scopes.lock();
        if let Some(s) = scopes.get_mut(scope) {
            if s.held.remove(&slot) {
                s.freed.notify_waiters();
            }
        }
    }

    fn held<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<usize, StateError>> {
        let n = self.scopes.lock().get(scope).map_or(0, |s| s.held.len());
        futures::future::ready(Ok(n)).boxed()
    }

    fn released<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, ()> {
        let freed = self
            .scopes
            .lock()
            .entry(scope.to_string())
            .or_default()
            .freed
            .clone();
        // `notified` registers on first poll: enable it now, before the caller looks.
        let mut notified = Box::pin(freed.notified_owned());
        notified.as_mut().enable();
        notified.boxed()
    }

    fn overrides(&self) -> BoxFuture<'_, Result<HashMap<String, Override>, StateError>> {
        futures::future::ready(Ok(self.overrides.lock().clone())).boxed()
    }

    fn set_override<'a>(
        &'a self,
        account: &'a str,
        o: Override,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        async move {
            if let Some(store) = self.persist.clone() {
                let (id, row) = (account.to_string(), o.clone());
                tokio::task::spawn_blocking(move || {
                    let mut s = store.lock();
                    if row.is_empty() {
                        overrides::clear(&mut s, &id)
                    } else {
                        overrides::save(&mut s, &id, &row)
                    }
                })
                .await
                .map_err(|e| StateError(e.to_string()))?
                .map_err(|e| StateError(e.to_string()))?;
            }
            let mut all = self.overrides.lock();
            if o.is_empty() {
                all.remove(account);
            } else {
                all.insert(account.to_string(), o);
            }
            Ok(())
        }
        .boxed()
    }

    fn bind<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        let now = Instant::now();
        let mut b = self.bindings.lock();
        b.sweep(now);
        b.values
            .insert(name.to_string(), (value.to_string(), now + ttl));
        b.order.push_back((now + ttl, name.to_string()));
        futures::future::ready(Ok(())).boxed()
    }

    fn bound<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<String>, StateError>> {
        let now = Instant::now();
        let b = self.bindings.lock();
        let v = b
            .values
            .get(name)
            .filter(|(_, exp)| *exp > now)
            .map(|(v, _)| v.clone());
        futures::future::ready(Ok(v)).boxed()
    }

    fn window<'a>(
        &'a self,
        name: &'a str,
        window: Duration,
        amount: u64,
        limit: Option<u64>,
    ) -> BoxFuture<'a, Result<WindowVerdict, StateError>> {
        let now = Instant::now();
        let mut all = self.windows.lock();
        let w = all.entry(name.to_string()).or_default();
        while w.front().is_some_and(|(at, _)| *at + window <= now) {
            w.pop_front();
        }
        let total: u64 = w.iter().map(|(_, n)| n).sum();
        let need = amount.max(1);
        let verdict = match limit {
            Some(limit) if total + need > limit => {
                // Until enough of the oldest amounts have left the window.
                let mut left = total;
                let mut at = now;
                for (t, n) in w.iter() {
                    if left + need <= limit {
                        break;
                    }
                    left -= n;
                    at = *t + window;
                }
                WindowVerdict {
                    allowed: false,
                    total,
                    retry_after: at.saturating_duration_since(now),
                }
            }
            _ => {
                if amount > 0 {
                    w.push_back((now, amount));
                }
                WindowVerdict {
                    allowed: true,
                    total: total + amount,
                    retry_after: Duration::ZERO,
                }
            }
        };
        if w.is_empty() {
            all.remove(name);
        }
        futures::future::ready(Ok(verdict)).boxed()
    }

    fn counter_add<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StateError>> {
        let now = Instant::now();
        let mut all = self.counters.lock();
        all.retain(|_, (_, until)| *until > now);
        let total = if amount == 0 {
            all.get(name).map_or(0, |(n, _)| *n)
        } else {
            let c = all.entry(name.to_string()).or_insert((0, now + ttl));
            c.0 += amount;
            c.1 = now + ttl;
            c.0
        };
        futures::future::ready(Ok(total)).boxed()
    }

    fn counter_seed<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        let now = Instant::now();
        let mut all = self.counters.lock();
        all.retain(|_, (_, until)| *until > now);
        let new = !all.contains_key(name);
        if new {
            all.insert(name.to_string(), (amount, now + ttl));
        }
        futures::future::ready(Ok(new)).boxed()
    }
}
