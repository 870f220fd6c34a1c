//! One turn: from a `response.create` to its terminal event, with the measurements of TP-8.

use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::protocol::peek::EventClass;

/// How a turn ended, for logs, metrics and (later) the usage record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnStatus {
    Completed,
    Incomplete,
    Failed,
    /// The upstream answered with an `error` event.
    Error,
    ClientCancelled,
    /// The relay refused the request.
    Rejected,
    UpstreamLost,
}

impl TurnStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnStatus::Completed => "completed",
            TurnStatus::Incomplete => "incomplete",
            TurnStatus::Failed => "failed",
            TurnStatus::Error => "error",
            TurnStatus::ClientCancelled => "client_cancelled",
            TurnStatus::Rejected => "rejected",
            TurnStatus::UpstreamLost => "upstream_lost",
        }
    }
}

/// TP-8's measurements, in seconds from the turn's start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub admission_wait: Option<f64>,
    pub upstream_write: Option<f64>,
    pub first_event: Option<f64>,
    pub first_token: Option<f64>,
    pub total: Option<f64>,
}

/// A running turn.
#[derive(Debug)]
pub struct Turn {
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
    pub timings: Timings,
}

/// What a turn starts from.
pub struct TurnStart {
    pub seq: u64,
    pub model: String,
    pub account_id: String,
    pub text: String,
    pub body: Map<String, Value>,
    pub chained: bool,
    pub retry_budget: u32,
}

impl Turn {
    pub fn new(t: TurnStart) -> Turn {
        let warm_up = t.body.get("generate").and_then(Value::as_bool) == Some(false);
        let new_items = super::transcript::input_items(&t.body);
        Turn {
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
            started: Instant::now(),
            timings: Timings {
                admission_wait: Some(0.0),
                ..Timings::default()
            },
        }
    }

    fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn mark_written(&mut self) {
        self.timings
            .upstream_write
            .get_or_insert(self.since_start());
    }

    /// Notes one upstream event; false when it must not reach the client (a retry's
    /// lifecycle event that the client already has).
    pub fn on_event(&mut self, class: EventClass, kind: &str) -> bool {
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
}

/// What the session learns from a terminal event: its status, response id and output items.
pub struct Outcome {
    pub status: TurnStatus,
    pub response_id: Option<String>,
    pub output: Vec<Value>,
}

/// Parses a terminal event in full (the only events the relay parses whole).
pub fn terminal_outcome(class: EventClass, text: &str) -> Outcome {
    crate::protocol::peek::count_full_parse();
    let mut parsed: Value = serde_json::from_str(text).unwrap_or(Value::Null);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn turn() -> Turn {
        let body = json!({"type": "response.create", "model": "m", "input": "hi"});
        Turn::new(TurnStart {
            seq: 1,
            model: "m".into(),
            account_id: "a".into(),
            text: body.to_string(),
            body: body.as_object().cloned().unwrap_or_default(),
            chained: false,
            retry_budget: 1,
        })
    }

    #[test]
    fn tp8_first_event_and_first_token_are_kept_once() {
        let mut t = turn();
        assert!(t.on_event(EventClass::Lifecycle, "response.created"));
        assert!(!t.output_sent);
        let first = t.timings.first_event;
        assert!(first.is_some() && t.timings.first_token.is_none());
        t.on_event(EventClass::Delta, "response.output_text.delta");
        t.on_event(EventClass::Delta, "response.output_text.delta");
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
        assert!(t.on_event(EventClass::Lifecycle, "response.created"));
        assert!(!t.on_event(EventClass::Lifecycle, "response.created"));
        assert!(t.on_event(EventClass::Lifecycle, "response.in_progress"));
        assert!(t.on_event(EventClass::Output, "response.output_item.added"));
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
