//! Shared state behind one interface (SC-7): what several relay instances must agree on lives
//! in a [`StateStore`]. The `memory` backend keeps it in this process; a networked backend
//! (Redis) implements the same trait, which is why every call is async and fallible.
//!
//! It holds concurrency slots (per-account turn slots, SC-3; per-key turns and sockets, SC-6),
//! the bindings of stored responses to their accounts (SC-2), sliding windows and counters for
//! per-key rates and spend (SC-6), the operators' overrides (TM-3), and the breakers' open
//! periods that instances tell each other (SC-5).

pub mod fallback;
mod memory;
pub mod overrides;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

pub use memory::MemoryStore;
pub use overrides::Override;

use std::collections::HashMap;

/// A slot taken from a scope; names it for `release`.
pub type SlotId = u64;

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(pub String);

/// The interface every backend implements.
pub trait StateStore: Send + Sync + 'static {
    /// Takes one of `limit` slots of `scope`, held for `ttl` unless renewed or released;
    /// `None` when all are taken.
    fn try_acquire<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<SlotId>, StateError>>;

    /// Gives a slot back. Never waits: a networked backend sends it in the background.
    fn release(&self, scope: &str, slot: SlotId);

    /// Extends a held slot's lease by `ttl`; false when it had already run out.
    fn renew<'a>(
        &'a self,
        _scope: &'a str,
        _slot: SlotId,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>> {
        futures::FutureExt::boxed(futures::future::ready(Ok(true)))
    }

    /// Whether a held slot must be renewed to stay held (a shared backend's leases run out, so
    /// a crashed instance cannot hold slots forever).
    fn leases_expire(&self) -> bool {
        false
    }

    /// How long a slot lease lasts unless renewed (`state.lease_ttl`).
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// Whether other relay instances share this state, so what they change must be read back
    /// (overrides, breakers) rather than known.
    fn shared(&self) -> bool {
        false
    }

    /// Whether the shared backend is unreachable and this instance serves from its own memory
    /// (SC-7).
    fn degraded(&self) -> bool {
        false
    }

    /// Slots of `scope` held now.
    fn held<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<usize, StateError>>;

    /// Resolves when a slot of `scope` may have been released: a hint, the caller re-checks.
    fn released<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, ()>;

    /// Binds `name` to `value` for `ttl` (SC-2: a stored response's account).
    fn bind<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StateError>>;

    /// What `name` is bound to, while its binding lasts.
    fn bound<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<String>, StateError>>;

    /// Sliding window `name` of length `window`: when `limit` is set and the amounts in the
    /// window plus `max(amount, 1)` would exceed it, nothing is added and the answer says how
    /// long until they would not; else `amount` is added now (SC-6).
    fn window<'a>(
        &'a self,
        name: &'a str,
        window: Duration,
        amount: u64,
        limit: Option<u64>,
    ) -> BoxFuture<'a, Result<WindowVerdict, StateError>>;

    /// Adds `amount` to counter `name` (kept `ttl` after its last change) and answers the new
    /// total; `amount` 0 reads it.
    fn counter_add<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<u64, StateError>>;

    /// Sets counter `name` to `amount` (kept `ttl`) unless it exists; true when it was set. Seeds
    /// a counter from what this instance recorded, without adding it twice to a shared one.
    fn counter_seed<'a>(
        &'a self,
        name: &'a str,
        amount: u64,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StateError>>;

    /// Every account override (TM-3).
    fn overrides(&self) -> BoxFuture<'_, Result<HashMap<String, Override>, StateError>>;

    /// Stores `account`'s override; an empty one is the same as clearing it.
    fn set_override<'a>(
        &'a self,
        account: &'a str,
        o: Override,
    ) -> BoxFuture<'a, Result<(), StateError>>;
}

/// How often a waiter re-checks a scope even without a release hint (a backend may not be
/// able to tell every release, e.g. a lease that expired on another instance).
const RECHECK: Duration = Duration::from_millis(100);

/// The answer of [`StateStore::window`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowVerdict {
    pub allowed: bool,
    /// The amounts in the window after the call.
    pub total: u64,
    /// When refused: how long until the same call would pass.
    pub retry_after: Duration,
}

/// A held slot; released when dropped, and renewed every third of its TTL meanwhile when the
/// backend's leases run out.
pub struct Slot {
    store: Arc<dyn StateStore>,
    scope: String,
    id: SlotId,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({} #{})", self.scope, self.id)
    }
}

impl Slot {
    /// Wraps a slot taken with `try_acquire` for `ttl`, so it is kept while held and released
    /// when dropped.
    pub fn new(store: Arc<dyn StateStore>, scope: String, id: SlotId, ttl: Duration) -> Slot {
        let renewal = store
            .leases_expire()
            .then(|| tokio::spawn(renew(store.clone(), scope.clone(), id, ttl)));
        Slot {
            store,
            scope,
            id,
            renewal,
        }
    }
}

/// Renews a held slot's lease every third of its TTL until the slot is dropped.
async fn renew(store: Arc<dyn StateStore>, scope: String, id: SlotId, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        match store.renew(&scope, id, ttl).await {
            Ok(true) => {}
            // Written again by the renewal: the turn still holds it.
            Ok(false) => tracing::warn!(scope, slot = id, "slot lease had run out; taken again"),
            // Tried again at the next tick; the lease may still be alive.
            Err(e) => tracing::warn!(scope, error = %e, "slot lease not renewed"),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        self.store.release(&self.scope, self.id);
    }
}

/// Takes a slot of `scope`, waiting until `deadline` for one to free up; `None` at the
/// deadline.
pub async fn acquire(
    store: &Arc<dyn StateStore>,
    scope: &str,
    limit: usize,
    ttl: Duration,
    deadline: Instant,
) -> Result<Option<Slot>, StateError> {
    loop {
        // Listen before looking, so a release between the two is not missed.
        let hint = store.released(scope);
        if let Some(id) = store.try_acquire(scope, limit, ttl).await? {
            return Ok(Some(Slot::new(store.clone(), scope.to_string(), id, ttl)));
        }
        let recheck = (Instant::now() + RECHECK).min(deadline);
        tokio::select! {
            _ = hint => {}
            _ = tokio::time::sleep_until(recheck) => {}
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// Runs a write to the store now when the backend answers at once (`memory`: it is done before
/// the caller's next step, e.g. before the client sees the terminal event), else in the
/// background (a networked backend), so the caller never waits on it.
pub fn write_soon(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let mut work = Box::pin(work);
    if futures::FutureExt::now_or_never(&mut work).is_none() {
        tokio::spawn(work);
    }
}

/// Runs a write to the store now when the backend answers at once; else answers the rest of
/// it, for a caller that must not go on before it lands (and awaits it at its next step).
pub fn write_first(
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<BoxFuture<'static, ()>> {
    let mut work = futures::FutureExt::boxed(work);
    futures::FutureExt::now_or_never(&mut work)
        .is_none()
        .then_some(work)
}

/// The binding name of a stored response, scoped to the key that created it (WS-9).
pub fn response_binding(key_id: &str, response_id: &str) -> String {
    format!("resp:{key_id}:{response_id}")
}

/// The scope of an account's turn slots (SC-3).
pub fn account_scope(account_id: &str) -> String {
    format!("account:{account_id}:turns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<dyn StateStore> {
        Arc::new(MemoryStore::default())
    }

    #[tokio::test]
    async fn sc3_slots_are_bounded_and_released_on_drop() {
        let s = store();
        let far = Instant::now() + Duration::from_secs(30);
        let ttl = Duration::from_secs(30);
        let a = acquire(&s, "x", 2, ttl, far).await.unwrap().expect("first");
        let b = acquire(&s, "x", 2, ttl, far)
            .await
            .unwrap()
            .expect("second");
        assert_eq!(s.held("x").await.unwrap(), 2);
        assert!(s.try_acquire("x", 2, ttl).await.unwrap().is_none());
        assert!(
            s.try_acquire("y", 2, ttl).await.unwrap().is_some(),
            "scopes apart"
        );
        drop(a);
        assert_eq!(s.held("x").await.unwrap(), 1);
        drop(b);
        assert_eq!(s.held("x").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn sc3_a_waiter_gets_the_slot_when_it_is_released() {
        let s = store();
        let far = Instant::now() + Duration::from_secs(30);
        let ttl = Duration::from_secs(30);
        let held = acquire(&s, "x", 1, ttl, far).await.unwrap().expect("held");
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { acquire(&s2, "x", 1, ttl, far).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let got = waiter.await.unwrap().unwrap();
        assert!(got.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn sc2_bindings_last_their_ttl_and_rebinding_extends() {
        let s = store();
        let ttl = Duration::from_secs(60);
        s.bind("r1", "a", ttl).await.unwrap();
        s.bind("r2", "b", Duration::from_secs(10)).await.unwrap();
        assert_eq!(s.bound("r1").await.unwrap().as_deref(), Some("a"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.bound("r2").await.unwrap(), None, "expired");
        s.bind("r1", "a", ttl).await.unwrap();
        tokio::time::advance(Duration::from_secs(55)).await;
        s.bind("r3", "c", ttl).await.unwrap();
        assert_eq!(
            s.bound("r1").await.unwrap().as_deref(),
            Some("a"),
            "the sweep keeps a binding renewed after its first expiry"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(s.bound("r1").await.unwrap(), None);
        assert_eq!(s.bound("nope").await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn sc6_sliding_window_refuses_at_the_limit_and_says_when_it_frees() {
        let s = store();
        let minute = Duration::from_secs(60);
        for _ in 0..3 {
            assert!(s.window("w", minute, 1, Some(3)).await.unwrap().allowed);
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        let no = s.window("w", minute, 1, Some(3)).await.unwrap();
        assert_eq!((no.allowed, no.total), (false, 3));
        assert_eq!(
            no.retry_after,
            Duration::from_secs(30),
            "the oldest leaves at 60 s"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        let yes = s.window("w", minute, 1, Some(3)).await.unwrap();
        assert_eq!((yes.allowed, yes.total), (true, 3), "exactly at the edge");
        // Amounts: a check (0) passes while under the limit; charges go in without one.
        s.window("t", minute, 90, None).await.unwrap();
        assert!(s.window("t", minute, 0, Some(100)).await.unwrap().allowed);
        s.window("t", minute, 10, None).await.unwrap();
        let full = s.window("t", minute, 0, Some(100)).await.unwrap();
        assert_eq!((full.allowed, full.total), (false, 100));
        assert_eq!(full.retry_after, minute, "both charges were made at once");
    }

    #[tokio::test(start_paused = true)]
    async fn sc6_counters_add_read_and_expire() {
        let s = store();
        let ttl = Duration::from_secs(100);
        assert_eq!(s.counter_add("c", 5, ttl).await.unwrap(), 5);
        assert_eq!(s.counter_add("c", 0, ttl).await.unwrap(), 5);
        assert_eq!(s.counter_add("c", 7, ttl).await.unwrap(), 12);
        tokio::time::advance(Duration::from_secs(101)).await;
        assert_eq!(s.counter_add("c", 0, ttl).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sc3_a_waiter_gives_up_at_its_deadline() {
        let s = store();
        let ttl = Duration::from_secs(30);
        let _held = s.try_acquire("x", 1, ttl).await.unwrap().expect("held");
        let deadline = Instant::now() + Duration::from_millis(250);
        let got = acquire(&s, "x", 1, ttl, deadline).await.unwrap();
        assert!(got.is_none());
        assert!(Instant::now() >= deadline);
    }
}
