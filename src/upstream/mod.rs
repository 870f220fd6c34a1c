//! Talking to upstream accounts. For now one upstream WebSocket per client session
//! ([`conn`]); the pooled contexts of SPEC §7 grow from it.

pub mod conn;
pub mod identity;

pub use conn::{dial, UpEnd, UpFrame, UpstreamConn};
pub use identity::Identity;
