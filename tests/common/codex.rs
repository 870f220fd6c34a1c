//! Harness for end-to-end tests with the real Codex CLI (DESIGN.md "Tests", the Codex recipe):
//! a scratch `CODEX_HOME` with a custom provider pointing at a base URL, a scratch git
//! directory, `codex exec --json` with a hang guard, and checks of what Codex printed.
//!
//! The binary comes from `SWITCHYARD_CODEX_BIN`, else the path `npm install --prefix .tools
//! @openai/codex@0.169.0` puts it at. Without a binary a test skips with a message, except
//! under `CI`, where it fails: CI must never skip the Codex tests silently.
//! `SWITCHYARD_CODEX_RUST_LOG` becomes Codex's `RUST_LOG` (its log goes to stderr).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;

/// The Codex version the harness is written against (request shapes and JSONL events).
pub const CODEX_VERSION: &str = "0.169.0";

/// Where `npm install --prefix .tools @openai/codex@0.169.0` puts the Linux binary.
pub const DEFAULT_CODEX_BIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.tools/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex"
);

/// A model in Codex 0.169's bundled catalog: an unknown slug (e.g. `gpt-5.1-codex`) works too,
/// but Codex then prints a "Model metadata ... not found" error item and sends fallback
/// request fields instead of the ones it sends for a real model.
pub const CODEX_MODEL: &str = "gpt-5.5";

/// The provider's `env_key`: Codex reads the API key from this variable.
pub const CODEX_KEY_ENV: &str = "SWITCHYARD_TEST_KEY";

/// Far above a normal run (well under a second against the mock): only so a broken build
/// fails instead of hanging.
pub const CODEX_HANG_GUARD: Duration = Duration::from_secs(120);

/// What one `codex exec --json` run printed.
#[derive(Debug)]
pub struct CodexRun {
    /// Every stdout line that is a JSON object, in order.
    pub stdout_jsonl: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
    /// Whether the provider had `supports_websockets = true`.
    pub websockets: bool,
    /// The lines of Codex's session rollout files (`CODEX_HOME/sessions/**.jsonl`): its own
    /// record of the items it received and sent, with `call_id`s (which the JSONL lacks).
    pub rollout: Vec<Value>,
}

impl CodexRun {
    /// The JSONL events of one `type`.
    pub fn events(&self, kind: &str) -> Vec<&Value> {
        self.stdout_jsonl
            .iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// The `item` of every `item.completed` event whose item has this `type`.
    pub fn completed_items(&self, item_type: &str) -> Vec<&Value> {
        self.events("item.completed")
            .into_iter()
            .map(|e| &e["item"])
            .filter(|i| i["type"] == item_type)
            .collect()
    }

    /// The thread id from `thread.started` (also Codex's `prompt_cache_key` and `session-id`).
    pub fn thread_id(&self) -> Option<&str> {
        self.events("thread.started")
            .first()
            .and_then(|e| e["thread_id"].as_str())
    }

    /// Rollout `response_item` payloads of one `type` (`function_call`, `function_call_output`, ...).
    pub fn rollout_items(&self, item_type: &str) -> Vec<&Value> {
        self.rollout
            .iter()
            .filter(|l| l["type"] == "response_item" && l["payload"]["type"] == item_type)
            .map(|l| &l["payload"])
            .collect()
    }

    /// stdout and the end of stderr, for failure messages.
    pub fn summary(&self) -> String {
        let tail: String = {
            let chars: Vec<char> = self.stderr.chars().collect();
            chars[chars.len().saturating_sub(4000)..].iter().collect()
        };
        format!(
            "codex exit: {}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}",
            self.status, self.stdout, tail
        )
    }
}

/// The Codex binary, or `None` after printing why the test is skipped. Panics under `CI`
/// (set to anything) and when `SWITCHYARD_CODEX_BIN` names a missing file.
pub fn codex_bin_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHYARD_CODEX_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SWITCHYARD_CODEX_BIN={} is not a file",
            p.display()
        );
        return Some(p);
    }
    let p = PathBuf::from(DEFAULT_CODEX_BIN);
    if p.is_file() {
        return Some(p);
    }
    let why = format!(
        "no Codex CLI: set SWITCHYARD_CODEX_BIN or run `npm install --prefix .tools @openai/codex@{CODEX_VERSION}` \
         (expected {DEFAULT_CODEX_BIN})"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; CI must not skip the Codex tests");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// `config.toml` for a scratch `CODEX_HOME` (DESIGN.md "Tests").
pub fn codex_config(base_url: &str, websockets: bool) -> String {
    format!(
        r#"model = {model}
model_provider = "switchyard"

[model_providers.switchyard]
name = "Switchyard"
base_url = {base_url}
wire_api = "responses"
env_key = "{CODEX_KEY_ENV}"
supports_websockets = {websockets}
stream_max_retries = 1
request_max_retries = 0
stream_idle_timeout_ms = 20000
"#,
        model = toml_str(CODEX_MODEL),
        base_url = toml_str(base_url),
    )
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Runs `codex exec --json` once against `base_url` (`http://HOST:PORT/v1`), in a scratch git
/// directory with a scratch `CODEX_HOME` and `HOME`, stdin from /dev/null. Panics if Codex
/// cannot start or outlives [`CODEX_HANG_GUARD`] (then it is killed with its process group).
/// Skips nothing: call [`codex_bin_or_skip`] first.
pub async fn run_codex(base_url: &str, api_key: &str, prompt: &str, websockets: bool) -> CodexRun {
    let bin = codex_bin_or_skip("run_codex").expect("codex binary (call codex_bin_or_skip first)");
    run_codex_with(&bin, base_url, api_key, prompt, websockets).await
}

pub async fn run_codex_with(
    bin: &Path,
    base_url: &str,
    api_key: &str,
    prompt: &str,
    websockets: bool,
) -> CodexRun {
    // Under the target dir, not /tmp: Codex refuses to put its helper binaries under a
    // temporary directory and warns about it.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).expect("target tmp dir");
    let scratch = tempfile::Builder::new()
        .prefix("codex-")
        .tempdir_in(root)
        .expect("scratch dir");
    let (codex_home, home, work) = (
        scratch.path().join("codex-home"),
        scratch.path().join("home"),
        scratch.path().join("work"),
    );
    for d in [&codex_home, &home, &work] {
        std::fs::create_dir_all(d).expect("scratch subdir");
    }
    std::fs::write(
        codex_home.join("config.toml"),
        codex_config(base_url, websockets),
    )
    .expect("config.toml");
    git_init(&work, &home);

    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "exec",
        "--skip-git-repo-check",
        "--json",
        "--dangerously-bypass-approvals-and-sandbox",
        prompt,
    ]);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CODEX_") || k.starts_with("OPENAI_") || k == "RUST_LOG" {
            cmd.env_remove(k.as_ref());
        }
    }
    if let Ok(filter) = std::env::var("SWITCHYARD_CODEX_RUST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd.env("CODEX_HOME", &codex_home)
        .env("HOME", &home)
        .env(CODEX_KEY_ENV, api_key)
        .current_dir(&work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = child.id().expect("codex pid");
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));

    let waited = tokio::time::timeout(CODEX_HANG_GUARD, child.wait()).await;
    let hung = waited.is_err();
    let status = match waited {
        Ok(s) => s.expect("wait for codex"),
        Err(_) => {
            // Not reaped yet, so the id is still Codex's: end it and the commands it ran.
            kill_group(pid);
            child.wait().await.expect("wait for killed codex")
        }
    };
    let stdout = collect(stdout).await;
    let stderr = collect(stderr).await;
    let stdout_jsonl = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect();
    let rollout = read_rollout(&codex_home.join("sessions"));
    let run = CodexRun {
        stdout_jsonl,
        stdout,
        stderr,
        status,
        websockets,
        rollout,
    };
    assert!(
        !hung,
        "hang guard: codex still running after {CODEX_HANG_GUARD:?}; killed\n{}",
        run.summary()
    );
    run
}

fn git_init(dir: &Path, home: &Path) {
    let out = std::process::Command::new("git")
        .args(["init", "-q", "."])
        .current_dir(dir)
        .env("HOME", home)
        .output()
        .expect("run git (needed for the scratch repository)");
    assert!(
        out.status.success(),
        "git init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

type Reader = tokio::task::JoinHandle<Vec<u8>>;

fn read_all<R: tokio::io::AsyncRead + Unpin + Send + 'static>(mut r: R) -> Reader {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf).await;
        buf
    })
}

async fn collect(reader: Reader) -> String {
    match tokio::time::timeout(Duration::from_secs(10), reader).await {
        Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        _ => String::from("<output not collected: a pipe stayed open>"),
    }
}

/// SIGKILL to the process group Codex leads (it was spawned with `process_group(0)`).
fn kill_group(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

fn read_rollout(dir: &Path) -> Vec<Value> {
    let mut files = Vec::new();
    collect_jsonl(dir, &mut files);
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn collect_jsonl(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_jsonl(&p, out);
        } else if p.extension().is_some_and(|x| x == "jsonl") {
            out.push(p);
        }
    }
}

/// Checks a run in which the model asked for `exec_command` with `{"cmd":"echo hi"}`: Codex
/// exited 0, ran `echo hi` (output `hi`), answered after it, and printed `turn.completed`
/// without errors; with WebSockets on, nothing says it fell back to HTTP.
pub fn assert_tool_round_trip(run: &CodexRun) {
    let ctx = run.summary();
    assert!(run.status.success(), "codex failed\n{ctx}");
    assert!(!run.stdout_jsonl.is_empty(), "no JSONL on stdout\n{ctx}");
    assert_eq!(
        run.events("turn.completed").len(),
        1,
        "one turn.completed\n{ctx}"
    );
    assert!(run.events("turn.failed").is_empty(), "turn.failed\n{ctx}");
    assert!(
        run.events("error").is_empty(),
        "error events (e.g. stream retries)\n{ctx}"
    );
    assert!(
        run.completed_items("error").is_empty(),
        "error items\n{ctx}"
    );
    if run.websockets {
        for (name, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            assert!(
                !text.to_lowercase().contains("falling back from websocket"),
                "codex fell back from WebSockets ({name})\n{ctx}"
            );
        }
    }
    let pos = |kind: &str, pred: &dyn Fn(&Value) -> bool| {
        run.stdout_jsonl
            .iter()
            .position(|e| e["type"] == kind && pred(&e["item"]))
    };
    let is_echo = |i: &Value| {
        i["type"] == "command_execution"
            && i["command"].as_str().is_some_and(|c| c.contains("echo hi"))
    };
    let started = pos("item.started", &is_echo);
    let done = pos("item.completed", &is_echo)
        .unwrap_or_else(|| panic!("no completed `echo hi` command_execution\n{ctx}"));
    assert!(
        started.is_some_and(|s| s < done),
        "command_execution started before it completed\n{ctx}"
    );
    let cmd = &run.stdout_jsonl[done]["item"];
    assert_eq!(cmd["status"], "completed", "command status\n{ctx}");
    assert_eq!(cmd["exit_code"], 0, "command exit code\n{ctx}");
    assert_eq!(
        cmd["aggregated_output"].as_str().map(str::trim),
        Some("hi"),
        "command output\n{ctx}"
    );
    let answer = pos("item.completed", &|i| i["type"] == "agent_message");
    assert!(
        answer.is_some_and(|a| a > done),
        "an agent_message after the command\n{ctx}"
    );
    let turn_done = run
        .stdout_jsonl
        .iter()
        .position(|e| e["type"] == "turn.completed");
    assert!(
        turn_done.is_some_and(|t| t > done),
        "turn.completed after the command\n{ctx}"
    );
}
