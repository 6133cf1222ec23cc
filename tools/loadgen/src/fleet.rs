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

use crate::client::{Conn, Counters, Failure, NoSink, RequestTemplate, Rng, Sink, Step};
use crate::hist::Hist;
use crate::topics::TopicMap;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Longest single wait in `poll`, so deadlines and timeouts are checked often.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// How often the ramp-up reports progress (the live progress line's rate).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Where the connections of a run go.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Destinations, used round-robin by connection index, each with its request.
    pub dsts: Vec<(SocketAddr, RequestTemplate)>,
    /// Source addresses; empty: let the kernel choose.
    pub sources: Vec<IpAddr>,
    /// Subscribers' topics, for a `{topic}` in the request target.
    pub topics: Option<TopicMap>,
}

impl Targets {
    /// Destination and request template of connection `g`.
    pub fn dst(&self, g: usize) -> &(SocketAddr, RequestTemplate) {
        &self.dsts[g % self.dsts.len()]
    }

    /// Source address (port 0) of connection `g`.
    pub fn src(&self, g: usize) -> Option<SocketAddr> {
        match self.sources.as_slice() {
            [] => None,
            s => Some(SocketAddr::new(s[(g / self.dsts.len()) % s.len()], 0)),
        }
    }

    /// Topic of connection `g`, when topics are in use.
    pub fn topic(&self, g: usize) -> Option<usize> {
        self.topics.as_ref().map(|m| m.topic_of(g))
    }
}

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
        match Conn::connect(src, dst, key, request.render(&key, topic)) {
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

    fn start_one(&mut self) -> io::Result<()> {
        let t = self.conns.len();
        let g = self.cfg.first + t;
        let targets = &self.cfg.targets;
        let (dst, template) = targets.dst(g);
        let key = self.rng.ws_key();
        let request = template.render(&key, targets.topic(g));
        match Conn::connect(targets.src(g), *dst, key, request) {
            Ok(c) => self.add(t, c)?,
            Err(e) => {
                self.conns.push(None);
                self.last_done = Instant::now();
                *self
                    .failures
                    .entry(Failure::Connect(e.kind()).key())
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    fn add(&mut self, t: usize, mut c: Conn) -> io::Result<()> {
        debug_assert_eq!(t, self.conns.len());
        self.poll.registry().register(
            &mut c.stream,
            Token(t),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.conns.push(Some(c));
        self.opening.push_back(t);
        self.in_flight += 1;
        Ok(())
    }

    /// One `poll` and the work it reports (plus deferred re-reads).
    fn turn(&mut self, wait: Duration, sink: &mut dyn Sink) -> io::Result<()> {
        let wait = if self.reread.is_empty() {
            wait
        } else {
            Duration::ZERO
        };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut ready: Vec<usize> = std::mem::take(&mut self.reread);
        ready.extend(self.events.iter().map(|e| e.token().0));
        for t in ready {
            let Some(c) = self.conns.get_mut(t).and_then(Option::as_mut) else {
                continue;
            };
            let was_opening = c.is_opening();
            let step = c.drive(
                t,
                &mut self.scratch,
                &mut self.rng,
                &mut self.counters,
                sink,
            );
            if c.reread {
                self.reread.push(t);
            }
            if let (true, Some(at)) = (was_opening, c.opened_at) {
                self.latency
                    .record_ns(at.saturating_duration_since(c.started).as_nanos() as u64);
                self.in_flight -= 1;
                self.open += 1;
                self.last_done = at;
            }
            self.apply(t, step);
        }
        Ok(())
    }

    fn apply(&mut self, t: usize, step: Step) {
        match step {
            Step::Continue => {}
            Step::Failed(f) => self.fail(t, f),
            Step::Ended(end) => {
                self.conns[t] = None;
                self.open -= 1;
                if self.closing && end == crate::client::End::Clean {
                    self.clean_closes += 1;
                } else {
                    *self.ended.entry(end.key()).or_default() += 1;
                }
            }
        }
    }

    fn fail(&mut self, t: usize, f: Failure) {
        if self.conns[t].take().is_some() {
            self.in_flight -= 1;
            self.last_done = Instant::now();
            *self.failures.entry(f.key()).or_default() += 1;
        }
    }

    /// Fails the connections whose handshake has run past the timeout.
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&t) = self.opening.front() {
            match self.conns[t].as_ref() {
                Some(c) if c.is_opening() => {
                    if now.saturating_duration_since(c.started) < self.cfg.handshake_timeout {
                        return;
                    }
                    self.opening.pop_front();
                    self.fail(t, Failure::Timeout);
                }
                _ => {
                    self.opening.pop_front();
                }
            }
        }
    }

    /// When the oldest opening connection times out.
    fn next_expiry(&self) -> Option<Instant> {
        self.opening
            .iter()
            .find_map(|&t| self.conns[t].as_ref().filter(|c| c.is_opening()))
            .map(|c| c.started + self.cfg.handshake_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::OpCode;
    use corecast::proto::frame::{parse_header, server_frame};
    use corecast::proto::handshake::accept_key;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn server() -> corecast::server::ServerHandle {
        corecast::server::start(corecast::server::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 1,
            pin_cores: false,
            ..Default::default()
        })
        .unwrap()
    }

    fn fleet(dst: SocketAddr, path: &str, n: usize) -> Fleet {
        let url = crate::url::parse(&format!("ws://{dst}{path}")).unwrap();
        Fleet::new(FleetConfig {
            targets: Targets {
                dsts: vec![(dst, RequestTemplate::new(&url))],
                sources: vec![IpAddr::from([127, 0, 0, 1])],
                topics: None,
            },
            first: 0,
            connections: n,
            in_flight: 8,
            handshake_timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn soon(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn opens_holds_and_closes_against_corecast() {
        let srv = server();
        let mut f = fleet(srv.local_addr(), "/echo", 40);
        let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
        assert_eq!(ramp.latency.len(), 40, "failures: {:?}", f.failures);
        f.hold_until(Instant::now() + Duration::from_millis(50))
            .unwrap();
        assert_eq!(f.open(), 40);
        let close = f.close_all(soon(5)).unwrap();
        assert_eq!((close.clean, close.timed_out), (40, 0), "{:?}", f.ended);
    }

    #[test]
    fn spreads_connections_over_destinations_and_sources() {
        let url = crate::url::parse("ws://127.0.0.1:1/ws?topics=t{topic}").unwrap();
        let d = |p: u16| {
            (
                SocketAddr::from(([127, 0, 0, 1], p)),
                RequestTemplate::new(&url),
            )
        };
        let t = Targets {
            dsts: vec![d(1), d(2), d(3)],
            sources: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])],
            topics: Some(TopicMap::new(12, 4, crate::topics::TopicDist::Uniform)),
        };
        let pairs: Vec<(u16, u8)> = (0..12)
            .map(|g| {
                let IpAddr::V4(src) = t.src(g).unwrap().ip() else {
                    unreachable!()
                };
                (t.dst(g).0.port(), src.octets()[3])
            })
            .collect();
        // Every destination gets every source equally often.
        for port in 1..=3 {
            for src in 1..=2 {
                assert_eq!(pairs.iter().filter(|&&p| p == (port, src)).count(), 2);
            }
        }
        assert_eq!(t.topic(5), Some(1));
    }

    #[test]
    fn counts_refusals_by_status() {
        let srv = server();
        let mut f = fleet(srv.local_addr(), "/nowhere", 5);
        let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
        assert!(ramp.latency.is_empty());
        assert_eq!(f.failures.get("handshake_status_404"), Some(&5));
    }

    #[test]
    fn counts_connect_errors() {
        // Bind and drop a listener to find a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut f = fleet(SocketAddr::from(([127, 0, 0, 1], port)), "/", 3);
        f.ramp_up(soon(10), &mut |_| {}).unwrap();
        assert_eq!(
            f.failures.get("connect_error:ConnectionRefused"),
            Some(&3),
            "{:?}",
            f.failures
        );
    }

    #[test]
    fn records_server_shutdown_as_server_close() {
        let srv = server();
        let mut f = fleet(srv.local_addr(), "/echo", 3);
        f.ramp_up(soon(10), &mut |_| {}).unwrap();
        srv.shutdown();
        f.hold_until(soon(3)).unwrap();
        srv.join();
        assert_eq!(f.open(), 0);
        assert_eq!(f.ended.get("server_close_1001"), Some(&3), "{:?}", f.ended);
    }

    /// A one-connection server that checks the handshake, pings, and
    /// returns the frame the client answered with.
    fn pinging_server(listener: TcpListener) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                assert!(n > 0, "client closed during the request");
                head.extend_from_slice(&b[..n]);
            }
            let text = String::from_utf8(head).unwrap();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let accept = accept_key(key.as_bytes());
            let mut resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                Connection: Upgrade\r\nSec-WebSocket-Accept: "
                .to_vec();
            resp.extend_from_slice(&accept);
            resp.extend_from_slice(b"\r\n\r\n");
            // The ping rides in the same segment as the 101.
            resp.extend_from_slice(&server_frame(OpCode::Ping, b"keepalive"));
            s.write_all(&resp).unwrap();
            let mut got = Vec::new();
            while got.len() < 2 + 4 + 9 {
                let n = s.read(&mut b).unwrap();
                assert!(n > 0, "client closed before answering the ping");
                got.extend_from_slice(&b[..n]);
            }
            got
        })
    }

    #[test]
    fn answers_pings_with_masked_pongs() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let srv = pinging_server(listener);
        let mut f = fleet(dst, "/", 1);
        let ramp = f.ramp_up(soon(10), &mut |_| {}).unwrap();
        assert_eq!(ramp.latency.len(), 1, "{:?}", f.failures);
        let deadline = soon(5);
        while f.counters.pings_answered == 0 && Instant::now() < deadline {
            f.hold_until(Instant::now() + Duration::from_millis(20))
                .unwrap();
        }
        assert_eq!(f.counters.pings_answered, 1);
        let pong = srv.join().unwrap();
        let h = parse_header(&pong).unwrap().unwrap();
        assert_eq!((h.opcode, h.fin, h.payload_len), (OpCode::Pong, true, 9));
        let key = h.mask.expect("client frames are masked");
        let payload: Vec<u8> = pong[h.header_len..h.header_len + 9]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(payload, b"keepalive");
    }
}
