//! Server configuration, shared read-only by every worker.

use crate::proto::handshake::DEFAULT_MAX_HEAD_BYTES;
use crate::proto::ws::DEFAULT_MAX_MESSAGE_BYTES;
use std::net::SocketAddr;
use std::time::Duration;

/// Default per-connection cap on queued outbound bytes. Above it the
/// connection stops being read until the queue drains to half (echo
/// backpressure), so one connection never holds more than about this much
/// plus one message.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 4 * 1024 * 1024;
/// Default time a client has to send its whole request head.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time shutdown waits for clients to finish the close handshake.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address every worker's `SO_REUSEPORT` listener binds (port 0: pick one).
    pub listen: SocketAddr,
    /// Worker threads (event loops); 0 means one per available core.
    pub workers: usize,
    /// Pin worker `i` to core `i % cores`.
    pub pin_cores: bool,
    /// Largest accepted message (reassembled), in bytes; bigger ones close 1009.
    pub max_message_size: usize,
    /// Largest accepted request head, in bytes; bigger ones get 431.
    pub max_handshake_size: usize,
    /// Per-connection outbound queue bound, in bytes.
    pub max_outbound_bytes: usize,
    /// Subprotocols the server speaks, in order of preference.
    pub subprotocols: Vec<String>,
    /// Deadline for a complete request head.
    pub handshake_timeout: Duration,
    /// Bound on the graceful shutdown.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9001)),
            workers: 0,
            pin_cores: true,
            max_message_size: DEFAULT_MAX_MESSAGE_BYTES,
            max_handshake_size: DEFAULT_MAX_HEAD_BYTES,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            subprotocols: Vec::new(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl Config {
    /// The worker count after resolving 0 to the number of available cores.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}
