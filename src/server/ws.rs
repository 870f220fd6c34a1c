//! The WebSocket ingress (SPEC WS-1 … WS-3): authentication and refusals happen on the plain
//! HTTP request, before any upgrade; an accepted socket becomes a session.
//!
//! The upgrade is done here rather than through axum's extractor so the session gets a
//! tokio-tungstenite stream with deliberately sized buffers and the same frame types as the
//! upstream side (events are forwarded without conversion).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::auth::{authenticate, refuse};
use super::App;
use crate::session::{self, ClientKind};
use crate::tuning;
use crate::upstream::Identity;

/// `GET` on a responses path: refuse with a JSON error, or switch protocols into a session.
pub async fn entry(State(app): State<Arc<App>>, mut req: Request) -> Response {
    if app.draining() {
        return super::http::shutting_down();
    }
    let headers = req.headers();
    let Some(accept) = upgrade_accept_key(headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "websocket_upgrade_required",
            "This endpoint takes a WebSocket upgrade (GET with Upgrade: websocket, version 13).",
        );
    };
    let key = match authenticate(&app, headers) {
        Ok(key) => key,
        Err(refusal) => return *refusal,
    };
    if !app.cfg().ingress.websocket || !key.websocket {
        // WS-3: 426 makes Codex fall back to HTTP at once; never 404/405 here.
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "invalid_request_error",
            "websocket_not_enabled",
            "WebSocket is not enabled for this key; use HTTP POST /v1/responses.",
        );
    }
    // SC-6: a place among the key's open sockets, or 429 at the upgrade.
    let socket_slot = match app.limits.admit_socket(&key).await {
        Ok(slot) => slot,
        Err(e) => return limit_refusal(&e),
    };
    let mut params =
        app.session_params(ClientKind::WebSocket, &key, Identity::from_headers(headers));
    params.socket_slot = socket_slot;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let config = client_ws_config(params.cfg.limits.max_client_message_bytes);
    app.sessions.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                session::run(params, ws).await;
            }
            Err(e) => tracing::debug!(error = %e, "client upgrade did not complete"),
        }
    });
    switching_protocols(&accept)
}

/// A refused upgrade with the error's status, body and `Retry-After`.
fn limit_refusal(e: &crate::error::RelayError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut resp = refuse(status, e.kind, &e.code, &e.message);
    if let Some(v) = e
        .retry_after
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// WS-6: messages and frames over the limit are refused while reading, before they are
/// buffered whole.
fn client_ws_config(max_message: u64) -> WebSocketConfig {
    let max = usize::try_from(max_message).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .read_buffer_size(tuning::CLIENT_READ_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// The `Sec-WebSocket-Accept` value, when the request is a version-13 WebSocket upgrade.
fn upgrade_accept_key(h: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return None;
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return None;
    }
    Some(derive_accept_key(
        h.get(header::SEC_WEBSOCKET_KEY)?.as_bytes(),
    ))
}

fn switching_protocols(accept: &str) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}
