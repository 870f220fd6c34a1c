//! Error frames in the two shapes the Responses API uses (SPEC §3): the WebSocket frame with a
//! top-level `status` (Codex ignores error frames without one), and the SSE `error` event.

use serde_json::{json, Value};

/// WebSocket error frame: `{"type":"error","status":S,"error":{type,code,message,param}}`.
pub fn ws_error(status: u16, kind: &str, code: &str, message: &str, param: Option<&str>) -> Value {
    json!({
        "type": "error",
        "status": status,
        "error": { "type": kind, "code": code, "message": message, "param": param },
    })
}

/// SSE error event payload: `{"type":"error","code":C,"message":M,"param":P,"sequence_number":N}`.
pub fn sse_error(code: &str, message: &str, param: Option<&str>, sequence_number: u64) -> Value {
    json!({
        "type": "error",
        "code": code,
        "message": message,
        "param": param,
        "sequence_number": sequence_number,
    })
}

/// HTTP error body: `{"error":{type,code,message,param}}`, as the API answers non-2xx.
pub fn http_error_body(kind: &str, code: &str, message: &str, param: Option<&str>) -> Value {
    json!({ "error": { "type": kind, "code": code, "message": message, "param": param } })
}

/// One SSE event as bytes: `event: <type>\ndata: <json>\n\n`.
pub fn sse_event(event_type: &str, data: &str) -> String {
    format!("event: {event_type}\ndata: {data}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_error_carries_status_and_inner_error() {
        let f = ws_error(400, "invalid_request_error", "invalid_event", "bad", None);
        assert_eq!(f["status"], 400);
        assert_eq!(f["error"]["code"], "invalid_event");
        assert!(f["error"]["param"].is_null());
    }

    #[test]
    fn sse_event_framing() {
        assert_eq!(sse_event("error", "{}"), "event: error\ndata: {}\n\n");
    }
}
