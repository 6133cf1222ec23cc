//! The backend-independent half of a worker: every connection's protocol
//! state, deadlines, keepalive, fan-out delivery and the drain.
//!
//! Both event loops ([`super::epoll`] and [`super::uring`]) own a
//! [`Core`] and add only what differs between them: how bytes come in, how
//! queued bytes go out, and how a socket is closed. Everything a client can
//! observe — limits, policies, timeouts, counters — is decided here, once,
//! so the two backends behave the same by construction.
//!
//! The request-head and linger deadlines use FIFO queues: each kind has one
//! constant duration, so deadlines are pushed in order and checked from the
//! front. The keepalive, message and send deadlines are judged by a periodic
//! sweep over the connections instead.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Core`]: admission, the dirty and re-read lists, flush results, closing, retiring |
//! | `input.rs` | what a read does: the session's input, the budget charge, pacing and throttling |
//! | `conn.rs` | [`Conn`]: one connection's entry, and what a backend may reach of it |
//! | `paged.rs` | `PagedSlab`: the table of entries, grown by pages that never move |
//! | `dirty.rs` | `DirtyList`: the flush order, a bounded batch a turn (`FLUSHES_PER_TURN`) |
//! | `delivery.rs` | the fan-out half of a turn: dispatch, the bounded mailbox drain, `push_to`, the shard's budget charge, unthrottling |
//! | `proxy.rs` | the PROXY protocol header: the client's address, admission by it |
//! | `deadlines.rs` | the sweep (keepalive, message and send deadlines), the FIFO deadline queues, the next wake-up, the drain |
//! | `trim.rs` | memory given back to the kernel after a load (worker 0, when the process is quiet) |

mod conflation;
mod conn;
mod deadlines;
mod delivery;
mod dirty;
mod input;
mod paged;
mod proxy;
mod trim;
use input::recharge;

use super::Shared;
use super::admission::Refusal;
use super::config::Config;
use super::session::{Confirm, Ctx, Next, Push};
use super::stats::{Undelivered, WorkerStats};
use crate::proto::CloseCode;
use crate::proto::handshake::{Reject, Status};
use crate::proto::outbound::COPY_BELOW;
use crate::pubsub::bus::{Inbox, Publication};
use crate::pubsub::shard::{ConnRef, Shard};
use bytes::Bytes;
pub use conn::Conn;
use conn::{
    ADMITTED, AWAIT_PROXY, CONFLATING, DIRTY, PACED, PEER_EOF, PING_PENDING, PUBLISHED, RATED,
    READ_PAUSED, REQUEST_DONE, THROTTLED,
};
use deadlines::{ms_after, sweep_period};
use dirty::DirtyList;
pub use dirty::FLUSHES_PER_TURN;
use paged::PagedSlab;
pub use proxy::Header;
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
/// What a connection must hold to count as a large holder for the buffer
/// budget (see [`Core::input`]'s budget check): 1 MiB, far above any
/// request head, control message or reply, well below a large message.
const LARGE_HOLDER_BYTES: usize = 1024 * 1024;
/// The share of a worker's budget large holders may fill: 90 %, leaving
/// 10 % (51 MiB per worker with the defaults) for everyone else.
const LARGE_HOLDER_SHARE_PERCENT: usize = 90;
/// Deadline queues emptied with more capacity than this are shrunk.
const SHRINK_ABOVE: usize = 1024;
/// How often throttled publishers check whether the mailboxes drained.
const THROTTLE_RECHECK: Duration = Duration::from_millis(1);
/// Bounds on the sweep period (a quarter of the shortest of the ping
/// interval and timeout, the message timeout and the send timeout, see
/// `sweep_period`): often enough to be accurate to ~25 %, rare enough that
/// walking 100 000 connections costs < 0.1 % of a core.
const SWEEP_MIN: Duration = Duration::from_millis(10);
const SWEEP_MAX: Duration = Duration::from_secs(1);
/// How often a drain closes its next share of WebSockets.
const DRAIN_STEP: Duration = Duration::from_millis(10);
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
    id: usize,
    shared: Arc<Shared>,
    conns: PagedSlab<Conn<S>>,
    next_serial: u32,
    /// Connections to flush, a bounded batch at the end of each turn.
    dirty: DirtyList,
    /// The batch being flushed (kept for its capacity).
    flush_batch: Vec<ConnRef>,
    /// Connections to read again (epoll: budget used up; both: unpaused).
    reread: Vec<ConnRef>,
    /// HTTP publishers whose cluster publication was just answered: their
    /// kept (pipelined) input is processed at the next turn's start
    /// ([`Self::resume_confirmed`]), then they are read again.
    confirmed: Vec<ConnRef>,
    /// Request-head deadlines, with the request generation they guard.
    /// (deadline, key, serial, generation); times in ms on the worker's
    /// clock, keys as u32: 24 bytes an entry. Entries whose connection has
    /// moved on are dropped before the queue grows
    /// ([`Self::push_request_deadline`]).
    handshake_deadlines: VecDeque<(u64, u32, u32, u32)>,
    /// (deadline, key, serial).
    linger_deadlines: VecDeque<(u64, u32, u32)>,
    shard: Shard,
    inbox: Inbox,
    /// Publication times of what was delivered this turn (latency histogram).
    delivered: Vec<Instant>,
    /// Publication times of what was delivered and is not yet written to
    /// every local subscriber, with the dirty list's position that says so.
    unwritten: VecDeque<(Instant, u64)>,
    /// Subscribers found over their bound while delivering.
    slow: Vec<ConnRef>,
    /// Publishers paused because a mailbox is over its high-water mark.
    throttled: Vec<ConnRef>,
    /// Publishers paused by `--max-publish-rate`, and connections that
    /// stopped at a turn's worth of input, until the given time.
    paced: Vec<(Instant, usize, u32)>,
    /// The work each connection's input did this turn (by key, with its
    /// serial): a turn's worth ([`YIELD_AFTER_BYTES`](crate::server::session::YIELD_AFTER_BYTES))
    /// is counted across all its input of the turn, not per read. Cleared
    /// at each turn's start.
    turn_work: HashMap<usize, (u32, usize)>,
    /// Bytes of echoes this turn may still compress, all connections
    /// together ([`COMPRESS_PER_TURN`](crate::pubsub::envelope::COMPRESS_PER_TURN)).
    echo_compress: usize,
    /// Paced publishers resumed with input still kept after their pause:
    /// since when (each must work it off within `--message-timeout`).
    backlogged: HashMap<usize, (u32, Instant)>,
    /// A mailbox batch whose delivery the per-turn bound interrupted, with
    /// the index of its next publication.
    carry: Option<(Vec<Publication>, usize, u64)>,
    /// What a delivery costs on average, in plain deliveries, as the last
    /// turn's delivery found it (1 to `TABLE_PUT_WORK`: the share of them
    /// put in conflation tables): a turn's steps are planned with it.
    delivery_weight: usize,
    /// Envelope frames built during this turn's delivery, to be charged.
    built: Vec<(Publication, crate::pubsub::envelope::Form)>,
    /// In a cluster: this turn's delivered publications whose raw frame no
    /// worker charged (they came from NATS, not from a dispatch here),
    /// charged here after the delivery, once per run.
    unpaid: Vec<Publication>,
    /// Publications waiting for conflating subscribers' queues.
    tables: conflation::Tables,
    /// Bytes charged to this worker's connections and shared frames, and
    /// the part of the process's budget leased to cover them.
    buffered: usize,
    lease: crate::server::budget::Lease,
    /// Bytes the shard holds for this worker's clients, as charged to
    /// `buffered` at the last [`Self::sync_shard_charge`].
    shard_charged: usize,
    /// `/metrics` rendered this turn (at `now`), shared by every request
    /// that asks for it in the same turn.
    metrics: Option<(Instant, Bytes)>,
    /// The addresses of the connections counted per address (only with a
    /// per-address limit set): kept here, not in every connection's entry.
    addresses: HashMap<usize, IpAddr>,
    /// What the tokens of this worker's connections grant (only for
    /// connections that presented one): kept here, not in every entry.
    grants: HashMap<usize, Arc<crate::server::auth::Grant>>,
    /// Wall-clock time of this loop turn, Unix seconds ([`Self::set_wall_clock`];
    /// what token times are checked against).
    wall_s: u64,
    /// The newest operator disconnection acted on ([`Shared::revoke`]).
    revoked_seen: u64,
    /// Start of the worker's millisecond clock.
    epoch: Instant,
    /// Time at the top of this loop turn ([`Self::begin_turn`]).
    now: Instant,
    next_sweep: Instant,
    /// Worker 0's watch for memory to give back after a load.
    trim: trim::Trim,
    drain_deadline: Option<Instant>,
    /// WebSockets still to be closed by the drain, and how many there were.
    drain_queue: Vec<ConnRef>,
    drain_total: usize,
    /// When the drain began, and how long its closes are spread over.
    drain_spread: (Instant, Duration),
}

impl<S> Core<S> {
    pub fn new(id: usize, inbox: Inbox, shared: Arc<Shared>) -> Self {
        let shard = Shard::new(id, Arc::clone(&shared.directory), Arc::clone(&shared.bus));
        let revoked_seen = shared
            .revoked_last
            .load(std::sync::atomic::Ordering::Acquire);
        let now = Instant::now();
        let next_sweep = now + sweep_period(&shared.config, &shared.directory.namespaces());
        let lease = crate::server::budget::Lease::new(
            shared.config.buffered_bytes_per_worker(),
            shared.config.max_buffered_bytes,
        );
        Self {
            id,
            shared,
            conns: PagedSlab::new(),
            next_serial: 0,
            dirty: DirtyList::default(),
            flush_batch: Vec::new(),
            reread: Vec::new(),
            turn_work: HashMap::new(),
            echo_compress: crate::pubsub::envelope::COMPRESS_PER_TURN,
            confirmed: Vec::new(),
            handshake_deadlines: VecDeque::new(),
            linger_deadlines: VecDeque::new(),
            shard,
            inbox,
            delivered: Vec::new(),
            unwritten: VecDeque::new(),
            slow: Vec::new(),
            throttled: Vec::new(),
            paced: Vec::new(),
            backlogged: HashMap::new(),
            carry: None,
            delivery_weight: 1,
            built: Vec::new(),
            unpaid: Vec::new(),
            tables: conflation::Tables::default(),
            buffered: 0,
            lease,
            shard_charged: 0,
            metrics: None,
            addresses: HashMap::new(),
            grants: HashMap::new(),
            wall_s: 0,
            revoked_seen,
            epoch: now,
            now,
            next_sweep,
            // Only worker 0 watches (and reads its RSS at the start).
            trim: if id == 0 {
                trim::Trim::new(trim::resident_bytes().unwrap_or(0))
            } else {
                trim::Trim::default()
            },
            drain_deadline: None,
            drain_queue: Vec::new(),
            drain_total: 0,
            drain_spread: (now, Duration::ZERO),
        }
    }

    /// This worker's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// What every worker shares (configuration, counters, directory, bus).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// TLS handshake steps this worker may take in the turn starting now:
    /// the current key's
    /// ([`Certs::handshake_steps`](crate::server::tls::Certs::handshake_steps)),
    /// so a reload with a slower key applies from the next turn.
    pub fn handshake_steps_per_turn(&self) -> u32 {
        self.shared
            .tls
            .as_ref()
            .map_or(0, crate::server::tls::Certs::handshake_steps)
    }

    /// The connection at `key` (which must exist).
    pub fn conn(&self, key: usize) -> &Conn<S> {
        &self.conns[key]
    }

    pub fn conn_mut(&mut self, key: usize) -> &mut Conn<S> {
        &mut self.conns[key]
    }

    /// The connection at `key`, if any.
    pub fn get(&self, key: usize) -> Option<&Conn<S>> {
        self.conns.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Conn<S>> {
        self.conns.get_mut(key)
    }

    /// The key the next [`Self::admit`] will use.
    pub fn vacant_key(&self) -> usize {
        self.conns.vacant_key()
    }

    /// Entries in the slab (open, closing, and gone ones the kernel still
    /// holds).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every entry's key.
    pub fn keys(&self) -> Vec<usize> {
        self.conns.iter().map(|(k, _)| k).collect()
    }

    /// Frees `key`'s entry: after [`Self::retire`], once nothing (no
    /// kernel operation) points into it any more.
    pub fn free(&mut self, key: usize) -> Conn<S> {
        debug_assert_eq!(self.conns[key].state, IoState::Gone);
        self.conns.remove(key)
    }

    /// Never frees the entries: the kernel may still write into them (an
    /// io_uring worker that could not wait for its operations to end).
    pub fn leak_connections(&mut self) {
        std::mem::forget(std::mem::take(&mut self.conns));
    }

    /// Reads `key` again at the end of this turn (its read budget ran out).
    pub fn read_again(&mut self, key: usize) {
        let serial = self.conns[key].serial;
        self.reread.push((key, serial));
    }

    /// While closing, the peer's FIN arrived: once flushed, nothing to wait for.
    pub fn peer_closed(&mut self, key: usize) {
        self.conns[key].set_flag(PEER_EOF, true);
    }

    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Starts a loop turn at `now`: every deadline and rate decided until
    /// the next call uses it (the core reads no clock of its own).
    pub fn begin_turn(&mut self, now: Instant) {
        self.now = now;
        self.turn_work.clear();
        self.echo_compress = crate::pubsub::envelope::COMPRESS_PER_TURN;
        #[cfg(test)]
        if self
            .shared
            .test_panic_worker
            .compare_exchange(self.id + 1, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            panic!("a worker panic injected by a test");
        }
    }

    /// Gives back to the process's budget what this worker's lease holds
    /// beyond what it buffers now (and a little slack): at the end of each
    /// turn, before the worker may sleep, so another worker never waits
    /// on an idle one's lease.
    pub fn settle_lease(&mut self) {
        self.lease.settle(&self.shared.budget, self.buffered);
    }

    /// Whether tokens are on, so that [`Self::set_wall_clock`] matters.
    pub fn needs_wall_clock(&self) -> bool {
        self.shared.auth.is_some()
    }

    /// The wall-clock time of this turn (since the Unix epoch), for the
    /// times of tokens.
    pub fn set_wall_clock(&mut self, since_epoch: Duration) {
        self.wall_s = since_epoch.as_secs();
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
        // Behind a balancer the socket's address is the balancer's: only
        // the process-wide cap applies until the header names the client.
        let proxied = self.expects_proxy();
        let admitted = self
            .shared
            .admission
            .admit(if proxied { None } else { peer });
        let key = self
            .conns
            .insert(Conn::new(io, serial, now_ms, admitted.is_ok()));
        if proxied && admitted.is_ok() {
            self.conns[key].set_flag(AWAIT_PROXY, true);
        }
        if let (Ok(ticket), Some(ip)) = (admitted, peer)
            && ticket.per_ip
        {
            self.addresses.insert(key, ip);
        }
        self.stats().connection_opened();
        if let Err(why) = admitted {
            self.refuse_admission(key, why, peer);
            return key;
        }
        let at = ms_after(self.epoch, self.now, self.shared.config.handshake_timeout);
        self.push_request_deadline(at, key, serial, 0);
        key
    }

    /// `key` (from `peer`) is over admission limit `why`: counted, answered
    /// 503 with the limit's reason, and closed.
    fn refuse_admission(&mut self, key: usize, why: Refusal, peer: Option<IpAddr>) {
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
    }

    /// Lists `key` for a flush (once until it is flushed).
    pub fn mark_dirty(&mut self, key: usize) {
        self.conns[key].mark_dirty(key, &mut self.dirty);
    }

    /// Takes the next batch of the dirty list for the flush: at most
    /// `max` connections from its front, each cleared of its dirty mark
    /// (stale entries are skipped). The rest stays listed for the next
    /// turn ([`Self::busy`]). Hand the vector back with
    /// [`Self::return_dirty`] to reuse its capacity.
    pub fn take_dirty(&mut self, max: usize) -> Vec<ConnRef> {
        let mut batch = std::mem::take(&mut self.flush_batch);
        batch.clear();
        while batch.len() < max {
            let Some((key, serial)) = self.dirty.pop() else {
                break;
            };
            let current = self.conns.get(key).is_some_and(|c| c.serial == serial);
            if current {
                self.conns[key].set_flag(DIRTY, false);
                if self.conns[key].state != IoState::Gone {
                    batch.push((key, serial));
                }
            }
        }
        batch
    }

    /// Gives a batch taken with [`Self::take_dirty`] back, to reuse its capacity.
    pub fn return_dirty(&mut self, mut batch: Vec<ConnRef>) {
        batch.clear();
        self.flush_batch = batch;
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
    /// `key`'s wire layer (TLS) failed: its queue is replaced by
    /// `last_words` (see [`Session::fail_wire`]) and it closes like any
    /// other connection; the backend sends its queue as it is from now on.
    pub fn fail_wire(&mut self, key: usize, last_words: &[u8]) {
        self.conns[key].session.fail_wire(last_words);
        if self.conns[key].state == IoState::Active {
            self.start_closing(key);
        } else {
            self.mark_dirty(key);
        }
    }

    pub fn start_closing(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.state = IoState::Closing;
        conn.session
            .detach(&mut self.shard, &self.shared.stats[self.id]);
        let serial = conn.serial;
        self.push_linger(key, serial, self.now);
        self.mark_dirty(key);
    }

    /// Answers `key`'s HTTP publication waiting on the cluster
    /// ([`Session::confirm`](super::session::Session::confirm)); `close`:
    /// as its last answer. A keep-alive connection then goes on with its
    /// next request ([`Self::resume_confirmed`]); otherwise it closes.
    fn confirm(&mut self, key: usize, answer: Confirm, close: bool) {
        let conn = &mut self.conns[key];
        let serial = conn.serial;
        let close = close || conn.flag(PEER_EOF);
        let go_on = conn
            .session
            .confirm(answer, close, &self.shared.stats[self.id]);
        self.recharge(key);
        if go_on {
            // The next request has a deadline of its own (the answer moved
            // the request count on, so the last one's no longer applies).
            let generation = self.conns[key].session.requests();
            let at = ms_after(self.epoch, self.now, self.shared.config.handshake_timeout);
            self.push_request_deadline(at, key, serial, generation);
            self.confirmed.push((key, serial));
            self.mark_dirty(key);
        } else {
            self.start_closing(key);
        }
    }

    /// Goes on with the HTTP publishers answered since the last turn:
    /// what they sent meanwhile (kept while they waited) is processed
    /// now, as if just read, and they are read again. Called by the
    /// backend at the start of its end of turn, before the re-reads.
    pub fn resume_confirmed(&mut self) {
        for (key, serial) in std::mem::take(&mut self.confirmed) {
            if !self.is_current(key, serial) || self.conns[key].state != IoState::Active {
                continue;
            }
            self.conns[key].set_flag(READ_PAUSED, false);
            if self.input_kept(key).is_some() {
                self.after_input(key);
            }
            self.reread.push((key, serial));
        }
    }

    /// Feeds `key` the input its session kept while it was not read (a
    /// publisher waiting for its answer, paced, or stopped at a turn's
    /// worth), as if just read; `None` when it kept none, or is no longer
    /// active. The caller follows with [`Self::after_input`].
    fn input_kept(&mut self, key: usize) -> Option<Input> {
        let kept = self.conns[key].session.pending_len();
        if kept == 0 || self.conns[key].state != IoState::Active {
            return None;
        }
        let mut buf = vec![0; kept];
        self.conns[key].session.restore_pending(&mut buf);
        Some(self.input(key, &mut buf))
    }

    fn push_linger(&mut self, key: usize, serial: u32, now: Instant) {
        let at = ms_after(self.epoch, now, LINGER);
        self.linger_deadlines.push_back((at, key as u32, serial));
    }

    /// After the backend wrote `_wrote` bytes of `key`'s queue (0: none, or
    /// nothing was queued; the queue counts its own progress, see
    /// [`OutQueue::send_epoch`](crate::proto::OutQueue::send_epoch)):
    /// resumes reading a connection paused by backpressure, and finishes a
    /// close once the queue is empty.
    pub fn after_flush(&mut self, key: usize, wrote: usize) -> AfterFlush {
        let max_outbound = self.shared.config.max_outbound_bytes;
        self.recharge(key);
        if wrote > 0 && self.conns[key].flag(PING_PENDING) {
            // The client takes our bytes: it is there, and our ping may
            // wait behind a backlog it is still reading (its pong cannot
            // come sooner). The ping's wait starts over; a client that
            // stops reading is the send timeout's, one that never answers
            // is cut once nothing more is written for --ping-timeout.
            self.conns[key].keepalive_ms = self.now_ms();
        }
        let conn = &mut self.conns[key];
        let serial = conn.serial;
        if conn.flag(READ_PAUSED)
            && !conn.session.confirming()
            && conn.session.out.len() <= conn.session.queue_bound(max_outbound) / 2
            && !conn.flag(THROTTLED)
            && !conn.flag(PACED)
        {
            if conn.session.pending_len() > 0 {
                // Requests it pipelined wait, kept: they go first, at the
                // next turn's `unthrottle` (as a read stopped at a turn's
                // worth does), then the socket is read.
                conn.set_flag(PACED, true);
                self.paced.push((self.now, key, serial));
            } else {
                conn.set_flag(READ_PAUSED, false);
                self.reread.push((key, serial));
            }
        }
        if conn.flag(CONFLATING) && conn.session.out.is_empty() && conn.state == IoState::Active {
            // The queue went to the kernel: what waits goes next (written
            // at the next turn's flush, which comes at once: dirty).
            self.release_waiting(key);
            self.recharge(key);
            return AfterFlush::Keep;
        }
        let conn = &mut self.conns[key];
        if !conn.session.out.is_empty() || conn.state != IoState::Closing {
            return AfterFlush::Keep;
        }
        if conn.flag(PEER_EOF) {
            return AfterFlush::Remove;
        }
        conn.state = IoState::Lingering;
        self.push_linger(key, serial, self.now);
        AfterFlush::ShutdownWrite
    }

    /// Has work that must not wait for an event?
    pub fn busy(&self) -> bool {
        !self.reread.is_empty()
            || !self.dirty.is_empty()
            || self.carry.is_some()
            || !self.confirmed.is_empty()
            || self.tables.has_buried()
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
        if conn.take_flag(CONFLATING) | conn.take_flag(RATED) {
            let n = self.tables.remove(key);
            stats.undelivered(Undelivered::Closing, n);
        }
        if !self.grants.is_empty() {
            self.grants.remove(&key);
        }
        let conn = &mut self.conns[key];
        if conn.take_flag(ADMITTED) {
            let per_ip = self.addresses.remove(&key);
            self.shared.admission.release(per_ip);
        }
        // Whatever the entry still holds is freed with it.
        self.buffered -= conn.charged as usize;
        stats.buffered(-(conn.charged as isize));
        conn.charged = 0;
    }
}
