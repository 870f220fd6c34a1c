//! End-to-end tests with the real Codex CLI (DESIGN.md "Tests"): Codex runs `echo hi` for a
//! model that asks for it and sends the tool output back, over WebSocket and over HTTP/SSE.
//! Here against the mock upstream directly, which pins down what Codex sends (SPEC §1).

#[path = "common/codex.rs"]
mod harness;

use harness::*;
use serde_json::{json, Value};
use switchyard::mock::{MockLog, MockOptions, MockUpstream};

const PROMPT: &str = r#"[[mock:tool exec_command {"cmd":"echo hi"}]]"#;
const KEY: &str = "sk-codex-e2e";

async fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions::default())
        .await
        .expect("mock")
}

fn input(body: &Value) -> &[Value] {
    body["input"].as_array().map_or(&[], Vec::as_slice)
}

fn items_of<'a>(body: &'a Value, kind: &str) -> Vec<&'a Value> {
    input(body).iter().filter(|i| i["type"] == kind).collect()
}

/// Text of the last user message of a request.
fn last_user_text(body: &Value) -> Option<String> {
    let msg = input(body)
        .iter()
        .rev()
        .find(|i| i["type"] == "message" && i["role"] == "user")?;
    let parts = msg["content"].as_array()?;
    Some(
        parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The single `exec_command` call Codex recorded receiving: its `call_id`.
fn echo_call_id(run: &CodexRun) -> String {
    let calls = run.rollout_items("function_call");
    assert_eq!(
        calls.len(),
        1,
        "one function_call in Codex's rollout\n{}",
        run.summary()
    );
    let call = calls[0];
    assert_eq!(call["name"], "exec_command");
    let args: Value =
        serde_json::from_str(call["arguments"].as_str().unwrap_or("")).expect("arguments JSON");
    assert_eq!(args, json!({"cmd": "echo hi"}));
    call["call_id"].as_str().expect("call_id").to_string()
}

fn dump_log(log: &MockLog) -> String {
    let bodies: Vec<Value> = log
        .requests
        .iter()
        .map(|r| {
            let mut b = r.body.clone();
            if let Some(o) = b.as_object_mut() {
                o.remove("tools");
                o.insert(
                    "input".into(),
                    json!(input(&r.body)
                        .iter()
                        .map(|i| &i["type"])
                        .collect::<Vec<_>>()),
                );
            }
            json!({"conn": r.conn, "body": b})
        })
        .collect();
    serde_json::to_string_pretty(
        &json!({"upgrades": log.upgrades.len(), "http": log.http_requests,
        "requests": bodies, "ends": log.stream_ends}),
    )
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_tool_round_trip_against_the_mock_directly() {
    let Some(bin) = codex_bin_or_skip("codex_tool_round_trip_against_the_mock_directly") else {
        return;
    };
    let m = mock().await;
    let run = run_codex_with(&bin, &m.base_url(), KEY, PROMPT, true).await;
    assert_codex_ws_thread(&run, &m.log(), true);
}

/// What the upstream must see of one Codex thread over WebSocket, directly or through the
/// relay: one upgrade, a warm-up, chained requests, the tool output alone after its call.
fn assert_codex_ws_thread(run: &CodexRun, log: &MockLog, direct: bool) {
    let ctx = format!("{}\n--- mock ---\n{}", run.summary(), dump_log(log));
    assert_tool_round_trip(run);

    // One socket for the whole thread, nothing over HTTP.
    assert_eq!(log.upgrades.len(), 1, "one WebSocket upgrade\n{ctx}");
    assert_eq!(log.refused_upgrades, 0, "{ctx}");
    assert_eq!(log.http_requests, 0, "no HTTP requests\n{ctx}");
    let up = &log.upgrades[0];
    assert_eq!(up.path, "/v1/responses", "{ctx}");
    let h = |k: &str| up.headers.get(k).map(String::as_str);
    assert!(
        h("openai-beta").is_some_and(|v| v.contains("responses_websockets=")),
        "OpenAI-Beta\n{ctx}"
    );
    assert_eq!(h("originator"), Some("codex_exec"), "{ctx}");
    let thread = run.thread_id().expect("thread.started");
    // Through the relay only the identity headers of SPEC WS-7 reach the upstream.
    let same_as_thread: &[&str] = if direct {
        &["session-id", "thread-id", "x-client-request-id"]
    } else {
        &["session-id", "thread-id"]
    };
    for &k in same_as_thread {
        assert_eq!(h(k), Some(thread), "{k} is the thread id\n{ctx}");
    }

    // Warm-up first, then each request chains from the previous response on the socket.
    let reqs = &log.requests;
    assert!(reqs.len() >= 3, "warm-up, prompt, tool output\n{ctx}");
    assert!(
        reqs.iter()
            .all(|r| r.conn == up.conn && r.body["type"] == "response.create"),
        "{ctx}"
    );
    assert_eq!(
        reqs[0].body["generate"], false,
        "first request is a generate:false warm-up\n{ctx}"
    );
    assert!(reqs[0].body.get("previous_response_id").is_none(), "{ctx}");
    assert_eq!(log.stream_ends.len(), reqs.len(), "{ctx}");
    assert!(
        log.stream_ends.iter().all(|e| e.end == "completed"),
        "{ctx}"
    );
    for (i, r) in reqs.iter().enumerate().skip(1) {
        assert_eq!(r.body["store"], false, "{ctx}");
        assert_eq!(
            r.body["previous_response_id"].as_str(),
            Some(log.stream_ends[i - 1].response_id.as_str()),
            "request {i} chains from response {}\n{ctx}",
            i - 1
        );
    }
    assert_eq!(
        last_user_text(&reqs[1].body).as_deref(),
        Some(PROMPT),
        "the prompt is the last user message\n{ctx}"
    );

    // The tool output goes back alone, chained to the response that asked for it.
    let call_id = echo_call_id(run);
    let (i, out_req) = reqs
        .iter()
        .enumerate()
        .find(|(_, r)| !items_of(&r.body, "function_call_output").is_empty())
        .unwrap_or_else(|| panic!("a request with a function_call_output\n{ctx}"));
    assert!(i >= 2, "{ctx}");
    let outputs = items_of(&out_req.body, "function_call_output");
    assert_eq!(
        input(&out_req.body).len(),
        1,
        "only the new item is sent\n{ctx}"
    );
    assert_eq!(
        outputs[0]["call_id"].as_str(),
        Some(call_id.as_str()),
        "call_id matches the call\n{ctx}"
    );
    assert!(
        outputs[0]["output"]
            .as_str()
            .is_some_and(|o| o.contains("hi")),
        "{ctx}"
    );
    let answer = run.completed_items("agent_message");
    assert!(
        answer[0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("The tool returned:")),
        "{ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_tool_round_trip_over_http_against_the_mock() {
    let Some(bin) = codex_bin_or_skip("codex_tool_round_trip_over_http_against_the_mock") else {
        return;
    };
    let m = mock().await;
    let run = run_codex_with(&bin, &m.base_url(), KEY, PROMPT, false).await;
    let log = m.log();
    let ctx = format!("{}\n--- mock ---\n{}", run.summary(), dump_log(&log));
    assert_tool_round_trip(&run);

    assert!(
        log.upgrades.is_empty() && log.refused_upgrades == 0,
        "no WebSocket\n{ctx}"
    );
    assert!(
        log.http_requests >= 2,
        "prompt and tool output over HTTP\n{ctx}"
    );
    assert_eq!(log.http_requests as usize, log.requests.len(), "{ctx}");
    for r in &log.requests {
        for k in ["type", "generate", "previous_response_id"] {
            assert!(r.body.get(k).is_none(), "HTTP body without {k}\n{ctx}");
        }
        assert_eq!(r.body["stream"], true, "{ctx}");
        assert_eq!(
            last_user_text(&r.body).as_deref(),
            Some(PROMPT),
            "full input every time\n{ctx}"
        );
    }
    // Without chaining, the follow-up replays the call next to its output.
    let call_id = echo_call_id(&run);
    let last = &log.requests.last().expect("requests").body;
    let calls = items_of(last, "function_call");
    let outputs = items_of(last, "function_call_output");
    assert_eq!(calls.len(), 1, "{ctx}");
    assert_eq!(outputs.len(), 1, "{ctx}");
    assert_eq!(
        calls[0]["call_id"].as_str(),
        Some(call_id.as_str()),
        "{ctx}"
    );
    assert_eq!(
        outputs[0]["call_id"].as_str(),
        Some(call_id.as_str()),
        "{ctx}"
    );
    assert!(
        log.stream_ends.iter().all(|e| e.end == "completed"),
        "{ctx}"
    );
}

/// A relay with the key `relay-key` in front of `m` as one account of `mode`, its store in a
/// temporary directory (kept alive by the second value).
async fn relay_for_codex(
    m: &switchyard::mock::MockUpstream,
    mode: &str,
) -> (switchyard::server::Running, tempfile::TempDir) {
    let store = tempfile::tempdir().expect("store dir");
    let yaml = format!(
        "listen: 127.0.0.1:0\nkeys:\n  - id: codex\n    key: relay-key\naccounts:\n  - id: up\n    base_url: {}\n    api_key: {KEY}\n    mode: {mode}\n    max_conns: 4\nstore:\n  path: {}\n",
        m.base_url(),
        store.path().join("usage.db").display()
    );
    let cfg = switchyard::config::Config::from_yaml_str(&yaml).expect("config");
    let relay = switchyard::server::spawn(cfg).await.expect("relay");
    (relay, store)
}

/// Issue 3's acceptance: Codex completes a tool round trip through the relay (configured with
/// the SPEC §2 keys) over one upgrade, without falling back to HTTP; the upstream sees exactly
/// what Codex would have sent it directly (WS-1, WS-7, CT-1, CT-5, TP-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_tool_round_trip_through_the_relay() {
    let Some(bin) = codex_bin_or_skip("codex_tool_round_trip_through_the_relay") else {
        return;
    };
    let m = mock().await;
    let (relay, _store) = relay_for_codex(&m, "ctx_pool").await;
    let run = run_codex_with(
        &bin,
        &format!("http://{}/v1", relay.addr),
        "relay-key",
        PROMPT,
        true,
    )
    .await;
    assert_codex_ws_thread(&run, &m.log(), false);
    let up = &m.log().upgrades[0];
    assert!(
        !up.headers.contains_key("authorization"),
        "the mock log never keeps it"
    );
    assert_eq!(
        up.headers.get("originator").map(String::as_str),
        Some("codex_exec"),
        "WS-7 identity headers"
    );
}

/// Issue 9: Codex with `supports_websockets = false` completes a tool round trip over the
/// relay's HTTP/SSE ingress (HS-1, HS-2); the relay bridges to a pooled upstream WebSocket
/// (HS-5, TM-2): the upstream sees `response.create` frames, never `stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_tool_round_trip_over_http_through_the_relay() {
    let Some(bin) = codex_bin_or_skip("codex_tool_round_trip_over_http_through_the_relay") else {
        return;
    };
    let m = mock().await;
    let (relay, _store) = relay_for_codex(&m, "ctx_pool").await;
    let run = run_codex_with(
        &bin,
        &format!("http://{}/v1", relay.addr),
        "relay-key",
        PROMPT,
        false,
    )
    .await;
    let log = m.log();
    let ctx = format!("{}\n--- mock ---\n{}", run.summary(), dump_log(&log));
    assert_tool_round_trip(&run);
    assert!(
        log.http_requests == 0,
        "bridged to WebSocket upstream\n{ctx}"
    );
    assert!(log.requests.len() >= 2, "prompt and tool output\n{ctx}");
    for r in &log.requests {
        assert_eq!(r.body["type"], "response.create", "{ctx}");
        assert!(
            r.body.get("stream").is_none(),
            "HS-5: no stream on a frame\n{ctx}"
        );
    }
    let call_id = echo_call_id(&run);
    let last = &log.requests.last().expect("requests").body;
    let outputs = items_of(last, "function_call_output");
    assert_eq!(outputs.len(), 1, "{ctx}");
    assert_eq!(
        outputs[0]["call_id"].as_str(),
        Some(call_id.as_str()),
        "{ctx}"
    );
    assert!(
        log.stream_ends.iter().all(|e| e.end == "completed"),
        "{ctx}"
    );
}

/// Issue 9: Codex over WebSocket to the relay, its turns going to an `http` account (TM-2): the
/// relay builds the WS events from the upstream's SSE, answers the warm-up itself (CT-5) and
/// replays the chain (CT-2), and Codex never falls back from WebSockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_over_ws_with_turns_on_an_http_account() {
    let Some(bin) = codex_bin_or_skip("codex_over_ws_with_turns_on_an_http_account") else {
        return;
    };
    let m = mock().await;
    let (relay, _store) = relay_for_codex(&m, "http").await;
    let run = run_codex_with(
        &bin,
        &format!("http://{}/v1", relay.addr),
        "relay-key",
        PROMPT,
        true,
    )
    .await;
    let log = m.log();
    let ctx = format!("{}\n--- mock ---\n{}", run.summary(), dump_log(&log));
    assert_tool_round_trip(&run);
    assert!(log.upgrades.is_empty(), "no upstream WebSocket\n{ctx}");
    assert!(
        log.http_requests >= 2,
        "prompt and tool output over HTTP\n{ctx}"
    );
    for r in &log.requests {
        assert_eq!(r.body["stream"], true, "{ctx}");
        for k in ["type", "generate", "previous_response_id"] {
            assert!(r.body.get(k).is_none(), "HTTP body without {k}\n{ctx}");
        }
    }
    let call_id = echo_call_id(&run);
    let last = &log.requests.last().expect("requests").body;
    let calls = items_of(last, "function_call");
    let outputs = items_of(last, "function_call_output");
    assert_eq!(calls.len(), 1, "the call is replayed\n{ctx}");
    assert_eq!(
        outputs[0]["call_id"].as_str(),
        Some(call_id.as_str()),
        "{ctx}"
    );
}

/// The same against `switchyard serve` with no config: the embedded mock upstream and the
/// printed dev key are enough for Codex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_tool_round_trip_through_the_embedded_default() {
    use tokio::io::AsyncBufReadExt;
    let Some(bin) = codex_bin_or_skip("codex_tool_round_trip_through_the_embedded_default") else {
        return;
    };
    let cwd = tempfile::tempdir().expect("cwd");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchyard serve");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut addr, mut key, mut mock_url) = (None, None, None);
    while addr.is_none() || key.is_none() || mock_url.is_none() {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("hang guard: banner")
            .expect("read banner")
            .expect("banner ended early");
        if let Some(a) =
            line.strip_prefix("switchyard: no --config given; serving the embedded default on ")
        {
            addr = Some(a.trim().to_string());
        } else if let Some(k) = line.strip_prefix("dev key (printed once): ") {
            key = Some(k.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("upstream: the built-in mock at ") {
            mock_url = rest.split_whitespace().next().map(str::to_string);
        }
    }
    let (addr, key, mock_url) = (addr.unwrap(), key.unwrap(), mock_url.unwrap());
    let run = run_codex_with(&bin, &format!("http://{addr}/v1"), &key, PROMPT, true).await;
    let log_url = mock_url.replace("/v1", "/__mock/log");
    let log: Value = reqwest::get(&log_url)
        .await
        .expect("mock log")
        .json()
        .await
        .expect("json");
    let log: MockLogView = serde_json::from_value(log).expect("log shape");
    assert_tool_round_trip(&run);
    assert_eq!(
        log.upgrades.len(),
        1,
        "one upstream upgrade for the whole thread"
    );
    assert_eq!(log.http_requests, 0);
    assert!(log.requests.len() >= 3, "warm-up, prompt, tool output");
    let _ = child.kill().await;
}

#[derive(serde::Deserialize)]
struct MockLogView {
    upgrades: Vec<Value>,
    http_requests: u64,
    requests: Vec<Value>,
}
