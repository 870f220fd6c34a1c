//! The mock upstream's own tests: each behaviour the relay's tests rely on, checked through
//! real sockets (SPEC §1 and DESIGN.md "Tests").

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::mock::{MockOptions, MockUpstream};
use switchyard::protocol::classify::{classify_error_event, ErrorClass};
use tokio_tungstenite::tungstenite::Message;

async fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions::default())
        .await
        .expect("mock")
}

fn ws_url(m: &MockUpstream) -> String {
    format!("ws://{}/v1/responses", m.addr)
}

fn chained(prev: &str, text: &str) -> Value {
    let mut c = create("gpt-test", text);
    c["previous_response_id"] = json!(prev);
    c
}

fn tool_call_item(events: &[Value]) -> Value {
    events
        .iter()
        .find(|e| e["type"] == "response.output_item.done" && e["item"]["type"] == "function_call")
        .map(|e| e["item"].clone())
        .expect("a function_call item")
}

fn tool_output(call_id: &str, output: &str) -> Value {
    json!({"type": "function_call_output", "call_id": call_id, "output": output})
}

#[tokio::test]
async fn text_answer_streams_deltas_and_reports_usage() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "hello [[mock:text 12]]")).await;
    let events = read_turn(&mut ws).await;
    dump("mock_text", &events);
    let t = types(&events);
    assert_eq!(&t[..2], ["response.created", "response.in_progress"]);
    assert_eq!(t.last(), Some(&"response.completed"));
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap_or(""))
        .collect();
    assert!(
        t.iter()
            .filter(|t| **t == "response.output_text.delta")
            .count()
            > 1,
        "several deltas"
    );
    assert_eq!(
        deltas,
        (1..=12)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    let usage = &events.last().unwrap()["response"]["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    assert!(usage["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );
}

#[tokio::test]
async fn warm_up_generate_false_is_created_then_completed_and_chainable() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut warm = create("gpt-test", "");
    warm["generate"] = json!(false);
    warm["store"] = json!(false);
    warm["input"] = json!([]);
    send(&mut ws, &warm).await;
    let events = read_turn(&mut ws).await;
    dump("mock_warmup", &events);
    assert_eq!(types(&events), ["response.created", "response.completed"]);
    assert_eq!(events[1]["response"]["output"], json!([]));
    let mut next = chained(&response_id(&events), "go on");
    next["store"] = json!(false);
    send(&mut ws, &next).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn store_false_chains_only_on_the_same_connection() {
    let m = mock().await;
    let mut a = ws_connect(&ws_url(&m), "k1").await;
    let mut first = create("gpt-test", "one");
    first["store"] = json!(false);
    send(&mut a, &first).await;
    let id = response_id(&read_turn(&mut a).await);

    let mut b = ws_connect(&ws_url(&m), "k1").await;
    let mut other = chained(&id, "two");
    other["store"] = json!(false);
    send(&mut b, &other).await;
    let err = read_turn(&mut b).await;
    assert_eq!(err[0]["type"], "error");
    assert_eq!(err[0]["status"], 400);
    assert_eq!(err[0]["error"]["code"], "previous_response_not_found");
    assert_eq!(err[0]["error"]["param"], "previous_response_id");

    send(&mut a, &other).await;
    assert_eq!(
        read_turn(&mut a).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn only_the_most_recent_response_is_cached_per_connection() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut r1 = create("gpt-test", "one");
    r1["store"] = json!(false);
    send(&mut ws, &r1).await;
    let id1 = response_id(&read_turn(&mut ws).await);
    send(&mut ws, &r1).await;
    read_turn(&mut ws).await;
    let mut again = chained(&id1, "back to the first");
    again["store"] = json!(false);
    send(&mut ws, &again).await;
    assert_eq!(
        read_turn(&mut ws).await[0]["error"]["code"],
        "previous_response_not_found"
    );
}

#[tokio::test]
async fn store_true_chains_from_any_connection_of_the_same_account() {
    let m = mock().await;
    let mut a = ws_connect(&ws_url(&m), "k1").await;
    send(&mut a, &create("gpt-test", "stored by default")).await; // absent store means true
    let id = response_id(&read_turn(&mut a).await);
    let mut b = ws_connect(&ws_url(&m), "k1").await;
    send(&mut b, &chained(&id, "next")).await;
    let events = read_turn(&mut b).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    assert!(
        events.last().unwrap()["response"]["usage"]["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let mut other_account = ws_connect(&ws_url(&m), "k2").await;
    send(&mut other_account, &chained(&id, "next")).await;
    assert_eq!(
        read_turn(&mut other_account).await[0]["error"]["code"],
        "previous_response_not_found"
    );
}

#[tokio::test]
async fn requests_on_one_connection_run_one_at_a_time_in_order() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 30]] [[mock:fault slow 1ms]]"),
    )
    .await;
    send(&mut ws, &create("gpt-test", "second")).await;
    let first = read_turn(&mut ws).await;
    let second = read_turn(&mut ws).await;
    let ids = |ev: &[Value]| {
        ev.iter()
            .filter_map(|e| e["response"]["id"].as_str().map(str::to_string))
            .collect::<std::collections::HashSet<_>>()
    };
    assert_eq!(ids(&first).len(), 1);
    assert_eq!(ids(&second).len(), 1);
    assert_ne!(ids(&first), ids(&second));
    assert_eq!(m.log().requests.len(), 2);
}

#[tokio::test]
async fn tool_call_round_trip_and_the_output_needs_its_call() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut ask = create(
        "gpt-test",
        r#"run it [[mock:tool exec_command {"cmd":"echo hi"}]]"#,
    );
    ask["store"] = json!(false);
    send(&mut ws, &ask).await;
    let events = read_turn(&mut ws).await;
    dump("mock_function_call", &events);
    let call = tool_call_item(&events);
    assert_eq!(call["name"], "exec_command");
    assert_eq!(call["arguments"], r#"{"cmd":"echo hi"}"#);
    let call_id = call["call_id"].as_str().unwrap().to_string();
    assert!(call_id.starts_with("call_"));

    // Chained on the same connection: the output finds its call.
    let mut out = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "previous_response_id": response_id(&events), "input": [tool_output(&call_id, "hi\n")]});
    send(&mut ws, &out).await;
    let answer = read_turn(&mut ws).await;
    dump("mock_function_call_output_answer", &answer);
    assert_eq!(answer.last().unwrap()["type"], "response.completed");
    let text = answer.last().unwrap()["response"]["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("hi"), "{text}");

    // Without the chain, the output has no call: the service's 400.
    out.as_object_mut().unwrap().remove("previous_response_id");
    send(&mut ws, &out).await;
    let err = read_turn(&mut ws).await;
    assert_eq!(err[0]["status"], 400);
    assert!(err[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("No tool call found"));

    // A full replay that holds the call is fine.
    let replay = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": [ask["input"][0].clone(), call, tool_output(&call_id, "hi\n")]});
    send(&mut ws, &replay).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn encrypted_reasoning_verifies_only_on_its_own_account() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let ask = create(
        "gpt-test",
        r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"ls"}]]"#,
    );
    send(&mut ws, &ask).await;
    let events = read_turn(&mut ws).await;
    dump("mock_reasoning", &events);
    let output = events.last().unwrap()["response"]["output"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(output[0]["type"], "reasoning");
    assert!(output[0]["encrypted_content"].as_str().unwrap().len() > 10);
    let usage = &events.last().unwrap()["response"]["usage"];
    assert!(
        usage["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let call_id = output[1]["call_id"].as_str().unwrap();
    let mut items = vec![ask["input"][0].clone()];
    items.extend(output.iter().cloned());
    items.push(tool_output(call_id, "files"));
    let replay = json!({"type": "response.create", "model": "gpt-test", "input": items});

    send(&mut ws, &replay).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );

    let mut other = ws_connect(&ws_url(&m), "k2").await;
    send(&mut other, &replay).await;
    let err = read_turn(&mut other).await;
    assert_eq!(err[0]["error"]["code"], "invalid_encrypted_content");
    assert!(err[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be verified"));

    // Dropping the reasoning but keeping the call's id fails too; dropping the id is fine.
    let mut no_reasoning: Vec<Value> = vec![
        ask["input"][0].clone(),
        output[1].clone(),
        tool_output(call_id, "files"),
    ];
    send(
        &mut other,
        &json!({"type": "response.create", "model": "gpt-test", "input": no_reasoning.clone()}),
    )
    .await;
    let err = read_turn(&mut other).await;
    assert!(err[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("without its required 'reasoning' item"));
    no_reasoning[1].as_object_mut().unwrap().remove("id");
    send(
        &mut other,
        &json!({"type": "response.create", "model": "gpt-test", "input": no_reasoning}),
    )
    .await;
    assert_eq!(
        read_turn(&mut other).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn a_failed_request_evicts_the_connection_cache() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut r = create("gpt-test", "one");
    r["store"] = json!(false);
    send(&mut ws, &r).await;
    let id = response_id(&read_turn(&mut ws).await);
    send(
        &mut ws,
        &json!({"type": "response.create", "input": "no model"}),
    )
    .await;
    let err = read_turn(&mut ws).await;
    assert_eq!(err[0]["error"]["code"], "missing_required_parameter");
    let mut next = chained(&id, "two");
    next["store"] = json!(false);
    send(&mut ws, &next).await;
    assert_eq!(
        read_turn(&mut ws).await[0]["error"]["code"],
        "previous_response_not_found"
    );
}

#[tokio::test]
async fn connection_age_limit_sends_the_limit_error_and_closes() {
    let m = MockUpstream::start(MockOptions {
        max_age: Duration::ZERO,
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    let Frame::Event(e) = next_frame(&mut ws).await else {
        panic!("expected the error event")
    };
    assert_eq!(e["error"]["code"], "websocket_connection_limit_reached");
    assert_eq!(e["status"], 400);
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1000)));
}

#[tokio::test]
async fn fault_close_before_and_after_output() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "[[mock:fault close 1012]]")).await;
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!(types(&events), ["response.created", "response.in_progress"]);
    assert_eq!(end, Some(Frame::Closed(Some(1012))));

    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:fault close 1013 after=5]]"),
    )
    .await;
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!(events.len(), 5);
    assert!(types(&events).contains(&"response.output_text.delta"));
    assert_eq!(end, Some(Frame::Closed(Some(1013))));
}

#[tokio::test]
async fn fault_eof_drops_without_a_close_frame() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "[[mock:fault eof after=3]]")).await;
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!(events.len(), 3);
    assert_eq!(end, Some(Frame::Eof));
}

#[tokio::test]
async fn fault_error_event_then_the_socket_goes_on() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
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
    assert_eq!(events[2]["status"], 500);
    assert_eq!(events[2]["error"]["type"], "server_error");
    send(&mut ws, &create("gpt-test", "again")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn queued_fault_fires_once_and_once_directives_fire_once() {
    let m = mock().await;
    m.push_fault("error 429 rate_limit_exceeded after=0")
        .unwrap();
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "x")).await;
    let e = read_turn(&mut ws).await;
    assert_eq!(
        (e[0]["status"].as_u64(), e[0]["error"]["type"].as_str()),
        (Some(429), Some("rate_limit_error"))
    );
    send(&mut ws, &create("gpt-test", "x")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );

    let once = create("gpt-test", "[[mock:fault error 500 server_error once=a1]]");
    send(&mut ws, &once).await;
    assert_eq!(read_turn(&mut ws).await.last().unwrap()["type"], "error");
    send(&mut ws, &once).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn fault_stall_sends_nothing_more_until_the_client_leaves() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "[[mock:fault stall after=2]]")).await;
    for _ in 0..2 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    let quiet = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut ws),
    )
    .await;
    assert!(quiet.is_err(), "a stalled stream sends nothing");
    drop(ws);
    wait_for(|| {
        m.log()
            .stream_ends
            .iter()
            .any(|e| e.end == "fault" && e.sent == 2)
    })
    .await;
}

#[tokio::test]
async fn slow_stream_notices_the_client_leaving_before_its_next_event() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 20ms]]"),
    )
    .await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    drop(ws);
    wait_for(|| m.log().stream_ends.iter().any(|e| e.end == "client_closed")).await;
    let end = m.log().stream_ends[0].clone();
    assert!(end.sent < end.planned, "{end:?}");
    assert_eq!(m.log().client_closes.len(), 1);
}

#[tokio::test]
async fn forget_drops_every_connection_cache() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut r = create("gpt-test", "one");
    r["store"] = json!(false);
    send(&mut ws, &r).await;
    let id = response_id(&read_turn(&mut ws).await);
    m.forget_all();
    let mut next = chained(&id, "two");
    next["store"] = json!(false);
    send(&mut ws, &next).await;
    assert_eq!(
        read_turn(&mut ws).await[0]["error"]["code"],
        "previous_response_not_found"
    );

    // The per-request form.
    send(&mut ws, &r).await;
    let id = response_id(&read_turn(&mut ws).await);
    let mut next = chained(&id, "[[mock:fault forget]]");
    next["store"] = json!(false);
    send(&mut ws, &next).await;
    assert_eq!(
        read_turn(&mut ws).await[0]["error"]["code"],
        "previous_response_not_found"
    );
}

/// CT-8: `[[mock:fault forget]]` loses the connection's cache just before the request, so a
/// fast-path request chained from the connection's last `store:false` response fails with 400
/// `previous_response_not_found` (an error event only, no lifecycle events) and the socket goes
/// on. A stored (`store:true`) response still resolves, as on the real service.
#[tokio::test]
async fn ct8_forget_fault_fails_the_fast_path_with_previous_response_not_found() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let mut first = create("gpt-test", "one");
    first["store"] = json!(false);
    send(&mut ws, &first).await;
    let id = response_id(&read_turn(&mut ws).await);
    let mut next = chained(&id, "two [[mock:fault forget]]");
    next["store"] = json!(false);
    send(&mut ws, &next).await;
    let err = read_turn(&mut ws).await;
    assert_eq!(types(&err), ["error"]);
    assert_eq!(err[0]["status"], 400);
    assert_eq!(err[0]["error"]["type"], "invalid_request_error");
    assert_eq!(err[0]["error"]["code"], "previous_response_not_found");
    assert_eq!(err[0]["error"]["param"], "previous_response_id");
    let c = classify_error_event(&err[0].to_string());
    assert_eq!(c.class, ErrorClass::PreviousResponseNotFound);
    assert!(c.retry_before_output);

    // The socket is still usable; a full-input request answers.
    send(&mut ws, &first).await;
    let id = response_id(&read_turn(&mut ws).await);
    // Without the fault the same chain works (the fault, not the chain, failed it).
    let mut ok = chained(&id, "two");
    ok["store"] = json!(false);
    send(&mut ws, &ok).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );

    // Stored responses survive the lost cache.
    send(&mut ws, &create("gpt-test", "stored")).await;
    let stored = response_id(&read_turn(&mut ws).await);
    send(&mut ws, &chained(&stored, "next [[mock:fault forget]]")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

/// CT-9: `[[mock:fault limit after=N]]` sends N events, then the age limit's
/// `websocket_connection_limit_reached` error (400, invalid_request_error), then closes 1000.
#[tokio::test]
async fn ct9_limit_fault_sends_the_limit_error_then_closes_1000() {
    let m = mock().await;
    for after in [0usize, 2, 4] {
        let mut ws = ws_connect(&ws_url(&m), "k1").await;
        let text = format!("[[mock:text 20]] [[mock:fault limit after={after}]]");
        send(&mut ws, &create("gpt-test", &text)).await;
        let (events, end) = read_until_end(&mut ws).await;
        assert_eq!(events.len(), after + 1, "{events:?}");
        let e = events.last().unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["status"], 400);
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["code"], "websocket_connection_limit_reached");
        assert!(end.is_none());
        assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1000)));
        let c = classify_error_event(&e.to_string());
        assert_eq!(c.class, ErrorClass::ConnectionLimit);
        assert!(c.retry_before_output && !c.server_fault);
    }
    let ends = m.log().stream_ends;
    assert_eq!(
        ends.iter()
            .map(|e| (e.sent, e.end.as_str()))
            .collect::<Vec<_>>(),
        [(0, "error"), (2, "error"), (4, "error")]
    );
    // A fresh connection works, and the fault also comes from the control API.
    m.push_fault("limit after=0").unwrap();
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "x")).await;
    let (events, _) = read_until_end(&mut ws).await;
    assert_eq!(
        events[0]["error"]["code"],
        "websocket_connection_limit_reached"
    );
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1000)));
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "x")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

/// Opens a WebSocket and returns the handshake response too.
async fn connect_with_response(
    url: &str,
    headers: &[(&str, &str)],
) -> (
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = url.into_client_request().expect("request");
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer k1"));
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            k.parse().expect("header name");
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).expect("header value"));
    }
    tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(req))
        .await
        .expect("hang guard: connect")
        .expect("websocket connect")
}

/// WS-7: the mock answers every accepted upgrade with `x-codex-turn-state` (`ts-<conn>`), or
/// echoes the value the request carried; the request headers are still logged.
#[tokio::test]
async fn ws7_upgrade_answers_with_x_codex_turn_state() {
    let m = mock().await;
    let (mut a, resp) = connect_with_response(&ws_url(&m), &[]).await;
    assert_eq!(resp.status().as_u16(), 101);
    let first = resp.headers()["x-codex-turn-state"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(first, format!("ts-{}", m.log().upgrades[0].conn));
    let (_b, resp) = connect_with_response(&ws_url(&m), &[]).await;
    let second = resp.headers()["x-codex-turn-state"].to_str().unwrap();
    assert_eq!(second, format!("ts-{}", m.log().upgrades[1].conn));
    assert_ne!(first, second, "one value per connection");

    let (_c, resp) = connect_with_response(&ws_url(&m), &[("x-codex-turn-state", &first)]).await;
    assert_eq!(resp.headers()["x-codex-turn-state"], first.as_str());
    let (_d, resp) =
        connect_with_response(&ws_url(&m), &[("x-codex-turn-state", "opaque-from-client")]).await;
    assert_eq!(resp.headers()["x-codex-turn-state"], "opaque-from-client");

    let log = m.log();
    assert_eq!(log.upgrades.len(), 4);
    assert!(!log.upgrades[0].headers.contains_key("x-codex-turn-state"));
    assert_eq!(
        log.upgrades[2].headers.get("x-codex-turn-state"),
        Some(&first)
    );
    assert_eq!(
        log.upgrades[3]
            .headers
            .get("x-codex-turn-state")
            .map(String::as_str),
        Some("opaque-from-client")
    );
    // The socket behind the header is an ordinary one.
    send(&mut a, &create("gpt-test", "hi")).await;
    assert_eq!(
        read_turn(&mut a).await.last().unwrap()["type"],
        "response.completed"
    );
}

/// The raw next message (pings and pongs included), or None when nothing came within `wait`.
async fn raw_within(ws: &mut Ws, wait: Duration) -> Option<Message> {
    match tokio::time::timeout(wait, futures::StreamExt::next(ws)).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(other) => panic!("socket ended: {other:?}"),
        Err(_) => None,
    }
}

/// Sends a Ping and waits for its Pong (bounded by the hang guard).
async fn ping_pong(ws: &mut Ws, payload: &'static [u8]) {
    futures::SinkExt::send(ws, Message::Ping(payload.into()))
        .await
        .expect("send ping");
    loop {
        match raw_within(ws, HANG_GUARD).await {
            Some(Message::Pong(p)) => {
                assert_eq!(&p[..], payload);
                return;
            }
            Some(_) => continue,
            None => panic!("hang guard: no pong"),
        }
    }
}

/// Sends a Ping and checks that nothing at all (no Pong, no event) comes back for 300 ms.
async fn assert_no_pong(ws: &mut Ws) {
    futures::SinkExt::send(ws, Message::Ping(b"deaf?"[..].into()))
        .await
        .expect("send ping");
    let got = raw_within(ws, Duration::from_millis(300)).await;
    assert!(got.is_none(), "a deaf connection answered: {got:?}");
}

#[tokio::test]
async fn deaf_fault_stops_reading_and_sending_until_close_all() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    ping_pong(&mut ws, b"before").await;
    send(&mut ws, &create("gpt-test", "[[mock:fault deaf after=2]]")).await;
    for _ in 0..2 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    wait_for(|| {
        m.log()
            .stream_ends
            .iter()
            .any(|e| e.end == "fault" && e.sent == 2)
    })
    .await;
    assert_no_pong(&mut ws).await;
    // No further request is read either.
    send(&mut ws, &create("gpt-test", "anyone there?")).await;
    assert!(raw_within(&mut ws, Duration::from_millis(100))
        .await
        .is_none());
    assert_eq!(m.log().requests.len(), 1);
    assert_eq!(m.log().open_connections, 1);
    // It ends on close_all, with a Close frame that gets through the unread frames.
    assert_eq!(m.close_all(1001), 1);
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1001)));
    wait_for(|| m.log().open_connections == 0).await;
    // Neither the unread ping nor the client's close was seen by the deaf connection.
    assert_eq!(m.log().pings.values().sum::<u64>(), 1);
    assert!(m.log().client_closes.is_empty());
}

#[tokio::test]
async fn deafen_all_silences_idle_and_streaming_connections() {
    let m = mock().await;
    let mut idle = ws_connect(&ws_url(&m), "k1").await;
    let mut busy = ws_connect(&ws_url(&m), "k1").await;
    ping_pong(&mut idle, b"idle").await;
    send(
        &mut busy,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 20ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut busy).await, Frame::Event(_)));
    assert_eq!(m.deafen_all(), 2);
    // The streaming one stops mid-response (any event already in flight aside).
    wait_for(|| m.log().stream_ends.iter().any(|e| e.end == "fault")).await;
    let end = m.log().stream_ends[0].clone();
    assert!(end.sent < end.planned, "{end:?}");
    while raw_within(&mut busy, Duration::from_millis(100))
        .await
        .is_some()
    {}
    assert_no_pong(&mut busy).await;
    assert_no_pong(&mut idle).await;
    // A connection opened afterwards is not deaf.
    let mut fresh = ws_connect(&ws_url(&m), "k1").await;
    ping_pong(&mut fresh, b"fresh").await;
    // The same through the control API.
    let r = reqwest::Client::new()
        .post(format!("http://{}/__mock/deaf", m.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_no_pong(&mut fresh).await;
    assert_eq!(m.log().open_connections, 3);
}

#[tokio::test]
async fn deaf_connections_end_when_the_mock_is_dropped() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    m.deafen_all();
    assert_no_pong(&mut ws).await;
    drop(m);
    assert_eq!(next_frame(&mut ws).await, Frame::Eof);
}

#[tokio::test]
async fn close_all_closes_idle_and_streaming_sockets_with_the_code() {
    let m = mock().await;
    let mut a = ws_connect(&ws_url(&m), "k1").await;
    let mut b = ws_connect(&ws_url(&m), "k2").await;
    let mut busy = ws_connect(&ws_url(&m), "k1").await;
    send(
        &mut busy,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 20ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut busy).await, Frame::Event(_)));
    assert_eq!(m.close_all(1001), 3);
    assert_eq!(next_frame(&mut a).await, Frame::Closed(Some(1001)));
    assert_eq!(next_frame(&mut b).await, Frame::Closed(Some(1001)));
    let (events, end) = read_until_end(&mut busy).await;
    assert_eq!(end, Some(Frame::Closed(Some(1001))), "{events:?}");
    wait_for(|| m.log().open_connections == 0).await;
    let end = m.log().stream_ends[0].clone();
    assert_eq!(end.end, "fault");
    assert!(end.sent < end.planned, "{end:?}");

    // Through the control API; connections opened later are not affected.
    let mut c = ws_connect(&ws_url(&m), "k1").await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("http://{}/__mock/close", m.addr))
        .json(&json!({"code": 4000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(next_frame(&mut c).await, Frame::Closed(Some(4000)));
    let mut d = ws_connect(&ws_url(&m), "k1").await;
    send(&mut d, &create("gpt-test", "still serving")).await;
    assert_eq!(
        read_turn(&mut d).await.last().unwrap()["type"],
        "response.completed"
    );
    let r = client
        .post(format!("http://{}/__mock/close", m.addr))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
}

#[tokio::test]
async fn pings_are_counted_per_connection() {
    let m = mock().await;
    let mut a = ws_connect(&ws_url(&m), "k1").await;
    let mut b = ws_connect(&ws_url(&m), "k1").await;
    for _ in 0..3 {
        ping_pong(&mut a, b"a").await;
    }
    ping_pong(&mut b, b"b").await;
    let _quiet = ws_connect(&ws_url(&m), "k1").await;
    let log = m.log();
    let conn = |i: usize| log.upgrades[i].conn;
    assert_eq!(log.pings.get(&conn(0)), Some(&3));
    assert_eq!(log.pings.get(&conn(1)), Some(&1));
    assert_eq!(log.pings.get(&conn(2)), None);
    let json: Value = reqwest::get(format!("http://{}/__mock/log", m.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["pings"][conn(0).to_string()], 3);
    assert_eq!(json["open_connections"], 3);
}

#[tokio::test]
async fn open_connections_go_up_and_back_down() {
    let m = mock().await;
    assert_eq!(m.log().open_connections, 0);
    let mut a = ws_connect(&ws_url(&m), "k1").await;
    let b = ws_connect(&ws_url(&m), "k1").await;
    wait_for(|| m.log().open_connections == 2).await;
    futures::SinkExt::close(&mut a).await.expect("close a");
    wait_for(|| m.log().open_connections == 1).await;
    drop(b); // without a Close frame
    wait_for(|| m.log().open_connections == 0).await;
    // A refused upgrade never counts; a fault that closes the socket ends it.
    m.push_handshake(500, None);
    assert!(ws_connect_with(&ws_url(&m), "k1", &[]).await.is_err());
    let mut c = ws_connect(&ws_url(&m), "k1").await;
    send(&mut c, &create("gpt-test", "[[mock:fault close 1011]]")).await;
    assert_eq!(
        read_until_end(&mut c).await.1,
        Some(Frame::Closed(Some(1011)))
    );
    wait_for(|| m.log().open_connections == 0).await;
    // `reset` clears the log but not the gauge of what is open.
    let _d = ws_connect(&ws_url(&m), "k1").await;
    m.state.reset();
    assert_eq!(m.log().open_connections, 1);
}

#[tokio::test]
async fn handshake_faults_and_unknown_keys_are_refused_with_their_status() {
    let m = MockUpstream::start(MockOptions {
        api_keys: vec!["good".into()],
        ..MockOptions::default()
    })
    .await
    .unwrap();
    for (status, retry) in [(401u16, None), (429, Some("3")), (500, None)] {
        m.push_handshake(status, retry);
        let err = ws_connect_with(&ws_url(&m), "good", &[])
            .await
            .expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
            panic!("http refusal")
        };
        assert_eq!(resp.status().as_u16(), status);
        if let Some(r) = retry {
            assert_eq!(resp.headers()["retry-after"], r);
        }
    }
    let err = ws_connect_with(&ws_url(&m), "bad", &[])
        .await
        .expect_err("refused");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401));
    let ok = ws_connect_with(&ws_url(&m), "good", &[("session-id", "s1")]).await;
    assert!(ok.is_ok());
    let log = m.log();
    assert_eq!((log.upgrades.len(), log.refused_upgrades), (1, 4));
    assert_eq!(
        log.upgrades[0]
            .headers
            .get("session-id")
            .map(String::as_str),
        Some("s1")
    );
    assert!(!log.upgrades[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn fixtures_replay_failed_incomplete_and_error() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "[[mock:fixture failed]]")).await;
    let failed = read_turn(&mut ws).await;
    assert_eq!(failed.last().unwrap()["type"], "response.failed");
    assert_eq!(failed.last().unwrap()["response"]["status"], "failed");
    send(&mut ws, &create("gpt-test", "[[mock:fixture incomplete]]")).await;
    let inc = read_turn(&mut ws).await;
    assert_eq!(
        inc.last().unwrap()["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    send(&mut ws, &create("gpt-test", "[[mock:fixture error]]")).await;
    let err = read_turn(&mut ws).await;
    assert_eq!(err[0]["type"], "error");
    assert_eq!(err[0]["status"], 500);
    // Each replay carries a fresh response id.
    assert_ne!(response_id(&failed), response_id(&inc));
}

#[tokio::test]
async fn http_sse_and_json_answers() {
    let m = mock().await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/responses", m.addr);
    let resp = client
        .post(&url)
        .bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "hi [[mock:text 5]]", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let events = parse_sse(&body);
    dump("mock_sse_text", &events);
    assert_eq!(events.first().unwrap()["type"], "response.created");
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let id = response_id(&events);

    // Non-streaming, chained from the stored response.
    let resp = client
        .post(&url)
        .bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "next", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["object"].as_str(), body["status"].as_str()),
        (Some("response"), Some("completed"))
    );

    // store:false responses cannot be chained over HTTP.
    let r = client
        .post(&url)
        .bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "x", "store": false}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = client
        .post(&url)
        .bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "y", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "previous_response_not_found"
    );

    // A mid-stream error is the SSE error event.
    let r = client.post(&url).bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "[[mock:fault error 500 server_error after=3]]", "stream": true}))
        .send().await.unwrap();
    let events = parse_sse(&r.text().await.unwrap());
    assert_eq!(events.len(), 4);
    assert_eq!(
        (events[3]["type"].as_str(), events[3]["code"].as_str()),
        (Some("error"), Some("server_error"))
    );

    let r = client
        .post(&url)
        .json(&json!({"model": "gpt-test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn control_api_over_http() {
    let m = mock().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}/__mock", m.addr);
    let r = client
        .post(format!("{base}/faults"))
        .json(&json!({"fault": "explode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(format!("{base}/faults"))
        .json(&json!({"fault": "close 1012"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    send(&mut ws, &create("gpt-test", "x")).await;
    assert_eq!(
        read_until_end(&mut ws).await.1,
        Some(Frame::Closed(Some(1012)))
    );
    let log: Value = client
        .get(format!("{base}/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["upgrades"].as_array().unwrap().len(), 1);
    assert_eq!(
        log["requests"][0]["body"]["input"][0]["content"][0]["text"],
        "x"
    );
    client.post(format!("{base}/reset")).send().await.unwrap();
    let log: Value = client
        .get(format!("{base}/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["requests"], json!([]));
}

/// The mock's streams have the fixtures' shapes: the same event types carry the same keys.
#[tokio::test]
async fn mock_streams_match_fixture_shapes() {
    let m = mock().await;
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    let cases = [
        ("text", "hello [[mock:text 9]]"),
        (
            "function_call",
            r#"[[mock:tool exec_command {"cmd":"echo hi"}]]"#,
        ),
        ("reasoning", "[[mock:reason]] think"),
    ];
    for (fixture, prompt) in cases {
        send(&mut ws, &create("gpt-test", prompt)).await;
        let events = read_turn(&mut ws).await;
        let recorded = switchyard::mock::fixtures::load(fixture).unwrap();
        for e in &events {
            let t = e["type"].as_str().unwrap();
            let Some(r) = recorded.iter().find(|r| r["type"] == t) else {
                continue;
            };
            assert_eq!(keys(e), keys(r), "{fixture}: keys of {t}");
            if let (Some(a), Some(b)) = (e.get("response"), r.get("response")) {
                let missing: Vec<_> = keys(a)
                    .into_iter()
                    .filter(|k| !keys(b).contains(k))
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{fixture}: {t} response keys unknown to the fixture: {missing:?}"
                );
            }
        }
        let recorded_types: std::collections::BTreeSet<_> = recorded
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        let seen: std::collections::BTreeSet<_> =
            events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert!(
            seen.is_subset(&recorded_types),
            "{fixture}: {seen:?} vs {recorded_types:?}"
        );
    }
}

#[test]
fn mock_upstream_command_serves_on_the_given_address() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["mock-upstream", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.split_whitespace().nth(4).expect("address").to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(async {
        let mut ws = ws_connect(&format!("ws://{addr}/v1/responses"), "k").await;
        send(&mut ws, &create("gpt-test", "hi")).await;
        read_turn(&mut ws).await
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(outcome.last().unwrap()["type"], "response.completed");
}

fn keys(v: &Value) -> std::collections::BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn parse_sse(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|block| {
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let v: Value = serde_json::from_str(data).ok()?;
            assert_eq!(v["type"], event, "event: line matches the data type");
            Some(v)
        })
        .collect()
}

/// Polls a condition the mock reaches asynchronously (bounded by the hang guard).
async fn wait_for(cond: impl Fn() -> bool) {
    tokio::time::timeout(HANG_GUARD, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("hang guard: condition never held");
}

#[tokio::test]
async fn outage_refuses_upgrades_and_posts_until_it_ends_and_fail_rate_fails_before_output() {
    let m = mock().await;
    let control = |path: &str| format!("http://{}/__mock/{path}", m.addr);
    let http = reqwest::Client::new();
    let r = http
        .post(control("outage"))
        .json(&json!({"status": 503, "retry_after": "7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for _ in 0..2 {
        let err = ws_connect_with(&ws_url(&m), "k1", &[])
            .await
            .expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(resp) = err else {
            panic!("http refusal")
        };
        assert_eq!(resp.status().as_u16(), 503);
        assert_eq!(resp.headers()["retry-after"], "7");
    }
    let post = http
        .post(format!("{}/responses", m.base_url()))
        .bearer_auth("k1")
        .json(&json!({"model": "gpt-test", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 503);
    let log = m.log();
    assert_eq!((log.refused_upgrades, log.refused_posts), (2, 1));
    http.delete(control("outage")).send().await.unwrap();
    let mut ws = ws_connect(&ws_url(&m), "k1").await;
    // Every request fails at 1000 per mille, none at 0.
    http.post(control("fail_rate"))
        .json(&json!({"per_mille": 1000}))
        .send()
        .await
        .unwrap();
    send(&mut ws, &create("gpt-test", "hi")).await;
    let failed = read_turn(&mut ws).await;
    assert_eq!(failed.last().unwrap()["type"], "error", "{failed:?}");
    assert_eq!(failed.last().unwrap()["error"]["code"], "server_error");
    assert!(failed
        .iter()
        .all(|e| e["type"] != "response.output_item.added"));
    m.set_fail_rate(0);
    send(&mut ws, &create("gpt-test", "hi")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}
