//! One worker's share of the fan-out: its local topic registry (topic →
//! local subscribers) and the publications its own publishers produced this
//! loop turn. No I/O: the worker's core supplies the delivery closure and
//! the [`Bus`] does the cross-thread handoff.
//!
//! At the end of each loop turn, the worker
//! 1. calls [`Shard::dispatch`] (from `Core::dispatch`): this turn's local
//!    publications are sent, one batch per interested worker, this
//!    worker's own batch into its own mailbox; nothing is delivered here;
//! 2. wakes the other workers that need it, then drains its
//!    [`Inbox`](super::bus::Inbox) (`Core::deliver`), its own publications
//!    included, and calls [`Shard::deliver`] for each step of a batch
//!    (bounded per turn);
//! 3. flushes every connection that received something, once.

use super::bus::{Bus, Publication, order_stripe};
use super::directory::{Directory, TopicInterest};
use super::ledger::SharedFrames;
use crate::proto::outbound::COPY_BELOW;
use bytes::Bytes;
use slab::Slab;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Heap bytes one topic costs the registries besides its name (kept
/// twice: the directory's copy and this worker's), measured
/// (tests/registry_memory.rs, names of 8 bytes included: 285–316 B): the
/// directory's map slot and `TopicInterest`, this worker's `LocalTopic`
/// with its first subscriber slots, and its two map slots, with the maps'
/// growth slack.
pub const TOPIC_ENTRY_BYTES: usize = 512;
/// Heap bytes one more subscription to an existing topic costs, measured
/// the same way (24–31 B; the most just after the subscriber slots
/// doubled): its 8 B slot, its 8 B in a connection's list of several, with
/// margin.
pub const SUBSCRIPTION_BYTES: usize = 80;

/// What the registries are charged for a topic named `name_len` bytes.
pub const fn topic_charge(name_len: usize) -> usize {
    TOPIC_ENTRY_BYTES + 2 * name_len
}

/// A connection as the backend names it: slab key and serial.
pub type ConnRef = (usize, u32);

/// One connection's membership of one local topic; kept by the connection
/// so that leaving is O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    topic: u32,
    slot: u32,
}

impl Subscription {
    /// The local topic id (stable while the topic has subscribers here).
    pub fn topic(&self) -> u32 {
        self.topic
    }
}

/// A connection's subscriptions: one inline (the common case costs no heap
/// allocation and 16 bytes), more behind one pointer.
#[derive(Debug, Default)]
pub enum SubList {
    #[default]
    Empty,
    One(Subscription),
    Many(Box<Vec<Subscription>>),
}

impl SubList {
    pub fn as_slice(&self) -> &[Subscription] {
        match self {
            Self::Empty => &[],
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Empty)
    }

    pub fn push(&mut self, sub: Subscription) {
        *self = match std::mem::take(self) {
            Self::Empty => Self::One(sub),
            Self::One(a) => Self::Many(Box::new(vec![a, sub])),
            Self::Many(mut v) => {
                v.push(sub);
                Self::Many(v)
            }
        };
    }

    /// Removes entry `i` (order not kept).
    pub fn swap_remove(&mut self, i: usize) -> Subscription {
        match std::mem::take(self) {
            Self::Empty => panic!("swap_remove on an empty SubList"),
            Self::One(s) => {
                assert_eq!(i, 0);
                s
            }
            Self::Many(mut v) => {
                let s = v.swap_remove(i);
                *self = match v.len() {
                    0 => Self::Empty,
                    1 => Self::One(v[0]),
                    _ => Self::Many(v),
                };
                s
            }
        }
    }

    /// Keeps the subscriptions for which `keep` returns true, in order, in
    /// one pass: how a control message drops many topics at once without a
    /// search per topic. `keep` sees each subscription once.
    pub fn retain(&mut self, mut keep: impl FnMut(&Subscription) -> bool) {
        *self = match std::mem::take(self) {
            Self::Empty => Self::Empty,
            Self::One(s) if keep(&s) => Self::One(s),
            Self::One(_) => Self::Empty,
            Self::Many(mut v) => {
                v.retain(|s| keep(s));
                match v.len() {
                    0 => Self::Empty,
                    1 => Self::One(v[0]),
                    _ => Self::Many(v),
                }
            }
        };
    }

    /// Takes every subscription, leaving the list empty.
    pub fn take(&mut self) -> Vec<Subscription> {
        match std::mem::take(self) {
            Self::Empty => Vec::new(),
            Self::One(s) => vec![s],
            Self::Many(v) => *v,
        }
    }
}

#[derive(Debug)]
struct LocalTopic {
    interest: Arc<TopicInterest>,
    subs: Subscribers,
}

/// One local topic's subscribers: a slab of 8-byte slots (a connection's
/// key and serial as `u32`s; `slab::Slab<ConnRef>` takes 24), since there
/// is one slot per subscription and idle memory is what a subscriber
/// costs. Same behaviour as `Slab`: a slot is reused last-freed first, and
/// iteration goes in slot order.
///
/// The first [`SLOT_PAGE`] slots grow like a `Vec` (a topic with a few
/// subscribers holds a few slots); the rest come in pages of that many,
/// each allocated once at its full size and never copied: a vector that
/// doubles leaves the arrays it outgrew in the malloc arena, resident
/// (measured at 10 000 subscribers of one topic: ~5–9 B per subscriber).
#[derive(Debug, Default)]
struct Subscribers {
    /// Slots `0..SLOT_PAGE`.
    first: Vec<Slot>,
    /// Slots from `SLOT_PAGE` on, `SLOT_PAGE` per page; all but the last
    /// full. Boxed: 8 bytes in every topic instead of a `Vec`'s 24, since
    /// most topics never have that many subscribers here.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<Vec<Slot>>>>,
    /// Head of the free list (`NONE`: no free slot).
    free: u32,
    len: u32,
}

/// Slots per page of [`Subscribers`] (4 KiB), a power of two.
const SLOT_PAGE_BITS: u32 = 9;
const SLOT_PAGE: usize = 1 << SLOT_PAGE_BITS;

/// An occupied slot holds a connection; a free one has `key == VACANT`
/// and the next free slot in `serial`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u32,
    serial: u32,
}

/// The key of a free slot: no connection has it (a worker holds far fewer
/// than 2^32 - 1 connections).
const VACANT: u32 = u32::MAX;
/// The end of the free list.
const NONE: u32 = u32::MAX;

impl Subscribers {
    fn new() -> Self {
        Self {
            first: Vec::new(),
            more: None,
            free: NONE,
            len: 0,
        }
    }

    /// Slots ever created (free ones included).
    fn end(&self) -> usize {
        match self.more.as_deref().and_then(|m| m.last()) {
            None => self.first.len(),
            Some(page) => self.more.as_deref().map_or(0, Vec::len) * SLOT_PAGE + page.len(),
        }
    }

    fn slot_mut(&mut self, at: u32) -> &mut Slot {
        let at = at as usize;
        match at >> SLOT_PAGE_BITS {
            0 => &mut self.first[at],
            page => {
                let more = self
                    .more
                    .as_deref_mut()
                    .expect("a slot past the first page");
                &mut more[page - 1][at & (SLOT_PAGE - 1)]
            }
        }
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `conn`; returns its slot.
    fn insert(&mut self, (key, serial): ConnRef) -> u32 {
        let key = u32::try_from(key)
            .ok()
            .filter(|&k| k != VACANT)
            .expect("connection keys fit in u32");
        let slot = Slot { key, serial };
        self.len += 1;
        if self.free == NONE {
            let at = self.end();
            assert!(at < NONE as usize, "subscriber slots fit in u32");
            if at < SLOT_PAGE {
                self.first.push(slot);
            } else {
                let more = self.more.get_or_insert_default();
                match more.last_mut() {
                    Some(page) if page.len() < SLOT_PAGE => page.push(slot),
                    _ => {
                        let mut page = Vec::with_capacity(SLOT_PAGE);
                        page.push(slot);
                        more.push(page);
                    }
                }
            }
            return at as u32;
        }
        let at = self.free;
        let vacant = self.slot_mut(at);
        debug_assert_eq!(vacant.key, VACANT);
        let next = vacant.serial;
        *vacant = slot;
        self.free = next;
        at
    }

    /// Frees `slot`, which must hold a connection.
    fn remove(&mut self, slot: u32) {
        let free = self.free;
        let s = self.slot_mut(slot);
        assert_ne!(s.key, VACANT, "removing a free subscriber slot");
        *s = Slot {
            key: VACANT,
            serial: free,
        };
        self.free = slot;
        self.len -= 1;
    }

    /// The subscribers, in slot order.
    fn iter(&self) -> impl Iterator<Item = ConnRef> + '_ {
        self.first
            .iter()
            .chain(self.more.iter().flat_map(|m| m.iter()).flatten())
            .filter(|s| s.key != VACANT)
            .map(|s| (s.key as usize, s.serial))
    }
}

/// A worker's topic registry and outbox.
pub struct Shard {
    id: usize,
    directory: Arc<Directory>,
    bus: Arc<Bus>,
    topics: Slab<LocalTopic>,
    by_name: HashMap<Arc<str>, u32>,
    /// Local topic id by the address of its shared interest entry: what a
    /// publication is looked up by (no string hashing per delivery).
    by_interest: HashMap<usize, u32>,
    /// This turn's publications with the workers interested at publish time.
    outbox: Vec<(Publication, u64)>,
    /// Reused per-peer batches for [`Shard::dispatch`].
    batches: Vec<Vec<Publication>>,
    /// Publications a peer could not take (it had exited), not yet counted.
    lost: usize,
    /// Workers to wake for this turn's batches (bit `w`), not yet woken.
    wakes: u64,
    /// Large frames published here, charged to this worker's budget while
    /// any queue holds them.
    frames: SharedFrames,
    /// What the topic registry costs for this worker's topics and
    /// subscriptions ([`topic_charge`], [`SUBSCRIPTION_BYTES`]), charged to
    /// its budget.
    registry_bytes: usize,
}

impl Shard {
    pub fn new(id: usize, directory: Arc<Directory>, bus: Arc<Bus>) -> Self {
        let workers = bus.workers();
        Self {
            id,
            directory,
            bus,
            topics: Slab::new(),
            by_name: HashMap::new(),
            by_interest: HashMap::new(),
            outbox: Vec::new(),
            batches: (0..workers).map(|_| Vec::new()).collect(),
            lost: 0,
            wakes: 0,
            frames: SharedFrames::default(),
            registry_bytes: 0,
        }
    }

    /// The shared directory (publishers take their topic's entry from it).
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The bus (for its backpressure level).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The local id of topic `name`, if it has subscribers on this worker.
    pub fn topic_id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// Topics with local subscribers.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Local subscribers of `name`.
    pub fn subscriber_count(&self, name: &str) -> usize {
        self.topic_id(name)
            .map_or(0, |id| self.topics[id as usize].subs.len())
    }

    /// Adds `conn` to the subscribers of `name`. The caller makes sure a
    /// connection subscribes to a topic at most once.
    pub fn subscribe(&mut self, name: &str, conn: ConnRef) -> Subscription {
        let topic = match self.by_name.get(name) {
            Some(&id) => id,
            None => {
                let interest = self.directory.entry(name);
                self.directory.set(&interest, self.id, true);
                let addr = Arc::as_ptr(&interest) as usize;
                let name: Arc<str> = Arc::from(name);
                let id = self.topics.insert(LocalTopic {
                    interest,
                    subs: Subscribers::new(),
                }) as u32;
                self.registry_bytes += topic_charge(name.len());
                self.by_name.insert(name, id);
                self.by_interest.insert(addr, id);
                id
            }
        };
        self.registry_bytes += SUBSCRIPTION_BYTES;
        let slot = self.topics[topic as usize].subs.insert(conn);
        Subscription { topic, slot }
    }

    /// Removes a subscription; the last one of a topic here clears this
    /// worker's interest bit.
    pub fn unsubscribe(&mut self, sub: Subscription) {
        let t = &mut self.topics[sub.topic as usize];
        t.subs.remove(sub.slot);
        self.registry_bytes -= SUBSCRIPTION_BYTES;
        if t.subs.is_empty() {
            let t = self.topics.remove(sub.topic as usize);
            self.registry_bytes -= topic_charge(t.interest.name().len());
            self.directory.set(&t.interest, self.id, false);
            self.by_name.remove(t.interest.name());
            self.by_interest
                .remove(&(Arc::as_ptr(&t.interest) as usize));
            self.directory.release(t.interest);
        }
    }

    /// Releases the charge of published frames no queue holds any more;
    /// returns the bytes still charged.
    /// `full`: scan the whole ledger (the periodic sweep), not only its front.
    pub fn release_frames(&mut self, full: bool) -> usize {
        self.frames.release_unheld(full);
        self.frames.bytes()
    }

    /// Bytes this worker's budget is charged for what its clients made the
    /// shard hold: published frames still queued anywhere, and the topic
    /// registry of its subscribers.
    pub fn charged_bytes(&self) -> usize {
        self.frames.bytes() + self.registry_bytes
    }

    /// The workers whose mailboxes got a batch needing a wake-up since the
    /// last call (bit `w`): the caller wakes them ([`Bus::wake`]).
    pub fn take_wakes(&mut self) -> u64 {
        std::mem::take(&mut self.wakes)
    }

    /// Publications sent to a worker that had already exited (only during
    /// shutdown) since the last call; the caller counts them.
    pub fn take_lost(&mut self) -> usize {
        std::mem::take(&mut self.lost)
    }

    /// Queues a publication made on this worker; it leaves in [`Self::dispatch`].
    pub fn publish(&mut self, topic: &Arc<TopicInterest>, frame: Bytes, now: Instant) {
        self.publish_weak(Arc::downgrade(topic), topic.workers(), frame, now);
    }

    /// [`Self::publish`] for a caller holding no strong reference, with the
    /// interested `workers` read together with `topic` (see
    /// [`Directory::interest`]).
    pub fn publish_weak(
        &mut self,
        topic: Weak<TopicInterest>,
        workers: u64,
        frame: Bytes,
        now: Instant,
    ) {
        if frame.len() >= COPY_BELOW {
            // Queued by reference wherever it goes: charged here, once.
            self.frames.charge(&frame);
        }
        self.outbox.push((
            Publication {
                topic,
                frame,
                published_at: now,
            },
            workers,
        ));
    }

    /// Sends this turn's publications to the mailbox of every interested
    /// worker, one batch each, this worker's own included (without a
    /// wake-up: the caller drains it next). Local publications thus take
    /// the same bounded, backpressured path as remote ones: a publisher's
    /// own worker is never held longer per turn than any other. Returns the
    /// publications dispatched.
    pub fn dispatch(&mut self) -> usize {
        let n = self.outbox.len();
        if n == 0 {
            return 0;
        }
        // One order per topic (see `Bus::hold_order`): the stripes of every
        // topic in this turn's batches stay locked until all are sent.
        let stripes = if self.batches.len() > 1 {
            self.outbox
                .iter()
                .fold(0u64, |m, (p, _)| m | 1 << order_stripe(p.topic.as_ptr()))
        } else {
            0
        };
        let _order = self.bus.hold_order(stripes);
        for (p, workers) in self.outbox.drain(..) {
            let mut targets = workers;
            while targets != 0 {
                let w = targets.trailing_zeros() as usize;
                targets &= targets - 1;
                self.batches[w].push(p.clone());
            }
        }
        for w in 0..self.batches.len() {
            if !self.batches[w].is_empty() {
                let batch = std::mem::take(&mut self.batches[w]);
                match self.bus.send(w, batch) {
                    // This worker drains its own mailbox right after: no wake-up.
                    Ok(wake) if w != self.id => self.wakes |= u64::from(wake) << w,
                    Ok(_) => {}
                    Err(lost) => self.lost += lost,
                }
            }
        }
        n
    }

    /// Where to end a delivery step that starts at `pubs[start]` and should
    /// cost about `budget` deliveries (publications × local subscribers):
    /// after as many whole runs of one topic as fit, or, when the first run
    /// alone is over the budget, after the part of it that fits (at least
    /// one publication). One lookup per run.
    pub fn step_end(&self, pubs: &[Publication], start: usize, budget: usize) -> usize {
        let mut end = start;
        let mut cost = 0usize;
        while end < pubs.len() {
            let topic = pubs[end].topic.as_ptr();
            let run = pubs[end..]
                .iter()
                .position(|p| p.topic.as_ptr() != topic)
                .unwrap_or(pubs.len() - end);
            let subs = self
                .by_interest
                .get(&(topic as usize))
                .map_or(0, |&id| self.topics[id as usize].subs.len());
            // A run nobody here subscribes to still costs a lookup and a
            // drop per publication.
            let run_cost = run.saturating_mul(subs.max(1));
            if cost + run_cost <= budget {
                cost += run_cost;
                end += run;
                continue;
            }
            if end == start {
                // Part of the first run: what fits, at least one.
                end += (budget / subs.max(1)).clamp(1, run);
            }
            break;
        }
        end
    }

    /// Calls `deliver(run, subscribers)` for `pubs` in order: each run is a
    /// maximal sequence of consecutive publications to one topic, and
    /// `subscribers` a chunk (≤ 64) of that topic's local subscribers. So the
    /// backend can push a whole run into one subscriber's queue while it is
    /// in cache, subscriber by subscriber, and every subscriber still sees
    /// the publications in order.
    pub fn deliver(
        &self,
        pubs: &[Publication],
        deliver: &mut impl FnMut(&[Publication], &[ConnRef]),
    ) {
        let mut start = 0;
        while start < pubs.len() {
            let topic = pubs[start].topic.as_ptr();
            let end = start
                + pubs[start..]
                    .iter()
                    .position(|p| p.topic.as_ptr() != topic)
                    .unwrap_or(pubs.len() - start);
            let run = &pubs[start..end];
            start = end;
            let Some(&id) = self.by_interest.get(&(topic as usize)) else {
                continue;
            };
            let subs = &self.topics[id as usize].subs;
            let mut chunk: [ConnRef; 64] = [(0, 0); 64];
            let mut n = 0;
            for c in subs.iter() {
                chunk[n] = c;
                n += 1;
                if n == chunk.len() {
                    deliver(run, &chunk);
                    n = 0;
                }
            }
            if n > 0 {
                deliver(run, &chunk[..n]);
            }
        }
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
