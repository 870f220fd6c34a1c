//! One turn: from a `response.create` to its terminal event, with the measurements of TP-8.

use serde_json::Value;
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
    /// The request text for the upstream, kept until it is written.
    pub request: Option<String>,
    /// Whether an output event (CT-9's definition) reached the client.
    pub output_sent: bool,
    started: Instant,
    pub timings: Timings,
}

impl Turn {
    pub fn new(
        seq: u64,
        model: String,
        account_id: String,
        warm_up: bool,
        request: String,
    ) -> Turn {
        let started = Instant::now();
        Turn {
            seq,
            model,
            account_id,
            warm_up,
            request: Some(request),
            output_sent: false,
            started,
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
        self.timings.upstream_write = Some(self.since_start());
    }

    /// Notes one upstream event on its way to the client.
    pub fn on_event(&mut self, class: EventClass) {
        let now = self.since_start();
        self.timings.first_event.get_or_insert(now);
        if class == EventClass::Delta {
            self.timings.first_token.get_or_insert(now);
        }
        self.output_sent |= class.is_output();
    }

    pub fn finish(&mut self) -> &Timings {
        self.timings.total = Some(self.since_start());
        &self.timings
    }
}

/// What the session learns from a terminal event: its status and response id.
pub fn terminal_outcome(class: EventClass, text: &str) -> (TurnStatus, Option<String>) {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let id = parsed
        .as_ref()
        .and_then(|v| v.pointer("/response/id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let status = match class {
        EventClass::Done => match parsed
            .as_ref()
            .and_then(|v| v.pointer("/response/status"))
            .and_then(Value::as_str)
        {
            Some("incomplete") => TurnStatus::Incomplete,
            _ => TurnStatus::Completed,
        },
        EventClass::Failed => TurnStatus::Failed,
        _ => TurnStatus::Error,
    };
    (status, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp8_first_event_and_first_token_are_kept_once() {
        let mut t = Turn::new(1, "m".into(), "a".into(), false, "{}".into());
        t.on_event(EventClass::Lifecycle);
        assert!(!t.output_sent);
        let first = t.timings.first_event;
        assert!(first.is_some() && t.timings.first_token.is_none());
        t.on_event(EventClass::Delta);
        t.on_event(EventClass::Delta);
        assert!(t.output_sent);
        assert_eq!(t.timings.first_event, first);
        assert!(t.timings.first_token.is_some());
        assert!(t.finish().total.is_some());
    }

    #[test]
    fn terminal_outcomes() {
        let done =
            r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed"}}"#;
        assert_eq!(
            terminal_outcome(EventClass::Done, done),
            (TurnStatus::Completed, Some("resp_1".into()))
        );
        let inc =
            r#"{"type":"response.incomplete","response":{"id":"resp_2","status":"incomplete"}}"#;
        assert_eq!(
            terminal_outcome(EventClass::Done, inc).0,
            TurnStatus::Incomplete
        );
        assert_eq!(
            terminal_outcome(EventClass::Error, r#"{"type":"error"}"#),
            (TurnStatus::Error, None)
        );
    }
}
