//! The upstream context pool seen through the relay (SPEC UP-1 … UP-8, SC-3's wait for a
//! context, TP-4's cancel, and the `upstream.*` limits): real relay, real mock upstream, real
//! WebSocket clients.

mod common;

use common::*;
use serde_json::{json, Value};

fn pool(env: &Env) -> Vec<switchyard::upstream::pool::ContextView> {
    env.relay.app.pool.snapshot()
}

fn user(text: &str) -> Value {
    json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
}

/// A first turn with `store:false`, so only the connection's cache (or a replay) can chain it.
fn first(text: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "input": [user(text)]})
}

fn chained(prev: &str, text: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false,
        "previous_response_id": prev, "input": [user(text)]})
}

fn completed(events: &[Value]) -> &Value {
    let last = events.last().expect("events");
    assert_eq!(last["type"], "response.completed", "{events:?}");
    &last["response"]
}

async fn expect_lost(ws: &mut Ws) -> Vec<Value> {
    let events = read_turn(ws).await;
    let last = events.last().expect("an event");
    assert_eq!(last["type"], "error", "{events:?}");
    assert_eq!(
        (last["status"].as_u64(), last["error"]["code"].as_str()),
        (Some(502), Some("upstream_connection_lost"))
    );
    events
}

#[tokio::test]
async fn up1_a_session_keeps_its_context_and_a_new_session_reuses_an_idle_one() {
    let env = relay("").await;
    let mut a = env.connect().await;
    for i in 0..3 {
        send(&mut a, &create("gpt-test", &format!("turn {i}"))).await;
        assert_eq!(
            read_turn(&mut a).await.last().unwrap()["type"],
            "response.completed"
        );
    }
    assert_eq!(
        env.mock.log().upgrades.len(),
        1,
        "one context across the session's turns"
    );
    drop(a);
    eventually(|| pool(&env).iter().all(|c| c.leased_by.is_none())).await;
    assert!(pool(&env)[0].open, "the context went back idle, still open");

    let mut b = env.connect().await;
    send(&mut b, &create("gpt-test", "fresh session")).await;
    assert_eq!(
        read_turn(&mut b).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(
        env.mock.log().upgrades.len(),
        1,
        "the new session reused the idle context instead of dialing"
    );
    let conns: std::collections::HashSet<u64> =
        env.mock.log().requests.iter().map(|r| r.conn).collect();
    assert_eq!(conns.len(), 1);
}

#[tokio::test]
async fn up1_concurrent_sessions_get_their_own_contexts() {
    let env = relay("").await;
    let (mut a, mut b) = (env.connect().await, env.connect().await);
    send(&mut a, &create("gpt-test", "a")).await;
    send(&mut b, &create("gpt-test", "b")).await;
    read_turn(&mut a).await;
    read_turn(&mut b).await;
    assert_eq!(env.mock.log().upgrades.len(), 2);
    let leased: Vec<_> = pool(&env).iter().filter_map(|c| c.leased_by).collect();
    assert_eq!(leased.len(), 2, "each open session holds its own context");
}

#[tokio::test]
async fn sc3_at_max_conns_a_turn_waits_for_the_running_turn_and_then_completes() {
    let env = relay("    max_conns: 1\n").await;
    let mut a = env.connect().await;
    send(
        &mut a,
        &create("gpt-test", "[[mock:text 40]] [[mock:fault slow 10ms]]"),
    )
    .await;
    assert!(
        matches!(next_frame(&mut a).await, Frame::Event(_)),
        "a's turn runs"
    );
    let mut b = env.connect().await;
    send(&mut b, &create("gpt-test", "b waits")).await;
    assert_eq!(completed(&read_turn(&mut a).await)["status"], "completed");
    assert_eq!(completed(&read_turn(&mut b).await)["status"], "completed");
    let log = env.mock.log();
    assert_eq!(
        log.upgrades.len(),
        1,
        "one connection, one turn after the other"
    );
    let a_end = &log.stream_ends[0];
    assert_eq!(
        (a_end.end.as_str(), a_end.sent),
        ("completed", a_end.planned),
        "a was not cut"
    );
    assert_eq!(log.requests.len(), 2);
}

#[tokio::test]
async fn sc3_no_capacity_after_admission_timeout_and_the_socket_stays_open() {
    let env = relay("    max_conns: 1\nsession:\n  admission_timeout: 200ms\n").await;
    let mut a = env.connect().await;
    send(&mut a, &create("gpt-test", "[[mock:fault stall]]")).await;
    for _ in 0..2 {
        assert!(matches!(next_frame(&mut a).await, Frame::Event(_)));
    }
    let mut b = env.connect().await;
    send(&mut b, &create("gpt-test", "no room")).await;
    let e = read_turn(&mut b).await;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0]["status"].as_u64(), e[0]["error"]["code"].as_str()),
        (Some(503), Some("no_capacity"))
    );
    drop(a);
    send(&mut b, &create("gpt-test", "room now")).await;
    assert_eq!(completed(&read_turn(&mut b).await)["status"], "completed");
    let log = env.mock.log();
    assert_eq!(
        log.client_close_frames,
        vec![(1, Some(1000))],
        "a's turn was cancelled"
    );
    assert_eq!(log.upgrades.len(), 2, "b's turn redialed the freed context");
    assert_eq!(pool(&env).len(), 1);
}

#[tokio::test]
async fn up5_a_turn_after_max_age_goes_on_a_new_connection_and_replays() {
    let env = relay("upstream:\n  max_age: 200ms\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &first("one [[mock:text 4]]")).await;
    let r1 = completed(&read_turn(&mut ws).await).clone();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await; // precondition: past max_age
    send(&mut ws, &chained(r1["id"].as_str().unwrap(), "two")).await;
    assert_eq!(completed(&read_turn(&mut ws).await)["status"], "completed");
    let log = env.mock.log();
    assert_eq!(log.upgrades.len(), 2, "replaced between the turns");
    assert_eq!(
        log.client_close_frames,
        vec![(1, Some(1000))],
        "the old one closed politely"
    );
    let body = &log.requests[1].body;
    assert_eq!(log.requests[1].conn, 2);
    assert!(
        body.get("previous_response_id").is_none(),
        "CT-2 replay: {body}"
    );
    assert_eq!(body["input"].as_array().map(Vec::len), Some(3), "{body}");
}

#[tokio::test]
async fn up6_at_max_conns_a_new_session_takes_an_idle_sessions_context() {
    let env = relay("    max_conns: 1\n").await;
    let mut a = env.connect().await;
    send(&mut a, &first("a one [[mock:text 4]]")).await;
    let r1 = completed(&read_turn(&mut a).await).clone();
    let mut b = env.connect().await;
    send(&mut b, &create("gpt-test", "b takes it")).await;
    assert_eq!(completed(&read_turn(&mut b).await)["status"], "completed");
    assert_eq!(env.mock.log().upgrades.len(), 1, "taken as it is, no dial");
    // A continues: its context is cold (B used it), so the relay replays (CT-2).
    send(&mut a, &chained(r1["id"].as_str().unwrap(), "a two")).await;
    assert_eq!(completed(&read_turn(&mut a).await)["status"], "completed");
    let log = env.mock.log();
    assert_eq!(log.upgrades.len(), 1);
    assert!(log.requests.iter().all(|r| r.conn == 1));
    let body = &log.requests[2].body;
    assert!(
        body.get("previous_response_id").is_none(),
        "CT-2 replay: {body}"
    );
    assert_eq!(pool(&env)[0].leased_by, Some(1), "a holds it again");
}

#[tokio::test]
async fn up7_min_idle_contexts_are_dialed_before_any_client_and_used_first() {
    let env = relay("upstream:\n  min_idle: 2\n").await;
    eventually(|| env.mock.log().upgrades.len() == 2).await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "warm")).await;
    assert_eq!(completed(&read_turn(&mut ws).await)["status"], "completed");
    let log = env.mock.log();
    assert!(log.requests[0].conn <= 2, "the turn went on a warm context");
    // The session holds one now: another is dialed to keep two idle.
    eventually(|| env.mock.log().upgrades.len() == 3).await;
}

#[tokio::test]
async fn up3_an_idle_context_closed_upstream_is_replaced_on_the_next_turn() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "one")).await;
    read_turn(&mut ws).await;
    env.mock.close_all(1001);
    eventually(|| !pool(&env)[0].open).await;
    send(&mut ws, &create("gpt-test", "two")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed",
        "the client never noticed"
    );
    assert_eq!(env.mock.log().upgrades.len(), 2);
    assert_eq!(pool(&env)[0].generation, 2);
}

#[tokio::test]
async fn up4_a_missing_pong_during_a_turn_ends_it_with_502_and_the_next_turn_redials() {
    let env = relay("upstream:\n  ping_interval: 20ms\n  pong_timeout: 100ms\n").await;
    let mut ws = env.connect().await;
    // Deaf after output: a transparent retry is no longer possible (CT-9), so 502.
    send(&mut ws, &create("gpt-test", "[[mock:fault deaf after=4]]")).await;
    let events = expect_lost(&mut ws).await;
    assert_eq!(
        events.len(),
        5,
        "four events, then the relay's 502: {events:?}"
    );
    send(&mut ws, &create("gpt-test", "again")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(env.mock.log().upgrades.len(), 2);
}

#[tokio::test]
async fn up4_idle_contexts_are_pinged() {
    let env = relay("upstream:\n  ping_interval: 20ms\n  pong_timeout: 1s\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "one")).await;
    read_turn(&mut ws).await;
    drop(ws);
    eventually(|| env.mock.log().pings.values().sum::<u64>() >= 3).await;
    assert!(pool(&env)[0].open);
}

#[tokio::test]
async fn stream_idle_timeout_ends_a_silent_turn_with_502_and_closes_that_connection() {
    let env = relay("upstream:\n  stream_idle_timeout: 100ms\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "[[mock:fault stall after=3]]")).await;
    let events = expect_lost(&mut ws).await;
    assert_eq!(events.len(), 4);
    // The silent connection is closed by the relay: the mock sees its client go.
    eventually(|| env.mock.log().stream_ends.iter().any(|e| e.end == "fault")).await;
    send(&mut ws, &create("gpt-test", "again")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
}

#[tokio::test]
async fn a_slow_client_is_not_upstream_silence() {
    // One-slot pump, a client that does not read and a short idle timeout: megabytes of large
    // deltas fill every buffer, so the relay waits on the client, which is not upstream silence.
    let env = relay("session:\n  pump_channel: 1\nupstream:\n  stream_idle_timeout: 1s\n").await;
    let mut ws = ws_connect_small_buffer(env.relay.addr, KEY).await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 800000]] [[mock:delta 16384]]"),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await; // the client reads nothing meanwhile
    let events = read_turn(&mut ws).await;
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
}

#[tokio::test]
async fn upstream_max_message_bytes_breaks_the_context_on_an_oversized_event() {
    let env = relay("upstream:\n  max_message_bytes: 2048\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "[[mock:text 600]]")).await;
    let events = expect_lost(&mut ws).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "response.output_text.delta"),
        "small events passed"
    );
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["type"] != "response.completed"));
    send(&mut ws, &create("gpt-test", "short")).await;
    assert_eq!(
        read_turn(&mut ws).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(
        env.mock.log().upgrades.len(),
        2,
        "the oversized event's connection was replaced"
    );
}

#[tokio::test]
async fn tp4_a_client_leaving_mid_turn_closes_only_that_context_and_leaks_nothing() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 300]] [[mock:fault slow 10ms]]"),
    )
    .await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    drop(ws);
    eventually(|| env.mock.log().client_closes.len() == 1).await;
    eventually(|| pool(&env).iter().all(|c| c.leased_by.is_none() && !c.open)).await;
    let mut again = env.connect().await;
    send(
        &mut again,
        &json!({"type": "response.create", "model": "gpt-test", "input": "next"}),
    )
    .await;
    assert_eq!(
        read_turn(&mut again).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(pool(&env).len(), 1, "the context was reused, redialed");
}

#[tokio::test]
async fn tp4_the_relay_closes_the_upstream_before_its_next_event_and_leaks_nothing() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 30ms]]"),
    )
    .await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    drop(ws);
    eventually(|| env.mock.log().stream_ends.len() == 1).await;
    let log = env.mock.log();
    let end = &log.stream_ends[0];
    assert_eq!(
        end.end, "client_closed",
        "the mock saw the close while it waited: {end:?}"
    );
    assert!(end.sent < end.planned, "{end:?}");
    assert_eq!(
        log.client_close_frames,
        vec![(1, Some(1000))],
        "a Close frame, not an abort"
    );
    let app = env.relay.app.clone();
    eventually(move || {
        let n = app.pool.counts();
        n.held == 0 && n.in_turn == 0 && n.open == 0 && n.tasks == 0
    })
    .await;
}
