//! The WebSocket ingress through real sockets (SPEC §3 and §4, WS-1 … WS-9): a relay on port 0
//! in front of the mock upstream on port 0, driven by tokio-tungstenite and, where a test must
//! misbehave on the wire (invalid UTF-8, never answering pings), by a hand-written raw client.

mod common;

use common::raw_ws::{RawWs, OP_CLOSE, OP_PING, OP_TEXT};
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchyard::mock::{MockOptions, MockUpstream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

const MODEL: &str = "gpt-test";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Asserts a §3 WebSocket error frame: top-level integer `status`, `error.type/code/param`.
fn assert_error(frame: &Value, status: u64, code: &str, param: Option<&str>) {
    assert_eq!(frame["type"], "error", "not an error frame: {frame}");
    assert!(
        frame["status"].is_u64(),
        "§3: every error frame carries an integer status: {frame}"
    );
    assert_eq!(frame["status"].as_u64(), Some(status), "{frame}");
    assert_eq!(frame["error"]["code"], code, "{frame}");
    assert!(frame["error"]["type"].is_string(), "{frame}");
    assert!(frame["error"]["message"].is_string(), "{frame}");
    if let Some(p) = param {
        assert_eq!(frame["error"]["param"], p, "{frame}");
    }
}

/// `common::next_frame` with one deadline over the whole wait. The shared helper guards each
/// read separately and skips pings, so a relay pinging more often than the guard (the default
/// 20 s interval) would keep a broken test waiting for ever.
async fn next_frame(ws: &mut Ws) -> Frame {
    tokio::time::timeout(HANG_GUARD, common::next_frame(ws))
        .await
        .expect("hang guard: next frame")
}

/// `common::read_turn` with one deadline over the whole turn (see [`next_frame`]).
async fn read_turn(ws: &mut Ws) -> Vec<Value> {
    tokio::time::timeout(HANG_GUARD, common::read_turn(ws))
        .await
        .expect("hang guard: turn")
}

/// The next frame, which must be an event.
async fn next_event(ws: &mut Ws) -> Value {
    match next_frame(ws).await {
        Frame::Event(e) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Sends a request and reads its turn, which must complete; returns the events.
async fn completed_turn(ws: &mut Ws, req: &Value) -> Vec<Value> {
    send(ws, req).await;
    let events = read_turn(ws).await;
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("response.completed")),
        "{events:?}"
    );
    events
}

/// Every response id the events mention.
fn ids(events: &[Value]) -> std::collections::BTreeSet<String> {
    events
        .iter()
        .filter_map(|e| e["response"]["id"].as_str().map(str::to_string))
        .collect()
}

/// Status, JSON body and raw body text of a refused upgrade.
async fn refused(url: &str, key: &str, headers: &[(&str, &str)]) -> (u16, Value, String) {
    match ws_connect_with(url, key, headers).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let text = String::from_utf8_lossy(&body).into_owned();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {text:?}"));
            (resp.status().as_u16(), json, text)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// Asserts an OpenAI-shaped HTTP error body: `{"error":{"type","code","message"}}`.
fn assert_http_error(body: &Value, code: &str) {
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
}

/// A relay in front of a mock started with `opts` (the shared helper starts a default mock).
async fn relay_with_mock(opts: MockOptions, yaml: impl FnOnce(&str) -> String) -> Env {
    let mock = MockUpstream::start(opts).await.expect("mock");
    common::relay_on(mock, yaml).await
}

/// A relay whose `keys:` holds the test key `test` = [`KEY`] and then `more_keys` (YAML list
/// entries), one `ctx_pool` account `up` on the mock, then `extra`.
async fn relay_keys(more_keys: &str, extra: &str) -> Env {
    relay_from(|mock| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\n{more_keys}accounts:\n  - id: up\n    base_url: {mock}\n    api_key: sk-up\n    mode: ctx_pool\n{extra}"
        )
    })
    .await
}

/// Reads direct from the socket until a Close frame: its code and reason.
async fn read_close(ws: &mut Ws) -> (u16, String) {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => panic!("Close frame without a code"),
                Some(Ok(Message::Text(t))) => panic!("expected a Close frame, got {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket ended without a Close frame: {e}"),
                None => panic!("socket ended without a Close frame"),
            }
        }
    };
    tokio::time::timeout(HANG_GUARD, read)
        .await
        .expect("hang guard: close")
}

// ---------------------------------------------------------------------------------------------
// WS-1: paths, query strings, permessage-deflate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws1_upgrade_accepted_on_all_three_paths_with_and_without_query() {
    let env = relay("").await;
    let addr = env.relay.addr;
    for path in [
        "/v1/responses",
        "/responses",
        "/backend-api/codex/responses",
        "/v1/responses?client=codex&x=1",
        "/responses?a=b",
        "/backend-api/codex/responses?thread=t1",
    ] {
        let mut ws = ws_connect_with(&format!("ws://{addr}{path}"), KEY, &[])
            .await
            .unwrap_or_else(|e| panic!("WS-1: upgrade on {path} refused: {e}"));
        completed_turn(&mut ws, &create(MODEL, &format!("hello via {path}"))).await;
    }
    assert_eq!(env.mock.log().requests.len(), 6);
}

#[tokio::test]
async fn ws1_permessage_deflate_offered_is_not_negotiated_and_session_works() {
    let env = relay("").await;
    let mut req = env.ws_url().into_client_request().expect("request");
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {KEY}")).expect("header"),
    );
    h.insert(
        "sec-websocket-extensions",
        HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
    );
    let (mut ws, resp) = tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(req))
        .await
        .expect("hang guard: connect")
        .expect("WS-1: upgrade with permessage-deflate offered");
    assert!(
        resp.headers().get("sec-websocket-extensions").is_none(),
        "WS-1: the relay does not negotiate extensions: {:?}",
        resp.headers()
    );
    completed_turn(&mut ws, &create(MODEL, "compressed? no")).await;
    completed_turn(&mut ws, &create(MODEL, "still fine")).await;
}

// ---------------------------------------------------------------------------------------------
// WS-2: authentication before the upgrade
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws2_missing_unknown_and_wrong_scheme_keys_get_401_json() {
    let env = relay("").await;
    let url = env.ws_url();

    let (status, body, _) = refused(&url, "", &[]).await;
    assert_eq!(status, 401, "WS-2: missing key");
    assert_http_error(&body, "missing_api_key");

    let unknown = "sy-not-a-configured-key-123";
    let (status, body, text) = refused(&url, unknown, &[]).await;
    assert_eq!(status, 401, "WS-2: unknown key");
    assert_http_error(&body, "invalid_api_key");
    assert!(!text.contains(unknown), "WS-2: the key is never echoed");

    let basic = format!("Basic {KEY}");
    let (status, body, text) = refused(&url, "", &[("authorization", &basic)]).await;
    assert_eq!(
        status, 401,
        "WS-2: a key under another scheme is not a bearer key"
    );
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(!text.contains(KEY), "WS-2: the key is never echoed");

    assert!(
        env.mock.log().upgrades.is_empty(),
        "nothing reaches the upstream"
    );
}

#[tokio::test]
async fn ws2_disabled_key_gets_403_json() {
    let disabled = "sy-disabled-key";
    let env = relay_keys(
        &format!("  - id: off\n    key: {disabled}\n    disabled: true\n"),
        "",
    )
    .await;
    let (status, body, text) = refused(&env.ws_url(), disabled, &[]).await;
    assert_eq!(status, 403, "WS-2: disabled key");
    assert_http_error(&body, "api_key_disabled");
    assert_eq!(body["error"]["type"], "permission_error");
    assert!(!text.contains(disabled), "WS-2: the key is never echoed");
    // The enabled key on the same relay still works.
    let mut ws = env.connect().await;
    completed_turn(&mut ws, &create(MODEL, "hi")).await;
}

// ---------------------------------------------------------------------------------------------
// WS-3: 426 when WebSocket ingress is off, globally or per key
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws3_ingress_websocket_false_gets_426_json_on_every_path() {
    let env = relay("ingress:\n  websocket: false\n").await;
    for path in [
        "/v1/responses",
        "/responses",
        "/backend-api/codex/responses",
    ] {
        let url = format!("ws://{}{path}", env.relay.addr);
        let (status, body, _) = refused(&url, KEY, &[]).await;
        assert_eq!(status, 426, "WS-3: {path} (never 404/405)");
        assert_http_error(&body, "websocket_not_enabled");
    }
    assert!(env.mock.log().upgrades.is_empty());
}

#[tokio::test]
async fn ws3_key_with_websocket_false_gets_426_while_another_key_upgrades() {
    let http_only = "sy-http-only-key";
    let env = relay_keys(
        &format!("  - id: http-only\n    key: {http_only}\n    websocket: false\n"),
        "",
    )
    .await;
    let (status, body, text) = refused(&env.ws_url(), http_only, &[]).await;
    assert_eq!(status, 426, "WS-3: key with websocket: false");
    assert_http_error(&body, "websocket_not_enabled");
    assert!(!text.contains(http_only));
    let mut ws = env.connect().await;
    completed_turn(&mut ws, &create(MODEL, "this key may use WebSocket")).await;
}

// ---------------------------------------------------------------------------------------------
// WS-4: client frames
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws4_non_json_text_gets_invalid_event_and_socket_stays_open() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    ws.send(Message::Text("this is not json".into()))
        .await
        .expect("send");
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    ws.send(Message::Text("[1,2,3]".into()))
        .await
        .expect("send");
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    // Answered by the relay itself: nothing was dialed upstream.
    assert!(env.mock.log().upgrades.is_empty());
    completed_turn(&mut ws, &create(MODEL, "after the bad frame")).await;
}

#[tokio::test]
async fn ws4_unknown_type_and_steer_get_unsupported_event_type() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    for t in ["response.cancel", "response.steer", "session.update"] {
        let mut frame = create(MODEL, "x");
        frame["type"] = json!(t);
        send(&mut ws, &frame).await;
        assert_error(
            &next_event(&mut ws).await,
            400,
            "unsupported_event_type",
            None,
        );
    }
    assert!(
        env.mock.log().upgrades.is_empty(),
        "refused by the relay, not the upstream"
    );
    completed_turn(&mut ws, &create(MODEL, "still open")).await;
}

#[tokio::test]
async fn ws4_binary_frame_with_utf8_json_is_served_like_text() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let req = create(MODEL, "sent as binary");
    ws.send(Message::Binary(req.to_string().into_bytes().into()))
        .await
        .expect("send");
    let events = read_turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let log = env.mock.log();
    assert_eq!(log.requests.len(), 1);
    assert_eq!(log.requests[0].body["input"], req["input"]);
    // A binary frame that is not UTF-8 is refused like non-JSON text, without closing.
    ws.send(Message::Binary(vec![0xff, 0xfe, 0x00].into()))
        .await
        .expect("send");
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    completed_turn(&mut ws, &create(MODEL, "and again")).await;
}

#[tokio::test]
async fn ws4_response_processed_gets_no_answer() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let first = completed_turn(&mut ws, &create(MODEL, "one")).await;
    send(
        &mut ws,
        &json!({"type": "response.processed", "response_id": response_id(&first)}),
    )
    .await;
    send(&mut ws, &create(MODEL, "two")).await;
    // The very next frame belongs to the next request: nothing answered the processed event.
    let next = next_event(&mut ws).await;
    assert_eq!(next["type"], "response.created", "{next}");
    let rest = read_turn(&mut ws).await;
    assert_eq!(rest.last().unwrap()["type"], "response.completed");
    assert_eq!(
        env.mock.log().requests.len(),
        2,
        "processed is not forwarded"
    );
}

#[tokio::test]
async fn ws4_frame_without_type_is_a_response_create() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let mut req = create(MODEL, "no type here");
    req.as_object_mut().unwrap().remove("type");
    completed_turn(&mut ws, &req).await;
    let log = env.mock.log();
    assert_eq!(log.requests.len(), 1);
    assert_eq!(
        log.requests[0].body["type"], "response.create",
        "WS-4: the upstream receives an explicit type"
    );
    assert_eq!(log.requests[0].body["model"], MODEL);
}

#[tokio::test]
async fn ws4_text_frame_with_invalid_utf8_closes_1007() {
    let env = relay("").await;
    let mut raw = RawWs::connect(env.relay.addr, KEY).await;
    raw.send_frame(OP_TEXT, &[0xff, 0xfe]).await;
    let frame = raw.read_frame().await.expect("a Close frame before EOF");
    assert_eq!(frame.opcode, OP_CLOSE, "WS-4: expected a Close frame");
    assert_eq!(frame.close_code(), Some(1007));
}

// ---------------------------------------------------------------------------------------------
// WS-5: model inheritance and unsupported parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws5_first_request_without_model_is_missing_model() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let mut req = create(MODEL, "no model");
    req.as_object_mut().unwrap().remove("model");
    send(&mut ws, &req).await;
    assert_error(
        &next_event(&mut ws).await,
        400,
        "missing_model",
        Some("model"),
    );
    assert!(env.mock.log().upgrades.is_empty());
    completed_turn(&mut ws, &create(MODEL, "with a model")).await;
}

#[tokio::test]
async fn ws5_later_request_without_model_inherits_the_previous_one() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    completed_turn(&mut ws, &create("gpt-inherited", "first")).await;
    let mut req = create(MODEL, "second, no model");
    req.as_object_mut().unwrap().remove("model");
    let events = completed_turn(&mut ws, &req).await;
    let log = env.mock.log();
    assert_eq!(log.requests.len(), 2);
    assert_eq!(log.requests[1].body["model"], "gpt-inherited", "WS-5");
    assert_eq!(events.last().unwrap()["response"]["model"], "gpt-inherited");
}

#[tokio::test]
async fn ws5_background_and_stream_id_are_unsupported_stream_true_is_tolerated() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let mut bg = create(MODEL, "later please");
    bg["background"] = json!(true);
    send(&mut ws, &bg).await;
    assert_error(
        &next_event(&mut ws).await,
        400,
        "unsupported_parameter",
        Some("background"),
    );
    let mut lane = create(MODEL, "lane two");
    lane["stream_id"] = json!("s2");
    send(&mut ws, &lane).await;
    assert_error(
        &next_event(&mut ws).await,
        400,
        "unsupported_parameter",
        Some("stream_id"),
    );
    assert!(
        env.mock.log().upgrades.is_empty(),
        "refused by the relay, not the upstream"
    );
    let mut streamed = create(MODEL, "codex sends stream:true");
    streamed["stream"] = json!(true);
    completed_turn(&mut ws, &streamed).await;
    assert_eq!(env.mock.log().requests.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// WS-6: client message size limit
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws6_frame_over_the_limit_closes_1009_with_a_reason() {
    let env = relay("limits:\n  max_client_message_bytes: 2048\n").await;
    let mut ws = env.connect().await;
    let small = create(MODEL, &"a".repeat(900));
    let len = small.to_string().len();
    assert!((1024..2048).contains(&len), "1 KiB frame: {len}");
    completed_turn(&mut ws, &small).await;

    let big = create(MODEL, &"b".repeat(4096));
    assert!(big.to_string().len() > 4096);
    send(&mut ws, &big).await;
    let (code, reason) = read_close(&mut ws).await;
    assert_eq!(code, 1009, "WS-6");
    assert!(!reason.is_empty(), "WS-6: the close carries a reason");
    assert_eq!(
        env.mock.log().requests.len(),
        1,
        "the big frame went nowhere"
    );
}

#[tokio::test]
async fn ws6_frame_over_the_limit_seen_through_next_frame() {
    let env = relay("limits:\n  max_client_message_bytes: 2048\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create(MODEL, &"c".repeat(4096))).await;
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1009)), "WS-6");
}

// ---------------------------------------------------------------------------------------------
// WS-7: upstream dial headers
// ---------------------------------------------------------------------------------------------

const IDENTITY: &[(&str, &str)] = &[
    ("originator", "codex_exec"),
    ("session-id", "sess-123"),
    ("thread-id", "thread-456"),
    ("x-codex-window-id", "win-7"),
    ("x-codex-turn-metadata", "{\"turn\":1}"),
    ("x-codex-beta-features", "feat-a,feat-b"),
    ("user-agent", "codex_exec/0.169.0 (Linux; x86_64)"),
    ("accept-language", "de-CH"),
];

fn ws7_yaml(account_key: &str) -> impl FnOnce(&str) -> String + '_ {
    move |mock| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {mock}\n    api_key: {account_key}\n    mode: ctx_pool\n    headers:\n      x-extra: v\n"
        )
    }
}

fn mock_accepting_only_sk_up() -> MockOptions {
    MockOptions {
        api_keys: vec!["sk-up".into()],
        ..MockOptions::default()
    }
}

#[tokio::test]
async fn ws7_dial_carries_account_key_beta_account_headers_and_identity_only() {
    let env = relay_with_mock(mock_accepting_only_sk_up(), ws7_yaml("sk-up")).await;
    let mut headers = IDENTITY.to_vec();
    headers.push(("x-secret-other", "do-not-forward"));
    let mut ws = ws_connect_with(&env.ws_url(), KEY, &headers)
        .await
        .expect("connect");
    // The mock accepts only `sk-up`: the turn completing shows the account's key was sent,
    // not the client's `Authorization` (which the mock would refuse).
    completed_turn(&mut ws, &create(MODEL, "who am I")).await;
    let log = env.mock.log();
    assert_eq!(log.upgrades.len(), 1);
    assert_eq!(log.refused_upgrades, 0);
    let h = &log.upgrades[0].headers;
    assert_eq!(
        h.get("openai-beta").map(String::as_str),
        Some("responses_websockets=2026-02-06"),
        "{h:?}"
    );
    assert_eq!(h.get("x-extra").map(String::as_str), Some("v"), "{h:?}");
    for (name, value) in IDENTITY {
        assert_eq!(
            h.get(*name).map(String::as_str),
            Some(*value),
            "WS-7: identity header {name} copied: {h:?}"
        );
    }
    assert!(!h.contains_key("x-secret-other"), "{h:?}");
    assert!(
        h.values().all(|v| !v.contains(KEY)),
        "the client's key never reaches the upstream: {h:?}"
    );
}

#[tokio::test]
async fn ws7_wrong_account_key_fails_the_turn_with_502() {
    let env = relay_with_mock(mock_accepting_only_sk_up(), ws7_yaml("sk-wrong")).await;
    let mut ws = env.connect().await;
    send(&mut ws, &create(MODEL, "will not dial")).await;
    let events = read_turn(&mut ws).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_error(&events[0], 502, "upstream_connection_lost", None);
    let log = env.mock.log();
    assert_eq!(
        log.refused_upgrades, 1,
        "UP-8: the 401 disabled the account, so there is nothing to retry on"
    );
    assert!(!env.relay.app.registry.enabled("up"));
    assert!(log.upgrades.is_empty());
    assert!(log.requests.is_empty());
}

// ---------------------------------------------------------------------------------------------
// WS-8: pings
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws8_relay_pings_the_client_every_interval() {
    let env = relay("session:\n  client_ping_interval: 50ms\n  client_idle_timeout: 60s\n").await;
    let mut ws = env.connect().await;
    let mut pings = 0;
    while pings < 3 {
        let msg = tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("hang guard: WS-8 ping");
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Pong(_))) => {}
            other => panic!("expected pings, got {other:?}"),
        }
    }
    // Pings are answered (tungstenite pongs on read), so the socket is still fine.
    completed_turn(&mut ws, &create(MODEL, "after pings")).await;
}

#[tokio::test]
async fn ws8_client_that_answers_pings_outlives_the_idle_timeout() {
    // Margins wide enough for a loaded machine: a pong may be late by most of the timeout.
    let env = relay("session:\n  client_ping_interval: 100ms\n  client_idle_timeout: 1s\n").await;
    let mut ws = env.connect().await;
    // Fifteen pings span well over the idle timeout; the pongs keep the socket open.
    let mut pings = 0;
    while pings < 15 {
        let msg = tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("hang guard: WS-8 ping");
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Pong(_))) => {}
            other => panic!("WS-8: a ponging client must stay open, got {other:?}"),
        }
    }
    completed_turn(&mut ws, &create(MODEL, "still here")).await;
}

#[tokio::test]
async fn ws8_client_that_never_pongs_is_closed_1001() {
    // The first ping is due long before the idle timeout, even on a loaded machine.
    let env = relay("session:\n  client_ping_interval: 50ms\n  client_idle_timeout: 1s\n").await;
    let mut raw = RawWs::connect(env.relay.addr, KEY).await;
    // One guard over the whole read: the pings alone would keep a per-read guard from firing.
    let (pings, code) = tokio::time::timeout(HANG_GUARD, async {
        let mut pings = 0;
        loop {
            let frame = raw
                .read_frame()
                .await
                .expect("WS-8: a Close frame before EOF");
            match frame.opcode {
                OP_PING => pings += 1,
                OP_CLOSE => return (pings, frame.close_code()),
                op => panic!("unexpected frame opcode {op}"),
            }
        }
    })
    .await
    .expect("hang guard: WS-8 no close for a client that never pongs");
    assert!(pings >= 1, "WS-8: pinged before being closed");
    assert_eq!(code, Some(1001), "WS-8: no pong within client_idle_timeout");
}

#[tokio::test]
async fn ws8_relay_answers_client_pings() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    ws.send(Message::Ping(b"x".to_vec().into()))
        .await
        .expect("send ping");
    let pong = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    };
    let pong = tokio::time::timeout(HANG_GUARD, pong)
        .await
        .expect("hang guard: WS-8 pong");
    assert_eq!(&pong[..], b"x", "WS-8: the pong echoes the ping");
    completed_turn(&mut ws, &create(MODEL, "after ping")).await;
}

// ---------------------------------------------------------------------------------------------
// WS-9: sockets of one key are independent
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ws9_two_sockets_of_one_key_run_turns_concurrently_and_apart() {
    let env = relay("").await;
    let mut a = env.connect().await;
    let mut b = env.connect().await;
    send(
        &mut a,
        &create(MODEL, "slow one [[mock:text 100]] [[mock:fault slow 5ms]]"),
    )
    .await;
    let a_first = next_event(&mut a).await;
    assert_eq!(a_first["type"], "response.created");
    let a_id = a_first["response"]["id"].as_str().expect("id").to_string();

    // B runs a whole turn while A's is still streaming upstream.
    let b_events = completed_turn(&mut b, &create(MODEL, "quick one")).await;
    let log = env.mock.log();
    assert!(
        !log.stream_ends.iter().any(|e| e.response_id == a_id),
        "WS-9: B's turn completed while A's was still running"
    );

    let mut a_events = vec![a_first];
    a_events.extend(read_turn(&mut a).await);
    assert_eq!(a_events.last().unwrap()["type"], "response.completed");
    assert_eq!(ids(&a_events), [a_id.clone()].into());
    let b_ids = ids(&b_events);
    assert_eq!(b_ids.len(), 1);
    assert!(
        !b_ids.contains(&a_id),
        "WS-9: no response id crosses sessions"
    );
    let a_text = serde_json::to_string(&a_events).unwrap();
    let b_id = b_ids.iter().next().unwrap();
    assert!(!a_text.contains(b_id.as_str()));
}

#[tokio::test]
async fn ws9_response_id_of_another_socket_is_not_found_and_socket_stays_usable() {
    let env = relay("").await;
    let mut a = env.connect().await;
    let mut b = env.connect().await;
    let a_id = response_id(&completed_turn(&mut a, &create(MODEL, "mine")).await);

    let mut steal = create(MODEL, "chain from A");
    steal["previous_response_id"] = json!(a_id);
    send(&mut b, &steal).await;
    assert_error(
        &next_event(&mut b).await,
        400,
        "previous_response_not_found",
        Some("previous_response_id"),
    );
    // The stored response would chain upstream (same account): the relay refused it itself.
    assert!(
        env.mock
            .log()
            .requests
            .iter()
            .all(|r| r.body["previous_response_id"] != json!(a_id)),
        "WS-9: the foreign id never went upstream"
    );
    completed_turn(&mut b, &create(MODEL, "fresh start")).await;
    // A still chains from its own response.
    let mut own = create(MODEL, "continue");
    own["previous_response_id"] = json!(a_id);
    completed_turn(&mut a, &own).await;
}

// ---------------------------------------------------------------------------------------------
// §3: errors for frames that arrive during a turn are held until its terminal
// ---------------------------------------------------------------------------------------------

const SLOW: &str = "slow [[mock:text 40]] [[mock:fault slow 5ms]]";

#[tokio::test]
async fn s3_errors_during_a_turn_follow_its_terminal_in_order() {
    let env = relay("session:\n  preempt_policy: reject\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create(MODEL, SLOW)).await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["type"], "response.created");
    ws.send(Message::Text("{not json".into()))
        .await
        .expect("send");
    send(&mut ws, &create(MODEL, "second while the first runs")).await;

    // read_turn stops at the first terminal, an `error` included: the turn's own terminal
    // must come first.
    let events = read_turn(&mut ws).await;
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "§3: the running turn ends before any held error: {:?}",
        types(&events)
    );
    assert!(events.iter().all(|e| e["type"] != "error"));
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    assert_error(
        &next_event(&mut ws).await,
        409,
        "response_in_progress",
        None,
    );
    assert_eq!(env.mock.log().requests.len(), 1);
    // The socket goes on.
    completed_turn(&mut ws, &create(MODEL, "now the next one")).await;
}

#[tokio::test]
async fn s3_one_more_than_max_held_errors_closes_1008() {
    let env = relay("session:\n  max_held_errors: 2\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create(MODEL, SLOW)).await;
    assert_eq!(next_event(&mut ws).await["type"], "response.created");
    for i in 0..3 {
        ws.send(Message::Text(format!("garbage {i}").into()))
            .await
            .expect("send");
    }
    let end = loop {
        match next_frame(&mut ws).await {
            Frame::Event(e) => {
                assert_ne!(
                    e["type"], "response.completed",
                    "§3: closed during the turn"
                );
                assert_ne!(e["type"], "error", "§3: held errors are not sent: {e}");
            }
            other => break other,
        }
    };
    assert_eq!(end, Frame::Closed(Some(1008)), "§3: max_held_errors");
}

#[tokio::test]
async fn s3_max_held_errors_is_not_reached_by_as_many_errors() {
    let env = relay("session:\n  max_held_errors: 2\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create(MODEL, SLOW)).await;
    assert_eq!(next_event(&mut ws).await["type"], "response.created");
    for i in 0..2 {
        ws.send(Message::Text(format!("garbage {i}").into()))
            .await
            .expect("send");
    }
    let events = read_turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    assert_error(&next_event(&mut ws).await, 400, "invalid_event", None);
    completed_turn(&mut ws, &create(MODEL, "open")).await;
}

// ---------------------------------------------------------------------------------------------
// Metrics (OP-1 as far as the ingress goes)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_show_the_client_socket_gauge_after_sessions_close() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    completed_turn(&mut ws, &create(MODEL, "count me")).await;
    ws.close(None).await.expect("close");
    // Drain to the end of the close handshake (one guard: pings would renew a per-read one).
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .expect("hang guard: close handshake");
    let text = tokio::time::timeout(HANG_GUARD, async {
        reqwest::get(env.http_url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("body")
    })
    .await
    .expect("hang guard: metrics");
    assert!(
        text.contains("switchyard_client_sockets_open"),
        "gauge missing from /metrics:\n{text}"
    );
}
