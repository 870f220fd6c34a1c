//! Turns on `http` accounts (TM-1, TM-2): the request goes upstream as `POST /responses` with
//! SSE, and its events come back exactly like a pooled WebSocket's. Without a connection cache
//! upstream, a chained request always goes as the transcript plus the new items (CT-2), and a
//! warm-up (`generate:false`) is answered by the relay itself (CT-5).

use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

use super::admit::Admitted;
use super::record::Ending;
use super::turn::{terminal_outcome, TurnStatus};
use super::{Session, Step};
use crate::config::AccountConfig;
use crate::error::RelayError;
use crate::protocol::peek::EventClass;
use crate::upstream::http::{synthetic_warmup, HttpLimits, HttpTurn};
use crate::upstream::UpFrame;

impl Session {
    /// Starts the running turn's HTTP request in the background (like a dial).
    pub(super) fn start_http(&mut self, account: AccountConfig) {
        let text = match self.request_for_context() {
            Ok(text) => text,
            Err(e) => {
                self.out.push_json(&e.ws_frame());
                self.end_turn(Ending::by_error(TurnStatus::Rejected, &e));
                return;
            }
        };
        let body: Map<String, Value> = serde_json::from_str(&text).unwrap_or_default();
        let sent = text.len();
        let (client, identity) = (self.p.http.clone(), self.identity_for_dial());
        let cfg = &self.p.cfg;
        let limits = HttpLimits {
            depth: cfg.session.pump_channel,
            timeout: cfg.upstream.dial_timeout,
            max_event_bytes: usize::try_from(cfg.upstream.max_message_bytes).unwrap_or(usize::MAX),
        };
        let span = self.turn_span();
        self.dialing = Some(tokio::spawn(
            async move {
                let turn = HttpTurn::start(&client, &account, body, &identity, limits).await?;
                Ok(Admitted {
                    slot: None,
                    lease: None,
                    http: Some((turn, sent)),
                })
            }
            .instrument(span),
        ));
    }

    /// The HTTP request is under way: its events follow.
    pub(super) fn on_http_started(&mut self, turn: HttpTurn, sent: usize) -> Step {
        if let Some(t) = self.turn.as_mut() {
            t.attempts += 1;
            t.mark_written(sent);
        }
        self.http = Some(turn);
        self.arm_silence();
        Step::Go
    }

    /// A frame of the running HTTP request.
    pub(super) fn on_http(&mut self, f: Option<UpFrame>) -> Step {
        match f {
            Some(UpFrame::Event(text)) => self.on_upstream_event(text),
            Some(UpFrame::Ended(end)) => {
                self.http = None;
                self.retry_or_fail(RelayError::upstream_lost(end.describe()))
            }
            None => {
                self.http = None;
                if self.turn.is_none() {
                    return Step::Go;
                }
                self.retry_or_fail(RelayError::upstream_lost(
                    "the upstream HTTP stream ended without a terminal event",
                ))
            }
        }
    }

    /// CT-5 on an `http` account: the relay answers `generate:false` with its two frames.
    pub(super) fn synthetic_warmup(&mut self) -> Step {
        let Some(turn) = self.turn.as_mut() else {
            return Step::Go;
        };
        let [created, completed] = synthetic_warmup(&turn.body);
        for frame in [&created, &completed] {
            let kind = crate::protocol::peek::event_type(frame).unwrap_or_default();
            let class = crate::protocol::peek::classify(&kind);
            turn.on_event(class, &kind, frame);
        }
        let seq = turn.seq;
        let outcome = terminal_outcome(EventClass::Done, &completed);
        self.out.push_event(seq, Message::Text(created.into()));
        self.out.push_event(seq, Message::Text(completed.into()));
        self.finish_turn(outcome);
        Step::Go
    }
}

/// HS-5/§3: an SSE `error` event (top-level `code`/`message`/`param`) becomes the WebSocket
/// error frame (`status`, `error: {type, code, message, param}`); the status is 500 unless
/// the code is one CT-11 reports as 400 or 429. Other events pass as they are.
/// Called for `error` events only (the caller peeked the type).
pub(super) fn ws_error_of_sse(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("error").is_some_and(Value::is_object) {
        return None;
    }
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let class = crate::protocol::classify::classify(field("code"), field("message"), None).class;
    let (status, kind) = match class.default_status() {
        400 => (400, "invalid_request_error"),
        429 => (429, "rate_limit_error"),
        _ => (500, "server_error"),
    };
    let frame = crate::protocol::frames::ws_error(
        status,
        kind,
        field("code").unwrap_or("server_error"),
        field("message").unwrap_or_default(),
        field("param"),
    );
    Some(frame.to_string())
}

impl Session {
    /// Whether a turn on `account` goes over HTTP: `http` accounts, every account under
    /// `upstream.force_http` or in TM-4's WebSocket cooldown, and `passthrough` accounts for
    /// HTTP clients (TM-1).
    pub(super) fn turn_is_http(&self, account: &AccountConfig) -> bool {
        use crate::config::AccountMode;
        self.p.cfg.upstream.force_http
            || account.mode == AccountMode::Http
            || account.mode == AccountMode::Passthrough && self.p.kind == super::ClientKind::Http
            || self.p.pool.fallback.active(&account.id)
    }
}
