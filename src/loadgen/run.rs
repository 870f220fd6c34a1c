//! The measured run: sessions started on a schedule, a warm-up turn each, then measured turns.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::stats::{Report, Stats};
use super::LoadgenArgs;
use crate::mock::bench::{read_stamp, unix_nanos};
use crate::protocol::peek::{classify, event_type, EventClass};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// No frame for this long ends the turn as an error (the run must end by itself).
const FRAME_GUARD: Duration = Duration::from_secs(60);

/// What every session sends.
struct Plan {
    url: String,
    key: String,
    request: String,
    warm_up: String,
    events: usize,
    turns: usize,
    deadline: Option<Instant>,
    turn_interval: Duration,
}

/// A `response.create` asking the mock for `events` stamped deltas (metadata values are
/// strings in the API). `store:false` and no chaining: every turn stands alone.
fn request(model: &str, events: usize, bytes: usize, interval_us: u64) -> String {
    json!({
        "type": "response.create", "model": model, "store": false,
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "loadgen"}]}],
        "metadata": {"bench_events": events.to_string(), "bench_bytes": bytes.to_string(),
                     "bench_interval_us": interval_us.to_string()},
    })
    .to_string()
}

pub async fn run(args: &LoadgenArgs) -> anyhow::Result<Report> {
    let start = Instant::now() + Duration::from_millis(20);
    let plan = Arc::new(Plan {
        url: args.url.clone(),
        key: args.key.clone(),
        request: request(&args.model, args.events, args.bytes, args.interval_us),
        warm_up: request(&args.model, 1, args.bytes, 0),
        events: args.events,
        turns: if args.duration.is_some() {
            usize::MAX
        } else {
            args.turns
        },
        deadline: args.duration.map(|d| start + d),
        turn_interval: Duration::from_millis(args.turn_interval_ms),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.sessions {
        let due = start + Duration::from_micros(args.start_interval_us) * s as u32;
        tasks.spawn(session(plan.clone(), due));
    }
    let mut stats = Stats::new();
    let mut sessions_ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (s, ok) = r?;
        sessions_ok += usize::from(ok);
        stats.merge(&s);
    }
    Ok(Report { stats, sessions_ok })
}

/// Opens one WebSocket with the key; `read_buffer` sizes tungstenite's read buffer.
pub async fn connect(url: &str, key: &str, read_buffer: usize) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    if !key.is_empty() {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}"))?,
        );
    }
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (ws, _) = tokio::time::timeout(
        FRAME_GUARD,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await??;
    Ok(ws)
}

/// One session: connect when due, warm up, run the measured turns. True when nothing failed.
async fn session(plan: Arc<Plan>, due: Instant) -> (Stats, bool) {
    tokio::time::sleep_until(due).await;
    let mut stats = Stats::new();
    let mut ws = match connect(&plan.url, &plan.key, 64 * 1024).await {
        Ok(ws) => ws,
        Err(_) => {
            stats.error("connect");
            return (stats, false);
        }
    };
    let mut scratch = Stats::new();
    if let Err(kind) = turn(&mut ws, &plan.warm_up, 1, &mut scratch).await {
        stats.error(kind);
        return (stats, false);
    }
    let t0 = Instant::now();
    let mut ok = true;
    for j in 0..plan.turns {
        let now = Instant::now();
        if plan.deadline.is_some_and(|d| now >= d) {
            break;
        }
        let slot = t0 + plan.turn_interval * u32::try_from(j).unwrap_or(u32::MAX);
        if slot > now {
            tokio::time::sleep_until(slot).await;
        } else if j > 0 && !plan.turn_interval.is_zero() {
            stats.late_turns += 1;
            stats.max_lag = stats.max_lag.max(now - slot);
        }
        if let Err(kind) = turn(&mut ws, &plan.request, plan.events, &mut stats).await {
            stats.error(kind);
            ok = false;
            if matches!(kind, "closed" | "timeout" | "send") {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    (stats, ok)
}

/// One turn: writes the request and reads its events up to the terminal one.
async fn turn(
    ws: &mut Ws,
    request: &str,
    expected: usize,
    stats: &mut Stats,
) -> Result<(), &'static str> {
    let sent = Instant::now();
    ws.send(Message::Text(request.into()))
        .await
        .map_err(|_| "send")?;
    let mut first = true;
    let mut deltas = 0;
    loop {
        let msg = tokio::time::timeout(FRAME_GUARD, ws.next())
            .await
            .map_err(|_| "timeout")?;
        // Read the clock before anything else is done with the frame.
        let arrived = unix_nanos();
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(_))) => return Err("binary_frame"),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Err("closed"),
        };
        if first {
            first = false;
            Stats::record(&mut stats.first_event, nanos(sent.elapsed()));
        }
        let class = event_type(text.as_str()).map_or(EventClass::Output, |k| classify(&k));
        match class {
            EventClass::Delta => {
                if let Some(stamp) = delta_stamp(text.as_str()) {
                    Stats::record(&mut stats.latency, arrived.saturating_sub(stamp));
                    stats.events += 1;
                    stats.frame_bytes += text.len() as u64;
                    deltas += 1;
                }
            }
            EventClass::Done => {
                let end = Instant::now();
                Stats::record(&mut stats.turn, nanos(end - sent));
                stats.turns += 1;
                stats.span(sent, end);
                return if deltas == expected {
                    Ok(())
                } else {
                    Err("missing_deltas")
                };
            }
            EventClass::Failed => return Err("response_failed"),
            EventClass::Error => return Err("error_event"),
            EventClass::Lifecycle | EventClass::Output => {}
        }
    }
}

/// The mock's send stamp at the start of a delta text, read without parsing the event.
pub fn delta_stamp(event: &str) -> Option<u64> {
    const KEY: &str = "\"delta\":\"";
    let at = event.find(KEY)? + KEY.len();
    read_stamp(event.get(at..)?)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_is_read_off_a_delta_event() {
        let e = r#"{"type":"response.output_text.delta","content_index":0,"delta":"1760000000123456789 xxxx","item_id":"m"}"#;
        assert_eq!(delta_stamp(e), Some(1_760_000_000_123_456_789));
        assert_eq!(
            delta_stamp(r#"{"type":"response.output_text.delta","delta":"word1"}"#),
            None
        );
    }

    #[test]
    fn the_request_carries_the_bench_options_as_strings() {
        let r: serde_json::Value = serde_json::from_str(&request("m", 50, 64, 1000)).expect("json");
        let spec = crate::mock::bench::BenchSpec::from_request(&r).expect("spec");
        assert_eq!((spec.events, spec.bytes), (50, 64));
        assert_eq!(spec.interval, Duration::from_millis(1));
        assert_eq!(r["metadata"]["bench_events"], "50");
    }
}
