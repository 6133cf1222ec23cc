//! What a connection *is*, independent of the I/O backend: its phase
//! (HTTP request, open WebSocket, closing), its role (echo, subscriber,
//! publisher), the bytes kept between reads, and its outbound queue.
//! Routing and the endpoints live beside it, one file per concern:
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Session`]: phases, input, frames, closing |
//! | `request.rs` | routing and the WebSocket upgrade |
//! | `publish.rs` | `POST /publish/{topic}` |
//! | `subscriber.rs` | a subscriber's control messages |
//! | `delivery.rs` | published frames into the queue, the slow-consumer policy |
//!
//! A backend reads into its shared buffer after [`Session::restore_pending`]
//! and hands the bytes to `Core::input`, which builds the [`Ctx`] and calls
//! [`Session::on_input`]; the backend writes [`Session::out`]. Published frames come in through
//! [`Session::push_published`]. No syscalls here: tests drive sessions with
//! plain byte slices.

mod delivery;
mod publish;
mod request;
mod subscriber;

use crate::proto::frame::{MAX_SERVER_HEADER_LEN, server_frame};
use crate::proto::handshake::{self, HeadScanner, Reject, Status};
use crate::proto::rate::TokenBucket;
use crate::proto::{CloseCode, CloseState, Event, MessageKind, OutQueue, WsConn};
use crate::pubsub::bus::PUBLICATION_OVERHEAD_BYTES;
use crate::pubsub::control;
use crate::pubsub::directory::TopicInterest;
use crate::pubsub::shard::{ConnRef, Shard, SubList};
use crate::server::Shared;
use crate::server::stats::WorkerStats;
use bytes::Bytes;
use publish::BodyState;
pub use publish::Confirm;
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
    /// `POST /publish` requests of this input not answered yet, in order
    /// (keep-alive, published: numbered at the next dispatch). Answered
    /// together ([`Session::answer_published`]), so that the publications of
    /// one read reach the mailboxes as one batch.
    pub unanswered: Vec<(bool, bool)>,
    /// Set by the session: it published something (HTTP or WebSocket).
    /// The backend applies the mailbox backpressure to it.
    pub published: bool,
    /// Counted by the session: HTTP requests it completed (the backend
    /// arms the next request's deadline).
    pub requests: u32,
    /// Set by the session: a subscribe (or the upgrade) named these
    /// topics and patterns, with this maximum rate per topic (updates per
    /// second; `None` or 0: none). The backend applies it to them.
    pub rated: Option<(Option<u32>, Vec<String>)>,
    /// Set by the session: a control message changed the subscriptions
    /// (the backend drops what waits for topics left).
    pub resubscribed: bool,
    /// Wall-clock time, Unix seconds (token times are checked against it).
    pub wall_s: u64,
    /// What this connection's token grants (with tokens on; `None`: no
    /// token). Set by the session at the upgrade; the backend keeps it.
    pub grant: Option<Arc<crate::server::auth::Grant>>,
    /// Set by the session: it stopped before the end of the input, which it
    /// keeps (it decoded [`YIELD_AFTER_BYTES`] of messages from it, or a
    /// paced publisher has no token left). The backend reads on at its
    /// next turn, or when the pace allows.
    pub yielded: bool,
    /// Bytes of publications this input may still add to the worker's
    /// outbox: what the buffer budget has left (this connection's own
    /// charge counted as free: it is measured again after the input). A
    /// WebSocket message that does not fit is not published, and its
    /// publisher is failed `1013`, as any connection that would take the
    /// worker past its budget: compressed messages inflate up to 1 000
    /// times, so the many publishers of one turn could otherwise make the
    /// worker hold gigabytes before the turn's end charges them.
    pub room: usize,
    /// The work this connection's input did so far this turn, in bytes'
    /// worth: each byte received counts [`WIRE_WORK`], each message byte
    /// decoded one, an echo compressed [`COMPRESS_WORK`] a byte, a token
    /// check [`CHECK_WORK`]. Set by the backend (what earlier input of
    /// the same turn did, and this input's new bytes), added to by the
    /// session, which stops at [`YIELD_AFTER_BYTES`] and keeps the rest
    /// for the next turn. Counted across the turn, not per read: one
    /// io_uring receive completion or one epoll read is only part of a
    /// turn's input (outside probe: a flood of compressed messages,
    /// inflated 32 KiB of wire at a time, never reached the per-read
    /// bound and held its worker for the whole flood).
    pub work: usize,
    /// Bytes of echoes the worker may still compress this turn, every
    /// connection's together: past it, echoes go uncompressed (the
    /// extension allows it), as publications do past their room. Each
    /// connection's compressing also counts toward its own turn
    /// ([`COMPRESS_WORK`]), but one message always goes, so 32 clients
    /// echoing 64 KiB of text each made a turn compress 2 MiB (outside
    /// probe: a victim's round trip waited ~90 ms a turn).
    pub echo_compress: usize,
}

impl Ctx<'_> {
    /// Counts `steps` pattern-matching steps (token comparisons, trie nodes
    /// walked) toward the turn's [`work`](Self::work), like the bytes it
    /// would take to decode as long ([`BYTES_PER_MATCH_STEP`] each).
    fn count_match_steps(&mut self, steps: usize) {
        self.work = self
            .work
            .saturating_add(steps.saturating_mul(BYTES_PER_MATCH_STEP));
    }
}

/// Answers queued for an HTTP client past which its next pipelined
/// request waits until they drain: without it, a client pipelining
/// `GET /metrics` and reading nothing had every answer queued and charged
/// (outside probe: 3 500 such clients, 54 requests each, 6 MB sent, held
/// 2.3 GB of the 1 GiB budget, and honest clients were refused).
pub const PIPELINE_AHEAD_BYTES: usize = 64 * 1024;

/// Message bytes a connection's input may decode in one turn before the
/// rest of it waits for the next: compressed messages inflate up to 1 000
/// times their size, so a read of 64 KiB of them could otherwise make the
/// worker inflate (and hold, and publish) gigabytes before anyone else is
/// served. A single message always goes whole (`--max-message-size`).
pub const YIELD_AFTER_BYTES: usize = 1024 * 1024;

/// What a token check (a signature, ~50 µs with ES256) counts toward
/// [`YIELD_AFTER_BYTES`]: 16 HTTP requests with tokens a turn, about a
/// millisecond of checks, before the rest of a pipeline waits for the
/// connection's next turn.
pub const CHECK_WORK: usize = YIELD_AFTER_BYTES / 16;

/// What each byte a connection sends counts toward [`YIELD_AFTER_BYTES`]
/// (besides what decoding it costs): a quarter of a turn's worth, 256 KiB,
/// is all of one io_uring worker's receive buffers, so a connection that
/// keeps its socket full cannot take them at every turn: it is paused for
/// a turn once it had its share, and the others' receives find buffers
/// (outside probe: a flooding publisher took all 8 at every submission,
/// and the other connections of its worker got nothing but `ENOBUFS`
/// until the flood stopped). On epoll it bounds a turn's reads likewise.
pub const WIRE_WORK: usize = 4;

/// What each byte inflated from a compressed message counts toward
/// [`YIELD_AFTER_BYTES`] (besides the 1 of the decoded message): inflating
/// runs at ~0.3-1 GB/s, a tenth or less of unmasking and copying, so a
/// turn's worth is ~128 KiB of inflated bytes, ~0.2-0.4 ms (outside
/// probe: counted 1 a byte, 32 clients echoing compressed 64 KiB messages
/// each inflated ~6 a turn, and a victim's round trip waited ~70 ms).
pub const INFLATE_WORK: usize = 8;

/// What each byte of an echo compressed for the client counts toward
/// [`YIELD_AFTER_BYTES`]: deflate at level 6 runs at 12–60 MB/s (12 on
/// low-entropy text such as random `acgt`: ~5 ms for 60 KiB), a sixteenth
/// or more of what inflating costs; a turn's worth is then 64 KiB of
/// echoes (outside probe: a compressed echo of such text held its io_uring
/// worker's other connections 6 s, 2 s on epoll).
pub const COMPRESS_WORK: usize = 16;

/// What one token comparison (matching a name to a pattern in a control
/// message) counts toward [`YIELD_AFTER_BYTES`]: it costs about as much as
/// decoding this many bytes, so a read of control messages that make the
/// worker match many names yields as soon as one that decodes as much.
const BYTES_PER_MATCH_STEP: usize = 16;

/// What publishing a payload of `len` bytes makes the worker hold until
/// the turn's end: its frame at most, and what holds it (as the shard's
/// outbox charges it).
fn publication_cost(len: usize) -> usize {
    len + MAX_SERVER_HEADER_LEN + PUBLICATION_OVERHEAD_BYTES
}

/// What an open WebSocket is for.
#[derive(Debug)]
enum Role {
    /// `/echo`: every message comes back with its opcode.
    Echo,
    /// `/ws`: receives the topics it subscribed to (in the form its
    /// subprotocol asked for, kept in `subs`); sends control messages.
    Subscriber { subs: SubList },
    /// `/publish/{topic}`: every message it sends is published. Boxed: a
    /// role is in every connection, and publishers are few (the role is 16
    /// bytes instead of 24).
    Publisher(Box<Publisher>),
}

/// Numbers this worker's publications not numbered yet and queues the
/// acknowledgements due to publisher `ctx.me` (all of them, in order) to
/// `out`, ahead of the close frame about to follow: what the end of the
/// turn would have sent ([`crate::server::worker`]'s `queue_acks`), which
/// could not follow a close frame (a publisher that sends its last
/// messages and its close in one write got none of their acks).
fn ack_before_close(
    out: &mut OutQueue,
    deflate: Option<crate::proto::deflate::Agreed>,
    ctx: &mut Ctx<'_>,
) {
    ctx.shard.dispatch();
    let walked = ctx.shard.walked();
    ctx.count_match_steps(walked);
    for (epoch, seq) in ctx.shard.take_acks_of(ctx.me) {
        out.push(delivery::ack_frame(deflate, epoch, seq));
    }
}

#[derive(Debug)]
struct Publisher {
    topic: Option<Arc<TopicInterest>>,
    /// Negotiated `corecast.v1`: each message is acknowledged with its
    /// epoch and number.
    acks: bool,
    /// The conflation key of its messages (`?key=`), if any.
    key: Option<Arc<str>>,
    /// `--max-publish-rate`: what one read delivers is published, going
    /// into debt if need be; the backend then stops reading until the
    /// debt is repaid (pacing, nothing lost).
    pace: TokenBucket,
}

#[derive(Debug)]
enum Phase {
    /// Reading an HTTP request head, after `requests` complete ones.
    Head { scan: HeadScanner, requests: u32 },
    /// Reading the body of `POST /publish/{topic}`.
    Body(Box<BodyState>),
    /// In a cluster: a `POST /publish` handed to the cluster's stream,
    /// whose answer waits for the number the stream gives it (or for the
    /// request deadline). Not read meanwhile; pipelined input is kept.
    Confirming { keep_alive: bool, requests: u32 },
    /// An open WebSocket.
    Ws { ws: WsConn, role: Role },
    /// A final HTTP response is queued: write it, then close.
    Done,
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
    /// The queue is full and the policy conflates: the caller keeps the
    /// publication as its topic's newest waiting one for this subscriber.
    Conflate,
}

/// Input that panics the session, in the library's own tests only (the
/// worker's containment of a bug is tested with it).
#[cfg(test)]
pub(crate) const TEST_PANIC: &[u8] = b"\xffPANIC";

/// One connection's state. No heap when idle, apart from its subscriptions;
/// 64 bytes (one per connection: idle memory, docs/BENCHMARKS.md).
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// Input not yet consumed: a partial head, frame header or control frame.
    pending: Pending,
    /// Bytes waiting to be written.
    pub out: OutQueue,
}

/// Input kept between reads, exactly sized. Behind one more pointer (8
/// bytes in every session instead of a boxed slice's 16): nearly every
/// connection keeps none, and one that does pays a second small
/// allocation.
#[derive(Debug, Default)]
struct Pending(Option<Box<Kept>>);

#[derive(Debug)]
struct Kept {
    bytes: Box<[u8]>,
    /// When its first byte was kept (worker milliseconds), if known: on a
    /// WebSocket, a frame header cut short has been waiting since then
    /// (the message deadline runs from there). Unknown for input held
    /// while reading was paused, until it is next looked at.
    since_ms: Option<u32>,
}

impl Pending {
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |k| &k.bytes)
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// When the kept bytes' first byte was kept, if any are and it is known.
    fn since(&self) -> Option<u32> {
        self.0.as_ref().and_then(|k| k.since_ms)
    }

    /// Keeps a copy of `bytes` (nothing, and no allocation, when empty),
    /// kept since `since_ms`.
    fn set(&mut self, bytes: &[u8], since_ms: Option<u32>) {
        self.0 = (!bytes.is_empty()).then(|| {
            Box::new(Kept {
                bytes: bytes.into(),
                since_ms,
            })
        });
    }

    /// Appends `more` after what is kept.
    fn append(&mut self, more: &[u8]) {
        let since_ms = self.since();
        let mut all = Vec::with_capacity(self.len() + more.len());
        all.extend_from_slice(self.bytes());
        all.extend_from_slice(more);
        self.0 = (!all.is_empty()).then(|| {
            Box::new(Kept {
                bytes: all.into_boxed_slice(),
                since_ms,
            })
        });
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A new connection, waiting for its request head.
    pub fn new() -> Self {
        Self {
            phase: Phase::Head {
                scan: HeadScanner::default(),
                requests: 0,
            },
            pending: Pending::default(),
            out: OutQueue::new(),
        }
    }

    /// Is the connection waiting for (or inside) an HTTP request, so that
    /// the request deadline applies?
    pub fn awaiting_request(&self) -> bool {
        matches!(
            self.phase,
            Phase::Head { .. } | Phase::Body(_) | Phase::Confirming { .. }
        )
    }

    /// The queued bytes past which the connection is not read until they
    /// drain to half: `max_outbound` (`--max-outbound-bytes`), or in HTTP
    /// [`PIPELINE_AHEAD_BYTES`] (answers a pipelining client has not read
    /// stop its next requests).
    pub fn queue_bound(&self, max_outbound: usize) -> usize {
        if self.awaiting_request() {
            PIPELINE_AHEAD_BYTES.min(max_outbound)
        } else {
            max_outbound
        }
    }

    /// Is an HTTP publication waiting for the cluster's number
    /// ([`Self::confirm`] answers it)?
    pub fn confirming(&self) -> bool {
        matches!(self.phase, Phase::Confirming { .. })
    }

    /// Has part of an HTTP request (head or body) arrived?
    pub fn partial_request(&self) -> bool {
        match &self.phase {
            Phase::Head { .. } => !self.pending.is_empty(),
            Phase::Body(_) | Phase::Confirming { .. } => true,
            _ => false,
        }
    }

    /// While the connection reads HTTP requests ([`Self::awaiting_request`]):
    /// how many it completed, what tells one request's deadline from the
    /// next. 0 once it is no longer in HTTP (no request deadline applies).
    pub fn requests(&self) -> u32 {
        match &self.phase {
            Phase::Head { requests, .. } => *requests,
            Phase::Body(b) => b.requests,
            Phase::Confirming { requests, .. } => *requests,
            _ => 0,
        }
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
                role: Role::Publisher(_),
                ..
            }
        )
    }

    /// What the backend should do now.
    pub fn next(&self) -> Next {
        match &self.phase {
            Phase::Head { .. } | Phase::Body(_) | Phase::Confirming { .. } => Next::Read,
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
        let pending = self.pending.bytes();
        buf[..pending.len()].copy_from_slice(pending);
        pending.len()
    }

    /// Keeps `data` after the pending bytes without processing it (input
    /// that arrived while the backend had paused reading); the next
    /// [`Self::restore_pending`] returns it. Charged to the buffer budget
    /// like any pending input.
    pub fn hold(&mut self, data: &[u8]) {
        self.pending.append(data);
    }

    /// Forgets the bytes kept (a PROXY protocol header held whole until it
    /// was complete, now taken).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    /// Processes `buf` (previous pending bytes followed by new ones).
    pub fn on_input(&mut self, buf: &mut [u8], ctx: &mut Ctx<'_>) -> Next {
        #[cfg(test)]
        if buf.starts_with(TEST_PANIC) {
            panic!("a panic injected by a test");
        }
        let next = self.input_loop(buf, ctx);
        // The publications of this read go to the mailboxes together, and
        // their answers out in order.
        self.answer_published(ctx);
        next
    }

    fn input_loop(&mut self, buf: &mut [u8], ctx: &mut Ctx<'_>) -> Next {
        let mut pos = 0;
        loop {
            match &mut self.phase {
                Phase::Head { .. } if self.out.len() > PIPELINE_AHEAD_BYTES && pos < buf.len() => {
                    // Answers the client has not read yet: its next
                    // requests wait (kept), and it is not read until they
                    // drain ([`Self::queue_bound`]), so a pipeline of
                    // requests it never reads the answers of holds a few
                    // answers, not all of them.
                    self.answer_published(ctx);
                    self.keep(buf, pos, ctx.now_ms);
                    return Next::Read;
                }
                Phase::Head { scan, requests } => {
                    if ctx.work >= YIELD_AFTER_BYTES && pos < buf.len() {
                        // A turn's worth (bytes received, publications,
                        // signature checks of ~50 µs each): the rest of
                        // the pipeline waits for the next turn, so one
                        // connection's requests cannot stall its worker.
                        self.answer_published(ctx);
                        self.keep(buf, pos, ctx.now_ms);
                        ctx.yielded = true;
                        return Next::Read;
                    }
                    if scan.is_fresh() {
                        // Empty lines before a request line are skipped
                        // (RFC 9112 §2.2), however many, as they are read:
                        // never kept, and a client sending only those is
                        // the request deadline's (outside probe: two were
                        // read as a head of their own, `400 incomplete
                        // request head`).
                        let blank = buf[pos..].iter().take_while(|&&b| b == b'\r' || b == b'\n');
                        pos += blank.count();
                        if pos == buf.len() {
                            self.keep(buf, pos, ctx.now_ms);
                            return Next::Read;
                        }
                    }
                    let done = requests.wrapping_add(1);
                    let cfg = &ctx.shared.config;
                    let rest = &buf[pos..];
                    let end = scan.find_end(rest);
                    // Judged before the size, on the same bytes whole or
                    // cut into reads: what cannot be HTTP is 400 at once.
                    // Only the head is looked at, up to its blank line if
                    // it has one (what follows it is the next request's,
                    // not there yet when the reads are cut there).
                    let head = &rest[..end.unwrap_or(rest.len())];
                    if handshake::refutes_head(head, cfg.max_handshake_size) {
                        // Not HTTP (TLS on the plain port, binary junk):
                        // answered now, not at the request deadline, with
                        // the reason the whole head gets.
                        self.answer_published(ctx);
                        self.refuse(
                            Reject::new(Status::BadRequest, "malformed request head"),
                            ctx.stats,
                        );
                        return Next::FlushAndClose;
                    }
                    let Some(end) = end else {
                        if rest.len() > cfg.max_handshake_size {
                            self.answer_published(ctx);
                            self.refuse(
                                Reject::new(Status::HeadTooLarge, "request head too large"),
                                ctx.stats,
                            );
                            return Next::FlushAndClose;
                        }
                        self.keep(buf, pos, ctx.now_ms);
                        return Next::Read;
                    };
                    if end > cfg.max_handshake_size {
                        self.answer_published(ctx);
                        self.refuse(
                            Reject::new(Status::HeadTooLarge, "request head too large"),
                            ctx.stats,
                        );
                        return Next::FlushAndClose;
                    }
                    let head_end = pos + end;
                    if !buf[pos..].starts_with(b"POST /publish/") {
                        // Answers in order: what this request answers
                        // comes after the publications' answers.
                        self.answer_published(ctx);
                    }
                    if let Err(reject) = self.request(&buf[pos..head_end], ctx) {
                        self.answer_published(ctx);
                        self.refuse(reject, ctx.stats);
                        return Next::FlushAndClose;
                    }
                    // The next phase (another head, a body) counts it.
                    self.set_requests(done);
                    ctx.requests += 1;
                    ctx.work = ctx.work.saturating_add(PUBLICATION_OVERHEAD_BYTES);
                    if ctx.shared.verifier().is_some() {
                        ctx.work = ctx.work.saturating_add(CHECK_WORK);
                    }
                    pos = head_end;
                }
                Phase::Body(body) => {
                    let want = body.len - body.body.len();
                    let take = want.min(buf.len() - pos);
                    if take < want {
                        body.body.extend_from_slice(&buf[pos..]);
                        self.pending.clear();
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
                        self.pending.clear();
                        return Next::FlushAndClose;
                    }
                }
                Phase::Confirming { .. } => {
                    // Pipelined input waits until the answer is out (the
                    // backend reads no more meanwhile).
                    self.keep(buf, pos, ctx.now_ms);
                    return Next::Read;
                }
                Phase::Ws { .. } => {
                    pos = self.on_frames(buf, pos, ctx);
                    let next = self.next();
                    self.keep(buf, pos, ctx.now_ms);
                    return next;
                }
                Phase::Done => {
                    // Whatever else the client sends is ignored.
                    self.pending.clear();
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
        let deflate = ws.deflate();
        // A publisher that asked for acknowledgements gets them for what
        // it published before a close frame, whoever closes (see
        // `ack_before_close`).
        let acked = matches!(role, Role::Publisher(p) if p.acks);
        loop {
            if pos < buf.len() {
                let out_of_tokens = match role {
                    Role::Publisher(p) => !p.pace.ready(rate, ctx.now_ms),
                    _ => false,
                };
                if out_of_tokens || ctx.work >= YIELD_AFTER_BYTES {
                    // The rest waits: a paced publisher's until its pace
                    // allows (so it never runs further into debt than one
                    // message), anyone else's until the next turn (a read
                    // of compressed messages inflates to at most about
                    // this much per turn, whatever their ratio).
                    ctx.yielded = true;
                    break;
                }
            }
            // Compressed messages inflate within what is left of the
            // turn's work (each inflated byte counts INFLATE_WORK),
            // stopping where it runs out to go on at the next turn: one
            // 16 KB message can inflate to 16 MiB.
            let room_given = (YIELD_AFTER_BYTES.saturating_sub(ctx.work) / INFLATE_WORK).max(1);
            let mut room = room_given;
            let left = buf.len() - pos;
            // Whether this call's message (if any) came before our close
            // frame: nothing may follow one, acknowledgements included.
            let open = ws.can_send();
            // An acknowledged publisher's pongs and close frame wait for
            // its acknowledgements (see below).
            let mut replies = OutQueue::new();
            let decoded = ws.decode_within(
                &mut buf[pos..],
                if acked { &mut replies } else { &mut self.out },
                &mut room,
            );
            let closing = matches!(
                decoded.event,
                Some(Event::Closed { .. } | Event::Failed { .. })
            );
            if acked {
                // Before anything else: the loop may end below with no
                // event (a pong queued for a ping with nothing after it).
                if closing && open {
                    ack_before_close(&mut self.out, deflate, ctx);
                }
                self.out.append(&mut replies);
            }
            pos += decoded.consumed;
            let paused = room == 0 && decoded.consumed < left;
            ctx.work = ctx
                .work
                .saturating_add((room_given - room).saturating_mul(INFLATE_WORK));
            if let Some(Event::Message { payload, .. }) = &decoded.event {
                // Each message costs what holds it besides its bytes: a
                // read of empty messages yields too.
                ctx.work += payload.len() + PUBLICATION_OVERHEAD_BYTES;
            }
            // Act while the event still borrows the input; replies go out after.
            let control = match decoded.event {
                None if paused => {
                    // Inflating stopped for the turn with its data left.
                    ctx.yielded = true;
                    break;
                }
                None => break,
                Some(Event::Message { kind, payload }) => match role {
                    Role::Echo => {
                        ctx.stats.message_echoed();
                        let deflate = deflate
                            .filter(|a| a.compresses(payload.len()) && ctx.echo_compress > 0);
                        if deflate.is_some() {
                            ctx.work = ctx
                                .work
                                .saturating_add(payload.len().saturating_mul(COMPRESS_WORK));
                            ctx.echo_compress = ctx.echo_compress.saturating_sub(payload.len());
                        }
                        // Compressed per message when agreed and it gains,
                        // while the worker's turn has room to.
                        Some(Reply::Frame(Bytes::from(
                            crate::proto::deflate::message_frame(deflate, kind.opcode(), payload),
                        )))
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
                    Role::Publisher(p) if p.acks && !open => {
                        // Read after our close frame (the shutdown drain's,
                        // a keepalive's): it could not be acknowledged, so
                        // it is not published; the publisher sees it
                        // unacknowledged, as it is.
                        ctx.stats.publication_after_close();
                        None
                    }
                    Role::Publisher(_) if publication_cost(payload.len()) > ctx.room => {
                        Some(Reply::OverBudget)
                    }
                    Role::Publisher(p) => {
                        ctx.stats.message_published();
                        p.pace.spend(rate, ctx.now_ms);
                        ctx.room -= publication_cost(payload.len());
                        if let Some(t) = &p.topic {
                            let frame = encode(kind, payload);
                            let key = p.key.clone();
                            if p.acks {
                                ctx.shard.publish_acked(t, frame, ctx.now, ctx.me, key);
                            } else {
                                ctx.shard.publish_from(t, frame, ctx.now, ctx.me, key);
                            }
                            ctx.published = true;
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
                Some(Reply::OverBudget) => {
                    if acked {
                        ack_before_close(&mut self.out, deflate, ctx);
                    }
                    ctx.stats.budget_close();
                    ctx.stats.ws_failure(CloseCode::TRY_AGAIN_LATER.0);
                    debug!("publication over the buffer budget");
                    ws.abort(
                        CloseCode::TRY_AGAIN_LATER,
                        "server memory budget exceeded",
                        &mut self.out,
                    );
                    break;
                }
                Some(Reply::Frame(frame)) => {
                    ws.send_frame(frame, &mut self.out);
                }
                Some(Reply::Text(text)) => {
                    ws.send(MessageKind::Text, text.as_bytes(), &mut self.out);
                }
                Some(Reply::Control(mut msg)) => {
                    let Role::Subscriber { subs, .. } = role else {
                        unreachable!("control messages come from subscribers")
                    };
                    let queued = self.out.len();
                    let (mut work, mut refresh) = (0, false);
                    let (reply, recovered) = subscriber::control_message(
                        &mut msg,
                        subs,
                        queued,
                        ctx,
                        &mut work,
                        &mut refresh,
                    );
                    // Matching names to patterns counts toward the turn.
                    ctx.count_match_steps(work);
                    ws.send(MessageKind::Text, reply.as_bytes(), &mut self.out);
                    if refresh && !ws.take_control() {
                        // A refresh is a signature check: it counts like a
                        // ping against --max-control-rate, so one
                        // connection cannot take its worker's refreshes.
                        ctx.stats.ws_failure(CloseCode::POLICY_VIOLATION.0);
                        ws.abort(
                            CloseCode::POLICY_VIOLATION,
                            "control frame flood",
                            &mut self.out,
                        );
                        break;
                    }
                    if ws.can_send() {
                        for f in &recovered {
                            self.out.push_frame(f);
                        }
                    }
                }
            }
        }
        pos
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
                role: Role::Publisher(p),
                ..
            } => p.pace.wait_ms(rate),
            _ => 0,
        }
    }

    /// When the WebSocket message in progress started (worker milliseconds,
    /// see [`Ctx::now_ms`]); `None` between messages. The message deadline
    /// runs from there.
    pub fn message_started(&self) -> Option<u32> {
        match &self.phase {
            // A frame header cut short is a message begun too (a client
            // could otherwise hold one open until keepalive's deadline).
            Phase::Ws { ws, .. } => ws.message_started().or_else(|| self.pending.since()),
            _ => None,
        }
    }

    /// Whether a compressed message in progress holds an inflater.
    pub fn inflating(&self) -> bool {
        match &self.phase {
            Phase::Ws { ws, .. } => ws.inflating(),
            _ => false,
        }
    }

    /// Bytes held for this connection that the memory budget charges:
    /// partial input, a partial message or body, owned queued bytes, and
    /// what holding the queue costs (its slots, shared frames' included).
    /// (Its subscriptions and published frames are charged by the shard.)
    pub fn held_bytes(&self) -> usize {
        let phase = match &self.phase {
            Phase::Ws { ws, .. } => ws.buffered(),
            Phase::Body(b) => b.body.capacity(),
            _ => 0,
        };
        self.pending.len() + phase + self.out.owned() + self.out.overhead()
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
        let in_request = self.partial_request();
        self.pending.clear();
        match &mut self.phase {
            Phase::Ws { ws, .. } => {
                // What is queued and not begun goes too (the front chunk
                // may be partly on the wire, and holds whole frames): the
                // connection is closed for what it holds, which lingering
                // with it would keep.
                self.out.truncate_to_front();
                ws.abort(code, reason, &mut self.out)
            }
            Phase::Head { .. } | Phase::Body(_) | Phase::Confirming { .. } => {
                // Answers queued stay whole (an answer may span chunks:
                // its head, then a shared body), at most the pipeline's
                // bound and one answer (`PIPELINE_AHEAD_BYTES`).
                if in_request {
                    // The answer to the request in progress, after the
                    // answers queued before it, in order.
                    self.refuse(Reject::new(status, reason), stats);
                } else {
                    // No request of its own to answer: a 503 would be read
                    // as the answer to the next one, which was not made
                    // (outside probe: an honest POST got 204, then 503).
                    // Closed once what is queued is written.
                    self.phase = Phase::Done;
                }
            }
            Phase::Done => {}
        }
    }

    /// After a panic in this session's input (a bug): closes it with
    /// `1011` on a WebSocket or `500` in HTTP, as [`Self::abort`] does,
    /// keeping what is already queued (the kernel may be sending from it).
    pub fn fail_internal(&mut self) {
        self.pending.clear();
        match &mut self.phase {
            Phase::Ws { ws, .. } => {
                ws.abort(CloseCode::INTERNAL_ERROR, "internal error", &mut self.out)
            }
            Phase::Head { .. } | Phase::Body(_) | Phase::Confirming { .. } => {
                self.out.push(Bytes::from_static(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 15\r\nConnection: close\r\n\r\ninternal error\n",
                ));
                self.phase = Phase::Done;
            }
            Phase::Done => {}
        }
    }

    /// Sets the count of completed requests of a connection still in HTTP.
    fn set_requests(&mut self, n: u32) {
        match &mut self.phase {
            Phase::Head { requests, .. } => *requests = n,
            Phase::Body(b) => b.requests = n,
            _ => {}
        }
    }

    /// Keeps `buf[pos..]` for the next read; frees the buffer when nothing
    /// is left. `buf` starts with what was kept before: when none of it was
    /// consumed (`pos` 0), what is kept began when that did.
    fn keep(&mut self, buf: &[u8], pos: usize, now_ms: u32) {
        let since = match self.pending.since() {
            Some(before) if pos == 0 => before,
            _ => now_ms,
        };
        self.pending.set(&buf[pos..], Some(since));
    }

    /// Answers `reject` and closes: a refused request, or a connection
    /// refused at accept.
    /// The connection's wire layer (TLS) failed: what is queued is dropped
    /// unsent (none of it is on the wire: the wire layer takes whole
    /// bytes), `last_words` (bytes as they go on the wire: an alert, or a
    /// plain-text answer) are queued instead, and nothing more is read.
    pub fn fail_wire(&mut self, last_words: &[u8]) {
        let queued = self.out.len();
        self.out.advance(queued);
        if !last_words.is_empty() {
            self.out.push(Bytes::copy_from_slice(last_words));
        }
        self.phase = Phase::Done;
        self.pending.clear();
    }

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
        self.pending.clear();
    }
}

/// A reply decided while the input was borrowed.
enum Reply {
    /// A publication the worker's buffer budget cannot take: the
    /// publisher is failed `1013` ([`Ctx::room`]).
    OverBudget,
    Frame(Bytes),
    Text(String),
    Control(Vec<u8>),
}

/// A message as one server frame, encoded once for every subscriber.
fn encode(kind: MessageKind, payload: &[u8]) -> Bytes {
    Bytes::from(server_frame(kind.opcode(), payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// One per connection (docs/BENCHMARKS.md, "Idle memory per subscriber,
    /// accounted"): the open WebSocket's phase is the largest (its `WsConn`
    /// and role; the HTTP phases fit beside them), then the kept input and
    /// the queue, a pointer each.
    #[test]
    fn a_session_stays_64_bytes() {
        assert_eq!(size_of::<WsConn>(), 32);
        assert_eq!(size_of::<SubList>(), 16);
        assert_eq!(size_of::<Role>(), 16);
        assert_eq!(size_of::<Phase>(), 48);
        assert_eq!(size_of::<Pending>(), 8);
        assert_eq!(size_of::<OutQueue>(), 8);
        assert_eq!(size_of::<Session>(), 64);
    }

    #[test]
    fn kept_input_is_exact_and_held_input_goes_after_it() {
        let mut s = Session::new();
        assert_eq!(s.pending_len(), 0);
        s.hold(b"");
        assert!(s.pending.0.is_none(), "nothing kept, nothing allocated");
        s.pending.set(b"GET / HT", Some(5));
        s.hold(b"TP/1.1");
        let mut buf = [0u8; 32];
        let n = s.restore_pending(&mut buf);
        assert_eq!(&buf[..n], b"GET / HTTP/1.1");
        assert_eq!(
            s.pending.0.as_deref().map(|k| k.bytes.len()),
            Some(n),
            "exactly sized"
        );
        assert_eq!(
            s.pending.since(),
            Some(5),
            "held input keeps the first's time"
        );
        s.pending.set(b"", Some(7));
        assert!(s.pending.is_empty());
        assert_eq!(s.pending.since(), None);
    }
}
