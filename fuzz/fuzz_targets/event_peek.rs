//! The event peek on any text: never a panic, and on a JSON object with one string `type` it
//! reads what serde reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::protocol::peek;

fuzz_target!(|text: &str| {
    let kind = peek::event_type(text);
    let _ = peek::classify(kind.as_deref().unwrap_or_default());
    // Only where serde is the reference: a valid object whose `type` is its only such key.
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(text) {
        let once = text.matches("\"type\"").count() == 1;
        if let (Some(t), true) = (m.get("type").and_then(|v| v.as_str()), once) {
            assert_eq!(kind.as_deref(), Some(t));
        }
    }
});
