//! Turns on pooled contexts against the mock upstream: parking between turns, replacement past
//! `max_age` (UP-5), taking a parked context (UP-6), waiting for capacity (SC-3), warm
//! contexts (UP-7), cancels (TP-4), and the counts a leak check reads.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::tests::{eventually, lease, lease_until, settings, setup, turn, turn_with, GUARD};
use super::*;
use crate::config::AccountConfig;
use crate::upstream::UpFrame;

fn quiet() -> ConnSettings {
    settings(60_000, 5_000)
}

/// Reads `n` events of the running response.
async fn read_events(l: &mut Lease, n: usize) {
    for _ in 0..n {
        match tokio::time::timeout(GUARD, l.events.recv())
            .await
            .expect("hang guard")
        {
            Some(UpFrame::Event(_)) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_millis(50)
}

/// Starts the upkeep task for `account`; cancel the token to stop it.
fn tend(pool: &Arc<Pool>, account: &AccountConfig) -> CancellationToken {
    let stop = CancellationToken::new();
    pool.set_accounts(std::slice::from_ref(account));
    assert!(pool.start_maintenance(stop.clone()).is_some());
    stop
}

#[tokio::test]
async fn up1_a_context_is_parked_with_its_session_between_turns() {
    let (mock, pool, account) = setup(2, quiet()).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    assert_eq!(pool.counts().in_turn, 1, "a lease starts in a turn");
    turn(&mut l).await;
    l.end_turn();
    let c = pool.counts();
    assert_eq!((c.held, c.in_turn, c.open), (1, 0, 1), "parked: held, open");
    assert!(l.begin_turn(), "the next turn goes on the same connection");
    assert_eq!(pool.counts().in_turn, 1);
    turn(&mut l).await;
    l.end_turn();
    l.break_connection(UpEnd::NoPong);
    assert!(!l.begin_turn(), "no turn on a broken connection");
    assert_eq!(mock.log().upgrades.len(), 1);
}

#[tokio::test]
async fn up5_a_connection_past_max_age_is_replaced_between_turns() {
    let mut s = quiet();
    s.max_age = Duration::from_millis(50);
    let (mock, pool, account) = setup(1, s).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    turn(&mut l).await;
    l.end_turn();
    tokio::time::sleep(Duration::from_millis(100)).await; // precondition: older than max_age
    assert!(!l.begin_turn(), "too old for another turn");
    assert!(!pool.snapshot()[0].open, "closed between turns");
    eventually(|| mock.log().client_close_frames == vec![(1, Some(1000))]).await;
    drop(l);
    let mut again = lease(&pool, &account, 1).await.expect("lease");
    assert_eq!(again.generation, 2, "redialed");
    turn(&mut again).await;
    assert_eq!(mock.log().upgrades.len(), 2);
}

#[tokio::test]
async fn up5_a_turn_running_past_max_age_is_not_cut() {
    let mut s = quiet();
    s.max_age = Duration::from_millis(50);
    let (mock, pool, account) = setup(1, s).await;
    let stop = tend(&pool, &account);
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    // Twenty slow events take well past max_age.
    let types = turn_with(&mut l, "[[mock:text 20]] [[mock:fault slow 10ms]]").await;
    assert_eq!(types.last().map(String::as_str), Some("response.completed"));
    l.end_turn();
    pool.maintain_once().await;
    assert!(
        l.is_open(),
        "the upkeep task leaves a parked context to its session"
    );
    assert!(mock.log().client_close_frames.is_empty());
    stop.cancel();
}

#[tokio::test]
async fn up6_a_parked_context_of_another_session_is_taken_at_max_conns() {
    let (mock, pool, account) = setup(1, quiet()).await;
    let mut a = lease(&pool, &account, 1).await.expect("lease");
    turn(&mut a).await;
    a.set_holds(Some("resp_a".into()));
    a.end_turn();
    let mut b = lease(&pool, &account, 2).await.expect("taken");
    assert_eq!(
        (b.ctx.id, b.generation),
        (a.ctx.id, a.generation),
        "used as it is"
    );
    assert_eq!(b.holds(), None, "cold for the taker");
    assert!(!a.begin_turn(), "the old lease is void");
    assert!(!a.is_open());
    let closed = tokio::time::timeout(GUARD, a.events.recv()).await;
    assert!(
        matches!(closed, Ok(None)),
        "nothing more reaches the old lease"
    );
    turn(&mut b).await;
    drop(a);
    let c = pool.counts();
    assert_eq!(
        (c.held, c.in_turn),
        (1, 1),
        "the void lease's drop left the taker alone"
    );
    assert_eq!(pool.snapshot()[0].leased_by, Some(2));
    turn(&mut b).await;
    assert_eq!(mock.log().upgrades.len(), 1, "no redial");
}

#[tokio::test]
async fn up6_a_context_in_a_turn_is_never_taken() {
    let (_mock, pool, account) = setup(1, quiet()).await;
    let mut a = lease(&pool, &account, 1).await.expect("lease");
    let e = lease_until(&pool, &account, 2, soon())
        .await
        .err()
        .expect("refused");
    assert_eq!((e.status, e.code.as_str()), (503, "no_capacity"));
    turn(&mut a).await;
    a.end_turn();
    assert!(a.begin_turn(), "its own next turn");
    let e = lease_until(&pool, &account, 2, soon())
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code, "no_capacity");
    turn(&mut a).await;
    assert_eq!(pool.snapshot()[0].leased_by, Some(1));
}

#[tokio::test]
async fn sc3_a_waiting_lease_gets_the_context_once_its_holder_parks() {
    let (mock, pool, account) = setup(1, quiet()).await;
    let mut a = lease(&pool, &account, 1).await.expect("lease");
    let (p, acc) = (pool.clone(), account.clone());
    let waiter = tokio::spawn(async move { lease(&p, &acc, 2).await });
    eventually(|| pool.counts().waiting == 1).await;
    turn(&mut a).await;
    a.end_turn();
    let mut b = waiter.await.expect("task").expect("lease after the wait");
    assert_eq!(b.ctx.id, a.ctx.id);
    assert!(!a.begin_turn());
    turn(&mut b).await;
    assert_eq!((pool.counts().waiting, mock.log().upgrades.len()), (0, 1));
}

#[tokio::test]
async fn sc3_a_waiting_lease_gets_a_context_given_back() {
    let (mock, pool, account) = setup(1, quiet()).await;
    let a = lease(&pool, &account, 1).await.expect("lease");
    let (p, acc) = (pool.clone(), account.clone());
    let waiter = tokio::spawn(async move { lease(&p, &acc, 2).await });
    eventually(|| pool.counts().waiting == 1).await;
    drop(a);
    let mut b = waiter.await.expect("task").expect("lease after the wait");
    turn(&mut b).await;
    assert_eq!(mock.log().upgrades.len(), 1);
}

#[tokio::test]
async fn sc3_no_capacity_when_nothing_frees_up_before_the_deadline() {
    let (_mock, pool, account) = setup(1, quiet()).await;
    let mut a = lease(&pool, &account, 1).await.expect("lease");
    let e = lease_until(&pool, &account, 2, soon())
        .await
        .err()
        .expect("refused");
    assert_eq!(
        (e.status, e.kind, e.code.as_str()),
        (503, "server_error", "no_capacity")
    );
    assert_eq!(pool.counts().waiting, 0);
    turn(&mut a).await;
}

#[tokio::test]
async fn tp4_cancel_sends_a_close_before_the_next_scripted_event() {
    let (mock, pool, account) = setup(1, quiet()).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    let req = serde_json::json!({"type": "response.create", "model": "m",
        "input": "[[mock:text 200]] [[mock:fault slow 30ms]]"});
    l.send_text(req.to_string()).await.expect("send");
    read_events(&mut l, 3).await;
    l.cancel(Duration::from_secs(2));
    eventually(|| mock.log().stream_ends.len() == 1).await;
    let log = mock.log();
    let end = &log.stream_ends[0];
    assert_eq!(end.end, "client_closed", "{end:?}");
    assert!(end.sent < end.planned, "cut mid-response: {end:?}");
    assert_eq!(log.client_close_frames, vec![(1, Some(1000))]);
    eventually(|| {
        pool.counts()
            == PoolCounts {
                contexts: 1,
                ..PoolCounts::default()
            }
    })
    .await;
    let mut again = lease(&pool, &account, 1).await.expect("redial on demand");
    assert_eq!(again.generation, 2);
    turn(&mut again).await;
}

#[tokio::test]
async fn tp4_cancel_drops_the_socket_within_grace_when_the_peer_never_answers() {
    let (mock, pool, account) = setup(1, quiet()).await;
    let mut l = lease(&pool, &account, 1).await.expect("lease");
    let req = r#"{"type":"response.create","model":"m","input":"[[mock:fault deaf after=2]]"}"#;
    l.send_text(req.into()).await.expect("send");
    read_events(&mut l, 2).await;
    l.cancel(Duration::from_millis(50));
    assert_eq!(pool.counts().held, 0, "given back at once");
    eventually(|| pool.counts().tasks == 0).await;
    assert_eq!(
        mock.log().open_connections,
        1,
        "the deaf peer never noticed"
    );
}

#[tokio::test]
async fn up7_min_idle_contexts_are_dialed_without_identity_and_refilled() {
    let mut s = quiet();
    s.min_idle = 2;
    let (mock, pool, account) = setup(4, s).await;
    let stop = tend(&pool, &account);
    eventually(|| pool.counts().open == 2).await;
    let log = mock.log();
    assert_eq!(log.upgrades.len(), 2);
    assert!(log
        .upgrades
        .iter()
        .all(|u| !u.headers.contains_key("session-id")));
    mock.close_all(1001);
    eventually(|| mock.log().upgrades.len() == 4 && pool.counts().open == 2).await;
    let mut l = lease(&pool, &account, 7).await.expect("lease");
    assert_eq!(l.generation, 2, "a warm connection, no dial");
    assert_eq!(
        l.turn_state(),
        None,
        "a warm dial's turn state is no session's"
    );
    turn(&mut l).await;
    // The held one no longer counts as idle: one more is dialed.
    eventually(|| pool.counts().open == 3).await;
    stop.cancel();
}

#[tokio::test]
async fn up7_min_idle_never_exceeds_max_conns() {
    let mut s = quiet();
    s.min_idle = 3;
    let (mock, pool, account) = setup(2, s).await;
    let stop = tend(&pool, &account);
    eventually(|| pool.counts().open == 2).await;
    pool.maintain_once().await;
    pool.maintain_once().await;
    assert_eq!((pool.counts().contexts, mock.log().upgrades.len()), (2, 2));
    stop.cancel();
}

#[tokio::test]
async fn up5_idle_connections_past_max_age_are_closed_and_refilled() {
    let mut s = quiet();
    s.min_idle = 1;
    s.max_age = Duration::from_millis(100);
    let (mock, pool, account) = setup(1, s).await;
    let stop = tend(&pool, &account);
    eventually(|| mock.log().upgrades.len() >= 3).await;
    let log = mock.log();
    assert!(
        log.client_close_frames.len() >= 2,
        "closed politely: {log:?}"
    );
    assert!(log
        .client_close_frames
        .iter()
        .all(|(_, c)| *c == Some(1000)));
    stop.cancel();
}

#[tokio::test]
async fn counts_return_to_zero_once_every_lease_is_gone() {
    let (mock, pool, account) = setup(2, quiet()).await;
    let mut a = lease(&pool, &account, 1).await.expect("lease");
    turn(&mut a).await;
    a.end_turn();
    let mut b = lease(&pool, &account, 2).await.expect("lease");
    let c = lease(&pool, &account, 3).await.expect("takes a's");
    assert!(!a.begin_turn());
    let e = lease_until(&pool, &account, 4, soon())
        .await
        .err()
        .expect("full");
    assert_eq!(e.code, "no_capacity");
    turn_with(&mut b, "[[mock:text 50]]").await;
    c.cancel(Duration::from_millis(100));
    drop((a, b));
    eventually(|| {
        let n = pool.counts();
        n.held == 0 && n.in_turn == 0 && n.waiting == 0 && n.dialing == 0 && n.tasks == n.open
    })
    .await;
    assert_eq!(
        pool.counts().open,
        1,
        "b's context stays open, c's was closed"
    );
    drop(pool);
    eventually(|| mock.log().open_connections == 0).await;
}
