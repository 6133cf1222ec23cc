//! The io_uring backend: one ring per worker thread, driving the same
//! [`Core`] as the epoll loop.
//!
//! Per worker:
//! - [`ACCEPTS_IN_FLIGHT`] single-shot accepts on the worker's
//!   `SO_REUSEPORT` listener, each re-armed after it completes, which install
//!   each connection straight into the ring's sparse fixed-file table (a
//!   *direct descriptor*: no slot in the process's descriptor table, so the
//!   open-file limit caps each ring, not the process). Single-shot, not
//!   multishot: a multishot accept has one address buffer for all its
//!   completions, so it cannot tell each connection's peer address;
//! - one multishot receive per connection, into a provided-buffer ring shared
//!   by all of the worker's connections and consumed incrementally (a
//!   receive takes only the bytes it needs; see `BufRing`): an idle
//!   connection owns no receive buffer, and a used-up buffer goes back to
//!   the ring as soon as the core has consumed its bytes;
//! - at the end of each loop turn, one `sendmsg` per dirty connection (up to
//!   [`MAX_IOVECS`] queued chunks), all submitted with the next
//!   `io_uring_enter`. A connection has at most one send in flight, so its
//!   bytes never reorder; a short send leaves the rest queued for the next
//!   turn;
//! - cross-worker wake-ups through an eventfd read kept armed in the ring.
//!
//! # Who owns what the kernel reads or writes
//!
//! Every operation's memory stays valid until its completion (CQE) is reaped:
//! - **receive buffers** belong to the kernel while published in the buffer
//!   ring (incrementally consumed, it also rewrites the head entry, so we
//!   write only entries past the published tail); a CQE hands us the bytes
//!   it names, and one without `IORING_CQE_F_BUF_MORE` hands back the
//!   whole buffer `bid`, which we publish again once its bytes are
//!   processed (or at once, when the connection is gone);
//! - **send data** is the connection's [`OutQueue`](crate::proto::outbound::OutQueue)
//!   front, pinned ([`pin_front`](crate::proto::outbound::OutQueue::pin_front))
//!   so that neither new frames nor a slow-consumer cut move or free it;
//!   the `msghdr` and iovec array live in a boxed [`SendOp`] held by the
//!   connection. Both are released only by the send's CQE;
//! - a **closed connection** stays in the slab (state `Gone`, out of every
//!   list, no longer counted) until its receive, send and close operations
//!   have all completed; removing it cancels the receive and the send first;
//! - the **wake-up counter** (8 bytes) belongs to the worker;
//! - each **accept's peer address** (a `sockaddr_storage` and its
//!   `socklen_t`, which the kernel reads and writes when the connection
//!   arrives) is one entry of the worker's boxed `Acceptor` array,
//!   allocated once and never resized; entry `i` is the kernel's from the
//!   arming of accept `i` until its CQE (every accept posts exactly one,
//!   also when cancelled), and only then read; the listener stays open
//!   while any accept names it;
//! - at **exit**, the worker cancels everything and waits (bounded) for the
//!   completions; if the kernel has not finished in time, the memory
//!   (connections, receive buffers, wake-up counter, accept addresses) is
//!   leaked rather than freed under it.

use super::Shared;
use super::worker::{ACCEPT_RETRY, AfterFlush, Conn, Core, Input, IoState, is_resource_exhaustion};
use crate::proto::outbound::MAX_IOVECS;
use crate::pubsub::bus::{Inbox, Wake};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How a worker's receive buffers are laid out, and whether the kernel
/// consumes them incrementally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
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
/// kernel fills them in ring order and every page ends up resident; at
/// 256 KiB per worker that is what the ring costs (it was 2 MiB with 256
/// whole 8 KiB buffers, docs/BENCHMARKS.md). 32 KiB per buffer: a 16 KiB
/// frame spans at most two receives.
const INCREMENTAL: Geometry = Geometry {
    count: 8,
    size: 32 * 1024,
    incremental: true,
};
/// Without incremental consumption (kernels before 6.12) every receive
/// takes a whole buffer, so a turn's receives need one each: 256 of 8 KiB.
/// When more complete in one turn than there are buffers, a connection's
/// multishot receive ends with ENOBUFS and is re-armed once buffers are
/// back.
const WHOLE_BUFFERS: Geometry = Geometry {
    count: 256,
    size: 8 * 1024,
    incremental: false,
};
/// `IOU_PBUF_RING_INC` from `<linux/io_uring.h>` (not exported by the
/// io-uring crate): register the buffer ring for incremental consumption.
const IOU_PBUF_RING_INC: u16 = 2;
/// The buffer group of the worker's receive buffers.
const BGID: u16 = 0;
/// Submission queue entries.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: room for a receive from every connection of a
/// busy turn before the kernel has to buffer overflowed completions.
const CQ_ENTRIES: u32 = 65536;
/// Largest fixed-file table per ring; the kernel also caps it at RLIMIT_NOFILE.
const MAX_FIXED_FILES: u32 = 1 << 20;
/// How long an exiting worker waits for the kernel to finish its operations.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// Spare send arguments kept for reuse (1 KiB each).
const SEND_POOL_MAX: usize = 256;
/// The worker's scratch buffer: receive data behind bytes kept from earlier input.
const SCRATCH_BYTES: usize = super::epoll::READ_BUF_BYTES;
/// Single-shot accepts each worker keeps in flight. Each completion takes
/// one connection and its slot is re-armed at the top of the next turn, so
/// this bounds the connections a worker takes per turn: 32 keeps up with a
/// load generator's 256 handshakes in flight on two workers (see
/// docs/BENCHMARKS.md, handshakes) for 32 × 136 bytes of address buffers.
pub const ACCEPTS_IN_FLIGHT: usize = 32;

/// Operation kinds, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Close = 4,
    Shutdown = 5,
    Cancel = 6,
    Wake = 7,
}

/// The hidden switch for plain descriptors (see [`Ring::plain_fds`]).
const PLAIN_FDS_ENV: &str = "CORECAST_URING_PLAIN_FDS";

/// Builds an operation on a connection's socket: `$slot` is an index in
/// the ring's fixed-file table, or, with plain descriptors, a descriptor.
macro_rules! on_socket {
    ($plain:expr, $slot:expr, |$fd:ident| $build:expr) => {
        if $plain {
            let $fd = types::Fd($slot as RawFd);
            $build
        } else {
            let $fd = types::Fixed($slot);
            $build
        }
    };
}

/// A `user_data` key for no connection.
const NO_KEY: usize = 0xFF_FFFF;

/// `user_data`: kind (8 bits), slab key (24 bits), serial (32 bits).
fn user_data(op: Op, key: usize, serial: u32) -> u64 {
    debug_assert!(key <= NO_KEY);
    ((op as u64) << 56) | (((key as u64) & 0xFF_FFFF) << 32) | serial as u64
}

fn split_user_data(ud: u64) -> (u8, usize, u32) {
    (
        (ud >> 56) as u8,
        ((ud >> 32) & 0xFF_FFFF) as usize,
        ud as u32,
    )
}

/// A connection's handle: its direct descriptor and the operations in flight.
pub(super) struct Sock {
    /// Index in the ring's fixed-file table (with plain descriptors: the
    /// process descriptor).
    slot: u32,
    /// A multishot receive is armed.
    recv_armed: bool,
    /// The send in flight, if any (its msghdr and iovecs).
    send: Option<Box<SendOp>>,
    /// A `shutdown(SHUT_WR)` is in flight.
    shutdown_pending: bool,
    /// Where closing `slot` stands.
    close: SlotClose,
    /// Input that arrived while reading was paused (a multishot receive
    /// can complete after its cancel was submitted) is kept, unprocessed,
    /// in the session's pending bytes; fed to the core on resume.
    held: bool,
}

/// Closing a direct descriptor. The close is submitted only once no other
/// operation on the slot is in flight: io_uring resolves a fixed file when
/// an operation *executes*, and a shutdown (always run by an io-wq thread)
/// still queued when the slot is closed and re-filled by the next accept
/// would shut down the new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotClose {
    Open,
    /// Wanted, waiting for the slot's other operations to complete.
    Wanted,
    /// Submitted.
    Pending,
    /// Completed: the slot may already hold another connection.
    Done,
}

/// A `sendmsg`'s arguments, kept at a stable heap address while in flight.
struct SendOp {
    iov: [libc::iovec; MAX_IOVECS],
    msg: libc::msghdr,
}

impl SendOp {
    fn new() -> Box<Self> {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// Where one accept writes its peer's address. `repr(C)` and boxed in
/// [`Acceptor::addrs`]: the kernel holds pointers to both fields from the
/// accept's submission until its completion.
#[repr(C)]
struct AcceptAddr {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// The worker's accepts: [`ACCEPTS_IN_FLIGHT`] single-shot accepts, each
/// with its own address buffer, re-armed as they complete.
struct Acceptor {
    /// One per accept slot; allocated once, never resized or moved (the
    /// kernel writes into an armed slot's entry), leaked at exit if an
    /// accept is still in flight.
    addrs: Box<[AcceptAddr]>,
    /// Slot `i` has an accept in flight.
    armed: [bool; ACCEPTS_IN_FLIGHT],
    /// Kept while an accept is in flight, even after accepting stopped: an
    /// armed (or queued, not yet submitted) accept names it by number.
    listener: Option<TcpListener>,
    /// False once the drain began: nothing is armed again, what still
    /// completes is closed.
    accepting: bool,
    /// Out of resources: nothing is re-armed before this.
    retry_at: Option<Instant>,
    /// Since the last time out of resources, no accept has succeeded: only
    /// one is armed, so a still-exhausted table or descriptor limit costs
    /// one failure per retry, not one per slot.
    probing: bool,
    /// Direct descriptors: slots of the fixed-file table, and how many hold
    /// a socket (accepted, close not yet completed). An accept is armed only
    /// for a free slot: one that completes into a full table has already
    /// taken the connection off the backlog, and the kernel resets it.
    table: u32,
    slots_used: u32,
}

impl AcceptAddr {
    /// What `len` says before an accept: the room in `addr`.
    const CAPACITY: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as _;

    fn new() -> Self {
        Self {
            // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
            addr: unsafe { std::mem::zeroed() },
            len: 0,
        }
    }
}

impl Acceptor {
    fn new(listener: TcpListener) -> Self {
        let addrs = (0..ACCEPTS_IN_FLIGHT).map(|_| AcceptAddr::new()).collect();
        Self {
            addrs,
            armed: [false; ACCEPTS_IN_FLIGHT],
            listener: Some(listener),
            accepting: true,
            retry_at: None,
            probing: false,
            table: u32::MAX,
            slots_used: 0,
        }
    }

    fn any_armed(&self) -> bool {
        self.armed.iter().any(|&a| a)
    }

    /// Cancels every armed accept; each still reports through its own
    /// completion (a connection, an error, or `ECANCELED`).
    fn cancel_armed(&self, ring: &mut Ring) {
        for (i, _) in self.armed.iter().enumerate().filter(|(_, a)| **a) {
            let sqe = opcode::AsyncCancel::new(user_data(Op::Accept, NO_KEY, i as u32))
                .build()
                .user_data(user_data(Op::Cancel, NO_KEY, 0));
            ring.push(&sqe);
        }
    }

    /// The peer address accept `i` reported (read after its completion).
    fn peer(&self, i: usize) -> Option<IpAddr> {
        peer_ip(&self.addrs[i].addr, self.addrs[i].len)
    }
}

/// The IP address in a `sockaddr` the kernel filled (`len` bytes of it).
fn peer_ip(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<IpAddr> {
    let len = len as usize;
    match i32::from(addr.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &*(&raw const *addr).cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const *addr).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

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
struct BufRing {
    /// `geometry.count` entries, page-aligned (an anonymous mapping).
    entries: *mut types::BufRingEntry,
    map_len: usize,
    /// Our copy of the tail: entries published so far (wrapping).
    tail: u16,
    geometry: Geometry,
    /// Per buffer: bytes already handed to us from it (incremental mode).
    offsets: Box<[u32]>,
    bufs: Box<[u8]>,
}

impl BufRing {
    /// Incrementally consumed buffers where the kernel has them, whole
    /// ones otherwise.
    fn new(ring: &IoUring) -> io::Result<Self> {
        match Self::with_geometry(ring, INCREMENTAL) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Self::with_geometry(ring, WHOLE_BUFFERS)
            }
            other => other,
        }
    }

    fn with_geometry(ring: &IoUring, geometry: Geometry) -> io::Result<Self> {
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
            // Zeroed: pages become resident only when the kernel fills them.
            bufs: vec![0u8; count as usize * geometry.size].into_boxed_slice(),
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
                .register_buf_ring_with_flags(ptr as u64, count, BGID, flags)?;
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
    fn data(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let size = self.geometry.size;
        let off = (self.offsets[bid as usize] as usize).min(size);
        let start = bid as usize * size + off;
        &mut self.bufs[start..start + len.min(size - off)]
    }

    /// A completion's `len` bytes of buffer `bid` are processed. With
    /// `more` (`IORING_CQE_F_BUF_MORE`) the kernel goes on filling `bid`
    /// behind them; otherwise `bid` goes back to the ring.
    fn consumed(&mut self, bid: u16, len: usize, more: bool) {
        let off = &mut self.offsets[bid as usize];
        if more {
            *off = off.saturating_add(len as u32);
        } else {
            *off = 0;
            self.put(bid);
            self.publish();
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

/// The ring and a place for completions reaped while the submission queue was full.
struct Ring {
    ring: IoUring,
    backlog: Vec<(u64, i32, u32)>,
    /// Operations whose memory the kernel may still touch (receives, sends,
    /// the wake-up read, the accepts): the exit waits for this to reach 0.
    in_flight: usize,
    /// Connections are plain process descriptors (`types::Fd`), not direct
    /// descriptors (`types::Fixed`): `CORECAST_URING_PLAIN_FDS=1`, read
    /// once when the worker starts. A measuring aid only (it shows what
    /// direct descriptors save per operation); the process's open-file
    /// limit then caps the connections, as with epoll.
    plain_fds: bool,
}

impl Ring {
    /// Queues `sqe`; when the queue is full, submits first.
    fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in an SQE built by this module stays valid
            // until its CQE (see the module's ownership rules).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    // The completion queue is full: take completions aside
                    // so the kernel can post more.
                    self.stash();
                } else if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "io_uring_enter failed");
                    self.stash();
                }
            }
        }
    }

    fn stash(&mut self) {
        let backlog = &mut self.backlog;
        backlog.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
}

/// The eventfd that wakes a worker (other workers' publications, shutdown).
pub(super) struct EventFd(OwnedFd);

impl EventFd {
    pub(super) fn new() -> io::Result<Self> {
        // Blocking: io_uring would complete a read of a non-blocking eventfd
        // at once with EAGAIN instead of waiting for a wake-up. (A write
        // blocks only if the counter would pass 2^64 - 2.)
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The bus's wake-up for an io_uring worker.
pub(super) struct EventFdWake(pub(super) Arc<EventFd>);

impl Wake for EventFdWake {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe { libc::write(self.0.raw(), (&raw const one).cast(), 8) };
    }
}

pub(super) struct Worker {
    core: Core<Sock>,
    ring: Ring,
    bufs: BufRing,
    accept: Acceptor,
    wake: Arc<EventFd>,
    /// Where the armed eventfd read puts the counter.
    wake_buf: Box<u64>,
    wake_armed: bool,
    scratch: Vec<u8>,
    cqes: Vec<(u64, i32, u32)>,
    /// Spare send arguments, reused. Boxed on purpose: a box moves into a
    /// connection while its send is in flight, and its address must not change.
    #[allow(clippy::vec_box)]
    send_pool: Vec<Box<SendOp>>,
}

/// Does the kernel run everything this backend uses? Tries it for real on
/// loopback: an accept into a sparse fixed-file table that reports the
/// peer's address, a multishot receive into a provided-buffer ring,
/// cancellation and a close by index.
/// Probed once per process, on a thread of its own: the probe ring's
/// teardown may run task work on the thread that used it, which would
/// interrupt (EINTR) that thread's blocking calls.
pub fn probe() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("corecast-probe".into())
                .spawn(probe_now)
                .map_err(|e| format!("probe thread: {e}"))?
                .join()
                .unwrap_or_else(|_| Err("the probe panicked".into()))
        })
        .clone()
}

fn probe_now() -> Result<(), String> {
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("probe: {e}"))?;
    for (code, name) in [
        (opcode::Accept::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::Read::CODE, "read"),
        (opcode::Shutdown::CODE, "shutdown"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("opcode {name} not supported"));
        }
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| format!("sparse file table: {e}"))?;
    let mut bufs = BufRing::new(&ring).map_err(|e| format!("buffer ring: {e}"))?;
    let mut peer = Box::new(AcceptAddr::new());
    let result = probe_loopback(&mut ring, &mut bufs, &mut peer);
    if result.is_err() {
        // An operation may still point into the buffers or the address:
        // never free them.
        std::mem::forget(bufs);
        std::mem::forget(peer);
        return result;
    }
    // Nothing is in flight any more.
    let _ = ring.submitter().unregister_buf_ring(BGID);
    drop(ring);
    drop(bufs);
    result
}

fn probe_loopback(
    ring: &mut IoUring,
    bufs: &mut BufRing,
    peer: &mut AcceptAddr,
) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    peer.len = AcceptAddr::CAPACITY;
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        (&raw mut peer.addr).cast(),
        &raw mut peer.len,
    )
    .file_index(Some(types::DestinationSlot::auto_target()))
    .build()
    .user_data(1);
    // SAFETY: the accept writes into `peer`, which the caller leaks if the
    // probe fails (the accept may then still be in flight).
    unsafe { ring.submission().push(&accept) }.map_err(|_| "queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    let mut client =
        std::net::TcpStream::connect(addr).map_err(|e| format!("loopback connect: {e}"))?;
    let cqe = wait_one(ring)?;
    if cqe.1 < 0 {
        return Err(format!("accept: {}", io::Error::from_raw_os_error(-cqe.1)));
    }
    let local = client.local_addr().map_err(|e| e.to_string())?;
    if peer_ip(&peer.addr, peer.len) != Some(local.ip()) {
        return Err("accept did not report the peer address".into());
    }
    let slot = cqe.1 as u32;
    let recv = opcode::RecvMulti::new(types::Fixed(slot), BGID)
        .build()
        .user_data(2);
    // SAFETY: the receive uses the registered buffer ring, alive until after the ring.
    unsafe { ring.submission().push(&recv) }.map_err(|_| "queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    io::Write::write_all(&mut client, b"probe").map_err(|e| e.to_string())?;
    let cqe = wait_one(ring)?;
    let Some(bid) = cqueue::buffer_select(cqe.2) else {
        return Err(format!(
            "multishot recv: {}",
            io::Error::from_raw_os_error(-cqe.1.min(0))
        ));
    };
    let len = cqe.1.max(0) as usize;
    let got = bufs.data(bid, len) == b"probe";
    bufs.consumed(bid, len, cqueue::buffer_more(cqe.2));
    if !got {
        return Err("multishot recv returned the wrong bytes".into());
    }
    let cancel = opcode::AsyncCancel::new(2).build().user_data(3);
    let close = opcode::Close::new(types::Fixed(slot)).build().user_data(4);
    for sqe in [&cancel, &close] {
        // SAFETY: no pointers in these entries.
        unsafe { ring.submission().push(sqe) }.map_err(|_| "queue full".to_string())?;
    }
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    // Reap until the receive has ended (it is cancelled).
    let mut open = 1;
    let deadline = Instant::now() + Duration::from_secs(1);
    while open > 0 && Instant::now() < deadline {
        let (ud, _, flags) = wait_one(ring)?;
        if let Some(bid) = cqueue::buffer_select(flags) {
            bufs.consumed(bid, 0, cqueue::buffer_more(flags));
        }
        if ud == 2 && !cqueue::more(flags) {
            open -= 1;
        }
    }
    if open > 0 {
        return Err("cancellation did not complete".into());
    }
    Ok(())
}

fn wait_one(ring: &mut IoUring) -> Result<(u64, i32, u32), String> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(c) = ring.completion().next() {
            return Ok((c.user_data(), c.result(), c.flags()));
        }
        if Instant::now() >= deadline {
            return Err("no completion within 1 s".into());
        }
        let ts = types::Timespec::from(Duration::from_millis(50));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
    }
}

impl Worker {
    /// Builds the worker's ring; call on the worker's own thread (the ring
    /// is created single-issuer where the kernel supports it).
    pub(super) fn new(
        id: usize,
        listener: TcpListener,
        inbox: Inbox,
        wake: Arc<EventFd>,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let plain_fds = std::env::var_os(PLAIN_FDS_ENV).is_some_and(|v| v == "1");
        let ring = build_ring()?;
        if plain_fds {
            info!(
                worker = id,
                "io_uring with plain descriptors ({PLAIN_FDS_ENV}=1)"
            );
        } else {
            ring.submitter().register_files_sparse(fixed_table_size())?;
        }
        let mut accept = Acceptor::new(listener);
        if !plain_fds {
            accept.table = fixed_table_size();
        }
        let bufs = BufRing::new(&ring)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: pushed
        // frames leave at once, without a setsockopt per direct descriptor.
        socket2::SockRef::from(accept.listener.as_ref().expect("just bound")).set_nodelay(true)?;
        Ok(Self {
            core: Core::new(id, inbox, shared),
            ring: Ring {
                ring,
                backlog: Vec::new(),
                in_flight: 0,
                plain_fds,
            },
            bufs,
            accept,
            wake,
            wake_buf: Box::new(0),
            wake_armed: false,
            scratch: vec![0u8; SCRATCH_BYTES],
            cqes: Vec::with_capacity(1024),
            send_pool: Vec::new(),
        })
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub(super) fn run(mut self) {
        let id = self.core.id;
        info!(worker = id, "worker started (io_uring)");
        loop {
            self.arm_accepts();
            self.arm_wake();
            self.enter();
            self.core.now = Instant::now();
            self.reap();
            self.end_of_turn();
            if self.core.drain_requested() {
                self.begin_drain();
            }
            if self.core.drained() {
                break;
            }
        }
        self.exit();
        info!(worker = id, "worker stopped");
    }

    /// Submits what is queued and waits for a completion or the next deadline.
    fn enter(&mut self) {
        let now = Instant::now();
        let busy = self.core.busy() || !self.ring.backlog.is_empty();
        let deadline = self.core.next_deadline(now, self.accept.retry_at);
        let result = match (busy, deadline) {
            (true, _) => self.ring.ring.submit(),
            (false, None) => self.ring.ring.submit_and_wait(1),
            (false, Some(t)) => {
                let ts = types::Timespec::from(t.saturating_duration_since(now));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.ring.submitter().submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => warn!(worker = self.core.id, error = %e, "io_uring_enter failed"),
        }
    }

    /// Handles every completion available.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.append(&mut self.ring.backlog);
        cqes.extend(
            self.ring
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags);
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, key, serial) = split_user_data(ud);
        match op {
            x if x == Op::Accept as u8 => self.on_accept(serial as usize, res),
            x if x == Op::Recv as u8 => self.on_recv(key, serial, res, flags),
            x if x == Op::Send as u8 => self.on_send(key, serial, res),
            x if x == Op::Close as u8 => {
                if !self.ring.plain_fds {
                    // Every accepted slot is closed exactly once.
                    self.accept.slots_used = self.accept.slots_used.saturating_sub(1);
                }
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io.close = SlotClose::Done;
                    self.free_if_done(key);
                }
            }
            x if x == Op::Shutdown as u8 => {
                if let Some(conn) = conn_of(&mut self.core, key, serial) {
                    conn.io.shutdown_pending = false;
                    if conn.state == IoState::Gone {
                        self.free_if_done(key);
                    }
                }
            }
            x if x == Op::Wake as u8 => {
                self.wake_armed = false;
                self.ring.in_flight -= 1;
            }
            // Cancel results need no action: what they cancel reports
            // through its own completion.
            _ => {}
        }
    }

    /// Arms every idle accept slot, unless accepting stopped or is
    /// paused after running out of resources.
    fn arm_accepts(&mut self) {
        let acc = &mut self.accept;
        if !acc.accepting || acc.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        acc.retry_at = None;
        let Some(listener) = &acc.listener else {
            return;
        };
        let fd = listener.as_raw_fd();
        let mut armed = acc.armed.iter().filter(|&&a| a).count();
        let free = acc.table.saturating_sub(acc.slots_used) as usize;
        let want = if acc.probing { 1 } else { ACCEPTS_IN_FLIGHT }.min(free);
        for i in 0..ACCEPTS_IN_FLIGHT {
            if armed >= want {
                break;
            }
            if acc.armed[i] {
                continue;
            }
            let slot = &mut acc.addrs[i];
            slot.len = AcceptAddr::CAPACITY;
            // Non-blocking sockets: an operation that cannot complete waits
            // on the ring's internal poll, never in a blocking call on an
            // io-wq thread.
            let accept = opcode::Accept::new(
                types::Fd(fd),
                (&raw mut slot.addr).cast(),
                &raw mut slot.len,
            );
            let accept = if self.ring.plain_fds {
                accept.flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            } else {
                // Into a free slot of the fixed-file table (CLOEXEC means
                // nothing there, and the kernel refuses it).
                accept
                    .file_index(Some(types::DestinationSlot::auto_target()))
                    .flags(libc::SOCK_NONBLOCK)
            };
            let sqe = accept
                .build()
                .user_data(user_data(Op::Accept, NO_KEY, i as u32));
            self.ring.push(&sqe);
            self.ring.in_flight += 1;
            acc.armed[i] = true;
            armed += 1;
        }
    }

    /// Accept slot `i` completed: `res` is the new connection's slot or an error.
    fn on_accept(&mut self, i: usize, res: i32) {
        let Some(armed) = self.accept.armed.get_mut(i) else {
            return;
        };
        *armed = false;
        self.ring.in_flight -= 1;
        if !self.accept.accepting && !self.accept.any_armed() {
            // The last accept has ended: nothing names the listener any more.
            self.accept.listener = None;
        }
        if res >= 0 {
            let slot = res as u32;
            if !self.ring.plain_fds {
                self.accept.slots_used += 1;
            }
            if !self.accept.accepting || self.core.conns.vacant_key() >= NO_KEY {
                // Draining (or out of keys): not taken.
                self.close_slot(slot, NO_KEY, 0);
                return;
            }
            self.accept.probing = false;
            let peer = self.accept.peer(i);
            let key = self.core.admit(
                Sock {
                    slot,
                    recv_armed: false,
                    send: None,
                    shutdown_pending: false,
                    close: SlotClose::Open,
                    held: false,
                },
                peer,
            );
            self.arm_recv(key);
            return;
        }
        let errno = -res;
        if errno == libc::ECANCELED {
            return;
        }
        self.core.stats().accept_error();
        let e = io::Error::from_raw_os_error(errno);
        if is_resource_exhaustion(errno) {
            // ENFILE here is usually the fixed-file table: full until
            // connections close. The other armed accepts are cancelled:
            // each would fail too (a direct one after taking a connection
            // off the backlog, and dropping it). After the pause one accept
            // probes; the rest are armed once one succeeds.
            let acc = &mut self.accept;
            if acc.retry_at.is_none() {
                warn!(worker = self.core.id, error = %e, "accept failed: out of resources; retrying shortly");
                acc.retry_at = Some(Instant::now() + ACCEPT_RETRY);
                acc.probing = true;
                acc.cancel_armed(&mut self.ring);
            }
        } else {
            debug!(worker = self.core.id, error = %e, "accept failed");
        }
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let sqe = opcode::Read::new(
            types::Fd(self.wake.raw()),
            (&raw mut *self.wake_buf).cast(),
            8,
        )
        .build()
        .user_data(user_data(Op::Wake, NO_KEY, 0));
        self.ring.push(&sqe);
        self.ring.in_flight += 1;
        self.wake_armed = true;
    }

    fn arm_recv(&mut self, key: usize) {
        let conn = &mut self.core.conns[key];
        debug_assert!(!conn.io.recv_armed);
        let sqe = on_socket!(self.ring.plain_fds, conn.io.slot, |fd| {
            opcode::RecvMulti::new(fd, BGID).build()
        })
        .user_data(user_data(Op::Recv, key, conn.serial));
        conn.io.recv_armed = true;
        self.ring.push(&sqe);
        self.ring.in_flight += 1;
    }

    /// Should `conn` have a receive armed?
    fn wants_recv(conn: &Conn<Sock>) -> bool {
        !conn.peer_eof
            && !conn.io.recv_armed
            && match conn.state {
                IoState::Active => !conn.read_paused,
                IoState::Lingering => true,
                IoState::Closing | IoState::Gone => false,
            }
    }

    fn on_recv(&mut self, key: usize, serial: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let buf_more = cqueue::buffer_more(flags);
        let len = res.max(0) as usize;
        let Some(conn) = conn_of(&mut self.core, key, serial) else {
            // Cannot happen (entries outlive their operations); the buffer is accounted for regardless.
            if let Some(bid) = bid {
                self.bufs.consumed(bid, len, buf_more);
            }
            return;
        };
        if !cqueue::more(flags) {
            conn.io.recv_armed = false;
            self.ring.in_flight -= 1;
        }
        let state = conn.state;
        if res > 0 {
            match bid {
                Some(bid) => {
                    // A closing or lingering connection reads nothing more: discarded.
                    if state == IoState::Active {
                        if conn.read_paused {
                            // Received before the pause took effect: not
                            // processed while paused (a paced publisher,
                            // backpressure), kept for the resume.
                            conn.session.hold(self.bufs.data(bid, len));
                            conn.io.held = true;
                        } else {
                            self.input(key, bid, len);
                        }
                    }
                    self.bufs.consumed(bid, len, buf_more);
                }
                None => {
                    // A receive with data always names its buffer; if a kernel
                    // ever did otherwise, the stream is lost: close, don't panic.
                    warn!(worker = self.core.id, "receive completion without a buffer");
                    if state != IoState::Gone {
                        self.remove(key);
                    }
                }
            }
        } else {
            if let Some(bid) = bid {
                self.bufs.consumed(bid, 0, buf_more);
            }
            match (res, state) {
                (_, IoState::Gone) => {}
                (0, IoState::Active) => {
                    self.core.eof(key);
                    self.core.after_input(key);
                }
                (0, IoState::Closing) => self.core.conns[key].peer_eof = true,
                (0, IoState::Lingering) => self.remove(key),
                (e, _) if -e == libc::ENOBUFS || -e == libc::ECANCELED => {}
                (_, _) => self.remove(key),
            }
        }
        let conn = &self.core.conns[key];
        if conn.state == IoState::Gone {
            self.free_if_done(key);
        } else if Self::wants_recv(conn) {
            self.arm_recv(key);
        }
    }

    /// Feeds the input held while reading was paused to the core.
    fn input_held(&mut self, key: usize) {
        self.core.conns[key].io.held = false;
        let kept = self.restore_pending(key);
        let verdict = self.core.input(key, &mut self.scratch[..kept]);
        self.after_core_input(key, verdict);
    }

    /// Copies `key`'s pending bytes to the front of the scratch buffer
    /// (grown if held input made them longer than it); returns how many.
    fn restore_pending(&mut self, key: usize) -> usize {
        let session = &mut self.core.conns[key].session;
        if self.scratch.len() < session.pending_len() {
            self.scratch.resize(session.pending_len(), 0);
        }
        session.restore_pending(&mut self.scratch)
    }

    /// Feeds `len` bytes of receive buffer `bid` to the core.
    fn input(&mut self, key: usize, bid: u16, len: usize) {
        let kept = self.restore_pending(key);
        let data = self.bufs.data(bid, len);
        let verdict = if kept == 0 {
            // The common case: processed (and unmasked) in place.
            self.core.input(key, data)
        } else {
            if self.scratch.len() < kept + data.len() {
                // Kept bytes are a request head (capped at half the scratch
                // size), a frame header or input held while paused.
                self.scratch.resize(kept + data.len(), 0);
            }
            self.scratch[kept..kept + data.len()].copy_from_slice(data);
            let n = kept + data.len();
            self.core.input(key, &mut self.scratch[..n])
        };
        self.after_core_input(key, verdict);
    }

    /// After the core took input: a pause cancels the multishot receive.
    fn after_core_input(&mut self, key: usize, verdict: Input) {
        let conn = &self.core.conns[key];
        if verdict == Input::Stop && conn.read_paused && conn.io.recv_armed {
            // Backpressure: stop the multishot receive; re-armed when unpaused.
            let sqe = opcode::AsyncCancel::new(user_data(Op::Recv, key, conn.serial))
                .build()
                .user_data(user_data(Op::Cancel, key, conn.serial));
            self.ring.push(&sqe);
        }
        self.core.after_input(key);
    }

    /// Work that is batched per turn: re-armed receives, delivery of this
    /// turn's publications, one send per dirty connection, deadlines.
    fn end_of_turn(&mut self) {
        let reread = self.core.take_reread();
        for &(key, serial) in &reread {
            if !self.core.is_current(key, serial) {
                continue;
            }
            let conn = &self.core.conns[key];
            if conn.io.held && !conn.read_paused && conn.state == IoState::Active {
                self.input_held(key);
            }
            if Self::wants_recv(&self.core.conns[key]) {
                self.arm_recv(key);
            }
        }
        self.core.return_reread(reread);
        self.core.deliver();
        let dirty = self.core.take_dirty();
        for &(key, serial) in &dirty {
            if self.core.is_current(key, serial) {
                self.flush(key);
            }
        }
        self.core.return_dirty(dirty);
        self.core.observe_written();
        self.core.unthrottle();
        self.core.keepalive();
        let ring = &mut self.ring;
        self.core
            .expire(Instant::now(), |core, key| remove(core, ring, key));
    }

    /// Sends `key`'s queue (up to [`MAX_IOVECS`] chunks), unless a send is in flight.
    fn flush(&mut self, key: usize) {
        let conn = &mut self.core.conns[key];
        if conn.io.send.is_some() {
            // Its completion flushes the rest.
            return;
        }
        if conn.session.out.is_empty() {
            self.after_flush(key, 0);
            return;
        }
        let n = conn.session.out.pin_front(MAX_IOVECS);
        let mut op = self.send_pool.pop().unwrap_or_else(SendOp::new);
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let filled = conn.session.out.gather(&mut iov[..n]);
        debug_assert_eq!(filled, n);
        for (dst, src) in op.iov.iter_mut().zip(&iov[..filled]) {
            *dst = libc::iovec {
                iov_base: src.as_ptr() as *mut libc::c_void,
                iov_len: src.len(),
            };
        }
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = filled as _;
        let sqe = on_socket!(self.ring.plain_fds, conn.io.slot, |fd| {
            opcode::SendMsg::new(fd, &raw const op.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        })
        .user_data(user_data(Op::Send, key, conn.serial));
        // The box moves into the connection; the heap data it points to does not.
        conn.io.send = Some(op);
        self.ring.push(&sqe);
        self.ring.in_flight += 1;
    }

    fn on_send(&mut self, key: usize, serial: u32, res: i32) {
        let Some(conn) = conn_of(&mut self.core, key, serial) else {
            return;
        };
        let op = conn.io.send.take();
        // Also releases the pin: the queue may move again.
        conn.session.out.advance(res.max(0) as usize);
        let gone = conn.state == IoState::Gone;
        let pending = !conn.session.out.is_empty();
        if let Some(op) = op
            && self.send_pool.len() < SEND_POOL_MAX
        {
            self.send_pool.push(op);
        }
        self.ring.in_flight -= 1;
        if res > 0 {
            self.core.stats().bytes_sent(res as usize);
        }
        if gone {
            self.free_if_done(key);
            return;
        }
        if res <= 0 {
            // Reset, broken pipe, or nothing taken: the connection is dead.
            self.remove(key);
            return;
        }
        if pending {
            // What the kernel did not take, and what queued meanwhile, goes
            // at the end of this turn in one send.
            self.core.mark_dirty(key);
        }
        self.after_flush(key, res as usize);
    }

    fn after_flush(&mut self, key: usize, wrote: usize) {
        match self.core.after_flush(key, wrote) {
            AfterFlush::Keep => {}
            AfterFlush::Remove => self.remove(key),
            AfterFlush::ShutdownWrite => {
                let conn = &mut self.core.conns[key];
                let sqe = on_socket!(self.ring.plain_fds, conn.io.slot, |fd| {
                    opcode::Shutdown::new(fd, libc::SHUT_WR).build()
                })
                .user_data(user_data(Op::Shutdown, key, conn.serial));
                conn.io.shutdown_pending = true;
                let wants = Self::wants_recv(conn);
                self.ring.push(&sqe);
                if wants {
                    // Lingering: read (and drop) until the peer's FIN.
                    self.arm_recv(key);
                }
            }
        }
    }

    fn remove(&mut self, key: usize) {
        remove(&mut self.core, &mut self.ring, key);
        self.free_if_done(key);
    }

    /// For a gone connection: closes its slot once nothing else runs on
    /// it, and frees its entry once the close has completed too.
    fn free_if_done(&mut self, key: usize) {
        let conn = &mut self.core.conns[key];
        if conn.state != IoState::Gone {
            return;
        }
        close_when_idle(conn, &mut self.ring, key);
        if conn.io.close == SlotClose::Done && !conn.io.recv_armed && conn.io.send.is_none() {
            drop(self.core.conns.remove(key));
        }
    }

    fn close_slot(&mut self, slot: u32, key: usize, serial: u32) {
        let sqe = on_socket!(self.ring.plain_fds, slot, |fd| opcode::Close::new(fd)
            .build())
        .user_data(user_data(Op::Close, key, serial));
        self.ring.push(&sqe);
    }

    /// Stops accepting and starts the close handshake on every open WebSocket.
    fn begin_drain(&mut self) {
        self.stop_accepting();
        let ring = &mut self.ring;
        self.core.begin_drain(|core, key| remove(core, ring, key));
        self.free_gone();
    }

    /// Stops accepting: cancels the accepts in flight. The listener is
    /// closed once the last of them has completed (an accept that still
    /// delivers a connection has it closed at once).
    fn stop_accepting(&mut self) {
        let acc = &mut self.accept;
        acc.accepting = false;
        acc.retry_at = None;
        acc.cancel_armed(&mut self.ring);
        if !acc.any_armed() {
            acc.listener = None;
        }
    }

    /// Frees every gone entry the kernel is done with.
    fn free_gone(&mut self) {
        let keys: Vec<usize> = self
            .core
            .conns
            .iter()
            .filter(|(_, c)| c.state == IoState::Gone)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.free_if_done(key);
        }
    }

    /// Closes whatever is left, cancels every operation and waits for the
    /// kernel to let go of the memory they use.
    fn exit(&mut self) {
        let id = self.core.id;
        let open = self
            .core
            .conns
            .iter()
            .filter(|(_, c)| c.state != IoState::Gone)
            .count();
        if open > 0 {
            warn!(
                worker = id,
                left = open,
                "drain deadline passed; dropping connections"
            );
        }
        self.stop_accepting();
        let keys: Vec<usize> = self.core.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            if self.core.conns[key].state != IoState::Gone {
                self.remove(key);
            }
        }
        if self.wake_armed {
            let sqe = opcode::AsyncCancel::new(user_data(Op::Wake, NO_KEY, 0))
                .build()
                .user_data(user_data(Op::Cancel, NO_KEY, 0));
            self.ring.push(&sqe);
        }
        let deadline = Instant::now() + EXIT_WAIT;
        while (self.ring.in_flight > 0 || !self.core.conns.is_empty()) && Instant::now() < deadline
        {
            let ts = types::Timespec::from(Duration::from_millis(10));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.ring.submitter().submit_with_args(1, &args);
            self.reap();
            self.free_gone();
        }
        self.core.finish();
        if self.ring.in_flight > 0 || !self.core.conns.is_empty() {
            warn!(
                worker = id,
                in_flight = self.ring.in_flight,
                "the kernel still holds operations; leaking their memory"
            );
            // Never free what the kernel may still write to or read from.
            std::mem::forget(std::mem::take(&mut self.core.conns));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
            std::mem::forget(std::mem::take(&mut self.accept.addrs));
            let bufs = std::mem::replace(&mut self.bufs, BufRing::leaked());
            std::mem::forget(bufs);
            return;
        }
        let _ = self.ring.ring.submitter().unregister_buf_ring(BGID);
    }
}

impl BufRing {
    /// An empty stand-in for a buffer ring that had to be leaked.
    fn leaked() -> Self {
        Self {
            entries: std::ptr::null_mut(),
            map_len: 0,
            tail: 0,
            geometry: WHOLE_BUFFERS,
            offsets: Box::new([]),
            bufs: Box::new([]),
        }
    }
}

/// The connection `key` if it is still `serial` (gone ones included).
fn conn_of(core: &mut Core<Sock>, key: usize, serial: u32) -> Option<&mut Conn<Sock>> {
    core.conns.get_mut(key).filter(|c| c.serial == serial)
}

/// Closes `key`: it leaves its topics and stops counting; its receive and
/// send are cancelled, and its slot is closed once they (and a shutdown)
/// have completed. The entry is freed after the close (see
/// [`Worker::free_if_done`]).
fn remove(core: &mut Core<Sock>, ring: &mut Ring, key: usize) {
    core.retire(key);
    let conn = &mut core.conns[key];
    let serial = conn.serial;
    if conn.io.close != SlotClose::Open {
        return;
    }
    if conn.io.recv_armed {
        let sqe = opcode::AsyncCancel::new(user_data(Op::Recv, key, serial))
            .build()
            .user_data(user_data(Op::Cancel, key, serial));
        ring.push(&sqe);
    }
    if conn.io.send.is_some() {
        let sqe = opcode::AsyncCancel::new(user_data(Op::Send, key, serial))
            .build()
            .user_data(user_data(Op::Cancel, key, serial));
        ring.push(&sqe);
    }
    conn.io.close = SlotClose::Wanted;
    close_when_idle(conn, ring, key);
}

/// Submits the wanted close of `conn`'s slot once no other operation on it
/// is in flight (see [`SlotClose`]).
fn close_when_idle(conn: &mut Conn<Sock>, ring: &mut Ring, key: usize) {
    let io = &mut conn.io;
    if io.close == SlotClose::Wanted && !io.recv_armed && io.send.is_none() && !io.shutdown_pending
    {
        let sqe = on_socket!(ring.plain_fds, io.slot, |fd| opcode::Close::new(fd).build())
            .user_data(user_data(Op::Close, key, conn.serial));
        io.close = SlotClose::Pending;
        ring.push(&sqe);
    }
}

/// A ring with the flags that help a single-threaded loop, where the kernel has them.
fn build_ring() -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 2] = [
        |b| {
            b.setup_single_issuer().setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = None;
    for tweak in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(CQ_ENTRIES);
        tweak(&mut b);
        match b.build(SQ_ENTRIES) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Fixed-file table size: the kernel refuses more than RLIMIT_NOFILE.
fn fixed_table_size() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if !ok {
        return 1024;
    }
    (lim.rlim_cur.min(MAX_FIXED_FILES as u64) as u32).max(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (op, key, serial) in [
            (Op::Recv, 0, 0),
            (Op::Send, 12345, u32::MAX),
            (Op::Close, NO_KEY, 7),
        ] {
            let (o, k, s) = split_user_data(user_data(op, key, serial));
            assert_eq!((o, k, s), (op as u8, key, serial));
        }
    }

    /// The probe's whole sequence passes with either buffer geometry, so
    /// the fallback for kernels without incremental buffers is exercised
    /// here too.
    #[test]
    fn the_probe_passes_with_both_buffer_geometries() {
        for geometry in [INCREMENTAL, WHOLE_BUFFERS] {
            let mut ring = IoUring::new(8).unwrap();
            ring.submitter().register_files_sparse(4).unwrap();
            let mut bufs = BufRing::with_geometry(&ring, geometry).unwrap();
            let mut peer = Box::new(AcceptAddr::new());
            probe_loopback(&mut ring, &mut bufs, &mut peer).unwrap();
            ring.submitter().unregister_buf_ring(BGID).unwrap();
        }
    }

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
        ring.submitter().unregister_buf_ring(BGID).unwrap();
    }

    /// `peer_ip` reads what the kernel writes for each family, and nothing
    /// from an address too short for its family or of another family.
    #[test]
    fn peer_ip_reads_both_families() {
        for want in [
            "127.0.0.2:4000".parse::<std::net::SocketAddr>().unwrap(),
            "[2001:db8::7]:4000".parse().unwrap(),
            "[::ffff:10.1.2.3]:4000".parse().unwrap(),
        ] {
            let sa = socket2::SockAddr::from(want);
            let mut a = AcceptAddr::new();
            // SAFETY: `sa.len()` bytes fit in a sockaddr_storage.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sa.as_ptr().cast::<u8>(),
                    (&raw mut a.addr).cast::<u8>(),
                    sa.len() as usize,
                )
            };
            assert_eq!(peer_ip(&a.addr, sa.len()), Some(want.ip()));
            assert_eq!(peer_ip(&a.addr, sa.len() - 1), None);
        }
        assert_eq!(peer_ip(&AcceptAddr::new().addr, AcceptAddr::CAPACITY), None);
    }
}
