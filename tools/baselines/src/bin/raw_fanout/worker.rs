//! One worker ([`Worker`]): a mio event loop that accepts connections,
//! reads them, hands the frames its publishers sent to every worker (its
//! [`Peer`]s), queues the frames it receives for its subscribers and writes
//! each subscriber's pending bytes once per turn.

use crate::conn::{Conn, State};
use crate::{LISTENER, WAKER};
use bytes::Bytes;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::Duration;

/// Bounds on work per readiness event, so one busy socket cannot starve the others.
const ACCEPTS_PER_TURN: usize = 1024;
const READS_PER_TURN: usize = 16;
const BATCHES_PER_TURN: usize = 1024;

/// A worker as seen by the others: where to send frame batches.
pub(super) struct Peer {
    pub(super) tx: Sender<Vec<Bytes>>,
    pub(super) waker: Waker,
}

/// Per-worker counters, printed on exit.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    subscribers: u64,
    publishers: u64,
    rejected: u64,
    published: u64,
    frames_queued: u64,
    bytes_written: u64,
    writev_calls: u64,
    slow_dropped: u64,
}

/// The flags a worker runs with.
pub(super) struct Limits {
    /// Bytes queued for one subscriber above which it is disconnected.
    pub max_pending: usize,
    /// Connections written per turn at most (0: every dirty one).
    pub flush_batch: usize,
}

pub(super) struct Worker {
    id: usize,
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    rx: Receiver<Vec<Bytes>>,
    peers: Arc<[Peer]>,
    stop: Arc<AtomicBool>,
    max_pending: usize,
    scratch: Vec<u8>,
    /// Connections with bytes to write, in order: all of them at the end
    /// of this turn, or the first `flush_batch` (`--flush-batch`).
    dirty: VecDeque<usize>,
    /// Connections written per turn at most (0: every dirty one).
    flush_batch: usize,
    /// Connections that stopped reading at [`READS_PER_TURN`].
    reread: Vec<usize>,
    /// Frames published on this worker during this turn.
    outgoing: Vec<Bytes>,
    accept_more: bool,
    recv_more: bool,
    counts: Counts,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        poll: Poll,
        listener: TcpListener,
        rx: Receiver<Vec<Bytes>>,
        peers: Arc<[Peer]>,
        stop: Arc<AtomicBool>,
        limits: Limits,
    ) -> Self {
        let Limits {
            max_pending,
            flush_batch,
        } = limits;
        Self {
            id,
            poll,
            listener,
            conns: Slab::new(),
            rx,
            peers,
            stop,
            max_pending,
            scratch: vec![0; 64 * 1024],
            dirty: VecDeque::new(),
            flush_batch,
            reread: Vec::new(),
            outgoing: Vec::new(),
            accept_more: false,
            recv_more: false,
            counts: Counts::default(),
        }
    }

    pub(super) fn run(mut self) -> io::Result<Counts> {
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
            // The whole list, or (--flush-batch N) its first N: the rest
            // is written next turn, after that turn's publications are
            // appended to every pending queue, so a subscriber this round
            // has not reached takes them in the same write.
            let n = match self.flush_batch {
                0 => self.dirty.len(),
                n => n.min(self.dirty.len()),
            };
            for _ in 0..n {
                let Some(t) = self.dirty.pop_front() else {
                    break;
                };
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
            entry.insert(Conn::new(stream));
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
            self.dirty.push_back(t);
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
                self.dirty.push_back(t);
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
                    self.dirty.push_back(t);
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
