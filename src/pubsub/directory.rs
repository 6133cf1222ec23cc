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
//! besides the map (a worker with local subscribers, a publisher). So a
//! publisher holding the `Arc` always sees later subscribers, and topics
//! nobody uses any more are forgotten (no unbounded growth from clients
//! trying random names).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Most workers a mask can describe.
pub const MAX_WORKERS: usize = 64;

/// One topic's name and interested workers.
#[derive(Debug)]
pub struct TopicInterest {
    name: Arc<str>,
    /// Bit `w` set: worker `w` has at least one local subscriber.
    workers: AtomicU64,
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
}

/// Topic name → interest, shared by all workers.
#[derive(Debug, Default)]
pub struct Directory {
    topics: Mutex<HashMap<Arc<str>, Arc<TopicInterest>>>,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
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
        });
        map.insert(name, Arc::clone(&t));
        t
    }

    /// The entry for `name` if anyone uses it (no insert).
    pub fn get(&self, name: &str) -> Option<Arc<TopicInterest>> {
        self.map().get(name).cloned()
    }

    /// For a publish that takes no reference: the topic by identity and
    /// its interested workers, under one lock; `None` if nobody uses it.
    pub fn interest(&self, name: &str) -> Option<(Weak<TopicInterest>, u64)> {
        self.map()
            .get(name)
            .map(|t| (Arc::downgrade(t), t.workers()))
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
        let (weak, mask) = d.interest("a").expect("known");
        assert_eq!(mask, 0b100000);
        assert!(
            std::ptr::eq(weak.as_ptr(), Arc::as_ptr(&a)),
            "same topic, by identity"
        );
        assert!(d.interest("nobody").is_none());
        d.release(a);
        assert_eq!(d.len(), 1, "still held by a2");
        let seen = d.get("a").expect("alive");
        d.release(seen);
        d.release(a2);
        assert!(d.is_empty(), "nobody holds it: forgotten");
    }
}
