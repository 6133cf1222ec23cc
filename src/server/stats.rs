//! Per-worker counters. Each worker writes only its own (relaxed atomics on
//! its own cache lines, no contention); readers sum them.

use crate::proto::handshake::Status;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one worker. Aligned to a cache line so workers never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub handshakes_accepted: AtomicU64,
    pub handshakes_rejected_400: AtomicU64,
    pub handshakes_rejected_404: AtomicU64,
    pub handshakes_rejected_405: AtomicU64,
    pub handshakes_rejected_426: AtomicU64,
    pub handshakes_rejected_431: AtomicU64,
    pub handshakes_rejected_other: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub messages_echoed: AtomicU64,
    pub accept_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    // Only the owning worker writes, so load+store is exact and cheaper than a locked RMW.
    c.store(c.load(Relaxed) + 1, Relaxed);
}

impl WorkerStats {
    pub fn handshake_accepted(&self) {
        bump(&self.handshakes_accepted);
    }

    pub fn handshake_rejected(&self, status: Status) {
        bump(match status.code() {
            400 => &self.handshakes_rejected_400,
            404 => &self.handshakes_rejected_404,
            405 => &self.handshakes_rejected_405,
            426 => &self.handshakes_rejected_426,
            431 => &self.handshakes_rejected_431,
            _ => &self.handshakes_rejected_other,
        });
    }

    pub fn handshake_timeout(&self) {
        bump(&self.handshake_timeouts);
    }

    pub fn protocol_error(&self) {
        bump(&self.protocol_errors);
    }

    pub fn message_echoed(&self) {
        bump(&self.messages_echoed);
    }

    pub fn accept_error(&self) {
        bump(&self.accept_errors);
    }

    pub fn connection_opened(&self) {
        bump(&self.connections_accepted);
        bump(&self.connections_open);
    }

    pub fn connection_closed(&self) {
        let c = &self.connections_open;
        c.store(c.load(Relaxed) - 1, Relaxed);
    }
}

/// A point-in-time sum over all workers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub handshakes_accepted: u64,
    pub handshakes_rejected: u64,
    pub handshake_timeouts: u64,
    pub protocol_errors: u64,
    pub messages_echoed: u64,
    pub accept_errors: u64,
}

impl Snapshot {
    /// Sums the counters of `workers`.
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerStats>) -> Self {
        let mut s = Self::default();
        for w in workers {
            s.connections_open += w.connections_open.load(Relaxed);
            s.connections_accepted += w.connections_accepted.load(Relaxed);
            s.handshakes_accepted += w.handshakes_accepted.load(Relaxed);
            s.handshakes_rejected += [
                &w.handshakes_rejected_400,
                &w.handshakes_rejected_404,
                &w.handshakes_rejected_405,
                &w.handshakes_rejected_426,
                &w.handshakes_rejected_431,
                &w.handshakes_rejected_other,
            ]
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>();
            s.handshake_timeouts += w.handshake_timeouts.load(Relaxed);
            s.protocol_errors += w.protocol_errors.load(Relaxed);
            s.messages_echoed += w.messages_echoed.load(Relaxed);
            s.accept_errors += w.accept_errors.load(Relaxed);
        }
        s
    }
}
