//! Per-key limits (SC-6) over WebSocket and HTTP: requests and tokens per minute, concurrent
//! turns and sockets, daily budgets, allowed models; refusals are 429 (403 for a model) with
//! `Retry-After`, the socket stays open, and each refusal has its `rejected` usage record.
//! Also `switchyard keys new` (SC-1).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::usage::Status;

fn limited(limits: &str) -> String {
    format!("  - id: lim\n    key: {LIM}\n    limits: {{{limits}}}\n")
}

const LIM: &str = "sy-limited-key";

/// A relay whose keys are `test` (no limits) and `lim` with `limits`, plus `extra` YAML.
async fn relay_limited(limits: &str, extra: &str) -> Env {
    let keys = limited(limits);
    relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\n{keys}accounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n{extra}"
        )
    })
    .await
}

async fn connect_lim(env: &Env) -> Ws {
    ws_connect(&env.ws_url(), LIM).await
}

/// A POST as `lim`: status, `Retry-After`, body.
async fn post_lim(env: &Env, body: Value) -> (u16, Option<u64>, Value) {
    let r = reqwest::Client::new()
        .post(env.http_url("/v1/responses"))
        .bearer_auth(LIM)
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

/// The 429 frame's `Retry-After`, in seconds.
fn limited_frame(events: &[Value]) -> u64 {
    let e = events.last().expect("a frame");
    assert_eq!(
        (
            e["status"].as_u64(),
            e["error"]["code"].as_str(),
            e["error"]["type"].as_str()
        ),
        (
            Some(429),
            Some("rate_limit_exceeded"),
            Some("rate_limit_error")
        ),
        "{e}"
    );
    e["headers"]["retry-after"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("retry-after in the frame")
}

/// RPM over WS and HTTP: the window's count, a warm-up exempt (CT-5), the socket open after
/// the refusal, and the request admitted again once the reported `Retry-After` has passed.
#[tokio::test]
async fn sc6_rpm_sliding_window_over_ws_and_http() {
    let env = relay_limited("rpm: 2", "").await;
    let mut ws = connect_lim(&env).await;
    assert!(completed(&turn(&mut ws, "one").await));
    let (status, _, _) = post_lim(&env, json!({"model": "gpt-test", "input": "two"})).await;
    assert_eq!(status, 200);
    let wait = limited_frame(&turn(&mut ws, "three").await);
    assert!((1..=60).contains(&wait), "{wait}");
    let (status, retry, body) = post_lim(&env, json!({"model": "gpt-test", "input": "x"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded"))
    );
    assert!(retry.is_some_and(|r| (1..=60).contains(&r)), "{retry:?}");
    // CT-5: a warm-up counts against no request rate.
    let warm =
        json!({"type": "response.create", "model": "gpt-test", "generate": false, "input": []});
    send(&mut ws, &warm).await;
    assert!(completed(&read_turn(&mut ws).await));
    // The other key is untouched.
    let mut free = env.connect().await;
    assert!(completed(&turn(&mut free, "free").await));
    // The window edge: refused until the oldest request leaves, admitted after (on a new
    // socket: this one does not answer the relay's pings while the test sleeps).
    drop(ws);
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(300)).await;
    let mut ws = connect_lim(&env).await;
    assert!(completed(&turn(&mut ws, "after the window").await));
    let records = env.records_when(7).await;
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| r.status == Status::Rejected)
        .collect();
    assert_eq!(rejected.len(), 2, "{records:?}");
    assert!(rejected
        .iter()
        .all(|r| r.key_id == "lim" && r.error_class.as_deref() == Some("rate_limit_exceeded")));
}

/// TPM: tokens are charged when a turn ends, estimates of a cancelled turn included; the next
/// request is refused on both ingresses until they leave the window.
#[tokio::test]
async fn sc6_tpm_charges_tokens_at_the_end_of_turns_estimates_included() {
    let env = relay_limited("tpm: 40", "").await;
    let mut ws = connect_lim(&env).await;
    // A cancelled turn: its estimated tokens count.
    send(
        &mut ws,
        &create("gpt-test", "[[mock:fault slow 5ms]] [[mock:text 200]]"),
    )
    .await;
    for _ in 0..20 {
        next_frame(&mut ws).await;
    }
    drop(ws);
    let usage = env.relay.app.usage.clone();
    eventually(move || usage.recorded() >= 1).await;
    let records = env.records().await;
    assert!(
        records[0].estimated && records[0].tokens.output > 0,
        "{records:?}"
    );
    let mut ws = connect_lim(&env).await;
    let mut charged = records[0].tokens.input + records[0].tokens.output;
    if charged < 40 {
        let t = turn(&mut ws, "[[mock:text 60]]").await;
        assert!(completed(&t));
        let u = &t.last().unwrap()["response"]["usage"];
        charged += u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap();
    }
    assert!(charged >= 40);
    let wait = limited_frame(&turn(&mut ws, "over").await);
    assert!((1..=60).contains(&wait), "{wait}");
    let (status, retry, _) = post_lim(&env, json!({"model": "gpt-test", "input": "x"})).await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
}

/// Concurrent turns across a key's sockets and HTTP requests, and concurrent sockets at the
/// upgrade: 429 with `Retry-After`, and admitted again once the other one ended.
#[tokio::test]
async fn sc6_concurrent_turns_and_sockets() {
    let env = relay_limited("concurrent_turns: 1, concurrent_sockets: 2", "").await;
    let mut a = connect_lim(&env).await;
    let mut b = connect_lim(&env).await;
    let slow = create("gpt-test", "[[mock:fault slow 30ms]] [[mock:text 20]]");
    send(&mut a, &slow).await;
    assert!(matches!(next_frame(&mut a).await, Frame::Event(_)));
    assert_eq!(limited_frame(&turn(&mut b, "meanwhile").await), 1);
    let (status, retry, _) = post_lim(&env, json!({"model": "gpt-test", "input": "x"})).await;
    assert_eq!((status, retry), (429, Some(1)));
    // The third socket is refused at the upgrade.
    let third = ws_connect_with(&env.ws_url(), LIM, &[]).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = third else {
        panic!("the upgrade must be refused")
    };
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value =
        serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("json body");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // a's turn ends: b's next turn runs; a socket closes: a new one is admitted.
    assert!(completed(&read_turn(&mut a).await));
    assert!(completed(&turn(&mut b, "now").await));
    drop(a);
    let mut again = None;
    for _ in 0..200 {
        if let Ok(ws) = ws_connect_with(&env.ws_url(), LIM, &[]).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = again.expect("hang guard: the socket place never came back");
    assert!(completed(&turn(&mut c, "c").await));
}

/// A daily budget reached mid-session: the next turn is refused with the time until the next
/// UTC day, the socket stays open, HTTP is refused too, and a restart remembers the spend.
#[tokio::test]
async fn sc6_budget_reached_mid_session_and_remembered_after_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("state.db");
    let keys = limited("daily_budget_usd: 0.000001");
    let yaml = |url: &str| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n{keys}accounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\nstore:\n  path: {}\n",
            store.display()
        )
    };
    let env = relay_from(yaml).await;
    let mut ws = connect_lim(&env).await;
    send(&mut ws, &create("gpt-5", "[[mock:text 30]]")).await;
    assert!(completed(&read_turn(&mut ws).await));
    send(&mut ws, &create("gpt-5", "more")).await;
    let wait = limited_frame(&read_turn(&mut ws).await);
    let to_midnight = 86_400 - switchyard::limits::periods::now_utc() % 86_400;
    assert!(
        wait <= to_midnight + 1 && wait + 5 >= to_midnight,
        "{wait} vs {to_midnight}"
    );
    // Still open: the next request gets its refusal too.
    send(&mut ws, &create("gpt-5", "again")).await;
    limited_frame(&read_turn(&mut ws).await);
    let (status, retry, _) = post_lim(&env, json!({"model": "gpt-5", "input": "x"})).await;
    assert_eq!(status, 429);
    assert!(retry.is_some_and(|r| r + 5 >= to_midnight));
    let records = env.records_when(4).await;
    assert!(records[0].cost_usd.unwrap_or(0.0) > 0.000001, "{records:?}");
    drop(ws);
    drop(env);
    let again = relay_from(yaml).await;
    let mut ws = connect_lim(&again).await;
    send(&mut ws, &create("gpt-5", "after restart")).await;
    limited_frame(&read_turn(&mut ws).await);
}

/// `keys[].models`: another model is 403 `model_not_allowed`, over WS and HTTP, recorded.
#[tokio::test]
async fn sc6_a_model_the_key_may_not_use_is_403() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: lim\n    key: {LIM}\n    models: [\"gpt-4*\"]\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n"
        )
    })
    .await;
    let mut ws = connect_lim(&env).await;
    send(&mut ws, &create("gpt-5", "no")).await;
    let e = read_turn(&mut ws).await;
    let e = e.last().unwrap();
    assert_eq!(
        (
            e["status"].as_u64(),
            e["error"]["code"].as_str(),
            e["error"]["param"].as_str()
        ),
        (Some(403), Some("model_not_allowed"), Some("model")),
        "{e}"
    );
    send(&mut ws, &create("gpt-4.1", "yes")).await;
    assert!(completed(&read_turn(&mut ws).await));
    let (status, _, body) = post_lim(&env, json!({"model": "gpt-5", "input": "x"})).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (403, Some("permission_error"))
    );
    let records = env.records_when(3).await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r.status == Status::Rejected)
            .count(),
        2
    );
}

/// SC-1: `switchyard keys new` prints a key and an entry that admits it.
#[tokio::test]
async fn sc1_keys_new_prints_a_key_and_its_entry() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["keys", "new", "--id", "ops"])
        .output()
        .await
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let key = text
        .lines()
        .find_map(|l| l.split(": ").nth(1).filter(|k| k.starts_with("sy-")))
        .expect("a key line")
        .to_string();
    let entry: String = text
        .lines()
        .skip_while(|l| !l.starts_with("  - id"))
        .collect::<Vec<_>>()
        .join("\n");
    let cfg =
        switchyard::config::Config::from_yaml_str(&format!("keys:\n{entry}\n")).expect("entry");
    assert_eq!(cfg.find_key(&key).map(|k| k.id.as_str()), Some("ops"));
}
