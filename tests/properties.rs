//! Property tests of everything that parses bytes from outside the relay: client frames, event
//! peeking, upstream SSE, the config file. Generated inputs, valid and not; the properties are
//! "never panics" plus, where there is a reference (serde, the unsplit stream), "agrees with it".
//! Case counts are proptest's default (256) unless `PROPTEST_CASES` says otherwise.

use proptest::prelude::*;
use serde_json::{Map, Value};
use switchyard::protocol::client::{self, ClientFrame};
use switchyard::protocol::peek;
use switchyard::upstream::sse::{SseEvent, SseParser};

/// Any JSON value, nested a few levels, with strings that need escaping.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object with `type` set to `kind` at a random place among other fields.
fn object_with_type(
    kind: impl Strategy<Value = String>,
) -> impl Strategy<Value = (String, String)> {
    (
        kind,
        prop::collection::vec((any::<String>(), json_value()), 0..6),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(kind, fields, at)| {
            let mut fields: Vec<(String, Value)> =
                fields.into_iter().filter(|(k, _)| k != "type").collect();
            let i = at.index(fields.len() + 1);
            fields.insert(i, ("type".into(), Value::String(kind.clone())));
            let mut text = String::from("{");
            for (n, (k, v)) in fields.iter().enumerate() {
                if n > 0 {
                    text.push(',');
                }
                text.push_str(&serde_json::to_string(k).unwrap());
                text.push(':');
                text.push_str(&v.to_string());
            }
            text.push('}');
            (text, kind)
        })
}

proptest! {
    /// The event peek reads the same `type` serde does, wherever it is and however it is
    /// escaped; and it never panics on anything.
    #[test]
    fn peek_agrees_with_serde((text, kind) in object_with_type(any::<String>())) {
        let got = peek::event_type(&text).map(|k| k.into_owned());
        prop_assert_eq!(got, Some(kind));
    }

    #[test]
    fn peek_never_panics(text in any::<String>()) {
        let _ = peek::event_type(&text);
        let kind = peek::event_type(&text).unwrap_or_default();
        let _ = peek::classify(&kind);
    }

    /// A client frame is answered, never a panic: a JSON object is a request or an error, and a
    /// request keeps the client's bytes as they came (the relay forwards them unchanged).
    #[test]
    fn client_frames_parse_or_are_refused(text in any::<String>()) {
        let _ = client::parse(&text);
    }

    #[test]
    fn client_requests_keep_their_bytes(
        (text, _) in object_with_type(prop_oneof![
            Just("response.create".to_string()),
            Just("response.processed".to_string()),
            any::<String>(),
        ])
    ) {
        match client::parse(&text) {
            Ok(ClientFrame::Create(req)) => prop_assert_eq!(req.raw, text),
            Ok(ClientFrame::Ignore) | Err(_) => {}
        }
    }

    /// SSE: however the body is cut into chunks (at any byte, inside CRLF pairs and UTF-8
    /// sequences included), the parser dispatches the events the unsplit body gives, and those
    /// are the events that were written.
    #[test]
    fn sse_events_do_not_depend_on_chunking(
        events in prop::collection::vec(sse_event(), 0..6),
        ending in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let body = sse_body(&events, ending);
        let whole = parse_sse(&[body.as_bytes()]);
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        at.sort_unstable();
        let mut chunks = Vec::new();
        let mut from = 0;
        for to in at {
            chunks.push(&body.as_bytes()[from..to]);
            from = to;
        }
        chunks.push(&body.as_bytes()[from..]);
        prop_assert_eq!(&parse_sse(&chunks), &whole);
        let expected: Vec<(Option<String>, String)> = events
            .iter()
            .map(|(name, lines)| (name.clone(), lines.join("\n")))
            .collect();
        prop_assert_eq!(whole, expected);
    }

    /// Arbitrary bytes never make the SSE parser panic, and its size bound holds.
    #[test]
    fn sse_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
        let mut p = SseParser::new(256);
        for c in &chunks {
            p.push(c);
            while let Ok(Some(e)) = p.next_event() {
                prop_assert!(e.data.len() <= 256);
            }
        }
        let _ = p.finish();
    }

    /// The config loader reports errors for any text and never panics, and every error it
    /// reports can be printed.
    #[test]
    fn config_never_panics(text in any::<String>()) {
        if let Err(errors) = switchyard::config::Config::from_yaml_str_with_env(&text, &|_| None) {
            for e in errors.iter() {
                let _ = e.to_string();
            }
        }
    }

    /// Config-shaped YAML: known sections with values of every kind.
    #[test]
    fn config_shaped_yaml_never_panics(doc in config_doc()) {
        let text = yaml_text(&doc);
        if let Err(errors) = switchyard::config::Config::from_yaml_str_with_env(&text, &|_| Some("x".into())) {
            prop_assert!(!errors.is_empty());
        }
    }
}

/// An SSE event: an optional name and one or more data lines (no line ends inside).
fn sse_event() -> impl Strategy<Value = (Option<String>, Vec<String>)> {
    let line = "[^\r\n]{0,12}";
    (
        prop::option::of("[a-z.]{1,12}"),
        prop::collection::vec(line, 1..4),
    )
}

fn sse_body(events: &[(Option<String>, Vec<String>)], end: &str) -> String {
    let mut body = String::new();
    for (name, lines) in events {
        if let Some(n) = name {
            body.push_str(&format!("event: {n}{end}"));
        }
        for l in lines {
            body.push_str(&format!("data: {l}{end}"));
        }
        body.push_str(end);
    }
    body
}

fn parse_sse(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
    let mut p = SseParser::new(1 << 20);
    let mut out = Vec::new();
    let mut take = |e: SseEvent| out.push((e.name().map(str::to_string), e.data.to_string()));
    for c in chunks {
        p.push(c);
        while let Some(e) = p.next_event().expect("under the bound") {
            take(e);
        }
    }
    if let Some(e) = p.finish().expect("under the bound") {
        take(e);
    }
    out
}

/// A YAML document with the config's sections and keys, each set to a random JSON value.
fn config_doc() -> impl Strategy<Value = Map<String, Value>> {
    let sections = [
        "listen",
        "server",
        "admin",
        "ingress",
        "keys",
        "accounts",
        "upstream",
        "limits",
        "session",
        "store",
        "usage",
        "scheduler",
        "state",
        "shutdown",
        "log",
    ];
    prop::collection::vec(
        (prop::sample::select(sections.to_vec()), json_value()),
        0..6,
    )
    .prop_map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// JSON is YAML: the document as its JSON text.
fn yaml_text(doc: &Map<String, Value>) -> String {
    Value::Object(doc.clone()).to_string()
}
