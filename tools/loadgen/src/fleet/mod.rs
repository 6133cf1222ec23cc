//! A set of client connections driven by one thread over one mio `Poll`:
//! ramp-up with a bounded number of handshakes in flight, idle service
//! (pings answered, closes echoed), and a bounded close. A scenario can add
//! a connection with its own request (a publisher) and drive single turns
//! whose data messages go to a [`Sink`].
//!
//! A fleet opens the connections `first .. first + connections` of a run
//! (one shard's share; see `shard`): connection `g` of the run goes to
//! destination `g mod D` from source address `(g div D) mod S`, so every
//! (source, destination) pair gets an equal share of the ports, however the
//! run is split over processes. Local token `t` is connection `first + t`.
//!
//! Scenarios are built from these phases; every loop here ends at a
//! deadline or after a bounded number of steps.
//!
//! Here: the [`Fleet`] and its phases (ramp-up, hold, an extra connection,
//! single turns, close), and what a scenario that drops and reopens
//! connections needs (`sever`, `reopen`, notices of handshakes that ended). Where each connection goes is in `targets`
//! ([`Targets`]); one event-loop turn and the bookkeeping of connections
//! opening, failing and ending in `turn`.

mod pace;
mod targets;
#[cfg(test)]
mod tests;
mod turn;

pub use targets::Targets;

use crate::client::{Conn, Counters, Failure, NoSink, RequestTemplate, Rng, Sink};
use crate::hist::Hist;
use mio::{Events, Poll};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Longest single wait in `poll`, so deadlines and timeouts are checked often.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// How often the ramp-up reports progress (the live progress line's rate).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How to open connections.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub targets: Targets,
    /// Index in the run of this fleet's first connection.
    pub first: usize,
    pub connections: usize,
    pub in_flight: usize,
    /// Per connection: connect through verified 101.
    pub handshake_timeout: Duration,
}

/// What ramp-up achieved.
#[derive(Debug, Clone)]
pub struct RampStats {
    pub started: Instant,
    /// When the last handshake finished (success or failure).
    pub finished: Instant,
    /// Connect-to-101 latency of each opened connection.
    pub latency: Hist,
}

/// What the close phase achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloseStats {
    pub clean: usize,
    /// Still open at the close deadline; dropped without a handshake.
    pub timed_out: usize,
}

pub struct Fleet {
    cfg: FleetConfig,
    poll: Poll,
    events: Events,
    /// Indexed by token; a slot is emptied when its connection ends. Tokens
    /// are never reused within a run.
    conns: Vec<Option<Conn>>,
    /// Opening connections in start order, for the handshake timeout.
    opening: VecDeque<usize>,
    in_flight: usize,
    open: usize,
    reread: Vec<usize>,
    scratch: Vec<u8>,
    rng: Rng,
    /// Connections that never opened, by cause.
    pub failures: BTreeMap<String, u64>,
    /// Open connections that ended, by how; the close phase's are in [`CloseStats`].
    pub ended: BTreeMap<String, u64>,
    pub counters: Counters,
    latency: Hist,
    /// When the latest handshake finished (opened or failed).
    last_done: Instant,
    closing: bool,
    clean_closes: usize,
    /// With `watch`: connections whose handshake ended since the caller
    /// last took them, `(token, opened)`.
    notices: Vec<(usize, bool)>,
    watch: bool,
    /// Connections that read at a bounded rate (`pace`).
    pacing: Option<pace::Pacing>,
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Vec::with_capacity(cfg.connections),
            opening: VecDeque::with_capacity(cfg.in_flight),
            in_flight: 0,
            open: 0,
            reread: Vec::new(),
            scratch: vec![0; 64 * 1024],
            rng: Rng::from_entropy(),
            failures: BTreeMap::new(),
            ended: BTreeMap::new(),
            counters: Counters::default(),
            latency: Hist::default(),
            last_done: Instant::now(),
            closing: false,
            clean_closes: 0,
            notices: Vec::new(),
            watch: false,
            pacing: None,
            cfg,
        })
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Handshakes in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Connections that failed to open so far.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Is connection `t` (a local token) open or opening?
    pub fn is_live(&self, t: usize) -> bool {
        self.conns.get(t).is_some_and(Option::is_some)
    }

    /// Is connection `t` open (its handshake done, not ended)?
    pub fn is_open(&self, t: usize) -> bool {
        self.conns
            .get(t)
            .and_then(Option::as_ref)
            .is_some_and(|c| !c.is_opening())
    }

    /// Opens `connections` connections, at most `in_flight` at a time, until
    /// all have opened or failed or `deadline` passes (the rest then count as
    /// timeouts). Calls `tick` every [`PROGRESS_EVERY`].
    pub fn ramp_up(
        &mut self,
        deadline: Instant,
        tick: &mut dyn FnMut(&Fleet),
    ) -> io::Result<RampStats> {
        let t0 = Instant::now();
        self.last_done = t0;
        let mut next_progress = t0 + PROGRESS_EVERY;
        loop {
            let now = Instant::now();
            if self.conns.len() >= self.cfg.connections && self.in_flight == 0 {
                break;
            }
            if now >= deadline {
                while let Some(t) = self.opening.pop_front() {
                    if self.conns[t].as_ref().is_some_and(Conn::is_opening) {
                        self.fail(t, Failure::Timeout);
                    }
                }
                // Never started: timeouts too.
                let unstarted = self.cfg.connections - self.conns.len();
                if unstarted > 0 {
                    *self.failures.entry(Failure::Timeout.key()).or_default() += unstarted as u64;
                    self.conns.resize_with(self.cfg.connections, || None);
                }
                break;
            }
            self.expire_handshakes(now);
            while self.in_flight < self.cfg.in_flight && self.conns.len() < self.cfg.connections {
                self.start_one()?;
            }
            if now >= next_progress {
                next_progress = now + PROGRESS_EVERY;
                tick(self);
            }
            let wait = self.next_expiry().map_or(MAX_POLL_WAIT, |t| {
                t.saturating_duration_since(now).min(MAX_POLL_WAIT)
            });
            self.turn(
                wait.min(deadline.saturating_duration_since(now))
                    .min(next_progress.saturating_duration_since(now)),
                &mut NoSink,
            )?;
        }
        Ok(RampStats {
            started: t0,
            finished: self.last_done,
            latency: std::mem::take(&mut self.latency),
        })
    }

    /// Serves the open connections (pings, closes) until `deadline`.
    pub fn hold_until(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            self.turn(
                deadline.saturating_duration_since(now).min(MAX_POLL_WAIT),
                &mut NoSink,
            )?;
        }
    }

    /// Opens one more connection, outside the ramp-up's count, with its own
    /// request (e.g. a publisher), and waits until it is open, failed, or
    /// `deadline`. Returns its token when it opened.
    pub fn open_extra(
        &mut self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        request: &RequestTemplate,
        topic: Option<usize>,
        deadline: Instant,
    ) -> io::Result<Option<usize>> {
        let t = self.conns.len();
        let key = self.rng.ws_key();
        match Conn::connect(src, dst, key, request, topic) {
            Ok(c) => self.add(t, c)?,
            Err(e) => {
                self.conns.push(None);
                *self
                    .failures
                    .entry(Failure::Connect(e.kind()).key())
                    .or_default() += 1;
                return Ok(None);
            }
        }
        loop {
            let now = Instant::now();
            match self.conns[t].as_ref() {
                Some(c) if !c.is_opening() => return Ok(Some(t)),
                None => return Ok(None),
                Some(_) if now >= deadline => {
                    self.fail(t, Failure::Timeout);
                    return Ok(None);
                }
                Some(_) => {}
            }
            self.turn(
                deadline.saturating_duration_since(now).min(MAX_POLL_WAIT),
                &mut NoSink,
            )?;
        }
    }

    /// Starts one more connection in place of connection `g` of the run
    /// (same source address and destination) with its own `request`,
    /// without waiting: its handshake proceeds in later turns, bounded by
    /// the handshake timeout ([`Fleet::expire_handshakes`]). Returns its
    /// token, or `None` when it could not even start (counted in
    /// `failures`).
    pub fn reopen(&mut self, g: usize, request: &RequestTemplate) -> io::Result<Option<usize>> {
        let t = self.conns.len();
        let key = self.rng.ws_key();
        let dst = self.cfg.targets.dst(g).0;
        let src = self.cfg.targets.src(g);
        match Conn::connect(src, dst, key, request, None) {
            Ok(c) => {
                self.add(t, c)?;
                Ok(Some(t))
            }
            Err(e) => {
                self.conns.push(None);
                *self
                    .failures
                    .entry(Failure::Connect(e.kind()).key())
                    .or_default() += 1;
                Ok(None)
            }
        }
    }

    /// Ends open connection `t` at once, without a close handshake: its
    /// socket is closed (the server reads EOF), or with `reset` closed with
    /// `SO_LINGER` 0 (the server gets an RST). Not counted as ended.
    /// `false` when `t` was not open.
    pub fn sever(&mut self, t: usize, reset: bool) -> bool {
        if !self.is_open(t) {
            return false;
        }
        let Some(mut c) = self.conns[t].take() else {
            return false;
        };
        if reset {
            // Best effort: without it the close is an orderly FIN.
            let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.open -= 1;
        true
    }

    /// From now on, note every connection whose handshake ends (see
    /// [`Fleet::take_notices`]).
    pub fn watch_handshakes(&mut self) {
        self.watch = true;
        self.notices.clear();
    }

    /// Connections whose handshake ended since the last call, as
    /// `(token, opened)`; one that opened may have ended since.
    pub fn take_notices(&mut self) -> Vec<(usize, bool)> {
        std::mem::take(&mut self.notices)
    }

    /// Connect-to-101 latency of the connections opened since the ramp-up
    /// (or the last call).
    pub fn take_latency(&mut self) -> Hist {
        std::mem::take(&mut self.latency)
    }

    /// Bytes queued but unwritten on connection `token`, while it is live.
    pub fn pending_of(&self, token: usize) -> Option<usize> {
        self.conns.get(token)?.as_ref().map(Conn::pending)
    }

    /// The connection behind `token`, while it is open or opening.
    pub fn conn_mut(&mut self, token: usize) -> Option<&mut Conn> {
        self.conns.get_mut(token).and_then(Option::as_mut)
    }

    /// One event-loop turn, waiting at most `wait`, with data messages
    /// going to `sink`.
    pub fn serve(&mut self, wait: Duration, sink: &mut dyn Sink) -> io::Result<()> {
        self.turn(wait.min(MAX_POLL_WAIT), sink)
    }

    /// Sends a close (1000) on every open connection and waits until the
    /// server has answered and closed each, or `deadline`; the rest are dropped.
    pub fn close_all(&mut self, deadline: Instant) -> io::Result<CloseStats> {
        self.closing = true;
        for t in 0..self.conns.len() {
            let Some(c) = self.conns[t].as_mut() else {
                continue;
            };
            let step = c.start_close(&mut self.rng);
            self.apply(t, step);
        }
        loop {
            let now = Instant::now();
            if self.open == 0 || now >= deadline {
                break;
            }
            self.turn(
                deadline.saturating_duration_since(now).min(MAX_POLL_WAIT),
                &mut NoSink,
            )?;
        }
        let timed_out = self.open;
        for slot in &mut self.conns {
            *slot = None;
        }
        self.open = 0;
        Ok(CloseStats {
            clean: self.clean_closes,
            timed_out,
        })
    }
}
