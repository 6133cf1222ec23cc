//! A topic's recent publications, kept as the already-encoded messages, and
//! what a subscriber that says where it stopped (`since`) gets back.
//!
//! Each topic's [`History`] lives in its directory entry and is appended to
//! at dispatch, under the topic's order lock, in sequence order; it is read
//! under the same lock when a subscriber recovers, so what it replays and
//! the live stream that follows meet exactly (see `Shard::subscribe_since`).
//!
//! Bounds ([`HistoryLimits`]): per topic a count, bytes and an age; for the
//! process a total in bytes ([`HistoryMemory`]), which an append that
//! would pass it pays for by dropping the oldest entries of its own topic
//! (and, if that is not enough, by not keeping the new one). Each entry is
//! counted as its raw frame plus [`ENTRY_OVERHEAD_BYTES`].

use super::envelope::Message;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one retained message costs besides its frame: its `Message`
/// (with room for its envelopes' handles), the frame's allocation and
/// shared count, its slot here.
pub const ENTRY_OVERHEAD_BYTES: usize = 288;

/// How much history each topic keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most messages per topic; 0 turns history (and recovery) off.
    pub size: usize,
    /// Most bytes per topic (frames plus overhead).
    pub bytes: usize,
    /// Oldest message kept, by publication time.
    pub age: Duration,
    /// Most bytes all topics' histories hold together.
    pub memory: usize,
}

/// Default messages kept per topic (`--history-size`).
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// Default bytes kept per topic (`--history-bytes`).
pub const DEFAULT_HISTORY_BYTES: usize = 1024 * 1024;
/// Default age of the oldest message kept (`--history-age`).
pub const DEFAULT_HISTORY_AGE: Duration = Duration::from_secs(300);
/// Default total of every history (`--history-memory`).
pub const DEFAULT_HISTORY_MEMORY: usize = 64 * 1024 * 1024;

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            size: DEFAULT_HISTORY_SIZE,
            bytes: DEFAULT_HISTORY_BYTES,
            age: DEFAULT_HISTORY_AGE,
            memory: DEFAULT_HISTORY_MEMORY,
        }
    }
}

/// The process's history bytes and counters (metrics), shared by every topic.
#[derive(Debug, Default)]
pub struct HistoryMemory {
    bytes: AtomicUsize,
    entries: AtomicUsize,
    /// Entries dropped before their time because the total was reached.
    evicted_for_memory: AtomicU64,
    /// Publications larger than their topic's history bytes, so never kept.
    too_large: AtomicU64,
}

impl HistoryMemory {
    /// Bytes all histories hold now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Messages all histories hold now.
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Entries dropped early to stay under the total.
    pub fn evicted_for_memory(&self) -> u64 {
        self.evicted_for_memory.load(Ordering::Relaxed)
    }

    /// Publications not kept because they alone were over their topic's
    /// history bytes (delivered live, but neither recoverable nor a last
    /// value).
    pub fn too_large(&self) -> u64 {
        self.too_large.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` messages dropped early to stay under the total.
    pub(crate) fn evicted(&self, n: usize) {
        self.evicted_for_memory
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_bytes(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.entries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a subscriber says it stopped: the epoch and the last sequence
/// number it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    pub epoch: u64,
    pub seq: u64,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the next publication.
    Live,
    /// Right after a position the subscriber had (recovery).
    Since(Since),
    /// With the topic's newest publication, if its history holds one
    /// (last value, sent as a snapshot), then the live stream.
    LastValue,
    /// Where the connection's stream of the topic through a pattern it
    /// holds is: after what its worker delivered of the topic (or gave it
    /// as a pattern's last value), nothing read. So leaving the pattern
    /// later skips nothing still in the mailbox, and repeats nothing.
    Continue,
}

/// Why a recovery is not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The topic's epoch is another one: its numbering started over.
    Epoch,
    /// The history no longer holds the first messages asked for.
    TooOld,
    /// More was asked for than one recovery sends (the oldest part is lost).
    Capped,
    /// A number the topic has not reached in this epoch.
    Ahead,
}

impl Gap {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Epoch => "epoch",
            Self::TooOld => "too_old",
            Self::Capped => "capped",
            Self::Ahead => "ahead",
        }
    }
}

/// What a subscribe with `since` gets: the messages to replay (in order,
/// numbered `first ..= last`, none when `first > last`), then the live
/// stream from `last + 1`.
#[derive(Debug)]
pub struct Recovery {
    /// The topic's current epoch.
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
    pub messages: Vec<Arc<Message>>,
    /// `None`: nothing between `since` and the live stream is missing.
    pub gap: Option<Gap>,
}

/// One topic's retained messages, oldest first, consecutive numbers.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<Arc<Message>>,
    bytes: usize,
}

fn cost(m: &Message) -> usize {
    m.frame.len() + ENTRY_OVERHEAD_BYTES + m.envelope_bytes.load(Ordering::Relaxed)
}

impl History {
    /// Messages held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The oldest number held, if any.
    pub fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|m| m.seq)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends `msg` (the topic's newest number) and trims to `limits`.
    pub fn append(
        &mut self,
        msg: &Arc<Message>,
        limits: &HistoryLimits,
        memory: &HistoryMemory,
        now: Instant,
    ) {
        if limits.size == 0 {
            return;
        }
        debug_assert!(
            self.entries.back().is_none_or(|b| b.seq + 1 == msg.seq),
            "consecutive numbers"
        );
        let c = cost(msg);
        if c > limits.bytes {
            // It alone is over the topic's bytes: the trim below would drop
            // it at once (and everything before it). Counted, as a message
            // recovery will not find.
            memory.too_large.fetch_add(1, Ordering::Relaxed);
        }
        self.entries.push_back(Arc::clone(msg));
        self.bytes += c;
        memory.add(c);
        self.expire(limits, memory, now);
        self.trim(limits, memory);
        self.trim_to_memory(limits, memory);
    }

    /// Puts `older` (consecutive numbers ending right before the oldest
    /// held, oldest first) in front and trims to `limits`: a history
    /// filled from elsewhere (a cluster's stream) behind what arrived live.
    pub fn prepend(
        &mut self,
        older: Vec<Arc<Message>>,
        limits: &HistoryLimits,
        memory: &HistoryMemory,
        now: Instant,
    ) {
        if limits.size == 0 {
            return;
        }
        debug_assert!(
            older.windows(2).all(|w| w[0].seq + 1 == w[1].seq)
                && older
                    .last()
                    .zip(self.entries.front())
                    .is_none_or(|(l, f)| l.seq + 1 == f.seq),
            "consecutive numbers"
        );
        for m in older.into_iter().rev() {
            let c = cost(&m);
            self.entries.push_front(m);
            self.bytes += c;
            memory.add(c);
        }
        self.expire(limits, memory, now);
        self.trim(limits, memory);
        self.trim_to_memory(limits, memory);
    }

    /// Drops the oldest messages while more than `limits.size` or
    /// `limits.bytes` are held (everything when `limits.size` is 0): after
    /// an append, and when a reload gives the topic smaller bounds.
    pub fn trim(&mut self, limits: &HistoryLimits, memory: &HistoryMemory) {
        while !self.entries.is_empty()
            && (self.entries.len() > limits.size || self.bytes > limits.bytes)
        {
            self.pop(memory);
        }
    }

    /// Drops this history's oldest messages (the newest too, if need be)
    /// while all histories together hold more than `limits.memory`.
    pub fn trim_to_memory(&mut self, limits: &HistoryLimits, memory: &HistoryMemory) {
        while !self.entries.is_empty() && memory.bytes() > limits.memory {
            self.pop(memory);
            memory.evicted_for_memory.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an envelope of `len` bytes just built for `msg` if this
    /// history holds `msg` (it keeps the envelope alive as long as it
    /// keeps the message), and applies the bounds again: the oldest
    /// messages go first, so envelopes too stay within the topic's bytes
    /// and `--history-memory`.
    pub fn add_envelope(
        &mut self,
        msg: &Message,
        len: usize,
        limits: &HistoryLimits,
        memory: &HistoryMemory,
    ) {
        let held = match (self.entries.front(), self.entries.back()) {
            (Some(f), Some(b)) => f.seq <= msg.seq && msg.seq <= b.seq && f.epoch == msg.epoch,
            _ => false,
        };
        if held {
            msg.envelope_bytes.fetch_add(len, Ordering::Relaxed);
            self.bytes += len;
            memory.add_bytes(len);
            // The newest message (the last value) stays, envelopes and
            // all, past the topic's own bound; not past all histories'
            // (then it goes as an append's would): else every topic's
            // last value could add its envelopes (a JSON one up to 6 times
            // the message) beyond `--history-memory`.
            while self.entries.len() > 1 && self.bytes > limits.bytes {
                self.pop(memory);
            }
            while !self.entries.is_empty() && memory.bytes() > limits.memory {
                self.pop(memory);
                memory.evicted_for_memory.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops messages older than `limits.age`, except the newest: a
    /// topic's last value stays while the topic does.
    pub fn expire(&mut self, limits: &HistoryLimits, memory: &HistoryMemory, now: Instant) {
        while self.entries.len() > 1
            && self
                .entries
                .front()
                .is_some_and(|m| now.saturating_duration_since(m.published_at) > limits.age)
        {
            self.pop(memory);
        }
    }

    /// Whether even the newest message is older than `limits.age` (or
    /// there is none): what ends a retained topic.
    pub fn stale(&self, limits: &HistoryLimits, now: Instant) -> bool {
        self.entries
            .back()
            .is_none_or(|m| now.saturating_duration_since(m.published_at) > limits.age)
    }

    /// The newest message as a one-message recovery, if it is number
    /// `current` (the topic's last) and its frame is at most `max_bytes`:
    /// the last value a new subscriber gets.
    pub fn last_value(&self, epoch: u64, current: u64, max_bytes: usize) -> Recovery {
        let newest = self
            .entries
            .back()
            .filter(|m| m.seq == current && current > 0 && m.frame.len() <= max_bytes);
        Recovery {
            epoch,
            first: newest.map_or(current + 1, |m| m.seq),
            last: current,
            messages: newest.into_iter().cloned().collect(),
            gap: None,
        }
    }

    fn pop(&mut self, memory: &HistoryMemory) {
        if let Some(m) = self.entries.pop_front() {
            let c = cost(&m);
            self.bytes -= c;
            memory.sub(c);
        }
    }

    /// Drops everything (the topic is forgotten); returns the messages
    /// dropped.
    pub fn clear(&mut self, memory: &HistoryMemory) -> usize {
        let n = self.entries.len();
        while !self.entries.is_empty() {
            self.pop(memory);
        }
        n
    }

    /// The newest retained number and the oldest (`None`: empty).
    pub fn range(&self) -> Option<(u64, u64)> {
        Some((self.entries.front()?.seq, self.entries.back()?.seq))
    }

    /// What a subscriber at `since` gets, the topic being at `epoch` with
    /// `current` its last number: the retained messages after `since` (at
    /// most `max_bytes` of frames, the newest ones when more are held), or
    /// after the start of the epoch when `since` names another one.
    pub fn recover(&self, since: Since, epoch: u64, current: u64, max_bytes: usize) -> Recovery {
        let mut gap = None;
        let wanted_from = if since.epoch != epoch {
            gap = Some(Gap::Epoch);
            1
        } else if since.seq > current {
            gap = Some(Gap::Ahead);
            current + 1
        } else {
            since.seq + 1
        };
        // Newest first, within the byte cap, down to `wanted_from`.
        let mut take = 0;
        let mut bytes = 0;
        for m in self.entries.iter().rev() {
            if m.seq < wanted_from {
                break;
            }
            if bytes + m.frame.len() > max_bytes {
                break;
            }
            bytes += m.frame.len();
            take += 1;
        }
        let messages: Vec<Arc<Message>> = self
            .entries
            .iter()
            .skip(self.entries.len() - take)
            .cloned()
            .collect();
        let first = messages.first().map_or(current + 1, |m| m.seq);
        let oldest = self.entries.front().map_or(current + 1, |m| m.seq);
        if gap.is_none() && first > wanted_from {
            gap = Some(if oldest > wanted_from {
                Gap::TooOld
            } else {
                Gap::Capped
            });
        }
        Recovery {
            epoch,
            first,
            last: current,
            messages,
            gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn an_entry_costs_at_least_its_message_and_handles() {
        // The `Arc<Message>` allocation (two counts and the message, with
        // its envelope and compressed-form cells), the frame's shared
        // header, and this history's slot.
        let message = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Message>();
        assert!(
            message + 32 + 16 <= ENTRY_OVERHEAD_BYTES,
            "{message} B per message: raise ENTRY_OVERHEAD_BYTES"
        );
        // A mailbox's count: the same and the `Publication` in its batch.
        let publication = std::mem::size_of::<crate::pubsub::bus::Publication>();
        assert!(
            message + 32 + publication <= crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES,
            "raise PUBLICATION_OVERHEAD_BYTES"
        );
    }

    fn msg(seq: u64, len: usize, at: Instant) -> Arc<Message> {
        let mut m = Message::new(Bytes::from(vec![0u8; len]), at);
        m.epoch = 7;
        m.seq = seq;
        Arc::new(m)
    }

    fn limits(size: usize, bytes: usize) -> HistoryLimits {
        HistoryLimits {
            size,
            bytes,
            age: Duration::from_secs(60),
            memory: usize::MAX,
        }
    }

    #[test]
    fn keeps_the_newest_within_count_and_bytes() {
        let mem = HistoryMemory::default();
        let now = Instant::now();
        let mut h = History::default();
        for s in 1..=10 {
            h.append(&msg(s, 10, now), &limits(4, usize::MAX), &mem, now);
        }
        assert_eq!(h.range(), Some((7, 10)));
        assert_eq!(mem.entries(), 4);
        assert_eq!(mem.bytes(), 4 * (10 + ENTRY_OVERHEAD_BYTES));
        let l = limits(100, 2 * (100 + ENTRY_OVERHEAD_BYTES));
        h.append(&msg(11, 100, now), &l, &mem, now);
        h.append(&msg(12, 100, now), &l, &mem, now);
        assert_eq!(h.range(), Some((11, 12)), "bytes bound");
        h.clear(&mem);
        assert_eq!((mem.entries(), mem.bytes()), (0, 0));
    }

    /// A publication alone over its topic's bytes is not kept, and that is
    /// counted (outside probe: a 2 MB publication left no history and no
    /// last value, and no counter moved).
    #[test]
    fn a_message_over_the_topics_bytes_is_not_kept_and_is_counted() {
        let mem = HistoryMemory::default();
        let now = Instant::now();
        let mut h = History::default();
        let l = limits(100, 1000);
        h.append(&msg(1, 10, now), &l, &mem, now);
        assert_eq!(mem.too_large(), 0);
        h.append(&msg(2, 2000, now), &l, &mem, now);
        assert_eq!(h.range(), None, "neither kept");
        assert_eq!(mem.too_large(), 1, "counted");
        h.append(&msg(3, 10, now), &l, &mem, now);
        assert_eq!((h.range(), mem.too_large()), (Some((3, 3)), 1));
    }

    #[test]
    fn old_messages_expire_and_the_total_is_never_passed() {
        let mem = HistoryMemory::default();
        let t0 = Instant::now();
        let mut h = History::default();
        let l = limits(100, usize::MAX);
        h.append(&msg(1, 1, t0), &l, &mem, t0);
        h.append(&msg(2, 1, t0 + Duration::from_secs(30)), &l, &mem, t0);
        h.expire(&l, &mem, t0 + Duration::from_secs(61));
        assert_eq!(h.range(), Some((2, 2)));
        let tight = HistoryLimits {
            memory: 3 * (1 + ENTRY_OVERHEAD_BYTES),
            ..l
        };
        let mut other = History::default();
        for s in 1..=5 {
            other.append(&msg(s, 1, t0), &tight, &mem, t0);
            assert!(mem.bytes() <= tight.memory);
        }
        assert_eq!(other.range(), Some((4, 5)), "the other topic holds one");
        assert_eq!(mem.evicted_for_memory(), 3);
    }

    #[test]
    fn recovery_replays_exactly_what_follows_since_or_says_what_is_missing() {
        let mem = HistoryMemory::default();
        let now = Instant::now();
        let mut h = History::default();
        for s in 1..=10 {
            h.append(&msg(s, 10, now), &limits(5, usize::MAX), &mem, now);
        }
        let seqs = |r: &Recovery| r.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        let r = h.recover(Since { epoch: 7, seq: 7 }, 7, 10, usize::MAX);
        assert_eq!(
            (seqs(&r), r.first, r.last, r.gap),
            (vec![8, 9, 10], 8, 10, None)
        );
        let r = h.recover(Since { epoch: 7, seq: 10 }, 7, 10, usize::MAX);
        assert_eq!(
            (r.messages.len(), r.first, r.gap),
            (0, 11, None),
            "up to date"
        );
        let r = h.recover(Since { epoch: 7, seq: 2 }, 7, 10, usize::MAX);
        assert_eq!((seqs(&r), r.gap), (vec![6, 7, 8, 9, 10], Some(Gap::TooOld)));
        let r = h.recover(Since { epoch: 7, seq: 2 }, 7, 10, 25);
        assert_eq!((seqs(&r), r.gap), (vec![9, 10], Some(Gap::TooOld)));
        let r = h.recover(Since { epoch: 7, seq: 7 }, 7, 10, 25);
        assert_eq!((seqs(&r), r.gap), (vec![9, 10], Some(Gap::Capped)));
        let r = h.recover(Since { epoch: 3, seq: 7 }, 7, 10, usize::MAX);
        assert_eq!((seqs(&r), r.gap), (vec![6, 7, 8, 9, 10], Some(Gap::Epoch)));
        let r = h.recover(Since { epoch: 7, seq: 99 }, 7, 10, usize::MAX);
        assert_eq!(
            (r.messages.len(), r.first, r.gap),
            (0, 11, Some(Gap::Ahead))
        );
        let r = History::default().recover(Since { epoch: 7, seq: 0 }, 7, 0, 100);
        assert_eq!(
            (r.first, r.last, r.gap),
            (1, 0, None),
            "a new topic: complete"
        );
    }

    #[test]
    fn envelopes_of_held_messages_count_until_the_message_leaves() {
        let mem = HistoryMemory::default();
        let now = Instant::now();
        let mut h = History::default();
        let l = limits(2, usize::MAX);
        let (a, b, c) = (msg(1, 10, now), msg(2, 10, now), msg(3, 10, now));
        h.append(&a, &l, &mem, now);
        h.append(&b, &l, &mem, now);
        let base = mem.bytes();
        h.add_envelope(&a, 30, &l, &mem);
        assert_eq!(mem.bytes(), base + 30);
        h.add_envelope(&c, 30, &l, &mem);
        assert_eq!(mem.bytes(), base + 30, "not held: not counted");
        h.append(&c, &l, &mem, now); // pushes out 1 with its envelope
        assert_eq!(mem.bytes(), 2 * (10 + ENTRY_OVERHEAD_BYTES));
        h.clear(&mem);
        assert_eq!((mem.bytes(), mem.entries()), (0, 0));
    }

    #[test]
    fn the_newest_message_outlives_its_age_as_the_last_value() {
        let mem = HistoryMemory::default();
        let t0 = Instant::now();
        let mut h = History::default();
        let l = limits(100, usize::MAX);
        h.append(&msg(1, 1, t0), &l, &mem, t0);
        h.append(&msg(2, 1, t0), &l, &mem, t0);
        let late = t0 + Duration::from_secs(3600);
        h.expire(&l, &mem, late);
        assert_eq!(h.range(), Some((2, 2)), "the last value stays");
        assert!(h.stale(&l, late));
        assert!(!h.stale(&l, t0));
        let r = h.last_value(7, 2, usize::MAX);
        assert_eq!((r.first, r.last, r.messages.len()), (2, 2, 1));
        assert!(
            h.last_value(7, 3, usize::MAX).messages.is_empty(),
            "not the topic's last"
        );
        assert!(h.last_value(7, 2, 0).messages.is_empty(), "over the cap");
    }

    #[test]
    fn envelopes_are_held_to_the_bounds_too() {
        let mem = HistoryMemory::default();
        let now = Instant::now();
        let mut h = History::default();
        let l = HistoryLimits {
            memory: 3 * (10 + ENTRY_OVERHEAD_BYTES),
            ..limits(100, usize::MAX)
        };
        let (a, b, c) = (msg(1, 10, now), msg(2, 10, now), msg(3, 10, now));
        for m in [&a, &b, &c] {
            h.append(m, &l, &mem, now);
        }
        assert_eq!(h.range(), Some((1, 3)));
        // A large envelope for the newest: the oldest go to make room.
        h.add_envelope(&c, 2 * (10 + ENTRY_OVERHEAD_BYTES), &l, &mem);
        assert_eq!(h.range(), Some((3, 3)));
        assert!(mem.bytes() <= l.memory);
        assert_eq!(mem.evicted_for_memory(), 2);
        // One past all histories' bound takes the newest too: the bound holds.
        h.add_envelope(&c, 1, &l, &mem);
        assert_eq!(h.range(), None);
        assert_eq!(mem.bytes(), 0);
        assert_eq!(mem.evicted_for_memory(), 3);
        // One past only the topic's own bytes leaves the newest, the last value.
        let mut h = History::default();
        let l = HistoryLimits {
            bytes: 10 + ENTRY_OVERHEAD_BYTES,
            ..limits(100, usize::MAX)
        };
        let d = msg(1, 10, now);
        h.append(&d, &l, &mem, now);
        h.add_envelope(&d, 1000, &l, &mem);
        assert_eq!(h.range(), Some((1, 1)));
    }
}
