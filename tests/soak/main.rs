//! The chaos soak: seeded, bounded, sized by environment variables. Hundreds of sessions run
//! their turns (text, tool calls, warm-ups, every fault the mock knows, preemptions, client
//! drops) against the real relay over three upstream accounts (two pooled WebSocket, one
//! `http`), while a monkey makes the accounts fail and, with the Redis backend, restarts Redis
//! mid-run. Throughout: one terminal per accepted request (or preempted, or the client left),
//! no tool output without its call (the mock refuses one with a 400 the client would see),
//! the right answer for each request. At the end: exactly one usage record per
//! `response.create`, nothing left (sessions, slots, leases, held contexts, connection tasks,
//! sockets), and the live heap — counted by a counting allocator in this test binary — back
//! near where it started; RSS is printed too.
//!
//! Size: `SWITCHYARD_SOAK_TURNS` (turns in all, default 5000), `SWITCHYARD_SOAK_SESSION_TURNS`
//! (the most one session runs, default 20), `SWITCHYARD_SOAK_PARALLEL` (sessions at once,
//! default 24), `SWITCHYARD_SOAK_SEED` (default 7).

#[path = "../common/mod.rs"]
mod common;

mod client;
mod monkey;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::redis::RedisServer;
use common::*;
use switchyard::mock::{MockOptions, MockUpstream};
use tokio_util::sync::CancellationToken;

/// Counts live heap bytes of everything in this binary: the relay, the mocks and the clients.
#[global_allocator]
static HEAP: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// The two soaks share one heap counter, so they run one after the other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ACCOUNTS: [(&str, &str); 3] = [("a", "ctx_pool"), ("b", "ctx_pool"), ("c", "http")];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The relay's config: short deadlines so faults resolve quickly, breakers that recover fast.
fn config(mocks: &[MockUpstream], state: &str) -> String {
    let mut yaml = format!(
        "listen: 127.0.0.1:0
keys:
  - id: test
    key: {KEY}
    limits: {{concurrent_turns: 1000, concurrent_sockets: 1000}}
admin:
  token: {}
upstream:
  retry_budget: 3
  ping_interval: 200ms
  pong_timeout: 500ms
  stream_idle_timeout: 1s
  dial_timeout: 2s
  ws_fallback_cooldown: 1s
scheduler:
  breaker_failures: 5
  breaker_cooldown: 300ms
session:
  admission_timeout: 2s
  cancel_grace: 500ms
{state}accounts:
",
        common::multi::TOKEN
    );
    for ((id, mode), mock) in ACCOUNTS.iter().zip(mocks) {
        yaml.push_str(&format!(
            "  - id: {id}\n    base_url: {}\n    api_key: sk-{id}\n    mode: {mode}\n    max_conns: 12\n    concurrency: 12\n",
            mock.base_url()
        ));
    }
    yaml
}

struct Sizes {
    turns: u64,
    session_turns: u64,
    parallel: usize,
    seed: u64,
}

impl Sizes {
    fn from_env() -> Sizes {
        Sizes {
            turns: env_or("SWITCHYARD_SOAK_TURNS", 5000),
            session_turns: env_or("SWITCHYARD_SOAK_SESSION_TURNS", 20),
            parallel: env_or("SWITCHYARD_SOAK_PARALLEL", 24) as usize,
            seed: env_or("SWITCHYARD_SOAK_SEED", 7),
        }
    }
}

/// Runs sessions until the turns are spent; returns (sessions, `response.create`s).
async fn drive(shared: &client::Shared, sizes: &Sizes) -> (u64, u64) {
    let mut running = tokio::task::JoinSet::new();
    let (mut sessions, mut creates) = (0, 0);
    while shared.turns_left.load(Ordering::Relaxed) > 0 {
        if running.len() >= sizes.parallel {
            creates += running
                .join_next()
                .await
                .expect("a session")
                .expect("session task");
            continue;
        }
        let seed = sizes.seed.wrapping_mul(1_000_003).wrapping_add(sessions);
        running.spawn(client::session(shared.clone(), seed, sessions));
        sessions += 1;
    }
    while let Some(n) = running.join_next().await {
        creates += n.expect("session task");
    }
    (sessions, creates)
}

async fn soak(backend: &str) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let sizes = Sizes::from_env();
    // One `once=` registry for the three mocks: a fault scripted once fires once per turn,
    // wherever the relay moves it.
    let opts = MockOptions::default();
    let mut mocks = Vec::new();
    for _ in ACCOUNTS {
        mocks.push(MockUpstream::start(opts.clone()).await.expect("mock"));
    }
    let redis = (backend == "redis").then(RedisServer::start);
    let state = match &redis {
        Some(r) => format!(
            "state:\n  backend: redis\n  redis_url: {}\n  redis_prefix: soak\n  lease_ttl: 3s\n",
            r.url()
        ),
        None => String::new(),
    };
    let cfg = config(&mocks, &state);
    let env = relay_on_many(mocks, &cfg).await;
    let heap_start = HEAP.allocated();
    let rss_start = rss_kib();
    eprintln!(
        "soak ({backend}): {} turns, at most {} per session, {} at a time, seed {}",
        sizes.turns, sizes.session_turns, sizes.parallel, sizes.seed
    );
    let shared = client::Shared {
        url: format!("ws://{}/v1/responses", env.relay.addr),
        turns_left: Arc::new(AtomicI64::new(sizes.turns as i64)),
        max_turns: sizes.session_turns,
        tally: client::Tally::default(),
    };
    let target = monkey::Target {
        accounts: ACCOUNTS
            .iter()
            .zip(&env.mocks)
            .map(|((id, _), m)| (id.to_string(), m.state.clone()))
            .collect(),
        relay: env.relay.addr.to_string(),
        redis,
    };
    let stop = CancellationToken::new();
    let monkey = tokio::spawn(target.run(sizes.seed, stop.clone(), 20));
    let started = Instant::now();
    let (sessions, creates) = drive(&shared, &sizes).await;
    let took = started.elapsed();
    stop.cancel();
    let (acts, target) = monkey.await.expect("monkey");
    target.calm().await;
    let rss_peak = rss_kib();
    eprintln!(
        "soak ({backend}): {sessions} sessions, {creates} requests in {:.1} s; the monkey acted {} times",
        took.as_secs_f64(),
        acts.len()
    );
    print_tally(&shared.tally, &acts);
    assert!(
        backend != "redis" || acts.contains(&"redis restarted empty"),
        "Redis was restarted mid-run"
    );
    check_records(&env.records_when(creates).await, creates);
    leak_check(&env).await;
    let heap_end = settle(&env).await;
    let rss_end = rss_kib();
    eprintln!(
        "soak ({backend}): live heap {} KiB at the start, {} KiB at the end; RSS {rss_start} -> {rss_peak} (after the run) -> {rss_end} KiB",
        heap_start / 1024,
        heap_end / 1024
    );
    assert!(
        heap_end < heap_start + HEAP_SLACK,
        "the live heap is back near its start: {heap_start} -> {heap_end} bytes"
    );
    drop(target);
}

/// What the heap may hold more at the end than at the start: allocator-visible caches that
/// grow once (metric series, the scheduler's averages, pooled buffers), not per turn.
const HEAP_SLACK: usize = 4 << 20;

/// The relay with three mocks (one per account).
struct Soak {
    mocks: Vec<MockUpstream>,
    relay: switchyard::server::Running,
    _dir: tempfile::TempDir,
}

async fn relay_on_many(mocks: Vec<MockUpstream>, yaml: &str) -> Soak {
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = switchyard::config::Config::from_yaml_str(yaml).expect("config");
    cfg.store.path = dir.path().join("usage.db");
    let relay = switchyard::server::spawn(cfg).await.expect("relay");
    Soak {
        mocks,
        relay,
        _dir: dir,
    }
}

impl Soak {
    async fn records_when(&self, n: u64) -> Vec<switchyard::usage::Record> {
        let usage = self.relay.app.usage.clone();
        eventually(move || usage.recorded() >= n).await;
        usage_records(&self.relay).await
    }
}

async fn usage_records(relay: &switchyard::server::Running) -> Vec<switchyard::usage::Record> {
    relay.app.usage.flush().await.expect("usage flush");
    let store =
        switchyard::usage::store::Store::open(&relay.app.cfg().store.path).expect("the store");
    store
        .records(&switchyard::usage::store::Query::default())
        .expect("records")
}

fn print_tally(tally: &client::Tally, acts: &[&str]) {
    for ((action, outcome), n) in tally.lock().iter() {
        eprintln!("  {action:?} -> {outcome:?}: {n}");
    }
    let mut by_act: BTreeMap<&str, u64> = BTreeMap::new();
    for a in acts {
        *by_act.entry(a).or_default() += 1;
    }
    eprintln!("  monkey: {by_act:?}");
}

/// US-1: one record per `response.create`, unique ids, gapless sequence numbers per session;
/// no tool output ever reached an upstream without its call.
fn check_records(records: &[switchyard::usage::Record], creates: u64) {
    assert_eq!(
        records.len() as u64,
        creates,
        "one record per response.create"
    );
    let ids: HashSet<_> = records.iter().map(|r| &r.request_id).collect();
    assert_eq!(ids.len(), records.len(), "request ids are unique");
    let mut seqs: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in records {
        seqs.entry(r.session.as_str()).or_default().push(r.seq);
    }
    for (s, mut v) in seqs {
        v.sort_unstable();
        assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "session {s}");
    }
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    eprintln!("  records by status {by_status:?}");
}

/// Nothing is left once every client is gone: sessions, turn and socket slots (leases with
/// Redis), held contexts, connection tasks; the relay's open upstream sockets are the mock's.
async fn leak_check(env: &Soak) {
    let app = env.relay.app.clone();
    eventually(move || app.sessions.is_empty()).await;
    for scope in ["account:a:turns", "account:b:turns", "account:c:turns"]
        .into_iter()
        .map(str::to_string)
        .chain(["key:test:turns".into(), "key:test:sockets".into()])
    {
        let state = env.relay.app.state.clone();
        let s = scope.clone();
        until(&format!("no slot held in {scope}"), move || {
            let (state, s) = (state.clone(), s.clone());
            async move { state.held(&s).await.expect("slots") == 0 }
        })
        .await;
    }
    let pool = env.relay.app.pool.clone();
    eventually(move || {
        let c = pool.counts();
        c.held == 0 && c.in_turn == 0 && c.tasks == c.open
    })
    .await;
    // Deaf connections stay open at the mock until told to close: close every one, and every
    // relay connection and its task must end with them.
    for m in &env.mocks {
        m.close_all(1001);
    }
    let pool = env.relay.app.pool.clone();
    eventually(move || {
        let c = pool.counts();
        c.open == 0 && c.tasks == 0
    })
    .await;
    let mocks: Vec<_> = env.mocks.iter().map(|m| m.state.clone()).collect();
    eventually(move || mocks.iter().all(|m| m.snapshot().open_connections == 0)).await;
}

/// Empties the mocks' logs (they keep every request) and returns the live heap once it has
/// stopped falling.
async fn settle(env: &Soak) -> usize {
    for m in &env.mocks {
        m.state.reset();
    }
    let mut last = HEAP.allocated();
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = HEAP.allocated();
        if now >= last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_memory_backend_keeps_every_invariant() {
    soak("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_redis_backend_survives_a_redis_restart() {
    soak("redis").await;
}
