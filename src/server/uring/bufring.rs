//! The provided-buffer ring: the receive buffers the kernel fills.

use io_uring::{IoUring, types};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

/// How a worker's receive buffers are laid out, and whether the kernel
/// consumes them incrementally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    /// Buffers in the ring (a power of two).
    count: u16,
    /// Bytes per buffer.
    size: usize,
    /// Registered with `IOU_PBUF_RING_INC`.
    incremental: bool,
}

/// Receive buffers with incremental consumption (`IOU_PBUF_RING_INC`,
/// Linux 6.12+): a receive takes only the bytes it needs from the head
/// buffer, and the next receive, from any connection, continues behind
/// them, so a few large buffers serve thousands of small receives. The
/// buffers are written at start ([`resident_zeroes`]), so every page is
/// resident from then on: 256 KiB per worker, whether or not it ever takes
/// a connection, is what the ring costs (it was 2 MiB with 256 whole
/// 8 KiB buffers, docs/BENCHMARKS.md). 32 KiB per buffer: a 16 KiB frame
/// spans at most two receives.
const INCREMENTAL: Geometry = Geometry {
    count: 8,
    size: 32 * 1024,
    incremental: true,
};
/// Without incremental consumption (kernels before 6.12) every receive
/// takes a whole buffer, so a turn's receives need one each: 256 of 8 KiB
/// (2 MiB per worker, also written at start).
/// When more complete in one turn than there are buffers, a connection's
/// multishot receive ends with ENOBUFS and is re-armed once buffers are
/// back.
const WHOLE_BUFFERS: Geometry = Geometry {
    count: 256,
    size: 8 * 1024,
    incremental: false,
};
/// Both geometries, for the tests that run with each.
#[cfg(test)]
pub(super) const GEOMETRIES: [Geometry; 2] = [INCREMENTAL, WHOLE_BUFFERS];
/// The reserve ([`BufRing::reserve`]): a small group that only the
/// worker's own single-shot receives of starved connections draw from, so
/// that a flood holding the shared buffers cannot keep a quiet connection
/// waiting. 16 whole buffers of one reserve receive each, on every kernel:
/// consumed incrementally, a buffer a short receive left partly used stays
/// with the kernel, and the next turn's receives would share what is left
/// of it (some getting `ENOBUFS`).
const RESERVE: Geometry = Geometry {
    count: 16,
    size: RESERVE_RECV_BYTES,
    incremental: false,
};
/// What one receive from the reserve takes at most: a quiet connection's
/// message (a subscription, a ping, a small publication) in one, a flood's
/// share of the reserve small.
pub(super) const RESERVE_RECV_BYTES: usize = 1024;
/// `IOU_PBUF_RING_INC` from `<linux/io_uring.h>` (not exported by the
/// io-uring crate): register the buffer ring for incremental consumption.
const IOU_PBUF_RING_INC: u16 = 2;
/// The buffer group of the worker's receive buffers.
pub(super) const BGID: u16 = 0;
/// The buffer group of the worker's reserve ([`BufRing::reserve`]).
pub(super) const RESERVE_BGID: u16 = 1;

/// The receive buffers and the ring that hands them to the kernel.
///
/// Incrementally consumed buffers ([`Geometry::incremental`]): a
/// completion naming buffer `bid` with `IORING_CQE_F_BUF_MORE` set got
/// `res` bytes at `bid`'s current offset, and the kernel keeps filling
/// `bid` behind them (it advanced the ring entry itself); without the
/// flag, `bid` is used up and ours until we publish it again. Completions
/// for one buffer arrive in the order the kernel filled it, so the offset
/// is the sum of the earlier parts ([`Self::consumed`]). Whole buffers are
/// the special case where the flag never comes.
pub(super) struct BufRing {
    /// `geometry.count` entries, page-aligned (an anonymous mapping).
    entries: *mut types::BufRingEntry,
    map_len: usize,
    /// Our copy of the tail: entries published so far (wrapping).
    tail: u16,
    geometry: Geometry,
    /// Per buffer: bytes already handed to us from it (incremental mode).
    offsets: Box<[u32]>,
    /// The buffers, `count` × `size` bytes, buffer `bid` at `bid × size`.
    /// Allocated once and never resized: the kernel writes into every
    /// buffer published in the ring, so this is freed only once the group
    /// is unregistered, or leaked ([`Self::leak`]).
    bufs: Box<[u8]>,
    /// The buffer group it is registered as.
    bgid: u16,
}

/// `len` zero bytes, written (not just mapped): the receive buffers are
/// the worker's fixed cost, touched by the first few hundred requests
/// anyway, so they count in the process's RSS from the start instead of
/// showing up later as if connections cost them.
fn resident_zeroes(len: usize) -> Box<[u8]> {
    let mut b = vec![0u8; len].into_boxed_slice();
    // A zeroed allocation stays unmapped until written: write a byte per
    // page, a value the compiler cannot see is the zero already there.
    for page in b.chunks_mut(4096) {
        page[0] = std::hint::black_box(0);
    }
    b
}

impl BufRing {
    /// Incrementally consumed buffers where the kernel has them, whole
    /// ones otherwise.
    pub(super) fn new(ring: &IoUring) -> io::Result<Self> {
        match Self::with_geometry(ring, INCREMENTAL) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Self::with_geometry(ring, WHOLE_BUFFERS)
            }
            other => other,
        }
    }

    /// The worker's reserve, buffer group [`RESERVE_BGID`]: no multishot
    /// receive names it. A connection whose receive found the shared
    /// buffers used up (`ENOBUFS`) waits in the worker's starved queue,
    /// and is served from here by a single-shot, non-blocking receive of
    /// at most [`RESERVE_RECV_BYTES`] submitted before the turn's wait, in
    /// the order they starved ([`Self::recvs_per_turn`] a turn). Such a
    /// receive completes at once (with data, or `EAGAIN`), so the reserve
    /// is full again at the next turn.
    pub(super) fn reserve(ring: &IoUring) -> io::Result<Self> {
        Self::with_group(ring, RESERVE, RESERVE_BGID)
    }

    /// How many reserve receives of [`RESERVE_RECV_BYTES`] the buffers
    /// hold.
    pub(super) fn recvs_per_turn(&self) -> usize {
        self.geometry.count as usize * self.geometry.size / RESERVE_RECV_BYTES
    }

    /// Maps the ring, registers it as buffer group [`BGID`] of `ring`, and
    /// publishes every buffer.
    pub(super) fn with_geometry(ring: &IoUring, geometry: Geometry) -> io::Result<Self> {
        Self::with_group(ring, geometry, BGID)
    }

    /// [`Self::with_geometry`], as buffer group `bgid`.
    pub(super) fn with_group(ring: &IoUring, geometry: Geometry, bgid: u16) -> io::Result<Self> {
        let count = geometry.count;
        debug_assert!(count.is_power_of_two());
        let map_len = count as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut me = Self {
            entries: ptr.cast(),
            map_len,
            tail: 0,
            geometry,
            offsets: vec![0; count as usize].into_boxed_slice(),
            bufs: resident_zeroes(count as usize * geometry.size),
            bgid,
        };
        let flags = if geometry.incremental {
            IOU_PBUF_RING_INC
        } else {
            0
        };
        // SAFETY: the mapping holds `count` entries and lives until `Drop`,
        // which runs only after the buffer group is unregistered (or the
        // ring is gone). On failure `me` is dropped unregistered.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ptr as u64, count, bgid, flags)?;
        }
        for bid in 0..count {
            me.put(bid);
        }
        me.publish();
        Ok(me)
    }

    /// Writes buffer `bid` into the next ring entry (published by [`Self::publish`]).
    fn put(&mut self, bid: u16) {
        let size = self.geometry.size;
        let idx = (self.tail & (self.geometry.count - 1)) as usize;
        let addr = self.bufs[bid as usize * size..].as_ptr() as u64;
        // SAFETY: idx < count, the number of entries mapped; the kernel
        // reads (and, incrementally, rewrites) only entries between its
        // head and the published tail, and this one is past the tail: at
        // most `count` buffers are ever published, and `bid` was not.
        let e = unsafe { &mut *self.entries.add(idx) };
        e.set_addr(addr);
        e.set_len(size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: `entries` is the ring's first entry; its `resv` field is
        // the ring's tail, a u16 the kernel reads with acquire semantics.
        let tail = unsafe { types::BufRingEntry::tail(self.entries) } as *mut u16;
        // SAFETY: the tail is a valid, aligned u16 in our mapping.
        unsafe { AtomicU16::from_ptr(tail) }.store(self.tail, Ordering::Release);
    }

    /// The `len` bytes a completion naming buffer `bid` received.
    pub(super) fn data(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let size = self.geometry.size;
        let off = (self.offsets[bid as usize] as usize).min(size);
        let start = bid as usize * size + off;
        &mut self.bufs[start..start + len.min(size - off)]
    }

    /// A completion's `len` bytes of buffer `bid` are processed. With
    /// `more` (`IORING_CQE_F_BUF_MORE`) the kernel goes on filling `bid`
    /// behind them; otherwise `bid` goes back to the ring.
    pub(super) fn consumed(&mut self, bid: u16, len: usize, more: bool) {
        let off = &mut self.offsets[bid as usize];
        if more {
            *off = off.saturating_add(len as u32);
        } else {
            *off = 0;
            self.put(bid);
            self.publish();
        }
    }

    /// Unregisters the buffer group from `ring`: once no receive is in
    /// flight, the buffers are ours again and may be freed.
    pub(super) fn unregister(&self, ring: &IoUring) -> io::Result<()> {
        ring.submitter().unregister_buf_ring(self.bgid)
    }

    /// Leaks the mapping and the buffers (the kernel may still write to
    /// them: a receive is in flight at exit), leaving [`Self::leaked`] in
    /// their place.
    pub(super) fn leak(&mut self) {
        let stand_in = self.leaked();
        std::mem::forget(std::mem::replace(self, stand_in));
    }

    /// An empty stand-in for a buffer ring that had to be leaked.
    fn leaked(&self) -> Self {
        Self {
            entries: std::ptr::null_mut(),
            map_len: 0,
            tail: 0,
            geometry: WHOLE_BUFFERS,
            offsets: Box::new([]),
            bufs: Box::new([]),
            bgid: self.bgid,
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length; the
        // owner unregistered the group (or leaked the whole ring) before.
        unsafe { libc::munmap(self.entries.cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe::wait_one;
    use super::*;
    use io_uring::{cqueue, opcode};
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    /// Incremental consumption: consecutive receives land one behind the
    /// other in the same buffer (`IORING_CQE_F_BUF_MORE`), and `data`
    /// finds each part where `consumed` says the previous one ended.
    #[test]
    fn incremental_receives_continue_in_the_same_buffer() {
        let mut ring = IoUring::new(8).unwrap();
        ring.submitter().register_files_sparse(4).unwrap();
        let mut bufs = BufRing::with_geometry(&ring, INCREMENTAL).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let recv = opcode::RecvMulti::new(types::Fd(server.as_raw_fd()), BGID)
            .build()
            .user_data(2);
        // SAFETY: the receive uses the registered buffer ring, which
        // outlives the ring (it is unregistered, below, after the cancel).
        unsafe { ring.submission().push(&recv) }.unwrap();
        ring.submit().unwrap();
        let mut parts = Vec::new();
        for part in [&b"first"[..], b"second part", b"3"] {
            io::Write::write_all(&mut client, part).unwrap();
            let (ud, res, flags) = wait_one(&mut ring).unwrap();
            assert_eq!(ud, 2);
            assert!(cqueue::more(flags), "the multishot receive goes on");
            let bid = cqueue::buffer_select(flags).expect("a buffer");
            assert!(cqueue::buffer_more(flags), "the buffer is not used up");
            let len = res as usize;
            assert_eq!(bufs.data(bid, len), part);
            bufs.consumed(bid, len, true);
            parts.push(bid);
        }
        assert!(
            parts.iter().all(|&b| b == parts[0]),
            "one buffer: {parts:?}"
        );
        let cancel = opcode::AsyncCancel::new(2).build().user_data(3);
        // SAFETY: no pointers in this entry.
        unsafe { ring.submission().push(&cancel) }.unwrap();
        ring.submit().unwrap();
        loop {
            let (ud, _, flags) = wait_one(&mut ring).unwrap();
            if ud == 2 && !cqueue::more(flags) {
                break;
            }
        }
        bufs.unregister(&ring).unwrap();
    }

    /// What the starved queue relies on: a multishot receive that finds
    /// the shared buffers used up ends with `ENOBUFS`; a single-shot,
    /// non-blocking receive from the reserve then gets a quiet
    /// connection's bytes (a flood's at most `RESERVE_RECV_BYTES`), and one
    /// that finds nothing completes at once with `EAGAIN`, never waiting
    /// on the socket.
    #[test]
    fn a_starved_receive_is_served_from_the_reserve_and_an_empty_one_completes_at_once() {
        use super::super::recv::RESERVE_RECV_FLAGS;
        use io_uring::squeue;
        use std::io::Write;
        let mut ring = IoUring::new(16).unwrap();
        let shared = BufRing::with_geometry(&ring, INCREMENTAL).unwrap();
        let mut reserve = BufRing::reserve(&ring).unwrap();
        assert_eq!(reserve.recvs_per_turn(), 16);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            socket2::SockRef::from(&server)
                .set_recv_buffer_size(1 << 20)
                .unwrap();
            (client, server)
        };
        let (mut flood, flood_at) = pair();
        let (mut quiet, quiet_at) = pair();
        let (mut idle, idle_at) = pair();
        let shared_bytes = INCREMENTAL.count as usize * INCREMENTAL.size;
        let reserve_bytes = RESERVE.count as usize * RESERVE.size;
        flood
            .write_all(&vec![7u8; shared_bytes + reserve_bytes])
            .unwrap();
        quiet.write_all(b"ping").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let multishot = |fd: &std::net::TcpStream, ud| {
            opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), BGID)
                .build()
                .user_data(ud)
        };
        let from_reserve = |fd: &std::net::TcpStream, ud| {
            opcode::Recv::new(
                types::Fd(fd.as_raw_fd()),
                std::ptr::null_mut(),
                RESERVE_RECV_BYTES as u32,
            )
            .buf_group(RESERVE_BGID)
            .flags(RESERVE_RECV_FLAGS)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(ud)
        };
        // SAFETY (each push below): receives with BUFFER_SELECT name no
        // memory of their own; both groups stay registered until the end.
        unsafe { ring.submission().push(&multishot(&flood_at, 1)) }.unwrap();
        // The flood takes every shared buffer (none is given back here).
        let mut taken = 0;
        let last = loop {
            let (ud, res, flags) = wait_one(&mut ring).unwrap();
            assert_eq!(ud, 1);
            if res > 0 {
                taken += res as usize;
            }
            if !cqueue::more(flags) {
                break res;
            }
        };
        assert_eq!(last, -libc::ENOBUFS);
        assert_eq!(taken, shared_bytes);
        // The quiet connection finds none.
        unsafe { ring.submission().push(&multishot(&quiet_at, 2)) }.unwrap();
        let (ud, res, flags) = wait_one(&mut ring).unwrap();
        assert_eq!((ud, res, cqueue::more(flags)), (2, -libc::ENOBUFS, false));
        // So does one with nothing to read: the buffer is picked before the
        // socket is looked at. Re-armed to wait for data first (the starved
        // queue's re-arm), it waits, and fails only once data comes.
        unsafe { ring.submission().push(&multishot(&idle_at, 5)) }.unwrap();
        let (ud, res, _) = wait_one(&mut ring).unwrap();
        assert_eq!((ud, res), (5, -libc::ENOBUFS));
        let waiting = super::super::recv::poll_first(multishot(&idle_at, 6));
        unsafe { ring.submission().push(&waiting) }.unwrap();
        ring.submit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(ring.completion().is_empty(), "waits for data");
        idle.write_all(b"x").unwrap();
        let (ud, res, flags) = wait_one(&mut ring).unwrap();
        assert_eq!((ud, res, cqueue::more(flags)), (6, -libc::ENOBUFS, false));
        // The reserve serves it.
        unsafe { ring.submission().push(&from_reserve(&quiet_at, 3)) }.unwrap();
        let (ud, res, flags) = wait_one(&mut ring).unwrap();
        assert_eq!((ud, res), (3, 4));
        let bid = cqueue::buffer_select(flags).expect("a reserve buffer");
        assert_eq!(reserve.data(bid, 4), b"ping");
        reserve.consumed(bid, 4, cqueue::buffer_more(flags));
        // Nothing more to read: done at once, not waiting with a buffer,
        // and holding none.
        unsafe { ring.submission().push(&from_reserve(&quiet_at, 4)) }.unwrap();
        let (_, res, flags) = wait_one(&mut ring).unwrap();
        assert_eq!(res, -libc::EAGAIN);
        assert_eq!(cqueue::buffer_select(flags), None);
        // A turn's 16 receives, submitted together after that short one,
        // each get a whole receive's worth of the flood (a buffer consumed
        // incrementally would have stayed with the kernel, partly used,
        // and been shared: one receive cut short).
        for ud in 0..reserve.recvs_per_turn() as u64 {
            unsafe { ring.submission().push(&from_reserve(&flood_at, 10 + ud)) }.unwrap();
        }
        ring.submit().unwrap();
        for _ in 0..reserve.recvs_per_turn() {
            let (ud, res, flags) = wait_one(&mut ring).unwrap();
            assert!(ud >= 10, "{ud}");
            assert_eq!(res as usize, RESERVE_RECV_BYTES, "receive {ud}");
            assert_eq!(
                reserve.data(cqueue::buffer_select(flags).unwrap(), RESERVE_RECV_BYTES),
                &[7u8; RESERVE_RECV_BYTES][..]
            );
        }
        shared.unregister(&ring).unwrap();
        reserve.unregister(&ring).unwrap();
    }
}
