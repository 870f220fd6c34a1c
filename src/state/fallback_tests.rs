//! The fallback with no Redis to reach: every call is answered from memory after the first
//! failure. The way back (Redis restarted, the outage's writes handed over) is exercised with a
//! Redis of its own in `tests/shared_state.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::*;

fn nowhere() -> Arc<dyn StateStore> {
    // Port 1: refused at once.
    let redis =
        RedisStore::new("redis://127.0.0.1:1", "nowhere", Duration::from_secs(30)).expect("store");
    Arc::new(FallbackStore::new(redis, Arc::new(MemoryStore::default())))
}

#[tokio::test]
async fn sc7_an_unreachable_redis_degrades_to_memory_and_everything_still_works() {
    let s = nowhere();
    assert!(!s.degraded(), "up until a call says otherwise");
    let ttl = Duration::from_secs(30);
    let guard = Duration::from_secs(30);
    let first = tokio::time::timeout(guard, s.try_acquire("x", 1, ttl))
        .await
        .expect("hang guard")
        .expect("answered from memory")
        .expect("a slot");
    assert!(s.degraded());
    assert!(first < REDIS_IDS, "a memory slot");
    assert!(
        s.try_acquire("x", 1, ttl).await.unwrap().is_none(),
        "limit kept per instance"
    );
    assert_eq!(s.held("x").await.unwrap(), 1);
    s.release("x", first);
    assert_eq!(s.held("x").await.unwrap(), 0);
    assert!(s.renew("x", first, ttl).await.unwrap());
    let minute = Duration::from_secs(60);
    assert!(s.window("w", minute, 1, Some(1)).await.unwrap().allowed);
    assert!(!s.window("w", minute, 1, Some(1)).await.unwrap().allowed);
    s.bind("b", "acct", minute).await.unwrap();
    assert_eq!(s.bound("b").await.unwrap().as_deref(), Some("acct"));
    assert_eq!(s.counter_add("c", 5, minute).await.unwrap(), 5);
    assert!(!s.counter_seed("c", 9, minute).await.unwrap());
    let off = Override {
        enabled: Some(false),
        ..Override::default()
    };
    s.set_override("a", off.clone()).await.unwrap();
    assert_eq!(s.overrides().await.unwrap().get("a"), Some(&off));
}

/// A Redis that accepts connections and never answers (hung, or not Redis at all): the call is
/// cut at `OP_TIMEOUT`, answered from memory, and later calls do not wait on it.
#[tokio::test]
async fn sc7_a_redis_that_never_answers_is_an_outage_not_a_hang() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let url = format!("redis://127.0.0.1:{port}");
    let redis = RedisStore::new(&url, "silent", Duration::from_secs(30)).expect("store");
    let s: Arc<dyn StateStore> =
        Arc::new(FallbackStore::new(redis, Arc::new(MemoryStore::default())));
    let guard = Duration::from_secs(30);
    let minute = Duration::from_secs(60);
    let first = tokio::time::timeout(guard, s.window("w", minute, 1, Some(5)))
        .await
        .expect("hang guard: cut at the op timeout");
    assert!(first.unwrap().allowed);
    assert!(s.degraded());
    let second = tokio::time::timeout(guard, s.counter_add("c", 1, minute))
        .await
        .expect("hang guard");
    assert_eq!(second.unwrap(), 1, "answered from memory");
    held.abort();
}
