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
//! With `--corpus`, payloads are text instead: corpus lines with the same
//! two numbers in front (`payload`).
//!
//! Each subscriber keeps a [`SeqTracker`]: gaps (lost messages),
//! late arrivals (reordering) and duplicates, per subscriber. The phase
//! ends when every open subscriber has everything published to its topic
//! (the parent says how much in `Published`), or at the drain deadline.
//!
//! With `--verify-every N`, only every N-th subscriber decodes what it
//! receives (inflating it first if compressed, checking a corpus message
//! byte for byte); the others count frames and bytes, so their loss is
//! what they are short of and nothing else is checked. Latency then comes
//! from the verified sample.

use crate::cli::FanoutPlan;
use crate::client::{Sink, inflate};
use crate::clock::Anchor;
use crate::coord::Link;
use crate::fleet::{Fleet, PROGRESS_EVERY};
use crate::hist::Hist;
use crate::payload::Corpus;
use crate::topics::{TopicMap, per_topic};
use crate::wire::{ShardReport, ToShard};
use corecast::proto::OpCode;
use corecast::proto::frame::{MAX_HEADER_LEN, encode_header};
use corecast::proto::mask::apply_mask;
use std::collections::BTreeMap;
use std::sync::Arc;
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
    /// Payload bytes of the frames, as received (compressed or not).
    pub payload_bytes: u64,
    /// Too short to carry a sequence number and a send time, or (corpus)
    /// not the message its header names.
    pub malformed: u64,
    /// Not of the payloads' opcode (counted; still decoded).
    pub wrong_opcode: u64,
    /// The payloads are text from a corpus (`payload`), not binary.
    pub text: bool,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Arrivals {
    /// Counts a data frame received at `at`; returns its `(seq, sent_ns)`,
    /// or `None` (counted as malformed) when it carries none.
    pub fn record(&mut self, opcode: OpCode, payload: &[u8], at: Instant) -> Option<(u64, u64)> {
        self.count(opcode, payload.len(), at);
        self.decode(payload)
    }

    /// Counts a data frame of `len` payload bytes received at `at`,
    /// without reading it.
    pub fn count(&mut self, opcode: OpCode, len: usize, at: Instant) {
        self.frames += 1;
        self.payload_bytes += len as u64;
        self.first.get_or_insert(at);
        self.last = Some(at);
        let expected = if self.text {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        if opcode != expected {
            self.wrong_opcode += 1;
        }
    }

    /// A payload's `(seq, sent_ns)`, or `None` (counted as malformed).
    pub fn decode(&mut self, payload: &[u8]) -> Option<(u64, u64)> {
        let decoded = if self.text {
            crate::payload::decode_text(payload)
        } else if BINARY_ENVELOPE.load(std::sync::atomic::Ordering::Relaxed) {
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
        r.payload_bytes = self.payload_bytes;
        r.malformed = self.malformed;
        r.wrong_opcode = self.wrong_opcode;
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
    /// `verified[t]`: a tracked subscriber that decodes (inflates) and
    /// checks what it receives; the others count frames in `counts`.
    verified: Vec<bool>,
    /// Topic of each subscriber.
    topic: Vec<usize>,
    trackers: Vec<SeqTracker>,
    /// Frames received by each subscriber not verified.
    counts: Vec<u64>,
    /// Corpus payloads are checked against their line, byte for byte.
    corpus: Option<Arc<Corpus>>,
    /// Reused for inflating a verified subscriber's compressed messages.
    inflated: Vec<u8>,
    /// Messages each topic should deliver (the plan, then what was published).
    targets: Vec<u64>,
    /// Tracked subscribers with all of their topic's messages.
    pub complete: usize,
    pub arrivals: Arrivals,
    pub latency: Hist,
}

impl Delivery {
    /// Every tracked subscriber verified, binary payloads.
    pub fn new(tracked: Vec<bool>, topic: Vec<usize>, targets: Vec<u64>, anchor: Anchor) -> Self {
        let mut d = Self {
            anchor,
            trackers: vec![SeqTracker::default(); tracked.len()],
            counts: vec![0; tracked.len()],
            verified: tracked.clone(),
            tracked,
            topic,
            corpus: None,
            inflated: Vec::new(),
            targets: Vec::new(),
            complete: 0,
            arrivals: Arrivals::default(),
            latency: Hist::default(),
        };
        d.set_targets(targets);
        d
    }

    /// Only the tracked subscribers `verify` selects decode what they
    /// receive; the others count it.
    pub fn verifying(mut self, verify: impl Fn(usize) -> bool) -> Self {
        for t in 0..self.tracked.len() {
            self.verified[t] = self.tracked[t] && verify(t);
        }
        let targets = std::mem::take(&mut self.targets);
        self.set_targets(targets);
        self
    }

    /// Payloads are text from `corpus`, checked against it.
    pub fn with_corpus(mut self, corpus: Option<Arc<Corpus>>) -> Self {
        self.arrivals.text = corpus.is_some();
        self.corpus = corpus;
        self
    }

    fn target(&self, t: usize) -> u64 {
        self.targets.get(self.topic[t]).copied().unwrap_or(0)
    }

    /// Messages subscriber `t` has (distinct ones, when verified).
    fn received(&self, t: usize) -> u64 {
        if self.verified[t] {
            self.trackers[t].received
        } else {
            self.counts[t]
        }
    }

    /// What was actually published per topic: judge completion by it.
    pub fn set_targets(&mut self, targets: Vec<u64>) {
        self.targets = targets;
        self.complete = (0..self.trackers.len())
            .filter(|&t| self.tracked[t] && self.received(t) >= self.target(t))
            .count();
    }

    /// Totals over the tracked subscribers, into `r`. A subscriber not
    /// verified has lost what it is short of, and duplicated what it has
    /// beyond, its topic's count.
    pub fn report(&self, r: &mut ShardReport) {
        self.arrivals.report(r, &self.anchor);
        r.complete = self.complete as u64;
        r.latency = self.latency.to_wire();
        for (t, tr) in self.trackers.iter().enumerate() {
            if !self.tracked[t] {
                continue;
            }
            let expected = self.target(t);
            let (lost, late, duplicates) = if self.verified[t] {
                (tr.lost(expected), tr.out_of_order, tr.duplicates)
            } else {
                let n = self.counts[t];
                (expected.saturating_sub(n), 0, n.saturating_sub(expected))
            };
            r.tracked += 1;
            r.verified += u64::from(self.verified[t]);
            r.expected += expected;
            r.lost += lost;
            r.out_of_order += late;
            r.duplicates += duplicates;
            r.with_loss += u64::from(lost > 0);
            r.with_reorder += u64::from(late > 0);
        }
    }

    /// A message of a subscriber not verified: counted.
    fn counted(&mut self, conn: usize) {
        self.counts[conn] += 1;
        if self.counts[conn] == self.target(conn) {
            self.complete += 1;
        }
    }

    /// A verified subscriber's message, decoded: its number, its content
    /// (corpus), its latency.
    fn check(&mut self, conn: usize, payload: &[u8], at: Instant) {
        let Some((seq, sent_ns)) = self.arrivals.decode(payload) else {
            return;
        };
        if let Some(c) = &self.corpus
            && !c.check(payload, seq, sent_ns)
        {
            self.arrivals.malformed += 1;
            return;
        }
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

impl Sink for Delivery {
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        if !self.tracked.get(conn).copied().unwrap_or(false) {
            return;
        }
        self.arrivals.count(opcode, payload.len(), at);
        if self.verified[conn] {
            self.check(conn, payload, at);
        } else {
            self.counted(conn);
        }
    }

    /// Counted as it came; inflated only for a verified subscriber.
    fn compressed(
        &mut self,
        conn: usize,
        opcode: OpCode,
        deflated: &[u8],
        at: Instant,
    ) -> Result<(), &'static str> {
        if !self.tracked.get(conn).copied().unwrap_or(false) {
            return Ok(());
        }
        self.arrivals.count(opcode, deflated.len(), at);
        if !self.verified[conn] {
            self.counted(conn);
            return Ok(());
        }
        let mut payload = std::mem::take(&mut self.inflated);
        let inflated = inflate(deflated, &mut payload);
        if inflated.is_ok() {
            self.check(conn, &payload, at);
        }
        self.inflated = payload;
        inflated
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
    let every = plan.verify_every.max(1);
    let mut d = Delivery::new(tracked, topic, planned, *anchor)
        .verifying(|t| (first + t).is_multiple_of(every))
        .with_corpus(plan.corpus.clone().map(Arc::new));
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
mod tests;
