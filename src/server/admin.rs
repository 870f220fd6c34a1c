//! The admin API (TM-3): operators list the accounts with their live state, switch an account's
//! mode, enable, disable or drain it, and clear their override. Every change is stored (the
//! embedded store) before it applies, from the next turn on. Bearer `admin.token`; the API is
//! off (404) without one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;

use super::auth::refuse;
use super::App;
use crate::config::{AccountConfig, AccountMode};
use crate::state::Override;

/// The `/admin/v1/...` routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/admin/v1/accounts", get(list))
        .route("/admin/v1/accounts/{id}/mode", post(set_mode))
        .route("/admin/v1/accounts/{id}/enable", post(enable))
        .route("/admin/v1/accounts/{id}/disable", post(disable))
        .route("/admin/v1/accounts/{id}/drain", post(drain))
        .route("/admin/v1/accounts/{id}/override", delete(clear))
}

/// One account as operators see it.
#[derive(Serialize)]
struct AccountView {
    id: String,
    mode: &'static str,
    enabled: bool,
    draining: bool,
    #[serde(rename = "override")]
    overridden: Option<Override>,
    /// SC-5: breaker, rate-limit cooldown, error rate, time to first token.
    health: crate::scheduler::health::HealthView,
    live: Live,
}

#[derive(Serialize)]
struct Live {
    /// TM-4: new turns go over http for now.
    ws_cooldown: bool,
    open_contexts: usize,
    turns_in_flight: usize,
}

fn check(app: &App, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let cfg = app.cfg();
    let Some(token) = cfg.admin.token() else {
        return Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "admin_api_disabled",
            "The admin API is off: set admin.token.",
        )));
    };
    let presented = super::auth::bearer(headers).unwrap_or("");
    let same = presented.as_bytes().ct_eq(token.expose().as_bytes());
    if presented.is_empty() || !bool::from(same) {
        return Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_admin_token",
            "Missing or wrong admin token.",
        )));
    }
    Ok(())
}

fn view(app: &App, a: &AccountConfig) -> AccountView {
    let o = app.registry.get(&a.id);
    let mode = o.as_ref().and_then(Override::mode).unwrap_or(a.mode);
    let contexts = app.pool.snapshot();
    let mine = contexts.iter().filter(|c| c.account == a.id);
    AccountView {
        id: a.id.clone(),
        mode: mode.as_str(),
        enabled: app.registry.enabled(&a.id),
        draining: app.registry.draining(&a.id),
        overridden: o,
        health: app.scheduler.health.view(&a.id),
        live: Live {
            ws_cooldown: app.pool.fallback.active(&a.id),
            open_contexts: mine.clone().filter(|c| c.open).count(),
            turns_in_flight: mine.filter(|c| c.in_turn).count(),
        },
    }
}

async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&app, &headers) {
        return *r;
    }
    let all: Vec<AccountView> = app.cfg().accounts.iter().map(|a| view(&app, a)).collect();
    Json(all).into_response()
}

/// Applies `change` to `id`'s override, stores it, and answers the account's new view.
async fn change(
    app: &Arc<App>,
    headers: &HeaderMap,
    id: &str,
    change: impl FnOnce(&mut Override),
) -> Response {
    if let Err(r) = check(app, headers) {
        return *r;
    }
    let cfg = app.cfg();
    let Some(account) = cfg.accounts.iter().find(|a| a.id == id) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "account_not_found",
            "No account has this id.",
        );
    };
    let mut o = app.registry.get(id).unwrap_or_default();
    change(&mut o);
    if let Err(e) = app.state.set_override(id, o.clone()).await {
        tracing::error!(error = %e, account = id, "override not stored");
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "override_not_stored",
            "The override could not be stored; nothing changed.",
        );
    }
    app.registry.set(id, o);
    tracing::info!(account = id, "account override changed");
    Json(view(app, account)).into_response()
}

/// An account id from the path; a path that is not one (invalid UTF-8, say) is answered like
/// an unknown account, after the token check.
type AccountPath = Result<Path<String>, axum::extract::rejection::PathRejection>;

fn account_id(p: AccountPath) -> String {
    p.map(|Path(id)| id).unwrap_or_default()
}

/// The largest admin request body: `{"mode": "..."}` needs a few bytes.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

async fn set_mode(
    State(app): State<Arc<App>>,
    id: AccountPath,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    // The token first: nobody without it gets a byte of the body read.
    if let Err(r) = check(&app, &headers) {
        return *r;
    }
    let body = match super::body::read(&headers, body, ADMIN_BODY_LIMIT, &app.cfg().server).await {
        Ok(b) => b,
        Err(e) => return e.response("the admin API's 64 KiB"),
    };
    let mode = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("mode").and_then(Value::as_str).map(str::to_string))
        .filter(|m| AccountMode::parse(m).is_some());
    let Some(mode) = mode else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_mode",
            "The body must be {\"mode\": \"ctx_pool\" | \"passthrough\" | \"http\"}.",
        );
    };
    change(&app, &headers, &account_id(id), |o| o.mode = Some(mode)).await
}

async fn enable(State(app): State<Arc<App>>, id: AccountPath, headers: HeaderMap) -> Response {
    change(&app, &headers, &account_id(id), |o| {
        o.enabled = Some(true);
        o.draining = Some(false);
    })
    .await
}

async fn disable(State(app): State<Arc<App>>, id: AccountPath, headers: HeaderMap) -> Response {
    change(&app, &headers, &account_id(id), |o| o.enabled = Some(false)).await
}

async fn drain(State(app): State<Arc<App>>, id: AccountPath, headers: HeaderMap) -> Response {
    change(&app, &headers, &account_id(id), |o| o.draining = Some(true)).await
}

async fn clear(State(app): State<Arc<App>>, id: AccountPath, headers: HeaderMap) -> Response {
    change(&app, &headers, &account_id(id), |o| {
        *o = Override::default()
    })
    .await
}
