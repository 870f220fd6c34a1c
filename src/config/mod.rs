//! Typed configuration (SPEC §2): one YAML file, a default for every key, unknown keys refused.
//!
//! Loading runs two passes so the operator sees every mistake at once, each with its path in the
//! file (OP-4). `parse` deserializes with serde — the structs below, with `deny_unknown_fields`,
//! are the only list of key names — pruning each bad node and retrying. `validate` then checks
//! meaning (ranges, credentials, URLs, duplicates) and resolves secrets (`*_env`, key digests),
//! so a loaded `Config` is ready to use and nothing reads the environment later.
//!
//! A key is added here when its behaviour lands, never before (SPEC §2).

mod error;
mod parse;
#[cfg(test)]
mod tests;
mod validate;
mod value;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use error::{ConfigError, ConfigErrors};
pub use value::{AccountMode, Secret};

/// The whole config file. `Config::default()` is what an empty file means.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of settings")]
pub struct Config {
    /// Client listener: WS, HTTP, health and metrics.
    pub listen: SocketAddr,
    #[serde(deserialize_with = "value::null_as_default")]
    pub ingress: IngressConfig,
    /// The admin API (TM-3): off unless a token is set.
    #[serde(deserialize_with = "value::null_as_default")]
    pub admin: AdminConfig,
    /// The relay's own API keys, presented by clients.
    #[serde(deserialize_with = "value::null_as_default")]
    pub keys: Vec<KeyConfig>,
    /// Upstream accounts turns are scheduled onto.
    #[serde(deserialize_with = "value::null_as_default")]
    pub accounts: Vec<AccountConfig>,
    /// Upstream connection timing and limits.
    #[serde(deserialize_with = "value::null_as_default")]
    pub upstream: UpstreamConfig,
    #[serde(deserialize_with = "value::null_as_default")]
    pub limits: LimitsConfig,
    #[serde(deserialize_with = "value::null_as_default")]
    pub session: SessionConfig,
    /// The embedded store (usage records, admin overrides).
    #[serde(deserialize_with = "value::null_as_default")]
    pub store: StoreConfig,
    /// Usage recording and pricing (US-1, US-2).
    #[serde(deserialize_with = "value::null_as_default")]
    pub usage: UsageConfig,
    /// Account choice, breakers and bindings (SC-2, SC-5).
    #[serde(deserialize_with = "value::null_as_default")]
    pub scheduler: SchedulerConfig,
    /// Where shared state lives (SC-7).
    #[serde(deserialize_with = "value::null_as_default")]
    pub state: StateConfig,
    /// Limits on the client listener's connections and request heads.
    #[serde(deserialize_with = "value::null_as_default")]
    pub server: ServerConfig,
    /// Graceful shutdown (OP-2).
    #[serde(deserialize_with = "value::null_as_default")]
    pub shutdown: ShutdownConfig,
    /// Log output (OP-3).
    #[serde(deserialize_with = "value::null_as_default")]
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            ingress: IngressConfig::default(),
            admin: AdminConfig::default(),
            keys: Vec::new(),
            accounts: Vec::new(),
            upstream: UpstreamConfig::default(),
            limits: LimitsConfig::default(),
            session: SessionConfig::default(),
            store: StoreConfig::default(),
            usage: UsageConfig::default(),
            scheduler: SchedulerConfig::default(),
            state: StateConfig::default(),
            server: ServerConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// What the client listener accepts before a request reaches a handler.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of server settings"
)]
pub struct ServerConfig {
    /// A request's head (an upgrade's too) must have arrived within this long.
    #[serde(deserialize_with = "value::duration")]
    pub handshake_timeout: Duration,
    /// Request heads larger than this get 431.
    pub max_header_bytes: u64,
    /// Open client connections (sockets included) beyond this get 503 at once.
    pub max_connections: u64,
    /// A request body must have arrived whole within this long after its head (each wait for
    /// more of it is bounded by `handshake_timeout` too), else 408: a body sent a byte at a
    /// time cannot hold a connection.
    #[serde(deserialize_with = "value::duration")]
    pub body_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16384,
            max_connections: 10000,
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// OP-2: how long running turns may finish after SIGTERM.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of shutdown settings"
)]
pub struct ShutdownConfig {
    #[serde(deserialize_with = "value::duration")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Log lines as text for people or JSON for collectors (OP-3).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of log settings")]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "`text` or `json`")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The per-turn account choice (SC-2) and the circuit breaker (SC-5).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of scheduler settings"
)]
pub struct SchedulerConfig {
    /// Consecutive upstream failures of an account that open its breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the account out (also a 429 without `Retry-After`).
    #[serde(deserialize_with = "value::duration")]
    pub breaker_cooldown: Duration,
    /// Turns let through at once when the cooldown is over (half-open).
    pub breaker_probes: u32,
    /// How long a stored response stays bound to its account (SC-2).
    #[serde(deserialize_with = "value::duration")]
    pub binding_ttl: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            breaker_probes: 1,
            binding_ttl: Duration::from_secs(60 * 60),
        }
    }
}

/// Which `StateStore` backend holds what relay instances share (SC-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "`memory` or `redis`")]
pub enum StateBackend {
    Memory,
    Redis,
}

/// Shared state (SC-7): in this process, or in Redis for several instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of state settings"
)]
pub struct StateConfig {
    pub backend: StateBackend,
    pub redis_url: String,
    /// Every Redis key starts with `<redis_prefix>:`, so deployments can share one Redis.
    pub redis_prefix: String,
    /// How long a slot lease lasts unless renewed; a crashed instance's slots free within it.
    #[serde(deserialize_with = "value::duration")]
    pub lease_ttl: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: StateBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "switchyard".into(),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// The admin API: `/admin/v1/...`, bearer `token`, on `listen` (default: the client listener).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of admin settings"
)]
pub struct AdminConfig {
    /// A listener of its own for `/admin/...`; then the client listener does not serve it.
    pub listen: Option<SocketAddr>,
    token: Option<Secret>,
    token_env: Option<String>,
    #[serde(skip)]
    resolved_token: Option<Secret>,
}

impl AdminConfig {
    /// The admin bearer token; `None` means the admin API is off.
    pub fn token(&self) -> Option<&Secret> {
        self.resolved_token.as_ref()
    }

    /// For configs built in code (tests, the embedded default).
    pub fn with_token(token: impl Into<String>) -> AdminConfig {
        AdminConfig {
            resolved_token: Some(Secret::new(token)),
            ..AdminConfig::default()
        }
    }
}

/// Which client protocols are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of ingress settings"
)]
pub struct IngressConfig {
    /// `false` answers every upgrade with 426 so clients fall back to HTTP (WS-3).
    pub websocket: bool,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig { websocket: true }
    }
}

/// One client API key. The key itself is kept only as its SHA-256 digest, so the running relay
/// never holds (or logs) the plaintext and `key_sha256` entries work the same as literal ones.
#[derive(Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a key entry (id, key | key_env | key_sha256)"
)]
pub struct KeyConfig {
    /// Names the key in logs, usage records and the admin API.
    pub id: String,
    key: Option<Secret>,
    key_env: Option<String>,
    key_sha256: Option<String>,
    /// A disabled key is still recognised (so the refusal can say why) but not admitted.
    pub disabled: bool,
    /// `false` refuses this key's WebSocket upgrades; its HTTP requests still work.
    pub websocket: bool,
    /// Models this key may use (same patterns as an account's); others get 403
    /// `model_not_allowed`.
    pub models: Vec<String>,
    /// SC-6: what this key may use; none set means unlimited.
    #[serde(deserialize_with = "value::null_as_default")]
    pub limits: KeyLimits,
    #[serde(skip)]
    digest: [u8; 32],
}

/// Per-key limits (SC-6); each absent one is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of key limits")]
pub struct KeyLimits {
    /// Requests per minute (sliding window; warm-ups exempt).
    pub rpm: Option<u64>,
    /// Tokens per minute (sliding window; charged when a turn ends, estimates included).
    pub tpm: Option<u64>,
    /// Turns running at once across the key's sockets and HTTP requests.
    pub concurrent_turns: Option<usize>,
    /// WebSocket connections open at once.
    pub concurrent_sockets: Option<usize>,
    /// Spend per UTC day, USD, from recorded cost.
    pub daily_budget_usd: Option<f64>,
    /// Spend per UTC month, USD, from recorded cost.
    pub monthly_budget_usd: Option<f64>,
}

impl Default for KeyConfig {
    fn default() -> Self {
        KeyConfig {
            id: String::new(),
            key: None,
            key_env: None,
            key_sha256: None,
            disabled: false,
            websocket: true,
            models: vec!["*".to_owned()],
            limits: KeyLimits::default(),
            digest: [0; 32],
        }
    }
}

impl KeyConfig {
    /// A key given literally, for configs built in code (tests, embedded defaults).
    pub fn new(id: impl Into<String>, key: impl Into<String>) -> Self {
        let key = Secret::new(key);
        KeyConfig {
            id: id.into(),
            digest: sha256(key.expose()),
            key: Some(key),
            ..KeyConfig::default()
        }
    }

    /// Whether this key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        model_matches(&self.models, model)
    }

    /// SHA-256 of the key, the only form the relay compares.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

impl fmt::Debug for KeyConfig {
    // Hand-written so neither the key nor its digest (brute-forceable if the key is weak) is
    // printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("key_env", &self.key_env)
            .field("key_sha256", &self.key_sha256.as_ref().map(|_| "***"))
            .field("disabled", &self.disabled)
            .field("websocket", &self.websocket)
            .field("models", &self.models)
            .field("limits", &self.limits)
            .finish()
    }
}

/// One upstream account.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "an account entry (id, base_url, api_key | api_key_env, ...)"
)]
pub struct AccountConfig {
    /// Names the account in logs, metrics, usage records and the admin API.
    pub id: String,
    /// e.g. `https://api.openai.com/v1`; `/responses` is appended (see `ws_url`, `http_url`).
    pub base_url: String,
    api_key: Option<Secret>,
    api_key_env: Option<String>,
    pub mode: AccountMode,
    /// Models this account serves: exact names, prefixes ending in `*`, or `*` for all.
    pub models: Vec<String>,
    /// Upper bound on upstream WebSocket contexts held open for this account.
    pub max_conns: usize,
    /// Turns running at once on this account (SC-3); an idle socket holds no slot.
    pub concurrency: usize,
    /// SC-2: the lowest number among eligible accounts is tried first; others are fallbacks.
    pub priority: u32,
    /// SC-2: the account's share of its priority tier, relative to the others' (capacity is
    /// `concurrency × weight`).
    pub weight: f64,
    /// Extra headers sent upstream; names the relay sets itself are refused at load.
    #[serde(deserialize_with = "value::null_as_default")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip)]
    resolved_api_key: Secret,
}

impl Default for AccountConfig {
    fn default() -> Self {
        AccountConfig {
            id: String::new(),
            base_url: String::new(),
            api_key: None,
            api_key_env: None,
            mode: AccountMode::default(),
            models: vec!["*".to_owned()],
            max_conns: 16,
            concurrency: 16,
            priority: 0,
            weight: 1.0,
            headers: BTreeMap::new(),
            resolved_api_key: Secret::default(),
        }
    }
}

impl AccountConfig {
    /// An account with a literal key and every other field at its default, for configs built in
    /// code (tests, embedded defaults).
    pub fn new(
        id: impl Into<String>,
        base_url: impl Into<String>,
        api_key: impl Into<String>,
    ) -> Self {
        let api_key = Secret::new(api_key);
        AccountConfig {
            id: id.into(),
            base_url: base_url.into(),
            resolved_api_key: api_key.clone(),
            api_key: Some(api_key),
            ..AccountConfig::default()
        }
    }

    /// The upstream API key, whichever way the file gave it (`api_key` or `api_key_env`).
    pub fn api_key(&self) -> &Secret {
        &self.resolved_api_key
    }

    /// The upstream WebSocket URL: `base_url` + `/responses`, `http`→`ws`, `https`→`wss`, which is
    /// how Codex derives it (SPEC §2).
    pub fn ws_url(&self) -> String {
        match split_scheme(&self.base_url) {
            Some((true, rest)) => format!("wss://{}/responses", rest.trim_end_matches('/')),
            Some((false, rest)) => format!("ws://{}/responses", rest.trim_end_matches('/')),
            None => format!("{}/responses", self.base_url.trim_end_matches('/')),
        }
    }

    /// The upstream HTTP URL: `base_url` + `/responses`.
    pub fn http_url(&self) -> String {
        match split_scheme(&self.base_url) {
            Some((true, rest)) => format!("https://{}/responses", rest.trim_end_matches('/')),
            Some((false, rest)) => format!("http://{}/responses", rest.trim_end_matches('/')),
            None => format!("{}/responses", self.base_url.trim_end_matches('/')),
        }
    }

    /// Whether `model` matches an entry of `models` (exact, `prefix*`, or `*`).
    pub fn serves_model(&self, model: &str) -> bool {
        model_matches(&self.models, model)
    }
}

/// Whether `model` matches one of `patterns`: exact names, prefixes ending in `*`, `*` for all.
fn model_matches(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|m| match m.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => m == model,
    })
}

/// Splits `http://` / `https://` (any case) off a URL: `(is_tls, rest)`.
pub(crate) fn split_scheme(url: &str) -> Option<(bool, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme.eq_ignore_ascii_case("https") {
        Some((true, rest))
    } else if scheme.eq_ignore_ascii_case("http") {
        Some((false, rest))
    } else {
        None
    }
}

/// Upstream connections: keepalive, dialing and the limits on what the upstream sends (§7).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of upstream settings"
)]
pub struct UpstreamConfig {
    /// How often every upstream context, idle or leased, is pinged (UP-4).
    #[serde(deserialize_with = "value::duration")]
    pub ping_interval: Duration,
    /// No pong within this long marks that context's generation broken (UP-4).
    #[serde(deserialize_with = "value::duration")]
    pub pong_timeout: Duration,
    /// Upper bound on one upstream dial (UP-8).
    #[serde(deserialize_with = "value::duration")]
    pub dial_timeout: Duration,
    /// Largest upstream event in bytes; a larger one closes that context (handled as CT-9).
    pub max_message_bytes: u64,
    /// No upstream event for this long during a turn is handled as CT-9.
    #[serde(deserialize_with = "value::duration")]
    pub stream_idle_timeout: Duration,
    /// Transparent retries of one turn on a fresh context (CT-8/CT-9); 0 never retries.
    pub retry_budget: u32,
    /// A context older than this is replaced between turns (UP-5).
    #[serde(deserialize_with = "value::duration")]
    pub max_age: Duration,
    /// Warm idle contexts kept dialed per account (UP-7).
    pub min_idle: usize,
    /// Every account uses the `http` transport upstream; ingress is unaffected (TM-1).
    pub force_http: bool,
    /// TM-4: WebSocket failures of an account within `ws_fallback_cooldown` that send its new
    /// turns over `http` for `ws_fallback_cooldown`.
    pub ws_failure_burst: usize,
    #[serde(deserialize_with = "value::duration")]
    pub ws_fallback_cooldown: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(10),
            max_message_bytes: 64 * 1024 * 1024,
            stream_idle_timeout: Duration::from_secs(240),
            retry_budget: 1,
            max_age: Duration::from_secs(55 * 60),
            min_idle: 0,
            force_http: false,
            ws_failure_burst: 3,
            ws_fallback_cooldown: Duration::from_secs(30),
        }
    }
}

/// Size limits on what clients send and on what the relay keeps for them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a mapping of limits")]
pub struct LimitsConfig {
    /// Largest client frame or request body in bytes (WS-6). Codex sends whole transcripts, so
    /// the default is generous.
    pub max_client_message_bytes: u64,
    /// Largest transcript one session keeps for replay, in bytes (CT-6).
    pub max_transcript_bytes: u64,
    /// All sessions' transcripts together, in bytes; the least recently used session's is
    /// evicted first (CT-6). At least `max_transcript_bytes`.
    pub max_transcript_bytes_total: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_client_message_bytes: 32 * 1024 * 1024,
            max_transcript_bytes: 64 * 1024 * 1024,
            max_transcript_bytes_total: 2 * 1024 * 1024 * 1024,
        }
    }
}

/// Per-session timing and buffering.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of session settings"
)]
pub struct SessionConfig {
    /// How often the relay pings the client socket (WS-8).
    #[serde(deserialize_with = "value::duration")]
    pub client_ping_interval: Duration,
    /// No pong for this long closes the client socket (WS-8).
    #[serde(deserialize_with = "value::duration")]
    pub client_idle_timeout: Duration,
    /// Errors held back during a turn; one more closes the socket with 1008 (§3).
    pub max_held_errors: usize,
    /// Events buffered between the upstream reader and the client writer (TP-2).
    pub pump_channel: usize,
    /// No request for this long closes the socket with 1000 (WS-8).
    #[serde(deserialize_with = "value::duration")]
    pub idle_timeout: Duration,
    /// No first frame within this long closes the socket with 1008 (WS-8).
    #[serde(deserialize_with = "value::duration")]
    pub first_message_timeout: Duration,
    /// What a `response.create` during a running turn does (TP-5).
    pub preempt_policy: PreemptPolicy,
    /// Requests waiting behind the running one under `queue`; more get 409 (TP-5).
    pub queue_depth: usize,
    /// Upper bound on closing a turn's upstream after the client left or preempted (TP-4).
    #[serde(deserialize_with = "value::duration")]
    pub cancel_grace: Duration,
    /// How long a turn waits for an account slot or context, then 503 `no_capacity` (SC-3).
    #[serde(deserialize_with = "value::duration")]
    pub admission_timeout: Duration,
    /// An HTTP session's transcript is dropped after this long without a request (HS-2).
    #[serde(deserialize_with = "value::duration")]
    pub http_session_ttl: Duration,
}

/// TP-5: a new `response.create` while a turn runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptPolicy {
    /// The running turn is cut (no terminal) and the new one starts.
    #[default]
    Preempt,
    /// The new request gets 409 `response_in_progress` after the running turn's terminal.
    Reject,
    /// The new request runs after the running turn (`queue_depth` may wait).
    Queue,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            client_ping_interval: Duration::from_secs(20),
            client_idle_timeout: Duration::from_secs(60),
            max_held_errors: 16,
            pump_channel: 64,
            idle_timeout: Duration::from_secs(60 * 60),
            first_message_timeout: Duration::from_secs(30),
            preempt_policy: PreemptPolicy::Preempt,
            queue_depth: 1,
            cancel_grace: Duration::from_secs(2),
            admission_timeout: Duration::from_secs(30),
            http_session_ttl: Duration::from_secs(30 * 60),
        }
    }
}

/// The embedded SQLite store.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of store settings"
)]
pub struct StoreConfig {
    /// The database file; created with its directory's permissions when missing.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("./switchyard.db"),
        }
    }
}

/// Usage records: how often they are written, and what they cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a mapping of usage settings"
)]
pub struct UsageConfig {
    /// Records are written to the store in one batch this often (and on shutdown).
    #[serde(deserialize_with = "value::duration")]
    pub flush_interval: Duration,
    /// A YAML price table replacing the built-in one (US-2); read again on SIGHUP.
    pub prices: Option<PathBuf>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            flush_interval: Duration::from_secs(1),
            prices: None,
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`, reporting every error with its path.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Config::from_yaml_str(&text)
    }

    /// Parses and validates YAML text; `*_env` names are looked up in the process environment.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml_str_with_env(text, &|name| std::env::var(name).ok())
    }

    /// As `from_yaml_str`, with `env` standing in for the environment, so tests need not mutate
    /// the process environment (which races with other threads).
    pub fn from_yaml_str_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let parsed = parse::parse::<Config>(text)?;
        let mut cfg = parsed.value;
        let mut errors = parsed.errors;
        errors.extend(validate::validate(&mut cfg, &parsed.pruned, env));
        parse::sort_by_file_order(&mut errors, &parsed.order);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors::new(errors))
        }
    }

    /// Checks a config built or changed in code, resolving `*_env` secrets and key digests as
    /// `load` does.
    pub fn validate(&mut self) -> Result<(), ConfigErrors> {
        let errors = validate::validate(self, &HashSet::new(), &|name| std::env::var(name).ok());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors::new(errors))
        }
    }

    /// The key whose digest matches `presented`, disabled or not (the caller decides what a
    /// disabled key gets). Every key is compared in constant time and none is skipped, so the
    /// timing says nothing about which key, or how much of one, matched.
    pub fn find_key(&self, presented: &str) -> Option<&KeyConfig> {
        let digest = sha256(presented);
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found
    }
}

pub(crate) fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}
