//! Talking to upstream accounts: the pool of contexts ([`pool`]), each an upstream WebSocket
//! with one task for its life ([`conn`]), dialed with the client's identity ([`identity`]).

pub mod conn;
pub mod identity;
pub mod pool;

pub use conn::{ConnSettings, UpEnd, UpFrame};
pub use identity::Identity;
pub use pool::{Lease, Pool};
