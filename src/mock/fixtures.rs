//! The recorded event streams of `proto-fixtures/`, replayed by `[[mock:fixture NAME]]` so the
//! mock's failed, incomplete and error answers are exactly the shapes the fixtures pin down.

use serde_json::Value;

const FIXTURES: &[(&str, &str)] = &[
    ("text", include_str!("../../proto-fixtures/text.jsonl")),
    (
        "function_call",
        include_str!("../../proto-fixtures/function_call.jsonl"),
    ),
    (
        "function_call_output_answer",
        include_str!("../../proto-fixtures/function_call_output_answer.jsonl"),
    ),
    (
        "reasoning",
        include_str!("../../proto-fixtures/reasoning.jsonl"),
    ),
    ("failed", include_str!("../../proto-fixtures/failed.jsonl")),
    (
        "incomplete",
        include_str!("../../proto-fixtures/incomplete.jsonl"),
    ),
    ("error", include_str!("../../proto-fixtures/error.jsonl")),
];

/// Every fixture's name.
pub fn names() -> impl Iterator<Item = &'static str> {
    FIXTURES.iter().map(|(n, _)| *n)
}

/// The events of a fixture as recorded.
pub fn load(name: &str) -> Option<Vec<Value>> {
    let text = FIXTURES.iter().find(|(n, _)| *n == name)?.1;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The events of a fixture with its response id and `previous_response_id` replaced by the
/// request's own.
pub fn replay(name: &str, response_id: &str, previous: &Value) -> Option<Vec<Value>> {
    let mut events = load(name)?;
    for e in &mut events {
        if let Some(id) = e.pointer_mut("/response/id") {
            *id = Value::String(response_id.to_string());
        }
        if let Some(prev) = e.pointer_mut("/response/previous_response_id") {
            *prev = previous.clone();
        }
    }
    Some(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_parses_and_ends_with_a_terminal_event() {
        for name in names() {
            let events = load(name).unwrap_or_else(|| panic!("{name} does not parse"));
            let last = events.last().and_then(|e| e["type"].as_str()).unwrap_or("");
            assert!(
                matches!(
                    last,
                    "response.completed" | "response.failed" | "response.incomplete" | "error"
                ),
                "{name} ends with {last}"
            );
        }
    }

    #[test]
    fn replay_rewrites_the_response_id() {
        let events = replay("failed", "resp_new", &Value::Null).expect("fixture");
        assert!(events
            .iter()
            .all(|e| e.pointer("/response/id").is_none_or(|id| id == "resp_new")));
    }
}
