//! TLS on the epoll backend. A read's ciphertext goes through the
//! connection's [`TlsConn`] (decrypted in place in the worker's cipher
//! buffer) to the core; the core's queue (plaintext, frames shared by every
//! subscriber) is encrypted into the worker's [`Wire`], at most
//! [`CIPHERTEXT_LIMIT`] at a time, and written from there; what the socket
//! does not take waits in the session's own.

use super::{MAX_READS_PER_TURN, Worker, remove};
use crate::proto::outbound::MAX_IOVECS;
use crate::server::backend::READ_BUF_BYTES;
use crate::server::tls::{CIPHERTEXT_LIMIT, Failure, PLAIN_HTTP_ANSWER, TlsConn, Wire};
use crate::server::worker::{AfterFlush, Core, Input};
use mio::net::TcpStream;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use tracing::warn;

/// One TLS connection: its session, the ciphertext its socket has not
/// taken, and what both are charged to the worker's budget.
pub(super) struct Session {
    tls: TlsConn,
    wire: Wire,
    charged: usize,
}

impl Session {
    /// What the budget is charged for this session now.
    pub(super) fn charged(&self) -> usize {
        self.charged
    }

    /// A sweep period ended: quiet sessions let their keys' contexts go.
    pub(super) fn sweep(&mut self) {
        self.tls.sweep();
    }

    /// Re-measures what the session holds; returns (charged before, now).
    fn recharge(&mut self) -> (usize, usize) {
        let now = self.tls.held() + self.wire.capacity();
        (std::mem::replace(&mut self.charged, now), now)
    }
}

/// Gives a connection accepted on the TLS listener its session.
pub(super) fn start(
    core: &mut Core<TcpStream>,
    sessions: &mut HashMap<usize, Box<Session>>,
    key: usize,
) {
    let Some(certs) = &core.shared().tls else {
        return;
    };
    if core.id() >= core.shared().tls_workers {
        return; // a --plain-listen worker
    }
    let core_max_head = core.shared().config.max_handshake_size;
    match TlsConn::new(certs.config(), core_max_head) {
        Ok(tls) => {
            let session = Session {
                tls,
                wire: Wire::default(),
                charged: 0,
            };
            sessions.insert(key, Box::new(session));
        }
        Err(e) => {
            warn!(error = %e, "TLS session not created; connection closed");
            remove(core, key);
        }
    }
}

impl Worker {
    /// [`Worker::read`] for a TLS connection: decrypted input goes to the
    /// core; handshake messages and alerts are written at the end of the
    /// turn.
    pub(super) fn read_tls(&mut self, key: usize) {
        let Some(mut s) = self.tls.remove(&key) else {
            return;
        };
        if self.cipher.is_empty() {
            self.cipher = vec![0u8; READ_BUF_BYTES].into_boxed_slice();
        }
        let mut budget_used_up = true;
        let mut failed = None;
        for _ in 0..MAX_READS_PER_TURN {
            // Plaintext already decrypted comes first.
            let conn = self.core.conn_mut(key);
            let kept = conn.restore_pending(&mut self.buf);
            let n = s.tls.read_plain(&mut self.buf[kept..]);
            if n > 0 {
                if self.core.input(key, &mut self.buf[..kept + n]) == Input::Stop {
                    budget_used_up = false;
                    break;
                }
                continue;
            }
            if s.tls.peer_closed() {
                self.core.eof(key);
                budget_used_up = false;
                break;
            }
            if !s.tls.is_established() {
                // Handshake work is bounded per turn; the rest waits.
                if self.tls_steps == 0 {
                    self.core.read_again(key);
                    budget_used_up = false;
                    break;
                }
                self.tls_steps -= 1;
            }
            match self.core.conn_mut(key).io_mut().read(&mut self.cipher) {
                Ok(0) => {
                    self.core.eof(key);
                    budget_used_up = false;
                    break;
                }
                Ok(n) => match s.tls.receive(&mut self.cipher[..n]) {
                    Ok(()) => {
                        if let Some(resumed) = s.tls.just_established() {
                            self.core.stats().tls_handshake(resumed);
                        }
                    }
                    Err(why) => {
                        failed = Some(Some(why));
                        break;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    budget_used_up = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = Some(None);
                    break;
                }
            }
        }
        if let Some(why) = failed {
            self.core.charge_wire(key, s.charged, 0);
            if let Some(why) = why {
                self.core.stats().tls_failure(why);
                let io = self.core.conn_mut(key).io_mut();
                if why == Failure::PlainHttp {
                    let _ = io.write(PLAIN_HTTP_ANSWER);
                } else {
                    // The alert rustls queued, if the socket takes it.
                    s.tls.take_pending(&mut s.wire);
                    let _ = io.write(s.wire.pending());
                }
                let _ = io.shutdown(Shutdown::Write);
            }
            remove(&mut self.core, key);
            return;
        }
        if s.tls.wants_write() {
            self.core.mark_dirty(key);
        }
        let (was, now) = s.recharge();
        self.tls.insert(key, s);
        self.core.charge_wire(key, was, now);
        if budget_used_up {
            self.core.read_again(key);
        }
        self.core.after_input(key);
    }

    /// [`Worker::flush`] for a TLS connection: waiting ciphertext first,
    /// then the queue's front encrypted (many small frames to a record) and
    /// written, until the socket takes no more or the queue is empty.
    pub(super) fn flush_tls(&mut self, key: usize) {
        let Some(mut s) = self.tls.remove(&key) else {
            return;
        };
        let core = &mut self.core;
        // Records are sealed into the worker's buffer (hot in the cache,
        // one for every connection) and written from there; only what the
        // socket does not take moves to the connection's own `wire`.
        let scratch = &mut self.tls_out;
        let (io, out) = core.conn_mut(key).io_and_out();
        let (mut sent, mut failed) = (0, false);
        loop {
            let from_scratch = s.wire.is_empty();
            if from_scratch {
                s.tls.take_pending(scratch);
                while scratch.len() < CIPHERTEXT_LIMIT && !out.is_empty() && s.tls.can_encrypt() {
                    let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
                    let n = out.gather(&mut iov);
                    let took = s.tls.encrypt(&iov[..n], scratch, CIPHERTEXT_LIMIT);
                    if took == 0 {
                        break;
                    }
                    out.advance(took);
                }
                if s.tls.failed() {
                    // rustls refused to encrypt more (a TLS 1.2 session's
                    // keys used up): what it sealed, then its close_notify,
                    // are the last bytes; the connection closes.
                    let _ = io.write(scratch.pending());
                    failed = true;
                    break;
                }
                if scratch.is_empty() {
                    break;
                }
            }
            let wire = if from_scratch {
                &mut *scratch
            } else {
                &mut s.wire
            };
            let blocked = match io.write(wire.pending()) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    sent += n;
                    wire.consume(n);
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(_) => {
                    failed = true;
                    break;
                }
            };
            if from_scratch && !scratch.is_empty() {
                s.wire.extend(scratch.pending());
                scratch.consume(scratch.len());
            }
            if blocked {
                break;
            }
        }
        if failed {
            // Nothing of this connection stays in the worker's buffer.
            scratch.consume(scratch.len());
        }
        core.stats().bytes_sent(sent);
        if failed {
            core.charge_wire(key, s.charged, 0);
            remove(core, key);
            return;
        }
        let waiting = !s.wire.is_empty();
        if !waiting {
            s.wire.free();
        }
        let (was, now) = s.recharge();
        self.tls.insert(key, s);
        self.core.charge_wire(key, was, now);
        if waiting {
            // The writable edge flushes the rest; until the ciphertext is
            // out, the connection is not done (a close must not overtake it).
            return;
        }
        match self.core.after_flush(key, sent) {
            AfterFlush::Keep => {}
            AfterFlush::Remove => {
                // Done (the client closed, or our close is over): our
                // close_notify goes before the socket does, as io_uring's
                // last send carries it (best effort: the connection goes
                // whether the socket takes it or not).
                if let Some(s) = self.tls.get_mut(&key)
                    && s.tls.is_established()
                    && s.tls.can_encrypt()
                {
                    s.tls.close();
                    s.tls.take_pending(&mut s.wire);
                    let _ = self.core.conn_mut(key).io_mut().write(s.wire.pending());
                    s.wire.free();
                }
                Worker::remove(self, key)
            }
            AfterFlush::ShutdownWrite => {
                if let Some(s) = self.tls.get_mut(&key) {
                    s.tls.close();
                    s.tls.take_pending(&mut s.wire);
                    let _ = self.core.conn_mut(key).io_mut().write(s.wire.pending());
                    s.wire.free();
                }
                let _ = self.core.conn_mut(key).io_mut().shutdown(Shutdown::Write);
                self.discard_input(key);
            }
        }
    }
}
