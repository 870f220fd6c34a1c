//! The HTTP ingress (HS-1 … HS-4) through the real relay, with a real HTTP client.

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use switchyard::usage::Status;

fn body(text: &str, stream: bool) -> Value {
    json!({"model": "gpt-test", "stream": stream, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    ]})
}

fn post(env: &Env, v: &Value, session: Option<&str>) -> reqwest::RequestBuilder {
    let mut r = reqwest::Client::new()
        .post(env.http_url("/v1/responses"))
        .bearer_auth(KEY)
        .json(v);
    if let Some(s) = session {
        r = r.header("session-id", s);
    }
    r
}

async fn sse(resp: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let text = tokio::time::timeout(HANG_GUARD, resp.text())
        .await
        .expect("hang guard: SSE body")
        .expect("body");
    sse_events(&text)
}

/// HS-1: `stream: true` answers SSE with the same events and order as the WS session, each
/// named by its type, the terminal last.
#[tokio::test]
async fn hs1_streaming_request_gets_the_events_as_sse() {
    let env = relay("").await;
    let resp = post(&env, &body("[[mock:text 8]]", true), None)
        .send()
        .await
        .unwrap();
    let events = sse(resp).await;
    let datas: Vec<Value> = events.iter().map(|(_, d)| d.clone()).collect();
    dump("hs1_sse", &datas);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    assert_eq!(events[0].0, "response.created");
    assert_eq!(events.last().unwrap().0, "response.completed");
    assert_eq!(events.iter().filter(|(_, d)| is_terminal(d)).count(), 1);
    let seqs: Vec<u64> = datas
        .iter()
        .map(|d| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    let sent = &env.mock.log().requests[0].body;
    assert_eq!(sent["type"], "response.create");
    assert!(
        sent.get("stream").is_none(),
        "HS-5: no stream field on the WS frame"
    );
}

/// HS-1: without `stream` the answer is the final response object as JSON, 200 also for a
/// failed response; an upstream error keeps its status and comes as `{"error": ...}`.
#[tokio::test]
async fn hs1_non_streaming_answers_the_response_object_or_the_error() {
    let env = relay("").await;
    let resp = post(&env, &body("hello", false), None)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    let failed = post(&env, &body("[[mock:fixture failed]]", false), None)
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 200);
    assert_eq!(failed.json::<Value>().await.unwrap()["status"], "failed");
    let limited = post(
        &env,
        &body("[[mock:fault error 429 rate_limit_exceeded]]", false),
        None,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(limited.status(), 429);
    let e: Value = limited.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded", "{e}");
    assert!(e["error"]["message"].is_string());
}

/// HS-2/HS-3: requests with one session key share a transcript, so `previous_response_id`
/// chains; without a session key it is 400 `previous_response_not_found`, never 5xx.
#[tokio::test]
async fn hs3_previous_response_id_is_served_from_the_http_session() {
    let env = relay("").await;
    let first: Value = post(&env, &body("one", false), Some("conv-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut next = body("two", false);
    next["previous_response_id"] = first["id"].clone();
    let chained = post(&env, &next, Some("conv-1")).send().await.unwrap();
    assert_eq!(chained.status(), 200);
    assert_eq!(
        chained.json::<Value>().await.unwrap()["status"],
        "completed"
    );
    let log = env.mock.log();
    assert_eq!(
        log.upgrades.len(),
        1,
        "the session kept its upstream context"
    );
    assert_eq!(log.requests[1].body["previous_response_id"], first["id"]);
    let alone = post(&env, &next, None).send().await.unwrap();
    assert_eq!(alone.status(), 400);
    let e: Value = alone.json().await.unwrap();
    assert_eq!(e["error"]["code"], "previous_response_not_found");
    assert_eq!(e["error"]["param"], "previous_response_id");
    let other = post(&env, &next, Some("conv-2")).send().await.unwrap();
    assert_eq!(
        other.status(),
        400,
        "another session key has another transcript"
    );
}

/// HS-2: one session key runs one request at a time in arrival order; more than
/// `session.queue_depth` waiting get 409.
#[tokio::test]
async fn hs2_one_session_key_runs_requests_one_at_a_time() {
    let env = relay("session:\n  queue_depth: 1\n").await;
    let slow = post(
        &env,
        &body("[[mock:text 60]] [[mock:fault slow 3ms]]", true),
        Some("k"),
    )
    .send()
    .await
    .unwrap();
    // The first request is running once its headers are here; start its stream reading.
    let mut first = slow.bytes_stream();
    let head = first.next().await.expect("first chunk").unwrap();
    assert!(String::from_utf8_lossy(&head).contains("response.created"));
    let env2 = &env;
    let second = tokio::spawn({
        let req = post(env2, &body("second", false), Some("k"));
        async move { req.send().await.unwrap() }
    });
    // Wait until the second is queued behind the first.
    let app = env.relay.app.clone();
    eventually(move || app.http_sessions.len() == 1).await;
    tokio::task::yield_now().await;
    let third = loop {
        let r = post(&env, &body("third", false), Some("k"))
            .send()
            .await
            .unwrap();
        if r.status() == 409 {
            break r;
        }
        // The second was not queued yet and this one took its place: it completed; retry.
        assert_eq!(r.status(), 200);
    };
    let e: Value = third.json().await.unwrap();
    assert_eq!(e["error"]["code"], "response_in_progress");
    while first.next().await.is_some() {}
    let second = second.await.unwrap();
    assert_eq!(second.status(), 200);
    let texts: Vec<String> = env
        .mock
        .log()
        .requests
        .iter()
        .map(|r| r.body["input"].to_string())
        .collect();
    let at = |needle: &str| texts.iter().position(|t| t.contains(needle));
    assert!(at("mock:text 60").unwrap() < at("second").unwrap());
    // Every request got its record, the refused ones `rejected` (US-1).
    let n = texts.len() as u64 + 1;
    let records = env.records_when(n).await;
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| r.status == Status::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1, "{records:#?}");
    assert_eq!(
        rejected[0].error_class.as_deref(),
        Some("response_in_progress")
    );
}

/// HS-4: a client that leaves mid-stream stops the upstream (TP-4), recorded as
/// `client_cancelled`.
#[tokio::test]
async fn hs4_disconnect_during_sse_stops_the_upstream() {
    let env = relay("").await;
    let resp = post(
        &env,
        &body("[[mock:text 300]] [[mock:fault slow 5ms]]", true),
        Some("d"),
    )
    .send()
    .await
    .unwrap();
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("output_text.delta") {
        let chunk = stream.next().await.expect("chunk").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    let records = env.records_when(1).await;
    assert_eq!(records[0].status, Status::ClientCancelled);
    let mock = &env.mock;
    eventually(|| {
        mock.log()
            .stream_ends
            .iter()
            .any(|s| s.end == "client_closed")
    })
    .await;
    let end = env.mock.log().stream_ends[0].clone();
    assert!(end.sent < end.planned, "{end:?}");
}

/// §3 on SSE: an upstream lost after output ends the stream with the SSE `error` event shape.
#[tokio::test]
async fn hs1_upstream_lost_mid_stream_ends_with_an_sse_error_event() {
    let env = relay("").await;
    let resp = post(
        &env,
        &body("[[mock:text 30]] [[mock:fault close 1011 after=8]]", true),
        None,
    )
    .send()
    .await
    .unwrap();
    let events = sse(resp).await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "upstream_connection_lost", "{last}");
    assert!(last["message"].is_string() && last.get("sequence_number").is_some());
    assert!(
        last.get("error").is_none() && last.get("status").is_none(),
        "SSE shape: {last}"
    );
    let datas: Vec<Value> = events.into_iter().map(|(_, d)| d).collect();
    dump("hs1_sse_error", &datas);
}

/// Auth and bad bodies get OpenAI-shaped JSON errors; every request read gets one record.
#[tokio::test]
async fn hs_auth_and_bad_bodies_are_refused_with_json_errors() {
    let env = relay("").await;
    let client = reqwest::Client::new();
    let none = client
        .post(env.http_url("/v1/responses"))
        .json(&body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.json::<Value>().await.unwrap()["error"]["code"],
        "missing_api_key"
    );
    let bad = client
        .post(env.http_url("/responses"))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let ok = client
        .post(env.http_url("/backend-api/codex/responses"))
        .bearer_auth(KEY)
        .json(&body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let records = env.records_when(1).await;
    assert_eq!(records.len(), 1);
}

/// HS-2: an HTTP session's transcript goes after `session.http_session_ttl` without a request.
#[tokio::test]
async fn hs2_an_idle_http_session_ends_after_its_ttl() {
    let env = relay("session:\n  http_session_ttl: 100ms\n").await;
    let first: Value = post(&env, &body("one", false), Some("short"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(env.relay.app.http_sessions.len(), 1);
    let app = env.relay.app.clone();
    eventually(move || app.http_sessions.is_empty()).await;
    let mut next = body("two", false);
    next["previous_response_id"] = first["id"].clone();
    let late = post(&env, &next, Some("short")).send().await.unwrap();
    assert_eq!(late.status(), 400);
    assert_eq!(
        late.json::<Value>().await.unwrap()["error"]["code"],
        "previous_response_not_found"
    );
}

/// WS-6 for HTTP: a body over `limits.max_client_message_bytes` gets 413 with a JSON error,
/// and no record (no request was read).
#[tokio::test]
async fn hs_oversized_body_gets_413_json() {
    let env =
        relay("limits:\n  max_client_message_bytes: 2048\n  max_transcript_bytes: 2048\n").await;
    let big = body(&"x".repeat(4096), false);
    let resp = post(&env, &big, None).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "request_too_large", "{e}");
    let ok = post(&env, &body("small", false), None)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(env.records_when(1).await.len(), 1);
}

/// SC-6 and HS-2: a key holds at most `concurrent_sockets` HTTP sessions, as it holds at most
/// that many sockets. One more ends the key's least recently used idle session (a request
/// chained on it then gets 400 `previous_response_not_found`, on which Codex resends its full
/// input), never a session with a request running, and never another key's.
#[tokio::test]
async fn sc6_a_key_holds_at_most_concurrent_sockets_http_sessions() {
    let env = relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\n    limits: {{concurrent_sockets: 3}}\n  - id: other\n    key: sy-other\naccounts:\n  - id: up\n    base_url: {url}\n    api_key: sk-up\n"
        )
    })
    .await;
    let ask = |key: &'static str, session: String, v: Value| {
        reqwest::Client::new()
            .post(env.http_url("/v1/responses"))
            .bearer_auth(key)
            .header("session-id", session)
            .json(&v)
            .send()
    };
    let first = |key, s: &str| ask(key, s.to_string(), body("hi [[mock:text 2]]", false));
    let chain = |key, s: &str, id: &Value| {
        let mut v = body("again [[mock:text 2]]", false);
        v["previous_response_id"] = id.clone();
        ask(key, s.to_string(), v)
    };
    let id_of =
        |r: reqwest::Response| async move { r.json::<Value>().await.unwrap()["id"].clone() };
    let other = id_of(first("sy-other", "o").await.unwrap()).await;
    let mut ids = Vec::new();
    for k in 0..6 {
        ids.push(id_of(first(KEY, &format!("s{k}")).await.unwrap()).await);
        assert_eq!(
            env.relay.app.http_sessions.len(),
            1 + (k + 1).min(3),
            "after s{k}"
        );
    }
    // A request running on s5 keeps it: three new sessions end s3 and s4, and then the third
    // finds no idle one to end and goes over rather than cut a running request.
    let busy = ask(
        KEY,
        "s5".into(),
        body("[[mock:text 60]] [[mock:fault slow 20ms]]", false),
    );
    let busy = tokio::spawn(busy);
    eventually(|| env.mock.log().requests.len() == 8).await;
    for k in 6..9 {
        first(KEY, &format!("s{k}")).await.unwrap();
    }
    let busy = id_of(busy.await.unwrap().unwrap()).await;
    let gone = chain(KEY, "s0", &ids[0]).await.unwrap();
    assert_eq!(gone.status(), 400);
    assert_eq!(
        gone.json::<Value>().await.unwrap()["error"]["code"],
        "previous_response_not_found"
    );
    assert_eq!(
        chain(KEY, "s5", &busy).await.unwrap().status(),
        200,
        "the busy session stayed"
    );
    assert_eq!(
        chain("sy-other", "o", &other).await.unwrap().status(),
        200,
        "another key's stayed"
    );
}
