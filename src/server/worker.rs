//! The backend-independent half of a worker: every connection's protocol
//! state, deadlines, keepalive, fan-out delivery and the drain.
//!
//! Both event loops ([`super::epoll`] and [`super::uring`]) own a
//! [`Core`] and add only what differs between them: how bytes come in, how
//! queued bytes go out, and how a socket is closed. Everything a client can
//! observe — limits, policies, timeouts, counters — is decided here, once,
//! so the two backends behave the same by construction.
//!
//! Timeouts use FIFO queues: each kind has one constant duration, so
//! deadlines are pushed in order and checked from the front.

use super::Shared;
use super::config::Config;
use super::session::{Ctx, Next, Push, Session};
use super::stats::{Undelivered, WorkerStats};
use crate::proto::CloseCode;
use crate::proto::handshake::{Reject, Status};
use crate::proto::outbound::COPY_BELOW;
use crate::pubsub::bus::{Inbox, Publication};
use crate::pubsub::shard::{ConnRef, Shard};
use bytes::Bytes;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// How long a closing connection may take: to read our last bytes (close
/// frame, refusal) and then to send its FIN. A peer that stops reading
/// while we close is dropped after this, once per phase.
pub const LINGER: Duration = Duration::from_secs(2);
/// Deadline queues emptied with more capacity than this are shrunk.
const SHRINK_ABOVE: usize = 1024;
/// How often throttled publishers check whether the mailboxes drained.
const THROTTLE_RECHECK: Duration = Duration::from_millis(1);
/// Bounds on the keepalive sweep period (a quarter of the shorter of the
/// ping interval and timeout): often enough to be accurate to ~25 %, rare
/// enough that walking 100 000 connections costs < 0.1 % of a core.
const SWEEP_MIN: Duration = Duration::from_millis(10);
const SWEEP_MAX: Duration = Duration::from_secs(1);
/// Deliveries (one publication into one subscriber's queue) a worker makes
/// from its mailbox per loop turn before it goes back to its own sockets,
/// accepts and timers; the rest waits for the next turn. 1 Mi: about
/// 130 ms of delivery on this machine (~7.5 M per second per worker,
/// docs/BENCHMARKS.md), and the whole of the benchmark's burst (200
/// messages to 5 000 subscribers per worker) in one turn. A smaller bound
/// splits bursts over more turns, and each turn costs every subscriber
/// another write.
pub const MAX_DELIVERIES_PER_TURN: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoState {
    /// Reading and writing.
    Active,
    /// Writing what is queued; then shut down the write side.
    Closing,
    /// Write side shut down; discarding input until the peer's FIN or the linger deadline.
    /// (`Closing` and `Lingering` each get a deadline of [`LINGER`].)
    Lingering,
    /// Closed as far as the server is concerned; the entry only waits for
    /// the kernel to finish operations that still point into it (io_uring).
    Gone,
}

/// One connection: the backend's handle `S` and the protocol state.
pub struct Conn<S> {
    pub io: S,
    pub session: Session,
    /// Distinguishes this connection from later ones reusing its slab key.
    pub serial: u32,
    pub state: IoState,
    /// Stopped reading because the outbound queue is over its bound.
    pub read_paused: bool,
    /// The peer sent FIN: once the queue is flushed there is nothing to wait for.
    pub peer_eof: bool,
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
    /// Bytes of this connection charged to the worker's buffer budget.
    charged: u32,
    /// The send deadline, by epochs: at `tx_ms` the queue held everything
    /// up to byte `tx_goal` of the connection's output (counted by `sent`,
    /// wrapping). Once `sent` passes `tx_goal` a new epoch starts; an epoch
    /// older than the send timeout means a queued byte waited that long.
    tx_ms: u32,
    tx_goal: u32,
    /// Bytes the kernel has taken from this connection's queue (wrapping).
    sent: u32,
    /// Counted by the admission limits (false: refused at accept).
    admitted: bool,
}

impl<S> Conn<S> {
    /// Lists the connection (slab key `key`) for the end-of-turn flush, once.
    fn mark_dirty(&mut self, key: usize, list: &mut Vec<ConnRef>) {
        if !self.dirty {
            self.dirty = true;
            list.push((key, self.serial));
        }
    }
}

/// What a backend does after flushing a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    /// Nothing to do (still open, or still has bytes to write).
    Keep,
    /// Everything is written and the peer already sent FIN: close it.
    Remove,
    /// Everything is written: shut the write side down (the connection is
    /// now lingering) and discard whatever the peer still sends.
    ShutdownWrite,
}

/// What one chunk of input did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Keep reading.
    More,
    /// Stop reading for now (closing, or paused by backpressure).
    Stop,
}

/// A worker's state apart from its sockets' I/O.
pub struct Core<S> {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub conns: Slab<Conn<S>>,
    next_serial: u32,
    /// Connections to flush at the end of the turn.
    pub dirty: Vec<ConnRef>,
    /// Connections to read again (epoll: budget used up; both: unpaused).
    pub reread: Vec<ConnRef>,
    /// Request-head deadlines, with the request generation they guard.
    /// (deadline, key, serial, generation); times in ms on the worker's
    /// clock, keys as u32: 24 bytes an entry, since there is one per
    /// connection accepted in the last timeout period.
    handshake_deadlines: VecDeque<(u64, u32, u32, u32)>,
    /// (deadline, key, serial).
    linger_deadlines: VecDeque<(u64, u32, u32)>,
    pub shard: Shard,
    inbox: Inbox,
    /// Publication times of what was delivered this turn (latency histogram).
    delivered: Vec<Instant>,
    /// Subscribers found over their bound while delivering.
    slow: Vec<ConnRef>,
    /// Publishers paused because a mailbox is over its high-water mark.
    throttled: Vec<ConnRef>,
    /// Publishers paused by `--max-publish-rate`, until the given time.
    paced: Vec<(Instant, usize, u32)>,
    /// A mailbox batch whose delivery the per-turn bound interrupted, with
    /// the index of its next publication.
    carry: Option<(Vec<Publication>, usize)>,
    /// Bytes charged to this worker's connections and shared frames, and
    /// the worker's budget.
    buffered: usize,
    budget: usize,
    /// Bytes the shard holds for this worker's clients, as charged to
    /// `buffered` at the last [`Self::sync_shard_charge`].
    shard_charged: usize,
    /// `/metrics` rendered this turn (at `now`), shared by every request
    /// that asks for it in the same turn.
    metrics: Option<(Instant, Bytes)>,
    /// The addresses of the connections counted per address (only with a
    /// per-address limit set): kept here, not in every connection's entry.
    addresses: HashMap<usize, IpAddr>,
    /// Start of the worker's millisecond clock.
    epoch: Instant,
    /// Time at the top of this loop turn ([`Self::begin_turn`]).
    now: Instant,
    next_sweep: Option<Instant>,
    pub drain_deadline: Option<Instant>,
}

impl<S> Core<S> {
    pub fn new(id: usize, inbox: Inbox, shared: Arc<Shared>) -> Self {
        let shard = Shard::new(id, Arc::clone(&shared.directory), Arc::clone(&shared.bus));
        let now = Instant::now();
        let next_sweep = sweep_period(&shared.config).map(|p| now + p);
        let budget = shared.config.buffered_bytes_per_worker();
        Self {
            id,
            shared,
            conns: Slab::new(),
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
            paced: Vec::new(),
            carry: None,
            buffered: 0,
            budget,
            shard_charged: 0,
            metrics: None,
            addresses: HashMap::new(),
            epoch: now,
            now,
            next_sweep,
            drain_deadline: None,
        }
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Starts a loop turn at `now`: every deadline and rate decided until
    /// the next call uses it (the core reads no clock of its own).
    pub fn begin_turn(&mut self, now: Instant) {
        self.now = now;
    }

    /// The time of this loop turn.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Milliseconds on the worker's clock at the top of this turn.
    fn now_ms(&self) -> u32 {
        self.now.duration_since(self.epoch).as_millis() as u32
    }

    /// Is `key` still the connection `serial` names, and not yet gone?
    pub fn is_current(&self, key: usize, serial: u32) -> bool {
        self.conns
            .get(key)
            .is_some_and(|c| c.serial == serial && c.state != IoState::Gone)
    }

    /// Adds a freshly accepted connection from `peer` (when the backend
    /// knows it); returns its key. Its request head has the handshake
    /// timeout from now. A connection over an admission limit is answered
    /// 503 at once and closed: the backend treats it like any other.
    pub fn admit(&mut self, io: S, peer: Option<IpAddr>) -> usize {
        let now_ms = self.now_ms();
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let admitted = self.shared.admission.admit(peer);
        let key = self.conns.insert(Conn {
            io,
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
            charged: 0,
            tx_ms: now_ms,
            tx_goal: 0,
            sent: 0,
            admitted: admitted.is_ok(),
        });
        if let (Ok(ticket), Some(ip)) = (admitted, peer)
            && ticket.per_ip
        {
            self.addresses.insert(key, ip);
        }
        self.stats().connection_opened();
        if let Err(why) = admitted {
            let stats = &self.shared.stats[self.id];
            stats.connection_refused(why);
            debug!(
                worker = self.id,
                ?peer,
                limit = why.label(),
                "connection refused"
            );
            self.conns[key]
                .session
                .refuse(Reject::new(Status::ServiceUnavailable, why.reason()), stats);
            self.start_closing(key);
            return key;
        }
        let at = ms_after(self.epoch, self.now, self.shared.config.handshake_timeout);
        self.handshake_deadlines
            .push_back((at, key as u32, serial, 0));
        key
    }

    /// Re-measures what `key` holds against the buffer budget; `true` when
    /// it grew and the worker is now over its budget.
    fn recharge(&mut self, key: usize) -> bool {
        let conn = &mut self.conns[key];
        recharge(conn, &mut self.buffered, &self.shared.stats[self.id])
            && self.buffered > self.budget
    }

    /// Processes input for `key`: `buf` holds the bytes kept from earlier
    /// input (see [`Session::restore_pending`]) followed by the new ones.
    pub fn input(&mut self, key: usize, buf: &mut [u8]) -> Input {
        let now_ms = self.now_ms();
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        conn.last_rx_ms = now_ms;
        conn.ping_pending = false;
        let mut ctx = Ctx {
            shared: &self.shared,
            stats,
            shard: &mut self.shard,
            me: (key, conn.serial),
            now: self.now,
            now_ms,
            peer: if self.addresses.is_empty() {
                None
            } else {
                self.addresses.get(&key).copied()
            },
            metrics: &mut self.metrics,
        };
        let next = conn.session.on_input(buf, &mut ctx);
        // What it subscribed to or published is charged here too.
        let shard_grew = self.sync_shard_charge();
        if self.recharge(key) || (shard_grew && self.buffered > self.budget) {
            // Over the buffer budget: this connection, which just grew, goes.
            let stats = &self.shared.stats[self.id];
            stats.budget_close();
            stats.ws_failure(CloseCode::TRY_AGAIN_LATER.0);
            debug!(
                worker = self.id,
                buffered = self.buffered,
                "buffer budget spent"
            );
            let conn = &mut self.conns[key];
            conn.session.abort(
                CloseCode::TRY_AGAIN_LATER,
                Status::ServiceUnavailable,
                "server memory budget exceeded",
                stats,
            );
            conn.state = IoState::Closing;
            self.recharge(key);
            return Input::Stop;
        }
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        if next == Next::FlushAndClose {
            conn.state = IoState::Closing;
            return Input::Stop;
        }
        let rate = self.shared.config.max_publish_rate;
        let wait = conn.session.publish_wait_ms(rate);
        if wait > 0 {
            // Over --max-publish-rate: not read until the debt is repaid.
            stats.publisher_paced();
            conn.read_paused = true;
            let at = self.now + Duration::from_millis(wait as u64);
            // io_uring may deliver input already received while paused: one
            // entry per connection, holding the latest resume time.
            let serial = conn.serial;
            match self.paced.iter_mut().find(|p| (p.1, p.2) == (key, serial)) {
                Some(p) => p.0 = p.0.max(at),
                None => self.paced.push((at, key, serial)),
            }
            return Input::Stop;
        }
        if conn.session.out.len() > self.shared.config.max_outbound_bytes {
            // Resumed by `after_flush` once the queue is down to half.
            conn.read_paused = true;
            return Input::Stop;
        }
        let published = conn.session.take_published();
        if (published || conn.session.is_publisher())
            && self.shard.bus().max_queued_bytes() > self.shared.config.mailbox_high_water
        {
            // Every publisher, WebSocket or HTTP, is held alike: not read
            // until the mailboxes drain (`unthrottle`), so pipelined
            // requests wait in the socket, not in a mailbox.
            stats.publisher_throttled();
            conn.read_paused = true;
            self.throttled.push((key, conn.serial));
            return Input::Stop;
        }
        Input::More
    }

    /// The peer sent FIN.
    pub fn eof(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.peer_eof = true;
        conn.state = IoState::Closing;
    }

    /// After a batch of input for `key`: re-arms the request deadline of a
    /// keep-alive connection, and starts closing or schedules the flush.
    pub fn after_input(&mut self, key: usize) {
        let cfg = &self.shared.config;
        let conn = &mut self.conns[key];
        let serial = conn.serial;
        if conn.session.awaiting_request() && conn.session.requests() != conn.request_gen {
            // A keep-alive HTTP connection finished a request: the next one gets a fresh deadline.
            conn.request_gen = conn.session.requests();
            let at = ms_after(self.epoch, self.now, cfg.handshake_timeout);
            self.handshake_deadlines
                .push_back((at, key as u32, serial, conn.request_gen));
        }
        if conn.state == IoState::Closing {
            self.start_closing(key);
        } else if !conn.session.out.is_empty() {
            self.mark_dirty(key);
        }
    }

    /// Lists `key` for the end-of-turn flush (once per turn).
    pub fn mark_dirty(&mut self, key: usize) {
        self.conns[key].mark_dirty(key, &mut self.dirty);
    }

    /// Takes the dirty list for the flush; each entry is cleared of its
    /// dirty mark (stale entries are skipped). Hand the vector back with
    /// [`Self::return_dirty`] to reuse its capacity.
    pub fn take_dirty(&mut self) -> Vec<ConnRef> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.retain(|&(key, serial)| {
            let current = self.conns.get(key).is_some_and(|c| c.serial == serial);
            if current {
                self.conns[key].dirty = false;
            }
            current && self.conns[key].state != IoState::Gone
        });
        dirty
    }

    /// Gives a list taken with [`Self::take_dirty`] back, cleared, to reuse its capacity.
    pub fn return_dirty(&mut self, mut list: Vec<ConnRef>) {
        list.clear();
        if self.dirty.is_empty() {
            self.dirty = list;
        }
    }

    /// Takes the re-read list; hand it back with [`Self::return_reread`].
    pub fn take_reread(&mut self) -> Vec<ConnRef> {
        std::mem::take(&mut self.reread)
    }

    pub fn return_reread(&mut self, mut list: Vec<ConnRef>) {
        list.clear();
        if self.reread.is_empty() {
            self.reread = list;
        }
    }

    /// Stops reading `key`: it leaves its topics, what is queued is flushed
    /// at the end of the turn, and it is dropped after [`LINGER`] at the latest.
    pub fn start_closing(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.state = IoState::Closing;
        conn.session
            .detach(&mut self.shard, &self.shared.stats[self.id]);
        let serial = conn.serial;
        self.push_linger(key, serial, self.now);
        self.mark_dirty(key);
    }

    fn push_linger(&mut self, key: usize, serial: u32, now: Instant) {
        let at = ms_after(self.epoch, now, LINGER);
        self.linger_deadlines.push_back((at, key as u32, serial));
    }

    /// After the backend wrote `wrote` bytes of `key`'s queue (0: none, or
    /// nothing was queued): resumes reading a connection paused by
    /// backpressure, and finishes a close once the queue is empty.
    pub fn after_flush(&mut self, key: usize, wrote: usize) -> AfterFlush {
        let max_outbound = self.shared.config.max_outbound_bytes;
        self.recharge(key);
        let conn = &mut self.conns[key];
        conn.sent = conn.sent.wrapping_add(wrote as u32);
        let serial = conn.serial;
        if conn.read_paused
            && conn.session.out.len() <= max_outbound / 2
            && !self.throttled.contains(&(key, serial))
            && !self.paced.iter().any(|&(_, k, s)| (k, s) == (key, serial))
        {
            conn.read_paused = false;
            self.reread.push((key, serial));
        }
        if !conn.session.out.is_empty() || conn.state != IoState::Closing {
            return AfterFlush::Keep;
        }
        if conn.peer_eof {
            return AfterFlush::Remove;
        }
        conn.state = IoState::Lingering;
        self.push_linger(key, serial, self.now);
        AfterFlush::ShutdownWrite
    }

    /// Sends this turn's publications to the interested workers' mailboxes
    /// (this one's included), then hands what the mailbox holds to the
    /// local subscribers' queues. Delivery stops after
    /// [`MAX_DELIVERIES_PER_TURN`]; the rest is carried to the next turn
    /// ([`Self::busy`] stays true meanwhile), so no flood, from this
    /// worker's publishers or another's, keeps it from its sockets and timers.
    pub fn deliver(&mut self) {
        self.shard.dispatch();
        let lost = self.shard.take_lost();
        if lost > 0 {
            self.stats().undelivered(Undelivered::WorkerStopped, lost);
        }
        // What the last turn's writes freed no longer counts; this turn's
        // publications do.
        self.shard.release_frames(false);
        self.sync_shard_charge();
        let cfg = &self.shared.config;
        let stats = &self.shared.stats[self.id];
        let conns = &mut self.conns;
        let dirty = &mut self.dirty;
        let slow = &mut self.slow;
        let delivered = &mut self.delivered;
        let shard = &mut self.shard;
        let mut budget = Budget {
            buffered: &mut self.buffered,
            limit: self.budget,
        };
        // The run last seen, reset before each `Shard::deliver` call (its
        // slice is alive for the call, so addresses cannot repeat within it).
        let last = std::cell::Cell::new(std::ptr::null::<Publication>());
        let work = std::cell::Cell::new(0usize);
        let mut to_conns = |run: &[Publication], targets: &[(usize, u32)]| {
            // Called once per chunk of subscribers: record each run's times once.
            if !std::ptr::eq(last.get(), run.as_ptr()) {
                last.set(run.as_ptr());
                delivered.extend(run.iter().map(|p| p.published_at));
            }
            work.set(work.get() + run.len() * targets.len());
            push_to(conns, dirty, slow, &mut budget, cfg, stats, run, targets);
        };
        let bus = &self.shared.bus;
        self.inbox.begin_drain(bus);
        loop {
            let (batch, mut pos) = match self.carry.take() {
                Some(carried) => carried,
                None => match self.inbox.next() {
                    Some(batch) => (batch, 0),
                    None => break,
                },
            };
            while pos < batch.len() && work.get() < MAX_DELIVERIES_PER_TURN {
                // Whole runs of one topic while they fit the bound, so each
                // subscriber still takes a run at a time.
                let end = shard.step_end(&batch, pos, MAX_DELIVERIES_PER_TURN - work.get());
                last.set(std::ptr::null());
                shard.deliver(&batch[pos..end], &mut to_conns);
                pos = end;
            }
            if pos < batch.len() {
                stats.delivery_deferred();
                self.carry = Some((batch, pos));
                break;
            }
            self.inbox.done(bus, &batch);
        }
        for (key, serial) in std::mem::take(&mut self.slow) {
            if self.is_current(key, serial) && self.conns[key].state == IoState::Active {
                self.start_closing(key);
            }
        }
    }

    /// Moves the budget (and its gauge) by the change in what the shard
    /// holds for this worker's clients (published frames, the topic
    /// registry) since the last call; `true` when it grew.
    fn sync_shard_charge(&mut self) -> bool {
        let now = self.shard.charged_bytes();
        let delta = now as isize - self.shard_charged as isize;
        if delta != 0 {
            self.shard_charged = now;
            self.buffered = (self.buffered as isize + delta) as usize;
            self.stats().buffered(delta);
        }
        delta > 0
    }

    /// Records the publish-to-write latency of what this turn delivered,
    /// now that it has been handed to the kernel.
    pub fn observe_written(&mut self) {
        if !self.delivered.is_empty() {
            let written = Instant::now();
            let stats = &self.shared.stats[self.id];
            for t in self.delivered.drain(..) {
                stats.observe_latency(written.saturating_duration_since(t));
            }
        }
    }

    /// Resumes throttled publishers once every mailbox is below half its
    /// mark, and paced publishers whose pause is over.
    pub fn unthrottle(&mut self) {
        if !self.paced.is_empty() {
            let now = self.now;
            let mut i = 0;
            while i < self.paced.len() {
                let (at, key, serial) = self.paced[i];
                if at > now {
                    i += 1;
                    continue;
                }
                self.paced.swap_remove(i);
                if self.is_current(key, serial) && !self.throttled.contains(&(key, serial)) {
                    self.conns[key].read_paused = false;
                    self.reread.push((key, serial));
                }
            }
        }
        if self.throttled.is_empty()
            || self.shared.bus.max_queued_bytes() > self.shared.config.mailbox_high_water / 2
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

    /// Runs the periodic sweep (keepalive, message deadline, admission
    /// table) when it is due.
    pub fn keepalive(&mut self) {
        if self.next_sweep.is_some_and(|t| self.now >= t) {
            self.sweep();
        }
    }

    /// Pings connections idle for the ping interval; closes those whose ping
    /// went unanswered for the ping timeout, and those that started a
    /// message longer than the message timeout ago.
    fn sweep(&mut self) {
        let Some(period) = sweep_period(&self.shared.config) else {
            return;
        };
        self.next_sweep = Some(self.now + period);
        self.shared
            .admission
            .sweep(self.id, self.shared.stats.len());
        // A published frame stuck in one stalled queue keeps the later ones
        // charged until the next full scan of the ledger: this one.
        self.shard.release_frames(true);
        self.sync_shard_charge();
        let cfg = &self.shared.config;
        let interval = cfg.ping_interval.map(|d| d.as_millis() as u32);
        let timeout = cfg.ping_timeout.as_millis() as u32;
        let message_timeout = cfg.message_timeout.map(|d| d.as_millis() as u32);
        let send_timeout = cfg.send_timeout.map(|d| d.as_millis() as u32);
        let now = self.now_ms();
        let stats = &self.shared.stats[self.id];
        let mut timed_out = Vec::new();
        let mut slow_messages = Vec::new();
        let mut stalled = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            // Closing and lingering connections have the linger deadline.
            if conn.state != IoState::Active {
                continue;
            }
            // The send timeout judges every open connection, read or paused,
            // WebSocket or HTTP: no queued byte may wait longer (a peer that
            // stops reading, or reads too slowly to ever catch up, is cut
            // however it got there; docs/SECURITY.md, "Deadlines").
            let out = conn.session.out.len();
            if out == 0 {
                conn.tx_ms = now;
                conn.tx_goal = conn.sent;
            } else if conn.sent.wrapping_sub(conn.tx_goal) as i32 >= 0 {
                // Everything queued when the epoch began has left: a new one.
                conn.tx_ms = now;
                conn.tx_goal = conn.sent.wrapping_add(out as u32);
            } else if send_timeout.is_some_and(|limit| now.wrapping_sub(conn.tx_ms) >= limit) {
                stalled.push(key);
                continue;
            }
            // A connection we are not reading (its queue is over the bound, or a
            // throttled or paced publisher) cannot show us its pong or finish
            // its message: not judged by those while paused. Its pause ends by
            // itself (the queue drains or the send timeout cuts it; the
            // mailboxes drain; the pace runs out).
            if !conn.session.is_websocket() || conn.read_paused {
                continue;
            }
            if let (Some(limit), Some(started)) = (message_timeout, conn.session.message_started())
                && now.wrapping_sub(started) >= limit
            {
                slow_messages.push(key);
                continue;
            }
            let Some(interval) = interval else {
                continue;
            };
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
            self.stats().keepalive_timeout();
            debug!(worker = self.id, "keepalive timeout");
            self.conns[key]
                .session
                .close(CloseCode::GOING_AWAY, "keepalive timeout");
            self.start_closing(key);
        }
        for key in stalled {
            let stats = &self.shared.stats[self.id];
            stats.send_timeout();
            debug!(worker = self.id, "send timeout");
            let conn = &mut self.conns[key];
            // Nothing queued is going anywhere: free it now, keeping only a
            // frame already partly on the wire.
            stats.send_timeout_discarded(conn.session.out.truncate_to_front());
            if conn.session.is_websocket() {
                stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
            }
            conn.session.abort(
                CloseCode::POLICY_VIOLATION,
                Status::RequestTimeout,
                "send timeout",
                stats,
            );
            self.recharge(key);
            self.start_closing(key);
        }
        for key in slow_messages {
            let stats = &self.shared.stats[self.id];
            stats.message_timeout();
            stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
            debug!(worker = self.id, "message timeout");
            self.conns[key].session.abort(
                CloseCode::POLICY_VIOLATION,
                Status::RequestTimeout,
                "message not finished in time",
                stats,
            );
            self.recharge(key);
            self.start_closing(key);
        }
    }

    /// The earliest time the worker must wake up for a deadline of its own
    /// (besides `extra`, the backend's).
    pub fn next_deadline(&self, now: Instant, extra: Option<Instant>) -> Option<Instant> {
        [
            self.handshake_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            self.linger_deadlines
                .front()
                .map(|d| self.epoch + Duration::from_millis(d.0)),
            extra,
            self.drain_deadline,
            self.next_sweep,
            (!self.throttled.is_empty()).then(|| now + THROTTLE_RECHECK),
            self.paced.iter().map(|p| p.0).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Has work that must not wait for an event?
    pub fn busy(&self) -> bool {
        !self.reread.is_empty() || !self.dirty.is_empty() || self.carry.is_some()
    }

    /// Handles the request and linger deadlines that ran out by `now`;
    /// returns the connections the backend must close now (check each with
    /// [`Self::is_current`]: one may be listed twice).
    pub fn expire(&mut self, now: Instant) -> Vec<ConnRef> {
        let mut remove = Vec::new();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        while let Some(&(deadline, key, serial, generation)) = self.handshake_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
                break;
            }
            self.handshake_deadlines.pop_front();
            if self.is_current(key, serial) {
                let conn = &self.conns[key];
                if conn.read_paused
                    && conn.session.awaiting_request()
                    && conn.request_gen == generation
                {
                    // Not read because of us (a held publisher, a full queue):
                    // its next request cannot arrive. Judged again once read;
                    // the send timeout covers a queue that does not drain.
                    let at = ms_after(self.epoch, now, self.shared.config.handshake_timeout);
                    self.handshake_deadlines
                        .push_back((at, key as u32, serial, generation));
                    continue;
                }
                if conn.session.awaiting_request()
                    && conn.state == IoState::Active
                    && conn.request_gen == generation
                {
                    let stats = &self.shared.stats[self.id];
                    stats.handshake_timeout();
                    debug!(worker = self.id, "request timed out");
                    if !conn.session.partial_request() {
                        // Sent nothing (an idle keep-alive or preconnect): just close.
                        remove.push((key, serial));
                        continue;
                    }
                    // Part of a request: 408, then the usual close (linger-bounded).
                    self.conns[key].session.abort(
                        CloseCode::POLICY_VIOLATION,
                        Status::RequestTimeout,
                        "request not received in time (see --handshake-timeout)",
                        stats,
                    );
                    self.recharge(key);
                    self.start_closing(key);
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
        if self.addresses.is_empty() && self.addresses.capacity() > SHRINK_ABOVE {
            self.addresses.shrink_to_fit();
        }
        while let Some(&(deadline, key, serial)) = self.linger_deadlines.front() {
            let key = key as usize;
            if deadline > now_ms {
                break;
            }
            self.linger_deadlines.pop_front();
            if self.is_current(key, serial) && self.conns[key].state != IoState::Active {
                remove.push((key, serial));
            }
        }
        remove
    }

    /// Starts the close handshake on every open WebSocket; returns the
    /// connections still in an HTTP request, for the backend to close now.
    pub fn begin_drain(&mut self) -> Vec<usize> {
        let mut remove = Vec::new();
        info!(worker = self.id, connections = self.conns.len(), "draining");
        self.drain_deadline = Some(self.now + self.shared.config.drain_timeout);
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
                self.mark_dirty(key);
            } else {
                // Still in an HTTP request: nothing to say goodbye to.
                remove.push(key);
            }
        }
        remove
    }

    /// Has shutdown been asked for, and the drain not yet begun?
    pub fn drain_requested(&self) -> bool {
        self.shared.shutdown.load(Ordering::Acquire) && self.drain_deadline.is_none()
    }

    /// Is the drain over (everything closed, or the deadline passed)?
    pub fn drained(&self) -> bool {
        self.drain_deadline
            .is_some_and(|d| self.conns.is_empty() || self.now >= d)
    }

    /// At the worker's exit: publications still waiting for it (carried or
    /// in its mailbox) will never be delivered; count them.
    pub fn finish(&mut self) {
        let bus = &self.shared.bus;
        let mut lost = 0;
        if let Some((batch, pos)) = self.carry.take() {
            lost += batch.len() - pos;
            self.inbox.done(bus, &batch);
        }
        while let Some(batch) = self.inbox.next() {
            lost += batch.len();
            self.inbox.done(bus, &batch);
        }
        if lost > 0 {
            self.stats().undelivered(Undelivered::WorkerStopped, lost);
        }
    }

    /// Leaves the connection's topics and counts it closed; the backend
    /// then releases its socket. Idempotent per connection.
    pub fn retire(&mut self, key: usize) {
        let stats = &self.shared.stats[self.id];
        let conn = &mut self.conns[key];
        if conn.state == IoState::Gone {
            return;
        }
        conn.session.detach(&mut self.shard, stats);
        conn.state = IoState::Gone;
        stats.connection_closed();
        if std::mem::take(&mut conn.admitted) {
            let per_ip = self.addresses.remove(&key);
            self.shared.admission.release(per_ip);
        }
        // Whatever the entry still holds is freed with it.
        self.buffered -= conn.charged as usize;
        stats.buffered(-(conn.charged as isize));
        conn.charged = 0;
    }
}

/// Queues a run of publications of one topic for each target, subscriber by
/// subscriber, applying the slow-consumer policy.
#[allow(clippy::too_many_arguments)]
fn push_to<S>(
    conns: &mut Slab<Conn<S>>,
    dirty: &mut Vec<ConnRef>,
    slow: &mut Vec<ConnRef>,
    budget: &mut Budget<'_>,
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
        let over = *budget.buffered > budget.limit;
        for (i, p) in run.iter().enumerate() {
            match conn.session.push_published(&p.frame, cfg, over) {
                Push::Queued => {
                    sent += 1;
                    queued = true;
                }
                Push::Ignored => break,
                Push::Closing => {
                    stats.undelivered(Undelivered::Closing, run.len() - i);
                    break;
                }
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
            recharge(conn, budget.buffered, stats);
        }
    }
    stats.frames_sent(sent);
}

/// The worker's buffer budget, lent to [`push_to`].
struct Budget<'a> {
    buffered: &'a mut usize,
    limit: usize,
}

/// Re-measures what `conn` holds and moves the worker's total (and its
/// gauge) by the difference; `true` when it grew.
fn recharge<S>(conn: &mut Conn<S>, buffered: &mut usize, stats: &WorkerStats) -> bool {
    let held = conn.session.held_bytes().min(u32::MAX as usize) as u32;
    let delta = held as isize - conn.charged as isize;
    if delta == 0 {
        return false;
    }
    conn.charged = held;
    *buffered = (*buffered as isize + delta) as usize;
    stats.buffered(delta);
    delta > 0
}

/// `now + after` in milliseconds since `epoch` (rounded up, so a deadline
/// never fires early).
fn ms_after(epoch: Instant, now: Instant, after: Duration) -> u64 {
    (now.saturating_duration_since(epoch) + after)
        .as_micros()
        .div_ceil(1000) as u64
}

/// The sweep period: a quarter of the shortest timeout it enforces (ping
/// interval and timeout, message timeout; the admission table is swept
/// every second when it exists), or `None` with nothing to sweep for.
fn sweep_period(cfg: &Config) -> Option<Duration> {
    let keepalive = cfg.ping_interval.map(|i| i.min(cfg.ping_timeout));
    let per_ip = (cfg.max_connections_per_ip > 0
        || cfg.max_connect_rate_per_ip > 0
        || cfg.max_publish_rate > 0)
        .then_some(SWEEP_MAX * 4);
    let shortest = [keepalive, cfg.message_timeout, cfg.send_timeout, per_ip]
        .into_iter()
        .flatten()
        .min()?;
    Some((shortest / 4).clamp(SWEEP_MIN, SWEEP_MAX))
}
