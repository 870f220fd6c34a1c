//! The relay's client-facing front: one axum router with the WebSocket ingress on its three
//! paths ([`ws`]) and the operations endpoints ([`ops`]), served by [`listener`]; and the
//! process around it: the usage flusher, SIGHUP (reload) and SIGTERM (OP-2: drain, cut what
//! still runs after `shutdown.drain_timeout`, flush usage, exit 0).

pub mod admin;
pub mod admin_cli;
pub mod auth;
pub mod body;
pub mod embedded;
pub mod http;
pub mod listener;
pub mod ops;
pub mod reload;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::session::transcript::TranscriptBudget;
use crate::state::{MemoryStore, StateStore};
use crate::upstream::{ConnSettings, Pool};
use crate::usage::prices::Prices;
use crate::usage::Recorder;

/// How long shutdown waits for sessions to close their sockets before the final flush.
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How long shutdown waits for client connections to send what their sessions left them (an
/// SSE stream's last `error` event) once the sessions are closed.
const CONNECTION_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What every handler shares.
pub struct App {
    /// The config in force: swapped whole by a reload (TM-3), read per use.
    config: Arc<parking_lot::RwLock<Arc<Config>>>,
    /// The file it was read from, for reloads (none for configs built in code).
    pub config_path: Option<std::path::PathBuf>,
    /// Bumped at every applied reload, so sessions re-check their key (WS-8).
    pub reloads: tokio::sync::watch::Sender<u64>,
    pub pool: Arc<Pool>,
    pub budget: Arc<TranscriptBudget>,
    pub usage: Arc<Recorder>,
    /// Shared state (SC-7): `memory`, or Redis with this process's memory behind it.
    pub state: Arc<dyn StateStore>,
    /// The operators' account overrides as turns read them (TM-3).
    pub registry: Arc<crate::scheduler::Registry>,
    /// The per-turn account choice (SC-2) with the accounts' health (SC-5).
    pub scheduler: Arc<crate::scheduler::Scheduler>,
    /// Per-key limits (SC-6).
    pub limits: Arc<crate::limits::Limits>,
    /// The upstream HTTP client for `http` accounts.
    pub http_client: reqwest::Client,
    pub next_session: AtomicU64,
    /// This process's name in usage records' session ids, so they stay unique across restarts.
    pub instance: String,
    /// Cancelled at SIGTERM (OP-2): new work is refused, idle sessions close, running turns
    /// finish.
    pub drain: CancellationToken,
    /// Cancelled when the drain is over (or at once without one): every session closes its
    /// socket, background tasks stop.
    pub shutdown: CancellationToken,
    /// Cancelled once the sessions are closed: the client listener stops accepting and its
    /// connections close after their running response.
    listener_stop: CancellationToken,
    /// Places under `server.max_connections`, one per open client connection.
    connection_slots: Arc<tokio::sync::Semaphore>,
    /// The client connections' tasks, so shutdown can wait for their last bytes.
    connections: TaskTracker,
    /// `shutdown.drain_timeout` as the process started (it needs a restart to change).
    drain_timeout: Duration,
    /// The running sessions, so shutdown can wait for their records.
    pub sessions: TaskTracker,
    /// HTTP sessions by session key (HS-2).
    pub http_sessions: http::HttpSessions,
    /// Cancelled once the sessions are closed: the flusher writes what is left and stops.
    flush_stop: CancellationToken,
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
    /// `admin.listen`'s bound address, when the admin API has a listener of its own.
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    task: tokio::task::JoinHandle<()>,
    flusher: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Closes every session, stops the listener and flushes usage (as SIGTERM does).
    pub async fn shutdown(mut self) {
        self.task.abort();
        self.app.close_sessions().await;
        if let Some(f) = self.flusher.take() {
            let _ = f.await;
        }
    }

    /// OP-2 as SIGTERM runs it: drain, cut what still runs after `shutdown.drain_timeout`,
    /// stop the listener, flush usage.
    pub async fn terminate(mut self) {
        self.app.terminate().await;
        self.task.abort();
        if let Some(f) = self.flusher.take() {
            let _ = f.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.app.drain.cancel();
        self.app.shutdown.cancel();
        self.app.listener_stop.cancel();
        self.app.flush_stop.cancel();
        if let Some(f) = self.flusher.take() {
            f.abort();
        }
    }
}

/// Binds `admin.listen`, when set, and serves only the admin API there until shutdown.
async fn spawn_admin(app: &Arc<App>) -> anyhow::Result<Option<SocketAddr>> {
    let Some(at) = app.cfg().admin.listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(at).await?;
    let addr = listener.local_addr()?;
    let (router, stop) = (
        admin::routes()
            .fallback(ops::not_found)
            .method_not_allowed_fallback(ops::method_not_allowed)
            .with_state(app.clone()),
        app.shutdown.clone(),
    );
    tokio::spawn(async move {
        let serve = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    tracing::info!(listen = %addr, "admin API listening");
    Ok(Some(addr))
}

/// The `state.backend` in force: this process's memory, or Redis with that memory behind it.
fn state_store(
    cfg: &crate::config::StateConfig,
    memory: Arc<MemoryStore>,
) -> anyhow::Result<Arc<dyn StateStore>> {
    use crate::state::{fallback::FallbackStore, redis::RedisStore};
    Ok(match cfg.backend {
        crate::config::StateBackend::Memory => memory,
        crate::config::StateBackend::Redis => {
            let redis = RedisStore::new(&cfg.redis_url, &cfg.redis_prefix, cfg.lease_ttl)
                .map_err(anyhow::Error::msg)?;
            tracing::info!(prefix = %cfg.redis_prefix, "shared state in redis");
            Arc::new(FallbackStore::new(redis, memory))
        }
    })
}

/// Binds `cfg.listen` and serves in a background task.
pub async fn spawn(cfg: Config) -> anyhow::Result<Running> {
    spawn_with_path(cfg, None).await
}

/// As [`spawn`], for a config read from `path`: reloads (on a change of the file) read it again.
pub async fn spawn_with_path(
    cfg: Config,
    path: Option<std::path::PathBuf>,
) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let app = App::with_path(cfg, path)?;
    app.start_config_watch();
    let admin_addr = spawn_admin(&app).await?;
    let flusher = app.start_flusher();
    let task = tokio::spawn(listener::serve(listener, routes(app.clone()), app.clone()));
    Ok(Running {
        addr,
        admin_addr,
        app,
        task,
        flusher: Some(flusher),
    })
}

/// Binds `cfg.listen` and serves until SIGTERM or SIGINT; SIGHUP reloads the price table.
/// The config is already validated (OP-4).
pub async fn run(cfg: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let app = App::with_path(cfg, path)?;
    app.start_config_watch();
    let listener = tokio::net::TcpListener::bind(app.cfg().listen).await?;
    serve_until_signal(app, listener).await
}

/// Serves `app` on `listener` until SIGTERM/SIGINT, then shuts down as OP-2 says.
pub async fn serve_until_signal(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let flusher = app.start_flusher();
    spawn_admin(&app).await?;
    let signals = Signals::install();
    tracing::info!(listen = %listener.local_addr()?, "switchyard listening");
    let server = tokio::spawn(listener::serve(listener, routes(app.clone()), app.clone()));
    signals.serve(app.clone()).await;
    app.terminate().await;
    server.await.context("client listener")?;
    flusher.await.context("usage flusher")?;
    tracing::info!(flushed = app.usage.flushed(), "usage flushed; exiting");
    Ok(())
}

impl App {
    /// The config in force.
    pub fn cfg(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    pub fn new(cfg: Config) -> anyhow::Result<Arc<App>> {
        App::with_path(cfg, None)
    }

    /// An app whose config came from `path`, which reloads read again.
    pub fn with_path(cfg: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<Arc<App>> {
        crate::telemetry::metrics_handle();
        crate::telemetry::set_log_format(cfg.log.format);
        let u = &cfg.upstream;
        let settings = ConnSettings {
            ping_interval: u.ping_interval,
            pong_timeout: u.pong_timeout,
            dial_timeout: u.dial_timeout,
            max_message_bytes: usize::try_from(u.max_message_bytes).unwrap_or(usize::MAX),
            max_age: u.max_age,
            min_idle: u.min_idle,
        };
        let prices = Prices::new(cfg.usage.prices.clone()).map_err(anyhow::Error::msg)?;
        let usage = Recorder::open(&cfg.store.path, prices).map_err(anyhow::Error::msg)?;
        let memory = Arc::new(MemoryStore::persistent(usage.store()).map_err(anyhow::Error::msg)?);
        let registry = Arc::new(crate::scheduler::Registry::new(memory.overrides_now()));
        let state = state_store(&cfg.state, memory)?;
        let health = Arc::new(crate::scheduler::health::Health::new(
            registry.clone(),
            state.clone(),
        ));
        health.configure(crate::scheduler::health::BreakerSettings::of(
            &cfg.scheduler,
        ));
        let scheduler = Arc::new(crate::scheduler::Scheduler {
            registry: registry.clone(),
            health: health.clone(),
        });
        let pool = Pool::new(settings, health);
        let limits = Arc::new(crate::limits::Limits::new(state.clone()));
        // UP-7: warm contexts in the background until shutdown.
        let shutdown = CancellationToken::new();
        pool.set_accounts(&cfg.accounts);
        pool.fallback
            .configure(u.ws_failure_burst, u.ws_fallback_cooldown);
        pool.start_maintenance(shutdown.clone());
        let total = usize::try_from(cfg.limits.max_transcript_bytes_total).unwrap_or(usize::MAX);
        let budget = Arc::new(TranscriptBudget::new(total));
        let http_client = crate::upstream::http::client(cfg.upstream.dial_timeout)?;
        let connection_limit = usize::try_from(cfg.server.max_connections)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let drain_timeout = cfg.shutdown.drain_timeout;
        let app = Arc::new(App {
            config: Arc::new(parking_lot::RwLock::new(Arc::new(cfg))),
            config_path: path,
            reloads: tokio::sync::watch::Sender::new(0),
            pool,
            budget,
            usage,
            state,
            registry,
            scheduler,
            limits,
            http_client,
            next_session: AtomicU64::new(1),
            instance: hex::encode(rand::random::<[u8; 4]>()),
            drain: CancellationToken::new(),
            shutdown,
            listener_stop: CancellationToken::new(),
            connection_slots: Arc::new(tokio::sync::Semaphore::new(connection_limit)),
            connections: TaskTracker::new(),
            drain_timeout,
            sessions: TaskTracker::new(),
            http_sessions: http::HttpSessions::default(),
            flush_stop: CancellationToken::new(),
        });
        app.seed_spend();
        app.start_http_reaper();
        app.start_shared_sync();
        Ok(app)
    }

    /// SC-7: on a shared store, the other instances' overrides, breakers and cooldowns are read
    /// back until shutdown.
    fn start_shared_sync(self: &Arc<Self>) {
        if !self.state.shared() {
            return;
        }
        let app = Arc::downgrade(self);
        let accounts = move || {
            app.upgrade()
                .map(|a| a.cfg().accounts.iter().map(|a| a.id.clone()).collect())
                .unwrap_or_default()
        };
        tokio::spawn(crate::scheduler::shared::run(
            self.scheduler.clone(),
            self.state.clone(),
            accounts,
            self.shutdown.clone(),
        ));
    }

    /// SC-6: the spend budgets count what the store has recorded this UTC day and month, so a
    /// restart does not forget it (read once, before any turn is charged).
    fn seed_spend(&self) {
        use crate::limits::periods::{now_utc, Period};
        use crate::usage::store::{GroupBy, Query};
        let now = now_utc();
        let since = |p: Period| Query {
            since_ms: Some(
                i64::try_from(p.start(now))
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000),
            ),
            until_ms: None,
        };
        let sums = {
            let store = self.usage.store();
            let store = store.lock();
            let day = store.summary(&since(Period::Day), Some(GroupBy::Key));
            let month = store.summary(&since(Period::Month), Some(GroupBy::Key));
            match (day, month) {
                (Ok(day), Ok(month)) => (day, month),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "recorded spend not read: budgets start from zero");
                    return;
                }
            }
        };
        let rows: Vec<(String, f64, f64)> = sums
            .1
            .iter()
            .filter_map(|m| {
                let key = m.group.clone()?;
                let day = sums.0.iter().find(|d| d.group.as_ref() == Some(&key));
                Some((key, day.map_or(0.0, |d| d.cost_usd), m.cost_usd))
            })
            .collect();
        let limits = self.limits.clone();
        crate::state::write_soon(async move { limits.seed_spend(&rows).await });
    }

    /// HS-2: HTTP sessions idle past `session.http_session_ttl` end (their transcript with
    /// them); checked a few times per TTL until shutdown.
    fn start_http_reaper(self: &Arc<Self>) {
        let ttl = self.cfg().session.http_session_ttl;
        let every = (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
        let (app, stop) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                match app.upgrade() {
                    Some(app) => app.http_sessions.reap(ttl),
                    None => return,
                }
            }
        });
    }

    /// Flushes usage every `usage.flush_interval` until shutdown, then once more.
    fn start_flusher(&self) -> tokio::task::JoinHandle<()> {
        self.usage
            .spawn_flusher(self.cfg().usage.flush_interval, self.flush_stop.clone())
    }

    /// Whether the relay is draining (OP-2): new requests and upgrades get 503.
    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// OP-2: refuse new work and let running turns finish for up to `shutdown.drain_timeout`;
    /// then close what is left, stop the listener once its connections have sent their last
    /// bytes, and let the flusher write the last records.
    pub async fn terminate(&self) {
        let limit = self.drain_timeout;
        tracing::info!(sessions = self.sessions.len(), drain_timeout = ?limit, "draining");
        metrics::gauge!(crate::telemetry::metric::DRAINING).set(1.0);
        self.drain.cancel();
        if !closed_within(&self.sessions, limit).await {
            tracing::warn!(
                sessions = self.sessions.len(),
                "drain timeout: cutting the turns still running"
            );
        }
        self.close_sessions().await;
        self.listener_stop.cancel();
        if !closed_within(&self.connections, CONNECTION_CLOSE_WAIT).await {
            tracing::warn!(
                connections = self.connections.len(),
                "client connections still open at exit"
            );
        }
    }

    /// Tells every session to close and waits (bounded) until they have, so their usage
    /// records are taken before the last flush; then lets the flusher write it.
    async fn close_sessions(&self) {
        self.drain.cancel();
        self.shutdown.cancel();
        if !closed_within(&self.sessions, SESSION_CLOSE_WAIT).await {
            tracing::warn!(
                open = self.sessions.len(),
                "sessions still open at shutdown"
            );
        }
        self.flush_stop.cancel();
    }
}

/// Closes `tasks` to new ones and waits up to `limit` for the running ones; false if some
/// still run.
async fn closed_within(tasks: &TaskTracker, limit: Duration) -> bool {
    tasks.close();
    tokio::time::timeout(limit, tasks.wait()).await.is_ok()
}

/// The process signals the relay answers, installed before it says it is listening so none
/// sent after that line is missed.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate())
            .inspect_err(
                |e| tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only"),
            )
            .ok();
        let hup = signal(SignalKind::hangup())
            .inspect_err(
                |e| tracing::warn!(error = %e, "no SIGHUP handler; prices reload only at start"),
            )
            .ok();
        Signals { term, hup }
    }

    #[cfg(not(unix))]
    fn install() -> Signals {
        Signals {}
    }

    /// Waits for SIGTERM or Ctrl-C, answering SIGHUP (price reload) meanwhile.
    #[cfg(unix)]
    async fn serve(mut self, app: Arc<App>) {
        loop {
            tokio::select! {
                _ = recv(&mut self.term) => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = recv(&mut self.hup) => reload_prices(&app),
            }
        }
    }

    #[cfg(not(unix))]
    async fn serve(self, _app: Arc<App>) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(unix)]
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGHUP reads `usage.prices` again (config reload arrives with live operations).
fn reload_prices(app: &App) {
    app.reload_and_log();
    match app.usage.reload_prices() {
        Ok(()) => tracing::info!(source = %app.usage.price_source(), "prices reloaded"),
        Err(e) => tracing::error!(error = %e, "price reload failed; the old table stays"),
    }
}

fn routes(app: Arc<App>) -> Router {
    let responses = || get(ws::entry).post(http::create);
    // The admin API is on the client listener unless `admin.listen` gives it its own.
    let admin = if app.cfg().admin.listen.is_none() {
        admin::routes()
    } else {
        Router::new()
    };
    Router::new()
        .merge(admin)
        .route("/v1/responses", responses())
        .route("/responses", responses())
        .route("/backend-api/codex/responses", responses())
        // The HTTP ingress applies `limits.max_client_message_bytes` itself, with a JSON error.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(app)
}
