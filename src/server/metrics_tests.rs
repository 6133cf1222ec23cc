//! Unit tests for [`render`]: the whole rendering against docs/PROTOCOL.md, and sums.

use super::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// Two workers with every counter at a value of its own: 1, 2, 3, ... in
/// field order, the second worker's 1000 above the first's.
fn busy_workers() -> Vec<WorkerStats> {
    let ws: Vec<WorkerStats> = (0..2).map(|_| WorkerStats::default()).collect();
    for (k, w) in ws.iter().enumerate() {
        let mut n = 0;
        let mut set = |c: &AtomicU64| {
            n += 1;
            c.store(k as u64 * 1000 + n, Relaxed);
        };
        set(&w.connections_open);
        set(&w.connections_accepted);
        set(&w.handshakes_accepted);
        w.handshakes_rejected.iter().for_each(&mut set);
        set(&w.handshake_timeouts);
        set(&w.protocol_errors);
        set(&w.messages_echoed);
        set(&w.accept_errors);
        set(&w.receives_starved);
        w.tls_handshakes.iter().for_each(&mut set);
        w.tls_failures.iter().for_each(&mut set);
        set(&w.http_requests);
        set(&w.control_errors);
        set(&w.subscriptions);
        set(&w.pattern_subscriptions);
        set(&w.messages_published);
        set(&w.messages_after_close);
        set(&w.frames_sent);
        set(&w.bytes_sent);
        set(&w.frames_dropped);
        set(&w.publications_replaced);
        set(&w.publications_conflated);
        set(&w.publications_compressed);
        set(&w.compression_skipped);
        set(&w.compressed_bytes_saved);
        set(&w.recoveries_deferred);
        set(&w.recoveries_complete);
        set(&w.recoveries_incomplete);
        set(&w.messages_recovered);
        set(&w.snapshots_sent);
        set(&w.slow_consumer_disconnects);
        set(&w.slow_consumer_discarded_bytes);
        set(&w.keepalive_pings);
        set(&w.keepalive_timeouts);
        set(&w.publishers_throttled);
        w.connections_refused.iter().for_each(&mut set);
        w.origin_refused.iter().for_each(&mut set);
        w.proxy_refused.iter().for_each(&mut set);
        w.auth_refused.iter().for_each(&mut set);
        set(&w.tokens_expired);
        set(&w.operator_disconnects);
        set(&w.publish_rate_limited);
        set(&w.publishers_paced);
        w.ws_failures.iter().for_each(&mut set);
        set(&w.budget_closes);
        set(&w.message_timeouts);
        set(&w.send_timeouts);
        set(&w.send_timeout_discarded_bytes);
        set(&w.metrics_renders);
        set(&w.memory_trims);
        set(&w.deliveries_deferred);
        w.undelivered.iter().for_each(&mut set);
        set(&w.buffered_bytes);
        for h in [&w.latency, &w.handoff_latency, &w.first_write_latency] {
            h.buckets.iter().for_each(&mut set);
            set(&h.sum_ns);
        }
    }
    ws
}

/// Cluster counters, every one nonzero.
fn busy_cluster() -> crate::server::cluster::ClusterStats {
    let c = crate::server::cluster::ClusterStats::default();
    for a in [
        &c.published,
        &c.published_bytes,
        &c.refused,
        &c.too_large,
        &c.rejected,
        &c.conflicts,
        &c.failures,
        &c.abandoned,
        &c.received,
        &c.received_bytes,
        &c.duplicates,
        &c.gaps,
        &c.restarts,
        &c.foreign,
        &c.connects,
        &c.slow_consumer,
        &c.subscribes_deferred,
        &c.subscriptions,
        &c.unconfirmed,
        &c.missed,
    ] {
        a.store(3, std::sync::atomic::Ordering::Relaxed);
    }
    c.latency
        .buckets
        .iter()
        .for_each(|b| b.store(1, std::sync::atomic::Ordering::Relaxed));
    c.latency
        .sum_ns
        .store(5, std::sync::atomic::Ordering::Relaxed);
    c
}

/// The metric family of a sample line: its name without labels, and
/// without a histogram's `_bucket`, `_sum` or `_count`.
fn family<'a>(line: &'a str, histogram: &'a str) -> &'a str {
    let name = line.split([' ', '{']).next().unwrap();
    if let Some(rest) = name.strip_prefix(histogram)
        && ["_bucket", "_sum", "_count"].contains(&rest)
    {
        return histogram;
    }
    name
}

/// The whole rendering: every family once, a `# HELP` line, a `# TYPE`
/// line, then its samples; families and types as docs/PROTOCOL.md lists
/// them; every sample nonzero (no counter left unread); sums over the
/// workers, per-worker, labelled and histogram values where they belong.
#[test]
fn every_metric_once_with_help_and_type_as_documented() {
    let ws = busy_workers();
    let mut text = render(&ws, 7, 11);
    let process = Process {
        draining: true,
        max_connections: 262_144,
        max_buffered_bytes: 1 << 30,
    };
    render_process(&mut text, process, Some(1_900_000_000), [3, 1], [1, 1]);
    render_jwks(&mut text, [5, 2], 1_900_000_000);
    render_history(&mut text, 4096, 12, 3, 2, 1);
    render_cluster(&mut text, true, 512, &busy_cluster());
    let documented: BTreeMap<&str, &str> = include_str!("../../docs/PROTOCOL.md")
        .lines()
        .filter(|l| l.starts_with("| `corecast_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`'), cells[2])
        })
        .collect();
    let mut rendered: BTreeMap<&str, &str> = BTreeMap::new();
    let mut samples: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(help) = lines.next() {
        let (name, help_text) = help
            .strip_prefix("# HELP ")
            .and_then(|h| h.split_once(' '))
            .unwrap_or_else(|| panic!("expected a # HELP line, got {help:?}"));
        assert!(!help_text.is_empty(), "{name}: empty help");
        let kind = lines
            .next()
            .and_then(|t| t.strip_prefix(&format!("# TYPE {name} ")))
            .unwrap_or_else(|| panic!("{name}: no # TYPE line after # HELP"));
        assert!(
            rendered.insert(name, kind).is_none(),
            "{name} rendered twice"
        );
        samples.insert(name, 0);
        while let Some(l) = lines.next_if(|l| !l.starts_with('#')) {
            assert_eq!(family(l, name), name, "sample {l:?} under {name}");
            let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v > 0.0, "{l}: a counter left unread");
            *samples.get_mut(name).unwrap() += 1;
        }
    }
    assert_eq!(rendered, documented, "rendered vs docs/PROTOCOL.md");
    for (name, n) in &samples {
        assert!(*n > 0, "{name} has no sample");
    }
    let both = |f: fn(&WorkerStats) -> &AtomicU64| get(f(&ws[0])) + get(f(&ws[1]));
    let latency_sum_s = both(|w| &w.latency.sum_ns) as f64 / 1e9;
    let buckets: u64 = ws.iter().flat_map(|w| &w.latency.buckets).map(get).sum();
    let handoff: u64 = ws.iter().map(|w| w.handoff_latency.count()).sum();
    let stopped = Undelivered::WorkerStopped.index();
    for line in [
        "corecast_connections_open{worker=\"0\"} 1".to_string(),
        "corecast_connections_open{worker=\"1\"} 1001".to_string(),
        format!("corecast_frames_sent_total {}", both(|w| &w.frames_sent)),
        format!("corecast_subscriptions {}", both(|w| &w.subscriptions)),
        format!(
            "corecast_handshakes_rejected_total{{status=\"404\"}} {}",
            both(|w| &w.handshakes_rejected[Status::NotFound.index()])
        ),
        format!(
            "corecast_ws_failures_total{{code=\"1009\"}} {}",
            both(|w| &w.ws_failures[3])
        ),
        format!(
            "corecast_frames_undelivered_total{{reason=\"worker_stopped\"}} {}",
            get(&ws[0].undelivered[stopped]) + get(&ws[1].undelivered[stopped]) + 11
        ),
        "corecast_topics 7".to_string(),
        format!("corecast_publish_to_write_seconds_bucket{{le=\"+Inf\"}} {buckets}"),
        format!("corecast_publish_to_write_seconds_count {buckets}"),
        format!("corecast_publish_to_write_seconds_sum {latency_sum_s}"),
        format!("corecast_publish_to_delivery_seconds_count {handoff}"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[test]
fn renders_sums_and_a_cumulative_histogram() {
    let ws: Vec<WorkerStats> = (0..2).map(|_| WorkerStats::default()).collect();
    ws[0].connection_opened();
    ws[1].connection_opened();
    ws[1].frames_sent(5);
    ws[0].handshake_rejected(Status::NotFound);
    ws[0].observe_latency(Duration::from_micros(30));
    ws[1].observe_latency(Duration::from_millis(2));
    let text = render(&ws, 3, 0);
    for line in [
        "corecast_connections_open{worker=\"1\"} 1",
        "corecast_frames_sent_total 5",
        "corecast_handshakes_rejected_total{status=\"404\"} 1",
        "corecast_topics 3",
        "corecast_publish_to_write_seconds_bucket{le=\"0.00005\"} 1",
        "corecast_publish_to_write_seconds_bucket{le=\"0.0025\"} 2",
        "corecast_publish_to_write_seconds_bucket{le=\"+Inf\"} 2",
        "corecast_publish_to_write_seconds_count 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Every sample line is `name{labels} value` with a numeric value.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let v = l.rsplit(' ').next().unwrap();
        assert!(v.parse::<f64>().is_ok(), "{l}");
    }
}
