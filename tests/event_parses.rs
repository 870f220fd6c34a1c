//! DESIGN.md: the relay never parses a delta event in full, only terminal (and error) events.
//! The count of full parses is process-wide, so this test has its own binary (own process):
//! nothing else in it can move the counter while it runs.

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::protocol::peek;

/// A request the mock answers with `events` stamped deltas, back to back.
fn bench_create(events: usize) -> Value {
    let mut c = create("gpt-test", "parse count");
    c["store"] = json!(false);
    c["metadata"] = json!({"bench_events": events.to_string(), "bench_bytes": "64"});
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_are_never_parsed_in_full_only_terminals_are() {
    let env = relay("").await;
    let mut ws = env.connect().await;
    // The first turn dials the upstream; counting starts after it.
    send(&mut ws, &bench_create(1)).await;
    read_turn(&mut ws).await;
    let (parses, scans) = (peek::full_parses(), peek::type_scans());
    let mut deltas = 0;
    for _ in 0..3 {
        send(&mut ws, &bench_create(400)).await;
        let events = read_turn(&mut ws).await;
        assert_eq!(
            events.last().map(|e| e["type"].clone()),
            Some(json!("response.completed"))
        );
        deltas += events
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .count();
    }
    assert_eq!(deltas, 1200);
    // Three turns, three terminal events: one full parse each, none for 1,200 deltas.
    assert_eq!(peek::full_parses() - parses, 3);
    // The mock writes `type` first, as the API does: no event needed a scan to find it.
    assert_eq!(peek::type_scans() - scans, 0);
    let metrics = reqwest::get(env.http_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let line = format!("switchyard_event_full_parses_total {}", peek::full_parses());
    assert!(metrics.lines().any(|l| l == line), "{line} not in /metrics");

    // An upstream error after output is the turn's terminal: parsed once, like the others.
    let before = peek::full_parses();
    send(
        &mut ws,
        &create("gpt-test", "[[mock:fault error 500 server_error after=3]]"),
    )
    .await;
    let events = read_turn(&mut ws).await;
    assert_eq!(
        events.last().map(|e| e["type"].clone()),
        Some(json!("error"))
    );
    assert_eq!(peek::full_parses() - before, 1);
}
