//! What one session measured, merged into one report for the run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::LoadgenArgs;

/// Highest value the histograms hold, in nanoseconds (anything slower is clamped to it).
const MAX_NANOS: u64 = 600_000_000_000;

fn histogram() -> Histogram<u64> {
    // Three significant figures: 0.1 % resolution over 1 ns .. 10 minutes. The bounds are
    // constants that hdrhistogram accepts, so this cannot fail at run time.
    Histogram::new_with_bounds(1, MAX_NANOS, 3).expect("valid histogram bounds")
}

/// Measurements of one session, or of the whole run once merged.
pub struct Stats {
    /// Arrival minus the mock's send stamp, per delta event (ns).
    pub latency: Histogram<u64>,
    /// Request written → first event of the turn (ns).
    pub first_event: Histogram<u64>,
    /// Request written → terminal event (ns).
    pub turn: Histogram<u64>,
    pub events: u64,
    /// Bytes of the delta frames received (the whole frames, as they crossed the socket).
    pub frame_bytes: u64,
    pub turns: u64,
    /// Measured turns that started after their slot because the previous one overran it.
    pub late_turns: u64,
    pub max_lag: Duration,
    pub errors: BTreeMap<&'static str, u64>,
    /// Earliest measured turn start and latest measured turn end: the measured window.
    pub window: Option<(Instant, Instant)>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            latency: histogram(),
            first_event: histogram(),
            turn: histogram(),
            events: 0,
            frame_bytes: 0,
            turns: 0,
            late_turns: 0,
            max_lag: Duration::ZERO,
            errors: BTreeMap::new(),
            window: None,
        }
    }

    pub fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn record(h: &mut Histogram<u64>, nanos: u64) {
        h.saturating_record(nanos.clamp(1, MAX_NANOS));
    }

    pub fn span(&mut self, start: Instant, end: Instant) {
        self.window = Some(match self.window {
            Some((a, b)) => (a.min(start), b.max(end)),
            None => (start, end),
        });
    }

    pub fn merge(&mut self, o: &Stats) {
        let _ = self.latency.add(&o.latency);
        let _ = self.first_event.add(&o.first_event);
        let _ = self.turn.add(&o.turn);
        self.events += o.events;
        self.frame_bytes += o.frame_bytes;
        self.turns += o.turns;
        self.late_turns += o.late_turns;
        self.max_lag = self.max_lag.max(o.max_lag);
        for (k, v) in &o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if let Some((a, b)) = o.window {
            self.span(a, b);
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// The run's figures.
pub struct Report {
    pub stats: Stats,
    pub sessions_ok: usize,
}

/// p50/p90/p99/max/mean of a histogram of nanoseconds, in `unit` nanoseconds.
fn summary(h: &Histogram<u64>, unit: f64) -> Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / unit;
    json!({
        "count": h.len(),
        "p50": round(q(0.50)), "p90": round(q(0.90)), "p99": round(q(0.99)),
        "max": round(h.max() as f64 / unit), "mean": round(h.mean() / unit),
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl Report {
    pub fn seconds(&self) -> f64 {
        self.stats
            .window
            .map_or(0.0, |(a, b)| (b - a).as_secs_f64())
    }

    pub fn to_json(&self, args: &LoadgenArgs) -> Value {
        let s = &self.stats;
        let secs = self.seconds();
        let per_sec = |n: u64| {
            if secs > 0.0 {
                round(n as f64 / secs)
            } else {
                0.0
            }
        };
        json!({
            "url": args.url,
            "sessions": args.sessions,
            "sessions_ok": self.sessions_ok,
            "events_per_turn": args.events,
            "bytes": args.bytes,
            "interval_us": args.interval_us,
            "turns": s.turns,
            "events": s.events,
            "seconds": round(secs * 1000.0) / 1000.0,
            "events_per_sec": per_sec(s.events),
            "frame_bytes_per_sec": per_sec(s.frame_bytes),
            "latency_us": summary(&s.latency, 1e3),
            "first_event_us": summary(&s.first_event, 1e3),
            "turn_ms": summary(&s.turn, 1e6),
            "late_turns": s.late_turns,
            "max_lag_ms": round(s.max_lag.as_secs_f64() * 1e3),
            "errors": s.errors,
        })
    }

    pub fn to_text(&self, args: &LoadgenArgs) -> String {
        let j = self.to_json(args);
        let line = |v: &Value| {
            format!(
                "p50 {} p90 {} p99 {} max {} (mean {})",
                v["p50"], v["p90"], v["p99"], v["max"], v["mean"]
            )
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} sessions ({} ok), {} measured turns of {} events of {} B every {} us",
            args.sessions, self.sessions_ok, j["turns"], args.events, args.bytes, args.interval_us
        );
        let _ = writeln!(
            out,
            "events: {} in {:.3} s = {} events/s, {} MB/s of frames",
            j["events"],
            self.seconds(),
            j["events_per_sec"],
            round(j["frame_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6)
        );
        let _ = writeln!(out, "latency per event (us): {}", line(&j["latency_us"]));
        let _ = writeln!(
            out,
            "time to first event (us): {}",
            line(&j["first_event_us"])
        );
        let _ = writeln!(out, "turn time (ms): {}", line(&j["turn_ms"]));
        let _ = writeln!(
            out,
            "late turns: {} (max lag {} ms); errors: {}",
            j["late_turns"], j["max_lag_ms"], j["errors"]
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_widens_the_window() {
        let t0 = Instant::now();
        let mut a = Stats::new();
        Stats::record(&mut a.latency, 1_000);
        a.events = 1;
        a.error("closed");
        a.span(t0, t0 + Duration::from_secs(1));
        let mut b = Stats::new();
        Stats::record(&mut b.latency, 3_000);
        b.events = 1;
        b.error("closed");
        b.span(t0 + Duration::from_millis(500), t0 + Duration::from_secs(2));
        a.merge(&b);
        assert_eq!((a.latency.len(), a.events), (2, 2));
        assert_eq!(a.errors.get("closed"), Some(&2));
        let report = Report {
            stats: a,
            sessions_ok: 2,
        };
        assert!((report.seconds() - 2.0).abs() < 1e-9);
        let args = <LoadgenArgs as clap::FromArgMatches>::from_arg_matches(
            &<LoadgenArgs as clap::Args>::augment_args(clap::Command::new("t"))
                .get_matches_from(["t"]),
        )
        .expect("defaults");
        let j = report.to_json(&args);
        assert_eq!(j["events_per_sec"], json!(1.0));
        assert!(j["latency_us"]["max"].as_f64().unwrap_or(0.0) >= 2.9);
    }
}
