//! The `http` upstream transport (TM-1): one `POST {base_url}/responses` with `stream: true`
//! per turn, its SSE body turned into the same event stream a leased WebSocket yields.
//!
//! [`HttpTurn::start`] returns once the response headers are in: a refusal (non-2xx) is a
//! [`RelayError`] carrying the upstream's own status, code and message (HS-5, CT-11); a failed
//! connection is upstream I/O and retryable like a failed dial (CT-9, CT-10). Then one task
//! reads the body, cuts it into events ([`super::sse`]) and pushes each event's data, the
//! upstream's own bytes, into a bounded channel, waiting for room (TP-2). A body that ends
//! without a terminal event is reported as a lost upstream. Dropping the turn aborts that task,
//! which closes the connection: over HTTP, as over WebSocket, closing is the only way to stop a
//! response (TP-4, HS-4).
//!
//! [`synthetic_warmup`] answers `generate:false` for `http` accounts, which have no warm-up of
//! their own (CT-5).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::sse::{SseParser, TooBig};
use super::{Identity, UpEnd, UpFrame};
use crate::config::AccountConfig;
use crate::error::{RelayError, Retry, Side};
use crate::protocol::{classify, peek};

/// After the terminal event the rest of the body (the chunked-encoding end) is read for at most
/// this long, so the connection goes back to the pool instead of being closed. It is normally
/// already buffered and takes no wait at all.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The most of an error body read to find the upstream's error object; real ones are tiny.
const ERROR_BODY_CAP: usize = 64 * 1024;

/// The shared HTTP client of the `http` transport: connect timeout = `upstream.dial_timeout`
/// (UP-8), no overall timeout (a stream lasts as long as the response takes; silence is
/// `upstream.stream_idle_timeout`, watched by the session), TCP_NODELAY for small events,
/// pooled idle connections, and no redirects (a redirected POST would lose its body).
pub fn client(dial_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(dial_timeout)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Limits of one HTTP turn.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Events buffered between the body reader and the session (`session.pump_channel`).
    pub depth: usize,
    /// Until the response headers (and an error body) must have arrived; a failed or slow
    /// connect counts here too (`upstream.dial_timeout` is the natural value).
    pub timeout: Duration,
    /// The largest event (`upstream.max_message_bytes`); a larger one ends the turn as
    /// [`UpEnd::TooBig`].
    pub max_event_bytes: usize,
}

/// One upstream HTTP/SSE request in flight: events arrive on `events` exactly like a WS
/// lease's, ending after the terminal event (the channel closes) or with one
/// [`UpFrame::Ended`].
#[derive(Debug)]
pub struct HttpTurn {
    pub events: mpsc::Receiver<UpFrame>,
    reader: tokio::task::JoinHandle<()>,
}

impl HttpTurn {
    /// POSTs `body` (a `response.create` frame's fields: `type` and `generate` are removed,
    /// `stream: true` is set, HS-5) to the account's `/responses` with its key, its headers and
    /// the session's identity headers (WS-7), never `OpenAI-Beta` (HS-5).
    pub async fn start(
        client: &reqwest::Client,
        account: &AccountConfig,
        body: Map<String, Value>,
        identity: &Identity,
        limits: HttpLimits,
    ) -> Result<HttpTurn, RelayError> {
        let deadline = Instant::now() + limits.timeout;
        let request = client
            .post(account.http_url())
            .headers(request_headers(account, identity)?)
            .body(request_body(body)?);
        let response = match tokio::time::timeout_at(deadline, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(send_error(&account.id, &e)),
            Err(_) => {
                return Err(RelayError::upstream_lost(format!(
                    "account {}: no upstream response headers within {:?}",
                    account.id, limits.timeout
                ))
                .retry(Retry::BeforeOutput))
            }
        };
        if !response.status().is_success() {
            return Err(refusal(response, deadline).await);
        }
        let (tx, events) = mpsc::channel(limits.depth.max(1));
        let reader = tokio::spawn(read_body(response, tx, limits.max_event_bytes));
        Ok(HttpTurn { events, reader })
    }

    /// The next event, or `None` once the stream is over (after the terminal event).
    pub async fn recv(&mut self) -> Option<UpFrame> {
        self.events.recv().await
    }

    /// Stops the request at once (TP-4, HS-4): the body reader is aborted, which drops the
    /// connection, and the upstream stops generating.
    pub fn cancel(self) {
        drop(self);
    }
}

impl Drop for HttpTurn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The request body: the frame's fields minus `type` and `generate`, with `stream: true`.
fn request_body(mut body: Map<String, Value>) -> Result<Vec<u8>, RelayError> {
    body.remove("type");
    body.remove("generate");
    body.insert("stream".into(), Value::Bool(true));
    serde_json::to_vec(&body).map_err(|e| internal(format!("request body: {e}")))
}

/// The account's headers, the client's identity, the account's key; `OpenAI-Beta` belongs
/// to WebSocket dials only (HS-5), so it never goes out here even if a header list had it.
fn request_headers(account: &AccountConfig, identity: &Identity) -> Result<HeaderMap, RelayError> {
    let mut h = HeaderMap::new();
    for (k, v) in &account.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| internal(e.to_string()))?;
        let value = HeaderValue::from_str(v).map_err(|e| internal(e.to_string()))?;
        h.insert(name, value);
    }
    for (k, v) in &identity.headers {
        h.insert(k.clone(), v.clone());
    }
    let bearer = HeaderValue::from_str(&format!("Bearer {}", account.api_key().expose()))
        .map_err(|_| internal("account api_key is not a valid header value".into()))?;
    h.insert(header::AUTHORIZATION, bearer);
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.remove("openai-beta");
    Ok(h)
}

fn internal(message: String) -> RelayError {
    RelayError::new(Side::Internal, 500, "server_error", "internal_error").message(message)
}

/// A request that got no response: the upstream could not be reached or dropped the
/// connection, retryable like a failed dial (CT-9). A request the relay could not even build
/// is its own fault.
fn send_error(account: &str, e: &reqwest::Error) -> RelayError {
    if e.is_builder() {
        return internal(format!("account {account}: {}", error_chain(e)));
    }
    RelayError::upstream_lost(format!(
        "account {account}: upstream request failed: {}",
        error_chain(e)
    ))
    .retry(Retry::BeforeOutput)
}

/// An error with its causes, which is where reqwest keeps the useful part.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A non-2xx answer as the relay's error, read off the upstream's error body.
async fn refusal(response: reqwest::Response, deadline: Instant) -> RelayError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = tokio::time::timeout_at(deadline, read_capped(response, ERROR_BODY_CAP))
        .await
        .unwrap_or_default();
    upstream_error(status, &body, retry_after)
}

async fn read_capped(response: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    out
}

/// The upstream's refusal with its own status, `code`, `message`, `type` and `param` (HS-5);
/// CT-11's table decides whether a fresh attempt may follow. A body that is not the API's
/// error object keeps the status, with code `upstream_error` and the body's start as message.
pub fn upstream_error(status: u16, body: &[u8], retry_after: Option<String>) -> RelayError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let inner = parsed.get("error").filter(|e| e.is_object());
    let text = |k: &str| inner.and_then(|e| e.get(k)).and_then(Value::as_str);
    let (code, message) = (text("code"), text("message"));
    let class = classify::classify(code, message, Some(status));
    let message = match message {
        Some(m) => m.to_string(),
        None => body_excerpt(status, body),
    };
    let mut e = RelayError::new(
        Side::UpstreamProtocol,
        class.status,
        error_kind(text("type"), status),
        code.unwrap_or("upstream_error"),
    )
    .message(message);
    if let Some(p) = text("param") {
        e = e.param(p);
    }
    if class.retry_before_output {
        e = e.retry(Retry::BeforeOutput);
    }
    if let Some(r) = retry_after {
        e = e.retry_after(r);
    }
    e
}

fn body_excerpt(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    let text = text.trim();
    if text.is_empty() {
        format!("upstream answered {status}")
    } else {
        format!("upstream answered {status}: {text}")
    }
}

/// The OpenAI error types the relay passes on as they are; any other (or none) is named by
/// the status, as the API itself does.
const ERROR_KINDS: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "conflict_error",
    "rate_limit_error",
    "insufficient_quota",
    "server_error",
];

fn error_kind(kind: Option<&str>, status: u16) -> &'static str {
    if let Some(known) = kind.and_then(|k| ERROR_KINDS.iter().copied().find(|&known| known == k)) {
        return known;
    }
    match status {
        429 => "rate_limit_error",
        401 => "authentication_error",
        403 => "permission_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// How reading a body ended.
#[derive(Debug, PartialEq)]
enum ReadEnd {
    /// The terminal event went out; nothing follows.
    Terminal,
    /// The turn's receiver is gone; nobody is listening.
    Gone,
    /// The stream broke off before its terminal event.
    Lost(UpEnd),
}

/// The body reader task: events into `tx` until the terminal event, else one `Ended`.
async fn read_body(response: reqwest::Response, tx: mpsc::Sender<UpFrame>, max: usize) {
    let mut body = Box::pin(response.bytes_stream());
    match read_events(&mut body, &tx, max).await {
        ReadEnd::Terminal => {
            // No await since the terminal went out, so a turn dropped on seeing it cannot
            // abort this: the drain runs on its own and leaves the connection reusable.
            drop(tx);
            tokio::spawn(async move {
                let drain = async { while let Some(Ok(_)) = body.next().await {} };
                let _ = tokio::time::timeout(DRAIN_GRACE, drain).await;
            });
        }
        ReadEnd::Gone => {}
        ReadEnd::Lost(end) => {
            let _ = tx.send(UpFrame::Ended(end)).await;
        }
    }
}

/// Parses `body` and forwards every event, waiting for room in `tx` (TP-2).
async fn read_events<S, E>(body: &mut S, tx: &mpsc::Sender<UpFrame>, max: usize) -> ReadEnd
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error,
{
    let mut parser = SseParser::new(max);
    loop {
        loop {
            match parser.next_event() {
                Ok(Some(event)) => {
                    if let Some(end) = deliver(tx, event.data).await {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(TooBig) => return ReadEnd::Lost(UpEnd::TooBig),
            }
        }
        match body.next().await {
            Some(Ok(chunk)) => parser.push(&chunk),
            Some(Err(e)) => return ReadEnd::Lost(UpEnd::Io(error_chain(&e))),
            None => return finish(&mut parser, tx).await,
        }
    }
}

/// A clean end of body: a last event without its blank line still counts when it is whole
/// JSON (a cut-off one is dropped); without a terminal event the upstream is lost (CT-9).
async fn finish(parser: &mut SseParser, tx: &mpsc::Sender<UpFrame>) -> ReadEnd {
    match parser.finish() {
        Err(TooBig) => return ReadEnd::Lost(UpEnd::TooBig),
        Ok(Some(event)) if is_json(&event.data) => {
            if let Some(end) = deliver(tx, event.data).await {
                return end;
            }
        }
        Ok(_) => {}
    }
    ReadEnd::Lost(UpEnd::Io(
        "upstream ended the event stream without a terminal event".into(),
    ))
}

fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// Forwards one event's data; says how the stream ended when this was its last event.
async fn deliver(tx: &mpsc::Sender<UpFrame>, data: Utf8Bytes) -> Option<ReadEnd> {
    // An empty event carries nothing, and `[DONE]` is the end marker some compatible
    // upstreams add after the terminal event; neither is an event a client could read.
    if data.is_empty() || data.as_str() == "[DONE]" {
        return None;
    }
    let terminal = peek::event_type(&data).is_some_and(|k| peek::classify(&k).is_terminal());
    if tx.send(UpFrame::Event(data)).await.is_err() {
        return Some(ReadEnd::Gone);
    }
    terminal.then_some(ReadEnd::Terminal)
}

/// The two frames that answer `generate:false` on an `http` account (CT-5, SPEC §3):
/// `response.created` then `response.completed` of an empty response the next request can
/// chain from, echoing the request's `model`, `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn synthetic_warmup(request: &Map<String, Value>) -> [String; 2] {
    let id = format!("resp_sy_{}", hex::encode(rand::random::<[u8; 24]>()));
    let created_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let field = |key: &str, default: Value| {
        request
            .get(key)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    let model = field("model", Value::String(String::new()));
    let tools = field("tools", Value::Array(Vec::new()));
    let choice = field("tool_choice", Value::String("auto".into()));
    let parallel = field("parallel_tool_calls", Value::Bool(true));
    // Written by hand so `type` comes first, as the API writes it (and as `peek` expects).
    let response = |status: &str, usage: &str| {
        format!(
            "{{\"id\":\"{id}\",\"object\":\"response\",\"created_at\":{created_at},\
             \"status\":\"{status}\",\"model\":{model},\"output\":[],\"tools\":{tools},\
             \"tool_choice\":{choice},\"parallel_tool_calls\":{parallel},\"usage\":{usage}}}"
        )
    };
    // `cache_write_tokens` beyond §3's list: the pinned `openai` models require it (see
    // proto-fixtures/README.md), and the mock sends it too.
    let zero = "{\"input_tokens\":0,\
                \"input_tokens_details\":{\"cached_tokens\":0,\"cache_write_tokens\":0},\
                \"output_tokens\":0,\"output_tokens_details\":{\"reasoning_tokens\":0},\
                \"total_tokens\":0}";
    [
        format!(
            "{{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}",
            response("in_progress", "null")
        ),
        format!(
            "{{\"type\":\"response.completed\",\"sequence_number\":1,\"response\":{}}}",
            response("completed", zero)
        ),
    ]
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "http_unit_tests.rs"]
mod unit_tests;
