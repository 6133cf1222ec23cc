//! What a connection *is*, independent of the I/O backend: its phase
//! (HTTP request, open WebSocket, closing), its role (echo, subscriber,
//! publisher), the bytes kept between reads, and its outbound queue.
//! Routing and the endpoints live here.
//!
//! A backend reads into its shared buffer after [`Session::restore_pending`],
//! hands the bytes to [`Session::on_input`] with a [`Ctx`], and writes
//! [`Session::out`]. Published frames come in through
//! [`Session::push_published`]. No syscalls here: tests drive sessions with
//! plain byte slices.

use super::Shared;
use super::config::{Config, SlowConsumerPolicy};
use super::http;
use super::stats::WorkerStats;
use crate::proto::frame::server_frame;
use crate::proto::handshake::{
    self, HeadScanner, MAX_HEADERS, Reject, Request, Status, choose_subprotocol, parse_head,
    validate_upgrade, write_switching_protocols,
};
use crate::proto::rate::TokenBucket;
use crate::proto::{CloseCode, CloseState, Event, MessageKind, OutQueue, WsConn};
use crate::pubsub::control::{self, Op};
use crate::pubsub::directory::TopicInterest;
use crate::pubsub::shard::{ConnRef, Shard, SubList};
use crate::pubsub::topic::{self, TopicError};
use bytes::Bytes;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

/// What a session may touch while it handles input.
pub struct Ctx<'a> {
    pub shared: &'a Shared,
    /// This worker's counters.
    pub stats: &'a WorkerStats,
    /// This worker's topic registry and outbox.
    pub shard: &'a mut Shard,
    /// This connection, as the shard names it.
    pub me: ConnRef,
    pub now: Instant,
    /// `now` in milliseconds on the worker's clock (wrapping).
    pub now_ms: u32,
    /// The client's address, when the backend knows it.
    pub peer: Option<IpAddr>,
    /// The worker's `/metrics` rendering of this turn (made at `now`).
    pub metrics: &'a mut Option<(Instant, Bytes)>,
}

/// What an open WebSocket is for.
#[derive(Debug)]
enum Role {
    /// `/echo`: every message comes back with its opcode.
    Echo,
    /// `/ws`: receives the topics it subscribed to; sends control messages.
    Subscriber { subs: SubList },
    /// `/publish/{topic}`: every message it sends is published.
    Publisher {
        topic: Option<Arc<TopicInterest>>,
        /// `--max-publish-rate`: what one read delivers is published, going
        /// into debt if need be; the backend then stops reading until the
        /// debt is repaid (pacing, nothing lost).
        pace: TokenBucket,
    },
}

#[derive(Debug)]
enum Phase {
    /// Reading an HTTP request head.
    Head(HeadScanner),
    /// Reading the body of `POST /publish/{topic}`.
    Body(Box<BodyState>),
    /// An open WebSocket.
    Ws { ws: WsConn, role: Role },
    /// A final HTTP response is queued: write it, then close.
    Done,
}

#[derive(Debug)]
struct BodyState {
    topic: Box<str>,
    kind: MessageKind,
    len: usize,
    keep_alive: bool,
    body: Vec<u8>,
}

/// What the backend should do after [`Session::on_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Read,
    /// Stop reading: flush what is queued, then shut the write side down and
    /// linger until the peer closes (close handshake done, connection failed,
    /// or a final HTTP response).
    FlushAndClose,
}

/// The outcome of [`Session::push_published`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued for writing.
    Queued,
    /// Not for this connection (not an open WebSocket): nothing done.
    Ignored,
    /// The subscriber has sent its close frame: nothing may follow it, so
    /// the frame is not delivered (counted as undelivered, "closing").
    Closing,
    /// Skipped: the queue is full and the policy is drop-newest.
    Dropped,
    /// The queue is full and the policy is disconnect: the not-yet-started
    /// frames (`discarded` bytes) were dropped and a 1008 close queued. The
    /// backend detaches the session and closes the connection.
    SlowConsumer { discarded: usize },
}

/// One connection's state. No heap when idle, apart from its subscriptions.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// Input not yet consumed: a partial head, frame header or control frame.
    /// Exactly sized (16 bytes inline instead of a `Vec`'s 24: idle memory).
    pending: Box<[u8]>,
    /// HTTP requests completed (the backend re-arms the request deadline
    /// when this changes).
    requests: u32,
    /// Published something (HTTP or WebSocket) since the last
    /// [`Session::take_published`]: the backend applies the mailbox
    /// backpressure to it.
    published: bool,
    /// Bytes waiting to be written.
    pub out: OutQueue,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a request goes.
enum Route<'p> {
    Upgrade(Upgrade<'p>),
    Publish(&'p str),
    /// `/metrics` or `/healthz` on the main port.
    Admin,
}

enum Upgrade<'p> {
    Echo,
    Subscribe,
    Publish(&'p str),
}

fn route<'p>(req: &Request<'p, '_>, cfg: &Config) -> Result<Route<'p>, Reject> {
    let admin_here = cfg.admin_listen.is_none();
    match req.path {
        "/echo" => Ok(Route::Upgrade(Upgrade::Echo)),
        "/ws" => Ok(Route::Upgrade(Upgrade::Subscribe)),
        "/metrics" | "/healthz" if admin_here => Ok(Route::Admin),
        p => match p.strip_prefix("/publish/") {
            Some(t) if req.method == "POST" => Ok(Route::Publish(t)),
            Some(t) if req.method == "GET" => Ok(Route::Upgrade(Upgrade::Publish(t))),
            Some(_) => Err(Reject::method(
                "publish with POST or a WebSocket (GET)",
                "GET, POST",
            )),
            None => Err(Reject::new(Status::NotFound, "no such endpoint")),
        },
    }
}

fn topic_reject(e: TopicError) -> Reject {
    Reject::new(
        Status::BadRequest,
        match e {
            TopicError::Empty => "empty topic name",
            TopicError::TooLong { .. } => "topic name too long (see --max-topic-len)",
            TopicError::BadChar(_) => "bad topic name; allowed: A-Z a-z 0-9 - _ . : / @ ~",
        },
    )
}

fn check_publisher(req: &Request<'_, '_>, cfg: &Config) -> Result<(), Reject> {
    let Some(token) = &cfg.publish_token else {
        return Ok(());
    };
    let authorization = req.header("authorization").ok().flatten();
    if http::authorized(token, authorization, req.query) {
        Ok(())
    } else {
        Err(Reject::new(
            Status::Unauthorized,
            "publisher token missing or wrong",
        ))
    }
}

/// Does the client want the connection kept open after this request?
fn keep_alive(req: &Request<'_, '_>) -> bool {
    if req.version == 1 {
        !req.has_token("connection", "close")
    } else {
        req.has_token("connection", "keep-alive")
    }
}

impl Session {
    /// A new connection, waiting for its request head.
    pub fn new() -> Self {
        Self {
            phase: Phase::Head(HeadScanner::default()),
            pending: Box::default(),
            requests: 0,
            published: false,
            out: OutQueue::new(),
        }
    }

    /// Is the connection waiting for (or inside) an HTTP request, so that
    /// the request deadline applies?
    pub fn awaiting_request(&self) -> bool {
        matches!(self.phase, Phase::Head(_) | Phase::Body(_))
    }

    /// Has part of an HTTP request (head or body) arrived?
    pub fn partial_request(&self) -> bool {
        match &self.phase {
            Phase::Head(_) => !self.pending.is_empty(),
            Phase::Body(_) => true,
            _ => false,
        }
    }

    /// HTTP requests completed on this connection so far.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// Did this connection publish since the last call? Clears the mark.
    pub fn take_published(&mut self) -> bool {
        std::mem::take(&mut self.published)
    }

    /// Is this an open WebSocket?
    pub fn is_websocket(&self) -> bool {
        matches!(self.phase, Phase::Ws { .. })
    }

    /// Is this a WebSocket publisher (whose reads the backend may throttle)?
    pub fn is_publisher(&self) -> bool {
        matches!(
            self.phase,
            Phase::Ws {
                role: Role::Publisher { .. },
                ..
            }
        )
    }

    /// What the backend should do now.
    pub fn next(&self) -> Next {
        match &self.phase {
            Phase::Head(_) | Phase::Body(_) => Next::Read,
            Phase::Ws { ws, .. } if ws.close_state() != CloseState::Closed => Next::Read,
            _ => Next::FlushAndClose,
        }
    }

    /// Bytes kept from previous input.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Copies the bytes kept from the previous read to the start of `buf`;
    /// returns how many. The backend reads new bytes after them.
    pub fn restore_pending(&mut self, buf: &mut [u8]) -> usize {
        let n = self.pending.len();
        buf[..n].copy_from_slice(&self.pending);
        n
    }

    /// Keeps `data` after the pending bytes without processing it (input
    /// that arrived while the backend had paused reading); the next
    /// [`Self::restore_pending`] returns it. Charged to the buffer budget
    /// like any pending input.
    pub fn hold(&mut self, data: &[u8]) {
        let mut all = Vec::with_capacity(self.pending.len() + data.len());
        all.extend_from_slice(&self.pending);
        all.extend_from_slice(data);
        self.pending = all.into_boxed_slice();
    }

    /// Processes `buf` (previous pending bytes followed by new ones).
    pub fn on_input(&mut self, buf: &mut [u8], ctx: &mut Ctx<'_>) -> Next {
        let mut pos = 0;
        loop {
            match &mut self.phase {
                Phase::Head(scanner) => {
                    let cfg = &ctx.shared.config;
                    let rest = &buf[pos..];
                    let Some(end) = scanner.find_end(rest) else {
                        if rest.len() > cfg.max_handshake_size {
                            self.refuse(
                                Reject::new(Status::HeadTooLarge, "request head too large"),
                                ctx.stats,
                            );
                            return Next::FlushAndClose;
                        }
                        self.keep(buf, pos);
                        return Next::Read;
                    };
                    if end > cfg.max_handshake_size {
                        self.refuse(
                            Reject::new(Status::HeadTooLarge, "request head too large"),
                            ctx.stats,
                        );
                        return Next::FlushAndClose;
                    }
                    let head_end = pos + end;
                    if let Err(reject) = self.request(&buf[pos..head_end], ctx) {
                        self.refuse(reject, ctx.stats);
                        return Next::FlushAndClose;
                    }
                    self.requests = self.requests.wrapping_add(1);
                    pos = head_end;
                }
                Phase::Body(body) => {
                    let want = body.len - body.body.len();
                    let take = want.min(buf.len() - pos);
                    if take < want {
                        body.body.extend_from_slice(&buf[pos..]);
                        self.pending = Box::default();
                        return Next::Read;
                    }
                    if !body.body.is_empty() {
                        body.body.extend_from_slice(&buf[pos..pos + take]);
                    }
                    let Phase::Body(state) = std::mem::replace(&mut self.phase, Phase::Done) else {
                        unreachable!()
                    };
                    // A body that arrived whole in this read is published straight
                    // from the read buffer, without a copy.
                    let payload = if state.body.is_empty() {
                        &buf[pos..pos + take]
                    } else {
                        &state.body[..]
                    };
                    self.finish_publish(&state, payload, ctx);
                    pos += take;
                    if matches!(self.phase, Phase::Done) {
                        self.pending = Box::default();
                        return Next::FlushAndClose;
                    }
                }
                Phase::Ws { .. } => {
                    pos = self.on_frames(buf, pos, ctx);
                    let next = self.next();
                    self.keep(buf, pos);
                    return next;
                }
                Phase::Done => {
                    // Whatever else the client sends is ignored.
                    self.pending = Box::default();
                    return Next::FlushAndClose;
                }
            }
        }
    }

    /// Decodes frames from `buf[pos..]`; returns the new position.
    fn on_frames(&mut self, buf: &mut [u8], mut pos: usize, ctx: &mut Ctx<'_>) -> usize {
        let Phase::Ws { ws, role } = &mut self.phase else {
            return pos;
        };
        ws.tick(ctx.now_ms);
        let rate = ctx.shared.config.max_publish_rate;
        loop {
            let decoded = ws.decode(&mut buf[pos..], &mut self.out);
            pos += decoded.consumed;
            // Act while the event still borrows the input; replies go out after.
            let control = match decoded.event {
                None => break,
                Some(Event::Message { kind, payload }) => match role {
                    Role::Echo => {
                        ctx.stats.message_echoed();
                        Some(Reply::Frame(encode(kind, payload)))
                    }
                    Role::Subscriber { .. } if kind == MessageKind::Text => {
                        Some(Reply::Control(payload.to_vec()))
                    }
                    Role::Subscriber { .. } => {
                        ctx.stats.control_error();
                        Some(Reply::Text(control::error(
                            "binary messages are not control messages; send JSON text",
                        )))
                    }
                    Role::Publisher { topic, pace } => {
                        ctx.stats.message_published();
                        pace.spend(rate, ctx.now_ms);
                        if let Some(t) = topic {
                            ctx.shard.publish(t, encode(kind, payload), ctx.now);
                            self.published = true;
                        }
                        None
                    }
                },
                Some(Event::Pong(_)) => None,
                Some(Event::Closed { code }) => {
                    debug!(?code, "peer closed");
                    None
                }
                Some(Event::Failed { code, reason }) => {
                    ctx.stats.protocol_error();
                    ctx.stats.ws_failure(code.0);
                    debug!(code = code.0, reason, "connection failed");
                    None
                }
            };
            match control {
                None => {}
                Some(Reply::Frame(frame)) => {
                    ws.send_frame(frame, &mut self.out);
                }
                Some(Reply::Text(text)) => {
                    ws.send(MessageKind::Text, text.as_bytes(), &mut self.out);
                }
                Some(Reply::Control(mut msg)) => {
                    let Role::Subscriber { subs } = role else {
                        unreachable!("control messages come from subscribers")
                    };
                    let reply = control_message(&mut msg, subs, ctx);
                    ws.send(MessageKind::Text, reply.as_bytes(), &mut self.out);
                }
            }
        }
        pos
    }

    /// Queues a published frame for this subscriber, applying the
    /// slow-consumer policy at the queue bound, or at any backlog at all
    /// when the worker is `over_budget`. A queue always takes one frame
    /// when empty, so a message bigger than the bound still goes out.
    pub fn push_published(&mut self, frame: &Bytes, cfg: &Config, over_budget: bool) -> Push {
        let Phase::Ws { ws, .. } = &mut self.phase else {
            return Push::Ignored;
        };
        if !ws.can_send() {
            return Push::Closing;
        }
        if !self.out.is_empty()
            && (over_budget || self.out.len() + frame.len() > cfg.max_outbound_bytes)
        {
            return match cfg.slow_consumer {
                SlowConsumerPolicy::DropNewest => Push::Dropped,
                SlowConsumerPolicy::Disconnect => {
                    let discarded = self.out.truncate_to_front();
                    ws.close(CloseCode::POLICY_VIOLATION, "slow consumer", &mut self.out);
                    Push::SlowConsumer { discarded }
                }
            };
        }
        self.out.push_frame(frame);
        Push::Queued
    }

    /// Leaves every topic and lets go of the publisher's topic. Called once
    /// the connection is closing or gone; idempotent.
    pub fn detach(&mut self, shard: &mut Shard, stats: &WorkerStats) {
        if let Phase::Ws { role, .. } = &mut self.phase {
            match role {
                Role::Subscriber { subs } => {
                    stats.unsubscribed(subs.len());
                    for sub in subs.take() {
                        shard.unsubscribe(sub);
                    }
                }
                Role::Publisher { topic, .. } => {
                    if let Some(t) = topic.take() {
                        shard.directory().release(t);
                    }
                }
                Role::Echo => {}
            }
        }
    }

    /// Starts the close handshake from the server side (shutdown: 1001,
    /// keepalive timeout). Returns `false` for a connection that is not an
    /// open WebSocket.
    pub fn close(&mut self, code: CloseCode, reason: &str) -> bool {
        match &mut self.phase {
            Phase::Ws { ws, .. } => {
                ws.close(code, reason, &mut self.out);
                true
            }
            _ => false,
        }
    }

    /// Queues a keepalive ping; `false` when the connection cannot take one.
    pub fn ping(&mut self) -> bool {
        match &mut self.phase {
            Phase::Ws { ws, .. } => ws.ping(b"", &mut self.out),
            _ => false,
        }
    }

    /// How long a WebSocket publisher must not be read to stay under
    /// `--max-publish-rate` (0: read on).
    pub fn publish_wait_ms(&self, rate: u32) -> u32 {
        match &self.phase {
            Phase::Ws {
                role: Role::Publisher { pace, .. },
                ..
            } => pace.wait_ms(rate),
            _ => 0,
        }
    }

    /// When the WebSocket message in progress started (worker milliseconds,
    /// see [`Ctx::now_ms`]); `None` between messages. The message deadline
    /// runs from there.
    pub fn message_started(&self) -> Option<u32> {
        match &self.phase {
            Phase::Ws { ws, .. } => ws.message_started(),
            _ => None,
        }
    }

    /// Bytes held for this connection that the memory budget charges:
    /// partial input, a partial message or body, and owned queued bytes.
    /// (Its subscriptions and published frames are charged by the shard.)
    pub fn held_bytes(&self) -> usize {
        let phase = match &self.phase {
            Phase::Ws { ws, .. } => ws.buffered(),
            Phase::Body(b) => b.body.capacity(),
            _ => 0,
        };
        self.pending.len() + phase + self.out.owned()
    }

    /// Gives up on the connection from the server's side: an open WebSocket
    /// is failed with `code` (its partial message freed), an HTTP request is
    /// answered with `status`. The backend then closes it.
    pub fn abort(
        &mut self,
        code: CloseCode,
        status: Status,
        reason: &'static str,
        stats: &WorkerStats,
    ) {
        self.pending = Box::default();
        match &mut self.phase {
            Phase::Ws { ws, .. } => ws.abort(code, reason, &mut self.out),
            Phase::Head(_) | Phase::Body(_) => self.refuse(Reject::new(status, reason), stats),
            Phase::Done => {}
        }
    }

    /// Handles a complete request head: upgrade, publish request, metrics.
    fn request(&mut self, head: &[u8], ctx: &mut Ctx<'_>) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse_head(head, &mut headers)?;
        match route(&req, cfg)? {
            Route::Upgrade(up) => self.upgrade(&req, up, ctx),
            Route::Publish(name) => {
                check_publisher(&req, cfg)?;
                self.begin_publish(&req, name, ctx)
            }
            Route::Admin => {
                let ka = keep_alive(&req);
                let (shared, now, stats) = (ctx.shared, ctx.now, ctx.stats);
                let cache = &mut *ctx.metrics;
                let render = || match cache {
                    // Pipelined requests in one turn share one rendering.
                    Some((at, body)) if *at == now => body.clone(),
                    _ => {
                        stats.metrics_rendered();
                        cache.insert((now, http::render_metrics(shared))).1.clone()
                    }
                };
                let response = http::admin_response(&req, ka, Some(ctx.stats), render)
                    .expect("routed by path")?;
                self.out.push_copy(&response.head);
                // Shared with the turn's other requests, and bounded per
                // connection by --max-outbound-bytes (reading pauses above it).
                self.out.push_shared(response.body);
                self.phase = if ka {
                    Phase::Head(HeadScanner::default())
                } else {
                    Phase::Done
                };
                Ok(())
            }
        }
    }

    /// Validates an upgrade; on success queues the `101` and opens the WebSocket.
    fn upgrade(
        &mut self,
        req: &Request<'_, '_>,
        up: Upgrade<'_>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        let upgrade = validate_upgrade(req)?;
        let role = match up {
            Upgrade::Echo => Role::Echo,
            Upgrade::Publish(name) => {
                check_publisher(req, cfg)?;
                topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
                Role::Publisher {
                    topic: Some(ctx.shard.directory().entry(name)),
                    pace: TokenBucket::full(cfg.max_publish_rate, ctx.now_ms),
                }
            }
            Upgrade::Subscribe => {
                let list = topic::from_query(req.query).unwrap_or("");
                let names = topic::parse_list(list, cfg.max_topic_len, cfg.max_topics_per_conn)
                    .map_err(|e| match e {
                        topic::ListError::Name(e) => topic_reject(e),
                        topic::ListError::TooMany { .. } => Reject::new(
                            Status::BadRequest,
                            "too many topics for one connection (see --max-topics-per-conn)",
                        ),
                    })?;
                let mut subs = SubList::default();
                for n in &names {
                    subs.push(ctx.shard.subscribe(n, ctx.me));
                }
                ctx.stats.subscribed(subs.len());
                Role::Subscriber { subs }
            }
        };
        let subprotocol = choose_subprotocol(req, &cfg.subprotocols);
        let mut response = Vec::with_capacity(192);
        write_switching_protocols(&mut response, upgrade.key, subprotocol);
        self.out.push(Bytes::from(response));
        ctx.stats.handshake_accepted();
        let limits = match role {
            Role::Subscriber { .. } => &ctx.shared.subscriber_limits,
            _ => &ctx.shared.ws_limits,
        };
        self.phase = Phase::Ws {
            ws: WsConn::with_limits(Arc::clone(limits), ctx.now_ms),
            role,
        };
        Ok(())
    }

    /// Checks a `POST /publish/{topic}` head and starts reading its body.
    fn begin_publish(
        &mut self,
        req: &Request<'_, '_>,
        name: &str,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
        if !ctx.shared.admission.allow_publish(ctx.peer) {
            ctx.stats.publish_rate_limited();
            return Err(Reject::new(
                Status::TooManyRequests,
                "publishing too fast (see --max-publish-rate)",
            ));
        }
        if req.header_values("transfer-encoding").next().is_some() {
            return Err(Reject::new(
                Status::LengthRequired,
                "chunked bodies are not supported; send Content-Length",
            ));
        }
        let len = req
            .header("content-length")
            .map_err(|_| Reject::new(Status::BadRequest, "duplicate Content-Length"))?
            .ok_or(Reject::new(
                Status::LengthRequired,
                "Content-Length required",
            ))?;
        let len: usize = std::str::from_utf8(len.trim_ascii())
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or(Reject::new(Status::BadRequest, "bad Content-Length"))?;
        if len > cfg.max_message_size {
            return Err(Reject::new(
                Status::PayloadTooLarge,
                "body over the message size limit (see --max-message-size)",
            ));
        }
        let is_text = req
            .header("content-type")
            .ok()
            .flatten()
            .is_some_and(|ct| ct.len() >= 5 && ct[..5].eq_ignore_ascii_case(b"text/"));
        if len > 0 && req.has_token("expect", "100-continue") {
            self.out.push(Bytes::from_static(http::CONTINUE));
        }
        self.phase = Phase::Body(Box::new(BodyState {
            topic: name.into(),
            kind: if is_text {
                MessageKind::Text
            } else {
                MessageKind::Binary
            },
            len,
            keep_alive: keep_alive(req),
            body: Vec::new(),
        }));
        Ok(())
    }

    /// Publishes a complete HTTP body and answers 204 (or 400 for a text
    /// body that is not UTF-8). Leaves the phase at `Head` (keep-alive) or `Done`.
    fn finish_publish(&mut self, state: &BodyState, body: &[u8], ctx: &mut Ctx<'_>) {
        if state.kind == MessageKind::Text && simdutf8::basic::from_utf8(body).is_err() {
            self.refuse(
                Reject::new(Status::BadRequest, "text/* body is not valid UTF-8"),
                ctx.stats,
            );
            return;
        }
        ctx.stats.http_request();
        ctx.stats.message_published();
        // One directory lookup, no reference taken: nobody anywhere
        // subscribed means nothing to encode or deliver.
        if let Some((topic, workers)) = ctx.shard.directory().interest(&state.topic) {
            let frame = encode(state.kind, body);
            ctx.shard.publish_weak(topic, workers, frame, ctx.now);
            self.published = true;
        }
        self.out
            .push(Bytes::from_static(http::no_content(state.keep_alive)));
        self.phase = if state.keep_alive {
            Phase::Head(HeadScanner::default())
        } else {
            Phase::Done
        };
    }

    /// Keeps `buf[pos..]` for the next read; frees the buffer when nothing is left.
    fn keep(&mut self, buf: &[u8], pos: usize) {
        let rest = &buf[pos..];
        self.pending = rest.into();
    }

    /// Answers `reject` and closes: a refused request, or a connection
    /// refused at accept.
    pub fn refuse(&mut self, reject: Reject, stats: &WorkerStats) {
        stats.handshake_rejected(reject.status);
        debug!(
            status = reject.status.code(),
            reason = reject.reason,
            "request refused"
        );
        self.out
            .push(Bytes::from(handshake::error_response(reject)));
        self.phase = Phase::Done;
        self.pending = Box::default();
    }
}

/// A reply decided while the input was borrowed.
enum Reply {
    Frame(Bytes),
    Text(String),
    Control(Vec<u8>),
}

/// A message as one server frame, encoded once for every subscriber.
fn encode(kind: MessageKind, payload: &[u8]) -> Bytes {
    Bytes::from(server_frame(kind.opcode(), payload))
}

/// Applies a subscriber's control message; returns the JSON reply.
fn control_message(msg: &mut [u8], subs: &mut SubList, ctx: &mut Ctx<'_>) -> String {
    let cfg = &ctx.shared.config;
    let limits = control::Limits {
        max_topic_len: cfg.max_topic_len,
        max_topics: cfg.max_topics_per_conn,
    };
    let c = match control::parse(msg, limits) {
        Ok(c) => c,
        Err(e) => {
            ctx.stats.control_error();
            return control::error(&e.to_string());
        }
    };
    // Linear in the names plus the topics held: each name costs hash
    // lookups, never a search of `subs` (held at most max_topics_per_conn).
    match c.op {
        Op::Subscribe => {
            let held: std::collections::HashSet<u32> =
                subs.as_slice().iter().map(|s| s.topic()).collect();
            let new: Vec<&String> = c
                .topics
                .iter()
                .filter(|n| ctx.shard.topic_id(n).is_none_or(|id| !held.contains(&id)))
                .collect();
            if subs.len() + new.len() > cfg.max_topics_per_conn {
                ctx.stats.control_error();
                let max = cfg.max_topics_per_conn;
                return control::error(&control::ControlError::TooManyTopics { max }.to_string());
            }
            for name in new {
                subs.push(ctx.shard.subscribe(name, ctx.me));
                ctx.stats.subscribed(1);
            }
        }
        Op::Unsubscribe => {
            let gone: std::collections::HashSet<u32> = c
                .topics
                .iter()
                .filter_map(|n| ctx.shard.topic_id(n))
                .collect();
            let shard = &mut *ctx.shard;
            let mut dropped = 0;
            subs.retain(|s| {
                let keep = !gone.contains(&s.topic());
                if !keep {
                    shard.unsubscribe(*s);
                    dropped += 1;
                }
                keep
            });
            ctx.stats.unsubscribed(dropped);
        }
    }
    control::reply(c.op, &c.topics)
}
