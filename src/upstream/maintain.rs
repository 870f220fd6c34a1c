//! The pool's background upkeep: per account, `upstream.min_idle` warm contexts that no session
//! holds are kept dialed (UP-7) with the account's headers only — no session caused the dial,
//! so none lends its identity (WS-7) — never beyond `max_conns`; idle connections older than
//! `upstream.max_age` are closed and then refilled (UP-5). Each pass also refreshes the
//! per-account context gauges, so the hot path never pays for them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::UpEnd;
use super::pool::{Context, Pool};
use super::Identity;
use crate::config::{AccountConfig, AccountMode};

/// The longest time between two passes: a warm context that broke is refilled within it even
/// with a long `upstream.ping_interval`.
const MAX_TICK: Duration = Duration::from_secs(1);

/// The shortest time between two passes when woken early, so an upstream that closes every
/// connection right after its handshake cannot make the task spin.
const MIN_GAP: Duration = Duration::from_millis(50);

impl Pool {
    /// The accounts whose contexts the upkeep task tends (only `ctx_pool` ones pool).
    pub fn set_accounts(&self, accounts: &[AccountConfig]) {
        *self.warm.lock() = accounts
            .iter()
            .filter(|a| a.mode == AccountMode::CtxPool)
            .cloned()
            .collect();
        self.maintain.notify_one();
    }

    /// Starts the upkeep task: a pass every `min(upstream.ping_interval, 1s)` and whenever a
    /// context broke or was given back. It stops with `stop` or when the pool is dropped.
    pub fn start_maintenance(self: &Arc<Self>, stop: CancellationToken) -> Option<JoinHandle<()>> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let every = self.settings.ping_interval.min(MAX_TICK);
        let task = upkeep(Arc::downgrade(self), self.maintain.clone(), every, stop);
        Some(rt.spawn(task))
    }

    /// One pass over every tended account.
    pub(super) async fn maintain_once(&self) {
        let accounts = self.warm.lock().clone();
        for account in &accounts {
            self.retire_old_idle(&account.id);
            self.warm_up(account).await;
        }
        self.publish_gauges();
    }

    /// UP-5 for contexts nobody holds: an idle connection past `upstream.max_age` is closed.
    fn retire_old_idle(&self, account_id: &str) {
        for ctx in self.contexts_of(account_id) {
            let mut st = ctx.st.lock();
            let old = st
                .live
                .as_ref()
                .is_some_and(|l| l.opened.elapsed() >= self.settings.max_age);
            if old && st.holder.is_none() && !st.dialing {
                self.retire(&ctx, &mut st, &UpEnd::MaxAge);
            }
        }
    }

    /// UP-7: dials contexts nobody holds until `min_idle` are open (or dialing).
    async fn warm_up(&self, account: &AccountConfig) {
        let slots = self.reserve_warm(account);
        let dials = slots.iter().map(|ctx| async move {
            if ctx.st.lock().holder.is_some() {
                return; // a session claimed it meanwhile and dials it itself
            }
            let id = Identity::default();
            if let Err(e) = self.ensure_open(ctx, account, &id, None).await {
                tracing::warn!(account = %account.id, error = %e.message, "warm dial failed");
            }
        });
        futures::future::join_all(dials).await;
    }

    /// The contexts to warm now: closed ones nobody holds, then new ones within `max_conns`.
    fn reserve_warm(&self, account: &AccountConfig) -> Vec<Arc<Context>> {
        let mut accounts = self.accounts.lock();
        let entry = accounts.entry(account.id.clone()).or_default();
        let warm = |c: &Arc<Context>| {
            let st = c.st.lock();
            st.holder.is_none() && (st.live.is_some() || st.dialing)
        };
        let have = entry.list.iter().filter(|c| warm(c)).count();
        let need = self.settings.min_idle.saturating_sub(have);
        let mut out: Vec<Arc<Context>> = entry
            .list
            .iter()
            .filter(|c| {
                let st = c.st.lock();
                st.holder.is_none() && st.live.is_none() && !st.dialing
            })
            .take(need)
            .cloned()
            .collect();
        while out.len() < need && entry.list.len() < account.max_conns {
            let c = self.new_context(&account.id, &entry.freed);
            entry.list.push(c.clone());
            out.push(c);
        }
        out
    }

    fn contexts_of(&self, account_id: &str) -> Vec<Arc<Context>> {
        let accounts = self.accounts.lock();
        accounts
            .get(account_id)
            .map(|a| a.list.clone())
            .unwrap_or_default()
    }
}

async fn upkeep(pool: Weak<Pool>, wake: Arc<Notify>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = wake.notified() => {}
        }
        let started = Instant::now();
        let Some(p) = pool.upgrade() else {
            return;
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = p.maintain_once() => {}
        }
        drop(p);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(started + MIN_GAP) => {}
        }
    }
}
