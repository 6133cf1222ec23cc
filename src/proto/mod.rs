//! The WebSocket protocol core, free of I/O ("sans-IO").
//!
//! Bytes in, events and bytes out: nothing in this module makes a syscall,
//! reads a clock or spawns a thread, so both I/O backends, the tests, the
//! fuzzers and the load generator drive the same code.
//!
//! | module | holds |
//! |---|---|
//! | [`handshake`] | request-head scanning and parsing, upgrade validation, `Sec-WebSocket-Accept`, HTTP responses |
//! | [`host`] | the `Host` header's grammar, and the IP literal an `Origin` may name too |
//! | [`frame`] | frame header parse/encode, opcodes, close codes |
//! | [`mask`] | payload (un)masking: bytewise reference, word, SSE2, AVX2 |
//! | [`utf8`] | incremental, fail-fast UTF-8 validation |
//! | [`ws`] | [`ws::WsConn`], the state machine of an open connection (its `decode` in `ws_decode.rs`) |
//! | [`outbound`] | [`outbound::OutQueue`], a connection's queue of frames to write |
//! | [`rate`] | [`rate::TokenBucket`], the rate limits' bucket, on a clock the caller passes in |

pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod host;
pub mod mask;
pub mod outbound;
pub mod proxy;
pub mod rate;
pub mod utf8;
pub mod ws;

pub use frame::{CloseCode, OpCode};
pub use outbound::OutQueue;
pub use ws::{CloseState, Decoded, Event, MessageKind, WsConn};
