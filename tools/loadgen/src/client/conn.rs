//! One connection ([`Conn`]): a non-blocking connect from a chosen source
//! address, the handshake driven to a verified 101, then server frames
//! read and pings and closes answered with masked frames; the bytes it
//! owes the socket queued and flushed.

use super::frames::{FrameReader, MAX_FRAME_PAYLOAD};
use super::handshake::{RequestTemplate, check_response};
use super::{End, Failure, Rng};
use corecast::proto::OpCode;
use corecast::proto::frame::client_frame;
use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

/// Reads per readiness event before yielding to other connections; a
/// connection that hits the cap is driven again on the next turn.
pub const READS_PER_TURN: usize = 8;

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
    /// Connections that agreed to permessage-deflate.
    pub deflate_agreed: u64,
    /// Unfragmented data messages received compressed (RSV1).
    pub compressed_received: u64,
}

/// Receives every unfragmented data message of an open connection.
pub trait Sink {
    /// `conn` is the connection's token, `at` when the read that completed
    /// the message returned.
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant);

    /// A compressed message (permessage-deflate agreed, RSV1 set):
    /// `deflated` is its deflate data without the 4-byte tail. By default
    /// inflated and handed to [`Sink::message`]; a sink that looks at only
    /// some messages may count the rest without inflating them. `Err` ends
    /// the connection as a protocol error.
    fn compressed(
        &mut self,
        conn: usize,
        opcode: OpCode,
        deflated: &[u8],
        at: Instant,
    ) -> Result<(), &'static str> {
        let mut payload = Vec::new();
        inflate(deflated, &mut payload)?;
        self.message(conn, opcode, &payload, at);
        Ok(())
    }
}

/// Inflates one compressed message into `out` (as large as a frame may
/// be); `Err` names the protocol error.
pub fn inflate(deflated: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    corecast::proto::deflate::inflate(deflated, MAX_FRAME_PAYLOAD as usize, out)
        .map_err(|_| "bad_deflate_data")
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
    /// Paced reading (`fleet::Fleet::pace`): bytes an open connection may
    /// still read until its allowance is renewed; `None`: no limit.
    pub allowance: Option<usize>,
    /// Stopped reading because the allowance was spent: drive again when
    /// it is renewed (no readiness event may come for bytes already there).
    pub starved: bool,
    /// `wss://`: the TLS session the socket's bytes go through.
    tls: Option<Box<rustls::ClientConnection>>,
    /// The request offered permessage-deflate.
    deflate_offered: bool,
    /// permessage-deflate was agreed: data messages may come compressed.
    deflate: bool,
}

impl Conn {
    /// Starts a non-blocking connect to `dst`, bound first to `src` (port 0,
    /// with `IP_BIND_ADDRESS_NO_PORT` so the port is chosen at connect time
    /// per destination rather than reserved at bind time), to send
    /// `template`'s request with `key` (and `topic`). A `wss://` template's
    /// connection speaks TLS to its host name.
    pub fn connect(
        src: Option<SocketAddr>,
        dst: SocketAddr,
        key: [u8; 24],
        template: &RequestTemplate,
        topic: Option<usize>,
    ) -> io::Result<Self> {
        let request = template.render(&key, topic);
        let tls = template
            .tls_host()
            .map(|h| super::tls::session(h).map(Box::new))
            .transpose()?;
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
            allowance: None,
            starved: false,
            tls,
            deflate_offered: template.offers_deflate(),
            deflate: false,
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
        self.starved = false;
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
            // Paced: at most the allowance (never a zero-length read, which
            // would look like EOF).
            let cap = match self.allowance.filter(|_| !self.is_opening()) {
                Some(0) => {
                    self.starved = true;
                    return Step::Continue;
                }
                Some(a) => a.min(scratch.len()),
                None => scratch.len(),
            };
            let n = match self.read_some(&mut scratch[..cap]) {
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
            if !self.is_opening()
                && let Some(a) = self.allowance.as_mut()
            {
                *a = a.saturating_sub(n);
            }
            let at = Instant::now();
            let mut data = &scratch[..n];
            if self.phase == Phase::Handshaking {
                self.head.extend_from_slice(data);
                match check_response(&self.head, &self.key, self.deflate_offered) {
                    Ok(None) => continue,
                    Ok(Some(opened)) => {
                        self.frames.push(&self.head[opened.len..]);
                        self.head = Vec::new();
                        self.phase = Phase::Open;
                        self.opened_at = Some(at);
                        self.deflate = opened.deflate;
                        counters.deflate_agreed += u64::from(opened.deflate);
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
            // RSV1 only on the first frame of a data message, and only
            // once permessage-deflate was agreed (RFC 7692 §6).
            if frame.rsv1
                && !(self.deflate && matches!(frame.opcode, OpCode::Text | OpCode::Binary))
            {
                return Some(End::Protocol("unexpected_rsv1"));
            }
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
                OpCode::Text | OpCode::Binary if frame.fin && frame.rsv1 => {
                    counters.messages_received += 1;
                    counters.compressed_received += 1;
                    if let Err(why) = sink.compressed(token, frame.opcode, frame.payload, at) {
                        return Some(End::Protocol(why));
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

    /// Reads from the socket, through TLS for a `wss://` connection.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // No plaintext yet: more ciphertext (the handshake's too).
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets().map_err(io::Error::other)?;
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Writes queued bytes until done or the socket is full (through TLS
    /// for a `wss://` connection: queued bytes are encrypted as rustls
    /// takes them, its ciphertext written until the socket is full).
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            if !self.out.is_empty() {
                let n = tls.writer().write(&self.out)?;
                self.out.drain(..n);
            }
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                    Err(e) => return Err(e),
                }
            }
            if self.out.is_empty() && self.out.capacity() > 4096 {
                self.out = Vec::new();
            }
            return Ok(());
        }
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
