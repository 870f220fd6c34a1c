//! One turn: from a `response.create` to its terminal event, with the measurements of TP-8.

use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::protocol::classify;
use crate::protocol::peek::EventClass;
use crate::telemetry::loggable;
use crate::usage::estimate::{delta_bytes, tokens_for};
use crate::usage::{TimingsMs as Timings, Tokens};

pub use crate::usage::Status as TurnStatus;

/// How a turn reaches the upstream (TM-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A pooled upstream WebSocket context.
    CtxPool,
    /// `POST /responses` with SSE.
    Http,
    /// The client socket's own upstream WebSocket: watched, not driven.
    Passthrough,
}

impl Transport {
    /// The name in usage records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::CtxPool => "ctx_pool",
            Transport::Http => "http",
            Transport::Passthrough => "passthrough",
        }
    }
}

/// A running turn.
#[derive(Debug)]
pub struct Turn {
    pub request_id: String,
    /// When the request was read, Unix milliseconds.
    pub created_ms: i64,
    pub seq: u64,
    pub model: String,
    pub account_id: String,
    pub warm_up: bool,
    /// The request as the upstream gets it when nothing needs replaying (CT-1).
    pub text: String,
    /// The request's fields (with `type` and `model`), for building a replay (CT-2).
    pub body: Map<String, Value>,
    /// The request's input items: what the transcript gains.
    pub new_items: Vec<Value>,
    /// Whether the request chained from the session's last response.
    pub chained: bool,
    /// Whether the current attempt went with `previous_response_id` (CT-8 applies).
    pub fast_path: bool,
    /// Transparent retries still allowed (CT-8, CT-9).
    pub retries_left: u32,
    /// Attempts made so far (1 for the first).
    pub attempts: u32,
    /// Whether an output event (CT-9's definition) reached the client.
    pub output_sent: bool,
    /// Lifecycle event types already forwarded: a retry does not send them again (CT-9).
    lifecycle_sent: Vec<String>,
    started: Instant,
    /// TP-8's measurements, in ms from the moment the request was read.
    pub timings: Timings,
    /// Bytes of the request the current attempt wrote upstream (US-3's input estimate).
    sent_bytes: u64,
    /// UTF-8 bytes of the `delta` texts the current attempt streamed (US-3's output estimate).
    streamed_bytes: u64,
    /// Estimated usage of attempts abandoned by a retry (US-3).
    abandoned: Tokens,
    /// The account's turn slot (SC-3), released when the turn ends.
    pub slot: Option<crate::state::Slot>,
    /// How the turn reaches the upstream (TM-1).
    pub transport: Transport,
    /// The turn's hold on its account (in flight, a breaker probe), and where its upstream
    /// failures are counted (SC-5).
    pub ticket: Option<crate::scheduler::health::Ticket>,
    /// Accounts this turn failed on: a retry goes elsewhere when it can (SC-4).
    pub failed_on: Vec<String>,
    /// Chains from a stored response bound to its account (SC-2): sent as it is, and never
    /// moved to another account.
    pub bound: bool,
    /// The turn's place among its key's concurrent turns (SC-6).
    pub limit_hold: Option<crate::limits::TurnHold>,
    /// OP-3: what the turn logs, and its dial tasks, is inside this span (a child of the
    /// session's), which names the request, model and account but never the key.
    pub span: tracing::Span,
}

/// What a turn starts from.
pub struct TurnStart {
    pub request_id: String,
    pub created_ms: i64,
    /// When the request was read: TP-8's timings count from here.
    pub read_at: Instant,
    pub seq: u64,
    pub model: String,
    pub account_id: String,
    pub text: String,
    pub body: Map<String, Value>,
    pub chained: bool,
    pub retry_budget: u32,
    pub transport: Transport,
    /// None for a passthrough socket's turns, which are watched, not scheduled.
    pub ticket: Option<crate::scheduler::health::Ticket>,
    pub bound: bool,
    /// The session's span, the turn span's parent.
    pub parent: tracing::Span,
}

impl Turn {
    pub fn new(t: TurnStart) -> Turn {
        let warm_up = t.body.get("generate").and_then(Value::as_bool) == Some(false);
        let new_items = super::transcript::input_items(&t.body);
        let span = tracing::info_span!(
            parent: &t.parent,
            "turn",
            request_id = %t.request_id,
            seq = t.seq,
            model = %loggable(&t.model),
            account = %t.account_id,
        );
        Turn {
            span,
            request_id: t.request_id,
            created_ms: t.created_ms,
            seq: t.seq,
            model: t.model,
            account_id: t.account_id,
            warm_up,
            text: t.text,
            body: t.body,
            new_items,
            chained: t.chained,
            fast_path: false,
            retries_left: t.retry_budget,
            attempts: 0,
            output_sent: false,
            lifecycle_sent: Vec::new(),
            started: t.read_at,
            timings: Timings {
                admission_wait: Some(t.read_at.elapsed().as_secs_f64() * 1000.0),
                ..Timings::default()
            },
            sent_bytes: 0,
            streamed_bytes: 0,
            abandoned: Tokens::default(),
            slot: None,
            transport: t.transport,
            ticket: t.ticket,
            failed_on: Vec::new(),
            bound: t.bound,
            limit_hold: None,
        }
    }

    fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    pub fn is_http(&self) -> bool {
        self.transport == Transport::Http
    }

    /// TP-8: the turn got its slot after waiting for one.
    pub fn mark_admitted(&mut self) {
        self.timings.admission_wait = Some(self.since_start());
    }

    /// The running attempt's upstream failed: counted against its account (SC-5), which a
    /// retry then avoids (SC-4).
    pub fn upstream_failed(&mut self, why: &str) {
        if let Some(t) = self.ticket.as_mut() {
            t.failure(why);
        }
        self.avoid_account();
    }

    /// The account answered (SC-5); `ttft_ms` feeds its average when the answer was a
    /// response.
    pub fn account_answered(&mut self, ttft_ms: Option<f64>) {
        if let Some(t) = self.ticket.as_mut() {
            t.success(ttft_ms);
        }
    }

    /// The account's upstream refused the turn's request (an HTTP status, or no answer).
    pub fn account_refused(&self, e: &crate::error::RelayError) {
        if let Some(t) = self.ticket.as_ref() {
            t.health().refused(&self.account_id, e);
        }
    }

    /// A retry should go elsewhere (the failure is already counted, e.g. by the pool).
    pub fn avoid_account(&mut self) {
        if !self.failed_on.contains(&self.account_id) {
            self.failed_on.push(self.account_id.clone());
        }
    }

    /// Time from the request written upstream to the first event (the account's TTFT).
    pub fn upstream_ttft(&self) -> Option<f64> {
        Some(self.timings.first_event? - self.timings.upstream_write?)
    }

    /// Notes that an attempt wrote `bytes` of request upstream.
    pub fn mark_written(&mut self, bytes: usize) {
        self.sent_bytes = bytes as u64;
        self.timings
            .upstream_write
            .get_or_insert(self.since_start());
    }

    /// Notes one upstream event; false when it must not reach the client (a retry's
    /// lifecycle event that the client already has).
    pub fn on_event(&mut self, class: EventClass, kind: &str, text: &str) -> bool {
        if class == EventClass::Delta {
            self.streamed_bytes += delta_bytes(text);
        }
        if class == EventClass::Lifecycle {
            if self.lifecycle_sent.iter().any(|k| k == kind) {
                return false;
            }
            self.lifecycle_sent.push(kind.to_string());
        }
        // The clock is read only while a TP-8 first-time figure is still missing, not for
        // every event of a long stream.
        let first_token = class == EventClass::Delta && self.timings.first_token.is_none();
        if self.timings.first_event.is_none() || first_token {
            let now = self.since_start();
            self.timings.first_event.get_or_insert(now);
            if first_token {
                self.timings.first_token = Some(now);
            }
        }
        self.output_sent |= class.is_output();
        true
    }

    pub fn finish(&mut self) -> &Timings {
        self.timings.total = Some(self.since_start());
        &self.timings
    }

    /// US-3: the attempt in flight is given up for a retry; its estimated usage stays with
    /// the turn.
    pub fn abandon_attempt(&mut self) {
        self.abandoned.add(self.attempt_estimate());
        self.sent_bytes = 0;
        self.streamed_bytes = 0;
    }

    fn attempt_estimate(&self) -> Tokens {
        Tokens {
            input: tokens_for(self.sent_bytes),
            output: tokens_for(self.streamed_bytes),
            ..Tokens::default()
        }
    }

    /// The turn's tokens: what the terminal event reported, or the current attempt's
    /// estimate, plus the estimates of abandoned attempts; and whether any part is estimated.
    pub fn tokens(&self, reported: Option<Tokens>) -> (Tokens, bool) {
        let mut total = self.abandoned;
        let estimated = reported.is_none() && self.attempts > 0 || self.attempts > 1;
        total.add(reported.unwrap_or_else(|| self.attempt_estimate()));
        (total, estimated)
    }
}

/// What the session learns from a terminal event: its status, response id and output items.
pub struct Outcome {
    pub status: TurnStatus,
    pub response_id: Option<String>,
    pub output: Vec<Value>,
    /// Usage as the event reported it; none when it carries none.
    pub usage: Option<Tokens>,
    /// Why it did not complete: the error's class, or the incomplete reason.
    pub error_class: Option<String>,
    /// A failed turn's error as CT-11 classifies it (what the breaker reads, SC-5).
    pub classified: Option<classify::Classified>,
}

/// Parses a terminal event in full (the only events the relay parses whole).
pub fn terminal_outcome(class: EventClass, text: &str) -> Outcome {
    crate::protocol::peek::count_full_parse();
    let mut parsed: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let classified = (class != EventClass::Done).then(|| classify::classify_value(&parsed));
    let error_class = match class {
        EventClass::Done => parsed
            .pointer("/response/incomplete_details/reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => classified.map(|c| c.class.as_str().to_string()),
    };

    let response = parsed
        .get_mut("response")
        .map(Value::take)
        .unwrap_or(Value::Null);
    let response_id = response
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let status = match class {
        EventClass::Done => match response.get("status").and_then(Value::as_str) {
            Some("incomplete") => TurnStatus::Incomplete,
            _ => TurnStatus::Completed,
        },
        EventClass::Failed => TurnStatus::Failed,
        _ => TurnStatus::Error,
    };
    let usage = response.get("usage").and_then(usage_of);
    let output = match response {
        Value::Object(mut r) => match r.remove("output") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    Outcome {
        status,
        response_id,
        output,
        usage,
        error_class,
        classified,
    }
}

/// A `usage` object: input includes cached, output includes reasoning.
fn usage_of(u: &Value) -> Option<Tokens> {
    let n = |path: &str| u.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    u.is_object().then(|| Tokens {
        input: n("/input_tokens"),
        cached_input: n("/input_tokens_details/cached_tokens"),
        output: n("/output_tokens"),
        reasoning: n("/output_tokens_details/reasoning_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn turn() -> Turn {
        let body = json!({"type": "response.create", "model": "m", "input": "hi"});
        Turn::new(TurnStart {
            request_id: "req_1".into(),
            created_ms: 0,
            read_at: Instant::now(),
            seq: 1,
            model: "m".into(),
            account_id: "a".into(),
            text: body.to_string(),
            body: body.as_object().cloned().unwrap_or_default(),
            chained: false,
            retry_budget: 1,
            transport: Transport::CtxPool,
            ticket: None,
            bound: false,
            parent: tracing::Span::none(),
        })
    }

    #[test]
    fn tp8_first_event_and_first_token_are_kept_once() {
        let mut t = turn();
        assert!(t.on_event(EventClass::Lifecycle, "response.created", ""));
        assert!(!t.output_sent);
        let first = t.timings.first_event;
        assert!(first.is_some() && t.timings.first_token.is_none());
        t.on_event(EventClass::Delta, "response.output_text.delta", "");
        t.on_event(EventClass::Delta, "response.output_text.delta", "");
        assert!(t.output_sent);
        assert_eq!(t.timings.first_event, first);
        assert!(t.timings.first_token.is_some());
        assert!(t.finish().total.is_some());
        assert_eq!(
            t.new_items,
            vec![json!({"type": "message", "role": "user", "content": "hi"})]
        );
    }

    #[test]
    fn ct9_a_retry_does_not_forward_lifecycle_events_again() {
        let mut t = turn();
        assert!(t.on_event(EventClass::Lifecycle, "response.created", ""));
        assert!(!t.on_event(EventClass::Lifecycle, "response.created", ""));
        assert!(t.on_event(EventClass::Lifecycle, "response.in_progress", ""));
        assert!(t.on_event(EventClass::Output, "response.output_item.added", ""));
    }

    #[test]
    fn terminal_outcomes() {
        let done = r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed","output":[{"type":"message"}]}}"#;
        let o = terminal_outcome(EventClass::Done, done);
        assert_eq!(
            (o.status, o.response_id.as_deref(), o.output.len()),
            (TurnStatus::Completed, Some("resp_1"), 1)
        );
        let inc =
            r#"{"type":"response.incomplete","response":{"id":"resp_2","status":"incomplete"}}"#;
        assert_eq!(
            terminal_outcome(EventClass::Done, inc).status,
            TurnStatus::Incomplete
        );
        let e = terminal_outcome(EventClass::Error, r#"{"type":"error"}"#);
        assert_eq!((e.status, e.response_id), (TurnStatus::Error, None));
    }
}
