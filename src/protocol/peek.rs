//! Looking at an upstream event without parsing it: the relay forwards the original bytes and
//! only needs the `type` (DESIGN.md: no full parse of every streamed event). Terminal events,
//! which carry the response id and usage, are parsed in full by the session.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

/// Full JSON parses of upstream events on the relay's path, process-wide: the evidence that
/// deltas are never parsed (terminal and error events are; see [`count_full_parse`]).
static FULL_PARSES: AtomicU64 = AtomicU64::new(0);

/// Events whose `type` was not first and had to be found by a scan (no tree is built, but every
/// byte is tokenized): the real API and the mock write `type` first, so this stays near zero.
static TYPE_SCANS: AtomicU64 = AtomicU64::new(0);

/// Called by every full parse of an upstream event (one relaxed atomic add).
pub fn count_full_parse() {
    FULL_PARSES.fetch_add(1, Ordering::Relaxed);
}

/// Full parses of upstream events so far in this process.
pub fn full_parses() -> u64 {
    FULL_PARSES.load(Ordering::Relaxed)
}

/// `type` scans (the slow path of [`event_type`]) so far in this process.
pub fn type_scans() -> u64 {
    TYPE_SCANS.load(Ordering::Relaxed)
}

/// What the relay needs to know about one upstream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClass {
    /// `response.created`, `response.queued`, `response.in_progress`: not output (CT-9).
    Lifecycle,
    /// A `*.delta` event: output, and the first output token for TP-8.
    Delta,
    /// Any other non-terminal event: output.
    Output,
    /// `response.completed`, `response.incomplete`: the session's context advances.
    Done,
    /// `response.failed`, `response.cancelled`: terminal, the context turns cold.
    Failed,
    /// An `error` event: terminal, the context turns cold.
    Error,
}

impl EventClass {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventClass::Done | EventClass::Failed | EventClass::Error
        )
    }

    /// Whether the event counts as output reaching the client (CT-9's definition).
    pub fn is_output(self) -> bool {
        !matches!(self, EventClass::Lifecycle)
    }
}

/// Classifies an event by its `type`.
pub fn classify(kind: &str) -> EventClass {
    match kind {
        "response.created" | "response.queued" | "response.in_progress" => EventClass::Lifecycle,
        "response.completed" | "response.incomplete" | "response.done" => EventClass::Done,
        "response.failed" | "response.cancelled" => EventClass::Failed,
        "error" => EventClass::Error,
        k if k.ends_with(".delta") => EventClass::Delta,
        _ => EventClass::Output,
    }
}

#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// The `type` of a JSON event. Fast path: the API writes `type` first, so `{"type":"...` is
/// read straight off the bytes; otherwise a scan that skips every other value unparsed.
pub fn event_type(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    const HEAD: &str = "{\"type\":\"";
    if let Some(rest) = text.strip_prefix(HEAD) {
        if let Some(end) = rest.find('"') {
            let kind = &rest[..end];
            if !kind.contains('\\') {
                return Some(std::borrow::Cow::Borrowed(kind));
            }
        }
    }
    TYPE_SCANS.fetch_add(1, Ordering::Relaxed);
    serde_json::from_str::<TypeOnly>(text).ok().map(|t| t.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_and_fallback_agree() {
        let a = r#"{"type":"response.output_text.delta","delta":"x"}"#;
        let b = r#"{ "sequence_number": 3, "delta": "x", "type": "response.output_text.delta" }"#;
        assert_eq!(event_type(a).as_deref(), Some("response.output_text.delta"));
        assert_eq!(event_type(b).as_deref(), Some("response.output_text.delta"));
        assert_eq!(event_type("not json"), None);
        assert_eq!(event_type(r#"{"delta":"x"}"#), None);
    }

    #[test]
    fn classes_follow_ct9_output_definition() {
        for k in [
            "response.created",
            "response.queued",
            "response.in_progress",
        ] {
            assert!(!classify(k).is_output());
        }
        assert_eq!(classify("response.output_text.delta"), EventClass::Delta);
        assert_eq!(classify("response.output_item.added"), EventClass::Output);
        assert!(classify("response.completed").is_terminal());
        assert!(classify("response.incomplete").is_terminal());
        assert!(classify("response.failed").is_terminal());
        assert!(classify("error").is_terminal());
        assert!(!classify("response.output_item.done").is_terminal());
    }
}
