//! The relay's client-facing front: one axum router with the WebSocket ingress on its three
//! paths ([`ws`]) and the operations endpoints ([`ops`]).

pub mod embedded;
pub mod ops;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::config::Config;
use crate::session::transcript::TranscriptBudget;
use crate::upstream::{ConnSettings, Pool};

/// What every handler shares.
pub struct App {
    pub cfg: Arc<Config>,
    pub pool: Arc<Pool>,
    pub budget: Arc<TranscriptBudget>,
    pub next_session: AtomicU64,
}

/// Every accepted connection gets `TCP_NODELAY`: events are small and latency-bound, and
/// Nagle's algorithm with delayed ACKs would hold them back by tens of milliseconds.
pub fn nodelay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// A relay serving in the background (tests, the embedded default).
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `cfg.listen` and serves in a background task.
pub async fn spawn(cfg: Config) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let app = App::new(cfg);
    let routes = routes(app.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(crate::server::nodelay(listener), routes).await {
            tracing::error!(error = %e, "relay listener stopped");
        }
    });
    Ok(Running { addr, app, task })
}

/// Binds `cfg.listen` and serves until the process is stopped. The config is already
/// validated (OP-4).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "switchyard listening");
    axum::serve(crate::server::nodelay(listener), router(cfg)).await?;
    Ok(())
}

/// The routes: WebSocket ingress on `/v1/responses`, `/responses` and
/// `/backend-api/codex/responses` (WS-1); `/healthz`, `/readyz`, `/metrics` (unauthenticated).
pub fn router(cfg: Config) -> Router {
    routes(App::new(cfg))
}

impl App {
    pub fn new(cfg: Config) -> Arc<App> {
        crate::telemetry::metrics_handle();
        let u = &cfg.upstream;
        let settings = ConnSettings {
            ping_interval: u.ping_interval,
            pong_timeout: u.pong_timeout,
            dial_timeout: u.dial_timeout,
            max_message_bytes: usize::try_from(u.max_message_bytes).unwrap_or(usize::MAX),
        };
        let pool = Pool::new(settings);
        let total = usize::try_from(cfg.limits.max_transcript_bytes_total).unwrap_or(usize::MAX);
        let budget = Arc::new(TranscriptBudget::new(total));
        Arc::new(App {
            cfg: Arc::new(cfg),
            pool,
            budget,
            next_session: AtomicU64::new(1),
        })
    }
}

fn routes(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/responses", get(ws::entry))
        .route("/responses", get(ws::entry))
        .route("/backend-api/codex/responses", get(ws::entry))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .with_state(app)
}
