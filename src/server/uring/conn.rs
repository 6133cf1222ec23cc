//! A connection's socket state, and how a connection closes.

use super::Worker;
use super::ring::{Op, Ring, on_socket, user_data};
use crate::server::worker::{Conn, Core, IoState};
use io_uring::opcode;

/// A connection's handle: its direct descriptor and the operations in flight.
///
/// Its connection stays in the slab (state `Gone` once removed) until the
/// close of `slot` and every other operation on it have completed
/// ([`Worker::free_if_done`]): a receive's completion names its entry, and
/// an in-flight send's data is the connection's queue (its arguments, for
/// a vectored send, are in the worker's `send_ops` under the same key).
pub(in crate::server) struct Sock {
    /// Index in the ring's fixed-file table (with plain descriptors: the
    /// process descriptor).
    slot: u32,
    /// [`RECV_ARMED`], [`SEND_SINGLE`], [`SEND_VECTORED`],
    /// [`SHUTDOWN_PENDING`], [`HELD`], [`STARVED`], [`QUEUED`]: bits, so that the handle stays
    /// 8 bytes (every connection carries one).
    flags: u8,
    /// Where closing `slot` stands.
    close: SlotClose,
}

/// A multishot receive is armed.
const RECV_ARMED: u8 = 1;
/// A single-buffer send is in flight (it names only the queue's pinned
/// front, no arguments of its own).
const SEND_SINGLE: u8 = 2;
/// A `shutdown(SHUT_WR)` is in flight.
const SHUTDOWN_PENDING: u8 = 4;
/// Input that arrived while reading was paused (a multishot receive can
/// complete after its cancel was submitted) is kept, unprocessed, in the
/// session's pending bytes; fed to the core on resume.
const HELD: u8 = 8;
/// A vectored send is in flight; its `SendOp` is in the worker's
/// `send_ops`, keyed by this connection's slab key.
const SEND_VECTORED: u8 = 16;
/// Its receive found the shared buffers used up (`ENOBUFS`) and has not
/// read since: the worker's starved queue serves it (a receive from the
/// reserve, or its multishot receive armed again); no other path re-arms
/// it meanwhile.
const STARVED: u8 = 32;
/// It has an entry in the worker's starved queue (at most one: a
/// connection that reads and starves again before its entry is looked at
/// keeps that entry, and its place).
const QUEUED: u8 = 64;

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

impl Sock {
    /// The socket accepted into `slot`, nothing in flight yet.
    pub(super) fn new(slot: u32) -> Self {
        Self {
            slot,
            flags: 0,
            close: SlotClose::Open,
        }
    }

    fn set(&mut self, bit: u8, on: bool) {
        if on {
            self.flags |= bit;
        } else {
            self.flags &= !bit;
        }
    }

    /// Index in the ring's fixed-file table (with plain descriptors: the
    /// process descriptor).
    pub(super) fn slot(&self) -> u32 {
        self.slot
    }

    /// A multishot receive is armed.
    pub(super) fn recv_armed(&self) -> bool {
        self.flags & RECV_ARMED != 0
    }

    /// A multishot receive was pushed (`true`) or has posted its last
    /// completion (`false`).
    pub(super) fn set_recv_armed(&mut self, armed: bool) {
        self.set(RECV_ARMED, armed);
    }

    /// A send is in flight.
    pub(super) fn sending(&self) -> bool {
        self.flags & (SEND_SINGLE | SEND_VECTORED) != 0
    }

    /// A vectored send is pushed (its arguments kept by the worker until
    /// [`Self::send_ended`]).
    pub(super) fn vectored_send_started(&mut self) {
        self.set(SEND_VECTORED, true);
    }

    /// A single-buffer send is pushed.
    pub(super) fn single_send_started(&mut self) {
        self.set(SEND_SINGLE, true);
    }

    /// The send's completion was reaped; whether it was vectored (its
    /// arguments are then free again).
    pub(super) fn send_ended(&mut self) -> bool {
        let vectored = self.flags & SEND_VECTORED != 0;
        self.set(SEND_SINGLE | SEND_VECTORED, false);
        vectored
    }

    /// A `shutdown(SHUT_WR)` was pushed.
    pub(super) fn shutdown_started(&mut self) {
        self.set(SHUTDOWN_PENDING, true);
    }

    /// The shutdown's completion was reaped.
    pub(super) fn shutdown_ended(&mut self) {
        self.set(SHUTDOWN_PENDING, false);
    }

    /// The close of `slot` completed: the slot may already hold another
    /// connection.
    pub(super) fn close_ended(&mut self) {
        self.close = SlotClose::Done;
    }

    /// Waits in the worker's starved queue.
    pub(super) fn starved(&self) -> bool {
        self.flags & STARVED != 0
    }

    /// Starved (`true`), or read since.
    pub(super) fn set_starved(&mut self, starved: bool) {
        self.set(STARVED, starved);
    }

    /// Its receive found no shared buffer: starved from now on; `true` if
    /// it needs an entry in the starved queue (it has none yet).
    pub(super) fn starve(&mut self) -> bool {
        self.set(STARVED, true);
        let join = self.flags & QUEUED == 0;
        self.set(QUEUED, true);
        join
    }

    /// Its entry leaves the starved queue, and it is no longer starved.
    pub(super) fn unqueue(&mut self) {
        self.set(STARVED | QUEUED, false);
    }

    /// Input that arrived while reading was paused is kept for the resume.
    pub(super) fn held(&self) -> bool {
        self.flags & HELD != 0
    }

    /// Input is kept for the resume (`true`), or was fed to the core.
    pub(super) fn set_held(&mut self, held: bool) {
        self.set(HELD, held);
    }
}

impl Worker {
    /// Closes `key` (see [`remove`]) and frees its entry if nothing is in
    /// flight on it any more.
    pub(super) fn remove(&mut self, key: usize) {
        remove(&mut self.core, &mut self.ring, key);
        self.free_if_done(key);
    }

    /// For a gone connection: closes its slot once nothing else runs on
    /// it, and frees its entry once the close has completed too.
    pub(super) fn free_if_done(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        if conn.state() != IoState::Gone {
            return;
        }
        close_when_idle(conn, &mut self.ring, key);
        if conn.io_mut().close == SlotClose::Done
            && !conn.io_mut().recv_armed()
            && !conn.io_mut().sending()
        {
            drop(self.core.free(key));
            self.drop_tls(key);
        }
    }

    /// Closes `slot`, which holds no connection of the slab (one accepted
    /// while draining or out of keys).
    pub(super) fn close_slot(&mut self, slot: u32, key: usize, serial: u32) {
        let sqe = on_socket!(self.ring.plain_fds(), slot, |fd| opcode::Close::new(fd)
            .build())
        .user_data(user_data(Op::Close, key, serial));
        // SAFETY: a close names no memory.
        unsafe { self.ring.push(&sqe) };
    }

    /// Frees every gone entry the kernel is done with.
    pub(super) fn free_gone(&mut self) {
        let mut keys = self.core.keys();
        keys.retain(|&k| self.core.conn(k).state() == IoState::Gone);
        for key in keys {
            self.free_if_done(key);
        }
    }
}

/// The connection `key` if it is still `serial` (gone ones included).
pub(super) fn conn_of(core: &mut Core<Sock>, key: usize, serial: u32) -> Option<&mut Conn<Sock>> {
    core.get_mut(key).filter(|c| c.serial() == serial)
}

/// Closes `key`: it leaves its topics and stops counting; its receive and
/// send are cancelled, and its slot is closed once they (and a shutdown)
/// have completed. The entry is freed after the close (see
/// [`Worker::free_if_done`]).
pub(super) fn remove(core: &mut Core<Sock>, ring: &mut Ring, key: usize) {
    core.retire(key);
    let conn = core.conn_mut(key);
    let serial = conn.serial();
    if conn.io_mut().close != SlotClose::Open {
        return;
    }
    if conn.io_mut().recv_armed() {
        let sqe = opcode::AsyncCancel::new(user_data(Op::Recv, key, serial))
            .build()
            .user_data(user_data(Op::Cancel, key, serial));
        // SAFETY: a cancel names no memory, only the `user_data` of what it cancels.
        unsafe { ring.push(&sqe) };
    }
    if conn.io_mut().sending() {
        let sqe = opcode::AsyncCancel::new(user_data(Op::Send, key, serial))
            .build()
            .user_data(user_data(Op::Cancel, key, serial));
        // SAFETY: a cancel names no memory, only the `user_data` of what it cancels.
        unsafe { ring.push(&sqe) };
    }
    conn.io_mut().close = SlotClose::Wanted;
    close_when_idle(conn, ring, key);
}

/// Submits the wanted close of `conn`'s slot once no other operation on it
/// is in flight (see [`SlotClose`]).
fn close_when_idle(conn: &mut Conn<Sock>, ring: &mut Ring, key: usize) {
    let serial = conn.serial();
    let io = conn.io_mut();
    if io.close == SlotClose::Wanted
        && !io.recv_armed()
        && !io.sending()
        && io.flags & SHUTDOWN_PENDING == 0
    {
        let sqe = on_socket!(ring.plain_fds(), io.slot, |fd| opcode::Close::new(fd)
            .build())
        .user_data(user_data(Op::Close, key, serial));
        io.close = SlotClose::Pending;
        // SAFETY: a close names no memory.
        unsafe { ring.push(&sqe) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection carries a `Sock`: idle memory per connection is
    /// the budget that matters at 250 000 connections.
    #[test]
    fn a_socket_handle_stays_eight_bytes() {
        assert_eq!(std::mem::size_of::<Sock>(), 8);
    }

    /// An idle io_uring subscriber's slab entry, accounted byte by byte in
    /// docs/BENCHMARKS.md ("Idle memory per subscriber, accounted"): the
    /// `Sock` (8), the `Session` (64), serial, keepalive time and budget
    /// charge (4 each), state and flags (1 each), padded to 8: the size of
    /// an epoll connection's entry.
    #[test]
    fn an_io_uring_connection_entry_stays_88_bytes() {
        assert_eq!(std::mem::size_of::<Conn<Sock>>(), 88);
    }
}
