//! A client text frame: parsed into a request or refused, never a panic; a request keeps the
//! client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::protocol::client::{self, ClientFrame};

fuzz_target!(|text: &str| {
    if let Ok(ClientFrame::Create(req)) = client::parse(text) {
        assert_eq!(req.raw, text);
        let _ = (req.model(), req.previous_response_id(), req.is_warm_up());
    }
});
