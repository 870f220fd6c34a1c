//! The upstream context pool (SPEC §7): per account up to `max_conns` contexts, each an
//! upstream WebSocket that outlives the sessions using it. A session leases a context and keeps
//! it across its turns (UP-1); when the session ends the context goes back idle, still open,
//! and the next session reuses it instead of dialing.
//!
//! Every dial bumps the context's generation (UP-2). A verdict about a connection (it ended, a
//! ping went unanswered, the session gave up on it) names the generation it is about, and only
//! the current generation is acted on, so a late verdict never kills a fresh connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{self, ConnSettings, Live, UpEnd, UpFrame};
use super::Identity;
use crate::config::AccountConfig;
use crate::error::{RelayError, Side};
use crate::telemetry::metric;

/// One context: a slot for an upstream connection of one account.
pub struct Context {
    pub id: u64,
    pub account_id: String,
    st: Mutex<CtxState>,
    /// Held while dialing, so concurrent dials for one context become one (UP-8).
    dialing: tokio::sync::Mutex<()>,
}

struct CtxState {
    /// Generation of the newest dial (0: never dialed).
    generation: u64,
    live: Option<Live>,
    leased_by: Option<u64>,
    /// The session that held it last (affinity for its next lease).
    last_session: Option<u64>,
    /// The response the upstream connection's cache holds (CT-1).
    holds: Option<String>,
    idle_since: Instant,
}

/// A context as tests and operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContextView {
    pub id: u64,
    pub account: String,
    pub generation: u64,
    pub open: bool,
    pub leased_by: Option<u64>,
}

/// All contexts of all accounts.
pub struct Pool {
    settings: ConnSettings,
    accounts: Mutex<HashMap<String, Vec<Arc<Context>>>>,
    next_id: AtomicU64,
    me: Weak<Pool>,
}

impl Pool {
    pub fn new(settings: ConnSettings) -> Arc<Pool> {
        Arc::new_cyclic(|me| Pool {
            settings,
            accounts: Mutex::default(),
            next_id: AtomicU64::new(1),
            me: me.clone(),
        })
    }

    /// Leases a context of `account` for `session`: the session's own previous context if it is
    /// idle, else any open idle one, else a closed idle one or a new one within `max_conns`
    /// (dialed with the session's identity, WS-7). Events of the lease arrive in a channel of
    /// `depth` frames.
    pub async fn lease(
        &self,
        account: &AccountConfig,
        session: u64,
        identity: &Identity,
        depth: usize,
    ) -> Result<Lease, RelayError> {
        let ctx = self.claim(account, session)?;
        let mut guard = LeaseGuard {
            pool: self,
            ctx: ctx.clone(),
            armed: true,
        };
        let generation = self.ensure_open(&ctx, account, identity).await?;
        let (tx, events) = mpsc::channel(depth.max(1));
        let sink = {
            let mut st = ctx.st.lock();
            st.last_session = Some(session);
            let live = st
                .live
                .as_ref()
                .filter(|l| l.generation == generation)
                .ok_or_else(|| {
                    RelayError::upstream_lost("upstream connection ended before its first use")
                })?;
            *live.route.lock() = Some(tx);
            live.sink.clone()
        };
        guard.armed = false;
        let pool = self
            .me
            .upgrade()
            .ok_or_else(|| RelayError::upstream_lost("pool stopped"))?;
        Ok(Lease {
            ctx,
            generation,
            events,
            sink,
            pool,
        })
    }

    /// Picks and marks the context for a session, or refuses when the account is full.
    fn claim(&self, account: &AccountConfig, session: u64) -> Result<Arc<Context>, RelayError> {
        let mut accounts = self.accounts.lock();
        let list = accounts.entry(account.id.clone()).or_default();
        let idle = |c: &&Arc<Context>| c.st.lock().leased_by.is_none();
        let open = |c: &&Arc<Context>| c.st.lock().live.is_some();
        let mine = |c: &&Arc<Context>| c.st.lock().last_session == Some(session);
        let pick = list
            .iter()
            .filter(idle)
            .find(|c| mine(c) && open(c))
            .or_else(|| {
                list.iter()
                    .filter(idle)
                    .filter(open)
                    .min_by_key(|c| c.st.lock().idle_since)
            })
            .or_else(|| list.iter().find(idle))
            .cloned();
        let ctx = match pick {
            Some(c) => c,
            None if list.len() < account.max_conns => {
                let c = Arc::new(Context {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    account_id: account.id.clone(),
                    st: Mutex::new(CtxState {
                        generation: 0,
                        live: None,
                        leased_by: None,
                        last_session: None,
                        holds: None,
                        idle_since: Instant::now(),
                    }),
                    dialing: tokio::sync::Mutex::new(()),
                });
                list.push(c.clone());
                c
            }
            None => {
                return Err(
                    RelayError::new(Side::Internal, 503, "server_error", "no_capacity").message(
                        format!(
                            "All {} upstream connections of account {} are in use.",
                            account.max_conns, account.id
                        ),
                    ),
                )
            }
        };
        ctx.st.lock().leased_by = Some(session);
        Ok(ctx)
    }

    /// Makes sure the context has an open connection; returns its generation.
    async fn ensure_open(
        &self,
        ctx: &Arc<Context>,
        account: &AccountConfig,
        identity: &Identity,
    ) -> Result<u64, RelayError> {
        let _dialing = ctx.dialing.lock().await;
        if let Some(live) = ctx.st.lock().live.as_ref() {
            metrics::counter!(metric::UPSTREAM_REUSES, "account" => account.id.clone())
                .increment(1);
            return Ok(live.generation);
        }
        let generation = {
            let mut st = ctx.st.lock();
            st.generation += 1;
            st.holds = None;
            st.generation
        };
        metrics::counter!(metric::UPSTREAM_DIALS, "account" => account.id.clone()).increment(1);
        let me = self.me.clone();
        let ctx_id = ctx.id;
        let account_id = account.id.clone();
        let live = conn::open(
            account,
            identity,
            &self.settings,
            generation,
            move |generation, end| {
                if let Some(pool) = me.upgrade() {
                    pool.verdict(&account_id, ctx_id, generation, &end);
                }
            },
        )
        .await?;
        ctx.st.lock().live = Some(live);
        Ok(generation)
    }

    /// A connection of `generation` is gone or must go: acted on only for the current one.
    pub fn verdict(&self, account_id: &str, ctx_id: u64, generation: u64, end: &UpEnd) {
        let Some(ctx) = self.find(account_id, ctx_id) else {
            return;
        };
        let mut st = ctx.st.lock();
        if st.generation != generation
            || st.live.as_ref().is_none_or(|l| l.generation != generation)
        {
            tracing::debug!(
                ctx = ctx_id,
                generation,
                current = st.generation,
                "stale verdict ignored"
            );
            return;
        }
        tracing::info!(ctx = ctx_id, generation, account = account_id, reason = %end.describe(), "upstream context broken");
        metrics::counter!(metric::UPSTREAM_BROKEN, "reason" => end_reason(end)).increment(1);
        st.live = None;
        st.holds = None;
    }

    fn release(&self, ctx: &Context, generation: u64) {
        let mut st = ctx.st.lock();
        if let Some(live) = st.live.as_ref().filter(|l| l.generation == generation) {
            *live.route.lock() = None;
        }
        st.leased_by = None;
        st.idle_since = Instant::now();
    }

    fn find(&self, account_id: &str, ctx_id: u64) -> Option<Arc<Context>> {
        self.accounts
            .lock()
            .get(account_id)?
            .iter()
            .find(|c| c.id == ctx_id)
            .cloned()
    }

    /// Every context, for tests and the admin view.
    pub fn snapshot(&self) -> Vec<ContextView> {
        let accounts = self.accounts.lock();
        let mut out: Vec<ContextView> = accounts
            .values()
            .flatten()
            .map(|c| {
                let st = c.st.lock();
                ContextView {
                    id: c.id,
                    account: c.account_id.clone(),
                    generation: st.generation,
                    open: st.live.is_some(),
                    leased_by: st.leased_by,
                }
            })
            .collect();
        out.sort_by_key(|v| v.id);
        out
    }
}

fn end_reason(end: &UpEnd) -> &'static str {
    match end {
        UpEnd::Closed { .. } => "closed",
        UpEnd::Io(_) => "io",
        UpEnd::TooBig => "too_big",
        UpEnd::NoPong => "no_pong",
        UpEnd::Silent => "stream_idle_timeout",
        UpEnd::Abandoned => "client_cancelled",
    }
}

/// Gives a claimed context back if leasing fails half-way.
struct LeaseGuard<'a> {
    pool: &'a Pool,
    ctx: Arc<Context>,
    armed: bool,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let generation = self.ctx.st.lock().generation;
            self.pool.release(&self.ctx, generation);
        }
    }
}

/// A session's hold on a context. Dropping it returns the context to the pool, open.
pub struct Lease {
    pub ctx: Arc<Context>,
    pub generation: u64,
    pub events: mpsc::Receiver<UpFrame>,
    sink: Arc<tokio::sync::Mutex<conn::WsSink>>,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn account_id(&self) -> &str {
        &self.ctx.account_id
    }

    /// Writes one request frame.
    pub async fn send_text(&mut self, text: String) -> Result<(), RelayError> {
        use futures::SinkExt;
        self.sink
            .lock()
            .await
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| RelayError::upstream_lost(format!("upstream write failed: {e}")))
    }

    /// The response the upstream connection's cache holds, if the lease's connection is current.
    pub fn holds(&self) -> Option<String> {
        let st = self.ctx.st.lock();
        (st.generation == self.generation)
            .then(|| st.holds.clone())
            .flatten()
    }

    pub fn set_holds(&self, id: Option<String>) {
        let mut st = self.ctx.st.lock();
        if st.generation == self.generation {
            st.holds = id;
        }
    }

    /// The upstream's `x-codex-turn-state` from this connection's handshake (WS-7).
    pub fn turn_state(&self) -> Option<axum::http::HeaderValue> {
        let st = self.ctx.st.lock();
        st.live
            .as_ref()
            .filter(|l| l.generation == self.generation)
            .and_then(|l| l.turn_state.clone())
    }

    /// Whether the lease's connection is still the context's open one.
    pub fn is_open(&self) -> bool {
        let st = self.ctx.st.lock();
        st.live
            .as_ref()
            .is_some_and(|l| l.generation == self.generation)
    }

    /// Closes the lease's connection at once (a verdict of the session: silence, a client that
    /// left mid-turn). The context stays and is redialed on demand.
    pub fn break_connection(&self, end: UpEnd) {
        self.pool
            .verdict(&self.ctx.account_id, self.ctx.id, self.generation, &end);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.ctx, self.generation);
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
