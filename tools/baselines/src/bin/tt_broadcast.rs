//! `tt-broadcast`: the idiomatic async baseline for corecast's fan-out
//! benchmarks: tokio (multi-thread runtime) + tokio-tungstenite + one
//! `tokio::sync::broadcast` channel.
//!
//! - `GET /ws?topics=...` (WebSocket): a subscriber. Its task receives from
//!   the broadcast channel and writes each message with `ws.send` (one
//!   flush per message, as most tokio-tungstenite servers do).
//! - `GET /publish/{topic}` (WebSocket): a publisher. Every text or binary
//!   message it sends goes into the broadcast channel as is (same opcode).
//!
//! What it deliberately does not do:
//! - **Topics are ignored**: there is one channel and every subscriber gets
//!   every message. The fan-out benchmark uses a single topic, so a map of
//!   channels would only add a lookup.
//! - No HTTP `POST /publish`, no batching of writes, no backpressure beyond
//!   the channel: a subscriber that falls more than `--capacity` messages
//!   behind is *lagged* (it skips the messages it missed, which are counted
//!   and printed on exit) and keeps going.
//! - No per-message logging, no compression.
//!
//! With `--tls-cert` and `--tls-key` it serves wss:// through tokio-rustls
//! (aws-lc-rs, ALPN `http/1.1`, session tickets), the TLS baseline.
//!
//! Exits on SIGINT (ctrl-c) or SIGTERM, printing its counters.

use baselines::{Role, Stats, role_of};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

/// Idiomatic tokio + tokio-tungstenite broadcast server (fan-out baseline).
#[derive(Debug, Parser)]
#[command(name = "tt-broadcast", version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9201", value_name = "ADDR")]
    listen: SocketAddr,
    /// Runtime worker threads (0 = one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    workers: usize,
    /// Broadcast channel capacity, in messages.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    capacity: usize,
    /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The TLS acceptor for --tls-cert/--tls-key.
fn tls_acceptor(args: &Args) -> std::io::Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(std::io::Error::other)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(std::io::Error::other)?;
    // The suite order corecast's server uses (AES-128-GCM first, chosen
    // by the server): the comparison is of servers, not of suites.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    corecast::server::tls::server_suite_order(&mut provider.cipher_suites);
    let provider = Arc::new(provider);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(std::io::Error::other)?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

fn main() {
    let args = Args::parse();
    baselines::run("tt-broadcast", args.workers, |workers| serve(args, workers));
}

async fn serve(args: Args, workers: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let tls = tls_acceptor(&args)?;
    println!(
        "tt-broadcast listening on {} ({workers} workers, broadcast capacity {})",
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
                    match tls.clone() {
                        None => {
                            tokio::spawn(connection(stream, tx, stats));
                        }
                        Some(acceptor) => {
                            tokio::spawn(async move {
                                match acceptor.accept(stream).await {
                                    Ok(tls) => connection(tls, tx, stats).await,
                                    Err(_) => {
                                        stats.rejected.fetch_add(1, Relaxed);
                                    }
                                }
                            });
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    stats.report("tt-broadcast");
    Ok(())
}

async fn connection<S>(stream: S, tx: broadcast::Sender<Message>, stats: Arc<Stats>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut role = None;
    let mut rx = None;
    // The signature is tungstenite's `Callback`; its error type is large by design.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        role = role_of(req.uri().path());
        match role {
            None => {
                let mut e = ErrorResponse::new(Some("unknown path\n".into()));
                *e.status_mut() = StatusCode::NOT_FOUND;
                Err(e)
            }
            Some(r) => {
                // Subscribe before the 101 goes out, so a message published
                // right after the client sees the 101 is not missed.
                if r == Role::Subscriber {
                    rx = Some(tx.subscribe());
                }
                Ok(resp)
            }
        }
    };
    let ws = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(_) => {
            stats.rejected.fetch_add(1, Relaxed);
            return;
        }
    };
    let (mut sink, mut stream) = ws.split();
    match (role, rx) {
        (Some(Role::Subscriber), Some(mut rx)) => {
            stats.subscribers.fetch_add(1, Relaxed);
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Ok(m) => {
                            if sink.send(m).await.is_err() {
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
                    // tungstenite answers pings and closes itself while
                    // reading; we only notice the end.
                    incoming = stream.next() => match incoming {
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
        }
        (Some(Role::Publisher), _) => {
            stats.publishers.fetch_add(1, Relaxed);
            while let Some(Ok(m)) = stream.next().await {
                match m {
                    Message::Text(_) | Message::Binary(_) => {
                        stats.published.fetch_add(1, Relaxed);
                        // Err only when nobody is subscribed: the message is dropped.
                        let _ = tx.send(m);
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        }
        _ => unreachable!("the callback accepted only known roles"),
    }
    // Flush any queued close reply; errors here only mean the peer is gone.
    let _ = sink.close().await;
}
