//! What a session does with a `response.create` that arrives while a turn runs (TP-5), and
//! with a client that stays silent (WS-8).

use tokio::time::Instant;

use super::record::{Ending, Read};
use super::turn::TurnStatus;
use super::{Session, Step};
use crate::config::PreemptPolicy;
use crate::error::{RelayError, Side};
use crate::protocol::client::CreateRequest;

fn in_progress() -> RelayError {
    RelayError::new(Side::Client, 409, "invalid_request_error", "response_in_progress").message(
        "A response is already in progress on this socket; send the next request after its terminal event.",
    )
}

impl Session {
    /// TP-5: `preempt` cuts the running turn and starts this one; `reject` answers 409 after
    /// the running turn's terminal; `queue` runs it after (up to `session.queue_depth`).
    pub(super) async fn on_create_during_turn(&mut self, req: CreateRequest, read: Read) -> Step {
        let s = &self.p.cfg.session;
        match s.preempt_policy {
            PreemptPolicy::Preempt => {
                self.preempt();
                self.start_turn(req, read).await
            }
            PreemptPolicy::Queue if self.queued.len() < s.queue_depth => {
                self.queued.push_back((req, read));
                Step::Go
            }
            PreemptPolicy::Queue | PreemptPolicy::Reject => {
                let model = req.model().map(str::to_string);
                self.refuse_create(&read, model.as_deref(), in_progress())
            }
        }
    }

    /// Ends the running turn silently: its upstream connection is closed at once, none of its
    /// events reaches the client any more, it gets no terminal, its usage is estimated.
    fn preempt(&mut self) {
        let Some(mut turn) = self.turn.take() else {
            return;
        };
        self.cut_upstream();
        self.out.discard_turn(turn.seq);
        self.silent_at = None;
        let end = Ending::quiet(TurnStatus::Preempted, "preempted", Side::Client);
        self.record_turn(&mut turn, end);
        drop(turn);
        for e in std::mem::take(&mut self.held) {
            self.out.push_json(&e.ws_frame());
        }
    }

    /// Closes the running turn's upstream connection and gives up its admission (TP-4); the
    /// context is redialed on demand.
    pub(super) fn cut_upstream(&mut self) {
        if let Some(up) = self.upstream.take() {
            up.cancel(self.p.cfg.session.cancel_grace);
        }
        if let Some(d) = self.dialing.take() {
            d.abort();
        }
        self.waiting_lease = None;
        // Dropping the HTTP request closes its connection (HS-4).
        self.http = None;
    }

    /// Whether a reload removed or disabled this session's key (WS-8).
    pub(super) fn key_revoked(&self) -> bool {
        let now = self.p.current.read().clone();
        now.keys
            .iter()
            .find(|k| k.id == self.p.key_id)
            .is_none_or(|k| k.disabled)
    }

    /// Starts the next queued request once no turn runs; a session whose key was revoked
    /// closes instead (WS-8: after its running turn).
    pub(super) async fn next_queued(&mut self) -> Step {
        if self.turn.is_some() || self.dialing.is_some() {
            return Step::Go;
        }
        if self.draining {
            // Requests still queued are recorded as `shutdown` by `end`.
            self.shutting_down = true;
            return Step::Close(1012, "server shutting down");
        }
        if self.revoked {
            return Step::Close(1008, "api key removed or disabled");
        }
        match self.queued.pop_front() {
            Some((req, read)) => self.start_turn(req, read).await,
            None => Step::Go,
        }
    }

    /// When WS-8 closes an idle socket: no first frame, or no request for a while.
    pub(super) fn idle_at(&self) -> Instant {
        let s = &self.p.cfg.session;
        let wait = if self.first_frame {
            s.idle_timeout
        } else {
            s.first_message_timeout
        };
        self.last_request + wait
    }

    pub(super) fn on_idle(&mut self) -> Step {
        if !self.first_frame {
            return Step::Close(1008, "no message within session.first_message_timeout");
        }
        Step::Close(1000, "no request within session.idle_timeout")
    }
}
