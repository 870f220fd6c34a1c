//! The official `openai` Python SDK against the relay (issue 9's judgement): a non-streaming
//! and a streaming `responses.create` over HTTP, one chained by `previous_response_id` in an
//! HTTP session, and `responses.connect()` over WebSocket. Runs `scripts/sdk_check.py` with the
//! venv's Python (`SWITCHYARD_PYTHON`, set by scripts/test.sh); skipped without it, except in CI.

mod common;

use common::*;

fn python_or_skip(test: &str) -> Option<String> {
    if let Ok(p) = std::env::var("SWITCHYARD_PYTHON") {
        return Some(p);
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    if std::path::Path::new(venv).is_file() {
        return Some(venv.to_string());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: no Python with the openai SDK; run `bash scripts/test.sh --setup-only`"
    );
    eprintln!("{test}: skipped (no SWITCHYARD_PYTHON)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_through_the_relay() {
    let Some(python) = python_or_skip("openai_python_sdk_works_through_the_relay") else {
        return;
    };
    let env = relay("").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sdk_check.py");
    let out = tokio::time::timeout(
        HANG_GUARD,
        tokio::process::Command::new(python)
            .arg(script)
            .arg(format!("http://{}/v1", env.relay.addr))
            .arg(KEY)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("hang guard: sdk_check.py")
    .expect("run sdk_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for step in [
        "\"create\"",
        "\"create_stream\"",
        "\"chained\"",
        "\"connect\"",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    let log = env.mock.log();
    assert_eq!(
        log.requests.len(),
        4,
        "every SDK request reached the upstream once"
    );
    // The chained request went upstream on the fast path, naming the first response.
    let first = &log.stream_ends[0].response_id;
    assert_eq!(
        log.requests[2].body["previous_response_id"].as_str(),
        Some(first.as_str())
    );
    let records = env.records_when(4).await;
    assert_eq!(records.len(), 4);
}
