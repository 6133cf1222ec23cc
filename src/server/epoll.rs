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
//! Timeouts use FIFO queues: each kind has one constant duration, so
//! deadlines are pushed in order and checked from the front.

use super::Shared;
use super::session::{Next, Session};
use super::stats::WorkerStats;
use crate::proto::CloseCode;
use crate::proto::outbound::MAX_IOVECS;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Token of the worker's listener.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the worker's waker (shutdown, later cross-worker publishes).
pub const WAKER: Token = Token(usize::MAX - 2);
/// The worker's shared read buffer. 64 KiB: one read drains a full default
/// socket receive queue chunk while staying in L2.
pub const READ_BUF_BYTES: usize = 64 * 1024;
/// Reads per connection per loop turn before other connections get a turn.
pub const MAX_READS_PER_TURN: usize = 16;
/// Accepts per loop turn before connections get a turn.
pub const MAX_ACCEPTS_PER_TURN: usize = 256;
/// Readiness events fetched per `epoll_wait`.
const EVENTS_PER_POLL: usize = 1024;
/// How long a closing connection may take: to read our last bytes (close
/// frame, refusal) and then to send its FIN. A peer that stops reading
/// while we close is dropped after this, once per phase.
const LINGER: Duration = Duration::from_secs(2);
/// Pause before accepting again after the process ran out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoState {
    /// Reading and writing.
    Active,
    /// Writing what is queued; then shut down the write side.
    Closing,
    /// Write side shut down; discarding input until the peer's FIN or the linger deadline.
    /// (`Closing` and `Lingering` each get a deadline of [`LINGER`].)
    Lingering,
}

struct Conn {
    sock: TcpStream,
    session: Session,
    /// Distinguishes this connection from later ones reusing its slab key.
    serial: u32,
    state: IoState,
    /// Stopped reading because the outbound queue is over its bound.
    read_paused: bool,
    /// The peer sent FIN: once the queue is flushed there is nothing to wait for.
    peer_eof: bool,
    /// Already in the dirty list this turn.
    dirty: bool,
}

/// A (slab key, serial) pair that survives key reuse.
type ConnRef = (usize, u32);

pub(super) struct Worker {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    buf: Box<[u8]>,
    shared: Arc<Shared>,
    next_serial: u32,
    /// Connections to flush at the end of the turn.
    dirty: Vec<ConnRef>,
    /// Connections to read again at the end of the turn (budget used up or unpaused).
    reread: Vec<ConnRef>,
    handshake_deadlines: VecDeque<(Instant, ConnRef)>,
    linger_deadlines: VecDeque<(Instant, ConnRef)>,
    accept_again: bool,
    accept_retry_at: Option<Instant>,
    drain_deadline: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        poll: Poll,
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Self {
            id,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            buf: vec![0u8; READ_BUF_BYTES].into_boxed_slice(),
            shared,
            next_serial: 0,
            dirty: Vec::new(),
            reread: Vec::new(),
            handshake_deadlines: VecDeque::new(),
            linger_deadlines: VecDeque::new(),
            accept_again: false,
            accept_retry_at: None,
            drain_deadline: None,
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub(super) fn run(mut self) {
        info!(worker = self.id, "worker started (epoll)");
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(worker = self.id, error = %e, "epoll_wait failed; worker stops");
                break;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(key);
                        }
                        if ev.is_writable() {
                            self.flush(key);
                        }
                    }
                }
            }
            self.end_of_turn();
            if self.shared.shutdown.load(Ordering::Acquire) && self.drain_deadline.is_none() {
                self.begin_drain();
            }
            if let Some(deadline) = self.drain_deadline
                && (self.conns.is_empty() || Instant::now() >= deadline)
            {
                break;
            }
        }
        if !self.conns.is_empty() {
            warn!(
                worker = self.id,
                left = self.conns.len(),
                "drain deadline passed; dropping connections"
            );
        }
        for conn in self.conns.drain() {
            drop(conn);
            self.shared.stats[self.id].connection_closed();
        }
        info!(worker = self.id, "worker stopped");
    }

    /// Work that is batched per turn: deferred reads and accepts, the flush of
    /// every dirty connection, and expired deadlines.
    fn end_of_turn(&mut self) {
        if self.accept_again {
            self.accept_again = false;
            self.accept();
        }
        if self.accept_retry_at.is_some_and(|t| Instant::now() >= t) {
            self.accept_retry_at = None;
            self.accept();
        }
        for (key, serial) in std::mem::take(&mut self.reread) {
            if self.is_current(key, serial) {
                self.on_readable(key);
            }
        }
        for (key, serial) in std::mem::take(&mut self.dirty) {
            if self.is_current(key, serial) {
                self.conns[key].dirty = false;
                self.flush(key);
            }
        }
        self.expire(Instant::now());
    }

    fn is_current(&self, key: usize, serial: u32) -> bool {
        self.conns.get(key).is_some_and(|c| c.serial == serial)
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.reread.is_empty() || !self.dirty.is_empty() || self.accept_again {
            return Some(Duration::ZERO);
        }
        [
            self.handshake_deadlines.front().map(|d| d.0),
            self.linger_deadlines.front().map(|d| d.0),
            self.accept_retry_at,
            self.drain_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..MAX_ACCEPTS_PER_TURN {
            match listener.accept() {
                Ok((mut sock, _peer)) => {
                    // Pushed frames must leave at once, not wait for Nagle.
                    let _ = sock.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        warn!(worker = self.id, error = %e, "register failed");
                        continue;
                    }
                    let serial = self.next_serial;
                    self.next_serial = self.next_serial.wrapping_add(1);
                    entry.insert(Conn {
                        sock,
                        session: Session::new(),
                        serial,
                        state: IoState::Active,
                        read_paused: false,
                        peer_eof: false,
                        dirty: false,
                    });
                    self.shared.stats[self.id].connection_opened();
                    let deadline = Instant::now() + self.shared.config.handshake_timeout;
                    self.handshake_deadlines
                        .push_back((deadline, (key, serial)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.shared.stats[self.id].accept_error();
                    if is_resource_exhaustion(&e) {
                        // The pending connection stays in the backlog; retry soon instead of spinning.
                        warn!(worker = self.id, error = %e, "accept failed: out of resources; retrying shortly");
                        self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                        return;
                    }
                    debug!(worker = self.id, error = %e, "accept failed");
                }
            }
        }
        self.accept_again = true;
    }

    fn on_readable(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.state {
            IoState::Active if !conn.read_paused => self.read(key),
            IoState::Lingering => self.discard_input(key),
            _ => {}
        }
    }

    /// Reads and processes input until `WouldBlock`, the turn budget, or a stop.
    fn read(&mut self, key: usize) {
        let cfg = &self.shared.config;
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        let mut budget_used_up = true;
        for _ in 0..MAX_READS_PER_TURN {
            let kept = conn.session.restore_pending(&mut self.buf);
            match conn.sock.read(&mut self.buf[kept..]) {
                Ok(0) => {
                    conn.peer_eof = true;
                    conn.state = IoState::Closing;
                    budget_used_up = false;
                    break;
                }
                Ok(n) => {
                    let next = conn.session.on_input(&mut self.buf[..kept + n], cfg, stats);
                    if next == Next::FlushAndClose {
                        conn.state = IoState::Closing;
                        budget_used_up = false;
                        break;
                    }
                    if conn.session.out.len() > cfg.max_outbound_bytes {
                        // Resumed by `flush` once the queue is down to half.
                        conn.read_paused = true;
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
                    self.remove(key);
                    return;
                }
            }
        }
        let serial = conn.serial;
        if conn.state == IoState::Closing {
            self.linger_deadlines
                .push_back((Instant::now() + LINGER, (key, serial)));
        }
        if budget_used_up {
            // Still readable, but others get their turn first.
            self.reread.push((key, serial));
        }
        if !conn.session.out.is_empty() || conn.state == IoState::Closing {
            self.mark_dirty(key, serial);
        }
    }

    /// In the lingering state: read and drop input until EOF.
    fn discard_input(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        for _ in 0..MAX_READS_PER_TURN {
            match conn.sock.read(&mut self.buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        // EOF, an error, or a peer flooding us after its close: done with it.
        self.remove(key);
    }

    fn mark_dirty(&mut self, key: usize, serial: u32) {
        let conn = &mut self.conns[key];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push((key, serial));
        }
    }

    /// Writes the outbound queue with vectored writes until empty or `WouldBlock`.
    fn flush(&mut self, key: usize) {
        let max_outbound = self.shared.config.max_outbound_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while !conn.session.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = conn.session.out.gather(&mut iov);
            match conn.sock.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.remove(key);
                    return;
                }
                Ok(written) => conn.session.out.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.remove(key);
                    return;
                }
            }
        }
        if conn.read_paused && conn.session.out.len() <= max_outbound / 2 {
            conn.read_paused = false;
            self.reread.push((key, conn.serial));
        }
        if conn.session.out.is_empty() && conn.state == IoState::Closing {
            if conn.peer_eof {
                self.remove(key);
                return;
            }
            let _ = conn.sock.shutdown(Shutdown::Write);
            conn.state = IoState::Lingering;
            let r = (key, conn.serial);
            self.linger_deadlines
                .push_back((Instant::now() + LINGER, r));
            // Input may already be waiting (the peer's close reply): consume it now,
            // since the edge that announced it may have passed.
            self.discard_input(key);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, (key, serial))) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.is_current(key, serial) {
                let conn = &self.conns[key];
                if !conn.session.is_open() && conn.state == IoState::Active {
                    self.stats().handshake_timeout();
                    debug!(worker = self.id, "handshake timed out");
                    self.remove(key);
                }
            }
        }
        while let Some(&(deadline, (key, serial))) = self.linger_deadlines.front() {
            if deadline > now {
                break;
            }
            self.linger_deadlines.pop_front();
            if self.is_current(key, serial) && self.conns[key].state != IoState::Active {
                self.remove(key);
            }
        }
    }

    /// Stops accepting and starts the close handshake on every open WebSocket.
    fn begin_drain(&mut self) {
        info!(worker = self.id, connections = self.conns.len(), "draining");
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_again = false;
        self.accept_retry_at = None;
        self.drain_deadline = Some(Instant::now() + self.shared.config.drain_timeout);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            if conn.state != IoState::Active {
                continue;
            }
            if conn
                .session
                .close(CloseCode::GOING_AWAY, "server shutting down")
            {
                let serial = conn.serial;
                self.mark_dirty(key, serial);
            } else {
                // Still in the handshake: nothing to say goodbye to.
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: usize) {
        // Closing the descriptor removes it from the epoll set: no deregister call needed.
        drop(self.conns.remove(key));
        self.shared.stats[self.id].connection_closed();
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
