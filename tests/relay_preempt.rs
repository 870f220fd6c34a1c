//! A request while a turn runs (TP-5's three policies), turn slots per account (SC-3), and
//! sockets that stay silent (WS-8), through the real relay against the mock upstream.

mod common;

use std::collections::HashSet;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use switchyard::usage::Status;
use tokio_tungstenite::tungstenite::Message;

const LONG: &str = "[[mock:text 400]] [[mock:fault slow 3ms]]";

/// Reads events until the first text delta; returns them.
async fn until_first_delta(ws: &mut Ws) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        match next_frame(ws).await {
            Frame::Event(e) => {
                let delta = e["type"] == "response.output_text.delta";
                seen.push(e);
                if delta {
                    return seen;
                }
            }
            other => panic!("socket ended early: {other:?} after {seen:?}"),
        }
    }
}

/// Sends a ping and waits for its pong (skipping events): every frame sent before the ping has
/// been read by the relay when this returns.
async fn roundtrip(ws: &mut Ws) {
    ws.send(Message::Ping(b"rt".to_vec().into()))
        .await
        .expect("ping");
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(m) = ws.next().await {
            if matches!(m.expect("read"), Message::Pong(_)) {
                return;
            }
        }
        panic!("socket ended before the pong");
    })
    .await
    .expect("hang guard: pong");
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send");
}

/// The response id or item id an event belongs to.
fn owner(e: &Value) -> Option<String> {
    e["response"]["id"]
        .as_str()
        .or_else(|| e["item_id"].as_str())
        .or_else(|| e["item"]["id"].as_str())
        .map(str::to_string)
}

/// TP-5 `preempt` (the default): the running turn is cut without a terminal, its upstream
/// connection is closed, no event of it follows the new turn's first event, and the new turn
/// completes; the records say `preempted` (estimated) and `completed`.
#[tokio::test]
async fn tp5_preempt_cuts_the_running_turn_and_starts_the_new_one() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", LONG)).await;
    let first = until_first_delta(&mut ws).await;
    let old: HashSet<String> = first.iter().filter_map(owner).collect();
    send(&mut ws, &create("gpt-test", "[[mock:text 3]]")).await;
    let mut new_started = false;
    let mut terminals = Vec::new();
    let mut old_ids = old.clone();
    loop {
        let Frame::Event(e) = next_frame(&mut ws).await else {
            panic!("socket ended");
        };
        let who = owner(&e);
        if e["type"] == "response.created" {
            new_started = true;
        }
        if !new_started {
            // In flight before the preemption: still the old turn's, never a terminal.
            assert!(!is_terminal(&e), "old turn got a terminal: {e}");
            if let Some(w) = who {
                old_ids.insert(w);
            }
            continue;
        }
        assert!(
            who.as_ref().is_none_or(|w| !old_ids.contains(w)),
            "stale event of the preempted turn after the new one began: {e}"
        );
        if is_terminal(&e) {
            terminals.push(e);
            break;
        }
    }
    assert_eq!(terminals[0]["type"], "response.completed");
    let log = env.mock.log();
    let old_end = log
        .stream_ends
        .iter()
        .find(|s| old.contains(&s.response_id))
        .expect("the old stream ended");
    assert_eq!(old_end.end, "client_closed", "{old_end:?}");
    assert!(old_end.sent < old_end.planned, "{old_end:?}");
    assert_eq!(
        log.upgrades.len(),
        2,
        "the new turn went on a fresh connection"
    );
    let records = env.records_when(2).await;
    let statuses: Vec<_> = records.iter().map(|r| (r.seq, r.status)).collect();
    assert!(statuses.contains(&(1, Status::Preempted)), "{statuses:?}");
    assert!(statuses.contains(&(2, Status::Completed)), "{statuses:?}");
    let pre = records
        .iter()
        .find(|r| r.status == Status::Preempted)
        .unwrap();
    assert!(pre.estimated && pre.tokens.output > 0 && pre.tokens.input > 0);
    assert_eq!(pre.error_side.as_deref(), Some("client"));
}

/// TP-5 `preempt` keeps the conversation: a request chained from the last completed response
/// after a preemption is served by replay on the fresh connection (CT-2).
#[tokio::test]
async fn tp5_preempted_conversation_continues_by_replay() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hello")).await;
    let done = read_turn(&mut ws).await;
    let id = response_id(&done);
    send(&mut ws, &create("gpt-test", LONG)).await;
    until_first_delta(&mut ws).await;
    let mut next = create("gpt-test", "again");
    next["previous_response_id"] = Value::String(id);
    send(&mut ws, &next).await;
    let mut last;
    loop {
        let Frame::Event(e) = next_frame(&mut ws).await else {
            panic!("socket ended");
        };
        last = e;
        if is_terminal(&last) && last["type"] != "error" {
            break;
        }
        assert_ne!(last["type"], "error", "{last}");
    }
    assert_eq!(last["type"], "response.completed");
    let log = env.mock.log();
    let replayed = log.requests.last().expect("request");
    assert!(
        replayed.body.get("previous_response_id").is_none(),
        "replayed without the chain: {:?}",
        replayed.body
    );
}

/// TP-5 `queue`: the request runs after the running turn; one more than `queue_depth` gets
/// 409 after the running turn's terminal.
#[tokio::test]
async fn tp5_queue_runs_requests_in_order_and_refuses_beyond_the_depth() {
    let env = relay("session:\n  preempt_policy: queue\n  queue_depth: 1\n").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 60]] [[mock:fault slow 2ms]]"),
    )
    .await;
    until_first_delta(&mut ws).await;
    send(&mut ws, &create("gpt-test", "second [[mock:text 2]]")).await;
    send(&mut ws, &create("gpt-test", "third")).await;
    let first_rest = read_turn(&mut ws).await;
    assert_eq!(first_rest.last().unwrap()["type"], "response.completed");
    let refused = read_turn(&mut ws).await;
    assert_eq!(refused[0]["error"]["code"], "response_in_progress");
    let second = read_turn(&mut ws).await;
    assert_eq!(second.last().unwrap()["type"], "response.completed");
    let texts: Vec<String> = env
        .mock
        .log()
        .requests
        .iter()
        .map(|r| r.body["input"].to_string())
        .collect();
    assert_eq!(texts.len(), 2, "the third never went upstream");
    assert!(texts[1].contains("second"));
    let records = env.records_when(3).await;
    let mut by_seq: Vec<_> = records.iter().map(|r| (r.seq, r.status)).collect();
    by_seq.sort_unstable_by_key(|r| r.0);
    assert_eq!(
        by_seq,
        vec![
            (1, Status::Completed),
            (2, Status::Completed),
            (3, Status::Rejected)
        ]
    );
}

/// A queued request whose socket closes before it ran still gets its record.
#[tokio::test]
async fn tp5_queued_request_dropped_with_its_socket_is_recorded() {
    let env = relay("session:\n  preempt_policy: queue\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", LONG)).await;
    until_first_delta(&mut ws).await;
    send(&mut ws, &create("gpt-test", "waiting")).await;
    // The second frame is read before the socket goes: a ping round trip proves it.
    roundtrip(&mut ws).await;
    drop(ws);
    let records = env.records_when(2).await;
    let statuses: HashSet<_> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, HashSet::from([Status::ClientCancelled]));
    assert_eq!(records.len(), 2);
}

/// An invalid frame during a turn is answered after its preemption, before the new turn.
#[tokio::test]
async fn s3_held_errors_are_sent_when_the_turn_is_preempted() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", LONG)).await;
    until_first_delta(&mut ws).await;
    send_text(&mut ws, "{oops").await;
    send(&mut ws, &create("gpt-test", "[[mock:text 2]]")).await;
    let mut saw_error_at = None;
    let mut created_at = None;
    for i in 0.. {
        let Frame::Event(e) = next_frame(&mut ws).await else {
            panic!("socket ended");
        };
        if e["type"] == "error" {
            assert_eq!(e["error"]["code"], "invalid_event");
            saw_error_at.get_or_insert(i);
        }
        if e["type"] == "response.created" {
            created_at.get_or_insert(i);
        }
        if e["type"] == "response.completed" {
            break;
        }
    }
    assert!(saw_error_at.expect("held error sent") < created_at.expect("new turn"));
}

/// SC-3: `accounts[].concurrency` bounds the turns running on an account; a turn that finds
/// no slot waits (its request does not go upstream) and runs when one frees up.
#[tokio::test]
async fn sc3_a_turn_waits_for_a_slot_and_runs_when_one_frees() {
    let env = relay("    concurrency: 1\n").await;
    let (mut a, mut b) = (env.connect().await, env.connect().await);
    send(&mut a, &create("gpt-test", "[[mock:fault stall after=3]]")).await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut a).await, Frame::Event(_)));
    }
    send(&mut b, &create("gpt-test", "[[mock:text 2]]")).await;
    roundtrip(&mut b).await;
    assert_eq!(env.mock.log().requests.len(), 1, "B waits for A's slot");
    drop(a);
    let b_turn = read_turn(&mut b).await;
    assert_eq!(b_turn.last().unwrap()["type"], "response.completed");
    assert_eq!(env.mock.log().requests.len(), 2);
    let records = env.records_when(2).await;
    let b_rec = records
        .iter()
        .find(|r| r.status == Status::Completed)
        .expect("B's record");
    let a_rec = records
        .iter()
        .find(|r| r.status == Status::ClientCancelled)
        .expect("A's record");
    assert_ne!(a_rec.session, b_rec.session);
    let wait = b_rec.timings.admission_wait.expect("admission wait");
    assert!(wait <= b_rec.timings.upstream_write.expect("write"));
}

/// SC-3: with every slot busy past `session.admission_timeout`, the turn gets 503
/// `no_capacity` (a `rejected` record) and the socket stays open.
#[tokio::test]
async fn sc3_no_slot_within_admission_timeout_is_503_and_the_socket_stays() {
    let env = relay("    concurrency: 1\nsession:\n  admission_timeout: 100ms\n").await;
    let (mut a, mut b) = (env.connect().await, env.connect().await);
    send(&mut a, &create("gpt-test", "[[mock:fault stall after=3]]")).await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut a).await, Frame::Event(_)));
    }
    send(&mut b, &create("gpt-test", "hi")).await;
    let refused = read_turn(&mut b).await;
    assert_eq!(refused[0]["status"], 503, "{refused:?}");
    assert_eq!(refused[0]["error"]["code"], "no_capacity");
    drop(a);
    send(&mut b, &create("gpt-test", "again")).await;
    let ok = read_turn(&mut b).await;
    assert_eq!(ok.last().unwrap()["type"], "response.completed");
    let records = env.records_when(3).await;
    let rejected = records
        .iter()
        .find(|r| r.status == Status::Rejected)
        .expect("rejected record");
    assert_eq!(rejected.error_class.as_deref(), Some("no_capacity"));
    assert_eq!(rejected.attempts, 0);
}

/// WS-8: no first frame within `session.first_message_timeout` closes with 1008.
#[tokio::test]
async fn ws8_no_first_message_closes_1008() {
    let env = relay("session:\n  first_message_timeout: 50ms\n").await;
    let mut ws = env.connect().await;
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1008)));
}

/// WS-8: no request within `session.idle_timeout` closes with 1000; a running turn is not idle.
#[tokio::test]
async fn ws8_idle_socket_closes_1000_after_its_last_turn() {
    let env = relay("session:\n  idle_timeout: 150ms\n").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 60]] [[mock:fault slow 5ms]]"),
    )
    .await;
    let turn = read_turn(&mut ws).await;
    assert_eq!(turn.last().unwrap()["type"], "response.completed");
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1000)));
}
