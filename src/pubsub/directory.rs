//! The process-wide view of interest: for each topic, which workers have at
//! least one subscriber. A publish reads one atomic mask and visits only
//! those workers.
//!
//! The map itself sits behind a mutex, but it is locked only when a worker
//! gains its first or loses its last subscriber of a topic, when a WebSocket
//! publisher opens or closes ([`Directory::entry`], [`Directory::release`]),
//! once per HTTP publish, and on every `/metrics` rendering
//! ([`Directory::len`]); the delivery path reads the mask through an `Arc`
//! it already holds, lock-free.
//!
//! Lifetime rule: an entry stays in the map while anyone holds its `Arc`
//! besides the map (a worker with local subscribers, a publisher, a
//! publication not yet dispatched). So a publisher holding the `Arc`
//! always sees later subscribers, and topics nobody uses any more are
//! forgotten (no unbounded growth from clients trying random names).
//! Every holder lets go through [`Directory::release`] or
//! [`Directory::release_many`], under the map's lock, so the last one
//! always sees that only the map is left. The entry's lifetime is the
//! topic's history lifetime: its [`epoch`](TopicInterest::epoch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most workers a mask can describe.
pub const MAX_WORKERS: usize = 64;

/// One topic's name and interested workers.
#[derive(Debug)]
pub struct TopicInterest {
    name: Arc<str>,
    /// Bit `w` set: worker `w` has at least one local subscriber.
    workers: AtomicU64,
    /// This entry's history lifetime (see [`Self::epoch`]).
    epoch: u64,
    /// The last sequence number given (0: none yet); advanced only under
    /// the topic's order lock ([`Bus::hold_order`](super::bus::Bus::hold_order)),
    /// or by the only worker.
    seq: AtomicU64,
}

impl TopicInterest {
    /// The topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The workers with subscribers, as a bit mask.
    pub fn workers(&self) -> u64 {
        // Acquire pairs with the Release in `set`: a publisher that sees the bit
        // also sees the subscription that caused it.
        self.workers.load(Ordering::Acquire)
    }

    /// The topic's epoch: one value per history lifetime of the topic
    /// (this directory entry's), different from every epoch an earlier
    /// entry for the name had in this process or an earlier one (see
    /// [`Directory::new`]). Sequence numbers count from 1 within an epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last sequence number given (0: none).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Gives the next sequence number. The caller holds the topic's order
    /// lock (or is the only worker): the number and the order in which
    /// the publication then reaches every mailbox are one.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Topic name → interest, shared by all workers.
#[derive(Debug)]
pub struct Directory {
    topics: Mutex<HashMap<Arc<str>, Arc<TopicInterest>>>,
    /// The next entry's epoch.
    next_epoch: AtomicU64,
}

impl Default for Directory {
    fn default() -> Self {
        Self::new()
    }
}

impl Directory {
    /// Epochs start at the wall-clock time in microseconds since 1970 and
    /// count up by one per entry: a restarted process starts past every
    /// epoch of the last one unless that one made more than a million
    /// topic entries per second of its life; below 2^53, so exact in
    /// JavaScript.
    pub fn new() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            topics: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(micros.max(1)),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<TopicInterest>>> {
        // A panic while holding the lock leaves the map consistent (every
        // operation is a single insert/remove), so poisoning is ignored.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `name`, created if absent. Holding it keeps it alive.
    pub fn entry(&self, name: &str) -> Arc<TopicInterest> {
        let mut map = self.map();
        if let Some(t) = map.get(name) {
            return Arc::clone(t);
        }
        let name: Arc<str> = Arc::from(name);
        let t = Arc::new(TopicInterest {
            name: Arc::clone(&name),
            workers: AtomicU64::new(0),
            epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed),
            seq: AtomicU64::new(0),
        });
        map.insert(name, Arc::clone(&t));
        t
    }

    /// The entry for `name` if anyone uses it (no insert).
    pub fn get(&self, name: &str) -> Option<Arc<TopicInterest>> {
        self.map().get(name).cloned()
    }

    /// Marks `worker` as interested in `topic` or not.
    pub fn set(&self, topic: &TopicInterest, worker: usize, interested: bool) {
        let bit = 1u64 << worker;
        if interested {
            topic.workers.fetch_or(bit, Ordering::Release);
        } else {
            topic.workers.fetch_and(!bit, Ordering::Release);
        }
    }

    /// Drops the caller's `Arc` and forgets the topic if nobody else holds it.
    pub fn release(&self, topic: Arc<TopicInterest>) {
        let mut map = self.map();
        let name = Arc::clone(&topic.name);
        drop(topic);
        // Under the lock no one can clone from the map, so the count is stable:
        // 1 means only the map holds it.
        if map.get(&name).is_some_and(|t| Arc::strong_count(t) == 1) {
            map.remove(&name);
        }
    }

    /// [`Self::release`] for many references, under one lock.
    pub fn release_many(&self, topics: impl Iterator<Item = Arc<TopicInterest>>) {
        let mut map = self.map();
        for topic in topics {
            // Under the lock, with every holder releasing through it, the
            // count can only grow by a clone of a reference still held
            // elsewhere: 2 means the map and this one only.
            if Arc::strong_count(&topic) == 2 {
                let name = Arc::clone(&topic.name);
                drop(topic);
                if map.get(&name).is_some_and(|t| Arc::strong_count(t) == 1) {
                    map.remove(&name);
                }
            }
        }
    }

    /// Topics currently known (for metrics).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_lifetimes() {
        let d = Directory::new();
        assert!(d.get("a").is_none());
        let a = d.entry("a");
        let a2 = d.entry("a");
        assert!(Arc::ptr_eq(&a, &a2));
        d.set(&a, 0, true);
        d.set(&a, 5, true);
        assert_eq!(a2.workers(), 0b100001);
        d.set(&a, 0, false);
        assert_eq!(a.workers(), 0b100000);
        d.release(a);
        assert_eq!(d.len(), 1, "still held by a2");
        let seen = d.get("a").expect("alive");
        d.release(seen);
        d.release(a2);
        assert!(d.is_empty(), "nobody holds it: forgotten");
    }
}
