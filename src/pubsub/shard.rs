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
use super::history::{Recovery, Since, Start};
use super::ledger::SharedFrames;
use super::pattern::{self, PatternTrie};
use super::policy::SlowConsumerPolicy;
use super::slots::Subscribers;
use crate::proto::outbound::COPY_BELOW;
use bytes::Bytes;
use slab::Slab;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

/// Heap bytes one topic costs the registries besides its name (kept
/// twice: the directory's copy and this worker's), measured
/// (tests/registry_memory.rs, names of 8 bytes and the first subscription
/// included: up to 609 B, at 10 000 topics, since the pattern fields): the
/// directory's map slot and `TopicInterest`, this worker's `LocalTopic`
/// with its first subscriber slots, and its two map slots, with the maps'
/// growth slack.
pub const TOPIC_ENTRY_BYTES: usize = 576;
/// Heap bytes one more subscription to an existing topic costs, measured
/// the same way (24–31 B; the most just after the subscriber slots
/// doubled): its 8 B slot, its 8 B in a connection's list of several, with
/// margin.
pub const SUBSCRIPTION_BYTES: usize = 80;

/// What the registries are charged for a topic named `name_len` bytes.
pub const fn topic_charge(name_len: usize) -> usize {
    TOPIC_ENTRY_BYTES + 2 * name_len
}

/// What one token of a pattern holds: a node in the worker's trie and one
/// in the directory's, each with its parent's map entry (~450 bytes).
pub const PATTERN_TOKEN_BYTES: usize = 512;

/// What registering pattern `name` holds: its entry, and a trie node per
/// token in two tries (a pattern of 122 empty tokens holds ~55 KB, not
/// the ~900 bytes of a topic's entry).
pub fn pattern_charge(name: &str) -> usize {
    topic_charge(name.len()) + pattern::token_count(name) * PATTERN_TOKEN_BYTES
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

/// Set in [`Subscription::topic`] for a pattern subscription (the rest is
/// the local pattern's id).
const PATTERN_SUB: u32 = 1 << 31;

impl Subscription {
    /// The local topic id (stable while the topic has subscribers here),
    /// or for a pattern subscription its local pattern id with the top bit
    /// set: ids of the two kinds never compare equal.
    pub fn topic(&self) -> u32 {
        self.topic
    }

    /// Whether this subscribes to a pattern.
    pub fn is_pattern(&self) -> bool {
        self.topic & PATTERN_SUB != 0
    }
}

/// What a new pattern subscription replays of the topics it matches (see
/// [`Shard::subscribe_pattern`]).
#[derive(Clone, Copy)]
pub struct Replay<'a> {
    /// Positions to recover from, per topic.
    pub since: &'a [(String, Since)],
    /// Whether the other topics' last values are read.
    pub last_values: bool,
    /// Topics left out (the connection gets them otherwise: subscribed
    /// itself, through a pattern it holds, or replayed already).
    pub skip: &'a dyn Fn(&str) -> bool,
    /// Most bytes of frames read per topic.
    pub max_bytes: usize,
    /// For the histories' ages.
    pub now: Instant,
    /// The connection's own topic subscriptions: a topic of them the
    /// pattern matches goes on through the pattern from where the
    /// connection's stream of it is, should it leave the topic.
    pub held: &'a [Subscription],
}

impl Replay<'_> {
    /// Nothing replayed: a live start.
    pub fn live() -> Replay<'static> {
        Replay {
            since: &[],
            last_values: false,
            skip: &|_| false,
            max_bytes: 0,
            now: Instant::now(),
            held: &[],
        }
    }
}

/// What delivery needs of a topic: its name and its namespace's
/// slow-consumer policy and `max-rate`, read from the directory entry for
/// each run (so a reload's new values apply from the next publication).
#[derive(Debug, Clone, Copy)]
pub struct TopicView<'a> {
    pub name: &'a Arc<str>,
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// Its namespace's most publications per second to one subscriber.
    pub max_rate: Option<u32>,
}

impl<'a> TopicView<'a> {
    fn of(t: &'a TopicInterest) -> Self {
        Self {
            name: t.name_arc(),
            slow_consumer: t.slow_consumer(),
            max_rate: t.max_rate(),
        }
    }
}

/// Patterns new to a worker that it registers per second (a bucket of one
/// second's worth): a client cannot make every worker take all order
/// locks and rescan its topics at will by subscribing to ever new
/// patterns. Subscriptions to patterns a worker holds already are free.
pub const PATTERN_REGISTRATIONS_PER_SECOND: u32 = 1000;

/// Pattern matching work a worker does per second for control messages,
/// in match steps (a topic tested against a pattern costs the pattern's
/// tokens; ~10 ns each): a new pattern here is tested against every local
/// topic, and a pattern's last values search the directory (under its
/// lock). That work is charged as it is done (the last unsubscribe of a
/// pattern, which looks at every local topic once, follows a charged
/// arrival, so churn costs at most twice this); a subscribe naming a pattern waits
/// (`busy`) while the worker is in debt. So churning patterns against a
/// worker holding tens of thousands of long topics costs it a few per
/// cent of its time, where it could stall it for seconds (outside probe:
/// 16 subscribe/unsubscribe pairs of 16 new patterns each against 32 000
/// topics of 59 tokens per worker stalled every other client 13 s), while
/// a reconnect storm of `prices.>` subscribers with last values (~256
/// steps each) is admitted at ~15 000 a second per worker.
pub const SCAN_STEPS_PER_SECOND: u32 = 4_000_000;

/// Match steps per token of the scan bucket (its arithmetic counts at most
/// a million tokens a second).
const SCAN_STEPS_PER_TOKEN: usize = 64;

/// Most topics one pattern subscription replays (last values, or `since`
/// recoveries) when it starts; past them the subscription starts live.
pub const PATTERN_REPLAY_TOPICS: usize = 256;

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
    /// The epoch `floor`, `delivered` and the joiners' positions count in.
    /// Fixed on one machine; in a cluster a topic's numbering may start
    /// over (a later epoch from the cluster's stream), and the first run of
    /// it here starts these over too ([`Shard::deliver_run`]).
    epoch: u64,
    /// Subscribers that joined with a recovery or a last value while
    /// publications up to what they got were still in the mailbox: each
    /// with that number and its slot, which stays *pending* (left out of
    /// the ordinary delivery) until a later publication reaches it. Only
    /// those that join between a publication's numbering and its
    /// delivery here, so few.
    joiners: Vec<(ConnRef, u64, u32)>,
    /// The local patterns matching the topic (ids in `Shard::patterns`).
    patterns: Vec<u32>,
    /// Pattern subscribers that got the topic's messages up to a number
    /// (a last value, a recovery) while later ones may still be in the
    /// mailbox: (connection, number, pattern id, slot), checked against
    /// the pattern's slot when used (the subscription may have gone).
    pattern_joiners: Vec<(ConnRef, u64, u32, u32)>,
    /// Delivered to since the last [`Shard::sweep_pattern_topics`].
    touched: bool,
}

impl LocalTopic {
    /// Nothing here needs the topic any more.
    fn unused(&self) -> bool {
        self.subs.is_empty() && self.patterns.is_empty()
    }
}

/// A pattern subscribed to on this worker.
#[derive(Debug)]
struct LocalPattern {
    name: Arc<str>,
    subs: Subscribers,
    /// The number of the last batch sent to this worker's mailbox before
    /// the pattern was registered ([`Bus::sent_to`]): batches up to it
    /// were not sent for it (their topics may have reached this worker
    /// then only in part), so its subscribers get none of them.
    start: u64,
}
/// Tables under this capacity are not shrunk (a few pages at most).
const SHRINK_ABOVE: usize = 1024;

/// Whether a table of `capacity` holding `len` is worth shrinking.
pub(super) fn sparse(capacity: usize, len: usize) -> bool {
    capacity > SHRINK_ABOVE && capacity / 4 >= len
}

/// Shrinks `map` to twice what it holds once it is a quarter full or less.
pub(super) fn shrink_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if sparse(map.capacity(), map.len()) {
        map.shrink_to(map.len() * 2);
    }
}

/// A worker's topic registry and outbox.
pub struct Shard {
    id: usize,
    /// Pattern subscriptions here: who a publication of a topic with no
    /// entry here yet may go to (`step_end`'s estimate).
    pattern_subs: usize,
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
    /// The outbox's frame bytes, charged to the budget until dispatch
    /// (then charged as `frames`, or copied into the queues that take them).
    outbox_bytes: usize,
    /// Pattern-trie nodes the last [`Self::dispatch`] walked to find its
    /// publications' workers ([`Self::walked`]).
    walked: usize,
    /// Per outbox entry, the publisher to acknowledge it to, if it asked
    /// (kept apart: most publications have none).
    /// (In a cluster, every WebSocket publisher is listed, `false` where it
    /// did not ask: a refusal closes it.)
    ack_to: Vec<(usize, ConnRef, bool)>,
    /// Acknowledgements due, by publisher: (epoch, number) in numbering
    /// order, for the caller to queue ([`Self::take_acks`]); by publisher
    /// so that taking one publisher's ([`Self::take_acks_of`], at its close
    /// or its HTTP answers) costs its own, not every publisher's.
    acks: HashMap<ConnRef, Vec<(u64, u64)>>,
    /// The epoch and number of the last message [`Shard::dispatch`] numbered.
    last_numbered: (u64, u64),
    /// Reused per-peer batches for [`Shard::dispatch`].
    batches: Vec<Vec<Publication>>,
    /// Publications a peer could not take (it had exited), not yet counted.
    lost: usize,
    /// Publications the cluster link refused, not yet counted, with the
    /// publishers among them that asked for acknowledgements.
    refused: (usize, Vec<(ConnRef, super::remote::Refused)>),
    /// Workers to wake for this turn's batches (bit `w`), not yet woken.
    wakes: u64,
    /// Large frames published here, charged to this worker's budget while
    /// any queue holds them.
    frames: SharedFrames,
    /// What the topic registry costs for this worker's topics and
    /// subscriptions ([`topic_charge`], [`SUBSCRIPTION_BYTES`]), charged to
    /// its budget.
    registry_bytes: usize,
    /// Patterns subscribed to here, and their ids by pattern.
    patterns: Slab<LocalPattern>,
    pattern_ids: PatternTrie<u32>,
    /// Connections already served in the run being delivered (reused).
    seen: HashSet<ConnRef>,
    /// The number of the batch being delivered ([`Inbox::taken`](super::bus::Inbox::taken)).
    batch: u64,
    /// Recoveries admitted (`--max-recovery-rate`); full at first use.
    recoveries: Option<crate::proto::rate::TokenBucket>,
    /// Token refreshes (each a signature check) admitted on this worker.
    refreshes: Option<crate::proto::rate::TokenBucket>,
    /// Patterns registered ([`PATTERN_REGISTRATIONS_PER_SECOND`]).
    registrations: Option<crate::proto::rate::TokenBucket>,
    /// Pattern matching work done ([`SCAN_STEPS_PER_SECOND`]), and the
    /// steps done since it was last charged.
    scans: Option<crate::proto::rate::TokenBucket>,
    scanned: usize,
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
            outbox_bytes: 0,
            walked: 0,
            ack_to: Vec::new(),
            acks: HashMap::new(),
            last_numbered: (0, 0),
            batches: (0..workers).map(|_| Vec::new()).collect(),
            lost: 0,
            refused: (0, Vec::new()),
            wakes: 0,
            frames: SharedFrames::default(),
            registry_bytes: 0,
            pattern_subs: 0,
            patterns: Slab::new(),
            pattern_ids: PatternTrie::default(),
            seen: HashSet::new(),
            batch: 0,
            recoveries: None,
            refreshes: None,
            registrations: None,
            scans: None,
            scanned: 0,
        }
    }

    /// Admits `n` patterns new to this worker (each costs an
    /// every-order-lock registration, a scan of the local topics, and a
    /// refresh of every topic's cached pattern mask), at most
    /// [`PATTERN_REGISTRATIONS_PER_SECOND`]; `Err(ms)`: try again after
    /// that long (the tokens taken stay taken).
    pub fn admit_patterns(&mut self, n: usize, now_ms: u32) -> Result<(), u32> {
        admit(
            &mut self.registrations,
            PATTERN_REGISTRATIONS_PER_SECOND,
            n,
            now_ms,
        )
    }

    /// Admits a subscribe that names a pattern: charges the matching work
    /// done since the last call ([`SCAN_STEPS_PER_SECOND`]); `Err(ms)`:
    /// the worker is in debt for that long.
    pub fn admit_scans(&mut self, now_ms: u32) -> Result<(), u32> {
        let rate = (SCAN_STEPS_PER_SECOND as usize / SCAN_STEPS_PER_TOKEN) as u32;
        let bucket = self
            .scans
            .get_or_insert_with(|| crate::proto::rate::TokenBucket::full(rate, now_ms));
        let steps = std::mem::take(&mut self.scanned);
        let tokens = steps.div_ceil(SCAN_STEPS_PER_TOKEN).min(u32::MAX as usize) as u32;
        bucket.spend_n(rate, now_ms, tokens);
        if bucket.ready(rate, now_ms) {
            Ok(())
        } else {
            Err(bucket.wait_ms(rate).max(1))
        }
    }

    /// Pattern matching done outside the shard for a control message (its
    /// `since` keys, a replay's topics against the patterns held), in
    /// token comparisons: charged with the shard's own at the next
    /// [`Self::admit_scans`].
    pub fn charge_scans(&mut self, steps: usize) {
        self.scanned = self.scanned.saturating_add(steps);
    }

    /// Admits one subscribe with `since` at `rate` per second (0: no
    /// limit); `Err(ms)`: none left, try again after that long.
    pub fn admit_recovery(&mut self, rate: u32, now_ms: u32) -> Result<(), u32> {
        admit(&mut self.recoveries, rate, 1, now_ms)
    }

    /// Admits one in-band token refresh (a signature check) at `rate` per
    /// second; `Err(ms)`: none left, try again after that long.
    pub fn admit_refresh(&mut self, rate: u32, now_ms: u32) -> Result<(), u32> {
        admit(&mut self.refreshes, rate, 1, now_ms)
    }

    /// Admits `n` more recoveries from the same bucket: in a cluster, each
    /// topic whose history must first be read from the stream counts one
    /// (a `history` request's too), so that reads of fresh names cannot
    /// outrun the rate a subscribe with `since` is held to.
    pub fn admit_recoveries(&mut self, rate: u32, n: usize, now_ms: u32) -> Result<(), u32> {
        admit(&mut self.recoveries, rate, n, now_ms)
    }

    /// Patterns subscribed to on this worker.
    pub fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    /// The local id of pattern `name`, as a [`Subscription::topic`] would
    /// hold it, if it has subscribers here.
    pub fn pattern_id(&self, name: &str) -> Option<u32> {
        self.pattern_ids.get(name).map(|&id| id | PATTERN_SUB)
    }

    /// The pattern of a [`Subscription::topic`] id, if held here.
    pub fn pattern_name(&self, id: u32) -> Option<&str> {
        self.patterns
            .get((id & !PATTERN_SUB) as usize)
            .map(|p| &*p.name)
    }

    /// The ids of the local patterns matching topic `name`.
    fn patterns_matching(&self, name: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.pattern_ids.for_each_match(name, |&id| ids.push(id));
        ids
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

    /// The name of local topic `id`.
    pub fn topic_name(&self, id: u32) -> Option<&str> {
        self.topics.get(id as usize).map(|t| t.interest.name())
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
            Start::LastValue | Start::Continue => None,
        };
        let (topic, recovery) = match self.by_name.get(name) {
            Some(&id) => {
                let local = &self.topics[id as usize];
                // Nothing to read for a topic without last values: a plain join.
                let reads = match start {
                    Start::Live | Start::Continue => false,
                    Start::LastValue => local.interest.last_value(),
                    Start::Since(_) => true,
                };
                // Held here for patterns only so far: this worker's
                // interest bit is set now, and the floor moves up to it.
                let first = local.subs.is_empty();
                let (recovery, floor) = if reads || first {
                    let _order = self.hold_order_of(&local.interest);
                    if first {
                        self.directory.set(&local.interest, self.id, true);
                    }
                    let at = local.interest.seq();
                    let epoch = local.interest.epoch();
                    let r = reads
                        .then_some(())
                        .and_then(|_| recover(&self.directory, &local.interest, at));
                    (r, first.then_some((epoch, at)))
                } else {
                    (None, None)
                };
                let local = &mut self.topics[id as usize];
                if let Some((epoch, f)) = floor {
                    if epoch > local.epoch {
                        // The numbering started over since (a cluster):
                        // what was delivered counts in the old epoch.
                        local.epoch = epoch;
                        local.delivered = 0;
                    }
                    local.floor = f;
                }
                if start == Start::Continue && !local.patterns.is_empty() {
                    // What its patterns gave it so far: it is fed the
                    // rest of every run (pending) until past the floor.
                    let upto = local
                        .pattern_joiners
                        .iter()
                        .filter(|j| j.0 == conn)
                        .map(|j| j.1)
                        .fold(local.delivered, u64::max);
                    self.registry_bytes += SUBSCRIPTION_BYTES;
                    let slot = local.subs.insert_pending(conn);
                    local.joiners.push((conn, upto, slot));
                    return (Subscription { topic: id, slot }, None);
                }
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
                let (epoch, floor, recovery) = {
                    // Under the topic's order lock, so that every
                    // publication sequenced after `floor` sees the bit.
                    let _order = self.hold_order_of(&interest);
                    self.directory.set(&interest, self.id, true);
                    let floor = interest.seq();
                    let epoch = interest.epoch();
                    (epoch, floor, recover(&self.directory, &interest, floor))
                };
                let patterns = self.patterns_matching(name);
                // Publications a local pattern receives may be in the
                // mailbox: nothing is known delivered yet.
                let delivered = if patterns.is_empty() { floor } else { 0 };
                let through_pattern = !patterns.is_empty();
                let id = self.add_topic(interest, (epoch, floor), delivered, patterns);
                if start == Start::Continue && through_pattern {
                    // Nothing of it was delivered here yet: every run
                    // that comes is new to it.
                    let local = &mut self.topics[id as usize];
                    self.registry_bytes += SUBSCRIPTION_BYTES;
                    let slot = local.subs.insert_pending(conn);
                    local.joiners.push((conn, 0, slot));
                    return (Subscription { topic: id, slot }, None);
                }
                if let Some(r) = recovery.as_ref().filter(|r| r.last > delivered) {
                    let local = &mut self.topics[id as usize];
                    self.registry_bytes += SUBSCRIPTION_BYTES;
                    let slot = local.subs.insert_pending(conn);
                    local.joiners.push((conn, r.last, slot));
                    return (Subscription { topic: id, slot }, recovery);
                }
                (id, recovery)
            }
        };
        self.registry_bytes += SUBSCRIPTION_BYTES;
        let slot = self.topics[topic as usize].subs.insert(conn);
        (Subscription { topic, slot }, recovery)
    }

    /// Registers a local topic (charged to the registry); returns its id.
    fn add_topic(
        &mut self,
        interest: Arc<TopicInterest>,
        (epoch, floor): (u64, u64),
        delivered: u64,
        patterns: Vec<u32>,
    ) -> u32 {
        let addr = Arc::as_ptr(&interest) as usize;
        let name: Arc<str> = Arc::from(interest.name());
        let id = self.topics.insert(LocalTopic {
            interest,
            subs: Subscribers::new(),
            floor,
            delivered,
            epoch,
            joiners: Vec::new(),
            patterns,
            pattern_joiners: Vec::new(),
            touched: true,
        }) as u32;
        self.registry_bytes += topic_charge(name.len());
        self.by_name.insert(name, id);
        self.by_interest.insert(addr, id);
        id
    }

    /// Forgets local topic `id` (nobody here needs it).
    fn remove_topic(&mut self, id: u32) {
        let t = self.topics.remove(id as usize);
        self.registry_bytes -= topic_charge(t.interest.name().len());
        self.by_name.remove(t.interest.name());
        self.by_interest
            .remove(&(Arc::as_ptr(&t.interest) as usize));
        self.directory.release(t.interest);
    }

    /// Adds `conn` to the subscribers of pattern `name`; then, per topic it
    /// matches (at most [`PATTERN_REPLAY_TOPICS`]): the topics of `since`
    /// are recovered from their positions, and with `last_values` the
    /// other known topics' last values are read; each under its topic's
    /// order lock, joining its live stream right after what was read (as
    /// [`Self::subscribe_since`] does), at most `max_bytes` each; topics in
    /// `skip` (those the connection subscribes to itself) are not read. Returns
    /// the subscription and, per topic read, its name and what was read
    /// (the caller queues it before anything this worker delivers next).
    pub fn subscribe_pattern(
        &mut self,
        name: &str,
        conn: ConnRef,
        replay: Replay<'_>,
    ) -> (Subscription, Vec<(Arc<str>, Recovery)>) {
        let Replay {
            since,
            last_values,
            skip,
            max_bytes,
            now,
            held,
        } = replay;
        let pid = match self.pattern_ids.get(name) {
            Some(&id) => id,
            None => self.add_pattern(name),
        };
        self.registry_bytes += SUBSCRIPTION_BYTES;
        let slot = self.patterns[pid as usize].subs.insert(conn);
        self.pattern_subs += 1;
        let sub = Subscription {
            topic: pid | PATTERN_SUB,
            slot,
        };
        self.continue_held(held, name, conn, pid, slot);
        let mut read = Vec::new();
        if since.is_empty() && !last_values {
            return (sub, read);
        }
        // The topics to read: those of `since` first, then the others'
        // last values.
        let mut starts: Vec<(Arc<TopicInterest>, Start)> = Vec::new();
        for (topic, s) in since.iter().take(PATTERN_REPLAY_TOPICS) {
            if pattern::matches(name, topic) && !skip(topic) {
                starts.push((self.directory.entry(topic), Start::Since(*s)));
            }
        }
        if last_values && starts.len() < PATTERN_REPLAY_TOPICS {
            let named: HashSet<&str> = since.iter().map(|(t, _)| t.as_str()).collect();
            let (more, examined) = self
                .directory
                .matching(name, PATTERN_REPLAY_TOPICS + named.len());
            self.scanned += examined * pattern::token_count(name);
            let mut unused = Vec::new();
            for t in more {
                if named.contains(t.name())
                    || skip(t.name())
                    || starts.len() >= PATTERN_REPLAY_TOPICS
                {
                    unused.push(t);
                } else {
                    starts.push((t, Start::LastValue));
                }
            }
            self.directory.release_many(unused.into_iter());
        }
        for (interest, start) in starts {
            let r = {
                let _order = self.hold_order_of(&interest);
                let at = interest.seq();
                match start {
                    Start::Since(s) => {
                        Some(self.directory.recover(&interest, s, at, max_bytes, now))
                    }
                    _ if interest.last_value() => {
                        Some(self.directory.last_value(&interest, at, max_bytes))
                    }
                    _ => None,
                }
            };
            let Some(r) = r else {
                self.directory.release(interest);
                continue;
            };
            let tname: Arc<str> = Arc::from(interest.name());
            let id = match self.by_interest.get(&(Arc::as_ptr(&interest) as usize)) {
                Some(&id) => {
                    self.directory.release(interest);
                    id
                }
                None => {
                    let patterns = self.patterns_matching(&tname);
                    // What the mailbox holds of it is unknown: 0 delivered.
                    let epoch = interest.epoch();
                    self.add_topic(interest, (epoch, 0), 0, patterns)
                }
            };
            let local = &mut self.topics[id as usize];
            if r.last > local.delivered {
                // One entry per connection, none left by subscriptions
                // that ended: at most one per pattern subscriber here.
                let patterns = &self.patterns;
                local.pattern_joiners.retain(|&(c, _, p, s)| {
                    c != conn && patterns.get(p as usize).and_then(|x| x.subs.get(s)) == Some(c)
                });
                local.pattern_joiners.push((conn, r.last, pid, slot));
            }
            read.push((tname, r));
        }
        (sub, read)
    }

    /// For each topic of `held` (the connection's own subscriptions) that
    /// pattern `name` (local `pid`, the connection's `slot` in it)
    /// matches: a pattern joiner at the connection's position in the
    /// topic, so that runs still in the mailbox from before the pattern
    /// was registered here reach it through the pattern should it leave
    /// the topic (no gap), and nothing it got comes again.
    fn continue_held(
        &mut self,
        held: &[Subscription],
        name: &str,
        conn: ConnRef,
        pid: u32,
        slot: u32,
    ) {
        for s in held.iter().filter(|s| !s.is_pattern()) {
            let Some(local) = self.topics.get_mut(s.topic as usize) else {
                continue;
            };
            if !pattern::matches(name, local.interest.name()) {
                continue;
            }
            // A pending joiner's own position, else the floor or what was
            // delivered since.
            let at = local
                .joiners
                .iter()
                .find(|j| j.0 == conn)
                .map_or(local.floor.max(local.delivered), |j| j.1);
            local.pattern_joiners.retain(|j| j.0 != conn);
            local.pattern_joiners.push((conn, at, pid, slot));
        }
    }

    /// Registers pattern `name` on this worker: with the directory (under
    /// every order lock, noting the mailbox's position), in the local
    /// trie, and in each local topic it matches. Returns its id.
    fn add_pattern(&mut self, name: &str) -> u32 {
        let start = {
            let _all = self.bus.hold_all_order();
            self.directory.set_pattern(name, self.id, true);
            self.bus.sent_to(self.id)
        };
        let name: Arc<str> = Arc::from(name);
        self.registry_bytes += pattern_charge(&name);
        let id = self.patterns.insert(LocalPattern {
            name: Arc::clone(&name),
            subs: Subscribers::new(),
            start,
        }) as u32;
        *self.pattern_ids.get_or_insert_with(&name, || id) = id;
        self.scanned += self.topics.len() * pattern::token_count(&name);
        for (_, t) in self.topics.iter_mut() {
            if pattern::matches(&name, t.interest.name()) {
                t.patterns.push(id);
            }
        }
        id
    }

    /// Forgets the local topics kept for patterns alone (no subscriber of
    /// their own, no joiner waiting) that received nothing since the last
    /// call: a pattern matching many topics (`>`) holds only those
    /// published to lately, and their entries can age out of the directory.
    /// A later publication makes the topic local again (or, if its entry
    /// is gone, still reaches the patterns). One pass over the local topics;
    /// called from the worker's periodic sweep.
    pub fn sweep_pattern_topics(&mut self) {
        let mut idle = Vec::new();
        for (id, t) in self.topics.iter_mut() {
            if t.subs.is_empty() && t.pattern_joiners.is_empty() {
                if !t.touched {
                    idle.push(id as u32);
                }
                t.touched = false;
            }
        }
        for id in idle {
            self.remove_topic(id);
        }
    }

    /// Gives back the room the registry kept for topics and patterns it
    /// no longer has: a burst of registrations let go left their tables
    /// at the burst's size (outside probe: 320 000 topics registered and
    /// released left 84-91 MiB of RSS over the baseline). A table is
    /// shrunk once it is a quarter full or less (so each shrink follows as
    /// many removals as it costs); the slabs only down to their last
    /// entry in use (their keys are the topics' ids). Called from the
    /// worker's periodic sweep.
    pub fn shrink_registry(&mut self) {
        if sparse(self.topics.capacity(), self.topics.len()) {
            self.topics.shrink_to_fit();
        }
        if sparse(self.patterns.capacity(), self.patterns.len()) {
            self.patterns.shrink_to_fit();
        }
        shrink_sparse(&mut self.by_name);
        shrink_sparse(&mut self.by_interest);
    }

    /// Marks every slot of a connection's subscriptions `subs` as
    /// [`MULTI`](super::slots::MULTI) or not: set when the connection holds
    /// a pattern and some other subscription (a publication could reach
    /// it twice), so delivery serves it once.
    pub fn mark_multi(&mut self, subs: &[Subscription]) {
        let multi = subs.len() > 1 && subs.iter().any(Subscription::is_pattern);
        for s in subs {
            if s.is_pattern() {
                let id = (s.topic & !PATTERN_SUB) as usize;
                self.patterns[id].subs.set_multi(s.slot, multi);
            } else {
                self.topics[s.topic as usize].subs.set_multi(s.slot, multi);
            }
        }
    }

    /// The order lock of `topic` (none with a single worker: nothing to
    /// order against).
    fn hold_order_of(&self, topic: &Arc<TopicInterest>) -> super::bus::OrderGuard<'_> {
        let stripes = if self.bus.order_needed() {
            1u64 << order_stripe(Arc::as_ptr(topic))
        } else {
            0
        };
        self.bus.hold_order(stripes)
    }

    /// Removes a subscription; the last one of a topic here clears this
    /// worker's interest bit (and the last of a pattern its registration).
    pub fn unsubscribe(&mut self, sub: Subscription) {
        if sub.is_pattern() {
            return self.unsubscribe_pattern(sub);
        }
        let t = &mut self.topics[sub.topic as usize];
        if !t.joiners.is_empty() {
            t.joiners.retain(|j| j.2 != sub.slot);
        }
        t.subs.remove(sub.slot);
        self.registry_bytes -= SUBSCRIPTION_BYTES;
        if t.subs.is_empty() {
            self.directory.set(&t.interest, self.id, false);
            if t.unused() {
                self.remove_topic(sub.topic);
            }
        }
    }

    fn unsubscribe_pattern(&mut self, sub: Subscription) {
        let pid = sub.topic & !PATTERN_SUB;
        let p = &mut self.patterns[pid as usize];
        p.subs.remove(sub.slot);
        self.pattern_subs -= 1;
        self.registry_bytes -= SUBSCRIPTION_BYTES;
        if !p.subs.is_empty() {
            return;
        }
        // Its last subscriber here: the pattern goes, and with it the
        // topics only it kept (one pass over the local topics).
        let p = self.patterns.remove(pid as usize);
        self.pattern_ids.remove(&p.name);
        self.directory.set_pattern(&p.name, self.id, false);
        self.registry_bytes -= pattern_charge(&p.name);
        // Not charged to the scan budget: a pattern's departure follows
        // its arrival, which was (and cost more), and a mass disconnect
        // must not leave the worker refusing patterns afterwards.
        let mut gone = Vec::new();
        for (id, t) in self.topics.iter_mut() {
            if let Some(i) = t.patterns.iter().position(|&x| x == pid) {
                t.patterns.swap_remove(i);
                t.pattern_joiners.retain(|j| j.2 != pid);
                if t.unused() {
                    gone.push(id as u32);
                }
            }
        }
        for id in gone {
            self.remove_topic(id);
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
    /// shard hold: this turn's publications (until dispatch), published
    /// frames still queued anywhere, and the topic registry of its
    /// subscribers.
    pub fn charged_bytes(&self) -> usize {
        self.outbox_bytes + self.frames.bytes() + self.registry_bytes
    }

    /// The workers whose mailboxes got a batch needing a wake-up since the
    /// last call (bit `w`): the caller wakes them ([`Bus::wake`]).
    pub fn take_wakes(&mut self) -> u64 {
        std::mem::take(&mut self.wakes)
    }

    /// Publications the cluster refused since the last call (it is
    /// unreachable and its link's bound is reached), and the publishers
    /// among them that wait for acknowledgements, with why: the caller
    /// counts them and closes those publishers.
    pub fn take_refused(&mut self) -> (usize, Vec<(ConnRef, super::remote::Refused)>) {
        std::mem::take(&mut self.refused)
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
        self.publish_message(topic, Message::new(frame, now));
    }

    /// [`Self::publish`] with a conflation key (`?key=`).
    pub fn publish_keyed(
        &mut self,
        topic: &Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
        key: Option<Arc<str>>,
    ) {
        self.publish_message(Arc::clone(topic), Message::new(frame, now).with_key(key));
    }

    /// Queues `msg` (not yet numbered) to `topic`.
    fn publish_message(&mut self, topic: Arc<TopicInterest>, msg: Message) {
        // Its frame and what holds it (the message, its slot), as the
        // mailbox counts it: an empty message holds ~300 bytes, not 2.
        self.outbox_bytes += msg.frame.len() + crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES;
        self.outbox.push((topic, Arc::new(msg)));
    }

    /// [`Self::publish`], acknowledged to `publisher` once numbered (see
    /// [`Self::take_acks`]).
    pub fn publish_acked(
        &mut self,
        topic: &Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
        publisher: ConnRef,
        key: Option<Arc<str>>,
    ) {
        self.ack_to.push((self.outbox.len(), publisher, true));
        self.publish_keyed(topic, frame, now, key);
    }

    /// [`Self::publish_acked`] taking the caller's reference to `topic`
    /// (one the directory handed out: released with the outbox).
    pub fn publish_owned_acked(
        &mut self,
        topic: Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
        publisher: ConnRef,
        key: Option<Arc<str>>,
    ) {
        self.ack_to.push((self.outbox.len(), publisher, true));
        self.publish_message(topic, Message::new(frame, now).with_key(key));
    }

    /// [`Self::publish_keyed`] from the WebSocket publisher `publisher`,
    /// which did not ask for acknowledgements: in a cluster, a publication
    /// the cluster refuses is its publisher's to hear about
    /// ([`Self::take_refused`]); alone, the same as `publish_keyed`.
    pub fn publish_from(
        &mut self,
        topic: &Arc<TopicInterest>,
        frame: Bytes,
        now: Instant,
        publisher: ConnRef,
        key: Option<Arc<str>>,
    ) {
        if self.directory.link().is_some() {
            self.ack_to.push((self.outbox.len(), publisher, false));
        }
        self.publish_keyed(topic, frame, now, key);
    }

    /// Pattern-trie nodes the last [`Self::dispatch`] walked (a topic's
    /// pattern targets are walked once per change of the patterns): what
    /// an HTTP publisher, whose request dispatches, pays for.
    pub fn walked(&self) -> usize {
        self.walked
    }

    /// The worker this shard belongs to.
    pub fn worker(&self) -> usize {
        self.id
    }

    /// The acknowledgements due to `publisher` alone, in numbering order
    /// (the others stay for [`Self::take_acks`]).
    pub fn take_acks_of(&mut self, publisher: ConnRef) -> Vec<(u64, u64)> {
        self.acks.remove(&publisher).unwrap_or_default()
    }

    /// The acknowledgements due since the last call: (publisher, epoch,
    /// number), each publisher's in numbering order.
    pub fn take_acks(&mut self) -> Vec<(ConnRef, u64, u64)> {
        self.acks
            .drain()
            .flat_map(|(p, due)| due.into_iter().map(move |(epoch, seq)| (p, epoch, seq)))
            .collect()
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
        key: Option<Arc<str>>,
    ) -> (u64, u64) {
        self.publish_message(topic, Message::new(frame, now).with_key(key));
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

    /// Charges `msg`, a publication from the cluster this worker queued
    /// (its raw frame, and whatever forms it holds), while a queue holds
    /// it: no dispatch charged it.
    pub fn charge_remote(&mut self, msg: &Arc<Message>) {
        self.frames.charge_message(msg, Form::Raw);
    }

    /// Charges `msg`'s `form` frame, replayed from a history into one of
    /// this worker's queues by reference (see
    /// [`SharedFrames::charge_replayed`]); a frame under [`COPY_BELOW`] is
    /// copied into the queue and charged there.
    pub fn charge_replayed(&mut self, msg: &Arc<Message>, form: Form) {
        if msg.frame_of(form).is_some_and(|f| f.len() >= COPY_BELOW) {
            self.frames.charge_replayed(msg, form);
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
        self.walked = 0;
        let n = self.outbox.len();
        if n == 0 {
            return 0;
        }
        if let Some(link) = self.directory.link().cloned() {
            // In a cluster, the cluster numbers them, and they come back
            // (to this process too) through `remote::inject`.
            let mut acks = self.ack_to.drain(..).peekable();
            for (i, (topic, msg)) in self.outbox.iter().enumerate() {
                let from = acks.next_if(|a| a.0 == i);
                let ack = from.filter(|a| a.2).map(|a| (self.id, a.1));
                if let Err(why) = link.publish(topic.name_arc(), msg, ack) {
                    self.refused.0 += 1;
                    self.refused.1.extend(from.map(|a| (a.1, why)));
                }
            }
            drop(acks);
            self.release_outbox();
            return n;
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
                m.topic = Some(Arc::clone(topic.name_arc()));
                self.last_numbered = (m.epoch, m.seq);
                if let Some((_, publisher, _)) = acks.next_if(|a| a.0 == i).filter(|a| a.2) {
                    self.acks
                        .entry(publisher)
                        .or_default()
                        .push((m.epoch, m.seq));
                }
                if m.frame.len() >= COPY_BELOW {
                    // Queued by reference wherever it goes: charged here,
                    // once, while a queue holds it.
                    self.frames.charge_message(msg, Form::Raw);
                }
                let mut targets = self.directory.targets_counted(topic, &mut self.walked);
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
        self.release_outbox();
        n
    }

    /// Releases the outbox's topic references.
    fn release_outbox(&mut self) {
        // One reference per run of a topic goes through the directory's
        // lock: the others are dropped while the run's first is still held
        // (so none of them can be the last one), outside the lock.
        let mut last: Option<*const TopicInterest> = None;
        self.outbox_bytes = 0;
        let runs = self.outbox.drain(..).filter_map(|(topic, _)| {
            let same = last == Some(Arc::as_ptr(&topic));
            last = Some(Arc::as_ptr(&topic));
            (!same).then_some(topic)
        });
        let firsts: Vec<Arc<TopicInterest>> = runs.collect();
        self.directory.release_many(firsts.into_iter());
    }

    /// Where to end a delivery step that starts at `pubs[start]` and should
    /// cost about `budget` deliveries (publications × local subscribers):
    /// after as many whole runs of one topic as fit, or, when the first run
    /// alone is over the budget, after the part of it that fits (at least
    /// one publication). One lookup per run. Returns the end and the step's
    /// cost, which the caller counts against its budget (a walk over
    /// slots costs though it delivers to few).
    pub fn step_end(&self, pubs: &[Publication], start: usize, budget: usize) -> (usize, usize) {
        let mut end = start;
        let mut cost = 0usize;
        while end < pubs.len() {
            let topic = pubs[end].topic.as_ptr();
            let run = pubs[end..]
                .iter()
                .position(|p| p.topic.as_ptr() != topic)
                .unwrap_or(pubs.len() - end);
            // A topic with no entry here yet goes to the patterns that
            // match it: at most every pattern subscription (outside probe:
            // publications to new names were each planned as one delivery,
            // 200 000 to 200 `>` subscribers in one step).
            let subs = self
                .by_interest
                .get(&(topic as usize))
                .map_or(self.pattern_subs, |&id| {
                    let t = &self.topics[id as usize];
                    t.patterns
                        .iter()
                        .map(|&p| walk_cost(&self.patterns[p as usize].subs))
                        .sum::<usize>()
                        + walk_cost(&t.subs)
                });
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
                let n = (budget / subs.max(1)).clamp(1, run);
                end += n;
                cost += n.saturating_mul(subs.max(1));
            }
            break;
        }
        (end, cost)
    }

    /// Calls `deliver(run, topic, subscribers)` for `pubs` (from the
    /// mailbox's batch number `batch`, [`Inbox::taken`](super::bus::Inbox::taken))
    /// in order: each run is a maximal sequence of consecutive publications
    /// to one topic, `topic` its entry (name, policies), and `subscribers` a chunk (≤ 64) of
    /// the local subscribers it goes to: the topic's own (less publications
    /// at or below the local topic's floor), and those of the local
    /// patterns matching it (batches sent after the pattern was
    /// registered), each connection once. So the backend can push a whole
    /// run into one subscriber's queue while it is in cache, subscriber by
    /// subscriber, and every subscriber still sees the publications in
    /// order.
    pub fn deliver(
        &mut self,
        pubs: &[Publication],
        batch: u64,
        deliver: &mut impl FnMut(&[Publication], &TopicView<'_>, &[ConnRef]),
    ) {
        self.batch = batch;
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
            let id = match self.by_interest.get(&(topic as usize)) {
                Some(&id) => id,
                None if self.patterns.is_empty() => continue,
                // Its entry is alive: held here from now on.
                None if run[0].topic.strong_count() > 0 => match self.materialize(&run[0]) {
                    Some(id) => id,
                    None => continue,
                },
                // Gone already (no history kept it, nobody else held it):
                // the patterns' subscribers get the run all the same.
                None => {
                    self.deliver_unheld(run, deliver);
                    continue;
                }
            };
            self.deliver_run(id, run, deliver);
        }
    }

    /// A local topic for a publication that reached this worker for its
    /// patterns only, if one of them takes this batch.
    fn materialize(&mut self, p: &Publication) -> Option<u32> {
        if self.patterns.is_empty() {
            return None;
        }
        let interest = self.directory.hold(&p.topic)?;
        let ids = self.patterns_matching(interest.name());
        let batch = self.batch;
        if !ids
            .iter()
            .any(|&id| self.patterns[id as usize].start < batch)
        {
            self.directory.release(interest);
            return None;
        }
        Some(self.add_topic(interest, (p.msg.epoch, 0), 0, ids))
    }

    /// Delivers `run`, whose topic's entry is gone, to the local patterns
    /// matching its name (each connection once).
    fn deliver_unheld(
        &mut self,
        run: &[Publication],
        deliver: &mut impl FnMut(&[Publication], &TopicView<'_>, &[ConnRef]),
    ) {
        let Some(name) = run[0].msg.topic.clone() else {
            return;
        };
        let view = TopicView {
            name: &name,
            slow_consumer: self.directory.slow_consumer_of(&name),
            max_rate: self.directory.max_rate_of(&name),
        };
        let ids = self.patterns_matching(&name);
        self.seen.clear();
        let mut chunk = Chunk::default();
        for pid in ids {
            let p = &self.patterns[pid as usize];
            if self.batch <= p.start {
                continue;
            }
            for (c, multi) in p.subs.iter() {
                if multi && !self.seen.insert(c) {
                    continue;
                }
                chunk.push(c, run, &view, deliver);
            }
        }
        chunk.flush(run, &view, deliver);
    }

    fn deliver_run(
        &mut self,
        id: u32,
        run: &[Publication],
        deliver: &mut impl FnMut(&[Publication], &TopicView<'_>, &[ConnRef]),
    ) {
        let Self {
            topics,
            patterns,
            seen,
            batch,
            ..
        } = self;
        let Some(first) = run.first().map(|p| p.msg.epoch) else {
            return;
        };
        if run.last().is_some_and(|p| p.msg.epoch != first) {
            // A cluster's topic started its numbering over inside the run:
            // each epoch's part on its own.
            let split = run.partition_point(|p| p.msg.epoch == first);
            self.deliver_run(id, &run[..split], deliver);
            return self.deliver_run(id, &run[split..], deliver);
        }
        let local = &mut topics[id as usize];
        if first < local.epoch {
            // An older numbering's last publications (a cluster): superseded.
            return;
        }
        if first > local.epoch {
            // A later epoch (a cluster's stream forgot the topic and it
            // started over): floor, positions and joiners counted in the
            // old numbers; from here on everyone here gets the new one.
            local.epoch = first;
            local.floor = 0;
            local.delivered = 0;
            for (_, _, slot) in local.joiners.drain(..) {
                local.subs.unpend(slot);
            }
            local.pattern_joiners.clear();
        }
        let Some(newest) = run.last().map(|p| p.msg.seq) else {
            return;
        };
        local.touched = true;
        let exact_run = &run[run.partition_point(|p| p.msg.seq <= local.floor)..];
        local.delivered = local.delivered.max(newest);
        let view = TopicView::of(&local.interest);
        let name = &view;
        let with_patterns = !local.patterns.is_empty();
        seen.clear();
        for &(c, upto, _) in &local.joiners {
            // A joiner's own position (at or past the floor, or one that
            // came from a pattern: below it).
            let from = run.partition_point(|p| p.msg.seq <= upto);
            if from < run.len() {
                deliver(&run[from..], name, &[c]);
            }
            if with_patterns {
                seen.insert(c);
            }
        }
        let mut chunk = Chunk::default();
        if with_patterns {
            for &(c, upto, pid, slot) in &local.pattern_joiners {
                let current = patterns
                    .get(pid as usize)
                    .and_then(|p| p.subs.get(slot))
                    .is_some_and(|held| held == c);
                if !current || !seen.insert(c) {
                    continue;
                }
                let from = run.partition_point(|p| p.msg.seq <= upto);
                if from < run.len() {
                    deliver(&run[from..], name, &[c]);
                }
            }
            // While pattern joiners wait, every pattern subscriber is
            // checked against them.
            let check_all = !local.pattern_joiners.is_empty();
            for &pid in &local.patterns {
                let p = &patterns[pid as usize];
                if *batch <= p.start {
                    continue; // sent before the pattern was registered
                }
                for (c, multi) in p.subs.iter() {
                    if (multi || check_all) && !seen.insert(c) {
                        continue;
                    }
                    chunk.push(c, run, name, deliver);
                }
            }
            chunk.flush(run, name, deliver);
        }
        if !exact_run.is_empty() {
            for (c, multi) in local.subs.iter() {
                if with_patterns && multi && seen.contains(&c) {
                    continue;
                }
                chunk.push(c, exact_run, name, deliver);
            }
            chunk.flush(exact_run, name, deliver);
        }
        if !local.joiners.is_empty() {
            // Caught up: ordinary subscribers from the next run on. One
            // that came from a pattern stays fed from its position until
            // the runs pass the floor (ordinary delivery starts after it).
            let (subs, floor) = (&mut local.subs, local.floor);
            local.joiners.retain_mut(|(_, upto, slot)| {
                if *upto >= newest {
                    return true;
                }
                if newest < floor {
                    *upto = newest;
                    return true;
                }
                subs.unpend(*slot);
                false
            });
        }
        if !local.pattern_joiners.is_empty() {
            // Done once past their position, and past the batches sent
            // before their pattern was registered here (which the
            // pattern's ordinary delivery skips).
            let batch = *batch;
            local.pattern_joiners.retain_mut(|j| {
                if j.1 >= newest {
                    return true;
                }
                if patterns.get(j.2 as usize).is_some_and(|p| batch <= p.start) {
                    j.1 = newest;
                    return true;
                }
                false
            });
        }
    }
}

/// Slot visits that cost about one delivery: a visit loads and tests 8
/// bytes, a delivery pushes into a subscriber's queue.
const VISITS_PER_DELIVERY: usize = 32;

/// What delivering one publication to `subs` costs, in deliveries: its
/// subscribers, or the walk over every slot it ever had if that is more
/// (slots are reused, never given back: a topic that once had 200 000
/// subscribers here and has one now walks 200 000 slots per publication).
fn walk_cost(subs: &Subscribers) -> usize {
    subs.len().max(subs.end() / VISITS_PER_DELIVERY)
}

/// Admits a request costing `n` tokens from `bucket` (full at first use)
/// at `rate` per second: when the bucket holds a token, all `n` are taken
/// at once, into debt for those it lacks (later requests wait it out), so
/// a request of more tokens than are left, or than a second's worth, is
/// admitted in its turn rather than never. `Err(ms)`: no token now,
/// nothing taken; try again after that long.
fn admit(
    bucket: &mut Option<crate::proto::rate::TokenBucket>,
    rate: u32,
    n: usize,
    now_ms: u32,
) -> Result<(), u32> {
    let bucket = bucket.get_or_insert_with(|| crate::proto::rate::TokenBucket::full(rate, now_ms));
    if n == 0 {
        return Ok(());
    }
    if !bucket.take(rate, now_ms) {
        let mut probe = *bucket;
        probe.spend(rate, now_ms);
        return Err(probe.wait_ms(rate).max(1));
    }
    bucket.spend_n(rate, now_ms, u32::try_from(n - 1).unwrap_or(u32::MAX));
    Ok(())
}

/// Up to 64 subscribers of one run, handed over together.
struct Chunk {
    conns: [ConnRef; 64],
    n: usize,
}

impl Default for Chunk {
    fn default() -> Self {
        Self {
            conns: [(0, 0); 64],
            n: 0,
        }
    }
}

impl Chunk {
    fn push(
        &mut self,
        c: ConnRef,
        run: &[Publication],
        name: &TopicView<'_>,
        deliver: &mut impl FnMut(&[Publication], &TopicView<'_>, &[ConnRef]),
    ) {
        self.conns[self.n] = c;
        self.n += 1;
        if self.n == self.conns.len() {
            self.flush(run, name, deliver);
        }
    }

    fn flush(
        &mut self,
        run: &[Publication],
        name: &TopicView<'_>,
        deliver: &mut impl FnMut(&[Publication], &TopicView<'_>, &[ConnRef]),
    ) {
        if self.n > 0 {
            deliver(run, name, &self.conns[..self.n]);
            self.n = 0;
        }
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
