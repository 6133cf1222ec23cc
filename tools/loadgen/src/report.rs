//! The parent's view of a run: shard reports merged into [`Totals`], and
//! small helpers for the human summary.

use crate::fleet::CloseStats;
use crate::hist::Hist;
use crate::wire::ShardReport;
use std::collections::BTreeMap;

/// Every shard's figures, merged: counts summed, histograms merged bucket
/// by bucket, time spans from the earliest start to the latest end.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub shards: usize,
    pub requested: usize,
    pub up: usize,
    pub failures: BTreeMap<String, u64>,
    pub ended: BTreeMap<String, u64>,
    pub ramp_start_ns: Option<u64>,
    pub ramp_end_ns: Option<u64>,
    pub connect_latency: Hist,
    pub open_at_end: usize,
    pub pings_answered: u64,
    pub pongs_received: u64,
    pub messages_received: u64,
    pub fragments_received: u64,
    pub tracked: u64,
    pub frames: u64,
    pub expected: u64,
    pub sent: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
    pub malformed: u64,
    pub wrong_opcode: u64,
    pub payload_bytes: u64,
    pub verified: u64,
    pub deflate_agreed: u64,
    pub compressed_received: u64,
    pub with_loss: u64,
    pub with_reorder: u64,
    pub complete: u64,
    pub first_receive_ns: Option<u64>,
    pub last_receive_ns: Option<u64>,
    pub latency: Hist,
    pub drain_timed_out: bool,
    pub phase_start_ns: Option<u64>,
    pub phase_end_ns: Option<u64>,
    pub phase_cpu_s: f64,
    /// Highest measured-phase CPU / wall of one shard (1.0 = a full core).
    pub max_phase_load: f64,
    /// Event-loop threads' CPU over the whole run, summed.
    pub cpu_s: f64,
    /// Largest resident set of one shard.
    pub max_rss: u64,
    pub close: CloseStats,
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    a.max(b)
}

impl Totals {
    pub fn merge(reports: &[ShardReport]) -> Self {
        let mut t = Self {
            shards: reports.len(),
            ..Default::default()
        };
        for r in reports {
            t.requested += r.requested;
            t.up += r.up;
            add_counts(&mut t.failures, &r.failures);
            add_counts(&mut t.ended, &r.ended);
            if r.requested > 0 {
                t.ramp_start_ns = min_opt(t.ramp_start_ns, Some(r.ramp_start_ns));
                t.ramp_end_ns = max_opt(t.ramp_end_ns, Some(r.ramp_end_ns));
            }
            t.connect_latency.add_wire(&r.connect_latency);
            t.open_at_end += r.open_at_end;
            t.pings_answered += r.pings_answered;
            t.pongs_received += r.pongs_received;
            t.messages_received += r.messages_received;
            t.fragments_received += r.fragments_received;
            t.tracked += r.tracked;
            t.frames += r.frames;
            t.expected += r.expected;
            t.sent += r.sent;
            t.lost += r.lost;
            t.out_of_order += r.out_of_order;
            t.duplicates += r.duplicates;
            t.malformed += r.malformed;
            t.wrong_opcode += r.wrong_opcode;
            t.payload_bytes += r.payload_bytes;
            t.verified += r.verified;
            t.deflate_agreed += r.deflate_agreed;
            t.compressed_received += r.compressed_received;
            t.with_loss += r.with_loss;
            t.with_reorder += r.with_reorder;
            t.complete += r.complete;
            t.first_receive_ns = min_opt(t.first_receive_ns, r.first_receive_ns);
            t.last_receive_ns = max_opt(t.last_receive_ns, r.last_receive_ns);
            t.latency.add_wire(&r.latency);
            t.drain_timed_out |= r.drain_timed_out;
            t.phase_start_ns = min_opt(t.phase_start_ns, Some(r.phase_start_ns));
            t.phase_end_ns = max_opt(t.phase_end_ns, Some(r.phase_end_ns));
            t.phase_cpu_s += r.phase_cpu_s;
            let wall = r.phase_end_ns.saturating_sub(r.phase_start_ns) as f64 / 1e9;
            if wall > 0.0 {
                t.max_phase_load = t.max_phase_load.max(r.phase_cpu_s / wall);
            }
            t.cpu_s += r.cpu_s;
            t.max_rss = t.max_rss.max(r.max_rss);
            t.close.clean += r.close.clean;
            t.close.timed_out += r.close.timed_out;
        }
        t
    }

    /// Failed to open, in total.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Ended before the close, in total.
    pub fn ended_early(&self) -> u64 {
        self.ended.values().sum()
    }

    /// First connect of any shard to the last handshake of any shard.
    pub fn ramp_s(&self) -> f64 {
        match (self.ramp_start_ns, self.ramp_end_ns) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e9,
            _ => 0.0,
        }
    }

    pub fn handshakes_per_s(&self) -> f64 {
        per_s(self.up as f64, self.ramp_s())
    }
}

/// `count / secs`, 0 for an empty span.
pub fn per_s(count: f64, secs: f64) -> f64 {
    if secs > 0.0 { count / secs } else { 0.0 }
}

/// `100 * part / whole`, 0 for an empty whole.
pub fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// `1.5 MiB`, `812 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `timeout: 3, handshake_status_503: 2`, or `none`.
pub fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::Hist;

    fn shard(i: usize, up: usize, start: u64, end: u64, lat: &[u64]) -> ShardReport {
        let mut h = Hist::default();
        lat.iter().for_each(|&v| h.record_ns(v));
        let mut r = ShardReport {
            shard: i,
            requested: up + 1,
            up,
            ramp_start_ns: start,
            ramp_end_ns: end,
            connect_latency: h.to_wire(),
            latency: h.to_wire(),
            frames: 10,
            expected: 12,
            lost: 2,
            with_loss: 1,
            first_receive_ns: Some(start + 5),
            last_receive_ns: Some(end + 5),
            phase_start_ns: start,
            phase_end_ns: start + 2_000_000_000,
            phase_cpu_s: 0.5 * (i + 1) as f64,
            cpu_s: 1.0,
            max_rss: 100 * (i as u64 + 1),
            ..Default::default()
        };
        r.failures.insert("timeout".into(), 1);
        r
    }

    #[test]
    fn merges_counts_spans_and_histograms() {
        let a = shard(0, 10, 1_000, 2_000_000_000, &[1_000, 2_000, 3_000]);
        let b = shard(1, 20, 500, 1_500_000_000, &[10_000_000]);
        let t = Totals::merge(&[a, b]);
        assert_eq!((t.shards, t.requested, t.up, t.failed()), (2, 32, 30, 2));
        assert_eq!(
            (t.ramp_start_ns, t.ramp_end_ns),
            (Some(500), Some(2_000_000_000))
        );
        assert!((t.handshakes_per_s() - 30.0 / 1.9999995).abs() < 1e-6);
        assert_eq!((t.frames, t.expected, t.lost, t.with_loss), (20, 24, 4, 2));
        assert_eq!(
            (t.first_receive_ns, t.last_receive_ns),
            (Some(505), Some(2_000_000_005))
        );
        assert_eq!(t.latency.len(), 4);
        assert_eq!(
            t.connect_latency.quantile_ns(0.5).map(|v| v / 100),
            Some(20)
        );
        assert_eq!(t.latency.max_ns().map(|v| v / 1_000_000), Some(10));
        assert_eq!((t.cpu_s, t.max_rss), (2.0, 200));
        assert!((t.phase_cpu_s - 1.5).abs() < 1e-9);
        assert!((t.max_phase_load - 0.5).abs() < 1e-9);
    }

    #[test]
    fn units() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        let mut m = BTreeMap::new();
        assert_eq!(counts(&m), "none");
        m.insert("timeout".to_string(), 3);
        m.insert("bad_accept".to_string(), 1);
        assert_eq!(counts(&m), "bad_accept: 1, timeout: 3");
        assert_eq!((per_s(10.0, 0.0), pct(1.0, 4.0)), (0.0, 25.0));
    }
}
