//! What relay instances on one shared store tell each other about accounts (SC-7): an opened
//! breaker and a 429 cooldown are published as bindings that last as long as they do, and
//! every instance reads them back, with the operators' overrides, every [`SYNC_EVERY`]. The
//! half-open probing after a cooldown stays each instance's own.

use std::sync::Arc;
use std::time::Duration;

use super::health::Health;
use super::Scheduler;
use crate::state::StateStore;

/// How often an instance reads what the others published.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Breaker,
    Cooldown,
}

impl Kind {
    fn name(self, account: &str) -> String {
        match self {
            Kind::Breaker => format!("health:{account}:breaker"),
            Kind::Cooldown => format!("health:{account}:cooldown"),
        }
    }
}

/// Publishes `account` out for `wait`. The value is the wall-clock end (ms since the epoch)
/// and a nonce, so each publication is told apart and the publisher never re-applies its own.
pub fn publish(
    health: &Health,
    store: Arc<dyn StateStore>,
    account: &str,
    kind: Kind,
    wait: Duration,
) {
    let until =
        crate::usage::now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
    let value = format!("{until}:{:016x}", rand::random::<u64>());
    let name = kind.name(account);
    health.seen.lock().insert(name.clone(), value.clone());
    tokio::spawn(async move {
        if let Err(e) = store.bind(&name, &value, wait).await {
            tracing::warn!(error = %e, binding = name, "account state not shared");
        }
    });
}

/// One round: the store's overrides into the registry, and the other instances' breakers and
/// cooldowns for `accounts` into this instance's health.
pub async fn sync(scheduler: &Scheduler, store: &dyn StateStore, accounts: &[String]) {
    let version = scheduler.registry.version();
    match store.overrides().await {
        Ok(all) => scheduler.registry.replace_since(version, all),
        Err(e) => tracing::debug!(error = %e, "shared overrides not read"),
    }
    for account in accounts {
        for kind in [Kind::Breaker, Kind::Cooldown] {
            let name = kind.name(account);
            let Ok(Some(value)) = store.bound(&name).await else {
                continue;
            };
            if let Some(left) = news(&scheduler.health, &name, value) {
                match kind {
                    Kind::Breaker => scheduler.health.opened_elsewhere(account, left),
                    Kind::Cooldown => scheduler.health.cooled_elsewhere(account, left),
                }
            }
        }
    }
}

/// How much of a publication not seen here before is left; `None` for one already applied or
/// published here, or already over.
fn news(health: &Health, name: &str, value: String) -> Option<Duration> {
    let mut seen = health.seen.lock();
    if seen.get(name) == Some(&value) {
        return None;
    }
    let until: i64 = value.split(':').next()?.parse().ok()?;
    seen.insert(name.to_string(), value);
    let left = until.checked_sub(crate::usage::now_ms())?;
    (left > 0).then(|| Duration::from_millis(left.unsigned_abs()))
}

/// Runs [`sync`] every [`SYNC_EVERY`] until `stop`, for the accounts configured at each round.
pub async fn run(
    scheduler: Arc<Scheduler>,
    store: Arc<dyn StateStore>,
    accounts: impl Fn() -> Vec<String> + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        sync(&scheduler, store.as_ref(), &accounts()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Registry;
    use crate::state::{MemoryStore, Override};

    /// Two schedulers on one store stand for two instances (the store need not be Redis for
    /// the exchange itself; `tests/shared_state.rs` runs it on Redis).
    fn instance(store: &Arc<dyn StateStore>) -> Scheduler {
        let registry = Arc::new(Registry::default());
        let health = Arc::new(Health::new(registry.clone(), store.clone()));
        Scheduler { registry, health }
    }

    #[tokio::test]
    async fn sc7_a_breaker_opened_on_one_instance_is_open_on_the_other_once() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let (a, b) = (instance(&store), instance(&store));
        let wait = Duration::from_secs(30);
        super::publish(&a.health, store.clone(), "x", Kind::Breaker, wait);
        tokio::task::yield_now().await;
        let accounts = vec!["x".to_string()];
        sync(&b, store.as_ref(), &accounts).await;
        assert_eq!(b.health.view("x").breaker, "open");
        sync(&a, store.as_ref(), &accounts).await;
        assert_eq!(
            a.health.view("x").breaker,
            "closed",
            "its own is not re-applied"
        );
        // A success on `b` closes it there; the same publication does not open it again.
        b.health.success("x", None);
        sync(&b, store.as_ref(), &accounts).await;
        assert_eq!(b.health.view("x").breaker, "closed");
        super::publish(&a.health, store.clone(), "x", Kind::Cooldown, wait);
        tokio::task::yield_now().await;
        sync(&b, store.as_ref(), &accounts).await;
        assert!(b.health.view("x").cooldown_ms.is_some());
        assert!(b.health.available("x").is_none());
    }

    #[tokio::test]
    async fn sc7_overrides_are_read_back_unless_changed_here_meanwhile() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let a = instance(&store);
        let off = Override {
            enabled: Some(false),
            ..Override::default()
        };
        store.set_override("x", off.clone()).await.unwrap();
        sync(&a, store.as_ref(), &[]).await;
        assert!(!a.registry.enabled("x"));
        let stale = a.registry.version();
        a.registry.set("x", Override::default());
        a.registry
            .replace_since(stale, [("x".to_string(), off)].into());
        assert!(
            a.registry.enabled("x"),
            "a change made here wins over an older read"
        );
    }
}
