//! State shared by all connections of one mock upstream: stored responses per account, the
//! fault queues, and the log of what the mock saw (the tests' window into the upstream side).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::script::Fault;
use super::MockOptions;

/// A response the mock can chain from: its account and its whole context (input + output).
#[derive(Debug)]
pub struct Stored {
    pub id: String,
    pub account: String,
    pub items: Vec<Value>,
}

/// A scripted refusal of the next WebSocket upgrade.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct HandshakeFault {
    pub status: u16,
    #[serde(default)]
    pub retry_after: Option<String>,
}

/// One request as the mock received it.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    /// WebSocket connection number, or 0 for HTTP.
    pub conn: u64,
    pub account: String,
    pub body: Value,
    /// An HTTP request's headers (`Authorization` left out, as for upgrades); empty for a
    /// request on a WebSocket, whose headers are its upgrade's.
    pub headers: HashMap<String, String>,
}

/// How the stream of one response ended, as the mock saw it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamEnd {
    pub conn: u64,
    pub response_id: String,
    /// Events written before the end.
    pub sent: usize,
    /// Events the plan had.
    pub planned: usize,
    /// `completed`, `client_closed`, `fault` (a scripted fault, `deaf` and `close_all`
    /// included), `error`.
    pub end: String,
}

/// One accepted WebSocket upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct SeenUpgrade {
    pub conn: u64,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// Everything observable from outside the mock.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MockLog {
    pub upgrades: Vec<SeenUpgrade>,
    pub refused_upgrades: u64,
    /// `POST`s refused by an outage (`set_outage`).
    pub refused_posts: u64,
    pub http_requests: u64,
    pub requests: Vec<SeenRequest>,
    pub stream_ends: Vec<StreamEnd>,
    /// Connections whose client went away (Close frame, EOF or error), by number.
    pub client_closes: Vec<u64>,
    /// Close frames the clients sent: connection number and close code (None: no code), in
    /// the order they arrived. A client that just drops its socket leaves none (TP-4 tests
    /// tell a polite close from an abort by it).
    pub client_close_frames: Vec<(u64, Option<u16>)>,
    /// WebSocket pings received, by connection number (connections that sent none are absent).
    pub pings: HashMap<u64, u64>,
    /// WebSocket connections open right now: counted from the upgrade until the connection's
    /// task has ended and dropped the socket. Not cleared by `reset`.
    pub open_connections: u64,
}

/// What a connection was told from outside (control API) or by a `deaf` fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Stop reading the socket and stop sending; keep the connection open.
    Deaf,
    /// Send a Close frame with this code and end.
    Close(u16),
}

/// The control handle of one open WebSocket connection.
#[derive(Debug, Default)]
pub struct ConnControl {
    deaf: CancellationToken,
    close: CancellationToken,
    close_code: Mutex<Option<u16>>,
}

impl ConnControl {
    /// From now on the connection reads nothing (so it answers no pings) and sends nothing.
    pub fn deafen(&self) {
        self.deaf.cancel();
    }

    /// The connection sends a Close frame with `code` and ends; the first code asked for wins.
    pub fn close(&self, code: u16) {
        self.close_code.lock().get_or_insert(code);
        self.close.cancel();
    }

    /// Cancelled once the connection is deaf (the reader parks on it).
    pub fn deaf_token(&self) -> &CancellationToken {
        &self.deaf
    }

    fn close_code(&self) -> u16 {
        self.close_code.lock().unwrap_or(1000)
    }

    /// The pending interrupt, if any; a close wins over deafness.
    pub fn check(&self) -> Option<Interrupt> {
        if self.close.is_cancelled() {
            Some(Interrupt::Close(self.close_code()))
        } else if self.deaf.is_cancelled() {
            Some(Interrupt::Deaf)
        } else {
            None
        }
    }

    /// Resolves at the first interrupt (at once if one is pending).
    pub async fn interrupted(&self) -> Interrupt {
        tokio::select! {
            biased;
            _ = self.close.cancelled() => Interrupt::Close(self.close_code()),
            _ = self.deaf.cancelled() => Interrupt::Deaf,
        }
    }

    /// Resolves with the close code once a close is asked for (deafness aside).
    pub async fn closed(&self) -> u16 {
        self.close.cancelled().await;
        self.close_code()
    }
}

/// Keeps a connection in the registry of open connections; dropping it (when the connection
/// task ends, or when an upgrade never completes) removes it.
pub struct ConnGuard {
    state: Arc<MockState>,
    id: u64,
    pub control: Arc<ConnControl>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state.conns.lock().remove(&self.id);
    }
}

pub struct MockState {
    pub opts: MockOptions,
    stored: Mutex<HashMap<String, Arc<Stored>>>,
    reasoning_parents: Mutex<HashMap<String, String>>,
    fired: super::FiredFaults,
    faults: Mutex<VecDeque<Fault>>,
    handshakes: Mutex<VecDeque<HandshakeFault>>,
    /// While set, every upgrade and every `POST` is refused with it (an account outage).
    outage: Mutex<Option<HandshakeFault>>,
    /// Requests failed at random, per thousand, with a 500 `server_error` before any output.
    fail_per_mille: AtomicU64,
    /// The random source of `fail_per_mille` (xorshift, seeded: runs repeat).
    rng: Mutex<u64>,
    log: Mutex<MockLog>,
    next_conn: AtomicU64,
    /// Bumped by "forget": connections compare it with theirs and drop their cache.
    pub forget_epoch: AtomicU64,
    /// Open WebSocket connections and their control handles.
    conns: Mutex<HashMap<u64, Arc<ConnControl>>>,
    /// Cancelled when the `MockUpstream` is dropped: deaf connections end then.
    pub shutdown: CancellationToken,
}

impl MockState {
    pub fn new(opts: MockOptions) -> Self {
        MockState {
            fired: opts.fired.clone(),
            opts,
            stored: Mutex::default(),
            reasoning_parents: Mutex::default(),
            faults: Mutex::default(),
            handshakes: Mutex::default(),
            outage: Mutex::default(),
            fail_per_mille: AtomicU64::new(0),
            rng: Mutex::new(0x9E37_79B9_7F4A_7C15),
            log: Mutex::default(),
            next_conn: AtomicU64::new(1),
            forget_epoch: AtomicU64::new(0),
            conns: Mutex::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The mock account of an API key, or `None` when the key is not accepted.
    pub fn account_for(&self, key: &str) -> Option<String> {
        if key.is_empty() {
            return None;
        }
        if self.opts.api_keys.is_empty() || self.opts.api_keys.iter().any(|k| k == key) {
            // The account name is a digest prefix: keys never appear in the log.
            Some(format!(
                "acct_{}",
                &super::engine::seal(key, "account")[5..17]
            ))
        } else {
            None
        }
    }

    pub fn stored(&self, id: &str) -> Option<Arc<Stored>> {
        self.stored.lock().get(id).cloned()
    }

    pub fn store(&self, s: Arc<Stored>) {
        self.stored.lock().insert(s.id.clone(), s);
    }

    pub fn reasoning_parent(&self, call_item_id: &str) -> Option<String> {
        self.reasoning_parents.lock().get(call_item_id).cloned()
    }

    pub fn set_reasoning_parent(&self, call_item_id: &str, reasoning_id: &str) {
        self.reasoning_parents
            .lock()
            .insert(call_item_id.into(), reasoning_id.into());
    }

    /// The fault for a request: a queued one first, else the request's own directive unless
    /// it is `once=` and already fired.
    pub fn take_fault(&self, directive: Option<&Fault>) -> Option<Fault> {
        if let Some(f) = self.faults.lock().pop_front() {
            return Some(f);
        }
        if self.random_failure() {
            return Some(Fault {
                kind: super::script::FaultKind::Error {
                    status: 500,
                    code: "server_error".into(),
                },
                after: 2,
                once: None,
            });
        }
        let f = directive?;
        match &f.once {
            Some(name) if !self.fired.lock().insert(name.clone()) => None,
            _ => Some(f.clone()),
        }
    }

    pub fn push_fault(&self, f: Fault) {
        self.faults.lock().push_back(f);
    }

    pub fn push_handshake(&self, f: HandshakeFault) {
        self.handshakes.lock().push_back(f);
    }

    /// The refusal for an upgrade: a queued one first, else the outage's.
    pub fn take_handshake(&self) -> Option<HandshakeFault> {
        let queued = self.handshakes.lock().pop_front();
        queued.or_else(|| self.outage())
    }

    /// Starts (`Some`) or ends (`None`) an outage: while it lasts every upgrade and every
    /// `POST` is refused with its status (open connections are left alone; `close_all` ends
    /// them).
    pub fn set_outage(&self, f: Option<HandshakeFault>) {
        *self.outage.lock() = f;
    }

    pub fn outage(&self) -> Option<HandshakeFault> {
        self.outage.lock().clone()
    }

    /// Fails this share of requests (per thousand) with a 500 `server_error` error event before
    /// any output.
    pub fn set_fail_rate(&self, per_mille: u64) {
        self.fail_per_mille
            .store(per_mille.min(1000), Ordering::Relaxed);
    }

    fn random_failure(&self) -> bool {
        let rate = self.fail_per_mille.load(Ordering::Relaxed);
        if rate == 0 {
            return false;
        }
        let mut x = self.rng.lock();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x % 1000 < rate
    }

    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn with_log<R>(&self, f: impl FnOnce(&mut MockLog) -> R) -> R {
        f(&mut self.log.lock())
    }

    pub fn snapshot(&self) -> MockLog {
        let mut log = self.log.lock().clone();
        log.open_connections = self.conns.lock().len() as u64;
        log
    }

    /// Registers an accepted upgrade as an open connection until the guard is dropped.
    pub fn register_conn(self: &Arc<Self>, id: u64) -> ConnGuard {
        let control = Arc::new(ConnControl::default());
        self.conns.lock().insert(id, control.clone());
        ConnGuard {
            state: self.clone(),
            id,
            control,
        }
    }

    fn open_controls(&self) -> Vec<Arc<ConnControl>> {
        self.conns.lock().values().cloned().collect()
    }

    /// Every open WebSocket connection goes deaf (see `FaultKind::Deaf`); returns how many.
    pub fn deafen_all(&self) -> usize {
        let controls = self.open_controls();
        controls.iter().for_each(|c| c.deafen());
        controls.len()
    }

    /// Every open WebSocket connection sends a Close frame with `code` and ends, idle or in a
    /// response, deaf or not; returns how many.
    pub fn close_all(&self, code: u16) -> usize {
        let controls = self.open_controls();
        controls.iter().for_each(|c| c.close(code));
        controls.len()
    }

    /// Counts a WebSocket ping received on connection `conn`.
    pub fn count_ping(&self, conn: u64) {
        *self.log.lock().pings.entry(conn).or_insert(0) += 1;
    }

    /// Clears queues, storage and the log (between scenarios on a long-running mock), giving
    /// their memory back: a map emptied with `clear` would keep its largest size.
    pub fn reset(&self) {
        *self.stored.lock() = HashMap::new();
        *self.reasoning_parents.lock() = HashMap::new();
        *self.fired.lock() = Default::default();
        *self.faults.lock() = VecDeque::new();
        *self.handshakes.lock() = VecDeque::new();
        *self.outage.lock() = None;
        self.fail_per_mille.store(0, Ordering::Relaxed);
        *self.log.lock() = MockLog::default();
        self.forget_epoch.fetch_add(1, Ordering::Relaxed);
    }
}
