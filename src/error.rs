//! One error type for the relay: every failure knows which side caused it and whether a
//! transparent retry is allowed (SPEC CT-10). Classification by string matching lives only in
//! `protocol::classify`; everything else reads these fields.

use std::fmt;

/// Who is to blame for a failure. Reported in logs, metrics and usage records, so an upstream
/// EOF is never mistaken for a client disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client's socket or request (bad frame, disconnect, over a limit).
    Client,
    /// The upstream's socket or its I/O (dial failure, close, EOF, silence).
    UpstreamIo,
    /// The upstream answered with an error event or error status.
    UpstreamProtocol,
    /// The relay itself (a bug or an exhausted internal resource).
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::UpstreamIo => "upstream_io",
            Side::UpstreamProtocol => "upstream_protocol",
            Side::Internal => "internal",
        }
    }
}

/// Whether a failed attempt may be retried without the client noticing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Never retry: the request itself is at fault, or output already reached the client.
    No,
    /// Retry on a fresh context if nothing of this turn reached the client yet.
    BeforeOutput,
}

/// A relay failure: side, retry decision, and the OpenAI-shaped error it becomes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayError {
    pub side: Side,
    pub retry: Retry,
    /// HTTP status carried on the wire (`status` in WS error frames).
    pub status: u16,
    /// OpenAI error `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// OpenAI error `code`, e.g. `previous_response_not_found`.
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// The upstream's `Retry-After`, carried to the client (§3 `headers`) and to the breaker.
    pub retry_after: Option<String>,
    /// The HTTP status the upstream refused a WebSocket handshake with, if that is what failed.
    pub handshake_status: Option<u16>,
}

impl RelayError {
    pub fn new(side: Side, status: u16, kind: &'static str, code: impl Into<String>) -> Self {
        let code = code.into();
        RelayError {
            side,
            retry: Retry::No,
            status,
            kind,
            message: code.replace('_', " "),
            code,
            param: None,
            retry_after: None,
            handshake_status: None,
        }
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn retry_after(mut self, seconds: impl Into<String>) -> Self {
        self.retry_after = Some(seconds.into());
        self
    }

    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    pub fn side(mut self, side: Side) -> Self {
        self.side = side;
        self
    }

    /// 502 `upstream_connection_lost` (SPEC §3): the upstream went away or could not be reached.
    pub fn upstream_lost(message: impl Into<String>) -> Self {
        RelayError::new(
            Side::UpstreamIo,
            502,
            "server_error",
            "upstream_connection_lost",
        )
        .message(message)
    }

    /// The WebSocket error frame of this error (SPEC §3), with the upstream's `retry-after`
    /// as top-level `headers` when there is one (where Codex reads it).
    pub fn ws_frame(&self) -> serde_json::Value {
        let mut frame = crate::protocol::frames::ws_error(
            self.status,
            self.kind,
            &self.code,
            &self.message,
            self.param.as_deref(),
        );
        if let (Some(v), Some(obj)) = (&self.retry_after, frame.as_object_mut()) {
            obj.insert("headers".into(), serde_json::json!({ "retry-after": v }));
        }
        frame
    }

    /// 400 `invalid_request_error` caused by the client.
    pub fn invalid_request(code: &str, message: impl Into<String>) -> Self {
        RelayError::new(Side::Client, 400, "invalid_request_error", code).message(message)
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error {} {}: {}",
            self.side.as_str(),
            self.status,
            self.code,
            self.message
        )
    }
}

impl std::error::Error for RelayError {}
