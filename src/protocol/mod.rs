//! Wire shapes shared by the relay and the mock upstream: error frames in their WebSocket and
//! SSE forms, client frame validation, and event peeking.

pub mod client;
pub mod frames;
pub mod peek;
