//! A connection's outbound byte queue: frames waiting to be written.
//!
//! Large frames are queued as [`Bytes`], so a frame encoded once can sit in
//! many queues without a copy. Small frames are *copied* into a contiguous
//! tail buffer instead ([`OutQueue::push_frame`]): copying 70 bytes is cheaper
//! than an iovec slot and a reference-count round trip, and a backlog of many
//! small frames then leaves in a few large writes rather than one iovec per
//! frame. The I/O backend gathers the queue into an iovec array
//! ([`OutQueue::gather`]), writes it with one vectored call, and reports how
//! much the kernel took ([`OutQueue::advance`]). An empty queue owns no heap
//! memory.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Upper bound on iovecs handed to one `writev`; Linux's `IOV_MAX` is 1024,
/// and 64 chunks already amortise the syscall well.
pub const MAX_IOVECS: usize = 64;
/// Frames shorter than this are copied into the tail buffer rather than
/// shared. 1 KiB: below it the copy costs less than the iovec and refcount
/// it replaces (benches/outbound.rs); above it sharing wins.
pub const COPY_BELOW: usize = 1024;
/// An owned front chunk written this far, and further than what is left
/// of it, has its rest copied out (see `Inner::advance`): a large echo or
/// reply partly read holds at most twice what is left, or this.
const FRONT_COPY_BYTES: usize = 64 * 1024;
/// First allocation of the tail buffer: room for ~30 small frames.
const TAIL_INITIAL_BYTES: usize = 2048;
/// The tail is sealed into a chunk once it holds this much, so chunk
/// boundaries (always frame boundaries) come at least this often: a slow
/// consumer's queue can be cut without splitting a frame, and no single
/// buffer grows past one socket send buffer's worth.
const TAIL_MAX_BYTES: usize = 64 * 1024;

/// Frames queued for one connection, in send order. Boxed and present only
/// while something is queued: an idle connection pays 8 bytes for its queue
/// (idle memory is the budget that matters at 100 000 connections), a busy
/// one an extra allocation per backlog.
#[derive(Debug, Default)]
pub struct OutQueue {
    inner: Option<Box<Inner>>,
}

impl OutQueue {
    /// An empty queue (no allocation).
    pub const fn new() -> Self {
        Self { inner: None }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.len)
    }

    /// Bytes this queue alone keeps alive: everything queued except shared
    /// frames ([`Self::push_frame`] above [`COPY_BELOW`]), which exist once
    /// however many queues hold them, and the written part of an owned
    /// front chunk, which lives as long as its rest. What the memory
    /// budget charges.
    pub fn owned(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.len - i.shared + i.front_written)
    }

    /// What holding the queue costs besides its bytes: the queue itself,
    /// a slot per chunk (shared frames included: a subscriber holding
    /// 4 096 shared 1 KiB frames holds 160 KiB of slots of its own), and
    /// the tail buffer's room not yet used. Charged to the budget with
    /// [`Self::owned`], and counted against a subscriber's bound.
    pub fn overhead(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| {
            std::mem::size_of::<Inner>()
                + i.chunks.capacity() * std::mem::size_of::<Chunk>()
                + (i.tail.capacity() - i.tail.len())
        })
    }

    /// The slots of the queued chunks (part of [`Self::overhead`]): what a
    /// subscriber's bound counts besides its bytes.
    pub fn slot_bytes(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |i| i.chunks.len() * std::mem::size_of::<Chunk>())
    }

    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    fn get(&mut self) -> &mut Inner {
        self.inner.get_or_insert_with(|| Box::new(Inner::new()))
    }

    /// Appends a chunk this queue owns (empty chunks are ignored): by
    /// reference, or copied into the tail when shorter than
    /// [`COPY_BELOW`]. Small replies (pongs, echoes, control answers) then
    /// cost their bytes and no more: queued as chunks each would hold an
    /// allocation and a slot of ~80 bytes that no charge sees, and a
    /// client sending empty messages it never reads the answers to could
    /// make the worker hold 40 times what its bound allows.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.len() < COPY_BELOW {
            self.push_copy(&chunk);
        } else {
            self.get().push(chunk);
        }
    }

    /// Appends a copy of `bytes` to the tail buffer.
    pub fn push_copy(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.get().push_copy(bytes);
        }
    }

    /// Makes room for `bytes` more in the tail (at most up to its sealing
    /// size), so a run of small frames is copied without reallocations.
    pub fn reserve_tail(&mut self, bytes: usize) {
        if bytes > 0 {
            self.get().reserve_tail(bytes);
        }
    }

    /// Appends a shared frame: copied when small, referenced when large.
    pub fn push_frame(&mut self, frame: &Bytes) {
        if frame.len() < COPY_BELOW {
            self.push_copy(frame);
        } else {
            self.get().push_chunk(frame.clone(), true);
        }
    }

    /// Drops everything queued except the first chunk, which may already be
    /// partly on the wire (dropping it would cut a frame in half). Returns
    /// the bytes dropped. Used before a slow consumer's close frame.
    pub fn truncate_to_front(&mut self) -> usize {
        self.inner.as_mut().map_or(0, |i| i.truncate_to_front())
    }

    /// Moves everything `other` holds (none of it written or pinned yet)
    /// behind what this queue holds, in order, leaving `other` empty:
    /// chunks by reference (shared ones stay shared), the tail copied.
    pub fn append(&mut self, other: &mut OutQueue) {
        let Some(other) = other.inner.take() else {
            return;
        };
        debug_assert!(other.pinned == 0 && !other.tail_pinned);
        let Inner { chunks, tail, .. } = *other;
        for chunk in chunks {
            if chunk.shared {
                self.push_frame(&chunk.bytes);
            } else {
                self.push(chunk.bytes);
            }
        }
        self.push_copy(&tail);
    }

    /// Fills `iov` with the queued bytes in order; returns how many slots were filled.
    pub fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        self.inner.as_ref().map_or(0, |i| i.gather(iov))
    }

    /// For completion-based I/O, where the kernel reads the queue after this
    /// call returns: pins up to `max` slots at the front, the chunks and,
    /// if a slot is left, the tail where it lies; returns how many. Until
    /// the next [`Self::advance`], pinned bytes are neither moved nor freed
    /// (a push seals a pinned tail into a chunk first, without moving it,
    /// and goes behind; [`Self::truncate_to_front`] keeps them), so their
    /// addresses, gathered with [`Self::gather`] into that many slots, stay
    /// valid.
    ///
    /// The tail is pinned in place rather than sealed: a subscriber that
    /// gets one small message per turn then costs no chunk (no ring to
    /// allocate for it, no shared header for the split buffer).
    pub fn pin_front(&mut self, max: usize) -> usize {
        self.inner.as_mut().map_or(0, |i| {
            i.pinned = i.chunks.len().min(max);
            i.tail_pinned = !i.tail.is_empty() && i.chunks.len() < max;
            i.pinned + usize::from(i.tail_pinned)
        })
    }

    /// The clock of a send deadline, kept here because it only runs while
    /// something is queued (an idle connection pays nothing for it).
    /// Progress is judged by epochs: an epoch covers the bytes queued when
    /// it began, and ends once they have all been written. Called with the
    /// time (any wrapping millisecond clock), this starts a new epoch if the
    /// last one is over, and returns when the current one began: a queued
    /// byte has waited at least `now_ms` minus that. `None` when empty.
    pub fn send_epoch(&mut self, now_ms: u32) -> Option<u32> {
        let i = self.inner.as_mut()?;
        if i.epoch_left == 0 {
            i.epoch_left = i.len;
            i.epoch_ms = now_ms;
        }
        Some(i.epoch_ms)
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, n: usize) {
        if let Some(i) = self.inner.as_mut() {
            i.advance(n);
            if i.len == 0 {
                // Give everything back: an idle connection keeps no heap memory.
                self.inner = None;
            }
        } else {
            debug_assert_eq!(n, 0);
        }
    }
}

/// The queue's contents: `chunks`, then `tail`.
/// A queued chunk, and whether other queues share it.
#[derive(Debug)]
struct Chunk {
    bytes: Bytes,
    shared: bool,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: VecDeque<Chunk>,
    /// Small frames copied back to back; logically after every chunk.
    tail: BytesMut,
    /// Total bytes not yet written.
    len: usize,
    /// Of `len`, bytes in shared chunks.
    shared: usize,
    /// Chunks at the front the kernel may be reading ([`OutQueue::pin_front`]).
    pinned: usize,
    /// The tail too, behind them: sealed before anything is added.
    tail_pinned: bool,
    /// Bytes written of the front chunk when it is owned: its allocation
    /// stays whole until the rest is written (see [`FRONT_COPY_BYTES`]).
    front_written: usize,
    /// The send epoch ([`OutQueue::send_epoch`]): bytes queued when it
    /// began that have not been written yet (0: it is over), and when it
    /// began.
    epoch_left: usize,
    epoch_ms: u32,
}

impl Inner {
    fn new() -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            len: 0,
            shared: 0,
            pinned: 0,
            tail_pinned: false,
            front_written: 0,
            epoch_left: 0,
            epoch_ms: 0,
        }
    }

    /// Appends a chunk this queue owns (empty chunks are ignored).
    fn push(&mut self, chunk: Bytes) {
        self.push_chunk(chunk, false);
    }

    /// Appends a chunk by reference.
    fn push_chunk(&mut self, bytes: Bytes, shared: bool) {
        if bytes.is_empty() {
            return;
        }
        self.seal_tail();
        self.len += bytes.len();
        if shared {
            self.shared += bytes.len();
        }
        self.chunks.push_back(Chunk { bytes, shared });
    }

    /// Appends a copy of `bytes` to the tail buffer.
    fn push_copy(&mut self, bytes: &[u8]) {
        if self.tail_pinned {
            self.seal_tail();
        }
        if self.tail.capacity() == 0 {
            self.tail.reserve(TAIL_INITIAL_BYTES.max(bytes.len()));
        }
        self.tail.extend_from_slice(bytes);
        self.len += bytes.len();
        if self.tail.len() >= TAIL_MAX_BYTES {
            self.seal_tail();
        }
    }

    /// Makes room for `bytes` more in the tail (at most up to its sealing
    /// size), so a run of small frames is copied without reallocations.
    fn reserve_tail(&mut self, bytes: usize) {
        if self.tail_pinned {
            // A reservation may move the tail: the kernel's part goes first.
            self.seal_tail();
        }
        let len = self.tail.len();
        let want = bytes.min(TAIL_MAX_BYTES.saturating_sub(len));
        let cap = self.tail.capacity();
        if cap - len < want {
            let room = if cap == 0 {
                // Exactly the run: one 64-byte message per turn (a steady
                // rate), written in the turn it came, must not cost a 2 KiB
                // allocation per subscriber per turn.
                want
            } else {
                // A second run before the write (a subscriber written every
                // few turns): room for many more at once. Grown by doubling
                // from the first run's ~70 bytes it took four reallocations
                // and their copies per write (benches/outbound.rs,
                // `trickle`: ten turns 284 -> 162 ns).
                (len + want)
                    .max(2 * cap)
                    .max(TAIL_INITIAL_BYTES)
                    .min(TAIL_MAX_BYTES.max(len + want))
                    - len
            };
            self.tail.reserve(room);
        }
    }

    /// Drops everything queued except the first chunk, which may already be
    /// partly on the wire (dropping it would cut a frame in half). Returns
    /// the bytes dropped. Used before a slow consumer's close frame.
    fn truncate_to_front(&mut self) -> usize {
        if self.tail_pinned {
            // Every chunk and the tail are in the kernel's hands (a push
            // would have sealed the tail): nothing can go.
            return 0;
        }
        let before = self.len;
        let keep = self.pinned.max(1);
        if self.chunks.len() >= keep {
            // Pinned chunks are in the kernel's hands: they stay where they are.
            self.chunks.truncate(keep);
            self.tail = BytesMut::new();
            self.len = self.chunks.iter().map(|c| c.bytes.len()).sum();
            self.shared = self
                .chunks
                .iter()
                .filter(|c| c.shared)
                .map(|c| c.bytes.len())
                .sum();
        }
        // With no sealed chunk, the tail alone holds < TAIL_MAX_BYTES: kept
        // whole, since it has no frame index to cut at.
        before - self.len
    }

    /// Fills `iov` with the queued bytes in order; returns how many slots were filled.
    fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in iov.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(&chunk.bytes);
            n += 1;
        }
        if !self.tail.is_empty() && n < iov.len() {
            iov[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.pinned = 0;
        self.tail_pinned = false;
        self.epoch_left = self.epoch_left.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.tail.advance(n);
                break;
            };
            let take = n.min(front.bytes.len());
            if front.shared {
                self.shared -= take;
            }
            if take == front.bytes.len() {
                self.chunks.pop_front();
                self.front_written = 0;
            } else {
                front.bytes.advance(take);
                if !front.shared {
                    self.front_written += take;
                    if self.front_written >= FRONT_COPY_BYTES
                        && self.front_written >= front.bytes.len()
                    {
                        // More written than left: the rest moves to an
                        // allocation of its own, the whole one is freed
                        // (outside probe: clients reading all but ~5 MiB
                        // of a 16 MiB echo held 16 MiB each, charged the
                        // rest only). Each copy at least halves what is
                        // held, so the copies cost at most the chunk.
                        front.bytes = Bytes::copy_from_slice(&front.bytes);
                        self.front_written = 0;
                    }
                }
            }
            n -= take;
        }
        if self.len == 0 {
            // Give back the ring and the tail: an idle connection keeps no heap memory.
            self.chunks = VecDeque::new();
            self.tail = BytesMut::new();
        }
    }

    /// Moves the tail into `chunks` so that a later shared chunk follows it;
    /// its bytes stay where they are (a pinned tail becomes a pinned chunk).
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let (len, spare) = (self.tail.len(), self.tail.capacity() - self.tail.len());
            let bytes = if spare == 0 {
                // A full buffer becomes a chunk as it is; splitting it would
                // allocate a shared header for the empty rest.
                std::mem::take(&mut self.tail).freeze()
            } else if spare > len / 4 && !self.tail_pinned {
                // Split, the chunk would keep the whole allocation alive
                // after the tail moves on, its spare room charged to no
                // one (outside probe: small frames queued to slow
                // subscribers held ~2x what was charged): copied out
                // instead, the buffer kept as the tail's room (charged).
                let chunk = Bytes::copy_from_slice(&self.tail);
                self.tail.clear();
                chunk
            } else {
                self.tail.split().freeze()
            };
            self.chunks.push_back(Chunk {
                bytes,
                shared: false,
            });
            if self.tail_pinned {
                self.tail_pinned = false;
                self.pinned += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flatten(q: &OutQueue) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let n = q.gather(&mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_send_epoch_ends_once_what_was_queued_at_its_start_is_written() {
        let mut q = OutQueue::new();
        assert_eq!(q.send_epoch(5), None, "nothing queued, no clock");
        q.push(Bytes::from_static(b"abcd"));
        assert_eq!(q.send_epoch(10), Some(10));
        q.push(Bytes::from_static(b"efgh"));
        q.advance(3);
        // One byte of the epoch's four is still queued: it runs on.
        assert_eq!(q.send_epoch(20), Some(10));
        q.advance(1);
        // Those four are out: the next epoch covers the four queued now.
        assert_eq!(q.send_epoch(30), Some(30));
        q.advance(4);
        assert_eq!(q.send_epoch(40), None);
        q.push(Bytes::from_static(b"i"));
        assert_eq!(q.send_epoch(50), Some(50), "a refilled queue starts afresh");
    }

    /// `append` moves another queue's frames behind this one's, in order,
    /// shared ones still shared (not charged as owned), and empties it.
    #[test]
    fn append_keeps_order_and_sharing() {
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        let mut q = OutQueue::new();
        q.push(Bytes::from_static(b"ab"));
        let mut other = OutQueue::new();
        other.push_copy(b"cd");
        other.push_frame(&big);
        other.push(Bytes::from_static(b"ef"));
        q.append(&mut other);
        assert!(other.is_empty());
        let mut want = b"abcd".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"ef");
        assert_eq!(flatten(&q), want);
        assert_eq!(q.len(), want.len());
        assert_eq!(q.owned(), 6, "the shared frame is not owned");
        q.append(&mut OutQueue::new());
        assert_eq!(flatten(&q), want);
    }

    #[test]
    fn partial_writes_keep_order() {
        let mut q = OutQueue::new();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::new());
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.len(), 7);
        q.advance(2);
        assert_eq!(flatten(&q), b"cdefg");
        q.advance(1);
        assert_eq!(flatten(&q), b"defg");
        q.advance(3);
        assert_eq!(flatten(&q), b"g");
        q.advance(1);
        assert!(q.is_empty());
        assert!(q.inner.is_none(), "an empty queue frees everything");
    }

    #[test]
    fn owned_bytes_leave_out_shared_frames() {
        let mut q = OutQueue::new();
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        q.push_frame(&Bytes::from_static(b"small"));
        q.push_frame(&big);
        q.push(Bytes::from_static(b"reply"));
        assert_eq!(q.len(), 10 + COPY_BELOW);
        assert_eq!(q.owned(), 10, "the shared frame is not this queue's");
        q.advance(7); // "small" and 2 bytes of the shared frame
        assert_eq!(q.owned(), 5);
        q.advance(COPY_BELOW - 2);
        assert_eq!((q.len(), q.owned()), (5, 5));
        q.push_frame(&big);
        q.push_frame(&big);
        assert_eq!(q.truncate_to_front(), 2 * COPY_BELOW);
        assert_eq!(q.owned(), 5);
        q.advance(5);
        assert_eq!(q.owned(), 0);
    }

    #[test]
    fn gather_caps_at_slots() {
        let mut q = OutQueue::new();
        for i in 0..100u8 {
            q.push(Bytes::from(vec![i; COPY_BELOW]));
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(q.gather(&mut iov), MAX_IOVECS);
        assert_eq!(iov[63][0], 63);
    }

    /// The queue's own cost is seen: a slot per chunk, shared or not, the
    /// tail's spare room, the queue itself; nothing once it is empty.
    #[test]
    fn the_overhead_counts_every_slot_and_the_spare_room() {
        let mut q = OutQueue::new();
        assert_eq!(q.overhead(), 0);
        let big = Bytes::from(vec![1u8; COPY_BELOW]);
        for _ in 0..4096 {
            q.push_frame(&big);
        }
        assert_eq!(q.owned(), 0, "shared frames are charged once, elsewhere");
        assert!(
            q.overhead() >= 4096 * std::mem::size_of::<Chunk>(),
            "{} for 4096 slots",
            q.overhead()
        );
        q.advance(q.len());
        assert_eq!(q.overhead(), 0);
        q.reserve_tail(10_000);
        q.push_copy(b"x");
        assert!(q.overhead() >= 9_999, "the tail's spare room");
    }

    /// A small chunk the queue owns (a pong, an echo, a control answer) is
    /// copied into the tail, so 10 000 empty replies cost their 20 000
    /// bytes in one buffer, not 10 000 allocations and slots no charge
    /// sees; a large one is still queued by reference.
    #[test]
    fn small_owned_chunks_are_copied_into_the_tail() {
        let mut q = OutQueue::new();
        for _ in 0..10_000 {
            q.push(Bytes::from_static(&[0x81, 0]));
        }
        let inner = q.inner.as_ref().unwrap();
        assert!(inner.chunks.len() <= 1, "{} chunks", inner.chunks.len());
        assert_eq!((q.len(), q.owned()), (20_000, 20_000));
        let held =
            inner.chunks.iter().map(|c| c.bytes.len()).sum::<usize>() + inner.tail.capacity();
        assert!(held < 2 * 20_000 + TAIL_INITIAL_BYTES, "{held} bytes held");
        let big = Bytes::from(vec![1u8; COPY_BELOW]);
        q.push(big.clone());
        let last = q.inner.as_ref().unwrap().chunks.back().unwrap();
        assert_eq!(last.bytes.as_ptr(), big.as_ptr(), "large: by reference");
        assert_eq!(flatten(&q).len(), 20_000 + COPY_BELOW);
    }

    /// One small frame a turn, the subscriber written every 30 turns: the
    /// first run gets exactly its room (a subscriber written in the same
    /// turn holds no more), the second grows the tail once, for 2 KiB, and
    /// the rest fit; doubling from 66 bytes grew it five times.
    #[test]
    fn a_tail_filled_turn_by_turn_grows_once() {
        let mut q = OutQueue::new();
        let frame = [3u8; 66];
        q.reserve_tail(66);
        q.push_copy(&frame);
        assert_eq!(
            q.overhead() - std::mem::size_of::<Inner>(),
            0,
            "no spare room"
        );
        let mut grown = 0;
        let mut cap = q.inner.as_ref().unwrap().tail.capacity();
        for _ in 1..30 {
            q.reserve_tail(66);
            q.push_copy(&frame);
            let now = q.inner.as_ref().unwrap().tail.capacity();
            grown += usize::from(now != cap);
            cap = now;
        }
        assert_eq!(grown, 1);
        assert_eq!(flatten(&q), frame.repeat(30));
        // A run larger than the step still gets its whole room at once.
        q.reserve_tail(10_000);
        let inner = q.inner.as_ref().unwrap();
        assert!(inner.tail.capacity() - inner.tail.len() >= 10_000);
    }

    /// A large owned chunk partly written is charged whole while its
    /// allocation lives; once more of it is written than is left, the
    /// rest is copied out and the whole allocation freed.
    #[test]
    fn a_large_owned_chunk_partly_written_is_charged_whole_then_copied_out() {
        let mut q = OutQueue::new();
        let big = Bytes::from(vec![4u8; 1 << 20]);
        let base = big.as_ptr() as usize;
        q.push(big);
        q.advance(100 << 10);
        assert_eq!(q.len(), (1 << 20) - (100 << 10));
        assert_eq!(q.owned(), 1 << 20, "the allocation is held whole");
        q.advance(500 << 10);
        let left = (1 << 20) - (600 << 10);
        assert_eq!(q.owned(), left, "copied out: what is left");
        let front = q.inner.as_ref().unwrap().chunks.front().unwrap();
        let at = front.bytes.as_ptr() as usize;
        assert!(at < base || at >= base + (1 << 20), "a new allocation");
        assert_eq!(flatten(&q), vec![4u8; left]);
        // A shared frame is charged once elsewhere: never copied.
        let mut q = OutQueue::new();
        let frame = Bytes::from(vec![5u8; 1 << 20]);
        q.push_frame(&frame);
        q.advance(900 << 10);
        assert_eq!(q.owned(), 0);
        let front = q.inner.as_ref().unwrap().chunks.front().unwrap();
        assert_eq!(
            front.bytes.as_ptr() as usize,
            frame.as_ptr() as usize + (900 << 10)
        );
    }

    #[test]
    fn small_frames_share_one_iovec() {
        let mut q = OutQueue::new();
        let small = Bytes::from(vec![7u8; 66]);
        for _ in 0..200 {
            q.push_frame(&small);
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(q.gather(&mut iov), 1, "200 small frames, one iovec");
        assert_eq!(q.len(), 200 * 66);
        let big = Bytes::from(vec![9u8; COPY_BELOW]);
        q.push_frame(&big);
        q.push_frame(&small);
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(q.gather(&mut iov), 3);
        assert_eq!(
            iov[1].as_ptr(),
            big.as_ptr(),
            "large frames are shared, not copied"
        );
    }

    #[test]
    fn truncate_keeps_the_front_chunk_whole() {
        let mut q = OutQueue::new();
        let big = Bytes::from(vec![1u8; 4000]);
        q.push_frame(&big);
        q.push_frame(&big);
        q.push_frame(&Bytes::from_static(b"xy"));
        q.advance(100);
        assert_eq!(q.truncate_to_front(), 4002);
        assert_eq!(q.len(), 3900);
        assert_eq!(flatten(&q), vec![1u8; 3900]);
    }

    #[test]
    fn the_tail_is_sealed_at_its_cap() {
        let mut q = OutQueue::new();
        let small = Bytes::from(vec![3u8; 1000]);
        for _ in 0..200 {
            q.push_frame(&small);
        }
        let inner = q.inner.as_ref().unwrap();
        assert!(inner.tail.len() < TAIL_MAX_BYTES);
        assert!(
            inner.chunks.iter().all(|c| c.bytes.len() % 1000 == 0),
            "chunks end on frame boundaries"
        );
        q.advance(10);
        let dropped = q.truncate_to_front();
        assert!(q.len() < TAIL_MAX_BYTES + 1000);
        assert_eq!(q.len() + dropped + 10, 200 * 1000);
    }

    proptest! {
        /// Any mix of pushes and partial writes yields exactly the pushed bytes, in order.
        #[test]
        fn bytes_out_equal_bytes_in(
            ops in proptest::collection::vec((0usize..3000, any::<bool>(), 0usize..5000), 1..60)
        ) {
            let mut q = OutQueue::new();
            let mut expected = Vec::new();
            let mut written = Vec::new();
            for (i, (len, shared, write)) in ops.into_iter().enumerate() {
                let frame: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                expected.extend_from_slice(&frame);
                if shared { q.push(Bytes::from(frame)) } else { q.push_frame(&Bytes::from(frame)) }
                let flat = flatten(&q);
                let n = write.min(flat.len());
                written.extend_from_slice(&flat[..n]);
                q.advance(n);
            }
            while !q.is_empty() {
                let flat = flatten(&q);
                written.extend_from_slice(&flat);
                q.advance(flat.len());
            }
            prop_assert_eq!(written, expected);
        }

        /// As above, with the queue pinned before each write as the
        /// io_uring backend does: what was pinned keeps its address and
        /// bytes through the pushes and cuts made before the write
        /// completes, and the write takes from it.
        #[test]
        fn pinned_bytes_stay_put_through_pushes(
            ops in proptest::collection::vec(
                (0usize..1500, any::<bool>(), 0usize..3000, 0usize..3, 1usize..5), 1..60)
        ) {
            let mut q = OutQueue::new();
            let mut written = Vec::new();
            let mut expected = Vec::new();
            for (i, (len, shared, write, pushes, slots)) in ops.into_iter().enumerate() {
                let n = q.pin_front(slots);
                let mut iov = [IoSlice::new(&[]); 8];
                let got = q.gather(&mut iov[..n]);
                prop_assert_eq!(got, n);
                let pinned: Vec<(usize, Vec<u8>)> =
                    iov[..n].iter().map(|s| (s.as_ptr() as usize, s.to_vec())).collect();
                for k in 0..pushes {
                    let frame: Vec<u8> = (0..len).map(|j| (i * 31 + k * 7 + j) as u8).collect();
                    expected.extend_from_slice(&frame);
                    if shared { q.push(Bytes::from(frame)) } else { q.push_frame(&Bytes::from(frame)) }
                }
                if i % 7 == 3 {
                    // A cut drops the end of what is queued.
                    let dropped = q.truncate_to_front();
                    expected.truncate(expected.len() - dropped);
                }
                let mut again = [IoSlice::new(&[]); 8];
                let m = q.gather(&mut again[..n]);
                prop_assert_eq!(m, n);
                for (slot, (addr, bytes)) in again[..n].iter().zip(&pinned) {
                    prop_assert_eq!(slot.as_ptr() as usize, *addr);
                    prop_assert_eq!(&slot[..], &bytes[..]);
                }
                let flat: Vec<u8> = pinned.iter().flat_map(|(_, b)| b.iter().copied()).collect();
                let w = write.min(flat.len());
                written.extend_from_slice(&flat[..w]);
                q.advance(w);
            }
            while !q.is_empty() {
                let flat = flatten(&q);
                written.extend_from_slice(&flat);
                q.advance(flat.len());
            }
            prop_assert_eq!(written, expected);
        }
    }

    #[test]
    fn a_pinned_tail_stays_in_place_and_costs_no_chunk() {
        let mut q = OutQueue::new();
        q.reserve_tail(66);
        q.push_copy(&[5u8; 66]);
        assert_eq!(q.pin_front(MAX_IOVECS), 1, "the tail alone, in place");
        let mut iov = [IoSlice::new(&[])];
        assert_eq!(q.gather(&mut iov), 1);
        let pinned = (iov[0].as_ptr() as usize, iov[0].len());
        let inner = q.inner.as_ref().unwrap();
        assert_eq!(inner.chunks.capacity(), 0, "no ring allocated for it");
        assert_eq!(pinned, (inner.tail.as_ptr() as usize, 66));
        // A slow consumer's cut cannot take what the kernel is reading.
        assert_eq!(q.truncate_to_front(), 0);
        // More frames while the kernel reads: the pinned tail becomes a
        // chunk where it lies, the new frames go behind it.
        q.reserve_tail(70);
        q.push_copy(&[6u8; 70]);
        q.push_frame(&Bytes::from(vec![7u8; COPY_BELOW]));
        let mut iov = [IoSlice::new(&[]); 4];
        assert_eq!(q.gather(&mut iov), 3);
        assert_eq!((iov[0].as_ptr() as usize, iov[0].len()), pinned);
        assert_eq!(
            q.truncate_to_front(),
            70 + COPY_BELOW,
            "the sealed tail is still pinned and kept"
        );
        // Part of it written: the pin is released, the rest still queued.
        q.advance(60);
        assert_eq!(flatten(&q), vec![5u8; 6]);
        q.push_copy(b"more");
        assert_eq!(q.pin_front(MAX_IOVECS), 2);
        q.advance(10);
        assert!(q.is_empty());
        // A partly written pinned tail: the rest stays pinned in place.
        q.push_copy(&[8u8; 100]);
        assert_eq!(q.pin_front(MAX_IOVECS), 1);
        q.advance(40);
        assert_eq!(q.pin_front(MAX_IOVECS), 1);
        let mut iov = [IoSlice::new(&[])];
        q.gather(&mut iov);
        assert_eq!(&iov[0][..], &[8u8; 60][..]);
        q.advance(60);
        assert!(q.inner.is_none());
    }

    #[test]
    fn pinned_chunks_stay_put_until_advanced() {
        let mut q = OutQueue::new();
        q.push_copy(b"small frame");
        q.push(Bytes::from(vec![7u8; 4096]));
        q.push_copy(b"tail");
        assert_eq!(q.pin_front(64), 3, "two chunks and the tail, in place");
        let mut iov = [IoSlice::new(&[]); 3];
        let n = q.gather(&mut iov);
        let addrs: Vec<(usize, usize)> = iov[..n]
            .iter()
            .map(|s| (s.as_ptr() as usize, s.len()))
            .collect();
        // More frames while the kernel reads: they go behind, nothing moves.
        for _ in 0..100 {
            q.push_copy(&[1u8; 700]);
        }
        q.push(Bytes::from(vec![2u8; 2000]));
        // A slow consumer's cut keeps every pinned chunk, not just the first.
        let dropped = q.truncate_to_front();
        assert_eq!(dropped, 100 * 700 + 2000);
        assert_eq!(q.len(), 11 + 4096 + 4);
        let mut again = [IoSlice::new(&[]); 8];
        let m = q.gather(&mut again);
        let now: Vec<(usize, usize)> = again[..m]
            .iter()
            .map(|s| (s.as_ptr() as usize, s.len()))
            .collect();
        assert_eq!(now, addrs);
        // Completion: the pin is released; a later cut keeps only the front chunk.
        q.advance(5);
        q.push_copy(b"x");
        q.push(Bytes::from(vec![3u8; 1500]));
        assert_eq!(q.truncate_to_front(), 4096 + 4 + 1 + 1500);
        assert_eq!(q.len(), 6);
    }
}
