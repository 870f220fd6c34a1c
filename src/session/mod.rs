//! A client session: one client WebSocket, its turns one after another, and the upstream
//! connection it holds. The loop never blocks on either peer: client frames, upstream events,
//! room in the client socket, a finished dial and the timers are all awaited together, so a
//! disconnect or a new request is seen at once (TP-3) and a slow client only slows the upstream
//! read (TP-2).

mod admit;
mod handle;
mod http_turn;
pub mod outbox;
mod passthrough;
mod policy;
mod pump;
mod record;
pub mod transcript;
pub mod turn;

use std::sync::Arc;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::config::Config;
use crate::error::RelayError;
use crate::protocol::client::CreateRequest;
use crate::state::StateStore;
use crate::telemetry::metric;
use crate::upstream::{Identity, Lease, Pool, UpFrame};
use crate::usage::Recorder;

use admit::Admitted;
use outbox::Outbox;
use record::Read;
use transcript::{Transcript, TranscriptBudget};
use turn::Turn;

/// Who is on the client side of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A client WebSocket: pinged, closed when idle (WS-8).
    WebSocket,
    /// The HTTP ingress's channels: no pings; the ingress ends the session after
    /// `session.http_session_ttl` (HS-2).
    Http,
}

impl ClientKind {
    /// The gauge of open sessions of this kind: sockets, or HTTP sessions (which hold no
    /// socket between requests).
    fn gauge(self) -> &'static str {
        match self {
            ClientKind::WebSocket => metric::CLIENT_SOCKETS_OPEN,
            ClientKind::Http => metric::HTTP_SESSIONS_OPEN,
        }
    }
}

/// What a session is started with.
pub struct SessionParams {
    pub kind: ClientKind,
    /// The config when the session started: its own timings and limits.
    pub cfg: Arc<Config>,
    /// The config in force now (reloads swap it): keys and accounts are read from it per turn.
    pub current: Arc<parking_lot::RwLock<Arc<Config>>>,
    /// Ticks at every applied reload, so the session re-checks its key (WS-8).
    pub reloads: tokio::sync::watch::Receiver<u64>,
    pub pool: Arc<Pool>,
    pub budget: Arc<TranscriptBudget>,
    pub key_id: String,
    pub identity: Identity,
    pub id: u64,
    /// The session's name in usage records, unique across restarts.
    pub tag: String,
    pub usage: Arc<Recorder>,
    pub state: Arc<dyn StateStore>,
    /// The per-turn account choice (SC-2), with the operators' overrides (TM-3) and the
    /// accounts' health (SC-5).
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    /// Per-key limits (SC-6).
    pub limits: Arc<crate::limits::Limits>,
    /// The socket's place among its key's open sockets (SC-6), held for the session's life.
    pub socket_slot: Option<crate::state::Slot>,
    /// The client for `http` accounts (one pool of upstream connections per relay).
    pub http: reqwest::Client,
    /// Cancelled when the relay starts draining (OP-2): an idle socket closes with 1012, a
    /// running turn finishes first.
    pub drain: tokio_util::sync::CancellationToken,
    /// Cancelled when the drain time is over: the socket closes with 1012 at once.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Whatever woke the session loop.
enum Wake {
    Client(Option<Result<Message, tungstenite::Error>>),
    /// Everything queued for the client is flushed (or the client is gone).
    Flushed(Result<(), tungstenite::Error>),
    Dialed(Result<Result<Admitted, RelayError>, tokio::task::JoinError>),
    Upstream(Option<UpFrame>),
    /// A frame of the running turn's upstream HTTP request.
    Http(Option<UpFrame>),
    /// No upstream event of the running turn within `upstream.stream_idle_timeout`.
    Silence,
    Ping,
    /// The relay started draining (OP-2).
    Drain,
    Shutdown,
    /// The config was reloaded: is this session's key still there?
    Reloaded,
    /// No first frame within `session.first_message_timeout`, or no request within
    /// `session.idle_timeout` (WS-8).
    Idle,
}

/// What the loop does next.
enum Step {
    Go,
    /// Close the client socket with this code and reason.
    Close(u16, &'static str),
    /// The client is gone; nothing more can be sent.
    Gone,
    /// The first request chose a `passthrough` account: the socket is relayed from now on.
    Passthrough(Box<passthrough::Handover>),
}

struct Session {
    p: SessionParams,
    /// The session's span: every turn's span is its child, never the previous turn's (a
    /// preemption starts the next turn while the cut one's span is entered).
    span: tracing::Span,
    out: Outbox,
    last_model: Option<String>,
    last_response_id: Option<String>,
    upstream: Option<Lease>,
    /// The running turn's upstream request on an `http` account.
    http: Option<crate::upstream::http::HttpTurn>,
    /// The running turn's admission (slot, context) while it waits or dials.
    dialing: Option<tokio::task::JoinHandle<Result<Admitted, RelayError>>>,
    /// The session's context while its turn waits for a slot.
    waiting_lease: Option<Lease>,
    /// Requests waiting behind the running turn (TP-5 `queue`).
    queued: std::collections::VecDeque<(CreateRequest, Read)>,
    turn: Option<Turn>,
    /// Errors for frames that arrived during the running turn, sent after its terminal (§3).
    held: Vec<RelayError>,
    turns: u64,
    last_heard: Instant,
    /// Whether the client sent any frame yet (WS-8's first-message timeout).
    first_frame: bool,
    /// When the last request was read or the last turn ended (WS-8's idle timeout).
    last_request: Instant,
    /// When the running turn's upstream counts as silent (CT-9), while the relay waits on it.
    silent_at: Option<Instant>,
    /// Every item of the conversation so far, for replays (CT-2); `None` when it is not
    /// complete (evicted, over its bound, or the chain started elsewhere).
    transcript: Option<Transcript>,
    /// `x-codex-turn-state` from an upstream handshake, sent on this session's later dials.
    upstream_turn_state: Option<axum::http::HeaderValue>,
    /// The account of the session's last turn: its next turn goes there while it is
    /// eligible (SC-2).
    sticky: Option<String>,
    /// The relay is shutting down: a turn cut now is recorded as `shutdown`.
    shutting_down: bool,
    /// A reload removed or disabled this session's key: it closes after its running turn.
    revoked: bool,
    /// The relay is draining (OP-2): the session closes with 1012 once no turn runs.
    draining: bool,
    /// A store write the client must not see past (a stored response's binding on a shared
    /// store, SC-7): awaited before the outbox is flushed.
    before_flush: Option<futures::future::BoxFuture<'static, ()>>,
}

/// Runs a session until the client leaves or is closed.
pub async fn run<S>(p: SessionParams, ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    run_io(p, sink, stream).await
}

/// Runs a session over any pair of frame streams: a client WebSocket, or the HTTP ingress's
/// in-process channels (one session per HTTP session key, HS-2).
pub async fn run_io<Si, St>(p: SessionParams, sink: Si, stream: St)
where
    Si: futures::Sink<Message, Error = tungstenite::Error> + Send + 'static,
    St: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin + Send,
{
    let span = tracing::info_span!("session", id = p.id, key = %p.key_id);
    run_session(p, sink, stream).instrument(span).await
}

async fn run_session<Si, St>(p: SessionParams, sink: Si, mut stream: St)
where
    Si: futures::Sink<Message, Error = tungstenite::Error> + Send + 'static,
    St: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin + Send,
{
    let open = p.kind.gauge();
    metrics::gauge!(open).increment(1.0);
    let out = Outbox::new(sink, p.cfg.session.pump_channel);
    let every = p.cfg.session.client_ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut s = Session {
        p,
        span: tracing::Span::current(),
        out,
        last_model: None,
        last_response_id: None,
        upstream: None,
        http: None,
        dialing: None,
        waiting_lease: None,
        queued: std::collections::VecDeque::new(),
        turn: None,
        held: Vec::new(),
        turns: 0,
        last_heard: Instant::now(),
        first_frame: false,
        last_request: Instant::now(),
        silent_at: None,
        transcript: Some(Transcript::default()),
        upstream_turn_state: None,
        sticky: None,
        shutting_down: false,
        revoked: false,
        draining: false,
        before_flush: None,
    };
    let mut reloads = s.p.reloads.clone();
    let (drain, shutdown) = (s.p.drain.clone(), s.p.shutdown.clone());
    // One timer each for upstream silence and for WS-8's idle limits, moved only when their
    // deadline changes: every event pushes `silent_at` forward, and re-registering a timer per
    // event would cost more than the event.
    let silence = tokio::time::sleep_until(Instant::now() + every);
    tokio::pin!(silence);
    let idle = tokio::time::sleep_until(s.idle_at());
    tokio::pin!(idle);
    let end = loop {
        if let Some(at) = s.silent_at.filter(|at| *at < silence.deadline()) {
            silence.as_mut().reset(at);
        }
        if s.turn.is_none() && idle.deadline() != s.idle_at() {
            let at = s.idle_at();
            idle.as_mut().reset(at);
        }
        if let Some(write) = s.before_flush.take() {
            write.await;
        }
        // What the last pass queued goes out now, from this task; what the socket does not take
        // yet is waited for below.
        if s.out.busy() && flush_now(&mut s.out).await.is_err() {
            break Step::Gone;
        }
        let wake = tokio::select! {
            m = stream.next() => Wake::Client(m),
            r = s.out.drain(), if s.out.busy() => Wake::Flushed(r),
            r = dial_done(&mut s.dialing), if s.dialing.is_some() => Wake::Dialed(r),
            f = next_event(&mut s.upstream), if s.upstream.is_some() && !s.out.has_pending() => Wake::Upstream(f),
            f = next_http(&mut s.http), if s.http.is_some() && !s.out.has_pending() => Wake::Http(f),
            _ = &mut silence, if s.silent_at.is_some() && !s.out.has_pending() => Wake::Silence,
            _ = ping.tick(), if s.p.kind == ClientKind::WebSocket => Wake::Ping,
            _ = drain.cancelled(), if !s.draining => Wake::Drain,
            _ = shutdown.cancelled() => Wake::Shutdown,
            r = reloads.changed(), if !s.revoked => match r {
                Ok(()) => Wake::Reloaded,
                Err(_) => Wake::Shutdown,
            },
            _ = &mut idle, if s.turn.is_none() && s.p.kind == ClientKind::WebSocket => Wake::Idle,
        };
        let wake = match (wake, s.silent_at) {
            // Fired for a deadline that events have since pushed back: wait for the new one.
            (Wake::Silence, Some(at)) if at > Instant::now() => {
                silence.as_mut().reset(at);
                continue;
            }
            (wake, _) => wake,
        };
        // OP-3: what a turn's wake logs is in its span; without a turn the session's is current.
        let handled = match s.turn.as_ref().map(|t| t.span.clone()) {
            Some(span) => s.handle(wake).instrument(span).await,
            None => s.handle(wake).await,
        };
        let step = match handled {
            Step::Go => s.next_queued().await,
            other => other,
        };
        if !matches!(step, Step::Go) {
            break step;
        }
    };
    let end = match end {
        // Boxed: the passthrough's dial and relay loop would otherwise size every session's
        // future, idle ones included.
        Step::Passthrough(h) => Box::pin(s.passthrough(&mut stream, *h)).await,
        other => other,
    };
    let (budget, id) = (s.p.budget.clone(), s.p.id);
    s.end(end).await;
    budget.remove(id);
    metrics::gauge!(open).decrement(1.0);
}

impl Session {
    /// The running turn's span (OP-3), else the session's: where what happens now is logged.
    fn turn_span(&self) -> tracing::Span {
        self.turn
            .as_ref()
            .map_or_else(tracing::Span::current, |t| t.span.clone())
    }
}

/// One non-blocking write-and-flush attempt (the task is woken when the socket has room).
async fn flush_now(out: &mut Outbox) -> Result<(), tungstenite::Error> {
    std::future::poll_fn(|cx| match out.poll_drain(cx) {
        std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
        _ => std::task::Poll::Ready(Ok(())),
    })
    .await
}

async fn dial_done(
    dialing: &mut Option<tokio::task::JoinHandle<Result<Admitted, RelayError>>>,
) -> Result<Result<Admitted, RelayError>, tokio::task::JoinError> {
    match dialing {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn next_http(http: &mut Option<crate::upstream::http::HttpTurn>) -> Option<UpFrame> {
    match http {
        Some(turn) => turn.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_event(upstream: &mut Option<Lease>) -> Option<UpFrame> {
    match upstream {
        Some(conn) => conn.events.recv().await,
        None => std::future::pending().await,
    }
}
