//! The mock "model": resolves a request's context (connection cache or account storage),
//! enforces the rules the real service enforces, and plans the events of the answer.

use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::bench::BenchSpec;
use super::events::{item_events, usage, EventSink, OutputSpec, ResponseHead};
use super::script::{parse_directives, Directives};
use super::state::{MockState, Stored};

/// A refusal in the API's error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    fn invalid(code: Option<&str>, message: String, param: Option<&str>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: code.map(str::to_string),
            message,
            param: param.map(str::to_string),
        }
    }

    /// The WebSocket error frame (SPEC §1).
    pub fn ws_frame(&self) -> Value {
        json!({"type": "error", "status": self.status, "error": {
            "type": self.kind, "code": self.code, "message": self.message, "param": self.param}})
    }

    /// The HTTP error body.
    pub fn http_body(&self) -> Value {
        json!({"error": {"type": self.kind, "code": self.code, "message": self.message, "param": self.param}})
    }
}

/// What answering a request takes: the events, and the context to remember if it completes.
#[derive(Debug)]
pub struct Plan {
    pub response_id: String,
    pub events: Vec<Value>,
    pub directives: Directives,
    /// Context after this response (input + output), remembered when it ends well.
    pub stored: Arc<Stored>,
    pub store: bool,
    /// A benchmark answer (`metadata.bench_events`): its deltas are paced and stamped as sent.
    pub bench: Option<BenchSpec>,
}

/// Where `previous_response_id` may be looked up besides account storage.
pub type ConnCache = Option<Arc<Stored>>;

/// Validates `req` and plans its answer. `cache` is the connection's most recent response
/// (WebSocket only); `account` is the caller's mock account.
pub fn plan(
    state: &MockState,
    account: &str,
    cache: &ConnCache,
    req: &Value,
) -> Result<Plan, ApiError> {
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty());
    let Some(model) = model else {
        return Err(ApiError::invalid(
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'.".into(),
            Some("model"),
        ));
    };
    let new_items = normalize_input(req.get("input"))?;
    let (mut context, cached_bytes) = resolve_previous(state, account, cache, req)?;
    check_items(state, account, &context, &new_items)?;
    let input_bytes = serde_json::to_vec(&context).map_or(0, |v| v.len()) + json_len(&new_items);
    context.extend(new_items.iter().cloned());

    let directives = request_directives(req);
    let head = ResponseHead {
        id: new_id("resp"),
        created_at: now_secs(),
        model: model.to_string(),
        request: req.clone(),
    };
    let generate = req.get("generate").and_then(Value::as_bool).unwrap_or(true);
    let bench = BenchSpec::from_request(req).filter(|_| generate);
    let outputs = if let Some(b) = bench {
        vec![OutputSpec::Message {
            id: new_id("msg"),
            text: b.answer_text(),
        }]
    } else if generate {
        decide_outputs(state, account, &directives, &new_items)
    } else {
        Vec::new()
    };
    let input_tokens = div_ceil(input_bytes, 4);
    let cached = ((cached_bytes / 4) as u64).min(input_tokens);
    let fixture = directives
        .fixture
        .as_deref()
        .filter(|_| generate && bench.is_none());
    let events = if let Some(name) = fixture {
        let prev = req
            .get("previous_response_id")
            .cloned()
            .unwrap_or(Value::Null);
        super::fixtures::replay(name, &head.id, &prev).ok_or_else(|| {
            ApiError::invalid(
                None,
                format!("mock: unknown fixture {name:?}"),
                Some("input"),
            )
        })?
    } else {
        let delta = bench
            .map(|b| b.bytes)
            .or(directives.delta_bytes)
            .unwrap_or(12);
        build_events(&head, &outputs, (input_tokens, cached), generate, delta)
    };
    context.extend(outputs.iter().map(OutputSpec::done_item));
    let store = req.get("store").and_then(Value::as_bool).unwrap_or(true);
    Ok(Plan {
        response_id: head.id.clone(),
        events,
        directives,
        stored: Arc::new(Stored {
            id: head.id,
            account: account.to_string(),
            items: context,
        }),
        store,
        bench,
    })
}

fn json_len(items: &[Value]) -> usize {
    serde_json::to_vec(items).map_or(0, |v| v.len())
}

fn div_ceil(n: usize, d: usize) -> u64 {
    n.div_ceil(d) as u64
}

/// `input` as a list of items: a string is one user message.
fn normalize_input(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![
            json!({"type": "message", "role": "user", "content": s}),
        ]),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(ApiError::invalid(
            None,
            "Invalid type for 'input'.".into(),
            Some("input"),
        )),
    }
}

/// The chained context for `previous_response_id`, and how many bytes of it count as cached.
fn resolve_previous(
    state: &MockState,
    account: &str,
    cache: &ConnCache,
    req: &Value,
) -> Result<(Vec<Value>, usize), ApiError> {
    let Some(prev) = req.get("previous_response_id").and_then(Value::as_str) else {
        return Ok((Vec::new(), 0));
    };
    let found = cache
        .as_ref()
        .filter(|c| c.id == prev)
        .cloned()
        .or_else(|| state.stored(prev).filter(|s| s.account == account));
    match found {
        Some(s) => Ok((s.items.clone(), json_len(&s.items))),
        None => Err(ApiError::invalid(
            Some("previous_response_not_found"),
            format!("Previous response with id '{prev}' not found."),
            Some("previous_response_id"),
        )),
    }
}

/// The service's item rules: tool outputs need their call, encrypted reasoning verifies only
/// on its own account, and a function call sent with its id needs its preceding reasoning.
fn check_items(
    state: &MockState,
    account: &str,
    context: &[Value],
    new_items: &[Value],
) -> Result<(), ApiError> {
    let mut seen: Vec<&Value> = context.iter().collect();
    for item in new_items {
        match item.get("type").and_then(Value::as_str) {
            Some("function_call_output") => {
                let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                let has_call = seen.iter().any(|i| {
                    i.get("type").and_then(Value::as_str) == Some("function_call")
                        && i.get("call_id").and_then(Value::as_str) == Some(call_id)
                });
                if !has_call {
                    return Err(ApiError::invalid(
                        None,
                        format!(
                            "No tool call found for function call output with call_id {call_id}."
                        ),
                        Some("input"),
                    ));
                }
            }
            Some("reasoning") => verify_reasoning(account, item)?,
            Some("function_call") => check_call_has_reasoning(state, &seen, item)?,
            _ => {}
        }
        seen.push(item);
    }
    Ok(())
}

fn verify_reasoning(account: &str, item: &Value) -> Result<(), ApiError> {
    let Some(blob) = item.get("encrypted_content").and_then(Value::as_str) else {
        return Ok(());
    };
    let id = item.get("id").and_then(Value::as_str).unwrap_or("");
    if blob != seal(account, id) {
        return Err(ApiError::invalid(
            Some("invalid_encrypted_content"),
            format!("The encrypted content for item {id} could not be verified."),
            None,
        ));
    }
    Ok(())
}

fn check_call_has_reasoning(
    state: &MockState,
    seen: &[&Value],
    item: &Value,
) -> Result<(), ApiError> {
    let Some(id) = item.get("id").and_then(Value::as_str) else {
        return Ok(());
    };
    let Some(rs) = state.reasoning_parent(id) else {
        return Ok(());
    };
    if seen
        .iter()
        .any(|i| i.get("id").and_then(Value::as_str) == Some(rs.as_str()))
    {
        return Ok(());
    }
    Err(ApiError::invalid(
        None,
        format!("Item '{id}' of type 'function_call' was provided without its required 'reasoning' item: '{rs}'."),
        Some("input"),
    ))
}

/// The `encrypted_content` of a reasoning item: binds the item id to the producing account.
pub fn seal(account: &str, item_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"switchyard-mock-reasoning\0");
    h.update(account.as_bytes());
    h.update(b"\0");
    h.update(item_id.as_bytes());
    format!("gAAAA{}", hex::encode(h.finalize()))
}

/// The directives of a request: those in its last user message.
pub fn request_directives(req: &Value) -> Directives {
    let items = normalize_input(req.get("input")).unwrap_or_default();
    last_user_text(&items)
        .map(|t| parse_directives(&t))
        .unwrap_or_default()
}

/// Text of the last user message among the new items.
fn last_user_text(items: &[Value]) -> Option<String> {
    let msg = items.iter().rev().find(|i| {
        i.get("role").and_then(Value::as_str) == Some("user")
            && i.get("type")
                .and_then(Value::as_str)
                .is_none_or(|t| t == "message")
    })?;
    Some(match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    })
}

/// Chooses the output items: a tool output is answered with text; otherwise the directives.
fn decide_outputs(
    state: &MockState,
    account: &str,
    d: &Directives,
    new_items: &[Value],
) -> Vec<OutputSpec> {
    let last = new_items.last();
    let after_tool =
        last.and_then(|i| i.get("type")).and_then(Value::as_str) == Some("function_call_output");
    let mut out = Vec::new();
    if d.reason {
        let id = new_id("rs");
        out.push(OutputSpec::Reasoning {
            encrypted_content: seal(account, &id),
            id,
            summary: "Considering the request step by step.".into(),
        });
    }
    match (&d.tool, after_tool) {
        (Some((name, args)), false) => {
            let id = new_id("fc");
            if let Some(OutputSpec::Reasoning { id: rs, .. }) = out.first() {
                state.set_reasoning_parent(&id, rs);
            }
            out.push(OutputSpec::FunctionCall {
                id,
                call_id: new_id("call"),
                name: name.clone(),
                arguments: args.clone(),
            });
        }
        _ => out.push(OutputSpec::Message {
            id: new_id("msg"),
            text: answer_text(d, last, after_tool),
        }),
    }
    out
}

fn answer_text(d: &Directives, last: Option<&Value>, after_tool: bool) -> String {
    if after_tool {
        let output = last.and_then(|i| i.get("output")).map(|o| match o {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        let output: String = output.unwrap_or_default().chars().take(200).collect();
        return format!("The tool returned: {}", output.trim());
    }
    match d.words {
        Some(n) => (1..=n)
            .map(|i| format!("word{i}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => "Hello from the mock upstream. This answer is streamed in small deltas.".into(),
    }
}

/// The lifecycle events, every item's events, and the terminal `response.completed`; a
/// warm-up (`generate:false`) is only `response.created` + `response.completed`.
fn build_events(
    head: &ResponseHead,
    outputs: &[OutputSpec],
    (input_tokens, cached): (u64, u64),
    generate: bool,
    delta_bytes: usize,
) -> Vec<Value> {
    let mut sink = EventSink::new();
    let lifecycle = head.object("in_progress", vec![], Value::Null);
    sink.push(json!({"type": "response.created", "response": lifecycle}));
    if generate {
        sink.push(json!({"type": "response.in_progress", "response": lifecycle}));
    }
    let mut out_bytes = 0usize;
    let mut reasoning = 0u64;
    for (i, spec) in outputs.iter().enumerate() {
        item_events(&mut sink, spec, i, delta_bytes);
        match spec {
            OutputSpec::Message { text, .. } => out_bytes += text.len(),
            OutputSpec::FunctionCall {
                arguments, name, ..
            } => out_bytes += arguments.len() + name.len(),
            OutputSpec::Reasoning { summary, .. } => reasoning += div_ceil(summary.len(), 4) + 8,
        }
    }
    let output_tokens = div_ceil(out_bytes, 4) + reasoning;
    let done: Vec<Value> = outputs.iter().map(OutputSpec::done_item).collect();
    let final_obj = head.object(
        "completed",
        done,
        usage(input_tokens, cached, output_tokens, reasoning),
    );
    sink.push(json!({"type": "response.completed", "response": final_obj}));
    sink.events
}

/// A fresh id like the API's: prefix, underscore, 48 hex digits.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
