//! The inbound half of [`WsConn`]: [`WsConn::decode`], which takes the
//! client's bytes, and the close-frame handling it ends in. The rules it
//! enforces and its memory use are in the docs of [`super`] (`ws.rs`), which
//! holds the connection's state and its outbound side.

use super::{CloseState, Decoded, Event, MessageKind, RecvState, WsConn};
use crate::proto::frame::{CloseCode, HeaderError, OpCode, parse_header, server_frame};
use crate::proto::mask::apply_mask;
use crate::proto::outbound::OutQueue;
use crate::proto::utf8;
use bytes::Bytes;

impl WsConn {
    /// Consumes bytes from the client; see the [`ws`](super) module docs.
    pub fn decode<'a>(&'a mut self, input: &'a mut [u8], out: &mut OutQueue) -> Decoded<'a> {
        if self.delivered {
            self.delivered = false;
            self.msg_buf = Vec::new();
            self.msg_len = 0;
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
            match self.recv {
                RecvState::Header => {
                    let header = match parse_header(&input[pos..]) {
                        Ok(Some(h)) => h,
                        Ok(None) => {
                            return Decoded {
                                consumed: pos,
                                event: None,
                            };
                        }
                        Err(e) => {
                            return self.fail(
                                CloseCode::PROTOCOL_ERROR,
                                header_reason(e),
                                out,
                                input.len(),
                            );
                        }
                    };
                    let Some(mask) = header.mask else {
                        return self.fail(
                            CloseCode::PROTOCOL_ERROR,
                            "client frame not masked",
                            out,
                            input.len(),
                        );
                    };
                    let hlen = header.header_len;
                    let plen = header.payload_len;
                    if header.opcode.is_control() {
                        // Whole control frames only (<= 139 bytes); the caller keeps partial ones.
                        let total = hlen + plen as usize;
                        if input.len() - pos < total {
                            return Decoded {
                                consumed: pos,
                                event: None,
                            };
                        }
                        if header.opcode != OpCode::Close
                            && !self.control.take(self.limits.control_rate, self.clock_ms)
                        {
                            return self.fail(
                                CloseCode::POLICY_VIOLATION,
                                "control frame flood",
                                out,
                                input.len(),
                            );
                        }
                        let payload = &mut input[pos + hlen..pos + total];
                        apply_mask(payload, mask, 0);
                        pos += total;
                        match header.opcode {
                            OpCode::Ping => {
                                if self.close == CloseState::Open {
                                    out.push(Bytes::from(server_frame(OpCode::Pong, payload)));
                                }
                            }
                            OpCode::Pong => {
                                return Decoded {
                                    consumed: pos,
                                    event: Some(Event::Pong(&input[pos - plen as usize..pos])),
                                };
                            }
                            _ => return self.on_close(pos, plen as usize, input, out),
                        }
                        continue;
                    }
                    // A data frame.
                    let starts_message = header.opcode != OpCode::Continuation;
                    match (starts_message, self.msg_kind.is_some()) {
                        (false, false) => {
                            return self.fail(
                                CloseCode::PROTOCOL_ERROR,
                                "continuation without a message",
                                out,
                                input.len(),
                            );
                        }
                        (true, true) => {
                            return self.fail(
                                CloseCode::PROTOCOL_ERROR,
                                "new message inside a fragmented one",
                                out,
                                input.len(),
                            );
                        }
                        _ => {}
                    }
                    if plen > self.limits.max_frame {
                        return self.fail(
                            CloseCode::MESSAGE_TOO_BIG,
                            "frame too big",
                            out,
                            input.len(),
                        );
                    }
                    self.fragments = if starts_message {
                        1
                    } else {
                        self.fragments + 1
                    };
                    if self.fragments > self.limits.max_fragments {
                        return self.fail(
                            CloseCode::MESSAGE_TOO_BIG,
                            "too many fragments",
                            out,
                            input.len(),
                        );
                    }
                    if self.msg_len + plen > self.limits.max_message {
                        return self.fail(
                            CloseCode::MESSAGE_TOO_BIG,
                            "message too big",
                            out,
                            input.len(),
                        );
                    }
                    let kind = if header.opcode == OpCode::Text {
                        MessageKind::Text
                    } else {
                        MessageKind::Binary
                    };
                    let total = hlen as u64 + plen;
                    if starts_message && header.fin && (input.len() - pos) as u64 >= total {
                        // Fast path: a whole unfragmented message in the caller's buffer.
                        let start = pos + hlen;
                        let end = pos + total as usize;
                        let payload = &mut input[start..end];
                        apply_mask(payload, mask, 0);
                        if kind == MessageKind::Text && utf8::validate(payload).is_err() {
                            return self.fail(
                                CloseCode::INVALID_PAYLOAD,
                                "invalid UTF-8 in text message",
                                out,
                                input.len(),
                            );
                        }
                        return Decoded {
                            consumed: end,
                            event: Some(Event::Message {
                                kind,
                                payload: &input[start..end],
                            }),
                        };
                    }
                    if starts_message {
                        self.msg_kind = Some(kind);
                        self.msg_started_ms = self.clock_ms;
                    }
                    self.msg_len += plen;
                    pos += hlen;
                    self.recv = RecvState::Payload {
                        remaining: plen,
                        mask,
                        phase: 0,
                        fin: header.fin,
                    };
                }
                RecvState::Payload {
                    remaining,
                    mask,
                    phase,
                    fin,
                } => {
                    let avail = remaining.min((input.len() - pos) as u64) as usize;
                    let chunk = &mut input[pos..pos + avail];
                    let phase = apply_mask(chunk, mask, phase as usize) as u8;
                    if self.msg_kind == Some(MessageKind::Text) && self.utf8.feed(chunk).is_err() {
                        return self.fail(
                            CloseCode::INVALID_PAYLOAD,
                            "invalid UTF-8 in text message",
                            out,
                            input.len(),
                        );
                    }
                    self.msg_buf.extend_from_slice(chunk);
                    pos += avail;
                    let remaining = remaining - avail as u64;
                    if remaining > 0 {
                        self.recv = RecvState::Payload {
                            remaining,
                            mask,
                            phase,
                            fin,
                        };
                        return Decoded {
                            consumed: pos,
                            event: None,
                        };
                    }
                    self.recv = RecvState::Header;
                    if fin {
                        let kind = self
                            .msg_kind
                            .take()
                            .expect("payload state implies a message");
                        if kind == MessageKind::Text && self.utf8.finish().is_err() {
                            return self.fail(
                                CloseCode::INVALID_PAYLOAD,
                                "truncated UTF-8 sequence",
                                out,
                                input.len(),
                            );
                        }
                        self.delivered = true;
                        return Decoded {
                            consumed: pos,
                            event: Some(Event::Message {
                                kind,
                                payload: &self.msg_buf,
                            }),
                        };
                    }
                }
            }
        }
    }

    /// A complete close frame ends at `end` with `plen` payload bytes.
    fn on_close<'a>(
        &mut self,
        end: usize,
        plen: usize,
        input: &[u8],
        out: &mut OutQueue,
    ) -> Decoded<'a> {
        let payload = &input[end - plen..end];
        let code = match payload {
            [] => None,
            [_] => {
                return self.fail(
                    CloseCode::PROTOCOL_ERROR,
                    "close payload of one byte",
                    out,
                    input.len(),
                );
            }
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !CloseCode::is_valid_on_wire(code) {
                    return self.fail(
                        CloseCode::PROTOCOL_ERROR,
                        "invalid close code",
                        out,
                        input.len(),
                    );
                }
                if utf8::validate(reason).is_err() {
                    return self.fail(
                        CloseCode::INVALID_PAYLOAD,
                        "close reason not UTF-8",
                        out,
                        input.len(),
                    );
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
        self.msg_buf = Vec::new();
        Decoded {
            consumed: input.len(),
            event: Some(Event::Closed { code }),
        }
    }
}

fn header_reason(e: HeaderError) -> &'static str {
    match e {
        HeaderError::ReservedBits => "reserved bits set without an extension",
        HeaderError::ReservedOpcode(_) => "reserved opcode",
        HeaderError::FragmentedControl => "fragmented control frame",
        HeaderError::ControlTooLong => "control frame payload over 125 bytes",
        HeaderError::LengthOverflow => "frame length over 2^63",
    }
}
