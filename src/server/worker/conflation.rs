//! Conflation: per subscriber, the newest waiting publication of each topic
//! whose slow-consumer policy conflates (`conflate` once the subscriber's
//! queue is over its bound, `always` at all times). What waits here is not
//! in the subscriber's queue yet: it moves there, the newest value of each
//! topic, when the queue has gone to the kernel ([`Core::release_waiting`]),
//! after a marker saying how many publications it replaced. So a slow
//! subscriber ends up with the newest value of every topic, and an
//! enveloped one can tell conflation (a marker) from loss (a gap).
//!
//! A subscription with a maximum rate (`max_rate`, updates per second per
//! topic) has its topics' publications go through the subscriber's table:
//! each topic's newest is released at most once per interval, the others
//! it replaced counted and announced like any conflation; a timer releases
//! what waits when its time comes.
//!
//! A table costs nothing until a publication waits: tables are kept by the
//! core, not the connection, and a connection with one has its
//! `CONFLATING` flag set. What a table holds is charged to the worker's
//! buffer budget ([`WAITING_BYTES`] per topic plus the frame when it is
//! small; a large frame is charged by the ledger while anyone holds it),
//! and so is a rated subscriber's record of the topics it was sent lately
//! ([`SENT_LATELY_BYTES`] plus the name each).

use super::*;
use crate::pubsub::envelope::conflated_marker_from;

/// What a waiting publication is charged besides a small frame: its entry,
/// the index slot and the order slot, with margin.
pub const WAITING_BYTES: usize = 128;

/// What a rated subscriber's record of a topic sent lately (`Table::next`)
/// is charged besides its name: its map slot, with margin. A publisher
/// sending to many topics a `>` subscriber with a rate receives would
/// otherwise leave one such record per topic released, uncharged, until
/// the subscriber's queue empties again.
pub const SENT_LATELY_BYTES: usize = 64;

/// How often a release looks for records in `Table::next` to forget: they
/// stay charged until then, up to this much past their interval.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// The charge of `name`'s record in `Table::next`.
fn sent_lately_charge(name: &str) -> usize {
    SENT_LATELY_BYTES + name.len()
}

/// One topic's newest waiting publication for a subscriber, or with
/// conflation keys (`?key=` when published) its newest per key.
struct Waiting {
    /// The newest per key (one, for a topic published without keys), in
    /// the order their keys first waited.
    newest: Vec<Publication>,
    /// `newest`'s index by key, once it holds more than [`SCAN_KEYS`].
    by_key: Option<HashMap<Option<Arc<str>>, usize>>,
    /// Older publications they replaced since the last release.
    replaced: u64,
    /// The number of the first publication this entry stands for: of the
    /// numbers `from` to the newest, those not in `newest` were replaced.
    from: u64,
    /// Its namespace's interval between two publications (`max-rate`).
    interval: Option<Duration>,
}

/// Keys of one topic found by a scan; past them, by an index.
const SCAN_KEYS: usize = 8;

impl Waiting {
    /// The index in `newest` of the publication with `key`, if one waits.
    fn slot(&self, key: &Option<Arc<str>>) -> Option<usize> {
        match &self.by_key {
            Some(index) => index.get(key).copied(),
            None => self.newest.iter().position(|p| p.msg.key == *key),
        }
    }

    /// Adds the first waiting publication of a key.
    fn add(&mut self, p: &Publication) {
        self.newest.push(p.clone());
        if let Some(index) = &mut self.by_key {
            index.insert(p.msg.key.clone(), self.newest.len() - 1);
        } else if self.newest.len() > SCAN_KEYS {
            let index = self.newest.iter().enumerate();
            self.by_key = Some(index.map(|(i, p)| (p.msg.key.clone(), i)).collect());
        }
    }

    /// Bytes charged for what waits here.
    fn charge(&self) -> usize {
        self.newest.iter().map(charge_of).sum()
    }
}

/// One subscriber's waiting publications, by topic name (a name, not the
/// directory entry's address: a topic only patterns receive may get a new
/// entry per publication).
#[derive(Default)]
struct Table {
    serial: u32,
    /// Topics in the order they first waited.
    order: VecDeque<Arc<str>>,
    waiting: HashMap<Arc<str>, Waiting>,
    /// A rated subscriber's topics sent lately: when each may be sent next.
    next: HashMap<Arc<str>, Instant>,
    /// When `next` was last looked through for records to forget.
    forgot_at: Option<Instant>,
    /// Of `bytes`, the records in `next` (not waiting publications).
    sent_bytes: usize,
    /// Publications waiting (every key's of every topic).
    waited: usize,
    /// The release timer set for this table, if any.
    timer: Option<Instant>,
    /// Bytes charged for what waits here.
    bytes: usize,
}

/// Every subscriber's table on a worker.
#[derive(Default)]
pub(super) struct Tables {
    by_conn: HashMap<usize, Table>,
    /// Bytes charged for what the tables hold.
    bytes: usize,
    /// Subscribers with a maximum rate on some subscription.
    rates: HashMap<usize, Rates>,
    /// When rated subscribers' tables are due: (time, key, serial).
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize, u32)>>,
    /// Tables put to since the last [`Core::release_idle_tables`].
    touched: Vec<ConnRef>,
    /// Large tables of subscribers gone, freed [`FREE_PER_TURN`]
    /// publications and records a turn ([`Tables::free_some`]), charged
    /// until freed.
    buried: Vec<Table>,
}

/// Publications and records of buried tables freed per loop turn: a few
/// milliseconds. A table holds up to `--max-outbound-bytes` of charges,
/// ~30 000 publications;
/// freed whole as their subscribers went, 350 of them held their workers
/// ~1.5 s (outside probe: rated `>` subscribers that never read, sent new
/// topics until the budget's pressure closed them all at once).
const FREE_PER_TURN: usize = 16 * 1024;

/// The most `max_rate` may ask (updates per second per topic).
pub const MAX_RATE: u32 = crate::pubsub::control::MAX_RATE;

/// A rated subscriber's subscriptions, each with its interval between two
/// publications of one topic (`None`: no limit): every subscription of the
/// connection is listed once one has a rate.
struct Rates {
    serial: u32,
    exact: HashMap<Arc<str>, Option<Duration>>,
    patterns: Vec<(Arc<str>, Option<Duration>)>,
}

/// What a [`Rates`] is charged besides its entries: its slot in
/// `Tables::rates` and its own fields, with margin.
const RATES_BYTES: usize = 128;
/// What one of its entries is charged besides its name: the map or list
/// slot (a name's `Arc` and an interval) and the name's allocation header.
const RATE_ENTRY_BYTES: usize = 96;

impl Rates {
    /// Bytes charged for it (its own copies of up to
    /// `--max-topics-per-conn` names: ~15 KB with 64 names of 128 bytes).
    fn charge(&self) -> usize {
        let entry = |name: &str| RATE_ENTRY_BYTES + name.len();
        RATES_BYTES
            + self.exact.keys().map(|n| entry(n)).sum::<usize>()
            + self.patterns.iter().map(|(n, _)| entry(n)).sum::<usize>()
    }

    fn set(&mut self, name: &str, interval: Option<Duration>) {
        if crate::pubsub::pattern::is_pattern(name) {
            match self.patterns.iter_mut().find(|(p, _)| &**p == name) {
                Some(p) => p.1 = interval,
                None => self.patterns.push((Arc::from(name), interval)),
            }
        } else {
            self.exact.insert(Arc::from(name), interval);
        }
    }

    /// The interval of `topic`: its own subscription's if it has one,
    /// else the shortest of the patterns matching it (none if one of them
    /// has no limit).
    fn interval(&self, topic: &str) -> Option<Duration> {
        if let Some(&iv) = self.exact.get(topic) {
            return iv;
        }
        let mut shortest: Option<Duration> = None;
        for (p, iv) in &self.patterns {
            if crate::pubsub::pattern::matches(p, topic) {
                let iv = (*iv)?;
                shortest = Some(shortest.map_or(iv, |s| s.min(iv)));
            }
        }
        shortest
    }

    fn any(&self) -> bool {
        self.exact
            .values()
            .chain(self.patterns.iter().map(|p| &p.1))
            .any(Option::is_some)
    }
}

/// The interval between two publications at `per_second` (0: none).
fn interval_of(per_second: u32) -> Option<Duration> {
    (per_second > 0).then(|| Duration::from_secs(1) / per_second.min(MAX_RATE))
}

fn charge_of(p: &Publication) -> usize {
    WAITING_BYTES
        + if p.frame().len() < COPY_BELOW {
            p.frame().len()
        } else {
            0
        }
}

/// A table would pass its bound (`--max-outbound-bytes` of waiting
/// entries): the subscriber is handled as a slow consumer.
pub(super) struct Full;

impl Tables {
    /// Keeps the newest of `run` (publications of `topic`, in number
    /// order) per conflation key as what waits of `topic` for `(key,
    /// serial)`, replacing what waited of the same keys; returns how many
    /// publications were replaced. `Err(Full)` when a topic or key new to
    /// the table would take it past `max_bytes` (the subscriber is then
    /// closed as a slow consumer, its table dropped).
    pub(super) fn put(
        &mut self,
        (key, serial): ConnRef,
        topic: &Arc<str>,
        run: &[Publication],
        interval: Option<Duration>,
        max_bytes: usize,
    ) -> Result<u64, Full> {
        let table = self.by_conn.entry(key).or_default();
        if table.serial != serial {
            // A table left by an earlier connection with this key.
            self.bytes -= table.bytes;
            *table = Table {
                serial,
                ..Table::default()
            };
        }
        // One lookup (the name hashed once): a put of a new topic's
        // publication hashed its name three times, of a waiting one's twice.
        let w = match table.waiting.entry(Arc::clone(topic)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                table.order.push_back(Arc::clone(topic));
                if self.touched.last() != Some(&(key, serial)) {
                    self.touched.push((key, serial));
                }
                e.insert(Waiting {
                    newest: Vec::new(),
                    by_key: None,
                    replaced: 0,
                    from: run[0].msg.seq,
                    interval,
                })
            }
        };
        w.interval = interval;
        let mut replaced = 0;
        let mut i = 0;
        while i < run.len() {
            // A stretch of one key: only its last can wait.
            let k = &run[i].msg.key;
            let mut last = i;
            while last + 1 < run.len() && run[last + 1].msg.key == *k {
                last += 1;
            }
            let p = &run[last];
            let skipped = (last - i) as u64;
            i = last + 1;
            let charge = charge_of(p);
            match w.slot(k) {
                Some(at) => {
                    let old = charge_of(&w.newest[at]);
                    w.newest[at] = p.clone();
                    replaced += skipped + 1;
                    table.bytes = table.bytes + charge - old;
                    self.bytes = self.bytes + charge - old;
                }
                None => {
                    if table.bytes + charge > max_bytes && table.bytes > 0 {
                        if w.newest.is_empty() {
                            // Not left listed empty.
                            table.waiting.remove(topic);
                            table.order.retain(|t| t != topic);
                        }
                        return Err(Full);
                    }
                    w.add(p);
                    table.waited += 1;
                    replaced += skipped;
                    table.bytes += charge;
                    self.bytes += charge;
                }
            }
        }
        w.replaced += replaced;
        Ok(replaced)
    }

    /// Whether a publication of `topic` waits for `(key, serial)`: later
    /// ones of the topic must wait behind it (one order per topic).
    pub(super) fn waits_for(&self, (key, serial): ConnRef, topic: &str) -> bool {
        self.by_conn
            .get(&key)
            .is_some_and(|t| t.serial == serial && t.waiting.contains_key(topic))
    }

    /// Drops what waits for `key` of topics `keep` refuses (the subscriber
    /// left them); returns how many.
    pub(super) fn prune(&mut self, key: usize, keep: impl Fn(&str) -> bool) -> usize {
        let Some(t) = self.by_conn.get_mut(&key) else {
            return 0;
        };
        let mut dropped = 0;
        let (waiting, bytes) = (&mut t.waiting, &mut t.bytes);
        t.order.retain(|name| {
            if keep(name) {
                return true;
            }
            if let Some(w) = waiting.remove(name) {
                let c = w.charge();
                *bytes -= c;
                self.bytes -= c;
                dropped += w.newest.len();
            }
            false
        });
        t.waited -= dropped;
        dropped
    }

    /// The interval of `topic` for `(key, serial)` by its subscriptions'
    /// `max_rate` (`None`: no limit).
    pub(super) fn interval_for(&self, (key, serial): ConnRef, topic: &str) -> Option<Duration> {
        self.rates
            .get(&key)
            .filter(|r| r.serial == serial)
            .and_then(|r| r.interval(topic))
    }

    /// The earliest release timer.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|t| t.0.0)
    }

    /// Drops `key`'s table and rate (the connection is gone); returns the
    /// publications that waited.
    pub(super) fn remove(&mut self, key: usize) -> usize {
        if let Some(r) = self.rates.remove(&key) {
            self.bytes -= r.charge();
        }
        let Some(t) = self.by_conn.remove(&key) else {
            return 0;
        };
        let waited = t.waited;
        if t.waited + t.next.len() > FREE_PER_TURN {
            self.buried.push(t);
        } else {
            self.bytes -= t.bytes;
        }
        waited
    }

    /// Whether buried tables are left to free.
    pub(super) fn has_buried(&self) -> bool {
        !self.buried.is_empty()
    }

    /// Frees up to [`FREE_PER_TURN`] publications and records of the
    /// buried tables, and each table's charge with its last.
    pub(super) fn free_some(&mut self) {
        let mut left = FREE_PER_TURN;
        while left > 0
            && let Some(t) = self.buried.last_mut()
        {
            // A topic's entry holds a publication per key: each counts.
            for (_, w) in t.waiting.extract_if(|_, _| true) {
                left = left.saturating_sub(1 + w.newest.len());
                if left == 0 {
                    break;
                }
            }
            let n = left.min(t.next.len());
            t.next.extract_if(|_, _| true).take(n).for_each(drop);
            left -= n;
            let n = left.min(t.order.len());
            t.order.truncate(t.order.len() - n);
            left -= n;
            if t.waiting.is_empty() && t.next.is_empty() && t.order.is_empty() {
                let t = self.buried.pop().expect("last");
                self.bytes -= t.bytes;
            }
        }
    }

    /// Bytes charged for the tables.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes charged for what waits in `(key, serial)`'s table (a rated
    /// subscriber's records of topics sent lately left out: they are no
    /// backlog).
    pub(super) fn waiting_bytes_of(&self, (key, serial): ConnRef) -> usize {
        self.by_conn
            .get(&key)
            .filter(|t| t.serial == serial)
            .map_or(0, |t| t.bytes - t.sent_bytes)
    }
}

impl<S> Core<S> {
    /// Moves what waits for `key` into its queue, each topic's newest value
    /// after a marker when it replaced others, oldest-waiting topic first,
    /// while the queue stays within `--max-outbound-bytes` (at least one
    /// topic; the rest waits for the next time the queue is empty); a
    /// rated subscriber's topics only once their interval is over (a
    /// timer is set for the first that is not). Called when the queue is
    /// empty. Returns whether anything was queued.
    pub(super) fn release_waiting(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        let Some(table) = self.tables.by_conn.get_mut(&key) else {
            conn.set_flag(CONFLATING, false);
            return false;
        };
        let stats = &self.shared.stats[self.id];
        let form = conn.session.form();
        let max = self.shared.config.max_outbound_bytes;
        let now = self.now;
        let mut queued = false;
        // Rated: topics sent less than an interval ago wait their turn.
        let mut later: VecDeque<Arc<str>> = VecDeque::new();
        // Records whose interval is over are forgotten, looked for at most
        // every `FORGET_EVERY`: a release costs what it releases, not every
        // record (outside probe: a `>` subscriber with a rate, sent 2 500
        // new topics a second, walked its ~2 500 records at each release,
        // and 350 of them held their workers for seconds).
        if table
            .forgot_at
            .is_none_or(|t| now.saturating_duration_since(t) >= FORGET_EVERY)
        {
            table.forgot_at = Some(now);
            let mut forgotten = 0;
            table.next.retain(|name, at| {
                let keep = *at > now || table.waiting.contains_key(name);
                if !keep {
                    forgotten += sent_lately_charge(name);
                }
                keep
            });
            table.bytes -= forgotten;
            table.sent_bytes -= forgotten;
            self.tables.bytes -= forgotten;
        }
        while let Some(name) = table.order.front() {
            if table.next.get(name).is_some_and(|&at| at > now) {
                let name = table.order.pop_front().expect("front");
                later.push_back(name);
                continue;
            }
            // Taken out at once (one lookup), put back in the rare case
            // the queue cannot take it this time.
            let name = table.order.pop_front().expect("front");
            let mut w = table.waiting.remove(&name).expect("listed");
            // One topic's keys in number order (one order per topic).
            if w.newest.len() > 1 {
                w.newest.sort_unstable_by_key(|p| p.msg.seq);
            }
            let mut frames: Vec<Bytes> = Vec::with_capacity(w.newest.len() + 1);
            for p in &w.newest {
                let mut on_built =
                    |f: crate::pubsub::envelope::Form, _: &Bytes| self.built.push((p.clone(), f));
                frames.push(p.msg.frame_for(form, &name, &mut on_built).clone());
            }
            let len: usize = frames.iter().map(Bytes::len).sum();
            if queued && conn.session.out.len() + len > max {
                table.order.push_front(Arc::clone(&name));
                table.waiting.insert(name, w);
                break;
            }
            let m = &w.newest.last().expect("a waiting entry is not empty").msg;
            if w.replaced > 0
                && let Some(marker) =
                    conflated_marker_from(form, &name, m.epoch, m.seq, w.replaced, w.from)
            {
                frames.insert(0, marker);
            }
            let refs: Vec<&Bytes> = frames.iter().collect();
            let ok = conn.session.push_waiting(&refs);
            table.waited -= w.newest.len();
            let c = w.charge();
            table.bytes -= c;
            self.tables.bytes -= c;
            if !ok {
                // Closing: nothing more goes out.
                stats.undelivered(Undelivered::Closing, w.newest.len());
                continue;
            }
            if w.replaced > 0 {
                stats.conflated(w.replaced);
            }
            if let Some(iv) = w.interval {
                let c = sent_lately_charge(&name);
                if table.next.insert(name, now + iv).is_none() {
                    table.bytes += c;
                    table.sent_bytes += c;
                    self.tables.bytes += c;
                }
            }
            stats.frames_sent(w.newest.len() as u64);
            queued = true;
        }
        // Those not due yet keep their order, ahead of any left by the bound.
        while let Some(name) = later.pop_back() {
            table.order.push_front(name);
        }
        if !table.next.is_empty() {
            let due = later_due(table, now);
            if let Some(at) = due.filter(|&at| table.timer.is_none_or(|t| t > at || t <= now)) {
                table.timer = Some(at);
                self.tables
                    .timers
                    .push(std::cmp::Reverse((at, key, table.serial)));
            }
        }
        if table.order.is_empty() && table.next.is_empty() {
            self.tables.by_conn.remove(&key);
            conn.set_flag(CONFLATING, false);
        }
        if queued {
            conn.mark_dirty(key, &mut self.dirty);
        }
        queued
    }

    /// A subscribe (or the upgrade) named `names` with maximum rate
    /// `per_second` (`None` or 0: no limit): their rate from now on. The
    /// first rate a connection gets lists its other subscriptions as
    /// without one.
    pub(super) fn set_rates(&mut self, key: usize, per_second: Option<u32>, names: &[String]) {
        let conn = &self.conns[key];
        let interval = per_second.and_then(interval_of);
        if !conn.flag(RATED) && interval.is_none() {
            return;
        }
        let serial = conn.serial;
        if self
            .tables
            .rates
            .get(&key)
            .is_none_or(|r| r.serial != serial)
        {
            let mut fresh = Rates {
                serial,
                exact: HashMap::new(),
                patterns: Vec::new(),
            };
            for s in conn.session.subscriptions() {
                let name = if s.is_pattern() {
                    self.shard.pattern_name(s.topic())
                } else {
                    self.shard.topic_name(s.topic())
                };
                if let Some(name) = name {
                    fresh.set(name, None);
                }
            }
            self.tables.bytes += fresh.charge();
            if let Some(old) = self.tables.rates.insert(key, fresh) {
                self.tables.bytes -= old.charge();
            }
        }
        let rates = self.tables.rates.get_mut(&key).expect("just listed");
        let before = rates.charge();
        for name in names {
            rates.set(name, interval);
        }
        self.tables.bytes = self.tables.bytes + rates.charge() - before;
        let rated = rates.any();
        if !rated {
            let gone = self.tables.rates.remove(&key).expect("listed");
            self.tables.bytes -= gone.charge();
        }
        self.conns[key].set_flag(RATED, rated);
    }

    /// After a subscriber changed its subscriptions: drops what waits for
    /// it of topics it no longer receives (an unsubscribed topic's value
    /// must not arrive after the `unsubscribed` reply, nor behind a
    /// replay when it subscribes again).
    pub(super) fn prune_waiting(&mut self, key: usize) {
        let conn = &self.conns[key];
        if !conn.flag(CONFLATING) && !conn.flag(RATED) {
            return;
        }
        let subs = conn.session.subscriptions();
        let exact: std::collections::HashSet<u32> = subs
            .iter()
            .filter(|s| !s.is_pattern())
            .map(|s| s.topic())
            .collect();
        let patterns: Vec<String> = subs
            .iter()
            .filter(|s| s.is_pattern())
            .filter_map(|s| self.shard.pattern_name(s.topic()).map(str::to_owned))
            .collect();
        let shard = &self.shard;
        // The rates of subscriptions gone go with them.
        if let Some(r) = self.tables.rates.get_mut(&key) {
            let before = r.charge();
            r.exact
                .retain(|n, _| shard.topic_id(n).is_some_and(|id| exact.contains(&id)));
            r.patterns
                .retain(|(p, _)| patterns.iter().any(|q| **q == **p));
            self.tables.bytes = self.tables.bytes + r.charge() - before;
            if !r.any() {
                let gone = self.tables.rates.remove(&key).expect("listed");
                self.tables.bytes -= gone.charge();
                self.conns[key].set_flag(RATED, false);
            }
        }
        if !self.conns[key].flag(CONFLATING) {
            return;
        }
        self.tables.prune(key, |name| {
            shard.topic_id(name).is_some_and(|id| exact.contains(&id))
                || patterns
                    .iter()
                    .any(|p| crate::pubsub::pattern::matches(p, name))
        });
    }

    /// Releases the rated tables whose timer is due (and whose queue is
    /// empty; a queue still being written releases them when it empties).
    pub(super) fn release_due_tables(&mut self) {
        let now = self.now;
        while let Some(&std::cmp::Reverse((at, key, serial))) = self.tables.timers.peek() {
            if at > now {
                break;
            }
            self.tables.timers.pop();
            if !self.is_current(key, serial) {
                continue;
            }
            if let Some(t) = self.tables.by_conn.get_mut(&key)
                && t.timer == Some(at)
            {
                t.timer = None;
            }
            if self.conns[key].session.out.is_empty() {
                self.release_waiting(key);
                self.recharge(key);
            }
        }
    }

    /// Releases the tables put to during this turn's delivery whose queue
    /// is empty (`always` publications go out in the same turn). Others
    /// wait for their queue to empty (`after_flush`) or their timer.
    pub(super) fn release_idle_tables(&mut self) {
        for (key, serial) in std::mem::take(&mut self.tables.touched) {
            // A connection gone meanwhile had its table dropped by `retire`.
            if self.is_current(key, serial) && self.conns[key].session.out.is_empty() {
                self.release_waiting(key);
                self.recharge(key);
            }
        }
    }
}

/// When the first topic of `table` still waiting for its interval is due.
fn later_due(table: &Table, now: Instant) -> Option<Instant> {
    table
        .order
        .iter()
        .filter_map(|a| table.next.get(a))
        .filter(|&&at| at > now)
        .min()
        .copied()
}
