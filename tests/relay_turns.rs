//! Turns through the relay: the per-turn pump (TP), continuity on one socket (CT-1, CT-3, CT-5),
//! failures by side (CT-10), the stopgap account choice, the operations endpoints (OP-1), the
//! embedded default and config validation before binding (OP-4). Real relay on port 0, real
//! mock upstream on port 0, real WebSocket clients.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Tests that assert exact changes of the process-wide `switchyard_turns_total` counters for
/// `upstream_lost` / `client_cancelled` (or cause them) run one at a time.
static TURN_COUNTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn with_store_false(mut v: Value) -> Value {
    v["store"] = json!(false);
    v
}

fn chained(prev: &str, text: &str) -> Value {
    let mut c = create("gpt-test", text);
    c["previous_response_id"] = json!(prev);
    c["store"] = json!(false);
    c
}

fn deltas(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap_or(""))
        .collect()
}

fn words(n: usize) -> String {
    (1..=n)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn assert_contiguous(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "event {i} out of order: {e}");
    }
}

/// The single error frame a refused request gets, checked against §3.
fn assert_error(events: &[Value], status: u16, kind: &str, code: &str, param: Option<&str>) {
    assert_eq!(events.len(), 1, "one error frame expected: {events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["status"], status, "{e}");
    assert_eq!(e["error"]["type"], kind, "{e}");
    assert_eq!(e["error"]["code"], code, "{e}");
    assert_eq!(e["error"]["param"], json!(param), "{e}");
}

fn last_type(events: &[Value]) -> &str {
    events.last().and_then(|e| e["type"].as_str()).unwrap_or("")
}

/// One response read as raw WebSocket messages: every event must be its own text frame.
async fn read_turn_raw(ws: &mut Ws) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(HANG_GUARD, ws.next())
            .await
            .expect("hang guard: next frame");
        let text = match msg {
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?} after {out:?}"),
        };
        let v: Value = serde_json::from_str(&text).expect("each text frame is one JSON event");
        out.push(text);
        if is_terminal(&v) {
            return out;
        }
    }
}

/// `text` with every API id (`prefix_` + 48 hex digits) replaced by its order of first
/// appearance, encrypted reasoning masked and `created_at` zeroed; everything else is left byte for byte.
fn normalize(text: &str, ids: &mut HashMap<String, usize>) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, seg) in text.split('"').enumerate() {
        if i > 0 {
            out.push('"');
        }
        let is_id = seg.split_once('_').is_some_and(|(p, h)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_lowercase())
                && h.len() == 48
                && h.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if seg.starts_with("gAAAA") {
            // Encrypted reasoning: bound to the (random) item id.
            out.push_str("ENC");
        } else if is_id {
            let n = ids.len();
            let n = *ids.entry(seg.to_string()).or_insert(n);
            out.push_str(&format!("ID{n}"));
        } else {
            out.push_str(seg);
        }
    }
    let key = "\"created_at\":";
    let mut res = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find(key) {
        res.push_str(&rest[..at + key.len()]);
        rest = rest[at + key.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        res.push('0');
    }
    res.push_str(rest);
    res
}

async fn ws_send_text(ws: &mut Ws, text: &str) {
    use futures::SinkExt;
    ws.send(Message::Text(text.to_string().into()))
        .await
        .expect("send");
}

async fn get(url: &str) -> reqwest::Response {
    tokio::time::timeout(HANG_GUARD, reqwest::get(url))
        .await
        .expect("hang guard: http")
        .expect("http get")
}

async fn metrics_text(env: &Env) -> String {
    let resp = get(&env.http_url("/metrics")).await;
    assert_eq!(resp.status(), 200);
    resp.text().await.expect("metrics body")
}

/// Sum of the samples of `name` whose labels include every `label="value"` in `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn turns(text: &str, status: &str) -> f64 {
    sample(
        text,
        "switchyard_turns_total",
        &[&format!("status=\"{status}\"")],
    )
}

/// Polls `/metrics` until `cond` holds (bounded by the hang guard).
async fn metrics_eventually(env: &Env, cond: impl Fn(&str) -> bool) -> String {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let text = metrics_text(env).await;
            if cond(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("hang guard: metrics condition never held")
}

// ---------------------------------------------------------------------------------------------
// TP: the per-turn pump

#[tokio::test]
async fn tp1_every_event_in_order_in_its_own_text_frame() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "count [[mock:text 30]]")).await;
    let raw = read_turn_raw(&mut ws).await;
    let events: Vec<Value> = raw
        .iter()
        .map(|t| serde_json::from_str(t).expect("json"))
        .collect();
    dump("relay_tp1_text", &events);
    assert!(events.len() > 10, "several events: {events:?}");
    assert_contiguous(&events);
    assert_eq!(events.iter().filter(|e| is_terminal(e)).count(), 1);
    assert_eq!(last_type(&events), "response.completed");
    assert_eq!(deltas(&events), words(30));
    let id = response_id(&events);
    assert!(
        events
            .iter()
            .filter_map(|e| e["response"]["id"].as_str())
            .all(|r| r == id),
        "one response"
    );
    // Nothing stray after the terminal: the next thing on the socket is the next response.
    send(&mut ws, &create("gpt-test", "again [[mock:text 3]]")).await;
    let next = read_turn(&mut ws).await;
    assert_eq!(next[0]["type"], "response.created");
    assert_eq!(next[0]["sequence_number"], 0);
    assert_ne!(response_id(&next), id);
}

#[tokio::test]
async fn tp1_events_are_the_upstreams_bytes() {
    let env = relay("").await;
    let request = create("gpt-test", "compare [[mock:text 30]] [[mock:reason]]");
    let mut ws = env.connect().await;
    send(&mut ws, &request).await;
    let via_relay = read_turn_raw(&mut ws).await;

    // The same request straight to the mock, with the relay account's key (same mock account).
    let direct_url = format!("ws://{}/v1/responses", env.mock.addr);
    let mut direct = ws_connect(&direct_url, "sk-up").await;
    send(&mut direct, &request).await;
    let straight = read_turn_raw(&mut direct).await;

    assert_eq!(via_relay.len(), straight.len());
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    for (i, (r, s)) in via_relay.iter().zip(&straight).enumerate() {
        assert_eq!(
            normalize(r, &mut a),
            normalize(s, &mut b),
            "event {i} differs (relay vs direct)"
        );
    }
    // The relay forwarded the client's frame unchanged too.
    assert_eq!(env.mock.log().requests[0].body, request);
}

/// A hand-made upstream for one connection: reads one request, answers with `frames` as
/// they are and returns the request it read (the relay keeps idle contexts open, UP-1, so it
/// does not wait for the relay to go).
async fn verbatim_upstream(frames: Vec<String>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
    use futures::SinkExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let mut seen = Vec::new();
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                seen.push(t.to_string());
                for f in &frames {
                    ws.send(Message::Text(f.clone().into()))
                        .await
                        .expect("send");
                }
                break;
            }
        }
        seen
    });
    (base_url, task)
}

#[tokio::test]
async fn tp1_upstream_bytes_are_forwarded_verbatim() {
    // Key order, spacing, number spelling and escapes as no serializer of ours would write
    // them: a relay that re-encoded anything would change these bytes.
    let frames: Vec<String> = [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_verbatim","object":"response","status":"in_progress","output":[],"usage":null}}"#,
        r#"{ "sequence_number" : 1, "type" : "response.output_text.delta", "item_id":"msg_1", "delta" : "caf\u00e9 \ud83d\ude00", "extra": [1.50, 2e3] }"#,
        r#"{"type":"response.output_text.delta","sequence_number":2,"delta":"ünïcödé\n","item_id":"msg_1","z":{}}"#,
        r#"{"type":"response.completed","sequence_number":3,"response":{"id":"resp_verbatim","object":"response","status":"completed","output":[],"usage":{"input_tokens":1,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":3}},"zz_unknown":null}"#,
    ]
    .iter()
    .map(|f| f.to_string())
    .collect();
    let (base_url, upstream) = verbatim_upstream(frames.clone()).await;
    let env = relay_from(|_| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: raw\n    base_url: {base_url}\n    api_key: sk-raw\n"
        )
    })
    .await;
    let mut ws = env.connect().await;
    let request = r#"{"type":"response.create", "model":"gpt-test","input":"hi",  "stream":true}"#;
    ws_send_text(&mut ws, request).await;
    let got = read_turn_raw(&mut ws).await;
    assert_eq!(got, frames, "byte for byte, one frame each");
    drop(ws);
    let seen = tokio::time::timeout(HANG_GUARD, upstream)
        .await
        .expect("hang guard: upstream")
        .expect("upstream task");
    assert_eq!(
        seen,
        [request],
        "the client's frame went upstream as it was"
    );
}

#[tokio::test]
async fn tp2_paused_client_with_a_one_slot_pump_loses_nothing() {
    let env = relay("session:\n  pump_channel: 1\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "long [[mock:text 2000]]")).await;
    // The client does not read until the mock has streamed everything it could (bounded: with
    // backpressure the mock may be held back until the client reads).
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while env.mock.log().stream_ends.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let events = read_turn(&mut ws).await;
    assert_contiguous(&events);
    assert_eq!(last_type(&events), "response.completed");
    assert_eq!(deltas(&events), words(2000));
    let log = env.mock.log();
    assert_eq!(log.stream_ends.len(), 1);
    assert_eq!(log.stream_ends[0].sent, events.len());
    assert_eq!(log.stream_ends[0].planned, events.len());
    // The socket keeps working after a backpressured turn.
    send(&mut ws, &create("gpt-test", "short [[mock:text 2]]")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
}

#[tokio::test]
async fn tp3_tp4_client_drop_mid_turn_closes_the_upstream_before_it_finishes() {
    let _serial = TURN_COUNTS.lock().await;
    let env = relay("").await;
    let before = turns(&metrics_text(&env).await, "client_cancelled");
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create(
            "gpt-test",
            "slow [[mock:text 200]] [[mock:fault slow 20ms]]",
        ),
    )
    .await;
    // Wait for output to be flowing, then vanish without a Close frame (as Codex does).
    loop {
        match next_frame(&mut ws).await {
            Frame::Event(e) if e["type"] == "response.output_text.delta" => break,
            Frame::Event(_) => {}
            other => panic!("socket ended early: {other:?}"),
        }
    }
    drop(ws);
    eventually(|| !env.mock.log().stream_ends.is_empty()).await;
    let log = env.mock.log();
    let conn = log.upgrades[0].conn;
    assert!(
        log.client_closes.contains(&conn),
        "the relay closed its upstream socket: {log:?}"
    );
    let end = &log.stream_ends[0];
    assert_eq!(end.end, "client_closed", "{end:?}");
    assert!(
        end.sent < end.planned,
        "the upstream saw the close before its last event: {end:?}"
    );
    // TP-4: recorded as a client cancel (never an upstream failure).
    metrics_eventually(&env, |m| turns(m, "client_cancelled") >= before + 1.0).await;
}

#[tokio::test]
async fn tp6_consecutive_turns_never_interleave() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "one [[mock:text 40]]")).await;
    let first = read_turn(&mut ws).await;
    send(&mut ws, &create("gpt-test", "two [[mock:text 40]]")).await;
    let second = read_turn(&mut ws).await;
    let (id1, id2) = (response_id(&first), response_id(&second));
    assert_ne!(id1, id2);
    for (events, id) in [(&first, &id1), (&second, &id2)] {
        assert_contiguous(events);
        for e in events.iter() {
            if let Some(r) = e["response"]["id"].as_str() {
                assert_eq!(r, id.as_str(), "event of another response: {e}");
            }
        }
    }
    let ids_of = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| e["item_id"].as_str().map(str::to_string))
            .collect()
    };
    let (items1, items2) = (ids_of(&first), ids_of(&second));
    assert!(!items1.is_empty() && !items2.is_empty());
    assert!(items1.iter().all(|i| !items2.contains(i)));
}

/// TP-5 `reject`: a request during a turn gets 409 after the running turn's terminal.
#[tokio::test]
async fn tp5_reject_answers_409_after_the_running_terminal() {
    let env = relay("session:\n  preempt_policy: reject\n").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "slow [[mock:text 200]] [[mock:fault slow 5ms]]"),
    )
    .await;
    loop {
        match next_frame(&mut ws).await {
            Frame::Event(e) if e["type"] == "response.output_text.delta" => break,
            Frame::Event(_) => {}
            other => panic!("socket ended early: {other:?}"),
        }
    }
    send(&mut ws, &create("gpt-test", "impatient")).await;
    // The running turn goes on to its terminal with no foreign frame in between.
    let rest = read_turn(&mut ws).await;
    assert_eq!(last_type(&rest), "response.completed", "{:?}", types(&rest));
    assert!(rest.iter().all(|e| e["type"] != "error"));
    let refused = read_turn(&mut ws).await;
    assert_error(
        &refused,
        409,
        "invalid_request_error",
        "response_in_progress",
        None,
    );
    assert_eq!(env.mock.log().requests.len(), 1, "never sent upstream");
    send(&mut ws, &create("gpt-test", "now")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    assert_eq!(env.mock.log().requests.len(), 2);
}

#[tokio::test]
async fn tp7_failed_and_incomplete_are_forwarded_as_is_and_the_session_goes_on() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    for (fixture, terminal) in [
        ("failed", "response.failed"),
        ("incomplete", "response.incomplete"),
    ] {
        send(
            &mut ws,
            &create("gpt-test", &format!("[[mock:fixture {fixture}]]")),
        )
        .await;
        let events = read_turn(&mut ws).await;
        assert_eq!(last_type(&events), terminal);
        let id = response_id(&events);
        let expected =
            switchyard::mock::fixtures::replay(fixture, &id, &Value::Null).expect("fixture");
        assert_eq!(events, expected, "{fixture} forwarded as is");
        send(&mut ws, &create("gpt-test", "and then [[mock:text 3]]")).await;
        let next = read_turn(&mut ws).await;
        assert_eq!(last_type(&next), "response.completed");
        assert_eq!(deltas(&next), words(3));
    }
    assert_eq!(env.mock.log().upgrades.len(), 1);
}

#[tokio::test]
async fn tp7_upstream_error_event_is_forwarded_with_its_status_and_the_session_goes_on() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:fault error 500 server_error]]"),
    )
    .await;
    let events = read_turn(&mut ws).await;
    assert_eq!(
        types(&events),
        ["response.created", "response.in_progress", "error"]
    );
    let e = events.last().unwrap();
    assert_eq!(e["status"], 500);
    assert_eq!(e["error"]["type"], "server_error");
    assert_eq!(e["error"]["code"], "server_error");
    assert_eq!(e["error"]["message"], "mock fault: server_error");
    send(&mut ws, &create("gpt-test", "again [[mock:text 3]]")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
}

#[tokio::test]
async fn tp8_turn_measurements_reach_metrics() {
    let env = relay("").await;
    let before = metrics_text(&env).await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "measure [[mock:text 5]]")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    let after = metrics_eventually(&env, |m| {
        turns(m, "completed") >= turns(&before, "completed") + 1.0
    })
    .await;
    for h in [
        "switchyard_turn_time_to_first_event_seconds",
        "switchyard_turn_time_to_first_token_seconds",
        "switchyard_turn_duration_seconds",
    ] {
        assert!(
            after.contains(&format!("# TYPE {h} histogram")),
            "{h} is a histogram:\n{after}"
        );
        assert!(after.contains(&format!("{h}_bucket{{le=")), "{h} buckets");
        let count = |t: &str| sample(t, &format!("{h}_count"), &[]);
        assert!(
            count(&after) >= count(&before) + 1.0,
            "{h} counted the turn"
        );
    }
    assert!(after
        .lines()
        .any(|l| l.starts_with("switchyard_turns_total{")
            && l.contains("status=\"completed\"")
            && l.contains("transport=\"ctx_pool\"")));
}

// ---------------------------------------------------------------------------------------------
// CT: continuity on one socket

#[tokio::test]
async fn ct1_chained_request_goes_upstream_unchanged_on_the_same_connection() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let first = with_store_false(create("gpt-test", "remember 42 [[mock:text 4]]"));
    send(&mut ws, &first).await;
    let id1 = response_id(&read_turn(&mut ws).await);
    let second = chained(&id1, "what was it?");
    send(&mut ws, &second).await;
    let events = read_turn(&mut ws).await;
    assert_eq!(last_type(&events), "response.completed", "{events:?}");
    let id2 = response_id(&events);
    let third = chained(&id2, "and again");
    send(&mut ws, &third).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");

    let log = env.mock.log();
    assert_eq!(log.upgrades.len(), 1, "one upstream connection");
    assert_eq!(log.requests.len(), 3);
    assert_eq!(log.requests[0].body, first);
    assert_eq!(log.requests[1].body, second, "sent upstream unchanged");
    assert_eq!(log.requests[2].body, third);
    assert!(log.requests.iter().all(|r| r.conn == log.upgrades[0].conn));
    // The mock chained from its connection cache: the prior context counted as cached.
    let cached = &events.last().unwrap()["response"]["usage"]["input_tokens_details"];
    assert!(
        cached["cached_tokens"].as_u64().unwrap_or(0) > 0,
        "{cached}"
    );
}

#[tokio::test]
async fn ct3_unknown_previous_response_id_is_400_and_never_reaches_upstream() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    // On a fresh session.
    send(&mut ws, &chained("resp_unknown", "hello")).await;
    assert_error(
        &read_turn(&mut ws).await,
        400,
        "invalid_request_error",
        "previous_response_not_found",
        Some("previous_response_id"),
    );
    assert_eq!(env.mock.log().requests.len(), 0);
    // The socket stays usable; two turns give an older and a last id.
    send(&mut ws, &with_store_false(create("gpt-test", "one"))).await;
    let id1 = response_id(&read_turn(&mut ws).await);
    send(&mut ws, &chained(&id1, "two")).await;
    let id2 = response_id(&read_turn(&mut ws).await);
    assert_eq!(env.mock.log().requests.len(), 2);
    for prev in ["resp_unknown", id1.as_str()] {
        send(&mut ws, &chained(prev, "from here")).await;
        let refused = read_turn(&mut ws).await;
        assert_error(
            &refused,
            400,
            "invalid_request_error",
            "previous_response_not_found",
            Some("previous_response_id"),
        );
        assert!(refused[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(prev));
    }
    assert_eq!(env.mock.log().requests.len(), 2, "refused by the relay");
    // The last id still chains.
    send(&mut ws, &chained(&id2, "three")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    assert_eq!(env.mock.log().requests.len(), 3);
}

#[tokio::test]
async fn ct5_warm_up_is_forwarded_upstream_and_chainable() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let warm = json!({"type": "response.create", "model": "gpt-test", "generate": false,
        "store": false, "input": [], "tools": [], "instructions": "be brief"});
    send(&mut ws, &warm).await;
    let events = read_turn(&mut ws).await;
    assert_eq!(types(&events), ["response.created", "response.completed"]);
    assert_eq!(events[1]["response"]["output"], json!([]));
    let warm_id = response_id(&events);
    let next = chained(&warm_id, "go [[mock:text 3]]");
    send(&mut ws, &next).await;
    let answer = read_turn(&mut ws).await;
    assert_eq!(last_type(&answer), "response.completed");
    let log = env.mock.log();
    assert_eq!(log.requests.len(), 2);
    assert_eq!(log.requests[0].body, warm, "the warm-up went upstream");
    assert_eq!(log.requests[0].body["generate"], false);
    assert_eq!(
        log.requests[1].body["previous_response_id"],
        warm_id.as_str()
    );
    assert_eq!(log.requests[0].conn, log.requests[1].conn);
}

#[tokio::test]
async fn ct10_upstream_close_or_eof_after_output_is_502_and_the_socket_goes_on() {
    let _serial = TURN_COUNTS.lock().await;
    let env = relay("").await;
    let m = metrics_text(&env).await;
    let (lost0, cancelled0) = (turns(&m, "upstream_lost"), turns(&m, "client_cancelled"));
    let mut ws = env.connect().await;
    for (n, (fault, sent)) in [("close 1012 after=5", 5), ("eof after=4", 4)]
        .into_iter()
        .enumerate()
    {
        send(
            &mut ws,
            &create(
                "gpt-test",
                &format!("[[mock:text 20]] [[mock:fault {fault}]]"),
            ),
        )
        .await;
        let events = read_turn(&mut ws).await;
        assert_eq!(events.len(), sent + 1, "{fault}: {:?}", types(&events));
        assert_contiguous(&events[..sent]);
        assert_error(
            &events[sent..],
            502,
            "server_error",
            "upstream_connection_lost",
            None,
        );
        // The client socket stays open: the next turn works on a fresh upstream connection.
        send(&mut ws, &create("gpt-test", "after [[mock:text 3]]")).await;
        let next = read_turn(&mut ws).await;
        assert_eq!(last_type(&next), "response.completed");
        let log = env.mock.log();
        assert_eq!(log.upgrades.len(), n + 2, "{fault}: redialed");
        let last = log.requests.last().unwrap();
        assert_eq!(last.conn, log.upgrades[n + 1].conn);
    }
    // CT-10: both failures are the upstream's, never a client disconnect.
    let m = metrics_eventually(&env, |m| {
        turns(m, "upstream_lost") + turns(m, "client_cancelled") >= lost0 + cancelled0 + 2.0
    })
    .await;
    assert_eq!(turns(&m, "upstream_lost"), lost0 + 2.0);
    assert_eq!(turns(&m, "client_cancelled"), cancelled0);
}

#[tokio::test]
async fn ct10_upstream_handshake_refusal_is_502_and_the_next_turn_works() {
    let _serial = TURN_COUNTS.lock().await;
    let env = relay("").await;
    let m = metrics_text(&env).await;
    let (lost0, cancelled0) = (turns(&m, "upstream_lost"), turns(&m, "client_cancelled"));
    // Two refusals: the first dial and its CT-9 retry (retry_budget 1) both fail.
    env.mock.push_handshake(500, None);
    env.mock.push_handshake(500, None);
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hello")).await;
    assert_error(
        &read_turn(&mut ws).await,
        502,
        "server_error",
        "upstream_connection_lost",
        None,
    );
    send(&mut ws, &create("gpt-test", "hello again")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    let log = env.mock.log();
    assert_eq!((log.refused_upgrades, log.upgrades.len()), (2, 1));
    assert_eq!(log.requests.len(), 1);
    let m = metrics_eventually(&env, |m| {
        turns(m, "upstream_lost") + turns(m, "client_cancelled") >= lost0 + cancelled0 + 1.0
    })
    .await;
    assert_eq!(turns(&m, "upstream_lost"), lost0 + 1.0);
    assert_eq!(turns(&m, "client_cancelled"), cancelled0);
}

// ---------------------------------------------------------------------------------------------
// Account choice per turn (SC-2): the model is re-checked every turn; the session sticks to its
// account while that serves the model.

#[tokio::test]
async fn sc2_the_account_is_chosen_for_the_model_every_turn() {
    let b = switchyard::mock::MockUpstream::start(switchyard::mock::MockOptions::default())
        .await
        .expect("mock b");
    let b_url = b.base_url();
    let env = relay_from(|a_url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: a\n    base_url: {a_url}\n    api_key: sk-a\n    models: [\"gpt-a*\"]\n  - id: b\n    base_url: {b_url}\n    api_key: sk-b\n    models: [\"gpt-*\"]\n    priority: 1\n"
        )
    })
    .await;
    let a = &env.mock;
    let mut ws = env.connect().await;
    // gpt-a1 is served by both: the first priority tier wins.
    send(&mut ws, &create("gpt-a1", "to a")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    assert_eq!((a.log().requests.len(), b.log().requests.len()), (1, 0));
    // Re-checked on the next turn of the same socket.
    send(&mut ws, &create("gpt-b", "to b")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    assert_eq!((a.log().requests.len(), b.log().requests.len()), (1, 1));
    assert_eq!(b.log().requests[0].body["model"], "gpt-b");
    // b serves gpt-a2 too: the session stays where it is.
    send(&mut ws, &create("gpt-a2", "sticky b")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
    assert_eq!((a.log().requests.len(), b.log().requests.len()), (1, 2));
    // Served by none.
    send(&mut ws, &create("o3", "nobody")).await;
    assert_error(
        &read_turn(&mut ws).await,
        400,
        "invalid_request_error",
        "model_not_found",
        Some("model"),
    );
    assert_eq!((a.log().requests.len(), b.log().requests.len()), (1, 2));
    send(&mut ws, &create("gpt-a1", "still here")).await;
    assert_eq!(last_type(&read_turn(&mut ws).await), "response.completed");
}

// ---------------------------------------------------------------------------------------------
// OP: operations

#[tokio::test]
async fn op1_health_ready_and_metrics_need_no_key() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    read_turn(&mut ws).await;
    for path in ["/healthz", "/readyz"] {
        let resp = get(&env.http_url(path)).await;
        assert_eq!(resp.status(), 200, "{path}");
    }
    let resp = get(&env.http_url("/metrics")).await;
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let body = resp.text().await.unwrap();
    assert!(body.lines().any(|l| l.starts_with("switchyard_")), "{body}");
}

/// Runs `switchyard ARGS`, its output piped.
fn switchyard(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn embedded_default_serves_with_a_printed_dev_key() {
    let cwd = tempfile::tempdir().expect("cwd");
    let mut child = switchyard(&["serve", "--listen", "127.0.0.1:0"])
        .current_dir(cwd.path())
        .env("RUST_LOG", "debug")
        .spawn()
        .expect("spawn switchyard");
    let mut stderr = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).await.expect("stdout");
            assert!(n > 0, "stdout ended before the banner did:\n{banner}");
            banner.push_str(&line);
            if line.trim() == "supports_websockets = true" {
                break;
            }
        }
    })
    .await
    .expect("hang guard: banner");

    let addr = banner
        .lines()
        .find_map(|l| {
            l.strip_prefix("switchyard: no --config given; serving the embedded default on ")
        })
        .expect("address line")
        .trim()
        .to_string();
    let key = banner
        .lines()
        .find_map(|l| l.strip_prefix("dev key (printed once): "))
        .expect("key line")
        .trim()
        .to_string();
    assert!(!addr.ends_with(":0"), "the bound address: {addr}");
    assert!(banner.contains("[model_providers.switchyard]"), "{banner}");
    assert!(banner.contains("supports_websockets = true"));
    assert!(banner.contains("wire_api = \"responses\""));
    assert!(
        banner.contains(&format!("base_url = \"http://{addr}/v1\"")),
        "{banner}"
    );

    let url = format!("ws://{addr}/v1/responses");
    let mut ws = ws_connect(&url, &key).await;
    send(&mut ws, &create("gpt-5.1-codex", "hello [[mock:text 5]]")).await;
    let events = read_turn(&mut ws).await;
    assert_eq!(last_type(&events), "response.completed");
    assert_eq!(deltas(&events), words(5));
    drop(ws);
    match ws_connect_with(&url, "sy-wrong-key", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("a wrong key must get 401, got {:?}", other.map(|_| ())),
    }

    child.kill().await.expect("kill");
    let mut rest = String::new();
    let _ = tokio::time::timeout(HANG_GUARD, stdout.read_to_string(&mut rest)).await;
    let logs = tokio::time::timeout(HANG_GUARD, stderr_task)
        .await
        .expect("hang guard: stderr")
        .unwrap_or_default();
    let all = format!("{banner}{rest}{logs}");
    assert_eq!(
        all.matches(key.as_str()).count(),
        // The key line and the `export SWITCHYARD_API_KEY=` line of the Codex snippet.
        banner.matches(key.as_str()).count(),
        "the key appears only in the banner"
    );
    assert_eq!(
        banner
            .lines()
            .filter(|l| l.starts_with("dev key (printed once):"))
            .count(),
        1
    );
}

#[tokio::test]
async fn op4_invalid_config_exits_2_before_binding() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:{port}\nkeys:\n  - id: k\n    key: sy-k\naccounts:\n  - id: a\n    base_url: http://127.0.0.1:1/v1\n    api_key: sk-a\n    mode: ws\n"
        ),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let run = || async {
        tokio::time::timeout(
            HANG_GUARD,
            switchyard(&["serve", "--config", path]).output(),
        )
        .await
        .expect("hang guard: serve must exit on an invalid config")
        .expect("run switchyard")
    };
    let out = run().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("accounts[0].mode"), "{stderr}");
    // Nothing was bound: the port is free.
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
    // And with the port taken, the answer is still the config error, not a bind error: the
    // config is validated before any bind is attempted.
    let out = run().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("accounts[0].mode"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("address"), "{stderr}");
    drop(l);
}
