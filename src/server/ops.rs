//! Operations endpoints (SPEC OP-1, first version): liveness, readiness, Prometheus metrics.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The process is up.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// The config is loaded and the listener is up (the router exists only after both).
pub async fn readyz() -> &'static str {
    "ready\n"
}

/// Every registered series in the Prometheus text format.
pub async fn metrics() -> Response {
    use crate::protocol::peek;
    use crate::telemetry::metric;
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
