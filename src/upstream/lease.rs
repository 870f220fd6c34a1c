//! A session's hold on a pooled context, from the turn that leased it until the session lets it
//! go. Between turns the context stays *parked* with the session (UP-1) but another session may
//! take it (UP-6); from then on this lease is void: every method is a no-op or refuses, because
//! the context, its connection and its events belong to the taker.

use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{self, UpEnd, UpFrame};
use super::pool::{Context, Pool};
use crate::error::RelayError;

/// A session's hold on a context. Dropping it returns the context to the pool, open, unless
/// the lease went void.
pub struct Lease {
    pub ctx: Arc<Context>,
    pub generation: u64,
    pub events: mpsc::Receiver<UpFrame>,
    /// Tells this lease from any later one on the same context.
    token: u64,
    session: u64,
    sink: Arc<tokio::sync::Mutex<conn::WsSink>>,
    pool: Arc<Pool>,
}

impl Lease {
    pub(super) fn new(
        ctx: Arc<Context>,
        generation: u64,
        token: u64,
        session: u64,
        events: mpsc::Receiver<UpFrame>,
        sink: Arc<tokio::sync::Mutex<conn::WsSink>>,
        pool: Arc<Pool>,
    ) -> Lease {
        Lease {
            ctx,
            generation,
            events,
            token,
            session,
            sink,
            pool,
        }
    }

    pub fn account_id(&self) -> &str {
        &self.ctx.account_id
    }

    /// Starts a turn on the held context: true only if this lease still holds it (not taken),
    /// on the same open connection, younger than `upstream.max_age`. An older connection is
    /// closed here, between turns (UP-5); on false the session leases again (CT-2 replay).
    pub fn begin_turn(&self) -> bool {
        let mut st = self.ctx.st.lock();
        if !st.held_by(self.token) {
            return false;
        }
        let Some(live) = st.live_of(self.generation) else {
            return false;
        };
        if live.opened.elapsed() >= self.pool.settings.max_age {
            self.pool.retire(&self.ctx, &mut st, &UpEnd::MaxAge);
            return false;
        }
        st.in_turn = true;
        true
    }

    /// Parks the context between turns: it stays with the session but may be taken (UP-6).
    pub fn end_turn(&self) {
        let mut st = self.ctx.st.lock();
        if !st.held_by(self.token) || !st.in_turn {
            return;
        }
        st.in_turn = false;
        st.idle_since = Instant::now();
        drop(st);
        self.ctx.freed.notify_waiters();
    }

    /// Writes one request frame (in a turn: the context cannot be taken meanwhile).
    pub async fn send_text(&mut self, text: String) -> Result<(), RelayError> {
        if !self.ctx.st.lock().held_by(self.token) {
            return Err(RelayError::upstream_lost(
                "the upstream context was taken by another session",
            ));
        }
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
        (st.held_by(self.token) && st.generation == self.generation)
            .then(|| st.holds.clone())
            .flatten()
    }

    pub fn set_holds(&self, id: Option<String>) {
        let mut st = self.ctx.st.lock();
        if st.held_by(self.token) && st.generation == self.generation {
            st.holds = id;
        }
    }

    /// The upstream's `x-codex-turn-state` from this connection's handshake (WS-7), only when
    /// the connection was dialed for this session: a warm or taken context's belongs to no one.
    pub fn turn_state(&self) -> Option<axum::http::HeaderValue> {
        let st = self.ctx.st.lock();
        if st.dialed_for != Some(self.session) || !st.held_by(self.token) {
            return None;
        }
        st.live_of(self.generation)
            .and_then(|l| l.turn_state.clone())
    }

    /// Whether the lease still holds the context and its connection is the current open one.
    pub fn is_open(&self) -> bool {
        let st = self.ctx.st.lock();
        st.held_by(self.token) && st.live_of(self.generation).is_some()
    }

    /// Closes the lease's connection at once (a verdict of the session: silence, an upstream
    /// error). The context stays and is redialed on demand.
    pub fn break_connection(&self, end: UpEnd) {
        let mut st = self.ctx.st.lock();
        if st.held_by(self.token) && st.live_of(self.generation).is_some() {
            self.pool.close_locked(&self.ctx, &mut st, &end);
        }
    }

    /// TP-4: the client left or preempted mid-turn. The upstream connection is closed at once
    /// (there is no cancel event): a Close frame goes out now and the socket is dropped when
    /// the peer answers or `grace` has passed, without making the caller wait. Never the
    /// account's fault; the context is given back and redialed on demand.
    pub fn cancel(self, grace: Duration) {
        let mut st = self.ctx.st.lock();
        if st.held_by(self.token) && st.live_of(self.generation).is_some() {
            self.pool
                .retire_with(&self.ctx, &mut st, &UpEnd::Abandoned, grace);
        }
        drop(st);
        // Dropping the lease now gives the context back.
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.ctx, self.token);
    }
}
