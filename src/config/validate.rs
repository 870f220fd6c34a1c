//! The meaning pass: ranges, required fields, credentials, URLs and duplicates, with secrets
//! resolved on the way. Runs after `parse`, on its pruned result, so it also reports problems in
//! parts of the file that had type errors elsewhere (OP-4).

use std::collections::{HashMap, HashSet};

use super::{sha256, split_scheme, AccountConfig, Config, ConfigError, KeyConfig, Secret};

/// Header names the relay sets on upstream requests itself; letting an account override them
/// would break auth, framing or the WebSocket handshake.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "openai-beta",
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
];

/// The smallest sensible client message limit: below it even a one-line request is refused.
const MIN_CLIENT_MESSAGE_BYTES: u64 = 1024;

/// The smallest sensible upstream event limit: below it even `response.created` is refused.
const MIN_UPSTREAM_MESSAGE_BYTES: u64 = 1024;

/// The smallest sensible per-session transcript limit: below it not even one short exchange
/// could be replayed.
const MIN_TRANSCRIPT_BYTES: u64 = 1024;

struct Checker<'a> {
    errors: Vec<ConfigError>,
    /// Paths `parse` already reported and pruned; their default stand-ins are not judged again.
    pruned: &'a HashSet<String>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Checker<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        if !self.pruned.contains(&path) {
            self.errors.push(ConfigError::new(path, message));
        }
    }

    fn pruned(&self, path: &str) -> bool {
        self.pruned.contains(path)
    }

    /// Reads a secret from the environment variable named at `path`.
    fn env_secret(&mut self, path: &str, name: &str) -> Option<Secret> {
        if name.is_empty() || name.contains(['=', '\0']) {
            self.error(path, "must be the name of an environment variable");
            return None;
        }
        match (self.env)(name) {
            Some(value) if !value.is_empty() => Some(Secret::new(value)),
            Some(_) => {
                self.error(path, format!("environment variable {name} is empty"));
                None
            }
            None => {
                self.error(path, format!("environment variable {name} is not set"));
                None
            }
        }
    }
}

pub(super) fn validate(
    cfg: &mut Config,
    pruned: &HashSet<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<ConfigError> {
    let mut c = Checker {
        errors: Vec::new(),
        pruned,
        env,
    };
    check_upstream(cfg, &mut c);
    check_limits(cfg, &mut c);
    check_session(cfg, &mut c);
    check_usage(cfg, &mut c);
    check_scheduler(cfg, &mut c);
    check_state(cfg, &mut c);
    check_server(cfg, &mut c);
    check_admin(&mut cfg.admin, &mut c);
    check_keys(&mut cfg.keys, &mut c);
    check_accounts(&mut cfg.accounts, &mut c);
    c.errors
}

fn check_upstream(cfg: &Config, c: &mut Checker<'_>) {
    let u = &cfg.upstream;
    for (name, value) in [
        ("ping_interval", u.ping_interval),
        ("pong_timeout", u.pong_timeout),
        ("dial_timeout", u.dial_timeout),
        ("stream_idle_timeout", u.stream_idle_timeout),
        ("max_age", u.max_age),
        ("ws_fallback_cooldown", u.ws_fallback_cooldown),
    ] {
        if value.is_zero() {
            c.error(format!("upstream.{name}"), "must be greater than zero");
        }
    }
    if u.ws_failure_burst < 1 {
        c.error("upstream.ws_failure_burst", "must be at least 1");
    }
    if u.max_message_bytes < MIN_UPSTREAM_MESSAGE_BYTES {
        c.error(
            "upstream.max_message_bytes",
            format!("must be at least {MIN_UPSTREAM_MESSAGE_BYTES}"),
        );
    }
}

fn check_scheduler(cfg: &Config, c: &mut Checker<'_>) {
    let s = &cfg.scheduler;
    if s.breaker_failures < 1 {
        c.error("scheduler.breaker_failures", "must be at least 1");
    }
    if s.breaker_probes < 1 {
        c.error("scheduler.breaker_probes", "must be at least 1");
    }
    for (name, value) in [
        ("breaker_cooldown", s.breaker_cooldown),
        ("binding_ttl", s.binding_ttl),
    ] {
        if value.is_zero() {
            c.error(format!("scheduler.{name}"), "must be greater than zero");
        }
    }
}

fn check_state(cfg: &Config, c: &mut Checker<'_>) {
    let s = &cfg.state;
    if s.lease_ttl < std::time::Duration::from_millis(300) {
        c.error("state.lease_ttl", "must be at least 300ms");
    }
    if s.redis_prefix.is_empty() || s.redis_prefix.contains(char::is_whitespace) {
        c.error("state.redis_prefix", "must be a non-empty word");
    }
    if !s.redis_url.starts_with("redis://") {
        c.error(
            "state.redis_url",
            "must start with redis:// (TLS to Redis is not built in)",
        );
    }
}

fn check_server(cfg: &Config, c: &mut Checker<'_>) {
    let s = &cfg.server;
    if s.handshake_timeout.is_zero() {
        c.error("server.handshake_timeout", "must be greater than zero");
    }
    if s.body_timeout.is_zero() {
        c.error("server.body_timeout", "must be greater than zero");
    }
    // A request line and the few headers every client sends.
    if s.max_header_bytes < 1024 {
        c.error("server.max_header_bytes", "must be at least 1024");
    }
    if s.max_connections == 0 {
        c.error("server.max_connections", "must be greater than zero");
    }
    if cfg.shutdown.drain_timeout.is_zero() {
        c.error("shutdown.drain_timeout", "must be greater than zero");
    }
}

fn check_limits(cfg: &Config, c: &mut Checker<'_>) {
    let l = &cfg.limits;
    if l.max_client_message_bytes < MIN_CLIENT_MESSAGE_BYTES {
        c.error(
            "limits.max_client_message_bytes",
            format!("must be at least {MIN_CLIENT_MESSAGE_BYTES}"),
        );
    }
    if l.max_transcript_bytes < MIN_TRANSCRIPT_BYTES {
        c.error(
            "limits.max_transcript_bytes",
            format!("must be at least {MIN_TRANSCRIPT_BYTES}"),
        );
    }
    // Judged against the per-session limit only when that one was read from the file (or
    // defaulted), not when a type error left its default standing in.
    if !c.pruned("limits.max_transcript_bytes")
        && l.max_transcript_bytes_total < l.max_transcript_bytes
    {
        c.error(
            "limits.max_transcript_bytes_total",
            format!(
                "must be at least limits.max_transcript_bytes ({})",
                l.max_transcript_bytes
            ),
        );
    }
}

fn check_session(cfg: &Config, c: &mut Checker<'_>) {
    let s = &cfg.session;
    for (name, value) in [
        ("client_ping_interval", s.client_ping_interval),
        ("client_idle_timeout", s.client_idle_timeout),
        ("idle_timeout", s.idle_timeout),
        ("first_message_timeout", s.first_message_timeout),
        ("cancel_grace", s.cancel_grace),
        ("admission_timeout", s.admission_timeout),
        ("http_session_ttl", s.http_session_ttl),
    ] {
        if value.is_zero() {
            c.error(format!("session.{name}"), "must be greater than zero");
        }
    }
    for (name, value) in [
        ("max_held_errors", s.max_held_errors),
        ("pump_channel", s.pump_channel),
    ] {
        if value < 1 {
            c.error(format!("session.{name}"), "must be at least 1");
        }
    }
}

fn check_admin(admin: &mut crate::config::AdminConfig, c: &mut Checker<'_>) {
    let secret = match (&admin.token, &admin.token_env) {
        (Some(_), Some(_)) => {
            c.error(
                "admin.token",
                "give admin.token or admin.token_env, not both",
            );
            None
        }
        (Some(t), None) if t.is_empty() => {
            c.error("admin.token", "must not be empty");
            None
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(name)) => c.env_secret("admin.token_env", name),
        (None, None) => None,
    };
    if admin.resolved_token.is_none() {
        admin.resolved_token = secret;
    }
}

fn check_usage(cfg: &Config, c: &mut Checker<'_>) {
    if cfg.usage.flush_interval.is_zero() {
        c.error("usage.flush_interval", "must be greater than zero");
    }
    if cfg.store.path.as_os_str().is_empty() {
        c.error("store.path", "must not be empty");
    }
    if let Some(path) = cfg.usage.prices.as_ref() {
        if let Err(e) = crate::usage::prices::PriceTable::load(path) {
            c.error("usage.prices", e);
        }
    }
}

/// Checks an entry's `id`: present, non-empty, not used by an earlier entry of the same list.
fn check_id(id: &str, base: &str, seen: &mut HashMap<String, String>, c: &mut Checker<'_>) {
    let path = format!("{base}.id");
    if id.trim().is_empty() {
        c.error(path, "is required (a non-empty string)");
    } else if let Some(first) = seen.get(id) {
        c.error(
            path,
            format!("duplicate id \"{id}\" (first used at {first})"),
        );
    } else {
        seen.insert(id.to_owned(), base.to_owned());
    }
}

/// Reports unless exactly one of `fields` was given; `None` when reported (or when one of them
/// was already reported by `parse`), else the one given.
fn exactly_one(
    base: &str,
    fields: &[(&'static str, bool)],
    c: &mut Checker<'_>,
) -> Option<&'static str> {
    let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    let given: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
    if names.iter().any(|name| c.pruned(&format!("{base}.{name}"))) {
        return None;
    }
    match given.as_slice() {
        [one] => Some(one),
        [] => {
            c.error(
                base,
                format!("exactly one of {} is required", names.join(", ")),
            );
            None
        }
        _ => {
            c.error(
                base,
                format!(
                    "exactly one of {} is allowed, found {}",
                    names.join(", "),
                    given.join(" and ")
                ),
            );
            None
        }
    }
}

fn check_keys(keys: &mut [KeyConfig], c: &mut Checker<'_>) {
    let mut ids = HashMap::new();
    let mut digests: Vec<([u8; 32], String)> = Vec::new();
    for (i, key) in keys.iter_mut().enumerate() {
        let base = format!("keys[{i}]");
        if c.pruned(&base) {
            continue;
        }
        if !c.pruned(&format!("{base}.id")) {
            check_id(&key.id, &base, &mut ids, c);
        }
        check_models(&key.models, &base, c);
        check_key_limits(&key.limits, &base, c);
        let Some((field, digest)) = resolve_key(key, &base, c) else {
            continue;
        };
        key.digest = digest;
        if let Some((_, first)) = digests.iter().find(|(d, _)| *d == digest) {
            c.error(format!("{base}.{field}"), format!("same key as {first}"));
        } else {
            digests.push((digest, base));
        }
    }
}

fn check_key_limits(l: &crate::config::KeyLimits, base: &str, c: &mut Checker<'_>) {
    let counts = [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("concurrent_turns", l.concurrent_turns.map(|n| n as u64)),
        ("concurrent_sockets", l.concurrent_sockets.map(|n| n as u64)),
    ];
    for (name, v) in counts {
        if v == Some(0) {
            c.error(
                format!("{base}.limits.{name}"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    for (name, v) in [
        ("daily_budget_usd", l.daily_budget_usd),
        ("monthly_budget_usd", l.monthly_budget_usd),
    ] {
        if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            c.error(
                format!("{base}.limits.{name}"),
                "must be a number of USD, 0 or more",
            );
        }
    }
}

/// The key's SHA-256 digest and the field it came from.
fn resolve_key(
    key: &KeyConfig,
    base: &str,
    c: &mut Checker<'_>,
) -> Option<(&'static str, [u8; 32])> {
    let field = exactly_one(
        base,
        &[
            ("key", key.key.is_some()),
            ("key_env", key.key_env.is_some()),
            ("key_sha256", key.key_sha256.is_some()),
        ],
        c,
    )?;
    let path = format!("{base}.{field}");
    let digest = match (&key.key, &key.key_env, &key.key_sha256) {
        (Some(literal), _, _) if literal.is_empty() => {
            c.error(path, "must not be empty");
            return None;
        }
        (Some(literal), _, _) => sha256(literal.expose()),
        (_, Some(name), _) => sha256(c.env_secret(&path, name)?.expose()),
        (_, _, Some(hex_digest)) => match parse_digest(hex_digest) {
            Some(digest) => digest,
            None => {
                c.error(path, "must be 64 hex characters (the SHA-256 of the key)");
                return None;
            }
        },
        (None, None, None) => return None,
    };
    Some((field, digest))
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut digest).ok()?;
    Some(digest)
}

fn check_accounts(accounts: &mut [AccountConfig], c: &mut Checker<'_>) {
    let mut ids = HashMap::new();
    for (i, account) in accounts.iter_mut().enumerate() {
        let base = format!("accounts[{i}]");
        if c.pruned(&base) {
            continue;
        }
        if !c.pruned(&format!("{base}.id")) {
            check_id(&account.id, &base, &mut ids, c);
        }
        if !c.pruned(&format!("{base}.base_url")) {
            if let Err(why) = check_base_url(&account.base_url) {
                c.error(format!("{base}.base_url"), why);
            }
        }
        if let Some(secret) = resolve_api_key(account, &base, c) {
            account.resolved_api_key = secret;
        }
        check_models(&account.models, &base, c);
        if account.concurrency < 1 {
            c.error(format!("{base}.concurrency"), "must be at least 1");
        }
        if account.max_conns < 1 {
            c.error(format!("{base}.max_conns"), "must be at least 1");
        }
        if !(account.weight.is_finite() && account.weight > 0.0) {
            c.error(
                format!("{base}.weight"),
                "must be a number greater than zero",
            );
        }
        check_headers(account, &base, c);
    }
}

fn resolve_api_key(account: &AccountConfig, base: &str, c: &mut Checker<'_>) -> Option<Secret> {
    let field = exactly_one(
        base,
        &[
            ("api_key", account.api_key.is_some()),
            ("api_key_env", account.api_key_env.is_some()),
        ],
        c,
    )?;
    let path = format!("{base}.{field}");
    match (&account.api_key, &account.api_key_env) {
        (Some(literal), _) if literal.is_empty() => {
            c.error(path, "must not be empty");
            None
        }
        (Some(literal), _) => Some(literal.clone()),
        (_, Some(name)) => c.env_secret(&path, name),
        (None, None) => None,
    }
}

/// `base_url` must be an absolute http(s) URL with a host, since `/responses` is appended to it
/// and the WebSocket URL is derived from its scheme.
fn check_base_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("is required (e.g. https://api.openai.com/v1)".to_owned());
    }
    let Some((_, rest)) = split_scheme(url) else {
        return Err(format!("\"{url}\" must start with http:// or https://"));
    };
    if url.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err("must not contain spaces or control characters".to_owned());
    }
    if url.contains(['?', '#']) {
        return Err("must not have a query or fragment (\"/responses\" is appended)".to_owned());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not contain credentials; use api_key or api_key_env".to_owned());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => return Err("has an unclosed [ in its host".to_owned()),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err(format!("has an invalid port \"{port}\""));
        }
    }
    Ok(())
}

fn check_models(models: &[String], base: &str, c: &mut Checker<'_>) {
    if models.is_empty() {
        c.error(
            format!("{base}.models"),
            "must list at least one model (\"*\" serves all)",
        );
    }
    for (j, model) in models.iter().enumerate() {
        let path = format!("{base}.models[{j}]");
        if model.is_empty() {
            c.error(path, "must not be empty");
        } else if model.trim_end_matches('*').contains('*') || model.ends_with("**") {
            c.error(
                path,
                "\"*\" may only end an entry (a prefix) or stand alone",
            );
        }
    }
}

fn check_headers(account: &AccountConfig, base: &str, c: &mut Checker<'_>) {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (name, value) in &account.headers {
        let path = format!("{base}.headers.{name}");
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            c.error(path, "is not a valid HTTP header name");
        } else if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("sec-websocket-")
        {
            c.error(path, "is set by the relay and cannot be overridden");
        } else if let Some(first) = seen.get(&lower) {
            c.error(path, format!("duplicates header {first}"));
        } else if !value
            .bytes()
            .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        {
            c.error(path, "value contains control characters");
        } else {
            seen.insert(lower, name);
        }
    }
}

/// RFC 9110 `tchar`: the bytes allowed in a header name.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
