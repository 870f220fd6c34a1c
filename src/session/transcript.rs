//! The session's transcript (SPEC §6): every input and output item of the conversation so far,
//! each output item tagged with the account that produced it, so any turn can be replayed in
//! full on a context that does not hold the last response (CT-2). Bounded per session and in
//! total, least recently used first (CT-6).

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;
use serde_json::{Map, Value};

/// One item and, for model output, the account that produced it (CT-7 needs it).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub item: Value,
    pub account: Option<String>,
    /// Which response produced it (0 for input items): CT-7 works within one response.
    pub response: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    entries: Vec<Entry>,
    bytes: usize,
    responses: u64,
}

impl Transcript {
    /// The transcript after a turn that ended `completed` or `incomplete`: the prior one (when
    /// the turn chained from it), the turn's input items, then its output items.
    pub fn advance(
        prior: Option<Transcript>,
        input: &[Value],
        output: Vec<Value>,
        account: &str,
    ) -> Transcript {
        let mut t = prior.unwrap_or_default();
        for item in input {
            t.push(Entry {
                item: item.clone(),
                account: None,
                response: 0,
            });
        }
        t.responses += 1;
        let response = t.responses;
        for item in output {
            t.push(Entry {
                item,
                account: Some(account.to_string()),
                response,
            });
        }
        t
    }

    fn push(&mut self, e: Entry) {
        self.bytes += json_len(&e.item);
        self.entries.push(e);
    }

    /// Serialized size of the items, what the bounds count.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn is_encrypted_reasoning(item: &Value) -> bool {
    item.get("type").and_then(Value::as_str) == Some("reasoning")
        && item.get("encrypted_content").is_some_and(|c| !c.is_null())
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

/// A request's `input` as a list of items: a string is one user message.
pub fn input_items(body: &Map<String, Value>) -> Vec<Value> {
    match body.get("input") {
        Some(Value::String(s)) => {
            vec![serde_json::json!({"type": "message", "role": "user", "content": s})]
        }
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// The request for a full replay (CT-2) to `account`: the same fields, the transcript followed
/// by the new items as `input`, and no `previous_response_id`. CT-7: encrypted reasoning that
/// another account produced is dropped (it would not verify), and so is the `id` of the items
/// that followed it in the same response (they would point at the missing reasoning).
pub fn replay_body(
    body: &Map<String, Value>,
    transcript: &Transcript,
    new_items: &[Value],
    account: &str,
) -> String {
    let mut body = body.clone();
    body.remove("previous_response_id");
    let mut input: Vec<Value> = Vec::with_capacity(transcript.entries.len() + new_items.len());
    let mut stripped: Option<u64> = None;
    for e in &transcript.entries {
        let foreign = e.account.as_deref().is_some_and(|a| a != account);
        if foreign && is_encrypted_reasoning(&e.item) {
            stripped = Some(e.response);
            continue;
        }
        let mut item = e.item.clone();
        if foreign && stripped == Some(e.response) {
            if let Some(obj) = item.as_object_mut() {
                obj.remove("id");
            }
        }
        input.push(item);
    }
    input.extend(new_items.iter().cloned());
    body.insert("input".into(), Value::Array(input));
    Value::Object(body).to_string()
}

/// The total bound on transcripts (CT-6): when all sessions together hold more than the
/// limit, the least recently used sessions lose theirs.
pub struct TranscriptBudget {
    limit: usize,
    st: Mutex<BudgetState>,
}

#[derive(Default)]
struct BudgetState {
    used: usize,
    clock: u64,
    /// Session → (bytes, last use).
    sessions: HashMap<u64, (usize, u64)>,
    evicted: HashSet<u64>,
}

impl TranscriptBudget {
    pub fn new(limit: usize) -> Self {
        TranscriptBudget {
            limit,
            st: Mutex::default(),
        }
    }

    /// Records a session's transcript size (as just used), evicting others while over.
    pub fn set(&self, session: u64, bytes: usize) {
        let mut st = self.st.lock();
        st.clock += 1;
        let now = st.clock;
        if let Some((old, _)) = st.sessions.insert(session, (bytes, now)) {
            st.used -= old;
        }
        st.used += bytes;
        st.evicted.remove(&session);
        while st.used > self.limit {
            let victim = st
                .sessions
                .iter()
                .filter(|(s, _)| **s != session)
                .min_by_key(|(_, (_, t))| *t)
                .map(|(s, _)| *s);
            let Some(v) = victim else { break };
            if let Some((b, _)) = st.sessions.remove(&v) {
                st.used -= b;
            }
            st.evicted.insert(v);
            tracing::info!(
                session = v,
                "transcript evicted: limits.max_transcript_bytes_total reached"
            );
        }
    }

    /// Marks a session's transcript as used now (it is evicted last).
    pub fn touch(&self, session: u64) {
        let mut st = self.st.lock();
        st.clock += 1;
        let now = st.clock;
        if let Some(e) = st.sessions.get_mut(&session) {
            e.1 = now;
        }
    }

    /// Forgets a session (its transcript dropped or the session ended).
    pub fn remove(&self, session: u64) {
        let mut st = self.st.lock();
        if let Some((b, _)) = st.sessions.remove(&session) {
            st.used -= b;
        }
        st.evicted.remove(&session);
    }

    /// Whether the session's transcript was evicted since it last set it (and clears the mark).
    pub fn take_evicted(&self, session: u64) -> bool {
        self.st.lock().evicted.remove(&session)
    }

    pub fn used(&self) -> usize {
        self.st.lock().used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// CT-2: a replay carries the client's numbers exactly. Found by the `replay` fuzz target:
    /// serde_json's default float parser could land one ulp off for numbers like `6E68`.
    #[test]
    fn replayed_numbers_are_the_clients_own() {
        let text = r#"{"input":[{"a":69E6,"b":66E6,"c":6E68,"d":33E6,"e":0.1,"f":1.7976931348623157e308,"g":5e-324}]}"#;
        let Value::Object(body) = serde_json::from_str(text).unwrap() else {
            panic!("object")
        };
        let items = input_items(&body);
        let t = Transcript::advance(None, &items, Vec::new(), "a");
        let out: Value = serde_json::from_str(&replay_body(&body, &t, &items, "a")).unwrap();
        let reference: Value = serde_json::from_str(text).unwrap();
        assert_eq!(out["input"][0], reference["input"][0]);
        assert_eq!(out["input"][0]["c"].as_f64(), Some(6e68));
    }

    #[test]
    fn advance_appends_input_then_tagged_output() {
        let t1 = Transcript::advance(
            None,
            &[json!({"role": "user", "content": "a"})],
            vec![json!({"type": "message", "id": "m1"})],
            "acct1",
        );
        let t2 = Transcript::advance(
            Some(t1.clone()),
            &[json!({"type": "function_call_output", "call_id": "c"})],
            vec![],
            "acct2",
        );
        assert_eq!(t2.len(), 3);
        assert_eq!(t2.entries()[1].account.as_deref(), Some("acct1"));
        assert_eq!(t2.entries()[0].account, None);
        assert!(t2.bytes() > t1.bytes());
    }

    #[test]
    fn ct7_foreign_encrypted_reasoning_and_the_ids_after_it_are_dropped() {
        let reasoning =
            json!({"type": "reasoning", "id": "rs_1", "encrypted_content": "sealed-by-a"});
        let call = json!({"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f"});
        let t1 = Transcript::advance(
            None,
            &[json!("u1")],
            vec![reasoning.clone(), call.clone()],
            "a",
        );
        let msg = json!({"type": "message", "id": "msg_2", "role": "assistant"});
        let t = Transcript::advance(Some(t1), &[json!("u2")], vec![msg.clone()], "b");
        let body = json!({"model": "m"});
        let replay = |to: &str| -> Value {
            serde_json::from_str(&replay_body(body.as_object().unwrap(), &t, &[], to)).unwrap()
        };
        // To the account that produced it: everything as it was.
        assert_eq!(
            replay("a")["input"],
            json!(["u1", reasoning, call, "u2", {"type": "message", "id": "msg_2", "role": "assistant"}])
        );
        // To another: a's reasoning goes, so does the id of the call after it; b's own
        // message keeps its id.
        let call_without_id = json!({"type": "function_call", "call_id": "c1", "name": "f"});
        assert_eq!(
            replay("b")["input"],
            json!(["u1", call_without_id, "u2", msg])
        );
    }

    #[test]
    fn ct2_replay_drops_previous_response_id_and_puts_the_transcript_first() {
        let t = Transcript::advance(None, &[json!("u1")], vec![json!("o1")], "a");
        let body = json!({"type": "response.create", "model": "m", "previous_response_id": "resp_1", "input": ["new"], "store": false});
        let replay: Value = serde_json::from_str(&replay_body(
            body.as_object().unwrap(),
            &t,
            &[json!("new")],
            "acct1",
        ))
        .unwrap();
        assert!(replay.get("previous_response_id").is_none());
        assert_eq!(replay["input"], json!(["u1", "o1", "new"]));
        assert_eq!(
            (replay["model"].as_str(), replay["store"].as_bool()),
            (Some("m"), Some(false))
        );
    }

    #[test]
    fn input_string_is_one_user_message() {
        let body = json!({"input": "hi"});
        assert_eq!(
            input_items(body.as_object().unwrap()),
            vec![json!({"type": "message", "role": "user", "content": "hi"})]
        );
    }

    #[test]
    fn ct6_total_budget_evicts_least_recently_used_first() {
        let b = TranscriptBudget::new(100);
        b.set(1, 40);
        b.set(2, 40);
        b.touch(1);
        b.set(3, 40); // over: 2 is the least recently used
        assert!(b.take_evicted(2));
        assert!(!b.take_evicted(1));
        assert_eq!(b.used(), 80);
        b.remove(1);
        b.remove(3);
        assert_eq!(b.used(), 0);
    }
}
