//! `switchyard usage` end to end: a store built with the library, read by the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use switchyard::usage::store::Store;
use switchyard::usage::{Record, Status, TimingsMs, Tokens};

/// 2025-01-31T00:00:00Z.
const DAY: i64 = 1_738_281_600_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

#[allow(clippy::too_many_arguments)]
fn record(
    id: &str,
    created_ms: i64,
    key: &str,
    account: Option<&str>,
    model: Option<&str>,
    status: Status,
    tokens: [u64; 4],
    cost_usd: Option<f64>,
) -> Record {
    Record {
        request_id: id.to_string(),
        created_ms,
        response_id: Some(format!("resp_{id}")),
        key_id: key.to_string(),
        account_id: account.map(str::to_string),
        session: format!("sess_{key}"),
        seq: 1,
        model: model.map(str::to_string),
        transport: if account.is_some() {
            "ctx_pool"
        } else {
            "none"
        }
        .to_string(),
        warm_up: false,
        status,
        tokens: Tokens {
            input: tokens[0],
            cached_input: tokens[1],
            output: tokens[2],
            reasoning: tokens[3],
        },
        cost_usd,
        estimated: false,
        attempts: u32::from(account.is_some()),
        timings: TimingsMs {
            total: Some(12.5),
            ..TimingsMs::default()
        },
        error_class: None,
        error_side: None,
    }
}

/// Five records around the day 2025-01-31 (UTC), with one on each edge of it.
fn records() -> Vec<Record> {
    let gpt5 = Some("gpt-5");
    let mut failed = record(
        "req_2",
        DAY,
        "k1",
        Some("a1"),
        gpt5,
        Status::Failed,
        [200, 0, 10, 0],
        Some(0.02),
    );
    failed.estimated = true;
    failed.error_class = Some("server_error".to_string());
    failed.error_side = Some("upstream_protocol".to_string());
    vec![
        record(
            "req_1",
            DAY - 1,
            "k1",
            Some("a1"),
            gpt5,
            Status::Completed,
            [100, 40, 20, 5],
            Some(0.01),
        ),
        failed,
        record(
            "req_3",
            DAY + HOUR_MS,
            "k2",
            Some("a2"),
            Some("gpt-5-mini"),
            Status::Completed,
            [50, 10, 5, 1],
            Some(0.003),
        ),
        record(
            "req_4",
            DAY + DAY_MS,
            "k2",
            Some("a2"),
            Some("mystery"),
            Status::Error,
            [30, 0, 0, 0],
            None,
        ),
        record(
            "req_5",
            DAY + DAY_MS + 1,
            "k3",
            None,
            None,
            Status::Rejected,
            [0, 0, 0, 0],
            None,
        ),
    ]
}

/// A temp dir holding `switchyard.db` filled with `records`.
fn store_with(records: &[Record]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.db");
    let mut store = Store::open(&path).expect("open store");
    assert_eq!(store.insert(records).expect("insert"), records.len());
    (dir, path)
}

/// Runs the binary in `cwd` (never the repository, which may hold a real store).
fn usage_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("usage")
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run switchyard")
}

fn usage(store: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--store", store.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    usage_in(store.parent().expect("dir"), &all)
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        stderr(out)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_cost(v: &Value, want: f64) {
    let got = v["cost_usd"].as_f64().expect("cost_usd is a number");
    assert!((got - want).abs() < 1e-9, "cost {got} != {want}");
}

fn row(report: &Value, group: Value) -> &Value {
    report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["group"] == group)
        .unwrap_or_else(|| panic!("no row for {group} in {report}"))
}

#[test]
fn by_key_sums_tokens_costs_and_statuses() {
    let (_dir, path) = store_with(&records());
    let report = json(&usage(&path, &["--by", "key", "--json"]));
    assert_eq!(report["by"], "key");
    assert_eq!(report["rows"].as_array().map(Vec::len), Some(3));
    let k1 = row(&report, "k1".into());
    assert_eq!(k1["requests"], 2);
    assert_eq!(k1["input"], 300);
    assert_eq!(k1["cached_input"], 40);
    assert_eq!(k1["output"], 30);
    assert_eq!(k1["reasoning"], 5);
    assert_eq!(k1["estimated"], 1);
    assert_eq!(k1["unpriced"], 0);
    assert_eq!(
        k1["by_status"],
        serde_json::json!({"completed": 1, "failed": 1})
    );
    assert_cost(k1, 0.03);
    let k2 = row(&report, "k2".into());
    assert_eq!(
        (k2["requests"].as_u64(), k2["input"].as_u64()),
        (Some(2), Some(80))
    );
    assert_eq!(k2["unpriced"], 1);
    assert_cost(k2, 0.003);
    let k3 = row(&report, "k3".into());
    assert_eq!(k3["by_status"], serde_json::json!({"rejected": 1}));
    let total = &report["total"];
    assert_eq!(total["requests"], 5);
    assert_eq!(total["input"], 380);
    assert_eq!(total["unpriced"], 2);
    assert_eq!(total["group"], Value::Null);
    assert_cost(total, 0.033);
    assert_eq!(report["since"], Value::Null);
}

#[test]
fn by_model_puts_records_without_a_model_under_null() {
    let (_dir, path) = store_with(&records());
    let report = json(&usage(&path, &["--by", "model", "--json"]));
    let groups: Vec<&Value> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| &r["group"])
        .collect();
    assert_eq!(
        groups,
        [
            &Value::Null,
            &"gpt-5".into(),
            &"gpt-5-mini".into(),
            &"mystery".into()
        ]
    );
    let gpt5 = row(&report, "gpt-5".into());
    assert_eq!(
        (gpt5["requests"].as_u64(), gpt5["output"].as_u64()),
        (Some(2), Some(30))
    );
    let mystery = row(&report, "mystery".into());
    assert_eq!(
        (mystery["unpriced"].as_u64(), mystery["cost_usd"].as_f64()),
        (Some(1), Some(0.0))
    );
    let by_account = json(&usage(&path, &["--by", "account", "--json"]));
    assert_eq!(row(&by_account, Value::Null)["requests"], 1);
    assert_eq!(row(&by_account, "a2".into())["requests"], 2);
}

#[test]
fn since_is_inclusive_and_until_exclusive() {
    let (_dir, path) = store_with(&records());
    let day = json(&usage(
        &path,
        &["--since", "2025-01-31", "--until", "2025-02-01", "--json"],
    ));
    assert_eq!(day["since"], "2025-01-31T00:00:00Z");
    assert_eq!(day["until_ms"], DAY + DAY_MS);
    // req_2 sits exactly on --since, req_4 exactly on --until.
    assert_eq!(day["total"]["requests"], 2);
    assert_eq!(day["total"]["input"], 250);
    assert_eq!(
        day["total"]["by_status"],
        serde_json::json!({"completed": 1, "failed": 1})
    );
    let last_ms = json(&usage(
        &path,
        &[
            "--since",
            "2025-01-30T23:59:59.999Z",
            "--until",
            "2025-01-31T00:00:00Z",
            "--json",
        ],
    ));
    assert_eq!(last_ms["total"]["requests"], 1);
    assert_eq!(last_ms["total"]["input"], 100);
    let after = json(&usage(&path, &["--since", "2025-02-01", "--json"]));
    assert_eq!(after["total"]["requests"], 2);
    assert_eq!(after["rows"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_duration_counts_back_from_now() {
    let now = switchyard::usage::now_ms();
    let mut recent = records();
    recent.push(record(
        "req_now",
        now - 10 * 60_000,
        "k9",
        None,
        None,
        Status::Shutdown,
        [7, 0, 0, 0],
        None,
    ));
    let (_dir, path) = store_with(&recent);
    let hour = json(&usage(&path, &["--since", "1h", "--by", "key", "--json"]));
    assert_eq!(hour["total"]["requests"], 1);
    assert_eq!(row(&hour, "k9".into())["input"], 7);
    let before = json(&usage(&path, &["--until", "1h", "--json"]));
    assert_eq!(before["total"]["requests"], 5);
}

#[test]
fn records_prints_one_json_record_per_line_in_time_order() {
    let all = records();
    let (_dir, path) = store_with(&all);
    let out = usage(&path, &["--records", "--since", "2025-01-31"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<Record> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a record"))
        .collect();
    assert_eq!(lines, all[1..]);
}

#[test]
fn the_text_table_ends_with_a_total_line() {
    let (_dir, path) = store_with(&records());
    let out = usage(&path, &["--by", "key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains(&path.display().to_string()), "{text}");
    assert!(
        lines[1].starts_with("key") && lines[1].contains("requests"),
        "{text}"
    );
    assert!(lines.iter().any(|l| l.starts_with("k1 ")), "{text}");
    let total = lines
        .iter()
        .find(|l| l.starts_with("total"))
        .expect("a total line");
    let cells: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(
        cells[..9],
        ["total", "5", "380", "50", "35", "6", "0.033000", "1", "2"],
        "{text}"
    );
    assert!(
        total.contains("completed=2") && total.contains("rejected=1"),
        "{text}"
    );
    assert!(text.contains("2 request(s) have no cost"), "{text}");
    let plain = stdout(&usage(&path, &[]));
    assert_eq!(
        plain.lines().filter(|l| l.starts_with("total")).count(),
        1,
        "{plain}"
    );
}

#[test]
fn a_bad_time_or_grouping_exits_2() {
    let (_dir, path) = store_with(&records());
    let out = usage(&path, &["--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--since") && stderr(&out).contains("YYYY-MM-DD"),
        "{}",
        stderr(&out)
    );
    let out = usage(&path, &["--until", "2025-02-30"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = usage(&path, &["--since", "2025-02-01", "--until", "2025-01-01"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = usage(&path, &["--by", "colour"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_missing_store_exits_1_naming_it_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.db");
    let out = usage(&path, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&path.display().to_string()),
        "{}",
        stderr(&out)
    );
    assert!(!path.exists());
    let out = usage_in(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("switchyard.db"), "{}", stderr(&out));
    assert!(!dir.path().join("switchyard.db").exists());
}

#[test]
fn the_default_store_is_in_the_current_directory() {
    let (dir, _path) = store_with(&records());
    let report = json(&usage_in(dir.path(), &["--json"]));
    assert_eq!(report["total"]["requests"], 5);
}

#[test]
fn config_store_path_names_the_store() {
    let (dir, path) = store_with(&records());
    let config = dir.path().join("relay.yaml");
    let yaml = format!(
        "store:\n  path: {}\n",
        serde_json::to_string(&path).expect("path")
    );
    std::fs::write(&config, yaml).expect("write config");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let config_arg = config.to_str().expect("utf-8");
    let report = json(&usage_in(
        elsewhere.path(),
        &["--config", config_arg, "--json", "--by", "account"],
    ));
    assert_eq!(report["total"]["requests"], 5);
    // --store wins over the config.
    let missing = elsewhere.path().join("other.db");
    let out = usage_in(
        elsewhere.path(),
        &[
            "--config",
            config_arg,
            "--store",
            missing.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("other.db"), "{}", stderr(&out));
    std::fs::write(&config, "store:\n  paht: x.db\n").expect("write config");
    let out = usage_in(elsewhere.path(), &["--config", config_arg]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("relay.yaml"), "{}", stderr(&out));
}
