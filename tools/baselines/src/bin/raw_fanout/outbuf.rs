//! The bytes queued for one connection ([`OutBuf`]): shared frames, small
//! ones copied together, written with one `writev` per call.

use bytes::{Bytes, BytesMut};
use corecast::proto::OutQueue;
use corecast::proto::outbound::MAX_IOVECS;
use std::io::{self, IoSlice, Write};

/// Frames shorter than this are copied into the subscriber's contiguous
/// buffer; longer ones are queued as shared `Bytes` (one iovec each).
const COPY_BELOW: usize = 1024;

/// Bytes queued for one connection: corecast's [`OutQueue`] of shared
/// frames, plus a contiguous tail into which small frames are copied (one
/// iovec for many of them). The tail joins the queue before each write and
/// before a large frame, so order is kept.
#[derive(Default)]
pub(super) struct OutBuf {
    queue: OutQueue,
    tail: BytesMut,
}

impl OutBuf {
    pub(super) fn len(&self) -> usize {
        self.queue.len() + self.tail.len()
    }

    pub(super) fn push(&mut self, frame: &Bytes) {
        if frame.len() < COPY_BELOW {
            self.tail.extend_from_slice(frame);
        } else {
            self.seal();
            self.queue.push(frame.clone());
        }
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.queue.push(self.tail.split().freeze());
        }
    }

    /// One `writev` of (up to [`MAX_IOVECS`] chunks of) the queue. Returns
    /// the bytes written and whether everything offered was taken.
    pub(super) fn write_to(&mut self, w: &mut impl Write) -> io::Result<(usize, bool)> {
        self.seal();
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let k = self.queue.gather(&mut iov);
        let offered: usize = iov[..k].iter().map(|s| s.len()).sum();
        let n = loop {
            match w.write_vectored(&iov[..k]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.queue.advance(n);
        Ok((n, n == offered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `cap` bytes per write.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(self.cap);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn out_buffer_coalesces_small_frames_and_survives_partial_writes() {
        let mut q = OutBuf::default();
        let small = Bytes::from(vec![1u8; 100]);
        let big = Bytes::from(vec![2u8; 5000]);
        q.push(&small);
        q.push(&small);
        q.push(&big);
        q.push(&small);
        assert_eq!(q.len(), 5300);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 150,
        };
        // write_vectored's default writes the first non-empty slice only.
        assert_eq!(q.write_to(&mut w).unwrap(), (150, false));
        assert_eq!(q.write_to(&mut w).unwrap(), (50, false));
        w.cap = usize::MAX;
        assert_eq!(q.write_to(&mut w).unwrap(), (5000, false));
        assert_eq!(q.write_to(&mut w).unwrap(), (100, true));
        assert_eq!(q.len(), 0);
        let mut want = vec![1u8; 200];
        want.extend_from_slice(&big);
        want.extend_from_slice(&small);
        assert_eq!(w.got, want);
    }
}
