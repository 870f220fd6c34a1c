//! Operations (OP-1 … OP-3, TP-8's exposure, SPEC §2 `server.*`): the metrics a scripted
//! session leaves, SIGTERM's drain against the real binary, JSON logs with the session and turn
//! spans, and the client listener's limits.

mod common;

use std::path::{Path, PathBuf};

use common::metrics::{scrape, Scrape};
use common::process::Proc;
use common::*;
use serde_json::{json, Value};
use switchyard::usage::store::{Query, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMITED: &str = "sy-limited-key";
const NO_WS: &str = "sy-http-only-key";

/// A relay config in `dir` (`gpt-test` priced) with three keys (`test`; `limited` with rpm 1; `http-only` without
/// WebSocket), a `ctx_pool` account `up` and an `http` account `web` (model `gpt-web` only).
fn write_config(dir: &Path, mock_url: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0
keys:
  - id: test
    key: {KEY}
  - id: limited
    key: {LIMITED}
    limits: {{rpm: 1}}
  - id: http-only
    key: {NO_WS}
    websocket: false
accounts:
  - id: up
    base_url: {mock_url}
    api_key: sk-up
    models: [gpt-test]
  - id: web
    base_url: {mock_url}
    api_key: sk-web
    mode: http
    models: [gpt-web]
store:
  path: {}
usage:
  flush_interval: 1h
  prices: {}
{extra}",
        dir.join("usage.db").display(),
        dir.join("prices.yaml").display()
    );
    let prices = "models:\n  gpt-test: {input: 1.0, cached_input: 0.1, output: 2.0}\n";
    std::fs::write(dir.join("prices.yaml"), prices).expect("prices");
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).expect("config");
    path
}

async fn mock() -> switchyard::mock::MockUpstream {
    switchyard::mock::MockUpstream::start(switchyard::mock::MockOptions::default())
        .await
        .expect("mock")
}

fn records(dir: &Path) -> Vec<switchyard::usage::Record> {
    Store::open(&dir.join("usage.db"))
        .expect("store")
        .records(&Query::default())
        .expect("records")
}

async fn upgrade_status(url: &str, key: &str) -> (u16, Value) {
    let err = ws_connect_with(url, key, &[])
        .await
        .expect_err("the upgrade is refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn post(addr: &str, key: &str, body: &Value) -> reqwest::Response {
    tokio::time::timeout(
        HANG_GUARD,
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/responses"))
            .bearer_auth(key)
            .json(body)
            .send(),
    )
    .await
    .expect("hang guard: POST")
    .expect("POST")
}

async fn get_status(addr: &str, path: &str) -> u16 {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET")
        .status()
        .as_u16()
}

/// OP-1, TP-8: after a scripted session — a normal turn, a turn whose upstream breaks after
/// output, an `http` account's turn over SSE, a limit refusal, a 426 and a relay-made close —
/// every family of the catalogue is there, with the numbers that session implies.
#[tokio::test]
async fn op1_metrics_after_a_scripted_session_with_a_normal_and_a_broken_turn() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let extra = "upstream:\n  retry_budget: 0\nsession:\n  first_message_timeout: 500ms\n";
    let relay = Proc::start(&write_config(dir.path(), &mock.base_url(), extra)).await;
    let before = scrape(&relay.addr).await;
    assert_eq!(before.get("switchyard_draining", &[]), Some(0.0));
    assert_eq!(before.get("switchyard_state_degraded", &[]), Some(0.0));
    assert_eq!(
        before.get("switchyard_breaker_open", &[("account", "up")]),
        Some(0.0)
    );

    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    assert!(completed(&turn(&mut ws, "[[mock:text 5]]").await));
    drop(ws);
    // Its context is idle once the session has ended: the next session reuses it.
    settled(&relay.addr).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 30]] [[mock:fault eof after=8]]"),
    )
    .await;
    let broken = read_turn(&mut ws).await;
    assert_eq!(
        broken.last().unwrap()["error"]["code"],
        "upstream_connection_lost"
    );
    drop(ws);

    let sse = post(
        &relay.addr,
        KEY,
        &json!({"model": "gpt-web", "stream": true, "input": "[[mock:text 4]]"}),
    )
    .await;
    let events = sse_events(&sse.text().await.expect("SSE body"));
    assert_eq!(events.last().unwrap().0, "response.completed");

    let mut limited = ws_connect(&relay.ws_url(), LIMITED).await;
    assert!(completed(&turn(&mut limited, "one").await));
    let refused = turn(&mut limited, "two").await;
    assert_eq!(refused[0]["status"], 429);
    drop(limited);

    let (status, _) = upgrade_status(&relay.ws_url(), NO_WS).await;
    assert_eq!(status, 426);
    let mut silent = ws_connect(&relay.ws_url(), KEY).await;
    assert_eq!(next_frame(&mut silent).await, Frame::Closed(Some(1008)));

    let m = settled(&relay.addr).await;
    let turns = "switchyard_turns_total";
    let t = |status: &str, transport: &str| {
        m.value(turns, &[("status", status), ("transport", transport)])
    };
    assert_eq!(t("completed", "ctx_pool"), 2.0, "two completed WS turns");
    assert_eq!(t("upstream_lost", "ctx_pool"), 1.0, "the broken turn");
    assert_eq!(t("completed", "http"), 1.0, "the SSE turn on `web`");
    assert_eq!(t("rejected", "none"), 1.0, "the rpm refusal");
    for h in [
        "switchyard_turn_admission_wait_seconds",
        "switchyard_turn_time_to_upstream_write_seconds",
        "switchyard_turn_relay_added_seconds",
        "switchyard_turn_time_to_first_event_seconds",
        "switchyard_turn_time_to_first_token_seconds",
        "switchyard_turn_duration_seconds",
    ] {
        let (count, sum) = m.histogram(h);
        assert!(
            count >= 4.0,
            "{h}: one sample per turn that reached upstream, {count}"
        );
        assert!(sum > 0.0, "{h} sums real durations");
    }
    assert!(m.value("switchyard_upstream_dials_total", &[("account", "up")]) >= 1.0);
    assert!(
        m.sum("switchyard_upstream_reuses_total", &[]) >= 1.0,
        "the second turn reused"
    );
    assert!(
        m.sum("switchyard_upstream_broken_total", &[]) >= 1.0,
        "the upstream EOF is counted by reason"
    );
    assert!(m
        .get("switchyard_upstream_pool", &[("count", "open")])
        .is_some());
    assert_eq!(
        m.value("switchyard_breaker_open", &[("account", "web")]),
        0.0
    );
    assert_eq!(
        m.value(
            "switchyard_limit_rejections_total",
            &[("key", "limited"), ("limit", "rpm")]
        ),
        1.0
    );
    assert_eq!(
        m.value("switchyard_ws_upgrades_refused_total", &[("status", "426")]),
        1.0
    );
    assert_eq!(
        m.value("switchyard_close_codes_sent_total", &[("code", "1008")]),
        1.0
    );
    assert!(m.value("switchyard_usage_tokens_total", &[("kind", "output")]) > 0.0);
    assert!(m.sum("switchyard_usage_cost_micro_usd_total", &[]) > 0.0);
    assert_eq!(m.value("switchyard_client_sockets_open", &[]), 0.0);
    assert_eq!(m.value("switchyard_sessions_running", &[]), 0.0);
    assert_eq!(m.value("switchyard_state_degraded", &[]), 0.0);
    assert_eq!(relay.terminate().await, Some(0));
}

/// The scrape once every session of the script has ended and recorded (its numbers settle).
async fn settled(addr: &str) -> Scrape {
    until("sessions ended", || {
        let addr = addr.to_string();
        async move {
            scrape(&addr)
                .await
                .value("switchyard_sessions_running", &[])
                == 0.0
        }
    })
    .await;
    scrape(addr).await
}

/// OP-2 against the real binary: SIGTERM while a WebSocket turn and an SSE stream run, beside an
/// idle socket. `shutdown.drain_timeout` is longer than the hang guard, so everything here
/// happens by the drain itself: the idle socket gets 1012; `/readyz` turns 503 and new upgrades
/// and requests get 503 `shutting_down` while `/healthz` and `/metrics` still answer; a request
/// sent on the busy socket is recorded `shutdown` and never starts; the running turn and the SSE
/// stream finish, then the busy socket gets 1012; the process exits 0 as soon as the last session
/// has ended, with every record flushed (the flush interval is an hour).
#[tokio::test]
async fn op2_sigterm_during_a_turn_drains_refuses_new_work_and_exits_0() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let extra = "shutdown:\n  drain_timeout: 10m\n";
    let mut relay = Proc::start(&write_config(dir.path(), &mock.base_url(), extra)).await;
    let addr = relay.addr.clone();

    let mut idle = ws_connect(&relay.ws_url(), KEY).await;
    assert!(completed(&turn(&mut idle, "warm").await));
    let mut busy = ws_connect(&relay.ws_url(), KEY).await;
    let slow = "[[mock:text 12]] [[mock:fault slow 100ms]]";
    send(&mut busy, &create("gpt-test", slow)).await;
    assert!(matches!(next_frame(&mut busy).await, Frame::Event(_)));
    let stream = post(
        &addr,
        KEY,
        &json!({"model": "gpt-test", "stream": true, "input": slow}),
    )
    .await;
    assert_eq!(stream.status(), 200);
    let sse_body = tokio::spawn(async move { stream.text().await.expect("SSE body") });
    in_turn(&addr, 2).await;

    relay.signal("TERM");
    relay.wait_log("draining").await;
    assert_eq!(next_frame(&mut idle).await, Frame::Closed(Some(1012)));
    assert_eq!(get_status(&addr, "/readyz").await, 503);
    assert_eq!(get_status(&addr, "/healthz").await, 200);
    assert_eq!(scrape(&addr).await.value("switchyard_draining", &[]), 1.0);
    let (status, body) = upgrade_status(&relay.ws_url(), KEY).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("shutting_down"))
    );
    let refused = post(&addr, KEY, &json!({"model": "gpt-test", "input": "late"})).await;
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "shutting_down");

    send(&mut busy, &create("gpt-test", "sent while draining")).await;
    let (events, end) = read_until_end(&mut busy).await;
    assert!(end.is_none(), "the running turn finishes: {end:?}");
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "and nothing of the late request is sent"
    );
    assert_eq!(next_frame(&mut busy).await, Frame::Closed(Some(1012)));
    let sse = sse_events(&ended(sse_body).await);
    assert_eq!(sse.last().expect("SSE events").0, "response.completed");

    assert_eq!(exit_code(&mut relay).await, Some(0));
    assert_eq!(
        statuses(dir.path()),
        ["completed", "completed", "completed", "shutdown"],
        "the warm-up, the drained WS turn and the SSE turn completed; the late request is `shutdown`"
    );
}

/// OP-2's cut: turns still running at `shutdown.drain_timeout` end — the WebSocket with 1012, the
/// SSE stream with the 503 `shutting_down` error event and EOF — and are recorded `shutdown`;
/// the process exits 0.
#[tokio::test]
async fn op2_turns_past_the_drain_timeout_are_cut_and_recorded_shutdown() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let extra = "shutdown:\n  drain_timeout: 1s\n";
    let mut relay = Proc::start(&write_config(dir.path(), &mock.base_url(), extra)).await;
    let addr = relay.addr.clone();
    let stalled = "[[mock:text 20]] [[mock:fault stall after=3]]";
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    send(&mut ws, &create("gpt-test", stalled)).await;
    let stream = post(
        &addr,
        KEY,
        &json!({"model": "gpt-test", "stream": true, "input": stalled}),
    )
    .await;
    let sse_body = tokio::spawn(async move { stream.text().await.expect("SSE body") });
    in_turn(&addr, 2).await;

    relay.signal("TERM");
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!((events.len(), end), (3, Some(Frame::Closed(Some(1012)))));
    let sse = sse_events(&ended(sse_body).await);
    let (kind, last) = sse.last().expect("SSE events");
    assert_eq!(
        (kind.as_str(), &last["code"]),
        ("error", &json!("shutting_down"))
    );
    assert_eq!(sse.len(), 4, "three events, then the error: {sse:?}");
    assert_eq!(exit_code(&mut relay).await, Some(0));
    assert_eq!(statuses(dir.path()), ["shutdown", "shutdown"]);
}

/// Waits until `n` turns hold upstream contexts.
async fn in_turn(addr: &str, n: u32) {
    until("the turns are upstream", || {
        let addr = addr.to_string();
        async move {
            scrape(&addr)
                .await
                .value("switchyard_upstream_pool", &[("count", "in_turn")])
                >= f64::from(n)
        }
    })
    .await;
}

async fn ended(body: tokio::task::JoinHandle<String>) -> String {
    tokio::time::timeout(HANG_GUARD, body)
        .await
        .expect("hang guard: the SSE stream ends")
        .expect("SSE task")
}

async fn exit_code(relay: &mut Proc) -> Option<i32> {
    tokio::time::timeout(HANG_GUARD, relay.child.wait())
        .await
        .expect("hang guard: exit")
        .expect("wait")
        .code()
}

/// The statuses of every record in the store, sorted.
fn statuses(dir: &Path) -> Vec<&'static str> {
    let mut s: Vec<&str> = records(dir).iter().map(|r| r.status.as_str()).collect();
    s.sort();
    s
}

/// OP-3: with `log.format: json` every line is a JSON object; a turn's lines carry the session
/// span (key id, never the key) and the turn span (request id, model, account). A reload to
/// `text` switches the format without a restart.
#[tokio::test]
async fn op3_json_logs_carry_session_and_turn_spans_and_reload_to_text() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let config = write_config(dir.path(), &mock.base_url(), "log:\n  format: json\n");
    let mut relay = Proc::start(&config).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    assert!(completed(&turn(&mut ws, "hello").await));
    let line = relay.wait_log("turn ended").await;
    let v: Value = serde_json::from_str(&line).expect("a JSON log line");
    let spans = v["spans"].as_array().expect("span list");
    let session = spans
        .iter()
        .find(|s| s["name"] == "session")
        .expect("session span");
    assert_eq!(session["key"], "test");
    let turn_span = spans
        .iter()
        .find(|s| s["name"] == "turn")
        .expect("turn span");
    assert!(turn_span["request_id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
    assert_eq!(
        (turn_span["model"].as_str(), turn_span["account"].as_str()),
        (Some("gpt-test"), Some("up"))
    );
    assert!(!line.contains(KEY), "never the key itself");

    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("format: json", "format: text")).expect("rewrite");
    relay.signal("HUP");
    relay.wait_log("config reloaded").await;
    assert!(completed(&turn(&mut ws, "again").await));
    let line = relay.wait_log("turn ended").await;
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "text now: {line}"
    );
    assert!(
        line.contains("turn{") && line.contains("account=up"),
        "{line}"
    );
    drop(ws);
    assert_eq!(relay.terminate().await, Some(0));
}

/// OP-3, TP-5: a turn that preempts another is the session's child, not the cut turn's: after
/// many preemptions in a row every turn's log line carries one turn span. (Spans nested one
/// per preemption made the log grow with the square of their number, and dropping a deep
/// enough chain overflowed the stack.)
#[tokio::test]
async fn op3_a_preempting_turn_is_a_sibling_of_the_turn_it_cuts() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let config = write_config(dir.path(), &mock.base_url(), "log:\n  format: json\n");
    let relay = Proc::start(&config).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    for _ in 0..20 {
        send(
            &mut ws,
            &create("gpt-test", "[[mock:text 500]] [[mock:fault slow 5ms]]"),
        )
        .await;
        first_event(&mut ws).await;
    }
    assert!(completed(&turn(&mut ws, "[[mock:text 2]]").await));
    drop(ws);
    let (code, lines) = relay.finish().await;
    assert_eq!(code, Some(0));
    let ended: Vec<Value> = lines
        .iter()
        .filter(|l| l.contains("turn ended"))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(ended.len(), 21, "one line per turn");
    for v in &ended {
        let turns = v["spans"]
            .as_array()
            .expect("spans")
            .iter()
            .filter(|s| s["name"] == "turn")
            .count();
        assert_eq!(turns, 1, "{v}");
    }
}

/// Reads until the running turn's first event.
async fn first_event(ws: &mut Ws) {
    assert!(matches!(next_frame(ws).await, Frame::Event(_)));
}

/// SPEC §2 `server.max_header_bytes`: a larger request head gets 431; a normal one is served.
#[tokio::test]
async fn server_oversized_request_heads_get_431() {
    let env = relay("server:\n  max_header_bytes: 2048\n").await;
    let client = reqwest::Client::new();
    let big = "x".repeat(4096);
    let resp = client
        .get(env.http_url("/healthz"))
        .header("x-padding", &big)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 431);
    let ok = client
        .get(env.http_url("/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
}

/// SPEC §2 `server.handshake_timeout`: a client that never finishes its request head is
/// disconnected (a slow-headers client cannot hold a connection), others are served meanwhile.
#[tokio::test]
async fn server_a_request_head_not_finished_in_time_is_disconnected() {
    let env = relay("server:\n  handshake_timeout: 300ms\n").await;
    let mut slow = tokio::net::TcpStream::connect(env.relay.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    assert_eq!(
        get_status(&env.relay.addr.to_string(), "/healthz").await,
        200
    );
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(HANG_GUARD, slow.read(&mut buf))
        .await
        .expect("hang guard: the relay closes the slow connection");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "closed without an answer: {n:?}"
    );
}

fn post_head(path: &str, auth: &str, length: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {auth}\r\ncontent-type: application/json\r\n{length}connection: close\r\n\r\n"
    )
}

/// SPEC §2 `server.body_timeout` and the body limits: a declared length over the limit is 413
/// before any byte of the body (keyed or not: the admin API reads nothing before its token);
/// a body that stalls for `handshake_timeout` or trickles past `body_timeout` is 408; broken
/// chunked framing is 400. Paths and methods the relay does not serve are JSON 404 and 405.
/// A normal request is served afterwards.
#[tokio::test]
async fn server_request_bodies_are_bounded_in_size_and_time() {
    let env = relay(
        "server:\n  handshake_timeout: 300ms\n  body_timeout: 1s\nlimits:\n  max_client_message_bytes: 4096\nadmin:\n  token: adm-tok\n",
    )
    .await;
    let addr = env.relay.addr.to_string();
    let code = |v: &Value| v["error"]["code"].as_str().map(str::to_string);
    let huge = "content-length: 1073741824\r\n";
    let (s, b) = raw_http(&addr, &post_head("/v1/responses", KEY, huge), b"", None).await;
    assert_eq!((s, code(&b)), (413, Some("request_too_large".into())));
    let admin = post_head("/admin/v1/accounts/up/mode", "wrong", huge);
    let (s, b) = raw_http(&addr, &admin, b"", None).await;
    assert_eq!((s, code(&b)), (401, Some("invalid_admin_token".into())));
    let stalled = post_head("/v1/responses", KEY, "content-length: 100\r\n");
    let (s, b) = raw_http(&addr, &stalled, b"{\"model\"", None).await;
    assert_eq!((s, code(&b)), (408, Some("request_timeout".into())));
    let trickle = vec![b' '; 1000];
    let gap = Some(std::time::Duration::from_millis(50));
    let (s, b) = raw_http(&addr, &stalled.replace("100", "1000"), &trickle, gap).await;
    assert_eq!((s, code(&b)), (408, Some("request_timeout".into())));
    let chunked = post_head("/v1/responses", KEY, "transfer-encoding: chunked\r\n");
    let (s, b) = raw_http(&addr, &chunked, b"zz\r\n{}\r\n0\r\n\r\n", None).await;
    assert_eq!((s, code(&b)), (400, Some("invalid_body".into())));
    let (s, b) = raw_http(
        &addr,
        "GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"",
        None,
    )
    .await;
    assert_eq!((s, code(&b)), (404, Some("not_found".into())));
    let delete = "DELETE /v1/responses HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let (s, b) = raw_http(&addr, delete, b"", None).await;
    assert_eq!((s, code(&b)), (405, Some("method_not_allowed".into())));
    let ok = post(
        &addr,
        KEY,
        &json!({"model": "gpt-test", "input": "[[mock:text 2]]"}),
    )
    .await;
    assert_eq!(ok.status(), 200);
}

/// SPEC §2 `server.max_connections`: open sockets count; one more connection gets 503
/// `too_many_connections` and a metric, and once a socket closes a new one is accepted.
#[tokio::test]
async fn server_connections_beyond_max_connections_get_503() {
    let env = relay("server:\n  max_connections: 2\n").await;
    let a = env.connect().await;
    let mut b = env.connect().await;
    assert!(completed(&turn(&mut b, "b works").await));
    let resp = reqwest::get(env.http_url("/healthz"))
        .await
        .expect("refused with an answer");
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "too_many_connections");
    drop(a);
    until("a place is free again", || {
        let url = env.http_url("/healthz");
        async move {
            reqwest::get(url)
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        }
    })
    .await;
    // A scrape is a connection too: it may find the last check's connection still closing.
    let m = tokio::time::timeout(HANG_GUARD, async {
        loop {
            match reqwest::get(env.http_url("/metrics")).await {
                Ok(r) if r.status() == 200 => break Scrape::parse(&r.text().await.expect("body")),
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("hang guard: a scrape is served");
    assert!(
        m.value(
            "switchyard_connections_refused_total",
            &[("reason", "max_connections")]
        ) >= 1.0
    );
    assert!(completed(&turn(&mut b, "b still works").await));
}

/// OP-2 in process, through `Running::terminate`: a passthrough socket closes with 1012 at once
/// when idle and only after its running turn when busy; the drain ends as soon as the last
/// session has, well before `drain_timeout`.
#[tokio::test]
async fn op2_passthrough_sockets_close_after_their_turn() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: pt\n    base_url: {url}\n    api_key: sk-up\n    mode: passthrough\nshutdown:\n  drain_timeout: 60s\n"
        )
    })
    .await;
    let mut idle = env.connect().await;
    assert!(completed(&turn(&mut idle, "warm").await));
    let mut busy = env.connect().await;
    send(
        &mut busy,
        &create("gpt-test", "[[mock:text 10]] [[mock:fault slow 50ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut busy).await, Frame::Event(_)));
    let Env {
        relay,
        mock,
        store_dir,
    } = env;
    let app = relay.app.clone();
    let terminate = tokio::spawn(relay.terminate());
    until("draining", || {
        let app = app.clone();
        async move { app.draining() }
    })
    .await;
    assert_eq!(next_frame(&mut idle).await, Frame::Closed(Some(1012)));
    let (events, end) = read_until_end(&mut busy).await;
    assert!(
        end.is_none() && completed(&events),
        "the turn finishes: {end:?}"
    );
    assert_eq!(next_frame(&mut busy).await, Frame::Closed(Some(1012)));
    tokio::time::timeout(HANG_GUARD, terminate)
        .await
        .expect("hang guard: the drain ends with the last session, not at drain_timeout")
        .expect("terminate");
    assert_eq!(statuses(store_dir.path()), ["completed", "completed"]);
    drop(mock);
}
