//! The session's side of US-1: every `response.create` it reads ends in exactly one usage
//! record — a turn's when the request started one, a refusal's when the relay answered it
//! with an error instead.

use tokio::time::Instant;

use super::turn::{Turn, TurnStatus};
use super::Session;
use crate::error::{RelayError, Side};
use crate::telemetry::{loggable, metric};
use crate::usage::{self, Record, TimingsMs, Tokens};

/// A `response.create` as read: what its record needs whatever becomes of it.
pub(super) struct Read {
    pub request_id: String,
    pub created_ms: i64,
    pub at: Instant,
    pub seq: u64,
}

impl Read {
    pub fn now(seq: u64) -> Read {
        Read {
            request_id: usage::new_request_id(),
            created_ms: usage::now_ms(),
            at: Instant::now(),
            seq,
        }
    }
}

/// How a turn ended, for its record.
pub(super) struct Ending {
    pub status: TurnStatus,
    pub response_id: Option<String>,
    /// Usage the terminal event reported.
    pub usage: Option<Tokens>,
    pub error: Option<(String, Option<Side>)>,
}

impl Ending {
    /// Ended by the relay with an error of its own making.
    pub fn by_error(status: TurnStatus, e: &RelayError) -> Ending {
        Ending {
            status,
            response_id: None,
            usage: None,
            error: Some((e.code.clone(), Some(e.side))),
        }
    }

    /// Ended without a word from either side's protocol (a client drop, a preemption).
    pub fn quiet(status: TurnStatus, class: &str, side: Side) -> Ending {
        Ending {
            status,
            response_id: None,
            usage: None,
            error: Some((class.to_string(), Some(side))),
        }
    }
}

impl Session {
    /// Closes the books on `turn`: metrics, the log line, and its usage record.
    pub(super) fn record_turn(&self, turn: &mut Turn, end: Ending) {
        let timings = turn.finish().clone();
        observe(end.status, turn.transport.as_str(), &timings);
        let (tokens, estimated) = turn.tokens(end.usage);
        let (error_class, error_side) = split(end.error);
        let r = Record {
            request_id: turn.request_id.clone(),
            created_ms: turn.created_ms,
            response_id: end.response_id,
            key_id: self.p.key_id.clone(),
            account_id: Some(turn.account_id.clone()),
            session: self.p.tag.clone(),
            seq: turn.seq,
            model: Some(turn.model.clone()),
            transport: turn.transport.as_str().into(),
            warm_up: turn.warm_up,
            status: end.status,
            cost_usd: self.p.usage.cost(Some(&turn.model), &tokens),
            tokens,
            estimated,
            attempts: turn.attempts,
            timings,
            error_class,
            error_side,
        };
        // SC-6: tokens (estimates included) and cost count against the key's limits.
        let charged = r.tokens.input + r.tokens.output;
        self.p.limits.charge(&self.p.key_id, charged, r.cost_usd);
        tracing::info!(
            parent: &turn.span,
            request_id = %r.request_id,
            turn = r.seq,
            model = %loggable(&turn.model),
            account = %turn.account_id,
            warm_up = r.warm_up,
            status = r.status.as_str(),
            attempts = r.attempts,
            input_tokens = r.tokens.input,
            output_tokens = r.tokens.output,
            estimated = r.estimated,
            first_event_ms = ?r.timings.first_event,
            total_ms = ?r.timings.total,
            "turn ended"
        );
        self.p.usage.record(r);
    }

    /// The record of a `response.create` the relay refused before it became a turn.
    pub(super) fn record_refused(&self, read: &Read, model: Option<&str>, e: &RelayError) {
        self.record_unstarted(read, model, TurnStatus::Rejected, &e.code, e.side);
    }

    /// The record of a `response.create` that never became a turn: refused, or still queued
    /// when its socket closed.
    pub(super) fn record_unstarted(
        &self,
        read: &Read,
        model: Option<&str>,
        status: TurnStatus,
        class: &str,
        side: Side,
    ) {
        metrics::counter!(metric::TURNS, "status" => status.as_str(), "transport" => "none")
            .increment(1);
        let total = read.at.elapsed().as_secs_f64() * 1000.0;
        self.p.usage.record(Record {
            request_id: read.request_id.clone(),
            created_ms: read.created_ms,
            response_id: None,
            key_id: self.p.key_id.clone(),
            account_id: None,
            session: self.p.tag.clone(),
            seq: read.seq,
            model: model.map(str::to_string),
            transport: "none".into(),
            warm_up: false,
            status,
            tokens: Tokens::default(),
            cost_usd: Some(0.0),
            estimated: false,
            attempts: 0,
            timings: TimingsMs {
                total: Some(total),
                ..TimingsMs::default()
            },
            error_class: Some(class.to_string()),
            error_side: Some(side.as_str().to_string()),
        });
    }
}

fn split(error: Option<(String, Option<Side>)>) -> (Option<String>, Option<String>) {
    match error {
        Some((class, side)) => (Some(class), side.map(|s| s.as_str().to_string())),
        None => (None, None),
    }
}

/// TP-8's metrics for one turn.
fn observe(status: TurnStatus, transport: &'static str, t: &TimingsMs) {
    metrics::counter!(metric::TURNS, "status" => status.as_str(), "transport" => transport)
        .increment(1);
    // The relay's own time before the upstream saw the request, once the turn was admitted:
    // a dial when no context was warm, the rewrite, the write.
    let relay_added = t
        .upstream_write
        .zip(t.admission_wait)
        .map(|(w, a)| (w - a).max(0.0));
    for (name, ms) in [
        (metric::ADMISSION_WAIT, t.admission_wait),
        (metric::TIME_TO_UPSTREAM_WRITE, t.upstream_write),
        (metric::RELAY_ADDED, relay_added),
        (metric::TIME_TO_FIRST_EVENT, t.first_event),
        (metric::TIME_TO_FIRST_TOKEN, t.first_token),
        (metric::TURN_DURATION, t.total),
    ] {
        if let Some(ms) = ms {
            metrics::histogram!(name).record(ms / 1000.0);
        }
    }
}
