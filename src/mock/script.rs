//! Per-request scripting of the mock: directives written into the input text as
//! `[[mock:VERB ARGS]]`, and faults, which can also be queued through the control API.
//!
//! Directives live in the request text because that is the one channel every client (Codex
//! included) carries unchanged. A replayed transcript repeats the text, so faults that must fire
//! once take `once=NAME`: the first request carrying that name fires it, later ones do not.

use std::time::Duration;

/// What the last user message asks the mock to answer with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directives {
    /// `[[mock:tool NAME ARGS_JSON]]`: answer with a `function_call`.
    pub tool: Option<(String, String)>,
    /// `[[mock:reason]]`: put a reasoning item with `encrypted_content` before the answer.
    pub reason: bool,
    /// `[[mock:text N]]`: answer with N words of text.
    pub words: Option<usize>,
    /// `[[mock:delta BYTES]]`: text deltas of about this many bytes (default 12).
    pub delta_bytes: Option<usize>,
    /// `[[mock:fixture NAME]]`: replay `proto-fixtures/NAME.jsonl` (ids rewritten).
    pub fixture: Option<String>,
    /// `[[mock:fault ...]]`: a fault for this request.
    pub fault: Option<Fault>,
}

/// A scripted misbehaviour of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Events of the response sent before the fault acts (0 = before any event).
    pub after: usize,
    /// Fire only for the first request carrying this name.
    pub once: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// Send a Close frame with this code and drop the connection.
    Close(u16),
    /// Drop the TCP connection without a Close frame.
    Eof,
    /// Stop sending and keep the connection open.
    Stall,
    /// Stop reading the socket (so no pong answers a ping and no further request is read) and
    /// stop sending, keeping the connection open until `close_all` or the mock is dropped.
    /// Over HTTP it acts as `stall`.
    Deaf,
    /// Wait this long before each event.
    Slow(Duration),
    /// Send an `error` event with this status and code instead of the rest of the response.
    Error { status: u16, code: String },
    /// Forget the connection's response cache before handling the request, so chaining from
    /// the connection's last `store:false` response fails with `previous_response_not_found`
    /// (as when the upstream lost its cache behind the relay's back, CT-8).
    Forget,
    /// Send the `websocket_connection_limit_reached` error (status 400) as the age limit does,
    /// then close with 1000 (CT-9). Over HTTP it acts as that `error` event.
    Limit,
}

impl Fault {
    /// Parses `KIND [ARGS] [after=N] [once=NAME]`, e.g. `close 1012 after=3`,
    /// `error 500 server_error`, `slow 20ms`, `eof after=0 once=a`, `limit after=0`.
    pub fn parse(text: &str) -> Result<Fault, String> {
        let mut words = text.split_whitespace();
        let verb = words.next().ok_or("empty fault")?;
        let mut positional = Vec::new();
        let mut after = None;
        let mut once = None;
        for w in words {
            if let Some(v) = w.strip_prefix("after=") {
                after = Some(v.parse::<usize>().map_err(|e| format!("after: {e}"))?);
            } else if let Some(v) = w.strip_prefix("once=") {
                once = Some(v.to_string());
            } else {
                positional.push(w);
            }
        }
        let arg = |i: usize| {
            positional
                .get(i)
                .copied()
                .ok_or(format!("{verb}: missing argument"))
        };
        let kind = match verb {
            "close" => FaultKind::Close(arg(0)?.parse().map_err(|e| format!("close: {e}"))?),
            "eof" => FaultKind::Eof,
            "stall" => FaultKind::Stall,
            "deaf" => FaultKind::Deaf,
            "slow" => {
                FaultKind::Slow(humantime::parse_duration(arg(0)?).map_err(|e| e.to_string())?)
            }
            "error" => FaultKind::Error {
                status: arg(0)?.parse().map_err(|e| format!("error: {e}"))?,
                code: arg(1)?.to_string(),
            },
            "forget" => FaultKind::Forget,
            "limit" => FaultKind::Limit,
            other => return Err(format!("unknown fault {other:?}")),
        };
        // Default point of action: after the lifecycle events, i.e. before any output.
        let after = after.unwrap_or(match kind {
            FaultKind::Slow(_) | FaultKind::Forget => 0,
            _ => 2,
        });
        Ok(Fault { kind, after, once })
    }
}

/// Reads every `[[mock:...]]` directive in `text`; unknown or malformed ones are ignored
/// (the mock must not fail on ordinary prose that happens to look similar).
pub fn parse_directives(text: &str) -> Directives {
    let mut d = Directives::default();
    let mut rest = text;
    while let Some(start) = rest.find("[[mock:") {
        let body_start = start + "[[mock:".len();
        let Some(len) = rest[body_start..].find("]]") else {
            break;
        };
        apply(&mut d, rest[body_start..body_start + len].trim());
        rest = &rest[body_start + len + 2..];
    }
    d
}

fn apply(d: &mut Directives, body: &str) {
    let (verb, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    let args = args.trim();
    match verb {
        "tool" => {
            let (name, json) = args.split_once(char::is_whitespace).unwrap_or((args, "{}"));
            if !name.is_empty() {
                d.tool = Some((name.to_string(), json.trim().to_string()));
            }
        }
        "reason" => d.reason = true,
        "text" => d.words = args.parse().ok(),
        "delta" => d.delta_bytes = args.parse().ok().filter(|n| *n > 0),
        "fixture" => d.fixture = Some(args.to_string()),
        "fault" => d.fault = Fault::parse(args).ok(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tool_with_json_args() {
        let d = parse_directives(r#"please [[mock:tool exec_command {"cmd":"echo hi"}]] now"#);
        assert_eq!(
            d.tool,
            Some(("exec_command".into(), r#"{"cmd":"echo hi"}"#.into()))
        );
    }

    #[test]
    fn parses_several_directives() {
        let d = parse_directives(
            "[[mock:reason]] [[mock:text 7]] [[mock:fault close 1012 after=3 once=x]]",
        );
        assert!(d.reason);
        assert_eq!(d.words, Some(7));
        let f = d.fault.expect("fault");
        assert_eq!(f.kind, FaultKind::Close(1012));
        assert_eq!(f.after, 3);
        assert_eq!(f.once.as_deref(), Some("x"));
    }

    #[test]
    fn fault_defaults_act_before_output() {
        assert_eq!(Fault::parse("eof").map(|f| f.after), Ok(2));
        assert_eq!(Fault::parse("slow 5ms").map(|f| f.after), Ok(0));
        assert_eq!(
            Fault::parse("error 429 rate_limit_exceeded").map(|f| f.kind),
            Ok(FaultKind::Error {
                status: 429,
                code: "rate_limit_exceeded".into()
            })
        );
    }

    #[test]
    fn limit_parses_with_its_point_of_action() {
        assert_eq!(
            Fault::parse("limit after=0 once=l"),
            Ok(Fault {
                kind: FaultKind::Limit,
                after: 0,
                once: Some("l".into())
            })
        );
        assert_eq!(Fault::parse("limit").map(|f| f.after), Ok(2));
        let d = parse_directives("[[mock:fault limit after=4]]");
        assert_eq!(
            d.fault.map(|f| (f.kind, f.after)),
            Some((FaultKind::Limit, 4))
        );
    }

    #[test]
    fn deaf_parses_with_its_point_of_action() {
        assert_eq!(
            Fault::parse("deaf after=4"),
            Ok(Fault {
                kind: FaultKind::Deaf,
                after: 4,
                once: None
            })
        );
        assert_eq!(Fault::parse("deaf").map(|f| f.after), Ok(2));
        let d = parse_directives("[[mock:fault deaf after=0 once=d1]]");
        assert_eq!(
            d.fault.map(|f| (f.kind, f.once)),
            Some((FaultKind::Deaf, Some("d1".into())))
        );
    }

    #[test]
    fn malformed_directives_are_ignored() {
        assert_eq!(
            parse_directives("[[mock:fault explode]] [[mock:text x]] [[mock:"),
            Directives::default()
        );
    }
}
