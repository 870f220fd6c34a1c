//! Wire shapes shared by the relay and the mock upstream: error frames in their WebSocket and
//! SSE forms, client frame validation, event peeking, and the upstream error classification
//! table (CT-11).

pub mod classify;
pub mod client;
pub mod frames;
pub mod peek;
