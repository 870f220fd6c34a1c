//! US-3's estimates: a token is taken as four UTF-8 bytes, rounded up. Output is counted from
//! the `delta` strings of streamed `*.delta` events, read off the raw bytes without parsing the
//! event (DESIGN.md: no full parse of streamed events).

use std::sync::OnceLock;

use memchr::memmem;

/// Tokens for `bytes` of text: ceil(bytes / 4).
pub fn tokens_for(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// UTF-8 bytes of the `delta` string of a `*.delta` event, 0 when it has none.
///
/// The key is found as `,"delta":"` or `{"delta":"`: inside a JSON string a quote is escaped,
/// so those byte sequences only occur as structure. The string is then measured with its
/// escapes decoded. Events written some other way (spaces around the colon) take a parse.
pub fn delta_bytes(event: &str) -> u64 {
    static KEY: OnceLock<memmem::Finder<'static>> = OnceLock::new();
    let key = KEY.get_or_init(|| memmem::Finder::new(b",\"delta\":\""));
    let at = key
        .find(event.as_bytes())
        .map(|i| i + 10)
        .or_else(|| event.strip_prefix("{\"delta\":\"").map(|_| 10));
    match at {
        Some(start) => decoded_len(&event.as_bytes()[start..]).unwrap_or(0),
        None => parsed_delta_bytes(event),
    }
}

/// The decoded UTF-8 length of a JSON string body up to its closing quote; `None` when the
/// string is cut short or holds a bad escape.
fn decoded_len(body: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    let mut i = 0;
    while i < body.len() {
        // Plain bytes up to the next quote or escape count as themselves.
        let run = memchr::memchr2(b'"', b'\\', &body[i..])?;
        n += run as u64;
        i += run;
        match body[i] {
            b'"' => return Some(n),
            b'\\' => {
                let esc = *body.get(i + 1)?;
                if esc == b'u' {
                    let (bytes, used) = unicode_escape(&body[i..])?;
                    n += bytes;
                    i += used;
                    continue;
                }
                n += 1;
                i += 2;
            }
            _ => {
                n += 1;
                i += 1;
            }
        }
    }
    None
}

/// A `\u` escape of four hex digits (or a surrogate pair of two) at the start of `s`: the UTF-8 length of
/// what it stands for, and how many bytes of `s` it took.
fn unicode_escape(s: &[u8]) -> Option<(u64, usize)> {
    let unit = hex4(s.get(2..6)?)?;
    if (0xD800..0xDC00).contains(&unit) {
        let low = s.get(6..8).filter(|p| p == b"\\u").and(s.get(8..12));
        if low
            .and_then(hex4)
            .is_some_and(|l| (0xDC00..0xE000).contains(&l))
        {
            return Some((4, 12));
        }
        // A lone surrogate decodes to U+FFFD.
        return Some((3, 6));
    }
    let bytes = match unit {
        0..=0x7F => 1,
        0x80..=0x7FF => 2,
        _ => 3,
    };
    Some((bytes, 6))
}

fn hex4(h: &[u8]) -> Option<u32> {
    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
}

fn parsed_delta_bytes(event: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct DeltaOnly<'a> {
        #[serde(borrow)]
        delta: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<DeltaOnly>(event)
        .ok()
        .and_then(|d| d.delta)
        .map_or(0, |d| d.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn true_len(event: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(event).unwrap();
        v["delta"].as_str().map_or(0, |d| d.len() as u64)
    }

    #[test]
    fn us3_tokens_round_up() {
        assert_eq!(
            [0, 1, 4, 5, 8].map(tokens_for),
            [0, 1, 1, 2, 2],
            "ceil(bytes / 4)"
        );
    }

    #[test]
    fn us3_delta_bytes_match_a_full_parse() {
        let texts = [
            "Hello",
            "",
            "line\nbreak \"quoted\" back\\slash",
            "caf\u{e9} \u{4e16}\u{754c} \u{1F600}",
            "tab\tand \u{7} bell",
            "key \",\"delta\":\" inside",
        ];
        for text in texts {
            // serde_json escapes non-ASCII as UTF-8 bytes; the API may also write \u escapes.
            let event = json!({"type": "response.output_text.delta", "sequence_number": 4,
                "item_id": "msg_1", "delta": text, "obfuscation": "x"})
            .to_string();
            assert_eq!(delta_bytes(&event), true_len(&event), "{event}");
            let ascii = event
                .chars()
                .map(|c| {
                    if c.is_ascii() {
                        c.to_string()
                    } else {
                        let mut buf = [0u16; 2];
                        c.encode_utf16(&mut buf)
                            .iter()
                            .map(|u| format!("\\u{u:04x}"))
                            .collect()
                    }
                })
                .collect::<String>();
            assert_eq!(delta_bytes(&ascii), true_len(&ascii), "{ascii}");
        }
    }

    #[test]
    fn us3_events_without_a_delta_count_nothing() {
        assert_eq!(delta_bytes(r#"{"type":"response.created"}"#), 0);
        assert_eq!(
            delta_bytes(r#"{"type":"x.delta","delta":"ab"#),
            0,
            "cut short"
        );
        assert_eq!(delta_bytes(r#"{ "type": "x.delta", "delta" : "abc" }"#), 3);
        assert_eq!(delta_bytes(r#"{"delta":"abcd","type":"x.delta"}"#), 4);
    }
}
