//! What the parent and its shards say to each other: one JSON object per
//! line, over the child's stdin and stdout (or, for a run in one process, a
//! channel carrying the same lines).
//!
//! A shard moves through three barriers: `Ready` (its connections are up;
//! it waits for `Go`, or `Storm`), `Done` (the measured phase is over; it waits for
//! `Close`), `Finished` (closed; it exits). Each carries the shard's whole
//! [`ShardReport`] so far; the parent merges the reports of all shards.

use crate::cli::Plan;
use crate::fleet::CloseStats;
use crate::hist::HistWire;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Parent to shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToShard {
    /// The first message: which share of the run this shard opens.
    Start { shard: usize, plan: Box<Plan> },
    /// Every shard is up: start the measured phase. It ends at `end_ns`
    /// (`clock::mono_ns`) for hold and echo; for fanout, `end_ns` is only a
    /// limit and `Published` ends the phase.
    Go { end_ns: u64 },
    /// Storm: every shard is up and the publishers start now; drop the
    /// selected subscribers at `drop_ns`. `end_ns` is only a limit:
    /// `Published` ends the phase.
    Storm { drop_ns: u64, end_ns: u64 },
    /// Fanout and storm: publishing is over; `per_topic` messages went to
    /// each topic.
    /// Wait for them until every subscriber has all, or `drain_until_ns`.
    Published {
        per_topic: Vec<u64>,
        drain_until_ns: u64,
    },
    /// Close every connection and report.
    Close,
}

/// Shard to parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToParent {
    /// For the live progress line.
    Progress(Progress),
    Ready(Box<ShardReport>),
    Done(Box<ShardReport>),
    Finished(Box<ShardReport>),
    /// The shard cannot go on.
    Failed {
        error: String,
    },
}

/// A shard's counts right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub started: usize,
    pub open: usize,
    pub in_flight: usize,
    pub failed: u64,
    /// Fanout: frames received; echo: echoes received.
    pub received: u64,
}

/// Everything one shard measured. Times are `clock::mono_ns` values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    pub shard: usize,
    pub pid: u32,
    /// Connections this shard was to open.
    pub requested: usize,
    pub up: usize,
    pub failures: BTreeMap<String, u64>,
    pub ramp_start_ns: u64,
    pub ramp_end_ns: u64,
    /// Connect-to-101 latency, ns.
    pub connect_latency: HistWire,
    /// Connections open when the measured phase ended.
    pub open_at_end: usize,
    /// Open connections that ended before the close, by how.
    pub ended: BTreeMap<String, u64>,
    pub pings_answered: u64,
    pub pongs_received: u64,
    pub messages_received: u64,
    pub fragments_received: u64,
    /// Fanout: subscribers followed (up at `Go`); echo: connections sending.
    pub tracked: u64,
    /// Fanout: data frames received by subscribers; echo: echoes received.
    pub frames: u64,
    /// Fanout: frames the tracked subscribers should have received.
    pub expected: u64,
    /// Echo: messages sent.
    pub sent: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
    pub malformed: u64,
    /// Data frames of another opcode than the payloads' (binary, or text
    /// for a corpus).
    pub wrong_opcode: u64,
    /// Fanout: payload bytes of the data frames received, as they came
    /// (compressed ones compressed).
    #[serde(default)]
    pub payload_bytes: u64,
    /// Fanout: subscribers that decoded and checked what they received
    /// (`--verify-every`); the others of `tracked` counted frames.
    #[serde(default)]
    pub verified: u64,
    /// Connections that agreed to permessage-deflate.
    #[serde(default)]
    pub deflate_agreed: u64,
    /// Data messages received compressed.
    #[serde(default)]
    pub compressed_received: u64,
    /// Subscribers (echo: connections) with at least one lost message.
    pub with_loss: u64,
    /// Subscribers (echo: connections) with at least one late message.
    pub with_reorder: u64,
    /// Fanout: subscribers that received everything published to them.
    pub complete: u64,
    pub first_receive_ns: Option<u64>,
    pub last_receive_ns: Option<u64>,
    /// Publish-to-receive (fanout) or round-trip (echo) latency, ns.
    pub latency: HistWire,
    pub drain_timed_out: bool,
    pub phase_start_ns: u64,
    pub phase_end_ns: u64,
    /// CPU of the shard's event-loop thread in the measured phase.
    pub phase_cpu_s: f64,
    /// CPU of the shard's event-loop thread over the whole run.
    pub cpu_s: f64,
    pub max_rss: u64,
    pub close: CloseStats,
    /// Storm: the drop, the reconnects, the recoveries.
    #[serde(default)]
    pub storm: crate::storm::report::StormCounts,
    /// Conflation: staleness, markers, continuity, normal and slow apart.
    #[serde(default)]
    pub conflation: crate::conflation::report::ConflationCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_of_json_each_and_round_trip() {
        let mut r = ShardReport {
            shard: 2,
            up: 10,
            first_receive_ns: Some(5),
            ..Default::default()
        };
        r.failures.insert("timeout".into(), 3);
        r.latency = HistWire(vec![[1000, 2], [2047, 1]]);
        for m in [
            ToParent::Ready(Box::new(r.clone())),
            ToParent::Progress(Progress {
                open: 4,
                ..Default::default()
            }),
            ToParent::Failed {
                error: "x\ny".into(),
            },
        ] {
            let line = serde_json::to_string(&m).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<ToParent>(&line).unwrap(), m);
        }
        let go = serde_json::to_string(&ToShard::Go { end_ns: 7 }).unwrap();
        assert_eq!(go, r#"{"type":"go","end_ns":7}"#);
    }
}
