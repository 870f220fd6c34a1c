//! SC-7: several relay instances on one Redis behave as one. Two instances (two `App`s in this
//! process, or the real binary where a crash is the point) share a key's concurrency, RPM and
//! budget, a stored response's account, breakers and overrides; `kill -9` of one frees its
//! slots within `state.lease_ttl`; a Redis outage leaves both serving, degraded, and its return
//! restores sharing.

mod common;

use std::time::Duration;

use common::process::Proc;
use common::redis::{prefix, slow_proxy, RedisServer, SHARED_URL};
use common::*;
use serde_json::{json, Value};
use switchyard::mock::{MockOptions, MockUpstream};
use switchyard::server::Running;

const LIM: &str = "sy-shared-lim";
const TOKEN: &str = "adm-shared";

/// A relay instance on the shared state at `redis_url`/`prefix`, with keys `test` (no limits)
/// and `lim` (`limits`), `accounts` (YAML list items) and `extra`, and a store of its own.
struct Instance {
    relay: Running,
    _dir: tempfile::TempDir,
}

fn config(redis_url: &str, prefix: &str, limits: &str, accounts: &str, store: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\n  - id: lim\n    key: {LIM}\n    limits: {{{limits}}}\nadmin:\n  token: {TOKEN}\nstate:\n  backend: redis\n  redis_url: {redis_url}\n  redis_prefix: \"{prefix}\"\n  lease_ttl: 2s\nstore:\n  path: {store}\naccounts:\n{accounts}"
    )
}

async fn instance(redis_url: &str, prefix: &str, limits: &str, accounts: &str) -> Instance {
    instance_with(redis_url, prefix, limits, accounts, "").await
}

/// As [`instance`], with `extra` YAML at the top level.
async fn instance_with(
    redis_url: &str,
    prefix: &str,
    limits: &str,
    accounts: &str,
    extra: &str,
) -> Instance {
    let dir = tempfile::tempdir().expect("dir");
    let store = dir.path().join("state.db");
    let yaml = extra.to_string()
        + &config(
            redis_url,
            prefix,
            limits,
            accounts,
            &store.display().to_string(),
        );
    let cfg = switchyard::config::Config::from_yaml_str(&yaml).expect("config");
    let relay = switchyard::server::spawn(cfg).await.expect("relay");
    Instance { relay, _dir: dir }
}

fn account(id: &str, mock: &MockUpstream, more: &str) -> String {
    format!(
        "  - id: {id}\n    base_url: {}\n    api_key: sk-{id}\n{more}",
        mock.base_url()
    )
}

async fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions::default())
        .await
        .expect("mock")
}

impl Instance {
    fn ws_url(&self) -> String {
        format!("ws://{}/v1/responses", self.relay.addr)
    }

    async fn lim(&self) -> Ws {
        ws_connect(&self.ws_url(), LIM).await
    }

    async fn test_key(&self) -> Ws {
        ws_connect(&self.ws_url(), KEY).await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.relay.addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("get");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    async fn post(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("http://{}{path}", self.relay.addr))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn account(&self, id: &str) -> Value {
        let (_, body) = self.get("/admin/v1/accounts").await;
        let all: Vec<Value> = serde_json::from_str(&body).expect("accounts");
        all.into_iter().find(|a| a["id"] == id).expect("account")
    }

    async fn degraded(&self) -> bool {
        let (status, body) = self.get("/readyz").await;
        assert_eq!(status, 200, "ready even when degraded");
        body.contains("degraded")
    }
}

fn limited(events: &[Value]) -> bool {
    events.last().is_some_and(|e| {
        e["type"] == "error" && e["status"] == 429 && e["error"]["code"] == "rate_limit_exceeded"
    })
}

/// Starts a turn that the mock stalls after its lifecycle events: it holds its slots until the
/// socket goes.
async fn stalled_turn(ws: &mut Ws) {
    send(ws, &create("gpt-test", "[[mock:fault stall]]")).await;
    match next_frame(ws).await {
        Frame::Event(e) => assert_eq!(e["type"], "response.created"),
        other => panic!("the stalled turn did not start: {other:?}"),
    }
}

/// Tries turns as `lim` on `inst` until one completes (bounded by the hang guard).
async fn until_admitted(inst: &Instance) {
    let mut ws = inst.lim().await;
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            let t = turn(&mut ws, "again").await;
            if completed(&t) {
                return;
            }
            assert!(limited(&t), "only the limit may refuse: {t:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("hang guard: never admitted again");
}

/// SC-7 with SC-6: one key's concurrent turns, requests per minute and daily budget, counted
/// once across two instances, over WS and HTTP.
#[tokio::test]
async fn sc7_two_instances_enforce_one_keys_concurrency_rpm_and_budget_together() {
    let p = prefix("limits");
    let up = mock().await;
    let accounts = account("up", &up, "");
    let (a, b) = (
        instance(SHARED_URL, &p, "concurrent_turns: 1", &accounts).await,
        instance(SHARED_URL, &p, "concurrent_turns: 1", &accounts).await,
    );
    // Concurrency: a turn running on `a` holds the key's one place on `b` too.
    let mut held = a.lim().await;
    stalled_turn(&mut held).await;
    let mut other = b.lim().await;
    assert!(limited(&turn(&mut other, "meanwhile").await));
    let (status, _) = b
        .post(
            "/v1/responses",
            LIM,
            &json!({"model": "gpt-test", "input": "x"}),
        )
        .await;
    assert_eq!(status, 429);
    drop(held);
    until_admitted(&b).await;
    drop((a, b));

    // Requests per minute: three on either instance, then both refuse.
    let p = prefix("rpm");
    let (a, b) = (
        instance(SHARED_URL, &p, "rpm: 3", &accounts).await,
        instance(SHARED_URL, &p, "rpm: 3", &accounts).await,
    );
    let (mut wa, mut wb) = (a.lim().await, b.lim().await);
    assert!(completed(&turn(&mut wa, "1").await));
    assert!(completed(&turn(&mut wb, "2").await));
    let (status, _) = a
        .post(
            "/v1/responses",
            LIM,
            &json!({"model": "gpt-test", "input": "3"}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(limited(&turn(&mut wb, "4").await));
    assert!(limited(&turn(&mut wa, "5").await));
    drop((wa, wb, a, b));

    // Budget: what `a` spent is `b`'s to refuse.
    let p = prefix("budget");
    let limits = "daily_budget_usd: 0.000001";
    let (a, b) = (
        instance(SHARED_URL, &p, limits, &accounts).await,
        instance(SHARED_URL, &p, limits, &accounts).await,
    );
    let mut wa = a.lim().await;
    send(&mut wa, &create("gpt-5", "[[mock:text 30]]")).await;
    assert!(completed(&read_turn(&mut wa).await));
    // The charge is written in the background: wait until the shared counter has it.
    let name = switchyard::limits::periods::spend_name(
        "lim",
        switchyard::limits::periods::Period::Day,
        switchyard::limits::periods::now_utc(),
    );
    let state = b.relay.app.state.clone();
    let minute = Duration::from_secs(60);
    until("the spend reaching redis", || async {
        state.counter_add(&name, 0, minute).await.unwrap() > 0
    })
    .await;
    let mut wb = b.lim().await;
    send(&mut wb, &create("gpt-5", "more")).await;
    assert!(limited(&read_turn(&mut wb).await), "b refuses on a's spend");
    let (status, _) = b
        .post(
            "/v1/responses",
            LIM,
            &json!({"model": "gpt-5", "input": "x"}),
        )
        .await;
    assert_eq!(status, 429);
}

/// SC-7 with CT-3: a `store:true` response made through one instance is chained from through
/// the other, on its account, though that instance would choose another account by itself.
#[tokio::test]
async fn sc7_a_stored_response_from_one_instance_chains_on_the_other_on_its_account() {
    let p = prefix("stored");
    let (ma, mb) = (mock().await, mock().await);
    let first = format!(
        "{}{}",
        account("a", &ma, "    priority: 0\n"),
        account("b", &mb, "    priority: 1\n")
    );
    let reversed = format!(
        "{}{}",
        account("a", &ma, "    priority: 1\n"),
        account("b", &mb, "    priority: 0\n")
    );
    // `one` reaches Redis over a slow link: its binding must still be there before its client
    // can chain from `two`.
    let slow = slow_proxy(6379, Duration::from_millis(300)).await;
    let (one, two) = (
        instance(&format!("redis://127.0.0.1:{slow}"), &p, "", &first).await,
        instance(SHARED_URL, &p, "", &reversed).await,
    );
    let (mut ws, mut id) = (one.test_key().await, String::new());
    for round in 0..3 {
        let mut req = create("gpt-test", &format!("remember {round}"));
        req["store"] = json!(true);
        send(&mut ws, &req).await;
        let made = read_turn(&mut ws).await;
        assert!(completed(&made));
        id = response_id(&made);
        let mut ws2 = two.test_key().await;
        let mut next = create("gpt-test", "and now?");
        next["previous_response_id"] = json!(id);
        send(&mut ws2, &next).await;
        let chained = read_turn(&mut ws2).await;
        assert!(completed(&chained), "round {round}: {chained:?}");
    }
    let (status, body) = two
        .post(
            "/v1/responses",
            KEY,
            &json!({"model": "gpt-test", "input": "and over http?", "previous_response_id": id}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ma.log().requests.len(), 7, "all on a");
    assert!(mb.log().requests.is_empty(), "b never asked");
    let chained = &ma.log().requests[5];
    assert_eq!(chained.body["previous_response_id"], json!(id));
    // Another instance's unbound id is still unknown.
    let mut ws3 = two.test_key().await;
    let mut bad = create("gpt-test", "x");
    bad["previous_response_id"] = json!("resp_unknown");
    send(&mut ws3, &bad).await;
    let refused = read_turn(&mut ws3).await;
    assert_eq!(
        refused.last().unwrap()["error"]["code"],
        "previous_response_not_found"
    );
}

/// SC-7 with SC-5 and TM-3: a breaker opened on one instance keeps the other off the account,
/// and an operator's disable through one instance holds on the other.
#[tokio::test]
async fn sc7_breakers_and_overrides_are_shared() {
    let p = prefix("health");
    let (ma, mb) = (mock().await, mock().await);
    let accounts = format!(
        "{}{}",
        account("a", &ma, "    priority: 0\n"),
        account("b", &mb, "    priority: 1\n")
    );
    let extra = "scheduler:\n  breaker_failures: 1\n  breaker_cooldown: 60s\n";
    let (one, two) = (
        instance_with(SHARED_URL, &p, "", &accounts, extra).await,
        instance_with(SHARED_URL, &p, "", &accounts, extra).await,
    );
    ma.set_outage(Some((503, None)));
    let mut ws = one.test_key().await;
    assert!(completed(&turn(&mut ws, "fails over").await));
    assert_eq!(one.account("a").await["health"]["breaker"], "open");
    let refused = ma.log().refused_upgrades;
    assert_eq!(refused, 1, "one dial opened it");
    // `two` learns it without touching `a`.
    until("the breaker reaching the other instance", || async {
        two.account("a").await["health"]["breaker"] == "open"
    })
    .await;
    let mut ws2 = two.test_key().await;
    assert!(completed(&turn(&mut ws2, "straight to b").await));
    assert_eq!(ma.log().refused_upgrades, refused, "two never dialed a");
    // An operator disables `b` through `one`; `two` stops using it.
    ma.set_outage(None);
    let (status, _) = one
        .post("/admin/v1/accounts/b/disable", TOKEN, &json!({}))
        .await;
    assert_eq!(status, 200);
    until("the disable reaching the other instance", || async {
        two.account("b").await["enabled"] == false
    })
    .await;
}

/// SC-7: `kill -9` of an instance holding slots; its leases (never longer than
/// `state.lease_ttl` ahead, by Redis's clock) run out and the other instance admits again.
#[tokio::test]
async fn sc7_kill_9_of_an_instance_frees_its_slots_within_the_lease_ttl() {
    let p = prefix("kill");
    let up = mock().await;
    let accounts = account("up", &up, "");
    let dir = tempfile::tempdir().expect("dir");
    let yaml = config(
        SHARED_URL,
        &p,
        "concurrent_turns: 1",
        &accounts,
        &dir.path().join("s.db").display().to_string(),
    );
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, yaml).expect("config");
    let mut crashing = Proc::start(&path).await;
    let survivor = instance(SHARED_URL, &p, "concurrent_turns: 1", &accounts).await;
    let mut held = ws_connect(&crashing.ws_url(), LIM).await;
    stalled_turn(&mut held).await;
    assert!(limited(&turn(&mut survivor.lim().await, "refused").await));
    // Every lease ends at most lease_ttl after Redis's now.
    let (expiries, now) = leases(&p, "key:lim:turns").await;
    assert_eq!(expiries.len(), 1);
    assert!(
        expiries.iter().all(|e| *e <= now + 2_000),
        "{expiries:?} vs {now}"
    );
    crashing.child.kill().await.expect("kill -9");
    let killed = std::time::Instant::now();
    until_admitted(&survivor).await;
    eprintln!(
        "admitted again {:?} after kill -9 (lease_ttl 2s)",
        killed.elapsed()
    );
    let (expiries, _) = leases(&p, "key:lim:turns").await;
    assert!(
        expiries.is_empty(),
        "the crashed lease is gone: {expiries:?}"
    );
    drop(held);
}

/// The lease expiries (ms) of `scope` and Redis's time (ms).
async fn leases(prefix: &str, scope: &str) -> (Vec<u64>, u64) {
    let client = deadpool_redis::redis::Client::open(SHARED_URL).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = format!("{prefix}:slots:{scope}");
    let now: (u64, u64) = deadpool_redis::redis::cmd("TIME")
        .query_async(&mut c)
        .await
        .expect("TIME");
    let now_ms = now.0 * 1000 + now.1 / 1000;
    let all: Vec<(String, f64)> = deadpool_redis::redis::cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await
        .expect("ZRANGE");
    let live = all
        .into_iter()
        .map(|(_, s)| s as u64)
        .filter(|e| *e > now_ms)
        .collect();
    (live, now_ms)
}

/// SC-7: Redis stops: both instances keep serving, on limits of their own, `/readyz` says
/// `degraded` and so does the metric; an override set meanwhile survives; Redis comes back
/// empty: sharing is restored, the lease of the turn that ran through it all written again.
#[tokio::test]
async fn sc7_a_redis_outage_keeps_both_serving_degraded_and_its_return_restores_sharing() {
    let mut redis = RedisServer::start();
    let p = prefix("outage");
    let up = mock().await;
    let accounts = format!("{}{}", account("up", &up, ""), account("spare", &up, ""));
    let (a, b) = (
        instance(&redis.url(), &p, "concurrent_turns: 1", &accounts).await,
        instance(&redis.url(), &p, "concurrent_turns: 1", &accounts).await,
    );
    // Runs through the outage and after it.
    let mut held = a.lim().await;
    stalled_turn(&mut held).await;
    assert!(limited(&turn(&mut b.lim().await, "shared").await));
    assert!(!a.degraded().await && !b.degraded().await);

    redis.stop();
    let (mut wa, mut wb) = (a.test_key().await, b.test_key().await);
    assert!(completed(&turn(&mut wa, "still serving").await));
    assert!(completed(&turn(&mut wb, "still serving").await));
    assert!(a.degraded().await && b.degraded().await);
    let (_, metrics) = a.get("/metrics").await;
    assert!(metrics.contains("switchyard_state_degraded 1"), "{metrics}");
    // `b` counts its own now: `a`'s turn is not in its memory.
    assert!(completed(&turn(&mut b.lim().await, "own limits").await));
    // An operator's change and a priced turn during the outage.
    let (status, _) = a
        .post("/admin/v1/accounts/spare/disable", TOKEN, &json!({}))
        .await;
    assert_eq!(status, 200);
    send(&mut wa, &create("gpt-5", "[[mock:text 30]]")).await;
    assert!(completed(&read_turn(&mut wa).await));

    redis.restart();
    until("both leaving degraded", || async {
        !a.degraded().await && !b.degraded().await
    })
    .await;
    // The empty Redis learns of `a`'s running turn at its next renewal: `b` is refused again.
    let mut wb = b.lim().await;
    tokio::time::timeout(HANG_GUARD, async {
        while !limited(&turn(&mut wb, "shared again?").await) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("hang guard: the running turn's lease never came back");
    until(
        "the outage's override reaching the other instance",
        || async { b.account("spare").await["enabled"] == false },
    )
    .await;
    assert_eq!(a.account("spare").await["enabled"], false);
    // The spend charged during the outage was added to the shared counter on the way back.
    let name = switchyard::limits::periods::spend_name(
        "test",
        switchyard::limits::periods::Period::Day,
        switchyard::limits::periods::now_utc(),
    );
    let shared = b
        .relay
        .app
        .state
        .counter_add(&name, 0, Duration::from_secs(60));
    assert!(shared.await.unwrap() > 0, "the outage's spend is shared");
    drop(held);
    until_admitted(&b).await;
}
