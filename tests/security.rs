//! Security: a negative authentication matrix over every client and admin route (zero
//! bypasses), no configured secret in any log line of a scripted session at the most verbose
//! level, and nothing a client sends can set the upstream's `Authorization`, hop-by-hop headers
//! or the upstream URL.

mod common;

use std::collections::HashMap;

use common::process::Proc;
use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};
use switchyard::mock::{MockOptions, MockUpstream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

const ADMIN: &str = "adm-secret-token-7f3a";
const DISABLED: &str = "sy-disabled-key-19c2";
const UPSTREAM: &str = "sk-up";
const PATHS: [&str; 3] = [
    "/v1/responses",
    "/responses",
    "/backend-api/codex/responses",
];

/// The relay of these tests: keys `test` and `off` (disabled), the admin token, account `up`
/// (pooled WebSocket, model gpt-test) and `web` (http, model gpt-web) on one mock.
async fn secured() -> Env {
    relay_from(|url| {
        format!(
            "listen: 127.0.0.1:0
admin:
  token: {ADMIN}
keys:
  - id: test
    key: {KEY}
  - id: off
    key: {DISABLED}
    disabled: true
accounts:
  - id: up
    base_url: {url}
    api_key: {UPSTREAM}
    models: [gpt-test]
  - id: web
    base_url: {url}
    api_key: sk-web
    mode: http
    models: [gpt-web]
"
        )
    })
    .await
}

/// How a request presents (or fails to present) a credential.
#[derive(Debug, Clone)]
struct Cred {
    name: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    query: String,
}

fn cred(name: &'static str, headers: &[(&'static str, &[u8])], query: &str) -> Cred {
    Cred {
        name,
        headers: headers.iter().map(|(k, v)| (*k, v.to_vec())).collect(),
        query: query.to_string(),
    }
}

fn bearer(v: &str) -> Vec<u8> {
    format!("Bearer {v}").into_bytes()
}

/// Every way of not holding `secret` (a client key or the admin token), plus `other` secrets
/// that are real but wrong here.
fn wrong_creds(secret: &str, others: &[&str]) -> Vec<Cred> {
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret);
    let mut out = vec![
        cred("missing", &[], ""),
        cred("empty bearer", &[("authorization", b"Bearer ")], ""),
        cred("scheme only", &[("authorization", b"Bearer")], ""),
        cred(
            "garbled bytes",
            &[("authorization", b"Bearer \xff\xfe\x80")],
            "",
        ),
    ];
    let owned: Vec<(&'static str, Vec<u8>)> = vec![
        ("basic", format!("Basic {b64}").into_bytes()),
        ("basic raw", format!("Basic {secret}").into_bytes()),
        ("token scheme", format!("Token {secret}").into_bytes()),
        ("glued", format!("Bearer{secret}").into_bytes()),
        ("prefix", bearer(&secret[..secret.len() - 1])),
        ("suffix", bearer(&format!("{secret}x"))),
        ("upper case", bearer(&secret.to_uppercase())),
        ("unknown", bearer("sy-not-configured-anywhere")),
    ];
    for (name, v) in owned {
        out.push(Cred {
            name,
            headers: vec![("authorization", v)],
            query: String::new(),
        });
    }
    for o in others {
        out.push(Cred {
            name: "another secret",
            headers: vec![("authorization", bearer(o))],
            query: String::new(),
        });
    }
    out.push(Cred {
        name: "x-api-key",
        headers: vec![("x-api-key", secret.as_bytes().to_vec())],
        query: String::new(),
    });
    out.push(Cred {
        name: "query",
        headers: vec![],
        query: format!("?api_key={secret}&key={secret}&token={secret}"),
    });
    out
}

/// An upgrade with `c`: its refusal's status and JSON body (panics if it is accepted).
async fn upgrade_refused(addr: &str, path: &str, c: &Cred) -> (u16, Value) {
    let mut req = format!("ws://{addr}{path}{}", c.query)
        .into_client_request()
        .expect("request");
    for (k, v) in &c.headers {
        req.headers_mut().insert(
            HeaderName::from_static(k),
            HeaderValue::from_bytes(v).expect("header bytes"),
        );
    }
    let got = tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(req))
        .await
        .expect("hang guard: upgrade");
    match got {
        Ok(_) => panic!("BYPASS: the upgrade with {} on {path} was accepted", c.name),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().clone().unwrap_or_default();
            let json = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{}: the refusal is not JSON: {e}", c.name));
            (r.status().as_u16(), json)
        }
        Err(e) => panic!(
            "{}: neither accepted nor refused with a status: {e}",
            c.name
        ),
    }
}

/// An HTTP request with `c`: its status and JSON body.
async fn http_with(method: &str, url: &str, c: &Cred, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = reqwest::Client::new().request(method, format!("{url}{}", c.query));
    for (k, v) in &c.headers {
        req = req.header(*k, HeaderValue::from_bytes(v).expect("header bytes"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("an answer");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: the answer is not JSON ({e}): {text}", c.name));
    (status, json)
}

/// SPEC WS-2, HS-1, TM-3: without the right key no upgrade or request is served, on every path,
/// and a disabled key gets 403; without the admin token no admin route answers or changes
/// anything. The right credentials, tried last, work, so the matrix cannot pass by refusing
/// everything.
#[tokio::test]
async fn sc1_negative_auth_matrix_has_no_bypass() {
    let env = secured().await;
    let addr = env.relay.addr.to_string();
    let body = json!({"model": "gpt-test", "input": "hi [[mock:text 2]]"});
    let mut tried = 0;
    for c in wrong_creds(KEY, &[ADMIN, UPSTREAM]) {
        for path in PATHS {
            let (s, b) = upgrade_refused(&addr, path, &c).await;
            assert_eq!(s, 401, "{} on {path}: {b}", c.name);
            assert_eq!(b["error"]["type"], "invalid_request_error", "{b}");
            let (s, b) = http_with("POST", &env.http_url(path), &c, Some(body.clone())).await;
            assert_eq!(s, 401, "{} on POST {path}: {b}", c.name);
            tried += 2;
        }
    }
    let off = cred("disabled key", &[], "");
    let off = Cred {
        headers: vec![("authorization", bearer(DISABLED))],
        ..off
    };
    for path in PATHS {
        assert_eq!(upgrade_refused(&addr, path, &off).await.0, 403);
        let (s, b) = http_with("POST", &env.http_url(path), &off, Some(body.clone())).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (403, Some("api_key_disabled"))
        );
    }
    let log = env.mock.log();
    assert_eq!(
        (log.upgrades.len(), log.requests.len(), log.http_requests),
        (0, 0, 0),
        "nothing reached the upstream"
    );
    assert_eq!(env.relay.app.usage.recorded(), 0, "no request was read");
    eprintln!("client matrix: {tried} refusals");
    admin_matrix(&env).await;
    // Positive controls: the right key and the right token work.
    let mut ws = env.connect().await;
    assert!(completed(&turn(&mut ws, "[[mock:text 2]]").await));
    let right = Cred {
        headers: vec![("authorization", bearer(KEY))],
        ..cred("right key", &[], "")
    };
    let (s, _) = http_with("POST", &env.http_url("/v1/responses"), &right, Some(body)).await;
    assert_eq!(s, 200);
}

/// Every admin route refuses every wrong credential with 401 and changes nothing.
async fn admin_matrix(env: &Env) {
    let routes: [(&str, &str, Option<Value>); 6] = [
        ("GET", "/admin/v1/accounts", None),
        (
            "POST",
            "/admin/v1/accounts/up/mode",
            Some(json!({"mode": "http"})),
        ),
        ("POST", "/admin/v1/accounts/up/enable", None),
        ("POST", "/admin/v1/accounts/up/disable", None),
        ("POST", "/admin/v1/accounts/up/drain", None),
        ("DELETE", "/admin/v1/accounts/up/override", None),
    ];
    let before = admin_view(env).await;
    let mut tried = 0;
    for c in wrong_creds(ADMIN, &[KEY, DISABLED, UPSTREAM]) {
        for (method, path, body) in &routes {
            let (s, b) = http_with(method, &env.http_url(path), &c, body.clone()).await;
            assert_eq!(
                (s, b["error"]["code"].as_str()),
                (401, Some("invalid_admin_token")),
                "{} on {method} {path}: {b}",
                c.name
            );
            tried += 1;
        }
    }
    assert_eq!(
        admin_view(env).await,
        before,
        "no refused call changed anything"
    );
    eprintln!("admin matrix: {tried} refusals");
    let token = Cred {
        headers: vec![("authorization", bearer(ADMIN))],
        ..cred("token", &[], "")
    };
    let (s, b) = http_with("POST", &env.http_url(routes[3].1), &token, None).await;
    assert_eq!((s, b["enabled"].as_bool()), (200, Some(false)), "{b}");
    let (s, _) = http_with("DELETE", &env.http_url(routes[5].1), &token, None).await;
    assert_eq!(s, 200);
}

/// Each account's mode, enabled, draining and override, as the admin API shows them.
async fn admin_view(env: &Env) -> Vec<Value> {
    let list: Vec<Value> = reqwest::Client::new()
        .get(env.http_url("/admin/v1/accounts"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    list.iter()
        .map(|a| {
            json!([
                a["id"],
                a["mode"],
                a["enabled"],
                a["draining"],
                a["override"]
            ])
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// No secret in any log line
// ---------------------------------------------------------------------------------------------

/// Every secret the scripted session's config holds, each once literal and once from the
/// environment where the config allows it.
struct Secrets {
    key: &'static str,
    env_key: &'static str,
    admin: &'static str,
    upstream: &'static str,
    upstream_env: &'static str,
    refused_upstream: &'static str,
    redis: &'static str,
}

const SECRETS: Secrets = Secrets {
    key: "sy-secret-literal-5d1e",
    env_key: "sy-secret-from-env-8b2c",
    admin: "adm-secret-from-env-0f4d",
    upstream: "sk-secret-upstream-ws-61aa",
    upstream_env: "sk-secret-upstream-web-93cd",
    refused_upstream: "sk-secret-revoked-2e7b",
    redis: "redis-secret-pass-4c9f",
};

impl Secrets {
    fn all(&self) -> [&'static str; 7] {
        [
            self.key,
            self.env_key,
            self.admin,
            self.upstream,
            self.upstream_env,
            self.refused_upstream,
            self.redis,
        ]
    }
}

/// The config: account `gone` comes first and its credential is refused (UP-8 logs that), so
/// every path that handles an upstream key is taken; shared state in a Redis with a password.
fn secret_config(
    dir: &std::path::Path,
    ok: &MockUpstream,
    revoked: &MockUpstream,
    redis: &str,
) -> std::path::PathBuf {
    let s = &SECRETS;
    let yaml = format!(
        "listen: 127.0.0.1:0
log:
  format: text
admin:
  token_env: SY_SEC_ADMIN
keys:
  - id: lit
    key: {}
  - id: env
    key_env: SY_SEC_KEY
accounts:
  - id: gone
    base_url: {}
    api_key: {}
    priority: 0
  - id: ws
    base_url: {}
    api_key: {}
    priority: 1
  - id: web
    base_url: {}
    api_key_env: SY_SEC_UP
    mode: http
    models: [gpt-web]
state:
  backend: redis
  redis_url: {redis}
  redis_prefix: seclog
store:
  path: {}
",
        s.key,
        revoked.base_url(),
        s.refused_upstream,
        ok.base_url(),
        s.upstream,
        ok.base_url(),
        dir.join("usage.db").display()
    );
    let path = dir.join("switchyard.yaml");
    std::fs::write(&path, yaml).expect("config");
    path
}

/// The scripted session's WebSocket part: a warm-up, text, a tool call and its output, a
/// retried upstream drop, a preemption, a client that leaves mid-turn, and requests whose
/// model and `previous_response_id` try to forge log lines.
async fn ws_script(relay: &Proc, key: &str) {
    let mut ws = ws_connect(&relay.ws_url(), key).await;
    let warm =
        json!({"type": "response.create", "model": "gpt-test", "generate": false, "input": []});
    send(&mut ws, &warm).await;
    assert!(completed(&read_turn(&mut ws).await));
    assert!(completed(&turn(&mut ws, "[[mock:text 5]]").await));
    let tool = turn(&mut ws, r#"[[mock:tool exec_command {"cmd":"echo hi"}]]"#).await;
    let id = response_id(&tool);
    let call = tool
        .last()
        .and_then(|t| {
            t["response"]["output"]
                .as_array()?
                .iter()
                .find(|i| i["type"] == "function_call")
                .cloned()
        })
        .expect("a call");
    let output = json!({"type": "response.create", "model": "gpt-test", "previous_response_id": id,
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "hi"}]});
    send(&mut ws, &output).await;
    assert!(completed(&read_turn(&mut ws).await));
    assert!(completed(
        &turn(
            &mut ws,
            "[[mock:text 5]] [[mock:fault close 1012 after=1 once=sec]]"
        )
        .await
    ));
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 5ms]]"),
    )
    .await;
    next_frame(&mut ws).await;
    assert!(completed(
        &turn(&mut ws, "after the preemption [[mock:text 3]]").await
    ));
    let forged = "gpt-test\nFORGED 2026-12-07T00:00:00Z  WARN admin token accepted";
    send(&mut ws, &create(forged, "[[mock:text 2]]")).await;
    read_turn(&mut ws).await;
    let chained = json!({"type": "response.create", "model": "gpt-test",
        "previous_response_id": "resp_x\nFORGED line", "input": "hi"});
    send(&mut ws, &chained).await;
    read_turn(&mut ws).await;
    send(
        &mut ws,
        &create("gpt-test", "[[mock:text 200]] [[mock:fault slow 5ms]]"),
    )
    .await;
    next_frame(&mut ws).await;
    drop(ws);
}

/// The HTTP part, the refused credentials (every configured secret presented where it is
/// wrong) and the admin API.
async fn http_script(relay: &Proc) {
    let s = &SECRETS;
    let url = format!("http://{}/v1/responses", relay.addr);
    let client = reqwest::Client::new();
    for (model, stream) in [("gpt-test", false), ("gpt-web", true), ("gpt-web", false)] {
        let r = client
            .post(&url)
            .bearer_auth(s.env_key)
            .json(&json!({"model": model, "stream": stream, "input": "hi [[mock:text 3]]"}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
        r.text().await.expect("body");
    }
    for wrong in [
        s.admin,
        s.upstream,
        s.upstream_env,
        s.redis,
        &format!("{}x", s.key),
    ] {
        let r = client
            .post(&url)
            .bearer_auth(wrong)
            .json(&json!({"model": "gpt-test"}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401);
        assert!(ws_connect_with(&relay.ws_url(), wrong, &[]).await.is_err());
    }
    let admin = format!("http://{}/admin/v1/accounts", relay.addr);
    for token in [s.key, s.admin] {
        client
            .get(&admin)
            .bearer_auth(token)
            .send()
            .await
            .expect("admin");
        client
            .post(format!("{admin}/web/mode"))
            .bearer_auth(token)
            .json(&json!({"mode": "http"}))
            .send()
            .await
            .expect("admin");
    }
    let r = client
        .post(format!("{admin}/gone/enable"))
        .bearer_auth(s.admin)
        .send()
        .await
        .expect("enable");
    assert_eq!(r.status(), 200);
}

/// OP-3, WS-2: a scripted session over every ingress, transport and refusal, logged at the most
/// verbose level (`RUST_LOG=trace`) in text and then (after a reload) JSON, writes none of the
/// configured secrets — client keys, the admin token, upstream keys (literal and from the
/// environment, one refused by the upstream), the Redis password — and no line a request
/// forged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op3_no_configured_secret_appears_in_any_log_line() {
    let s = &SECRETS;
    let ok = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let revoked = MockUpstream::start(MockOptions {
        api_keys: vec!["sk-the-only-good-one".into()],
        ..MockOptions::default()
    })
    .await
    .expect("mock");
    let redis = RedisServer::start_with(Some(s.redis));
    let dir = tempfile::tempdir().expect("dir");
    let config = secret_config(dir.path(), &ok, &revoked, &redis.url());
    let env = [
        ("RUST_LOG", "trace"),
        ("SY_SEC_ADMIN", s.admin),
        ("SY_SEC_KEY", s.env_key),
        ("SY_SEC_UP", s.upstream_env),
    ];
    let mut relay = Proc::start_with(&config, &env).await;
    ws_script(&relay, s.key).await;
    http_script(&relay).await;
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("format: text", "format: json")).expect("rewrite");
    relay.signal("HUP");
    relay.wait_log("config reloaded").await;
    ws_script(&relay, s.env_key).await;
    let (code, lines) = relay.finish().await;
    assert_eq!(code, Some(0));
    let joined = lines.join("\n");
    for secret in s.all() {
        let at = lines.iter().find(|l| l.contains(secret));
        assert!(at.is_none(), "a secret in the log: {at:?}");
    }
    for l in &lines {
        assert!(!l.starts_with("FORGED"), "a request forged a log line: {l}");
    }
    // The log is the whole story, so the check above cannot pass on an empty one.
    for needle in [
        "turn ended",
        "refused the account's credential",
        "\"spans\"",
        "FORGED",
        "config reloaded",
    ] {
        assert!(joined.contains(needle), "the log holds {needle:?}");
    }
    eprintln!(
        "{} log lines, {} bytes, no secret",
        lines.len(),
        joined.len()
    );
}

// ---------------------------------------------------------------------------------------------
// What a client cannot set upstream
// ---------------------------------------------------------------------------------------------

/// Headers a client may send that must never reach an upstream: its own credentials, the
/// hop-by-hop set (RFC 9110 §7.6.1) and every way of naming another host.
const NEVER_FORWARDED: [&str; 12] = [
    "proxy-authorization",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-for",
    "forwarded",
    "x-original-url",
    "x-upstream-url",
    "openai-organization",
];

fn hostile_headers(evil: &str) -> Vec<(&'static str, String)> {
    let mut h: Vec<(&'static str, String)> = NEVER_FORWARDED
        .iter()
        .map(|k| (*k, format!("http://{evil}/v1")))
        .collect();
    h.retain(|(k, _)| !matches!(*k, "te" | "trailer" | "keep-alive" | "proxy-connection"));
    h.push(("te", "trailers".into()));
    h.push(("trailer", "x-evil".into()));
    h.push(("keep-alive", "timeout=5".into()));
    h.push(("proxy-connection", "keep-alive".into()));
    h.push(("session-id", "sec-thread".into()));
    h
}

/// A body that names another upstream in every field a careless relay might read.
fn hostile_body(model: &str, evil: &str) -> Value {
    json!({"model": model, "input": "hi [[mock:text 2]]", "base_url": format!("http://{evil}/v1"),
        "url": format!("ws://{evil}/v1/responses"), "api_base": format!("http://{evil}"),
        "api_key": "sk-client-chosen", "headers": {"authorization": "Bearer sk-client-chosen"}})
}

/// Checks the headers of one upgrade or request the real upstream saw: its own host, and none
/// of the hostile headers.
fn assert_clean(mock: &MockUpstream, headers: &HashMap<String, String>) {
    assert_eq!(
        headers.get("host"),
        Some(&mock.addr.to_string()),
        "{headers:?}"
    );
    for h in NEVER_FORWARDED {
        assert!(
            !headers.contains_key(h),
            "{h} reached the upstream: {headers:?}"
        );
    }
}

/// WS-7, HS-5: a client's `Authorization`, hop-by-hop headers, forwarding headers, body fields
/// naming another upstream, a query string and an absolute-form request target never change
/// the upstream a turn goes to or the credential it carries, over WebSocket and HTTP, to a
/// pooled and to an `http` account. A second mock stands where the client points: it sees
/// nothing.
#[tokio::test]
async fn ws7_the_client_cannot_set_the_upstream_credential_headers_or_url() {
    let evil = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock");
    let env = secured().await;
    let e = evil.addr.to_string();
    let headers = hostile_headers(&e);
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = format!("{}?base_url=http://{e}/v1&upstream=ws://{e}", env.ws_url());
    let mut ws = ws_connect_with(&url, KEY, &pairs).await.expect("upgrade");
    for model in ["gpt-test", "gpt-web"] {
        let mut frame = hostile_body(model, &e);
        frame["type"] = json!("response.create");
        send(&mut ws, &frame).await;
        assert!(completed(&read_turn(&mut ws).await));
    }
    for model in ["gpt-test", "gpt-web"] {
        let mut req = reqwest::Client::new()
            .post(env.http_url(&format!("/v1/responses?base_url=http://{e}")))
            .bearer_auth(KEY);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let r = req
            .json(&hostile_body(model, &e))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
    }
    absolute_form_request(&env.relay.addr.to_string(), &e).await;
    let seen = env.mock.log();
    assert_eq!(
        seen.requests.len(),
        5,
        "every request reached the configured upstream"
    );
    // The mock's account is a digest of the key it was given: the account's own key, never
    // the client's or one from the body.
    let account_of = |key: &str| env.mock.state.account_for(key);
    for u in &seen.upgrades {
        assert_clean(&env.mock, &u.headers);
    }
    for r in &seen.requests {
        let (key, over) = if r.conn == 0 {
            ("sk-web", "http")
        } else {
            (UPSTREAM, "ws")
        };
        assert_eq!(
            Some(r.account.clone()),
            account_of(key),
            "{over}: the account's own key"
        );
        if r.conn == 0 {
            assert_clean(&env.mock, &r.headers);
        }
    }
    let other = evil.log();
    assert_eq!(
        (
            other.upgrades.len(),
            other.requests.len(),
            other.http_requests
        ),
        (0, 0, 0),
        "the upstream the client named saw nothing"
    );
}

/// `POST http://EVIL/v1/responses` in absolute form with `Host: EVIL`: served by the configured
/// upstream like any other request.
async fn absolute_form_request(relay: &str, evil: &str) {
    let body = hostile_body("gpt-test", evil).to_string();
    let head = format!(
        "POST http://{evil}/v1/responses HTTP/1.1\r\nHost: {evil}\r\nAuthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let (status, answer) = raw_http(relay, &head, body.as_bytes(), None).await;
    assert_eq!(status, 200, "{answer}");
}
