//! The client side of a session's output: frames wait in a short queue and the session task
//! itself writes them whenever the socket takes them, so the loop never blocks on a slow client
//! and keeps reading it (TP-3).
//!
//! Writing from the session task, rather than handing frames to a writer task, saves a task
//! wake-up per event (the relay's per-event cost is wake-ups and syscalls, not parsing:
//! BENCHMARKS.md). Everything queued since the last pass goes out with one flush (TP-2's
//! batching), and the queue's bound is where upstream reading pauses (backpressure).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{Sink, SinkExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::tuning;

type ClientSink = Pin<Box<dyn Sink<Message, Error = tungstenite::Error> + Send>>;

/// Frames on their way to the client.
pub struct Outbox {
    sink: ClientSink,
    /// Frames not yet handed to the socket, each with the turn whose upstream event it is
    /// (0: a frame of the relay's own), so a preempted turn's frames can be dropped (TP-5).
    pending: VecDeque<(u64, Message)>,
    /// Frames were handed to the sink since its last flush.
    unflushed: bool,
    /// Queued frames at which the session stops taking upstream events.
    depth: usize,
}

impl Outbox {
    /// An outbox over `sink`; upstream reading pauses while `depth` frames wait.
    pub fn new<S>(sink: S, depth: usize) -> Outbox
    where
        S: Sink<Message, Error = tungstenite::Error> + Send + 'static,
    {
        Outbox {
            sink: Box::pin(sink),
            pending: VecDeque::new(),
            unflushed: false,
            depth: depth.max(1),
        }
    }

    /// Queues a frame of the relay's own; it goes out on the session loop's next pass.
    pub fn push(&mut self, m: Message) {
        self.pending.push_back((0, m));
    }

    /// Queues an upstream event of turn `turn`.
    pub fn push_event(&mut self, turn: u64, m: Message) {
        self.pending.push_back((turn, m));
    }

    /// Drops every frame of `turn` not yet handed to the socket (TP-5: nothing of a preempted
    /// turn reaches the client after its preemption).
    pub fn discard_turn(&mut self, turn: u64) {
        self.pending.retain(|(t, _)| *t != turn);
    }

    pub fn push_json(&mut self, v: &serde_json::Value) {
        self.push(Message::Text(v.to_string().into()));
    }

    /// Whether the client is behind: upstream events wait until it catches up (TP-2).
    pub fn has_pending(&self) -> bool {
        self.pending.len() >= self.depth
    }

    /// Whether anything is queued or written but not flushed.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || self.unflushed
    }

    /// Writes and flushes what the socket takes now. Ready(Ok) once everything is flushed,
    /// Pending (the task is woken when the socket has room) while it is not, Ready(Err) when
    /// the client is gone.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tungstenite::Error>> {
        while !self.pending.is_empty() {
            ready!(self.sink.as_mut().poll_ready(cx))?;
            if let Some((_, m)) = self.pending.pop_front() {
                self.sink.as_mut().start_send(m)?;
                self.unflushed = true;
            }
        }
        if self.unflushed {
            ready!(self.sink.as_mut().poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Waits until everything queued is flushed (cancel-safe: what is not written stays queued).
    pub async fn drain(&mut self) -> Result<(), tungstenite::Error> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// Sends what is pending and a Close frame, then closes the socket (bounded).
    pub async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        self.pending.push_back((0, Message::Close(Some(frame))));
        self.finish().await;
    }

    /// Sends what is pending, then closes the socket; a client that does not take it within
    /// the grace is dropped anyway, so a dead peer cannot hold the session open.
    pub async fn finish(mut self) {
        let _ = tokio::time::timeout(tuning::CLIENT_CLOSE_GRACE, async {
            if self.drain().await.is_ok() {
                let _ = self.sink.close().await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use futures::StreamExt;

    /// A sink over a channel of one slot, standing in for a client socket.
    fn outbox(depth: usize) -> (Outbox, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel::<Message>(0);
        let sink = tx.sink_map_err(|_| tungstenite::Error::ConnectionClosed);
        (Outbox::new(sink, depth), rx)
    }

    #[tokio::test]
    async fn tp2_a_client_that_does_not_read_pauses_the_upstream_at_the_bound() {
        let (mut out, mut rx) = outbox(3);
        for i in 0..3 {
            out.push(Message::Text(format!("e{i}").into()));
        }
        assert!(out.has_pending() && out.busy());
        // The socket takes little: draining stops part way and the rest stays queued.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(out.poll_drain(&mut cx).is_pending());
        assert!(out.busy());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(m) = rx.next().await {
                got.push(m.into_text().map(|t| t.to_string()).unwrap_or_default());
            }
            got
        });
        out.drain().await.expect("drained");
        assert!(!out.busy() && !out.has_pending());
        out.finish().await;
        assert_eq!(reader.await.expect("reader"), ["e0", "e1", "e2"]);
    }

    #[tokio::test]
    async fn a_gone_client_is_an_error_not_a_hang() {
        let (mut out, rx) = outbox(4);
        drop(rx);
        out.push(Message::Text("e".into()));
        assert!(out.drain().await.is_err());
    }
}
