//! Switchyard: a WebSocket-first relay for the OpenAI Responses API.
//!
//! Clients (Codex CLI above all) open one WebSocket per conversation and send
//! `response.create` frames; the relay authenticates them with its own keys, picks an upstream
//! account, keeps a warm upstream WebSocket bound to the conversation, streams the events back
//! and records usage. HTTP/SSE works as a full fallback on both sides. `../shared/SPEC.md`
//! defines every behaviour; the ids it gives (`WS-1`, `CT-4`, ...) are cited in the tests.
//!
//! # Modules, along the data path
//!
//! [`config`] reads the one YAML file: typed sections with defaults, unknown keys refused, every
//! error reported with its path before any port is bound (OP-4); secrets never print.
//!
//! [`server`] is the client-facing front: the axum router that authenticates WebSocket upgrades
//! before switching protocols (401/403/426 as JSON), hands each socket to a session, serves
//! `POST /v1/responses` through the same sessions (SSE or JSON), the admin API, `/healthz`,
//! `/readyz` and `/metrics`; it reloads the config on SIGHUP or a file change, and starts the
//! embedded default when no config is given.
//!
//! [`session`] owns one client socket: its turns one after another, the last response id and
//! model, the upstream connection it holds, and the errors held back during a turn. Its loop
//! waits on the client, the upstream, room in the client socket and timers at once, so it never
//! blocks on either peer; it writes to the client itself.
//!
//! [`scheduler`] picks the upstream account for each turn (for now the first account that serves
//! the model).
//!
//! [`state`] is the shared-state interface (async and fallible, so a networked backend fits):
//! for now the per-account turn slots of SC-3, kept by the in-process `memory` backend.
//!
//! [`usage`] turns every `response.create` into one usage record — tokens reported or estimated,
//! cost from a dated price table, timings, who failed — and writes the records in batches to the
//! embedded SQLite store, which `switchyard usage` reads.
//!
//! [`upstream`] dials an account's WebSocket with its key and the client's identity headers and
//! runs the connection's reader task, which feeds a bounded channel for the connection's life;
//! it pools those connections per account, and also speaks the `http` transport (POST + SSE)
//! and dials the dedicated sockets of `passthrough` accounts.
//!
//! [`protocol`] holds the wire shapes both sides share: error frames in their WebSocket and SSE
//! forms, and (as the relay path lands) event peeking, request rewriting and the one table that
//! classifies upstream errors.
//!
//! [`error`] is the relay's error type: which side failed (client, upstream I/O, upstream
//! protocol, internal) and whether a transparent retry is allowed, so no failure is ever blamed
//! on the wrong side.
//!
//! [`mock`] is a faithful stand-in for the upstream service (connection-local caches, stored
//! responses, tool-call and encrypted-reasoning rules, scripted faults), used by every test and
//! by `switchyard mock-upstream`.
//!
//! [`loadgen`] is `switchyard loadgen`: an open-loop WebSocket load generator that measures
//! per-event latency against the mock's send stamps, for the figures in BENCHMARKS.md.
//!
//! [`telemetry`] sets up logging and the process-wide metrics registry; [`tuning`] holds the
//! constants that are not (yet) config keys, each with its reason.
//!
//! # The life of a turn
//!
//! A client frame `response.create` is read by the session's reader (a turn already running is
//! preempted, or the request is queued or refused, by `session.preempt_policy`) → the scheduler
//! picks an account → admission takes one of the account's turn slots, waiting up to
//! `session.admission_timeout` → the session leases an upstream context (a pooled WebSocket:
//! its own if still held, an idle one, a new dial, or another session's parked one) → continuity decides between the fast path
//! (`previous_response_id` the context still holds) and a full replay of the transcript → the
//! request is written upstream → the context's reader task pushes each event into a bounded
//! channel and the session forwards the original bytes to the client, peeking only at
//! the event type → at the terminal event the transcript and bindings advance, the slot is
//! released, the context stays parked with the session, and one usage record is handed to the
//! recorder, which flushes it to the store off the hot path.

pub mod config;
pub mod error;
pub mod limits;
pub mod loadgen;
pub mod mock;
pub mod protocol;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod tuning;
pub mod upstream;
pub mod usage;
