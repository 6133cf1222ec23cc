//! `loadgen fanout`, the subscribers' side: every shard's subscribers
//! check what they receive; the publisher (in the parent: `publish`) sends.
//!
//! Every payload is binary and starts with a 16-byte header, padded with
//! zeros to `--size` bytes:
//!
//! ```text
//! 0        8              16
//! | seq LE | sent_ns LE   | padding ...
//! ```
//!
//! `seq` numbers one topic's messages 0, 1, 2, ...; `sent_ns` is
//! `clock::mono_ns` (CLOCK_MONOTONIC, system-wide) when the message was
//! encoded, just before it was handed to the socket, so a subscriber in
//! another process measures publish-to-receive latency without clock
//! synchronisation.
//!
//! Each subscriber keeps a [`SeqTracker`]: gaps (lost messages),
//! late arrivals (reordering) and duplicates, per subscriber. The phase
//! ends when every open subscriber has everything published to its topic
//! (the parent says how much in `Published`), or at the drain deadline.

use crate::cli::FanoutPlan;
use crate::client::Sink;
use crate::clock::Anchor;
use crate::coord::Link;
use crate::fleet::{Fleet, PROGRESS_EVERY};
use crate::hist::Hist;
use crate::topics::{TopicMap, per_topic};
use crate::wire::{ShardReport, ToShard};
use corecast::proto::OpCode;
use corecast::proto::frame::{MAX_HEADER_LEN, encode_header};
use corecast::proto::mask::apply_mask;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Bytes of sequence number and timestamp at the start of each payload.
pub const PAYLOAD_HEADER: usize = 16;
/// Holes (runs of missing sequence numbers) remembered per subscriber;
/// beyond this, new holes are counted as lost but not remembered, and a
/// number below the highest seen that is in no remembered hole is then
/// ambiguous (counted as a late arrival while such untracked losses remain).
const MAX_TRACKED_GAPS: usize = 1024;

/// The payload header: sequence number and send time, little-endian.
pub fn encode_payload_header(seq: u64, sent_ns: u64) -> [u8; PAYLOAD_HEADER] {
    let mut h = [0u8; PAYLOAD_HEADER];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..].copy_from_slice(&sent_ns.to_le_bytes());
    h
}

/// `(seq, sent_ns)` from a payload; `None` if it is too short.
pub fn decode_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// Whether subscribers negotiated corecast's binary envelope (`--subprotocol
/// corecast.v1.binary`): the payload then starts after the envelope's
/// header and topic. Set once per process, before any connection.
static BINARY_ENVELOPE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`BINARY_ENVELOPE`].
pub fn expect_binary_envelope(yes: bool) {
    BINARY_ENVELOPE.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// The payload inside a binary envelope (`None`: not one).
fn unwrap_binary_envelope(frame: &[u8]) -> Option<&[u8]> {
    use corecast::pubsub::envelope::{BINARY_HEADER_LEN, BINARY_KIND_PUBLICATION};
    if frame.len() < BINARY_HEADER_LEN || frame[0] != BINARY_KIND_PUBLICATION {
        return None;
    }
    let n = u16::from_be_bytes([frame[2], frame[3]]) as usize;
    frame.get(BINARY_HEADER_LEN + n..)
}

/// What every received data frame updates, in fanout and in echo alike.
#[derive(Debug, Default)]
pub struct Arrivals {
    pub frames: u64,
    /// Too short to carry a sequence number and a send time.
    pub malformed: u64,
    /// Not a binary frame (counted; still decoded).
    pub not_binary: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Arrivals {
    /// Counts a data frame received at `at`; returns its `(seq, sent_ns)`,
    /// or `None` (counted as malformed) when it carries none.
    pub fn record(&mut self, opcode: OpCode, payload: &[u8], at: Instant) -> Option<(u64, u64)> {
        self.frames += 1;
        self.first.get_or_insert(at);
        self.last = Some(at);
        if opcode != OpCode::Binary {
            self.not_binary += 1;
        }
        let decoded = if BINARY_ENVELOPE.load(std::sync::atomic::Ordering::Relaxed) {
            unwrap_binary_envelope(payload).and_then(decode_payload)
        } else {
            decode_payload(payload)
        };
        if decoded.is_none() {
            self.malformed += 1;
        }
        decoded
    }

    /// The counts and the receive window into `r`.
    pub fn report(&self, r: &mut ShardReport, anchor: &Anchor) {
        r.frames = self.frames;
        r.malformed = self.malformed;
        r.not_binary = self.not_binary;
        r.first_receive_ns = self.first.map(|i| anchor.ns(i));
        r.last_receive_ns = self.last.map(|i| anchor.ns(i));
    }
}

/// Appends one masked, unfragmented binary client frame whose payload is
/// the header for `(seq, sent_ns)` padded with zeros to `size` bytes
/// (`size >= PAYLOAD_HEADER`).
pub fn push_message(out: &mut Vec<u8>, seq: u64, sent_ns: u64, size: usize, mask: [u8; 4]) {
    debug_assert!(size >= PAYLOAD_HEADER);
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, OpCode::Binary, size as u64, Some(mask));
    out.extend_from_slice(&hdr[..n]);
    let start = out.len();
    out.extend_from_slice(&encode_payload_header(seq, sent_ns));
    out.resize(start + size, 0);
    apply_mask(&mut out[start..], mask, 0);
}

/// How one arrival relates to what the subscriber saw before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next number expected.
    InOrder,
    /// Ahead of the next expected: this many numbers were skipped (so far).
    Gap(u64),
    /// A number that had been skipped: late, out of order.
    Late,
    /// Seen before.
    Duplicate,
}

/// Sequence accounting for one subscriber. Publish order is 0, 1, 2, ...;
/// in-order delivery allocates nothing, and each hole costs one map entry
/// however long it is.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// One past the highest number seen.
    next: u64,
    /// Distinct numbers received.
    pub received: u64,
    /// Holes below `next` not received yet, as `start -> end` (exclusive).
    missing: BTreeMap<u64, u64>,
    /// Numbers below `next` not received and in no hole of `missing`.
    untracked_missing: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
}

impl SeqTracker {
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq == self.next {
            self.next += 1;
            self.received += 1;
            return Arrival::InOrder;
        }
        if seq > self.next {
            let gap = seq - self.next;
            if self.missing.len() < MAX_TRACKED_GAPS {
                self.missing.insert(self.next, seq);
            } else {
                self.untracked_missing += gap;
            }
            self.next = seq + 1;
            self.received += 1;
            return Arrival::Gap(gap);
        }
        let hole = self
            .missing
            .range(..=seq)
            .next_back()
            .map(|(&start, &end)| (start, end))
            .filter(|&(_, end)| seq < end);
        if let Some((start, end)) = hole {
            self.missing.remove(&start);
            if start < seq {
                self.missing.insert(start, seq);
            }
            if seq + 1 < end {
                self.missing.insert(seq + 1, end);
            }
            self.out_of_order += 1;
            self.received += 1;
            Arrival::Late
        } else if self.untracked_missing > 0 {
            // Cannot tell: assume the late arrival of an untracked number.
            self.untracked_missing -= 1;
            self.out_of_order += 1;
            self.received += 1;
            Arrival::Late
        } else {
            self.duplicates += 1;
            Arrival::Duplicate
        }
    }

    /// Numbers below `expected` never received.
    pub fn lost(&self, expected: u64) -> u64 {
        let holes: u64 = self
            .missing
            .range(..expected)
            .map(|(&start, &end)| end.min(expected) - start)
            .sum();
        holes + self.untracked_missing + expected.saturating_sub(self.next)
    }
}

/// Longest event-loop wait while subscribers wait for messages.
const TURN: Duration = Duration::from_millis(20);

/// The subscribers' side: a [`Sink`] fed by the fleet.
pub struct Delivery {
    anchor: Anchor,
    /// `tracked[t]`: local token `t` is a subscriber that was up at `Go`.
    tracked: Vec<bool>,
    /// Topic of each subscriber.
    topic: Vec<usize>,
    trackers: Vec<SeqTracker>,
    /// Messages each topic should deliver (the plan, then what was published).
    targets: Vec<u64>,
    /// Tracked subscribers with all of their topic's messages.
    pub complete: usize,
    pub arrivals: Arrivals,
    pub latency: Hist,
}

impl Delivery {
    pub fn new(tracked: Vec<bool>, topic: Vec<usize>, targets: Vec<u64>, anchor: Anchor) -> Self {
        let mut d = Self {
            anchor,
            trackers: vec![SeqTracker::default(); tracked.len()],
            tracked,
            topic,
            targets: Vec::new(),
            complete: 0,
            arrivals: Arrivals::default(),
            latency: Hist::default(),
        };
        d.set_targets(targets);
        d
    }

    fn target(&self, t: usize) -> u64 {
        self.targets.get(self.topic[t]).copied().unwrap_or(0)
    }

    /// What was actually published per topic: judge completion by it.
    pub fn set_targets(&mut self, targets: Vec<u64>) {
        self.targets = targets;
        self.complete = (0..self.trackers.len())
            .filter(|&t| self.tracked[t] && self.trackers[t].received >= self.target(t))
            .count();
    }

    /// Totals over the tracked subscribers, into `r`.
    pub fn report(&self, r: &mut ShardReport) {
        self.arrivals.report(r, &self.anchor);
        r.complete = self.complete as u64;
        r.latency = self.latency.to_wire();
        for (t, tr) in self.trackers.iter().enumerate() {
            if !self.tracked[t] {
                continue;
            }
            let expected = self.target(t);
            let lost = tr.lost(expected);
            r.tracked += 1;
            r.expected += expected;
            r.lost += lost;
            r.out_of_order += tr.out_of_order;
            r.duplicates += tr.duplicates;
            r.with_loss += u64::from(lost > 0);
            r.with_reorder += u64::from(tr.out_of_order > 0);
        }
    }
}

impl Sink for Delivery {
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        if !self.tracked.get(conn).copied().unwrap_or(false) {
            return;
        }
        let Some((seq, sent_ns)) = self.arrivals.record(opcode, payload, at) else {
            return;
        };
        let target = self.target(conn);
        let t = &mut self.trackers[conn];
        match t.record(seq) {
            Arrival::Duplicate => return,
            _ if t.received == target => self.complete += 1,
            _ => {}
        }
        self.latency
            .record_ns(self.anchor.ns(at).saturating_sub(sent_ns));
    }
}

/// The measured phase of one shard of subscribers, from its `Ready`:
/// wait for `Go` (checking whatever arrives already), then receive until
/// the parent says what was published and every open subscriber has it,
/// or the drain deadline it gives, or the limit `Go` gave. Returns this
/// thread's CPU time at `Go`.
pub fn subscribe_phase(
    fleet: &mut Fleet,
    link: &mut dyn Link,
    plan: &FanoutPlan,
    first: usize,
    connections: usize,
    anchor: &Anchor,
    report: &mut ShardReport,
) -> Result<f64, String> {
    let n = report.requested;
    let map = TopicMap::new(connections, plan.topics, plan.topic_dist);
    let tracked: Vec<bool> = (0..n).map(|t| fleet.is_live(t)).collect();
    let topic: Vec<usize> = (0..n).map(|t| map.topic_of(first + t)).collect();
    let planned = per_topic(plan.mode.messages(), plan.topics);
    let mut d = Delivery::new(tracked, topic, planned, *anchor);
    // Until `Go`, the parent's silence limit bounds the wait.
    let mut limit = Instant::now() + crate::shard::PARENT_SILENCE_LIMIT;
    let mut cpu0 = crate::sys::thread_cpu_s();
    let mut drain_until: Option<Instant> = None;
    let mut next_progress = Instant::now();
    let timed_out = loop {
        let now = Instant::now();
        match link.try_recv()? {
            Some(ToShard::Go { end_ns }) => {
                limit = anchor.instant(end_ns);
                cpu0 = crate::sys::thread_cpu_s();
                report.phase_start_ns = crate::clock::mono_ns();
            }
            Some(ToShard::Published {
                per_topic,
                drain_until_ns,
            }) => {
                d.set_targets(per_topic);
                drain_until = Some(anchor.instant(drain_until_ns));
            }
            Some(other) => return Err(format!("unexpected {other:?} while receiving")),
            None => {}
        }
        if let Some(until) = drain_until {
            if d.complete >= fleet.open() {
                break false;
            }
            if now >= until {
                break true;
            }
        }
        if now >= limit {
            break true;
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            link.send(&crate::shard::progress(fleet, d.arrivals.frames));
        }
        fleet
            .serve(TURN, &mut d)
            .map_err(|e| format!("event loop failed during delivery: {e}"))?;
    };
    report.drain_timed_out = timed_out;
    d.report(report);
    Ok(cpu0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::parse_header;

    #[test]
    fn a_binary_envelope_is_unwrapped_to_its_payload() {
        let p = encode_payload_header(7, 99);
        let frame = corecast::pubsub::envelope::binary_frame(
            "topic",
            1,
            2,
            corecast::proto::frame::OpCode::Binary,
            &p,
        );
        // Skip the (short) WebSocket header the reader has already removed.
        let body = &frame[2..];
        assert_eq!(
            unwrap_binary_envelope(body).and_then(decode_payload),
            Some((7, 99))
        );
        assert_eq!(unwrap_binary_envelope(&p[..10]), None, "too short");
        assert_eq!(unwrap_binary_envelope(&[2; 40]), None, "another kind");
    }

    #[test]
    fn payload_round_trips_through_a_masked_frame() {
        let mut out = Vec::new();
        push_message(&mut out, 7, 123_456_789, 64, [1, 2, 3, 4]);
        push_message(&mut out, u64::MAX, 1, 300, [9, 8, 7, 6]);
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len), (true, OpCode::Binary, 64));
        let mask = h.mask.expect("client frames are masked");
        let mut p = out[h.header_len..h.header_len + 64].to_vec();
        apply_mask(&mut p, mask, 0);
        assert_eq!(decode_payload(&p), Some((7, 123_456_789)));
        assert!(p[PAYLOAD_HEADER..].iter().all(|&b| b == 0));
        let rest = &out[h.header_len + 64..];
        let h2 = parse_header(rest).unwrap().unwrap();
        assert_eq!((h2.payload_len, h2.header_len), (300, 8));
        let mut p = rest[h2.header_len..].to_vec();
        assert_eq!(p.len(), 300);
        apply_mask(&mut p, h2.mask.unwrap(), 0);
        assert_eq!(decode_payload(&p), Some((u64::MAX, 1)));
        assert_eq!(decode_payload(&[0; 15]), None);
        assert_eq!(
            encode_payload_header(1, 2)[..9],
            [1, 0, 0, 0, 0, 0, 0, 0, 2]
        );
    }

    #[test]
    fn in_order_delivery_counts_nothing_wrong() {
        let mut t = SeqTracker::default();
        for s in 0..100 {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert_eq!(
            (t.received, t.lost(100), t.out_of_order, t.duplicates),
            (100, 0, 0, 0)
        );
        assert!(t.missing.is_empty());
        // Messages never seen at the end are lost too.
        assert_eq!(t.lost(103), 3);
    }

    #[test]
    fn gaps_reorders_and_duplicates() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(0), Arrival::InOrder);
        assert_eq!(t.record(3), Arrival::Gap(2));
        assert_eq!(t.lost(4), 2);
        assert_eq!(t.record(1), Arrival::Late);
        assert_eq!(t.record(1), Arrival::Duplicate);
        assert_eq!(t.record(3), Arrival::Duplicate);
        assert_eq!(t.record(0), Arrival::Duplicate);
        assert_eq!(t.record(4), Arrival::InOrder);
        assert_eq!(t.record(9), Arrival::Gap(4));
        assert_eq!(
            (t.received, t.lost(10), t.out_of_order, t.duplicates),
            (5, 5, 1, 3)
        );
        assert_eq!(t.record(2), Arrival::Late);
        assert_eq!(t.lost(10), 4);
        // Only numbers below the expected count are lost.
        assert_eq!(t.lost(7), 2);
    }

    #[test]
    fn a_huge_gap_is_one_hole() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(1_000_000), Arrival::Gap(1_000_000));
        assert_eq!(t.missing.len(), 1);
        assert_eq!(t.lost(1_000_001), 1_000_000);
        assert_eq!(t.record(5), Arrival::Late);
        assert_eq!(t.record(5), Arrival::Duplicate);
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.record(999_999), Arrival::Late);
        assert_eq!(t.missing.len(), 2, "{:?}", t.missing);
        assert_eq!(t.lost(1_000_001), 999_997);
        assert_eq!((t.out_of_order, t.duplicates), (3, 1));
    }

    #[test]
    fn holes_beyond_the_cap_are_counted_not_remembered() {
        let mut t = SeqTracker::default();
        // Every other number lost: one hole each.
        for i in 0..(MAX_TRACKED_GAPS as u64 + 10) {
            t.record(2 * i + 1);
        }
        assert_eq!(t.missing.len(), MAX_TRACKED_GAPS);
        let n = 2 * (MAX_TRACKED_GAPS as u64 + 10);
        assert_eq!(t.lost(n), n / 2);
        // A remembered hole is filled exactly; an untracked one is assumed late.
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.lost(n), n / 2 - 2);
    }

    #[test]
    fn delivery_counts_completion_latency_loss_and_strays() {
        let anchor = Anchor::now();
        let origin = anchor.ns(Instant::now());
        // Subscribers 0 and 2 on topic 0, 3 on topic 1; 1 was not up.
        let mut d = Delivery::new(
            vec![true, false, true, true],
            vec![0, 0, 0, 1],
            vec![2, 1],
            anchor,
        );
        let frame = |seq: u64, sent_ns: u64| {
            let mut p = encode_payload_header(seq, sent_ns).to_vec();
            p.resize(64, 0);
            p
        };
        let at = anchor.instant(origin + 500_000);
        d.message(0, OpCode::Binary, &frame(0, origin + 100_000), at);
        d.message(0, OpCode::Binary, &frame(1, origin + 200_000), at);
        d.message(0, OpCode::Binary, &frame(1, origin), at);
        d.message(1, OpCode::Binary, &frame(0, origin), at); // not tracked
        d.message(2, OpCode::Text, &frame(1, origin), at); // a gap: 0 is missing
        d.message(2, OpCode::Binary, b"short", at);
        d.message(3, OpCode::Binary, &frame(0, origin), at);
        assert_eq!(
            (
                d.arrivals.frames,
                d.complete,
                d.arrivals.not_binary,
                d.arrivals.malformed
            ),
            (6, 2, 1, 1)
        );
        assert_eq!(d.latency.len(), 4);
        assert_eq!(d.latency.max_ns().unwrap() / 1000, 500);
        let mut r = ShardReport::default();
        d.report(&mut r);
        assert_eq!((r.tracked, r.expected, r.lost), (3, 5, 1));
        assert_eq!((r.duplicates, r.with_loss, r.with_reorder), (1, 1, 0));
        // Fewer published than planned: subscriber 2 is complete after all.
        d.set_targets(vec![0, 1]);
        assert_eq!(d.complete, 3);
    }
}
