//! Talking to upstream accounts: the pool of contexts ([`pool`]) and the leases sessions hold
//! on them ([`lease`]), kept warm in the background ([`maintain`]), each an upstream WebSocket
//! with one task for its life ([`conn`]), dialed with the client's identity ([`identity`]).

pub mod conn;
pub mod fallback;
pub mod http;
pub mod identity;
pub mod lease;
pub mod maintain;
pub mod pool;
pub mod sse;
pub mod stats;

pub use conn::{ConnSettings, UpEnd, UpFrame};
pub use identity::Identity;
pub use lease::Lease;
pub use pool::{Pool, PoolCounts};
