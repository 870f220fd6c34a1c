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
    check_types(&body)?;
    Ok(ClientFrame::Create(CreateRequest {
        body,
        raw: text.to_string(),
    }))
}

/// The JSON kind a field the relay reads must have, as the API names it.
#[derive(Clone, Copy)]
enum Kind {
    String,
    Boolean,
    StringOrArray,
}

/// Fields the relay itself acts on. One of another type would be read as absent (a chained
/// request taken for a new one, say), so it gets the API's 400 `invalid_type` instead.
const TYPED: [(&str, Kind); 6] = [
    ("model", Kind::String),
    ("previous_response_id", Kind::String),
    ("generate", Kind::Boolean),
    ("store", Kind::Boolean),
    ("stream", Kind::Boolean),
    ("input", Kind::StringOrArray),
];

fn check_types(body: &Map<String, Value>) -> Result<(), RelayError> {
    for (field, kind) in TYPED {
        let ok = match (body.get(field), kind) {
            (None | Some(Value::Null), _) => true,
            (Some(v), Kind::String) => v.is_string(),
            (Some(v), Kind::Boolean) => v.is_boolean(),
            (Some(v), Kind::StringOrArray) => v.is_string() || v.is_array(),
        };
        if !ok {
            let expected = match kind {
                Kind::String => "a string",
                Kind::Boolean => "a boolean",
                Kind::StringOrArray => "a string or an array",
            };
            return Err(RelayError::invalid_request(
                "invalid_type",
                format!("Invalid type for '{field}': expected {expected}."),
            )
            .param(field));
        }
    }
    Ok(())
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

    /// Fields the relay reads have the API's types, or the frame gets 400 `invalid_type`
    /// naming the field (an object for `previous_response_id` was once read as no chain).
    #[test]
    fn ws4_fields_the_relay_reads_must_have_their_types() {
        for (frame, param) in [
            (r#"{"model":{"x":1}}"#, "model"),
            (
                r#"{"model":"m","previous_response_id":{"id":"r"}}"#,
                "previous_response_id",
            ),
            (
                r#"{"model":"m","previous_response_id":7}"#,
                "previous_response_id",
            ),
            (r#"{"model":"m","generate":"false"}"#, "generate"),
            (r#"{"model":"m","store":1}"#, "store"),
            (r#"{"model":"m","stream":"yes"}"#, "stream"),
            (r#"{"model":"m","input":{"role":"user"}}"#, "input"),
            (r#"{"model":"m","input":5}"#, "input"),
        ] {
            let e = parse(frame).expect_err(frame);
            assert_eq!(
                (e.code.as_str(), e.param.as_deref(), e.status),
                ("invalid_type", Some(param), 400),
                "{frame}"
            );
        }
        for ok in [
            r#"{"model":"m","input":"hi","store":false,"stream":true,"generate":false}"#,
            r#"{"model":"m","input":[],"previous_response_id":null,"store":null}"#,
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }
}
