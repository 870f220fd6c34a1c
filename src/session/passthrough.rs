//! `passthrough` accounts (TM-1): after the first `response.create` chose the account, the
//! client socket gets an upstream WebSocket of its own and every frame goes across as it is,
//! both ways, close codes included. The relay only watches: it peeks at frame types, delta
//! sizes and terminal usage for the usage records. No transcript, no recovery, no re-choice
//! of the account, no frames of its own; the socket keeps its account until it closes.

use std::collections::VecDeque;

use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use super::record::{Ending, Read};
use super::turn::{terminal_outcome, Turn, TurnStart, TurnStatus};
use super::{Session, Step};
use crate::config::AccountConfig;
use crate::error::Side;
use crate::protocol::peek::{self, EventClass};
use crate::upstream::conn::{Live, UpEnd};
use crate::upstream::UpFrame;

/// What the session hands over when a socket turns into a passthrough.
pub(super) struct Handover {
    pub account: AccountConfig,
    pub first: String,
    pub read: Read,
}

/// How the relay loop ended.
enum End {
    /// The client left (or closed): open turns were cancelled by it.
    Client,
    /// The upstream closed or broke: the client gets its close code.
    Upstream(Step),
    Shutdown,
    /// The account (TM-3) or the relay (OP-2) is draining and no turn runs: the socket closes
    /// with 1012 and this reason.
    Drained(&'static str),
}

impl Session {
    /// Whether this socket becomes a passthrough: a WebSocket client's first request on a
    /// `passthrough` account (HTTP clients of one are served as `http`; `force_http` wins).
    pub(super) fn passthrough_wanted(&self, account: &AccountConfig) -> bool {
        account.mode == crate::config::AccountMode::Passthrough
            && self.p.kind == super::ClientKind::WebSocket
            && !self.p.cfg.upstream.force_http
            && self.last_model.is_none()
            && self.turn.is_none()
    }

    /// Relays the socket to its own upstream connection until either side ends.
    pub(super) async fn passthrough<St>(&mut self, stream: &mut St, h: Handover) -> Step
    where
        St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let identity = self.identity_for_dial();
        let mut turns = VecDeque::new();
        let first = self.passthrough_turn(&h.account, &h.first, h.read);
        turns.extend(first);
        let live = match self.p.pool.dial_dedicated(&h.account, &identity).await {
            Ok(live) => live,
            Err(e) => {
                self.close_turns(
                    &mut turns,
                    TurnStatus::UpstreamLost,
                    "upstream_connection_lost",
                    e.side,
                );
                return Step::Close(1014, "passthrough upstream unavailable");
            }
        };
        let (tx, mut events) = mpsc::channel(self.p.cfg.session.pump_channel.max(1));
        *live.route.lock() = Some(tx);
        if send(&live, Message::Text(h.first.into())).await.is_err() {
            self.close_turns(
                &mut turns,
                TurnStatus::UpstreamLost,
                "upstream_connection_lost",
                Side::UpstreamIo,
            );
            return Step::Close(1014, "passthrough upstream unavailable");
        }
        for t in turns.iter_mut() {
            t.attempts = 1;
        }
        let end = self
            .relay_frames(stream, &live, &mut events, &h.account, &mut turns)
            .await;
        match end {
            End::Client => {
                let _ = send(&live, Message::Close(None)).await;
                self.close_turns(
                    &mut turns,
                    TurnStatus::ClientCancelled,
                    "client_disconnected",
                    Side::Client,
                );
                Step::Gone
            }
            End::Upstream(step) => {
                self.close_turns(
                    &mut turns,
                    TurnStatus::UpstreamLost,
                    "upstream_connection_lost",
                    Side::UpstreamIo,
                );
                step
            }
            End::Drained(reason) => {
                let _ = send(&live, Message::Close(None)).await;
                Step::Close(1012, reason)
            }
            End::Shutdown => {
                self.close_turns(
                    &mut turns,
                    TurnStatus::Shutdown,
                    "shutting_down",
                    Side::Internal,
                );
                Step::Close(1012, "server shutting down")
            }
        }
    }

    async fn relay_frames<St>(
        &mut self,
        stream: &mut St,
        live: &Live,
        events: &mut mpsc::Receiver<UpFrame>,
        account: &AccountConfig,
        turns: &mut VecDeque<Turn>,
    ) -> End
    where
        St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let (drain, shutdown) = (self.p.drain.clone(), self.p.shutdown.clone());
        // An idle socket of a draining account notices it within this long.
        let mut drain_check = tokio::time::interval(std::time::Duration::from_millis(250));
        let drained = |s: &Self, turns: &VecDeque<Turn>| {
            if !turns.is_empty() {
                None
            } else if drain.is_cancelled() {
                Some("server shutting down")
            } else {
                s.p.scheduler
                    .registry
                    .draining(&account.id)
                    .then_some("account draining")
            }
        };
        let mut drain_seen = false;
        loop {
            if self.out.busy() && self.out.drain().await.is_err() {
                return End::Client;
            }
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Close(frame))) => {
                        let _ = send(live, Message::Close(frame)).await;
                        return End::Client;
                    }
                    Some(Ok(Message::Text(t))) if drain.is_cancelled() => {
                        // OP-2: not forwarded; the socket closes once no turn runs.
                        self.refuse_draining(t.as_str());
                        if let Some(reason) = drained(self, turns) {
                            return End::Drained(reason);
                        }
                    }
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        if let Message::Text(t) = &m {
                            self.client_frame(account, t.as_str(), turns);
                        }
                        if send(live, m).await.is_err() {
                            return End::Upstream(Step::Close(1011, "passthrough upstream write failed"));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return End::Client,
                },
                f = events.recv() => match f {
                    Some(UpFrame::Event(text)) => {
                        self.upstream_frame(text, turns);
                        if let Some(reason) = drained(self, turns) {
                            // After the running turn's terminal (TM-3, OP-2): flushed, closed.
                            let _ = self.out.drain().await;
                            return End::Drained(reason);
                        }
                    }
                    Some(UpFrame::Ended(end)) => return End::Upstream(close_for(&end)),
                    None => return End::Upstream(Step::Close(1011, "passthrough upstream ended")),
                },
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = drain.cancelled(), if !drain_seen => {
                    drain_seen = true;
                    if let Some(reason) = drained(self, turns) {
                        return End::Drained(reason);
                    }
                }
                _ = drain_check.tick() => {
                    if let Some(reason) = drained(self, turns) {
                        return End::Drained(reason);
                    }
                }
            }
        }
    }

    /// A client text frame: a `response.create` opens a turn for the records.
    fn client_frame(&mut self, account: &AccountConfig, text: &str, turns: &mut VecDeque<Turn>) {
        let kind = peek::event_type(text);
        if kind.as_deref().is_some_and(|k| k != "response.create") {
            return;
        }
        self.turns += 1;
        let read = Read::now(self.turns);
        if let Some(mut t) = self.passthrough_turn(account, text, read) {
            t.attempts = 1;
            turns.push_back(t);
        }
    }

    /// An upstream event: forwarded as it is; it counts toward the oldest open turn.
    fn upstream_frame(&mut self, text: Utf8Bytes, turns: &mut VecDeque<Turn>) {
        let kind = peek::event_type(text.as_str()).unwrap_or_default();
        let class = peek::classify(&kind);
        let outcome = class
            .is_terminal()
            .then(|| terminal_outcome(class, text.as_str()));
        if let Some(t) = turns.front_mut() {
            t.on_event(class, &kind, text.as_str());
        }
        self.out.push(Message::Text(text));
        let Some(o) = outcome else {
            return;
        };
        if let Some(mut t) = turns.pop_front() {
            let side = (class != EventClass::Done).then_some(Side::UpstreamProtocol);
            self.record_turn(
                &mut t,
                Ending {
                    status: o.status,
                    response_id: o.response_id,
                    usage: o.usage,
                    error: o.error_class.map(|c| (c, side)),
                },
            );
        }
    }

    fn passthrough_turn(&self, account: &AccountConfig, text: &str, read: Read) -> Option<Turn> {
        let body: Map<String, Value> = serde_json::from_str(text).ok()?;
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.last_model.clone())
            .unwrap_or_default();
        let mut t = Turn::new(TurnStart {
            request_id: read.request_id,
            created_ms: read.created_ms,
            read_at: read.at,
            seq: read.seq,
            model,
            account_id: account.id.clone(),
            text: String::new(),
            body,
            chained: false,
            retry_budget: 0,
            transport: super::turn::Transport::Passthrough,
            ticket: None,
            bound: false,
            parent: self.span.clone(),
        });
        t.mark_written(text.len());
        Some(t)
    }

    fn close_turns(&self, turns: &mut VecDeque<Turn>, status: TurnStatus, class: &str, side: Side) {
        for mut t in turns.drain(..) {
            self.record_turn(&mut t, Ending::quiet(status, class, side));
        }
    }
}

async fn send(live: &Live, m: Message) -> Result<(), tungstenite::Error> {
    live.sink.lock().await.send(m).await
}

/// The client's close for an upstream that ended: its own code when it sent one.
fn close_for(end: &UpEnd) -> Step {
    match end {
        UpEnd::Closed {
            code: Some(code), ..
        } => Step::Close(*code, "upstream closed"),
        UpEnd::TooBig => Step::Close(1009, "upstream message too big"),
        _ => Step::Close(1011, "passthrough upstream lost"),
    }
}
