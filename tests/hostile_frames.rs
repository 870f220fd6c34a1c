//! WS ingress against frames no well-behaved client sends, written byte by byte with a raw
//! socket: RFC 6455 violations get the close code the RFC names (1002 protocol error, 1007 bad
//! UTF-8, 1009 too big) with a reason, fragments and interleaved control frames are served, and
//! nothing leaves a session behind or stops the relay serving the next client.

mod common;

use common::raw_ws::{Out, RawWs, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use common::*;

/// The relay for these tests: a 4 KiB message limit so "too big" is cheap to reach.
async fn hostile_relay() -> Env {
    relay("limits:\n  max_client_message_bytes: 4096\n").await
}

fn create_bytes(text: &str) -> Vec<u8> {
    create("gpt-test", text).to_string().into_bytes()
}

/// Sends `frames` on a fresh raw socket and returns the close code the relay answered with
/// (`None`: the connection ended without a Close frame).
async fn answer(env: &Env, frames: &[Out<'_>]) -> Option<u16> {
    let mut raw = RawWs::connect(env.relay.addr, KEY).await;
    for f in frames {
        raw.send(f).await;
    }
    raw.read_until_close().await.1
}

/// No session outlives its socket, and a well-behaved client is still served.
async fn still_serving(env: &Env) {
    let app = env.relay.app.clone();
    eventually(move || app.sessions.is_empty()).await;
    let mut ws = env.connect().await;
    assert!(completed(&turn(&mut ws, "still here").await));
}

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Out<'_> {
    Out {
        fin,
        ..Out::new(opcode, payload)
    }
}

/// RFC 6455 §5.2, §5.5, §5.3: each violation closes the socket with 1002 and a reason; the relay
/// goes on serving.
#[tokio::test]
async fn protocol_violations_close_1002() {
    let env = hostile_relay().await;
    let body = create_bytes("x");
    let big_ping = vec![b'p'; 126];
    let cases: Vec<(&str, Vec<Out<'_>>)> = vec![
        (
            "unmasked client frame",
            vec![Out {
                masked: false,
                ..Out::new(OP_TEXT, &body)
            }],
        ),
        (
            "control frame over 125 bytes",
            vec![Out::new(OP_PING, &big_ping)],
        ),
        (
            "fragmented control frame",
            vec![frame(false, OP_PING, b"p")],
        ),
        ("reserved data opcode 0x3", vec![Out::new(0x3, b"{}")]),
        ("reserved control opcode 0xB", vec![Out::new(0xb, b"")]),
        (
            "RSV1 without an extension",
            vec![Out {
                rsv: 0x40,
                ..Out::new(OP_TEXT, &body)
            }],
        ),
        (
            "RSV3",
            vec![Out {
                rsv: 0x10,
                ..Out::new(OP_TEXT, &body)
            }],
        ),
        (
            "continuation without a start",
            vec![frame(true, OP_CONT, b"{}")],
        ),
        (
            "a new message inside a fragmented one",
            vec![frame(false, OP_TEXT, b"{\"ty"), Out::new(OP_TEXT, b"{}")],
        ),
    ];
    for (what, frames) in &cases {
        assert_eq!(answer(&env, frames).await, Some(1002), "{what}");
        still_serving(&env).await;
    }
}

/// WS-4: invalid UTF-8 is 1007 also when it is split across fragments; WS-6: a message over
/// `limits.max_client_message_bytes` is 1009 also when no single fragment is.
#[tokio::test]
async fn bad_utf8_across_fragments_is_1007_and_a_fragmented_oversized_message_is_1009() {
    let env = hostile_relay().await;
    // 0xE2 0x82 0xAC is "€": cut after its first byte, then continued with a non-continuation.
    let utf8 = [
        frame(false, OP_TEXT, b"{\"a\":\"\xe2"),
        frame(true, OP_CONT, b"(\"}"),
    ];
    assert_eq!(answer(&env, &utf8).await, Some(1007));
    still_serving(&env).await;
    let chunk = vec![b' '; 2000];
    let big = [
        frame(false, OP_TEXT, &chunk),
        frame(false, OP_CONT, &chunk),
        frame(true, OP_CONT, &chunk),
    ];
    assert_eq!(answer(&env, &big).await, Some(1009));
    still_serving(&env).await;
}

/// RFC 6455 §5.4: a message in fragments, with pings between them, is one message; the pings are
/// answered with their payload and the request is served like any other.
#[tokio::test]
async fn fragments_with_interleaved_pings_are_one_request() {
    let env = hostile_relay().await;
    let body = create_bytes("[[mock:text 3]]");
    let (a, rest) = body.split_at(7);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut raw = RawWs::connect(env.relay.addr, KEY).await;
    raw.send(&frame(false, OP_TEXT, a)).await;
    raw.send(&Out::new(OP_PING, b"one")).await;
    raw.send(&frame(false, OP_CONT, b)).await;
    raw.send(&Out::new(OP_PING, b"two")).await;
    raw.send(&frame(true, OP_CONT, c)).await;
    let mut pongs = Vec::new();
    let mut events = Vec::new();
    while let Some(f) = raw.read_frame().await {
        match f.opcode {
            OP_PONG => pongs.push(f.payload),
            OP_TEXT | OP_BINARY => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("JSON");
                let done = is_terminal(&v);
                events.push(v);
                if done {
                    break;
                }
            }
            OP_CLOSE => panic!("closed: {:?}", f.close_code()),
            _ => {}
        }
    }
    assert_eq!(pongs, [b"one".to_vec(), b"two".to_vec()]);
    assert!(completed(&events), "{events:?}");
    // A binary message in fragments is served too (WS-4 takes UTF-8 JSON in binary frames).
    let body = create_bytes("binary");
    let (a, b) = body.split_at(10);
    raw.send(&frame(false, OP_BINARY, a)).await;
    raw.send(&frame(true, OP_CONT, b)).await;
    let (seen, code) = read_events_or_close(&mut raw).await;
    assert!(code.is_none() && completed(&seen), "{code:?} {seen:?}");
}

/// Events up to a terminal, or the close code if the socket closes first.
async fn read_events_or_close(raw: &mut RawWs) -> (Vec<serde_json::Value>, Option<u16>) {
    let mut events = Vec::new();
    while let Some(f) = raw.read_frame().await {
        match f.opcode {
            OP_CLOSE => return (events, f.close_code()),
            OP_TEXT | OP_BINARY => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("JSON");
                let done = is_terminal(&v);
                events.push(v);
                if done {
                    return (events, None);
                }
            }
            _ => {}
        }
    }
    (events, None)
}

/// A Close frame with a code no endpoint may send (RFC 6455 §7.4.1: 1005, 1006, < 1000) is a
/// protocol error; a well-formed Close is answered with the same code and ends the session.
#[tokio::test]
async fn close_frames_with_forbidden_codes_are_1002_and_a_clean_close_is_echoed() {
    let env = hostile_relay().await;
    for code in [999u16, 1005, 1006] {
        let payload = code.to_be_bytes();
        let got = answer(&env, &[Out::new(OP_CLOSE, &payload)]).await;
        assert_eq!(got, Some(1002), "close code {code}");
    }
    let payload = 1000u16.to_be_bytes();
    assert_eq!(
        answer(&env, &[Out::new(OP_CLOSE, &payload)]).await,
        Some(1000)
    );
    still_serving(&env).await;
}
