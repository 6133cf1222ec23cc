//! The worker's accepts and where each writes its peer's address.
//!
//! Each accept slot `i` owns entry `i` of a boxed address array: the
//! kernel's from the arming of accept `i` until its completion (every
//! accept posts exactly one, also when cancelled), and only then read.

use super::Worker;
use super::conn::Sock;
use super::ring::{NO_KEY, Op, Ring, user_data};
use crate::proto::handshake::{Reject, Status, error_response};
use crate::server::admission::Refusal;
use crate::server::backend::{accept_exhausted, is_resource_exhaustion};
use crate::server::steering;
use io_uring::{opcode, types};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::time::Instant;
use tracing::debug;

/// Single-shot accepts each worker keeps in flight. Each completion takes
/// one connection and its slot is re-armed at the top of the next turn, so
/// this bounds the connections a worker takes per turn: 32 keeps up with a
/// load generator's 256 handshakes in flight on two workers (see
/// docs/BENCHMARKS.md, handshakes) for 32 × 136 bytes of address buffers.
pub const ACCEPTS_IN_FLIGHT: usize = 32;

/// The accept slot that takes clients the table has no room for: armed
/// (as a plain, non-direct accept) only while every slot of the fixed-file
/// table is in use. A worker that fills up is steered away from, but its
/// listener's backlog (up to `net.core.somaxconn`, 4 096 by default) may
/// still hold clients that would otherwise wait there until they time
/// out; each is answered `503` with `Retry-After: 1` and closed at once,
/// and its retry goes to a worker with room.
const REFUSE: usize = ACCEPTS_IN_FLIGHT;

/// Where one accept writes its peer's address. `repr(C)` and boxed in
/// [`Acceptor::addrs`]: the kernel holds pointers to both fields from the
/// accept's submission until its completion.
#[repr(C)]
pub(super) struct AcceptAddr {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl AcceptAddr {
    /// What `len` says before an accept: the room in `addr`.
    const CAPACITY: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as _;

    pub(super) fn new() -> Self {
        Self {
            // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
            addr: unsafe { std::mem::zeroed() },
            len: 0,
        }
    }

    /// An accept on `listener` that writes its peer's address here. The
    /// entry points into `self`: it must stay where it is, and not be read
    /// or written, until the accept's completion.
    pub(super) fn accept(&mut self, listener: types::Fd) -> opcode::Accept {
        self.len = Self::CAPACITY;
        opcode::Accept::new(listener, (&raw mut self.addr).cast(), &raw mut self.len)
    }

    /// The peer address an accept reported (read after its completion).
    pub(super) fn peer(&self) -> Option<IpAddr> {
        peer_ip(&self.addr, self.len)
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

/// The worker's accepts: [`ACCEPTS_IN_FLIGHT`] single-shot accepts, each
/// with its own address buffer, re-armed as they complete.
pub(super) struct Acceptor {
    /// One per accept slot; allocated once, never resized or moved (the
    /// kernel writes into an armed slot's entry), leaked at exit if an
    /// accept is still in flight.
    addrs: Box<[AcceptAddr]>,
    /// Slot `i` has an accept in flight ([`REFUSE`] the refusing one).
    armed: [bool; ACCEPTS_IN_FLIGHT + 1],
    /// The refusing accept was cancelled (the table has room again) and
    /// has not completed yet.
    refuse_cancelled: bool,
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
    /// Reported full to the listener group's steering (see
    /// [`steering`](crate::server::steering)): new connections go elsewhere.
    full: bool,
}

impl Acceptor {
    /// Accepts on `listener` into a fixed-file table of `table` slots
    /// (`u32::MAX` with plain descriptors: no table to fill).
    pub(super) fn new(listener: TcpListener, table: u32) -> Self {
        let addrs = (0..=REFUSE).map(|_| AcceptAddr::new()).collect();
        Self {
            addrs,
            armed: [false; ACCEPTS_IN_FLIGHT + 1],
            refuse_cancelled: false,
            listener: Some(listener),
            accepting: true,
            retry_at: None,
            probing: false,
            table,
            slots_used: 0,
            full: false,
        }
    }

    /// Whether the table just became full (`Some(true)`) or has room again
    /// (`Some(false)`), with hysteresis; `None` when that did not change.
    pub(super) fn fullness_changed(&mut self) -> Option<bool> {
        if self.table == u32::MAX || !self.accepting {
            return None;
        }
        let free = self.table.saturating_sub(self.slots_used);
        let full = if self.full {
            free < steering::room_above(self.table)
        } else {
            free < steering::full_below(self.table)
        };
        (full != self.full).then(|| {
            self.full = full;
            full
        })
    }

    /// The listener, while it is open.
    pub(super) fn listener(&self) -> Option<&TcpListener> {
        self.listener.as_ref()
    }

    /// Whether every slot of the fixed-file table is in use.
    pub(super) fn table_full(&self) -> bool {
        self.slots_used >= self.table
    }

    /// Arms every idle accept slot, unless accepting stopped or is
    /// paused after running out of resources; and the refusing one while
    /// the table is full and new connections are `steered_away` from this
    /// worker (see [`REFUSE`]).
    pub(super) fn arm(&mut self, ring: &mut Ring, steered_away: bool) {
        if !self.accepting || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.retry_at = None;
        let Some(listener) = &self.listener else {
            return;
        };
        let fd = listener.as_raw_fd();
        let mut armed = self.armed.iter().filter(|&&a| a).count();
        let free = self.table.saturating_sub(self.slots_used) as usize;
        let want = if self.probing { 1 } else { ACCEPTS_IN_FLIGHT }.min(free);
        for i in 0..ACCEPTS_IN_FLIGHT {
            if armed >= want {
                break;
            }
            if self.armed[i] {
                continue;
            }
            // Non-blocking sockets: an operation that cannot complete waits
            // on the ring's internal poll, never in a blocking call on an
            // io-wq thread.
            let accept = self.addrs[i].accept(types::Fd(fd));
            let accept = if ring.plain_fds() {
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
            // SAFETY: the accept writes into `addrs[i]`, an entry of a boxed
            // slice never resized or moved and leaked at exit while an
            // accept is in flight; `armed[i]`, set below, keeps it from
            // being re-armed or read (`peer`) before this accept completes.
            unsafe { ring.push(&sqe) };
            ring.in_flight_started();
            self.armed[i] = true;
            armed += 1;
        }
        self.arm_refusal(ring, fd, free == 0 && steered_away);
    }

    /// Arms the refusing accept while `refusing` (not while probing after
    /// running out of resources: that pause covers it too), and cancels it
    /// once not.
    fn arm_refusal(&mut self, ring: &mut Ring, fd: i32, refusing: bool) {
        if ring.plain_fds() {
            return;
        }
        if !refusing {
            if self.armed[REFUSE] && !self.refuse_cancelled {
                self.refuse_cancelled = true;
                cancel(ring, REFUSE);
            }
            return;
        }
        if self.armed[REFUSE] || self.probing {
            return;
        }
        let sqe = self.addrs[REFUSE]
            .accept(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, NO_KEY, REFUSE as u32));
        // SAFETY: as for the other accepts: `addrs[REFUSE]` stays where it
        // is, and `armed[REFUSE]` keeps it from being re-armed, until this
        // accept completes.
        unsafe { ring.push(&sqe) };
        ring.in_flight_started();
        self.armed[REFUSE] = true;
    }

    /// Stops accepting: cancels the accepts in flight. The listener is
    /// closed once the last of them has completed (an accept that still
    /// delivers a connection has it closed at once).
    pub(super) fn stop(&mut self, ring: &mut Ring) {
        self.accepting = false;
        self.retry_at = None;
        self.cancel_armed(ring);
        if !self.any_armed() {
            self.listener = None;
        }
    }

    fn any_armed(&self) -> bool {
        self.armed.iter().any(|&a| a)
    }

    /// Cancels every armed accept; each still reports through its own
    /// completion (a connection, an error, or `ECANCELED`).
    fn cancel_armed(&self, ring: &mut Ring) {
        for (i, _) in self.armed.iter().enumerate().filter(|(_, a)| **a) {
            cancel(ring, i);
        }
    }

    /// The peer address accept `i` reported (read after its completion).
    fn peer(&self, i: usize) -> Option<IpAddr> {
        self.addrs[i].peer()
    }

    /// Out of resources: nothing is re-armed before this.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The close of an accepted direct descriptor completed: its slot of
    /// the fixed-file table is free again (every accepted slot is closed
    /// exactly once).
    pub(super) fn slot_closed(&mut self) {
        self.slots_used = self.slots_used.saturating_sub(1);
    }

    /// Leaks the address buffers: an accept still in flight at exit may
    /// write into them.
    pub(super) fn leak_addrs(&mut self) {
        std::mem::forget(std::mem::take(&mut self.addrs));
    }
}

/// Cancels accept slot `i`; it still reports through its own completion.
fn cancel(ring: &mut Ring, i: usize) {
    let sqe = opcode::AsyncCancel::new(user_data(Op::Accept, NO_KEY, i as u32))
        .build()
        .user_data(user_data(Op::Cancel, NO_KEY, 0));
    // SAFETY: a cancel names no memory, only the `user_data` of what it cancels.
    unsafe { ring.push(&sqe) };
}

/// Answers a client the worker has no room for (`fd`, a plain descriptor
/// from the refusing accept) with `503` and closes it. What the client
/// already sent is read first, so that the close is a FIN after the answer
/// and not a reset that could discard it; anything it sends later is not
/// waited for. A fresh socket's send buffer takes the ~200-byte answer
/// whole, so nothing here blocks.
fn refuse(fd: i32) {
    let answer = error_response(Reject::new(
        Status::ServiceUnavailable,
        Refusal::WorkerFull.reason(),
    ));
    let mut sink = [0u8; 2048];
    // SAFETY: `fd` is a socket this worker owns (just accepted, closed
    // below and nowhere else); the buffers are valid for their lengths.
    unsafe {
        for _ in 0..4 {
            let n = libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT);
            if n < sink.len() as isize {
                break;
            }
        }
        libc::send(
            fd,
            answer.as_ptr().cast(),
            answer.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        libc::shutdown(fd, libc::SHUT_WR);
        libc::close(fd);
    }
}

impl Worker {
    /// Tells the listener group's steering when this worker's table
    /// becomes full or has room again.
    pub(super) fn steer(&mut self) {
        let changed = self.accept.fullness_changed();
        let Some(listener) = self.accept.listener() else {
            return;
        };
        let steering = &self.core.shared().steering;
        match changed {
            Some(full) => steering.set_full(self.core.id(), full, listener),
            None => steering.retry(self.core.id(), listener),
        }
    }

    /// Accept slot `i` completed: `res` is the new connection's slot or an error.
    pub(super) fn on_accept(&mut self, i: usize, res: i32) {
        let Some(armed) = self.accept.armed.get_mut(i) else {
            return;
        };
        *armed = false;
        self.ring.in_flight_ended();
        if !self.accept.accepting && !self.accept.any_armed() {
            // The last accept has ended: nothing names the listener any more.
            self.accept.listener = None;
        }
        if i == REFUSE {
            self.accept.refuse_cancelled = false;
            if res >= 0 {
                if self.accept.accepting {
                    self.core.stats().connection_refused(Refusal::WorkerFull);
                }
                refuse(res);
                return;
            }
        }
        if res >= 0 {
            let slot = res as u32;
            if !self.ring.plain_fds() {
                self.accept.slots_used += 1;
            }
            if !self.accept.accepting || self.core.vacant_key() >= NO_KEY {
                // Draining (or out of keys): not taken.
                self.close_slot(slot, NO_KEY, 0);
                return;
            }
            self.accept.probing = false;
            let peer = self.accept.peer(i);
            let key = self.core.admit(Sock::new(slot), peer);
            self.start_tls(key);
            if Self::wants_recv(self.core.conn(key)) {
                self.arm_recv(key);
            }
            // Full now? Then new connections go elsewhere at once, not a
            // turn later.
            self.steer();
            return;
        }
        let errno = -res;
        if errno == libc::ECANCELED {
            return;
        }
        self.core.stats().accept_error();
        if is_resource_exhaustion(errno) {
            // ENFILE here is usually the fixed-file table: full until
            // connections close. The other armed accepts are cancelled:
            // each would fail too (a direct one after taking a connection
            // off the backlog, and dropping it). After the pause one accept
            // probes; the rest are armed once one succeeds.
            let acc = &mut self.accept;
            if acc.retry_at.is_none() {
                acc.retry_at = Some(accept_exhausted(self.core.id(), errno, self.core.now()));
                acc.probing = true;
                acc.cancel_armed(&mut self.ring);
            }
        } else {
            let e = io::Error::from_raw_os_error(errno);
            debug!(worker = self.core.id(), error = %e, "accept failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
