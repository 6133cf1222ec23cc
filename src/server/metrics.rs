//! `GET /metrics`: the counters of every worker in the Prometheus text
//! exposition format (version 0.0.4). Names are listed in docs/PROTOCOL.md.

use super::admission::Refusal;
use super::stats::{FAILURE_CODES, Histogram, LATENCY_BUCKETS_US, Undelivered, WorkerStats};
use super::tls::Failure;
use crate::proto::handshake::Status;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// A summed metric: name, help text, and which counter of a worker it reads.
type Counter = (&'static str, &'static str, fn(&WorkerStats) -> &AtomicU64);

/// A labelled counter: name, help text, label name, and which counters of a
/// worker it reads (one per label value).
type Labelled = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkerStats) -> &[AtomicU64],
);

/// Connections and what came of them: accepted (or not), upgraded, plain
/// HTTP requests, handshake deadlines, control-message and protocol errors,
/// echoes.
const CONNECTION_COUNTERS: [Counter; 9] = [
    (
        "corecast_connections_accepted_total",
        "TCP connections accepted.",
        |w| &w.connections_accepted,
    ),
    (
        "corecast_accept_errors_total",
        "Failed accept calls (e.g. out of descriptors).",
        |w| &w.accept_errors,
    ),
    (
        "corecast_receives_starved_total",
        "io_uring receives that found the shared receive buffers used up and then got bytes from the worker's reserve, in the order they starved.",
        |w| &w.receives_starved,
    ),
    (
        "corecast_handshakes_accepted_total",
        "WebSocket upgrades completed (101).",
        |w| &w.handshakes_accepted,
    ),
    (
        "corecast_handshake_timeouts_total",
        "Connections closed for not completing a request head in time.",
        |w| &w.handshake_timeouts,
    ),
    (
        "corecast_http_requests_total",
        "Plain HTTP requests answered (publish POST, metrics, health).",
        |w| &w.http_requests,
    ),
    (
        "corecast_control_errors_total",
        "Subscriber control messages answered with an error (malformed, unknown op, bad topic, over a limit, binary).",
        |w| &w.control_errors,
    ),
    (
        "corecast_protocol_errors_total",
        "WebSocket connections failed by the frame decoder (1002, 1007, 1009, 1008 control frame flood).",
        |w| &w.protocol_errors,
    ),
    (
        "corecast_messages_echoed_total",
        "Messages echoed on /echo.",
        |w| &w.messages_echoed,
    ),
];

/// Publication and delivery: messages published, frames and bytes sent,
/// slow consumers, keepalive, publishers held back (mailbox full, rate).
const DELIVERY_COUNTERS: [Counter; 24] = [
    (
        "corecast_messages_published_total",
        "Messages published (WebSocket and HTTP publishers).",
        |w| &w.messages_published,
    ),
    (
        "corecast_messages_after_close_total",
        "Messages a publisher that asked for acknowledgements (corecast.v1) sent after the server's close frame: not published, since no acknowledgement may follow a close frame.",
        |w| &w.messages_after_close,
    ),
    (
        "corecast_frames_sent_total",
        "Published frames queued to subscribers.",
        |w| &w.frames_sent,
    ),
    (
        "corecast_bytes_sent_total",
        "Bytes written to sockets (all traffic).",
        |w| &w.bytes_sent,
    ),
    (
        "corecast_frames_dropped_total",
        "Published frames skipped for a subscriber over its queue bound (policy drop-newest).",
        |w| &w.frames_dropped,
    ),
    (
        "corecast_publications_replaced_total",
        "Publications replaced by a newer one of their topic while waiting for a conflating subscriber (conflate, always).",
        |w| &w.publications_replaced,
    ),
    (
        "corecast_publications_conflated_total",
        "Publications delivered to a conflating subscriber in place of older ones of their topic.",
        |w| &w.publications_conflated,
    ),
    (
        "corecast_publications_compressed_total",
        "Publication frames compressed for permessage-deflate subscribers, once per publication and form (those that would not shrink are not counted).",
        |w| &w.publications_compressed,
    ),
    (
        "corecast_publications_uncompressed_total",
        "Publication frames sent uncompressed to permessage-deflate subscribers because their worker had compressed its share of the turn (128 KiB), once per publication and form.",
        |w| &w.compression_skipped,
    ),
    (
        "corecast_compressed_bytes_saved_total",
        "Bytes the compressed publication frames are smaller than the frames they stand for, once per publication and form.",
        |w| &w.compressed_bytes_saved,
    ),
    (
        "corecast_recoveries_deferred_total",
        "Subscribes with since answered recovery busy (over --max-recovery-rate): nothing applied, the client retries.",
        |w| &w.recoveries_deferred,
    ),
    (
        "corecast_recoveries_complete_total",
        "Subscribes with since that got every message after it.",
        |w| &w.recoveries_complete,
    ),
    (
        "corecast_recoveries_incomplete_total",
        "Subscribes with since that could not get every message after it (epoch changed, history too short, capped).",
        |w| &w.recoveries_incomplete,
    ),
    (
        "corecast_snapshots_sent_total",
        "Last values sent to new enveloped subscribers (each after a snapshot marker).",
        |w| &w.snapshots_sent,
    ),
    (
        "corecast_messages_recovered_total",
        "Messages replayed from history to recovering subscribers.",
        |w| &w.messages_recovered,
    ),
    (
        "corecast_slow_consumer_disconnects_total",
        "Subscribers closed 1008 for exceeding their queue bound (policy disconnect).",
        |w| &w.slow_consumer_disconnects,
    ),
    (
        "corecast_slow_consumer_discarded_bytes_total",
        "Queued bytes discarded when closing slow consumers.",
        |w| &w.slow_consumer_discarded_bytes,
    ),
    (
        "corecast_keepalive_pings_total",
        "Pings sent to idle connections.",
        |w| &w.keepalive_pings,
    ),
    (
        "corecast_keepalive_timeouts_total",
        "Connections closed for not answering a keepalive ping.",
        |w| &w.keepalive_timeouts,
    ),
    (
        "corecast_tokens_expired_total",
        "Connections closed (3000) because their token expired.",
        |w| &w.tokens_expired,
    ),
    (
        "corecast_operator_disconnects_total",
        "Connections closed (3003) by POST /disconnect?sub= on the admin listener.",
        |w| &w.operator_disconnects,
    ),
    (
        "corecast_publishers_throttled_total",
        "Times a publisher's reads were paused because a worker's mailbox was full or its deliveries were behind.",
        |w| &w.publishers_throttled,
    ),
    (
        "corecast_publish_rate_limited_total",
        "HTTP publications answered 429 (--max-publish-rate).",
        |w| &w.publish_rate_limited,
    ),
    (
        "corecast_publishers_paced_total",
        "Times a WebSocket publisher was not read for a while to hold it to --max-publish-rate.",
        |w| &w.publishers_paced,
    ),
];

/// The buffer budget and the message and send deadlines, the workers' own
/// work (deferred deliveries, renderings), then two gauges: the bytes
/// charged to the budget and the subscriptions.
const LIMIT_COUNTERS: [Counter; 10] = [
    (
        "corecast_buffer_budget_closes_total",
        "Connections closed (1013, or 503 in a request) because --max-buffered-bytes was spent.",
        |w| &w.budget_closes,
    ),
    (
        "corecast_message_timeouts_total",
        "Connections closed 1008 for not finishing a message within --message-timeout.",
        |w| &w.message_timeouts,
    ),
    (
        "corecast_send_timeouts_total",
        "Connections closed (1008 for a WebSocket) because a queued byte waited longer than --send-timeout.",
        |w| &w.send_timeouts,
    ),
    (
        "corecast_send_timeout_discarded_bytes_total",
        "Queued bytes (published frames, echoes, replies) discarded when closing connections for --send-timeout.",
        |w| &w.send_timeout_discarded_bytes,
    ),
    (
        "corecast_deliveries_deferred_total",
        "Loop turns in which a worker reached its per-turn delivery bound and carried the rest to the next turn (it is saturated: publications wait in its mailbox).",
        |w| &w.deliveries_deferred,
    ),
    (
        "corecast_metrics_renders_total",
        "Renderings of /metrics by the workers (pipelined requests of one loop turn share one).",
        |w| &w.metrics_renders,
    ),
    (
        "corecast_memory_trims_total",
        "Times the allocator was asked to give its free memory back to the kernel: when RSS has grown by 32 MiB since the last time (or the start), less than half of that growth is charged to the buffer budget, and the process sent under 1 MiB in the last second.",
        |w| &w.memory_trims,
    ),
    (
        "corecast_buffered_bytes",
        "Bytes held for connections and charged to --max-buffered-bytes.",
        |w| &w.buffered_bytes,
    ),
    (
        "corecast_subscriptions",
        "Current (connection, topic) subscriptions.",
        |w| &w.subscriptions,
    ),
    (
        "corecast_pattern_subscriptions",
        "Current (connection, pattern) subscriptions, counted in corecast_subscriptions too.",
        |w| &w.pattern_subscriptions,
    ),
];

/// Renders every metric. `topics` is the number of topics known
/// process-wide; `stranded` the publications left in exited workers'
/// mailboxes ([`Bus::stranded`](crate::pubsub::bus::Bus::stranded)),
/// reported as undelivered `worker_stopped`.
pub fn render(workers: &[WorkerStats], topics: usize, stranded: u64) -> String {
    let mut s = String::with_capacity(4096);
    connections_open(&mut s, workers);
    for counters in [
        &CONNECTION_COUNTERS[..],
        &DELIVERY_COUNTERS,
        &LIMIT_COUNTERS,
    ] {
        summed(&mut s, workers, counters);
    }
    labelled_counters(&mut s, workers, stranded);
    header(
        &mut s,
        "corecast_topics",
        "gauge",
        "Topics with a subscriber or a WebSocket publisher, or retained for their history.",
    );
    let _ = writeln!(s, "corecast_topics {topics}");
    latency_histogram(&mut s, workers);
    s
}

/// The histories: bytes and messages held, topics retained for their
/// history alone, messages dropped early to stay under `--history-memory`.
pub fn render_history(
    s: &mut String,
    bytes: usize,
    entries: usize,
    retained: usize,
    evicted: u64,
    too_large: u64,
) {
    for (name, kind, help, v) in [
        (
            "corecast_history_bytes",
            "gauge",
            "Bytes all topic histories hold (frames plus 288 B per message).",
            bytes as u64,
        ),
        (
            "corecast_history_messages",
            "gauge",
            "Messages all topic histories hold.",
            entries as u64,
        ),
        (
            "corecast_retained_topics",
            "gauge",
            "Topics nobody subscribes or publishes to, kept for their history.",
            retained as u64,
        ),
        (
            "corecast_history_evicted_total",
            "counter",
            "History messages dropped before their time: to stay under --history-memory, or with a retained topic forgotten over --retained-topics or its namespace's retained-topics.",
            evicted,
        ),
        (
            "corecast_history_too_large_total",
            "counter",
            "Publications larger than their topic's --history-bytes (or its namespace's history-bytes): delivered live, but never kept, so neither recoverable with since nor a last value.",
            too_large,
        ),
    ] {
        header(s, name, kind, help);
        let _ = writeln!(s, "{name} {v}");
    }
}

/// The limits in force and the drain, as gauges (for alerts that compare
/// a figure with its limit, and for a drain that does not end).
#[derive(Debug, Clone, Copy)]
pub struct Process {
    pub draining: bool,
    pub max_connections: usize,
    pub max_buffered_bytes: usize,
}

/// The process-wide figures: the limits in force and the drain, the TLS
/// certificate's expiry (with `--tls-cert`), the reloads and the panics
/// caught.
pub fn render_process(
    s: &mut String,
    process: Process,
    cert_not_after: Option<i64>,
    reloads: [u64; 2],
    panics: [u64; 2],
) {
    for (name, help, v) in [
        (
            "corecast_draining",
            "1 from the first SIGTERM (or a worker's failure) until the exit: /healthz answers 503 draining.",
            usize::from(process.draining),
        ),
        (
            "corecast_max_connections",
            "The process-wide connection cap in force (--max-connections; SIGHUP may change it).",
            process.max_connections,
        ),
        (
            "corecast_max_buffered_bytes",
            "The buffer budget (--max-buffered-bytes) that corecast_buffered_bytes is charged to.",
            process.max_buffered_bytes,
        ),
    ] {
        header(s, name, "gauge", help);
        let _ = writeln!(s, "{name} {v}");
    }
    if let Some(t) = cert_not_after {
        header(
            s,
            "corecast_tls_cert_not_after_seconds",
            "gauge",
            "When the serving certificate expires, in seconds since the Unix epoch (0: unreadable).",
        );
        let _ = writeln!(s, "corecast_tls_cert_not_after_seconds {t}");
    }
    header(
        s,
        "corecast_reloads_total",
        "counter",
        "Reloads (SIGHUP), by result; a failed one kept the old configuration.",
    );
    let _ = writeln!(s, "corecast_reloads_total{{result=\"ok\"}} {}", reloads[0]);
    let _ = writeln!(
        s,
        "corecast_reloads_total{{result=\"failed\"}} {}",
        reloads[1]
    );
    header(
        s,
        "corecast_panics_total",
        "counter",
        "Panics caught (bugs): in one connection's input (that connection closed alone), in a worker (the server drained and exits).",
    );
    let _ = writeln!(
        s,
        "corecast_panics_total{{scope=\"connection\"}} {}",
        panics[0]
    );
    let _ = writeln!(s, "corecast_panics_total{{scope=\"worker\"}} {}", panics[1]);
}

/// The JWKS fetcher's figures (with tokens on): fetches by result, and
/// when the last one succeeded.
pub fn render_jwks(s: &mut String, fetches: [u64; 2], last_ok_s: u64) {
    header(
        s,
        "corecast_jwks_fetches_total",
        "counter",
        "Fetches of the --jwks URL, by result; an error (unreachable, timeout, not 200, over 1 MiB, not a valid key set) kept the keys in force.",
    );
    for (result, n) in ["ok", "error"].iter().zip(fetches) {
        let _ = writeln!(s, "corecast_jwks_fetches_total{{result=\"{result}\"}} {n}");
    }
    header(
        s,
        "corecast_jwks_last_success_seconds",
        "gauge",
        "When a fetch of the --jwks URL last succeeded, in seconds since the Unix epoch (0: never).",
    );
    let _ = writeln!(s, "corecast_jwks_last_success_seconds {last_ok_s}");
}

/// A metric's `# HELP` and `# TYPE` lines.
fn header(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One counter summed over the workers.
/// One counter or gauge summed over the workers, wrapping: a worker's
/// gauge may go below zero (it frees what another charged), the sum not.
pub(crate) fn sum(workers: &[WorkerStats], f: fn(&WorkerStats) -> &AtomicU64) -> u64 {
    workers
        .iter()
        .fold(0, |total: u64, w| total.wrapping_add(get(f(w))))
}

/// The one metric with a sample per worker.
fn connections_open(s: &mut String, workers: &[WorkerStats]) {
    header(
        s,
        "corecast_connections_open",
        "gauge",
        "Open TCP connections, per worker.",
    );
    for (i, w) in workers.iter().enumerate() {
        let _ = writeln!(
            s,
            "corecast_connections_open{{worker=\"{i}\"}} {}",
            get(&w.connections_open)
        );
    }
}

/// Unlabelled metrics summed over the workers: a counter if the name ends
/// in `_total`, else a gauge.
fn summed(s: &mut String, workers: &[WorkerStats], counters: &[Counter]) {
    for &(name, help, f) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        header(s, name, kind, help);
        let _ = writeln!(s, "{name} {}", sum(workers, f));
    }
}

/// The counters with one label, summed over the workers; `stranded` is
/// added to undelivered `worker_stopped`.
fn labelled_counters(s: &mut String, workers: &[WorkerStats], stranded: u64) {
    labelled(
        s,
        workers,
        (
            "corecast_handshakes_rejected_total",
            "Requests refused, by HTTP status.",
            "status",
            |w| &w.handshakes_rejected,
        ),
        Status::ALL
            .iter()
            .map(|st| (st.code().to_string(), st.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_connections_refused_total",
            "Connections answered 503 at accept (or at their PROXY protocol header), by the limit they hit.",
            "limit",
            |w| &w.connections_refused,
        ),
        Refusal::ALL
            .iter()
            .map(|r| (r.label().to_string(), r.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_proxy_refused_total",
            "Connections refused for their PROXY protocol header (--proxy-protocol), by reason.",
            "reason",
            |w| &w.proxy_refused,
        ),
        crate::proto::proxy::ProxyError::ALL
            .iter()
            .map(|r| (r.label().to_string(), r.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_origin_refused_total",
            "Requests answered 403 for their Origin header (--allowed-origin), by reason.",
            "reason",
            |w| &w.origin_refused,
        ),
        crate::server::origin::Refused::ALL
            .iter()
            .map(|r| (r.label().to_string(), r.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_auth_refused_total",
            "Requests and subscribes refused for their token (--jwt-key, --jwks), by reason.",
            "reason",
            |w| &w.auth_refused,
        ),
        crate::server::auth::Refusal::ALL
            .iter()
            .map(|r| (r.label().to_string(), r.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_tls_handshakes_total",
            "TLS handshakes completed (with --tls-cert), by kind: a full handshake or a resumed session.",
            "kind",
            |w| &w.tls_handshakes,
        ),
        [("full".to_string(), 0), ("resumed".to_string(), 1)].into_iter(),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_tls_failures_total",
            "TLS connections given up, by reason (plain_http: plain HTTP to the TLS port, answered 400; handshake; protocol: a bad record after the handshake).",
            "reason",
            |w| &w.tls_failures,
        ),
        Failure::ALL
            .iter()
            .map(|f| (f.label().to_string(), f.index())),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_ws_failures_total",
            "WebSocket connections the server failed, by close code (1002 protocol, 1007 bad UTF-8, 1008 policy, 1009 too big, 1013 out of buffer budget).",
            "code",
            |w| &w.ws_failures,
        ),
        FAILURE_CODES
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i)),
        None,
    );
    labelled(
        s,
        workers,
        (
            "corecast_frames_undelivered_total",
            "Publications not delivered to a subscriber they were meant for, by reason (closing: the subscriber had sent its close frame; worker_stopped: its worker had exited during shutdown). Slow-consumer drops are counted by corecast_frames_dropped_total and corecast_slow_consumer_discarded_bytes_total.",
            "reason",
            |w| &w.undelivered,
        ),
        Undelivered::ALL
            .iter()
            .map(|r| (r.label().to_string(), r.index())),
        Some((Undelivered::WorkerStopped.index(), stranded)),
    );
}

/// One labelled counter: a sample per (label value, index into the
/// worker's counters); `extra` adds a count to the sample of one index.
fn labelled(
    s: &mut String,
    workers: &[WorkerStats],
    (name, help, label, f): Labelled,
    values: impl Iterator<Item = (String, usize)>,
    extra: Option<(usize, u64)>,
) {
    header(s, name, "counter", help);
    for (value, i) in values {
        let mut n: u64 = workers.iter().map(|w| get(&f(w)[i])).sum();
        if let Some((at, more)) = extra
            && at == i
        {
            n += more;
        }
        let _ = writeln!(s, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// The publish-to-write latency histogram: cumulative buckets, sum, count.
fn latency_histogram(s: &mut String, workers: &[WorkerStats]) {
    histogram(
        s,
        "corecast_publish_to_write_seconds",
        "Time from the start of the loop turn that read a publication to the end of the first write pass to its local subscribers, per worker that delivered it.",
        workers,
        |w| &w.latency,
    );
    histogram(
        s,
        "corecast_publish_to_delivery_seconds",
        "Time from the start of the loop turn that read a publication to the start of the turn that delivers it, per worker (the publisher's turn, the hand-off between workers, the wake-up).",
        workers,
        |w| &w.handoff_latency,
    );
    histogram(
        s,
        "corecast_publish_to_first_write_seconds",
        "Time from the start of the loop turn that read a publication to the start of the write pass after it was queued to every local subscriber, per worker.",
        workers,
        |w| &w.first_write_latency,
    );
}

fn histogram(
    s: &mut String,
    name: &str,
    help: &str,
    workers: &[WorkerStats],
    of: impl Fn(&WorkerStats) -> &Histogram,
) {
    let all: Vec<&Histogram> = workers.iter().map(of).collect();
    histogram_of(s, name, help, &all);
}

/// A histogram summed over `parts`: cumulative buckets, sum, count.
fn histogram_of(s: &mut String, name: &str, help: &str, parts: &[&Histogram]) {
    header(s, name, "histogram", help);
    let mut cumulative = 0u64;
    for (i, le) in LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += parts.iter().map(|h| get(&h.buckets[i])).sum::<u64>();
        let _ = writeln!(
            s,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *le as f64 / 1e6
        );
    }
    cumulative += parts
        .iter()
        .map(|h| get(&h.buckets[LATENCY_BUCKETS_US.len()]))
        .sum::<u64>();
    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum_ns: u64 = parts.iter().map(|h| get(&h.sum_ns)).sum();
    let _ = writeln!(s, "{name}_sum {}", sum_ns as f64 / 1e9);
    let _ = writeln!(s, "{name}_count {cumulative}");
}

/// The cluster link's figures (`--nats-url`): `up`, connected with the
/// stream there; `pending`, bytes held for it; its counters.
pub fn render_cluster(
    s: &mut String,
    up: bool,
    pending: usize,
    st: &crate::server::cluster::ClusterStats,
) {
    header(
        s,
        "corecast_cluster_connected",
        "gauge",
        "1 while the node is connected to NATS and the cluster's stream is there (publications flow), else 0.",
    );
    let _ = writeln!(s, "corecast_cluster_connected {}", u8::from(up));
    header(
        s,
        "corecast_cluster_connects_total",
        "counter",
        "Connections established to NATS (the first and every reconnect).",
    );
    let _ = writeln!(s, "corecast_cluster_connects_total {}", get(&st.connects));
    header(
        s,
        "corecast_cluster_subscriptions",
        "gauge",
        "Interest subscriptions the node holds in NATS: one per topic and per pattern its subscribers hold.",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_subscriptions {}",
        get(&st.subscriptions)
    );
    header(
        s,
        "corecast_cluster_pending_bytes",
        "gauge",
        "Bytes of publications made on this node that the stream has not stored yet (bounded by --nats-max-pending).",
    );
    let _ = writeln!(s, "corecast_cluster_pending_bytes {pending}");
    header(
        s,
        "corecast_cluster_published_total",
        "counter",
        "Publications made on this node and stored by the cluster's stream.",
    );
    let _ = writeln!(s, "corecast_cluster_published_total {}", get(&st.published));
    header(
        s,
        "corecast_cluster_published_bytes_total",
        "counter",
        "Payload bytes of those.",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_published_bytes_total {}",
        get(&st.published_bytes)
    );
    header(
        s,
        "corecast_cluster_publish_refused_total",
        "counter",
        "Publications refused on this node, by reason: pending (--nats-max-pending reached, or unusable NATS settings: HTTP 503, WebSocket publisher closed 1013), too_large (over NATS max_payload: 413, 1009), rejected (NATS refused one it had taken, logged), abandoned (not stored when the node stopped).",
    );
    for (reason, n) in [
        ("pending", get(&st.refused)),
        ("too_large", get(&st.too_large)),
        ("rejected", get(&st.rejected)),
        ("abandoned", get(&st.abandoned)),
    ] {
        let _ = writeln!(
            s,
            "corecast_cluster_publish_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    header(
        s,
        "corecast_cluster_publish_unconfirmed_total",
        "counter",
        "HTTP publications answered 202 Accepted: the stream had not stored them within the request deadline (--handshake-timeout); the node still holds them and stores them once NATS takes them.",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_publish_unconfirmed_total {}",
        get(&st.unconfirmed)
    );
    header(
        s,
        "corecast_cluster_publish_retries_total",
        "counter",
        "Publications numbered again, by cause: conflict (another node stored one of the topic first), failure (NATS unreachable or timed out; retried).",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_publish_retries_total{{cause=\"conflict\"}} {}",
        get(&st.conflicts)
    );
    let _ = writeln!(
        s,
        "corecast_cluster_publish_retries_total{{cause=\"failure\"}} {}",
        get(&st.failures)
    );
    header(
        s,
        "corecast_cluster_received_total",
        "counter",
        "Messages received from the cluster on the node's interest subscriptions.",
    );
    let _ = writeln!(s, "corecast_cluster_received_total {}", get(&st.received));
    header(
        s,
        "corecast_cluster_received_bytes_total",
        "counter",
        "Payload bytes of those.",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_received_bytes_total {}",
        get(&st.received_bytes)
    );
    header(
        s,
        "corecast_cluster_received_skipped_total",
        "counter",
        "Messages received and not handed on, by reason: duplicate (a number already handed on: a topic's and a pattern's subscription both match), foreign (not published by corecast).",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_received_skipped_total{{reason=\"duplicate\"}} {}",
        get(&st.duplicates)
    );
    let _ = writeln!(
        s,
        "corecast_cluster_received_skipped_total{{reason=\"foreign\"}} {}",
        get(&st.foreign)
    );
    header(
        s,
        "corecast_cluster_catch_ups_total",
        "counter",
        "Reads of the stream that caught a followed topic up before handing a message on: its predecessor had not reached this node (its NATS connection was cut, or NATS dropped messages to it as a slow consumer).",
    );
    let _ = writeln!(s, "corecast_cluster_catch_ups_total {}", get(&st.missed));
    header(
        s,
        "corecast_cluster_sequence_breaks_total",
        "counter",
        "Topic numbers that did not follow the last one handed on here: gap (numbers skipped: messages that never reached this node, which subscribers see as a skip), restart (a new epoch).",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_sequence_breaks_total{{kind=\"gap\"}} {}",
        get(&st.gaps)
    );
    let _ = writeln!(
        s,
        "corecast_cluster_sequence_breaks_total{{kind=\"restart\"}} {}",
        get(&st.restarts)
    );
    header(
        s,
        "corecast_cluster_slow_consumer_total",
        "counter",
        "Slow-consumer notices from the NATS client (it dropped messages for this node: gaps follow).",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_slow_consumer_total {}",
        get(&st.slow_consumer)
    );
    header(
        s,
        "corecast_cluster_subscribes_deferred_total",
        "counter",
        "Rounds in which a new interest subscription could not be handed to the NATS client within 100 ms (its command queue full while it reconnects): tried again a second later.",
    );
    let _ = writeln!(
        s,
        "corecast_cluster_subscribes_deferred_total {}",
        get(&st.subscribes_deferred)
    );
    histogram_of(
        s,
        "corecast_cluster_hop_seconds",
        "From the publishing node's clock at publish to this node's on receipt, per message received (the NATS hop: the stream's store and republish; across machines, plus their clock difference).",
        &[&st.latency],
    );
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
