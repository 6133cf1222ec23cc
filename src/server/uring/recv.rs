//! The receive path: a multishot receive per connection, its bytes to the core.

use super::Worker;
use super::bufring::BGID;
use super::conn::{Sock, conn_of};
use super::ring::{Op, on_socket, user_data};
use crate::server::worker::{Conn, Header, Input, IoState};
use io_uring::{cqueue, opcode};
use tracing::warn;

impl Worker {
    /// Arms `key`'s multishot receive.
    pub(super) fn arm_recv(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        debug_assert!(!conn.io().recv_armed());
        let sqe = on_socket!(self.ring.plain_fds(), conn.io().slot(), |fd| {
            opcode::RecvMulti::new(fd, BGID).build()
        })
        .user_data(user_data(Op::Recv, key, conn.serial()));
        conn.io_mut().set_recv_armed(true);
        // SAFETY: a receive from group BGID names no memory of its own; the
        // group's buffers (`self.bufs`) stay mapped and registered until the
        // exit, which unregisters them only once no receive is in flight
        // and leaks them otherwise.
        unsafe { self.ring.push(&sqe) };
        self.ring.in_flight_started();
    }

    /// Should `conn` have a receive armed?
    pub(super) fn wants_recv(conn: &Conn<Sock>) -> bool {
        !conn.peer_eof()
            && !conn.io().recv_armed()
            && match conn.state() {
                IoState::Active => !conn.read_paused(),
                IoState::Lingering => true,
                IoState::Closing | IoState::Gone => false,
            }
    }

    /// A receive completion for `key`: bytes for the core (held while
    /// reading is paused), the peer's end of stream, or an error; re-arms
    /// the receive if it ended and the connection still reads.
    pub(super) fn on_recv(&mut self, key: usize, serial: u32, res: i32, flags: u32) {
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
            conn.io_mut().set_recv_armed(false);
            self.ring.in_flight_ended();
        }
        let state = conn.state();
        if res > 0 {
            match bid {
                Some(bid) => {
                    // A closing or lingering connection reads nothing more: discarded.
                    if state == IoState::Active {
                        let paused = conn.read_paused();
                        if conn.awaits_proxy() {
                            self.proxy_received(key, bid, len);
                        } else if self.tls.get(&key).is_some_and(|t| !t.failed()) {
                            self.tls_received(key, bid, len, paused);
                        } else if paused {
                            // Received before the pause took effect: not
                            // processed while paused (a paced publisher,
                            // backpressure, a publisher waiting for its
                            // answer), kept for the resume, charged to the
                            // budget now; the receive is stopped.
                            conn.hold(self.bufs.data(bid, len));
                            conn.io_mut().set_held(true);
                            self.core.charge_held(key);
                            self.after_core_input(key, Input::Stop);
                        } else {
                            self.input(key, bid, len);
                        }
                    }
                    self.bufs.consumed(bid, len, buf_more);
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
                self.bufs.consumed(bid, 0, buf_more);
            }
            match (res, state) {
                (_, IoState::Gone) => {}
                (0, IoState::Active) => {
                    self.core.eof(key);
                    self.core.after_input(key);
                }
                (0, IoState::Closing) => self.core.peer_closed(key),
                (0, IoState::Lingering) => self.remove(key),
                (e, _) if -e == libc::ENOBUFS || -e == libc::ECANCELED => {}
                (_, _) => self.remove(key),
            }
        }
        let conn = self.core.conn(key);
        if conn.state() == IoState::Gone {
            self.free_if_done(key);
        } else if Self::wants_recv(conn) {
            self.arm_recv(key);
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

    /// `len` bytes of receive buffer `bid` for a connection whose PROXY
    /// protocol header has not been taken: judged with what an earlier
    /// receive kept (at most [`MAX_HEADER`](crate::proto::proxy::MAX_HEADER)
    /// bytes), then what follows the header goes to TLS or the core.
    fn proxy_received(&mut self, key: usize, bid: u16, len: usize) {
        let kept = self.restore_pending(key);
        let n = kept + len;
        if self.scratch.len() < n {
            self.scratch.resize(n, 0);
        }
        self.scratch[kept..n].copy_from_slice(self.bufs.data(bid, len));
        match self.core.proxy_header(key, &self.scratch[..n]) {
            Header::Wait => {
                let data = self.bufs.data(bid, len);
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
