//! The mock's WebSocket endpoint: one response at a time per connection, a connection-local
//! cache of the most recent response, a connection age limit, and scripted faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::bench;
use super::engine::{self, ApiError, ConnCache};
use super::script::FaultKind;
use super::state::{ConnControl, ConnGuard, Interrupt, MockState, SeenRequest, StreamEnd};

/// How long a deaf connection that is being closed reads what its client sent meanwhile.
const DEAF_CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// How a request left the connection.
enum Flow {
    Continue,
    /// Close with this code (a Close frame is sent).
    Close(u16, &'static str),
    /// Drop the TCP connection without a Close frame.
    Drop,
    /// Read and send nothing more; wait for `close_all` or the mock to be dropped.
    Deaf,
}

struct Conn {
    id: u64,
    account: String,
    cache: ConnCache,
    epoch: u64,
    started: Instant,
    sink: SplitSink<WebSocket, Message>,
    client_gone: CancellationToken,
    control: Arc<ConnControl>,
    state: Arc<MockState>,
}

/// Runs one upgraded connection until either side ends it. `guard` keeps it in the registry of
/// open connections (`open_connections`, `deafen_all`, `close_all`) until the socket is dropped.
pub async fn serve_socket(
    state: Arc<MockState>,
    socket: WebSocket,
    id: u64,
    account: String,
    guard: ConnGuard,
) {
    let (sink, mut stream) = socket.split();
    let client_gone = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel::<String>(16);
    let reader_state = state.clone();
    let gone = client_gone.clone();
    let deaf = guard.control.deaf_token().clone();
    let drain = CancellationToken::new();
    let drain_now = drain.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                biased;
                // Deaf: stop polling the stream but keep holding it (the socket stays open and
                // tungstenite, which pongs only while read, answers no ping) until the
                // connection closes, then discard what came in meanwhile.
                _ = deaf.cancelled() => {
                    drain_now.cancelled().await;
                    while let Some(Ok(_)) = stream.next().await {}
                    return;
                }
                msg = stream.next() => msg,
            };
            let Some(Ok(msg)) = msg else { break };
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Close(f) => {
                    let code = f.map(|f| f.code);
                    reader_state.with_log(|l| l.client_close_frames.push((id, code)));
                    break;
                }
                Message::Ping(_) => {
                    reader_state.count_ping(id);
                    continue;
                }
                Message::Pong(_) => continue,
            };
            if tx.send(text).await.is_err() {
                return;
            }
        }
        reader_state.with_log(|l| l.client_closes.push(id));
        gone.cancel();
    });
    let epoch = state.forget_epoch.load(Ordering::Relaxed);
    let mut conn = Conn {
        id,
        account,
        cache: None,
        epoch,
        started: Instant::now(),
        sink,
        client_gone,
        control: guard.control.clone(),
        state,
    };
    let mut flow = loop {
        let text = tokio::select! {
            t = rx.recv() => t,
            _ = conn.client_gone.cancelled() => None,
            i = conn.control.interrupted() => break i.into(),
        };
        let Some(text) = text else { break Flow::Drop };
        match conn.handle(&text).await {
            Flow::Continue => continue,
            other => break other,
        }
    };
    if let Flow::Deaf = flow {
        flow = conn.stay_deaf().await;
    }
    let mut reader_done = false;
    if let Flow::Close(code, reason) = flow {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = conn.sink.send(Message::Close(Some(frame))).await;
        if conn.control.deaf_token().is_cancelled() {
            // A deaf connection left the client's frames unread; closing over them would make
            // the kernel answer with a reset that can overtake the Close frame. Read them
            // (and the client's Close reply) first, briefly.
            drain.cancel();
            reader_done = tokio::time::timeout(DEAF_CLOSE_DRAIN, &mut reader)
                .await
                .is_ok();
        }
    }
    if !reader_done {
        reader.abort();
        // The reader holds the stream half: wait until it is dropped, so the socket is closed
        // by the time the guard says the connection is gone.
        let _ = reader.await;
    }
    drop(conn);
    drop(guard);
}

impl From<Interrupt> for Flow {
    fn from(i: Interrupt) -> Flow {
        match i {
            Interrupt::Deaf => Flow::Deaf,
            Interrupt::Close(code) => Flow::Close(code, "mock close"),
        }
    }
}

impl Conn {
    /// A deaf connection sends nothing and reads nothing (the reader is parked), so it cannot
    /// notice its client leaving: it ends on `close_all` or when the mock is dropped.
    async fn stay_deaf(&mut self) -> Flow {
        self.control.deafen();
        tokio::select! {
            code = self.control.closed() => Flow::Close(code, "mock close"),
            _ = self.state.shutdown.cancelled() => Flow::Drop,
            // Only if the reader saw the client leave before it went deaf.
            _ = self.client_gone.cancelled() => Flow::Drop,
        }
    }

    async fn send(&mut self, v: &Value) -> bool {
        self.send_text(api_text(v)).await
    }

    async fn send_text(&mut self, text: String) -> bool {
        self.sink.send(Message::Text(text.into())).await.is_ok()
    }

    /// Waits until `t` unless the client leaves or the connection is interrupted first.
    async fn wait_until(&mut self, t: Instant) -> Option<(&'static str, Flow)> {
        tokio::select! {
            _ = tokio::time::sleep_until(t) => None,
            _ = self.client_gone.cancelled() => Some(("client_closed", Flow::Drop)),
            i = self.control.interrupted() => Some(("fault", i.into())),
        }
    }

    async fn handle(&mut self, text: &str) -> Flow {
        let epoch = self.state.forget_epoch.load(Ordering::Relaxed);
        if epoch != self.epoch {
            self.epoch = epoch;
            self.cache = None;
        }
        let req: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return self
                    .refuse(invalid(
                        "invalid_json",
                        "The message is not a JSON object.",
                        None,
                    ))
                    .await
            }
        };
        match req.get("type").and_then(Value::as_str) {
            Some("response.create") | None => {}
            Some(other) => {
                let e = invalid(
                    "unsupported_event_type",
                    &format!("Unsupported event type '{other}'."),
                    Some("type"),
                );
                return self.refuse(e).await;
            }
        }
        self.state.with_log(|l| {
            l.requests.push(SeenRequest {
                conn: self.id,
                account: self.account.clone(),
                body: req.clone(),
                headers: Default::default(),
            })
        });
        if self.started.elapsed() >= self.state.opts.max_age {
            self.send(&connection_limit().ws_frame()).await;
            return Flow::Close(1000, "connection age limit");
        }
        if req.get("background").and_then(Value::as_bool) == Some(true) {
            let e = invalid(
                "unsupported_parameter",
                "background is not supported over WebSocket.",
                Some("background"),
            );
            return self.refuse(e).await;
        }
        let directives = engine::request_directives(&req);
        let fault = self.state.take_fault(directives.fault.as_ref());
        if matches!(fault.as_ref().map(|f| &f.kind), Some(FaultKind::Forget)) {
            self.cache = None;
        }
        match engine::plan(&self.state, &self.account, &self.cache, &req) {
            Ok(plan) => self.stream(plan, fault).await,
            Err(e) => self.refuse(e).await,
        }
    }

    /// Answers with an error frame; a failed request evicts the connection's cache.
    async fn refuse(&mut self, e: ApiError) -> Flow {
        self.cache = None;
        if self.send(&e.ws_frame()).await {
            Flow::Continue
        } else {
            Flow::Drop
        }
    }

    async fn stream(&mut self, plan: engine::Plan, fault: Option<super::script::Fault>) -> Flow {
        let planned = plan.events.len();
        let slow = match fault.as_ref().map(|f| &f.kind) {
            Some(FaultKind::Slow(d)) => Some(*d),
            _ => None,
        };
        let mut sent = 0;
        let mut outcome = ("completed", Flow::Continue);
        let (start, mut deltas) = (Instant::now(), 0);
        for (i, event) in plan.events.iter().enumerate() {
            if let Some(f) = fault.as_ref().filter(|f| f.after == i) {
                if let Some(result) = self.act(&f.kind).await {
                    outcome = result;
                    break;
                }
            }
            if let Some(interrupt) = self.control.check() {
                outcome = ("fault", interrupt.into());
                break;
            }
            if let Some(d) = slow {
                if let Some(o) = self.wait_until(Instant::now() + d).await {
                    outcome = o;
                    break;
                }
            }
            let mut text = api_text(&ws_shape(event));
            // A bench delta waits for its slot in the schedule, then carries its send time.
            if let Some((b, at)) = plan.bench.zip(bench::stamp_offset(&text)) {
                let due = start + b.due(deltas);
                deltas += 1;
                if due > Instant::now() {
                    if let Some(o) = self.wait_until(due).await {
                        outcome = o;
                        break;
                    }
                }
                bench::stamp(&mut text, at);
            }
            if self.client_gone.is_cancelled() || !self.send_text(text).await {
                outcome = ("client_closed", Flow::Drop);
                break;
            }
            sent += 1;
        }
        if sent == planned {
            self.remember(&plan);
        } else {
            self.cache = None;
        }
        let end = StreamEnd {
            conn: self.id,
            response_id: plan.response_id,
            sent,
            planned,
            end: outcome.0.into(),
        };
        self.state.with_log(|l| l.stream_ends.push(end));
        outcome.1
    }

    /// Carries out a fault; `None` means the response goes on (slow, forget).
    async fn act(&mut self, kind: &FaultKind) -> Option<(&'static str, Flow)> {
        match kind {
            FaultKind::Close(code) => Some(("fault", Flow::Close(*code, "mock fault"))),
            FaultKind::Eof => Some(("fault", Flow::Drop)),
            FaultKind::Stall => {
                let flow = tokio::select! {
                    _ = self.client_gone.cancelled() => Flow::Drop,
                    i = self.control.interrupted() => i.into(),
                };
                Some(("fault", flow))
            }
            FaultKind::Deaf => {
                self.control.deafen();
                Some(("fault", Flow::Deaf))
            }
            FaultKind::Error { status, code } => {
                let e = status_error(*status, code);
                self.send(&e.ws_frame()).await;
                let flow = if code == "websocket_connection_limit_reached" {
                    Flow::Close(1000, "connection age limit")
                } else {
                    Flow::Continue
                };
                Some(("error", flow))
            }
            FaultKind::Limit => {
                self.send(&connection_limit().ws_frame()).await;
                Some(("error", Flow::Close(1000, "connection age limit")))
            }
            FaultKind::Slow(_) | FaultKind::Forget => None,
        }
    }

    /// After a terminal event: completed/incomplete responses become the connection's cache
    /// (and are stored when `store` is on); failed ones evict it.
    fn remember(&mut self, plan: &engine::Plan) {
        let terminal = plan
            .events
            .last()
            .and_then(|e| e.get("type"))
            .and_then(Value::as_str);
        match terminal {
            Some("response.completed") | Some("response.incomplete") => {
                if plan.store {
                    self.state.store(plan.stored.clone());
                }
                self.cache = Some(plan.stored.clone());
            }
            _ => self.cache = None,
        }
    }
}

/// An event as the real API writes it: `type` first (clients and relays may rely on reading
/// it off the front of the frame), then the other fields.
pub fn api_text(v: &Value) -> String {
    let (Value::Object(map), Some(kind)) = (v, v.get("type")) else {
        return v.to_string();
    };
    let mut out = format!("{{\"type\":{kind}");
    for (k, val) in map.iter().filter(|(k, _)| *k != "type") {
        out.push(',');
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        out.push_str(&val.to_string());
    }
    out.push('}');
    out
}

/// A replayed SSE-shaped `error` event becomes the WebSocket error frame with its status.
fn ws_shape(event: &Value) -> std::borrow::Cow<'_, Value> {
    if event.get("type").and_then(Value::as_str) != Some("error") || event.get("status").is_some() {
        return std::borrow::Cow::Borrowed(event);
    }
    let code = event
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("server_error");
    let status = match code {
        "rate_limit_exceeded" => 429,
        "server_error" => 500,
        _ => 400,
    };
    let mut e = status_error(status, code);
    if let Some(m) = event.get("message").and_then(Value::as_str) {
        e.message = m.to_string();
    }
    std::borrow::Cow::Owned(e.ws_frame())
}

/// The error the real service sends when a connection reaches its age limit (SPEC §1).
pub fn connection_limit() -> ApiError {
    invalid(
        "websocket_connection_limit_reached",
        "Responses websocket connection limit reached. Create a new websocket connection to continue.",
        None,
    )
}

fn invalid(code: &str, message: &str, param: Option<&str>) -> ApiError {
    ApiError {
        status: 400,
        kind: "invalid_request_error",
        code: Some(code.into()),
        message: message.into(),
        param: param.map(str::to_string),
    }
}

/// The error a scripted `error STATUS CODE` fault sends.
pub fn status_error(status: u16, code: &str) -> ApiError {
    let kind = match status {
        429 => "rate_limit_error",
        401 => "authentication_error",
        403 => "permission_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    ApiError {
        status,
        kind,
        code: Some(code.into()),
        message: format!("mock fault: {code}"),
        param: None,
    }
}
