//! The `switchyard` command: run the relay, check a config file, run the mock upstream,
//! summarise recorded usage, or put load on any of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::Config;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "WebSocket-first relay for the OpenAI Responses API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve {
        /// Config file (YAML). Without it the relay starts on the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and print every error with its path in the file.
    CheckConfig { file: PathBuf },
    /// Run the mock upstream (a stand-in for the OpenAI Responses API, for tests and trials).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Connection age limit, e.g. "60m" or "5s".
        #[arg(long, default_value = "60m", value_parser = humantime::parse_duration)]
        max_age: std::time::Duration,
        /// Accepted API keys, each its own mock account; none accepts any key.
        #[arg(long = "api-key")]
        api_keys: Vec<String>,
    },
    /// Summarise the usage records in the store: totals per key, account or model over a window.
    Usage(switchyard::usage::report::UsageArgs),
    /// Open-loop WebSocket load: N sessions x M turns of K stamped events (see BENCHMARKS.md).
    Loadgen(switchyard::loadgen::LoadgenArgs),
    /// The admin API from the command line: list accounts, switch a mode, enable, disable,
    /// drain, clear an override (token in SWITCHYARD_ADMIN_TOKEN).
    Accounts(switchyard::server::admin_cli::AccountsArgs),
    /// API keys for the relay's clients: `keys new` prints a fresh key and its config entry.
    Keys(switchyard::limits::keys_cli::KeysArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    switchyard::telemetry::init_logging();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve { config, listen } => serve(config, listen),
        Command::Usage(args) => switchyard::usage::report::run(&args),
        Command::MockUpstream {
            listen,
            max_age,
            api_keys,
        } => {
            let opts = switchyard::mock::MockOptions {
                max_age,
                api_keys,
                ..Default::default()
            };
            run(async move { switchyard::mock::run_standalone(listen, opts).await })
        }
        Command::Accounts(args) => switchyard::server::admin_cli::run(&args),
        Command::Keys(args) => switchyard::limits::keys_cli::run(&args),
        Command::Loadgen(args) => run(async move { switchyard::loadgen::run(args).await }),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} error(s)", file.display(), errors.len());
            for e in errors.iter() {
                eprintln!("  {e}");
            }
            ExitCode::from(2)
        }
    }
}

fn serve(config: Option<PathBuf>, listen: Option<SocketAddr>) -> ExitCode {
    // OP-4: the whole config is validated before any port is bound.
    let mut cfg = match config.as_ref() {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(errors) => {
                eprintln!("{}: {} error(s)", path.display(), errors.len());
                for e in errors.iter() {
                    eprintln!("  {e}");
                }
                return ExitCode::from(2);
            }
        },
        None => {
            let listen = listen.unwrap_or(Config::default().listen);
            return run(async move { switchyard::server::embedded::run(listen).await });
        }
    };
    if let Some(addr) = listen {
        cfg.listen = addr;
    }
    run(async move { switchyard::server::run(cfg, config).await })
}

fn run<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
