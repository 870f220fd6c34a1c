//! Tuning constants in one place, each with its reason. Values that operators need to change
//! become config keys when their behaviour's item lands (SPEC §2 names them).

use std::time::Duration;

/// The beta header Codex sends on WebSocket dials; the public API accepts it.
pub const OPENAI_BETA_WS: &str = "responses_websockets=2026-02-06";

/// Initial read buffer of a client socket. tungstenite's default (128 KiB) would dominate the
/// memory of an idle socket; most client frames are small and the buffer grows when needed.
pub const CLIENT_READ_BUFFER: usize = 4096;

/// A client that stops reading gets this long to take the final frames before the socket is
/// dropped anyway, so a dead peer cannot hold a session open.
pub const CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Upstream events the session handles in one pass when they are already queued: enough for a
/// burst to go out in one write, few enough that the client and timers are still seen at once.
pub const UPSTREAM_BURST: usize = 32;
