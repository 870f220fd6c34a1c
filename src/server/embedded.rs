//! The embedded default: `switchyard serve` without a config runs the built-in mock upstream
//! in-process as the only account and prints a fresh dev key with the Codex snippet that uses
//! it, so a new user has a working relay with one command.

use std::net::SocketAddr;

use crate::config::{AccountConfig, Config, KeyConfig};
use crate::mock::{MockOptions, MockUpstream};

/// Runs the relay on `listen` in front of an in-process mock upstream.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let mock = MockUpstream::start(MockOptions::default()).await?;
    let key = format!("sy-dev-{}", hex::encode(rand::random::<[u8; 16]>()));
    let mut cfg = Config {
        listen,
        ..Config::default()
    };
    cfg.keys.push(KeyConfig::new("dev", key.clone()));
    let upstream_key = format!("sk-mock-{}", hex::encode(rand::random::<[u8; 8]>()));
    cfg.accounts
        .push(AccountConfig::new("mock", mock.base_url(), upstream_key));
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("embedded default config: {e}"))?;
    let app = super::App::new(cfg)?;
    let listener = tokio::net::TcpListener::bind(app.cfg().listen).await?;
    let addr = listener.local_addr()?;
    println!("{}", banner(addr, &key, &mock.base_url()));
    super::serve_until_signal(app, listener).await?;
    drop(mock);
    Ok(())
}

/// What the embedded default prints once at start.
pub fn banner(addr: SocketAddr, key: &str, mock_url: &str) -> String {
    format!(
        "switchyard: no --config given; serving the embedded default on {addr}\n\
         upstream: the built-in mock at {mock_url} (answers every model; see README)\n\
         dev key (printed once): {key}\n\
         usage records: ./switchyard.db (see `switchyard usage`)\n\n\
         Codex CLI: export SWITCHYARD_API_KEY={key}\n\
         and put this in ~/.codex/config.toml:\n\n\
         model_provider = \"switchyard\"\n\n\
         [model_providers.switchyard]\n\
         name = \"Switchyard\"\n\
         base_url = \"http://{addr}/v1\"\n\
         wire_api = \"responses\"\n\
         env_key = \"SWITCHYARD_API_KEY\"\n\
         supports_websockets = true\n"
    )
}
