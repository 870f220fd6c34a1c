//! Continuity through the relay (SPEC §6): the transcript, replays on cold contexts, and
//! transparent recovery from upstream faults before any output reached the client.

mod common;

use common::*;
use serde_json::{json, Value};

fn chained(prev: &str, input: Value) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "previous_response_id": prev, "input": input})
}

fn user(text: &str) -> Value {
    json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
}

fn first(text: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "input": [user(text)]})
}

async fn turn(ws: &mut Ws, req: &Value) -> Vec<Value> {
    send(ws, req).await;
    read_turn(ws).await
}

fn completed(events: &[Value]) -> &Value {
    let last = events.last().expect("events");
    assert_eq!(last["type"], "response.completed", "{events:?}");
    &last["response"]
}

/// The last request body the upstream received.
fn last_upstream_body(env: &Env) -> Value {
    env.mock
        .log()
        .requests
        .last()
        .expect("a request")
        .body
        .clone()
}

async fn cold(env: &Env) {
    env.mock.close_all(1001);
    eventually(|| env.relay.app.pool.snapshot().iter().all(|c| !c.open)).await;
}

#[tokio::test]
async fn ct2_a_cold_context_gets_the_full_transcript_with_the_models_outputs() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let e1 = turn(&mut ws, &first("one [[mock:text 4]]")).await;
    let r1 = completed(&e1).clone();
    cold(&env).await;
    let e2 = turn(
        &mut ws,
        &chained(r1["id"].as_str().unwrap(), json!([user("two")])),
    )
    .await;
    completed(&e2);
    let body = last_upstream_body(&env);
    assert!(
        body.get("previous_response_id").is_none(),
        "a replay carries no previous_response_id"
    );
    let input = body["input"].as_array().unwrap();
    assert_eq!(input[0], user("one [[mock:text 4]]"));
    assert_eq!(
        input[1], r1["output"][0],
        "the model's own output is replayed"
    );
    assert_eq!(input[2], user("two"));
    assert_eq!(input.len(), 3);
    assert_eq!(env.mock.log().upgrades.len(), 2);
    // The next turn is on the fast path again, on the new context.
    let e3 = turn(
        &mut ws,
        &chained(
            completed(&e2)["id"].as_str().unwrap(),
            json!([user("three")]),
        ),
    )
    .await;
    completed(&e3);
    assert!(last_upstream_body(&env)
        .get("previous_response_id")
        .is_some());
}

#[tokio::test]
async fn ct4_a_tool_output_after_a_lost_context_arrives_with_its_call() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let e1 = turn(
        &mut ws,
        &first(r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"echo hi"}]]"#),
    )
    .await;
    let r1 = completed(&e1).clone();
    let call = r1["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap()
        .clone();
    cold(&env).await;
    let out = json!({"type": "function_call_output", "call_id": call["call_id"], "output": "hi\n"});
    let e2 = turn(&mut ws, &chained(r1["id"].as_str().unwrap(), json!([out]))).await;
    completed(&e2);
    let input = last_upstream_body(&env)["input"]
        .as_array()
        .unwrap()
        .clone();
    let call_at = input
        .iter()
        .position(|i| i["type"] == "function_call")
        .expect("the call is replayed");
    let out_at = input
        .iter()
        .position(|i| i["type"] == "function_call_output")
        .expect("the output");
    assert!(call_at < out_at);
    assert_eq!(input[call_at]["call_id"], call["call_id"]);
    assert!(
        input.iter().any(|i| i["type"] == "reasoning"),
        "same account: reasoning kept"
    );
}

#[tokio::test]
async fn ct6_a_session_over_its_transcript_bound_answers_ct3_instead_of_replaying() {
    let env = relay("limits:\n  max_transcript_bytes: 1024\n").await;
    let mut ws = env.connect().await;
    let e1 = turn(&mut ws, &first("[[mock:text 400]]")).await; // output well over 1 KiB
    let id = completed(&e1)["id"].as_str().unwrap().to_string();
    cold(&env).await;
    let e2 = turn(&mut ws, &chained(&id, json!([user("two")]))).await;
    assert_eq!(
        (e2[0]["status"].as_u64(), e2[0]["error"]["code"].as_str()),
        (Some(400), Some("previous_response_not_found"))
    );
    let requests = env.mock.log().requests.len();
    assert_eq!(requests, 1, "nothing incomplete was sent upstream");
    // The client resends its full input and the session goes on.
    completed(&turn(&mut ws, &first("full input again")).await);
}

#[tokio::test]
async fn ct6_the_total_bound_evicts_the_least_recently_used_session() {
    let env =
        relay("limits:\n  max_transcript_bytes: 4096\n  max_transcript_bytes_total: 4096\n").await;
    let (mut a, mut b) = (env.connect().await, env.connect().await);
    let ra = completed(&turn(&mut a, &first("a [[mock:text 350]]")).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rb = completed(&turn(&mut b, &first("b [[mock:text 350]]")).await)["id"]
        .as_str()
        .unwrap()
        .to_string();
    cold(&env).await;
    let eb = turn(&mut b, &chained(&rb, json!([user("b2")]))).await;
    completed(&eb);
    let ea = turn(&mut a, &chained(&ra, json!([user("a2")]))).await;
    assert_eq!(
        ea[0]["error"]["code"], "previous_response_not_found",
        "a was least recently used: evicted"
    );
}

#[tokio::test]
async fn ct8_a_lost_cache_on_the_fast_path_is_replayed_without_the_client_noticing() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let r1 = completed(&turn(&mut ws, &first("one")).await).clone();
    let e2 = turn(
        &mut ws,
        &chained(
            r1["id"].as_str().unwrap(),
            json!([user("two [[mock:fault forget once=f]]")]),
        ),
    )
    .await;
    completed(&e2);
    assert!(e2.iter().all(|e| e["type"] != "error"));
    assert_eq!(
        e2.iter()
            .filter(|e| e["type"] == "response.created")
            .count(),
        1
    );
    let reqs = env.mock.log().requests;
    assert_eq!(
        reqs.len(),
        3,
        "first, the fast path that failed, the replay"
    );
    assert!(reqs[1].body.get("previous_response_id").is_some());
    assert!(reqs[2].body.get("previous_response_id").is_none());
    assert_eq!(reqs[2].body["input"][1], r1["output"][0]);
}

#[tokio::test]
async fn ct9_a_close_before_output_is_retried_transparently_on_a_fresh_context() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let r1 = completed(&turn(&mut ws, &first("one")).await).clone();
    let e2 = turn(
        &mut ws,
        &chained(
            r1["id"].as_str().unwrap(),
            json!([user("two [[mock:fault close 1012 once=c]]")]),
        ),
    )
    .await;
    let r2 = completed(&e2).clone();
    let types = types(&e2);
    assert_eq!(
        types.iter().filter(|t| **t == "response.created").count(),
        1,
        "lifecycle not forwarded again: {types:?}"
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| **t == "response.in_progress")
            .count(),
        1
    );
    assert_eq!(env.mock.log().upgrades.len(), 2);
    // The client chains from the terminal's id.
    completed(
        &turn(
            &mut ws,
            &chained(r2["id"].as_str().unwrap(), json!([user("three")])),
        )
        .await,
    );
}

#[tokio::test]
async fn ct9_eof_silence_missing_pong_and_the_connection_limit_before_output_are_retried() {
    let env = relay(
        "upstream:\n  stream_idle_timeout: 150ms\n  ping_interval: 20ms\n  pong_timeout: 100ms\n",
    )
    .await;
    let mut ws = env.connect().await;
    for (i, fault) in ["eof", "stall", "deaf", "limit"].iter().enumerate() {
        let e = turn(
            &mut ws,
            &first(&format!("[[mock:fault {fault} once=r{i}]]")),
        )
        .await;
        completed(&e);
        assert_eq!(
            e.iter().filter(|e| e["type"] == "response.created").count(),
            1,
            "{fault}"
        );
    }
    assert_eq!(
        env.mock.log().upgrades.len(),
        5,
        "one fresh context per fault"
    );
}

#[tokio::test]
async fn ct9_a_refused_handshake_at_turn_start_is_retried() {
    let env = relay("").await;
    env.mock.push_handshake(500, None);
    let mut ws = env.connect().await;
    completed(&turn(&mut ws, &first("hello")).await);
    let log = env.mock.log();
    assert_eq!((log.refused_upgrades, log.upgrades.len()), (1, 1));
}

#[tokio::test]
async fn ct9_an_exhausted_retry_budget_is_502_and_the_socket_stays_open() {
    let env = relay("upstream:\n  retry_budget: 1\n").await;
    env.mock.push_fault("close 1012").unwrap();
    env.mock.push_fault("close 1012").unwrap();
    let mut ws = env.connect().await;
    let e = turn(&mut ws, &first("x")).await;
    let last = e.last().unwrap();
    assert_eq!(
        (last["status"].as_u64(), last["error"]["code"].as_str()),
        (Some(502), Some("upstream_connection_lost"))
    );
    assert_eq!(
        env.mock.log().upgrades.len(),
        2,
        "one retry, then the budget is spent"
    );
    completed(&turn(&mut ws, &first("y")).await);
}

#[tokio::test]
async fn ct9_after_output_no_retry_502_and_the_conversation_goes_on() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let r1 = completed(&turn(&mut ws, &first("one")).await).clone();
    let e2 = turn(
        &mut ws,
        &chained(
            r1["id"].as_str().unwrap(),
            json!([user("[[mock:fault close 1012 after=5]]")]),
        ),
    )
    .await;
    assert_eq!(
        e2.last().unwrap()["error"]["code"],
        "upstream_connection_lost"
    );
    assert!(e2.iter().any(|e| e["type"] == "response.output_text.delta"));
    // The failed turn did not advance the chain; the last good response still chains (replayed).
    completed(
        &turn(
            &mut ws,
            &chained(r1["id"].as_str().unwrap(), json!([user("again")])),
        )
        .await,
    );
}

#[tokio::test]
async fn ct11_unknown_upstream_errors_are_forwarded_with_their_status() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    let e = turn(&mut ws, &first("[[mock:fault error 418 teapot_error]]")).await;
    let last = e.last().unwrap();
    assert_eq!(
        (last["status"].as_u64(), last["error"]["code"].as_str()),
        (Some(418), Some("teapot_error"))
    );
    assert_eq!(env.mock.log().upgrades.len(), 1, "not retried");
}

#[tokio::test]
async fn ws7_the_upstream_turn_state_is_sent_on_the_sessions_redials() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    completed(&turn(&mut ws, &first("one")).await);
    cold(&env).await;
    completed(&turn(&mut ws, &first("two")).await);
    let ups = env.mock.log().upgrades;
    let first_state = format!("ts-{}", ups[0].conn);
    assert_eq!(ups[1].headers.get("x-codex-turn-state"), Some(&first_state));

    // The client's own value wins.
    let env = relay("").await;
    let mut ws = ws_connect_with(&env.ws_url(), KEY, &[("x-codex-turn-state", "mine")])
        .await
        .unwrap();
    completed(&turn(&mut ws, &first("one")).await);
    cold(&env).await;
    completed(&turn(&mut ws, &first("two")).await);
    for u in env.mock.log().upgrades {
        assert_eq!(
            u.headers.get("x-codex-turn-state").map(String::as_str),
            Some("mine")
        );
    }
}
