//! The admin API and `switchyard accounts` (TM-3): listing accounts, switching modes mid-session,
//! disabling, draining, clearing overrides, and overrides surviving a restart.

mod common;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "adm-secret";

fn admin(env: &Env) -> String {
    let addr = env.relay.admin_addr.unwrap_or(env.relay.addr);
    format!("http://{addr}/admin/v1/accounts")
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("admin call");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(env: &Env, path: &str, body: Option<Value>) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{}/{path}", admin(env)),
        Some(TOKEN),
        body,
    )
    .await
}

/// Auth, listing, 404 and 400, all with OpenAI-shaped errors; no token means no admin API.
#[tokio::test]
async fn tm3_admin_api_auth_listing_and_errors() {
    let env = relay(&format!("admin:\n  token: {TOKEN}\n")).await;
    let url = admin(&env);
    let (s, e) = call(reqwest::Method::GET, &url, None, None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("invalid_admin_token"))
    );
    let (s, _) = call(reqwest::Method::GET, &url, Some("wrong"), None).await;
    assert_eq!(s, 401);
    let (s, list) = call(reqwest::Method::GET, &url, Some(TOKEN), None).await;
    assert_eq!(s, 200);
    let a = &list[0];
    assert_eq!(
        (a["id"].as_str(), a["mode"].as_str()),
        (Some("up"), Some("ctx_pool"))
    );
    assert_eq!(
        (a["enabled"].as_bool(), a["draining"].as_bool()),
        (Some(true), Some(false))
    );
    assert!(
        a["override"].is_null() && a["live"]["open_contexts"].is_u64(),
        "{a}"
    );
    let (s, e) = post(&env, "nobody/disable", None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("account_not_found"))
    );
    let (s, e) = post(&env, "up/mode", Some(json!({"mode": "carrier-pigeon"}))).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_mode"))
    );
    let off = relay("").await;
    let (s, _) = call(reqwest::Method::GET, &admin(&off), Some(TOKEN), None).await;
    assert_eq!(s, 404, "no token configured: no admin API");
}

/// A mode switch mid-session: the running turn finishes on the old transport, the next one
/// uses the new one, and the conversation continues (by replay).
#[tokio::test]
async fn tm3_mode_switch_applies_from_the_next_turn() {
    let env = relay(&format!("admin:\n  token: {TOKEN}\n")).await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 40]] [[mock:fault slow 3ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    let (s, v) = post(&env, "up/mode", Some(json!({"mode": "http"}))).await;
    assert_eq!((s, v["mode"].as_str()), (200, Some("http")), "{v}");
    assert_eq!(v["override"]["mode"], "http");
    let first = read_turn(&mut ws).await;
    assert_eq!(first.last().unwrap()["type"], "response.completed");
    let mut next = create("gpt-test", "after the switch");
    next["previous_response_id"] = json!(response_id(&first));
    send(&mut ws, &next).await;
    let second = read_turn(&mut ws).await;
    assert_eq!(second.last().unwrap()["type"], "response.completed");
    let log = env.mock.log();
    assert_eq!((log.upgrades.len(), log.http_requests), (1, 1));
    let sent = &log.requests.last().unwrap().body;
    assert!(
        sent.get("previous_response_id").is_none(),
        "replayed: {sent}"
    );
    let records = env.records_when(2).await;
    let mut t: Vec<(u64, String)> = records
        .iter()
        .map(|r| (r.seq, r.transport.clone()))
        .collect();
    t.sort();
    assert_eq!(t, vec![(1, "ctx_pool".into()), (2, "http".into())]);
}

/// TM-3, CT-2: a switch to `http` while the session sits between turns, holding the pooled
/// context that has its last response: the next chained turn goes over HTTP as a replay, never
/// with `previous_response_id` (the HTTP upstream has no connection cache: it would answer 400
/// `previous_response_not_found`, a broken chain). Found by the chaos soak.
#[tokio::test]
async fn tm3_a_mode_switch_between_turns_continues_by_replay() {
    let env = relay(&format!("admin:\n  token: {TOKEN}\n")).await;
    let mut ws = env.connect().await;
    let first = turn(&mut ws, "[[mock:text 3]]").await;
    assert!(completed(&first));
    let (s, _) = post(&env, "up/mode", Some(json!({"mode": "http"}))).await;
    assert_eq!(s, 200);
    let mut next = create("gpt-test", "after the switch [[mock:text 3]]");
    next["previous_response_id"] = json!(response_id(&first));
    send(&mut ws, &next).await;
    let second = read_turn(&mut ws).await;
    assert!(completed(&second), "{second:?}");
    let log = env.mock.log();
    let sent = &log.requests.last().unwrap().body;
    assert!(
        sent.get("previous_response_id").is_none(),
        "replayed: {sent}"
    );
    // And back: the pooled context is cold for this session's newest response, so again a
    // replay, not the fast path.
    let url = format!("{}/up/override", admin(&env));
    let (s, _) = call(reqwest::Method::DELETE, &url, Some(TOKEN), None).await;
    assert_eq!(s, 200);
    let mut third = create("gpt-test", "back on the pool [[mock:text 3]]");
    third["previous_response_id"] = json!(response_id(&second));
    send(&mut ws, &third).await;
    assert!(completed(&read_turn(&mut ws).await));
}

/// Disable and drain stop new turns (503 `no_capacity`, the socket stays open); enable and
/// clearing the override bring the account back.
#[tokio::test]
async fn tm3_disable_drain_enable_and_clear() {
    let env = relay(&format!("admin:\n  token: {TOKEN}\n")).await;
    let mut ws = env.connect().await;
    for action in ["disable", "drain"] {
        assert_eq!(post(&env, &format!("up/{action}"), None).await.0, 200);
        send(&mut ws, &create("gpt-test", "hi")).await;
        let e = read_turn(&mut ws).await;
        assert_eq!(
            (e[0]["status"].as_u64(), e[0]["error"]["code"].as_str()),
            (Some(503), Some("no_capacity")),
            "{action}"
        );
        let (s, v) = post(&env, "up/enable", None).await;
        assert_eq!(
            (s, v["enabled"].as_bool(), v["draining"].as_bool()),
            (200, Some(true), Some(false))
        );
        send(&mut ws, &create("gpt-test", "hi")).await;
        assert_eq!(
            read_turn(&mut ws).await.last().unwrap()["type"],
            "response.completed"
        );
    }
    let url = format!("{}/up/override", admin(&env));
    let (s, v) = call(reqwest::Method::DELETE, &url, Some(TOKEN), None).await;
    assert_eq!((s, v["override"].is_null()), (200, true), "{v}");
}

/// A drain closes a passthrough socket with 1012 after its running turn.
#[tokio::test]
async fn tm3_drain_closes_passthrough_sockets_after_their_turn() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n    mode: passthrough\nadmin:\n  token: {TOKEN}\n"
        )
    })
    .await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 40]] [[mock:fault slow 3ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    assert_eq!(post(&env, "up/drain", None).await.0, 200);
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!(end, None, "the running turn finishes: {events:?}");
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1012)));
}

/// Overrides are stored: a relay restarted on the same store has them; the CLI reads and
/// changes them like the API.
#[tokio::test]
async fn tm3_overrides_survive_a_restart_and_the_cli_drives_them() {
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("state.db");
    let yaml = |url: &str| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\nadmin:\n  token: {TOKEN}\n  listen: 127.0.0.1:0\nstore:\n  path: {}\n",
            store.display()
        )
    };
    let first = relay_from(yaml).await;
    assert!(
        first.relay.admin_addr.is_some(),
        "admin.listen binds its own listener"
    );
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("http://{}/admin/v1/accounts", first.relay.addr),
        Some(TOKEN),
        None,
    )
    .await;
    assert_ne!(
        s, 200,
        "not on the client listener when admin.listen is set"
    );
    // The relay runs on this test's runtime: the CLI is awaited, never waited for blocking.
    let cli = |args: &[&str], url: String| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("accounts")
            .arg("--url")
            .arg(url)
            .args(args)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN);
        async move {
            tokio::time::timeout(HANG_GUARD, cmd.output())
                .await
                .expect("hang guard: switchyard accounts")
                .expect("switchyard accounts")
        }
    };
    let url = format!("http://{}", first.relay.admin_addr.unwrap());
    let out = cli(&["mode", "up", "http"], url.clone()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["disable", "up"], url).await;
    assert!(out.status.success());
    drop(first);
    let second = relay_from(yaml).await;
    let out = cli(
        &["list"],
        format!("http://{}", second.relay.admin_addr.unwrap()),
    )
    .await;
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(
        list[0]["override"],
        json!({"mode": "http", "enabled": false}),
        "{list}"
    );
    assert_eq!(
        (list[0]["mode"].as_str(), list[0]["enabled"].as_bool()),
        (Some("http"), Some(false))
    );
    let out = cli(
        &["clear", "up"],
        format!("http://{}", second.relay.admin_addr.unwrap()),
    )
    .await;
    assert!(out.status.success());
    let no_token = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["accounts", "list"])
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(no_token.status.code(), Some(2));
}

/// A passthrough socket keeps its account and mode until it closes: after a switch to http its
/// next turn still goes over its own upstream socket, while a new socket's turn goes over http.
#[tokio::test]
async fn tm3_passthrough_sockets_keep_their_mode_until_they_close() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n    mode: passthrough\nadmin:\n  token: {TOKEN}\n"
        )
    })
    .await;
    let mut old = env.connect().await;
    send(&mut old, &create("gpt-test", "first")).await;
    assert_eq!(
        read_turn(&mut old).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(
        post(&env, "up/mode", Some(json!({"mode": "http"}))).await.0,
        200
    );
    send(&mut old, &create("gpt-test", "second")).await;
    assert_eq!(
        read_turn(&mut old).await.last().unwrap()["type"],
        "response.completed"
    );
    let log = env.mock.log();
    assert_eq!(
        (log.upgrades.len(), log.http_requests),
        (1, 0),
        "still its own socket"
    );
    let mut new = env.connect().await;
    send(&mut new, &create("gpt-test", "third")).await;
    assert_eq!(
        read_turn(&mut new).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(
        env.mock.log().http_requests,
        1,
        "a new socket follows the new mode"
    );
}

/// CT-7 (issue 11's harness, by hand): account `a` produces encrypted reasoning and a tool call,
/// then is disabled; the chained turn goes to `b` by replay without `a`'s reasoning and without
/// the call's id, and `b` (which cannot read `a`'s reasoning) completes it.
#[tokio::test]
async fn ct7_a_replay_to_another_account_drops_foreign_encrypted_reasoning() {
    let opts = switchyard::mock::MockOptions {
        api_keys: vec!["sk-a".into(), "sk-b".into()],
        ..Default::default()
    };
    let mock = switchyard::mock::MockUpstream::start(opts)
        .await
        .expect("mock");
    let env = relay_on(mock, |url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: a\n    base_url: {url}\n    api_key: sk-a\n  - id: b\n    base_url: {url}\n    api_key: sk-b\n    priority: 1\nadmin:\n  token: {TOKEN}\n"
        )
    })
    .await;
    let mut ws = env.connect().await;
    let tool = r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"echo hi"}]]"#;
    send(&mut ws, &create("gpt-test", tool)).await;
    let first = read_turn(&mut ws).await;
    let response = &first.last().unwrap()["response"];
    let call = response["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
        .cloned()
        .expect("a function call");
    assert_eq!(post(&env, "a/disable", None).await.0, 200);
    let next = json!({"type": "response.create", "model": "gpt-test",
        "previous_response_id": response["id"],
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "hi\n"}]});
    send(&mut ws, &next).await;
    let second = read_turn(&mut ws).await;
    assert_eq!(
        second.last().unwrap()["type"],
        "response.completed",
        "{second:?}"
    );
    let log = env.mock.log();
    let sent = log.requests.last().unwrap();
    assert_ne!(
        sent.account, log.requests[0].account,
        "the second turn went to b"
    );
    let input = sent.body["input"].as_array().unwrap();
    assert!(input.iter().all(|i| i["type"] != "reasoning"), "{input:?}");
    let replayed = input
        .iter()
        .find(|i| i["type"] == "function_call")
        .expect("call");
    assert!(replayed.get("id").is_none() && replayed["call_id"] == call["call_id"]);
}
