//! corecast: a thread-per-core WebSocket push server.
//!
//! - [`proto`]: the RFC 6455 protocol core, free of I/O.
//! - [`pubsub`]: the fan-out engine, free of I/O: topic names, subscriber
//!   control messages, the topic directory, the cross-worker bus, per-worker
//!   registries.
//! - [`server`]: configuration, admission limits, workers and their event
//!   loops (io_uring, or epoll through mio), metrics.
//! - [`cli`]: the `corecast` command's flags.

pub mod cli;
pub mod config_file;
pub mod proto;
pub mod pubsub;
pub mod server;
