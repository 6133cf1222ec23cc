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
use super::config::Config;
use super::session::{Ctx, Next, Push, Session};
use super::stats::WorkerStats;
use crate::proto::CloseCode;
use crate::proto::outbound::{COPY_BELOW, MAX_IOVECS};
use crate::pubsub::bus::{Inbox, MAILBOX_HIGH_WATER, Publication};
use crate::pubsub::shard::Shard;
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
/// Deadline queues emptied with more capacity than this are shrunk.
const SHRINK_ABOVE: usize = 1024;
/// How often throttled publishers check whether the mailboxes drained.
const THROTTLE_RECHECK: Duration = Duration::from_millis(1);
/// Bounds on the keepalive sweep period (a quarter of the shorter of the
/// ping interval and timeout): often enough to be accurate to ~25 %, rare
/// enough that walking 100 000 connections costs < 0.1 % of a core.
const SWEEP_MIN: Duration = Duration::from_millis(10);
const SWEEP_MAX: Duration = Duration::from_secs(1);

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
    /// A keepalive ping is out and unanswered (nothing received since).
    ping_pending: bool,
    /// When input last arrived, or the ping went out: milliseconds since
    /// the worker started (wrapping; compared by difference).
    last_rx_ms: u32,
    ping_sent_ms: u32,
    /// `session.requests()` when the current request deadline was armed.
    request_gen: u32,
}

impl Conn {
    /// Lists the connection (slab key `key`) for the end-of-turn flush, once.
    fn mark_dirty(&mut self, key: usize, list: &mut Vec<ConnRef>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.serial));
        }
    }
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
    /// Request-head deadlines, with the request generation they guard.
    /// (deadline, key, serial, generation); times in ms on the worker's
    /// clock, keys as u32: 24 bytes an entry, since there is one per
    /// connection accepted in the last timeout period.
    handshake_deadlines: VecDeque<(u64, u32, u32, u32)>,
    /// (deadline, key, serial).
    linger_deadlines: VecDeque<(u64, u32, u32)>,
    shard: Shard,
    inbox: Inbox,
    /// Publication times of what was delivered this turn (latency histogram).
    delivered: Vec<Instant>,
    /// Subscribers found over their bound while delivering.
    slow: Vec<ConnRef>,
    /// Publishers paused because a mailbox is over its high-water mark.
    throttled: Vec<ConnRef>,
    /// Start of the worker's millisecond clock.
    epoch: Instant,
    /// Time at the top of this loop turn.
    now: Instant,
    next_sweep: Option<Instant>,
    accept_again: bool,
    accept_retry_at: Option<Instant>,
    drain_deadline: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        poll: Poll,
        listener: std::net::TcpListener,
        inbox: Inbox,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let shard = Shard::new(id, Arc::clone(&shared.directory), Arc::clone(&shared.bus));
        let now = Instant::now();
        let next_sweep = sweep_period(&shared.config).map(|p| now + p);
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
            shard,
            inbox,
            delivered: Vec::new(),
            slow: Vec::new(),
            throttled: Vec::new(),
            epoch: now,
            now,
            next_sweep,
            accept_again: false,
            accept_retry_at: None,
            drain_deadline: None,
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Milliseconds on the worker's clock at the top of this turn.
    fn now_ms(&self) -> u32 {
        self.now.duration_since(self.epoch).as_millis() as u32
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
            self.now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    // The inbox is drained every turn; the wake-up only ends the wait.
                    WAKER => {}
                    Token(key) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(key);
                        }
                        if ev.is_writable() {
                            // Written at the end of the turn, together with whatever
                            // this turn queues for it: one writev, not two.
                            if let Some(c) = self.conns.get_mut(key) {
                                c.mark_dirty(key, &mut self.dirty);
                            }
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
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key);
        }
        info!(worker = self.id, "worker stopped");
    }

    /// Work that is batched per turn: deferred reads and accepts, delivery
    /// of this turn's publications, the flush of every dirty connection, and
    /// expired deadlines.
    fn end_of_turn(&mut self) {
        if self.accept_again {
            self.accept_again = false;
            self.accept();
        }
        if self.accept_retry_at.is_some_and(|t| self.now >= t) {
            self.accept_retry_at = None;
            self.accept();
        }
        // Taken out while walked (the walk may queue more), then handed back
        // cleared so the capacity is reused turn after turn.
        let mut reread = std::mem::take(&mut self.reread);
        for &(key, serial) in &reread {
            if self.is_current(key, serial) {
                self.on_readable(key);
            }
        }
        reread.clear();
        if self.reread.is_empty() {
            self.reread = reread;
        }
        self.deliver();
        let mut dirty = std::mem::take(&mut self.dirty);
        for &(key, serial) in &dirty {
            if self.is_current(key, serial) {
                self.conns[key].dirty = false;
                self.flush(key);
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
        if !self.delivered.is_empty() {
            let written = Instant::now();
            let stats = &self.shared.stats[self.id];
            for t in self.delivered.drain(..) {
                stats.observe_latency(written.saturating_duration_since(t));
            }
        }
        self.unthrottle();
        if self.next_sweep.is_some_and(|t| self.now >= t) {
            self.keepalive_sweep();
        }
        self.expire(Instant::now());
    }

    /// Hands every publication of this turn (from other workers' batches and
    /// from local publishers) to the local subscribers' queues.
    fn deliver(&mut self) {
        let cfg = &self.shared.config;
        let stats = &self.shared.stats[self.id];
        let conns = &mut self.conns;
        let dirty = &mut self.dirty;
        let slow = &mut self.slow;
        let delivered = &mut self.delivered;
        let shard = &mut self.shard;
        let mut last: *const Publication = std::ptr::null();
        let mut to_conns = |run: &[Publication], targets: &[(usize, u32)]| {
            // Called once per chunk of subscribers: record each run's times once.
            if !std::ptr::eq(last, run.as_ptr()) {
                last = run.as_ptr();
                delivered.extend(run.iter().map(|p| p.published_at));
            }
            push_to(conns, dirty, slow, cfg, stats, run, targets);
        };
        self.inbox.drain(&self.shared.bus, |batch| {
            shard.deliver(&batch, &mut to_conns);
        });
        shard.dispatch(&mut to_conns);
        for (key, serial) in std::mem::take(&mut self.slow) {
            if self.is_current(key, serial) && self.conns[key].state == IoState::Active {
                self.start_closing(key);
            }
        }
    }

    /// Resumes throttled publishers once every mailbox is below half its mark.
    fn unthrottle(&mut self) {
        if self.throttled.is_empty() || self.shared.bus.max_queued_bytes() > MAILBOX_HIGH_WATER / 2
        {
            return;
        }
        for (key, serial) in std::mem::take(&mut self.throttled) {
            if self.is_current(key, serial) {
                self.conns[key].read_paused = false;
                self.reread.push((key, serial));
            }
        }
    }

    /// Pings connections idle for the ping interval; closes those whose ping
    /// went unanswered for the ping timeout.
    fn keepalive_sweep(&mut self) {
        let cfg = &self.shared.config;
        let Some(period) = sweep_period(cfg) else {
            return;
        };
        self.next_sweep = Some(self.now + period);
        let interval = cfg.ping_interval.map_or(u32::MAX, |d| d.as_millis() as u32);
        let timeout = cfg.ping_timeout.as_millis() as u32;
        let now = self.now_ms();
        let stats = &self.shared.stats[self.id];
        let mut timed_out = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            // A connection we are not reading (its queue is over the bound, or a
            // throttled publisher) cannot show us its pong: not judged while paused.
            if conn.state != IoState::Active || !conn.session.is_websocket() || conn.read_paused {
                continue;
            }
            if conn.ping_pending {
                if now.wrapping_sub(conn.ping_sent_ms) >= timeout {
                    timed_out.push(key);
                }
            } else if now.wrapping_sub(conn.last_rx_ms) >= interval && conn.session.ping() {
                stats.keepalive_ping();
                conn.ping_pending = true;
                conn.ping_sent_ms = now;
                conn.mark_dirty(key, &mut self.dirty);
            }
        }
        for key in timed_out {
            self.shared.stats[self.id].keepalive_timeout();
            debug!(worker = self.id, "keepalive timeout");
            self.conns[key]
                .session
                .close(CloseCode::GOING_AWAY, "keepalive timeout");
            self.start_closing(key);
        }
    }

    fn is_current(&self, key: usize, serial: u32) -> bool {
        self.conns.get(key).is_some_and(|c| c.serial == serial)
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.reread.is_empty() || !self.dirty.is_empty() || self.accept_again {
            return Some(Duration::ZERO);
        }
        [
            self.handshake_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            self.linger_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            self.accept_retry_at,
            self.drain_deadline,
            self.next_sweep,
            (!self.throttled.is_empty()).then(|| now + THROTTLE_RECHECK),
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
        let now_ms = self.now_ms();
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
                        ping_pending: false,
                        last_rx_ms: now_ms,
                        ping_sent_ms: 0,
                        request_gen: 0,
                    });
                    self.shared.stats[self.id].connection_opened();
                    let at = ms_after(
                        self.epoch,
                        Instant::now(),
                        self.shared.config.handshake_timeout,
                    );
                    self.handshake_deadlines
                        .push_back((at, key as u32, serial, 0));
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
        let now_ms = self.now.duration_since(self.epoch).as_millis() as u32;
        let conn = &mut self.conns[key];
        let serial = conn.serial;
        let mut ctx = Ctx {
            shared: &self.shared,
            stats,
            shard: &mut self.shard,
            me: (key, serial),
            now: self.now,
        };
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
                    conn.last_rx_ms = now_ms;
                    conn.ping_pending = false;
                    let next = conn.session.on_input(&mut self.buf[..kept + n], &mut ctx);
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
                    if conn.session.is_publisher()
                        && ctx.shard.bus().max_queued_bytes() > MAILBOX_HIGH_WATER
                    {
                        // Resumed by `unthrottle` once the mailboxes drain.
                        stats.publisher_throttled();
                        conn.read_paused = true;
                        self.throttled.push((key, serial));
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
        if conn.session.awaiting_request() && conn.session.requests() != conn.request_gen {
            // A keep-alive HTTP connection finished a request: the next one gets a fresh deadline.
            conn.request_gen = conn.session.requests();
            let at = ms_after(self.epoch, self.now, cfg.handshake_timeout);
            self.handshake_deadlines
                .push_back((at, key as u32, serial, conn.request_gen));
        }
        let (closing, has_output) = (conn.state == IoState::Closing, !conn.session.out.is_empty());
        if budget_used_up {
            // Still readable, but others get their turn first.
            self.reread.push((key, serial));
        }
        if closing {
            self.start_closing(key);
        } else if has_output {
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
        debug_assert_eq!(self.conns[key].serial, serial);
        self.conns[key].mark_dirty(key, &mut self.dirty);
    }

    /// Stops reading `key`: it leaves its topics, what is queued is flushed
    /// at the end of the turn, and it is dropped after [`LINGER`] at the latest.
    fn start_closing(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.state = IoState::Closing;
        conn.session
            .detach(&mut self.shard, &self.shared.stats[self.id]);
        let serial = conn.serial;
        self.push_linger(key, serial, self.now);
        self.mark_dirty(key, serial);
    }

    fn push_linger(&mut self, key: usize, serial: u32, now: Instant) {
        let at = ms_after(self.epoch, now, LINGER);
        self.linger_deadlines.push_back((at, key as u32, serial));
    }

    /// Writes the outbound queue with vectored writes until empty or `WouldBlock`.
    fn flush(&mut self, key: usize) {
        let max_outbound = self.shared.config.max_outbound_bytes;
        let stats = &self.shared.stats[self.id];
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while !conn.session.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = conn.session.out.gather(&mut iov);
            let offered: usize = iov[..n].iter().map(|s| s.len()).sum();
            match conn.sock.write_vectored(&iov[..n]) {
                Ok(0) => {
                    self.remove(key);
                    return;
                }
                Ok(written) => {
                    stats.bytes_sent(written);
                    conn.session.out.advance(written);
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
                    self.remove(key);
                    return;
                }
            }
        }
        if conn.read_paused
            && conn.session.out.len() <= max_outbound / 2
            && !self.throttled.contains(&(key, conn.serial))
        {
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
            let serial = conn.serial;
            self.push_linger(key, serial, Instant::now());
            // Input may already be waiting (the peer's close reply): consume it now,
            // since the edge that announced it may have passed.
            self.discard_input(key);
        }
    }

    fn expire(&mut self, now: Instant) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        while let Some(&(deadline, key, serial, generation)) = self.handshake_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.is_current(key, serial) {
                let conn = &self.conns[key];
                if conn.session.awaiting_request()
                    && conn.state == IoState::Active
                    && conn.request_gen == generation
                {
                    self.stats().handshake_timeout();
                    debug!(worker = self.id, "request timed out");
                    self.remove(key);
                }
            }
        }
        // After a connection storm, give the queues' memory back.
        if self.handshake_deadlines.is_empty() && self.handshake_deadlines.capacity() > SHRINK_ABOVE
        {
            self.handshake_deadlines.shrink_to_fit();
        }
        if self.linger_deadlines.is_empty() && self.linger_deadlines.capacity() > SHRINK_ABOVE {
            self.linger_deadlines.shrink_to_fit();
        }
        while let Some(&(deadline, key, serial)) = self.linger_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
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
                // Still in an HTTP request: nothing to say goodbye to.
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: usize) {
        // Closing the descriptor removes it from the epoll set: no deregister call needed.
        let mut conn = self.conns.remove(key);
        let stats = &self.shared.stats[self.id];
        conn.session.detach(&mut self.shard, stats);
        drop(conn);
        stats.connection_closed();
    }
}

/// Queues a run of publications of one topic for each target, subscriber by
/// subscriber, applying the slow-consumer policy.
fn push_to(
    conns: &mut Slab<Conn>,
    dirty: &mut Vec<ConnRef>,
    slow: &mut Vec<ConnRef>,
    cfg: &Config,
    stats: &WorkerStats,
    run: &[Publication],
    targets: &[ConnRef],
) {
    // Room for the run's small frames, reserved once per subscriber instead
    // of growing the tail buffer step by step.
    let small: usize = run
        .iter()
        .map(|p| p.frame.len())
        .filter(|&n| n < COPY_BELOW)
        .sum();
    let mut sent = 0;
    for &(key, serial) in targets {
        let Some(conn) = conns.get_mut(key) else {
            continue;
        };
        debug_assert_eq!(conn.serial, serial, "registry holds a stale connection");
        conn.session.out.reserve_tail(small);
        let mut queued = false;
        for p in run {
            match conn.session.push_published(&p.frame, cfg) {
                Push::Queued => {
                    sent += 1;
                    queued = true;
                }
                Push::Ignored => break,
                Push::Dropped => stats.frame_dropped(),
                Push::SlowConsumer { discarded } => {
                    stats.slow_consumer_disconnect(discarded);
                    slow.push((key, serial));
                    queued = true;
                    break;
                }
            }
        }
        if queued {
            conn.mark_dirty(key, dirty);
        }
    }
    stats.frames_sent(sent);
}

/// `now + after` in milliseconds since `epoch` (rounded up, so a deadline
/// never fires early).
fn ms_after(epoch: Instant, now: Instant, after: Duration) -> u64 {
    (now.saturating_duration_since(epoch) + after)
        .as_micros()
        .div_ceil(1000) as u64
}

/// The keepalive sweep period, or `None` with keepalive off.
fn sweep_period(cfg: &Config) -> Option<Duration> {
    let interval = cfg.ping_interval?;
    Some((interval.min(cfg.ping_timeout) / 4).clamp(SWEEP_MIN, SWEEP_MAX))
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
