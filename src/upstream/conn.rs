//! One upstream WebSocket: the dial (SPEC WS-7 headers) and its reader task, which pushes every
//! frame into a bounded channel for the connection's whole life (TP-2), so a slow client slows
//! the upstream read instead of growing memory.

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::AccountConfig;
use crate::error::{RelayError, Retry, Side};
use crate::tuning;

use super::Identity;

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the reader task hands the session.
#[derive(Debug)]
pub enum UpFrame {
    /// One event, as the upstream's own bytes.
    Event(Utf8Bytes),
    /// The connection ended; nothing follows.
    Ended(UpEnd),
}

/// How an upstream connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum UpEnd {
    Closed {
        code: Option<u16>,
        reason: String,
    },
    /// EOF without a Close frame, or an I/O or protocol error.
    Io(String),
    /// An event over the size limit.
    TooBig,
}

/// An open upstream WebSocket of one account.
pub struct UpstreamConn {
    pub account_id: String,
    /// The response the upstream's connection cache holds, if any (CT-1's fast path).
    pub holds: Option<String>,
    sink: SplitSink<WsStream, Message>,
    pub events: mpsc::Receiver<UpFrame>,
    reader: tokio::task::JoinHandle<()>,
}

impl UpstreamConn {
    /// Writes one request frame.
    pub async fn send_text(&mut self, text: String) -> Result<(), RelayError> {
        self.sink
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| RelayError::upstream_lost(format!("upstream write failed: {e}")))
    }
}

impl Drop for UpstreamConn {
    /// Dropping the connection closes it at once: the reader stops and the socket is freed.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Dials `account` with its headers, its key, `OpenAI-Beta` and the session's identity.
pub async fn dial(
    account: &AccountConfig,
    identity: &Identity,
    channel: usize,
) -> Result<UpstreamConn, RelayError> {
    let request = dial_request(account, identity)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(tuning::UPSTREAM_MAX_MESSAGE_BYTES))
        .max_frame_size(Some(tuning::UPSTREAM_MAX_MESSAGE_BYTES));
    let dial = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (ws, _response) = match tokio::time::timeout(tuning::DIAL_TIMEOUT, dial).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return Err(dial_error(&account.id, e)),
        Err(_) => {
            return Err(RelayError::upstream_lost(format!(
                "dial to account {} timed out",
                account.id
            )))
        }
    };
    let (sink, stream) = ws.split();
    let (tx, events) = mpsc::channel(channel.max(1));
    let reader = tokio::spawn(read_loop(stream, tx));
    Ok(UpstreamConn {
        account_id: account.id.clone(),
        holds: None,
        sink,
        events,
        reader,
    })
}

fn dial_request(
    account: &AccountConfig,
    identity: &Identity,
) -> Result<tungstenite::handshake::client::Request, RelayError> {
    let internal = |e: String| {
        RelayError::new(Side::Internal, 500, "server_error", "internal_error").message(e)
    };
    let mut req = account
        .ws_url()
        .into_client_request()
        .map_err(|e| internal(e.to_string()))?;
    let h = req.headers_mut();
    for (k, v) in &account.headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|e| internal(e.to_string()))?;
        h.insert(
            name,
            HeaderValue::from_str(v).map_err(|e| internal(e.to_string()))?,
        );
    }
    for (k, v) in &identity.headers {
        let name =
            HeaderName::from_bytes(k.as_str().as_bytes()).map_err(|e| internal(e.to_string()))?;
        let value = HeaderValue::from_bytes(v.as_bytes()).map_err(|e| internal(e.to_string()))?;
        h.insert(name, value);
    }
    let bearer = HeaderValue::from_str(&format!("Bearer {}", account.api_key().expose()))
        .map_err(|_| internal("account api_key is not a valid header value".into()))?;
    h.insert("authorization", bearer);
    h.insert(
        "openai-beta",
        HeaderValue::from_static(tuning::OPENAI_BETA_WS),
    );
    Ok(req)
}

/// A failed dial: a refused handshake is the upstream's protocol answer, anything else I/O.
fn dial_error(account: &str, e: tungstenite::Error) -> RelayError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            RelayError::upstream_lost(format!(
                "account {account}: upstream refused the WebSocket handshake with {status}"
            ))
            .side(Side::UpstreamProtocol)
        }
        other => {
            RelayError::upstream_lost(format!("account {account}: upstream dial failed: {other}"))
        }
    }
    .retry(Retry::BeforeOutput)
}

async fn read_loop(mut stream: SplitStream<WsStream>, tx: mpsc::Sender<UpFrame>) {
    let end = loop {
        let frame = match stream.next().await {
            Some(Ok(Message::Text(t))) => UpFrame::Event(t),
            Some(Ok(Message::Binary(b))) => match Utf8Bytes::try_from(b) {
                Ok(t) => UpFrame::Event(t),
                Err(_) => continue,
            },
            Some(Ok(Message::Close(f))) => {
                break UpEnd::Closed {
                    code: f.as_ref().map(|f| u16::from(f.code)),
                    reason: f.map(|f| f.reason.to_string()).unwrap_or_default(),
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(tungstenite::Error::Capacity(_))) => break UpEnd::TooBig,
            Some(Err(e)) => break UpEnd::Io(e.to_string()),
            None => break UpEnd::Io("upstream closed the connection without a Close frame".into()),
        };
        if tx.send(frame).await.is_err() {
            return;
        }
    };
    let _ = tx.send(UpFrame::Ended(end)).await;
}
