//! TLS on the epoll backend. The socket carries ciphertext; the
//! connection's [`TlsConn`] turns what is read into the plaintext the core
//! takes, and the core's queue (plaintext, frames shared by every
//! subscriber) into records for the socket, encrypting only while less
//! than [`CIPHERTEXT_LIMIT`](crate::server::tls::CIPHERTEXT_LIMIT) waits for it.

use super::{MAX_READS_PER_TURN, Worker, remove};
use crate::proto::outbound::MAX_IOVECS;
use crate::server::tls::{Failure, PLAIN_HTTP_ANSWER, Received, TlsConn};
use crate::server::worker::{AfterFlush, Core, Input};
use mio::net::TcpStream;
use std::collections::HashMap;
use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use tracing::warn;

/// Gives a connection accepted on the TLS listener its session.
pub(super) fn start(
    core: &mut Core<TcpStream>,
    sessions: &mut HashMap<usize, Box<TlsConn>>,
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
        Ok(t) => {
            sessions.insert(key, Box::new(t));
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
        let Some(mut tls) = self.tls.remove(&key) else {
            return;
        };
        let mut budget_used_up = true;
        let mut failed = None;
        for _ in 0..MAX_READS_PER_TURN {
            // Plaintext the last record held comes first.
            let conn = self.core.conn_mut(key);
            let kept = conn.restore_pending(&mut self.buf);
            let n = tls.read_plain(&mut self.buf[kept..]);
            if n > 0 {
                if self.core.input(key, &mut self.buf[..kept + n]) == Input::Stop {
                    budget_used_up = false;
                    break;
                }
                continue;
            }
            if !tls.is_established() {
                // Handshake work is bounded per turn; the rest waits.
                if self.tls_steps == 0 {
                    self.core.read_again(key);
                    budget_used_up = false;
                    break;
                }
                self.tls_steps -= 1;
            }
            match tls.receive(self.core.conn_mut(key).io_mut()) {
                Received::Bytes(_) => {
                    if let Some(resumed) = tls.just_established() {
                        self.core.stats().tls_handshake(resumed);
                    }
                }
                Received::Closed => {
                    self.core.eof(key);
                    budget_used_up = false;
                    break;
                }
                Received::Later => {
                    budget_used_up = false;
                    break;
                }
                Received::Failed(why) => {
                    failed = Some(Some(why));
                    break;
                }
                Received::Error(_) => {
                    failed = Some(None);
                    break;
                }
            }
        }
        if let Some(why) = failed {
            self.core.charge_wire(key, tls.charged(), 0);
            if let Some(why) = why {
                self.core.stats().tls_failure(why);
                let io = self.core.conn_mut(key).io_mut();
                if why == Failure::PlainHttp {
                    let _ = io.write(PLAIN_HTTP_ANSWER);
                } else {
                    // The alert rustls queued, if the socket takes it.
                    let _ = tls.write_to(io);
                }
                let _ = io.shutdown(Shutdown::Write);
            }
            remove(&mut self.core, key);
            return;
        }
        if tls.wants_write() {
            self.core.mark_dirty(key);
        }
        let (was, now) = tls.recharge();
        self.tls.insert(key, tls);
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
        let Some(mut tls) = self.tls.remove(&key) else {
            return;
        };
        let core = &mut self.core;
        let (io, out) = core.conn_mut(key).io_and_out();
        let (mut sent, mut failed, mut blocked) = (0, false, false);
        loop {
            while tls.wants_write() {
                match tls.write_to(io) {
                    Ok(0) => {
                        failed = true;
                        break;
                    }
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed || blocked || out.is_empty() || !tls.can_encrypt() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.gather(&mut iov);
            let took = tls.encrypt(&iov[..n]);
            if took == 0 {
                break;
            }
            out.advance(took);
        }
        core.stats().bytes_sent(sent);
        if failed {
            core.charge_wire(key, tls.charged(), 0);
            remove(core, key);
            return;
        }
        let waiting = tls.wants_write();
        let (was, now) = tls.recharge();
        self.tls.insert(key, tls);
        self.core.charge_wire(key, was, now);
        if waiting {
            // The writable edge flushes the rest; until the ciphertext is
            // out, the connection is not done (a close must not overtake it).
            return;
        }
        match self.core.after_flush(key, sent) {
            AfterFlush::Keep => {}
            AfterFlush::Remove => Worker::remove(self, key),
            AfterFlush::ShutdownWrite => {
                if let Some(tls) = self.tls.get_mut(&key) {
                    tls.close();
                    let _ = tls.write_to(self.core.conn_mut(key).io_mut());
                }
                let _ = self.core.conn_mut(key).io_mut().shutdown(Shutdown::Write);
                self.discard_input(key);
            }
        }
    }
}
