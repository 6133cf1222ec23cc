//! The buffer budget's share of published frames: each large published
//! frame is charged once, to the worker whose client published it, while
//! any queue or mailbox of any worker still holds it; not once per
//! subscriber queue that references it.
//!
//! One ledger holds each frame (the publisher's worker's), so "only the
//! ledger holds it" is exactly "no queue anywhere holds it": two ledgers
//! holding one frame would each keep the other's charge alive.
//!
//! Frames shorter than [`COPY_BELOW`](crate::proto::outbound::COPY_BELOW)
//! are copied into each queue and charged there as owned bytes; the larger
//! ones are shared by reference ([`bytes::Bytes`]), so a 16 MiB frame queued
//! to 10 000 subscribers exists once and is charged once here. The ledger
//! keeps its own reference to every charged frame and releases the charge
//! when that reference is the last one ([`Bytes::is_unique`]): the frame
//! has left every queue (written, or dropped with its connection).

use bytes::Bytes;

/// Ledger length below which a full scan is never forced: a small ledger
/// is cheap to keep, and the front-pop handles the in-order case.
const COMPACT_MIN: usize = 64;

/// Frames charged to one worker's budget (kept by its [`Shard`](super::shard::Shard)).
#[derive(Debug)]
pub struct SharedFrames {
    held: Vec<Bytes>,
    /// Index of the oldest entry still charged (entries before it are
    /// released and waiting to be compacted away).
    start: usize,
    bytes: usize,
    /// Scan the whole ledger once it is this long: each scan costs the
    /// ledger's length and happens only after as many new entries, so the
    /// work per charged frame stays constant (amortised).
    compact_at: usize,
}

impl Default for SharedFrames {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            start: 0,
            bytes: 0,
            compact_at: COMPACT_MIN,
        }
    }
}

impl SharedFrames {
    /// Bytes charged now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames charged now.
    pub fn len(&self) -> usize {
        self.held.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Charges `frame` (a frame this worker's client just published);
    /// returns the bytes added.
    pub fn charge(&mut self, frame: &Bytes) -> usize {
        self.held.push(frame.clone());
        self.bytes += frame.len();
        frame.len()
    }

    /// Releases the frames no queue holds any more; returns the bytes freed.
    /// Frames mostly leave queues in the order they were charged, so the
    /// front is popped first; a frame stuck in one stalled queue does not
    /// keep the later ones charged for longer than one compaction.
    pub fn release_unheld(&mut self) -> usize {
        let mut freed = 0;
        while let Some(f) = self.held.get(self.start) {
            if !f.is_unique() {
                break;
            }
            freed += f.len();
            self.start += 1;
        }
        if self.start == self.held.len() {
            self.held.clear();
            self.start = 0;
        } else if self.held.len() >= self.compact_at {
            let start = self.start;
            let mut i = 0;
            self.held.retain(|f| {
                i += 1;
                if i <= start {
                    return false;
                }
                let unheld = f.is_unique();
                if unheld {
                    freed += f.len();
                }
                !unheld
            });
            self.start = 0;
            self.compact_at = (self.held.len() * 2).max(COMPACT_MIN);
        }
        self.bytes -= freed;
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn a_frame_held_by_many_queues_is_charged_once_and_released_with_the_last() {
        let mut l = SharedFrames::default();
        let f = frame(4096);
        let queues: Vec<Bytes> = (0..1000).map(|_| f.clone()).collect();
        assert_eq!(l.charge(&f), 4096);
        drop(f);
        assert_eq!(l.release_unheld(), 0, "queues still hold it");
        assert_eq!(l.bytes(), 4096);
        let (a, b) = queues.split_at(999);
        drop(a.to_vec());
        let last = b[0].clone();
        drop(queues);
        assert_eq!(l.release_unheld(), 0, "one queue still holds it");
        drop(last);
        assert_eq!(l.release_unheld(), 4096);
        assert_eq!((l.bytes(), l.len()), (0, 0));
    }

    #[test]
    fn a_stalled_frame_at_the_front_does_not_keep_later_frames_charged() {
        let mut l = SharedFrames::default();
        let stuck = frame(2000);
        l.charge(&stuck);
        for _ in 0..10 * COMPACT_MIN {
            let f = frame(1000);
            l.charge(&f);
            // Written and dropped by its queue right away.
            l.release_unheld();
        }
        assert!(
            l.len() < 2 * COMPACT_MIN,
            "released frames are compacted away: {} left",
            l.len()
        );
        l.release_unheld();
        assert!(l.bytes() < 2000 + 2 * COMPACT_MIN * 1000);
        // Forced compaction happens when the ledger doubles: everything
        // written is gone after the next one.
        while l.len() > 1 {
            let f = frame(1000);
            l.charge(&f);
            drop(f);
            l.release_unheld();
            if l.len() == 1 {
                break;
            }
        }
        assert_eq!(l.bytes(), 2000);
        drop(stuck);
        assert_eq!(l.release_unheld(), 2000);
        assert!(l.is_empty());
    }

    #[test]
    fn scans_stay_linear_in_the_frames_charged() {
        // Count the entries a release looks at: amortised O(1) per charge.
        let mut l = SharedFrames::default();
        let stuck = frame(1500);
        l.charge(&stuck);
        let mut looked = 0usize;
        let n = 100_000;
        for _ in 0..n {
            let f = frame(1024);
            l.charge(&f);
            drop(f);
            looked += l.held.len();
            l.release_unheld();
        }
        // Each release looks at most at the ledger length; with compaction
        // at doubling the ledger never exceeds 2 * COMPACT_MIN here, so the
        // total is O(n), not O(n^2).
        assert!(looked <= n * 2 * COMPACT_MIN, "{looked}");
        assert!(l.len() <= 2 * COMPACT_MIN);
    }
}
