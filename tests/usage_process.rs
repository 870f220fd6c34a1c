//! Usage records across the process's life, against the real `switchyard serve` binary:
//! SIGTERM flushes and exits 0, SIGHUP reloads the price table, and records the flushed
//! counter has counted survive `kill -9`.

mod common;

use std::path::{Path, PathBuf};

use common::process::Proc;
use common::*;
use switchyard::usage::store::{Query, Store};
use switchyard::usage::{Record, Status};

/// The relay's flushed-records counter, from `/metrics`.
async fn flushed(relay: &Proc) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", relay.addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find(|l| l.starts_with("switchyard_usage_records_flushed_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Writes a config for one relay in `dir` in front of `mock_url`; returns its path.
fn write_config(dir: &Path, mock_url: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\naccounts:\n  - id: up\n    base_url: {mock_url}\n    api_key: sk-up\nstore:\n  path: {}\n{extra}",
        dir.join("usage.db").display()
    );
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).expect("config");
    path
}

fn read_records(dir: &Path) -> Vec<Record> {
    Store::open(&dir.join("usage.db"))
        .expect("store")
        .records(&Query::default())
        .expect("records")
}

async fn mock() -> switchyard::mock::MockUpstream {
    switchyard::mock::MockUpstream::start(switchyard::mock::MockOptions::default())
        .await
        .expect("mock")
}

/// SIGTERM: the running turn, stalled past `shutdown.drain_timeout`, is cut (`shutdown` record), the client gets 1012, every record is
/// flushed (the interval is an hour, so only the shutdown flush can have written them), exit 0.
#[tokio::test]
async fn us1_sigterm_flushes_every_record_and_exits_0() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let config = write_config(
        dir.path(),
        &mock.base_url(),
        "usage:\n  flush_interval: 1h\nshutdown:\n  drain_timeout: 500ms\n",
    );
    let relay = Proc::start(&config).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    send(&mut ws, &create("gpt-test", "one")).await;
    read_turn(&mut ws).await;
    send(&mut ws, &create("gpt-test", "[[mock:fault stall after=3]]")).await;
    for _ in 0..3 {
        assert!(matches!(next_frame(&mut ws).await, Frame::Event(_)));
    }
    assert_eq!(relay.terminate().await, Some(0));
    assert_eq!(next_frame(&mut ws).await, Frame::Closed(Some(1012)));
    let statuses: Vec<_> = read_records(dir.path()).iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Status::Completed, Status::Shutdown]);
}

/// US-2: SIGHUP reads `usage.prices` again; a broken file keeps the table in force.
#[tokio::test]
async fn us2_sighup_reloads_the_price_table() {
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let prices = dir.path().join("prices.yaml");
    let table = |input: f64| {
        format!("models:\n  gpt-test: {{input: {input}, cached_input: 0.0, output: 0.0}}\n")
    };
    std::fs::write(&prices, table(1.0)).expect("prices");
    let extra = format!("usage:\n  prices: {}\n", prices.display());
    let mut relay = Proc::start(&write_config(dir.path(), &mock.base_url(), &extra)).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    send(&mut ws, &create("gpt-test", "one")).await;
    read_turn(&mut ws).await;
    std::fs::write(&prices, table(3.0)).expect("prices");
    relay.signal("HUP");
    // SIGHUP reads the config file again too (TM-3), then the price table.
    relay.wait_log("config reloaded").await;
    relay.wait_log("prices reloaded").await;
    send(&mut ws, &create("gpt-test", "two")).await;
    read_turn(&mut ws).await;
    std::fs::write(&prices, "models: [").expect("prices");
    relay.signal("HUP");
    relay.wait_log("price reload failed").await;
    send(&mut ws, &create("gpt-test", "three")).await;
    read_turn(&mut ws).await;
    assert_eq!(relay.terminate().await, Some(0));
    let records = read_records(dir.path());
    assert_eq!(records.len(), 3);
    // Output is free in these tables, so cost / input tokens is the input price per token.
    let per_million: Vec<f64> = records
        .iter()
        .map(|r| {
            let cost = r.cost_usd.expect("priced");
            (cost * 1e6 / r.tokens.input as f64 * 1000.0).round() / 1000.0
        })
        .collect();
    assert_eq!(per_million, vec![1.0, 3.0, 3.0]);
}

/// US-1: records the flushed counter has counted are on disk, whatever happens to the
/// process after; a relay restarted on the store sees them.
#[tokio::test]
async fn us1_records_counted_as_flushed_survive_kill_9() {
    const N: u64 = 12;
    let (mock, dir) = (mock().await, tempfile::tempdir().expect("dir"));
    let extra = "usage:\n  flush_interval: 20ms\n";
    let config = write_config(dir.path(), &mock.base_url(), extra);
    let mut relay = Proc::start(&config).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    for i in 0..N {
        send(&mut ws, &create("gpt-test", &format!("turn {i}"))).await;
        read_turn(&mut ws).await;
    }
    tokio::time::timeout(HANG_GUARD, async {
        while flushed(&relay).await < N {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("hang guard: flushed counter never reached N");
    relay.child.start_kill().expect("kill -9");
    relay.child.wait().await.expect("wait");
    let restarted = Proc::start(&config).await;
    let records = read_records(dir.path());
    let mut seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.status == Status::Completed));
    assert_eq!(restarted.terminate().await, Some(0));
}
