//! The relay's HTTP front: the router that later items grow (WebSocket upgrade, SSE/JSON
//! adapters, admin API, metrics); for now health and readiness.

use axum::routing::get;
use axum::Router;

use crate::config::Config;

/// Binds `cfg.listen` and serves until the process is stopped. The config is already
/// validated (OP-4).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "switchyard listening");
    axum::serve(listener, router()).await?;
    Ok(())
}

/// `/healthz` (process up) and `/readyz` (config loaded, listener up).
pub fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
}
