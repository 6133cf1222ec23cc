//! `fws-broadcast`: a fastwebsockets peer for corecast's fan-out
//! benchmarks: tokio (multi-thread runtime) + hyper 1 (the upgrade) +
//! fastwebsockets + one `tokio::sync::broadcast` channel. The independent
//! harness of issue #14 measures a fastwebsockets server beside corecast;
//! this is ours, built as its README and examples build one.
//!
//! - `GET /ws?topics=...` (WebSocket): a subscriber. The connection is
//!   split (`tokio::io::split`): a reader task answers pings and closes
//!   (fastwebsockets' obligated sends, handed to the writer over a small
//!   channel); the writer takes each broadcast message and writes it with
//!   `write_frame` (one `write` per frame, or `writev` above
//!   fastwebsockets' threshold, as the library does by default).
//! - `GET /publish/{topic}` (WebSocket): a publisher. Every text or binary
//!   message (fragments collected) goes into the broadcast channel.
//!
//! Like `tt-broadcast`: topics are ignored (one channel, every subscriber
//! gets every message), a subscriber more than `--capacity` messages
//! behind skips what it missed (counted and printed on exit), no TLS, no
//! compression.
//!
//! Exits on SIGINT (ctrl-c) or SIGTERM, printing its counters.

use baselines::{Role, Stats, role_of};
use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;

/// fastwebsockets broadcast server (fan-out peer).
#[derive(Debug, Parser)]
#[command(name = "fws-broadcast", version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9202", value_name = "ADDR")]
    listen: SocketAddr,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    workers: usize,
    /// Broadcast channel capacity, in messages.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    capacity: usize,
}

/// One published message: its opcode (text or binary) and payload.
type Message = (OpCode, Bytes);

fn main() {
    let args = Args::parse();
    baselines::run("fws-broadcast", args.workers, |workers| {
        serve(args, workers)
    });
}

async fn serve(args: Args, workers: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    println!(
        "fws-broadcast listening on {} ({workers} workers, broadcast capacity {})",
        listener.local_addr()?,
        args.capacity
    );
    let (tx, _) = broadcast::channel::<Message>(args.capacity.max(1));
    let stats = Arc::new(Stats::default());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // Accept errors (EMFILE, ECONNABORTED) are per connection: keep serving.
                if let Ok((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    let (tx, stats) = (tx.clone(), stats.clone());
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let service = service_fn(move |req| {
                            let (tx, stats) = (tx.clone(), stats.clone());
                            async move { Ok::<_, WebSocketError>(route(req, tx, stats)) }
                        });
                        // Errors are per connection (a bad request, a reset).
                        let _ = http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades()
                            .await;
                    });
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    stats.report("fws-broadcast");
    Ok(())
}

/// Answers one request: 101 and a task for a known path, an error status otherwise.
fn route(
    mut req: Request<Incoming>,
    tx: broadcast::Sender<Message>,
    stats: Arc<Stats>,
) -> Response<Empty<Bytes>> {
    let status = |s: StatusCode| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = s;
        r
    };
    let Some(role) = role_of(req.uri().path()) else {
        stats.rejected.fetch_add(1, Relaxed);
        return status(StatusCode::NOT_FOUND);
    };
    if !upgrade::is_upgrade_request(&req) {
        stats.rejected.fetch_add(1, Relaxed);
        return status(StatusCode::UPGRADE_REQUIRED);
    }
    let Ok((response, fut)) = upgrade::upgrade(&mut req) else {
        stats.rejected.fetch_add(1, Relaxed);
        return status(StatusCode::BAD_REQUEST);
    };
    match role {
        Role::Subscriber => {
            // Subscribe before the 101 goes out, so a message published
            // right after the client sees the 101 is not missed.
            let rx = tx.subscribe();
            tokio::spawn(subscriber(fut, rx, stats));
        }
        Role::Publisher => {
            tokio::spawn(publisher(fut, tx, stats));
        }
    }
    response
}

async fn subscriber(
    fut: upgrade::UpgradeFut,
    mut rx: broadcast::Receiver<Message>,
    stats: Arc<Stats>,
) {
    let Ok(ws) = fut.await else {
        stats.rejected.fetch_add(1, Relaxed);
        return;
    };
    stats.subscribers.fetch_add(1, Relaxed);
    let (read, mut write) = ws.split(tokio::io::split);
    // The reader's obligated sends (pong, close reply), owned, to the writer.
    let (answers, mut to_send) = mpsc::channel::<(OpCode, Vec<u8>)>(16);
    let reader = tokio::spawn(async move {
        let mut read = FragmentCollectorRead::new(read);
        loop {
            let answers = answers.clone();
            let mut send = move |f: Frame<'_>| {
                let owned = (f.opcode, f.payload.to_vec());
                let answers = answers.clone();
                async move {
                    answers
                        .send(owned)
                        .await
                        .map_err(|_| WebSocketError::ConnectionClosed)
                }
            };
            match read.read_frame(&mut send).await {
                Ok(f) if f.opcode == OpCode::Close => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok((opcode, payload)) => {
                    let frame = Frame::new(true, opcode, None, Payload::Borrowed(&payload));
                    if write.write_frame(frame).await.is_err() {
                        break;
                    }
                    stats.sent.fetch_add(1, Relaxed);
                }
                Err(RecvError::Lagged(n)) => {
                    stats.lag_events.fetch_add(1, Relaxed);
                    stats.lagged_messages.fetch_add(n, Relaxed);
                }
                Err(RecvError::Closed) => break,
            },
            answer = to_send.recv() => match answer {
                Some((opcode, payload)) => {
                    let frame = Frame::new(true, opcode, None, Payload::Owned(payload));
                    let closing = opcode == OpCode::Close;
                    if write.write_frame(frame).await.is_err() || closing {
                        break;
                    }
                }
                // The reader ended (close, error, end of stream).
                None => break,
            },
        }
    }
    reader.abort();
}

async fn publisher(fut: upgrade::UpgradeFut, tx: broadcast::Sender<Message>, stats: Arc<Stats>) {
    let Ok(ws) = fut.await else {
        stats.rejected.fetch_add(1, Relaxed);
        return;
    };
    stats.publishers.fetch_add(1, Relaxed);
    let (read, mut write) = ws.split(tokio::io::split);
    let mut read = FragmentCollectorRead::new(read);
    let mut answers = Vec::new();
    loop {
        let mut send = |f: Frame<'_>| {
            answers.push((f.opcode, f.payload.to_vec()));
            async { Ok::<(), WebSocketError>(()) }
        };
        let frame = read.read_frame(&mut send).await;
        let more = match frame {
            Ok(f) if matches!(f.opcode, OpCode::Text | OpCode::Binary) => {
                stats.published.fetch_add(1, Relaxed);
                // Err only when nobody is subscribed: the message is dropped.
                let _ = tx.send((f.opcode, Bytes::copy_from_slice(&f.payload)));
                true
            }
            Ok(f) => f.opcode != OpCode::Close,
            Err(_) => false,
        };
        // The read's obligated answers (pong, close reply), before going on or out.
        for (opcode, payload) in answers.drain(..) {
            let _ = write
                .write_frame(Frame::new(true, opcode, None, Payload::Owned(payload)))
                .await;
        }
        if !more {
            break;
        }
    }
}
