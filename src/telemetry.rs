//! Logging (tracing) and the metrics registry (Prometheus text on `/metrics`). Every item adds
//! its series to [`metric`]; the registry is process-wide, installed on first use.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;

/// The most characters of one outside string (a model name, an error message) a log line
/// carries.
const LOG_FIELD_CHARS: usize = 160;

/// An outside string as it goes into a log line: control characters escaped and at most
/// [`LOG_FIELD_CHARS`] characters, so a request can neither forge log lines nor flood the log.
pub fn loggable(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(LOG_FIELD_CHARS));
    for (i, c) in s.chars().enumerate() {
        if i == LOG_FIELD_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Metric names, in one place so the catalogue is easy to read.
pub mod metric {
    pub const CLIENT_SOCKETS_OPEN: &str = "switchyard_client_sockets_open";
    /// HTTP sessions (HS-2) alive, idle ones included.
    pub const HTTP_SESSIONS_OPEN: &str = "switchyard_http_sessions_open";
    pub const UPGRADES_REFUSED: &str = "switchyard_ws_upgrades_refused_total";
    pub const CLIENT_FRAMES_REFUSED: &str = "switchyard_client_frames_refused_total";
    pub const CLOSE_CODES_SENT: &str = "switchyard_close_codes_sent_total";
    pub const TURNS: &str = "switchyard_turns_total";
    pub const UPSTREAM_DIALS: &str = "switchyard_upstream_dials_total";
    pub const UPSTREAM_REUSES: &str = "switchyard_upstream_reuses_total";
    pub const UPSTREAM_BROKEN: &str = "switchyard_upstream_broken_total";
    pub const REPLAYS: &str = "switchyard_transcript_replays_total";
    pub const RETRIES: &str = "switchyard_turn_retries_total";
    /// TP-8, from the request read: waiting for the key's and account's capacity.
    pub const ADMISSION_WAIT: &str = "switchyard_turn_admission_wait_seconds";
    /// TP-8: until the request was written upstream.
    pub const TIME_TO_UPSTREAM_WRITE: &str = "switchyard_turn_time_to_upstream_write_seconds";
    /// The relay's own share before the upstream sees a turn: from admission to the upstream
    /// write (a dial when no context was warm, the rewrite, the write).
    pub const RELAY_ADDED: &str = "switchyard_turn_relay_added_seconds";
    pub const TIME_TO_FIRST_EVENT: &str = "switchyard_turn_time_to_first_event_seconds";
    pub const TIME_TO_FIRST_TOKEN: &str = "switchyard_turn_time_to_first_token_seconds";
    pub const TURN_DURATION: &str = "switchyard_turn_duration_seconds";
    pub const WS_FAILURES: &str = "switchyard_upstream_ws_failures_total";
    pub const WS_FALLBACKS: &str = "switchyard_upstream_ws_fallbacks_total";
    /// Upstream failures counted against an account's breaker (SC-5).
    pub const ACCOUNT_FAILURES: &str = "switchyard_account_failures_total";
    pub const BREAKER_OPENED: &str = "switchyard_breaker_opened_total";
    /// 0 closed, 1 open (half-open shows as closed again once a probe succeeds).
    pub const BREAKER_STATE: &str = "switchyard_breaker_open";
    pub const ACCOUNT_COOLDOWNS: &str = "switchyard_account_cooldowns_total";
    pub const ACCOUNTS_AUTO_DISABLED: &str = "switchyard_accounts_auto_disabled_total";
    /// Account choices by how they were made: `bound`, `sticky`, `balanced` (SC-2).
    pub const ACCOUNT_CHOICES: &str = "switchyard_account_choices_total";
    /// Turns moved to another account before any output (SC-4).
    pub const FAILOVERS: &str = "switchyard_turn_failovers_total";
    /// Requests and sockets refused by a per-key limit (SC-6), by key and limit.
    pub const LIMIT_REJECTIONS: &str = "switchyard_limit_rejections_total";
    /// 1 while Redis is unreachable and shared state is this instance's memory (SC-7).
    pub const STATE_DEGRADED: &str = "switchyard_state_degraded";
    /// Times Redis became unreachable.
    pub const STATE_OUTAGES: &str = "switchyard_state_outages_total";
    /// Open client connections (HTTP and WebSocket), under `server.max_connections`.
    pub const CONNECTIONS_OPEN: &str = "switchyard_client_connections_open";
    /// Connections turned away at accept, by reason (`max_connections`).
    pub const CONNECTIONS_REFUSED: &str = "switchyard_connections_refused_total";
    /// 1 from SIGTERM until exit (OP-2).
    pub const DRAINING: &str = "switchyard_draining";
    pub const SESSIONS_RUNNING: &str = "switchyard_sessions_running";
    pub const POOL_COUNTS: &str = "switchyard_upstream_pool";
    pub const USAGE_FLUSHED: &str = "switchyard_usage_records_flushed_total";
    pub const USAGE_PENDING: &str = "switchyard_usage_records_pending";
    pub const USAGE_UNPRICED: &str = "switchyard_usage_unpriced_total";
    pub const USAGE_TOKENS: &str = "switchyard_usage_tokens_total";
    pub const USAGE_COST_MICRO_USD: &str = "switchyard_usage_cost_micro_usd_total";
    /// Full JSON parses of upstream events (terminal and error events only; never deltas).
    pub const EVENT_FULL_PARSES: &str = "switchyard_event_full_parses_total";
    /// Upstream events whose `type` was not first and needed a scan to find.
    pub const EVENT_TYPE_SCANS: &str = "switchyard_event_type_scans_total";
}

/// Histogram buckets for latencies, 100 µs to 5 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded into their buckets. Between scrapes the recorder
/// keeps raw samples; without this a relay nobody scrapes would hold every one of them.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the recorder once per process and returns the handle that renders it.
pub fn metrics_handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS).ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    let upkeep = h.clone();
                    let spawned = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(UPKEEP_EVERY);
                            upkeep.run_upkeep();
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "no metrics upkeep: histograms fold at scrapes only");
                    }
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The log line formatter, swapped in place when `log.format` changes (OP-3).
type Formatter = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

static FORMAT: OnceLock<reload::Handle<Formatter, tracing_subscriber::Registry>> = OnceLock::new();

use tracing_subscriber::reload;

/// Log targets of dependencies that write request heads (credentials included) at some level,
/// and the most verbose level the relay lets through from them whatever `RUST_LOG` says.
const SECRET_BEARING: &[(&str, tracing::Level)] = &[
    // Every handshake request, `Authorization: Bearer <account key>` included, at TRACE.
    ("tungstenite::handshake", tracing::Level::DEBUG),
];

/// `filter` with [`SECRET_BEARING`] held to its caps. A cap is added only where `filter` would
/// let more through: the added directive is the most specific for its target, so it wins over
/// whatever `RUST_LOG` says, and the filter's most verbose level (which every disabled log
/// call on the hot path is compared with first) stays as `RUST_LOG` set it.
fn secret_free(mut filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::Layer;
    for (target, cap) in SECRET_BEARING {
        let max = Layer::<tracing_subscriber::Registry>::max_level_hint(&filter);
        if max.is_none_or(|m| m > LevelFilter::from_level(*cap)) {
            match format!("{target}={cap}").parse() {
                Ok(d) => filter = filter.add_directive(d),
                Err(e) => eprintln!("log cap for {target} not applied: {e}"),
            }
        }
    }
    filter
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`) and never with a dependency's
/// secret-bearing lines ([`SECRET_BEARING`]), as text until a config says otherwise
/// ([`set_log_format`]).
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = secret_free(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    let (format, handle) = reload::Layer::new(formatter(LogFormat::Text));
    let installed = tracing_subscriber::registry()
        .with(format)
        .with(filter)
        .try_init();
    if installed.is_ok() {
        let _ = FORMAT.set(handle);
    }
}

/// Puts `log.format` in force (at start and at every reload); a no-op where the process did
/// not install the relay's logging (tests).
pub fn set_log_format(format: LogFormat) {
    if let Some(handle) = FORMAT.get() {
        if let Err(e) = handle.reload(formatter(format)) {
            tracing::warn!(error = %e, "log.format not applied");
        }
    }
}

/// Text for people; for collectors one JSON object per line, with the current span and its
/// parents (session, turn) as fields.
fn formatter(format: LogFormat) -> Formatter {
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json().with_current_span(true).with_span_list(true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `filter` (as `RUST_LOG` would give it, capped) lets through of three log calls:
    /// the handshake's trace line, a debug line of the same target, another crate's trace.
    fn logged(filter: &str) -> (bool, bool, bool) {
        use std::io::Write;
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(move || out.clone()))
            .with(secret_free(tracing_subscriber::EnvFilter::new(filter)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "tungstenite::handshake::client", "Request: secret-a");
            tracing::debug!(target: "tungstenite::handshake::client", "shown-b");
            tracing::trace!(target: "tungstenite::protocol", "frame-c");
        });
        let text = String::from_utf8_lossy(&buf.0.lock()).into_owned();
        (
            text.contains("secret-a"),
            text.contains("shown-b"),
            text.contains("frame-c"),
        )
    }

    #[test]
    fn dependencies_that_write_credentials_are_capped_whatever_rust_log_says() {
        assert_eq!(logged("trace"), (false, true, true));
        assert_eq!(logged("tungstenite=trace"), (false, true, true));
        assert_eq!(logged("tungstenite::handshake=trace"), (false, true, false));
        assert_eq!(logged("info"), (false, false, false));
        // The cap never makes the filter more verbose: disabled calls stay one comparison.
        use tracing_subscriber::Layer;
        let info = secret_free(tracing_subscriber::EnvFilter::new("info"));
        assert_eq!(
            Layer::<tracing_subscriber::Registry>::max_level_hint(&info),
            Some(tracing_subscriber::filter::LevelFilter::INFO)
        );
    }

    #[test]
    fn loggable_escapes_line_breaks_and_bounds_the_length() {
        let forged = "gpt-x\n2026-12-07T00:00:00Z  WARN forged\r\u{1b}[31m";
        let shown = loggable(forged);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("gpt-x\\n2026"), "{shown}");
        assert_eq!(loggable("gpt-5.1-codex"), "gpt-5.1-codex");
        let long = loggable(&"é".repeat(10_000));
        assert_eq!(long.chars().count(), LOG_FIELD_CHARS + 1);
    }
}
