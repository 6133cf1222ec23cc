//! Latency histograms (HdrHistogram, nanoseconds) that cross process
//! boundaries: each shard sends the non-empty buckets of its histogram as
//! `(value, count)` pairs and the parent adds them into its own.
//!
//! Every histogram here has the same configuration ([`LOWEST_NS`] ..
//! [`HIGHEST_NS`], [`SIGNIFICANT_DIGITS`]), so a bucket's highest equivalent
//! value lands in the same bucket on the other side: merging is exact.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Smallest value tracked: 1 ns.
const LOWEST_NS: u64 = 1;
/// Largest value tracked: one hour (no run lasts longer; see `MAX_SECS`).
const HIGHEST_NS: u64 = 3_600_000_000_000;
/// Three significant digits: 0.1% resolution at every magnitude.
const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency histogram in nanoseconds.
#[derive(Debug, Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Self(
            Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        )
    }
}

/// A histogram on the wire: its non-empty buckets, `[value_ns, count]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistWire(pub Vec<[u64; 2]>);

/// The percentiles every report gives.
pub const QUANTILES: [(&str, f64); 4] =
    [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];

impl Hist {
    /// Records one sample (clamped to the tracked range).
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at quantile `q` (0..=1), in nanoseconds.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        (!self.is_empty()).then(|| self.0.value_at_quantile(q))
    }

    pub fn max_ns(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.0.max())
    }

    pub fn min_ns(&self) -> Option<u64> {
        (!self.is_empty()).then(|| self.0.min())
    }

    pub fn to_wire(&self) -> HistWire {
        HistWire(
            self.0
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        )
    }

    /// Adds a histogram received from another shard.
    pub fn add_wire(&mut self, w: &HistWire) {
        for &[value, count] in &w.0 {
            // In range by construction (same bounds on both sides); a
            // malformed value is clamped like a sample.
            let _ = self.0.record_n(value.clamp(LOWEST_NS, HIGHEST_NS), count);
        }
    }

    #[cfg(test)]
    pub fn add(&mut self, other: &Hist) {
        self.0
            .add(&other.0)
            .expect("histograms of one configuration");
    }

    /// `{p50, p90, p99, p999, max}` in microseconds (`null`s when empty).
    pub fn to_json_us(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (name, q) in QUANTILES {
            m.insert(name.into(), serde_json::json!(self.quantile_ns(q).map(us)));
        }
        m.insert("max".into(), serde_json::json!(self.max_ns().map(us)));
        m.insert("min".into(), serde_json::json!(self.min_ns().map(us)));
        m.insert(
            "mean".into(),
            serde_json::json!((!self.is_empty()).then(|| self.0.mean() / 1e3)),
        );
        m.insert("count".into(), serde_json::json!(self.len()));
        serde_json::Value::Object(m)
    }

    /// `p50 1.23 ms, p90 ..., max ...` for the human summary.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "n/a (no samples)".into();
        }
        let mut parts: Vec<String> = QUANTILES
            .iter()
            .map(|&(name, q)| format!("{name} {}", human_ns(self.0.value_at_quantile(q))))
            .collect();
        parts.push(format!("max {}", human_ns(self.0.max())));
        format!("{} ({} samples)", parts.join(", "), self.len())
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// `812 ns`, `35.2 us`, `4.10 ms`, `1.25 s`.
pub fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(range: std::ops::Range<u64>, step: u64) -> Hist {
        let mut h = Hist::default();
        for v in range.step_by(step as usize) {
            h.record_ns(v);
        }
        h
    }

    #[test]
    fn merging_wire_forms_equals_recording_everything_in_one() {
        // Three "processes" with different, overlapping ranges.
        let parts = [
            filled(1..50_000, 7),
            filled(20_000..5_000_000, 997),
            filled(1_000_000..2_000_000_000, 1_000_003),
        ];
        let mut merged = Hist::default();
        let mut direct = Hist::default();
        for p in &parts {
            // Through JSON, as between processes.
            let text = serde_json::to_string(&p.to_wire()).unwrap();
            merged.add_wire(&serde_json::from_str(&text).unwrap());
            direct.add(p);
        }
        assert_eq!(merged.len(), parts.iter().map(Hist::len).sum::<u64>());
        assert_eq!(merged.to_wire(), direct.to_wire());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.quantile_ns(q), direct.quantile_ns(q), "q {q}");
        }
        assert_eq!(merged.max_ns(), direct.max_ns());
        assert_eq!(merged.min_ns(), Some(1));
    }

    #[test]
    fn merging_is_exact_at_the_bucket_edges() {
        let mut a = Hist::default();
        for v in [1, 2047, 2048, 2049, 123_456_789, HIGHEST_NS] {
            a.record_ns(v);
        }
        let mut b = Hist::default();
        b.add_wire(&a.to_wire());
        b.add_wire(&a.to_wire());
        assert_eq!(b.len(), 12);
        for q in [0.0, 0.3, 0.5, 0.8, 1.0] {
            assert_eq!(b.quantile_ns(q), a.quantile_ns(q));
        }
    }

    #[test]
    fn empty_and_clamped() {
        let mut h = Hist::default();
        assert_eq!(h.quantile_ns(0.5), None);
        assert!(h.to_json_us()["p50"].is_null());
        assert_eq!(h.to_wire(), HistWire::default());
        h.record_ns(0);
        h.record_ns(u64::MAX);
        assert_eq!(h.min_ns(), Some(1));
        assert!(h.max_ns().unwrap() >= HIGHEST_NS);
        assert_eq!(human_ns(999), "999 ns");
        assert_eq!(human_ns(35_200), "35.2 us");
        assert_eq!(human_ns(4_100_000), "4.10 ms");
    }
}
