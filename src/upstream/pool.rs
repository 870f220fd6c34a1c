//! The upstream context pool (SPEC §7): per account up to `max_conns` contexts, each an
//! upstream WebSocket that outlives the sessions using it. A session leases a context at the
//! start of a turn and keeps it across its turns (UP-1); between turns the context is *parked*
//! with the session, and when the session ends it goes back idle, still open, so the next
//! session reuses it instead of dialing.
//!
//! At `max_conns` a lease takes the least recently used context parked with another session
//! (UP-6; that session's lease goes void and it continues via CT-2), and when every context is
//! in a turn it waits until one frees up, up to its deadline (SC-3). A context is never taken
//! during a turn.
//!
//! Every dial bumps the context's generation (UP-2). A verdict about a connection (it ended, a
//! ping went unanswered, the session gave up on it) names the generation it is about, and only
//! the current generation is acted on, so a late verdict never kills a fresh connection. Every
//! lease carries a token of its own, so a void lease can never touch the context it lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::conn::{self, ConnSettings, Live, TaskCount, UpEnd};
pub use super::stats::{metric_names, ContextView, PoolCounts};
use super::{Identity, Lease};
use crate::config::AccountConfig;
use crate::error::{RelayError, Side};
use crate::telemetry::metric;

/// One context: a slot for an upstream connection of one account.
pub struct Context {
    pub id: u64,
    pub account_id: String,
    pub(super) st: Mutex<CtxState>,
    /// Held while dialing, so concurrent dials for one context become one (UP-8).
    dialing: tokio::sync::Mutex<()>,
    /// The account's wake-up for leases waiting for capacity (SC-3).
    pub(super) freed: Arc<Notify>,
}

/// Who holds a context: a session, through the lease with this token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holder {
    pub session: u64,
    pub token: u64,
}

pub(super) struct CtxState {
    /// Generation of the newest dial (0: never dialed).
    pub generation: u64,
    pub live: Option<Live>,
    pub holder: Option<Holder>,
    /// A turn runs on it: it cannot be taken (UP-6).
    pub in_turn: bool,
    /// The session that held it last (affinity for its next lease).
    pub last_session: Option<u64>,
    /// The response the upstream connection's cache holds (CT-1).
    pub holds: Option<String>,
    /// Since when it is parked or idle (least recently used goes first).
    pub idle_since: Instant,
    /// A dial for it is under way.
    pub dialing: bool,
    /// The session whose identity the current connection was dialed with (None: a warm dial).
    pub dialed_for: Option<u64>,
}

impl CtxState {
    pub(super) fn held_by(&self, token: u64) -> bool {
        self.holder.is_some_and(|h| h.token == token)
    }

    /// The current connection, if it is of `generation`.
    pub(super) fn live_of(&self, generation: u64) -> Option<&Live> {
        self.live.as_ref().filter(|l| l.generation == generation)
    }
}

/// The contexts of one account and the wake-up of its waiting leases.
#[derive(Default)]
pub(super) struct AccountContexts {
    pub list: Vec<Arc<Context>>,
    pub freed: Arc<Notify>,
}

/// All contexts of all accounts.
pub struct Pool {
    pub(super) settings: ConnSettings,
    pub(super) accounts: Mutex<HashMap<String, AccountContexts>>,
    /// The accounts the background task keeps warm (UP-7).
    pub(super) warm: Mutex<Vec<AccountConfig>>,
    /// Wakes the background task early (a connection broke, a context was given back).
    pub(super) maintain: Arc<Notify>,
    next_id: AtomicU64,
    next_token: AtomicU64,
    pub(super) waiting: AtomicUsize,
    pub(super) tasks: TaskCount,
    /// TM-4: accounts whose WebSocket keeps failing send new turns over http for a while.
    pub fallback: super::fallback::Fallback,
    /// Where dial failures and failing connections are counted (SC-5, UP-8).
    pub health: Arc<crate::scheduler::health::Health>,
    me: Weak<Pool>,
}

impl Pool {
    /// A connection of its own for one client socket (TM-1 `passthrough`): not pooled, never
    /// leased to anyone else, counted with the pool's connection tasks.
    pub async fn dial_dedicated(
        &self,
        account: &AccountConfig,
        identity: &Identity,
    ) -> Result<Live, RelayError> {
        metrics::counter!(metric::UPSTREAM_DIALS, "account" => account.id.clone()).increment(1);
        conn::open(account, identity, &self.settings, 1, &self.tasks, |_, _| {}).await
    }

    pub fn new(settings: ConnSettings, health: Arc<crate::scheduler::health::Health>) -> Arc<Pool> {
        Arc::new_cyclic(|me| Pool {
            settings,
            accounts: Mutex::default(),
            warm: Mutex::default(),
            maintain: Arc::default(),
            next_id: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            waiting: AtomicUsize::new(0),
            tasks: TaskCount::default(),
            fallback: super::fallback::Fallback::new(3, std::time::Duration::from_secs(30)),
            health,
            me: me.clone(),
        })
    }

    /// Leases a context of `account` for a turn of `session` (the lease starts in a turn): the
    /// session's own context, else an open one nobody holds, else a closed or new one within
    /// `max_conns` (dialed with the session's identity, WS-7), else the least recently used one
    /// parked with another session (UP-6), else it waits for one until `deadline` and then
    /// answers 503 `no_capacity` (SC-3). Events arrive in a channel of `depth` frames.
    pub async fn lease(
        &self,
        account: &AccountConfig,
        session: u64,
        identity: &Identity,
        depth: usize,
        deadline: Instant,
    ) -> Result<Lease, RelayError> {
        let (ctx, token) = self.claim_or_wait(account, session, deadline).await?;
        let mut guard = LeaseGuard {
            pool: self,
            ctx: ctx.clone(),
            token,
            armed: true,
        };
        let generation = self
            .ensure_open(&ctx, account, identity, Some(session))
            .await?;
        let (tx, events) = mpsc::channel(depth.max(1));
        let sink = {
            let st = ctx.st.lock();
            let live = st
                .live_of(generation)
                .filter(|_| st.held_by(token))
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
        Ok(Lease::new(
            ctx, generation, token, session, events, sink, pool,
        ))
    }

    /// Claims a context, waiting for one to free up until `deadline` (SC-3).
    async fn claim_or_wait(
        &self,
        account: &AccountConfig,
        session: u64,
        deadline: Instant,
    ) -> Result<(Arc<Context>, u64), RelayError> {
        let freed = self.freed(&account.id);
        let mut waiting = None;
        loop {
            let notified = freed.notified();
            tokio::pin!(notified);
            // Registered before the claim, so a context freed in between still wakes us.
            notified.as_mut().enable();
            if let Some(claimed) = self.claim(account, session) {
                return Ok(claimed);
            }
            waiting.get_or_insert_with(|| WaitGuard::new(&self.waiting));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        metrics::counter!(metric_names::UPSTREAM_NO_CAPACITY, "account" => account.id.clone())
            .increment(1);
        Err(
            RelayError::new(Side::Internal, 503, "server_error", "no_capacity").message(format!(
                "All {} upstream connections of account {} stayed in use for session.admission_timeout.",
                account.max_conns, account.id
            )),
        )
    }

    fn freed(&self, account_id: &str) -> Arc<Notify> {
        let mut accounts = self.accounts.lock();
        let entry = accounts.entry(account_id.to_string()).or_default();
        entry.freed.clone()
    }

    /// Picks a context for `session` and marks it held and in a turn, with a fresh lease token;
    /// `None` when every context of the account is in a turn.
    pub(super) fn claim(
        &self,
        account: &AccountConfig,
        session: u64,
    ) -> Option<(Arc<Context>, u64)> {
        let mut accounts = self.accounts.lock();
        let entry = accounts.entry(account.id.clone()).or_default();
        let ctx = match pick_free(&entry.list, session) {
            Some(c) => c,
            None if entry.list.len() < account.max_conns => {
                let c = self.new_context(&account.id, &entry.freed);
                entry.list.push(c.clone());
                c
            }
            None => pick_to_take(&entry.list, session)?,
        };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut st = ctx.st.lock();
        if let Some(old) = st.holder.filter(|h| h.session != session) {
            // UP-6: taken between the other session's turns; cold for the taker.
            tracing::info!(ctx = ctx.id, from = old.session, to = session, account = %account.id, "parked context taken");
            metrics::counter!(metric_names::UPSTREAM_TAKEN, "account" => account.id.clone())
                .increment(1);
            st.holds = None;
        }
        if let Some(live) = st.live.as_ref() {
            // Whoever held it before gets nothing more.
            *live.route.lock() = None;
        }
        st.holder = Some(Holder { session, token });
        st.in_turn = true;
        st.last_session = Some(session);
        drop(st);
        Some((ctx, token))
    }

    pub(super) fn new_context(&self, account_id: &str, freed: &Arc<Notify>) -> Arc<Context> {
        Arc::new(Context {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            account_id: account_id.to_string(),
            st: Mutex::new(CtxState {
                generation: 0,
                live: None,
                holder: None,
                in_turn: false,
                last_session: None,
                holds: None,
                idle_since: Instant::now(),
                dialing: false,
                dialed_for: None,
            }),
            dialing: tokio::sync::Mutex::new(()),
            freed: freed.clone(),
        })
    }

    /// Makes sure the context has an open connection younger than `upstream.max_age` (UP-5);
    /// returns its generation. `session` is whose identity a dial carries (None: warm, UP-7).
    pub(super) async fn ensure_open(
        &self,
        ctx: &Arc<Context>,
        account: &AccountConfig,
        identity: &Identity,
        session: Option<u64>,
    ) -> Result<u64, RelayError> {
        let _dialing = ctx.dialing.lock().await;
        let generation = {
            let mut st = ctx.st.lock();
            if let Some(live) = st.live.as_ref() {
                if live.opened.elapsed() < self.settings.max_age {
                    metrics::counter!(metric::UPSTREAM_REUSES, "account" => account.id.clone())
                        .increment(1);
                    return Ok(live.generation);
                }
                self.retire(ctx, &mut st, &UpEnd::MaxAge);
            }
            st.generation += 1;
            st.holds = None;
            st.dialed_for = session;
            st.generation
        };
        metrics::counter!(metric::UPSTREAM_DIALS, "account" => account.id.clone()).increment(1);
        let flag = DialFlag::new(ctx);
        let (me, ctx_id, account_id) = (self.me.clone(), ctx.id, account.id.clone());
        let live = conn::open(
            account,
            identity,
            &self.settings,
            generation,
            &self.tasks,
            move |generation, end| {
                if let Some(pool) = me.upgrade() {
                    pool.verdict(&account_id, ctx_id, generation, &end);
                }
            },
        )
        .await
        .inspect_err(|e| {
            if super::fallback::dial_counts(e) {
                self.fallback.failure(&account.id);
            }
            // UP-8: every failed dial counts against the account (a 401/403 disables it, a
            // 429 cools it down), warm dials included.
            self.health.refused(&account.id, e);
        })?;
        let mut st = ctx.st.lock();
        if live.is_finished() {
            return Err(RelayError::upstream_lost(
                "upstream connection ended right after its handshake",
            ));
        }
        st.live = Some(live);
        st.dialing = false;
        drop(st);
        flag.disarm();
        Ok(generation)
    }

    /// A connection of `generation` is gone or must go: acted on only for the current one.
    pub fn verdict(&self, account_id: &str, ctx_id: u64, generation: u64, end: &UpEnd) {
        let Some(ctx) = self.find(account_id, ctx_id) else {
            return;
        };
        let mut st = ctx.st.lock();
        if st.generation != generation || st.live_of(generation).is_none() {
            tracing::debug!(
                ctx = ctx_id,
                generation,
                current = st.generation,
                "stale verdict ignored"
            );
            return;
        }
        if super::fallback::end_counts(end) {
            // TM-4's failures count toward the breaker too; other ends of a connection in a
            // turn are counted by its session, which knows whether it cut the turn itself.
            self.fallback.failure(account_id);
            self.health.failure(account_id, &end.describe());
        }
        self.close_locked(&ctx, &mut st, end);
    }

    /// Drops the context's connection at once (it is broken, or the session gave up on it).
    pub(super) fn close_locked(&self, ctx: &Context, st: &mut CtxState, end: &UpEnd) {
        tracing::info!(ctx = ctx.id, generation = st.generation, account = %ctx.account_id, reason = %end.describe(), "upstream context broken");
        metrics::counter!(metric::UPSTREAM_BROKEN, "reason" => end_reason(end)).increment(1);
        st.live = None;
        st.holds = None;
        self.maintain.notify_one();
    }

    /// Takes the context's connection out and closes it politely in the background (a Close
    /// frame, then the socket within `grace`); the context is redialed on demand.
    pub(super) fn retire_with(
        &self,
        ctx: &Context,
        st: &mut CtxState,
        end: &UpEnd,
        grace: std::time::Duration,
    ) {
        let Some(live) = st.live.take() else {
            return;
        };
        tracing::info!(ctx = ctx.id, generation = live.generation, account = %ctx.account_id, reason = %end.describe(), "upstream context closed");
        metrics::counter!(metric::UPSTREAM_BROKEN, "reason" => end_reason(end)).increment(1);
        st.holds = None;
        live.close(grace);
        self.maintain.notify_one();
    }

    /// The relay's own replacement of a connection (UP-5). A peer answers a Close about as fast
    /// as a ping, so the pong timeout bounds the wait.
    pub(super) fn retire(&self, ctx: &Context, st: &mut CtxState, end: &UpEnd) {
        self.retire_with(ctx, st, end, self.settings.pong_timeout);
    }

    /// Gives the context back if `token` still holds it: idle, open, and free for anyone.
    pub(super) fn release(&self, ctx: &Context, token: u64) {
        let mut st = ctx.st.lock();
        if !st.held_by(token) {
            return;
        }
        if let Some(live) = st.live.as_ref() {
            *live.route.lock() = None;
        }
        st.holder = None;
        st.in_turn = false;
        st.idle_since = Instant::now();
        drop(st);
        ctx.freed.notify_waiters();
        self.maintain.notify_one();
    }

    fn find(&self, account_id: &str, ctx_id: u64) -> Option<Arc<Context>> {
        self.accounts
            .lock()
            .get(account_id)?
            .list
            .iter()
            .find(|c| c.id == ctx_id)
            .cloned()
    }

    pub(super) fn all_contexts(&self) -> Vec<Arc<Context>> {
        let accounts = self.accounts.lock();
        accounts
            .values()
            .flat_map(|a| a.list.iter().cloned())
            .collect()
    }
}

/// The best context free for `session`: its own open one, else the least recently used open
/// one nobody holds, else a closed one nobody holds (its own first). A context parked with
/// `session` itself counts as free for it.
fn pick_free(list: &[Arc<Context>], session: u64) -> Option<Arc<Context>> {
    let mut best: Option<((u8, Instant), &Arc<Context>)> = None;
    for c in list {
        let st = c.st.lock();
        let free = match st.holder {
            None => true,
            Some(h) => h.session == session && !st.in_turn,
        };
        if !free {
            continue;
        }
        let mine = st.last_session == Some(session);
        let rank = match (st.live.is_some(), mine) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        let key = (rank, st.idle_since);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, c));
        }
    }
    best.map(|(_, c)| c.clone())
}

/// UP-6: the context to take from another session between its turns: a closed one first (its
/// session lost nothing), else the least recently used. Never one in a turn.
fn pick_to_take(list: &[Arc<Context>], session: u64) -> Option<Arc<Context>> {
    let mut best: Option<((bool, Instant), &Arc<Context>)> = None;
    for c in list {
        let st = c.st.lock();
        if st.in_turn || st.holder.is_none_or(|h| h.session == session) {
            continue;
        }
        let key = (st.live.is_some(), st.idle_since);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, c));
        }
    }
    best.map(|(_, c)| c.clone())
}

pub(super) fn end_reason(end: &UpEnd) -> &'static str {
    match end {
        UpEnd::Closed { .. } => "closed",
        UpEnd::Io(_) => "io",
        UpEnd::TooBig => "too_big",
        UpEnd::NoPong => "no_pong",
        UpEnd::Silent => "stream_idle_timeout",
        UpEnd::Abandoned => "client_cancelled",
        UpEnd::MaxAge => "max_age",
    }
}

/// Gives a claimed context back if leasing fails half-way (or is cancelled).
struct LeaseGuard<'a> {
    pool: &'a Pool,
    ctx: Arc<Context>,
    token: u64,
    armed: bool,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.release(&self.ctx, self.token);
        }
    }
}

/// Marks a context as dialing for as long as the dial runs (even if it fails or is
/// cancelled).
struct DialFlag<'a>(Option<&'a Context>);

impl<'a> DialFlag<'a> {
    fn new(ctx: &'a Context) -> Self {
        ctx.st.lock().dialing = true;
        DialFlag(Some(ctx))
    }

    /// The dial stored its connection (and cleared the flag under the same lock).
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DialFlag<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.0 {
            ctx.st.lock().dialing = false;
        }
    }
}

/// Counts a lease as waiting for capacity while it does.
struct WaitGuard<'a>(&'a AtomicUsize);

impl<'a> WaitGuard<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        WaitGuard(n)
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "pool_turn_tests.rs"]
mod turn_tests;
