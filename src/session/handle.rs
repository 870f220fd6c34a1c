//! The session's reactions on the client side: frames, the start of a turn, pings, the end.

use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

use super::record::{Ending, Read};
use super::turn::{Turn, TurnStart, TurnStatus};
use super::{Session, Step, Wake};
use crate::error::{RelayError, Side};
use crate::protocol::client::{self, ClientFrame, CreateRequest};
use crate::scheduler;
use crate::telemetry::metric;

impl Session {
    pub(super) async fn handle(&mut self, wake: Wake) -> Step {
        match wake {
            Wake::Client(m) => self.on_client(m).await,
            Wake::Flushed(Ok(())) => {
                // Waiting on the client is not upstream silence.
                self.arm_silence();
                Step::Go
            }
            Wake::Flushed(Err(_)) => Step::Gone,
            Wake::Dialed(r) => self.on_dialed(r).await,
            Wake::Upstream(f) => self.on_upstream_burst(f),
            Wake::Http(f) => self.on_http(f),
            Wake::Silence => self.on_silence(),
            Wake::Ping => self.on_ping(),
            Wake::Drain => {
                // `next_queued` closes the socket once no turn runs.
                self.draining = true;
                Step::Go
            }
            Wake::Shutdown => {
                self.shutting_down = true;
                Step::Close(1012, "server shutting down")
            }
            Wake::Idle => self.on_idle(),
            Wake::Reloaded => {
                self.revoked = self.key_revoked();
                Step::Go
            }
        }
    }

    async fn on_client(&mut self, m: Option<Result<Message, tungstenite::Error>>) -> Step {
        let msg = match m {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return client_error(e),
            None => return Step::Gone,
        };
        self.last_heard = tokio::time::Instant::now();
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            self.first_frame = true;
        }
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
        if self.draining {
            self.refuse_draining(text);
            return Step::Go;
        }
        match client::parse(text) {
            Err(e) => self.refuse(e),
            Ok(ClientFrame::Ignore) => Step::Go,
            Ok(ClientFrame::Create(req)) => {
                self.turns += 1;
                let read = Read::now(self.turns);
                if self.turn.is_some() {
                    return self.on_create_during_turn(req, read).await;
                }
                self.start_turn(req, read).await
            }
        }
    }

    /// OP-2: a request read while the relay drains never starts; it is recorded as `shutdown`
    /// and the socket closes with 1012 once no turn runs.
    pub(super) fn refuse_draining(&mut self, text: &str) {
        if let Ok(ClientFrame::Create(req)) = client::parse(text) {
            self.turns += 1;
            let read = Read::now(self.turns);
            let side = Side::Internal;
            self.record_unstarted(
                &read,
                req.model(),
                TurnStatus::Shutdown,
                "shutting_down",
                side,
            );
        }
    }

    /// Refuses a `response.create`: its usage record says `rejected` (US-1).
    pub(super) fn refuse_create(
        &mut self,
        read: &Read,
        model: Option<&str>,
        e: RelayError,
    ) -> Step {
        self.record_refused(read, model, &e);
        self.refuse(e)
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

    pub(super) async fn start_turn(&mut self, req: CreateRequest, read: Read) -> Step {
        self.last_request = tokio::time::Instant::now();
        let Some(model) = req
            .model()
            .map(str::to_string)
            .or_else(|| self.last_model.clone())
        else {
            return self.refuse_create(
                &read,
                None,
                RelayError::invalid_request(
                    "missing_model",
                    "The first request on a socket must name a model.",
                )
                .param("model"),
            );
        };
        let now = self.p.current.read().clone();
        let hold = match self.admit_key(&now, &model, &req).await {
            Ok(hold) => hold,
            Err(e) => return self.refuse_create(&read, Some(&model), e),
        };
        let bound = self.binding_for(&req).await;
        let choice = match self.choose_account(&now, &model, bound.as_deref()) {
            Ok(c) => c,
            Err(e) => return self.refuse_create(&read, Some(&model), e),
        };
        let account = choice.account;
        if self.passthrough_wanted(&account) {
            return Step::Passthrough(Box::new(super::passthrough::Handover {
                account,
                first: req.raw,
                read,
            }));
        }
        if let Some(prev) = req.previous_response_id().filter(|_| bound.is_none()) {
            if self.last_response_id.as_deref() != Some(prev) {
                let e =
                    previous_not_found(format!("Previous response with id '{prev}' not found."));
                return self.refuse_create(&read, Some(&model), e);
            }
        }
        self.sticky = Some(account.id.clone());
        self.last_model = Some(model.clone());
        if self.p.budget.take_evicted(self.p.id) {
            self.transcript = None;
        }
        // A turn on a bound stored response goes as the client sent it: the upstream holds
        // what it chains from.
        let chained = req.previous_response_id().is_some() && bound.is_none();
        let http = self.turn_is_http(&account);
        let text = upstream_text(&req, &model);
        let mut body = req.body;
        body.insert("type".into(), Value::String("response.create".into()));
        body.insert("model".into(), Value::String(model.clone()));
        let mut turn = Turn::new(TurnStart {
            request_id: read.request_id,
            created_ms: read.created_ms,
            read_at: read.at,
            seq: read.seq,
            model,
            account_id: account.id.clone(),
            text,
            body,
            chained,
            retry_budget: self.p.cfg.upstream.retry_budget,
            ticket: Some(choice.ticket),
            bound: bound.is_some(),
            parent: self.span.clone(),
            transport: if http {
                super::turn::Transport::Http
            } else {
                super::turn::Transport::CtxPool
            },
        });
        turn.limit_hold = hold;
        self.turn = Some(turn);
        if http {
            // A held WebSocket context is no use to an HTTP turn; it goes back to the pool.
            self.upstream = None;
            if self.turn.as_ref().is_some_and(|t| t.warm_up) {
                return self.synthetic_warmup();
            }
        }
        if self
            .upstream
            .as_ref()
            .is_some_and(|u| u.account_id() != account.id || !u.begin_turn())
        {
            self.upstream = None;
        }
        let reuse = self.upstream.is_some();
        self.admit(account, reuse).await
    }

    /// The turn's account (SC-2): the one a stored response is bound to (400
    /// `previous_response_not_found` when it takes no turns now), else the scheduler's choice
    /// (400 `model_not_found` when no account serves the model, 503 `no_capacity` when none
    /// takes turns now).
    fn choose_account(
        &self,
        cfg: &crate::config::Config,
        model: &str,
        bound: Option<&str>,
    ) -> Result<scheduler::Choice, RelayError> {
        if let Some(id) = bound {
            return self
                .p
                .scheduler
                .choose_bound(cfg, id, model)
                .ok_or_else(|| {
                    previous_not_found(
                        "Previous response not found: its account takes no turns now.".into(),
                    )
                });
        }
        let ask = scheduler::Ask {
            model,
            sticky: self.sticky.as_deref(),
            ..scheduler::Ask::default()
        };
        self.p.scheduler.choose(cfg, ask).map_err(|why| match why {
            scheduler::NoAccount::Unknown => RelayError::invalid_request(
                "model_not_found",
                format!("No upstream account serves the model '{model}'."),
            )
            .param("model"),
            scheduler::NoAccount::Ineligible => {
                RelayError::new(Side::Internal, 503, "server_error", "no_capacity").message(
                    format!(
                        "No account serving '{model}' takes turns now (disabled, draining, cooling down or failing)."
                    ),
                )
            }
        })
    }

    /// The account a `previous_response_id` this session cannot serve itself is bound to, as
    /// a stored response of this key (SC-2, CT-3).
    /// SC-6 and `keys[].models`: whether the session's key may run this turn now; the hold
    /// keeps its place among the key's concurrent turns.
    async fn admit_key(
        &mut self,
        cfg: &crate::config::Config,
        model: &str,
        req: &CreateRequest,
    ) -> Result<Option<crate::limits::TurnHold>, RelayError> {
        // A key removed by a reload has its socket closed after the turn (WS-8).
        let Some(key) = cfg.keys.iter().find(|k| k.id == self.p.key_id) else {
            return Ok(None);
        };
        if !key.allows_model(model) {
            return Err(RelayError::new(
                Side::Client,
                403,
                "permission_error",
                "model_not_allowed",
            )
            .message(format!("This key may not use the model '{model}'."))
            .param("model"));
        }
        let warm_up = req.body.get("generate").and_then(Value::as_bool) == Some(false);
        self.p.limits.admit_turn(key, warm_up).await.map(Some)
    }

    /// A store that cannot answer counts as no binding (CT-3's 400, never a 5xx).
    async fn binding_for(&mut self, req: &CreateRequest) -> Option<String> {
        let prev = req.previous_response_id()?;
        let own = self.last_response_id.as_deref() == Some(prev)
            && (self.transcript.is_some()
                || self.upstream.as_ref().and_then(|u| u.holds()).as_deref() == Some(prev));
        if own {
            return None;
        }
        let name = crate::state::response_binding(&self.p.key_id, prev);
        self.p
            .state
            .bound(&name)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "binding lookup failed"))
            .ok()
            .flatten()
    }

    fn on_ping(&mut self) -> Step {
        if self.last_heard.elapsed() > self.p.cfg.session.client_idle_timeout {
            return Step::Close(1001, "no pong within session.client_idle_timeout");
        }
        self.out.push(Message::Ping(Default::default()));
        Step::Go
    }

    pub(super) async fn end(mut self, step: Step) {
        let (status, class, side) = if self.shutting_down {
            (TurnStatus::Shutdown, "shutting_down", Side::Internal)
        } else {
            (
                TurnStatus::ClientCancelled,
                "client_disconnected",
                Side::Client,
            )
        };
        if let Some(mut turn) = self.turn.take() {
            // TP-4: the client left mid-turn; its upstream connection is closed at once (there
            // is no cancel event) and the context is redialed on demand.
            self.cut_upstream();
            self.record_turn(&mut turn, Ending::quiet(status, class, side));
        }
        for (req, read) in std::mem::take(&mut self.queued) {
            self.record_unstarted(&read, req.model(), status, class, side);
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

/// CT-3's 400 for a `previous_response_id` the relay cannot serve.
pub(super) fn previous_not_found(message: String) -> RelayError {
    RelayError::invalid_request("previous_response_not_found", message)
        .param("previous_response_id")
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
fn upstream_text(req: &CreateRequest, model: &str) -> String {
    if req.body.contains_key("type") && req.model().is_some() {
        return req.raw.clone();
    }
    let mut body = req.body.clone();
    body.insert("type".into(), Value::String("response.create".into()));
    body.insert("model".into(), Value::String(model.to_string()));
    Value::Object(body).to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::upstream_text;
    use crate::protocol::client::{self, ClientFrame};

    fn fields() -> impl Strategy<Value = Map<String, Value>> {
        let value = prop_oneof![
            any::<String>().prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ];
        prop::collection::btree_map("[a-z_]{1,10}", value, 0..8).prop_map(|m| {
            m.into_iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "type" | "model" | "background" | "stream_id")
                })
                .collect()
        })
    }

    proptest! {
        /// WS-4/WS-5 rewriting: a request with `type` and `model` goes upstream byte for byte;
        /// one without gets exactly those two fields added and nothing else changed.
        #[test]
        fn rewriting_adds_only_type_and_model(
            body in fields(),
            has_type in any::<bool>(),
            has_model in any::<bool>(),
        ) {
            let mut sent = body.clone();
            if has_type {
                sent.insert("type".into(), "response.create".into());
            }
            if has_model {
                sent.insert("model".into(), "gpt-client".into());
            }
            let text = Value::Object(sent.clone()).to_string();
            let Ok(ClientFrame::Create(req)) = client::parse(&text) else {
                return Err(TestCaseError::fail(format!("not a request: {text}")));
            };
            // As `start_turn` calls it: the request's own model, else the inherited one.
            let model = req.model().unwrap_or("gpt-inherited").to_string();
            let out = upstream_text(&req, &model);
            if has_type && has_model {
                prop_assert_eq!(out, text);
            } else {
                let mut want = sent;
                want.insert("type".into(), "response.create".into());
                want.entry("model").or_insert_with(|| "gpt-inherited".into());
                let got: Value = serde_json::from_str(&out).expect("JSON");
                prop_assert_eq!(got, Value::Object(want));
            }
        }
    }
}
