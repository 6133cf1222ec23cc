//! A connection's outbound byte queue: frames waiting to be written.
//!
//! Chunks are [`Bytes`], so a frame encoded once can sit in many queues
//! without a copy. The I/O backend gathers the queue into an iovec array
//! ([`OutQueue::gather`]), writes it with one vectored call, and reports how
//! much the kernel took ([`OutQueue::advance`]). An empty queue owns no heap
//! memory.

use bytes::{Buf, Bytes};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Upper bound on iovecs handed to one `writev`; Linux's `IOV_MAX` is 1024,
/// and 64 frames already amortise the syscall well.
pub const MAX_IOVECS: usize = 64;

/// Frames queued for one connection, in send order.
#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    /// Total bytes not yet written.
    len: usize,
}

impl OutQueue {
    /// An empty queue (no allocation).
    pub const fn new() -> Self {
        Self {
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a chunk (empty chunks are ignored).
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Fills `iov` with the queued chunks in order; returns how many were filled.
    pub fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in iov.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("advance past queued bytes");
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if self.chunks.is_empty() {
            // Give back the ring buffer: an idle connection keeps no heap memory.
            self.chunks = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten(q: &OutQueue) -> Vec<u8> {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let n = q.gather(&mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
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
        assert_eq!(q.chunks.capacity(), 0, "an empty queue frees its ring");
    }

    #[test]
    fn gather_caps_at_slots() {
        let mut q = OutQueue::new();
        for i in 0..100u8 {
            q.push(Bytes::from(vec![i]));
        }
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        assert_eq!(q.gather(&mut iov), MAX_IOVECS);
        assert_eq!(iov[63][0], 63);
    }
}
