//! Per-worker counters. Each worker writes only its own (relaxed atomics on
//! its own cache lines, no contention); readers sum them.

use super::admission::Refusal;
use super::tls::Failure;
use super::{auth, origin};
use crate::proto::handshake::Status;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the publish-to-write latency histogram buckets, in
/// microseconds (Prometheus `le`); one more bucket counts everything above.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

/// A latency histogram over [`LATENCY_BUCKETS_US`], written by one worker.
#[derive(Debug, Default)]
pub struct Histogram {
    pub buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        bump(&self.buckets[i]);
        add(&self.sum_ns, d.as_nanos() as u64);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Close codes counted by `corecast_ws_failures_total`: the codes the
/// server fails a connection with.
pub const FAILURE_CODES: [u16; 5] = [1002, 1007, 1008, 1009, 1013];

/// Why a publication did not reach a subscriber it was meant for, besides
/// the slow-consumer policies (counted on their own): the label of
/// `corecast_frames_undelivered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// The subscriber was closing (its close frame already queued, e.g.
    /// during the shutdown drain): nothing may follow a close frame.
    Closing,
    /// The subscriber's worker had already stopped (shutdown).
    WorkerStopped,
}

impl Undelivered {
    pub const ALL: [Undelivered; 2] = [Self::Closing, Self::WorkerStopped];

    pub fn label(self) -> &'static str {
        match self {
            Self::Closing => "closing",
            Self::WorkerStopped => "worker_stopped",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one worker. Aligned to a cache line so workers never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub handshakes_accepted: AtomicU64,
    /// Refused requests by [`Status::index`].
    pub handshakes_rejected: [AtomicU64; Status::ALL.len()],
    pub handshake_timeouts: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub messages_echoed: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Receives from the io_uring reserve that got bytes: a connection's
    /// receive had found the shared buffers used up (`ENOBUFS`).
    pub receives_starved: AtomicU64,
    /// TLS handshakes completed: full, resumed.
    pub tls_handshakes: [AtomicU64; 2],
    /// TLS connections given up, by [`Failure::index`].
    pub tls_failures: [AtomicU64; Failure::ALL.len()],
    pub http_requests: AtomicU64,
    pub control_errors: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Of which to patterns.
    pub pattern_subscriptions: AtomicU64,
    pub messages_published: AtomicU64,
    /// Messages an acknowledged publisher sent after our close frame: not
    /// published, since no acknowledgement may follow a close frame.
    pub messages_after_close: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_dropped: AtomicU64,
    /// Publications replaced in a subscriber's conflation table by newer
    /// ones, and deliveries that replaced some.
    pub publications_replaced: AtomicU64,
    pub publications_conflated: AtomicU64,
    /// Publication frames compressed for permessage-deflate subscribers
    /// (once per publication and form), and the bytes that saved.
    pub publications_compressed: AtomicU64,
    /// Publication frames sent uncompressed to permessage-deflate
    /// subscribers because the worker's turn had compressed its share
    /// ([`CompressRoom`](crate::pubsub::envelope::CompressRoom)).
    pub compression_skipped: AtomicU64,
    pub compressed_bytes_saved: AtomicU64,
    /// Subscribes with `since` answered "recovery busy" (over
    /// `--max-recovery-rate`).
    pub recoveries_deferred: AtomicU64,
    pub recoveries_complete: AtomicU64,
    pub recoveries_incomplete: AtomicU64,
    pub messages_recovered: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub slow_consumer_discarded_bytes: AtomicU64,
    pub keepalive_pings: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub publishers_throttled: AtomicU64,
    /// Connections refused at accept, by [`Refusal::index`].
    pub connections_refused: [AtomicU64; Refusal::ALL.len()],
    /// Connections refused for their PROXY protocol header, by
    /// [`ProxyError::index`](crate::proto::proxy::ProxyError::index).
    pub proxy_refused: [AtomicU64; crate::proto::proxy::ProxyError::ALL.len()],
    /// Requests refused 403 for their `Origin`, by [`origin::Refused::index`].
    pub origin_refused: [AtomicU64; origin::Refused::ALL.len()],
    /// Requests (and subscribes) refused for their token, by [`auth::Refusal::index`].
    pub auth_refused: [AtomicU64; auth::Refusal::ALL.len()],
    /// Connections closed because their token expired.
    pub tokens_expired: AtomicU64,
    /// Connections closed by `POST /disconnect?sub=`.
    pub operator_disconnects: AtomicU64,
    /// HTTP publications answered 429.
    pub publish_rate_limited: AtomicU64,
    /// Times a WebSocket publisher's reads were paused by `--max-publish-rate`.
    pub publishers_paced: AtomicU64,
    /// Connections the server failed, by close code ([`FAILURE_CODES`]).
    pub ws_failures: [AtomicU64; FAILURE_CODES.len()],
    /// Connections closed (1013 / 503) because the buffer budget was spent.
    pub budget_closes: AtomicU64,
    /// Connections closed for not finishing a message in time.
    pub message_timeouts: AtomicU64,
    /// Connections closed because a queued byte waited too long.
    pub send_timeouts: AtomicU64,
    /// Queued bytes discarded when closing them.
    pub send_timeout_discarded_bytes: AtomicU64,
    /// `/metrics` renderings on the main port (at most one per turn).
    pub metrics_renders: AtomicU64,
    /// Free memory given back to the kernel after a load (worker 0).
    pub memory_trims: AtomicU64,
    /// Loop turns that stopped delivering at the per-turn bound.
    pub deliveries_deferred: AtomicU64,
    /// Publications not delivered, by [`Undelivered::index`].
    pub undelivered: [AtomicU64; Undelivered::ALL.len()],
    /// Bytes currently charged to this worker's connections (gauge).
    pub buffered_bytes: AtomicU64,
    /// Publish (the start of the turn that read it) to the end of the
    /// delivering worker's write pass: `corecast_publish_to_write_seconds`.
    pub latency: Histogram,
    /// Publish to the start of the turn that delivers it on each worker:
    /// the rest of the publisher's turn, the hand-off, the wake-up.
    pub handoff_latency: Histogram,
    /// Publish to the start of that worker's write pass: the above plus
    /// queueing to every local subscriber.
    pub first_write_latency: Histogram,
}

fn add(c: &AtomicU64, n: u64) {
    // Only the owning worker writes, so load+store is exact and cheaper than a locked RMW.
    c.store(c.load(Relaxed) + n, Relaxed);
}

fn bump(c: &AtomicU64) {
    add(c, 1);
}

impl WorkerStats {
    pub fn handshake_accepted(&self) {
        bump(&self.handshakes_accepted);
    }

    pub fn handshake_rejected(&self, status: Status) {
        bump(&self.handshakes_rejected[status.index()]);
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

    pub fn receive_starved(&self) {
        bump(&self.receives_starved);
    }

    pub fn accept_error(&self) {
        bump(&self.accept_errors);
    }

    pub fn tls_handshake(&self, resumed: bool) {
        bump(&self.tls_handshakes[usize::from(resumed)]);
    }

    pub fn tls_failure(&self, why: Failure) {
        bump(&self.tls_failures[why.index()]);
    }

    pub fn http_request(&self) {
        bump(&self.http_requests);
    }

    pub fn control_error(&self) {
        bump(&self.control_errors);
    }

    pub fn message_published(&self) {
        bump(&self.messages_published);
    }

    /// An acknowledged publisher's message read after our close frame, not
    /// published.
    pub fn publication_after_close(&self) {
        bump(&self.messages_after_close);
    }

    pub fn subscribed(&self, n: usize) {
        add(&self.subscriptions, n as u64);
    }

    pub fn unsubscribed(&self, n: usize) {
        let c = &self.subscriptions;
        c.store(c.load(Relaxed) - n as u64, Relaxed);
    }

    pub fn recovery_deferred(&self) {
        bump(&self.recoveries_deferred);
    }

    /// `n` publications replaced by a newer one for a subscriber.
    pub fn replaced(&self, n: u64) {
        if n > 0 {
            add(&self.publications_replaced, n);
        }
    }

    /// `n` publication frames left uncompressed: the turn's room was spent.
    pub fn compression_skipped(&self, n: usize) {
        add(&self.compression_skipped, n as u64);
    }

    /// A publication frame compressed, `saved` bytes smaller than its base.
    pub fn compressed(&self, saved: usize) {
        bump(&self.publications_compressed);
        add(&self.compressed_bytes_saved, saved as u64);
    }

    /// A delivery that replaced `replaced` older ones.
    pub fn conflated(&self, replaced: u64) {
        let _ = replaced;
        bump(&self.publications_conflated);
    }

    pub fn pattern_subscribed(&self, n: usize) {
        add(&self.pattern_subscriptions, n as u64);
    }

    pub fn pattern_unsubscribed(&self, n: usize) {
        let c = &self.pattern_subscriptions;
        c.store(c.load(Relaxed) - n as u64, Relaxed);
    }

    pub fn frames_sent(&self, n: u64) {
        add(&self.frames_sent, n);
    }

    pub fn bytes_sent(&self, n: usize) {
        add(&self.bytes_sent, n as u64);
    }

    pub fn frame_dropped(&self) {
        bump(&self.frames_dropped);
    }

    /// A last value sent to a new subscriber.
    pub fn snapshot_sent(&self) {
        bump(&self.snapshots_sent);
    }

    /// A subscribe with `since`: complete or not, and the messages replayed.
    pub fn recovered(&self, complete: bool, messages: usize) {
        bump(if complete {
            &self.recoveries_complete
        } else {
            &self.recoveries_incomplete
        });
        add(&self.messages_recovered, messages as u64);
    }

    pub fn slow_consumer_disconnect(&self, discarded_bytes: usize) {
        bump(&self.slow_consumer_disconnects);
        add(&self.slow_consumer_discarded_bytes, discarded_bytes as u64);
    }

    pub fn keepalive_ping(&self) {
        bump(&self.keepalive_pings);
    }

    pub fn keepalive_timeout(&self) {
        bump(&self.keepalive_timeouts);
    }

    pub fn publisher_throttled(&self) {
        bump(&self.publishers_throttled);
    }

    pub fn connection_refused(&self, why: Refusal) {
        bump(&self.connections_refused[why.index()]);
    }

    pub fn proxy_refused(&self, why: crate::proto::proxy::ProxyError) {
        bump(&self.proxy_refused[why.index()]);
    }

    pub fn origin_refused(&self, why: origin::Refused) {
        bump(&self.origin_refused[why.index()]);
    }

    pub fn auth_refused(&self, why: auth::Refusal) {
        bump(&self.auth_refused[why.index()]);
    }

    pub fn token_expired(&self) {
        bump(&self.tokens_expired);
    }

    pub fn operator_disconnect(&self) {
        bump(&self.operator_disconnects);
    }

    pub fn publish_rate_limited(&self) {
        bump(&self.publish_rate_limited);
    }

    pub fn publisher_paced(&self) {
        bump(&self.publishers_paced);
    }

    /// Counts a connection failed with close `code`.
    pub fn ws_failure(&self, code: u16) {
        if let Some(i) = FAILURE_CODES.iter().position(|&c| c == code) {
            bump(&self.ws_failures[i]);
        }
    }

    pub fn budget_close(&self) {
        bump(&self.budget_closes);
    }

    pub fn message_timeout(&self) {
        bump(&self.message_timeouts);
    }

    pub fn delivery_deferred(&self) {
        bump(&self.deliveries_deferred);
    }

    pub fn metrics_rendered(&self) {
        bump(&self.metrics_renders);
    }

    pub fn memory_trimmed(&self) {
        bump(&self.memory_trims);
    }

    pub fn send_timeout(&self) {
        bump(&self.send_timeouts);
    }

    pub fn send_timeout_discarded(&self, bytes: usize) {
        add(&self.send_timeout_discarded_bytes, bytes as u64);
    }

    /// Counts `n` publications not delivered for `why`.
    pub fn undelivered(&self, why: Undelivered, n: usize) {
        add(&self.undelivered[why.index()], n as u64);
    }

    /// Moves the buffered-bytes gauge by `delta`.
    pub fn buffered(&self, delta: isize) {
        let c = &self.buffered_bytes;
        c.store(c.load(Relaxed).wrapping_add(delta as u64), Relaxed);
    }

    /// Records one publish-to-write latency.
    pub fn observe_latency(&self, d: Duration) {
        self.latency.observe(d);
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
    pub http_requests: u64,
    pub control_errors: u64,
    pub subscriptions: u64,
    pub messages_published: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub frames_dropped: u64,
    pub slow_consumer_disconnects: u64,
    pub keepalive_pings: u64,
    pub keepalive_timeouts: u64,
    pub connections_refused: u64,
    pub publish_rate_limited: u64,
    pub publishers_paced: u64,
    pub budget_closes: u64,
    pub message_timeouts: u64,
    pub send_timeouts: u64,
    pub metrics_renders: u64,
    pub deliveries_deferred: u64,
    pub undelivered: u64,
    pub buffered_bytes: u64,
    /// Publications whose publish-to-write latency was recorded.
    pub latency_count: u64,
}

impl Snapshot {
    /// Sums the counters of `workers`.
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerStats>) -> Self {
        let mut s = Self::default();
        let total = |a: &[AtomicU64]| a.iter().map(|c| c.load(Relaxed)).sum::<u64>();
        for w in workers {
            s.connections_open += w.connections_open.load(Relaxed);
            s.connections_accepted += w.connections_accepted.load(Relaxed);
            s.handshakes_accepted += w.handshakes_accepted.load(Relaxed);
            s.handshakes_rejected += total(&w.handshakes_rejected);
            s.handshake_timeouts += w.handshake_timeouts.load(Relaxed);
            s.protocol_errors += w.protocol_errors.load(Relaxed);
            s.messages_echoed += w.messages_echoed.load(Relaxed);
            s.accept_errors += w.accept_errors.load(Relaxed);
            s.http_requests += w.http_requests.load(Relaxed);
            s.control_errors += w.control_errors.load(Relaxed);
            s.subscriptions += w.subscriptions.load(Relaxed);
            s.messages_published += w.messages_published.load(Relaxed);
            s.frames_sent += w.frames_sent.load(Relaxed);
            s.bytes_sent += w.bytes_sent.load(Relaxed);
            s.frames_dropped += w.frames_dropped.load(Relaxed);
            s.slow_consumer_disconnects += w.slow_consumer_disconnects.load(Relaxed);
            s.keepalive_pings += w.keepalive_pings.load(Relaxed);
            s.keepalive_timeouts += w.keepalive_timeouts.load(Relaxed);
            s.connections_refused += total(&w.connections_refused);
            s.publish_rate_limited += w.publish_rate_limited.load(Relaxed);
            s.publishers_paced += w.publishers_paced.load(Relaxed);
            s.budget_closes += w.budget_closes.load(Relaxed);
            s.message_timeouts += w.message_timeouts.load(Relaxed);
            s.send_timeouts += w.send_timeouts.load(Relaxed);
            s.metrics_renders += w.metrics_renders.load(Relaxed);
            s.deliveries_deferred += w.deliveries_deferred.load(Relaxed);
            s.undelivered += total(&w.undelivered);
            s.buffered_bytes += w.buffered_bytes.load(Relaxed);
            s.latency_count += w.latency.count();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_right_bucket() {
        let w = WorkerStats::default();
        w.observe_latency(Duration::from_micros(10));
        w.observe_latency(Duration::from_micros(11));
        w.observe_latency(Duration::from_secs(5));
        assert_eq!(w.latency.buckets[0].load(Relaxed), 1, "le=10 includes 10");
        assert_eq!(w.latency.buckets[1].load(Relaxed), 1);
        assert_eq!(
            w.latency.buckets[LATENCY_BUCKETS_US.len()].load(Relaxed),
            1,
            "+Inf"
        );
        assert_eq!(Snapshot::sum([&w]).latency_count, 3);
    }
}
