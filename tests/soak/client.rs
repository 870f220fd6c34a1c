//! One soak session as a client like Codex runs it: a conversation chained by
//! `previous_response_id`, tool outputs sent after their calls, failed turns sent again, and
//! every answer checked as it arrives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::*;

/// What one turn of a soak session asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Text,
    /// A `generate: false` warm-up (CT-5), as Codex sends first.
    Warmup,
    Tool,
    /// A slow answer (`slow 2ms`).
    Slow,
    /// A fault before any output that the relay recovers from (CT-8, CT-9): close, EOF, the
    /// connection limit, a stall, a deaf connection.
    Recoverable(&'static str),
    /// A `server_error` or `rate_limit_exceeded` error event before output: moved to another
    /// account when one is eligible (SC-4), else forwarded.
    Movable(u16, &'static str),
    /// The upstream drops after output: 502 `upstream_connection_lost`.
    AfterOutput(&'static str),
    /// An error event the request itself caused: forwarded as it is.
    Refused,
    /// The connection's cache is lost on a chained turn (CT-8): retried by replay.
    Forget,
    /// A recorded stream: `failed`, `incomplete` or `error`.
    Fixture(&'static str),
    /// A long turn cut by the next request (TP-5).
    Preempt,
    /// The client leaves mid-turn (TP-4); the session ends.
    Drop,
}

const RECOVERABLE: [&str; 7] = [
    "close 1012",
    "close 1013",
    "close 1001",
    "eof",
    "limit",
    "stall",
    "deaf",
];
const AFTER_OUTPUT: [&str; 3] = ["close 1011", "eof", "stall"];
const FIXTURES: [&str; 3] = ["failed", "incomplete", "error"];

fn pick(rng: &mut StdRng) -> Action {
    match rng.random_range(0..100) {
        0..24 => Action::Text,
        24..40 => Action::Tool,
        40..43 => Action::Slow,
        43..55 => Action::Recoverable(RECOVERABLE[rng.random_range(0..RECOVERABLE.len())]),
        55..59 => Action::Movable(500, "server_error"),
        59..61 => Action::Movable(429, "rate_limit_exceeded"),
        61..66 => Action::AfterOutput(AFTER_OUTPUT[rng.random_range(0..AFTER_OUTPUT.len())]),
        66..69 => Action::Refused,
        69..77 => Action::Forget,
        77..83 => Action::Fixture(FIXTURES[rng.random_range(0..FIXTURES.len())]),
        83..95 => Action::Preempt,
        _ => Action::Drop,
    }
}

/// The directive text that scripts `action` at the mock; `once` names its fault so a replay
/// of the same text does not fire it again on the same upstream.
fn directive(action: Action, once: &str) -> String {
    match action {
        Action::Text | Action::Warmup => "[[mock:text 6]]".into(),
        Action::Tool => r#"[[mock:reason]] [[mock:tool exec_command {"cmd":"echo hi"}]]"#.into(),
        Action::Slow => "[[mock:text 12]] [[mock:fault slow 2ms]]".into(),
        Action::Recoverable(f) => format!("[[mock:text 5]] [[mock:fault {f} once={once}]]"),
        Action::Movable(status, code) => {
            format!("[[mock:text 5]] [[mock:fault error {status} {code} once={once}]]")
        }
        Action::AfterOutput(f) => {
            format!("[[mock:text 30]] [[mock:fault {f} after=8 once={once}]]")
        }
        Action::Refused => "[[mock:fault error 400 invalid_value]]".into(),
        Action::Forget => format!("[[mock:text 4]] [[mock:fault forget once={once}]]"),
        Action::Fixture(name) => format!("[[mock:fixture {name}]]"),
        Action::Preempt | Action::Drop => "[[mock:text 400]] [[mock:fault slow 3ms]]".into(),
    }
}

/// How a turn ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Completed,
    Failed,
    Incomplete,
    /// An error event: its `status` and `code`.
    Error(u16, String),
    Preempted,
    Dropped,
    /// An `error` after a preemption but before the new turn's `response.created`: the new
    /// request's refusal, or the cut turn's own end (it failed before the relay read the new
    /// request, which then runs as a turn of its own). The wire cannot tell them apart, so
    /// the session ends there (its records still count).
    Unattributed,
}

impl Outcome {
    fn of(terminal: &Value) -> Outcome {
        match terminal["type"].as_str() {
            Some("response.completed") => Outcome::Completed,
            Some("response.failed") => Outcome::Failed,
            Some("response.incomplete") => Outcome::Incomplete,
            _ => Outcome::Error(
                terminal["status"].as_u64().unwrap_or(0) as u16,
                terminal["error"]["code"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            ),
        }
    }
}

/// Whether `outcome` is a right answer to `action`. Any turn may end with a 5xx or 429 while
/// the upstream is in trouble (the monkey's outages, breakers, random failures leave the relay
/// nothing to retry on), or with the 401 of an `http` account whose credential the monkey
/// revoked when no other account is eligible (HS-5 keeps its status); another 4xx only when
/// the request asked for it.
fn expected(action: Action, outcome: &Outcome) -> bool {
    if let Outcome::Error(status, _) = outcome {
        if *status == 429 || *status == 401 || *status >= 500 {
            return true;
        }
    }
    match action {
        Action::Refused => *outcome == Outcome::Error(400, "invalid_value".into()),
        Action::Fixture("failed") => *outcome == Outcome::Failed,
        Action::Fixture("incomplete") => *outcome == Outcome::Incomplete,
        // When the monkey cut the first attempt before any output, the retry runs without the
        // fault (it fires once); a retry after output would show in `answer`'s item check.
        Action::AfterOutput(_) => *outcome == Outcome::Completed,
        // The error fixture is a server_error, a 5xx.
        Action::Fixture(_) => false,
        Action::Preempt => *outcome == Outcome::Preempted,
        Action::Text => matches!(outcome, Outcome::Completed | Outcome::Unattributed),
        Action::Drop => *outcome == Outcome::Dropped,
        _ => *outcome == Outcome::Completed,
    }
}

/// Outcomes by action, over every session.
pub type Tally = Arc<Mutex<BTreeMap<(Action, Outcome), u64>>>;

/// A session's conversation, as Codex keeps it.
struct Convo {
    prev: Option<String>,
    /// A tool call whose output the next request must carry.
    call: Option<String>,
    creates: u64,
}

impl Convo {
    /// The next request: the pending tool output, else a user message, chained from `prev`.
    fn request(&mut self, text: &str, warmup: bool) -> Value {
        let user = json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]});
        let input = match self.call.take() {
            Some(call_id) => json!([
                {"type": "function_call_output", "call_id": call_id, "output": "hi\n"}, user
            ]),
            None => json!([user]),
        };
        let mut req = json!({"type": "response.create", "model": "gpt-test", "store": false,
            "include": ["reasoning.encrypted_content"], "input": input});
        if let Some(prev) = self.prev.as_ref() {
            req["previous_response_id"] = json!(prev);
        }
        if warmup {
            req["generate"] = json!(false);
        }
        self.creates += 1;
        req
    }

    /// Moves the conversation on after a turn that sent `req` and ended with `events`.
    fn advance(&mut self, req: &Value, events: &[Value], action: Action) {
        let t = events.last().expect("a terminal");
        match Outcome::of(t) {
            Outcome::Completed | Outcome::Incomplete => {
                self.prev = t["response"]["id"].as_str().map(str::to_string);
                let output = t["response"]["output"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                self.call = output
                    .iter()
                    .find(|i| i["type"] == "function_call")
                    .and_then(|i| i["call_id"].as_str().map(str::to_string));
                if Outcome::of(t) == Outcome::Completed {
                    assert_eq!(
                        self.call.is_some(),
                        action == Action::Tool,
                        "{action:?}: {t}"
                    );
                }
            }
            // A turn that did not complete is sent again with its tool output (if any).
            _ => self.call = req["input"][0]["call_id"].as_str().map(str::to_string),
        }
    }
}

/// What every session shares: where to connect, how many turns are left to run, and the
/// outcomes seen.
#[derive(Clone)]
pub struct Shared {
    pub url: String,
    pub turns_left: Arc<AtomicI64>,
    pub max_turns: u64,
    pub tally: Tally,
}

impl Shared {
    fn take_turn(&self) -> bool {
        self.turns_left.fetch_sub(1, Ordering::Relaxed) > 0
    }

    fn count(&self, action: Action, outcome: Outcome) {
        assert!(
            expected(action, &outcome),
            "{action:?} answered with {outcome:?}"
        );
        *self.tally.lock().entry((action, outcome)).or_default() += 1;
    }

    /// Counts the answer `events` to `req`; a wrong one fails with the whole story.
    fn answered(&self, action: Action, req: &Value, events: &[Value]) {
        let t = events.last().expect("a terminal");
        let outcome = Outcome::of(t);
        assert!(
            expected(action, &outcome),
            "{action:?} answered with {t}\nrequest: previous_response_id {}, input {}\nevents {:?}",
            req["previous_response_id"],
            req["input"],
            types(events)
        );
        *self.tally.lock().entry((action, outcome)).or_default() += 1;
    }
}

/// One soak session; returns how many `response.create` it sent.
pub async fn session(shared: Shared, seed: u64, id: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ws = ws_connect_with(&shared.url, KEY, &[("session-id", &format!("soak-{id}"))])
        .await
        .expect("a soak session connects");
    let mut c = Convo {
        prev: None,
        call: None,
        creates: 0,
    };
    for k in 0..shared.max_turns {
        if !shared.take_turn() {
            break;
        }
        let mut action = pick(&mut rng);
        if k == 0 && rng.random_bool(0.3) {
            action = Action::Warmup;
        }
        if action == Action::Forget && c.prev.is_none() {
            action = Action::Text;
        }
        let once = format!("s{id}t{k}");
        let text = format!("turn {k} {}", directive(action, &once));
        let req = c.request(&text, action == Action::Warmup);
        send(&mut ws, &req).await;
        match action {
            Action::Preempt => {
                if !preempt(&shared, &mut ws, &mut c, &req, k).await {
                    return c.creates;
                }
            }
            Action::Drop => {
                let (events, cut) = until_first_delta(&mut ws).await;
                if cut {
                    shared.count(action, Outcome::Dropped);
                } else {
                    shared.answered(action, &req, &events);
                }
                return c.creates;
            }
            _ => {
                let events = answer(&mut ws).await;
                shared.answered(action, &req, &events);
                c.advance(&req, &events, action);
            }
        }
    }
    c.creates
}

/// TP-5: the running turn is cut by the next request, which gets the only terminal. Returns
/// whether the session goes on (not after an answer it cannot attribute).
async fn preempt(shared: &Shared, ws: &mut Ws, c: &mut Convo, req: &Value, k: u64) -> bool {
    let (events, cut) = until_first_delta(ws).await;
    if !cut {
        // The long turn ended before any output: the upstream was in trouble.
        shared.answered(Action::Preempt, req, &events);
        c.advance(req, &events, Action::Preempt);
        return true;
    }
    shared.count(Action::Preempt, Outcome::Preempted);
    c.call = req["input"][0]["call_id"].as_str().map(str::to_string);
    let next = c.request(&format!("after preemption {k} [[mock:text 3]]"), false);
    send(ws, &next).await;
    match read_past_preempted(ws).await {
        Some(events) => {
            shared.answered(Action::Text, &next, &events);
            c.advance(&next, &events, Action::Text);
            true
        }
        None => {
            shared.count(Action::Text, Outcome::Unattributed);
            false
        }
    }
}

/// Reads one response to its terminal; the terminal must be last and unique, and every output
/// item streamed belongs to the response the terminal closes (TP-6; after a transparent retry
/// the lifecycle events are the first attempt's, CT-9).
async fn answer(ws: &mut Ws) -> Vec<Value> {
    let events = read_turn(ws).await;
    let terminals = events.iter().filter(|e| is_terminal(e)).count();
    assert_eq!(terminals, 1, "exactly one terminal: {:?}", types(&events));
    if let Some(output) = events
        .last()
        .and_then(|t| t["response"]["output"].as_array())
    {
        let ids: std::collections::HashSet<_> =
            output.iter().filter_map(|i| i["id"].as_str()).collect();
        for e in &events {
            if let Some(id) = e["item"]["id"].as_str() {
                assert!(ids.contains(id), "an item of another response: {e}");
            }
        }
    }
    events
}

/// Reads until the first text delta (true) or a terminal (false, with the events).
async fn until_first_delta(ws: &mut Ws) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    loop {
        match next_frame(ws).await {
            Frame::Event(e) if e["type"] == "response.output_text.delta" => return (events, true),
            Frame::Event(e) => {
                let done = is_terminal(&e);
                events.push(e);
                if done {
                    return (events, false);
                }
            }
            other => panic!("socket ended: {other:?}"),
        }
    }
}

/// Reads the new turn after a preemption: events of the cut turn may still be in flight, but
/// it never gets a terminal; the new turn begins with its `response.created`. `None` for an
/// `error` before that (see [`Outcome::Unattributed`]).
async fn read_past_preempted(ws: &mut Ws) -> Option<Vec<Value>> {
    let mut events = Vec::new();
    let mut started = false;
    loop {
        let Frame::Event(e) = next_frame(ws).await else {
            panic!("socket ended after a preemption");
        };
        if !started && e["type"] == "error" {
            return None;
        }
        if e["type"] == "response.created" {
            started = true;
        }
        if !started {
            assert!(!is_terminal(&e), "the preempted turn got a terminal: {e}");
            continue;
        }
        let done = is_terminal(&e);
        events.push(e);
        if done {
            return Some(events);
        }
    }
}
