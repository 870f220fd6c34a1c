//! The `http` transport against the mock's real `POST /v1/responses` (TM-1, TM-2, HS-4, HS-5,
//! CT-5, CT-9, CT-10, CT-11), and its body reader over scripted streams.

use std::sync::Arc;

use axum::http::StatusCode;
use parking_lot::Mutex;
use serde_json::json;

use super::*;
use crate::mock::{MockOptions, MockState, MockUpstream};

pub(super) const GUARD: Duration = Duration::from_secs(30);

fn limits() -> HttpLimits {
    HttpLimits {
        depth: 8,
        timeout: Duration::from_secs(5),
        max_event_bytes: 1 << 20,
    }
}

pub(super) fn create(text: &str) -> Map<String, Value> {
    let v = json!({"type": "response.create", "model": "gpt-test", "generate": true,
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": text}]}]});
    v.as_object().cloned().unwrap_or_default()
}

async fn start(account: &AccountConfig, body: Map<String, Value>) -> Result<HttpTurn, RelayError> {
    let client = client(Duration::from_secs(5)).expect("client");
    let id = Identity::default();
    tokio::time::timeout(
        GUARD,
        HttpTurn::start(&client, account, body, &id, limits()),
    )
    .await
    .expect("hang guard")
}

/// Everything the turn yields until its channel closes.
async fn drain(turn: &mut HttpTurn) -> Vec<UpFrame> {
    let mut out = Vec::new();
    while let Some(f) = tokio::time::timeout(GUARD, turn.recv())
        .await
        .expect("hang guard")
    {
        out.push(f);
    }
    out
}

fn events(frames: &[UpFrame]) -> Vec<Value> {
    frames
        .iter()
        .filter_map(|f| match f {
            UpFrame::Event(t) => Some(serde_json::from_str(t).expect("event is JSON")),
            UpFrame::Ended(_) => None,
        })
        .collect()
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

pub(super) async fn eventually(cond: impl Fn() -> bool) {
    tokio::time::timeout(GUARD, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("hang guard: condition never held");
}

/// Writes events as JSONL for `scripts/check_events.py` (when the test script asks for it).
pub(super) fn dump(name: &str, events: &[Value]) {
    let Ok(dir) = std::env::var("SWITCHYARD_EVENT_DUMP_DIR") else {
        return;
    };
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    let _ = std::fs::create_dir_all(&dir);
    std::fs::write(
        std::path::Path::new(&dir).join(format!("{name}.jsonl")),
        text,
    )
    .expect("dump");
}

async fn mock() -> (MockUpstream, AccountConfig) {
    let mock = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let account = AccountConfig::new("a", mock.base_url(), "sk-a");
    (mock, account)
}

/// TM-1/TP-1: the events of a text turn arrive in the mock's order, the terminal last, then
/// the channel closes without an `Ended`.
#[tokio::test]
async fn tm1_text_turn_streams_every_event_in_order() {
    let (mock, account) = mock().await;
    let mut turn = start(&account, create("hi [[mock:text 12]]"))
        .await
        .expect("start");
    let frames = drain(&mut turn).await;
    assert!(matches!(frames.last(), Some(UpFrame::Event(_))));
    let events = events(&frames);
    assert_eq!(events.len(), frames.len());
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["sequence_number"].as_u64())
        .collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let t = types(&events);
    assert_eq!(t[..2], ["response.created", "response.in_progress"]);
    assert_eq!(t.last(), Some(&"response.completed"));
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    let done = &events[events.len() - 1]["response"]["output"][0]["content"][0]["text"];
    assert_eq!(done.as_str(), Some(text.as_str()));
    let log = mock.log();
    assert_eq!(log.http_requests, 1);
    let end = &log.stream_ends[0];
    assert_eq!((end.end.as_str(), end.sent), ("completed", events.len()));
}

/// The mock's router behind a layer that records each request's headers.
async fn mock_seeing_headers() -> (
    Arc<MockState>,
    Arc<Mutex<Vec<axum::http::HeaderMap>>>,
    String,
) {
    let state = Arc::new(MockState::new(MockOptions::default()));
    let seen: Arc<Mutex<Vec<axum::http::HeaderMap>>> = Arc::default();
    let record = seen.clone();
    let app = crate::mock::router(state.clone()).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            record.lock().push(req.headers().clone());
            next.run(req)
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (state, seen, base)
}

/// HS-5/WS-7: the body loses `type` and `generate` and gains `stream: true`; the account's key
/// and headers and the client's identity go out, `OpenAI-Beta` never. A tool call arrives whole.
#[tokio::test]
async fn hs5_tool_call_request_shape_and_headers() {
    let (state, seen, base) = mock_seeing_headers().await;
    let mut account = AccountConfig::new("a", base, "sk-tool");
    account.headers.insert("x-account-tag".into(), "t1".into());
    let mut id = Identity::default();
    id.set("session-id", HeaderValue::from_static("thread-7"));
    id.set("originator", HeaderValue::from_static("codex_exec"));
    let client = client(Duration::from_secs(5)).expect("client");
    let body = create(r#"run it [[mock:tool exec_command {"cmd":"echo hi"}]]"#);
    let mut turn = HttpTurn::start(&client, &account, body, &id, limits())
        .await
        .expect("start");
    let events = events(&drain(&mut turn).await);
    dump("unit_http_tool_call", &events);
    let done = events.last().expect("terminal");
    assert_eq!(done["type"], "response.completed");
    let call = &done["response"]["output"][0];
    assert_eq!(
        (&call["type"], &call["name"], &call["arguments"]),
        (
            &json!("function_call"),
            &json!("exec_command"),
            &json!(r#"{"cmd":"echo hi"}"#)
        )
    );
    assert!(types(&events).contains(&"response.function_call_arguments.done"));

    let body = state.snapshot().requests[0].body.clone();
    assert_eq!(body["stream"], true);
    assert!(body.get("type").is_none() && body.get("generate").is_none());
    assert_eq!(body["model"], "gpt-test");
    let headers = seen.lock()[0].clone();
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("authorization").as_deref(), Some("Bearer sk-tool"));
    assert_eq!(h("x-account-tag").as_deref(), Some("t1"));
    assert_eq!(h("session-id").as_deref(), Some("thread-7"));
    assert_eq!(h("originator").as_deref(), Some("codex_exec"));
    assert_eq!(h("accept").as_deref(), Some("text/event-stream"));
    assert!(h("openai-beta").is_none());
}

/// CT-11/HS-5: a scripted `error 429` over HTTP is an SSE `error` event inside the 200 stream
/// (the mock answers `stream:true` with status 200); it is forwarded as the terminal event.
#[tokio::test]
async fn ct11_sse_error_event_is_forwarded_as_terminal() {
    let (_mock, account) = mock().await;
    let text = "hi [[mock:fault error 429 rate_limit_exceeded]]";
    let mut turn = start(&account, create(text)).await.expect("start");
    let frames = drain(&mut turn).await;
    let events = events(&frames);
    assert_eq!(events.len(), frames.len(), "no Ended after a terminal");
    assert_eq!(
        types(&events),
        ["response.created", "response.in_progress", "error"]
    );
    let c = classify::classify_value(&events[2]);
    assert_eq!(
        (c.class, c.status),
        (classify::ErrorClass::RateLimited, 429)
    );
}

/// CT-10/CT-11/HS-5: a non-2xx answer is the upstream's own error, blamed on the upstream
/// protocol; only CT-8's class may be retried before output.
#[tokio::test]
async fn ct11_http_status_errors_carry_the_upstreams_error() {
    let mock = MockUpstream::start(MockOptions {
        api_keys: vec!["sk-good".into()],
        ..MockOptions::default()
    })
    .await
    .expect("mock");
    let bad = AccountConfig::new("bad", mock.base_url(), "sk-wrong");
    let e = start(&bad, create("hi")).await.expect_err("401");
    assert_eq!((e.status, e.code.as_str()), (401, "invalid_api_key"));
    assert_eq!(
        (e.side, e.retry, e.kind),
        (Side::UpstreamProtocol, Retry::No, "invalid_request_error")
    );
    assert_eq!(e.message, "Incorrect API key provided.");

    let good = AccountConfig::new("good", mock.base_url(), "sk-good");
    let mut body = create("hi");
    body.insert("previous_response_id".into(), json!("resp_unknown"));
    let e = start(&good, body).await.expect_err("400");
    assert_eq!(
        (e.status, e.code.as_str()),
        (400, "previous_response_not_found")
    );
    assert_eq!(e.param.as_deref(), Some("previous_response_id"));
    assert_eq!(
        (e.side, e.retry),
        (Side::UpstreamProtocol, Retry::BeforeOutput)
    );
}

/// A server answering every request with `status`, `headers` and `body`.
async fn answering(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> String {
    let app = axum::Router::new().fallback(move || async move {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = axum::response::IntoResponse::into_response((status, body));
        for (k, v) in headers {
            resp.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        resp
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// HS-5 (§3): a 429's `Retry-After` is kept and lands in the WebSocket error frame.
#[tokio::test]
async fn hs5_retry_after_is_carried_over() {
    let body = r#"{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"slow down","param":null}}"#;
    let base = answering(429, &[("retry-after", "7")], body).await;
    let e = start(&AccountConfig::new("a", base, "k"), create("hi"))
        .await
        .expect_err("429");
    assert_eq!(
        (e.status, e.kind, e.code.as_str()),
        (429, "rate_limit_error", "rate_limit_exceeded")
    );
    assert_eq!((e.retry, e.retry_after.as_deref()), (Retry::No, Some("7")));
    let frame = e.ws_frame();
    assert_eq!(frame["status"], 429);
    assert_eq!(frame["headers"]["retry-after"], "7");
    assert_eq!(frame["error"]["message"], "slow down");

    let base = answering(502, &[], "<html>bad gateway</html>").await;
    let e = start(&AccountConfig::new("a", base, "k"), create("hi"))
        .await
        .expect_err("502");
    assert_eq!(
        (e.status, e.kind, e.code.as_str()),
        (502, "server_error", "upstream_error")
    );
    assert_eq!(e.message, "upstream answered 502: <html>bad gateway</html>");
    assert_eq!((e.side, e.retry), (Side::UpstreamProtocol, Retry::No));
}

/// CT-9/CT-10: a refused connection and a server that never answers are upstream I/O,
/// retryable before output like a failed dial.
#[tokio::test]
async fn ct9_unreachable_or_silent_upstream_is_retryable_io() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed = format!("http://{}/v1", listener.local_addr().expect("addr"));
    drop(listener);
    // The `https` form proves TLS is built in: without it reqwest refuses the URL itself.
    for base in [closed.clone(), closed.replace("http:", "https:")] {
        let e = start(&AccountConfig::new("a", base, "k"), create("hi"))
            .await
            .expect_err("refused");
        assert_eq!(
            (e.side, e.retry, e.status),
            (Side::UpstreamIo, Retry::BeforeOutput, 502),
            "{e}"
        );
        assert_eq!(e.code, "upstream_connection_lost");
        assert!(e.message.contains("refused"), "{e}");
    }

    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", silent.local_addr().expect("addr"));
    let client = client(Duration::from_secs(5)).expect("client");
    let short = HttpLimits {
        timeout: Duration::from_millis(50),
        ..limits()
    };
    let account = AccountConfig::new("a", base, "k");
    let e = tokio::time::timeout(
        GUARD,
        HttpTurn::start(&client, &account, create("hi"), &Identity::default(), short),
    )
    .await
    .expect("hang guard")
    .expect_err("timeout");
    assert_eq!((e.side, e.retry), (Side::UpstreamIo, Retry::BeforeOutput));
    drop(silent);
}

/// A server that reads one request whole, writes `response` and then drops the socket: a
/// TCP cut at a chosen byte.
async fn cut_after(response: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Read the whole request first, so the close is a FIN and not a reset.
        while !request_complete(&req) {
            let n = sock.read(&mut buf).await.expect("read");
            assert!(n > 0, "request cut");
            req.extend_from_slice(&buf[..n]);
        }
        sock.write_all(response.as_bytes()).await.expect("write");
        sock.flush().await.expect("flush");
    });
    base
}

fn request_complete(req: &[u8]) -> bool {
    let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    req.len() >= end + 4 + len
}

/// CT-9: a stream cut after 3 events (mid-body, no chunked end) yields those 3, then one
/// `Ended(Io)`.
#[tokio::test]
async fn ct9_stream_cut_midway_ends_with_io_after_the_events() {
    let mut response = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    for (i, kind) in [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    .iter()
    .enumerate()
    {
        let event =
            format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{i}}}\n\n");
        response.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
    }
    let base = cut_after(response).await;
    let mut turn = start(&AccountConfig::new("a", base, "k"), create("hi"))
        .await
        .expect("start");
    let frames = drain(&mut turn).await;
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert_eq!(
        types(&events(&frames)),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert!(
        matches!(&frames[3], UpFrame::Ended(UpEnd::Io(_))),
        "{:?}",
        frames[3]
    );
}

/// CT-9 against the mock's `eof after=3`: the turn ends with `Ended(Io)`, never silently and
/// never as a terminal. (The mock's HTTP side fails its body right after queueing the events,
/// and hyper drops the unflushed ones, so fewer than 3 reach the wire.)
#[tokio::test]
async fn ct9_mock_eof_fault_ends_with_io() {
    let (_mock, account) = mock().await;
    let mut turn = start(
        &account,
        create("hi [[mock:text 20]] [[mock:fault eof after=3]]"),
    )
    .await
    .expect("start");
    let frames = drain(&mut turn).await;
    assert!(frames.len() <= 4, "{frames:?}");
    assert!(
        matches!(frames.last(), Some(UpFrame::Ended(UpEnd::Io(_)))),
        "{frames:?}"
    );
}

/// TP-4/HS-4: cancelling mid-stream drops the connection; the mock sees its client go before
/// the stream's end (order-based: it stops short of its plan).
#[tokio::test]
async fn hs4_cancel_closes_the_upstream_request() {
    let (mock, account) = mock().await;
    let mut turn = start(
        &account,
        create("hi [[mock:text 200]] [[mock:fault slow 20ms]]"),
    )
    .await
    .expect("start");
    for _ in 0..3 {
        let f = tokio::time::timeout(GUARD, turn.recv())
            .await
            .expect("hang guard");
        assert!(matches!(f, Some(UpFrame::Event(_))));
    }
    turn.cancel();
    eventually(|| !mock.log().stream_ends.is_empty()).await;
    let end = &mock.log().stream_ends[0];
    assert_eq!(end.end, "client_closed");
    assert!(end.sent < end.planned, "{end:?}");
}
