//! An upstream event as the pump reads it: its type, its class, and for a terminal or error
//! event the outcome (status, usage, error class) taken from it. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::protocol::{classify, peek};
use switchyard::session::turn::terminal_outcome;

fuzz_target!(|text: &str| {
    let kind = peek::event_type(text).unwrap_or_default();
    let class = peek::classify(&kind);
    if class.is_terminal() {
        let _ = terminal_outcome(class, text);
    }
    let c = classify::classify_error_event(text);
    let _ = (c.class.as_str(), c.status);
});
