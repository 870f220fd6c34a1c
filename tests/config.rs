//! Config loading (SPEC §2) and its error reporting (OP-4), through the library and through the
//! real `switchyard check-config` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sha2::{Digest, Sha256};
use switchyard::config::{AccountConfig, AccountMode, Config, ConfigErrors, Secret};

fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("check-config").arg(file);
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().expect("run switchyard check-config")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config file");
    path
}

fn errors(text: &str) -> ConfigErrors {
    match Config::from_yaml_str(text) {
        Ok(cfg) => panic!("expected errors for:\n{text}\ngot {cfg:?}"),
        Err(e) => e,
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[test]
fn op4_example_config_passes_check_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let out = check_config(&example, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok"), "{stdout}");
}

/// The example is loadable by the library too, and shows every default (SPEC §2: it documents
/// every implemented key).
#[test]
fn example_config_matches_the_defaults() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
    let cfg = Config::load(&example).expect("example config loads");
    let defaults = Config::default();
    assert_eq!(cfg.listen, defaults.listen);
    assert_eq!(
        cfg.session.client_ping_interval,
        defaults.session.client_ping_interval
    );
    let (l, dl) = (&cfg.limits, &defaults.limits);
    assert_eq!(
        (
            l.max_client_message_bytes,
            l.max_transcript_bytes,
            l.max_transcript_bytes_total
        ),
        (
            dl.max_client_message_bytes,
            dl.max_transcript_bytes,
            dl.max_transcript_bytes_total
        )
    );
    let (u, d) = (&cfg.upstream, &defaults.upstream);
    assert_eq!(
        (
            u.ping_interval,
            u.pong_timeout,
            u.dial_timeout,
            u.max_message_bytes,
            u.stream_idle_timeout,
            u.retry_budget
        ),
        (
            d.ping_interval,
            d.pong_timeout,
            d.dial_timeout,
            d.max_message_bytes,
            d.stream_idle_timeout,
            d.retry_budget
        )
    );
    assert_eq!(cfg.store.path, defaults.store.path);
    let (st, dst) = (&cfg.state, &defaults.state);
    assert_eq!(
        (st.backend, &st.redis_url, &st.redis_prefix, st.lease_ttl),
        (
            dst.backend,
            &dst.redis_url,
            &dst.redis_prefix,
            dst.lease_ttl
        )
    );
    let (sc, dsc) = (&cfg.scheduler, &defaults.scheduler);
    assert_eq!(
        (
            sc.breaker_failures,
            sc.breaker_cooldown,
            sc.breaker_probes,
            sc.binding_ttl
        ),
        (
            dsc.breaker_failures,
            dsc.breaker_cooldown,
            dsc.breaker_probes,
            dsc.binding_ttl
        )
    );
    let (a, da) = (
        &cfg.accounts[0],
        switchyard::config::AccountConfig::default(),
    );
    assert_eq!((a.priority, a.weight), (da.priority, da.weight));
    let (s, ds) = (&cfg.session, &defaults.session);
    assert_eq!(
        (
            s.idle_timeout,
            s.first_message_timeout,
            s.preempt_policy,
            s.queue_depth
        ),
        (
            ds.idle_timeout,
            ds.first_message_timeout,
            ds.preempt_policy,
            ds.queue_depth
        )
    );
    assert_eq!(
        (s.cancel_grace, s.admission_timeout),
        (ds.cancel_grace, ds.admission_timeout)
    );
    assert_eq!(
        (cfg.upstream.max_age, cfg.upstream.min_idle),
        (defaults.upstream.max_age, defaults.upstream.min_idle)
    );
    assert_eq!(cfg.accounts[0].concurrency, 16);
    assert_eq!(
        (cfg.usage.flush_interval, cfg.usage.prices.as_ref()),
        (defaults.usage.flush_interval, None)
    );
    let (sv, dsv) = (&cfg.server, &defaults.server);
    assert_eq!(
        (
            sv.handshake_timeout,
            sv.max_header_bytes,
            sv.max_connections
        ),
        (
            dsv.handshake_timeout,
            dsv.max_header_bytes,
            dsv.max_connections
        )
    );
    assert_eq!(
        (cfg.shutdown.drain_timeout, cfg.log.format),
        (defaults.shutdown.drain_timeout, defaults.log.format)
    );
    assert_eq!(cfg.keys.len(), 1);
    assert_eq!(cfg.accounts.len(), 1);
    assert_eq!(cfg.accounts[0].max_conns, 16);
    assert_eq!(cfg.accounts[0].models, vec!["*".to_string()]);
}

#[test]
fn op4_check_config_reports_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "bad.yaml",
        r#"
listen: 127.0.0.1:8080
colour: blue                       # unknown top-level key
session:
  client_ping_intervall: 5s        # unknown nested key
  client_idle_timeout: 60          # duration without a unit
keys:
  - id: dup
    key: one
  - id: dup                        # duplicate id
    key: two
  - id: both
    key: three
    key_env: SOMEWHERE             # key and key_env together
accounts:
  - id: a
    base_url: https://api.example.com/v1
    api_key: sk-a
    mode: ws                       # unknown mode
  - id: b
    base_url: https://api.example.com/v1
                                   # no credential
  - id: c
    base_url: ftp://api.example.com  # wrong scheme
    api_key: sk-c
"#,
    );
    let out = check_config(&file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for path in [
        "colour: unknown key",
        "session.client_ping_intervall: unknown key",
        "session.client_idle_timeout:",
        "accounts[0].mode:",
        "accounts[1]:",
        "accounts[2].base_url:",
        "keys[1].id:",
        "keys[2]:",
    ] {
        assert!(stderr.contains(path), "{path} missing in:\n{stderr}");
    }
    assert!(stderr.contains("8 error(s)"), "{stderr}");
}

#[test]
fn op4_check_config_reports_yaml_syntax_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "syntax.yaml", "listen: 127.0.0.1:8080\nkeys: [\n");
    let out = check_config(&file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("line") && stderr.contains("column"),
        "{stderr}"
    );
}

#[test]
fn op4_check_config_resolves_env_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "env.yaml",
        "keys:\n  - {id: k, key_env: SY_IT_CHECK_KEY}\naccounts:\n  \
         - {id: a, base_url: 'http://127.0.0.1:9/v1', api_key_env: SY_IT_CHECK_ACCT}\n",
    );
    let env = [("SY_IT_CHECK_KEY", "sy-k"), ("SY_IT_CHECK_ACCT", "sk-a")];
    let out = check_config(&file, &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = check_config(&file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("keys[0].key_env: environment variable SY_IT_CHECK_KEY is not set"));
    assert!(stderr.contains("accounts[0].api_key_env:"), "{stderr}");
}

/// SPEC §2: the default of every implemented key, both for an empty file and `Config::default()`.
#[test]
fn spec2_defaults() {
    for cfg in [Config::from_yaml_str("").unwrap(), Config::default()] {
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert!(cfg.ingress.websocket);
        assert!(cfg.keys.is_empty());
        assert!(cfg.accounts.is_empty());
        assert_eq!(cfg.limits.max_client_message_bytes, 33_554_432);
        assert_eq!(cfg.limits.max_transcript_bytes, 67_108_864);
        assert_eq!(cfg.limits.max_transcript_bytes_total, 2_147_483_648);
        assert_eq!(cfg.upstream.retry_budget, 1);
        assert_eq!(cfg.upstream.ping_interval, Duration::from_secs(20));
        assert_eq!(cfg.upstream.pong_timeout, Duration::from_secs(5));
        assert_eq!(cfg.upstream.dial_timeout, Duration::from_secs(10));
        assert_eq!(cfg.upstream.max_message_bytes, 67_108_864);
        assert_eq!(cfg.upstream.stream_idle_timeout, Duration::from_secs(240));
        assert_eq!(cfg.session.client_ping_interval, Duration::from_secs(20));
        assert_eq!(cfg.session.client_idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.session.max_held_errors, 16);
        assert_eq!(cfg.session.pump_channel, 64);
        assert_eq!(cfg.store.path, PathBuf::from("./switchyard.db"));
        assert_eq!(cfg.upstream.max_age, Duration::from_secs(55 * 60));
        assert_eq!(cfg.upstream.min_idle, 0);
        assert!(!cfg.upstream.force_http);
        assert_eq!(cfg.upstream.ws_failure_burst, 3);
        assert_eq!(cfg.upstream.ws_fallback_cooldown, Duration::from_secs(30));
        let s = &cfg.session;
        assert_eq!(s.idle_timeout, Duration::from_secs(3600));
        assert_eq!(s.first_message_timeout, Duration::from_secs(30));
        assert_eq!(s.preempt_policy, switchyard::config::PreemptPolicy::Preempt);
        assert_eq!(s.queue_depth, 1);
        assert_eq!(s.cancel_grace, Duration::from_secs(2));
        assert_eq!(s.admission_timeout, Duration::from_secs(30));
        assert_eq!(s.http_session_ttl, Duration::from_secs(1800));
        assert_eq!(cfg.usage.flush_interval, Duration::from_secs(1));
        assert_eq!(cfg.usage.prices, None);
    }
    let cfg = Config::from_yaml_str(
        "keys: [{id: k, key: sy}]\naccounts: [{id: a, base_url: 'https://h', api_key: sk}]\n",
    )
    .unwrap();
    let key = &cfg.keys[0];
    assert!(!key.disabled);
    assert!(key.websocket);
    let account = &cfg.accounts[0];
    assert_eq!(account.mode, AccountMode::CtxPool);
    assert_eq!(account.models, vec!["*".to_string()]);
    assert_eq!(account.max_conns, 16);
    assert!(account.headers.is_empty());
}

/// SPEC §2: every implemented key is accepted under its SPEC name.
#[test]
fn spec2_every_key_is_accepted_under_its_name() {
    let cfg = Config::from_yaml_str(
        r#"
listen: "0.0.0.0:9999"
ingress:
  websocket: false
keys:
  - id: k1
    key: sy-one
    disabled: true
    websocket: false
  - id: k2
    key_sha256: "0000000000000000000000000000000000000000000000000000000000000000"
accounts:
  - id: a1
    base_url: "http://127.0.0.1:9000/v1/"
    api_key: sk-1
    mode: ctx_pool
    models: ["gpt-5*", "o3"]
    max_conns: 3
    concurrency: 5
    headers:
      OpenAI-Organization: org-1
upstream:
  ping_interval: 150ms
  pong_timeout: 2s
  dial_timeout: 3s
  max_message_bytes: 1024
  stream_idle_timeout: 4m
  retry_budget: 3
  max_age: 30m
  min_idle: 2
limits:
  max_client_message_bytes: 4096
  max_transcript_bytes: 2048
  max_transcript_bytes_total: 8192
session:
  client_ping_interval: 250ms
  client_idle_timeout: 2m
  max_held_errors: 2
  pump_channel: 8
  idle_timeout: 10m
  first_message_timeout: 5s
  preempt_policy: queue
  queue_depth: 3
  cancel_grace: 100ms
  admission_timeout: 1s
store:
  path: /var/lib/switchyard/usage.db
usage:
  flush_interval: 250ms
"#,
    )
    .unwrap();
    assert_eq!(
        cfg.store.path,
        PathBuf::from("/var/lib/switchyard/usage.db")
    );
    assert_eq!(cfg.usage.flush_interval, Duration::from_millis(250));
    assert_eq!(cfg.listen, "0.0.0.0:9999".parse::<SocketAddr>().unwrap());
    assert!(!cfg.ingress.websocket);
    assert!(cfg.keys[0].disabled && !cfg.keys[0].websocket);
    assert_eq!(cfg.keys[1].digest(), &[0u8; 32]);
    let a = &cfg.accounts[0];
    assert_eq!((a.id.as_str(), a.max_conns), ("a1", 3));
    assert_eq!(a.api_key().expose(), "sk-1");
    assert_eq!(a.models, vec!["gpt-5*".to_string(), "o3".to_string()]);
    assert_eq!(a.headers["OpenAI-Organization"], "org-1");
    assert_eq!(cfg.upstream.ping_interval, Duration::from_millis(150));
    assert_eq!(cfg.upstream.pong_timeout, Duration::from_secs(2));
    assert_eq!(cfg.upstream.dial_timeout, Duration::from_secs(3));
    assert_eq!(cfg.upstream.max_message_bytes, 1024);
    assert_eq!(cfg.upstream.stream_idle_timeout, Duration::from_secs(240));
    assert_eq!(cfg.upstream.retry_budget, 3);
    assert_eq!(cfg.limits.max_client_message_bytes, 4096);
    assert_eq!(cfg.limits.max_transcript_bytes, 2048);
    assert_eq!(cfg.limits.max_transcript_bytes_total, 8192);
    assert_eq!(cfg.session.client_ping_interval, Duration::from_millis(250));
    assert_eq!(cfg.session.client_idle_timeout, Duration::from_secs(120));
    assert_eq!(cfg.session.max_held_errors, 2);
    assert_eq!(cfg.session.pump_channel, 8);
}

/// TM-3: the admin token from the file or the environment; none means the API is off.
#[test]
fn tm3_admin_token_and_listen() {
    let cfg = Config::from_yaml_str("admin: {token: t1, listen: '127.0.0.1:9001'}").unwrap();
    assert_eq!(cfg.admin.token().map(Secret::expose), Some("t1"));
    assert_eq!(cfg.admin.listen, Some("127.0.0.1:9001".parse().unwrap()));
    let env = |name: &str| (name == "ADM").then(|| "from-env".to_string());
    let cfg = Config::from_yaml_str_with_env("admin: {token_env: ADM}", &env).unwrap();
    assert_eq!(cfg.admin.token().map(Secret::expose), Some("from-env"));
    assert!(Config::from_yaml_str("").unwrap().admin.token().is_none());
}

/// US-2: `usage.prices` is read and checked with the config.
#[test]
fn us2_usage_prices_is_loaded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "prices.yaml",
        "models: {m*: {input: 1, cached_input: 0.5, output: 2}}",
    );
    let cfg = Config::from_yaml_str(&format!("usage: {{prices: '{}'}}", good.display())).unwrap();
    assert_eq!(cfg.usage.prices.as_deref(), Some(good.as_path()));
    let bad = write(
        &dir,
        "bad.yaml",
        "models: {m: {input: -1, cached_input: 0, output: 2}}",
    );
    let e = errors(&format!("usage: {{prices: '{}'}}", bad.display())).to_string();
    assert!(
        e.contains("usage.prices") && e.contains("models.m.input"),
        "{e}"
    );
}

/// OP-4: each bad value is rejected, naming its path.
#[test]
fn op4_every_bad_value_names_its_path() {
    let acct = "id: a, base_url: 'https://h', api_key: k";
    let cases: Vec<(String, &str)> = vec![
        ("usage: {flush_interval: 0s}".into(), "usage.flush_interval"),
        ("admin: {token: ''}".into(), "admin.token"),
        ("admin: {token: a, token_env: B}".into(), "admin.token"),
        ("admin: {listen: nowhere}".into(), "admin.listen"),
        ("admin: {tokens: a}".into(), "admin.tokens"),
        (
            "session: {preempt_policy: kill}".into(),
            "session.preempt_policy",
        ),
        ("session: {cancel_grace: 0s}".into(), "session.cancel_grace"),
        (
            "session: {admission_timeout: 0ms}".into(),
            "session.admission_timeout",
        ),
        ("session: {idle_timeout: 0s}".into(), "session.idle_timeout"),
        (
            "session: {first_message_timeout: 0s}".into(),
            "session.first_message_timeout",
        ),
        ("upstream: {max_age: 0s}".into(), "upstream.max_age"),
        ("upstream: {min_idle: -1}".into(), "upstream.min_idle"),
        (
            "upstream: {ws_failure_burst: 0}".into(),
            "upstream.ws_failure_burst",
        ),
        (
            format!("accounts: [{{{acct}, concurrency: 0}}]"),
            "accounts[0].concurrency",
        ),
        ("usage: {flush_interval: 5}".into(), "usage.flush_interval"),
        (
            "usage: {prices: /nonexistent/prices.yaml}".into(),
            "usage.prices",
        ),
        ("usage: {price: x}".into(), "usage.price"),
        ("store: {path: ''}".into(), "store.path"),
        ("store: {path: [1]}".into(), "store.path"),
        ("listen: nowhere".into(), "listen"),
        ("listen: 8080".into(), "listen"),
        ("ingress: {websocket: maybe}".into(), "ingress.websocket"),
        ("ingress: {http: true}".into(), "ingress.http"),
        ("keys: [{id: '', key: k}]".into(), "keys[0].id"),
        ("keys: [{key: k}]".into(), "keys[0].id"),
        ("keys: [{id: a, key: ''}]".into(), "keys[0].key"),
        (
            "keys: [{id: a, key: k, disabled: nope}]".into(),
            "keys[0].disabled",
        ),
        (
            "keys: [{id: a, key: k, websocket: 3}]".into(),
            "keys[0].websocket",
        ),
        (
            "keys: [{id: a, key_sha256: xyz}]".into(),
            "keys[0].key_sha256",
        ),
        ("keys: [{id: a, key_sha256: k, key: k}]".into(), "keys[0]"),
        (
            "keys: [{id: a, key: k, models: []}]".into(),
            "keys[0].models",
        ),
        (
            "keys: [{id: a, key: k}, {id: b, key: k}]".into(),
            "keys[1].key",
        ),
        (
            "accounts: [{base_url: 'https://h', api_key: k}]".into(),
            "accounts[0].id",
        ),
        (
            format!("accounts: [{{{acct}}}, {{{acct}}}]"),
            "accounts[1].id",
        ),
        (
            "accounts: [{id: a, api_key: k}]".into(),
            "accounts[0].base_url",
        ),
        (
            "accounts: [{id: a, base_url: 'ws://h', api_key: k}]".into(),
            "accounts[0].base_url",
        ),
        (
            "accounts: [{id: a, base_url: 'https://', api_key: k}]".into(),
            "accounts[0].base_url",
        ),
        (
            "accounts: [{id: a, base_url: 'https://h'}]".into(),
            "accounts[0]",
        ),
        (
            "accounts: [{id: a, base_url: 'https://h', api_key: ''}]".into(),
            "accounts[0].api_key",
        ),
        (
            format!("accounts: [{{{acct}, mode: turbo}}]"),
            "accounts[0].mode",
        ),
        (
            format!("accounts: [{{{acct}, models: gpt-5}}]"),
            "accounts[0].models",
        ),
        (
            format!("accounts: [{{{acct}, max_conns: 0}}]"),
            "accounts[0].max_conns",
        ),
        (
            format!("accounts: [{{{acct}, headers: {{Host: x}}}}]"),
            "accounts[0].headers.Host",
        ),
        (
            format!("accounts: [{{{acct}, headers: {{'a b': x}}}}]"),
            "accounts[0].headers.a b",
        ),
        (
            format!("accounts: [{{{acct}, weight: 0}}]"),
            "accounts[0].weight",
        ),
        (
            "limits: {max_client_message_bytes: 1023}".into(),
            "limits.max_client_message_bytes",
        ),
        (
            "limits: {max_client_message_bytes: 1MB}".into(),
            "limits.max_client_message_bytes",
        ),
        (
            "limits: {max_transcript_bytes: 1023}".into(),
            "limits.max_transcript_bytes",
        ),
        (
            "limits: {max_transcript_bytes: 64MB}".into(),
            "limits.max_transcript_bytes",
        ),
        (
            "limits: {max_transcript_bytes_total: -1}".into(),
            "limits.max_transcript_bytes_total",
        ),
        (
            "limits: {max_transcript_bytes_total: 67108863}".into(),
            "limits.max_transcript_bytes_total",
        ),
        (
            "limits: {max_transcript_bytes: 4096, max_transcript_bytes_total: 4095}".into(),
            "limits.max_transcript_bytes_total",
        ),
        (
            "session: {client_ping_interval: 20}".into(),
            "session.client_ping_interval",
        ),
        (
            "session: {client_ping_interval: 0s}".into(),
            "session.client_ping_interval",
        ),
        (
            "session: {client_idle_timeout: forever}".into(),
            "session.client_idle_timeout",
        ),
        (
            "session: {max_held_errors: 0}".into(),
            "session.max_held_errors",
        ),
        ("session: {pump_channel: -1}".into(), "session.pump_channel"),
        (
            "session: {http_session_ttl: 0s}".into(),
            "session.http_session_ttl",
        ),
        ("session: {lanes: 2}".into(), "session.lanes"),
        ("upstream: 5".into(), "upstream"),
        (
            "upstream: {ping_interval: 20}".into(),
            "upstream.ping_interval",
        ),
        (
            "upstream: {ping_interval: 0s}".into(),
            "upstream.ping_interval",
        ),
        (
            "upstream: {pong_timeout: soon}".into(),
            "upstream.pong_timeout",
        ),
        (
            "upstream: {pong_timeout: 0ms}".into(),
            "upstream.pong_timeout",
        ),
        (
            "upstream: {dial_timeout: 10}".into(),
            "upstream.dial_timeout",
        ),
        (
            "upstream: {dial_timeout: 0s}".into(),
            "upstream.dial_timeout",
        ),
        (
            "upstream: {max_message_bytes: 1023}".into(),
            "upstream.max_message_bytes",
        ),
        (
            "upstream: {max_message_bytes: 64MB}".into(),
            "upstream.max_message_bytes",
        ),
        (
            "upstream: {max_message_bytes: -1}".into(),
            "upstream.max_message_bytes",
        ),
        (
            "upstream: {stream_idle_timeout: 240}".into(),
            "upstream.stream_idle_timeout",
        ),
        (
            "upstream: {stream_idle_timeout: 0s}".into(),
            "upstream.stream_idle_timeout",
        ),
        // Keys named in the SPEC arrive with their behaviour, not before.
        (
            "upstream: {force_http: maybe}".into(),
            "upstream.force_http",
        ),
        (
            "upstream: {ws_fallback_cooldown: 0s}".into(),
            "upstream.ws_fallback_cooldown",
        ),
        (
            "upstream: {retry_budget: -1}".into(),
            "upstream.retry_budget",
        ),
        (
            "upstream: {retry_budget: twice}".into(),
            "upstream.retry_budget",
        ),
        (
            "upstream: {retry_budget: 1.5}".into(),
            "upstream.retry_budget",
        ),
        (
            "upstream: {pingInterval: 5s}".into(),
            "upstream.pingInterval",
        ),
    ];
    for (text, path) in cases {
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.path == path),
            "{text}: no error at {path}, got:\n{errs}"
        );
        let line = errs.iter().find(|e| e.path == path).unwrap().to_string();
        assert!(line.starts_with(&format!("{path}: ")), "{line}");
    }
}

/// OP-4: every bad `upstream` value is reported in one load, each at its path.
#[test]
fn op4_upstream_errors_are_all_reported() {
    let errs = errors(
        "upstream:\n  ping_interval: 0s\n  pong_timeout: 5\n  dial_timeout: never\n  \
         max_message_bytes: 10\n  stream_idle_timeout: 0s\n  sticky: 3\n",
    );
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "upstream.ping_interval",
            "upstream.pong_timeout",
            "upstream.dial_timeout",
            "upstream.max_message_bytes",
            "upstream.stream_idle_timeout",
            "upstream.sticky",
        ],
        "{errs}"
    );
    assert!(
        errs.to_string().contains("upstream.sticky: unknown key"),
        "{errs}"
    );
    let empty = Config::from_yaml_str("upstream:\n").unwrap();
    assert_eq!(empty.upstream.ping_interval, Duration::from_secs(20));
}

/// CT-8/CT-9 and CT-6 knobs: `retry_budget: 0` is allowed (never retry); the total transcript
/// limit may equal the per-session one but not be below it, and that is reported at the total.
#[test]
fn spec2_retry_budget_and_transcript_limits() {
    let cfg = Config::from_yaml_str(
        "upstream: {retry_budget: 0}\n\
         limits: {max_transcript_bytes: 1024, max_transcript_bytes_total: 1024}\n",
    )
    .unwrap();
    assert_eq!(cfg.upstream.retry_budget, 0);
    assert_eq!(
        (
            cfg.limits.max_transcript_bytes,
            cfg.limits.max_transcript_bytes_total
        ),
        (1024, 1024)
    );
    // A smaller per-session limit alone is fine against the default total.
    let cfg = Config::from_yaml_str("limits: {max_transcript_bytes: 4096}").unwrap();
    assert_eq!(cfg.limits.max_transcript_bytes_total, 2_147_483_648);

    let errs = errors("limits: {max_transcript_bytes: 8192, max_transcript_bytes_total: 4096}");
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["limits.max_transcript_bytes_total"], "{errs}");
    assert!(errs.to_string().contains("8192"), "{errs}");

    // A bad per-session value is reported once; its stand-in default is not held against the
    // total.
    let errs = errors("limits: {max_transcript_bytes: lots, max_transcript_bytes_total: 2048}");
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["limits.max_transcript_bytes"], "{errs}");

    // Through the binary, with the path.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "limits.yaml",
        "upstream:\n  retry_budget: -2\nlimits:\n  max_transcript_bytes: 100\n  \
         max_transcript_bytes_total: 50\n",
    );
    let out = check_config(&file, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for path in [
        "upstream.retry_budget:",
        "limits.max_transcript_bytes:",
        "limits.max_transcript_bytes_total:",
    ] {
        assert!(stderr.contains(path), "{path}: {stderr}");
    }
}

/// SPEC §2 `*_env`: secrets read from the environment at load.
#[test]
fn spec2_key_env_and_api_key_env_read_the_environment() {
    std::env::set_var("SY_IT_LIB_KEY", "sy-from-env");
    std::env::set_var("SY_IT_LIB_ACCT", "sk-from-env");
    std::env::set_var("SY_IT_LIB_EMPTY", "");
    let cfg = Config::from_yaml_str(
        "keys: [{id: k, key_env: SY_IT_LIB_KEY}]\n\
         accounts: [{id: a, base_url: 'https://h', api_key_env: SY_IT_LIB_ACCT}]\n",
    )
    .unwrap();
    assert_eq!(
        cfg.find_key("sy-from-env").map(|k| k.id.as_str()),
        Some("k")
    );
    assert_eq!(cfg.accounts[0].api_key().expose(), "sk-from-env");

    let errs = errors(
        "keys: [{id: k, key_env: SY_IT_LIB_UNSET_X}]\n\
         accounts: [{id: a, base_url: 'https://h', api_key_env: SY_IT_LIB_EMPTY}]\n",
    );
    assert!(errs.iter().any(|e| e.path == "keys[0].key_env"), "{errs}");
    assert!(
        errs.iter().any(|e| e.path == "accounts[0].api_key_env"),
        "{errs}"
    );
}

#[test]
fn find_key_matches_literal_env_and_sha256_keys_only() {
    std::env::set_var("SY_IT_FIND_KEY", "sy-env-key");
    let cfg = Config::from_yaml_str(&format!(
        "keys:\n  - {{id: lit, key: sy-literal}}\n  - {{id: env, key_env: SY_IT_FIND_KEY}}\n  \
         - {{id: hash, key_sha256: {}}}\n",
        sha256_hex("sy-hashed").to_uppercase()
    ))
    .unwrap();
    assert_eq!(cfg.find_key("sy-literal").unwrap().id, "lit");
    assert_eq!(cfg.find_key("sy-env-key").unwrap().id, "env");
    assert_eq!(cfg.find_key("sy-hashed").unwrap().id, "hash");
    for wrong in [
        "",
        "sy-literal2",
        "sy-litera",
        "SY_IT_FIND_KEY",
        &sha256_hex("sy-hashed"),
    ] {
        assert!(cfg.find_key(wrong).is_none(), "{wrong}");
    }
}

#[test]
fn secrets_are_masked_in_debug_and_display() {
    let secret = Secret::new("sk-very-secret");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(format!("{secret}"), "***");
    assert_eq!(secret.expose(), "sk-very-secret");
    let cfg = Config::from_yaml_str(
        "keys: [{id: k, key: sy-very-secret}]\n\
         accounts: [{id: a, base_url: 'https://h', api_key: sk-very-secret}]\n",
    )
    .unwrap();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
}

/// SPEC §2: the WebSocket URL is base_url + /responses with http→ws, https→wss; the HTTP URL is
/// base_url + /responses; a trailing slash on base_url is tolerated.
#[test]
fn spec2_ws_and_http_urls() {
    let cases = [
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
    ];
    for (base, ws, http) in cases {
        let text = format!("accounts: [{{id: a, base_url: '{base}', api_key: k}}]");
        let cfg = Config::from_yaml_str(&text).unwrap();
        assert_eq!(cfg.accounts[0].ws_url(), ws);
        assert_eq!(cfg.accounts[0].http_url(), http);
        let built = AccountConfig::new("a", base, "k");
        assert_eq!(
            (built.ws_url(), built.http_url()),
            (ws.to_string(), http.to_string())
        );
    }
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let errs = Config::load(&dir.path().join("absent.yaml")).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(errs.to_string().contains("absent.yaml"), "{errs}");
}
