//! `loadgen fanout`, the publishing side (in the parent process): one
//! schedule, and either WebSocket publishers (one connection per publish
//! URL and topic, on a [`Fleet`]) or HTTP publishers (one keep-alive
//! connection per publish URL, `POST /publish/T` pipelined up to
//! [`HTTP_WINDOW`] requests).
//!
//! Burst mode publishes K messages as fast as the server takes them; rate
//! mode publishes R per second on a deadline schedule (message i is due at
//! `start + i / R`; a late loop catches up rather than drifting, and how
//! late it was is reported as the publish lag). Message j goes to topic
//! j mod T as that topic's number j div T (`topics::route`): in fanout once
//! to every publish URL, in storm to every publish URL of that topic
//! ([`Publisher::open_by_topic`]).

use crate::cli::{FanoutPlan, PublishMode, Target};
use crate::client::{NoSink, RequestTemplate, Rng, TOPIC_PLACEHOLDER};
use crate::clock::mono_ns;
use crate::fleet::{Fleet, FleetConfig, Targets};
use crate::payload::Payloads;
use crate::topics::route;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A publisher encodes at most this many bytes ahead of its socket, so
/// timestamps are taken close to the write.
const PUBLISH_BATCH_BYTES: usize = 16 * 1024;
/// HTTP requests in flight per connection (pipelined).
pub const HTTP_WINDOW: usize = 64;
/// How long the publisher connections may take to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP response head accepted.
const MAX_HTTP_RESPONSE: usize = 16 * 1024;

/// When each message is due, and what was sent.
pub struct Schedule {
    mode: PublishMode,
    topics: usize,
    pub planned: u64,
    pub sent: u64,
    pub start: Instant,
    pub first: Option<Instant>,
    /// Largest delay between a message's due time and its encoding (rate mode).
    pub max_lag: Duration,
}

impl Schedule {
    pub fn new(mode: PublishMode, topics: usize, start: Instant) -> Self {
        Self {
            mode,
            topics,
            planned: mode.messages(),
            sent: 0,
            start,
            first: None,
            max_lag: Duration::ZERO,
        }
    }

    pub fn due(&self, i: u64) -> Instant {
        match self.mode {
            PublishMode::Burst { .. } => self.start,
            PublishMode::Rate { per_s, .. } => {
                self.start + Duration::from_secs_f64(i as f64 / per_s)
            }
        }
    }

    pub fn done(&self) -> bool {
        self.sent >= self.planned
    }

    /// When the next message is due (`None`: all sent).
    pub fn next_due(&self) -> Option<Instant> {
        (!self.done()).then(|| self.due(self.sent))
    }

    /// The next message if it is due at `now`: (topic, seq, sent_ns).
    pub(crate) fn take(&mut self, now: Instant) -> Option<(usize, u64, u64)> {
        if self.done() || self.due(self.sent) > now {
            return None;
        }
        self.max_lag = self
            .max_lag
            .max(now.saturating_duration_since(self.due(self.sent)));
        let (topic, seq) = route(self.sent, self.topics);
        self.first.get_or_insert(now);
        self.sent += 1;
        Some((topic, seq, mono_ns()))
    }
}

/// The publisher connections.
pub enum Publisher {
    Ws(Box<WsPublishers>),
    Http(HttpPublishers),
}

impl Publisher {
    /// Opens the connections of `plan` (from source `src`).
    pub fn open(plan: &FanoutPlan, src: Option<SocketAddr>) -> Result<Self, String> {
        let payloads = Payloads::of(plan.corpus.as_ref(), plan.size);
        if plan.publish.iter().all(|t| t.url.http) {
            HttpPublishers::open(&plan.publish, src, payloads).map(|p| {
                Self::Http(HttpPublishers {
                    spread: plan.spread,
                    ..p
                })
            })
        } else {
            WsPublishers::open(&plan.publish, plan.topics, src, payloads).map(|p| {
                Self::Ws(Box::new(WsPublishers {
                    spread: plan.spread,
                    ..p
                }))
            })
        }
    }

    /// WebSocket publishers that send each message of topic `t` to every
    /// URL of `by_topic[t]` (one connection each), from source `src`.
    pub fn open_by_topic(
        by_topic: &[Vec<Target>],
        src: Option<SocketAddr>,
        size: usize,
    ) -> Result<Self, String> {
        WsPublishers::open_by_topic(by_topic, src, Payloads::Synthetic { size })
            .map(|p| Self::Ws(Box::new(p)))
    }

    /// Encodes and hands to the sockets what is due, until nothing more is
    /// due, the sockets are full, or everything is sent.
    pub fn fill(&mut self, s: &mut Schedule) -> Result<(), String> {
        match self {
            Self::Ws(p) => p.fill(s),
            Self::Http(p) => p.fill(s),
        }
    }

    /// Everything sent was written (and, over HTTP, answered).
    pub fn idle(&self) -> bool {
        match self {
            Self::Ws(p) => p.idle(),
            Self::Http(p) => p.idle(),
        }
    }

    /// One event-loop turn of at most `wait`.
    pub fn serve(&mut self, wait: Duration) -> Result<(), String> {
        match self {
            Self::Ws(p) => p.serve(wait),
            Self::Http(p) => p.serve(wait),
        }
    }

    /// Closes the connections (WebSocket: close handshakes, bounded).
    pub fn close(self) {
        match self {
            Self::Ws(mut p) => {
                let _ = p.fleet.close_all(Instant::now() + Duration::from_secs(2));
            }
            Self::Http(_) => {}
        }
    }

    pub fn connections(&self) -> usize {
        match self {
            Self::Ws(p) => p.all.len(),
            Self::Http(p) => p.conns.len(),
        }
    }
}

/// WebSocket publishers: `routes[topic]` are the connections each message
/// of that topic goes to; `all` every connection once.
pub struct WsPublishers {
    fleet: Fleet,
    routes: Vec<Vec<usize>>,
    all: Vec<usize>,
    payloads: Payloads,
    rng: Rng,
    /// Each message to one connection of its route, in turn.
    spread: bool,
}

impl WsPublishers {
    fn new_fleet() -> Result<Fleet, String> {
        Fleet::new(FleetConfig {
            targets: Targets {
                dsts: Vec::new(),
                sources: Vec::new(),
                topics: None,
            },
            first: 0,
            connections: 0,
            in_flight: 1,
            handshake_timeout: OPEN_TIMEOUT,
        })
        .map_err(|e| format!("cannot create the poller: {e}"))
    }

    /// Opens one publisher connection to `t` (its `{topic}`, if any, as `topic`).
    fn open_one(
        fleet: &mut Fleet,
        t: &Target,
        topic: usize,
        src: Option<SocketAddr>,
    ) -> Result<usize, String> {
        let template = RequestTemplate::new(&t.url);
        fleet
            .open_extra(
                src,
                t.dst,
                &template,
                Some(topic),
                Instant::now() + OPEN_TIMEOUT,
            )
            .map_err(|e| format!("event loop failed opening a publisher: {e}"))?
            .ok_or_else(|| {
                format!(
                    "the publisher connection to {} (topic {topic}) did not open: {}",
                    t.url,
                    crate::report::counts(&fleet.failures)
                )
            })
    }

    /// Fanout: every message to every URL; one connection per URL and
    /// topic when the URL names the topic, one per URL otherwise.
    fn open(
        publish: &[Target],
        topics: usize,
        src: Option<SocketAddr>,
        payloads: Payloads,
    ) -> Result<Self, String> {
        let mut fleet = Self::new_fleet()?;
        let mut rows = Vec::new();
        for t in publish {
            // One connection per topic only when the URL names the topic.
            let per_url = if t.url.target.contains(TOPIC_PLACEHOLDER) {
                topics
            } else {
                1
            };
            let row = (0..per_url)
                .map(|topic| Self::open_one(&mut fleet, t, topic, src))
                .collect::<Result<Vec<usize>, String>>()?;
            rows.push(row);
        }
        let routes = (0..topics.max(1))
            .map(|topic| rows.iter().map(|row| row[topic % row.len()]).collect())
            .collect();
        Ok(Self {
            fleet,
            routes,
            all: rows.into_iter().flatten().collect(),
            payloads,
            rng: Rng::from_entropy(),
            spread: false,
        })
    }

    /// Storm: each message of topic `t` to every URL of `by_topic[t]`.
    fn open_by_topic(
        by_topic: &[Vec<Target>],
        src: Option<SocketAddr>,
        payloads: Payloads,
    ) -> Result<Self, String> {
        let mut fleet = Self::new_fleet()?;
        let mut routes = Vec::with_capacity(by_topic.len());
        for (topic, targets) in by_topic.iter().enumerate() {
            if targets.is_empty() {
                return Err(format!("no publish URL for topic {topic}"));
            }
            let row = targets
                .iter()
                .map(|t| Self::open_one(&mut fleet, t, topic, src))
                .collect::<Result<Vec<usize>, String>>()?;
            routes.push(row);
        }
        Ok(Self {
            fleet,
            all: routes.iter().flatten().copied().collect(),
            routes,
            payloads,
            rng: Rng::from_entropy(),
            spread: false,
        })
    }

    fn fill(&mut self, s: &mut Schedule) -> Result<(), String> {
        // Each pass sends at least one message or stops: bounded by `planned`.
        loop {
            let now = Instant::now();
            let mut progressed = false;
            while s.next_due().is_some_and(|d| d <= now) {
                let (topic, _) = route(s.sent, s.topics);
                let full = self.routes[topic % self.routes.len()].iter().any(|&t| {
                    self.fleet
                        .conn_mut(t)
                        .is_none_or(|c| c.pending() >= PUBLISH_BATCH_BYTES)
                });
                if full {
                    break;
                }
                let Some((topic, seq, ns)) = s.take(now) else {
                    break;
                };
                let route = &self.routes[topic % self.routes.len()];
                // Spread: one of them, in turn; otherwise every one.
                let chosen = if self.spread {
                    let i = (seq as usize) % route.len();
                    &route[i..=i]
                } else {
                    &route[..]
                };
                for &t in chosen {
                    let mask = self.rng.mask();
                    let conn = self.fleet.conn_mut(t).expect("checked above");
                    self.payloads.push_frame(conn.outbox(), seq, ns, mask);
                }
                progressed = true;
            }
            let mut written_all = true;
            for &t in &self.all {
                match self.fleet.conn_mut(t) {
                    Some(c) => {
                        c.flush()
                            .map_err(|e| format!("publisher write failed: {e}"))?;
                        written_all &= c.pending() == 0;
                    }
                    None => {
                        return Err(format!(
                            "a publisher connection ended: {}",
                            crate::report::counts(&self.fleet.ended)
                        ));
                    }
                }
            }
            if !progressed || !written_all || s.done() {
                return Ok(());
            }
        }
    }

    fn idle(&self) -> bool {
        // An ended connection is reported by `fill`.
        self.all
            .iter()
            .all(|&t| self.fleet.pending_of(t).is_none_or(|p| p == 0))
    }

    fn serve(&mut self, wait: Duration) -> Result<(), String> {
        self.fleet
            .serve(wait, &mut NoSink)
            .map_err(|e| format!("publisher event loop failed: {e}"))
    }
}

/// One HTTP keep-alive publisher connection.
struct HttpConn {
    stream: TcpStream,
    url: Target,
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
    in_flight: usize,
    connected: bool,
}

/// HTTP publishers: one connection per publish URL.
pub struct HttpPublishers {
    poll: Poll,
    events: Events,
    conns: Vec<HttpConn>,
    payloads: Payloads,
    /// Requests answered 204.
    pub answered: u64,
    /// Each message to one connection, in turn.
    spread: bool,
}

impl HttpPublishers {
    fn open(
        publish: &[Target],
        src: Option<SocketAddr>,
        payloads: Payloads,
    ) -> Result<Self, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create the poller: {e}"))?;
        let mut conns = Vec::new();
        for (i, t) in publish.iter().enumerate() {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(t.dst),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .and_then(|s| {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                if let Some(src) = src {
                    s.bind(&src.into())?;
                }
                match s.connect(&t.dst.into()) {
                    Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
                    _ => Ok(s),
                }
            })
            .map_err(|e| format!("cannot connect to {}: {e}", t.url))?;
            let mut stream = TcpStream::from_std(sock.into());
            poll.registry()
                .register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("cannot register a publisher: {e}"))?;
            conns.push(HttpConn {
                stream,
                url: t.clone(),
                out: Vec::new(),
                written: 0,
                input: Vec::new(),
                in_flight: 0,
                connected: false,
            });
        }
        let mut p = Self {
            poll,
            events: Events::with_capacity(64),
            conns,
            payloads,
            answered: 0,
            spread: false,
        };
        let deadline = Instant::now() + OPEN_TIMEOUT;
        while !p.conns.iter().all(|c| c.connected) {
            if Instant::now() >= deadline {
                return Err("the HTTP publisher connections did not open in time".into());
            }
            p.serve(Duration::from_millis(20))?;
        }
        Ok(p)
    }

    fn request(c: &mut HttpConn, topic: usize, seq: u64, ns: u64, payloads: &Payloads) {
        let target = c
            .url
            .url
            .target
            .replace(TOPIC_PLACEHOLDER, &topic.to_string());
        let mut body = Vec::new();
        payloads.push_body(&mut body, seq, ns);
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\n\
             Content-Length: {}\r\n\r\n",
            c.url.url.host_header(),
            payloads.content_type(),
            body.len()
        );
        c.out.extend_from_slice(head.as_bytes());
        c.out.extend_from_slice(&body);
        c.in_flight += 1;
    }

    fn fill(&mut self, s: &mut Schedule) -> Result<(), String> {
        loop {
            let now = Instant::now();
            let room = self.conns.iter().all(|c| {
                c.in_flight < HTTP_WINDOW && c.out.len() - c.written < PUBLISH_BATCH_BYTES
            });
            if !room {
                break;
            }
            let Some((topic, seq, ns)) = s.take(now) else {
                break;
            };
            if self.spread {
                let n = self.conns.len();
                let c = &mut self.conns[(seq as usize) % n];
                Self::request(c, topic, seq, ns, &self.payloads);
                continue;
            }
            for c in &mut self.conns {
                Self::request(c, topic, seq, ns, &self.payloads);
            }
        }
        for c in &mut self.conns {
            write_out(c)?;
        }
        Ok(())
    }

    fn idle(&self) -> bool {
        self.conns
            .iter()
            .all(|c| c.in_flight == 0 && c.written == c.out.len())
    }

    fn serve(&mut self, wait: Duration) -> Result<(), String> {
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("publisher event loop failed: {e}")),
        }
        let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for i in ready {
            let c = &mut self.conns[i];
            if !c.connected {
                if let Ok(Some(e)) | Err(e) = c.stream.take_error() {
                    return Err(format!("cannot connect to {}: {e}", c.url.url));
                }
                if c.stream.peer_addr().is_err() {
                    continue;
                }
                c.connected = true;
            }
            write_out(c)?;
            self.answered += read_responses(c)?;
        }
        Ok(())
    }
}

fn write_out(c: &mut HttpConn) -> Result<(), String> {
    if !c.connected {
        return Ok(());
    }
    while c.written < c.out.len() {
        match c.stream.write(&c.out[c.written..]) {
            Ok(0) => return Err("HTTP publisher: the connection closed".into()),
            Ok(n) => c.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("HTTP publisher write failed: {e}")),
        }
    }
    if c.written == c.out.len() {
        c.out.clear();
        c.written = 0;
    }
    Ok(())
}

/// Reads and checks every complete response; the number answered 204.
fn read_responses(c: &mut HttpConn) -> Result<u64, String> {
    let mut buf = [0u8; 16 * 1024];
    // Each read makes progress or returns: bounded by what the server sent.
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return Err(format!("{}: the server closed the connection", c.url.url)),
            Ok(n) => c.input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("HTTP publisher read failed: {e}")),
        }
    }
    let mut answered = 0;
    let mut pos = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&c.input[pos..]) {
            Ok(httparse::Status::Complete(n)) => {
                let code = resp.code.unwrap_or(0);
                if code != 204 {
                    let text = String::from_utf8_lossy(&c.input[pos..pos + n]);
                    return Err(format!(
                        "{}: publish answered {code}, not 204: {}",
                        c.url.url,
                        text.lines().next().unwrap_or("")
                    ));
                }
                pos += n;
                answered += 1;
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            Ok(httparse::Status::Partial) if c.input.len() - pos > MAX_HTTP_RESPONSE => {
                return Err(format!("{}: response head too large", c.url.url));
            }
            Ok(httparse::Status::Partial) => break,
            Err(e) => return Err(format!("{}: malformed response: {e}", c.url.url)),
        }
    }
    c.input.drain(..pos);
    Ok(answered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_schedule_is_paced_and_round_robin() {
        let t0 = Instant::now();
        let mode = PublishMode::Rate {
            per_s: 10.0,
            duration: Duration::from_secs(1),
        };
        let mut s = Schedule::new(mode, 3, t0);
        assert_eq!(s.planned, 10);
        assert_eq!(s.due(5), t0 + Duration::from_millis(500));
        // At t0 + 250 ms, messages 0..=2 are due, not 3.
        let now = t0 + Duration::from_millis(250);
        let got: Vec<_> = std::iter::from_fn(|| s.take(now).map(|(t, q, _)| (t, q))).collect();
        assert_eq!(got, [(0, 0), (1, 0), (2, 0)]);
        assert_eq!(s.max_lag, Duration::from_millis(250));
        assert_eq!(s.next_due(), Some(t0 + Duration::from_millis(300)));
        let later = t0 + Duration::from_secs(5);
        let rest: Vec<_> = std::iter::from_fn(|| s.take(later).map(|(t, q, _)| (t, q))).collect();
        assert_eq!(rest.len(), 7);
        assert_eq!(rest[0], (0, 1));
        assert!(s.done() && s.next_due().is_none());
    }

    #[test]
    fn burst_is_all_due_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(PublishMode::Burst { messages: 4 }, 1, t0);
        let seqs: Vec<u64> = std::iter::from_fn(|| s.take(t0).map(|m| m.1)).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        assert_eq!(s.max_lag, Duration::ZERO);
    }
}
