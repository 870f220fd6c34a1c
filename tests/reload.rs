//! Config reload (TM-3, WS-8): keys and accounts change while sessions stream, nothing is
//! dropped, a revoked key's socket closes after its running turn, and a bad file is refused.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const KEY_B: &str = "sy-key-b";
const KEY_C: &str = "sy-key-c";

fn config(mock_url: &str, store: &Path, keys: &[(&str, &str)], mode: &str) -> String {
    let mut yaml = String::from("listen: 127.0.0.1:0\nkeys:\n");
    for (id, key) in keys {
        yaml.push_str(&format!("  - id: {id}\n    key: {key}\n"));
    }
    yaml.push_str(&format!(
        "accounts:\n  - id: up\n    base_url: {mock_url}\n    api_key: sk-up\n    mode: {mode}\nstore:\n  path: {}\n",
        store.display()
    ));
    yaml
}

struct Setup {
    env: Env,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("switchyard.yaml");
    let store = dir.path().join("usage.db");
    let mock = switchyard::mock::MockUpstream::start(Default::default())
        .await
        .expect("mock");
    let text = config(
        &mock.base_url(),
        &store,
        &[("a", KEY), ("b", KEY_B)],
        "ctx_pool",
    );
    std::fs::write(&path, &text).expect("config");
    let cfg = switchyard::config::Config::load(&path).expect("valid");
    let relay = switchyard::server::spawn_with_path(cfg, Some(path.clone()))
        .await
        .expect("relay");
    let store_dir = tempfile::tempdir().expect("unused");
    Setup {
        env: Env {
            mock,
            relay,
            store_dir,
        },
        path,
        _dir: dir,
    }
}

/// Keys and accounts are reloaded while sessions stream: the running turn finishes, the next
/// turn uses the new account mode, a removed key's idle socket closes with 1008, a new key
/// works, and the removed one is refused.
#[tokio::test]
async fn tm3_reload_of_keys_and_accounts_while_sessions_stream() {
    let s = setup().await;
    let env = &s.env;
    let mut a = env.connect().await;
    let mut b = ws_connect(&env.ws_url(), KEY_B).await;
    send(&mut b, &create("gpt-test", "b's turn")).await;
    read_turn(&mut b).await;
    send(
        &mut a,
        &create("gpt-test", "[[mock:text 40]] [[mock:fault slow 3ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut a).await, Frame::Event(_)));
    let store = s.path.with_file_name("usage.db");
    let new = config(
        &env.mock.base_url(),
        &store,
        &[("a", KEY), ("c", KEY_C)],
        "http",
    );
    std::fs::write(&s.path, new).expect("rewrite");
    env.relay.app.reload().expect("valid reload");
    let rest = read_turn(&mut a).await;
    assert_eq!(
        rest.last().unwrap()["type"],
        "response.completed",
        "not dropped"
    );
    assert_eq!(next_frame(&mut b).await, Frame::Closed(Some(1008)));
    send(&mut a, &create("gpt-test", "next")).await;
    assert_eq!(
        read_turn(&mut a).await.last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(env.mock.log().http_requests, 1, "the account is http now");
    let mut c = ws_connect(&env.ws_url(), KEY_C).await;
    send(&mut c, &create("gpt-test", "c")).await;
    assert_eq!(
        read_turn(&mut c).await.last().unwrap()["type"],
        "response.completed"
    );
    let refused = ws_connect_with(&env.ws_url(), KEY_B, &[]).await;
    assert!(refused.is_err(), "the removed key is refused");
}

/// A running turn of a removed key finishes before its socket closes with 1008.
#[tokio::test]
async fn ws8_a_revoked_key_closes_after_its_running_turn() {
    let s = setup().await;
    let env = &s.env;
    let mut b = ws_connect(&env.ws_url(), KEY_B).await;
    send(
        &mut b,
        &create("gpt-test", "[[mock:text 40]] [[mock:fault slow 3ms]]"),
    )
    .await;
    assert!(matches!(next_frame(&mut b).await, Frame::Event(_)));
    let store = s.path.with_file_name("usage.db");
    std::fs::write(
        &s.path,
        config(&env.mock.base_url(), &store, &[("a", KEY)], "ctx_pool"),
    )
    .expect("rewrite");
    env.relay.app.reload().expect("valid reload");
    let (events, end) = read_until_end(&mut b).await;
    assert_eq!(end, None, "the turn ran to its terminal");
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    assert_eq!(next_frame(&mut b).await, Frame::Closed(Some(1008)));
}

/// A bad file is refused with its errors and the old config stays; a changed file is picked
/// up without a signal.
#[tokio::test]
async fn tm3_a_bad_reload_is_refused_and_a_file_change_is_picked_up() {
    let s = setup().await;
    let env = &s.env;
    std::fs::write(&s.path, "keys: [{id: a}]\nlisten: nowhere\n").expect("broken");
    let errors = env.relay.app.reload().expect_err("refused");
    let text = errors.to_string();
    assert!(
        text.contains("listen") && text.contains("keys[0]"),
        "{text}"
    );
    let mut a = env.connect().await;
    send(&mut a, &create("gpt-test", "still here")).await;
    assert_eq!(
        read_turn(&mut a).await.last().unwrap()["type"],
        "response.completed"
    );
    // A valid change, noticed by the watcher (no call, no signal).
    let before = *env.relay.app.reloads.borrow();
    let store = s.path.with_file_name("usage.db");
    let keys = [("a", KEY), ("b", KEY_B), ("c", KEY_C)];
    std::fs::write(
        &s.path,
        config(&env.mock.base_url(), &store, &keys, "ctx_pool"),
    )
    .expect("rewrite");
    let app = env.relay.app.clone();
    eventually(move || *app.reloads.borrow() > before).await;
    let mut c = ws_connect(&env.ws_url(), KEY_C).await;
    send(&mut c, &create("gpt-test", "new key")).await;
    assert_eq!(
        read_turn(&mut c).await.last().unwrap()["type"],
        "response.completed"
    );
}
