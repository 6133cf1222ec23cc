//! What one shard's conflation run measured ([`ConflationCounts`], part of
//! its `ShardReport`): the same figures for normal and for slow
//! subscribers ([`ClassCounts`]), and their merge over the shards: counts
//! summed, maxima taken, staleness histograms merged bucket by bucket.

use crate::hist::{Hist, HistWire};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How far behind the publisher's last publication a set of (subscriber,
/// topic) positions is, in numbers, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behind {
    /// (subscriber, topic) positions measured (open subscribers only).
    pub positions: u64,
    /// Of those, positions without the topic's last publication.
    pub behind: u64,
    /// Numbers they are behind, summed, and the most of one.
    pub sum: u64,
    pub max: u64,
}

impl Behind {
    /// One position `lag` numbers behind (0: it has the last one).
    pub fn record(&mut self, lag: u64) {
        self.positions += 1;
        self.behind += u64::from(lag > 0);
        self.sum += lag;
        self.max = self.max.max(lag);
    }

    pub fn add(&mut self, o: &Behind) {
        self.positions += o.positions;
        self.behind += o.behind;
        self.sum += o.sum;
        self.max = self.max.max(o.max);
    }

    /// Mean numbers behind per position.
    pub fn mean(&self) -> f64 {
        if self.positions == 0 {
            0.0
        } else {
            self.sum as f64 / self.positions as f64
        }
    }
}

/// The figures of one class of subscribers (normal or slow).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassCounts {
    /// Subscribers followed (up when the phase began).
    pub subscribers: u64,
    /// Of those, connections that ended before the close (the server's
    /// 1008 among them; the causes are in the fleet's `ended`).
    pub ended: u64,
    /// Data frames received.
    pub frames: u64,
    /// Publications received (live, with or without a marker).
    pub publications: u64,
    /// `conflated` markers read, and their `replaced` summed.
    pub markers: u64,
    pub replaced: u64,
    /// Numbers skipped that a marker accounted for.
    pub conflated: u64,
    /// Numbers skipped that nothing announced.
    pub gaps: u64,
    pub subscribers_with_gaps: u64,
    /// Numbers at or below the last one received (same epoch).
    pub duplicates: u64,
    pub subscribers_with_duplicates: u64,
    /// New epochs (nothing announces one here).
    pub epoch_changes: u64,
    /// Snapshot markers (a last value; its publication is no staleness sample).
    pub snapshots: u64,
    /// Publications without loadgen's payload header (no staleness sample).
    pub no_header: u64,
    /// What a subscriber should not have been sent, by what it was.
    pub unexpected: BTreeMap<String, u64>,
    /// Frames that are no envelope.
    pub malformed: u64,
    /// How far behind when publishing stopped (before the drain).
    pub behind_at_publish_end: Behind,
    /// How far behind at the end of the drain.
    pub behind_at_end: Behind,
    /// Open subscribers without every topic's last publication at the end.
    pub tail_incomplete: u64,
    /// At each publication received: how old it was (receive time minus
    /// the publisher's send time), ns.
    pub staleness: HistWire,
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl ClassCounts {
    /// Adds another shard's figures (the staleness histogram apart: see
    /// [`ConflationTotals`]).
    fn add(&mut self, o: &ClassCounts) {
        self.subscribers += o.subscribers;
        self.ended += o.ended;
        self.frames += o.frames;
        self.publications += o.publications;
        self.markers += o.markers;
        self.replaced += o.replaced;
        self.conflated += o.conflated;
        self.gaps += o.gaps;
        self.subscribers_with_gaps += o.subscribers_with_gaps;
        self.duplicates += o.duplicates;
        self.subscribers_with_duplicates += o.subscribers_with_duplicates;
        self.epoch_changes += o.epoch_changes;
        self.snapshots += o.snapshots;
        self.no_header += o.no_header;
        add_counts(&mut self.unexpected, &o.unexpected);
        self.malformed += o.malformed;
        self.behind_at_publish_end.add(&o.behind_at_publish_end);
        self.behind_at_end.add(&o.behind_at_end);
        self.tail_incomplete += o.tail_incomplete;
    }

    /// Frames the server should not have sent, or that did not read.
    pub fn unexpected_total(&self) -> u64 {
        self.unexpected.values().sum::<u64>() + self.malformed
    }
}

/// One shard's conflation figures: `[normal, slow]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConflationCounts {
    pub classes: [ClassCounts; 2],
}

/// Index of the normal subscribers in [`ConflationCounts::classes`].
pub const NORMAL: usize = 0;
/// Index of the slow subscribers.
pub const SLOW: usize = 1;

/// Every shard's conflation figures, merged: `[normal, slow]`.
#[derive(Debug, Clone, Default)]
pub struct ConflationTotals {
    pub classes: [ClassCounts; 2],
    pub staleness: [Hist; 2],
}

impl ConflationTotals {
    pub fn merge<'a>(shards: impl IntoIterator<Item = &'a ConflationCounts>) -> Self {
        let mut t = Self::default();
        for s in shards {
            for k in [NORMAL, SLOW] {
                t.classes[k].add(&s.classes[k]);
                t.staleness[k].add_wire(&s.classes[k].staleness);
            }
        }
        t
    }

    /// Both classes' sum of a count.
    pub fn sum(&self, f: impl Fn(&ClassCounts) -> u64) -> u64 {
        self.classes.iter().map(f).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_records_and_adds() {
        let mut b = Behind::default();
        for lag in [0, 0, 3, 5] {
            b.record(lag);
        }
        assert_eq!((b.positions, b.behind, b.sum, b.max), (4, 2, 8, 5));
        assert_eq!(b.mean(), 2.0);
        let mut c = Behind::default();
        c.record(9);
        b.add(&c);
        assert_eq!((b.positions, b.behind, b.max), (5, 3, 9));
        assert_eq!(Behind::default().mean(), 0.0);
    }

    #[test]
    fn classes_merge_apart() {
        let mut h = Hist::default();
        h.record_ns(2_000_000);
        let mut a = ConflationCounts::default();
        a.classes[SLOW].markers = 3;
        a.classes[SLOW].staleness = h.to_wire();
        a.classes[NORMAL].gaps = 1;
        a.classes[NORMAL].unexpected.insert("x".into(), 2);
        let mut b = a.clone();
        b.classes[SLOW].behind_at_end.record(4);
        let t = ConflationTotals::merge([&a, &b]);
        assert_eq!(t.classes[SLOW].markers, 6);
        assert_eq!(t.classes[NORMAL].gaps, 2);
        assert_eq!(t.classes[NORMAL].unexpected_total(), 4);
        assert_eq!(t.staleness[SLOW].len(), 2);
        assert!(t.staleness[NORMAL].is_empty());
        assert_eq!(t.classes[SLOW].behind_at_end.max, 4);
        assert_eq!(t.sum(|c| c.gaps), 2);
    }
}
