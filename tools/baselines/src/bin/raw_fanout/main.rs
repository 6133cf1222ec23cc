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
//!   for writability. With `--flush-batch N` a turn writes the first N
//!   dirty subscribers and the rest first in the next turn (corecast's
//!   flush order; bench-gates' `raw-rr`).
//!
//! What it deliberately does not do: topics (every subscriber gets every
//! message; the benchmark uses one topic), validation of the upgrade
//! request, UTF-8 checks, message size limits beyond a sanity cap,
//! handshake timeouts, close handshakes beyond echoing a close frame,
//! per-message logging, CPU pinning. A subscriber with more than
//! `--max-pending` bytes queued is disconnected (counted).
//!
//! Exits on SIGINT or SIGTERM, printing its counters.
//!
//! The parts: `conn` (one connection: the handshake and the frames a
//! publisher sends), `outbuf` (the bytes queued for one connection, written
//! with one `writev`), `worker` (one event loop: accept, read, hand
//! published frames to every worker, write); here the flags and `main`,
//! which starts the workers and stops them on a signal.
//!
//! [`write_switching_protocols`]: corecast::proto::handshake::write_switching_protocols
//! [`parse_header`]: corecast::proto::frame::parse_header
//! [`apply_mask`]: corecast::proto::mask::apply_mask
//! [`server_frame`]: corecast::proto::frame::server_frame

mod conn;
mod outbuf;
mod worker;

use clap::Parser;
use mio::net::TcpListener;
use mio::{Interest, Poll, Token, Waker};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use worker::{Limits, Peer, Worker};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);

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
    /// Connections written per loop turn at most, the rest first in the
    /// next turn (corecast's flush order, `FLUSHES_PER_TURN` = 512); 0
    /// writes every dirty connection each turn.
    #[arg(long, default_value_t = 0, value_name = "N")]
    flush_batch: usize,
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
        let w = Worker::new(
            id,
            poll,
            listener,
            rx,
            peers.clone(),
            stop.clone(),
            Limits {
                max_pending: args.max_pending,
                flush_batch: args.flush_batch,
            },
        );
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
