//! The mock upstream: a stand-in for the OpenAI Responses API that behaves like the real one
//! where a relay can tell the difference (SPEC §1), so every test runs against real sockets.
//!
//! - WebSocket `GET /v1/responses` (also `/responses`): one response at a time per connection,
//!   a connection-local cache of the most recent response (`store:false` chains only there),
//!   `previous_response_not_found`, `generate:false` warm-ups, a connection age limit
//!   (`websocket_connection_limit_reached`). Every accepted upgrade is answered with an
//!   `x-codex-turn-state` header: the request's own value if it sent one, else `ts-<conn>`.
//! - `POST /v1/responses`: SSE with `stream:true`, else the final response as JSON.
//! - Per account (one per API key): stored (`store:true`) responses, chainable from any
//!   connection of that account; encrypted reasoning that verifies only on its own account.
//! - Item rules: a `function_call_output` needs its `function_call` in the context; a
//!   `function_call` sent with its id needs the reasoning item that preceded it.
//! - Scripting: `[[mock:tool NAME ARGS]]`, `[[mock:reason]]`, `[[mock:text N]]`,
//!   `[[mock:fixture NAME]]`, `[[mock:fault KIND ...]]` in the last user message (see
//!   [`script`]); `metadata.bench_events` asks for a paced, time-stamped benchmark answer
//!   ([`bench`], used by `switchyard loadgen`); the control API under `/__mock/` queues faults
//!   and handshake refusals, starts and ends an outage (every upgrade and `POST` refused),
//!   fails a share of requests at random with a 500 before output, makes every open connection
//!   deaf or closes it, and shows what the mock saw (pings received and open connections
//!   included).
//! - Events go out as the real API writes them, `type` first.

pub mod bench;
pub mod engine;
pub mod events;
pub mod fixtures;
mod http;
pub mod script;
pub mod state;
mod ws;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

pub use script::{Fault, FaultKind};
pub use state::{HandshakeFault, MockLog, MockState};

/// How a mock upstream behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Connection age limit (the real service: 60 minutes).
    pub max_age: Duration,
    /// Accepted API keys, each its own account; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// The `once=` fault names that have fired. Mocks given the same set fire each name once
    /// between them, so a fault scripted once stays once when the relay moves the turn to
    /// another account's mock.
    pub fired: FiredFaults,
}

/// `once=` fault names already fired, shareable between mocks.
pub type FiredFaults = Arc<parking_lot::Mutex<std::collections::HashSet<String>>>;

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            max_age: Duration::from_secs(3600),
            api_keys: Vec::new(),
            fired: FiredFaults::default(),
        }
    }
}

/// A running mock upstream (in-process, for tests and the embedded default).
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start(opts: MockOptions) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve(listener, opts))
    }

    /// Serves a mock on an already bound listener.
    pub fn serve(listener: tokio::net::TcpListener, opts: MockOptions) -> MockUpstream {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let state = Arc::new(MockState::new(opts));
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(crate::server::nodelay(listener), app).await {
                tracing::error!(error = %e, "mock upstream stopped");
            }
        });
        MockUpstream { addr, state, task }
    }

    /// `http://ADDR/v1`, the `base_url` of an account pointing here.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// What the mock saw so far.
    pub fn log(&self) -> MockLog {
        self.state.snapshot()
    }

    /// Queues a fault for the next request on any connection.
    pub fn push_fault(&self, fault: &str) -> Result<(), String> {
        self.state.push_fault(Fault::parse(fault)?);
        Ok(())
    }

    /// Queues a refusal of the next WebSocket upgrade.
    pub fn push_handshake(&self, status: u16, retry_after: Option<&str>) {
        self.state.push_handshake(HandshakeFault {
            status,
            retry_after: retry_after.map(str::to_string),
        });
    }

    /// Starts an outage (every upgrade and `POST` refused with `status`), or ends it (`None`).
    pub fn set_outage(&self, outage: Option<(u16, Option<&str>)>) {
        self.state
            .set_outage(outage.map(|(status, retry_after)| HandshakeFault {
                status,
                retry_after: retry_after.map(str::to_string),
            }));
    }

    /// Fails `per_mille` of the requests with a 500 `server_error` before any output.
    pub fn set_fail_rate(&self, per_mille: u64) {
        self.state.set_fail_rate(per_mille);
    }

    /// Every connection forgets its cached response (as after an upstream restart).
    pub fn forget_all(&self) {
        self.state.forget_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Every open WebSocket connection, idle or in a response, goes deaf at once (as the `deaf`
    /// fault): it stops reading its socket, so it answers no pings and reads no requests, and
    /// sends nothing more, until `close_all` or the mock is dropped. Returns how many.
    pub fn deafen_all(&self) -> usize {
        self.state.deafen_all()
    }

    /// Every open WebSocket connection, idle or in a response, deaf or not, sends a Close frame
    /// with `code` and ends at once. Returns how many.
    pub fn close_all(&self, code: u16) -> usize {
        self.state.close_all(code)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
        // Deaf connections cannot notice their client leaving; they end with the mock.
        self.state.shutdown.cancel();
    }
}

/// Runs `switchyard mock-upstream` until the process is stopped.
pub async fn run_standalone(listen: SocketAddr, opts: MockOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let mock = MockUpstream::serve(listener, opts);
    println!(
        "mock upstream listening on {} (base_url {})",
        mock.addr,
        mock.base_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The mock's routes: the API on its three paths, and the control API.
pub fn router(state: Arc<MockState>) -> Router {
    let api = get(upgrade).post(create);
    Router::new()
        .route("/v1/responses", api.clone())
        .route("/responses", api.clone())
        .route("/backend-api/codex/responses", api)
        .route("/__mock/log", get(log))
        .route("/__mock/faults", post(push_fault))
        .route("/__mock/handshake", post(push_handshake))
        .route("/__mock/forget", post(forget))
        .route("/__mock/deaf", post(deafen))
        .route("/__mock/close", post(close))
        .route("/__mock/reset", post(reset))
        .route("/__mock/outage", post(start_outage).delete(end_outage))
        .route("/__mock/fail_rate", post(fail_rate))
        .with_state(state)
}

type Shared = State<Arc<MockState>>;

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// A request's headers as the log keeps them: text values only, never `Authorization`.
fn seen_headers(headers: &HeaderMap) -> std::collections::HashMap<String, String> {
    headers
        .iter()
        .filter(|(k, _)| *k != header::AUTHORIZATION)
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

fn unauthorized() -> Response {
    let body = json!({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
        "message": "Incorrect API key provided.", "param": null}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

async fn upgrade(
    State(state): Shared,
    uri: OriginalUri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(f) = state.take_handshake() {
        state.with_log(|l| l.refused_upgrades += 1);
        return handshake_refusal(&f);
    }
    let Some(account) = state.account_for(bearer(&headers)) else {
        state.with_log(|l| l.refused_upgrades += 1);
        return unauthorized();
    };
    let conn = state.next_conn();
    let seen = seen_headers(&headers);
    let path = uri.0.path().to_string();
    state.with_log(|l| {
        l.upgrades.push(state::SeenUpgrade {
            conn,
            path,
            headers: seen,
        })
    });
    let turn_state = turn_state(&headers, conn);
    // Registered before the 101 goes out, so a client that sees the socket open can rely on
    // `open_connections`, `deafen_all` and `close_all` covering it.
    let guard = state.register_conn(conn);
    let mut resp =
        ws.on_upgrade(move |socket| ws::serve_socket(state, socket, conn, account, guard));
    resp.headers_mut().insert(TURN_STATE, turn_state);
    resp
}

/// The handshake response header the real service may set and the client must send back on
/// its later dials (WS-7).
pub const TURN_STATE: &str = "x-codex-turn-state";

/// The `x-codex-turn-state` to answer an upgrade with: the one the request carried, else a
/// fresh `ts-<conn>`.
fn turn_state(headers: &HeaderMap, conn: u64) -> HeaderValue {
    match headers.get(TURN_STATE) {
        Some(v) => v.clone(),
        None => HeaderValue::from_str(&format!("ts-{conn}"))
            .unwrap_or_else(|_| HeaderValue::from_static("ts-0")),
    }
}

fn handshake_refusal(f: &HandshakeFault) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let e = ws::status_error(f.status, "mock_handshake_fault");
    let mut resp = (status, Json(e.http_body())).into_response();
    if let Some(v) = f.retry_after.as_deref().and_then(|v| v.parse().ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn create(State(state): Shared, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(f) = state.outage() {
        state.with_log(|l| l.refused_posts += 1);
        return handshake_refusal(&f);
    }
    match state.account_for(bearer(&headers)) {
        Some(account) => http::create(state, account, seen_headers(&headers), body).await,
        None => unauthorized(),
    }
}

async fn log(State(state): Shared) -> Json<MockLog> {
    Json(state.snapshot())
}

#[derive(serde::Deserialize)]
struct FaultBody {
    fault: String,
}

async fn push_fault(State(state): Shared, Json(body): Json<FaultBody>) -> Response {
    match Fault::parse(&body.fault) {
        Ok(f) => {
            state.push_fault(f);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

async fn push_handshake(State(state): Shared, Json(body): Json<HandshakeFault>) -> StatusCode {
    state.push_handshake(body);
    StatusCode::NO_CONTENT
}

async fn forget(State(state): Shared) -> StatusCode {
    state.forget_epoch.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn deafen(State(state): Shared) -> StatusCode {
    state.deafen_all();
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct CloseBody {
    code: u16,
}

async fn close(State(state): Shared, Json(body): Json<CloseBody>) -> StatusCode {
    state.close_all(body.code);
    StatusCode::NO_CONTENT
}

async fn start_outage(State(state): Shared, Json(body): Json<HandshakeFault>) -> StatusCode {
    state.set_outage(Some(body));
    StatusCode::NO_CONTENT
}

async fn end_outage(State(state): Shared) -> StatusCode {
    state.set_outage(None);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct FailRateBody {
    per_mille: u64,
}

async fn fail_rate(State(state): Shared, Json(body): Json<FailRateBody>) -> StatusCode {
    state.set_fail_rate(body.per_mille);
    StatusCode::NO_CONTENT
}

async fn reset(State(state): Shared) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}
