//! Usage records (US-1 … US-3) through the real relay: one record per `response.create` read,
//! for every outcome built so far, with tokens, cost, timings, error class and side.

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::usage::{Record, Status, Tokens};

const PRICES: &str = "models:\n  gpt-test: {input: 2.0, cached_input: 0.5, output: 8.0}\n";

/// A relay whose price table prices `gpt-test` (and nothing else); `account_extra` is YAML
/// added to its one account.
async fn priced_relay(account_extra: &str) -> (Env, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let prices = dir.path().join("prices.yaml");
    std::fs::write(&prices, PRICES).expect("prices");
    let env = relay_from(|mock_url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {mock_url}\n    api_key: sk-up\n{account_extra}usage:\n  prices: {}\n",
            prices.display()
        )
    })
    .await;
    (env, dir)
}

fn reported_usage(terminal: &Value) -> Tokens {
    let u = &terminal["response"]["usage"];
    let n = |v: &Value| v.as_u64().expect("usage number");
    Tokens {
        input: n(&u["input_tokens"]),
        cached_input: n(&u["input_tokens_details"]["cached_tokens"]),
        output: n(&u["output_tokens"]),
        reasoning: n(&u["output_tokens_details"]["reasoning_tokens"]),
    }
}

/// US-2 by hand for the test table.
fn expected_cost(t: &Tokens) -> f64 {
    ((t.input - t.cached_input) as f64 * 2.0 + t.cached_input as f64 * 0.5 + t.output as f64 * 8.0)
        / 1e6
}

/// UTF-8 bytes of the `delta` texts among `events`.
fn delta_bytes(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| e["type"].as_str().is_some_and(|t| t.ends_with(".delta")))
        .map(|e| e["delta"].as_str().map_or(0, |d| d.len() as u64))
        .sum()
}

fn only(records: &[Record], status: Status) -> &Record {
    let found: Vec<_> = records.iter().filter(|r| r.status == status).collect();
    assert_eq!(found.len(), 1, "one {status:?} record in {records:#?}");
    found[0]
}

#[tokio::test]
async fn us1_us2_completed_turn_has_reported_tokens_cost_and_timings() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "[[mock:text 12]]")).await;
    let events = read_turn(&mut ws).await;
    let terminal = events.last().expect("terminal");
    let records = env.records_when(1).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.status, Status::Completed);
    assert_eq!(
        r.response_id.as_deref(),
        Some(response_id(&events).as_str())
    );
    assert_eq!(
        (r.key_id.as_str(), r.account_id.as_deref(), r.seq),
        ("test", Some("up"), 1)
    );
    assert_eq!(
        (r.model.as_deref(), r.transport.as_str()),
        (Some("gpt-test"), "ctx_pool")
    );
    assert!(r.request_id.starts_with("req_") && r.request_id.len() == 36);
    assert_eq!(r.tokens, reported_usage(terminal));
    assert!(r.tokens.input > 0 && r.tokens.output > 0);
    assert!(!r.estimated && !r.warm_up);
    assert_eq!(r.attempts, 1);
    let cost = r.cost_usd.expect("priced");
    assert!((cost - expected_cost(&r.tokens)).abs() < 1e-12, "{cost}");
    let t = &r.timings;
    let (write, first, token, total) = (
        t.upstream_write.expect("write"),
        t.first_event.expect("first event"),
        t.first_token.expect("first token"),
        t.total.expect("total"),
    );
    assert!(t.admission_wait.is_some());
    assert!(write <= first && first <= token && token <= total, "{t:?}");
    assert_eq!(
        (r.error_class.as_ref(), r.error_side.as_ref()),
        (None, None)
    );
    assert!(r.created_ms > 1_700_000_000_000);
}

#[tokio::test]
async fn us1_incomplete_and_failed_turns_are_recorded_as_such() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "[[mock:fixture incomplete]]")).await;
    let incomplete = read_turn(&mut ws).await;
    send(&mut ws, &create("gpt-test", "[[mock:fixture failed]]")).await;
    let failed = read_turn(&mut ws).await;
    let records = env.records_when(2).await;
    let r = only(&records, Status::Incomplete);
    assert_eq!(
        r.tokens,
        reported_usage(incomplete.last().expect("terminal"))
    );
    assert_eq!(r.error_class.as_deref(), Some("max_output_tokens"));
    assert!(!r.estimated);
    // The failed fixture reports no usage: the record estimates instead of a silent zero.
    assert!(failed.last().expect("terminal")["response"]["usage"].is_null());
    let r = only(&records, Status::Failed);
    assert!(r.estimated && r.tokens.input > 0, "{r:#?}");
    assert_eq!(r.error_class.as_deref(), Some("server_error"));
    assert_eq!(r.error_side.as_deref(), Some("upstream_protocol"));
    assert_eq!(r.seq, 2);
}

#[tokio::test]
async fn us1_upstream_error_event_is_recorded_as_error() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:fault error 429 rate_limit_exceeded]]"),
    )
    .await;
    let events = read_turn(&mut ws).await;
    assert_eq!(events.last().expect("terminal")["type"], "error");
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::Error);
    assert_eq!(r.error_class.as_deref(), Some("rate_limited"));
    assert_eq!(r.error_side.as_deref(), Some("upstream_protocol"));
    assert!(r.estimated && r.tokens.input > 0);
}

/// US-3: output estimated from the streamed deltas, input from the request actually sent.
#[tokio::test]
async fn us3_upstream_lost_after_output_is_estimated_from_bytes() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    let req = create(
        "gpt-test",
        "[[mock:text 40]] [[mock:fault close 1011 after=9]]",
    );
    send(&mut ws, &req).await;
    let events = read_turn(&mut ws).await;
    let last = events.last().expect("terminal");
    assert_eq!(last["error"]["code"], "upstream_connection_lost", "{last}");
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::UpstreamLost);
    assert_eq!(r.error_class.as_deref(), Some("upstream_connection_lost"));
    assert_eq!(r.error_side.as_deref(), Some("upstream_io"));
    assert!(r.estimated);
    let sent = req.to_string().len() as u64;
    assert_eq!(r.tokens.input, sent.div_ceil(4));
    let streamed = delta_bytes(&events);
    assert!(streamed > 0);
    assert_eq!(r.tokens.output, streamed.div_ceil(4));
    let cost = r.cost_usd.expect("priced");
    assert!((cost - expected_cost(&r.tokens)).abs() < 1e-12);
}

/// TP-4/US-3: a client that leaves mid-turn gets a `client_cancelled` record with estimates.
#[tokio::test]
async fn us3_client_cancelled_turn_is_estimated() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    let req = create("gpt-test", "[[mock:text 40]] [[mock:fault stall after=9]]");
    send(&mut ws, &req).await;
    let mut events = Vec::new();
    while events.len() < 9 {
        match next_frame(&mut ws).await {
            Frame::Event(e) => events.push(e),
            other => panic!("socket ended: {other:?}"),
        }
    }
    drop(ws);
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::ClientCancelled);
    assert_eq!(r.error_side.as_deref(), Some("client"));
    assert!(r.estimated);
    assert_eq!(r.tokens.input, (req.to_string().len() as u64).div_ceil(4));
    let streamed = delta_bytes(&events);
    assert!(streamed > 0);
    assert_eq!(r.tokens.output, streamed.div_ceil(4));
}

/// US-3: an attempt abandoned by a transparent retry adds its estimate to the turn's record.
#[tokio::test]
async fn us3_retried_turn_adds_the_abandoned_attempt_with_attempts() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    let req = create(
        "gpt-test",
        "[[mock:text 5]] [[mock:fault close 1012 after=1 once=r1]]",
    );
    send(&mut ws, &req).await;
    let events = read_turn(&mut ws).await;
    let reported = reported_usage(events.last().expect("terminal"));
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::Completed);
    assert_eq!(r.attempts, 2);
    assert!(r.estimated);
    let abandoned = (req.to_string().len() as u64).div_ceil(4);
    assert_eq!(r.tokens.input, reported.input + abandoned);
    assert_eq!(r.tokens.output, reported.output);
    assert_eq!(r.tokens.cached_input, reported.cached_input);
    assert_eq!(env.mock.log().upgrades.len(), 2);
}

/// CT-5: a warm-up is recorded and flagged.
#[tokio::test]
async fn us1_warm_up_is_recorded_with_its_flag() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    let mut req = create("gpt-test", "warm");
    req["generate"] = json!(false);
    send(&mut ws, &req).await;
    read_turn(&mut ws).await;
    let r = env.records_when(1).await.remove(0);
    assert_eq!((r.status, r.warm_up), (Status::Completed, true));
}

/// Every refused `response.create` gets a `rejected` record, with the refusal's code.
#[tokio::test]
async fn us1_refused_requests_each_get_a_rejected_record() {
    let (env, _dir) =
        priced_relay("    models: [gpt-test]\nsession:\n  preempt_policy: reject\n").await;
    let mut ws = env.connect().await;
    // No model on the first request; then a model no account serves; then an unknown chain.
    send(&mut ws, &json!({"type": "response.create", "input": "hi"})).await;
    read_turn(&mut ws).await;
    send(&mut ws, &create("gpt-nobody", "hi")).await;
    read_turn(&mut ws).await;
    let mut chained = create("gpt-test", "hi");
    chained["previous_response_id"] = json!("resp_unknown");
    send(&mut ws, &chained).await;
    read_turn(&mut ws).await;
    // A request while a turn runs (`reject` policy): 409 after the terminal.
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 30]] [[mock:fault slow 2ms]]"),
    )
    .await;
    send(&mut ws, &create("gpt-test", "second")).await;
    let first = read_turn(&mut ws).await;
    assert_eq!(
        first.last().expect("terminal")["type"],
        "response.completed"
    );
    let refused = read_turn(&mut ws).await;
    assert_eq!(refused[0]["error"]["code"], "response_in_progress");
    let records = env.records_when(5).await;
    let mut by_seq: Vec<_> = records
        .iter()
        .map(|r| (r.seq, r.status, r.error_class.clone()))
        .collect();
    by_seq.sort_by_key(|r| r.0);
    let code = |c: &str| Some(c.to_string());
    assert_eq!(
        by_seq,
        vec![
            (1, Status::Rejected, code("missing_model")),
            (2, Status::Rejected, code("model_not_found")),
            (3, Status::Rejected, code("previous_response_not_found")),
            (4, Status::Completed, None),
            (5, Status::Rejected, code("response_in_progress")),
        ]
    );
    for r in records.iter().filter(|r| r.status == Status::Rejected) {
        assert_eq!(
            (r.attempts, r.estimated, r.tokens),
            (0, false, Tokens::default())
        );
        assert_eq!(r.error_side.as_deref(), Some("client"));
        assert_eq!(r.transport, "none");
    }
    let ids: std::collections::HashSet<_> = records.iter().map(|r| &r.request_id).collect();
    assert_eq!(ids.len(), 5, "request ids are unique");
}

/// US-2: a model the table does not price is recorded with cost null.
#[tokio::test]
async fn us2_unpriced_model_has_null_cost() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-unpriced", "hi")).await;
    read_turn(&mut ws).await;
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::Completed);
    assert!(r.tokens.input > 0);
    assert_eq!(r.cost_usd, None);
}

/// A shutdown cuts the running turn (`shutdown` record), closes the socket with 1012 and
/// flushes every record before it returns.
#[tokio::test]
async fn us1_shutdown_records_the_cut_turn_and_flushes_everything() {
    let (env, _dir) = priced_relay("").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "one")).await;
    read_turn(&mut ws).await;
    send(&mut ws, &create("gpt-test", "[[mock:fault stall after=3]]")).await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    let Env {
        mock,
        relay,
        store_dir,
    } = env;
    let (path, usage) = (relay.app.cfg().store.path.clone(), relay.app.usage.clone());
    relay.shutdown().await;
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1012)));
    assert_eq!(
        (usage.recorded(), usage.flushed(), usage.pending()),
        (2, 2, 0)
    );
    let store = switchyard::usage::store::Store::open(&path).expect("store");
    let records = store
        .records(&switchyard::usage::store::Query::default())
        .expect("records");
    let statuses: Vec<_> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Status::Completed, Status::Shutdown]);
    assert_eq!(records[1].error_side.as_deref(), Some("internal"));
    drop((mock, store_dir));
}
