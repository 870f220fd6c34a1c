//! Builds the event stream of one mock response in the shapes of the real API (checked against
//! the official `openai` Python models by `scripts/check_events.py`).

use serde_json::{json, Value};

/// One output item the mock decided to produce.
#[derive(Debug, Clone)]
pub enum OutputSpec {
    Reasoning {
        id: String,
        summary: String,
        encrypted_content: String,
    },
    Message {
        id: String,
        text: String,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl OutputSpec {
    /// The finished item as it appears in `output_item.done` and the terminal response.
    pub fn done_item(&self) -> Value {
        match self {
            OutputSpec::Reasoning {
                id,
                summary,
                encrypted_content,
            } => json!({
                "id": id, "type": "reasoning",
                "summary": [{"type": "summary_text", "text": summary}],
                "encrypted_content": encrypted_content,
            }),
            OutputSpec::Message { id, text } => json!({
                "id": id, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }),
            OutputSpec::FunctionCall {
                id,
                call_id,
                name,
                arguments,
            } => json!({
                "id": id, "type": "function_call", "status": "completed",
                "call_id": call_id, "name": name, "arguments": arguments,
            }),
        }
    }
}

/// Fields of the response object that do not change while it streams.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub request: Value,
}

impl ResponseHead {
    /// The full `response` object with the given status, output and usage.
    pub fn object(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        let r = &self.request;
        let field = |k: &str, default: Value| r.get(k).cloned().unwrap_or(default);
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": null,
            "instructions": field("instructions", Value::Null),
            "max_output_tokens": field("max_output_tokens", Value::Null),
            "metadata": field("metadata", json!({})),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": field("parallel_tool_calls", json!(true)),
            "previous_response_id": field("previous_response_id", Value::Null),
            "prompt_cache_key": field("prompt_cache_key", Value::Null),
            "reasoning": field("reasoning", json!({"effort": null, "summary": null})),
            "store": field("store", json!(true)),
            "temperature": 1.0,
            "text": field("text", json!({"format": {"type": "text"}})),
            "tool_choice": field("tool_choice", json!("auto")),
            "tools": field("tools", json!([])),
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
        })
    }
}

/// Token usage as the terminal event reports it (input includes cached, output includes reasoning).
pub fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input + output,
    })
}

/// Appends events with consecutive sequence numbers.
pub struct EventSink {
    pub events: Vec<Value>,
}

impl EventSink {
    pub fn new() -> Self {
        EventSink { events: Vec::new() }
    }

    pub fn push(&mut self, mut event: Value) {
        event["sequence_number"] = json!(self.events.len());
        self.events.push(event);
    }
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits text into deltas of about `chunk` characters, on char boundaries.
pub fn chunks(text: &str, chunk: usize) -> Vec<String> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + chunk).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(text[start..end].to_string());
        start = end;
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// The events that stream one output item, `output_index` being its place in `output`.
pub fn item_events(
    sink: &mut EventSink,
    spec: &OutputSpec,
    output_index: usize,
    delta_bytes: usize,
) {
    let done = spec.done_item();
    match spec {
        OutputSpec::Reasoning { id, summary, .. } => {
            sink.push(
                json!({"type": "response.output_item.added", "output_index": output_index,
                "item": {"id": id, "type": "reasoning", "summary": []}}),
            );
            let part = |text: &str| json!({"type": "summary_text", "text": text});
            sink.push(
                json!({"type": "response.reasoning_summary_part.added", "item_id": id,
                "output_index": output_index, "summary_index": 0, "part": part("")}),
            );
            for d in chunks(summary, 16) {
                sink.push(
                    json!({"type": "response.reasoning_summary_text.delta", "item_id": id,
                    "output_index": output_index, "summary_index": 0, "delta": d}),
                );
            }
            sink.push(
                json!({"type": "response.reasoning_summary_text.done", "item_id": id,
                "output_index": output_index, "summary_index": 0, "text": summary}),
            );
            sink.push(
                json!({"type": "response.reasoning_summary_part.done", "item_id": id,
                "output_index": output_index, "summary_index": 0, "part": part(summary)}),
            );
        }
        OutputSpec::Message { id, text } => {
            sink.push(json!({"type": "response.output_item.added", "output_index": output_index,
                "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}));
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": [], "logprobs": []});
            sink.push(json!({"type": "response.content_part.added", "item_id": id,
                "output_index": output_index, "content_index": 0, "part": part("")}));
            for d in chunks(text, delta_bytes) {
                sink.push(json!({"type": "response.output_text.delta", "item_id": id,
                    "output_index": output_index, "content_index": 0, "delta": d, "logprobs": []}));
            }
            sink.push(json!({"type": "response.output_text.done", "item_id": id,
                "output_index": output_index, "content_index": 0, "text": text, "logprobs": []}));
            sink.push(json!({"type": "response.content_part.done", "item_id": id,
                "output_index": output_index, "content_index": 0, "part": part(text)}));
        }
        OutputSpec::FunctionCall {
            id,
            call_id,
            name,
            arguments,
        } => {
            sink.push(
                json!({"type": "response.output_item.added", "output_index": output_index,
                "item": {"id": id, "type": "function_call", "status": "in_progress",
                         "call_id": call_id, "name": name, "arguments": ""}}),
            );
            for d in chunks(arguments, 8) {
                sink.push(
                    json!({"type": "response.function_call_arguments.delta", "item_id": id,
                    "output_index": output_index, "delta": d}),
                );
            }
            sink.push(
                json!({"type": "response.function_call_arguments.done", "item_id": id,
                "output_index": output_index, "arguments": arguments}),
            );
        }
    }
    sink.push(
        json!({"type": "response.output_item.done", "output_index": output_index, "item": done}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_text_on_char_boundaries() {
        let parts = chunks("héllo wörld, a longer text", 5);
        assert_eq!(parts.concat(), "héllo wörld, a longer text");
        assert!(parts.len() > 3);
        assert_eq!(chunks("", 5), vec![String::new()]);
    }

    #[test]
    fn sequence_numbers_are_consecutive() {
        let mut sink = EventSink::new();
        let spec = OutputSpec::Message {
            id: "msg_1".into(),
            text: "hello there, friend".into(),
        };
        item_events(&mut sink, &spec, 0, 12);
        for (i, e) in sink.events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i);
        }
        assert_eq!(
            sink.events.last().map(|e| e["type"].clone()),
            Some(json!("response.output_item.done"))
        );
    }
}
