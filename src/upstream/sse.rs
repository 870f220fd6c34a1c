//! An incremental Server-Sent Events parser for the upstream HTTP transport (TM-1).
//!
//! The upstream's body arrives in chunks that split lines, events and even UTF-8 sequences
//! anywhere, so the parser keeps the unfinished line and hands out whole events. It follows the
//! WHATWG event-stream rules (`event:`/`data:` fields, multi-line `data` joined with `\n`,
//! comment lines, CR, LF and CRLF line ends, a leading BOM) with one leniency: at a clean end
//! of stream, an event missing its final blank line is still delivered ([`SseParser::finish`]),
//! because a terminal event cut only by a lost blank line is still the upstream's answer.
//!
//! Event data stays the upstream's own bytes: a single `data:` line is handed out without a
//! copy (TP-1 byte-for-byte forwarding).

use bytes::{Buf, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::Utf8Bytes;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<Bytes>,
    /// The `data:` lines joined with `\n` (invalid UTF-8 replaced, as the SSE rules say).
    pub data: Utf8Bytes,
}

impl SseEvent {
    /// The event name as text (`None` without an `event:` field or when it is not UTF-8).
    pub fn name(&self) -> Option<&str> {
        self.event
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// An event (or an unfinished line) grew past the size limit; the stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig;

/// The parser state between chunks.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes received but not yet consumed as lines.
    buf: BytesMut,
    /// How much of `buf` is known to hold no line end (so a long line is scanned once).
    scanned: usize,
    /// The last line ended with CR: an LF arriving next belongs to that line end.
    after_cr: bool,
    /// Whether the start of the stream was checked for a BOM.
    started: bool,
    event: Option<Bytes>,
    data: Vec<Bytes>,
    data_bytes: usize,
    max_event_bytes: usize,
}

impl SseParser {
    /// A parser refusing events (and lines) over `max_event_bytes` (`upstream.max_message_bytes`).
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            buf: BytesMut::new(),
            scanned: 0,
            after_cr: false,
            started: false,
            event: None,
            data: Vec::new(),
            data_bytes: 0,
            max_event_bytes,
        }
    }

    /// Appends one chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event in what was pushed so far, if any.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, TooBig> {
        while let Some(line) = self.next_line()? {
            if let Some(event) = self.take_line(line)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// At a clean end of stream: the unfinished last line counts as a line, and an event
    /// missing its closing blank line is dispatched. Call after [`Self::next_event`] gave `None`.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, TooBig> {
        if !self.buf.is_empty() && self.strip_bom() {
            let line = self.buf.split().freeze();
            self.scanned = 0;
            if let Some(event) = self.take_line(line)? {
                return Ok(Some(event));
            }
        }
        self.dispatch()
    }

    /// Cuts the next whole line (without its line end) off the buffer.
    fn next_line(&mut self) -> Result<Option<Bytes>, TooBig> {
        if self.after_cr && !self.buf.is_empty() {
            self.after_cr = false;
            if self.buf[0] == b'\n' {
                self.buf.advance(1);
            }
        }
        if !self.strip_bom() {
            return Ok(None);
        }
        let Some(pos) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]) else {
            self.scanned = self.buf.len();
            if self.data_bytes + self.buf.len() > self.max_event_bytes {
                return Err(TooBig);
            }
            return Ok(None);
        };
        let line = self.buf.split_to(self.scanned + pos).freeze();
        self.scanned = 0;
        let cr = self.buf[0] == b'\r';
        self.buf.advance(1);
        if cr {
            match self.buf.first() {
                Some(b'\n') => self.buf.advance(1),
                Some(_) => {}
                None => self.after_cr = true,
            }
        }
        Ok(Some(line))
    }

    /// Drops a BOM at the very start of the stream; false while the first bytes could still
    /// turn out to be one.
    fn strip_bom(&mut self) -> bool {
        if self.started {
            return true;
        }
        let n = self.buf.len().min(BOM.len());
        if self.buf[..n] != BOM[..n] {
            self.started = true;
        } else if n == BOM.len() {
            self.buf.advance(n);
            self.started = true;
        }
        self.started
    }

    /// Applies one line: a blank line dispatches, a field line fills the pending event.
    fn take_line(&mut self, line: Bytes) -> Result<Option<SseEvent>, TooBig> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let (name, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let skip = usize::from(line.get(i + 1) == Some(&b' '));
                (line.slice(..i), line.slice(i + 1 + skip..))
            }
            None => (line.clone(), Bytes::new()),
        };
        match &name[..] {
            b"data" => {
                self.data_bytes += value.len() + 1;
                if self.data_bytes > self.max_event_bytes {
                    return Err(TooBig);
                }
                self.data.push(value);
            }
            b"event" => self.event = Some(value),
            _ => {} // `id`, `retry` and unknown fields mean nothing to the relay
        }
        Ok(None)
    }

    /// Hands out the pending event; an event without `data` is dropped, as the rules say.
    /// Invalid UTF-8 becomes U+FFFD (three bytes for one), so the bound is checked again on
    /// the text handed out (found by the `sse` fuzz target).
    fn dispatch(&mut self) -> Result<Option<SseEvent>, TooBig> {
        let event = self.event.take();
        self.data_bytes = 0;
        let data = match self.data.len() {
            0 => return Ok(None),
            1 => self.data.pop().unwrap_or_default(),
            _ => join_lines(std::mem::take(&mut self.data)),
        };
        let data = utf8_lossy(data);
        if data.len() > self.max_event_bytes {
            return Err(TooBig);
        }
        Ok(Some(SseEvent { event, data }))
    }
}

fn join_lines(parts: Vec<Bytes>) -> Bytes {
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut out = BytesMut::with_capacity(len);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\n");
        }
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// The bytes as text without a copy when they are valid UTF-8 (the normal case).
fn utf8_lossy(data: Bytes) -> Utf8Bytes {
    match Utf8Bytes::try_from(data.clone()) {
        Ok(text) => text,
        Err(_) => String::from_utf8_lossy(&data).into_owned().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    /// Feeds `chunks` and collects `(event name, data)` of every event, EOF included.
    fn parse(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut p = SseParser::new(MAX);
        let mut out = Vec::new();
        let mut take = |e: SseEvent| out.push((e.name().map(str::to_string), e.data.to_string()));
        for c in chunks {
            p.push(c);
            while let Some(e) = p.next_event().unwrap() {
                take(e);
            }
        }
        if let Some(e) = p.finish().unwrap() {
            take(e);
        }
        out
    }

    fn ev(name: Option<&str>, data: &str) -> (Option<String>, String) {
        (name.map(str::to_string), data.to_string())
    }

    const SAMPLE: &str = "\u{feff}: keep-alive\r\n\
        event: response.created\r\n\
        data: {\"type\":\"response.created\",\"x\":\"\u{e9}\u{1F600}\"}\r\n\r\n\
        event: multi\n\
        data: line one\n\
        data:line two\n\
        data\n\
        id: 7\n\
        retry: 10\n\n\
        :comment\r\r\
        event: lone-cr\r\
        data: {\"type\":\"response.completed\"}";

    fn sample_events() -> Vec<(Option<String>, String)> {
        vec![
            ev(
                Some("response.created"),
                "{\"type\":\"response.created\",\"x\":\"\u{e9}\u{1F600}\"}",
            ),
            ev(Some("multi"), "line one\nline two\n"),
            ev(Some("lone-cr"), "{\"type\":\"response.completed\"}"),
        ]
    }

    #[test]
    fn tm1_sse_sample_in_one_chunk() {
        assert_eq!(parse(&[SAMPLE.as_bytes()]), sample_events());
    }

    /// Every split point, including inside the BOM, a CRLF and multi-byte characters.
    #[test]
    fn tm1_sse_split_at_every_byte() {
        let bytes = SAMPLE.as_bytes();
        for i in 0..=bytes.len() {
            let got = parse(&[&bytes[..i], &bytes[i..]]);
            assert_eq!(got, sample_events(), "split at {i}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse(&singles), sample_events());
    }

    #[test]
    fn tm1_sse_final_event_without_blank_line() {
        assert_eq!(parse(&[b"data: a\n"]), vec![ev(None, "a")]);
        assert_eq!(parse(&[b"data: a"]), vec![ev(None, "a")]);
        assert_eq!(parse(&[b"data: a\r"]), vec![ev(None, "a")]);
        assert_eq!(parse(&[b"data: a\n\n"]), vec![ev(None, "a")]);
        assert!(parse(&[b"event: x\n"]).is_empty());
        assert!(parse(&[b""]).is_empty());
    }

    #[test]
    fn tm1_sse_fields_and_comments() {
        let got = parse(&[
            b": only a comment\n\nevent: e\n\n", // no data: nothing
            b"data:  two spaces\n\ndata:\n\n",   // one space stripped
            b"event: a\nevent: b\ndata: x\n\ndata: {\"k\":1}\n\n", // last event name wins
        ]);
        assert_eq!(
            got,
            vec![
                ev(None, " two spaces"),
                ev(None, ""),
                ev(Some("b"), "x"),
                ev(None, "{\"k\":1}"),
            ]
        );
    }

    #[test]
    fn tm1_sse_crlf_split_between_cr_and_lf() {
        let got = parse(&[b"data: a\r", b"\n\r", b"\ndata: b\r", b"\r"]);
        assert_eq!(got, vec![ev(None, "a"), ev(None, "b")]);
    }

    #[test]
    fn tm1_sse_invalid_utf8_is_replaced() {
        let got = parse(&[b"data: a\xFFb\n\n"]);
        assert_eq!(got, vec![ev(None, "a\u{FFFD}b")]);
    }

    #[test]
    fn tm1_sse_single_data_line_is_not_copied() {
        let mut p = SseParser::new(MAX);
        p.push(b"data: {\"type\":\"x\"}\n\n");
        let e = p.next_event().unwrap().unwrap();
        assert_eq!(e.data.as_str(), "{\"type\":\"x\"}");
        assert!(p.next_event().unwrap().is_none());
    }

    /// The bound holds for the text handed out: 8 invalid bytes under a 16-byte bound become 8
    /// U+FFFD (24 bytes), which is over it. Found by the `sse` fuzz target.
    #[test]
    fn tm1_sse_bound_holds_after_invalid_utf8_is_replaced() {
        let mut p = SseParser::new(16);
        p.push(b"data: \xff\xff\xff\xff\xff\xff\xff\xff\n\n");
        assert_eq!(p.next_event(), Err(TooBig));
        let mut p = SseParser::new(32);
        p.push(b"data: \xff\xff\n\n");
        let e = p.next_event().unwrap().unwrap();
        assert_eq!(e.data.as_str(), "\u{fffd}\u{fffd}");
    }

    /// `upstream.max_message_bytes`: a huge line or a huge multi-line event stops the stream.
    #[test]
    fn tm1_sse_over_the_size_limit() {
        let mut p = SseParser::new(16);
        p.push(b"data: 0123456789");
        assert_eq!(p.next_event(), Ok(None));
        p.push(b"0123456789");
        assert_eq!(p.next_event(), Err(TooBig));

        let mut p = SseParser::new(16);
        p.push(b"data: 0123456789\ndata: 0123456789\n");
        assert_eq!(p.next_event(), Err(TooBig));

        let mut p = SseParser::new(16);
        p.push(b"data: 0123456789\n\ndata: 0123456789\n\n");
        assert_eq!(p.next_event().unwrap().unwrap().data.as_str(), "0123456789");
        assert_eq!(p.next_event().unwrap().unwrap().data.as_str(), "0123456789");
    }
}
