//! A WebSocket client written by hand, for what tokio-tungstenite will not do: send invalid
//! UTF-8, fragments, unmasked or oversized control frames, reserved bits and opcodes, or leave
//! pings unanswered while still reading.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::HANG_GUARD;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

pub struct RawWs {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

/// What the raw client read: opcode and payload of one (unfragmented) frame.
#[derive(Debug)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// A Close frame's code.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// One frame as the raw client writes it; the defaults make a final, masked frame.
pub struct Out<'a> {
    pub fin: bool,
    /// RSV1..3 as the top bits of the first byte (0x40, 0x20, 0x10).
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: &'a [u8],
}

impl<'a> Out<'a> {
    pub fn new(opcode: u8, payload: &'a [u8]) -> Out<'a> {
        Out {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload,
        }
    }

    /// The frame's bytes (RFC 6455 §5.2).
    pub fn bytes(&self) -> Vec<u8> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![u8::from(self.fin) << 7 | self.rsv | self.opcode];
        let m = if self.masked { 0x80 } else { 0 };
        match self.payload.len() {
            n if n < 126 => frame.push(m | n as u8),
            n if n <= 0xffff => {
                frame.push(m | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(m | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if self.masked {
            frame.extend_from_slice(&mask);
            frame.extend(
                self.payload
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[i % 4]),
            );
        } else {
            frame.extend_from_slice(self.payload);
        }
        frame
    }
}

impl RawWs {
    /// Upgrades `GET /v1/responses` by hand with `Authorization: Bearer key`.
    pub async fn connect(addr: SocketAddr, key: &str) -> RawWs {
        let mut tcp = TcpStream::connect(addr).await.expect("tcp connect");
        let req = format!(
            "GET /v1/responses HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("write upgrade");
        let mut raw = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.fill().await.expect("EOF during the handshake");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        raw.buf.drain(..end);
        raw
    }

    /// Reads more bytes into the buffer; `None` on EOF or a reset.
    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(HANG_GUARD, self.tcp.read(&mut chunk))
            .await
            .expect("hang guard: raw read")
            .ok()?;
        if n == 0 {
            return None;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Some(())
    }

    /// Writes one final, masked frame (clients must mask, RFC 6455 §5.3).
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send(&Out::new(opcode, payload)).await;
    }

    /// Writes `frame` as it is, valid or not; a write the relay refused is ignored (the
    /// answer, a Close frame or EOF, is what a test reads next).
    pub async fn send(&mut self, frame: &Out<'_>) {
        let _ = self.tcp.write_all(&frame.bytes()).await;
    }

    /// The next frame from the server (unmasked); `None` when the connection ended.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            self.fill().await?;
        }
    }

    /// Frames up to and including the next Close frame (pings skipped); its code, or `None`
    /// when the connection ended without one.
    pub async fn read_until_close(&mut self) -> (Vec<RawFrame>, Option<u16>) {
        let mut seen = Vec::new();
        while let Some(f) = self.read_frame().await {
            if f.opcode == OP_CLOSE {
                let code = f.close_code();
                return (seen, code);
            }
            if f.opcode != OP_PING {
                seen.push(f);
            }
        }
        (seen, None)
    }
}

/// One complete server frame at the start of `buf`, and how many bytes it took.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    Some((
        RawFrame {
            opcode: buf[0] & 0x0f,
            payload,
        },
        at,
    ))
}
