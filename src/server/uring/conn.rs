//! A connection's socket state, and how a connection closes.

use super::Worker;
use super::ring::{Op, Ring, on_socket, user_data};
use super::send::SendOp;
use crate::server::worker::{Conn, Core, IoState};
use io_uring::opcode;

/// A connection's handle: its direct descriptor and the operations in flight.
pub(super) struct Sock {
    /// Index in the ring's fixed-file table (with plain descriptors: the
    /// process descriptor).
    pub(super) slot: u32,
    /// A multishot receive is armed.
    pub(super) recv_armed: bool,
    /// The send in flight, if any (its msghdr and iovecs).
    pub(super) send: Option<Box<SendOp>>,
    /// A `shutdown(SHUT_WR)` is in flight.
    pub(super) shutdown_pending: bool,
    /// Where closing `slot` stands.
    pub(super) close: SlotClose,
    /// Input that arrived while reading was paused (a multishot receive
    /// can complete after its cancel was submitted) is kept, unprocessed,
    /// in the session's pending bytes; fed to the core on resume.
    pub(super) held: bool,
}

/// Closing a direct descriptor. The close is submitted only once no other
/// operation on the slot is in flight: io_uring resolves a fixed file when
/// an operation *executes*, and a shutdown (always run by an io-wq thread)
/// still queued when the slot is closed and re-filled by the next accept
/// would shut down the new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotClose {
    Open,
    /// Wanted, waiting for the slot's other operations to complete.
    Wanted,
    /// Submitted.
    Pending,
    /// Completed: the slot may already hold another connection.
    Done,
}

impl Worker {
    pub(super) fn remove(&mut self, key: usize) {
        remove(&mut self.core, &mut self.ring, key);
        self.free_if_done(key);
    }

    /// For a gone connection: closes its slot once nothing else runs on
    /// it, and frees its entry once the close has completed too.
    pub(super) fn free_if_done(&mut self, key: usize) {
        let conn = &mut self.core.conns[key];
        if conn.state != IoState::Gone {
            return;
        }
        close_when_idle(conn, &mut self.ring, key);
        if conn.io.close == SlotClose::Done && !conn.io.recv_armed && conn.io.send.is_none() {
            drop(self.core.conns.remove(key));
        }
    }

    pub(super) fn close_slot(&mut self, slot: u32, key: usize, serial: u32) {
        let sqe = on_socket!(self.ring.plain_fds, slot, |fd| opcode::Close::new(fd)
            .build())
        .user_data(user_data(Op::Close, key, serial));
        self.ring.push(&sqe);
    }

    /// Frees every gone entry the kernel is done with.
    pub(super) fn free_gone(&mut self) {
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
}

/// The connection `key` if it is still `serial` (gone ones included).
pub(super) fn conn_of(core: &mut Core<Sock>, key: usize, serial: u32) -> Option<&mut Conn<Sock>> {
    core.conns.get_mut(key).filter(|c| c.serial == serial)
}

/// Closes `key`: it leaves its topics and stops counting; its receive and
/// send are cancelled, and its slot is closed once they (and a shutdown)
/// have completed. The entry is freed after the close (see
/// [`Worker::free_if_done`]).
pub(super) fn remove(core: &mut Core<Sock>, ring: &mut Ring, key: usize) {
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
