//! Unit tests for the config module (SPEC §2, OP-4).

use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml_str_with_env(text, &no_env)
}

fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_yaml_str_with_env(text, &move |name| vars.get(name).cloned())
}

fn errors(text: &str) -> ConfigErrors {
    match parse(text) {
        Ok(cfg) => panic!("expected errors, got {cfg:?}"),
        Err(e) => e,
    }
}

fn message_at(errs: &ConfigErrors, path: &str) -> String {
    match errs.iter().find(|e| e.path == path) {
        Some(e) => e.message.clone(),
        None => panic!("no error at {path}; got:\n{errs}"),
    }
}

#[test]
fn op4_empty_file_is_all_defaults() {
    for text in ["", "# only a comment\n", "---\n"] {
        let cfg = parse(text).expect("empty config is valid");
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
        assert!(cfg.keys.is_empty() && cfg.accounts.is_empty());
    }
}

#[test]
fn op4_empty_sections_mean_defaults() {
    let cfg = parse("ingress:\nsession:\nlimits:\nkeys:\naccounts:\nupstream:\n").unwrap();
    assert!(cfg.ingress.websocket);
    assert_eq!(cfg.upstream.pong_timeout, Duration::from_secs(5));
    assert_eq!(cfg.session.pump_channel, 64);
}

#[test]
fn op4_paths_for_unknown_keys_at_every_level() {
    let errs = errors(
        "bogus: 1\nsession:\n  client_ping_intervall: 5s\nkeys:\n  - {id: a, key: k, colour: red}\n",
    );
    assert_eq!(errs.len(), 3, "{errs}");
    assert!(message_at(&errs, "bogus").starts_with("unknown key"));
    assert!(message_at(&errs, "session.client_ping_intervall").starts_with("unknown key"));
    assert!(message_at(&errs, "keys[0].colour").starts_with("unknown key"));
    // The unknown key is listed with the known ones, so the typo is easy to spot.
    assert!(message_at(&errs, "bogus").contains("`listen`"));
}

#[test]
fn op4_error_display_is_path_colon_message() {
    let errs = errors("session:\n  client_ping_intervall: 5s\n");
    let line = errs.iter().next().unwrap().to_string();
    assert!(
        line.starts_with("session.client_ping_intervall: unknown key"),
        "{line}"
    );
}

#[test]
fn op4_type_errors_do_not_hide_later_errors() {
    let errs = errors(
        "listen: nowhere\nlimits: {max_client_message_bytes: lots}\nsession: {max_held_errors: -1}\n",
    );
    assert_eq!(errs.len(), 3, "{errs}");
    for path in [
        "listen",
        "limits.max_client_message_bytes",
        "session.max_held_errors",
    ] {
        assert!(errs.has_path(path), "{path} missing in:\n{errs}");
    }
}

#[test]
fn op4_bad_list_entry_keeps_indices_of_later_entries() {
    let errs = errors("keys:\n  - just-a-string\n  - {id: b}\n");
    assert!(errs.has_path("keys[0]"), "{errs}");
    // keys[1] is still called keys[1], and keys[0] is not also blamed for its missing fields.
    assert!(message_at(&errs, "keys[1]").contains("exactly one of"));
    assert_eq!(errs.len(), 2, "{errs}");
}

#[test]
fn op4_bad_value_in_required_field_is_reported_once() {
    let errs = errors("accounts:\n  - {id: [x], base_url: 5, api_key: k}\n");
    assert_eq!(errs.len(), 2, "{errs}");
    assert!(errs.has_path("accounts[0].id"));
    assert!(errs.has_path("accounts[0].base_url"));
}

#[test]
fn op4_bad_credential_type_is_not_also_reported_as_missing() {
    let errs = errors("keys:\n  - {id: a, key: [1]}\n");
    assert_eq!(errs.len(), 1, "{errs}");
    assert!(errs.has_path("keys[0].key"));
}

#[test]
fn op4_yaml_syntax_error_reports_line_and_column() {
    let errs = errors("listen: 127.0.0.1:8080\nsession:\n  a: [1\n");
    assert_eq!(errs.len(), 1);
    let text = errs.to_string();
    assert!(text.contains("line") && text.contains("column"), "{text}");
}

#[test]
fn op4_duplicate_yaml_key_is_an_error() {
    let errs = errors("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n");
    assert!(errs.to_string().contains("duplicate"), "{errs}");
}

#[test]
fn op4_top_level_must_be_a_mapping() {
    let errs = errors("- a\n- b\n");
    assert_eq!(errs.len(), 1, "{errs}");
    assert!(errs.to_string().contains("mapping"), "{errs}");
}

#[test]
fn op4_non_string_keys_are_named() {
    let errs = errors("session:\n  1: x\n");
    assert!(errs.has_path("session.1"), "{errs}");
}

#[test]
fn durations_need_a_unit() {
    let cfg = parse("session: {client_ping_interval: 250ms, client_idle_timeout: 55m}").unwrap();
    assert_eq!(cfg.session.client_ping_interval, Duration::from_millis(250));
    assert_eq!(
        cfg.session.client_idle_timeout,
        Duration::from_secs(55 * 60)
    );
    for bad in ["20", "\"20\"", "soon", "0s"] {
        let errs = errors(&format!("session: {{client_ping_interval: {bad}}}"));
        assert!(
            errs.has_path("session.client_ping_interval"),
            "{bad}: {errs}"
        );
    }
}

#[test]
fn mode_rejects_later_and_unknown_modes() {
    let base = "accounts:\n  - {id: a, base_url: 'https://x', api_key: k, mode: MODE}\n";
    assert_eq!(
        parse(&base.replace("MODE", "ctx_pool")).unwrap().accounts[0].mode,
        AccountMode::CtxPool
    );
    assert_eq!(
        parse(&base.replace("MODE", "http")).unwrap().accounts[0].mode,
        AccountMode::Http
    );
    assert_eq!(
        parse(&base.replace("MODE", "passthrough"))
            .unwrap()
            .accounts[0]
            .mode,
        AccountMode::Passthrough
    );
    let errs = errors(&base.replace("MODE", "ws"));
    assert_eq!(
        message_at(&errs, "accounts[0].mode"),
        "unknown variant \"ws\", expected ctx_pool, passthrough or http"
    );
}

#[test]
fn key_credentials_exactly_one() {
    let errs = errors("keys:\n  - {id: a}\n  - {id: b, key: x, key_env: Y}\n");
    assert!(message_at(&errs, "keys[0]").contains("is required"));
    assert!(message_at(&errs, "keys[1]").contains("found key and key_env"));
}

#[test]
fn key_sha256_must_be_64_hex() {
    let short = "keys:\n  - {id: a, key_sha256: abc}\n";
    assert!(errors(short).has_path("keys[0].key_sha256"));
    let upper = format!(
        "keys:\n  - {{id: a, key_sha256: {}}}\n",
        hex::encode_upper(sha256("k"))
    );
    let cfg = parse(&upper).unwrap();
    assert_eq!(cfg.find_key("k").map(|k| k.id.as_str()), Some("a"));
}

#[test]
fn key_env_resolves_and_must_be_set() {
    let text = "keys:\n  - {id: a, key_env: SY_UNIT_KEY}\n";
    let cfg = parse_env(text, &[("SY_UNIT_KEY", "from-env")]).unwrap();
    assert_eq!(cfg.find_key("from-env").unwrap().id, "a");
    assert!(message_at(&errors(text), "keys[0].key_env").contains("not set"));
    let errs = parse_env(text, &[("SY_UNIT_KEY", "")]).unwrap_err();
    assert!(message_at(&errs, "keys[0].key_env").contains("empty"));
}

#[test]
fn duplicate_key_ids_and_values_are_errors() {
    let text = format!(
        "keys:\n  - {{id: a, key: one}}\n  - {{id: a, key: two}}\n  - {{id: c, key_sha256: {}}}\n",
        hex::encode(sha256("one"))
    );
    let errs = errors(&text);
    assert!(message_at(&errs, "keys[1].id").contains("duplicate id"));
    assert!(message_at(&errs, "keys[2].key_sha256").contains("same key as keys[0]"));
    assert!(errors("keys:\n  - {id: ''}\n  - {key: x}\n").has_path("keys[1].id"));
}

#[test]
fn find_key_matches_every_form_and_nothing_else() {
    let text = format!(
        "keys:\n  - {{id: lit, key: sy-lit}}\n  - {{id: env, key_env: SY_UNIT_FIND}}\n  \
         - {{id: hash, key_sha256: {}, disabled: true, websocket: false}}\n",
        hex::encode(sha256("sy-hash"))
    );
    let cfg = parse_env(&text, &[("SY_UNIT_FIND", "sy-env")]).unwrap();
    assert_eq!(cfg.find_key("sy-lit").unwrap().id, "lit");
    assert_eq!(cfg.find_key("sy-env").unwrap().id, "env");
    let hashed = cfg.find_key("sy-hash").unwrap();
    assert_eq!(hashed.id, "hash");
    assert!(hashed.disabled && !hashed.websocket);
    for other in ["", "sy-li", "sy-lit ", "SY-LIT", "SY_UNIT_FIND"] {
        assert!(cfg.find_key(other).is_none(), "{other}");
    }
}

#[test]
fn secrets_never_print() {
    let text = "keys:\n  - {id: a, key: hunter2}\naccounts:\n  - {id: b, base_url: 'http://h', api_key: sk-top}\n";
    let cfg = parse(text).unwrap();
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("sk-top"),
        "{shown}"
    );
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?} {s}"), "*** ***");
    assert_eq!(s.expose(), "hunter2");
    assert_eq!(cfg.accounts[0].api_key().expose(), "sk-top");
}

#[test]
fn account_credential_and_env() {
    let text = "accounts:\n  - {id: a, base_url: 'https://h/v1', api_key_env: SY_UNIT_ACCT}\n";
    let cfg = parse_env(text, &[("SY_UNIT_ACCT", "sk-env")]).unwrap();
    assert_eq!(cfg.accounts[0].api_key().expose(), "sk-env");
    assert!(message_at(&errors(text), "accounts[0].api_key_env").contains("SY_UNIT_ACCT"));
    let none = errors("accounts:\n  - {id: a, base_url: 'https://h'}\n");
    assert!(message_at(&none, "accounts[0]").contains("api_key, api_key_env is required"));
    let both =
        errors("accounts:\n  - {id: a, base_url: 'https://h', api_key: k, api_key_env: E}\n");
    assert!(both.has_path("accounts[0]"));
}

#[test]
fn base_url_rules() {
    for good in [
        "http://127.0.0.1:9000",
        "https://api.openai.com/v1/",
        "HTTPS://Example.com",
        "http://[::1]:8080/v1",
    ] {
        let text = format!("accounts:\n  - {{id: a, base_url: '{good}', api_key: k}}\n");
        assert!(parse(&text).is_ok(), "{good}");
    }
    for bad in [
        "",
        "ftp://h",
        "wss://h",
        "api.openai.com/v1",
        "https://",
        "https:///v1",
        "https://h:99999",
        "https://h/v1?x=1",
        "https://u:p@h",
    ] {
        let text = format!("accounts:\n  - {{id: a, base_url: '{bad}', api_key: k}}\n");
        assert!(errors(&text).has_path("accounts[0].base_url"), "{bad}");
    }
    assert!(errors("accounts:\n  - {id: a, api_key: k}\n").has_path("accounts[0].base_url"));
}

#[test]
fn ws_and_http_urls() {
    for (base, ws, http) in [
        (
            "http://127.0.0.1:9000/v1",
            "ws://127.0.0.1:9000/v1/responses",
            "http://127.0.0.1:9000/v1/responses",
        ),
        (
            "http://127.0.0.1:9000/v1/",
            "ws://127.0.0.1:9000/v1/responses",
            "http://127.0.0.1:9000/v1/responses",
        ),
        (
            "https://api.openai.com/v1",
            "wss://api.openai.com/v1/responses",
            "https://api.openai.com/v1/responses",
        ),
        (
            "https://api.openai.com/v1/",
            "wss://api.openai.com/v1/responses",
            "https://api.openai.com/v1/responses",
        ),
    ] {
        let account = AccountConfig::new("a", base, "k");
        assert_eq!(account.ws_url(), ws);
        assert_eq!(account.http_url(), http);
    }
}

#[test]
fn serves_model_patterns() {
    let mut account = AccountConfig::new("a", "https://h", "k");
    assert!(account.serves_model("anything"));
    account.models = vec!["gpt-5*".into(), "o3".into()];
    assert!(account.serves_model("gpt-5"));
    assert!(account.serves_model("gpt-5-codex-2025"));
    assert!(account.serves_model("o3"));
    assert!(!account.serves_model("o3-mini"));
    assert!(!account.serves_model("gpt-4.1"));
    let errs = errors("accounts:\n  - {id: a, base_url: 'https://h', api_key: k, models: []}\n");
    assert!(errs.has_path("accounts[0].models"));
    let errs = errors(
        "accounts:\n  - {id: a, base_url: 'https://h', api_key: k, models: ['g*pt', '', 5]}\n",
    );
    for path in [
        "accounts[0].models[0]",
        "accounts[0].models[1]",
        "accounts[0].models[2]",
    ] {
        assert!(errs.has_path(path), "{path}: {errs}");
    }
}

#[test]
fn headers_refuse_relay_owned_and_invalid_names() {
    let text = "accounts:\n  - id: a\n    base_url: 'https://h'\n    api_key: k\n    headers:\n      \
                X-Team: core\n      Authorization: x\n      OpenAI-Beta: x\n      Host: x\n      \
                connection: x\n      Upgrade: x\n      Sec-WebSocket-Key: x\n      'bad name': x\n      \
                'x-nl': \"a\\nb\"\n";
    let errs = errors(text);
    for name in [
        "Authorization",
        "OpenAI-Beta",
        "Host",
        "connection",
        "Upgrade",
        "Sec-WebSocket-Key",
        "bad name",
        "x-nl",
    ] {
        assert!(
            errs.has_path(&format!("accounts[0].headers.{name}")),
            "{name}: {errs}"
        );
    }
    assert!(!errs.has_path("accounts[0].headers.X-Team"));
    let ok = parse(
        "accounts:\n  - {id: a, base_url: 'https://h', api_key: k, headers: {X-Team: core}}\n",
    );
    assert_eq!(ok.unwrap().accounts[0].headers["X-Team"], "core");
}

#[test]
fn ranges_are_checked() {
    let errs = errors(
        "limits: {max_client_message_bytes: 1023}\nsession: {max_held_errors: 0, pump_channel: 0}\n\
         accounts:\n  - {id: a, base_url: 'https://h', api_key: k, max_conns: 0}\n",
    );
    assert_eq!(
        message_at(&errs, "limits.max_client_message_bytes"),
        "must be at least 1024"
    );
    assert!(errs.has_path("session.max_held_errors"));
    assert!(errs.has_path("session.pump_channel"));
    assert!(errs.has_path("accounts[0].max_conns"));
    assert!(parse("limits: {max_client_message_bytes: 1024}").is_ok());
}

#[test]
fn transcript_limits_and_retry_budget() {
    let cfg = parse("upstream: {retry_budget: 0}\nlimits: {max_transcript_bytes: 1024}").unwrap();
    assert_eq!(cfg.upstream.retry_budget, 0);
    assert_eq!(cfg.limits.max_transcript_bytes, 1024);
    let errs = errors("limits: {max_transcript_bytes: 1023, max_transcript_bytes_total: 1000}");
    assert_eq!(
        message_at(&errs, "limits.max_transcript_bytes"),
        "must be at least 1024"
    );
    assert_eq!(
        message_at(&errs, "limits.max_transcript_bytes_total"),
        "must be at least limits.max_transcript_bytes (1023)"
    );
    let errs = errors("upstream: {retry_budget: 4294967296}");
    assert!(errs.has_path("upstream.retry_budget"), "{errs}");
    let mut cfg = Config::default();
    cfg.limits.max_transcript_bytes_total = cfg.limits.max_transcript_bytes - 1;
    assert!(cfg
        .validate()
        .unwrap_err()
        .has_path("limits.max_transcript_bytes_total"));
}

#[test]
fn upstream_keys_parse_and_are_range_checked() {
    let cfg = parse(
        "upstream: {ping_interval: 250ms, pong_timeout: 1s, dial_timeout: 2s, \
         max_message_bytes: 2048, stream_idle_timeout: 3m}",
    )
    .unwrap();
    let u = &cfg.upstream;
    assert_eq!(u.ping_interval, Duration::from_millis(250));
    assert_eq!(u.pong_timeout, Duration::from_secs(1));
    assert_eq!(u.dial_timeout, Duration::from_secs(2));
    assert_eq!(u.max_message_bytes, 2048);
    assert_eq!(u.stream_idle_timeout, Duration::from_secs(180));
    let errs = errors(
        "upstream: {ping_interval: 0s, pong_timeout: 0ms, dial_timeout: 0s, \
         max_message_bytes: 1023, stream_idle_timeout: 0s}",
    );
    assert_eq!(errs.len(), 5, "{errs}");
    for key in [
        "ping_interval",
        "pong_timeout",
        "dial_timeout",
        "stream_idle_timeout",
    ] {
        assert_eq!(
            message_at(&errs, &format!("upstream.{key}")),
            "must be greater than zero"
        );
    }
    assert_eq!(
        message_at(&errs, "upstream.max_message_bytes"),
        "must be at least 1024"
    );
    assert!(parse("upstream: {max_message_bytes: 1024}").is_ok());
    let errs = errors("upstream: {ping_interval: 20, sticky: 1}");
    assert!(message_at(&errs, "upstream.ping_interval").contains("with a unit"));
    assert!(message_at(&errs, "upstream.sticky").starts_with("unknown key"));
}

#[test]
fn validate_checks_configs_built_in_code() {
    let mut cfg = Config::default();
    cfg.keys.push(KeyConfig::new("k", "sy-code"));
    cfg.accounts
        .push(AccountConfig::new("a", "http://127.0.0.1:1/v1", "sk"));
    cfg.validate().unwrap();
    assert_eq!(cfg.find_key("sy-code").unwrap().id, "k");
    cfg.accounts.push(AccountConfig::new("a", "nope", ""));
    let errs = cfg.validate().unwrap_err();
    for path in [
        "accounts[1].id",
        "accounts[1].base_url",
        "accounts[1].api_key",
    ] {
        assert!(errs.has_path(path), "{path}: {errs}");
    }
}

#[test]
fn op4_errors_are_listed_in_file_order() {
    let errs = errors(
        "session: {pump_channel: 0}\nkeys:\n  - {id: a}\n  - {id: b, key: k, bogus: 1}\nlisten: x\n",
    );
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["session.pump_channel", "keys[0]", "keys[1].bogus", "listen"]
    );
}

#[test]
fn sc2_sc5_scheduler_keys_and_account_priority_weight() {
    let cfg = parse(
        "scheduler: {breaker_failures: 2, breaker_cooldown: 5s, breaker_probes: 3, binding_ttl: 10m}\n\
         accounts:\n  - {id: a, base_url: 'http://x/v1', api_key: k, priority: 2, weight: 0.5}\n  \
         - {id: b, base_url: 'http://x/v1', api_key: k}",
    )
    .unwrap();
    let s = &cfg.scheduler;
    assert_eq!((s.breaker_failures, s.breaker_probes), (2, 3));
    assert_eq!(s.breaker_cooldown, Duration::from_secs(5));
    assert_eq!(s.binding_ttl, Duration::from_secs(600));
    assert_eq!((cfg.accounts[0].priority, cfg.accounts[0].weight), (2, 0.5));
    assert_eq!((cfg.accounts[1].priority, cfg.accounts[1].weight), (0, 1.0));
    let errs = errors(
        "scheduler: {breaker_failures: 0, breaker_cooldown: 0s, breaker_probes: 0, binding_ttl: 0s}\n\
         accounts:\n  - {id: a, base_url: 'http://x/v1', api_key: k, weight: 0}",
    );
    assert_eq!(errs.len(), 5, "{errs}");
    assert_eq!(
        message_at(&errs, "scheduler.breaker_failures"),
        "must be at least 1"
    );
    assert_eq!(
        message_at(&errs, "scheduler.binding_ttl"),
        "must be greater than zero"
    );
    assert!(message_at(&errs, "accounts[0].weight").contains("greater than zero"));
}

#[test]
fn sc7_state_keys_and_their_checks() {
    let cfg = parse(
        "state: {backend: redis, redis_url: 'redis://10.0.0.5:6380/2', redis_prefix: prod, lease_ttl: 10s}",
    )
    .unwrap();
    let s = &cfg.state;
    assert_eq!(s.backend, crate::config::StateBackend::Redis);
    assert_eq!(
        (s.redis_url.as_str(), s.redis_prefix.as_str()),
        ("redis://10.0.0.5:6380/2", "prod")
    );
    assert_eq!(s.lease_ttl, Duration::from_secs(10));
    let d = parse("{}").unwrap().state;
    assert_eq!(d.backend, crate::config::StateBackend::Memory);
    assert_eq!(d.lease_ttl, Duration::from_secs(30));
    let errs = errors(
        "state: {backend: redis, redis_url: 'http://x', redis_prefix: 'a b', lease_ttl: 10ms}",
    );
    assert_eq!(errs.len(), 3, "{errs}");
    assert!(message_at(&errs, "state.redis_url").contains("redis://"));
    assert!(message_at(&errs, "state.lease_ttl").contains("300ms"));
    assert!(message_at(&errs, "state.redis_prefix").contains("word"));
    assert!(!errors("state: {backend: etcd}").is_empty());
}

#[test]
fn op_server_shutdown_and_log_keys_and_their_checks() {
    let cfg = parse(
        "server: {handshake_timeout: 2s, max_header_bytes: 4096, max_connections: 50, body_timeout: 7s}\nshutdown: {drain_timeout: 5s}\nlog: {format: json}",
    )
    .unwrap();
    assert_eq!(
        (
            cfg.server.handshake_timeout,
            cfg.server.max_header_bytes,
            cfg.server.max_connections
        ),
        (Duration::from_secs(2), 4096, 50)
    );
    assert_eq!(cfg.server.body_timeout, Duration::from_secs(7));
    assert_eq!(cfg.shutdown.drain_timeout, Duration::from_secs(5));
    assert_eq!(cfg.log.format, crate::config::LogFormat::Json);
    let d = parse("{}").unwrap();
    assert_eq!(
        (d.server.max_header_bytes, d.server.max_connections),
        (16384, 10000)
    );
    assert_eq!(d.server.body_timeout, Duration::from_secs(60));
    assert_eq!(d.log.format, crate::config::LogFormat::Text);
    let errs = errors(
        "server: {handshake_timeout: 0s, max_header_bytes: 100, max_connections: 0, body_timeout: 0s}\nshutdown: {drain_timeout: 0s}",
    );
    assert_eq!(errs.len(), 5, "{errs}");
    assert!(message_at(&errs, "server.body_timeout").contains("zero"));
    assert!(message_at(&errs, "server.max_header_bytes").contains("1024"));
    assert!(message_at(&errs, "server.handshake_timeout").contains("zero"));
    assert!(message_at(&errs, "server.max_connections").contains("zero"));
    assert!(message_at(&errs, "shutdown.drain_timeout").contains("zero"));
    assert!(!errors("log: {format: xml}").is_empty());
}
