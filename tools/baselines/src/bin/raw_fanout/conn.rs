//! One connection ([`Conn`]): the upgrade request answered (or refused),
//! then, for a publisher, its frames unmasked and joined into messages,
//! each turned into one server frame; pings and closes answered.

use crate::outbuf::OutBuf;
use bytes::Bytes;
use corecast::proto::OpCode;
use corecast::proto::frame::{parse_header, server_frame};
use corecast::proto::handshake::write_switching_protocols;
use corecast::proto::mask::apply_mask;
use mio::net::TcpStream;

/// Largest request head.
const MAX_HEAD: usize = 8 * 1024;
/// Largest published message (a sanity cap, not a feature).
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Handshake,
    Subscriber,
    Publisher,
    /// Close once the queue is written.
    Closing,
}

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) state: State,
    pub(super) inbuf: Vec<u8>,
    pub(super) out: OutBuf,
    /// Listed in the worker's `dirty` list.
    pub(super) dirty: bool,
    /// A fragmented message being joined (publishers).
    msg: Vec<u8>,
    msg_op: OpCode,
}

/// Parses a request head; returns the path (without query) and the key.
fn parse_request(head: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    if first.next()? != "GET" {
        return None;
    }
    let path = first.next()?.split('?').next()?;
    let key = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim())
    })?;
    Some((path, key))
}

/// The response to a request head, and the state it leads to.
fn handshake(head: &[u8]) -> (Vec<u8>, State) {
    let reject = |status: &str| {
        let r = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        (r.into_bytes(), State::Closing)
    };
    let Some((path, key)) = parse_request(head) else {
        return reject("400 Bad Request");
    };
    let state = if path.starts_with("/publish/") {
        State::Publisher
    } else if path == "/ws" || path.starts_with("/ws/") {
        State::Subscriber
    } else {
        return reject("404 Not Found");
    };
    let mut r = Vec::with_capacity(160);
    write_switching_protocols(&mut r, key.as_bytes(), None);
    (r, state)
}

impl Conn {
    /// A connection just accepted: waiting for its request head.
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            state: State::Handshake,
            inbuf: Vec::new(),
            out: OutBuf::default(),
            dirty: false,
            msg: Vec::new(),
            msg_op: OpCode::Binary,
        }
    }

    /// Handles the bytes in `inbuf`; completed messages of a publisher go to
    /// `publish` as server frames. `Err` means drop the connection now.
    pub(super) fn process(&mut self, publish: &mut Vec<Bytes>) -> Result<(), ()> {
        if self.state == State::Handshake {
            let Some(end) = self.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if self.inbuf.len() > MAX_HEAD {
                    Err(())
                } else {
                    Ok(())
                };
            };
            let (resp, state) = handshake(&self.inbuf[..end]);
            self.out.push(&resp.into());
            self.state = state;
            self.inbuf.drain(..end + 4);
        }
        let mut pos = 0;
        while matches!(self.state, State::Subscriber | State::Publisher) {
            let h = match parse_header(&self.inbuf[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return Err(()),
            };
            let Some(mask) = h.mask else { return Err(()) };
            if h.payload_len > MAX_MESSAGE as u64 || self.msg.len() > MAX_MESSAGE {
                return Err(());
            }
            let (start, end) = (
                pos + h.header_len,
                pos + h.header_len + h.payload_len as usize,
            );
            if self.inbuf.len() < end {
                break;
            }
            pos = end;
            let payload = &mut self.inbuf[start..end];
            apply_mask(payload, mask, 0);
            match h.opcode {
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    if self.state != State::Publisher {
                        continue;
                    }
                    if h.opcode != OpCode::Continuation {
                        self.msg_op = h.opcode;
                    }
                    if h.fin && self.msg.is_empty() {
                        publish.push(Bytes::from(server_frame(self.msg_op, payload)));
                    } else {
                        self.msg.extend_from_slice(payload);
                        if h.fin {
                            publish.push(Bytes::from(server_frame(self.msg_op, &self.msg)));
                            self.msg.clear();
                        }
                    }
                }
                OpCode::Ping => self.out.push(&server_frame(OpCode::Pong, payload).into()),
                OpCode::Pong => {}
                OpCode::Close => {
                    let code = payload.get(..2).unwrap_or(&[]);
                    self.out.push(&server_frame(OpCode::Close, code).into());
                    self.state = State::Closing;
                }
            }
        }
        self.inbuf.drain(..pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::client_frame;

    #[test]
    fn parses_the_request_head() {
        let head = b"GET /ws?topics=a,b HTTP/1.1\r\nHost: x\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(
            parse_request(head),
            Some(("/ws", "dGhlIHNhbXBsZSBub25jZQ=="))
        );
        assert_eq!(
            parse_request(b"POST /ws HTTP/1.1\r\nSec-WebSocket-Key: k"),
            None
        );
        assert_eq!(parse_request(b"GET /ws HTTP/1.1\r\nHost: x"), None);
        let (resp, state) = handshake(head);
        assert_eq!(state, State::Subscriber);
        assert!(resp.ends_with(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
        assert_eq!(
            handshake(b"GET /echo HTTP/1.1\r\nSec-WebSocket-Key: k").1,
            State::Closing
        );
        assert_eq!(
            handshake(b"GET /publish/t HTTP/1.1\r\nSec-WebSocket-Key: k").1,
            State::Publisher
        );
    }

    #[test]
    fn publisher_messages_become_server_frames() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut c = Conn {
            stream: TcpStream::from_std(s),
            state: State::Handshake,
            inbuf: b"GET /publish/t HTTP/1.1\r\nSec-WebSocket-Key: k\r\n\r\n".to_vec(),
            out: OutBuf::default(),
            dirty: false,
            msg: Vec::new(),
            msg_op: OpCode::Binary,
        };
        c.inbuf
            .extend(client_frame(true, OpCode::Text, b"hello", [1, 2, 3, 4]));
        c.inbuf
            .extend(client_frame(false, OpCode::Binary, b"ab", [5, 6, 7, 8]));
        c.inbuf
            .extend(client_frame(true, OpCode::Ping, b"p", [5, 6, 7, 8]));
        c.inbuf.extend(client_frame(
            true,
            OpCode::Continuation,
            b"cd",
            [9, 9, 9, 9],
        ));
        let partial = client_frame(true, OpCode::Binary, b"xyz", [1, 1, 1, 1]);
        c.inbuf.extend(&partial[..4]);
        let mut published = Vec::new();
        c.process(&mut published).unwrap();
        assert_eq!(c.state, State::Publisher);
        assert_eq!(published.len(), 2);
        assert_eq!(&published[0][..], &server_frame(OpCode::Text, b"hello")[..]);
        assert_eq!(
            &published[1][..],
            &server_frame(OpCode::Binary, b"abcd")[..]
        );
        assert_eq!(c.inbuf, &partial[..4]);
        let mut queued = Vec::new();
        c.out.write_to(&mut queued).unwrap();
        assert!(queued.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(queued.ends_with(&server_frame(OpCode::Pong, b"p")));
    }
}
