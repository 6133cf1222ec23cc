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
use super::envelope::{Form, Message};
use super::history::{Recovery, Start};
use super::ledger::SharedFrames;
use crate::proto::outbound::COPY_BELOW;
use bytes::Bytes;
use slab::Slab;
use std::collections::HashMap;
use std::sync::Arc;
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

/// A connection's subscriptions, and the [`Form`] it receives their
/// publications in: one subscription inline (the common case costs no
/// heap allocation and 16 bytes, the form sitting in what would be
/// padding), more behind one pointer.
#[derive(Debug)]
pub enum SubList {
    Empty(Form),
    One(Form, Subscription),
    Many(Form, Box<Vec<Subscription>>),
}

impl Default for SubList {
    fn default() -> Self {
        Self::Empty(Form::Raw)
    }
}

impl SubList {
    /// No subscriptions yet; publications to come in `form`.
    pub fn new(form: Form) -> Self {
        Self::Empty(form)
    }

    /// How the connection receives publications.
    pub fn form(&self) -> Form {
        match self {
            Self::Empty(f) | Self::One(f, _) | Self::Many(f, _) => *f,
        }
    }

    pub fn as_slice(&self) -> &[Subscription] {
        match self {
            Self::Empty(_) => &[],
            Self::One(_, s) => std::slice::from_ref(s),
            Self::Many(_, v) => v,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Empty(_))
    }

    fn take_all(&mut self) -> (Form, Vec<Subscription>) {
        let form = self.form();
        match std::mem::replace(self, Self::Empty(form)) {
            Self::Empty(_) => (form, Vec::new()),
            Self::One(_, s) => (form, vec![s]),
            Self::Many(_, v) => (form, *v),
        }
    }

    fn set(&mut self, form: Form, mut v: Vec<Subscription>) {
        *self = match v.len() {
            0 => Self::Empty(form),
            1 => Self::One(form, v[0]),
            _ => {
                v.shrink_to_fit();
                Self::Many(form, Box::new(v))
            }
        };
    }

    pub fn push(&mut self, sub: Subscription) {
        let form = self.form();
        *self = match std::mem::replace(self, Self::Empty(form)) {
            Self::Empty(_) => Self::One(form, sub),
            Self::One(_, a) => Self::Many(form, Box::new(vec![a, sub])),
            Self::Many(_, mut v) => {
                v.push(sub);
                Self::Many(form, v)
            }
        };
    }

    /// Removes entry `i` (order not kept).
    pub fn swap_remove(&mut self, i: usize) -> Subscription {
        let (form, mut v) = self.take_all();
        let s = v.swap_remove(i);
        self.set(form, v);
        s
    }

    /// Keeps the subscriptions for which `keep` returns true, in order, in
    /// one pass: how a control message drops many topics at once without a
    /// search per topic. `keep` sees each subscription once.
    pub fn retain(&mut self, keep: impl FnMut(&Subscription) -> bool) {
        let (form, mut v) = self.take_all();
        v.retain(keep);
        self.set(form, v);
    }

    /// Takes every subscription, leaving the list empty (the form stays).
    pub fn take(&mut self) -> Vec<Subscription> {
        self.take_all().1
    }
}

#[derive(Debug)]
struct LocalTopic {
    interest: Arc<TopicInterest>,
    subs: Subscribers,
    /// The topic's last sequence number when this worker's interest bit
    /// was set: publications up to it were dispatched before (some may
    /// still be in the mailbox, sent while an earlier local topic had the
    /// bit) and are skipped, so every subscriber here sees strictly
    /// consecutive numbers from `floor + 1` on.
    floor: u64,
    /// The newest number this worker has delivered (or skipped) for the
    /// topic: what its mailbox may still hold is newer.
    delivered: u64,
    /// Subscribers that joined with a recovery or a last value while
    /// publications up to what they got were still in the mailbox: each
    /// with that number and its slot, which stays *pending* (left out of
    /// the ordinary delivery) until a later publication reaches it. Only
    /// those that join between a publication's numbering and its
    /// delivery here, so few.
    joiners: Vec<(ConnRef, u64, u32)>,
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
/// than 2^31 connections).
const VACANT: u32 = u32::MAX;
/// Set in a pending slot's key (see [`LocalTopic::joiners`]); a free
/// slot's key has it too, so one test leaves both out.
const PENDING: u32 = 1 << 31;
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
            .filter(|&k| k < PENDING - 1)
            .expect("connection keys fit in 31 bits");
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

    /// The subscribers, in slot order, pending ones left out.
    fn iter(&self) -> impl Iterator<Item = ConnRef> + '_ {
        self.first
            .iter()
            .chain(self.more.iter().flat_map(|m| m.iter()).flatten())
            .filter(|s| s.key & PENDING == 0)
            .map(|s| (s.key as usize, s.serial))
    }

    /// Adds `conn` as pending: left out of [`Self::iter`] until its key's
    /// [`PENDING`] bit is cleared.
    fn insert_pending(&mut self, conn: ConnRef) -> u32 {
        let slot = self.insert(conn);
        self.slot_mut(slot).key |= PENDING;
        slot
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
    /// This turn's publications, not yet sequenced, each with a reference
    /// to its topic (released together, under one directory lock, once
    /// they are sent).
    outbox: Vec<(Arc<TopicInterest>, Arc<Message>)>,
    /// Per outbox entry, the publisher to acknowledge it to, if it asked
    /// (kept apart: most publications have none).
    ack_to: Vec<(usize, ConnRef)>,
    /// Acknowledgements due: (publisher, epoch, number), for the caller
    /// to queue ([`Self::take_acks`]).
    acks: Vec<(ConnRef, u64, u64)>,
    /// The epoch and number of the last message [`Shard::dispatch`] numbered.
    last_numbered: (u64, u64),
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
            ack_to: Vec::new(),
            acks: Vec::new(),
            last_numbered: (0, 0),
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
        self.subscribe_since(name, conn, Start::Live, 0, None).0
    }

    /// [`Self::subscribe`], starting at `start`: for a recovery (`since`)
    /// or the last value, under the topic's order lock, the history is
    /// read (at most `max_bytes` of frames, judged at `now`) and the
    /// subscriber joins the live stream right after the topic's current
    /// number, so the messages read and the live ones meet with no gap and
    /// no duplicate. The caller queues the messages read before anything
    /// this worker delivers next.
    pub fn subscribe_since(
        &mut self,
        name: &str,
        conn: ConnRef,
        start: Start,
        max_bytes: usize,
        now: Option<Instant>,
    ) -> (Subscription, Option<Recovery>) {
        let recover = |d: &Directory, t: &TopicInterest, at: u64| match start {
            Start::Live => None,
            Start::Since(s) => {
                Some(d.recover(t, s, at, max_bytes, now.unwrap_or_else(Instant::now)))
            }
            Start::LastValue if t.last_value() => Some(d.last_value(t, at, max_bytes)),
            Start::LastValue => None,
        };
        let (topic, recovery) = match self.by_name.get(name) {
            Some(&id) => {
                let local = &self.topics[id as usize];
                // Nothing to read for a topic without last values: a plain join.
                let reads = match start {
                    Start::Live => false,
                    Start::LastValue => local.interest.last_value(),
                    Start::Since(_) => true,
                };
                let recovery = reads.then_some(()).and_then(|_| {
                    let _order = self.hold_order_of(&local.interest);
                    recover(&self.directory, &local.interest, local.interest.seq())
                });
                let local = &mut self.topics[id as usize];
                if let Some(r) = recovery.as_ref().filter(|r| r.last > local.delivered) {
                    // Publications up to `r.last` may still be in this
                    // worker's mailbox: not for this subscriber.
                    self.registry_bytes += SUBSCRIPTION_BYTES;
                    let slot = local.subs.insert_pending(conn);
                    local.joiners.push((conn, r.last, slot));
                    return (Subscription { topic: id, slot }, recovery);
                }
                (id, recovery)
            }
            None => {
                let interest = self.directory.entry(name);
                let (floor, recovery) = {
                    // Under the topic's order lock, so that every
                    // publication sequenced after `floor` sees the bit.
                    let _order = self.hold_order_of(&interest);
                    self.directory.set(&interest, self.id, true);
                    let floor = interest.seq();
                    (floor, recover(&self.directory, &interest, floor))
                };
                let addr = Arc::as_ptr(&interest) as usize;
                let name: Arc<str> = Arc::from(name);
                let id = self.topics.insert(LocalTopic {
                    interest,
                    subs: Subscribers::new(),
                    floor,
                    delivered: floor,
                    joiners: Vec::new(),
                }) as u32;
                self.registry_bytes += topic_charge(name.len());
                self.by_name.insert(name, id);
                self.by_interest.insert(addr, id);
                (id, recovery)
            }
        };
        self.registry_bytes += SUBSCRIPTION_BYTES;
        let slot = self.topics[topic as usize].subs.insert(conn);
        (Subscription { topic, slot }, recovery)
    }

    /// The order lock of `topic` (none with a single worker: nothing to
    /// order against).
    fn hold_order_of(&self, topic: &Arc<TopicInterest>) -> super::bus::OrderGuard<'_> {
        let stripes = if self.batches.len() > 1 {
            1u64 << order_stripe(Arc::as_ptr(topic))
        } else {
            0
        };
        self.bus.hold_order(stripes)
    }

    /// Removes a subscription; the last one of a topic here clears this
    /// worker's interest bit.
    pub fn unsubscribe(&mut self, sub: Subscription) {
        let t = &mut self.topics[sub.topic as usize];
        if !t.joiners.is_empty() {
            t.joiners.retain(|j| j.2 != sub.slot);
        }
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

    /// Queues a publication made on this worker; it is sequenced and
    /// leaves in [`Self::dispatch`].
    pub fn publish(&mut self, topic: &Arc<TopicInterest>, frame: Bytes, now: Instant) {
        self.publish_owned(Arc::clone(topic), frame, now);
    }

    /// [`Self::publish`] taking the caller's reference to the topic (which
    /// dispatch releases through the directory).
    pub fn publish_owned(&mut self, topic: Arc<TopicInterest>, frame: Bytes, now: Instant) {
        self.outbox
            .push((topic, Arc::new(Message::new(frame, now))));
    }

    /// [`Self::publish`], acknowledged to `publisher` once numbered (see
    /// [`Self::take_acks`]).
    pub fn publish_acked(
        &mut self,
        topic: &Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
        publisher: ConnRef,
    ) {
        self.ack_to.push((self.outbox.len(), publisher));
        self.publish(topic, frame, now);
    }

    /// The acknowledgements due since the last call: (publisher, epoch,
    /// number) in numbering order.
    pub fn take_acks(&mut self) -> Vec<(ConnRef, u64, u64)> {
        std::mem::take(&mut self.acks)
    }

    /// [`Self::publish_owned`], then [`Self::dispatch`] at once (with
    /// everything this worker published before it this turn): returns
    /// the message's epoch and sequence number. For a publisher that
    /// is answered with them (`POST /publish`); a batch per call.
    pub fn publish_now(
        &mut self,
        topic: Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
    ) -> (u64, u64) {
        self.publish_owned(topic, frame, now);
        self.dispatch();
        self.last_numbered
    }

    /// Charges an envelope frame this worker built for `msg` of local
    /// topic `topic` (shared by reference like a published frame when it
    /// is large), and counts it in the topic's history if that holds `msg`.
    pub fn charge_built(&mut self, topic: Option<u32>, msg: &Arc<Message>, form: Form) {
        let len = msg.frame_of(form).map_or(0, Bytes::len);
        if len >= COPY_BELOW {
            self.frames.charge_message(msg, form);
        }
        if let Some(t) = topic.and_then(|id| self.topics.get(id as usize)) {
            self.directory.account_envelope(&t.interest, msg, len);
        }
    }

    /// The local id of a publication's topic, if it has subscribers here.
    pub fn local_id(&self, p: &Publication) -> Option<u32> {
        self.by_interest.get(&(p.topic.as_ptr() as usize)).copied()
    }

    /// Sequences this turn's publications and sends them to the mailbox of
    /// every interested worker, one batch each, this worker's own included
    /// (without a wake-up: the caller drains it next). Local publications
    /// thus take the same bounded, backpressured path as remote ones: a
    /// publisher's own worker is never held longer per turn than any other.
    /// Returns the publications dispatched.
    ///
    /// One order per topic: each publication gets its topic's next sequence
    /// number and is sent to the workers interested *now*, all under the
    /// topic's order lock (see [`Bus::hold_order`]); so at every worker a
    /// topic's publications arrive in sequence order, and a worker that
    /// sees one publication of a topic sees every later one until its
    /// interest ends.
    pub fn dispatch(&mut self) -> usize {
        let n = self.outbox.len();
        if n == 0 {
            return 0;
        }
        {
            let stripes = if self.batches.len() > 1 {
                self.outbox
                    .iter()
                    .fold(0u64, |m, (t, _)| m | 1 << order_stripe(Arc::as_ptr(t)))
            } else {
                0
            };
            let _order = self.bus.hold_order(stripes);
            let mut acks = self.ack_to.drain(..).peekable();
            for (i, (topic, msg)) in self.outbox.iter_mut().enumerate() {
                let m = Arc::get_mut(msg).expect("an undispatched message is the outbox's alone");
                m.epoch = topic.epoch();
                m.seq = topic.next_seq();
                self.last_numbered = (m.epoch, m.seq);
                if let Some((_, publisher)) = acks.next_if(|a| a.0 == i) {
                    self.acks.push((publisher, m.epoch, m.seq));
                }
                if m.frame.len() >= COPY_BELOW {
                    // Queued by reference wherever it goes: charged here,
                    // once, while a queue holds it.
                    self.frames.charge_message(msg, Form::Raw);
                }
                let mut targets = topic.workers();
                while targets != 0 {
                    let w = targets.trailing_zeros() as usize;
                    targets &= targets - 1;
                    self.batches[w].push(Publication::new(Arc::downgrade(topic), Arc::clone(msg)));
                }
                self.directory.record(topic, msg);
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
        }
        // One reference per run of a topic goes through the directory's
        // lock: the others are dropped while the run's first is still held
        // (so none of them can be the last one), outside the lock.
        let mut last: Option<*const TopicInterest> = None;
        let runs = self.outbox.drain(..).filter_map(|(topic, _)| {
            let same = last == Some(Arc::as_ptr(&topic));
            last = Some(Arc::as_ptr(&topic));
            (!same).then_some(topic)
        });
        let firsts: Vec<Arc<TopicInterest>> = runs.collect();
        self.directory.release_many(firsts.into_iter());
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

    /// Calls `deliver(run, topic, subscribers)` for `pubs` in order: each
    /// run is a maximal sequence of consecutive publications to one topic
    /// (less those at or below the local topic's floor), `topic` its name,
    /// and `subscribers` a chunk (≤ 64) of that topic's local subscribers.
    /// So the backend can push a whole run into one subscriber's queue
    /// while it is in cache, subscriber by subscriber, and every subscriber
    /// still sees the publications in order.
    pub fn deliver(
        &mut self,
        pubs: &[Publication],
        deliver: &mut impl FnMut(&[Publication], &str, &[ConnRef]),
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
            let local = &mut self.topics[id as usize];
            let skip = run.partition_point(|p| p.msg.seq <= local.floor);
            let run = &run[skip..];
            let Some(newest) = run.last().map(|p| p.msg.seq) else {
                continue;
            };
            local.delivered = newest;
            let name = local.interest.name();
            for &(c, upto, _) in &local.joiners {
                let from = run.partition_point(|p| p.msg.seq <= upto);
                if from < run.len() {
                    deliver(&run[from..], name, &[c]);
                }
            }
            let subs = &local.subs;
            let mut chunk: [ConnRef; 64] = [(0, 0); 64];
            let mut n = 0;
            for c in subs.iter() {
                chunk[n] = c;
                n += 1;
                if n == chunk.len() {
                    deliver(run, name, &chunk);
                    n = 0;
                }
            }
            if n > 0 {
                deliver(run, name, &chunk[..n]);
            }
            if !local.joiners.is_empty() {
                // Caught up: ordinary subscribers from the next run on.
                let subs = &mut local.subs;
                local.joiners.retain(|&(_, upto, slot)| {
                    let waiting = upto >= newest;
                    if !waiting {
                        subs.slot_mut(slot).key &= !PENDING;
                    }
                    waiting
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
