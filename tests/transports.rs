//! Every ingress with every transport (TM-1, TM-2): a WebSocket or HTTP client, served by a
//! `ctx_pool` or an `http` account. Each pair runs a warm-up (forwarded on WebSocket accounts,
//! answered by the relay on `http` ones, CT-5), a chained tool round trip, and a chained turn
//! after the upstream lost its connections (replayed by the relay, CT-2).

mod common;

use common::*;
use serde_json::{json, Value};
use switchyard::usage::Status;

#[derive(Debug, Clone, Copy)]
enum Ingress {
    Ws,
    Http,
}

/// A client of either ingress that returns each turn's final `response` object.
enum Client {
    Ws(Box<Ws>),
    Http(reqwest::Client, String),
}

impl Client {
    async fn new(env: &Env, ingress: Ingress) -> Client {
        match ingress {
            Ingress::Ws => Client::Ws(Box::new(env.connect().await)),
            Ingress::Http => Client::Http(reqwest::Client::new(), env.http_url("/v1/responses")),
        }
    }

    async fn turn(&mut self, mut req: Value) -> Value {
        match self {
            Client::Ws(ws) => {
                req["type"] = json!("response.create");
                send(ws, &req).await;
                let events = read_turn(ws).await;
                let last = events.last().expect("terminal").clone();
                assert_eq!(last["type"], "response.completed", "{last}");
                last["response"].clone()
            }
            Client::Http(client, url) => {
                let resp = client
                    .post(url.as_str())
                    .bearer_auth(KEY)
                    .header("session-id", "table")
                    .json(&req)
                    .send()
                    .await
                    .expect("POST");
                assert_eq!(resp.status(), 200);
                resp.json().await.expect("JSON")
            }
        }
    }
}

fn request(prev: Option<&str>, input: Value) -> Value {
    let mut r = json!({"model": "gpt-test", "store": false, "input": input});
    if let Some(p) = prev {
        r["previous_response_id"] = json!(p);
    }
    r
}

fn user(text: &str) -> Value {
    json!([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}])
}

async fn pair(ingress: Ingress, mode: &str) {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n    mode: {mode}\n"
        )
    })
    .await;
    let ctx = format!("{ingress:?} x {mode}");
    let http = mode == "http" || mode == "passthrough" && matches!(ingress, Ingress::Http);
    let mut client = Client::new(&env, ingress).await;
    // Warm-up.
    let mut warm = request(None, user("hello"));
    warm["generate"] = json!(false);
    let w = client.turn(warm).await;
    assert_eq!(w["status"], "completed", "{ctx}");
    let warm_id = w["id"].as_str().expect("id").to_string();
    assert_eq!(warm_id.starts_with("resp_sy_"), http, "{ctx}: {warm_id}");
    assert_eq!(env.mock.log().requests.len(), usize::from(!http), "{ctx}");
    // A tool call chained from the warm-up, then its output chained from the call.
    let tool = r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"echo hi"}]]"#;
    let r1 = client.turn(request(Some(&warm_id), user(tool))).await;
    let call = r1["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
        .cloned()
        .unwrap_or_else(|| panic!("{ctx}: no function_call in {r1}"));
    let out =
        json!([{"type": "function_call_output", "call_id": call["call_id"], "output": "hi\n"}]);
    let r2 = client.turn(request(r1["id"].as_str(), out)).await;
    assert_eq!(r2["status"], "completed", "{ctx}");
    let sent = env
        .mock
        .log()
        .requests
        .last()
        .expect("request")
        .body
        .clone();
    let items = sent["input"].as_array().cloned().unwrap_or_default();
    if http || sent.get("previous_response_id").is_none() {
        let at = |t: &str| items.iter().position(|i| i["type"] == t);
        let (c, o) = (at("function_call"), at("function_call_output"));
        assert!(
            c.is_some() && c < o,
            "{ctx}: the call is replayed before its output: {sent}"
        );
        assert!(
            at("reasoning").is_some(),
            "{ctx}: same account, reasoning kept"
        );
    }
    if http {
        assert!(sent.get("previous_response_id").is_none(), "{ctx}: {sent}");
        assert_eq!(sent["stream"], true, "{ctx}");
        assert!(
            sent.get("type").is_none() && sent.get("generate").is_none(),
            "{ctx}"
        );
    }
    if mode == "passthrough" && matches!(ingress, Ingress::Ws) {
        // No recovery on a passthrough socket: the chain lived on its own upstream connection.
        assert_eq!(env.mock.log().upgrades.len(), 1, "{ctx}");
        let records = env.records_when(3).await;
        assert!(
            records.iter().all(|r| r.transport == "passthrough"),
            "{ctx}"
        );
        return;
    }
    // The upstream loses every connection: the next chained turn is replayed.
    env.mock.close_all(1012);
    let r3 = client
        .turn(request(r2["id"].as_str(), user("after the loss")))
        .await;
    assert_eq!(r3["status"], "completed", "{ctx}");
    let sent = env
        .mock
        .log()
        .requests
        .last()
        .expect("request")
        .body
        .clone();
    assert!(
        sent.get("previous_response_id").is_none(),
        "{ctx}: replayed: {sent}"
    );
    let text = sent["input"].to_string();
    assert!(
        text.contains("hello") && text.contains("echo hi"),
        "{ctx}: whole transcript"
    );
    let records = env.records_when(4).await;
    let want = if http { "http" } else { "ctx_pool" };
    assert!(
        records
            .iter()
            .all(|r| r.status == Status::Completed && r.transport == want),
        "{ctx}: {records:#?}"
    );
}

#[tokio::test]
async fn tm2_ws_client_on_a_ctx_pool_account() {
    pair(Ingress::Ws, "ctx_pool").await;
}

#[tokio::test]
async fn tm2_ws_client_on_an_http_account() {
    pair(Ingress::Ws, "http").await;
}

#[tokio::test]
async fn tm2_http_client_on_a_ctx_pool_account() {
    pair(Ingress::Http, "ctx_pool").await;
}

#[tokio::test]
async fn tm2_http_client_on_an_http_account() {
    pair(Ingress::Http, "http").await;
}

#[tokio::test]
async fn tm2_ws_client_on_a_passthrough_account() {
    pair(Ingress::Ws, "passthrough").await;
}

/// HTTP clients of a passthrough account are served as `http` (TM-1).
#[tokio::test]
async fn tm2_http_client_on_a_passthrough_account_is_served_as_http() {
    pair(Ingress::Http, "passthrough").await;
}

/// `upstream.force_http` sends a `ctx_pool` account's turns over HTTP (TM-1).
#[tokio::test]
async fn tm1_force_http_makes_every_account_http() {
    let env = relay("upstream:\n  force_http: true\n").await;
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "[[mock:text 4]]")).await;
    let events = read_turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let log = env.mock.log();
    assert_eq!((log.upgrades.len(), log.http_requests), (0, 1));
    assert_eq!(env.records_when(1).await[0].transport, "http");
}

/// §3/HS-5 across shapes: an `http` account's upstream refusing the request with an HTTP status
/// reaches a WebSocket client as an error frame with that `status`, and an HTTP client as that
/// status with the `{"error": ...}` body; both are `error` records on the upstream's side. A
/// 401 refuses the account's credential, which disables it (UP-8): later turns get 503.
#[tokio::test]
async fn hs5_upstream_http_errors_keep_their_status_on_both_ingresses() {
    let opts = switchyard::mock::MockOptions {
        api_keys: vec!["sk-right".into()],
        ..Default::default()
    };
    let mock = switchyard::mock::MockUpstream::start(opts)
        .await
        .expect("mock");
    let env = relay_on(mock, |url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-wrong\n    mode: http\n"
        )
    })
    .await;
    let post = || {
        reqwest::Client::new()
            .post(env.http_url("/v1/responses"))
            .bearer_auth(KEY)
            .json(&json!({"model": "gpt-test", "input": "hi"}))
            .send()
    };
    // The request's own fault (a 400) leaves the account alone, on both ingresses.
    env.mock.set_outage(Some((400, None)));
    let resp = post().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "mock_handshake_fault", "{body}");
    let mut ws = env.connect().await;
    send(&mut ws, &create("gpt-test", "hi")).await;
    let e = &read_turn(&mut ws).await[0];
    assert_eq!(
        (e["status"].as_u64(), e["error"]["code"].as_str()),
        (Some(400), Some("mock_handshake_fault")),
        "{e}"
    );
    env.mock.set_outage(None);
    send(&mut ws, &create("gpt-test", "hi")).await;
    let frames = read_turn(&mut ws).await;
    let e = &frames[0];
    assert_eq!(
        (e["type"].as_str(), e["status"].as_u64()),
        (Some("error"), Some(401)),
        "{e}"
    );
    assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
    let records = env.records_when(3).await;
    for r in &records {
        assert_eq!(r.status, Status::Error);
        assert_eq!(r.error_side.as_deref(), Some("upstream_protocol"));
    }
    let resp = post().await.unwrap();
    assert_eq!(
        resp.status(),
        503,
        "UP-8: the refused credential disabled the account"
    );
    assert!(!env.relay.app.registry.enabled("up"));
}

/// §3/HS-5: an SSE `error` event inside a 200 stream reaches a WebSocket client as the WS error
/// frame; its status is 500 unless the code is one CT-11 reports as 400 or 429.
#[tokio::test]
async fn hs5_sse_error_events_become_ws_error_frames() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n    mode: http\n"
        )
    })
    .await;
    let mut ws = env.connect().await;
    for (fault, status, kind) in [
        ("error 429 rate_limit_exceeded", 429, "rate_limit_error"),
        ("error 500 server_error", 500, "server_error"),
    ] {
        send(
            &mut ws,
            &create("gpt-test", &format!("[[mock:fault {fault}]]")),
        )
        .await;
        let events = read_turn(&mut ws).await;
        let e = events.last().unwrap();
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["status"], status, "{e}");
        assert_eq!(e["error"]["type"], kind, "{e}");
        assert!(
            e["error"]["code"].is_string() && e.get("code").is_none(),
            "WS shape: {e}"
        );
    }
}
