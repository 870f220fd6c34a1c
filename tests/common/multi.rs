//! A relay in front of one mock upstream per account, with the admin API on, for the tests of
//! account choice and the scheduling simulation.

use serde_json::Value;
use switchyard::mock::{MockOptions, MockUpstream};

use super::{ws_connect, Ws, KEY};

pub const TOKEN: &str = "adm-secret";
pub const OTHER_KEY: &str = "sy-other-key";

/// A relay in front of one mock per account.
pub struct Multi {
    pub mocks: Vec<MockUpstream>,
    pub relay: switchyard::server::Running,
    /// Holds the relay's store.
    pub dir: tempfile::TempDir,
}

/// `accounts`: (id, extra YAML lines for that account, each starting with four spaces).
pub async fn multi(accounts: &[(&str, &str)], extra: &str) -> Multi {
    let dir = tempfile::tempdir().expect("dir");
    multi_in(accounts, extra, dir).await
}

pub async fn multi_in(accounts: &[(&str, &str)], extra: &str, dir: tempfile::TempDir) -> Multi {
    let mut mocks = Vec::new();
    let mut yaml = format!(
        "listen: 127.0.0.1:0\nkeys:\n  - id: test\n    key: {KEY}\n  - id: other\n    key: {OTHER_KEY}\nadmin:\n  token: {TOKEN}\nstore:\n  path: {}\n{extra}accounts:\n",
        dir.path().join("state.db").display()
    );
    for (id, more) in accounts {
        let mock = MockUpstream::start(MockOptions::default())
            .await
            .expect("mock");
        yaml.push_str(&format!(
            "  - id: {id}\n    base_url: {}\n    api_key: sk-{id}\n{more}",
            mock.base_url()
        ));
        mocks.push(mock);
    }
    let cfg = switchyard::config::Config::from_yaml_str(&yaml).expect("config");
    let relay = switchyard::server::spawn(cfg).await.expect("relay");
    Multi { mocks, relay, dir }
}

impl Multi {
    pub async fn connect(&self) -> Ws {
        ws_connect(&format!("ws://{}/v1/responses", self.relay.addr), KEY).await
    }

    /// Requests each mock has seen.
    pub fn seen(&self) -> Vec<usize> {
        self.mocks.iter().map(|m| m.log().requests.len()).collect()
    }

    pub async fn accounts(&self) -> Vec<Value> {
        let url = format!("http://{}/admin/v1/accounts", self.relay.addr);
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin");
        r.json::<Vec<Value>>().await.expect("json")
    }

    pub async fn account(&self, id: &str) -> Value {
        let all = self.accounts().await;
        all.into_iter().find(|a| a["id"] == id).expect("account")
    }

    pub async fn admin_post(&self, path: &str) -> u16 {
        let url = format!("http://{}/admin/v1/accounts/{path}", self.relay.addr);
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin");
        r.status().as_u16()
    }

    pub async fn records(&self) -> Vec<switchyard::usage::Record> {
        let usage = &self.relay.app.usage;
        usage.flush().await.expect("flush");
        let store =
            switchyard::usage::store::Store::open(&self.relay.app.cfg().store.path).expect("store");
        store
            .records(&switchyard::usage::store::Query::default())
            .expect("records")
    }
}
