//! `switchyard accounts ...`: the admin API from the command line (TM-3). The token comes
//! from `SWITCHYARD_ADMIN_TOKEN`; the answer is printed as JSON.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct AccountsArgs {
    /// Where the admin API listens (`admin.listen`, or the relay's `listen`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Every account with its mode, state, override and live figures.
    List,
    /// Switches an account's transport from its next turn: ctx_pool, passthrough or http.
    Mode {
        id: String,
        mode: String,
    },
    Enable {
        id: String,
    },
    Disable {
        id: String,
    },
    /// No new sessions or turns go to the account; running turns finish.
    Drain {
        id: String,
    },
    /// Forgets the override: the config file's values apply again.
    Clear {
        id: String,
    },
}

/// Runs one admin call; exit 0 on a 2xx answer, 1 otherwise, 2 without a token.
pub fn run(args: &AccountsArgs) -> ExitCode {
    let Ok(token) = std::env::var("SWITCHYARD_ADMIN_TOKEN") else {
        eprintln!("switchyard accounts: set SWITCHYARD_ADMIN_TOKEN to the relay's admin.token");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard accounts: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(call(args, &token)) {
        Ok((ok, body)) => {
            println!("{body}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("switchyard accounts: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn call(args: &AccountsArgs, token: &str) -> Result<(bool, String), reqwest::Error> {
    let base = format!("{}/admin/v1/accounts", args.url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let req = match &args.action {
        Action::List => client.get(&base),
        Action::Mode { id, mode } => client
            .post(format!("{base}/{id}/mode"))
            .json(&serde_json::json!({ "mode": mode })),
        Action::Enable { id } => client.post(format!("{base}/{id}/enable")),
        Action::Disable { id } => client.post(format!("{base}/{id}/disable")),
        Action::Drain { id } => client.post(format!("{base}/{id}/drain")),
        Action::Clear { id } => client.delete(format!("{base}/{id}/override")),
    };
    let resp = req.bearer_auth(token).send().await?;
    let ok = resp.status().is_success();
    Ok((ok, resp.text().await?))
}
