//! What one shard's storm measured ([`StormCounts`], part of its
//! `ShardReport`), and the merge of every shard's into [`StormTotals`]:
//! counts summed, histograms merged bucket by bucket, the storm's span
//! from the earliest drop to the latest catching up.

use crate::hist::{Hist, HistWire};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One shard's storm figures. Counts of topics are per (subscriber,
/// topic); the rest per subscriber unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StormCounts {
    /// Subscribers dropped (open at the drop and selected).
    pub dropped: u64,
    /// Selected subscribers whose connection had already ended at the drop.
    pub not_open_at_drop: u64,
    /// Reconnects started (a new connection's handshake begun).
    pub reconnects: u64,
    /// Reconnects that opened (a 101) and sent their `subscribe`.
    pub reopened: u64,
    /// Dropped subscribers that got their `subscribed` reply.
    pub resubscribed: u64,
    /// Dropped subscribers that did not get it, by cause (`handshake:…`
    /// from the failed handshakes' causes, `subscribe_error:…`,
    /// `ended_before_reply`, `not_reconnected_by_the_end`).
    pub reconnect_failures: BTreeMap<String, u64>,
    /// Topics recovered completely (per reply entry).
    pub recoveries_complete: u64,
    /// Topics recovered incompletely, by the reply's `reason`.
    pub recoveries_incomplete: BTreeMap<String, u64>,
    /// Topics sent with `since` that the reply gave no recovery for.
    pub recoveries_missing: u64,
    /// Publications the replies announced (`to - from + 1`, summed).
    pub recovered_announced: u64,
    /// Recovered publications received (within `from ..= to`).
    pub recovered_received: u64,
    /// Numbers incomplete recoveries said are lost (`from - since - 1`).
    pub announced_lost: u64,
    /// Topics a dropped subscriber had no position for (resubscribed
    /// without `since`).
    pub no_position: u64,
    /// `subscribe`s answered "recovery busy" and sent again after the
    /// server's `retry_ms` (its `--max-recovery-rate`).
    pub busy_retries: u64,
    /// Numbers skipped that nothing announced.
    pub gaps: u64,
    pub subscribers_with_gaps: u64,
    /// Numbers at or below the last one received (same epoch).
    pub duplicates: u64,
    pub subscribers_with_duplicates: u64,
    /// New epochs no recovery announced.
    pub epoch_changes: u64,
    /// Numbers conflation markers accounted for.
    pub conflated: u64,
    /// Snapshot markers read (last values on subscribe; those right after
    /// a subscriber's first 101 arrive during the ramp-up, which reads no
    /// frames, so their publication is the topic's first here).
    pub snapshots: u64,
    /// What a subscriber should not have been sent, by what it was.
    pub unexpected: BTreeMap<String, u64>,
    /// Resubscribed subscribers that got a live publication on every
    /// recovered topic (or, see below, replayed up to the last one).
    pub caught_up: u64,
    /// Of those, subscribers whose recoveries reached the last publication:
    /// no live one followed; caught up when the replay was over.
    pub caught_up_at_the_end: u64,
    /// Resubscribed subscribers that did not (by the end of the phase).
    pub not_caught_up: u64,
    /// Subscribers (not failed) without the last publication of every
    /// topic at the end, and the publications they lack.
    pub tail_incomplete: u64,
    pub tail_missing: u64,
    /// Publications without loadgen's payload header.
    pub no_header: u64,
    /// When this shard dropped its subscribers (`clock::mono_ns`).
    pub drop_ns: Option<u64>,
    /// When its last subscriber caught up.
    pub last_caught_up_ns: Option<u64>,
    /// From the drop to caught up (the first live publication on every
    /// recovered topic), ns.
    pub caught_up_from_drop: HistWire,
    /// From the start of the reconnect (after the jitter) to caught up, ns.
    pub caught_up_from_reconnect: HistWire,
    /// The reconnects' connect-to-101 latency, ns.
    pub reconnect_handshake: HistWire,
    /// From sending the `subscribe` to its reply, ns.
    pub reply_latency: HistWire,
}

/// Every shard's storm figures, merged.
#[derive(Debug, Clone, Default)]
pub struct StormTotals {
    /// Counts summed; the histograms are below, the times min / max.
    pub counts: StormCounts,
    pub caught_up_from_drop: Hist,
    pub caught_up_from_reconnect: Hist,
    pub reconnect_handshake: Hist,
    pub reply_latency: Hist,
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl StormTotals {
    pub fn merge<'a>(shards: impl IntoIterator<Item = &'a StormCounts>) -> Self {
        let mut t = Self::default();
        for s in shards {
            let c = &mut t.counts;
            c.dropped += s.dropped;
            c.not_open_at_drop += s.not_open_at_drop;
            c.reconnects += s.reconnects;
            c.reopened += s.reopened;
            c.resubscribed += s.resubscribed;
            add_counts(&mut c.reconnect_failures, &s.reconnect_failures);
            c.recoveries_complete += s.recoveries_complete;
            add_counts(&mut c.recoveries_incomplete, &s.recoveries_incomplete);
            c.recoveries_missing += s.recoveries_missing;
            c.recovered_announced += s.recovered_announced;
            c.recovered_received += s.recovered_received;
            c.announced_lost += s.announced_lost;
            c.no_position += s.no_position;
            c.busy_retries += s.busy_retries;
            c.gaps += s.gaps;
            c.subscribers_with_gaps += s.subscribers_with_gaps;
            c.duplicates += s.duplicates;
            c.subscribers_with_duplicates += s.subscribers_with_duplicates;
            c.epoch_changes += s.epoch_changes;
            c.conflated += s.conflated;
            c.snapshots += s.snapshots;
            add_counts(&mut c.unexpected, &s.unexpected);
            c.caught_up += s.caught_up;
            c.caught_up_at_the_end += s.caught_up_at_the_end;
            c.not_caught_up += s.not_caught_up;
            c.tail_incomplete += s.tail_incomplete;
            c.tail_missing += s.tail_missing;
            c.no_header += s.no_header;
            c.drop_ns = match (c.drop_ns, s.drop_ns) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            c.last_caught_up_ns = c.last_caught_up_ns.max(s.last_caught_up_ns);
            t.caught_up_from_drop.add_wire(&s.caught_up_from_drop);
            t.caught_up_from_reconnect
                .add_wire(&s.caught_up_from_reconnect);
            t.reconnect_handshake.add_wire(&s.reconnect_handshake);
            t.reply_latency.add_wire(&s.reply_latency);
        }
        t
    }

    /// Dropped subscribers that did not get their reply.
    pub fn failed(&self) -> u64 {
        self.counts.reconnect_failures.values().sum()
    }

    /// Topics recovered incompletely.
    pub fn incomplete(&self) -> u64 {
        self.counts.recoveries_incomplete.values().sum()
    }

    /// Frames the server should not have sent.
    pub fn unexpected(&self) -> u64 {
        self.counts.unexpected.values().sum()
    }

    /// From the first drop to the last subscriber caught up, in seconds.
    pub fn storm_s(&self) -> Option<f64> {
        let (a, b) = (self.counts.drop_ns?, self.counts.last_caught_up_ns?);
        Some(b.saturating_sub(a) as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_counts_maps_spans_and_histograms() {
        let mut h = Hist::default();
        h.record_ns(5_000_000);
        let a = StormCounts {
            dropped: 10,
            resubscribed: 9,
            gaps: 1,
            drop_ns: Some(100),
            last_caught_up_ns: Some(900),
            caught_up_from_drop: h.to_wire(),
            reconnect_failures: [("handshake:timeout".to_string(), 1)].into(),
            recoveries_incomplete: [("too_old".to_string(), 2)].into(),
            ..Default::default()
        };
        let b = StormCounts {
            dropped: 5,
            resubscribed: 5,
            drop_ns: Some(90),
            last_caught_up_ns: Some(2_000_000_090),
            caught_up_from_drop: h.to_wire(),
            recoveries_incomplete: [("too_old".to_string(), 1)].into(),
            ..Default::default()
        };
        let t = StormTotals::merge([&a, &b]);
        assert_eq!(
            (t.counts.dropped, t.counts.resubscribed, t.counts.gaps),
            (15, 14, 1)
        );
        assert_eq!((t.failed(), t.incomplete(), t.unexpected()), (1, 3, 0));
        assert_eq!(t.caught_up_from_drop.len(), 2);
        assert_eq!(t.storm_s(), Some(2.0));
        assert_eq!(StormTotals::merge([]).storm_s(), None);
    }
}
