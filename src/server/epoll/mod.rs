//! The epoll backend: one mio event loop per worker thread.
//!
//! Rules of the loop (edge-triggered epoll):
//! - every socket is registered once for READABLE | WRITABLE; readiness is
//!   consumed by reading or writing until `WouldBlock`;
//! - a connection reads at most [`MAX_READS_PER_TURN`] buffers per turn, then
//!   yields and is picked up again at the end of the turn (fairness);
//! - reads go into the worker's one read buffer; only unconsumed bytes (a
//!   partial head or frame header) are copied into the connection;
//! - replies are queued, and every dirty connection is flushed once at the end
//!   of the turn with one `writev` per connection (more only on partial writes);
//! - a connection whose outbound queue passes the bound stops being read until
//!   the queue drains to half (backpressure, never unbounded memory).
//!
//! With `--tls-cert`, each connection's bytes go through its TLS session
//! (`tls.rs`): decrypted before the core reads them, the queue encrypted
//! as the socket takes it.
//!
//! The loop itself is [`super::backend::run`], the skeleton both backends
//! share; this file implements its [`Backend`] contract. Everything else
//! (protocol state, deadlines, delivery, drain) lives in
//! [`super::worker::Core`].

mod tls;

use super::Shared;
use super::backend::{self, Backend, READ_BUF_BYTES, is_resource_exhaustion};
use super::worker::{AfterFlush, Core, Header, Input, IoState};
use crate::proto::outbound::MAX_IOVECS;
use crate::proto::proxy::MAX_HEADER;
use crate::pubsub::bus::Inbox;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Token of the worker's listener.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the worker's waker (shutdown, cross-worker publishes).
pub const WAKER: Token = Token(usize::MAX - 2);
/// Reads per connection per loop turn before other connections get a turn.
pub const MAX_READS_PER_TURN: usize = 16;
/// Accepts per loop turn before connections get a turn.
pub const MAX_ACCEPTS_PER_TURN: usize = 256;
/// Readiness events fetched per `epoll_wait`.
const EVENTS_PER_POLL: usize = 1024;

pub(super) struct Worker {
    core: Core<TcpStream>,
    poll: Poll,
    /// The last wait's readiness events.
    events: Events,
    listener: Option<TcpListener>,
    /// The worker's one read buffer ([`READ_BUF_BYTES`]).
    buf: Box<[u8]>,
    accept_again: bool,
    accept_retry_at: Option<Instant>,
    /// The TLS sessions of this worker's connections, by slab key (none
    /// without `--tls-cert`): kept beside the slab so that a plain
    /// connection's entry stays as small as it is.
    tls: HashMap<usize, Box<tls::Session>>,
    /// The worker's ciphertext read buffer (allocated at the first TLS
    /// read).
    cipher: Box<[u8]>,
    /// The worker's ciphertext write buffer: records are sealed here and
    /// written at once (`tls::Worker::flush_tls`).
    tls_out: super::tls::Wire,
    /// TLS handshake steps left this turn (the current key's
    /// [`Certs::handshake_steps`](super::tls::Certs::handshake_steps)).
    tls_steps: u32,
    /// The event being handled says the peer shut its side (`EPOLLRDHUP`):
    /// a PROXY header still unfinished in the socket can then never
    /// complete, though peeking it never reads the end of input.
    peer_closed: bool,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        poll: Poll,
        listener: std::net::TcpListener,
        inbox: Inbox,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Self {
            core: Core::new(id, inbox, shared),
            poll,
            events: Events::with_capacity(EVENTS_PER_POLL),
            listener: Some(listener),
            buf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
            accept_again: false,
            accept_retry_at: None,
            tls: HashMap::new(),
            cipher: Box::default(),
            tls_out: super::tls::Wire::default(),
            tls_steps: 0,
            peer_closed: false,
        })
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub(super) fn run(mut self) {
        let id = self.core.id();
        info!(worker = id, "worker started (epoll)");
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend::run(&mut self)));
        if run.is_err() {
            // Its sockets close as the worker is dropped.
            self.core.shared().worker_failed(id);
            return;
        }
        info!(worker = id, "worker stopped");
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..MAX_ACCEPTS_PER_TURN {
            match listener.accept() {
                Ok((mut sock, peer)) => {
                    // Pushed frames must leave at once, not wait for Nagle.
                    let _ = sock.set_nodelay(true);
                    let key = self.core.vacant_key();
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!(worker = self.core.id(), error = %e, "register failed");
                        continue;
                    }
                    let admitted = self.core.admit(sock, Some(peer.ip()));
                    debug_assert_eq!(admitted, key);
                    tls::start(&mut self.core, &mut self.tls, key);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.core.stats().accept_error();
                    let errno = e.raw_os_error().unwrap_or(0);
                    if is_resource_exhaustion(errno) {
                        // The pending connection stays in the backlog; retry soon instead of spinning.
                        self.accept_retry_at = Some(backend::accept_exhausted(
                            self.core.id(),
                            errno,
                            self.core.now(),
                        ));
                        return;
                    }
                    debug!(worker = self.core.id(), error = %e, "accept failed");
                }
            }
        }
        self.accept_again = true;
    }

    fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.core.get(key) else {
            return;
        };
        match conn.state() {
            IoState::Active if !conn.read_paused() => self.read(key),
            IoState::Lingering => self.discard_input(key),
            _ => {}
        }
    }

    /// Reads and processes input until `WouldBlock`, the turn budget, or a stop.
    fn read(&mut self, key: usize) {
        if self.core.conn(key).awaits_proxy() && !self.read_proxy_header(key) {
            return;
        }
        if self.tls.contains_key(&key) {
            self.read_tls(key);
            return;
        }
        let mut budget_used_up = true;
        for _ in 0..MAX_READS_PER_TURN {
            let conn = self.core.conn_mut(key);
            let kept = conn.restore_pending(&mut self.buf);
            match conn.io_mut().read(&mut self.buf[kept..]) {
                Ok(0) => {
                    self.core.eof(key);
                    budget_used_up = false;
                    break;
                }
                Ok(n) => {
                    if self.core.input(key, &mut self.buf[..kept + n]) == Input::Stop {
                        budget_used_up = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    budget_used_up = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    Worker::remove(self, key);
                    return;
                }
            }
        }
        if budget_used_up {
            // Still readable, but others get their turn first.
            self.core.read_again(key);
        }
        self.core.after_input(key);
    }

    /// A connection on a PROXY protocol listener, its header not yet
    /// taken: the header is peeked (the socket keeps the bytes until it is
    /// whole, so nothing is held here), judged, and then read off alone,
    /// leaving the client's own bytes to the usual read. `true` when the
    /// header is gone and reading goes on.
    fn read_proxy_header(&mut self, key: usize) -> bool {
        let peeked = loop {
            match self
                .core
                .conn_mut(key)
                .io_mut()
                .peek(&mut self.buf[..MAX_HEADER])
            {
                Ok(0) => {
                    self.core.eof(key);
                    self.core.after_input(key);
                    return false;
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    Worker::remove(self, key);
                    return false;
                }
            }
        };
        match self.core.proxy_header(key, &self.buf[..peeked]) {
            // The client shut its side with the header unfinished: it
            // can never complete. The peeked bytes are taken off (a socket
            // closed with unread bytes resets the connection) and the
            // connection ends as at any end of input, at once rather than
            // at the request deadline (as io_uring, which reads the header,
            // sees the end).
            Header::Wait if self.peer_closed => {
                let _ = self
                    .core
                    .conn_mut(key)
                    .io_mut()
                    .read(&mut self.buf[..peeked]);
                self.core.eof(key);
                self.core.after_input(key);
                false
            }
            // The next segment raises a new edge; the request deadline
            // bounds a header that never completes.
            Header::Wait => false,
            Header::Done(n) => {
                // The peeked bytes are in the socket: this read takes them.
                match self.core.conn_mut(key).io_mut().read(&mut self.buf[..n]) {
                    Ok(got) if got == n => true,
                    _ => {
                        Worker::remove(self, key);
                        false
                    }
                }
            }
            Header::Refused => {
                // The answer is plain text, also on the TLS listener.
                if let Some(s) = self.tls.remove(&key) {
                    self.core.charge_wire(key, s.charged(), 0);
                }
                self.core.after_input(key);
                false
            }
        }
    }

    /// In the lingering state: read and drop input until EOF.
    fn discard_input(&mut self, key: usize) {
        let conn = self.core.conn_mut(key);
        for _ in 0..MAX_READS_PER_TURN {
            match conn.io_mut().read(&mut self.buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        // EOF, an error, or a peer flooding us after its close: done with it.
        Worker::remove(self, key);
    }

    /// Writes the outbound queue with vectored writes until empty or `WouldBlock`.
    fn flush(&mut self, key: usize) {
        if self.tls.contains_key(&key) {
            self.flush_tls(key);
            return;
        }
        let core = &mut self.core;
        let (io, out) = core.conn_mut(key).io_and_out();
        let mut total = 0;
        let mut failed = false;
        while !out.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = out.gather(&mut iov);
            let offered: usize = iov[..n].iter().map(|s| s.len()).sum();
            match io.write_vectored(&iov[..n]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(written) => {
                    out.advance(written);
                    total += written;
                    if written < offered {
                        // A short write means the send buffer is full (the kernel has
                        // set SOCK_NOSPACE): the writable edge will come. Trying again
                        // now would only cost a syscall returning EAGAIN.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        core.stats().bytes_sent(total);
        if failed {
            remove(core, key);
            return;
        }
        match core.after_flush(key, total) {
            AfterFlush::Keep => {}
            AfterFlush::Remove => remove(core, key),
            AfterFlush::ShutdownWrite => {
                let _ = core.conn_mut(key).io_mut().shutdown(Shutdown::Write);
                // Input may already be waiting (the peer's close reply): consume it now,
                // since the edge that announced it may have passed.
                self.discard_input(key);
            }
        }
    }
}

/// Closes `key`: it leaves its topics and its socket is closed (which also
/// takes it out of the epoll set: no deregister call needed).
fn remove(core: &mut Core<TcpStream>, key: usize) {
    core.retire(key);
    drop(core.free(key));
}

impl Worker {
    /// Closes `key` and drops its TLS session, if any. A PROXY header
    /// still awaited is only peeked so far: its bytes are read off first,
    /// since a socket closed with unread bytes resets the connection (at
    /// the request deadline it ends with a FIN, as on io_uring, which has
    /// read them).
    fn remove(&mut self, key: usize) {
        if let Some(tls) = self.tls.remove(&key) {
            self.core.charge_wire(key, tls.charged(), 0);
        }
        if self.core.conn(key).awaits_proxy() {
            let _ = self
                .core
                .conn_mut(key)
                .io_mut()
                .read(&mut self.buf[..MAX_HEADER]);
        }
        remove(&mut self.core, key);
    }
}

impl Backend for Worker {
    type Io = TcpStream;

    fn core(&mut self) -> &mut Core<TcpStream> {
        &mut self.core
    }

    fn wait(&mut self, busy: bool, deadline: Option<Instant>) -> io::Result<()> {
        let now = Instant::now();
        let timeout = if busy || self.accept_again {
            Some(Duration::ZERO)
        } else {
            deadline.map(|t| t.saturating_duration_since(now))
        };
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.events.clear();
                Ok(())
            }
            other => other,
        }
    }

    fn handle_events(&mut self) {
        self.tls_steps = self.core.handshake_steps_per_turn();
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(),
                // The inbox is drained every turn; the wake-up only ends the wait.
                WAKER => {}
                Token(key) => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.peer_closed = ev.is_read_closed();
                        self.on_readable(key);
                        self.peer_closed = false;
                    }
                    if ev.is_writable() && self.core.get(key).is_some() {
                        // Written at the end of the turn, together with whatever
                        // this turn queues for it: one writev, not two.
                        self.core.mark_dirty(key);
                    }
                }
            }
        }
        self.events = events;
    }

    fn sweep(&mut self) {
        for s in self.tls.values_mut() {
            s.sweep();
        }
    }

    fn before_end_of_turn(&mut self) {
        if self.accept_again {
            self.accept_again = false;
            self.accept();
        }
        if self.accept_retry_at.is_some_and(|t| self.core.now() >= t) {
            self.accept_retry_at = None;
            self.accept();
        }
    }

    fn reread(&mut self, key: usize) {
        self.on_readable(key);
    }

    fn flush(&mut self, key: usize) {
        Worker::flush(self, key);
    }

    fn remove(&mut self, key: usize) {
        Worker::remove(self, key);
    }

    fn stop_accepting(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_again = false;
        self.accept_retry_at = None;
    }

    fn deadline(&self) -> Option<Instant> {
        self.accept_retry_at
    }

    fn exit(&mut self) {
        if !self.core.is_empty() {
            warn!(
                worker = self.core.id(),
                left = self.core.len(),
                "drain deadline passed; dropping connections"
            );
        }
        let keys = self.core.keys();
        for key in keys {
            Worker::remove(self, key);
        }
        self.core.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::worker::Conn;

    /// An idle epoll subscriber's slab entry, accounted byte by byte in
    /// docs/BENCHMARKS.md ("Idle memory per subscriber, accounted"): the
    /// descriptor (4; mio adds a 12-byte selector id in debug builds), the
    /// `Session` (64), serial, keepalive time and budget charge (4 each),
    /// state and flags (1 each), padded to 8.
    #[test]
    fn an_epoll_connection_entry_stays_88_bytes() {
        let expected = if cfg!(debug_assertions) { 96 } else { 88 };
        assert_eq!(std::mem::size_of::<Conn<TcpStream>>(), expected);
    }
}
