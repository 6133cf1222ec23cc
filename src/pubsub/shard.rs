//! One worker's share of the fan-out: its local topic registry (topic →
//! local subscribers) and the publications its own publishers produced this
//! loop turn. No I/O: the backend supplies the delivery closure and the
//! [`Bus`] does the cross-thread handoff.
//!
//! Per turn, the backend
//! 1. drains its [`Inbox`](super::bus::Inbox) and calls [`Shard::deliver`]
//!    for each publication from other workers;
//! 2. calls [`Shard::dispatch`]: this turn's local publications are sent, one
//!    batch per interested peer, and delivered locally;
//! 3. flushes every connection that received something, once.

use super::bus::{Bus, Publication};
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
/// (tests/registry_memory.rs: 349–380 B): the directory's map slot and
/// `TopicInterest`, this worker's `LocalTopic` with its first subscriber
/// slab, and its two map slots, with the maps' growth slack.
pub const TOPIC_ENTRY_BYTES: usize = 512;
/// Heap bytes one more subscription to an existing topic costs, measured
/// the same way (40–63 B; the most just after the subscriber slab doubled):
/// its slab entry and its 8 B in the connection's list, with margin.
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
    subs: Slab<ConnRef>,
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
                    subs: Slab::new(),
                }) as u32;
                self.registry_bytes += topic_charge(name.len());
                self.by_name.insert(name, id);
                self.by_interest.insert(addr, id);
                id
            }
        };
        self.registry_bytes += SUBSCRIPTION_BYTES;
        let slot = self.topics[topic as usize].subs.insert(conn) as u32;
        Subscription { topic, slot }
    }

    /// Removes a subscription; the last one of a topic here clears this
    /// worker's interest bit.
    pub fn unsubscribe(&mut self, sub: Subscription) {
        let t = &mut self.topics[sub.topic as usize];
        t.subs.remove(sub.slot as usize);
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
                if w == self.id {
                    self.lost += self.bus.send_local(w, batch);
                } else {
                    match self.bus.send(w, batch) {
                        Ok(wake) => self.wakes |= u64::from(wake) << w,
                        Err(lost) => self.lost += lost,
                    }
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
            for (_, &c) in subs.iter() {
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
mod tests {
    use super::*;
    use crate::pubsub::bus::Wake;

    struct NoWake;
    impl Wake for NoWake {
        fn wake(&self) {}
    }

    fn shards(
        n: usize,
    ) -> (
        Arc<Directory>,
        Arc<Bus>,
        Vec<crate::pubsub::bus::Inbox>,
        Vec<Shard>,
    ) {
        let d = Arc::new(Directory::new());
        let (bus, inboxes) = Bus::new((0..n).map(|_| Box::new(NoWake) as Box<dyn Wake>).collect());
        let shards = (0..n)
            .map(|i| Shard::new(i, Arc::clone(&d), Arc::clone(&bus)))
            .collect();
        (d, bus, inboxes, shards)
    }

    /// Dispatches `shard`'s outbox and delivers what its own mailbox got,
    /// calling `f` per (run, subscribers) as a worker would.
    fn dispatch_local(
        shard: &mut Shard,
        inbox: &crate::pubsub::bus::Inbox,
        bus: &Bus,
        mut f: impl FnMut(&[Publication], &[ConnRef]),
    ) {
        shard.dispatch();
        inbox.drain(bus, |batch| shard.deliver(&batch, &mut f));
    }

    fn collect(
        shard: &mut Shard,
        inbox: &crate::pubsub::bus::Inbox,
        bus: &Bus,
    ) -> Vec<(Bytes, ConnRef)> {
        let mut got = Vec::new();
        dispatch_local(shard, inbox, bus, |run, conns| {
            for &c in conns {
                got.extend(run.iter().map(|p| (p.frame.clone(), c)));
            }
        });
        got
    }

    #[test]
    fn publish_reaches_local_and_remote_subscribers_in_order() {
        let (d, bus, inboxes, mut s) = shards(3);
        let a0 = s[0].subscribe("a", (1, 0));
        s[0].subscribe("b", (2, 0));
        s[2].subscribe("a", (7, 0));
        assert_eq!(d.get("a").unwrap().workers(), 0b101);
        let a = d.entry("a");
        for i in 0..3u8 {
            s[0].publish(&a, Bytes::from(vec![i]), Instant::now());
        }
        let local = collect(&mut s[0], &inboxes[0], &bus);
        assert_eq!(
            local,
            (0..3u8)
                .map(|i| (Bytes::from(vec![i]), (1, 0)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            bus.queued_bytes(2),
            3 * (1 + crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES)
        );
        assert_eq!(bus.queued_bytes(1), 0, "worker 1 has no subscriber of a");
        let mut remote = Vec::new();
        inboxes[2].drain(&bus, |batch| {
            s[2].deliver(&batch, &mut |run: &[Publication], c: &[ConnRef]| {
                for &c in c {
                    remote.extend(run.iter().map(|p| (p.frame[0], c)))
                }
            });
        });
        assert_eq!(remote, vec![(0, (7, 0)), (1, (7, 0)), (2, (7, 0))]);
        s[0].unsubscribe(a0);
        assert_eq!(a.workers(), 0b100);
        assert_eq!(s[0].topic_count(), 1);
    }

    #[test]
    fn many_subscribers_are_handed_out_in_chunks() {
        let (d, bus, inboxes, mut s) = shards(1);
        let subs: Vec<_> = (0..150).map(|i| s[0].subscribe("t", (i, 0))).collect();
        for sub in subs.iter().step_by(3) {
            s[0].unsubscribe(*sub);
        }
        s[0].publish(&d.entry("t"), Bytes::from_static(b"x"), Instant::now());
        let got: Vec<usize> = collect(&mut s[0], &inboxes[0], &bus)
            .into_iter()
            .map(|(_, c)| c.0)
            .collect();
        let want: Vec<usize> = (0..150).filter(|i| i % 3 != 0).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn runs_keep_each_subscribers_order_across_topics() {
        let (d, bus, inboxes, mut s) = shards(1);
        s[0].subscribe("a", (1, 0));
        s[0].subscribe("b", (1, 0));
        s[0].subscribe("b", (2, 0));
        let (a, b) = (d.entry("a"), d.entry("b"));
        for (t, x) in [(&a, 1u8), (&a, 2), (&b, 3), (&a, 4), (&b, 5), (&b, 6)] {
            s[0].publish(t, Bytes::from(vec![x]), Instant::now());
        }
        let mut runs = 0;
        let mut got: Vec<(usize, u8)> = Vec::new();
        dispatch_local(&mut s[0], &inboxes[0], &bus, |run, conns| {
            runs += 1;
            for &c in conns {
                got.extend(run.iter().map(|p| (c.0, p.frame[0])));
            }
        });
        assert_eq!(runs, 4, "a a | b | a | b b");
        let of = |c: usize| {
            got.iter()
                .filter(|g| g.0 == c)
                .map(|g| g.1)
                .collect::<Vec<_>>()
        };
        assert_eq!(of(1), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(of(2), vec![3, 5, 6]);
    }

    #[test]
    fn publications_in_flight_do_not_keep_a_topic_alive() {
        let (d, bus, inboxes, mut s) = shards(2);
        let sub = s[1].subscribe("gone", (0, 0));
        let t = d.entry("gone");
        s[0].publish(&t, Bytes::from_static(b"x"), Instant::now());
        d.release(t);
        s[0].dispatch();
        s[1].unsubscribe(sub);
        assert!(
            d.is_empty(),
            "the queued publication holds no strong reference"
        );
        let mut delivered = 0;
        inboxes[1].drain(&bus, |batch| {
            s[1].deliver(&batch, &mut |_: &[Publication], _: &[ConnRef]| {
                delivered += 1
            })
        });
        assert_eq!(delivered, 0, "nobody left to deliver to");
    }

    #[test]
    fn delivery_steps_keep_whole_runs_and_stay_near_the_budget() {
        let (d, _bus, _inboxes, mut s) = shards(1);
        for c in 0..100 {
            s[0].subscribe("a", (c, 0));
        }
        s[0].subscribe("b", (0, 0));
        let (a, b) = (d.entry("a"), d.entry("b"));
        let p = |t: &Arc<TopicInterest>| Publication {
            topic: Arc::downgrade(t),
            frame: Bytes::from_static(b"x"),
            published_at: Instant::now(),
        };
        // a×10 (1 000 deliveries), b×5 (5), a×3 (300).
        let pubs: Vec<Publication> = (0..10)
            .map(|_| p(&a))
            .chain((0..5).map(|_| p(&b)))
            .chain((0..3).map(|_| p(&a)))
            .collect();
        assert_eq!(s[0].step_end(&pubs, 0, 10_000), 18, "everything fits");
        assert_eq!(s[0].step_end(&pubs, 0, 1_005), 15, "two whole runs");
        assert_eq!(
            s[0].step_end(&pubs, 0, 1_100),
            15,
            "not part of a later run"
        );
        assert_eq!(s[0].step_end(&pubs, 0, 450), 4, "part of the first run");
        assert_eq!(s[0].step_end(&pubs, 0, 0), 1, "at least one publication");
        assert_eq!(s[0].step_end(&pubs, 10, 3), 13, "a run with one subscriber");
    }

    #[test]
    fn sub_lists_grow_and_shrink() {
        let sub = |t| Subscription { topic: t, slot: 0 };
        let mut l = SubList::default();
        assert!(l.is_empty());
        for t in 0..3 {
            l.push(sub(t));
        }
        assert_eq!(
            l.as_slice().iter().map(|s| s.topic()).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(l.swap_remove(0).topic(), 0);
        assert_eq!(l.len(), 2);
        l.swap_remove(1);
        assert!(matches!(l, SubList::One(_)));
        assert_eq!(l.take().len(), 1);
        assert!(l.is_empty());
    }

    #[test]
    fn retain_visits_each_subscription_once_and_keeps_the_list_compact() {
        let sub = |t| Subscription { topic: t, slot: 0 };
        let mut l = SubList::default();
        for t in 0..5 {
            l.push(sub(t));
        }
        let mut seen = Vec::new();
        l.retain(|s| {
            seen.push(s.topic());
            s.topic() % 2 == 0
        });
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(
            l.as_slice().iter().map(|s| s.topic()).collect::<Vec<_>>(),
            vec![0, 2, 4]
        );
        l.retain(|s| s.topic() == 2);
        assert!(matches!(l, SubList::One(s) if s.topic() == 2));
        l.retain(|_| true);
        assert!(matches!(l, SubList::One(_)));
        l.retain(|_| false);
        assert!(l.is_empty());
        l.retain(|_| panic!("an empty list has nothing to visit"));
    }

    #[test]
    fn the_last_unsubscribe_forgets_the_topic() {
        let (d, _bus, _inboxes, mut s) = shards(2);
        let x = s[1].subscribe("x", (0, 0));
        let y = s[1].subscribe("x", (1, 0));
        s[1].unsubscribe(x);
        assert_eq!(s[1].subscriber_count("x"), 1);
        s[1].unsubscribe(y);
        assert!(s[1].topic_id("x").is_none());
        assert!(d.is_empty());
    }
}
