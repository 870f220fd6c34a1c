//! `--idle`: open many authenticated sockets and hold them, so the memory an idle client socket
//! costs the server can be read off its RSS. Every socket is read while held, so the server's
//! pings are answered and no socket is closed for silence.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::run::connect;
use super::LoadgenArgs;

/// Read buffer of each held socket: an idle socket reads nothing but pings.
const IDLE_READ_BUFFER: usize = 4096;

pub async fn run(args: &LoadgenArgs) -> anyhow::Result<()> {
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let opened = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    // Sockets whose connect attempt ended, opened or not (each attempt is bounded).
    let settled = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..args.sessions {
        let (gate, opened, lost) = (gate.clone(), opened.clone(), lost.clone());
        let settled = settled.clone();
        let (url, key) = (args.url.clone(), args.key.clone());
        let mut done = done_rx.clone();
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await;
            let ws = connect(&url, &key, IDLE_READ_BUFFER).await;
            drop(permit);
            if ws.is_ok() {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            settled.fetch_add(1, Ordering::Relaxed);
            let Ok(mut ws) = ws else { return false };
            let ended = tokio::select! {
                _ = done.wait_for(|d| *d) => false,
                // Reading answers pings; a socket that ends while held is counted as lost.
                _ = async { while let Some(Ok(_)) = ws.next().await {} } => true,
            };
            if ended {
                lost.fetch_add(1, Ordering::Relaxed);
            }
            let _ = ws.close(None).await;
            true
        });
    }
    while settled.load(Ordering::Relaxed) < args.sessions {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let n = opened.load(Ordering::Relaxed);
    // The line scripts wait for before measuring the server.
    println!("idle: {n} sockets open");
    std::io::stdout().flush()?;
    tokio::time::sleep(args.hold).await;
    let _ = done_tx.send(true);
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        failed += usize::from(!r.unwrap_or(false));
    }
    let report = json!({
        "sockets": args.sessions, "opened": n, "failed_to_open": failed,
        "lost_while_held": lost.load(Ordering::Relaxed), "open_seconds": open_secs,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("idle: {report}");
    }
    Ok(())
}
