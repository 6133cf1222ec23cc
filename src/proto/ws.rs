//! The server side of an open WebSocket connection, free of I/O.
//!
//! [`WsConn::decode`] takes bytes read from the client (mutably: payloads are
//! unmasked in place), enforces every framing rule of RFC 6455 §5, answers
//! pings and closes by pushing frames to the caller's [`OutQueue`], and
//! returns at most one [`Event`] per call together with how many input bytes
//! it consumed. The caller calls again with the rest.
//!
//! Memory: an unfragmented frame that arrived whole is delivered straight
//! from the caller's buffer (zero copy). Only a message that spans reads or
//! frames is gathered in a buffer of its own, freed once delivered. Control
//! frames and headers are never buffered here: when one is incomplete,
//! `decode` consumes nothing and the caller keeps the bytes (at most
//! [`MAX_HEADER_LEN`] + 125) until more arrive.
//!
//! This file holds the connection's state, its limits and its outbound side;
//! `decode` and its steps are in `ws_decode.rs`.

use super::deflate::{self, Agreed, Inflater};
use super::frame::{CloseCode, MAX_HEADER_LEN, OpCode, close_payload, server_frame};
use super::outbound::OutQueue;
use super::rate::TokenBucket;
use super::utf8::Utf8Validator;
use bytes::Bytes;
use std::sync::Arc;

#[path = "ws_decode.rs"]
mod decode;

/// Default cap on a reassembled message, in bytes (flag `--max-message-size`).
/// 16 MiB admits every Autobahn case (9.1.6 sends 16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default cap on one frame's payload (flag `--max-frame-size`).
pub const DEFAULT_MAX_FRAME_BYTES: usize = DEFAULT_MAX_MESSAGE_BYTES;
/// Default cap on the frames of one message (flag `--max-fragments`).
/// Autobahn 9.3.1 sends a 4 MiB message in 64-byte fragments: 65 536.
pub const DEFAULT_MAX_FRAGMENTS: u32 = 131_072;
/// Default ping/pong frames a client may send per second, sustained, with
/// as many again in a burst (flag `--max-control-rate`).
pub const DEFAULT_MAX_CONTROL_RATE: u32 = 100;

/// The limits a connection enforces on what the client sends. Shared by
/// every connection of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest reassembled message; bigger closes 1009.
    pub max_message: u64,
    /// Largest frame payload; bigger closes 1009.
    pub max_frame: u64,
    /// Most frames in one message; more closes 1009.
    pub max_fragments: u32,
    /// Pings and pongs per second (token bucket holding one second's worth);
    /// more closes 1008. 0: unlimited.
    pub control_rate: u32,
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            max_message: DEFAULT_MAX_MESSAGE_BYTES as u64,
            max_frame: DEFAULT_MAX_FRAME_BYTES as u64,
            max_fragments: DEFAULT_MAX_FRAGMENTS,
            control_rate: DEFAULT_MAX_CONTROL_RATE,
        }
    }
}

impl WsLimits {
    /// The defaults with messages (and frames) capped at `max_message`.
    pub fn with_max_message(max_message: usize) -> Self {
        Self {
            max_message: max_message as u64,
            max_frame: max_message as u64,
            ..Self::default()
        }
    }
}

/// Data message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

impl MessageKind {
    pub fn opcode(self) -> OpCode {
        match self {
            Self::Text => OpCode::Text,
            Self::Binary => OpCode::Binary,
        }
    }
}

/// What the peer did that the application may care about.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete (reassembled, validated) message.
    Message {
        kind: MessageKind,
        payload: &'a [u8],
    },
    /// A pong arrived (pings are answered by the core itself).
    Pong(&'a [u8]),
    /// The peer closed; the reply, if one was due, is queued. Not an error.
    Closed { code: Option<u16> },
    /// The peer broke the protocol; a close frame with `code` is queued.
    Failed {
        code: CloseCode,
        reason: &'static str,
    },
}

/// The result of one [`WsConn::decode`] call.
#[derive(Debug)]
pub struct Decoded<'a> {
    /// Input bytes used; the caller must keep `input[consumed..]` for the next call.
    pub consumed: usize,
    pub event: Option<Event<'a>>,
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// Both directions open.
    Open,
    /// We sent a close frame and wait for the peer's.
    CloseSent,
    /// Done: both sent, or the connection was failed. Input is ignored.
    Closed,
}

#[derive(Debug, Clone, Copy)]
enum RecvState {
    /// Expecting a frame header.
    Header,
    /// Inside a data frame's payload.
    Payload(PayloadState),
}

/// Where the payload of the data frame being received stands.
#[derive(Debug, Clone, Copy)]
struct PayloadState {
    /// Payload bytes still to come.
    remaining: u64,
    mask: [u8; 4],
    /// Where in the mask the next byte falls (0..4).
    phase: u8,
    /// The frame is its message's last.
    fin: bool,
}

/// Protocol state of one open connection: 32 bytes. What only a message
/// in progress needs (across reads or frames) is boxed in [`Partial`],
/// present only while there is one: an idle connection pays one pointer.
#[derive(Debug)]
pub struct WsConn {
    /// The message that spans reads or frames, if one is in progress (or
    /// was just delivered from its buffer).
    msg: Option<Box<Partial>>,
    limits: Arc<WsLimits>,
    /// Pings and pongs the client may still send (`limits.control_rate`).
    control: TokenBucket,
    /// The caller's clock at the last [`Self::tick`], in milliseconds.
    clock_ms: u32,
    close: CloseState,
    /// permessage-deflate, if agreed: RSV1 messages are inflated, and what
    /// [`Self::send`] queues is compressed when it gains.
    deflate: Option<Agreed>,
}

/// A message being received across reads or frames. A message that
/// arrives whole in one read never gets one (zero copy, no allocation).
#[derive(Debug)]
struct Partial {
    recv: RecvState,
    /// Kind of the message; `None` once delivered.
    kind: Option<MessageKind>,
    /// Payload gathered so far.
    buf: Vec<u8>,
    /// Declared payload bytes of the message so far (checked against the cap
    /// before the bytes arrive).
    len: u64,
    utf8: Utf8Validator,
    /// Frames of the message so far.
    fragments: u32,
    /// When the message started (its first frame header).
    started_ms: u32,
    /// `buf` was handed out in the last event; dropped on the next call.
    delivered: bool,
    /// The message is compressed (RSV1): its inflater, fed each piece of
    /// payload as it comes; `buf` gathers what it inflates (validated as
    /// it comes, for text). Dropped when the message is complete.
    inflater: Option<Inflater>,
}

impl WsConn {
    /// A connection that accepts messages up to `max_message` bytes, with
    /// the other limits at their defaults.
    pub fn new(max_message: usize) -> Self {
        Self::with_limits(Arc::new(WsLimits::with_max_message(max_message)), 0)
    }

    /// A connection enforcing `limits`, opened at `now_ms` on the caller's
    /// millisecond clock (see [`Self::tick`]).
    pub fn with_limits(limits: Arc<WsLimits>, now_ms: u32) -> Self {
        let control = TokenBucket::full(limits.control_rate, now_ms);
        Self {
            msg: None,
            limits,
            control,
            clock_ms: now_ms,
            close: CloseState::Open,
            deflate: None,
        }
    }

    /// Agrees permessage-deflate (after the handshake said so).
    pub fn set_deflate(&mut self, agreed: Option<Agreed>) {
        self.deflate = agreed;
    }

    /// permessage-deflate as agreed, if it was.
    pub fn deflate(&self) -> Option<Agreed> {
        self.deflate
    }

    /// Tells the connection the time (milliseconds on any clock that only
    /// moves forward, wrapping) before a [`Self::decode`]: the control-frame
    /// allowance refills by it and a message starting now is stamped with
    /// it. No clock is read here (sans-IO).
    pub fn tick(&mut self, now_ms: u32) {
        self.clock_ms = now_ms;
    }

    /// Takes one from the control-frame allowance (`--max-control-rate`)
    /// for something other than a frame that costs as much (a token
    /// refresh); `false` when none is left: the caller fails the
    /// connection as for a ping flood.
    pub fn take_control(&mut self) -> bool {
        self.control.take(self.limits.control_rate, self.clock_ms)
    }

    /// Is a message (or a frame of one) partly received?
    pub fn in_message(&self) -> bool {
        self.msg
            .as_ref()
            .is_some_and(|m| m.kind.is_some() || matches!(m.recv, RecvState::Payload(_)))
    }

    /// When the message in progress started, on the [`Self::tick`] clock;
    /// `None` between messages and once closed.
    pub fn message_started(&self) -> Option<u32> {
        match &self.msg {
            Some(m) if self.close != CloseState::Closed && self.in_message() => Some(m.started_ms),
            _ => None,
        }
    }

    /// Fails the connection from outside the decoder (memory budget,
    /// message deadline): queues the close frame, frees the partial message.
    pub fn abort(&mut self, code: CloseCode, reason: &'static str, out: &mut OutQueue) {
        let _ = self.fail(code, reason, out, 0);
    }

    /// Where the close handshake stands.
    pub fn close_state(&self) -> CloseState {
        self.close
    }

    /// May the application still send data (no close frame sent yet)?
    pub fn can_send(&self) -> bool {
        self.close == CloseState::Open
    }

    /// Whether a compressed message in progress holds an inflater of its
    /// own ([`deflate::INFLATER_BYTES`]: a few bytes from the client hold
    /// that much).
    pub fn inflating(&self) -> bool {
        self.msg.as_ref().is_some_and(|m| m.inflater.is_some())
    }

    /// Heap bytes held for a partly received message (with its
    /// inflater, while a compressed one is in progress).
    pub fn buffered(&self) -> usize {
        self.msg.as_ref().map_or(0, |m| {
            m.buf.capacity() + m.inflater.as_ref().map_or(0, |_| deflate::INFLATER_BYTES)
        })
    }

    /// Queues a message as one unmasked frame. Returns `false` (and queues
    /// nothing) once a close frame has been sent.
    pub fn send(&mut self, kind: MessageKind, payload: &[u8], out: &mut OutQueue) -> bool {
        if !self.can_send() {
            return false;
        }
        out.push(Bytes::from(deflate::message_frame(
            self.deflate,
            kind.opcode(),
            payload,
        )));
        true
    }

    /// Queues an already encoded frame (shared between connections).
    pub fn send_frame(&mut self, frame: Bytes, out: &mut OutQueue) -> bool {
        if !self.can_send() {
            return false;
        }
        out.push(frame);
        true
    }

    /// Queues a ping. `false` once closing.
    pub fn ping(&mut self, payload: &[u8], out: &mut OutQueue) -> bool {
        if !self.can_send() {
            return false;
        }
        out.push(Bytes::from(server_frame(OpCode::Ping, payload)));
        true
    }

    /// Starts the close handshake from our side (e.g. 1001 on shutdown).
    pub fn close(&mut self, code: CloseCode, reason: &str, out: &mut OutQueue) {
        if self.close == CloseState::Open {
            out.push(Bytes::from(server_frame(
                OpCode::Close,
                &close_payload(code, reason),
            )));
            self.close = CloseState::CloseSent;
        }
    }

    /// Fails the connection: queue a close frame (unless one was sent) and stop reading.
    fn fail<'a>(
        &mut self,
        code: CloseCode,
        reason: &'static str,
        out: &mut OutQueue,
        consumed: usize,
    ) -> Decoded<'a> {
        if self.close == CloseState::Open {
            out.push(Bytes::from(server_frame(
                OpCode::Close,
                &close_payload(code, reason),
            )));
        }
        self.close = CloseState::Closed;
        self.msg = None;
        Decoded {
            consumed,
            event: Some(Event::Failed { code, reason }),
        }
    }
}

/// Upper bound on the bytes a caller may have to keep between reads: one
/// control frame with its header.
pub const MAX_PENDING_BYTES: usize = MAX_HEADER_LEN + 125;

#[cfg(test)]
#[path = "ws_tests.rs"]
mod tests;
