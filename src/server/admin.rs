//! The optional admin listener (`--admin-listen`): `/metrics` and `/healthz`
//! on their own address, so scrapers and health checks stay off the public
//! port. It runs until the workers have drained (`/healthz` answers `503`
//! `draining` meanwhile). Low traffic by nature: one plain thread accepts,
//! and each connection is served by a thread of its own (one request per
//! connection, 2 s in all), at most [`MAX_CLIENTS`] at once; past that the
//! oldest is cut to make room, so that clients that connect and say
//! nothing cannot hold up a health check (which answers in a millisecond).

use super::Shared;
use super::backend::{ACCEPT_RETRY, is_resource_exhaustion};
use super::http;
use crate::proto::handshake::{self, HeadScanner, MAX_HEADERS, Reject, Status, parse_head};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// How long one admin client may take, in all, to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest admin request head.
const MAX_HEAD: usize = 8 * 1024;
/// Admin connections served at once; past it the oldest is cut.
const MAX_CLIENTS: usize = 64;
/// Stack of a thread serving one admin connection (rendering `/metrics`
/// needs little).
const CLIENT_STACK_BYTES: usize = 256 * 1024;

/// The running admin thread.
pub(crate) struct AdminHandle {
    addr: SocketAddr,
    waker: Waker,
    thread: JoinHandle<()>,
    /// Set by [`AdminHandle::stop`].
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl AdminHandle {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the listener (after the workers: it answers through the
    /// drain, `/healthz` with `503 draining`).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            warn!("admin thread panicked");
        }
    }
}

pub(crate) fn start(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<AdminHandle> {
    let mut listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("corecast-admin".into())
        .spawn(move || run(poll, listener, shared, &stopped))?;
    info!(%addr, "admin listener (metrics, healthz)");
    Ok(AdminHandle {
        addr,
        waker,
        thread,
        stop,
    })
}

fn run(
    mut poll: Poll,
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut events = Events::with_capacity(16);
    // The connections being served, oldest first (a handle to cut each).
    let serving: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, TcpStream)>>> =
        Arc::default();
    let mut next_id = 0u64;
    // Set while out of descriptors: the pending connection stays in the
    // backlog and no new event will announce it, so look again shortly.
    let mut retry = None;
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = poll.poll(&mut events, retry) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!(error = %e, "admin poll failed; admin listener stops");
            return;
        }
        retry = None;
        loop {
            match listener.accept() {
                Ok((sock, _)) => {
                    let fd = std::os::fd::OwnedFd::from(sock);
                    let sock = TcpStream::from(fd);
                    let Ok(handle) = sock.try_clone() else {
                        continue;
                    };
                    let id = next_id;
                    next_id += 1;
                    {
                        let mut list = serving.lock().unwrap_or_else(|e| e.into_inner());
                        if list.len() >= MAX_CLIENTS
                            && let Some((_, oldest)) = list.pop_front()
                        {
                            // Its thread's read or write fails now; it ends.
                            let _ = oldest.shutdown(std::net::Shutdown::Both);
                        }
                        list.push_back((id, handle));
                    }
                    let (shared, done) = (Arc::clone(&shared), Arc::clone(&serving));
                    let spawned = std::thread::Builder::new()
                        .name("corecast-admin-client".into())
                        .stack_size(CLIENT_STACK_BYTES)
                        .spawn(move || {
                            let _ = serve(sock, &shared);
                            let mut list = done.lock().unwrap_or_else(|e| e.into_inner());
                            list.retain(|(i, _)| *i != id);
                        });
                    if spawned.is_err() {
                        // No thread (out of memory or threads): the
                        // connection, moved into it, was closed.
                        let mut list = serving.lock().unwrap_or_else(|e| e.into_inner());
                        list.retain(|(i, _)| *i != id);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if is_resource_exhaustion(e.raw_os_error().unwrap_or(0)) {
                        retry = Some(ACCEPT_RETRY);
                    }
                    warn!(error = %e, "admin accept failed");
                    break;
                }
            }
        }
    }
}

/// `POST /disconnect?sub=NAME`: every connection whose token names `sub`
/// NAME is closed with 3003 by its worker within a second (only here, on
/// the admin listener). A token still valid may connect again: rotate the
/// key, or issue short-lived tokens, to keep a user out.
fn disconnect(req: &handshake::Request<'_, '_>, shared: &Shared) -> Vec<u8> {
    if req.method != "POST" {
        return handshake::error_response(Reject::method("use POST", "POST"));
    }
    if req.has_body() {
        // Not read: refused, as on the main port, rather than taken
        // with its body unread.
        return handshake::error_response(Reject::new(
            Status::BadRequest,
            "POST /disconnect takes no body (name the user in ?sub=)",
        ));
    }
    if shared.auth.is_none() {
        return handshake::error_response(Reject::new(
            Status::NotFound,
            "no tokens in use (--jwt-key, --jwks): no sub to disconnect",
        ));
    }
    if crate::pubsub::topic::repeated_param(req.query, &["sub"]).is_some() {
        return handshake::error_response(Reject::new(
            Status::BadRequest,
            "duplicate query parameter: sub (disconnect one at a time)",
        ));
    }
    // Any escape is decoded (a `sub` may be any string): `%C3%A9` is "é".
    let Some(sub) = crate::pubsub::topic::query_param(req.query, "sub")
        .and_then(crate::pubsub::topic::percent_decode_utf8)
        .filter(|s| !s.is_empty() && s.len() <= super::MAX_REVOKED_SUB)
    else {
        return handshake::error_response(Reject::new(
            Status::BadRequest,
            "name the user: ?sub=NAME (1 to 256 bytes of UTF-8, percent-encoded)",
        ));
    };
    if !shared.revoke(&sub) {
        return handshake::error_response(Reject::new(
            Status::ServiceUnavailable,
            "too many disconnections in the last seconds: try again",
        ));
    }
    info!(%sub, "disconnecting the connections of a sub");
    let body = format!("disconnecting the connections of sub {sub:?}\n");
    format!(
        "HTTP/1.1 202 Accepted\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers one request, then closes.
fn serve(mut sock: TcpStream, shared: &Shared) -> io::Result<()> {
    sock.set_nonblocking(false)?;
    // One deadline for the whole request, not per read: a client trickling
    // a byte at a time cannot hold the admin thread past it.
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    sock.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let mut scanner = HeadScanner::default();
    let end = loop {
        if let Some(end) = scanner.find_end(&buf[..len]) {
            break Some(end);
        }
        if handshake::refutes_head(&buf[..len], MAX_HEAD) {
            // Not HTTP (a TLS ClientHello, binary junk): answered now, as
            // on the main port, not closed silently at the deadline.
            let reject = Reject::new(Status::BadRequest, "malformed request head");
            return sock.write_all(&handshake::error_response(reject));
        }
        if len == buf.len() {
            break None;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        sock.set_read_timeout(Some(left))?;
        let n = sock.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    };
    let response = match end {
        None => {
            handshake::error_response(Reject::new(Status::HeadTooLarge, "request head too large"))
        }
        Some(end) => respond(&buf[..end], shared),
    };
    sock.write_all(&response)
}

fn respond(head: &[u8], shared: &Shared) -> Vec<u8> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let req = match parse_head(head, &mut headers) {
        Ok(r) => r,
        Err(reject) => return handshake::error_response(reject),
    };
    if req.version == 1
        && let Err(reject) = handshake::check_host(&req)
    {
        return handshake::error_response(reject);
    }
    if req.path == "/disconnect" {
        return disconnect(&req, shared);
    }
    match http::admin_response(&req, false, shared.health(), None, || {
        http::render_metrics(shared)
    }) {
        Some(Ok(r)) => [r.head, r.body.to_vec()].concat(),
        Some(Err(reject)) => handshake::error_response(reject),
        None => handshake::error_response(Reject::new(Status::NotFound, "no such endpoint")),
    }
}
