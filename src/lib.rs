//! corecast: a thread-per-core WebSocket push server.
//!
//! - [`proto`]: the RFC 6455 protocol core, free of I/O.
//! - [`pubsub`]: topic names and subscriber control messages (fan-out, in progress).
//! - [`server`]: configuration, workers and the epoll (mio) event loop.

pub mod cli;
pub mod proto;
pub mod pubsub;
pub mod server;
