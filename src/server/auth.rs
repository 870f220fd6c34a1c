//! The relay's own API keys, checked before any work (WS-2; the same for HTTP requests), and
//! the parameters a new session starts with.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::App;
use crate::config::KeyConfig;
use crate::protocol::frames::http_error_body;
use crate::session::{ClientKind, SessionParams};
use crate::telemetry::metric;
use crate::upstream::Identity;

/// The key presented as `Authorization: Bearer <key>`, or a refusal: 401 when missing or
/// unknown, 403 when disabled (an OpenAI-shaped JSON body either way).
pub fn authenticate(app: &App, headers: &HeaderMap) -> Result<KeyConfig, Box<Response>> {
    let Some(presented) = bearer(headers) else {
        return Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing_api_key",
            "No API key provided: send Authorization: Bearer <key>.",
        )));
    };
    let cfg = app.cfg();
    // An empty credential (another scheme, a garbled header) matches nothing, not even a
    // `key_sha256` of the empty string.
    let found = Some(presented)
        .filter(|p| !p.is_empty())
        .and_then(|p| cfg.find_key(p).cloned());
    let Some(key) = found else {
        return Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        )));
    };
    if key.disabled {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "permission_error",
            "api_key_disabled",
            "This API key is disabled.",
        )));
    }
    Ok(key)
}

/// The credential of `Authorization: Bearer <credential>` (the scheme in any case): `None`
/// without the header; `Some("")` when it holds something else (another scheme, bytes that
/// are not text), which no key or token matches.
pub fn bearer(h: &HeaderMap) -> Option<&str> {
    let value = h.get(header::AUTHORIZATION)?;
    let credential = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, rest)| rest.trim())
        .unwrap_or("");
    Some(credential)
}

/// An error answer before any session exists.
pub fn refuse(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    metrics::counter!(metric::UPGRADES_REFUSED, "status" => status.as_u16().to_string())
        .increment(1);
    (status, Json(http_error_body(kind, code, message, None))).into_response()
}

impl App {
    /// What a new session of `key` starts with.
    pub fn session_params(
        self: &Arc<Self>,
        kind: ClientKind,
        key: &KeyConfig,
        identity: Identity,
    ) -> SessionParams {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        SessionParams {
            kind,
            cfg: self.cfg(),
            current: self.config_handle(),
            reloads: self.reloads.subscribe(),
            pool: self.pool.clone(),
            budget: self.budget.clone(),
            key_id: key.id.clone(),
            identity,
            id,
            tag: format!("{}-{id}", self.instance),
            usage: self.usage.clone(),
            state: self.state.clone(),
            scheduler: self.scheduler.clone(),
            limits: self.limits.clone(),
            socket_slot: None,
            http: self.http_client.clone(),
            drain: self.drain.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}
