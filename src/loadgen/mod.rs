//! `switchyard loadgen`: an open-loop WebSocket load generator for the Responses API, aimed at
//! the mock upstream directly or at anything in front of it (the relay, a plain proxy), so the
//! same load can be measured three ways on one machine (`scripts/bench.sh`, BENCHMARKS.md).
//!
//! What it does: N sessions, each one WebSocket with `Authorization: Bearer KEY`, each running
//! one unmeasured warm-up turn (so the pool behind a relay is warm) and then M measured turns.
//! Every turn asks the mock (through `metadata`, see [`crate::mock::bench`]) for K
//! `response.output_text.delta` events of B bytes, paced I µs apart; the mock writes its send
//! time into each delta. Per-event latency is the arrival time minus that stamp (one machine,
//! one wall clock). It also measures time to first event and turn time from the moment the
//! request is written, events and bytes per second, late turns and errors.
//!
//! What "open loop" means here: the load is set by schedules, never by how fast answers come
//! back. Session `s` connects at `start + s * start_interval`; within a turn the mock sends the
//! k-th delta at `turn start + k * interval` whatever the reader is doing, and the stamp is taken
//! as it is written, so queueing anywhere after the mock shows up in the latency. Measured turn
//! `j` of a session is due at `t0 + j * turn_interval`. The one closed-loop edge is the
//! protocol's: a socket carries one response at a time, so a turn that overruns its slot delays
//! the next one, which then starts at once and is counted as late (with the largest lag). With
//! `--turn-interval-ms 0` every session keeps exactly one response in flight (saturation).
//!
//! `--idle` opens N authenticated sockets instead, holds them for `--hold`, answering pings, and
//! reports how many opened: the memory of idle sockets is measured on the server meanwhile.

mod idle;
mod run;
mod stats;

use std::time::Duration;

pub use stats::Report;

/// Options of `switchyard loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// WebSocket URL of the responses endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/responses")]
    pub url: String,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "SWITCHYARD_API_KEY", default_value = "")]
    pub key: String,
    #[arg(long, default_value = "gpt-5-bench")]
    pub model: String,
    /// Concurrent sessions (one WebSocket each).
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Measured turns per session (after the warm-up turn); with `--duration`, an upper bound.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Run measured turns until this much time has passed (e.g. "10s"), instead of a count.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Delta events per turn.
    #[arg(long, default_value_t = 50)]
    pub events: usize,
    /// Bytes of each delta text (at least 20: the stamp and a space).
    #[arg(long, default_value_t = 64)]
    pub bytes: usize,
    /// Microseconds between deltas; 0 sends them back to back.
    #[arg(long, default_value_t = 1000)]
    pub interval_us: u64,
    /// Microseconds between session starts.
    #[arg(long, default_value_t = 1000)]
    pub start_interval_us: u64,
    /// Milliseconds between the starts of a session's measured turns; 0 = back to back.
    #[arg(long, default_value_t = 0)]
    pub turn_interval_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Only open `--sessions` authenticated sockets and hold them (idle-memory measurement).
    #[arg(long)]
    pub idle: bool,
    /// How long `--idle` holds the sockets.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Sockets `--idle` opens at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// Runs the measured load described by `args` (not `--idle`) and returns its figures.
pub async fn measure(args: &LoadgenArgs) -> anyhow::Result<Report> {
    run::run(args).await
}

/// Runs the load described by `args` and prints its report.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if args.idle {
        return idle::run(&args).await;
    }
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(&args))?);
    } else {
        print!("{}", report.to_text(&args));
    }
    Ok(())
}
