//! The session's reactions: client frames, upstream events, dials, pings, and the end.

use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

use super::turn::{terminal_outcome, Turn, TurnStatus};
use super::{Session, Step, Wake};
use crate::error::{RelayError, Side};
use crate::protocol::client::{self, ClientFrame, CreateRequest};
use crate::protocol::peek::{self, EventClass};
use crate::scheduler;
use crate::telemetry::metric;
use crate::upstream::{Lease, UpEnd, UpFrame};

impl Session {
    pub(super) async fn handle(&mut self, wake: Wake) -> Step {
        match wake {
            Wake::Client(m) => self.on_client(m).await,
            Wake::Room(Ok(permit)) => {
                self.out.send_with(permit);
                // Waiting on the client is not upstream silence.
                self.arm_silence();
                Step::Go
            }
            Wake::Room(Err(_)) => Step::Gone,
            Wake::Dialed(r) => self.on_dialed(r).await,
            Wake::Upstream(f) => self.on_upstream(f),
            Wake::Silence => self.on_silence(),
            Wake::Ping => self.on_ping(),
        }
    }

    async fn on_client(&mut self, m: Option<Result<Message, tungstenite::Error>>) -> Step {
        let msg = match m {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return client_error(e),
            None => return Step::Gone,
        };
        self.last_heard = tokio::time::Instant::now();
        match msg {
            Message::Text(t) => self.on_text(t.as_str()).await,
            Message::Binary(b) => match std::str::from_utf8(&b) {
                Ok(text) => self.on_text(text).await,
                Err(_) => self.refuse(RelayError::invalid_request(
                    "invalid_event",
                    "A binary frame must hold UTF-8 JSON.",
                )),
            },
            Message::Close(_) => Step::Gone,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Step::Go,
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        match client::parse(text) {
            Err(e) => self.refuse(e),
            Ok(ClientFrame::Ignore) => Step::Go,
            // Interim policy until preemption lands: a request during a turn is `reject`.
            Ok(ClientFrame::Create(_)) if self.turn.is_some() => self.refuse(
                RelayError::new(Side::Client, 409, "invalid_request_error", "response_in_progress")
                    .message("A response is already in progress on this socket; send the next request after its terminal event."),
            ),
            Ok(ClientFrame::Create(req)) => self.start_turn(req).await,
        }
    }

    /// Answers a refused frame: at once between turns, after the terminal during one (§3).
    fn refuse(&mut self, e: RelayError) -> Step {
        metrics::counter!(metric::CLIENT_FRAMES_REFUSED, "code" => e.code.clone()).increment(1);
        if self.turn.is_none() {
            self.out.push_json(&e.ws_frame());
            return Step::Go;
        }
        if self.held.len() >= self.p.cfg.session.max_held_errors {
            return Step::Close(1008, "too many refused frames during a turn");
        }
        self.held.push(e);
        Step::Go
    }

    async fn start_turn(&mut self, req: CreateRequest) -> Step {
        let Some(model) = req
            .model()
            .map(str::to_string)
            .or_else(|| self.last_model.clone())
        else {
            return self.refuse(
                RelayError::invalid_request(
                    "missing_model",
                    "The first request on a socket must name a model.",
                )
                .param("model"),
            );
        };
        if let Some(prev) = req.previous_response_id() {
            if self.last_response_id.as_deref() != Some(prev) {
                return self.refuse(
                    RelayError::invalid_request(
                        "previous_response_not_found",
                        format!("Previous response with id '{prev}' not found."),
                    )
                    .param("previous_response_id"),
                );
            }
        }
        let Some(account) = scheduler::pick(&self.p.cfg, &model) else {
            return self.refuse(
                RelayError::invalid_request(
                    "model_not_found",
                    format!("No upstream account serves the model '{model}'."),
                )
                .param("model"),
            );
        };
        let account = account.clone();
        self.last_model = Some(model.clone());
        self.turns += 1;
        let warm_up = req.is_warm_up();
        let text = upstream_text(req, &model);
        self.turn = Some(Turn::new(
            self.turns,
            model,
            account.id.clone(),
            warm_up,
            text,
        ));
        if self
            .upstream
            .as_ref()
            .is_some_and(|u| u.account_id() != account.id || !u.is_open())
        {
            self.upstream = None;
        }
        if self.upstream.is_some() {
            return self.write_request().await;
        }
        let (pool, identity) = (self.p.pool.clone(), self.p.identity.clone());
        let (session, depth) = (self.p.id, self.p.cfg.session.pump_channel);
        self.dialing = Some(tokio::spawn(async move {
            pool.lease(&account, session, &identity, depth).await
        }));
        Step::Go
    }

    async fn on_dialed(
        &mut self,
        r: Result<Result<Lease, RelayError>, tokio::task::JoinError>,
    ) -> Step {
        self.dialing = None;
        match r {
            Ok(Ok(conn)) => {
                self.upstream = Some(conn);
                self.write_request().await
            }
            Ok(Err(e)) => self.fail_turn(e),
            Err(e) => self.fail_turn(
                RelayError::new(Side::Internal, 500, "server_error", "internal_error")
                    .message(format!("dial task failed: {e}")),
            ),
        }
    }

    async fn write_request(&mut self) -> Step {
        let (Some(turn), Some(up)) = (self.turn.as_mut(), self.upstream.as_mut()) else {
            return Step::Go;
        };
        let Some(text) = turn.request.take() else {
            return Step::Go;
        };
        match up.send_text(text).await {
            Ok(()) => {
                turn.mark_written();
                self.arm_silence();
                Step::Go
            }
            Err(e) => {
                if let Some(up) = self.upstream.take() {
                    up.break_connection(UpEnd::Io(e.message.clone()));
                }
                self.fail_turn(e)
            }
        }
    }

    fn on_upstream(&mut self, f: Option<UpFrame>) -> Step {
        let text = match f {
            Some(UpFrame::Event(text)) => text,
            Some(UpFrame::Ended(end)) => return self.upstream_ended(end),
            None => return self.upstream_ended(UpEnd::Io("upstream reader ended".into())),
        };
        let Some(turn) = self.turn.as_mut() else {
            tracing::debug!(bytes = text.len(), "upstream event outside a turn dropped");
            return Step::Go;
        };
        let class =
            peek::event_type(text.as_str()).map_or(EventClass::Output, |t| peek::classify(&t));
        turn.on_event(class);
        self.silent_at =
            Some(tokio::time::Instant::now() + self.p.cfg.upstream.stream_idle_timeout);
        let outcome = class
            .is_terminal()
            .then(|| terminal_outcome(class, text.as_str()));
        self.out.push(Message::Text(text));
        if let Some((status, id)) = outcome {
            self.end_turn(status, id);
        }
        Step::Go
    }

    /// The upstream connection is gone. During a turn the client gets 502 (CT-9's final
    /// answer; transparent retry arrives with continuity); between turns the next turn redials.
    fn upstream_ended(&mut self, end: UpEnd) -> Step {
        self.upstream = None;
        if self.turn.is_none() {
            tracing::debug!(?end, "idle upstream connection ended");
            return Step::Go;
        }
        self.fail_turn(RelayError::upstream_lost(end.describe()))
    }

    /// The running turn's upstream went silent: its connection is closed and the turn gets
    /// 502 (CT-9's final answer until transparent retry lands).
    fn on_silence(&mut self) -> Step {
        if let Some(up) = self.upstream.take() {
            up.break_connection(UpEnd::Silent);
        }
        self.fail_turn(RelayError::upstream_lost(UpEnd::Silent.describe()))
    }

    fn arm_silence(&mut self) {
        if self.turn.is_some() {
            self.silent_at =
                Some(tokio::time::Instant::now() + self.p.cfg.upstream.stream_idle_timeout);
        }
    }

    /// Ends the running turn with a relay-made error frame.
    fn fail_turn(&mut self, e: RelayError) -> Step {
        tracing::warn!(side = e.side.as_str(), code = %e.code, message = %e.message, "turn failed");
        self.out.push_json(&e.ws_frame());
        self.end_turn(TurnStatus::UpstreamLost, None);
        Step::Go
    }

    /// After a terminal: the context advances on completed/incomplete and turns cold
    /// otherwise; the held errors follow the terminal.
    fn end_turn(&mut self, status: TurnStatus, response_id: Option<String>) {
        let Some(mut turn) = self.turn.take() else {
            return;
        };
        self.silent_at = None;
        match status {
            TurnStatus::Completed | TurnStatus::Incomplete => {
                self.last_response_id = response_id.clone();
                if let Some(up) = self.upstream.as_ref() {
                    up.set_holds(response_id);
                }
            }
            _ => {
                if let Some(up) = self.upstream.as_ref() {
                    up.set_holds(None);
                }
            }
        }
        record(&mut turn, status);
        for e in std::mem::take(&mut self.held) {
            self.out.push_json(&e.ws_frame());
        }
    }

    fn on_ping(&mut self) -> Step {
        if self.last_heard.elapsed() > self.p.cfg.session.client_idle_timeout {
            return Step::Close(1001, "no pong within session.client_idle_timeout");
        }
        self.out.push(Message::Ping(Default::default()));
        Step::Go
    }

    pub(super) async fn end(mut self, step: Step) {
        if let Some(mut turn) = self.turn.take() {
            // TP-4 (interim): the client left mid-turn; its upstream connection is closed at
            // once (there is no cancel event) and the context is redialed on demand.
            if let Some(up) = self.upstream.take() {
                up.break_connection(UpEnd::Abandoned);
            }
            if let Some(d) = self.dialing.take() {
                d.abort();
            }
            record(&mut turn, TurnStatus::ClientCancelled);
        }
        self.upstream = None;
        match step {
            Step::Close(code, reason) => {
                metrics::counter!(metric::CLOSE_CODES_SENT, "code" => code.to_string())
                    .increment(1);
                self.out.close(code, reason).await
            }
            _ => self.out.finish().await,
        }
    }
}

/// A read error from the client socket, as the close it deserves (WS-4, WS-6).
fn client_error(e: tungstenite::Error) -> Step {
    match e {
        tungstenite::Error::Capacity(_) => {
            Step::Close(1009, "message over limits.max_client_message_bytes")
        }
        tungstenite::Error::Utf8(_) => Step::Close(1007, "text frame is not valid UTF-8"),
        tungstenite::Error::Protocol(_) => Step::Close(1002, "WebSocket protocol error"),
        _ => Step::Gone,
    }
}

/// The frame for the upstream: the client's own bytes unless `type` or an inherited `model`
/// must be added (WS-4, WS-5).
fn upstream_text(req: CreateRequest, model: &str) -> String {
    if req.body.contains_key("type") && req.model().is_some() {
        return req.raw;
    }
    let mut body = req.body;
    body.insert("type".into(), Value::String("response.create".into()));
    body.entry("model")
        .or_insert_with(|| Value::String(model.to_string()));
    if body.get("model").and_then(Value::as_str) == Some("") {
        body.insert("model".into(), Value::String(model.to_string()));
    }
    Value::Object(body).to_string()
}

fn record(turn: &mut Turn, status: TurnStatus) {
    let t = turn.finish().clone();
    metrics::counter!(metric::TURNS, "status" => status.as_str(), "transport" => "ctx_pool")
        .increment(1);
    if let Some(v) = t.first_event {
        metrics::histogram!(metric::TIME_TO_FIRST_EVENT).record(v);
    }
    if let Some(v) = t.first_token {
        metrics::histogram!(metric::TIME_TO_FIRST_TOKEN).record(v);
    }
    if let Some(v) = t.total {
        metrics::histogram!(metric::TURN_DURATION).record(v);
    }
    tracing::info!(
        turn = turn.seq,
        model = %turn.model,
        account = %turn.account_id,
        warm_up = turn.warm_up,
        status = status.as_str(),
        admission_wait = ?t.admission_wait,
        upstream_write = ?t.upstream_write,
        first_event = ?t.first_event,
        first_token = ?t.first_token,
        total = ?t.total,
        "turn ended"
    );
}
