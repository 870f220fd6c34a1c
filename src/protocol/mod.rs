//! Wire shapes shared by the relay and the mock upstream: error frames in their WebSocket and
//! SSE forms, close codes, and (later) event peeking and request rewriting.

pub mod frames;
