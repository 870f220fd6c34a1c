//! `passthrough` accounts (TM-1): one upstream WebSocket per client socket, every frame relayed
//! as it is both ways, close codes included; usage recorded from what the relay peeks.

mod common;

use common::*;
use futures::SinkExt;
use serde_json::{json, Value};
use switchyard::usage::Status;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

async fn passthrough_relay() -> Env {
    relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n    mode: passthrough\n"
        )
    })
    .await
}

/// Frames go across unchanged; chaining works on the socket's own upstream connection; the
/// records carry the upstream's usage and say `passthrough`.
#[tokio::test]
async fn tm1_passthrough_relays_frames_unchanged_and_records_usage() {
    let env = passthrough_relay().await;
    let mut ws = ws_connect_with(&env.ws_url(), KEY, &[("originator", "codex_exec")])
        .await
        .expect("connect");
    // Not the relay's usual field order, and no `type`: the upstream must see these bytes.
    let first = r#"{"input":"hello [[mock:text 6]]","model":"gpt-test","type":"response.create","store":false}"#;
    ws.send(Message::Text(first.into())).await.unwrap();
    let events = read_turn(&mut ws).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let id = response_id(&events);
    let second = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "previous_response_id": id, "input": "again"});
    send(&mut ws, &second).await;
    let events2 = read_turn(&mut ws).await;
    assert_eq!(events2.last().unwrap()["type"], "response.completed");
    let log = env.mock.log();
    assert_eq!(
        log.upgrades.len(),
        1,
        "one upstream socket for the client socket"
    );
    assert_eq!(
        log.upgrades[0]
            .headers
            .get("originator")
            .map(String::as_str),
        Some("codex_exec")
    );
    let raw: Value = serde_json::from_str(first).unwrap();
    assert_eq!(log.requests[0].body, raw);
    assert_eq!(log.requests[1].body["previous_response_id"], json!(id));
    drop(ws);
    let records = env.records_when(2).await;
    assert!(records
        .iter()
        .all(|r| r.transport == "passthrough" && r.status == Status::Completed));
    let usage = &events.last().unwrap()["response"]["usage"];
    let r1 = records.iter().find(|r| r.seq == 1).unwrap();
    assert_eq!(r1.tokens.input, usage["input_tokens"].as_u64().unwrap());
    assert_eq!(r1.tokens.output, usage["output_tokens"].as_u64().unwrap());
    assert!(!r1.estimated);
}

/// The upstream's close code reaches the client; the cut turn is `upstream_lost`, estimated.
#[tokio::test]
async fn tm1_passthrough_forwards_the_upstream_close_code() {
    let env = passthrough_relay().await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create(
            "gpt-test",
            "[[mock:text 30]] [[mock:fault close 1013 after=6]]",
        ),
    )
    .await;
    let (events, end) = read_until_end(&mut ws).await;
    assert_eq!(events.len(), 6, "no frame of the relay's own: {events:?}");
    assert_eq!(end, Some(Frame::Closed(Some(1013))));
    let r = env.records_when(1).await.remove(0);
    assert_eq!(
        (r.status, r.transport.as_str()),
        (Status::UpstreamLost, "passthrough")
    );
    assert!(r.estimated && r.tokens.output > 0);
}

/// The client's close code reaches the upstream; the running turn is `client_cancelled`.
#[tokio::test]
async fn tm1_passthrough_forwards_the_client_close_code() {
    let env = passthrough_relay().await;
    let mut ws = env.connect().await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 300]] [[mock:fault slow 5ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let mock = &env.mock;
    eventually(|| {
        mock.log()
            .client_close_frames
            .iter()
            .any(|(_, code)| *code == Some(4000))
    })
    .await;
    let r = env.records_when(1).await.remove(0);
    assert_eq!(r.status, Status::ClientCancelled);
}

/// HTTP clients of a passthrough account are served as `http` (TM-1).
#[tokio::test]
async fn tm1_http_clients_of_a_passthrough_account_are_served_as_http() {
    let env = passthrough_relay().await;
    let resp = reqwest::Client::new()
        .post(env.http_url("/v1/responses"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-test", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let log = env.mock.log();
    assert_eq!((log.upgrades.len(), log.http_requests), (0, 1));
    assert_eq!(env.records_when(1).await[0].transport, "http");
}
