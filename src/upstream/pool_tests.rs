//! The pool driven through its own API against the mock upstream: reuse, capacity, and the
//! generation guard through its races (SPEC UP-1 … UP-4, UP-8). Turns, taking, waiting, max
//! age, warm contexts and cancels are in `pool_turn_tests.rs`.

use std::time::Duration;

use super::*;
use crate::config::AccountConfig;
use crate::mock::{MockOptions, MockUpstream};
use crate::upstream::UpFrame;

pub(super) const GUARD: Duration = Duration::from_secs(30);

pub(super) fn settings(ping: u64, pong: u64) -> ConnSettings {
    ConnSettings {
        ping_interval: Duration::from_millis(ping),
        pong_timeout: Duration::from_millis(pong),
        dial_timeout: Duration::from_secs(5),
        max_message_bytes: 1 << 20,
        max_age: Duration::from_secs(3600),
        min_idle: 0,
    }
}

pub(super) async fn setup(
    max_conns: usize,
    s: ConnSettings,
) -> (MockUpstream, Arc<Pool>, AccountConfig) {
    let mock = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let mut account = AccountConfig::new("a", mock.base_url(), "sk-a");
    account.max_conns = max_conns;
    (mock, Pool::new(s, Default::default()), account)
}

/// A lease that may wait for capacity up to the hang guard.
pub(super) async fn lease(
    pool: &Pool,
    account: &AccountConfig,
    session: u64,
) -> Result<Lease, RelayError> {
    lease_until(pool, account, session, Instant::now() + GUARD).await
}

pub(super) async fn lease_until(
    pool: &Pool,
    account: &AccountConfig,
    session: u64,
    deadline: Instant,
) -> Result<Lease, RelayError> {
    let id = Identity::default();
    tokio::time::timeout(GUARD, pool.lease(account, session, &id, 8, deadline))
        .await
        .expect("hang guard")
}

pub(super) async fn eventually(cond: impl Fn() -> bool) {
    tokio::time::timeout(GUARD, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("hang guard: condition never held");
}

/// A turn through a lease: the request goes out, events come back to the terminal.
pub(super) async fn turn(l: &mut Lease) -> Vec<String> {
    turn_with(l, "hi [[mock:text 3]]").await
}

pub(super) async fn turn_with(l: &mut Lease, input: &str) -> Vec<String> {
    let req = serde_json::json!({"type": "response.create", "model": "m", "input": input});
    l.send_text(req.to_string()).await.expect("send");
    let mut types = Vec::new();
    loop {
        match tokio::time::timeout(GUARD, l.events.recv())
            .await
            .expect("hang guard")
        {
            Some(UpFrame::Event(t)) => {
                let kind = crate::protocol::peek::event_type(t.as_str())
                    .unwrap_or_default()
                    .to_string();
                let done = kind == "response.completed";
                types.push(kind);
                if done {
                    return types;
                }
            }
            other => panic!("connection ended mid-turn: {other:?}"),
        }
    }
}

#[tokio::test]
async fn up1_an_idle_context_is_reused_by_the_next_session_without_dialing() {
    let (mock, pool, account) = setup(4, settings(60_000, 5_000)).await;
    let mut first = lease(&pool, &account, 1).await.expect("lease");
    turn(&mut first).await;
    let (ctx, generation) = (first.ctx.id, first.generation);
    drop(first);
    let view = pool.snapshot();
    assert_eq!(
        (view[0].open, view[0].leased_by),
        (true, None),
        "idle and still open"
    );
    let mut second = lease(&pool, &account, 2).await.expect("lease");
    assert_eq!((second.ctx.id, second.generation), (ctx, generation));
    turn(&mut second).await;
    assert_eq!(mock.log().upgrades.len(), 1, "one dial for both sessions");
}

#[tokio::test]
async fn up1_a_session_gets_its_own_context_back_and_others_get_new_ones() {
    let (mock, pool, account) = setup(4, settings(60_000, 5_000)).await;
    let a = lease(&pool, &account, 1).await.expect("lease");
    let b = lease(&pool, &account, 2).await.expect("lease");
    assert_ne!(a.ctx.id, b.ctx.id, "a leased context is never shared");
    let a_ctx = a.ctx.id;
    drop(b);
    drop(a);
    let again = lease(&pool, &account, 1).await.expect("lease");
    assert_eq!(
        again.ctx.id, a_ctx,
        "affinity: session 1 gets its own context back"
    );
    assert_eq!(mock.log().upgrades.len(), 2);
}

#[tokio::test]
async fn max_conns_bounds_the_contexts_of_an_account() {
    let (_mock, pool, account) = setup(1, settings(60_000, 5_000)).await;
    let held = lease(&pool, &account, 1).await.expect("lease");
    let soon = Instant::now() + Duration::from_millis(50);
    let refused = lease_until(&pool, &account, 2, soon)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (503, "no_capacity")
    );
    drop(held);
    assert!(
        lease(&pool, &account, 2).await.is_ok(),
        "free again once released"
    );
    assert_eq!(pool.snapshot().len(), 1);
}

#[tokio::test]
async fn up2_a_stale_verdict_after_a_redial_is_ignored() {
    let (mock, pool, account) = setup(1, settings(60_000, 5_000)).await;
    let first = lease(&pool, &account, 1).await.expect("lease");
    let (ctx, old) = (first.ctx.id, first.generation);
    first.break_connection(UpEnd::NoPong);
    drop(first);
    assert!(!pool.snapshot()[0].open);
    let mut second = lease(&pool, &account, 1).await.expect("lease");
    assert_eq!(
        second.generation,
        old + 1,
        "every dial bumps the generation"
    );
    // A ping verdict about the old connection arrives late: it must not kill the new one.
    pool.verdict("a", ctx, old, &UpEnd::NoPong);
    assert!(second.is_open());
    turn(&mut second).await;
    assert_eq!(mock.log().upgrades.len(), 2);
}

#[tokio::test]
async fn up2_a_read_error_racing_a_release_leaves_a_consistent_context() {
    let (_mock, pool, account) = setup(1, settings(60_000, 5_000)).await;
    for round in 0..20u64 {
        let l = lease(&pool, &account, round).await.expect("lease");
        let (ctx, generation) = (l.ctx.id, l.generation);
        let p = pool.clone();
        let verdict =
            tokio::spawn(
                async move { p.verdict("a", ctx, generation, &UpEnd::Io("reset".into())) },
            );
        let release = tokio::spawn(async move { drop(l) });
        verdict.await.expect("verdict");
        release.await.expect("release");
        let view = pool.snapshot();
        assert_eq!(
            (view[0].open, view[0].leased_by),
            (false, None),
            "round {round}: closed and idle"
        );
        let mut next = lease(&pool, &account, round).await.expect("lease");
        assert_eq!(next.generation, generation + 1, "round {round}: redialed");
        turn(&mut next).await;
        // The same verdict once more, now stale.
        pool.verdict("a", ctx, generation, &UpEnd::Io("late".into()));
        assert!(next.is_open(), "round {round}");
    }
}

#[tokio::test]
async fn up3_an_idle_context_notices_a_close_at_once() {
    let (mock, pool, account) = setup(2, settings(60_000, 5_000)).await;
    drop(lease(&pool, &account, 1).await.expect("lease"));
    assert!(pool.snapshot()[0].open);
    mock.close_all(1001);
    eventually(|| !pool.snapshot()[0].open).await;
    let mut l = lease(&pool, &account, 2).await.expect("lease");
    turn(&mut l).await;
    assert_eq!(l.generation, 2, "replaced on demand");
}

#[tokio::test]
async fn up3_stray_frames_on_an_idle_context_are_dropped() {
    let (mock, pool, account) = setup(1, settings(60_000, 5_000)).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    // The request's events start flowing; the lease is released before they are read.
    l.send_text(r#"{"type":"response.create","model":"m","input":"[[mock:text 50]]"}"#.into())
        .await
        .expect("send");
    drop(l);
    eventually(|| mock.log().stream_ends.len() == 1).await;
    let mut next = lease(&pool, &account, 2).await.expect("lease");
    let types = turn(&mut next).await;
    assert_eq!(
        types[0], "response.created",
        "nothing of the earlier response leaks into this lease"
    );
    assert_eq!(mock.log().upgrades.len(), 1);
}

#[tokio::test]
async fn up4_idle_contexts_are_pinged_and_a_missing_pong_breaks_them() {
    let (mock, pool, account) = setup(1, settings(20, 100)).await;
    drop(lease(&pool, &account, 1).await.expect("lease"));
    eventually(|| mock.log().pings.values().sum::<u64>() >= 3).await;
    assert!(pool.snapshot()[0].open, "answered pings keep it open");
    mock.deafen_all();
    eventually(|| !pool.snapshot()[0].open).await;
}

#[tokio::test]
async fn up4_a_missing_pong_on_a_leased_context_ends_the_lease_stream() {
    let (mock, pool, account) = setup(1, settings(20, 100)).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    l.send_text(
        r#"{"type":"response.create","model":"m","input":"[[mock:fault deaf after=2]]"}"#.into(),
    )
    .await
    .expect("send");
    let mut ended = None;
    while ended.is_none() {
        match tokio::time::timeout(GUARD, l.events.recv())
            .await
            .expect("hang guard")
        {
            Some(UpFrame::Event(_)) => {}
            Some(UpFrame::Ended(e)) => ended = Some(e),
            None => panic!("channel closed without a verdict"),
        }
    }
    assert_eq!(ended, Some(UpEnd::NoPong));
    assert!(!l.is_open());
    drop(mock);
}

#[tokio::test]
async fn up8_concurrent_dials_of_one_context_are_merged() {
    let (mock, pool, account) = setup(1, settings(60_000, 5_000)).await;
    let (ctx, _token) = pool.claim(&account, 1).expect("claim");
    let id = Identity::default();
    let (a, b) = tokio::join!(
        pool.ensure_open(&ctx, &account, &id, Some(1)),
        pool.ensure_open(&ctx, &account, &id, None)
    );
    assert_eq!(
        a.expect("dial"),
        b.expect("dial"),
        "both see the one connection"
    );
    assert_eq!(mock.log().upgrades.len(), 1);
}

#[tokio::test]
async fn up8_a_dial_that_never_answers_times_out() {
    // Accepts TCP and never answers the upgrade.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let account = AccountConfig::new(
        "s",
        format!("http://{}/v1", silent.local_addr().expect("addr")),
        "k",
    );
    let mut s = settings(60_000, 5_000);
    s.dial_timeout = Duration::from_millis(50);
    let health: Arc<crate::scheduler::health::Health> = Default::default();
    let pool = Pool::new(s, health.clone());
    let e = lease(&pool, &account, 1).await.err().expect("timed out");
    assert_eq!(
        health.view("s").consecutive_failures,
        1,
        "a failed dial counts against the account's breaker"
    );
    assert_eq!(
        (e.status, e.code.as_str()),
        (502, "upstream_connection_lost")
    );
    assert!(e.message.contains("timed out"), "{}", e.message);
    assert_eq!(
        pool.snapshot()[0].leased_by,
        None,
        "a failed lease gives its context back"
    );
    drop(silent);
}
