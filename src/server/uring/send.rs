//! The send path: one send per dirty connection and turn: a plain `send`
//! when the queue's front is one buffer (one frame, or a run of small
//! frames copied into one tail: the common case of a fan-out), a
//! `sendmsg` over up to [`MAX_IOVECS`] buffers otherwise.
//!
//! A plain send needs no arguments of its own, so a publication written
//! to 20 000 subscribers at once allocates nothing per subscriber here; a
//! `sendmsg` holds a 1 KiB [`SendOp`] while in flight.

use super::Worker;
use super::conn::conn_of;
use super::ring::{Op, on_socket, user_data};
use crate::proto::outbound::MAX_IOVECS;
use crate::server::worker::{AfterFlush, IoState};
use io_uring::opcode;
use std::io::IoSlice;

/// Spare send arguments kept for reuse (1 KiB each).
const SEND_POOL_MAX: usize = 256;

/// A `sendmsg`'s arguments, kept at a stable heap address while in flight.
///
/// Boxed, and held in the worker's `send_ops` under the connection's slab
/// key from the push until the send's completion is reaped: the kernel
/// reads `msg`, which points at `iov`, whose entries point at the
/// connection's pinned queue front. Only then does it go back to the
/// worker's pool. (Not in the connection's [`Sock`](super::conn::Sock),
/// which stays 8 bytes on every idle connection.)
pub(super) struct SendOp {
    iov: [libc::iovec; MAX_IOVECS],
    msg: libc::msghdr,
}

impl SendOp {
    fn new() -> Box<Self> {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is valid.
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// Pushes one plain `send` of `len` bytes at `ptr` for `key` (its
/// connection `conn`), marked in its `Sock` as the single send in flight. A
/// buffer longer than `u32::MAX` goes in parts, like any short send.
///
/// # Safety
///
/// The `len` bytes at `ptr` must stay valid and unmoved, and must not be
/// written, until this send's completion has been handled (see
/// [`Ring::push`](super::ring::Ring::push)).
pub(super) unsafe fn push_single_send(
    ring: &mut super::ring::Ring,
    conn: &mut crate::server::worker::Conn<super::conn::Sock>,
    key: usize,
    ptr: *const u8,
    len: usize,
) {
    let len = len.min(u32::MAX as usize) as u32;
    let sqe = on_socket!(ring.plain_fds(), conn.io().slot(), |fd| {
        opcode::Send::new(fd, ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    })
    .user_data(user_data(Op::Send, key, conn.serial()));
    conn.io_mut().single_send_started();
    // SAFETY: the caller keeps the buffer valid, unmoved and unwritten until
    // the completion (this function's contract).
    unsafe { ring.push(&sqe) };
    ring.in_flight_started();
}

impl Worker {
    /// Sends `key`'s queue (up to [`MAX_IOVECS`] chunks), unless a send is in flight.
    pub(super) fn flush(&mut self, key: usize) {
        if self.is_tls(key) {
            self.flush_tls(key);
            return;
        }
        let conn = self.core.conn_mut(key);
        if conn.io().sending() {
            // Its completion flushes the rest.
            return;
        }
        if conn.out().is_empty() {
            self.after_flush(key, 0);
            return;
        }
        let n = conn.out_mut().pin_front(MAX_IOVECS);
        if n == 1 {
            let mut iov = [IoSlice::new(&[])];
            conn.out().gather(&mut iov);
            let (ptr, len) = (iov[0].as_ptr(), iov[0].len());
            // SAFETY: the buffer is the queue's front chunk, pinned by
            // `pin_front` (neither moved nor freed) until `advance` at this
            // send's completion; a gone connection is freed only once no
            // send is in flight, and the exit leaks what is still in flight.
            unsafe { push_single_send(&mut self.ring, conn, key, ptr, len) };
            return;
        }
        let mut op = self.send_pool.pop().unwrap_or_else(SendOp::new);
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let filled = conn.out().gather(&mut iov[..n]);
        debug_assert_eq!(filled, n);
        for (dst, src) in op.iov.iter_mut().zip(&iov[..filled]) {
            *dst = libc::iovec {
                iov_base: src.as_ptr() as *mut libc::c_void,
                iov_len: src.len(),
            };
        }
        op.msg.msg_iov = op.iov.as_mut_ptr();
        op.msg.msg_iovlen = filled as _;
        let sqe = on_socket!(self.ring.plain_fds(), conn.io().slot(), |fd| {
            opcode::SendMsg::new(fd, &raw const op.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        })
        .user_data(user_data(Op::Send, key, conn.serial()));
        // The box moves into `send_ops`; the heap data it points to does not.
        conn.io_mut().vectored_send_started();
        self.send_ops.insert(key, op);
        // SAFETY: `msg` and `iov` live in the boxed `op`, now held in
        // `send_ops` until `on_send` takes it back at the send's completion
        // (a gone connection is freed only once no send is in flight; the
        // exit leaks what is still in flight); the iovecs point at the
        // queue's front, pinned by `pin_front` until `advance` at that
        // same completion.
        unsafe { self.ring.push(&sqe) };
        self.ring.in_flight_started();
    }

    /// `key`'s send completed: `res` bytes left its queue (or an error).
    pub(super) fn on_send(&mut self, key: usize, serial: u32, res: i32) {
        if conn_of(&mut self.core, key, serial).is_none() {
            return;
        }
        // A TLS send of the session's ciphertext: the queue was advanced
        // when it was encrypted.
        let tls_done = self.tls_sent(key, res);
        let conn = self.core.conn_mut(key);
        let op = if conn.io_mut().send_ended() {
            self.send_ops.remove(&key)
        } else {
            None
        };
        if tls_done.is_none() {
            // Also releases the pin: the queue may move again.
            conn.out_mut().advance(res.max(0) as usize);
        }
        let gone = conn.state() == IoState::Gone;
        let pending = !conn.out().is_empty() || tls_done == Some(false);
        if let Some(op) = op
            && self.send_pool.len() < SEND_POOL_MAX
        {
            self.send_pool.push(op);
        }
        self.ring.in_flight_ended();
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
        if tls_done == Some(false) {
            // Ciphertext is still to go: a close must not overtake it.
            return;
        }
        if tls_done == Some(true) && !pending {
            // Sent all there was: an idle connection keeps no TLS buffer.
            self.release_wire(key);
        }
        self.after_flush(key, res as usize);
    }

    /// After a flush wrote `wrote` bytes: what the core wants next.
    pub(super) fn after_flush(&mut self, key: usize, wrote: usize) {
        match self.core.after_flush(key, wrote) {
            AfterFlush::Keep => {}
            AfterFlush::Remove => self.remove(key),
            AfterFlush::ShutdownWrite => {
                let conn = self.core.conn_mut(key);
                let sqe = on_socket!(self.ring.plain_fds(), conn.io().slot(), |fd| {
                    opcode::Shutdown::new(fd, libc::SHUT_WR).build()
                })
                .user_data(user_data(Op::Shutdown, key, conn.serial()));
                conn.io_mut().shutdown_started();
                let wants = Self::wants_recv(conn);
                // SAFETY: a shutdown names no memory.
                unsafe { self.ring.push(&sqe) };
                if wants {
                    // Lingering: read (and drop) until the peer's FIN.
                    self.arm_recv(key);
                }
            }
        }
    }
}
