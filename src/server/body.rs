//! Request bodies read under limits: a size (a declared `Content-Length` over it is refused
//! before any byte is read) and time (`server.body_timeout` for the whole body,
//! `server.handshake_timeout` for each wait), so that neither a huge nor a trickled body can hold
//! memory or a connection.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use tokio::time::Instant;

use super::auth::refuse;
use crate::config::ServerConfig;

/// The first allocation for a body of unknown or large declared size: it grows as bytes come,
/// so a declared size is never trusted for memory.
const FIRST_CAPACITY: usize = 64 * 1024;

/// Why a body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit (declared or sent): 413.
    TooLarge,
    /// Not whole within the deadlines: 408.
    Slow,
    /// Broken framing or a connection cut mid-body: 400.
    Broken,
}

impl BodyError {
    /// The OpenAI-shaped answer; `limit_name` names the setting that bounds the size.
    pub fn response(self, limit_name: &str) -> Response {
        match self {
            BodyError::TooLarge => refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                &format!("The request body is over {limit_name}."),
            ),
            BodyError::Slow => refuse(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
                "The request body did not arrive within server.body_timeout (or stalled for server.handshake_timeout).",
            ),
            BodyError::Broken => refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
                "The request body is malformed or was cut short.",
            ),
        }
    }
}

/// Reads `body` whole: at most `limit` bytes, within the listener's deadlines.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    server: &ServerConfig,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let capacity = declared.map_or(0, |n| n as usize).min(FIRST_CAPACITY);
    collect(
        body,
        limit,
        capacity,
        server.body_timeout,
        server.handshake_timeout,
    )
    .await
}

async fn collect(
    body: Body,
    limit: usize,
    capacity: usize,
    whole: Duration,
    each: Duration,
) -> Result<Bytes, BodyError> {
    let end = Instant::now() + whole;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(capacity);
    loop {
        let wait = (Instant::now() + each).min(end);
        match tokio::time::timeout_at(wait, stream.next()).await {
            Err(_) => return Err(BodyError::Slow),
            Ok(None) => return Ok(Bytes::from(buf)),
            Ok(Some(Err(_))) => return Err(BodyError::Broken),
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(whole_ms: u64, each_ms: u64) -> ServerConfig {
        ServerConfig {
            body_timeout: Duration::from_millis(whole_ms),
            handshake_timeout: Duration::from_millis(each_ms),
            ..ServerConfig::default()
        }
    }

    fn trickle(chunks: usize, gap: Duration) -> Body {
        let s = futures::stream::iter(0..chunks).then(move |_| async move {
            tokio::time::sleep(gap).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        });
        Body::from_stream(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_within_its_deadlines_is_read_whole() {
        let got = read(
            &HeaderMap::new(),
            trickle(5, Duration::from_millis(10)),
            10,
            &server(1000, 100),
        )
        .await;
        assert_eq!(got.as_deref(), Ok(&b"xxxxx"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_or_trickled_body_is_slow() {
        let none = HeaderMap::new();
        let stalled = read(
            &none,
            trickle(2, Duration::from_millis(500)),
            10,
            &server(10_000, 100),
        )
        .await;
        assert_eq!(stalled, Err(BodyError::Slow));
        let trickled = read(
            &none,
            trickle(1000, Duration::from_millis(50)),
            10_000,
            &server(1000, 100),
        )
        .await;
        assert_eq!(trickled, Err(BodyError::Slow));
    }

    #[tokio::test]
    async fn too_large_declared_or_sent_and_broken_bodies_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "1000000".parse().unwrap());
        // Declared too large: refused without reading (the body would never end).
        let never = Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>());
        assert_eq!(
            read(&h, never, 100, &server(1000, 1000)).await,
            Err(BodyError::TooLarge)
        );
        let sent = Body::from(vec![b'x'; 101]);
        assert_eq!(
            read(&HeaderMap::new(), sent, 100, &server(1000, 1000)).await,
            Err(BodyError::TooLarge)
        );
        let cut = Body::from_stream(futures::stream::iter([
            Ok(Bytes::from_static(b"{")),
            Err(std::io::Error::other("reset")),
        ]));
        assert_eq!(
            read(&HeaderMap::new(), cut, 100, &server(1000, 1000)).await,
            Err(BodyError::Broken)
        );
    }
}
