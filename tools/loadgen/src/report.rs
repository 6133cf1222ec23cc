//! Small helpers for reports: latency percentiles and human-readable units.

use std::collections::BTreeMap;

/// Percentiles of connect latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// From microsecond samples sorted ascending (nearest-rank percentiles).
    pub fn from_sorted_us(sorted: &[u32]) -> Option<Self> {
        let ms = |us: u32| f64::from(us) / 1000.0;
        Some(Self {
            p50: ms(nearest_rank(sorted, 50.0)?),
            p99: ms(nearest_rank(sorted, 99.0)?),
            max: ms(*sorted.last()?),
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "p50": self.p50, "p99": self.p99, "max": self.max })
    }
}

/// The smallest sample with at least `p` percent of samples at or below it.
pub fn nearest_rank(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
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

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 50.0), Some(50));
        assert_eq!(nearest_rank(&v, 99.0), Some(99));
        assert_eq!(nearest_rank(&v, 100.0), Some(100));
        assert_eq!(nearest_rank(&[7], 99.0), Some(7));
        assert_eq!(nearest_rank(&[], 50.0), None);
        let l = Latency::from_sorted_us(&[1000, 2000, 3000]).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (2.0, 3.0, 3.0));
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
    }
}
