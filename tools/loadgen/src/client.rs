//! One non-blocking WebSocket client connection: connect from a chosen
//! source address, send the upgrade request, verify the `101` (status line,
//! `Upgrade`, `Connection`, `Sec-WebSocket-Accept`), then read server frames
//! and answer pings and closes with masked frames.
//!
//! The protocol work is corecast's: [`accept_key`] for the accept value,
//! [`parse_header`] and [`client_frame`] for framing. The socket is a mio
//! stream registered edge-triggered by the caller (see `fleet`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use corecast::proto::OpCode;
use corecast::proto::frame::{client_frame, parse_header};
use corecast::proto::handshake::accept_key;
use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::url::WsUrl;

/// Largest response head accepted from the server.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Largest data frame buffered from the server.
pub const MAX_FRAME_PAYLOAD: u64 = 1 << 20;
/// Reads per readiness event before yielding to other connections; a
/// connection that hits the cap is driven again on the next turn.
pub const READS_PER_TURN: usize = 8;

/// A small, fast, non-cryptographic generator (SplitMix64) for
/// `Sec-WebSocket-Key`s and mask keys. RFC 6455 asks for unpredictable masks
/// to protect intermediaries; a load generator on loopback only needs them
/// to vary.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Seeded from the clock and the process id.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::new(t ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    /// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64-encoded.
    pub fn ws_key(&mut self) -> [u8; 24] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        raw[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        let mut key = [0u8; 24];
        let n = BASE64
            .encode_slice(raw, &mut key)
            .expect("16 bytes encode to 24");
        debug_assert_eq!(n, 24);
        key
    }
}

/// The `{topic}` placeholder in a request target (see `topics`).
pub const TOPIC_PLACEHOLDER: &str = "{topic}";

/// The upgrade request, rendered once per run; only the key (and, when the
/// target has a `{topic}` placeholder, the topic number) varies.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// Up to the placeholder (or up to the key when there is none).
    head: Vec<u8>,
    /// After the placeholder, up to the key; `None`: no placeholder.
    mid: Option<Vec<u8>>,
}

impl RequestTemplate {
    pub fn new(url: &WsUrl) -> Self {
        let rest = format!(
            " HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
            url.host_header()
        );
        match url.target.split_once(TOPIC_PLACEHOLDER) {
            Some((before, after)) => Self {
                head: format!("GET {before}").into_bytes(),
                mid: Some(format!("{after}{rest}").into_bytes()),
            },
            None => Self {
                head: format!("GET {}{rest}", url.target).into_bytes(),
                mid: None,
            },
        }
    }

    /// The request with `key`, and `topic` in place of the placeholder
    /// (topic 0 when none is given).
    pub fn render(&self, key: &[u8; 24], topic: Option<usize>) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.head.len() + 64);
        v.extend_from_slice(&self.head);
        if let Some(mid) = &self.mid {
            v.extend_from_slice(topic.unwrap_or(0).to_string().as_bytes());
            v.extend_from_slice(mid);
        }
        v.extend_from_slice(key);
        v.extend_from_slice(b"\r\n\r\n");
        v
    }
}

/// Why a connection did not open. [`Failure::key`] names the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// socket/bind/connect failed, or the TCP handshake did.
    Connect(io::ErrorKind),
    /// The server answered with a status other than 101.
    Status(u16),
    /// A 101 whose Sec-WebSocket-Accept is missing or wrong.
    BadAccept,
    /// A malformed or non-conforming response head.
    BadResponse(&'static str),
    /// EOF before a complete response head.
    ClosedBeforeResponse,
    /// A read or write error during the handshake.
    Io(io::ErrorKind),
    /// No verified 101 within the handshake timeout (or the connect phase ended).
    Timeout,
}

impl Failure {
    /// The counter this failure is reported under.
    pub fn key(&self) -> String {
        match self {
            Self::Connect(kind) => format!("connect_error:{kind:?}"),
            Self::Status(code) => format!("handshake_status_{code}"),
            Self::BadAccept => "bad_accept".into(),
            Self::BadResponse(why) => format!("bad_response:{why}"),
            Self::ClosedBeforeResponse => "closed_before_response".into(),
            Self::Io(kind) => format!("handshake_io_error:{kind:?}"),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// How an open connection ended. [`End::key`] names the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// We sent a close, the server answered and closed the TCP connection.
    Clean,
    /// The server sent a close frame first (with its code, if any).
    ServerClosed(Option<u16>),
    /// The TCP connection ended without a close handshake.
    Eof,
    /// A socket error.
    Io(io::ErrorKind),
    /// The server broke the protocol.
    Protocol(&'static str),
}

impl End {
    pub fn key(&self) -> String {
        match self {
            Self::Clean => "clean_close".into(),
            Self::ServerClosed(Some(code)) => format!("server_close_{code}"),
            Self::ServerClosed(None) => "server_close_no_code".into(),
            Self::Eof => "eof_without_close".into(),
            Self::Io(kind) => format!("io_error:{kind:?}"),
            Self::Protocol(why) => format!("protocol_error:{why}"),
        }
    }
}

/// Checks the server's response head in `buf` against the key we sent.
/// `Ok(None)`: incomplete. `Ok(Some(n))`: a valid 101 of `n` bytes (frames
/// may follow it in `buf`).
pub fn check_response(buf: &[u8], key: &[u8; 24]) -> Result<Option<usize>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(Failure::BadResponse("head_too_large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::BadResponse("too_many_headers"));
        }
        Err(_) => return Err(Failure::BadResponse("malformed_head")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(Failure::Status(code));
    }
    let values = |name: &'static str| {
        resp.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &'static str, token: &str| {
        values(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if !has_token("upgrade", "websocket") {
        return Err(Failure::BadResponse("no_upgrade_websocket"));
    }
    if !has_token("connection", "upgrade") {
        return Err(Failure::BadResponse("no_connection_upgrade"));
    }
    // We offered neither extensions nor subprotocols (RFC 6455 §4.1).
    if values("sec-websocket-extensions").next().is_some() {
        return Err(Failure::BadResponse("unrequested_extension"));
    }
    if values("sec-websocket-protocol").next().is_some() {
        return Err(Failure::BadResponse("unrequested_subprotocol"));
    }
    let mut accepts = values("sec-websocket-accept");
    match (accepts.next(), accepts.next()) {
        (Some(v), None) if v.trim_ascii() == accept_key(key) => Ok(Some(n)),
        _ => Err(Failure::BadAccept),
    }
}

/// A frame from the server, borrowed from the reader's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: &'a [u8],
}

/// Splits server bytes into frames. Server frames must be unmasked.
///
/// Consumed frames are skipped by a cursor and the buffer is compacted once
/// per [`FrameReader::push`], not once per frame: a read holding hundreds of
/// small frames costs one move, not hundreds.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte.
    pos: usize,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. Once everything is consumed, a
    /// large buffer is given back: thousands of idle connections must not
    /// each keep their last read.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, &'static str> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.pos = 0;
            self.buf.clear();
            if self.buf.capacity() > 4096 {
                self.buf = Vec::new();
            }
        }
        let buf = &self.buf[self.pos..];
        let h = match parse_header(buf) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(_) => return Err("bad_frame_header"),
        };
        if h.mask.is_some() {
            return Err("masked_server_frame");
        }
        if h.payload_len > MAX_FRAME_PAYLOAD {
            return Err("frame_too_large");
        }
        let end = h.header_len + h.payload_len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let payload = &buf[h.header_len..end];
        self.pos += end;
        Ok(Some(Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload,
        }))
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Request sent (or being sent), waiting for the 101.
    Handshaking,
    /// An open WebSocket.
    Open,
    /// We sent a close frame; waiting for the server's close and EOF.
    Closing,
    /// The server sent a close frame and we answered; waiting for EOF.
    ClosedByServer(Option<u16>),
}

/// What [`Conn::drive`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing that ends the connection. It may have opened: see
    /// [`Conn::opened_at`] (a connection can even open and end in one call).
    Continue,
    /// Opening failed; drop the connection.
    Failed(Failure),
    /// An open connection ended; drop it.
    Ended(End),
}

/// Frames seen on open connections.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub pings_answered: u64,
    pub pongs_received: u64,
    pub messages_received: u64,
    /// Data frames with FIN clear, or continuations (a scenario that expects
    /// one frame per message sees them only through this counter).
    pub fragments_received: u64,
}

/// Receives every unfragmented data message of an open connection.
pub trait Sink {
    /// `conn` is the connection's token, `at` when the read that completed
    /// the message returned.
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant);
}

/// A [`Sink`] that ignores messages (they are still counted in [`Counters`]).
pub struct NoSink;

impl Sink for NoSink {
    fn message(&mut self, _: usize, _: OpCode, _: &[u8], _: Instant) {}
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub phase: Phase,
    /// When `connect` was called.
    pub started: Instant,
    /// When the 101 was verified.
    pub opened_at: Option<Instant>,
    key: [u8; 24],
    /// Response head bytes until the 101 is complete.
    head: Vec<u8>,
    frames: FrameReader,
    /// Bytes not yet written.
    out: Vec<u8>,
    /// Stopped reading at [`READS_PER_TURN`]; drive again without an event.
    pub reread: bool,
}

impl Conn {
    /// Starts a non-blocking connect to `dst`, bound first to `src` (port 0,
    /// with `IP_BIND_ADDRESS_NO_PORT` so the port is chosen at connect time
    /// per destination rather than reserved at bind time).
    pub fn connect(
        src: Option<SocketAddr>,
        dst: SocketAddr,
        key: [u8; 24],
        request: Vec<u8>,
    ) -> io::Result<Self> {
        let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        if let Some(src) = src {
            if src.is_ipv4() {
                set_bind_address_no_port(&sock)?;
            }
            sock.bind(&src.into())?;
        }
        match sock.connect(&dst.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(Self {
            stream: TcpStream::from_std(sock.into()),
            phase: Phase::Connecting,
            started: Instant::now(),
            opened_at: None,
            key,
            head: Vec::new(),
            frames: FrameReader::default(),
            out: request,
            reread: false,
        })
    }

    /// Is the connection still opening (connecting or waiting for the 101)?
    pub fn is_opening(&self) -> bool {
        matches!(self.phase, Phase::Connecting | Phase::Handshaking)
    }

    /// Starts the close handshake (code 1000) on an open connection.
    pub fn start_close(&mut self, rng: &mut Rng) -> Step {
        if self.phase != Phase::Open {
            return Step::Continue;
        }
        let payload = 1000u16.to_be_bytes();
        self.out
            .extend_from_slice(&client_frame(true, OpCode::Close, &payload, rng.mask()));
        self.phase = Phase::Closing;
        match self.flush() {
            Ok(()) => Step::Continue,
            Err(e) => Step::Ended(End::Io(e.kind())),
        }
    }

    /// Makes progress after a readiness event (or a deferred re-read).
    /// Complete data messages go to `sink`, tagged with `token`.
    pub fn drive(
        &mut self,
        token: usize,
        scratch: &mut [u8],
        rng: &mut Rng,
        counters: &mut Counters,
        sink: &mut dyn Sink,
    ) -> Step {
        self.reread = false;
        if self.phase == Phase::Connecting {
            match self.stream.take_error() {
                Ok(Some(e)) | Err(e) => return Step::Failed(Failure::Connect(e.kind())),
                Ok(None) => {}
            }
            match self.stream.peer_addr() {
                Ok(_) => self.phase = Phase::Handshaking,
                // Not connected yet: a spurious wake-up.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Step::Continue,
                Err(e) => return Step::Failed(Failure::Connect(e.kind())),
            }
        }
        if let Err(e) = self.flush() {
            return self.io_error(e);
        }
        for _ in 0..READS_PER_TURN {
            let n = match self.stream.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.io_error(e),
            };
            if n == 0 {
                return match self.phase {
                    Phase::Handshaking => Step::Failed(Failure::ClosedBeforeResponse),
                    Phase::Closing => Step::Ended(End::Clean),
                    Phase::ClosedByServer(code) => Step::Ended(End::ServerClosed(code)),
                    _ => Step::Ended(End::Eof),
                };
            }
            let at = Instant::now();
            let mut data = &scratch[..n];
            if self.phase == Phase::Handshaking {
                self.head.extend_from_slice(data);
                match check_response(&self.head, &self.key) {
                    Ok(None) => continue,
                    Ok(Some(len)) => {
                        self.frames.push(&self.head[len..]);
                        self.head = Vec::new();
                        self.phase = Phase::Open;
                        self.opened_at = Some(at);
                        data = &[];
                    }
                    Err(f) => return Step::Failed(f),
                }
            }
            self.frames.push(data);
            if let Some(end) = self.on_frames(token, at, rng, counters, sink) {
                return Step::Ended(end);
            }
            if let Err(e) = self.flush() {
                return self.io_error(e);
            }
        }
        self.reread = true;
        Step::Continue
    }

    fn io_error(&self, e: io::Error) -> Step {
        if self.is_opening() {
            Step::Failed(Failure::Io(e.kind()))
        } else {
            Step::Ended(End::Io(e.kind()))
        }
    }

    /// Handles every complete frame; `Some` if the connection must end now.
    fn on_frames(
        &mut self,
        token: usize,
        at: Instant,
        rng: &mut Rng,
        counters: &mut Counters,
        sink: &mut dyn Sink,
    ) -> Option<End> {
        loop {
            let frame = match self.frames.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(why) => return Some(End::Protocol(why)),
            };
            match frame.opcode {
                OpCode::Ping => {
                    // Pings during our close are not answered (§5.5.2 allows it).
                    if self.phase == Phase::Open {
                        self.out.extend_from_slice(&client_frame(
                            true,
                            OpCode::Pong,
                            frame.payload,
                            rng.mask(),
                        ));
                        counters.pings_answered += 1;
                    }
                }
                OpCode::Pong => counters.pongs_received += 1,
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]));
                    match self.phase {
                        Phase::Open => {
                            // Echo the code back (§5.5.1), then wait for EOF.
                            let body = code.map(u16::to_be_bytes);
                            let body: &[u8] = body.as_ref().map_or(&[], |b| b);
                            self.out.extend_from_slice(&client_frame(
                                true,
                                OpCode::Close,
                                body,
                                rng.mask(),
                            ));
                            self.phase = Phase::ClosedByServer(code);
                        }
                        // The answer to our close: the server closes TCP next.
                        Phase::Closing => {}
                        _ => return Some(End::Protocol("second_close")),
                    }
                }
                OpCode::Text | OpCode::Binary if frame.fin => {
                    counters.messages_received += 1;
                    sink.message(token, frame.opcode, frame.payload, at);
                }
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    counters.fragments_received += 1;
                    if frame.fin {
                        counters.messages_received += 1;
                    }
                }
            }
        }
    }

    /// Bytes queued but not yet taken by the socket.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Queues bytes (e.g. frames built in place by a publisher); send them
    /// with [`Conn::flush`].
    pub fn outbox(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        // Each write either makes progress or returns; bounded by the queue length.
        while written < self.out.len() {
            match self.stream.write(&self.out[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(e),
            }
        }
        self.out.drain(..written);
        if self.out.is_empty() && self.out.capacity() > 4096 {
            self.out = Vec::new();
        }
        Ok(())
    }
}

/// Defers the choice of the local port from `bind` to `connect`, so that one
/// source address serves a full port range per destination and ports in
/// TIME_WAIT towards other destinations are not excluded.
fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::server_frame;

    const KEY: &[u8; 24] = b"dGhlIHNhbXBsZSBub25jZQ==";
    const OK: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    #[test]
    fn accepts_a_valid_101_and_finds_its_end() {
        let mut buf = OK.as_bytes().to_vec();
        assert_eq!(check_response(&buf, KEY), Ok(Some(OK.len())));
        buf.extend_from_slice(&server_frame(OpCode::Ping, b"x"));
        assert_eq!(check_response(&buf, KEY), Ok(Some(OK.len())));
        for cut in 0..OK.len() {
            assert_eq!(check_response(&buf[..cut], KEY), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn classifies_bad_responses() {
        let refused = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(refused.as_bytes(), KEY),
            Err(Failure::Status(503))
        );
        let wrong = OK.replace(
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        assert_eq!(
            check_response(wrong.as_bytes(), KEY),
            Err(Failure::BadAccept)
        );
        let missing = OK.replace("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", "");
        assert_eq!(
            check_response(missing.as_bytes(), KEY),
            Err(Failure::BadAccept)
        );
        let no_upgrade = OK.replace("Upgrade: websocket\r\n", "");
        assert!(matches!(
            check_response(no_upgrade.as_bytes(), KEY),
            Err(Failure::BadResponse(_))
        ));
        assert!(matches!(
            check_response(b"garbage\r\n\r\n", KEY),
            Err(Failure::BadResponse(_))
        ));
        let huge = vec![b'x'; MAX_RESPONSE_HEAD + 1];
        assert_eq!(
            check_response(b"HTTP/1.1 101 OK\r\nX: ", KEY),
            Ok(None),
            "partial"
        );
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.extend_from_slice(&huge);
        assert!(matches!(
            check_response(&long, KEY),
            Err(Failure::BadResponse("head_too_large"))
        ));
    }

    #[test]
    fn failure_keys_name_the_cause() {
        assert_eq!(Failure::Status(404).key(), "handshake_status_404");
        assert_eq!(
            Failure::Connect(io::ErrorKind::ConnectionRefused).key(),
            "connect_error:ConnectionRefused"
        );
        assert_eq!(Failure::Timeout.key(), "timeout");
        assert_eq!(End::ServerClosed(Some(1001)).key(), "server_close_1001");
    }

    #[test]
    fn frame_reader_splits_and_rejects_masked_frames() {
        let mut r = FrameReader::default();
        let mut bytes = server_frame(OpCode::Ping, b"hi");
        bytes.extend_from_slice(&server_frame(OpCode::Text, b"hello"));
        r.push(&bytes[..3]);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&bytes[3..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OpCode::Ping, &b"hi"[..]));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.opcode, f.fin), (OpCode::Text, true));
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&client_frame(true, OpCode::Text, b"x", [1, 2, 3, 4]));
        assert_eq!(r.next_frame(), Err("masked_server_frame"));
    }

    #[test]
    fn frame_reader_keeps_partial_frames_and_frees_consumed_buffers() {
        let mut r = FrameReader::default();
        let big = server_frame(OpCode::Binary, &[7; 10_000]);
        let mut bytes = big.clone();
        bytes.extend_from_slice(&big[..5000]);
        r.push(&bytes);
        assert_eq!(r.next_frame().unwrap().unwrap().payload.len(), 10_000);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&big[5000..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.payload, &big[4..]);
        assert_eq!(r.next_frame(), Ok(None));
        assert_eq!(r.buf.capacity(), 0, "an emptied large buffer is freed");
    }

    #[test]
    fn request_carries_the_key() {
        let url = crate::url::parse("ws://127.0.0.1:9101/echo").unwrap();
        let req = RequestTemplate::new(&url).render(KEY, None);
        let s = String::from_utf8(req).unwrap();
        assert!(s.starts_with("GET /echo HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"));
        assert!(s.ends_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"));
        let url = crate::url::parse("ws://127.0.0.1:9101/ws?topics=t{topic}").unwrap();
        let t = RequestTemplate::new(&url);
        let s = String::from_utf8(t.render(KEY, Some(42))).unwrap();
        assert!(s.starts_with("GET /ws?topics=t42 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"));
        assert!(s.ends_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"));
        let s = String::from_utf8(t.render(KEY, None)).unwrap();
        assert!(s.starts_with("GET /ws?topics=t0 HTTP/1.1"));
    }

    #[test]
    fn keys_are_valid_and_vary() {
        let mut rng = Rng::new(7);
        let (a, b) = (rng.ws_key(), rng.ws_key());
        assert_ne!(a, b);
        assert_eq!(BASE64.decode(a).unwrap().len(), 16);
    }
}
