//! Micro-benchmarks of the relay's per-event and per-turn work (figures in BENCHMARKS.md):
//! peeking an event's type, everything the session does for one delta, the full parse of a
//! terminal event, and building a 1 MB replay request (CT-2).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use switchyard::protocol::peek::{classify, event_type};
use switchyard::session::transcript::{replay_body, Transcript};
use switchyard::session::turn::{terminal_outcome, Turn, TurnStart};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// A 64-byte delta event as the API writes it (`type` first).
fn delta_event() -> String {
    let text = format!("{:019} {}", 1_760_000_000_000_000_000u64, "x".repeat(44));
    format!(
        r#"{{"type":"response.output_text.delta","content_index":0,"delta":"{text}","item_id":"msg_0123456789abcdef0123456789abcdef0123456789abcdef","logprobs":[],"output_index":0,"sequence_number":17}}"#
    )
}

/// A `response.completed` with one message of 50 × 64 B, the shape the mock and the API send.
fn completed_event() -> String {
    let text = "y".repeat(50 * 64);
    json!({"type": "response.completed", "sequence_number": 55, "response": {
        "id": "resp_0123456789abcdef0123456789abcdef0123456789abcdef", "object": "response",
        "created_at": 1_760_000_000u64, "status": "completed", "model": "gpt-5", "error": null,
        "output": [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}],
        "usage": {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1000},
            "output_tokens": 800, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 2000},
    }})
    .to_string()
}

fn turn() -> Turn {
    let body = json!({"type": "response.create", "model": "gpt-5", "input": "hi"});
    Turn::new(TurnStart {
        request_id: "req_bench".into(),
        created_ms: 0,
        read_at: tokio::time::Instant::now(),
        seq: 1,
        model: "gpt-5".into(),
        account_id: "a".into(),
        text: body.to_string(),
        body: body.as_object().cloned().unwrap_or_default(),
        chained: false,
        retry_budget: 1,
        transport: switchyard::session::turn::Transport::CtxPool,
        ticket: None,
        bound: false,
        parent: tracing::Span::none(),
    })
}

fn peek(c: &mut Criterion) {
    let event = delta_event();
    c.bench_function("peek_event_type_and_classify", |b| {
        b.iter(|| {
            let kind = event_type(black_box(&event)).unwrap_or_default();
            black_box(classify(&kind))
        })
    });
}

/// What the session does per delta: peek, class, the turn's bookkeeping (with US-3's count of
/// the delta's bytes), the frame to forward.
fn delta(c: &mut Criterion) {
    let event = Utf8Bytes::from(delta_event());
    let mut t = turn();
    c.bench_function("handle_delta", |b| {
        b.iter(|| {
            let text = black_box(&event).clone();
            let kind = event_type(text.as_str()).unwrap_or_default();
            let class = classify(&kind);
            let forward = t.on_event(class, &kind, text.as_str());
            black_box((forward, Message::Text(text)))
        })
    });
}

fn terminal(c: &mut Criterion) {
    let event = completed_event();
    let class = classify("response.completed");
    let mut g = c.benchmark_group("terminal");
    g.throughput(Throughput::Bytes(event.len() as u64));
    g.bench_function("terminal_outcome_3kb", |b| {
        b.iter(|| black_box(terminal_outcome(class, black_box(&event))))
    });
    g.finish();
}

/// A transcript of about 1 MB: 200 turns of a user message and a 5 KB answer.
fn transcript_1mb() -> Transcript {
    let mut t = Transcript::default();
    let answer = "z".repeat(5000);
    for i in 0..200 {
        let input = [json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": format!("question {i}")}]})];
        let output = vec![json!({"id": format!("msg_{i}"), "type": "message",
            "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}]})];
        t = Transcript::advance(Some(t), &input, output, "acct");
    }
    t
}

fn replay(c: &mut Criterion) {
    let t = transcript_1mb();
    let body = json!({"type": "response.create", "model": "gpt-5", "store": false,
        "previous_response_id": "resp_1", "input": [{"type": "function_call_output",
        "call_id": "call_1", "output": "ok"}]});
    let body = body.as_object().cloned().unwrap_or_default();
    let new_items: Vec<Value> = vec![body["input"][0].clone()];
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Bytes(t.bytes() as u64));
    g.sample_size(30);
    g.bench_function("replay_body_1mb", |b| {
        b.iter(|| black_box(replay_body(black_box(&body), &t, &new_items, "a")))
    });
    g.finish();
}

criterion_group!(benches, peek, delta, terminal, replay);
criterion_main!(benches);
