//! Reading client frames (SPEC WS-4, WS-5): what a frame asks for, or the §3 error it gets.
//! Checks that need the session (model inheritance, continuity) happen in the session.

use serde_json::{Map, Value};

use crate::error::RelayError;

/// A validated client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// A `response.create` (or a frame without `type`).
    Create(CreateRequest),
    /// An event that needs no answer (`response.processed`).
    Ignore,
}

/// A `response.create` with the fields the relay looks at; `body` is the whole frame.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub body: Map<String, Value>,
    /// The frame's own text, forwarded unchanged when nothing needs rewriting.
    pub raw: String,
}

impl CreateRequest {
    pub fn model(&self) -> Option<&str> {
        self.body
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
    }

    pub fn previous_response_id(&self) -> Option<&str> {
        self.body
            .get("previous_response_id")
            .and_then(Value::as_str)
    }

    /// `generate:false` is a warm-up (CT-5).
    pub fn is_warm_up(&self) -> bool {
        self.body.get("generate").and_then(Value::as_bool) == Some(false)
    }
}

/// Validates one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, RelayError> {
    let body = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Err(RelayError::invalid_request(
                "invalid_event",
                "The message must be a JSON object.",
            ))
        }
        Err(e) => {
            return Err(RelayError::invalid_request(
                "invalid_event",
                format!("The message is not valid JSON: {e}."),
            ))
        }
    };
    match body.get("type") {
        None => {}
        Some(Value::String(t)) if t == "response.create" => {}
        Some(Value::String(t)) if t == "response.processed" => return Ok(ClientFrame::Ignore),
        Some(Value::String(t)) => {
            return Err(RelayError::invalid_request(
                "unsupported_event_type",
                format!("Unsupported event type '{t}'."),
            )
            .param("type"))
        }
        Some(_) => {
            return Err(RelayError::invalid_request(
                "unsupported_event_type",
                "The event type must be a string.",
            )
            .param("type"))
        }
    }
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            "background",
            "background responses are not supported over WebSocket.",
        ));
    }
    if body.contains_key("stream_id") {
        return Err(unsupported(
            "stream_id",
            "Several streams on one socket are not supported; open one socket per stream.",
        ));
    }
    Ok(ClientFrame::Create(CreateRequest {
        body,
        raw: text.to_string(),
    }))
}

fn unsupported(param: &str, message: &str) -> RelayError {
    RelayError::invalid_request("unsupported_parameter", message).param(param)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> String {
        parse(text).expect_err("refused").code
    }

    #[test]
    fn ws4_not_json_and_unknown_types_are_refused() {
        assert_eq!(code("hello"), "invalid_event");
        assert_eq!(code("[1,2]"), "invalid_event");
        assert_eq!(
            code(r#"{"type":"response.cancel"}"#),
            "unsupported_event_type"
        );
        assert_eq!(
            code(r#"{"type":"response.steer"}"#),
            "unsupported_event_type"
        );
    }

    #[test]
    fn ws4_missing_type_means_create_and_processed_is_ignored() {
        assert!(matches!(
            parse(r#"{"model":"m"}"#),
            Ok(ClientFrame::Create(_))
        ));
        assert_eq!(
            parse(r#"{"type":"response.processed"}"#),
            Ok(ClientFrame::Ignore)
        );
    }

    #[test]
    fn ws5_background_and_stream_id_are_unsupported() {
        let e = parse(r#"{"type":"response.create","background":true}"#).expect_err("refused");
        assert_eq!(
            (e.code.as_str(), e.param.as_deref(), e.status),
            ("unsupported_parameter", Some("background"), 400)
        );
        let e = parse(r#"{"type":"response.create","stream_id":"a"}"#).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("stream_id"));
        assert!(parse(r#"{"type":"response.create","background":false,"stream":true}"#).is_ok());
    }
}
