//! Conflation: per subscriber, the newest waiting publication of each topic
//! whose slow-consumer policy conflates (`conflate` once the subscriber's
//! queue is over its bound, `always` at all times). What waits here is not
//! in the subscriber's queue yet: it moves there, the newest value of each
//! topic, when the queue has gone to the kernel ([`Core::release_waiting`]),
//! after a marker saying how many publications it replaced. So a slow
//! subscriber ends up with the newest value of every topic, and an
//! enveloped one can tell conflation (a marker) from loss (a gap).
//!
//! A subscriber that asked for a maximum rate (`max_rate`, updates per
//! second per topic) has all its publications go through its table: each
//! topic's newest is released at most once per interval, the others it
//! replaced counted and announced like any conflation; a timer releases
//! what waits when its time comes.
//!
//! A table costs nothing until a publication waits: tables are kept by the
//! core, not the connection, and a connection with one has its
//! `CONFLATING` flag set. What a table holds is charged to the worker's
//! buffer budget ([`WAITING_BYTES`] per topic plus the frame when it is
//! small; a large frame is charged by the ledger while anyone holds it).

use super::*;
use crate::pubsub::envelope::conflated_marker;

/// What a waiting publication is charged besides a small frame: its entry,
/// the index slot and the order slot, with margin.
pub const WAITING_BYTES: usize = 128;

/// One topic's newest waiting publication for a subscriber.
struct Waiting {
    name: Arc<str>,
    newest: Publication,
    /// Older publications it replaced since the last release.
    replaced: u64,
}

/// One subscriber's waiting publications.
#[derive(Default)]
struct Table {
    serial: u32,
    /// Topics (by the address of their directory entry) in the order they
    /// first waited.
    order: VecDeque<usize>,
    waiting: HashMap<usize, Waiting>,
    /// A rated subscriber's topics sent lately: when each may be sent next.
    next: HashMap<usize, Instant>,
    /// The release timer set for this table, if any.
    timer: Option<Instant>,
}

/// Every subscriber's table on a worker.
#[derive(Default)]
pub(super) struct Tables {
    by_conn: HashMap<usize, Table>,
    /// Bytes charged for what the tables hold.
    bytes: usize,
    /// Subscribers with a maximum rate: (serial, interval between two
    /// publications of one topic).
    rates: HashMap<usize, (u32, Duration)>,
    /// When rated subscribers' tables are due: (time, key, serial).
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize, u32)>>,
}

/// The most `max_rate` may ask (updates per second per topic).
pub const MAX_RATE: u32 = crate::pubsub::control::MAX_RATE;

fn charge_of(p: &Publication) -> usize {
    WAITING_BYTES
        + if p.frame().len() < COPY_BELOW {
            p.frame().len()
        } else {
            0
        }
}

impl Tables {
    /// Keeps `p` as the newest waiting publication of `topic` for
    /// `(key, serial)`, replacing the one that waited and the `skipped`
    /// publications of its run before it; returns how many it replaced.
    pub(super) fn put(
        &mut self,
        (key, serial): ConnRef,
        topic: &Arc<str>,
        p: &Publication,
        skipped: u64,
    ) -> u64 {
        let table = self.by_conn.entry(key).or_default();
        if table.serial != serial {
            // A table left by an earlier connection with this key.
            for w in table.waiting.values() {
                self.bytes -= charge_of(&w.newest);
            }
            *table = Table {
                serial,
                ..Table::default()
            };
        }
        let addr = p.topic.as_ptr() as usize;
        self.bytes += charge_of(p);
        match table.waiting.get_mut(&addr) {
            Some(w) => {
                self.bytes -= charge_of(&w.newest);
                w.newest = p.clone();
                w.replaced += skipped + 1;
                skipped + 1
            }
            None => {
                table.order.push_back(addr);
                table.waiting.insert(
                    addr,
                    Waiting {
                        name: Arc::clone(topic),
                        newest: p.clone(),
                        replaced: skipped,
                    },
                );
                skipped
            }
        }
    }

    /// Sets `conn`'s maximum rate per topic (0: none); returns whether it
    /// has one now.
    pub(super) fn set_rate(&mut self, (key, serial): ConnRef, per_second: u32) -> bool {
        if per_second == 0 {
            self.rates.remove(&key);
            return false;
        }
        let interval = Duration::from_secs(1) / per_second.min(MAX_RATE);
        self.rates.insert(key, (serial, interval));
        true
    }

    /// The earliest release timer.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|t| t.0.0)
    }

    /// Drops `key`'s table and rate (the connection is gone).
    pub(super) fn remove(&mut self, key: usize) -> usize {
        self.rates.remove(&key);
        let Some(t) = self.by_conn.remove(&key) else {
            return 0;
        };
        for w in t.waiting.values() {
            self.bytes -= charge_of(&w.newest);
        }
        t.waiting.len()
    }

    /// Bytes charged for the tables.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Connections with a table.
    pub(super) fn conns(&self) -> Vec<ConnRef> {
        self.by_conn.iter().map(|(&k, t)| (k, t.serial)).collect()
    }
}

impl<S> Core<S> {
    /// Moves what waits for `key` into its queue, each topic's newest value
    /// after a marker when it replaced others, oldest-waiting topic first,
    /// while the queue stays within `--max-outbound-bytes` (at least one
    /// topic; the rest waits for the next time the queue is empty). Called
    /// when the queue is empty. Returns whether anything was queued.
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
        let interval = self
            .tables
            .rates
            .get(&key)
            .filter(|r| r.0 == conn.serial)
            .map(|r| r.1);
        let mut queued = false;
        // Rated: topics sent less than an interval ago wait their turn.
        let mut later: VecDeque<usize> = VecDeque::new();
        if interval.is_some() {
            table
                .next
                .retain(|addr, at| *at > now || table.waiting.contains_key(addr));
        }
        while let Some(&addr) = table.order.front() {
            if interval.is_some() && table.next.get(&addr).is_some_and(|&at| at > now) {
                table.order.pop_front();
                later.push_back(addr);
                continue;
            }
            let w = &table.waiting[&addr];
            let mut on_built = |_: &Bytes| self.built.push((w.newest.clone(), form));
            let frame = w.newest.msg.frame_for(form, &w.name, &mut on_built).clone();
            if queued && conn.session.out.len() + frame.len() > max {
                break;
            }
            let m = &w.newest.msg;
            let marker = (w.replaced > 0)
                .then(|| conflated_marker(form, &w.name, m.epoch, m.seq, w.replaced))
                .flatten();
            let frames: Vec<&Bytes> = marker.iter().chain(std::iter::once(&frame)).collect();
            let ok = conn.session.push_waiting(&frames);
            if w.replaced > 0 {
                stats.conflated(w.replaced);
            }
            table.order.pop_front();
            let w = table.waiting.remove(&addr).expect("listed");
            self.tables.bytes -= charge_of(&w.newest);
            if !ok {
                // Closing: nothing more goes out.
                stats.undelivered(Undelivered::Closing, 1);
                continue;
            }
            if let Some(iv) = interval {
                table.next.insert(addr, now + iv);
            }
            stats.frames_sent(1);
            queued = true;
        }
        // Those not due yet keep their order, ahead of any left by the bound.
        while let Some(addr) = later.pop_back() {
            table.order.push_front(addr);
        }
        let due = later_due(table, now);
        if let Some(at) = due.filter(|&at| table.timer.is_none_or(|t| t > at || t <= now)) {
            table.timer = Some(at);
            self.tables
                .timers
                .push(std::cmp::Reverse((at, key, table.serial)));
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

    /// Sets the connection's maximum rate per topic (`max_rate`; 0: none).
    pub(super) fn set_rate(&mut self, key: usize, per_second: u32) {
        let serial = self.conns[key].serial;
        let rated = self.tables.set_rate((key, serial), per_second);
        self.conns[key].set_flag(RATED, rated);
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

    /// Releases the tables of the subscribers whose queue is empty (at the
    /// end of a delivery: `always` publications go out in the same turn).
    pub(super) fn release_idle_tables(&mut self) {
        if self.tables.by_conn.is_empty() {
            return;
        }
        for (key, serial) in self.tables.conns() {
            if !self.is_current(key, serial) {
                let n = self.tables.remove(key);
                self.stats().undelivered(Undelivered::Closing, n);
                continue;
            }
            if self.conns[key].session.out.is_empty() {
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
