//! One upstream WebSocket: the dial (SPEC WS-7 headers, UP-8 timeout) and the connection's one
//! task for its whole life (UP-3). The task reads every frame: while a lease routes it, events
//! go into the lease's bounded channel (TP-2: a slow client slows the upstream read); while
//! idle, stray frames are dropped and logged. It pings every `upstream.ping_interval`, idle or
//! leased, and gives up on a missing pong (UP-4). However it ends, it reports one verdict
//! carrying its generation (UP-2), so the pool can ignore news about an older connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::AccountConfig;
use crate::error::{RelayError, Retry, Side};
use crate::tuning;

use super::Identity;

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type WsSink = SplitSink<WsStream, Message>;

/// What the connection task hands the lease holder.
#[derive(Debug)]
pub enum UpFrame {
    /// One event, as the upstream's own bytes.
    Event(Utf8Bytes),
    /// The connection ended; nothing follows.
    Ended(UpEnd),
}

/// How an upstream connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum UpEnd {
    Closed {
        code: Option<u16>,
        reason: String,
    },
    /// EOF without a Close frame, or an I/O or protocol error.
    Io(String),
    /// An event over `upstream.max_message_bytes`.
    TooBig,
    /// No pong within `upstream.pong_timeout`.
    NoPong,
    /// No event of a running turn within `upstream.stream_idle_timeout`.
    Silent,
    /// The relay closed it because the client left mid-turn (never the account's fault).
    Abandoned,
    /// The relay replaced it between turns: it reached `upstream.max_age` (UP-5).
    MaxAge,
}

impl UpEnd {
    pub fn describe(&self) -> String {
        match self {
            UpEnd::Closed { code, reason } => {
                format!("upstream closed the connection ({code:?} {reason})")
            }
            UpEnd::Io(e) => format!("upstream connection lost: {e}"),
            UpEnd::TooBig => "upstream sent an event over upstream.max_message_bytes".into(),
            UpEnd::NoPong => "upstream did not answer a ping within upstream.pong_timeout".into(),
            UpEnd::Silent => "no upstream event within upstream.stream_idle_timeout".into(),
            UpEnd::Abandoned => "closed by the relay: the client left mid-turn".into(),
            UpEnd::MaxAge => "closed by the relay: older than upstream.max_age".into(),
        }
    }
}

/// How connections behave (from the `upstream.*` config keys).
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub dial_timeout: Duration,
    pub max_message_bytes: usize,
    /// Older connections are replaced between turns (UP-5).
    pub max_age: Duration,
    /// Warm contexts no session holds, kept per account (UP-7).
    pub min_idle: usize,
}

/// How many connection tasks of one pool are running, for leak checks: a task counts from its
/// spawn until its future is gone (ended or aborted).
#[derive(Debug, Clone, Default)]
pub struct TaskCount(Arc<AtomicUsize>);

impl TaskCount {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn enter(&self) -> TaskGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        TaskGuard(self.0.clone())
    }
}

/// Lives inside a connection task's future, so an abort counts the task out as well.
struct TaskGuard(Arc<AtomicUsize>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the connection task sends events: the current lease's channel, or nowhere.
pub type Route = Arc<Mutex<Option<mpsc::Sender<UpFrame>>>>;

/// An open connection as the pool holds it.
pub struct Live {
    pub generation: u64,
    /// When the handshake completed; the age UP-5 measures.
    pub opened: Instant,
    /// `x-codex-turn-state` from the handshake response, if the upstream sent one (WS-7).
    pub turn_state: Option<HeaderValue>,
    pub sink: Arc<tokio::sync::Mutex<WsSink>>,
    pub route: Route,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    /// Whether the connection's task has already ended (the peer left right after the dial).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Closes the connection politely without making the caller wait (TP-4, UP-5): a Close
    /// frame (1000) goes out at once, and the socket is dropped when the peer answers it or
    /// `grace` has passed, whichever comes first. Nothing more reaches a lease.
    pub fn close(mut self, grace: Duration) {
        *self.route.lock() = None;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime to wait in: dropping closes at once
        };
        rt.spawn(async move {
            let deadline = Instant::now() + grace;
            let sink = self.sink.clone();
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            let send = async move { sink.lock().await.send(Message::Close(Some(frame))).await };
            if let Ok(Err(e)) = tokio::time::timeout_at(deadline, send).await {
                tracing::debug!(error = %e, "close frame not sent");
            }
            // The task ends when the peer answers the close (or the socket fails).
            let _ = tokio::time::timeout_at(deadline, &mut self.task).await;
        });
    }
}

impl Drop for Live {
    /// Dropping a connection closes it at once: its task stops and the socket is freed.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Dials `account` and starts the connection's task; `verdict(generation, end)` is called
/// once when the connection ends by itself.
pub async fn open(
    account: &AccountConfig,
    identity: &Identity,
    settings: &ConnSettings,
    generation: u64,
    tasks: &TaskCount,
    verdict: impl FnOnce(u64, UpEnd) + Send + 'static,
) -> Result<Live, RelayError> {
    let request = dial_request(account, identity)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(settings.max_message_bytes))
        .max_frame_size(Some(settings.max_message_bytes));
    let dial = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (ws, response) = match tokio::time::timeout(settings.dial_timeout, dial).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return Err(dial_error(&account.id, e)),
        Err(_) => {
            return Err(RelayError::upstream_lost(format!(
                "dial to account {} timed out",
                account.id
            ))
            .retry(Retry::BeforeOutput))
        }
    };
    let turn_state = response.headers().get("x-codex-turn-state").cloned();
    let (sink, stream) = ws.split();
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    let route: Route = Arc::default();
    let task = ConnTask {
        stream,
        sink: sink.clone(),
        route: route.clone(),
        settings: settings.clone(),
    };
    let counted = tasks.enter();
    let task = tokio::spawn(async move {
        let _counted = counted;
        let mut task = task;
        let end = task.run().await;
        // The pool hears first, so no one leases this dead connection after its holder learns
        // it is gone; the holder is then told in the background (its channel may be full, and
        // the verdict may abort this task at its next await).
        let holder = task.route.lock().clone();
        verdict(generation, end.clone());
        if let Some(tx) = holder {
            tokio::spawn(async move {
                let _ = tx.send(UpFrame::Ended(end)).await;
            });
        }
    });
    Ok(Live {
        generation,
        opened: Instant::now(),
        turn_state,
        sink,
        route,
        task,
    })
}

fn dial_request(
    account: &AccountConfig,
    identity: &Identity,
) -> Result<tungstenite::handshake::client::Request, RelayError> {
    let internal = |e: String| {
        RelayError::new(Side::Internal, 500, "server_error", "internal_error").message(e)
    };
    let mut req = account
        .ws_url()
        .into_client_request()
        .map_err(|e| internal(e.to_string()))?;
    let h = req.headers_mut();
    for (k, v) in &account.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| internal(e.to_string()))?;
        h.insert(
            name,
            HeaderValue::from_str(v).map_err(|e| internal(e.to_string()))?,
        );
    }
    for (k, v) in &identity.headers {
        let name =
            HeaderName::from_bytes(k.as_str().as_bytes()).map_err(|e| internal(e.to_string()))?;
        let value = HeaderValue::from_bytes(v.as_bytes()).map_err(|e| internal(e.to_string()))?;
        h.insert(name, value);
    }
    let bearer = HeaderValue::from_str(&format!("Bearer {}", account.api_key().expose()))
        .map_err(|_| internal("account api_key is not a valid header value".into()))?;
    h.insert("authorization", bearer);
    h.insert(
        "openai-beta",
        HeaderValue::from_static(tuning::OPENAI_BETA_WS),
    );
    Ok(req)
}

/// A failed dial: a refused handshake is the upstream's protocol answer, anything else I/O.
fn dial_error(account: &str, e: tungstenite::Error) -> RelayError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut e = RelayError::upstream_lost(format!(
                "account {account}: upstream refused the WebSocket handshake with {status}"
            ))
            .side(Side::UpstreamProtocol);
            e.handshake_status = Some(status);
            e.retry_after = retry_after;
            e
        }
        other => {
            RelayError::upstream_lost(format!("account {account}: upstream dial failed: {other}"))
        }
    }
    .retry(Retry::BeforeOutput)
}

struct ConnTask {
    stream: SplitStream<WsStream>,
    sink: Arc<tokio::sync::Mutex<WsSink>>,
    route: Route,
    settings: ConnSettings,
}

/// An event that found the lease's channel full, waiting for room (backpressure).
type Held = (mpsc::Sender<UpFrame>, UpFrame);

impl ConnTask {
    async fn run(&mut self) -> UpEnd {
        let every = self.settings.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pong_due: Option<Instant> = None;
        let mut held: Option<Held> = None;
        let end = loop {
            tokio::select! {
                biased;
                room = room_for(&held), if held.is_some() => {
                    // A closed channel means the lease ended; the event has nobody to go to.
                    if let (Ok(permit), Some((_, frame))) = (room, held.take()) {
                        permit.send(frame);
                    }
                    // Reading resumes; a pong that waited behind the held event gets its time.
                    pong_due = pong_due.map(|_| Instant::now() + self.settings.pong_timeout);
                }
                m = self.stream.next(), if held.is_none() => match m {
                    Some(Ok(Message::Text(t))) => held = self.route_event(t),
                    Some(Ok(Message::Binary(b))) => match Utf8Bytes::try_from(b) {
                        Ok(t) => held = self.route_event(t),
                        Err(_) => tracing::debug!("non-UTF-8 binary upstream frame dropped"),
                    },
                    Some(Ok(Message::Pong(_))) => pong_due = None,
                    Some(Ok(Message::Close(f))) => {
                        let code = f.as_ref().map(|f| u16::from(f.code));
                        break UpEnd::Closed { code, reason: f.map(|f| f.reason.to_string()).unwrap_or_default() };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(tungstenite::Error::Capacity(_))) => break UpEnd::TooBig,
                    Some(Err(e)) => break UpEnd::Io(e.to_string()),
                    None => break UpEnd::Io("upstream closed the connection without a Close frame".into()),
                },
                _ = ping.tick(), if held.is_none() => {
                    if self.sink.lock().await.send(Message::Ping(Default::default())).await.is_err() {
                        break UpEnd::Io("ping write failed".into());
                    }
                    pong_due.get_or_insert(Instant::now() + self.settings.pong_timeout);
                }
                _ = sleep_until(pong_due), if pong_due.is_some() && held.is_none() => break UpEnd::NoPong,
            }
        };
        end
    }

    /// Sends an event to the current lease; returns it when the lease's channel is full.
    fn route_event(&self, t: Utf8Bytes) -> Option<Held> {
        let route = self.route.lock();
        let Some(tx) = route.as_ref() else {
            tracing::debug!(
                bytes = t.len(),
                "stray upstream event on an idle connection dropped"
            );
            return None;
        };
        match tx.try_send(UpFrame::Event(t)) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(f)) => Some((tx.clone(), f)),
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }
}

/// Waits for room in the held event's channel; cancel-safe (the event stays held).
async fn room_for(
    held: &Option<Held>,
) -> Result<mpsc::OwnedPermit<UpFrame>, mpsc::error::SendError<()>> {
    match held {
        Some((tx, _)) => tx.clone().reserve_owned().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `due`, or forever when there is none (a disabled `select!` deadline).
pub(crate) async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An `https` account dials `wss://` through rustls: the first bytes on the wire are a TLS
    /// handshake record (0x16), not a plain HTTP request or a refusal to try.
    #[tokio::test]
    async fn wss_upstreams_are_dialed_with_tls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first_byte = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.ok()?;
            let mut b = [0u8; 1];
            sock.read_exact(&mut b).await.ok().map(|_| b[0])
        });
        let url = format!("https://127.0.0.1:{port}/v1");
        let account = AccountConfig::new("a", url, "sk-test");
        let settings = ConnSettings {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            max_age: Duration::from_secs(3300),
            min_idle: 0,
        };
        let (tasks, identity) = (TaskCount::default(), Identity::default());
        let dial = open(&account, &identity, &settings, 1, &tasks, |_, _| {});
        let e = dial
            .await
            .err()
            .expect("the listener never completes a handshake");
        assert!(
            !e.message.contains("TLS support not compiled"),
            "{}",
            e.message
        );
        assert_eq!(first_byte.await.unwrap(), Some(0x16), "{}", e.message);
    }
}
