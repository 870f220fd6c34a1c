//! The client listener and its limits (SPEC §2 `server.*`): at most `max_connections` open
//! connections (a WebSocket counts until its socket closes), a request head within
//! `handshake_timeout` and `max_header_bytes` (else 431). The accept loop is the relay's own so
//! these hold before any handler runs and so shutdown (OP-2) can keep answering while it drains.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::App;
use crate::telemetry::metric;

/// Connections being turned away at once: beyond this many, a refused one is just closed, so a
/// flood cannot make the refusals themselves a cost.
const REFUSING_AT_ONCE: usize = 64;

/// How long a refused connection may take to read its 503.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// What a connection over `server.max_connections` is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
connection: close\r\n\
content-length: 155\r\n\
\r\n\
{\"error\":{\"message\":\"The relay has server.max_connections connections open; try again.\",\
\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}\n";

/// Accepts connections for `router` until the app's listener stop; the connections then close
/// after their running response, and [`App::terminate`] waits for them (bounded).
pub async fn serve(listener: TcpListener, router: Router, app: Arc<App>) {
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let stop = app.listener_stop.clone();
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(permit) = app.connection_slots.clone().try_acquire_owned() else {
            refuse(tcp, &refusing);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Events are small and latency-bound; without it Nagle holds them back.
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let io = Counted::new(tcp, permit);
        let (router, app2) = (router.clone(), app.clone());
        app.connections.spawn(connection(io, router, app2));
    }
}

/// One HTTP/1.1 connection (upgrades included) with the limits in force when it was accepted.
async fn connection(io: Counted, router: Router, app: Arc<App>) {
    let limits = app.cfg().server.clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_header_size(usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let stop = app.listener_stop.clone();
    let outcome = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// A connection over `server.max_connections`: a 503 if a refusal slot is free, else closed.
fn refuse(mut tcp: TcpStream, refusing: &Arc<Semaphore>) {
    metrics::counter!(metric::CONNECTIONS_REFUSED, "reason" => "max_connections").increment(1);
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSE_WAIT, async {
            // The answer goes after the request head: an HTTP client takes bytes that come
            // before its request as a broken connection, not as an answer.
            let mut head = Vec::new();
            let mut chunk = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                match tcp.read(&mut chunk).await? {
                    0 => return Ok(()),
                    n => head.extend_from_slice(&chunk[..n]),
                }
            }
            tcp.write_all(BUSY).await?;
            tcp.shutdown().await?;
            // Read on until the client closes, so closing does not reset the connection
            // before the client has read the answer.
            while tcp.read(&mut chunk).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

/// A client connection holding its place under `server.max_connections` until it is dropped:
/// after an upgrade the WebSocket owns it, so open sockets count too.
struct Counted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Counted {
    fn new(tcp: TcpStream, slot: OwnedSemaphorePermit) -> Counted {
        metrics::gauge!(metric::CONNECTIONS_OPEN).increment(1.0);
        Counted { tcp, _slot: slot }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(metric::CONNECTIONS_OPEN).decrement(1.0);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_busy_answer_has_the_length_it_says() {
        let text = std::str::from_utf8(super::BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len);
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}
