//! Test helpers shared by the integration tests: a real WebSocket client, turn readers with
//! hang guards, and the event dump the Python shape check reads.
#![allow(dead_code)]

pub mod metrics;
pub mod multi;
pub mod process;
pub mod raw_ws;
pub mod redis;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Far above any deadline a test configures: only there so a broken build fails, not hangs.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// What the client saw next on the socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event(Value),
    /// A Close frame with its code (None when it had none).
    Closed(Option<u16>),
    /// The TCP connection ended without a Close frame (or with an I/O error).
    Eof,
}

/// Opens a WebSocket with `Authorization: Bearer key` and extra headers.
pub async fn ws_connect_with(
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request()?;
    if !key.is_empty() {
        let v = HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
        req.headers_mut().insert("authorization", v);
    }
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            k.parse().expect("header name");
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).expect("header"));
    }
    let (ws, _) = tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(req))
        .await
        .expect("hang guard: connect")?;
    Ok(ws)
}

pub async fn ws_connect(url: &str, key: &str) -> Ws {
    ws_connect_with(url, key, &[])
        .await
        .expect("websocket connect")
}

pub async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// The next event or end of the socket; pings and pongs are skipped.
pub async fn next_frame(ws: &mut Ws) -> Frame {
    // One deadline for the whole wait: pings skipped on the way must not extend it.
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("hang guard: next frame");
        return match msg {
            Some(Ok(Message::Text(t))) => {
                Frame::Event(serde_json::from_str(&t).expect("event is JSON"))
            }
            Some(Ok(Message::Binary(b))) => {
                Frame::Event(serde_json::from_slice(&b).expect("event is JSON"))
            }
            Some(Ok(Message::Ping(_)))
            | Some(Ok(Message::Pong(_)))
            | Some(Ok(Message::Frame(_))) => continue,
            Some(Ok(Message::Close(frame))) => Frame::Closed(frame.map(|f| u16::from(f.code))),
            Some(Err(_)) | None => Frame::Eof,
        };
    }
}

/// Whether an event ends a response.
pub fn is_terminal(e: &Value) -> bool {
    matches!(
        e["type"].as_str(),
        Some(
            "response.completed"
                | "response.failed"
                | "response.incomplete"
                | "response.done"
                | "response.cancelled"
                | "error"
        )
    )
}

/// Reads one response's events up to and including its terminal event. Panics if the socket
/// ends first.
pub async fn read_turn(ws: &mut Ws) -> Vec<Value> {
    let (events, end) = read_until_end(ws).await;
    assert!(
        end.is_none(),
        "socket ended mid-turn: {end:?} after {events:?}"
    );
    events
}

/// Reads events until a terminal event (end None) or the socket ends (end Some).
pub async fn read_until_end(ws: &mut Ws) -> (Vec<Value>, Option<Frame>) {
    let mut events = Vec::new();
    loop {
        match next_frame(ws).await {
            Frame::Event(e) => {
                let done = is_terminal(&e);
                events.push(e);
                if done {
                    return (events, None);
                }
            }
            other => return (events, Some(other)),
        }
    }
}

pub fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?"))
        .collect()
}

/// The terminal event's response id.
pub fn response_id(events: &[Value]) -> String {
    events
        .last()
        .and_then(|e| e["response"]["id"].as_str())
        .expect("terminal event with a response id")
        .to_string()
}

/// A `response.create` frame with a text input.
pub fn create(model: &str, text: &str) -> Value {
    serde_json::json!({"type": "response.create", "model": model, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    ]})
}

/// Writes events as JSONL into `$SWITCHYARD_EVENT_DUMP_DIR/NAME.jsonl` (checked by
/// `scripts/check_events.py` against the official typed models).
pub fn dump(name: &str, events: &[Value]) {
    let Ok(dir) = std::env::var("SWITCHYARD_EVENT_DUMP_DIR") else {
        return;
    };
    let _ = std::fs::create_dir_all(&dir);
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(
        std::path::Path::new(&dir).join(format!("{name}.jsonl")),
        text,
    )
    .expect("dump");
}

pub fn close_code(code: u16) -> CloseCode {
    CloseCode::from(code)
}

/// The relay's test key (configured by [`relay`]).
pub const KEY: &str = "sy-test-key";

/// A relay on port 0 in front of a mock upstream on port 0.
pub struct Env {
    pub mock: switchyard::mock::MockUpstream,
    pub relay: switchyard::server::Running,
    /// Holds the relay's store (`store.path`) unless the config named one.
    pub store_dir: tempfile::TempDir,
}

impl Env {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.relay.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.relay.addr)
    }

    /// A session on the relay with the test key.
    pub async fn connect(&self) -> Ws {
        ws_connect(&self.ws_url(), KEY).await
    }

    /// Every usage record taken so far, flushed and read back from the store, oldest first.
    pub async fn records(&self) -> Vec<switchyard::usage::Record> {
        let usage = &self.relay.app.usage;
        usage.flush().await.expect("usage flush");
        let store = switchyard::usage::store::Store::open(&self.relay.app.cfg().store.path)
            .expect("open the store");
        store
            .records(&switchyard::usage::store::Query::default())
            .expect("read records")
    }

    /// The records once `n` have been taken (a session records when it notices its end).
    pub async fn records_when(&self, n: u64) -> Vec<switchyard::usage::Record> {
        let usage = self.relay.app.usage.clone();
        eventually(move || usage.recorded() >= n).await;
        self.records().await
    }
}

/// Starts a mock and a relay whose config is `listen`, one key `test` = [`KEY`], one
/// `ctx_pool` account `up` pointing at the mock, then `extra` (YAML appended as is, e.g.
/// `"session:\n  max_held_errors: 2\n"`).
pub async fn relay(extra: &str) -> Env {
    relay_from(|mock_url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {mock_url}\n    api_key: sk-up\n    mode: ctx_pool\n{extra}"
        )
    })
    .await
}

/// Starts a mock and a relay with the config `yaml(mock_base_url)`.
pub async fn relay_from(yaml: impl FnOnce(&str) -> String) -> Env {
    let mock = switchyard::mock::MockUpstream::start(switchyard::mock::MockOptions::default())
        .await
        .expect("mock");
    relay_on(mock, yaml).await
}

/// Starts a relay with the config `yaml(mock_base_url)` in front of `mock`; its store goes
/// to a fresh temporary directory unless the config names one.
pub async fn relay_on(
    mock: switchyard::mock::MockUpstream,
    yaml: impl FnOnce(&str) -> String,
) -> Env {
    let mut cfg =
        switchyard::config::Config::from_yaml_str(&yaml(&mock.base_url())).expect("config");
    let store_dir = tempfile::tempdir().expect("store dir");
    if cfg.store.path == switchyard::config::StoreConfig::default().path {
        cfg.store.path = store_dir.path().join("usage.db");
    }
    let relay = switchyard::server::spawn(cfg).await.expect("relay");
    Env {
        mock,
        relay,
        store_dir,
    }
}

/// Polls a condition reached asynchronously (bounded by the hang guard).
pub async fn eventually(cond: impl Fn() -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("hang guard: condition never held");
}

/// Polls an asynchronous condition every 50 ms until it holds; `what` names it when the hang
/// guard fires.
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polled = tokio::time::timeout(HANG_GUARD, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    polled
        .await
        .unwrap_or_else(|_| panic!("hang guard: waited in vain for {what}"));
}

/// Sends a `gpt-test` request with `text` and reads its turn.
pub async fn turn(ws: &mut Ws, text: &str) -> Vec<Value> {
    send(ws, &create("gpt-test", text)).await;
    read_turn(ws).await
}

/// Whether the turn ended with `response.completed`.
pub fn completed(events: &[Value]) -> bool {
    events
        .last()
        .is_some_and(|e| e["type"] == "response.completed")
}

/// A session whose TCP receive buffer is tiny (no autotuning), so a client that stops reading
/// pushes back on the relay within a few kilobytes instead of megabytes.
pub async fn ws_connect_small_buffer(addr: std::net::SocketAddr, key: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let mut req = format!("ws://{addr}/v1/responses")
        .into_client_request()
        .expect("request");
    let v = HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
    req.headers_mut().insert("authorization", v);
    let (ws, _) = tokio::time::timeout(
        HANG_GUARD,
        tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("hang guard: connect")
    .expect("websocket connect");
    ws
}

/// Splits an SSE body into (event name, data JSON) pairs, checking the framing.
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut lines = block.lines();
        let event = lines
            .next()
            .and_then(|l| l.strip_prefix("event: "))
            .expect("event line");
        let data = lines
            .next()
            .and_then(|l| l.strip_prefix("data: "))
            .expect("data line");
        assert!(lines.next().is_none(), "one data line per event: {block}");
        out.push((
            event.to_string(),
            serde_json::from_str(data).expect("data is JSON"),
        ));
    }
    out
}

/// Sends `head` then `body` on a fresh connection and reads the answer to its end: the status
/// and the JSON body. `gap` between body bytes (none: all at once).
pub async fn raw_http(
    addr: &str,
    head: &str,
    body: &[u8],
    gap: Option<std::time::Duration>,
) -> (u16, Value) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(head.as_bytes()).await.expect("head");
    match gap {
        None => {
            let _ = tcp.write_all(body).await;
        }
        Some(gap) => {
            for b in body {
                if tcp.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(gap).await;
            }
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, tcp.read_to_end(&mut answer))
        .await
        .expect("hang guard: an answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b.trim()).ok())
        .unwrap_or_else(|| panic!("no JSON body: {text:?}"));
    (status, json)
}
