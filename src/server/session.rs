//! What a connection *is*, independent of the I/O backend: its phase
//! (request head, open WebSocket, draining), the bytes kept between reads,
//! and its outbound queue. Routing and the endpoints live here.
//!
//! A backend reads into its shared buffer after [`Session::restore_pending`],
//! hands the bytes to [`Session::on_input`], and writes [`Session::out`]. No
//! syscalls here: tests drive sessions with plain byte slices.

use super::config::Config;
use super::stats::WorkerStats;
use crate::proto::frame::server_frame;
use crate::proto::handshake::{
    self, HeadScanner, MAX_HEADERS, Reject, Status, choose_subprotocol, parse_head,
    validate_upgrade, write_switching_protocols,
};
use crate::proto::{CloseState, Event, OutQueue, WsConn};
use bytes::Bytes;
use tracing::debug;

/// The endpoints a WebSocket can be opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Echo every message back with its opcode.
    Echo,
}

/// Maps a request path to an endpoint.
pub fn route(path: &str) -> Option<Endpoint> {
    match path {
        "/echo" => Some(Endpoint::Echo),
        _ => None,
    }
}

#[derive(Debug)]
enum Phase {
    /// Reading the HTTP request head.
    Head(HeadScanner),
    /// An open WebSocket.
    Ws { ws: WsConn, endpoint: Endpoint },
    /// A final HTTP response is queued: write it, then close.
    Refused,
}

/// What the backend should do after [`Session::on_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Read,
    /// Stop reading: flush what is queued, then shut the write side down and
    /// linger until the peer closes (close handshake done, connection failed,
    /// or an HTTP refusal).
    FlushAndClose,
}

/// One connection's state. About 140 bytes, no heap when idle.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// Input not yet consumed: a partial head, frame header or control frame.
    pending: Vec<u8>,
    /// Bytes waiting to be written.
    pub out: OutQueue,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A new connection, waiting for its request head.
    pub fn new() -> Self {
        Self {
            phase: Phase::Head(HeadScanner::default()),
            pending: Vec::new(),
            out: OutQueue::new(),
        }
    }

    /// Has the handshake completed?
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Ws { .. })
    }

    /// Is the connection done reading (after a refusal, failure or close)?
    pub fn next(&self) -> Next {
        match &self.phase {
            Phase::Head(_) => Next::Read,
            Phase::Ws { ws, .. } if ws.close_state() != CloseState::Closed => Next::Read,
            _ => Next::FlushAndClose,
        }
    }

    /// Copies the bytes kept from the previous read to the start of `buf`;
    /// returns how many. The backend reads new bytes after them.
    pub fn restore_pending(&mut self, buf: &mut [u8]) -> usize {
        let n = self.pending.len();
        buf[..n].copy_from_slice(&self.pending);
        n
    }

    /// Processes `buf` (previous pending bytes followed by new ones).
    pub fn on_input(&mut self, buf: &mut [u8], cfg: &Config, stats: &WorkerStats) -> Next {
        let mut pos = 0;
        if let Phase::Head(scanner) = &mut self.phase {
            let Some(end) = scanner.find_end(buf) else {
                if buf.len() > cfg.max_handshake_size {
                    self.refuse(
                        Reject::new(Status::HeadTooLarge, "request head too large"),
                        stats,
                    );
                    return Next::FlushAndClose;
                }
                self.keep(buf, 0);
                return Next::Read;
            };
            if end > cfg.max_handshake_size {
                self.refuse(
                    Reject::new(Status::HeadTooLarge, "request head too large"),
                    stats,
                );
                return Next::FlushAndClose;
            }
            match self.upgrade(&buf[..end], cfg) {
                Ok(endpoint) => {
                    stats.handshake_accepted();
                    self.phase = Phase::Ws {
                        ws: WsConn::new(cfg.max_message_size),
                        endpoint,
                    };
                    pos = end;
                }
                Err(reject) => {
                    self.refuse(reject, stats);
                    return Next::FlushAndClose;
                }
            }
        }
        let Phase::Ws { ws, endpoint } = &mut self.phase else {
            // Refused: whatever else the client sends is ignored.
            self.pending = Vec::new();
            return Next::FlushAndClose;
        };
        loop {
            let decoded = ws.decode(&mut buf[pos..], &mut self.out);
            pos += decoded.consumed;
            // Build the reply while the event still borrows the input, send it after.
            let reply = match decoded.event {
                None => break,
                Some(Event::Message { kind, payload }) => match endpoint {
                    Endpoint::Echo => Some(Bytes::from(server_frame(kind.opcode(), payload))),
                },
                Some(Event::Pong(_)) => None,
                Some(Event::Closed { code }) => {
                    debug!(?code, "peer closed");
                    None
                }
                Some(Event::Failed { code, reason }) => {
                    stats.protocol_error();
                    debug!(code = code.0, reason, "connection failed");
                    None
                }
            };
            if let Some(frame) = reply {
                stats.message_echoed();
                ws.send_frame(frame, &mut self.out);
            }
        }
        let next = self.next();
        self.keep(buf, pos);
        next
    }

    /// Starts the close handshake from the server side (shutdown: 1001).
    /// Returns `false` for a connection that is not an open WebSocket.
    pub fn close(&mut self, code: crate::proto::CloseCode, reason: &str) -> bool {
        match &mut self.phase {
            Phase::Ws { ws, .. } => {
                ws.close(code, reason, &mut self.out);
                true
            }
            _ => false,
        }
    }

    /// Parses, routes and validates a complete request head; on success the
    /// `101` response is queued.
    fn upgrade(&mut self, head: &[u8], cfg: &Config) -> Result<Endpoint, Reject> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse_head(head, &mut headers)?;
        let endpoint = route(req.path).ok_or(Reject::new(Status::NotFound, "no such endpoint"))?;
        let upgrade = validate_upgrade(&req)?;
        let subprotocol = choose_subprotocol(&req, &cfg.subprotocols);
        let mut response = Vec::with_capacity(192);
        write_switching_protocols(&mut response, upgrade.key, subprotocol);
        self.out.push(Bytes::from(response));
        Ok(endpoint)
    }

    /// Keeps `buf[pos..]` for the next read; frees the buffer when nothing is left.
    fn keep(&mut self, buf: &[u8], pos: usize) {
        let rest = &buf[pos..];
        if rest.is_empty() {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
            self.pending.extend_from_slice(rest);
        }
    }

    fn refuse(&mut self, reject: Reject, stats: &WorkerStats) {
        stats.handshake_rejected(reject.status);
        debug!(
            status = reject.status.code(),
            reason = reject.reason,
            "handshake rejected"
        );
        self.out
            .push(Bytes::from(handshake::error_response(reject)));
        self.phase = Phase::Refused;
        self.pending = Vec::new();
    }
}
