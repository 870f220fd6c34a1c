//! Upstream error classification (CT-11): one table of codes and message patterns → class, so
//! a new wording from the upstream is one new row in [`RULES`] and nothing else changes.
//!
//! The rest of the relay decides on the class (CT-8/CT-9 retries, the breaker) and reports the
//! status it is given here, never by matching strings itself (DESIGN.md: one table in
//! `protocol/`). An error no row knows keeps its own status (the status fallback only names its
//! class), so unknown errors are forwarded as the upstream sent them.

use serde_json::Value;

/// What kind of upstream error a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The upstream does not hold the chained response (cache lost, or never there): CT-8.
    PreviousResponseNotFound,
    /// The upstream connection reached its age limit: CT-9.
    ConnectionLimit,
    /// Too many requests or tokens for the account.
    RateLimited,
    /// The upstream is shedding load.
    Overloaded,
    /// A 5xx-style failure of the upstream.
    ServerError,
    /// The input does not fit the model's context window.
    ContextWindow,
    /// Encrypted reasoning from another account (SPEC §1): a relay replay bug if it shows up.
    EncryptedContent,
    /// A `function_call_output` without its `function_call` in the context (CT-4).
    ToolCallMissing,
    /// Any other refusal of the request as sent.
    InvalidRequest,
    /// The account's credential was refused.
    Auth,
    /// Neither a row nor the status says what it is.
    Unknown,
}

impl ErrorClass {
    /// The status to report when the frame carries none (an SSE `error` event, §3).
    pub fn default_status(self) -> u16 {
        match self {
            ErrorClass::RateLimited => 429,
            ErrorClass::Auth => 401,
            ErrorClass::Overloaded => 503,
            ErrorClass::ServerError | ErrorClass::Unknown => 500,
            ErrorClass::PreviousResponseNotFound
            | ErrorClass::ConnectionLimit
            | ErrorClass::ContextWindow
            | ErrorClass::EncryptedContent
            | ErrorClass::ToolCallMissing
            | ErrorClass::InvalidRequest => 400,
        }
    }

    /// CT-8/CT-9: the relay may retry the turn on a fresh context if no output reached the
    /// client yet.
    pub fn retry_before_output(self) -> bool {
        matches!(
            self,
            ErrorClass::PreviousResponseNotFound | ErrorClass::ConnectionLimit
        )
    }

    /// The upstream itself failed (counts against the account's breaker).
    pub fn server_fault(self) -> bool {
        matches!(self, ErrorClass::ServerError | ErrorClass::Overloaded)
    }

    /// A stable snake_case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::PreviousResponseNotFound => "previous_response_not_found",
            ErrorClass::ConnectionLimit => "connection_limit",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::ServerError => "server_error",
            ErrorClass::ContextWindow => "context_window",
            ErrorClass::EncryptedContent => "encrypted_content",
            ErrorClass::ToolCallMissing => "tool_call_missing",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::Auth => "auth",
            ErrorClass::Unknown => "unknown",
        }
    }
}

/// The verdict on one upstream error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub class: ErrorClass,
    /// The status to report: the frame's own `status`, or if it has none the class's default.
    pub status: u16,
    /// CT-8/CT-9: retry on a fresh context if no output event reached the client.
    pub retry_before_output: bool,
    /// Counts as an upstream failure (for the breaker).
    pub server_fault: bool,
}

/// How a row recognises an error.
#[derive(Debug, Clone, Copy)]
pub enum Match {
    /// The error's `code`, exactly (ASCII case ignored).
    Code(&'static str),
    /// The error's `message` contains this (ASCII case ignored).
    MessageContains(&'static str),
    /// The error's `message` contains every one of these (ASCII case ignored).
    MessageContainsAll(&'static [&'static str]),
}

impl Match {
    fn matches(&self, code: Option<&str>, message: Option<&str>) -> bool {
        match *self {
            Match::Code(c) => code.is_some_and(|code| code.eq_ignore_ascii_case(c)),
            Match::MessageContains(p) => message.is_some_and(|m| contains_ignore_case(m, p)),
            Match::MessageContainsAll(ps) => {
                message.is_some_and(|m| ps.iter().all(|p| contains_ignore_case(m, p)))
            }
        }
    }
}

/// The classification table, checked in order; the first matching row decides. Codes come
/// first, message patterns after them for upstreams (and older wordings) that send no code.
pub const RULES: &[(Match, ErrorClass)] = &[
    (
        Match::Code("previous_response_not_found"),
        ErrorClass::PreviousResponseNotFound,
    ),
    (
        Match::Code("websocket_connection_limit_reached"),
        ErrorClass::ConnectionLimit,
    ),
    (Match::Code("rate_limit_exceeded"), ErrorClass::RateLimited),
    (Match::Code("server_is_overloaded"), ErrorClass::Overloaded),
    (Match::Code("overloaded"), ErrorClass::Overloaded),
    (Match::Code("server_error"), ErrorClass::ServerError),
    (
        Match::Code("context_length_exceeded"),
        ErrorClass::ContextWindow,
    ),
    (
        Match::Code("invalid_encrypted_content"),
        ErrorClass::EncryptedContent,
    ),
    (Match::Code("invalid_api_key"), ErrorClass::Auth),
    (
        Match::MessageContainsAll(&["previous response", "not found"]),
        ErrorClass::PreviousResponseNotFound,
    ),
    (
        Match::MessageContains("exceeds the context window"),
        ErrorClass::ContextWindow,
    ),
    (
        Match::MessageContainsAll(&["encrypted content", "could not be verified"]),
        ErrorClass::EncryptedContent,
    ),
    (
        Match::MessageContains("No tool call found for function call output"),
        ErrorClass::ToolCallMissing,
    ),
];

/// Classifies an error by its `code`, `message` and `status` (any may be absent).
pub fn classify(code: Option<&str>, message: Option<&str>, status: Option<u16>) -> Classified {
    let status = status.filter(|s| (100..=599).contains(s));
    let class = RULES
        .iter()
        .find(|(m, _)| m.matches(code, message))
        .map(|(_, class)| *class)
        .unwrap_or_else(|| by_status(status));
    Classified {
        class,
        status: status.unwrap_or_else(|| class.default_status()),
        retry_before_output: class.retry_before_output(),
        server_fault: class.server_fault(),
    }
}

/// Classifies an upstream `error` event: the WebSocket frame
/// `{"type":"error","status":N,"error":{"type","code","message","param"}}` (`status_code` is
/// accepted as an alias of `status`), the SSE event with top-level `code`/`message`, an HTTP
/// error body `{"error":{...}}`, or a `response.failed` event's `response.error`. Text that is
/// none of these is `Unknown` (with whatever status it carries).
pub fn classify_error_event(text: &str) -> Classified {
    super::peek::count_full_parse();
    classify_value(&serde_json::from_str(text).unwrap_or(Value::Null))
}

/// As [`classify_error_event`], on an event already parsed.
pub fn classify_value(v: &Value) -> Classified {
    let status = ["status", "status_code"]
        .iter()
        .find_map(|k| v.get(k).and_then(status_of));
    let inner = v
        .get("error")
        .filter(|e| e.is_object())
        .or_else(|| v.get("response").and_then(|r| r.get("error")))
        .filter(|e| e.is_object());
    let field = |name: &str| {
        inner
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .or_else(|| v.get(name).and_then(Value::as_str))
    };
    classify(field("code"), field("message"), status)
}

/// A status given as a number or a numeric string.
fn status_of(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The class of an error no row recognised, from its status alone.
fn by_status(status: Option<u16>) -> ErrorClass {
    match status {
        Some(429) => ErrorClass::RateLimited,
        Some(401 | 403) => ErrorClass::Auth,
        Some(500..=599) => ErrorClass::ServerError,
        Some(400..=499) => ErrorClass::InvalidRequest,
        _ => ErrorClass::Unknown,
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ws_frame(status: u16, code: &str, message: &str) -> String {
        json!({"type": "error", "status": status, "error": {
            "type": "invalid_request_error", "code": code, "message": message, "param": null}})
        .to_string()
    }

    /// CT-11: each row of the table, by code or by message, with its default status.
    #[test]
    fn ct11_every_row_classifies() {
        use ErrorClass::*;
        let cases: &[(Option<&str>, Option<&str>, ErrorClass, u16)] = &[
            (
                Some("previous_response_not_found"),
                None,
                PreviousResponseNotFound,
                400,
            ),
            (
                None,
                Some("Previous response with id 'resp_1' not found."),
                PreviousResponseNotFound,
                400,
            ),
            (
                Some("websocket_connection_limit_reached"),
                None,
                ConnectionLimit,
                400,
            ),
            (Some("rate_limit_exceeded"), None, RateLimited, 429),
            (Some("server_is_overloaded"), None, Overloaded, 503),
            (Some("overloaded"), None, Overloaded, 503),
            (Some("server_error"), None, ServerError, 500),
            (Some("context_length_exceeded"), None, ContextWindow, 400),
            (
                None,
                Some("Your input exceeds the context window of this model."),
                ContextWindow,
                400,
            ),
            (
                Some("invalid_encrypted_content"),
                None,
                EncryptedContent,
                400,
            ),
            (
                None,
                Some("The encrypted content for item rs_1 could not be verified."),
                EncryptedContent,
                400,
            ),
            (
                None,
                Some("No tool call found for function call output with call_id call_1."),
                ToolCallMissing,
                400,
            ),
            (Some("invalid_api_key"), None, Auth, 401),
        ];
        for &(code, message, class, status) in cases {
            let c = classify(code, message, None);
            assert_eq!((c.class, c.status), (class, status), "{code:?} {message:?}");
        }
        // Every row is exercised above.
        for (i, (m, _)) in RULES.iter().enumerate() {
            let hit = cases.iter().any(|&(code, message, _, _)| {
                RULES.iter().position(|(r, _)| r.matches(code, message)) == Some(i)
            });
            assert!(hit, "no case decided by row {i} {m:?}");
        }
    }

    #[test]
    fn ct11_matching_ignores_ascii_case() {
        let c = classify(
            Some("Previous_Response_Not_Found"),
            Some("ENCRYPTED CONTENT could NOT be verified"),
            None,
        );
        assert_eq!(c.class, ErrorClass::PreviousResponseNotFound);
        let c = classify(
            None,
            Some("the ENCRYPTED CONTENT could NOT be verified"),
            None,
        );
        assert_eq!(c.class, ErrorClass::EncryptedContent);
        // Both parts are needed.
        assert_eq!(
            classify(None, Some("could not be verified"), None).class,
            ErrorClass::Unknown
        );
    }

    #[test]
    fn ct8_ct9_retry_and_breaker_flags() {
        for class in [
            ErrorClass::PreviousResponseNotFound,
            ErrorClass::ConnectionLimit,
            ErrorClass::RateLimited,
            ErrorClass::Overloaded,
            ErrorClass::ServerError,
            ErrorClass::ContextWindow,
            ErrorClass::EncryptedContent,
            ErrorClass::ToolCallMissing,
            ErrorClass::InvalidRequest,
            ErrorClass::Auth,
            ErrorClass::Unknown,
        ] {
            let retry = matches!(
                class,
                ErrorClass::PreviousResponseNotFound | ErrorClass::ConnectionLimit
            );
            let fault = matches!(class, ErrorClass::ServerError | ErrorClass::Overloaded);
            assert_eq!(class.retry_before_output(), retry, "{class:?}");
            assert_eq!(class.server_fault(), fault, "{class:?}");
        }
        let c = classify(Some("websocket_connection_limit_reached"), None, Some(400));
        assert!(c.retry_before_output && !c.server_fault);
        let c = classify(Some("server_error"), None, Some(500));
        assert!(!c.retry_before_output && c.server_fault);
    }

    #[test]
    fn ct11_status_fallback_for_unknown_codes() {
        use ErrorClass::*;
        for (status, class) in [
            (429, RateLimited),
            (401, Auth),
            (403, Auth),
            (500, ServerError),
            (502, ServerError),
            (599, ServerError),
            (400, InvalidRequest),
            (404, InvalidRequest),
            (418, InvalidRequest),
            (302, Unknown),
        ] {
            let c = classify(Some("brand_new_code"), Some("new wording"), Some(status));
            assert_eq!((c.class, c.status), (class, status), "{status}");
        }
        let c = classify(Some("brand_new_code"), None, None);
        assert_eq!((c.class, c.status), (Unknown, 500));
        assert!(!c.retry_before_output && !c.server_fault);
    }

    /// CT-11: unknown errors are forwarded with their status; a known row with its own status
    /// keeps that status too.
    #[test]
    fn ct11_the_frames_own_status_wins() {
        let c = classify_error_event(&ws_frame(409, "some_new_conflict", "?"));
        assert_eq!((c.class, c.status), (ErrorClass::InvalidRequest, 409));
        let c = classify_error_event(&ws_frame(502, "server_error", "bad gateway"));
        assert_eq!((c.class, c.status), (ErrorClass::ServerError, 502));
        let c = classify_error_event(&ws_frame(400, "previous_response_not_found", "x"));
        assert_eq!(
            (c.class, c.status, c.retry_before_output),
            (ErrorClass::PreviousResponseNotFound, 400, true)
        );
    }

    #[test]
    fn error_event_shapes() {
        // `status_code` alias, also as a string.
        let alias = r#"{"type":"error","status_code":429,"error":{"code":"rate_limit_exceeded"}}"#;
        let c = classify_error_event(alias);
        assert_eq!((c.class, c.status), (ErrorClass::RateLimited, 429));
        let c = classify_error_event(r#"{"type":"error","status_code":"503","error":{}}"#);
        assert_eq!((c.class, c.status), (ErrorClass::ServerError, 503));
        // SSE shape: top-level code and message, no status.
        let sse = r#"{"type":"error","code":"context_length_exceeded","message":"too long","param":null,"sequence_number":3}"#;
        let c = classify_error_event(sse);
        assert_eq!((c.class, c.status), (ErrorClass::ContextWindow, 400));
        let sse = r#"{"type":"error","code":null,"message":"No tool call found for function call output with call_id c","sequence_number":0}"#;
        assert_eq!(classify_error_event(sse).class, ErrorClass::ToolCallMissing);
        // HTTP error body and `response.failed`.
        let body =
            r#"{"error":{"type":"invalid_request_error","code":"invalid_api_key","message":"no"}}"#;
        assert_eq!(classify_error_event(body).class, ErrorClass::Auth);
        let failed = r#"{"type":"response.failed","response":{"id":"r","status":"failed","error":{"code":"server_error","message":"oops"}}}"#;
        let c = classify_error_event(failed);
        assert_eq!((c.class, c.status), (ErrorClass::ServerError, 500));
        // The frame's status decides when the code is unknown.
        let c = classify_error_event(&ws_frame(400, "new_code", "new words"));
        assert_eq!((c.class, c.status), (ErrorClass::InvalidRequest, 400));
    }

    #[test]
    fn garbage_is_unknown_without_panicking() {
        for text in [
            "",
            "not json",
            "{",
            "null",
            "[]",
            "42",
            r#""error""#,
            r#"{"type":"error"}"#,
            r#"{"type":"error","status":"teapot","error":"flat string"}"#,
            r#"{"type":"error","status":-1,"error":{"code":7,"message":["x"]}}"#,
            r#"{"type":"error","status":70000,"error":null}"#,
            r#"{"type":"error","status":99,"code":{"nested":true}}"#,
            "{\"type\":\"error\",\"error\":{\"message\":\"\u{1F4A5} \u{00e9}\"}}",
        ] {
            let c = classify_error_event(text);
            assert_eq!((c.class, c.status), (ErrorClass::Unknown, 500), "{text}");
            assert!(!c.retry_before_output && !c.server_fault);
        }
        assert_eq!(classify(None, None, None).class, ErrorClass::Unknown);
        assert_eq!(classify(Some(""), Some(""), Some(0)).status, 500);
    }

    #[test]
    fn class_names_are_distinct() {
        let names: std::collections::HashSet<_> = [
            ErrorClass::PreviousResponseNotFound,
            ErrorClass::ConnectionLimit,
            ErrorClass::RateLimited,
            ErrorClass::Overloaded,
            ErrorClass::ServerError,
            ErrorClass::ContextWindow,
            ErrorClass::EncryptedContent,
            ErrorClass::ToolCallMissing,
            ErrorClass::InvalidRequest,
            ErrorClass::Auth,
            ErrorClass::Unknown,
        ]
        .map(ErrorClass::as_str)
        .into_iter()
        .collect();
        assert_eq!(names.len(), 11);
    }
}
