//! The receive path: a multishot receive per connection, its bytes to the core.

use super::Worker;
use super::bufring::{BGID, RESERVE_BGID, RESERVE_RECV_BYTES};
use super::conn::{Sock, conn_of};
use super::ring::{Op, on_socket, user_data};
use crate::server::worker::{Conn, Header, Input, IoState};
use io_uring::{cqueue, opcode, squeue};
use std::collections::VecDeque;
use tracing::warn;

/// The buffer group a receive's bytes are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Group {
    /// The shared buffers every multishot receive draws from.
    Shared,
    /// The reserve, for starved connections ([`Worker::serve_starved`]).
    Reserve,
}

/// The buffer ring of `$group` in worker `$w` (a field borrow, so that
/// the core stays usable beside the bytes).
macro_rules! bufs {
    ($w:expr, $group:expr) => {
        match $group {
            Group::Shared => &mut $w.bufs,
            Group::Reserve => &mut $w.reserve,
        }
    };
}
pub(super) use bufs;

/// The flags of a receive from the reserve: it completes at once, with
/// what is there or `EAGAIN`, never waiting on the socket with a reserve
/// buffer to take.
pub(super) const RESERVE_RECV_FLAGS: i32 = libc::MSG_DONTWAIT;

/// Entries the starved queue keeps room for once empty (16 B each).
const STARVED_KEPT: usize = 1024;

/// What a pass of the starved queue does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The entry leaves the queue.
    Leave,
    /// Its multishot receive is armed again on the shared buffers; the
    /// entry keeps its place.
    Rearm,
    /// A receive from the reserve; the entry leaves the queue.
    Reserve,
}

/// Decides for one entry of the starved queue, from its connection's
/// socket state, whether the connection reads (armed or not), and whether
/// the reserve has room left this turn; its `STARVED` and `QUEUED` bits
/// follow. It leaves if it read since it starved, if it reads no more
/// (paused or closing: armed as usual when it reads again), or if the
/// receive the last pass armed is still armed: that receive neither read
/// nor found the buffers used up, so the connection is quiet and the
/// shared buffers will serve it (a connection that starves again takes a
/// new place at the back).
pub(super) fn pass(io: &mut Sock, reads: bool, room: bool) -> Pass {
    if !io.starved() || io.recv_armed() || !reads {
        io.unqueue();
        Pass::Leave
    } else if room {
        io.unqueue();
        Pass::Reserve
    } else {
        Pass::Rearm
    }
}

/// `IORING_RECVSEND_POLL_FIRST` (`include/uapi/linux/io_uring.h`, since
/// Linux 5.19), a receive's `ioprio` flag: the receive waits until the
/// socket is readable before it is tried, so before it picks a buffer
/// (the io-uring crate has the constant in its private `sys` module).
const RECVSEND_POLL_FIRST: u16 = 1;

/// `sqe` with [`RECVSEND_POLL_FIRST`] added to its `ioprio` (the io-uring
/// crate's `RecvMulti` builder sets `ioprio` to multishot and exposes no
/// other flag).
///
/// Without it, a receive armed while its buffer group is empty fails at
/// once with `ENOBUFS`: the kernel picks a buffer before it looks at the
/// socket. A quiet connection re-armed from the starved queue while a
/// flood keeps the shared buffers empty would then starve again turn
/// after turn, never quiet long enough to leave the queue; with it, the
/// receive waits for the connection's data, and the entry leaves.
pub(super) fn poll_first(mut sqe: squeue::Entry) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte
    // `struct io_uring_sqe` (its size checked above), whose `ioprio` is the
    // `u16` at byte 2, after `opcode: u8` and `flags: u8`; read and written
    // unaligned, inside `sqe`, which we own.
    unsafe {
        let ioprio = (&raw mut sqe).cast::<u8>().add(2).cast::<u16>();
        ioprio.write_unaligned(ioprio.read_unaligned() | RECVSEND_POLL_FIRST);
    }
    sqe
}

impl Worker {
    /// Arms `key`'s multishot receive.
    pub(super) fn arm_recv(&mut self, key: usize) {
        self.arm_recv_with(key, false);
    }

    /// Arms `key`'s multishot receive, waiting for the socket to be
    /// readable before it picks a buffer if `wait_for_data`
    /// ([`poll_first`]).
    fn arm_recv_with(&mut self, key: usize, wait_for_data: bool) {
        let conn = self.core.conn_mut(key);
        debug_assert!(!conn.io().recv_armed());
        let sqe = on_socket!(self.ring.plain_fds(), conn.io().slot(), |fd| {
            opcode::RecvMulti::new(fd, BGID).build()
        });
        let sqe = if wait_for_data { poll_first(sqe) } else { sqe };
        let sqe = sqe.user_data(user_data(Op::Recv, key, conn.serial()));
        conn.io_mut().set_recv_armed(true);
        // SAFETY: a receive from group BGID names no memory of its own; the
        // group's buffers (`self.bufs`) stay mapped and registered until the
        // exit, which unregisters them only once no receive is in flight
        // and leaks them otherwise.
        unsafe { self.ring.push(&sqe) };
        self.ring.in_flight_started();
    }

    /// Should `conn` have a receive armed? Not while it waits in the
    /// starved queue (armed from there, [`Self::serve_starved`]).
    pub(super) fn wants_recv(conn: &Conn<Sock>) -> bool {
        !conn.io().starved() && !conn.io().recv_armed() && Self::reads(conn)
    }

    /// Does `conn` read (whether or not a receive is armed)?
    fn reads(conn: &Conn<Sock>) -> bool {
        !conn.peer_eof()
            && match conn.state() {
                IoState::Active => !conn.read_paused(),
                IoState::Lingering => true,
                IoState::Closing | IoState::Gone => false,
            }
    }

    /// A connection's receive found no buffer (`ENOBUFS`): it joins the
    /// starved queue, at the back unless it is in it already (its place is
    /// kept while it waits, even if it read in between).
    fn starve(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        if conn.io_mut().starve() {
            let serial = conn.serial();
            self.starved.push_back((key, serial));
        }
    }

    /// Serves the starved queue, in order, just before the turn's wait:
    /// - the first [`BufRing::recvs_per_turn`](super::bufring::BufRing::recvs_per_turn)
    ///   get a single-shot, non-blocking receive of at most
    ///   [`RESERVE_RECV_BYTES`] from the reserve and leave the queue (their
    ///   multishot receive is armed again on the shared buffers once it
    ///   completes). Issued at the wait's submit, while the reserve is
    ///   full (no multishot receive draws from it, and the last turn's
    ///   reserve receives completed at once and gave their buffers back),
    ///   so each gets its bytes;
    /// - the others get their multishot receive on the shared buffers armed
    ///   again, waiting for data before it picks a buffer ([`poll_first`]),
    ///   and keep their place: one that finds a buffer leaves the queue,
    ///   one that finds none again waits where it was, and one still
    ///   waiting for data at the next pass leaves (quiet).
    ///
    /// A flood that takes every shared buffer as soon as it comes back (its
    /// receives run in the kernel whenever its data arrives) thus cannot
    /// keep a connection from being read for more than ⌈place / 16⌉ turns.
    /// Each entry is looked at once a turn ([`pass`]); those of connections
    /// gone, paused, read since, or whose receive armed from here neither
    /// read nor failed (quiet: the shared buffers serve it), leave.
    pub(super) fn serve_starved(&mut self) {
        let mut room = self.reserve.recvs_per_turn();
        self.reserve_short = false;
        for _ in 0..self.starved.len() {
            let Some((key, serial)) = self.starved.pop_front() else {
                break;
            };
            let Some(conn) = conn_of(&mut self.core, key, serial) else {
                continue;
            };
            let reads = Self::reads(conn);
            match pass(conn.io_mut(), reads, room > 0) {
                Pass::Leave => {}
                Pass::Rearm => {
                    self.reserve_short = true;
                    self.starved.push_back((key, serial));
                    // Waits for data: armed while the flood keeps the
                    // shared buffers empty, it would fail at once.
                    self.arm_recv_with(key, true);
                }
                Pass::Reserve => {
                    room -= 1;
                    self.recv_from_reserve(key);
                }
            }
        }
        if self.starved.is_empty() && self.starved.capacity() > STARVED_KEPT {
            // After a flood that starved thousands: not kept at its peak.
            self.starved = VecDeque::new();
        }
    }

    /// Pushes `key`'s single-shot, non-blocking receive of at most
    /// [`RESERVE_RECV_BYTES`] from the reserve.
    fn recv_from_reserve(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        let sqe = on_socket!(self.ring.plain_fds(), conn.io().slot(), |fd| {
            opcode::Recv::new(fd, std::ptr::null_mut(), RESERVE_RECV_BYTES as u32)
                .buf_group(RESERVE_BGID)
                .flags(RESERVE_RECV_FLAGS)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        })
        .user_data(user_data(Op::RecvReserve, key, conn.serial()));
        conn.io_mut().set_recv_armed(true);
        // SAFETY: a receive with BUFFER_SELECT names no memory of its
        // own: it writes into a buffer of group RESERVE_BGID
        // (`self.reserve`), which stays mapped and registered until
        // the exit, as the shared group does (see `arm_recv`).
        unsafe { self.ring.push(&sqe) };
        self.ring.in_flight_started();
    }

    /// A receive completion for `key` (from the shared buffers' multishot
    /// receive, or a starved connection's receive from the reserve): bytes
    /// for the core (held while reading is paused), the peer's end of
    /// stream, or an error; re-arms the multishot receive if it ended and
    /// the connection still reads, or queues it as starved if it found no
    /// buffer.
    pub(super) fn on_recv(&mut self, key: usize, serial: u32, res: i32, flags: u32, group: Group) {
        let bid = cqueue::buffer_select(flags);
        let buf_more = cqueue::buffer_more(flags);
        let len = res.max(0) as usize;
        let Some(conn) = conn_of(&mut self.core, key, serial) else {
            // Cannot happen (entries outlive their operations); the buffer is accounted for regardless.
            if let Some(bid) = bid {
                bufs!(self, group).consumed(bid, len, buf_more);
            }
            return;
        };
        if !cqueue::more(flags) {
            conn.io_mut().set_recv_armed(false);
            self.ring.in_flight_ended();
        }
        let state = conn.state();
        if res > 0 {
            // Read: no longer starved (its queue entry, if any, leaves
            // when next looked at, unless it starves again first).
            conn.io_mut().set_starved(false);
            if group == Group::Reserve {
                self.core.stats().receive_starved();
            }
            let conn = self.core.conn_mut(key);
            match bid {
                Some(bid) => {
                    // A closing or lingering connection reads nothing more: discarded.
                    if state == IoState::Active {
                        let paused = conn.read_paused();
                        if conn.awaits_proxy() {
                            self.proxy_received(key, group, bid, len);
                        } else if self.tls.get(&key).is_some_and(|t| !t.failed()) {
                            self.tls_received(key, group, bid, len, paused);
                        } else if paused {
                            // Received before the pause took effect: not
                            // processed while paused (a paced publisher,
                            // backpressure, a publisher waiting for its
                            // answer), kept for the resume, charged to the
                            // budget now; the receive is stopped.
                            conn.hold(bufs!(self, group).data(bid, len));
                            conn.io_mut().set_held(true);
                            self.core.charge_held(key);
                            self.after_core_input(key, Input::Stop);
                        } else {
                            self.input(key, group, bid, len);
                        }
                    }
                    bufs!(self, group).consumed(bid, len, buf_more);
                }
                None => {
                    // A receive with data always names its buffer; if a kernel
                    // ever did otherwise, the stream is lost: close, don't panic.
                    warn!(
                        worker = self.core.id(),
                        "receive completion without a buffer"
                    );
                    if state != IoState::Gone {
                        self.remove(key);
                    }
                }
            }
        } else {
            if let Some(bid) = bid {
                bufs!(self, group).consumed(bid, 0, buf_more);
            }
            match (res, state) {
                (_, IoState::Gone) => {}
                (0, IoState::Active) => {
                    self.core.eof(key);
                    self.core.after_input(key);
                }
                (0, IoState::Closing) => self.core.peer_closed(key),
                (0, IoState::Lingering) => self.remove(key),
                (e, IoState::Active | IoState::Lingering) if -e == libc::ENOBUFS => {
                    self.starve(key)
                }
                // A reserve receive that found nothing (the bytes went to
                // an earlier receive); a cancelled one; no buffer for a
                // connection that reads no more (closing).
                (e, _) if [libc::EAGAIN, libc::ECANCELED, libc::ENOBUFS].contains(&-e) => {}
                (_, _) => self.remove(key),
            }
        }
        let conn = self.core.conn(key);
        if conn.state() == IoState::Gone {
            self.free_if_done(key);
        } else if Self::wants_recv(conn) {
            // After a receive from the reserve the shared buffers are
            // likely still empty, so a multishot receive armed now fails
            // at once and the connection starves again: served from the
            // reserve next turn whether it has data or not, which costs
            // nothing while the reserve has room for every entry and
            // reads a connection that is waiting for its answer as soon as
            // it sends. Once the reserve is short, every such poll takes
            // a place from a connection with data: it waits for its data.
            self.arm_recv_with(key, group == Group::Reserve && self.reserve_short);
        }
    }

    /// Feeds the input held while reading was paused to the core.
    pub(super) fn input_held(&mut self, key: usize) {
        self.core.conn_mut(key).io_mut().set_held(false);
        if self.is_tls(key) {
            // What was held is ciphertext, in the session.
            self.pump_tls(key);
            return;
        }
        let kept = self.restore_pending(key);
        let verdict = self.core.input(key, &mut self.scratch[..kept]);
        self.after_core_input(key, verdict);
    }

    /// Copies `key`'s pending bytes to the front of the scratch buffer
    /// (grown if held input made them longer than it); returns how many.
    pub(super) fn restore_pending(&mut self, key: usize) -> usize {
        let conn = self.core.conn_mut(key);
        if self.scratch.len() < conn.pending_len() {
            self.scratch.resize(conn.pending_len(), 0);
        }
        conn.restore_pending(&mut self.scratch)
    }

    /// `len` bytes of receive buffer `bid` of `group` for a connection
    /// whose PROXY protocol header has not been taken: judged with what an
    /// earlier receive kept (at most
    /// [`MAX_HEADER`](crate::proto::proxy::MAX_HEADER) bytes), then what
    /// follows the header goes to TLS or the core.
    fn proxy_received(&mut self, key: usize, group: Group, bid: u16, len: usize) {
        let kept = self.restore_pending(key);
        let n = kept + len;
        if self.scratch.len() < n {
            self.scratch.resize(n, 0);
        }
        self.scratch[kept..n].copy_from_slice(bufs!(self, group).data(bid, len));
        match self.core.proxy_header(key, &self.scratch[..n]) {
            Header::Wait => {
                let data = bufs!(self, group).data(bid, len);
                self.core.conn_mut(key).hold(data);
            }
            Header::Done(h) if self.is_tls(key) => {
                let rest = self.scratch[h..n].to_vec();
                self.tls_after_proxy(key, &rest);
            }
            Header::Done(h) if h < n => {
                let verdict = self.core.input(key, &mut self.scratch[h..n]);
                self.after_core_input(key, verdict);
            }
            Header::Done(_) => self.core.after_input(key),
            Header::Refused => {
                self.tls_refused(key);
                self.core.after_input(key);
            }
        }
    }

    /// Feeds `len` bytes of receive buffer `bid` of `group` to the core.
    fn input(&mut self, key: usize, group: Group, bid: u16, len: usize) {
        let kept = self.restore_pending(key);
        let data = bufs!(self, group).data(bid, len);
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
    pub(super) fn after_core_input(&mut self, key: usize, verdict: Input) {
        let conn = self.core.conn(key);
        if verdict == Input::Stop && conn.read_paused() && conn.io().recv_armed() {
            // Backpressure: stop the multishot receive; re-armed when unpaused.
            let sqe = opcode::AsyncCancel::new(user_data(Op::Recv, key, conn.serial()))
                .build()
                .user_data(user_data(Op::Cancel, key, conn.serial()));
            // SAFETY: a cancel names no memory, only the `user_data` of what it cancels.
            unsafe { self.ring.push(&sqe) };
        }
        self.core.after_input(key);
    }
}

#[cfg(test)]
mod tests {
    use super::{Pass, Sock, pass, poll_first};
    use io_uring::{opcode, types};

    /// `poll_first` adds `IORING_RECVSEND_POLL_FIRST` (1) to the entry's
    /// `ioprio` (bytes 2-3), beside the builder's `IORING_RECV_MULTISHOT`
    /// (2), and changes no other byte. (The kernel-side behaviour is in
    /// `bufring.rs`'s starved receive test.)
    #[test]
    fn poll_first_sets_only_its_ioprio_bit() {
        let bytes = |e: &io_uring::squeue::Entry| -> [u8; 64] {
            // SAFETY: an `Entry` is 64 plain bytes (`#[repr(C)]` around
            // `io_uring_sqe`, checked in `poll_first`); copied out.
            unsafe { std::mem::transmute_copy(e) }
        };
        let sqe = opcode::RecvMulti::new(types::Fd(7), 3).build().user_data(9);
        let before = bytes(&sqe);
        let after = bytes(&poll_first(sqe));
        assert_eq!(u16::from_ne_bytes([before[2], before[3]]), 2);
        assert_eq!(u16::from_ne_bytes([after[2], after[3]]), 3);
        let rest = |b: &[u8; 64]| [&b[..2], &b[4..]].concat();
        assert_eq!(rest(&before), rest(&after));
    }

    /// A connection that reads and starves again before its entry is
    /// looked at keeps its one entry and its place; one whose receive,
    /// armed from the queue, neither read nor failed leaves; one served
    /// from the reserve, or that reads no more, leaves. (a2c9faf pushed a
    /// new entry at each starve after a read: N flooders behind the
    /// reserve's 16 grew the queue by about N a turn, every entry walked
    /// each turn; and quiet connections stayed in it until they read.)
    #[test]
    fn a_starved_connection_has_one_entry_and_leaves_when_served_or_quiet() {
        let mut io = Sock::new(0);
        let mut entries = 0;
        let starve = |io: &mut Sock, entries: &mut i32| {
            io.set_recv_armed(false);
            if io.starve() {
                *entries += 1;
            }
        };
        starve(&mut io, &mut entries);
        assert_eq!(entries, 1);
        // No room in the reserve: armed again, the entry kept.
        assert_eq!(pass(&mut io, true, false), Pass::Rearm);
        io.set_recv_armed(true);
        // It reads, then finds no buffer again, before the next pass.
        io.set_starved(false);
        starve(&mut io, &mut entries);
        assert_eq!(entries, 1, "one entry, its place kept");
        assert_eq!(pass(&mut io, true, false), Pass::Rearm);
        io.set_recv_armed(true);
        // Its receive neither read nor failed by the next pass: quiet.
        assert_eq!(pass(&mut io, true, false), Pass::Leave);
        assert!(!io.starved());
        starve(&mut io, &mut entries);
        assert_eq!(entries, 2, "a new entry once the old one left");
        // Served from the reserve: leaves.
        assert_eq!(pass(&mut io, true, true), Pass::Reserve);
        assert!(!io.starved());
        io.set_recv_armed(true);
        starve(&mut io, &mut entries);
        assert_eq!(entries, 3);
        // Read since it starved (entry looked at afterwards): leaves.
        io.set_starved(false);
        assert_eq!(pass(&mut io, true, true), Pass::Leave);
        starve(&mut io, &mut entries);
        assert_eq!(entries, 4);
        // Paused or closing: leaves, not starved.
        assert_eq!(pass(&mut io, false, true), Pass::Leave);
        assert!(!io.starved());
    }
}
