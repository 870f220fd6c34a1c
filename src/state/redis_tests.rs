//! The Redis backend against a real Redis on 127.0.0.1:6379 (`scripts/test.sh` starts one).
//! Each test uses keys of its own prefix; two `RedisStore`s on one prefix stand for two relay
//! instances.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::state;

const URL: &str = "redis://127.0.0.1:6379";

fn store(prefix: &str) -> Arc<dyn StateStore> {
    Arc::new(RedisStore::new(URL, prefix, Duration::from_secs(30)).expect("redis store"))
}

fn prefix(test: &str) -> String {
    format!("sy-test:{test}:{}", hex::encode(rand::random::<[u8; 6]>()))
}

#[tokio::test]
async fn sc7_slots_are_shared_by_two_instances_and_released() {
    let p = prefix("slots");
    let (a, b) = (store(&p), store(&p));
    let ttl = Duration::from_secs(30);
    let one = a.try_acquire("s", 2, ttl).await.unwrap().expect("first");
    let two = b.try_acquire("s", 2, ttl).await.unwrap().expect("second");
    assert_ne!(one, two);
    assert!(
        a.try_acquire("s", 2, ttl).await.unwrap().is_none(),
        "the limit is shared"
    );
    assert_eq!(b.held("s").await.unwrap(), 2);
    b.release("s", one);
    let mut again = None;
    for _ in 0..200 {
        again = a.try_acquire("s", 2, ttl).await.unwrap();
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        again.is_some(),
        "hang guard: the released slot never came back"
    );
}

#[tokio::test]
async fn sc7_a_lease_not_renewed_runs_out_and_a_held_slot_is_renewed() {
    let p = prefix("leases");
    let s = store(&p);
    let ttl = Duration::from_millis(300);
    // A crashed holder: taken, never renewed, never released.
    s.try_acquire("crash", 1, ttl)
        .await
        .unwrap()
        .expect("taken");
    assert!(s.try_acquire("crash", 1, ttl).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(s.held("crash").await.unwrap(), 0, "freed within the TTL");
    assert!(s.try_acquire("crash", 1, ttl).await.unwrap().is_some());
    // A live holder keeps its slot well past the TTL.
    let far = tokio::time::Instant::now() + Duration::from_secs(5);
    let held = state::acquire(&s, "live", 1, ttl, far)
        .await
        .unwrap()
        .expect("slot");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(s.held("live").await.unwrap(), 1, "renewed while held");
    drop(held);
    let mut freed = false;
    for _ in 0..200 {
        if s.held("live").await.unwrap() == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(freed, "hang guard: the dropped slot was never released");
}

#[tokio::test]
async fn sc7_bindings_counters_and_overrides() {
    let p = prefix("misc");
    let (a, b) = (store(&p), store(&p));
    a.bind("resp:k:r1", "acct", Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(b.bound("resp:k:r1").await.unwrap().as_deref(), Some("acct"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.bound("resp:k:r1").await.unwrap(), None, "expired");
    let ttl = Duration::from_secs(60);
    assert_eq!(a.counter_add("spend", 0, ttl).await.unwrap(), 0);
    assert_eq!(a.counter_add("spend", 5, ttl).await.unwrap(), 5);
    assert_eq!(b.counter_add("spend", 7, ttl).await.unwrap(), 12);
    let o = Override {
        enabled: Some(false),
        ..Override::default()
    };
    a.set_override("acct", o.clone()).await.unwrap();
    assert_eq!(b.overrides().await.unwrap().get("acct"), Some(&o));
    b.set_override("acct", Override::default()).await.unwrap();
    assert!(a.overrides().await.unwrap().is_empty());
}

#[tokio::test]
async fn sc7_windows_are_atomic_across_instances_and_say_when_they_free() {
    let p = prefix("window");
    let (a, b) = (store(&p), store(&p));
    let w = Duration::from_millis(800);
    assert!(a.window("rpm", w, 1, Some(2)).await.unwrap().allowed);
    assert!(b.window("rpm", w, 1, Some(2)).await.unwrap().allowed);
    let no = a.window("rpm", w, 1, Some(2)).await.unwrap();
    assert_eq!((no.allowed, no.total), (false, 2));
    assert!(
        no.retry_after > Duration::ZERO && no.retry_after <= w,
        "{no:?}"
    );
    tokio::time::sleep(no.retry_after + Duration::from_millis(100)).await;
    assert!(
        b.window("rpm", w, 1, Some(2)).await.unwrap().allowed,
        "after the edge"
    );
    // Concurrent check-and-add: exactly the limit passes.
    let calls = (0..20).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            s.window("burst", Duration::from_secs(30), 1, Some(7))
                .await
                .unwrap()
                .allowed
        }
    });
    let passed = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|x| *x)
        .count();
    assert_eq!(passed, 7);
    // Amounts: charges without a limit, a check against them.
    a.window("tpm", w, 90, None).await.unwrap();
    b.window("tpm", w, 10, None).await.unwrap();
    let full = a.window("tpm", w, 0, Some(100)).await.unwrap();
    assert_eq!((full.allowed, full.total), (false, 100));
}

#[tokio::test]
async fn sc7_an_unreachable_redis_is_an_error_not_a_hang() {
    let s = store_at("redis://127.0.0.1:1", "nowhere");
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        s.try_acquire("x", 1, Duration::from_secs(1)),
    )
    .await
    .expect("hang guard");
    assert!(r.is_err());
    assert!(s.bound("x").await.is_err());
}

fn store_at(url: &str, prefix: &str) -> Arc<dyn StateStore> {
    Arc::new(RedisStore::new(url, prefix, Duration::from_secs(30)).expect("store"))
}

#[tokio::test]
async fn sc7_seeding_only_sets_a_new_counter_and_a_renewal_writes_a_lost_lease_again() {
    let p = prefix("seed");
    let (a, b) = (store(&p), store(&p));
    let ttl = Duration::from_secs(60);
    assert!(a.counter_seed("spend", 40, ttl).await.unwrap(), "new");
    assert!(!b.counter_seed("spend", 40, ttl).await.unwrap(), "exists");
    assert_eq!(b.counter_add("spend", 2, ttl).await.unwrap(), 42);
    // A lease lost (as with a Redis restart) is written again by its holder's renewal.
    let id = a.try_acquire("s", 1, ttl).await.unwrap().expect("slot");
    let raw = RedisStore::new(URL, &p, ttl).unwrap();
    let mut c = raw.conn().await.unwrap();
    redis::cmd("DEL")
        .arg(format!("{p}:slots:s"))
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    assert_eq!(b.held("s").await.unwrap(), 0, "lost");
    assert!(!a.renew("s", id, ttl).await.unwrap(), "it had gone");
    assert_eq!(b.held("s").await.unwrap(), 1, "counted again");
    assert!(b.try_acquire("s", 1, ttl).await.unwrap().is_none());
}
