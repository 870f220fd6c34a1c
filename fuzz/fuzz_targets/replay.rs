//! Request rewriting for a replay (CT-2, CT-7): a client body and a transcript built from fuzzed
//! items, replayed to one account; the result is JSON without `previous_response_id` whose
//! `input` ends with the new items. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::session::transcript::{input_items, replay_body, Transcript};

fuzz_target!(|text: &str| {
    let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let items = input_items(&body);
    let outputs: Vec<Value> = body
        .get("output")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let t = Transcript::advance(None, &items, outputs, "a");
    let t = Transcript::advance(Some(t), &items, Vec::new(), "b");
    for account in ["a", "b"] {
        let out: Value = serde_json::from_str(&replay_body(&body, &t, &items, account))
            .expect("a replay is JSON");
        assert!(out.get("previous_response_id").is_none());
        let input = out["input"].as_array().expect("input is a list");
        assert!(input.ends_with(&items));
    }
});
