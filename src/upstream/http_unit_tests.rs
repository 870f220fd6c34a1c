//! The `http` transport's parts without a network: the body reader over scripted chunks
//! (TP-2, CT-9), the request it builds (HS-5), error bodies (CT-11) and the synthetic warm-up
//! (CT-5).

use serde_json::json;

use super::tests::{create, dump, eventually, GUARD};
use super::*;

#[test]
fn ct11_error_bodies_of_every_shape() {
    let e = upstream_error(
        503,
        br#"{"error":{"type":"weird_error","code":null,"message":"busy"}}"#,
        None,
    );
    assert_eq!(
        (e.status, e.kind, e.code.as_str(), e.message.as_str()),
        (503, "server_error", "upstream_error", "busy")
    );
    let e = upstream_error(
        400,
        br#"{"error":{"code":"websocket_connection_limit_reached"}}"#,
        None,
    );
    assert_eq!(e.retry, Retry::BeforeOutput);
    let e = upstream_error(404, b"", None);
    assert_eq!(
        (e.status, e.kind, e.message.as_str()),
        (404, "invalid_request_error", "upstream answered 404")
    );
    let e = upstream_error(403, br#"{"error":{"type":"permission_error","code":"unsupported_country","message":"no","param":"model"}}"#, Some("1".into()));
    assert_eq!(
        (e.kind, e.param.as_deref(), e.retry_after.as_deref()),
        ("permission_error", Some("model"), Some("1"))
    );
}

/// The body reader over scripted chunks: byte-exact data, backpressure, EOF rules.
fn chunks(parts: &[&str]) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    let owned: Vec<Result<Bytes, std::io::Error>> = parts
        .iter()
        .map(|p| Ok(Bytes::copy_from_slice(p.as_bytes())))
        .collect();
    futures::stream::iter(owned)
}

async fn read_all(parts: &[&str]) -> (ReadEnd, Vec<String>) {
    let (tx, mut rx) = mpsc::channel(64);
    let end = read_events(&mut chunks(parts), &tx, 1 << 20).await;
    drop(tx);
    let mut got = Vec::new();
    while let Some(UpFrame::Event(t)) = rx.recv().await {
        got.push(t.to_string());
    }
    (end, got)
}

#[tokio::test]
async fn tm1_reader_keeps_bytes_and_stops_at_the_terminal() {
    let created = r#"{"type":"response.created",  "spacing":"kept"}"#;
    let done = r#"{"type":"response.completed","response":{}}"#;
    let parts = [
        "event: response.created\r\ndata: ",
        created,
        "\r\n\r\n: ping\n\nevent: response.completed\ndata: ",
        done,
        "\n\nevent: late\ndata: {\"type\":\"late\"}\n\n",
    ];
    let (end, got) = read_all(&parts).await;
    assert_eq!(end, ReadEnd::Terminal);
    assert_eq!(got, [created, done]);
}

/// CT-9: EOF without a terminal is a lost upstream; a whole last event without its blank line
/// still counts, a cut-off one is dropped; `[DONE]` is not an event.
#[tokio::test]
async fn ct9_reader_end_of_body_rules() {
    let (end, got) = read_all(&["data: {\"type\":\"response.in_progress\"}\n\n"]).await;
    assert!(matches!(end, ReadEnd::Lost(UpEnd::Io(_))));
    assert_eq!(got.len(), 1);
    let (end, got) = read_all(&["data: {\"type\":\"error\",\"code\":\"x\"}"]).await;
    assert_eq!((end, got.len()), (ReadEnd::Terminal, 1));
    let (end, got) =
        read_all(&["data: {\"type\":\"a\"}\n\ndata: {\"type\":\"response.compl"]).await;
    assert!(matches!(end, ReadEnd::Lost(UpEnd::Io(_))));
    assert_eq!(got, [r#"{"type":"a"}"#]);
    let (end, got) = read_all(&["data: [DONE]\n\n"]).await;
    assert!(matches!(end, ReadEnd::Lost(UpEnd::Io(_))));
    assert!(got.is_empty());
}

#[tokio::test]
async fn tm1_reader_oversized_event_and_broken_body() {
    let (tx, _rx) = mpsc::channel(4);
    let big = format!("data: {}\n\n", "x".repeat(100));
    let end = read_events(&mut chunks(&[&big]), &tx, 64).await;
    assert_eq!(end, ReadEnd::Lost(UpEnd::TooBig));
    let broken = futures::stream::iter(vec![
        Ok(Bytes::from_static(b"data: {\"type\":\"a\"}\n\n")),
        Err(std::io::Error::other("connection reset")),
    ]);
    let end = read_events(&mut Box::pin(broken), &tx, 64).await;
    assert!(
        matches!(&end, ReadEnd::Lost(UpEnd::Io(m)) if m.contains("connection reset")),
        "{end:?}"
    );
}

/// TP-2: with a full channel the reader waits; a receiver that leaves ends it quietly.
#[tokio::test]
async fn tp2_reader_waits_for_room_and_notices_the_receiver_leaving() {
    let (tx, mut rx) = mpsc::channel(1);
    let parts = ["data: {\"type\":\"a\"}\n\ndata: {\"type\":\"b\"}\n\ndata: {\"type\":\"c\"}\n\n"];
    let reader = tokio::spawn(async move { read_events(&mut chunks(&parts), &tx, 1 << 20).await });
    let first = tokio::time::timeout(GUARD, rx.recv())
        .await
        .expect("hang guard");
    assert!(matches!(first, Some(UpFrame::Event(t)) if t == r#"{"type":"a"}"#));
    // `b` takes the one slot; `c` waits for room, so the reader cannot be done.
    eventually(|| rx.len() == 1).await;
    assert!(!reader.is_finished());
    drop(rx);
    let end = tokio::time::timeout(GUARD, reader)
        .await
        .expect("hang guard")
        .expect("join");
    assert_eq!(end, ReadEnd::Gone);
}

#[test]
fn hs5_request_body_and_headers() {
    let body: Value =
        serde_json::from_slice(&request_body(create("x")).expect("body")).expect("json");
    assert_eq!(body["stream"], true);
    assert!(body.get("type").is_none() && body.get("generate").is_none());
    let mut account = AccountConfig::new("a", "http://h/v1", "sk-1");
    account.headers.insert("OpenAI-Beta".into(), "x".into());
    let h = request_headers(&account, &Identity::default()).expect("headers");
    assert!(h.get("openai-beta").is_none());
    assert_eq!(
        h.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer sk-1")
    );
}

/// CT-5 (§3): the two synthetic warm-up frames, exactly.
#[test]
fn ct5_synthetic_warmup_frames() {
    let mut req = create("hi");
    req.insert("generate".into(), json!(false));
    req.insert(
        "tools".into(),
        json!([{"type": "function", "name": "f", "parameters": {}, "strict": false}]),
    );
    req.insert("parallel_tool_calls".into(), json!(false));
    let [a, b] = synthetic_warmup(&req);
    assert!(a.starts_with(r#"{"type":"response.created","sequence_number":0,"#));
    assert!(b.starts_with(r#"{"type":"response.completed","sequence_number":1,"#));
    let (a, b): (Value, Value) = (
        serde_json::from_str(&a).expect("a"),
        serde_json::from_str(&b).expect("b"),
    );
    let (ra, rb) = (&a["response"], &b["response"]);
    let id = ra["id"].as_str().expect("id");
    assert!(
        id.starts_with("resp_sy_")
            && id.len() > 20
            && id[8..].bytes().all(|c| c.is_ascii_hexdigit())
    );
    assert_eq!(rb["id"], ra["id"]);
    assert_eq!(
        (&ra["status"], &rb["status"]),
        (&json!("in_progress"), &json!("completed"))
    );
    assert!(ra["created_at"].as_u64().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(ra["model"], "gpt-test");
    assert_eq!(
        (&ra["object"], &ra["output"]),
        (&json!("response"), &json!([]))
    );
    assert_eq!(ra["tools"], req["tools"]);
    assert_eq!(
        (&ra["tool_choice"], &ra["parallel_tool_calls"]),
        (&json!("auto"), &json!(false))
    );
    assert!(ra["usage"].is_null());
    assert_eq!(
        rb["usage"],
        json!({"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
               "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": 0})
    );
    let mut expect = ra.clone();
    expect["status"] = json!("completed");
    expect["usage"] = rb["usage"].clone();
    assert_eq!(&expect, rb, "R' is R with status and usage");
    dump("unit_http_warmup", &[a.clone(), b.clone()]);

    // Defaults when the request leaves them out.
    let [a, _] = synthetic_warmup(&create("hi"));
    let a: Value = serde_json::from_str(&a).expect("a");
    assert_eq!(
        (
            &a["response"]["tools"],
            &a["response"]["tool_choice"],
            &a["response"]["parallel_tool_calls"]
        ),
        (&json!([]), &json!("auto"), &json!(true))
    );
    assert_ne!(a["response"]["id"], id, "fresh id per warm-up");
}
