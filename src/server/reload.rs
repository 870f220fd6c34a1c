//! Config reload (TM-3): on SIGHUP and when the file changes, the file is read and checked
//! again; a valid one replaces the config in force without dropping a session, an invalid one
//! is refused with its errors and the old one stays. What a reload changes applies from the
//! next use: keys at the next request or upgrade (and sessions of a removed or disabled key
//! close after their running turn, WS-8), accounts at the next turn, session timings for new
//! sessions, `server.*` limits for new connections, `log.format` at once. `listen`,
//! `admin.listen`, `store.path`, `state.*`, `server.max_connections` and
//! `shutdown.drain_timeout` need a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::App;
use crate::config::{Config, ConfigErrors};

/// How often the config file's modification time is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(2);

impl App {
    /// The shared handle sessions read the config in force from.
    pub fn config_handle(&self) -> Arc<parking_lot::RwLock<Arc<Config>>> {
        self.config.clone()
    }

    /// Reads `config_path` again and applies it; on errors nothing changes.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let Some(path) = self.config_path.as_deref() else {
            return Ok(());
        };
        let new = Config::load(path)?;
        self.apply(new);
        Ok(())
    }

    /// Puts `new` in force.
    pub fn apply(&self, new: Config) {
        let old = self.cfg();
        for (what, changed) in [
            ("listen", old.listen != new.listen),
            ("admin.listen", old.admin.listen != new.admin.listen),
            ("store.path", old.store.path != new.store.path),
            (
                "server.max_connections",
                old.server.max_connections != new.server.max_connections,
            ),
            (
                "shutdown.drain_timeout",
                old.shutdown.drain_timeout != new.shutdown.drain_timeout,
            ),
            ("state", {
                let (a, b) = (&old.state, &new.state);
                (a.backend, &a.redis_url, &a.redis_prefix, a.lease_ttl)
                    != (b.backend, &b.redis_url, &b.redis_prefix, b.lease_ttl)
            }),
        ] {
            if changed {
                tracing::warn!(
                    key = what,
                    "changed in the file; applies at the next restart"
                );
            }
        }
        self.pool.set_accounts(&new.accounts);
        let u = &new.upstream;
        self.pool
            .fallback
            .configure(u.ws_failure_burst, u.ws_fallback_cooldown);
        self.scheduler
            .health
            .configure(crate::scheduler::health::BreakerSettings::of(
                &new.scheduler,
            ));
        if old.log.format != new.log.format {
            crate::telemetry::set_log_format(new.log.format);
        }
        *self.config.write() = Arc::new(new);
        self.reloads.send_modify(|n| *n += 1);
        tracing::info!("config reloaded");
    }

    /// Reloads and logs the outcome (SIGHUP, file change).
    pub fn reload_and_log(&self) {
        match self.reload() {
            Ok(()) => {}
            Err(errors) => {
                tracing::error!(
                    count = errors.len(),
                    "config reload refused; the old config stays"
                );
                for e in errors.iter() {
                    tracing::error!(error = %e, "config reload");
                }
            }
        }
    }

    /// Watches `config_path` and reloads when its modification time changes, until shutdown.
    pub fn start_config_watch(self: &Arc<Self>) {
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let (app, stop) = (Arc::downgrade(self), self.shutdown.clone());
        tokio::spawn(async move {
            let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = mtime(&path);
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let now = mtime(&path);
                if now != seen {
                    seen = now;
                    match app.upgrade() {
                        Some(app) => app.reload_and_log(),
                        None => return,
                    }
                }
            }
        });
    }
}
