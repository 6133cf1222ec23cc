//! The inbound half of [`WsConn`]: [`WsConn::decode`] and its steps. The
//! rules it enforces and its memory use are in the docs of [`super`]
//! (`ws.rs`), which holds the connection's state and its outbound side.
//!
//! `decode` is a loop of steps, each on the bytes at the current position,
//! the one that `recv` calls for:
//! - `on_header`: parses a frame header (`parse_header` checks its bits and
//!   length); a control frame goes to `on_control` (a ping is answered, a
//!   pong returned, a close handled by `on_close`), a data frame to
//!   `admit_data_frame` (message sequence, frame, fragment and message
//!   caps) and `start_data_frame` (the zero-copy fast path for a whole
//!   unfragmented message, else the frame's payload is entered);
//! - `on_payload`: unmasks, validates (text) and gathers the next bytes of
//!   a payload that spans reads or frames, in the boxed `Partial` that
//!   exists only while such a message is in progress; `finish_message`
//!   completes a message after its last frame.
//!
//! A step returns a [`Step`]: go on, or what `decode` is to return.

use super::{CloseState, Decoded, Event, MessageKind, Partial, PayloadState, RecvState, WsConn};
use crate::proto::deflate::{self, InflateError, Inflater, Whole};
use crate::proto::frame::{
    CloseCode, FrameHeader, HeaderError, OpCode, parse_header, server_frame,
};
use crate::proto::mask::apply_mask;
use crate::proto::outbound::OutQueue;
use crate::proto::utf8::{self, Utf8Validator};
use bytes::Bytes;

/// What one step of [`WsConn::decode`] leaves it to do. Positions, not
/// slices: `decode` makes the event's borrow of `input` (or of the
/// message's buffer).
///
/// Plain values only, and a failure is only named here: `decode` calls
/// [`WsConn::fail`]. A step that called `fail` itself would have it write
/// its `Decoded` into the step's result, which then lives in memory and
/// costs every frame a dispatch through a jump table (`benches/frame.rs`
/// `decode/*`: 5-9 % slower). As it is, the steps inline into `decode` and
/// each branches straight to what it returns.
enum Step {
    /// Decode on from the new position.
    Next,
    /// Return what was consumed, with no event: more bytes are needed.
    Wait,
    /// Return `input[start..pos]` as a whole message (the zero-copy path).
    Message { kind: MessageKind, start: usize },
    /// Return `input[start..pos]` as a pong's payload.
    Pong { start: usize },
    /// Return the message gathered in the [`Partial`]'s buffer.
    Reassembled(MessageKind),
    /// The peer closed (the reply is queued): return that, all input consumed.
    Closed(Option<u16>),
    /// The peer broke a rule: fail the connection ([`WsConn::fail`]).
    Fail(CloseCode, &'static str),
}

impl WsConn {
    /// Consumes bytes from the client; see the [`ws`](super) module docs.
    pub fn decode<'a>(&'a mut self, input: &'a mut [u8], out: &mut OutQueue) -> Decoded<'a> {
        self.decode_within(input, out, &mut { usize::MAX })
    }

    /// [`Self::decode`], inflating at most about `room` bytes of compressed
    /// messages (less what it inflated): a compressed message that would
    /// inflate more stops where the room ran out, with no event and the
    /// rest of its data not consumed, and goes on from there at the next
    /// call. A caller that shares a turn's work among connections gives
    /// each what it has left: 16 KB of deflate data inflates to 16 MiB,
    /// which would otherwise go whole in one call.
    pub fn decode_within<'a>(
        &'a mut self,
        input: &'a mut [u8],
        out: &mut OutQueue,
        room: &mut usize,
    ) -> Decoded<'a> {
        if self.msg.as_ref().is_some_and(|m| m.delivered) {
            self.msg = None;
        }
        if self.close == CloseState::Closed {
            // Nothing more is read after the close handshake or a failure.
            return Decoded {
                consumed: input.len(),
                event: None,
            };
        }
        let mut pos = 0;
        loop {
            let step = match self.msg.as_ref().map_or(RecvState::Header, |m| m.recv) {
                RecvState::Header => self.on_header(input, &mut pos, out, room),
                RecvState::Payload(frame) => self.on_payload(frame, input, &mut pos, room),
            };
            let event = match step {
                Step::Next => continue,
                Step::Wait => None,
                Step::Message { kind, start } => Some(Event::Message {
                    kind,
                    payload: &input[start..pos],
                }),
                Step::Pong { start } => Some(Event::Pong(&input[start..pos])),
                Step::Reassembled(kind) => Some(Event::Message {
                    kind,
                    payload: &self.msg.as_deref().expect("just delivered").buf,
                }),
                Step::Closed(code) => {
                    return Decoded {
                        consumed: input.len(),
                        event: Some(Event::Closed { code }),
                    };
                }
                Step::Fail(code, reason) => return self.fail(code, reason, out, input.len()),
            };
            return Decoded {
                consumed: pos,
                event,
            };
        }
    }

    /// A frame header at `input[*pos..]`: a control frame is handled whole,
    /// a data frame is checked against the message in progress and the
    /// limits, then delivered at once or entered.
    #[inline]
    fn on_header(
        &mut self,
        input: &mut [u8],
        pos: &mut usize,
        out: &mut OutQueue,
        room: &mut usize,
    ) -> Step {
        let header = match parse_header(&input[*pos..]) {
            Ok(Some(h)) => h,
            Ok(None) => return Step::Wait,
            Err(e) => return Step::Fail(CloseCode::PROTOCOL_ERROR, header_reason(e)),
        };
        let Some(mask) = header.mask else {
            return Step::Fail(CloseCode::PROTOCOL_ERROR, "client frame not masked");
        };
        if header.rsv1 {
            // permessage-deflate's bit: on a message's first frame only.
            if self.deflate.is_none() {
                return Step::Fail(
                    CloseCode::PROTOCOL_ERROR,
                    "reserved bits set without an extension",
                );
            }
            if header.opcode.is_control() || header.opcode == OpCode::Continuation {
                return Step::Fail(
                    CloseCode::PROTOCOL_ERROR,
                    "RSV1 on a control or continuation frame",
                );
            }
        }
        if header.opcode.is_control() {
            return self.on_control(&header, mask, input, pos, out);
        }
        match self.admit_data_frame(&header) {
            Ok(fragments) => self.start_data_frame(&header, mask, input, pos, fragments, room),
            Err((code, reason)) => Step::Fail(code, reason),
        }
    }

    /// A control frame with its header at `input[*pos..]`: waits until it
    /// is whole (at most 139 bytes, kept by the caller), spends the control
    /// allowance, unmasks it, then answers a ping, returns a pong or ends
    /// with a close.
    #[inline]
    fn on_control(
        &mut self,
        header: &FrameHeader,
        mask: [u8; 4],
        input: &mut [u8],
        pos: &mut usize,
        out: &mut OutQueue,
    ) -> Step {
        let plen = header.payload_len as usize;
        let total = header.header_len + plen;
        if input.len() - *pos < total {
            return Step::Wait;
        }
        if header.opcode != OpCode::Close
            && !self.control.take(self.limits.control_rate, self.clock_ms)
        {
            return Step::Fail(CloseCode::POLICY_VIOLATION, "control frame flood");
        }
        let start = *pos + header.header_len;
        let payload = &mut input[start..*pos + total];
        apply_mask(payload, mask, 0);
        *pos += total;
        match header.opcode {
            OpCode::Ping => {
                if self.close == CloseState::Open {
                    out.push(Bytes::from(server_frame(OpCode::Pong, payload)));
                }
                Step::Next
            }
            OpCode::Pong => Step::Pong { start },
            _ => self.on_close(payload, out),
        }
    }

    /// May a data frame with this header come now? Checks it against the
    /// message in progress (a continuation needs one, a new message must
    /// not interrupt one) and against the frame, fragment and message caps.
    /// Returns the message's frame count with this one; on refusal, the
    /// close code and reason. Between messages there is no [`Partial`] (a
    /// delivered one was dropped when `decode` began); inside one, its
    /// kind is set.
    #[inline]
    fn admit_data_frame(&self, header: &FrameHeader) -> Result<u32, (CloseCode, &'static str)> {
        let starts_message = header.opcode != OpCode::Continuation;
        match (starts_message, self.msg.is_some()) {
            (false, false) => {
                return Err((CloseCode::PROTOCOL_ERROR, "continuation without a message"));
            }
            (true, true) => {
                return Err((
                    CloseCode::PROTOCOL_ERROR,
                    "new message inside a fragmented one",
                ));
            }
            _ => {}
        }
        let plen = header.payload_len;
        // A compressed message's wire bytes may exceed what they inflate
        // to (incompressible data): its caps allow the encoding's slack,
        // and what it inflates to is held to the cap itself.
        let compressed = if starts_message {
            header.rsv1
        } else {
            self.msg.as_ref().is_some_and(|m| m.inflater.is_some())
        };
        let slack = |cap: u64| {
            if compressed {
                cap.saturating_add(deflate::encoded_slack(cap))
            } else {
                cap
            }
        };
        if plen > slack(self.limits.max_frame) {
            return Err((CloseCode::MESSAGE_TOO_BIG, "frame too big"));
        }
        let (fragments, so_far) = self
            .msg
            .as_ref()
            .map_or((1, 0), |m| (m.fragments + 1, m.len));
        if fragments > self.limits.max_fragments {
            return Err((CloseCode::MESSAGE_TOO_BIG, "too many fragments"));
        }
        if so_far + plen > slack(self.limits.max_message) {
            return Err((CloseCode::MESSAGE_TOO_BIG, "message too big"));
        }
        Ok(fragments)
    }

    /// An admitted data frame with its header at `input[*pos..]`. The fast
    /// path: a whole unfragmented message in `input` is unmasked, validated
    /// and delivered in place. Otherwise the frame's payload is entered
    /// (and, for a first frame, its message started in a new [`Partial`]):
    /// [`Self::on_payload`] gathers it. `fragments`: the message's frames
    /// with this one. A whole compressed message is inflated at once
    /// within `room`, or goes on as one arriving in pieces where the room
    /// ran out.
    #[inline]
    fn start_data_frame(
        &mut self,
        header: &FrameHeader,
        mask: [u8; 4],
        input: &mut [u8],
        pos: &mut usize,
        fragments: u32,
        room: &mut usize,
    ) -> Step {
        let starts_message = header.opcode != OpCode::Continuation;
        let kind = if header.opcode == OpCode::Text {
            MessageKind::Text
        } else {
            MessageKind::Binary
        };
        let hlen = header.header_len;
        let plen = header.payload_len;
        let total = hlen as u64 + plen;
        if starts_message && header.fin && header.rsv1 && (input.len() - *pos) as u64 >= total {
            // A whole compressed message: inflated at once by the worker's
            // inflater, into a buffer of its own.
            let start = *pos + hlen;
            let end = *pos + total as usize;
            let payload = &mut input[start..end];
            apply_mask(payload, mask, 0);
            let mut plain = Vec::new();
            let cap = usize::try_from(self.limits.max_message).unwrap_or(usize::MAX);
            let mut utf8 = Utf8Validator::new();
            let text = kind == MessageKind::Text;
            let mut check = |b: &[u8]| !text || utf8.feed(b).is_ok();
            let whole = deflate::inflate_whole(payload, cap, room, &mut plain, &mut check);
            let (consumed, inflater) = match whole {
                Ok(Whole::Done) => (payload.len(), None),
                Ok(Whole::Paused { consumed, inflater }) => (consumed, Some(inflater)),
                Err(e) => return inflate_failure(e),
            };
            if let Some(inflater) = inflater {
                // The room ran out: the rest of the payload goes back to
                // the wire's masking (it is unmasked as it is gathered)
                // and the message on as one arriving in pieces.
                apply_mask(&mut payload[consumed..], mask, consumed & 3);
                *pos = start + consumed;
                self.msg = Some(Box::new(Partial {
                    recv: RecvState::Payload(PayloadState {
                        remaining: plen - consumed as u64,
                        mask,
                        phase: (consumed & 3) as u8,
                        fin: true,
                    }),
                    kind: Some(kind),
                    buf: plain,
                    len: plen,
                    utf8,
                    fragments,
                    started_ms: self.clock_ms,
                    delivered: false,
                    inflater: Some(inflater),
                }));
                return Step::Wait;
            }
            *pos = end;
            if text && utf8.finish().is_err() {
                return Step::Fail(CloseCode::INVALID_PAYLOAD, "truncated UTF-8 sequence");
            }
            self.msg = Some(Box::new(Partial {
                recv: RecvState::Header,
                kind: None,
                buf: plain,
                len: plen,
                utf8: Utf8Validator::new(),
                fragments,
                started_ms: self.clock_ms,
                delivered: true,
                inflater: None,
            }));
            return Step::Reassembled(kind);
        }
        if starts_message && header.fin && !header.rsv1 && (input.len() - *pos) as u64 >= total {
            // Fast path: a whole unfragmented message in the caller's buffer.
            let start = *pos + hlen;
            let end = *pos + total as usize;
            let payload = &mut input[start..end];
            apply_mask(payload, mask, 0);
            if kind == MessageKind::Text && utf8::validate(payload).is_err() {
                return Step::Fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message");
            }
            *pos = end;
            return Step::Message { kind, start };
        }
        let recv = RecvState::Payload(PayloadState {
            remaining: plen,
            mask,
            phase: 0,
            fin: header.fin,
        });
        match &mut self.msg {
            Some(m) => {
                m.fragments = fragments;
                m.len += plen;
                m.recv = recv;
            }
            None if header.rsv1 => {
                self.msg = Some(Box::new(Partial {
                    recv,
                    kind: Some(kind),
                    buf: Vec::new(),
                    len: plen,
                    utf8: Utf8Validator::new(),
                    fragments,
                    started_ms: self.clock_ms,
                    delivered: false,
                    inflater: Some(Inflater::default()),
                }));
            }
            None => {
                self.msg = Some(Box::new(Partial {
                    recv,
                    kind: Some(kind),
                    buf: Vec::new(),
                    len: plen,
                    utf8: Utf8Validator::new(),
                    fragments,
                    started_ms: self.clock_ms,
                    delivered: false,
                    inflater: None,
                }));
            }
        }
        *pos += hlen;
        Step::Next
    }

    /// The next bytes of a data frame's payload at `input[*pos..]`: unmasks
    /// them, validates them as they come for text, gathers them in the
    /// [`Partial`]'s buffer. Waits for more unless the frame is done; a
    /// final frame completes the message ([`Self::finish_message`]).
    #[inline]
    fn on_payload(
        &mut self,
        frame: PayloadState,
        input: &mut [u8],
        pos: &mut usize,
        room: &mut usize,
    ) -> Step {
        let m = self.msg.as_mut().expect("payload state implies a message");
        let mut avail = frame.remaining.min((input.len() - *pos) as u64) as usize;
        let chunk = &mut input[*pos..*pos + avail];
        let mut phase = apply_mask(chunk, frame.mask, frame.phase as usize) as u8;
        let text = m.kind == Some(MessageKind::Text);
        if let Some(inflater) = &mut m.inflater {
            // Compressed: inflated as it comes (the deflate data is not
            // kept), as much as the room allows.
            let cap = usize::try_from(self.limits.max_message).unwrap_or(usize::MAX);
            let utf8 = &mut m.utf8;
            let mut check = |b: &[u8]| !text || utf8.feed(b).is_ok();
            let taken = match inflater.feed(chunk, cap, room, &mut m.buf, &mut check) {
                Ok(taken) => taken,
                Err(e) => return inflate_failure(e),
            };
            if taken < avail {
                // The room ran out: what was not taken goes back to the
                // wire's masking, to be unmasked again when it is.
                let at = (frame.phase as usize + taken) & 3;
                apply_mask(&mut chunk[taken..], frame.mask, at);
                (avail, phase) = (taken, at as u8);
                *pos += avail;
                m.recv = RecvState::Payload(PayloadState {
                    remaining: frame.remaining - avail as u64,
                    phase,
                    ..frame
                });
                return Step::Wait;
            }
        } else {
            if text && m.utf8.feed(chunk).is_err() {
                return Step::Fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message");
            }
            m.buf.extend_from_slice(chunk);
        }
        *pos += avail;
        let remaining = frame.remaining - avail as u64;
        if remaining > 0 {
            m.recv = RecvState::Payload(PayloadState {
                remaining,
                phase,
                ..frame
            });
            return Step::Wait;
        }
        m.recv = RecvState::Header;
        if frame.fin {
            finish_message(m, self.limits.max_message)
        } else {
            Step::Next
        }
    }

    /// A whole close frame's (unmasked) payload: a code with a UTF-8
    /// reason, or nothing. The code is echoed (unless we had sent a close)
    /// and the connection is done.
    fn on_close(&mut self, payload: &[u8], out: &mut OutQueue) -> Step {
        let code = match payload {
            [] => None,
            [_] => return Step::Fail(CloseCode::PROTOCOL_ERROR, "close payload of one byte"),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !CloseCode::is_valid_on_wire(code) {
                    return Step::Fail(CloseCode::PROTOCOL_ERROR, "invalid close code");
                }
                if utf8::validate(reason).is_err() {
                    return Step::Fail(CloseCode::INVALID_PAYLOAD, "close reason not UTF-8");
                }
                Some(code)
            }
        };
        if self.close == CloseState::Open {
            // Echo the code (§5.5.1); an empty close is answered with an empty one.
            let code_bytes = code.map(u16::to_be_bytes);
            let reply = code_bytes.as_ref().map_or(&[][..], |b| &b[..]);
            out.push(Bytes::from(server_frame(OpCode::Close, reply)));
        }
        self.close = CloseState::Closed;
        self.msg = None;
        Step::Closed(code)
    }
}

/// The last frame of a gathered message is in: a text message must not
/// end inside a UTF-8 sequence. A compressed message gets its inflater's
/// tail (within the cap, checked as it comes) and lets it go. The buffer
/// is handed out, and the [`Partial`] dropped on the next call.
#[inline]
fn finish_message(m: &mut Partial, cap: u64) -> Step {
    let kind = m.kind.take().expect("payload state implies a message");
    let text = kind == MessageKind::Text;
    if let Some(mut inflater) = m.inflater.take() {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        let utf8 = &mut m.utf8;
        let mut check = |b: &[u8]| !text || utf8.feed(b).is_ok();
        if let Err(e) = inflater.finish(cap, &mut m.buf, &mut check) {
            return inflate_failure(e);
        }
    }
    if text && m.utf8.finish().is_err() {
        return Step::Fail(CloseCode::INVALID_PAYLOAD, "truncated UTF-8 sequence");
    }
    m.delivered = true;
    Step::Reassembled(kind)
}

/// The close a failed inflation calls for.
fn inflate_failure(e: InflateError) -> Step {
    match e {
        InflateError::TooBig => {
            Step::Fail(CloseCode::MESSAGE_TOO_BIG, "message too big once inflated")
        }
        InflateError::Invalid => Step::Fail(CloseCode::PROTOCOL_ERROR, "invalid compressed data"),
        InflateError::Refused => {
            Step::Fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message")
        }
    }
}

fn header_reason(e: HeaderError) -> &'static str {
    match e {
        HeaderError::ReservedBits => "reserved bits set without an extension",
        HeaderError::ReservedOpcode(_) => "reserved opcode",
        HeaderError::FragmentedControl => "fragmented control frame",
        HeaderError::ControlExtendedLength => "control frame with an extended length",
        HeaderError::LengthOverflow => "frame length over 2^63",
    }
}
