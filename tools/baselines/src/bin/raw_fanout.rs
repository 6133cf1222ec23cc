//! `raw-fanout`: the kernel's practical ceiling for corecast's fan-out
//! benchmarks. Thread-per-core like corecast (one mio `Poll` and one
//! `SO_REUSEPORT` listener per worker), but with no WebSocket logic beyond
//! what fan-out needs:
//!
//! - the handshake: find the blank line, take `Sec-WebSocket-Key`, answer
//!   `101` ([`write_switching_protocols`], i.e. `accept_key`); `/publish/...` makes a publisher, `/ws...` a
//!   subscriber, anything else gets `404`;
//! - publishers' frames: parsed ([`parse_header`]), unmasked ([`apply_mask`]),
//!   fragments joined; each message becomes one server frame *once*
//!   ([`server_frame`]) and is handed to every worker (an `mpsc` channel and
//!   a mio `Waker` per worker, one batch per event-loop turn);
//! - each worker appends the frame to every local subscriber's pending
//!   bytes and, at the end of the loop turn, writes each subscriber's
//!   pending frames with ONE `writev` (small frames are copied into one
//!   contiguous buffer, large ones are shared `Bytes`); partial writes wait
//!   for writability.
//!
//! What it deliberately does not do: topics (every subscriber gets every
//! message; the benchmark uses one topic), validation of the upgrade
//! request, UTF-8 checks, message size limits beyond a sanity cap,
//! handshake timeouts, close handshakes beyond echoing a close frame,
//! per-message logging, CPU pinning. A subscriber with more than
//! `--max-pending` bytes queued is disconnected (counted).
//!
//! Exits on SIGINT or SIGTERM, printing its counters.

use bytes::{Bytes, BytesMut};
use clap::Parser;
use corecast::proto::frame::{parse_header, server_frame};
use corecast::proto::handshake::write_switching_protocols;
use corecast::proto::mask::apply_mask;
use corecast::proto::outbound::MAX_IOVECS;
use corecast::proto::{OpCode, OutQueue};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Duration;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// Largest request head.
const MAX_HEAD: usize = 8 * 1024;
/// Largest published message (a sanity cap, not a feature).
const MAX_MESSAGE: usize = 16 << 20;
/// Frames shorter than this are copied into the subscriber's contiguous
/// buffer; longer ones are queued as shared `Bytes` (one iovec each).
const COPY_BELOW: usize = 1024;
/// Bounds on work per readiness event, so one busy socket cannot starve the others.
const ACCEPTS_PER_TURN: usize = 1024;
const READS_PER_TURN: usize = 16;
const BATCHES_PER_TURN: usize = 1024;

/// Raw mio fan-out server: the kernel's practical ceiling (fan-out baseline).
#[derive(Debug, Parser)]
#[command(name = "raw-fanout", version, about, long_about = None)]
struct Args {
    /// Address every worker binds with SO_REUSEPORT.
    #[arg(long, default_value = "127.0.0.1:9202", value_name = "ADDR")]
    listen: SocketAddr,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    workers: usize,
    /// Bytes queued for one subscriber above which it is disconnected.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    max_pending: usize,
}

/// A worker as seen by the others: where to send frame batches.
struct Peer {
    tx: Sender<Vec<Bytes>>,
    waker: Waker,
}

/// Per-worker counters, printed on exit.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    subscribers: u64,
    publishers: u64,
    rejected: u64,
    published: u64,
    frames_queued: u64,
    bytes_written: u64,
    writev_calls: u64,
    slow_dropped: u64,
}

/// Bytes queued for one connection: corecast's [`OutQueue`] of shared
/// frames, plus a contiguous tail into which small frames are copied (one
/// iovec for many of them). The tail joins the queue before each write and
/// before a large frame, so order is kept.
#[derive(Default)]
struct OutBuf {
    queue: OutQueue,
    tail: BytesMut,
}

impl OutBuf {
    fn len(&self) -> usize {
        self.queue.len() + self.tail.len()
    }

    fn push(&mut self, frame: &Bytes) {
        if frame.len() < COPY_BELOW {
            self.tail.extend_from_slice(frame);
        } else {
            self.seal();
            self.queue.push(frame.clone());
        }
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.queue.push(self.tail.split().freeze());
        }
    }

    /// One `writev` of (up to [`MAX_IOVECS`] chunks of) the queue. Returns
    /// the bytes written and whether everything offered was taken.
    fn write_to(&mut self, w: &mut impl Write) -> io::Result<(usize, bool)> {
        self.seal();
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let k = self.queue.gather(&mut iov);
        let offered: usize = iov[..k].iter().map(|s| s.len()).sum();
        let n = loop {
            match w.write_vectored(&iov[..k]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.queue.advance(n);
        Ok((n, n == offered))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Subscriber,
    Publisher,
    /// Close once the queue is written.
    Closing,
}

struct Conn {
    stream: TcpStream,
    state: State,
    inbuf: Vec<u8>,
    out: OutBuf,
    /// Listed in the worker's `dirty` list.
    dirty: bool,
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
    /// Handles the bytes in `inbuf`; completed messages of a publisher go to
    /// `publish` as server frames. `Err` means drop the connection now.
    fn process(&mut self, publish: &mut Vec<Bytes>) -> Result<(), ()> {
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

struct Worker {
    id: usize,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    rx: Receiver<Vec<Bytes>>,
    peers: Arc<[Peer]>,
    stop: Arc<AtomicBool>,
    max_pending: usize,
    scratch: Vec<u8>,
    /// Connections with bytes to write at the end of this turn.
    dirty: Vec<usize>,
    /// Connections that stopped reading at [`READS_PER_TURN`].
    reread: Vec<usize>,
    /// Frames published on this worker during this turn.
    outgoing: Vec<Bytes>,
    accept_more: bool,
    recv_more: bool,
    counts: Counts,
}

impl Worker {
    fn run(mut self) -> io::Result<Counts> {
        let mut events = Events::with_capacity(1024);
        let mut ready = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            let busy = self.accept_more
                || self.recv_more
                || !self.reread.is_empty()
                || !self.dirty.is_empty();
            let timeout = if busy {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            ready.append(&mut self.reread);
            for ev in &events {
                match ev.token() {
                    LISTENER => self.accept_more = true,
                    WAKER => self.recv_more = true,
                    Token(t) => ready.push(t),
                }
            }
            if self.accept_more {
                self.accept()?;
            }
            for t in ready.drain(..) {
                self.on_ready(t);
            }
            if self.recv_more {
                self.receive();
            }
            if !self.outgoing.is_empty() {
                let batch = std::mem::take(&mut self.outgoing);
                self.counts.published += batch.len() as u64;
                for (i, peer) in self.peers.iter().enumerate().filter(|(i, _)| *i != self.id) {
                    // One copy per worker, so workers never share a refcount cache line.
                    let copy = batch.iter().map(|f| Bytes::copy_from_slice(f)).collect();
                    if peer.tx.send(copy).is_ok() {
                        let _ = peer.waker.wake();
                    } else {
                        eprintln!("raw-fanout: worker {i} is gone");
                    }
                }
                self.fan_out(&batch);
            }
            for t in std::mem::take(&mut self.dirty) {
                self.flush(t);
            }
        }
        Ok(self.counts)
    }

    fn accept(&mut self) -> io::Result<()> {
        for _ in 0..ACCEPTS_PER_TURN {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_more = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: retry on the next listener event.
                    eprintln!("raw-fanout: accept: {e}");
                    self.accept_more = false;
                    return Ok(());
                }
            };
            stream.set_nodelay(true)?;
            let entry = self.conns.vacant_entry();
            self.poll.registry().register(
                &mut stream,
                Token(entry.key()),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            entry.insert(Conn {
                stream,
                state: State::Handshake,
                inbuf: Vec::new(),
                out: OutBuf::default(),
                dirty: false,
                msg: Vec::new(),
                msg_op: OpCode::Binary,
            });
        }
        Ok(())
    }

    /// Reads what the connection sent and reacts to it.
    fn on_ready(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        let before = c.state;
        let mut reads = 0;
        let ok = loop {
            if reads == READS_PER_TURN {
                self.reread.push(t);
                break Ok(());
            }
            reads += 1;
            match c.stream.read(&mut self.scratch) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    c.inbuf.extend_from_slice(&self.scratch[..n]);
                    if c.process(&mut self.outgoing).is_err() {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        if ok.is_err() {
            self.conns.remove(t);
            return;
        }
        match (before, c.state) {
            (State::Handshake, State::Subscriber) => self.counts.subscribers += 1,
            (State::Handshake, State::Publisher) => self.counts.publishers += 1,
            (State::Handshake, State::Closing) => self.counts.rejected += 1,
            _ => {}
        }
        // A writable event, or something new to send: write at the end of the turn.
        if c.out.len() > 0 && !c.dirty {
            c.dirty = true;
            self.dirty.push(t);
        }
    }

    /// Takes the batches other workers published.
    fn receive(&mut self) {
        for _ in 0..BATCHES_PER_TURN {
            match self.rx.try_recv() {
                Ok(batch) => self.fan_out(&batch),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                    self.recv_more = false;
                    return;
                }
            }
        }
    }

    fn fan_out(&mut self, batch: &[Bytes]) {
        for (t, c) in self.conns.iter_mut() {
            if c.state != State::Subscriber {
                continue;
            }
            for f in batch {
                c.out.push(f);
            }
            self.counts.frames_queued += batch.len() as u64;
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(t);
            }
        }
    }

    fn flush(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if !c.dirty {
            return;
        }
        c.dirty = false;
        if c.out.len() > self.max_pending {
            self.counts.slow_dropped += 1;
            self.conns.remove(t);
            return;
        }
        if c.out.len() == 0 {
            return;
        }
        self.counts.writev_calls += 1;
        match c.out.write_to(&mut c.stream) {
            Ok((n, all_offered)) => {
                self.counts.bytes_written += n as u64;
                if c.out.len() == 0 && c.state == State::Closing {
                    self.conns.remove(t);
                } else if c.out.len() > 0 && all_offered {
                    // Capped by MAX_IOV, not by the socket: go on next turn.
                    c.dirty = true;
                    self.dirty.push(t);
                }
                // Otherwise the socket is full: the writable event marks it dirty again.
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.conns.remove(t);
            }
        }
    }
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (addr, listeners) = corecast::server::listener::bind_group(args.listen, workers, None)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut polls = Vec::new();
    let mut peers = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..workers {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (tx, rx) = channel();
        polls.push(poll);
        peers.push(Peer { tx, waker });
        rxs.push(rx);
    }
    let peers: Arc<[Peer]> = peers.into();
    let mut handles = Vec::new();
    for (id, ((poll, rx), listener)) in polls.into_iter().zip(rxs).zip(listeners).enumerate() {
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let w = Worker {
            id,
            poll,
            listener,
            conns: Slab::new(),
            rx,
            peers: peers.clone(),
            stop: stop.clone(),
            max_pending: args.max_pending,
            scratch: vec![0; 64 * 1024],
            dirty: Vec::new(),
            reread: Vec::new(),
            outgoing: Vec::new(),
            accept_more: false,
            recv_more: false,
            counts: Counts::default(),
        };
        handles.push(
            std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || w.run())?,
        );
    }
    println!("raw-fanout listening on {addr} ({workers} workers)");
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let _ = signals.forever().next();
    stop.store(true, Ordering::Relaxed);
    for p in peers.iter() {
        let _ = p.waker.wake();
    }
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(c)) => println!("raw-fanout: worker {id}: {c:?}"),
            Ok(Err(e)) => eprintln!("raw-fanout: worker {id} failed: {e}"),
            Err(_) => eprintln!("raw-fanout: worker {id} panicked"),
        }
    }
    Ok(())
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

    /// Takes at most `cap` bytes per write.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(self.cap);
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn out_buffer_coalesces_small_frames_and_survives_partial_writes() {
        let mut q = OutBuf::default();
        let small = Bytes::from(vec![1u8; 100]);
        let big = Bytes::from(vec![2u8; 5000]);
        q.push(&small);
        q.push(&small);
        q.push(&big);
        q.push(&small);
        assert_eq!(q.len(), 5300);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 150,
        };
        // write_vectored's default writes the first non-empty slice only.
        assert_eq!(q.write_to(&mut w).unwrap(), (150, false));
        assert_eq!(q.write_to(&mut w).unwrap(), (50, false));
        w.cap = usize::MAX;
        assert_eq!(q.write_to(&mut w).unwrap(), (5000, false));
        assert_eq!(q.write_to(&mut w).unwrap(), (100, true));
        assert_eq!(q.len(), 0);
        let mut want = vec![1u8; 200];
        want.extend_from_slice(&big);
        want.extend_from_slice(&small);
        assert_eq!(w.got, want);
    }
}
