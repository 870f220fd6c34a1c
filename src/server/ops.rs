//! Operations endpoints (SPEC OP-1, first version): liveness, readiness, Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::App;
use crate::telemetry::metric;

/// The process is up.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The config is loaded and the listener is up (the router exists only after both).
/// 200 while serving; its body says `degraded` while shared state is unreachable (SC-7), since
/// the instance still serves then, with limits of its own. 503 while draining (OP-2), so a
/// balancer stops sending work before the listener goes.
pub async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    if app.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n")
    } else if app.state.degraded() {
        (
            StatusCode::OK,
            "ready degraded: redis unreachable, limits and bindings are this instance's own\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Every registered series in the Prometheus text format. The live counts of what a session
/// can hold (sessions, leases, connection tasks, pending usage records) are read at scrape
/// time, so a leak shows as a number that never returns to zero.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    use crate::protocol::peek;
    live_counts(&app);
    match crate::telemetry::metrics_handle() {
        Some(h) => {
            // Kept as plain atomics on the event path; copied into the registry when read.
            metrics::counter!(metric::EVENT_FULL_PARSES).absolute(peek::full_parses());
            metrics::counter!(metric::EVENT_TYPE_SCANS).absolute(peek::type_scans());
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                h.render(),
            )
                .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n",
        )
            .into_response(),
    }
}

fn live_counts(app: &App) {
    // Gauges every scrape shows, whether or not anything changed them yet.
    metrics::gauge!(metric::DRAINING).set(f64::from(u8::from(app.draining())));
    metrics::gauge!(metric::STATE_DEGRADED).set(f64::from(u8::from(app.state.degraded())));
    for account in app.cfg().accounts.iter() {
        let open = app.scheduler.health.view(&account.id).breaker == "open";
        metrics::gauge!(metric::BREAKER_STATE, "account" => account.id.clone())
            .set(f64::from(u8::from(open)));
    }
    let c = app.pool.counts();
    metrics::gauge!(metric::SESSIONS_RUNNING).set(app.sessions.len() as f64);
    for (what, n) in [
        ("contexts", c.contexts),
        ("open", c.open),
        ("held", c.held),
        ("in_turn", c.in_turn),
        ("dialing", c.dialing),
        ("waiting", c.waiting),
        ("tasks", c.tasks),
    ] {
        metrics::gauge!(metric::POOL_COUNTS, "count" => what).set(n as f64);
    }
    metrics::gauge!(metric::USAGE_PENDING).set(app.usage.pending() as f64);
}

/// Any other path: an OpenAI-shaped 404, so every answer of the relay is JSON.
pub async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "No such path on this relay.",
    )
}

/// A known path with a method it does not serve: an OpenAI-shaped 405.
pub async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This path does not take that method.",
    )
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body =
        crate::protocol::frames::http_error_body("invalid_request_error", code, message, None);
    (status, axum::Json(body)).into_response()
}
