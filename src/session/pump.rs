//! The session's reactions on the upstream side: leasing a context, choosing between the fast
//! path and a full replay (CT-1, CT-2), forwarding events, and recovering from upstream faults
//! before any output reached the client (CT-8, CT-9).

use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::record::Ending;
use super::transcript::{replay_body, Transcript};
use super::turn::{terminal_outcome, Outcome, TurnStatus};
use super::{Session, Step};
use crate::error::{RelayError, Side};
use crate::protocol::classify::{classify_error_event, Classified, ErrorClass};
use crate::protocol::peek::{self, EventClass};
use crate::telemetry::{loggable, metric};
use crate::tuning;
use crate::upstream::{UpEnd, UpFrame};

impl Session {
    /// Sends the turn's request: as the client sent it when the context holds the response it
    /// chains from (CT-1), else the transcript and the new items without
    /// `previous_response_id` (CT-2); without a transcript that is CT-3's 400 (CT-6).
    pub(super) async fn write_request(&mut self) -> Step {
        let text = match self.request_for_context() {
            Ok(text) => text,
            Err(e) => {
                self.out.push_json(&e.ws_frame());
                self.end_turn(Ending::by_error(TurnStatus::Rejected, &e));
                return Step::Go;
            }
        };
        let (Some(turn), Some(up)) = (self.turn.as_mut(), self.upstream.as_mut()) else {
            return Step::Go;
        };
        turn.attempts += 1;
        let bytes = text.len();
        match up.send_text(text).await {
            Ok(()) => {
                turn.mark_written(bytes);
                self.arm_silence();
                Step::Go
            }
            Err(e) => {
                turn.upstream_failed(&e.message);
                if let Some(up) = self.upstream.take() {
                    up.break_connection(UpEnd::Io(e.message.clone()));
                }
                self.retry_or_fail(e)
            }
        }
    }

    pub(super) fn request_for_context(&mut self) -> Result<String, RelayError> {
        let holds = self.upstream.as_ref().and_then(|u| u.holds());
        let Some(turn) = self.turn.as_mut() else {
            return Err(RelayError::new(
                Side::Internal,
                500,
                "server_error",
                "internal_error",
            ));
        };
        if !turn.chained {
            turn.fast_path = false;
            return Ok(turn.text.clone());
        }
        if holds.is_some() && holds == self.last_response_id {
            turn.fast_path = true;
            return Ok(turn.text.clone());
        }
        turn.fast_path = false;
        match self.transcript.as_ref() {
            Some(t) => {
                self.p.budget.touch(self.p.id);
                metrics::counter!(metric::REPLAYS).increment(1);
                Ok(replay_body(&turn.body, t, &turn.new_items, &turn.account_id))
            }
            None => Err(super::handle::previous_not_found(
                "Previous response not found: this session no longer holds its transcript; send the full input.".into(),
            )),
        }
    }

    /// Handles an upstream frame and then the frames already queued behind it, while the
    /// client side has room: a burst costs one pass of the session loop and goes out with one
    /// flush, instead of a pass, a wake-up and a write per event.
    pub(super) fn on_upstream_burst(&mut self, f: Option<UpFrame>) -> Step {
        let mut step = self.on_upstream(f);
        for _ in 1..tuning::UPSTREAM_BURST {
            if !matches!(step, Step::Go) || self.out.has_pending() {
                break;
            }
            // Empty or closed: the loop's own wait on the lease sees what comes next.
            let Some(next) = self
                .upstream
                .as_mut()
                .and_then(|u| u.events.try_recv().ok())
            else {
                break;
            };
            step = self.on_upstream(Some(next));
        }
        step
    }

    fn on_upstream(&mut self, f: Option<UpFrame>) -> Step {
        match f {
            Some(UpFrame::Event(text)) => self.on_upstream_event(text),
            Some(UpFrame::Ended(end)) => self.upstream_ended(end),
            None => self.upstream_ended(UpEnd::Io("upstream reader ended".into())),
        }
    }

    /// One upstream event of the running turn, from either transport.
    pub(super) fn on_upstream_event(&mut self, text: Utf8Bytes) -> Step {
        let Some(turn) = self.turn.as_mut() else {
            tracing::debug!(bytes = text.len(), "upstream event outside a turn dropped");
            return Step::Go;
        };
        self.silent_at =
            Some(tokio::time::Instant::now() + self.p.cfg.upstream.stream_idle_timeout);
        let kind = peek::event_type(text.as_str()).unwrap_or_default();
        let class = peek::classify(&kind);
        if class == EventClass::Error && turn.is_http() {
            // HS-5: an SSE error event takes the WebSocket shape the client side speaks (the
            // reshaped frame is not SSE-shaped, so this happens once).
            if let Some(frame) = super::http_turn::ws_error_of_sse(text.as_str()) {
                return self.on_upstream_event(frame.into());
            }
        }
        if class == EventClass::Error && !turn.output_sent {
            // CT-8 (the cache was lost behind the relay's back on the fast path) and CT-9
            // (connection limit): the client never sees this error, the turn goes again.
            let c = classify_error_event(text.as_str());
            let recoverable = match c.class {
                ErrorClass::PreviousResponseNotFound => turn.fast_path,
                _ => c.retry_before_output,
            };
            if recoverable {
                tracing::info!(class = ?c.class, "upstream error before output");
                if let Some(up) = self.upstream.take() {
                    up.break_connection(UpEnd::Io(format!("upstream error {:?}", c.class)));
                }
                self.http = None;
                let e = RelayError::upstream_lost(format!(
                    "upstream answered {:?} before any output",
                    c.class
                ));
                return self.retry_or_fail(e.side(Side::UpstreamProtocol));
            }
            if let Some(step) = self.fail_over_error(&c) {
                return step;
            }
        }
        let Some(turn) = self.turn.as_mut() else {
            return Step::Go;
        };
        if !turn.on_event(class, &kind, text.as_str()) {
            return Step::Go;
        }
        let outcome = class
            .is_terminal()
            .then(|| terminal_outcome(class, text.as_str()));
        self.out.push_event(turn.seq, Message::Text(text));
        if let Some(o) = outcome {
            self.finish_turn(o);
        }
        Step::Go
    }

    /// The upstream connection is gone (close, EOF, missing pong, oversized event).
    fn upstream_ended(&mut self, end: UpEnd) -> Step {
        // The pool already has the verdict (the connection's task reports it before telling
        // the lease), so a retry cannot lease this connection again.
        self.upstream = None;
        let Some(turn) = self.turn.as_mut() else {
            tracing::debug!(?end, "idle upstream connection ended");
            return Step::Go;
        };
        if crate::upstream::fallback::end_counts(&end) {
            // Counted by the pool with TM-4's failures.
            turn.avoid_account();
        } else {
            turn.upstream_failed(&end.describe());
        }
        self.retry_or_fail(RelayError::upstream_lost(end.describe()))
    }

    /// The running turn's upstream went silent: that connection is closed (CT-9).
    pub(super) fn on_silence(&mut self) -> Step {
        if let Some(up) = self.upstream.take() {
            up.break_connection(UpEnd::Silent);
        }
        self.http = None;
        if let Some(turn) = self.turn.as_mut() {
            turn.upstream_failed(&UpEnd::Silent.describe());
        }
        self.retry_or_fail(RelayError::upstream_lost(UpEnd::Silent.describe()))
    }

    pub(super) fn arm_silence(&mut self) {
        if self.turn.is_some() {
            self.silent_at =
                Some(tokio::time::Instant::now() + self.p.cfg.upstream.stream_idle_timeout);
        }
    }

    /// CT-9: before any output reached the client and within `upstream.retry_budget`, the turn
    /// goes again on a fresh context (with the transcript when it chained), on another account
    /// when the failure was its account's and another is eligible (SC-4); otherwise 502.
    pub(super) fn retry_or_fail(&mut self, e: RelayError) -> Step {
        let Some(turn) = self.turn.as_mut() else {
            return Step::Go;
        };
        if turn.output_sent || turn.retries_left == 0 {
            let e = if turn.retries_left == 0 && !turn.output_sent {
                RelayError::upstream_lost(format!("{} (retries exhausted)", e.message)).side(e.side)
            } else {
                RelayError::upstream_lost(e.message).side(e.side)
            };
            return self.fail_turn(e);
        }
        match self.next_account(false) {
            Some(choice) => self.retry_on(choice, &e.message),
            None => self.fail_turn(e),
        }
    }

    /// SC-4: an upstream error event before any output that says the account failed (a server
    /// error) or is rate limited moves the turn to another eligible account, within the retry
    /// budget; with no other account the error goes to the client as it is.
    fn fail_over_error(&mut self, c: &Classified) -> Option<Step> {
        let limited = c.class == ErrorClass::RateLimited;
        if !(c.server_fault || limited) {
            return None;
        }
        let turn = self.turn.as_mut()?;
        if turn.bound || turn.retries_left == 0 {
            return None;
        }
        // Avoided whatever happens: with no other account the error ends the turn, and its
        // failure is counted with the terminal (`account_outcome`).
        turn.avoid_account();
        let choice = self.next_account(true)?;
        let turn = self.turn.as_mut()?;
        if !limited {
            turn.upstream_failed(c.class.as_str());
        }
        if let Some(up) = self.upstream.take() {
            up.break_connection(UpEnd::Io(format!("upstream error {:?}", c.class)));
        }
        self.http = None;
        let why = format!("upstream answered {} before any output", c.class.as_str());
        Some(self.retry_on(choice, &why))
    }

    /// The account for the running turn's next attempt: its bound account, else the same one
    /// unless the turn failed there and another is eligible (`strict`: only another).
    pub(super) fn next_account(&self, strict: bool) -> Option<crate::scheduler::Choice> {
        let turn = self.turn.as_ref()?;
        let now = self.p.current.read().clone();
        if turn.bound {
            return self
                .p
                .scheduler
                .choose_bound(&now, &turn.account_id, &turn.model);
        }
        let ask = crate::scheduler::Ask {
            model: &turn.model,
            sticky: Some(&turn.account_id),
            avoid: &turn.failed_on,
            strict,
        };
        self.p.scheduler.choose(&now, ask).ok()
    }

    /// Starts the running turn's next attempt on `choice`: the same account keeps its slot and
    /// leases a fresh context; another account is admitted anew (SC-3), with CT-7 applied to
    /// the replay because the turn's account changed.
    pub(super) fn retry_on(&mut self, choice: crate::scheduler::Choice, why: &str) -> Step {
        let account = choice.account;
        let http = self.turn_is_http(&account);
        let Some(turn) = self.turn.as_mut() else {
            return Step::Go;
        };
        turn.retries_left -= 1;
        turn.abandon_attempt();
        self.silent_at = None;
        metrics::counter!(metric::RETRIES).increment(1);
        let moved = account.id != turn.account_id;
        tracing::info!(reason = %loggable(why), attempt = turn.attempts + 1, from = %turn.account_id, to = %account.id, "retrying the turn on a fresh context");
        if moved {
            metrics::counter!(metric::FAILOVERS, "from" => turn.account_id.clone(), "to" => account.id.clone())
                .increment(1);
            turn.account_id = account.id.clone();
            turn.span.record("account", account.id.as_str());
            turn.slot = None;
        }
        turn.ticket = Some(choice.ticket);
        turn.transport = if http {
            super::turn::Transport::Http
        } else {
            super::turn::Transport::CtxPool
        };
        if let Some(up) = self.upstream.take() {
            up.break_connection(UpEnd::Io("abandoned for a retry".into()));
        }
        self.http = None;
        self.sticky = Some(account.id.clone());
        if moved {
            let scope = crate::state::account_scope(&account.id);
            self.wait_for_slot(account, scope);
        } else {
            self.lease(account);
        }
        Step::Go
    }

    /// Ends the running turn with a relay-made error frame.
    pub(super) fn fail_turn(&mut self, e: RelayError) -> Step {
        tracing::warn!(side = e.side.as_str(), code = %e.code, message = %loggable(&e.message), "turn failed");
        self.out.push_json(&e.ws_frame());
        self.end_turn(Ending::by_error(TurnStatus::UpstreamLost, &e));
        Step::Go
    }

    /// After a terminal event: the transcript and `last_response_id` advance on
    /// completed/incomplete (SPEC §6); otherwise the context turns cold.
    pub(super) fn finish_turn(&mut self, o: Outcome) {
        self.account_outcome(&o);
        if matches!(o.status, TurnStatus::Completed | TurnStatus::Incomplete) {
            self.bind_stored(&o);
            if let Some(turn) = self.turn.as_ref().filter(|t| t.bound) {
                // Chained from a stored response: its history is upstream, not here.
                tracing::debug!(account = %turn.account_id, "turn on a bound stored response: no transcript");
                self.transcript = None;
                self.p.budget.remove(self.p.id);
            } else if let Some(turn) = self.turn.as_ref() {
                let prior = if turn.chained {
                    self.transcript.take()
                } else {
                    Some(Transcript::default())
                };
                // A chained turn whose prior transcript is gone cannot have a complete one.
                self.transcript = prior.map(|p| {
                    Transcript::advance(Some(p), &turn.new_items, o.output, &turn.account_id)
                });
                self.bound_transcript();
            }
        }
        let side = matches!(o.status, TurnStatus::Failed | TurnStatus::Error)
            .then_some(Side::UpstreamProtocol);
        self.end_turn(Ending {
            status: o.status,
            response_id: o.response_id,
            usage: o.usage,
            error: o.error_class.map(|c| (c, side)),
        });
    }

    /// SC-5: what the terminal event says about the account. An answer, even a refusal caused
    /// by the request, shows the account works; a server error counts against it.
    fn account_outcome(&mut self, o: &Outcome) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        match o.classified {
            Some(c) if c.server_fault => turn.upstream_failed(c.class.as_str()),
            // In the stream a 429 may be about this request alone (its size): no cooldown; a
            // refused dial or request with 429 is the account's (UP-8).
            Some(c) if c.class == ErrorClass::RateLimited => {}
            Some(_) => turn.account_answered(None),
            None => {
                let ttft = turn.upstream_ttft();
                turn.account_answered(ttft)
            }
        }
    }

    /// SC-2: a stored (`store:true`) response is bound to its account for
    /// `scheduler.binding_ttl`, so any session of this key can chain from it (CT-3, HS-3).
    fn bind_stored(&mut self, o: &Outcome) {
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        let stored = turn.body.get("store").and_then(serde_json::Value::as_bool) == Some(true);
        let Some(id) = o.response_id.as_deref().filter(|_| stored) else {
            return;
        };
        let name = crate::state::response_binding(&self.p.key_id, id);
        let (store, account) = (self.p.state.clone(), turn.account_id.clone());
        let ttl = self.p.cfg.scheduler.binding_ttl;
        // Bound before the client sees the terminal event, so it can chain from any instance
        // at once.
        self.before_flush = crate::state::write_first(async move {
            if let Err(e) = store.bind(&name, &account, ttl).await {
                tracing::warn!(error = %e, "stored response not bound to its account");
            }
        });
    }

    /// CT-6: a transcript over `limits.max_transcript_bytes` is dropped.
    fn bound_transcript(&mut self) {
        let limit = usize::try_from(self.p.cfg.limits.max_transcript_bytes).unwrap_or(usize::MAX);
        match self.transcript.as_ref().map(Transcript::bytes) {
            Some(bytes) if bytes <= limit => self.p.budget.set(self.p.id, bytes),
            Some(bytes) => {
                tracing::info!(bytes, "transcript over limits.max_transcript_bytes dropped");
                self.transcript = None;
                self.p.budget.remove(self.p.id);
            }
            None => self.p.budget.remove(self.p.id),
        }
    }

    /// Closes the books on the running turn; the held errors follow its terminal.
    pub(super) fn end_turn(&mut self, end: Ending) {
        let Some(mut turn) = self.turn.take() else {
            return;
        };
        self.silent_at = None;
        self.last_request = tokio::time::Instant::now();
        // An HTTP request ends with its turn; dropping it lets its connection go back to the
        // client's pool.
        self.http = None;
        if let Some(up) = self.upstream.as_ref() {
            // Parked between turns: still ours, but another session may take it (UP-6).
            up.end_turn();
        }
        match end.status {
            TurnStatus::Completed | TurnStatus::Incomplete => {
                self.last_response_id = end.response_id.clone();
                if let Some(up) = self.upstream.as_ref() {
                    up.set_holds(end.response_id.clone());
                }
            }
            TurnStatus::Rejected => {}
            _ => {
                if let Some(up) = self.upstream.as_ref() {
                    up.set_holds(None);
                }
            }
        }
        self.record_turn(&mut turn, end);
        for e in std::mem::take(&mut self.held) {
            self.out.push_json(&e.ws_frame());
        }
    }

    /// The client's identity for a dial, with the upstream's `x-codex-turn-state` from an
    /// earlier dial unless the client sent its own (WS-7).
    pub(super) fn identity_for_dial(&self) -> crate::upstream::Identity {
        let mut id = self.p.identity.clone();
        if let Some(ts) = self.upstream_turn_state.as_ref() {
            if id.get("x-codex-turn-state").is_none() {
                id.set("x-codex-turn-state", ts.clone());
            }
        }
        id
    }
}
