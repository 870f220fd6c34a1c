//! Benchmark answers for `switchyard loadgen`: a request whose `metadata` holds `bench_events`
//! is answered with that many `response.output_text.delta` events of `bench_bytes` bytes each,
//! paced `bench_interval_us` apart, every delta text starting with the unix time in
//! nanoseconds at which the mock wrote it (19 digits, then a space, then padding).
//!
//! The options ride in `metadata` (string values, as the API requires) because it reaches the
//! upstream unchanged through any relay; the stamp sits inside the delta text because that keeps
//! each event exactly the shape the real API sends (no extra field for the typed models to
//! refuse). The clock is the wall clock: the load generator runs on the same machine and reads
//! the same one when the event arrives.
//!
//! Pacing is open loop: the k-th delta is due at `start + k * interval`, whatever happened to
//! the ones before it; a mock that falls behind sends the overdue events at once rather than
//! shifting the schedule. Interval 0 sends them back to back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Digits of a stamp: unix nanoseconds, zero-padded (enough until the year 2286).
pub const STAMP_DIGITS: usize = 19;

/// Largest delta a bench request may ask for, so a typo cannot make the mock build gigabytes.
const MAX_BYTES: usize = 1 << 20;

/// Largest number of deltas per response, for the same reason.
const MAX_EVENTS: usize = 1_000_000;

/// Largest whole answer (`events × bytes`): the answer text is built at once, and a request is
/// outside input when the mock runs in the relay's own process (the embedded default).
const MAX_TOTAL: usize = 64 << 20;

/// What a bench request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchSpec {
    pub events: usize,
    /// Bytes of each delta text, stamp included (at least the stamp and its space).
    pub bytes: usize,
    pub interval: Duration,
}

impl BenchSpec {
    /// The spec in `req.metadata`, when `bench_events` is there and every value parses.
    pub fn from_request(req: &Value) -> Option<BenchSpec> {
        let meta = req.get("metadata")?;
        let field = |name: &str| -> Option<Option<u64>> {
            match meta.get(name) {
                None => Some(None),
                Some(Value::String(s)) => s.trim().parse().ok().map(Some),
                Some(_) => None,
            }
        };
        let events = field("bench_events")??;
        let bytes = field("bench_bytes")?.unwrap_or(64);
        let interval = field("bench_interval_us")?.unwrap_or(0);
        let bytes = usize::try_from(bytes)
            .ok()?
            .clamp(STAMP_DIGITS + 1, MAX_BYTES);
        let most = (MAX_TOTAL / bytes).min(MAX_EVENTS);
        Some(BenchSpec {
            events: usize::try_from(events).ok()?.clamp(1, most),
            bytes,
            interval: Duration::from_micros(interval),
        })
    }

    /// One delta's text before stamping: zeros where the stamp goes, a space, padding.
    pub fn template(&self) -> String {
        let mut t = String::with_capacity(self.bytes);
        t.push_str(&"0".repeat(STAMP_DIGITS));
        t.push(' ');
        t.push_str(&"x".repeat(self.bytes - STAMP_DIGITS - 1));
        t
    }

    /// The whole answer text: the templates one after another, so chunking it into
    /// `bytes`-sized deltas yields exactly `events` of them.
    pub fn answer_text(&self) -> String {
        self.template().repeat(self.events)
    }

    /// When the `k`-th delta (from 0) is due, counted from the start of the stream.
    pub fn due(&self, k: usize) -> Duration {
        self.interval
            .saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
    }
}

/// Now, as unix nanoseconds.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where the stamp goes in a serialized delta event: the first byte of its `delta` text.
pub fn stamp_offset(event_text: &str) -> Option<usize> {
    const KEY: &str = "\"delta\":\"";
    let at = event_text.find(KEY)? + KEY.len();
    let digits = event_text.get(at..at + STAMP_DIGITS)?;
    digits.bytes().all(|b| b == b'0').then_some(at)
}

/// Writes the current time into a serialized delta event at `offset` (from [`stamp_offset`]).
pub fn stamp(event_text: &mut String, offset: usize) {
    let now = format!("{:0width$}", unix_nanos(), width = STAMP_DIGITS);
    event_text.replace_range(offset..offset + STAMP_DIGITS, &now);
}

/// Reads the stamp at the start of a delta text, if there is one.
pub fn read_stamp(delta: &str) -> Option<u64> {
    let digits = delta.get(..STAMP_DIGITS)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_comes_from_string_metadata() {
        let req = json!({"metadata": {"bench_events": "50", "bench_bytes": "64", "bench_interval_us": "1000"}});
        assert_eq!(
            BenchSpec::from_request(&req),
            Some(BenchSpec {
                events: 50,
                bytes: 64,
                interval: Duration::from_millis(1)
            })
        );
        assert_eq!(BenchSpec::from_request(&json!({"metadata": {}})), None);
        assert_eq!(
            BenchSpec::from_request(&json!({"metadata": {"bench_events": "x"}})),
            None
        );
        let tiny = BenchSpec::from_request(
            &json!({"metadata": {"bench_events": "1", "bench_bytes": "3"}}),
        );
        assert_eq!(tiny.map(|s| s.bytes), Some(STAMP_DIGITS + 1));
    }

    /// A request for a terabyte answer (seen from outside: it aborted the process) is held
    /// to `MAX_TOTAL`.
    #[test]
    fn the_whole_answer_is_bounded() {
        let huge = json!({"metadata": {"bench_events": "99999999999", "bench_bytes": "999999999"}});
        let spec = BenchSpec::from_request(&huge).expect("a spec");
        assert_eq!(spec.bytes, MAX_BYTES);
        assert!(spec.events * spec.bytes <= MAX_TOTAL, "{spec:?}");
        assert!(spec.events >= 1);
    }

    #[test]
    fn answer_text_chunks_into_the_asked_deltas() {
        let spec = BenchSpec {
            events: 7,
            bytes: 40,
            interval: Duration::ZERO,
        };
        let parts = super::super::events::chunks(&spec.answer_text(), spec.bytes);
        assert_eq!(parts.len(), 7);
        assert!(parts.iter().all(|p| *p == spec.template() && p.len() == 40));
        assert_eq!(spec.due(3), Duration::ZERO);
    }

    #[test]
    fn a_stamp_is_written_where_the_zeros_were_and_read_back() {
        let spec = BenchSpec {
            events: 1,
            bytes: 32,
            interval: Duration::from_micros(250),
        };
        assert_eq!(spec.due(4), Duration::from_millis(1));
        let event = json!({"type": "response.output_text.delta", "delta": spec.template()});
        let mut text = event.to_string();
        let at = stamp_offset(&text).expect("offset");
        let before = unix_nanos();
        stamp(&mut text, at);
        let parsed: Value = serde_json::from_str(&text).expect("still JSON");
        let delta = parsed["delta"].as_str().expect("delta");
        let stamped = read_stamp(delta).expect("stamp");
        assert!(stamped >= before && stamped <= unix_nanos());
        assert_eq!(delta.len(), 32);
        assert_eq!(read_stamp("word1 word2"), None);
    }
}
