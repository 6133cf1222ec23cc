//! TLS on the io_uring backend. An established session's received
//! ciphertext is decrypted in place in the ring's buffer (copied into the
//! connection's [`TlsState`] first while reading is paused or the
//! handshake waits for its turn) and fed to the core; a flush encrypts
//! the queue's front (many small frames to a record) into the state's
//! `wire` buffer ([`Wire`]), at most [`CIPHERTEXT_LIMIT`] at a time, and
//! sends it with one `IORING_OP_SEND`.
//!
//! Ownership: `wire` is the kernel's from the send's push until its
//! completion: while `wire_in_flight`, nothing writes, grows or frees it,
//! and the state (boxed, in `Worker::tls`) is dropped only when the
//! connection's entry is freed, which waits for every operation on it
//! (`free_if_done`); the exit leaks the map if operations remain. The
//! one exception: a send that completed while it was submitted (its
//! completion already posted, taken aside for the next reap) gives its
//! buffer back to the worker at once, to be filled by the next flush
//! while still in the cache (`Worker::tls_scratch`).
//!
//! A closing connection's last send carries its `close_notify` after the
//! queue's last bytes; the shutdown (FIN) follows that send's completion.

use super::Worker;
use super::recv::{Group, bufs};
use super::ring::{Op, user_data};
use super::send::push_single_send;
use crate::proto::outbound::MAX_IOVECS;
use crate::server::tls::{CIPHERTEXT_LIMIT, Failure, PLAIN_HTTP_ANSWER, TlsConn, Wire};
use crate::server::worker::{Input, IoState};
use std::io::IoSlice;
use tracing::warn;

/// Room made in the scratch buffer for one read of decrypted bytes.
const PLAIN_CHUNK: usize = 16 * 1024;

/// One TLS connection's session and the buffers the ring needs around it.
pub(super) struct TlsState {
    conn: TlsConn,
    /// Ciphertext received that the session has not taken yet (received
    /// while reading was paused, or past this turn's handshake steps);
    /// empty, and unallocated, otherwise.
    cipher_in: Vec<u8>,
    /// Ciphertext being sent: its pending bytes go in the send in flight
    /// (or the next); freed by the first flush with nothing to send, so an
    /// idle connection holds none.
    wire: Wire,
    /// A send of `wire` is in flight (see the module's ownership rule).
    wire_in_flight: bool,
    /// The session failed: the queue holds plain last words, sent as they are.
    failed: bool,
    /// Our `close_notify` is queued (after the last of a closing
    /// connection's queue, before its FIN).
    close_sent: bool,
    /// What is charged to the worker's budget for `wire` and `cipher_in`.
    charged: usize,
}

impl TlsState {
    /// A sweep period ended: a quiet session lets its keys' contexts go.
    pub(super) fn sweep(&mut self) {
        self.conn.sweep();
    }

    /// The session failed (its connection sends plain last words).
    pub(super) fn failed(&self) -> bool {
        self.failed
    }
}

impl Worker {
    /// Gives a connection accepted on the TLS listener its session.
    pub(super) fn start_tls(&mut self, key: usize) {
        let Some(certs) = &self.core.shared().tls else {
            return;
        };
        if self.core.id() >= self.core.shared().tls_workers {
            return; // a --plain-listen worker
        }
        let core_max_head = self.core.shared().config.max_handshake_size;
        match TlsConn::new(certs.config(), core_max_head) {
            Ok(conn) => {
                let state = TlsState {
                    conn,
                    cipher_in: Vec::new(),
                    wire: Wire::default(),
                    wire_in_flight: false,
                    failed: false,
                    close_sent: false,
                    charged: 0,
                };
                self.tls.insert(key, Box::new(state));
            }
            Err(e) => {
                warn!(error = %e, "TLS session not created; connection closed");
                self.remove(key);
            }
        }
    }

    /// Whether `key` speaks TLS (a live session, not a failed one).
    pub(super) fn is_tls(&self, key: usize) -> bool {
        self.tls.get(&key).is_some_and(|t| !t.failed)
    }

    /// `len` bytes of receive buffer `bid` of `group` arrived for TLS
    /// connection `key`: decrypted and handed to the core, or kept while
    /// reading is paused.
    pub(super) fn tls_received(
        &mut self,
        key: usize,
        group: Group,
        bid: u16,
        len: usize,
        paused: bool,
    ) {
        let data = bufs!(self, group).data(bid, len);
        let Some(st) = self.tls.get_mut(&key) else {
            return;
        };
        if !paused && st.cipher_in.is_empty() && st.conn.is_established() && !st.failed {
            // Nothing held before it and no handshake step to count: the
            // records are decrypted in place in the ring's buffer (the
            // session keeps a partial one); a failure is taken up by
            // `pump_tls`.
            let _ = st.conn.receive(data);
        } else {
            st.cipher_in.extend_from_slice(data);
        }
        if paused {
            self.core.conn_mut(key).io_mut().set_held(true);
            // What is kept while reading is paused is charged at once, not
            // at the resume.
            self.recharge_tls(key);
            return;
        }
        self.pump_tls(key);
    }

    /// Decrypts what `key` received and feeds the plaintext to the core,
    /// until the core stops reading or nothing is left.
    pub(super) fn pump_tls(&mut self, key: usize) {
        // Out of the map while the core takes its plaintext; should a bug
        // unwind from there, the session is leaked, never freed: its
        // `wire` may be in a send the kernel still reads.
        let Some(mut st) = self.tls.remove(&key).map(std::mem::ManuallyDrop::new) else {
            return;
        };
        let mut verdict = Input::More;
        let mut failure: Option<Option<Failure>> = None;
        if !st.failed
            && let Some(why) = st.conn.failure_kind()
        {
            // Failed on input decrypted where it arrived (`tls_received`).
            failure = Some(Some(why));
        }
        while failure.is_none() {
            // Plaintext the last record held comes first.
            let kept = self.restore_pending(key);
            if self.scratch.len() < kept + PLAIN_CHUNK {
                self.scratch.resize(kept + PLAIN_CHUNK, 0);
            }
            let n = st.conn.read_plain(&mut self.scratch[kept..]);
            if n > 0 {
                verdict = self.core.input(key, &mut self.scratch[..kept + n]);
                if verdict == Input::Stop {
                    // Plaintext or records may be left in the session: fed
                    // again when the connection is read again.
                    self.core.conn_mut(key).io_mut().set_held(true);
                    break;
                }
                continue;
            }
            if st.conn.peer_closed() {
                self.core.eof(key);
                break;
            }
            if st.cipher_in.is_empty() {
                break;
            }
            if !st.conn.is_established() {
                // Handshake work is bounded per turn; the rest waits in
                // `cipher_in` (held) for the next.
                if self.tls_steps == 0 {
                    self.core.conn_mut(key).io_mut().set_held(true);
                    self.core.read_again(key);
                    break;
                }
                self.tls_steps -= 1;
            }
            let mut data = std::mem::take(&mut st.cipher_in);
            match st.conn.receive(&mut data) {
                Ok(()) => {
                    if let Some(resumed) = st.conn.just_established() {
                        self.core.stats().tls_handshake(resumed);
                    }
                }
                Err(why) => {
                    failure = Some(Some(why));
                    break;
                }
            }
        }
        if let Some(why) = failure {
            let mut last_words = Vec::new();
            if !st.wire_in_flight {
                // The unsent rest of records already sealed goes first.
                last_words.extend_from_slice(st.wire.pending());
                let n = st.wire.len();
                st.wire.consume(n);
            }
            if let Some(why) = why {
                self.core.stats().tls_failure(why);
                if why == Failure::PlainHttp {
                    last_words.extend_from_slice(PLAIN_HTTP_ANSWER);
                } else {
                    // The alert rustls queued.
                    let mut alert = Wire::default();
                    st.conn.take_pending(&mut alert);
                    last_words.extend_from_slice(alert.pending());
                }
            }
            st.failed = true;
            st.cipher_in = Vec::new();
            self.tls.insert(key, std::mem::ManuallyDrop::into_inner(st));
            // The failed session freed its buffers: its charge goes with them.
            self.recharge_tls(key);
            self.core.fail_wire(key, &last_words);
            self.core.after_input(key);
            return;
        }
        if st.conn.wants_write() {
            self.core.mark_dirty(key);
        }
        self.tls.insert(key, std::mem::ManuallyDrop::into_inner(st));
        self.recharge_tls(key);
        self.after_core_input(key, verdict);
    }

    /// [`Worker::flush`] for a TLS connection: ciphertext waiting in the
    /// session, then the queue's front encrypted, up to
    /// [`CIPHERTEXT_LIMIT`], sent in one `send`.
    pub(super) fn flush_tls(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        if conn.io().sending() {
            // Its completion flushes the rest.
            return;
        }
        let Some(st) = self.tls.get_mut(&key) else {
            return;
        };
        if st.wire.is_empty() {
            let closing = conn.state() == IoState::Closing;
            let out = conn.out_mut();
            if st.wire.capacity() == 0 && self.tls_scratch.capacity() > 0 {
                // The worker's scratch buffer, still in the cache from the
                // last flush whose send completed at once.
                st.wire.adopt(std::mem::take(&mut self.tls_scratch));
            }
            st.conn.take_pending(&mut st.wire);
            while st.wire.len() < CIPHERTEXT_LIMIT && !out.is_empty() && st.conn.can_encrypt() {
                let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
                let n = out.gather(&mut iov);
                let took = st.conn.encrypt(&iov[..n], &mut st.wire, CIPHERTEXT_LIMIT);
                if took == 0 {
                    break;
                }
                out.advance(took);
            }
            if st.conn.failed() {
                // rustls refused to encrypt more (a TLS 1.2 session's keys
                // used up): what it sealed, then its close_notify, go as
                // last words, and the connection closes.
                let last = st.wire.pending().to_vec();
                st.wire.consume(last.len());
                st.wire.free();
                st.failed = true;
                self.recharge_tls(key);
                self.core.fail_wire(key, &last);
                return;
            }
            if closing && out.is_empty() && !st.close_sent && st.conn.can_encrypt() {
                // The queue's last bytes (the WebSocket close) are in this
                // send: `close_notify` goes after them, the FIN after it.
                st.close_sent = true;
                st.conn.close();
                st.conn.take_pending(&mut st.wire);
            }
        }
        if st.wire.is_empty() {
            st.wire.free();
            self.recharge_tls(key);
            self.after_flush(key, 0);
            return;
        }
        let rest = st.wire.pending();
        let (ptr, len) = (rest.as_ptr(), rest.len());
        st.wire_in_flight = true;
        let ud = user_data(Op::Send, key, conn.serial());
        // SAFETY: the buffer is `wire`, which nothing writes, grows or frees
        // while `wire_in_flight` (set above, cleared at this send's
        // completion) until the kernel has posted this send's completion
        // (below, the buffer is taken back only once it has); its
        // `TlsState` is dropped only when the entry is freed, after every
        // operation on it completed, and the exit leaks it otherwise
        // (module ownership rule).
        unsafe { push_single_send(&mut self.ring, conn, key, ptr, len) };
        // The kernel copies the ciphertext while it is still in the cache:
        // submitted now, not with the next 64 entries, after which another
        // 4 MiB of other connections' ciphertext would have evicted it.
        self.ring.submit_now();
        // A send the socket took whole completed during the submission:
        // its completion is posted (and taken aside here for the next
        // reap, which handles it as usual), the kernel is done with the
        // buffer, and the buffer goes back to the worker for the next
        // flush while it is still in the cache, instead of waiting on this
        // connection, cold by the time it is filled again. A send that
        // waits for the socket, or took part, keeps the buffer.
        if self.tls_scratch.capacity() == 0 && self.ring.stash_and_find(ud) == Some(len as i32) {
            // SAFETY-relevant: the send's completion was posted, so no
            // operation reads the buffer any more; `wire_in_flight` stays
            // set until that completion is handled, and `tls_sent` then
            // counts its bytes off a wire that holds none.
            st.wire.consume(len);
            self.tls_scratch = st.wire.take_buffer();
        }
        // Only reads `wire`'s capacity: nothing here touches the buffer.
        self.recharge_tls(key);
    }

    /// A send completed for `key`: if it was a TLS send of `wire`, counts
    /// `res` bytes off it and returns `Some(done)`, `done` when nothing of
    /// the session's ciphertext is left to send; `None` for a send of the
    /// queue itself.
    pub(super) fn tls_sent(&mut self, key: usize, res: i32) -> Option<bool> {
        let st = self.tls.get_mut(&key)?;
        if !st.wire_in_flight {
            return None;
        }
        st.wire_in_flight = false;
        // Kept allocated for the next flush while the connection is busy;
        // freed by a flush that finds nothing to send.
        st.wire.consume(res.max(0) as usize);
        Some(st.wire.is_empty() && !st.conn.wants_write())
    }

    /// The bytes after `key`'s PROXY protocol header: the first of its
    /// ciphertext.
    pub(super) fn tls_after_proxy(&mut self, key: usize, cipher: &[u8]) {
        if let Some(st) = self.tls.get_mut(&key) {
            st.cipher_in.extend_from_slice(cipher);
        }
        self.pump_tls(key);
    }

    /// `key` was refused before its TLS handshake began (its PROXY protocol
    /// header): the session is set aside like a failed one, so that the
    /// plain answer in the queue goes out as it is.
    pub(super) fn tls_refused(&mut self, key: usize) {
        if let Some(st) = self.tls.get_mut(&key) {
            st.failed = true;
            st.cipher_in = Vec::new();
        }
        self.recharge_tls(key);
    }

    /// Drops `key`'s session once its entry is freed, and its charge.
    pub(super) fn drop_tls(&mut self, key: usize) {
        if let Some(st) = self.tls.remove(&key) {
            self.core.charge_wire(key, st.charged, 0);
        }
    }

    /// Frees `key`'s (sent, empty) ciphertext buffer and its charge.
    pub(super) fn release_wire(&mut self, key: usize) {
        if let Some(st) = self.tls.get_mut(&key)
            && !st.wire_in_flight
        {
            st.wire.free();
        }
        self.recharge_tls(key);
    }

    /// Charges `key`'s buffers (`wire`, `cipher_in` and the session's, by
    /// capacity) to
    /// the worker's budget; over it, the connection is failed (1013).
    fn recharge_tls(&mut self, key: usize) {
        let Some(st) = self.tls.get_mut(&key) else {
            return;
        };
        let now = st.wire.capacity() + st.cipher_in.capacity() + st.conn.held();
        let was = std::mem::replace(&mut st.charged, now);
        self.core.charge_wire(key, was, now);
    }
}
