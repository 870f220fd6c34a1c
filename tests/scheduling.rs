//! Account choice per turn (SC-2), failover before output (SC-4), the breaker (SC-5), dial
//! refusals (UP-8), TM-4 failures on the breaker, and stored-response bindings (CT-3, HS-3),
//! against one mock upstream per account.

mod common;

use common::multi::*;
use common::*;
use serde_json::{json, Value};

fn last(events: &[Value]) -> &Value {
    events.last().expect("an event")
}

fn chained(prev: &str, input: Value) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "previous_response_id": prev, "input": input})
}

/// SC-2: a session stays on its account turn after turn; new sessions spread over the tier.
#[tokio::test]
async fn sc2_a_session_sticks_to_its_account_and_sessions_spread() {
    let env = multi(&[("a", ""), ("b", "")], "").await;
    let mut before = env.seen();
    let mut used = [0usize; 2];
    for _ in 0..16 {
        let mut ws = env.connect().await;
        let mut prev = None::<String>;
        for _ in 0..3 {
            let req = match &prev {
                Some(p) => chained(p, json!("next")),
                None => create("gpt-test", "hi"),
            };
            send(&mut ws, &req).await;
            let turn = read_turn(&mut ws).await;
            assert_eq!(last(&turn)["type"], "response.completed");
            prev = Some(response_id(&turn));
        }
        let now = env.seen();
        let grew: Vec<usize> = (0..2).map(|i| now[i] - before[i]).collect();
        assert!(
            grew == [3, 0] || grew == [0, 3],
            "one account per session: {grew:?}"
        );
        used[usize::from(grew[1] == 3)] += 1;
        before = now;
    }
    println!("sessions per account: a {} b {}", used[0], used[1]);
    assert!(used[0] > 0 && used[1] > 0, "{used:?}");
}

/// SC-2: the lowest priority number first; a higher one only when the first takes no turns,
/// re-checked at every turn of a running session.
#[tokio::test]
async fn sc2_priority_tiers_and_eligibility_rechecked_every_turn() {
    let env = multi(&[("a", ""), ("b", "    priority: 1\n")], "").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    let first = read_turn(&mut ws).await;
    assert_eq!(env.seen(), [1, 0]);
    assert_eq!(env.admin_post("a/disable").await, 200);
    send(&mut ws, &chained(&response_id(&first), json!("more"))).await;
    let second = read_turn(&mut ws).await;
    assert_eq!(last(&second)["type"], "response.completed");
    assert_eq!(env.seen(), [1, 1], "the same socket's next turn moved to b");
    // Replayed on b (CT-2): the first turn's items went with it.
    let sent = env.mocks[1].log().requests[0].body.clone();
    assert!(sent.get("previous_response_id").is_none());
    assert_eq!(sent["input"].as_array().map(Vec::len), Some(3), "{sent}");
    assert_eq!(env.admin_post("a/enable").await, 200);
    send(&mut ws, &chained(&response_id(&second), json!("again"))).await;
    read_turn(&mut ws).await;
    assert_eq!(env.seen(), [1, 2], "sticky: b while it is eligible");
    let mut fresh = env.connect().await;
    send(&mut fresh, &create("gpt-test", "hi")).await;
    read_turn(&mut fresh).await;
    assert_eq!(env.seen(), [2, 2], "a new session takes the first tier");
}

/// The two-account harness: a tool turn with encrypted reasoning on `a`, then `a` breaks (its
/// connections close and it refuses new ones). The next turn completes on `b`, replayed
/// without `a`'s encrypted reasoning and without the ids after it (SC-4, CT-7, CT-9).
#[tokio::test]
async fn sc4_ct7_the_next_turn_completes_on_the_other_account_without_foreign_reasoning() {
    let env = multi(&[("a", ""), ("b", "    priority: 1\n")], "").await;
    let mut ws = env.connect().await;
    let tool = r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"ls"}]]"#;
    send(&mut ws, &create("gpt-test", tool)).await;
    let first = read_turn(&mut ws).await;
    let response = &last(&first)["response"];
    let output = response["output"].as_array().expect("output");
    assert_eq!(output[0]["type"], "reasoning");
    let call = output
        .iter()
        .find(|i| i["type"] == "function_call")
        .expect("a call")
        .clone();
    env.mocks[0].set_outage(Some((503, None)));
    env.mocks[0].close_all(1011);
    eventually(|| env.mocks[0].log().open_connections == 0).await;
    let out =
        json!([{"type": "function_call_output", "call_id": call["call_id"], "output": "a b\n"}]);
    send(&mut ws, &chained(response["id"].as_str().unwrap(), out)).await;
    let second = read_turn(&mut ws).await;
    assert_eq!(last(&second)["type"], "response.completed", "{second:?}");
    assert!(second.iter().all(|e| e["type"] != "error"));
    assert_eq!(
        second
            .iter()
            .filter(|e| e["type"] == "response.created")
            .count(),
        1
    );
    let sent = env.mocks[1].log().requests[0].body.clone();
    let input = sent["input"].as_array().expect("input");
    assert!(input.iter().all(|i| i["type"] != "reasoning"), "{input:?}");
    let replayed = input
        .iter()
        .find(|i| i["type"] == "function_call")
        .expect("the call is replayed before its output");
    assert!(replayed.get("id").is_none() && replayed["call_id"] == call["call_id"]);
    assert!(
        env.mocks[0].log().refused_upgrades >= 1,
        "a was tried first"
    );
    let records = env.records().await;
    let r = records.last().expect("record");
    // The refused dial sent nothing, so the one attempt is b's.
    assert_eq!(
        (r.account_id.as_deref(), r.attempts, r.status.as_str()),
        (Some("b"), 1, "completed")
    );
    assert_eq!(env.account("a").await["health"]["consecutive_failures"], 1);
}

/// SC-4: once output reached the client the turn never moves: 502, and `b` sees nothing.
#[tokio::test]
async fn sc4_after_output_the_turn_does_not_move() {
    let env = multi(&[("a", ""), ("b", "    priority: 1\n")], "").await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create(
            "gpt-test",
            "[[mock:text 20]] [[mock:fault close 1011 after=5]]",
        ),
    )
    .await;
    let turn = read_turn(&mut ws).await;
    let end = last(&turn);
    assert_eq!(
        (end["type"].as_str(), end["error"]["code"].as_str()),
        (Some("error"), Some("upstream_connection_lost"))
    );
    assert_eq!(env.seen(), [1, 0]);
}

/// SC-4: a server error event before any output moves the turn to another account; with no
/// other account it reaches the client as it is.
#[tokio::test]
async fn sc4_a_server_error_before_output_fails_over_when_another_account_can_serve() {
    let env = multi(&[("a", ""), ("b", "    priority: 1\n")], "").await;
    env.mocks[0].set_fail_rate(1000);
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    let turn = read_turn(&mut ws).await;
    assert_eq!(last(&turn)["type"], "response.completed", "{turn:?}");
    assert_eq!(env.seen(), [1, 1]);
    assert_eq!(env.admin_post("b/disable").await, 200);
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    let turn = read_turn(&mut ws).await;
    assert_eq!(last(&turn)["error"]["code"], "server_error", "{turn:?}");
}

/// SC-5: `breaker_failures` consecutive failures open the breaker (no more attempts on the
/// account), the cooldown ends in a half-open probe, and a good probe closes it. Client
/// cancels, preemptions and the request's own 4xx never count.
#[tokio::test]
async fn sc5_breaker_opens_drains_and_recovers_and_client_faults_never_count() {
    let env = multi(
        &[("a", ""), ("b", "    priority: 1\n")],
        "scheduler:\n  breaker_failures: 2\n  breaker_cooldown: 200ms\n",
    )
    .await;
    // Client-side trouble on a healthy account: drops, preemptions, a 400 from the upstream.
    for _ in 0..3 {
        let mut ws = env.connect().await;
        send(
            &mut ws,
            &create("gpt-test", "[[mock:fault slow 20ms]] [[mock:text 40]]"),
        )
        .await;
        let first = next_frame(&mut ws).await;
        assert!(matches!(first, Frame::Event(_)));
        send(
            &mut ws,
            &create("gpt-test", "[[mock:fault error 400 invalid_value]]"),
        )
        .await;
        let refused = read_turn(&mut ws).await;
        assert_eq!(last(&refused)["error"]["code"], "invalid_value");
        send(
            &mut ws,
            &create("gpt-test", "[[mock:fault slow 20ms]] [[mock:text 40]]"),
        )
        .await;
        next_frame(&mut ws).await;
        drop(ws);
    }
    eventually(|| env.relay.app.sessions.is_empty()).await;
    let a = env.account("a").await;
    assert_eq!(
        (
            a["health"]["breaker"].as_str(),
            a["health"]["consecutive_failures"].as_u64()
        ),
        (Some("closed"), Some(0)),
        "{a}"
    );
    // Now a fails: two sessions each pay one transparent retry, then a is left alone.
    env.mocks[0].set_outage(Some((502, None)));
    env.mocks[0].close_all(1011);
    eventually(|| env.mocks[0].log().open_connections == 0).await;
    for n in 1..=2u64 {
        let mut ws = env.connect().await;
        send(&mut ws, &create("gpt-test", "hi")).await;
        assert_eq!(
            last(&read_turn(&mut ws).await)["type"],
            "response.completed"
        );
        assert_eq!(env.mocks[0].log().refused_upgrades, n);
    }
    let a = env.account("a").await;
    assert_eq!(a["health"]["breaker"], "open", "{a}");
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    assert_eq!(
        last(&read_turn(&mut ws).await)["type"],
        "response.completed"
    );
    assert_eq!(
        env.mocks[0].log().refused_upgrades,
        2,
        "an open breaker is not dialed"
    );
    // a is back; after the cooldown one probe finds out and closes the breaker.
    env.mocks[0].set_outage(None);
    let mut half_open = false;
    for _ in 0..400 {
        if env.account("a").await["health"]["breaker"] == "half_open" {
            half_open = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(half_open, "hang guard: the breaker never went half-open");
    let before = env.mocks[0].log().requests.len();
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "probe")).await;
    assert_eq!(
        last(&read_turn(&mut ws).await)["type"],
        "response.completed"
    );
    assert_eq!(
        env.mocks[0].log().requests.len(),
        before + 1,
        "the probe went to a"
    );
    assert_eq!(env.account("a").await["health"]["breaker"], "closed");
}

/// UP-8: a 401 from the upstream handshake disables the account, stored like an operator's
/// disable (it survives a restart) until an operator enables it; the turn moves on.
#[tokio::test]
async fn up8_a_refused_credential_disables_the_account_until_enabled() {
    let dir = tempfile::tempdir().expect("dir");
    let accounts = [("a", ""), ("b", "    priority: 1\n")];
    let env = multi_in(&accounts, "", dir).await;
    env.mocks[0].set_outage(Some((401, None)));
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    assert_eq!(
        last(&read_turn(&mut ws).await)["type"],
        "response.completed"
    );
    let a = env.account("a").await;
    assert_eq!(
        (a["enabled"].as_bool(), a["override"]["enabled"].as_bool()),
        (Some(false), Some(false)),
        "{a}"
    );
    env.mocks[0].set_outage(None);
    let mut ws2 = env.connect().await;
    send(&mut ws2, &create("gpt-test", "hi")).await;
    read_turn(&mut ws2).await;
    assert_eq!(env.mocks[0].log().refused_upgrades, 1, "a stays out");
    drop((ws, ws2));
    // Restarted on the same store: still disabled.
    let Multi { mocks, relay, dir } = env;
    drop(relay);
    drop(mocks);
    let again = multi_in(&accounts, "", dir).await;
    assert_eq!(again.account("a").await["enabled"], false);
    assert_eq!(again.admin_post("a/enable").await, 200);
    let mut ws = again.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    read_turn(&mut ws).await;
    assert_eq!(again.seen(), [1, 0], "enabled again: a takes turns");
}

/// UP-8: a 429 handshake cools the account down for its `Retry-After`; it is not a failure.
#[tokio::test]
async fn up8_a_429_cools_the_account_down_for_its_retry_after() {
    let env = multi(&[("a", ""), ("b", "    priority: 1\n")], "").await;
    env.mocks[0].push_handshake(429, Some("120"));
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    assert_eq!(
        last(&read_turn(&mut ws).await)["type"],
        "response.completed"
    );
    let h = &env.account("a").await["health"];
    let left = h["cooldown_ms"].as_u64().expect("cooling down");
    assert!(left > 60_000 && left <= 120_000, "{h}");
    assert_eq!(
        (h["breaker"].as_str(), h["consecutive_failures"].as_u64()),
        (Some("closed"), Some(0))
    );
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    read_turn(&mut ws).await;
    assert_eq!(env.seen(), [0, 2], "a is left alone while it cools down");
}

/// TM-4's failures (close 1012 here) count toward the breaker too.
#[tokio::test]
async fn tm4_upstream_1012_closes_count_toward_the_breaker() {
    let env = multi(
        &[("a", "")],
        "scheduler:\n  breaker_failures: 2\n  breaker_cooldown: 10m\nupstream:\n  ws_failure_burst: 100\n",
    )
    .await;
    let mut ws = env.connect().await;
    for _ in 0..2 {
        send(
            &mut ws,
            &create(
                "gpt-test",
                "[[mock:text 10]] [[mock:fault close 1012 after=4]]",
            ),
        )
        .await;
        let turn = read_turn(&mut ws).await;
        assert_eq!(last(&turn)["error"]["code"], "upstream_connection_lost");
    }
    let a = env.account("a").await;
    assert_eq!(a["health"]["breaker"], "open", "{a}");
    send(&mut ws, &create("gpt-test", "hi")).await;
    let refused = read_turn(&mut ws).await;
    assert_eq!(last(&refused)["error"]["code"], "no_capacity");
}

/// CT-3, HS-3, SC-2: a stored response is chained from by any session of its key, on its
/// account, with `previous_response_id` kept; another key, or its account out of service,
/// gets 400 `previous_response_not_found`.
#[tokio::test]
async fn ct3_hs3_stored_responses_chain_from_any_session_of_their_key() {
    let env = multi(&[("a", ""), ("b", "")], "").await;
    let mut ws = env.connect().await;
    let mut req = create("gpt-test", "remember 42");
    req["store"] = json!(true);
    send(&mut ws, &req).await;
    let first = read_turn(&mut ws).await;
    let id = response_id(&first);
    let home = if env.seen() == [1, 0] { 0 } else { 1 };
    drop(ws);
    for _ in 0..4 {
        let mut other = env.connect().await;
        send(&mut other, &chained(&id, json!("what was it?"))).await;
        let turn = read_turn(&mut other).await;
        assert_eq!(last(&turn)["type"], "response.completed", "{turn:?}");
        let sent = env.mocks[home].log().requests.last().unwrap().body.clone();
        assert_eq!(sent["previous_response_id"], id.as_str(), "sent as it is");
    }
    assert_eq!(env.seen()[1 - home], 0, "always the bound account");
    // HS-3: a stand-alone HTTP request chains from it too.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/responses", env.relay.addr);
    let body = json!({"model": "gpt-test", "previous_response_id": id, "input": "again"});
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(&url)
        .bearer_auth(OTHER_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "previous_response_not_found");
    let mut other_key =
        ws_connect(&format!("ws://{}/v1/responses", env.relay.addr), OTHER_KEY).await;
    send(&mut other_key, &chained(&id, json!("mine?"))).await;
    let e = read_turn(&mut other_key).await;
    assert_eq!(last(&e)["error"]["code"], "previous_response_not_found");
    let name = ["a", "b"][home];
    assert_eq!(env.admin_post(&format!("{name}/disable")).await, 200);
    let mut ws = env.connect().await;
    send(&mut ws, &chained(&id, json!("still there?"))).await;
    let e = read_turn(&mut ws).await;
    assert_eq!(last(&e)["error"]["code"], "previous_response_not_found");
    assert_eq!(last(&e)["status"], 400);
}
