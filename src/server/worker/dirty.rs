//! The flush order: connections with bytes to write, in the order they
//! became dirty, flushed a bounded batch per turn.
//!
//! A turn flushes at most [`FLUSHES_PER_TURN`] connections and leaves the
//! rest at the front of the list for the next turn, which begins by
//! reading and delivering what was published meanwhile. So a worker with
//! thousands of subscribers walks them round-robin, each written once per
//! round with everything queued for it, and a publication that arrives
//! mid-round reaches every subscriber the round has not written yet in
//! this same round: it waits for the rest of the round at most, not for
//! the rest of this round and the whole of the next (what a turn that
//! flushed the whole list made it wait under a sustained load).
//!
//! The list counts what it has handed out, so the latency histograms can
//! tell when a publication's last subscriber has been written.

use crate::pubsub::shard::ConnRef;
use std::collections::VecDeque;

/// Connections one turn flushes at most; the rest wait for the next turn.
///
/// A turn costs a wait (`io_uring_enter` or `epoll_wait`, which does not
/// block while the list is not empty), a reap and a mailbox check, a few
/// microseconds against the ~1-5 µs of each flush: 512 flushes keep that
/// under 1 %, and bound the wait of a new publication for the rest of a
/// round to one batch of writes (a few milliseconds at most).
pub const FLUSHES_PER_TURN: usize = 512;

/// The dirty list: connections to flush, in order, each once (the
/// connection's `DIRTY` flag says whether it is listed).
#[derive(Default)]
pub struct DirtyList {
    queue: VecDeque<ConnRef>,
    /// Entries ever taken for a flush.
    taken: u64,
}

impl DirtyList {
    /// Lists a connection (its caller has checked and set its flag).
    pub fn push(&mut self, conn: ConnRef) {
        self.queue.push_back(conn);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next entry, from the front.
    pub fn pop(&mut self) -> Option<ConnRef> {
        let e = self.queue.pop_front()?;
        self.taken += 1;
        Some(e)
    }

    /// The position just past the last entry listed so far: once
    /// [`Self::taken`] reaches it, everything listed before has been taken.
    pub fn end(&self) -> u64 {
        self.taken + self.queue.len() as u64
    }

    /// Entries ever taken.
    pub fn taken(&self) -> u64 {
        self.taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_in_the_order_they_came_and_are_counted() {
        let mut d = DirtyList::default();
        d.push((1, 0));
        d.push((2, 0));
        let end = d.end();
        d.push((3, 0));
        assert_eq!(d.pop(), Some((1, 0)));
        assert!(d.taken() < end);
        assert_eq!(d.pop(), Some((2, 0)));
        assert_eq!(d.taken(), end, "all listed before `end` taken");
        assert_eq!(d.pop(), Some((3, 0)));
        assert_eq!(d.pop(), None);
        assert!(d.is_empty());
        assert_eq!(d.taken(), 3);
    }
}
