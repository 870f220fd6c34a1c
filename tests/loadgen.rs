//! `switchyard loadgen` and the mock's benchmark answers (`metadata.bench_events`), through
//! real sockets: the mock alone, and the relay in front of it.

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::loadgen::{measure, LoadgenArgs};
use switchyard::mock::bench::read_stamp;
use switchyard::mock::{MockOptions, MockUpstream};

fn args(url: String, key: &str) -> LoadgenArgs {
    use clap::{Args, FromArgMatches};
    let cmd = LoadgenArgs::augment_args(clap::Command::new("loadgen"));
    let mut a = LoadgenArgs::from_arg_matches(&cmd.get_matches_from(["loadgen"])).expect("args");
    a.url = url;
    a.key = key.into();
    a
}

#[tokio::test]
async fn bench_metadata_gets_paced_stamped_deltas_in_the_api_shape() {
    let m = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let mut ws = ws_connect(&format!("ws://{}/v1/responses", m.addr), "k").await;
    let mut req = create("gpt-test", "bench");
    req["metadata"] =
        json!({"bench_events": "5", "bench_bytes": "48", "bench_interval_us": "2000"});
    let asked = switchyard::mock::bench::unix_nanos();
    send(&mut ws, &req).await;
    let events = read_turn(&mut ws).await;
    dump("mock_bench", &events);
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(deltas.len(), 5);
    assert!(deltas.iter().all(|d| d.len() == 48));
    let stamps: Vec<u64> = deltas
        .iter()
        .map(|d| read_stamp(d).expect("stamp"))
        .collect();
    // Paced 2 ms apart on a schedule that starts after the request was sent: the fifth delta
    // cannot leave before 8 ms past that (a lower bound only, so load cannot break it).
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
    assert!(stamps[0] >= asked);
    assert!(stamps[4] - asked >= 8_000_000, "{stamps:?}");
    let done = events.last().expect("terminal");
    assert_eq!(done["type"], "response.completed");
    assert_eq!(done["response"]["metadata"]["bench_events"], "5");
}

#[tokio::test]
async fn mock_events_start_with_their_type_as_the_api_writes_them() {
    use futures::StreamExt;
    let m = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let mut ws = ws_connect(&format!("ws://{}/v1/responses", m.addr), "k").await;
    send(&mut ws, &create("gpt-test", "[[mock:text 5]]")).await;
    let mut seen = 0;
    while let Some(Ok(msg)) = ws.next().await {
        let text = msg.into_text().expect("text frame");
        assert!(text.starts_with("{\"type\":\""), "{text}");
        seen += 1;
        let v: Value = serde_json::from_str(&text).expect("json");
        if is_terminal(&v) {
            break;
        }
    }
    assert!(seen > 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_measures_every_event_through_the_relay() {
    let env = relay("").await;
    let mut a = args(env.ws_url(), KEY);
    a.sessions = 3;
    a.turns = 2;
    a.events = 20;
    a.interval_us = 200;
    let report = measure(&a).await.expect("run");
    let s = &report.stats;
    assert_eq!(report.sessions_ok, 3);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!((s.turns, s.events), (6, 120));
    assert_eq!(s.latency.len(), 120);
    assert_eq!((s.first_event.len(), s.turn.len()), (6, 6));
    let j = report.to_json(&a);
    assert!(j["events_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    // Warm-up turns (one per session) reached the mock too, unmeasured.
    let requests = env.mock.log().requests.len();
    assert_eq!(requests, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_counts_a_refused_key_as_a_connect_error() {
    let env = relay("").await;
    let mut a = args(env.ws_url(), "wrong-key");
    a.sessions = 2;
    let report = measure(&a).await.expect("run");
    assert_eq!(report.sessions_ok, 0);
    assert_eq!(report.stats.errors.get("connect"), Some(&2));
    assert_eq!(report.stats.events, 0);
}
