//! Abuse from outside while a well-behaved client keeps working, against the real binary: clients
//! that never read, slow request heads, a flood of sockets on one key, a flood of invalid
//! frames. Each attack checks what the relay must hold (memory bounded by backpressure, heads
//! cut at `server.handshake_timeout`, the key's socket limit, every flood answered) and that the
//! well-behaved client is served meanwhile; its turn times are printed (`-- --nocapture`), never
//! asserted. Sizes: `SWITCHYARD_ABUSE_CLIENTS` (default 20) and `SWITCHYARD_ABUSE_SOCKETS`
//! (default 300).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::metrics::scrape;
use common::process::Proc;
use common::raw_ws::{RawWs, OP_TEXT};
use common::*;
use futures::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const FLOOD_KEY: &str = "sy-flood-key";

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A relay config in `dir`: key `test`, key `flood` limited to `sockets` open sockets, one
/// account on the mock.
fn write_config(dir: &Path, mock_url: &str, sockets: usize, extra: &str) -> PathBuf {
    let yaml = format!(
        "listen: 127.0.0.1:0
keys:
  - id: test
    key: {KEY}
  - id: flood
    key: {FLOOD_KEY}
    limits: {{concurrent_sockets: {sockets}}}
accounts:
  - id: up
    base_url: {mock_url}
    api_key: sk-up
    max_conns: 256
    concurrency: 256
store:
  path: {}
{extra}",
        dir.join("usage.db").display()
    );
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).expect("config");
    path
}

async fn start(
    sockets: usize,
    extra: &str,
) -> (switchyard::mock::MockUpstream, tempfile::TempDir, Proc) {
    let mock = switchyard::mock::MockUpstream::start(switchyard::mock::MockOptions::default())
        .await
        .expect("mock");
    let dir = tempfile::tempdir().expect("dir");
    let relay = Proc::start(&write_config(dir.path(), &mock.base_url(), sockets, extra)).await;
    (mock, dir, relay)
}

/// A well-behaved client's five turns on a fresh socket: all complete; their times printed.
async fn probe(relay: &Proc, attack: &str) {
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    probe_on(&mut ws, attack).await;
}

/// Five turns on the well-behaved client's socket `ws`: all complete; their times printed.
async fn probe_on(ws: &mut Ws, attack: &str) {
    let mut ms = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let events = turn(ws, &format!("probe {i} [[mock:text 8]]")).await;
        assert!(
            completed(&events),
            "{attack}: the well-behaved turn completes"
        );
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{attack}: well-behaved turns (ms) min {:.1} p50 {:.1} max {:.1}",
        ms[0], ms[2], ms[4]
    );
}

fn rss_kib(relay: &Proc) -> u64 {
    let pid = relay.child.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// `n` attackers, each on a TCP connection of its own to `addr`, running `attack` on it.
fn attackers<F, Fut, T>(n: usize, addr: &str, attack: F) -> Vec<tokio::task::JoinHandle<T>>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    (0..n)
        .map(|_| {
            let (addr, attack) = (addr.to_string(), attack.clone());
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                attack(tcp).await
            })
        })
        .collect()
}

/// What each attacker ended with; the hang guard fails a relay that never cuts one.
async fn ended<T>(tasks: Vec<tokio::task::JoinHandle<T>>, what: &str) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let r = tokio::time::timeout(HANG_GUARD, t)
            .await
            .unwrap_or_else(|_| panic!("hang guard: {what}"));
        out.push(r.expect("attacker task"));
    }
    out
}

/// TP-2: clients that ask for long answers and never read them hold the relay's memory to its
/// bounded pump and socket buffers — the upstream read waits — while another client is served.
/// Without backpressure each would buffer its whole answer (about 2 MB each here).
#[tokio::test]
async fn clients_that_never_read_are_held_by_backpressure() {
    let clients = size("SWITCHYARD_ABUSE_CLIENTS", 20);
    let (_mock, _dir, relay) = start(1000, "").await;
    probe(&relay, "baseline").await;
    let before = rss_kib(&relay);
    let mut stuck = Vec::new();
    for _ in 0..clients {
        let mut raw = RawWs::connect(relay.addr.parse().expect("addr"), KEY).await;
        let req = create("gpt-test", "[[mock:text 200000]] [[mock:delta 64]]");
        raw.send_frame(OP_TEXT, req.to_string().as_bytes()).await;
        stuck.push(raw);
    }
    until("every stuck turn is upstream", || async {
        scrape(&relay.addr)
            .await
            .value("switchyard_upstream_pool", &[("count", "in_turn")])
            >= clients as f64
    })
    .await;
    probe(&relay, "never-reading clients").await;
    let during = rss_kib(&relay);
    println!(
        "never-reading clients: {clients} stuck turns, relay RSS {before} -> {during} KiB ({} KiB per client)",
        during.saturating_sub(before) / clients as u64
    );
    assert!(
        during.saturating_sub(before) < 512 * clients as u64,
        "bounded by backpressure: {before} -> {during} KiB for {clients} clients"
    );
    drop(stuck);
    until("the stuck sessions are gone", || async {
        scrape(&relay.addr)
            .await
            .value("switchyard_sessions_running", &[])
            == 0.0
    })
    .await;
    assert_eq!(relay.terminate().await, Some(0));
}

/// `server.handshake_timeout`: connections that send their request head a byte at a time never
/// finish it; each is closed, and a client with a real request is served meanwhile.
#[tokio::test]
async fn slow_request_heads_are_cut_at_the_handshake_timeout() {
    let n = size("SWITCHYARD_ABUSE_SOCKETS", 300);
    let (_mock, _dir, relay) = start(1000, "server:\n  handshake_timeout: 1s\n").await;
    let dribblers = attackers(n, &relay.addr, |mut tcp| async move {
        let head = b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if tcp.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::ZERO, tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                _ => {}
            }
        }
        false
    });
    probe(&relay, "slow request heads").await;
    let closed = ended(dribblers, "the relay cuts the slow head").await;
    assert!(closed.iter().all(|c| *c));
    assert_eq!(relay.terminate().await, Some(0));
}

/// SC-6 under a flood: one key opens many more sockets than its `concurrent_sockets`; exactly
/// the limit is let in, the rest get 429, and another key is served meanwhile. Once the flood
/// closes, the key's places are free again.
#[tokio::test]
async fn a_flood_of_sockets_on_one_key_is_held_to_its_limit() {
    let n = size("SWITCHYARD_ABUSE_SOCKETS", 300);
    let limit = 50;
    let (_mock, _dir, relay) = start(limit, "").await;
    let url = relay.ws_url();
    let attempts: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { ws_connect_with(&url, FLOOD_KEY, &[]).await })
        })
        .collect();
    probe(&relay, "socket flood").await;
    let (mut open, mut refused) = (Vec::new(), 0);
    for a in attempts {
        match a.await.expect("task") {
            Ok(ws) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 429);
                refused += 1;
            }
            Err(e) => panic!("neither accepted nor 429: {e}"),
        }
    }
    println!(
        "socket flood: {n} upgrades on one key, {} open, {refused} refused",
        open.len()
    );
    assert_eq!((open.len(), refused), (limit, n - limit));
    drop(open);
    until("the flood's places are free", || async {
        ws_connect_with(&relay.ws_url(), FLOOD_KEY, &[])
            .await
            .is_ok()
    })
    .await;
    assert_eq!(relay.terminate().await, Some(0));
}

/// WS-4: clients sending invalid frames as fast as they can, never reading the answers, are
/// answered (and slowed by their own unread answers); another client is served meanwhile, and
/// a flooding client that does read gets one `invalid_event` error per frame, in order.
#[tokio::test]
async fn a_flood_of_invalid_frames_is_answered_and_starves_no_one() {
    let clients = size("SWITCHYARD_ABUSE_CLIENTS", 20);
    let (_mock, _dir, relay) = start(1000, "").await;
    let addr: std::net::SocketAddr = relay.addr.parse().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let flooders: Vec<_> = (0..clients)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut raw = RawWs::connect(addr, KEY).await;
                let frame = common::raw_ws::Out::new(OP_TEXT, b"not json").bytes();
                let mut sent = 0u64;
                while !stop.is_cancelled() {
                    let write = raw.tcp.write_all(&frame);
                    match tokio::time::timeout(Duration::from_millis(50), write).await {
                        Ok(Ok(())) => sent += 1,
                        Ok(Err(_)) => break,
                        // The relay stopped reading: its answers are unread (backpressure).
                        Err(_) => tokio::task::yield_now().await,
                    }
                }
                sent
            })
        })
        .collect();
    probe(&relay, "invalid-frame flood").await;
    stop.cancel();
    let mut total = 0;
    for f in flooders {
        total += f.await.expect("flooder");
    }
    println!("invalid-frame flood: {clients} clients sent {total} invalid frames during the probe");
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    for _ in 0..100 {
        ws.send(Message::Text("not json".into()))
            .await
            .expect("send");
    }
    for _ in 0..100 {
        match next_frame(&mut ws).await {
            Frame::Event(e) => assert_eq!(e["error"]["code"], "invalid_event"),
            other => panic!("expected an error event, got {other:?}"),
        }
    }
    assert!(completed(&turn(&mut ws, "still served").await));
    assert_eq!(relay.terminate().await, Some(0));
}

/// `server.max_connections` under a flood of sockets: a well-behaved client already connected is
/// served while thousands of upgrades arrive; exactly the places left are taken, every other
/// connection is refused (503 `too_many_connections`, or closed at once while many are being
/// refused), and once the flood leaves new clients are served again.
#[tokio::test]
async fn a_flood_of_sockets_is_held_to_max_connections() {
    let n = size("SWITCHYARD_ABUSE_SOCKETS", 300);
    let max = (n / 4).max(8);
    let extra = format!("server:\n  max_connections: {max}\n");
    let (_mock, _dir, relay) = start(n, &extra).await;
    let mut ws = ws_connect(&relay.ws_url(), KEY).await;
    assert!(completed(&turn(&mut ws, "before the flood").await));
    let url = relay.ws_url();
    let attempts: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { ws_connect_with(&url, KEY, &[]).await })
        })
        .collect();
    probe_on(&mut ws, "connection flood").await;
    let (mut open, mut refused, mut cut) = (Vec::new(), 0, 0);
    for a in attempts {
        match a.await.expect("task") {
            Ok(ws) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 503);
                let body: serde_json::Value =
                    serde_json::from_slice(r.body().as_deref().unwrap_or_default())
                        .expect("a JSON body");
                assert_eq!(body["error"]["code"], "too_many_connections");
                refused += 1;
            }
            Err(_) => cut += 1,
        }
    }
    println!(
        "connection flood: {n} upgrades with max_connections {max}: {} open, {refused} refused with 503, {cut} closed unanswered",
        open.len()
    );
    assert_eq!(
        open.len(),
        max - 1,
        "the well-behaved socket holds one place"
    );
    assert!(
        refused > 0,
        "refusals are answered while few are refused at once"
    );
    probe_on(&mut ws, "max_connections reached").await;
    drop(open);
    until("the flood's places are free", || async {
        ws_connect_with(&relay.ws_url(), KEY, &[]).await.is_ok()
    })
    .await;
    let refusals = scrape(&relay.addr).await.value(
        "switchyard_connections_refused_total",
        &[("reason", "max_connections")],
    );
    assert!(
        refusals as usize >= refused + cut,
        "every refusal is counted"
    );
    assert!(completed(&turn(&mut ws, "after the flood").await));
    assert_eq!(relay.terminate().await, Some(0));
}

/// TP-5 abused: one client sends thousands of `response.create` in a row, each preempting the
/// last, without reading, then leaves. The relay stays up (each turn's span is the session's
/// child, so nothing nests per preemption), another client is served meanwhile and after, and
/// every request is answered or recorded.
#[tokio::test]
async fn thousands_of_preemptions_in_a_row_take_nothing_down() {
    let n = size("SWITCHYARD_ABUSE_PREEMPTS", 1500);
    let (_mock, dir, relay) = start(1000, "").await;
    let mut raw = RawWs::connect(relay.addr.parse().expect("addr"), KEY).await;
    let req = create("gpt-test", "[[mock:text 2000]] [[mock:fault slow 5ms]]").to_string();
    for _ in 0..n {
        raw.send_frame(OP_TEXT, req.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    probe(&relay, "preemption flood").await;
    drop(raw);
    until("the flooding session is gone", || async {
        scrape(&relay.addr)
            .await
            .value("switchyard_sessions_running", &[])
            == 0.0
    })
    .await;
    probe(&relay, "after the preemption flood").await;
    let (code, lines) = relay.finish().await;
    assert_eq!(code, Some(0), "the relay exits cleanly after the flood");
    let longest = lines.iter().map(String::len).max().unwrap_or(0);
    assert!(
        longest < 4096,
        "log lines do not grow with preemptions: {longest} bytes"
    );
    let store = switchyard::usage::store::Store::open(&dir.path().join("usage.db")).expect("store");
    let records = store
        .records(&switchyard::usage::store::Query::default())
        .expect("records");
    println!("preemption flood: {n} requests on one socket; {} records in all, longest log line {longest} bytes", records.len());
    // The flood's n requests and the probes' ten turns, each recorded once.
    assert_eq!(records.len(), n + 10, "one usage record per request");
}

/// `server.body_timeout`: connections that send a request head and then trickle its body a
/// byte at a time are answered 408 and closed at the deadline, so they cannot hold the
/// listener's connections; a client is served meanwhile.
#[tokio::test]
async fn slow_request_bodies_are_cut_at_the_body_timeout() {
    let n = size("SWITCHYARD_ABUSE_SOCKETS", 300);
    let extra = "server:\n  handshake_timeout: 1s\n  body_timeout: 2s\n";
    let (_mock, _dir, relay) = start(1000, extra).await;
    let trickles = attackers(n, &relay.addr, |mut tcp| async move {
        let head = format!(
            "POST /v1/responses HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-length: 100000\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.expect("head");
        let (mut answer, mut buf) = (Vec::new(), [0u8; 512]);
        // A byte every 200 ms, reading all the while: the read side says when the relay
        // answered and closed (a write after its close may fail; that is fine).
        loop {
            tokio::select! {
                r = tcp.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    let _ = tcp.write_all(b" ").await;
                }
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    });
    probe(&relay, "slow request bodies").await;
    let (mut timed_out, mut reset) = (0, 0);
    for answer in ended(trickles, "the relay cuts the slow body").await {
        if answer.starts_with("HTTP/1.1 408") {
            timed_out += 1;
        } else {
            // Closing a socket with unread bytes in it resets the connection, which can take
            // the 408 with it: the trickler's last bytes raced the answer.
            assert!(answer.is_empty(), "neither 408 nor cut: {answer}");
            reset += 1;
        }
    }
    println!(
        "slow request bodies: {n} trickled bodies, all cut: {timed_out} read their 408, {reset} saw the connection reset first"
    );
    assert!(timed_out > 0, "the cut bodies are answered 408");
    assert_eq!(relay.terminate().await, Some(0));
}

/// `server.max_header_bytes` under a flood: connections sending request heads over the limit
/// get 431 and are closed, while a client is served.
#[tokio::test]
async fn oversized_request_heads_get_431_while_a_client_is_served() {
    let n = size("SWITCHYARD_ABUSE_SOCKETS", 300);
    let (_mock, _dir, relay) = start(1000, "server:\n  max_header_bytes: 4096\n").await;
    let floods = attackers(n, &relay.addr, |mut tcp| async move {
        let padding = "a".repeat(16 * 1024);
        let head = format!("GET /v1/responses HTTP/1.1\r\nhost: x\r\nx-padding: {padding}\r\n\r\n");
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    probe(&relay, "oversized request heads").await;
    let answers = ended(floods, "the relay answers the oversized head").await;
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 431"))
        .count();
    println!("oversized request heads: {n} heads of 16 KiB, {refused} read their 431");
    assert!(refused > 0, "oversized heads get 431");
    assert_eq!(relay.terminate().await, Some(0));
}
