//! The HTTP ingress (HS-1 … HS-4): `POST /v1/responses`, streaming (SSE) or not.
//!
//! An HTTP request is served by the same session code as a WebSocket: each HTTP session key
//! (HS-2) gets a session fed through in-process channels, so continuity, retries, admission and
//! usage records behave exactly as on a socket. The adapter here turns the request into a
//! `response.create` frame and the session's frames into SSE events or one JSON answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::{CancellationToken, PollSender};

use super::auth::{authenticate, refuse};
use super::App;
use crate::config::KeyConfig;
use crate::protocol::frames::{http_error_body, sse_error, sse_event};
use crate::protocol::peek;
use crate::session::{self, ClientKind};
use crate::upstream::Identity;

/// Headers naming an HTTP session, first present wins (HS-2).
const SESSION_HEADERS: [&str; 4] = ["session-id", "session_id", "thread-id", "conversation_id"];

/// One HTTP session: the channels of its session task.
pub struct HttpSession {
    input: mpsc::Sender<Message>,
    output: Arc<tokio::sync::Mutex<mpsc::Receiver<Message>>>,
    /// Requests running or waiting, for the queue bound.
    queued: AtomicUsize,
    last_used: Mutex<Instant>,
    /// The session's name in usage records.
    tag: String,
    /// Ends the session (its client "left"): a request cut mid-turn, the TTL, shutdown.
    end: CancellationToken,
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        self.end.cancel();
    }
}

/// The open HTTP sessions by session key.
#[derive(Default)]
pub struct HttpSessions {
    map: Mutex<HashMap<String, Arc<HttpSession>>>,
}

impl HttpSessions {
    /// Drops sessions idle for longer than `ttl` (not while a request holds them).
    pub fn reap(&self, ttl: std::time::Duration) {
        self.map.lock().retain(|_, s| {
            s.queued.load(Ordering::Relaxed) > 0 || s.last_used.lock().elapsed() < ttl
        });
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn forget(&self, key: &str, s: &Arc<HttpSession>) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            map.remove(key);
        }
    }
}

/// `POST` on a responses path.
pub async fn create(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    if app.draining() {
        return shutting_down();
    }
    let key = match authenticate(&app, &headers) {
        Ok(key) => key.clone(),
        Err(refusal) => return *refusal,
    };
    // WS-6's limit for HTTP bodies, read only once the key is known.
    let cfg = app.cfg();
    let limit = usize::try_from(cfg.limits.max_client_message_bytes).unwrap_or(usize::MAX);
    let body = match super::body::read(&headers, body, limit, &cfg.server).await {
        Ok(bytes) => bytes,
        Err(e) => return e.response("limits.max_client_message_bytes"),
    };
    let mut req: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => m,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
                "The request body must be a JSON object.",
            )
        }
    };
    let stream = req.remove("stream").and_then(|v| v.as_bool()) == Some(true);
    req.insert("type".into(), Value::String("response.create".into()));
    let frame = Value::Object(req.clone()).to_string();
    let sk = session_key(&key, &headers, &req);
    let (http, registry_key) = open_session(&app, &key, &headers, sk);
    let depth = app.cfg().session.queue_depth;
    if http.queued.fetch_add(1, Ordering::SeqCst) > depth {
        http.queued.fetch_sub(1, Ordering::SeqCst);
        // Refused before its session read it: the record is written here (US-1).
        record_queue_full(&app, &key, &http, &req);
        return error_response(&crate::protocol::frames::ws_error(
            409,
            "invalid_request_error",
            "response_in_progress",
            "Another request of this session is running and the queue is full.",
            None,
        ));
    }
    let turn = Turn {
        app: app.clone(),
        http,
        registry_key,
        done: false,
    };
    if stream {
        turn.stream(frame).await
    } else {
        turn.json(frame).await
    }
}

/// HS-2's session key: the key id and the first session header, else `prompt_cache_key`.
fn session_key(key: &KeyConfig, headers: &HeaderMap, req: &Map<String, Value>) -> Option<String> {
    let named = SESSION_HEADERS
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::to_string)
        .or_else(|| {
            req.get("prompt_cache_key")
                .and_then(Value::as_str)
                .map(str::to_string)
        })?;
    Some(format!("{}\u{0}{named}", key.id))
}

/// The session for `sk`, started when there is none; without a key a fresh one for this
/// request alone.
fn open_session(
    app: &Arc<App>,
    key: &KeyConfig,
    headers: &HeaderMap,
    sk: Option<String>,
) -> (Arc<HttpSession>, Option<String>) {
    let Some(sk) = sk else {
        return (start_session(app, key, headers), None);
    };
    let mut map = app.http_sessions.map.lock();
    if let Some(s) = map.get(&sk).filter(|s| !s.end.is_cancelled()) {
        return (s.clone(), Some(sk));
    }
    if let Some(cap) = key.limits.concurrent_sockets {
        make_room(&mut map, &key.id, cap);
    }
    let s = start_session(app, key, headers);
    map.insert(sk.clone(), s.clone());
    (s, Some(sk))
}

/// SC-6 for HTTP: a key holds at most `concurrent_sockets` HTTP sessions, as it holds at most
/// that many sockets. Before one more starts, the key's least recently used idle sessions end
/// (a chained request to one of them then gets 400 `previous_response_not_found`, on which
/// Codex resends its full input); sessions with a request running are never ended here.
fn make_room(map: &mut HashMap<String, Arc<HttpSession>>, key_id: &str, cap: usize) {
    let prefix = format!("{key_id}\u{0}");
    let mut idle: Vec<(Instant, String)> = Vec::new();
    let mut held = 0usize;
    for (sk, s) in map.iter().filter(|(sk, _)| sk.starts_with(&prefix)) {
        held += 1;
        if s.queued.load(Ordering::Relaxed) == 0 {
            idle.push((*s.last_used.lock(), sk.clone()));
        }
    }
    idle.sort_unstable();
    for (_, sk) in idle.into_iter().take((held + 1).saturating_sub(cap)) {
        map.remove(&sk);
    }
}

fn start_session(app: &Arc<App>, key: &KeyConfig, headers: &HeaderMap) -> Arc<HttpSession> {
    let depth = app.cfg().session.pump_channel.max(1);
    let (input, from_client) = mpsc::channel::<Message>(depth);
    let (to_client, output) = mpsc::channel::<Message>(depth);
    let end = CancellationToken::new();
    let stream = tokio_stream::wrappers::ReceiverStream::new(from_client)
        .map(Ok::<_, tungstenite::Error>)
        .take_until(end.clone().cancelled_owned());
    let sink = PollSender::new(to_client).sink_map_err(|_| tungstenite::Error::ConnectionClosed);
    let params = app.session_params(ClientKind::Http, key, Identity::from_headers(headers));
    let tag = params.tag.clone();
    app.sessions
        .spawn(session::run_io(params, sink, Box::pin(stream)));
    Arc::new(HttpSession {
        input,
        output: Arc::new(tokio::sync::Mutex::new(output)),
        queued: AtomicUsize::new(0),
        last_used: Mutex::new(Instant::now()),
        tag,
        end,
    })
}

/// The `rejected` record of a request refused with 409 because its session's queue was full.
fn record_queue_full(app: &App, key: &KeyConfig, http: &HttpSession, req: &Map<String, Value>) {
    use crate::usage::{new_request_id, now_ms, Record, Status, TimingsMs, Tokens};
    app.usage.record(Record {
        request_id: new_request_id(),
        created_ms: now_ms(),
        response_id: None,
        key_id: key.id.clone(),
        account_id: None,
        session: http.tag.clone(),
        // Never read by the session, so it has no number there.
        seq: 0,
        model: req.get("model").and_then(Value::as_str).map(str::to_string),
        transport: "none".into(),
        warm_up: false,
        status: Status::Rejected,
        tokens: Tokens::default(),
        cost_usd: Some(0.0),
        estimated: false,
        attempts: 0,
        timings: TimingsMs::default(),
        error_class: Some("response_in_progress".into()),
        error_side: Some("client".into()),
    });
}

/// One request in its session: releases its queue place when dropped; dropped before its
/// terminal (the client went away), it ends the session so the upstream stops (HS-4).
struct Turn {
    app: Arc<App>,
    http: Arc<HttpSession>,
    registry_key: Option<String>,
    done: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.http.queued.fetch_sub(1, Ordering::SeqCst);
        *self.http.last_used.lock() = Instant::now();
        if !self.done {
            self.http.end.cancel();
            if let Some(k) = self.registry_key.as_ref() {
                self.app.http_sessions.forget(k, &self.http);
            }
        }
        if self.registry_key.is_none() {
            self.http.end.cancel();
        }
    }
}

/// What the session answered, frame by frame.
enum Answer {
    /// A frame of the session, as its bytes.
    Event(Utf8Bytes),
    /// The session closed without a terminal (shutdown, or the session failed).
    Closed,
}

impl Turn {
    async fn send(&self, frame: String) -> bool {
        self.http
            .input
            .send(Message::Text(frame.into()))
            .await
            .is_ok()
    }

    async fn next(rx: &mut mpsc::Receiver<Message>) -> Answer {
        loop {
            match rx.recv().await {
                Some(Message::Text(t)) => return Answer::Event(t),
                Some(Message::Close(_)) | None => return Answer::Closed,
                Some(_) => continue,
            }
        }
    }

    /// `stream: false`: the final response object, or the error with its status (HS-1).
    async fn json(mut self, frame: String) -> Response {
        let output = self.http.output.clone();
        let mut rx = output.lock().await;
        if !self.send(frame).await {
            return shutting_down();
        }
        loop {
            match Self::next(&mut rx).await {
                Answer::Event(text) if !is_terminal(&text) => continue,
                Answer::Event(text) => {
                    self.done = true;
                    return final_answer(&text);
                }
                Answer::Closed => {
                    self.done = true;
                    return shutting_down();
                }
            }
        }
    }

    /// `stream: true`: every event as SSE, an error as the SSE `error` event (HS-1, §3).
    async fn stream(self, frame: String) -> Response {
        let output = self.http.output.clone();
        let rx = output.lock_owned().await;
        if !self.send(frame).await {
            return shutting_down();
        }
        let state = (self, rx, 0u64, false);
        let body = futures::stream::unfold(state, |(mut turn, mut rx, seq, ended)| async move {
            if ended {
                return None;
            }
            let (chunk, seq, ended) = match Self::next(&mut rx).await {
                Answer::Event(text) => sse_chunk(&text, seq),
                Answer::Closed => (closed_chunk(seq), seq + 1, true),
            };
            if ended {
                turn.done = true;
            }
            Some((
                Ok::<_, std::convert::Infallible>(chunk),
                (turn, rx, seq, ended),
            ))
        });
        let mut resp = Response::new(Body::from_stream(body));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }
}

/// One SSE event for a session frame; the relay's WS error frames take the SSE shape (§3).
/// `count` is how many events went before, which is the next `sequence_number`; events are
/// forwarded by their peeked type, and only an `error` frame is parsed to be reshaped.
/// Returns the chunk, the next count, and whether the event ends the response.
fn sse_chunk(text: &str, count: u64) -> (String, u64, bool) {
    let kind = peek::event_type(text).unwrap_or_default();
    let done = peek::classify(&kind).is_terminal();
    if kind != "error" {
        return (sse_event(&kind, text), count + 1, done);
    }
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let e = v.get("error").cloned().unwrap_or(Value::Null);
    let field = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
    let event = sse_error(
        &field("code").unwrap_or_else(|| "server_error".into()),
        &field("message").unwrap_or_default(),
        field("param").as_deref(),
        count,
    );
    (sse_event("error", &event.to_string()), count + 1, done)
}

fn is_terminal(text: &str) -> bool {
    peek::classify(&peek::event_type(text).unwrap_or_default()).is_terminal()
}

fn closed_chunk(seq: u64) -> String {
    let e = sse_error(
        "shutting_down",
        "The relay closed this session before the response ended.",
        None,
        seq,
    );
    sse_event("error", &e.to_string())
}

/// The terminal frame as a non-streaming answer.
fn final_answer(text: &str) -> Response {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return error_response(&v);
    }
    let response = v.get("response").cloned().unwrap_or(Value::Null);
    (StatusCode::OK, Json(response)).into_response()
}

/// A WS-shaped error frame as an HTTP error: its `status`, the `{"error": ...}` body.
fn error_response(frame: &Value) -> Response {
    let status = frame
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let e = frame.get("error").cloned().unwrap_or(Value::Null);
    let field = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let param = e.get("param").and_then(Value::as_str);
    let body = http_error_body(&field("type"), &field("code"), &field("message"), param);
    let mut resp = (status, Json(body)).into_response();
    // §3: the WS frame's `headers.retry-after` is the HTTP header (SC-6, HS-5).
    let retry = frame
        .pointer("/headers/retry-after")
        .and_then(Value::as_str);
    if let Some(v) = retry.and_then(|v| HeaderValue::from_str(v).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// OP-2's refusal of new work while the relay drains (and of requests it could not finish).
pub(super) fn shutting_down() -> Response {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "shutting_down",
        "The relay is shutting down.",
    )
}
