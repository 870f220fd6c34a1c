//! The client side of a session's output: frames wait in a short queue until the writer task
//! has room, so the session loop never blocks on a slow client and keeps reading it (TP-3).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::tuning;

/// A frame and the turn whose upstream event it is (0: a frame of the relay's own).
pub struct Out {
    turn: u64,
    msg: Message,
}

/// Frames on their way to the client.
pub struct Outbox {
    tx: mpsc::Sender<Out>,
    pending: VecDeque<Out>,
    /// The turn whose events must no longer reach the client (TP-5's preempted turn); the
    /// writer skips them even when they are already in its channel.
    cut: Arc<AtomicU64>,
    writer: tokio::task::JoinHandle<()>,
}

impl Outbox {
    /// Spawns the writer task over `sink`; at most `depth` frames are in flight to it.
    pub fn new<S>(sink: S, depth: usize) -> Outbox
    where
        S: Sink<Message> + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let cut = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_loop(sink, rx, cut.clone()));
        Outbox {
            tx,
            pending: VecDeque::new(),
            cut,
            writer,
        }
    }

    /// Queues a frame of the relay's own.
    pub fn push(&mut self, m: Message) {
        self.push_out(Out { turn: 0, msg: m });
    }

    /// Queues an upstream event of turn `turn`.
    pub fn push_event(&mut self, turn: u64, m: Message) {
        self.push_out(Out { turn, msg: m });
    }

    /// Drops every frame of `turn` not yet written, wherever it waits.
    pub fn discard_turn(&mut self, turn: u64) {
        self.cut.store(turn, Ordering::Relaxed);
        self.pending.retain(|o| o.turn != turn);
    }

    /// Queues a frame; straight into the writer's channel when nothing waits before it and
    /// there is room (the common case, one step per event).
    fn push_out(&mut self, m: Out) {
        if !self.pending.is_empty() {
            self.pending.push_back(m);
            return;
        }
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => self.pending.push_back(m),
            // The writer is gone; the loop notices when it next waits for room or reads.
            Err(mpsc::error::TrySendError::Closed(m)) => self.pending.push_back(m),
        }
    }

    pub fn push_json(&mut self, v: &serde_json::Value) {
        self.push(Message::Text(v.to_string().into()));
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A sender for waiting on room in the writer's channel from a `select!`.
    pub fn sender(&self) -> mpsc::Sender<Out> {
        self.tx.clone()
    }

    /// Hands the oldest pending frame to the writer through a reserved slot.
    pub fn send_with(&mut self, permit: mpsc::OwnedPermit<Out>) {
        if let Some(m) = self.pending.pop_front() {
            permit.send(m);
        }
    }

    /// Sends what is pending and a Close frame, then waits (bounded) for the writer to finish.
    pub async fn close(mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        self.pending.push_back(Out {
            turn: 0,
            msg: Message::Close(Some(frame)),
        });
        self.finish().await;
    }

    /// Sends what is pending, then lets the writer end.
    pub async fn finish(mut self) {
        let drain = async {
            while let Some(m) = self.pending.pop_front() {
                if self.tx.send(m).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(tuning::CLIENT_CLOSE_GRACE, drain).await;
        drop(self.tx);
        if tokio::time::timeout(tuning::CLIENT_CLOSE_GRACE, &mut self.writer)
            .await
            .is_err()
        {
            self.writer.abort();
        }
    }
}

/// Writes frames as they come, flushing whenever the channel is momentarily empty (TP-2's
/// batching); ends on a write error or after a Close frame.
async fn write_loop<S>(mut sink: S, mut rx: mpsc::Receiver<Out>, cut: Arc<AtomicU64>)
where
    S: Sink<Message> + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut closing = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if out.turn == 0 || out.turn != cut.load(Ordering::Relaxed) {
                closing = matches!(out.msg, Message::Close(_));
                if sink.feed(out.msg).await.is_err() {
                    return;
                }
            }
            if !closing {
                next = rx.try_recv().ok();
            }
        }
        if sink.flush().await.is_err() || closing {
            let _ = sink.close().await;
            return;
        }
    }
}
