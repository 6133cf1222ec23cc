//! One connection's TLS state, sans-IO: the backend hands it ciphertext
//! (from a socket or from a buffer the kernel filled) and takes plaintext
//! for the core; it hands it the queue's plaintext and takes ciphertext
//! for the socket.

use rustls::{ServerConfig, ServerConnection};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

/// Ciphertext a connection may hold that its socket has not taken yet:
/// plaintext is encrypted only while less than this is waiting (rustls'
/// own default). Four 16 KiB records: a flush writes up to this much per
/// system call, and a stalled reader holds at most this much ciphertext
/// besides its plaintext queue.
pub const CIPHERTEXT_LIMIT: usize = 64 * 1024;

/// A queued chunk at least this long is encrypted from a record boundary.
const ALIGN_RECORDS_FROM: usize = 4096;

/// Why a TLS connection was given up (the label of
/// `corecast_tls_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client spoke plain HTTP (or a plain WebSocket handshake) to the
    /// TLS port: answered `400` in plain text.
    PlainHttp,
    /// The TLS handshake failed (a garbage ClientHello, no common version
    /// or cipher, a bad record).
    Handshake,
    /// An established session received something invalid (a bad record,
    /// an oversized one, a renegotiation attempt).
    Protocol,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Self::PlainHttp, Self::Handshake, Self::Protocol];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::PlainHttp => "plain_http",
            Self::Handshake => "handshake",
            Self::Protocol => "protocol",
        }
    }
}

/// What reading ciphertext gave.
#[derive(Debug)]
pub enum Received {
    /// This many bytes of ciphertext were taken and decrypted (plaintext,
    /// if any, is ready in [`TlsConn::read_plain`]).
    Bytes(usize),
    /// The peer closed: TCP EOF, or its `close_notify` alert.
    Closed,
    /// Nothing to read now (`WouldBlock`), or the plaintext not yet taken
    /// fills rustls' buffer (take it first).
    Later,
    /// The session failed; an alert may wait in [`TlsConn::wants_write`].
    Failed(Failure),
    /// The socket failed.
    Error(io::Error),
}

/// The answer to plain HTTP on the TLS port.
pub const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 45\r\nConnection: close\r\n\r\nthis port speaks TLS: use https:// or wss://\n";

/// One connection's TLS session.
pub struct TlsConn {
    conn: ServerConnection,
    /// The first byte the client sent (a TLS record starts with 0x16).
    first: Option<u8>,
    /// The handshake has completed (and was counted).
    established: bool,
    /// Ciphertext read while the handshake was not complete, and how much
    /// may be.
    handshake_read: usize,
    handshake_limit: usize,
    /// What the backend charged to the worker's budget for this session.
    charged: usize,
}

/// Remembers the first byte read through it.
struct FirstByte<'a, R: ?Sized> {
    inner: &'a mut R,
    first: &'a mut Option<u8>,
}

impl<R: Read + ?Sized> Read for FirstByte<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 && self.first.is_none() {
            *self.first = Some(buf[0]);
        }
        Ok(n)
    }
}

impl TlsConn {
    /// A session for a new connection under `config`; its client may send
    /// [`MAX_HANDSHAKE_FLIGHT_BYTES`](super::MAX_HANDSHAKE_FLIGHT_BYTES)
    /// plus `max_head` bytes before its handshake completes.
    pub fn new(config: Arc<ServerConfig>, max_head: usize) -> Result<Self, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(CIPHERTEXT_LIMIT));
        Ok(Self {
            conn,
            first: None,
            established: false,
            handshake_read: 0,
            handshake_limit: super::MAX_HANDSHAKE_FLIGHT_BYTES + max_head,
            charged: 0,
        })
    }

    /// Re-measures what the session holds that the budget should count,
    /// for a backend whose socket takes rustls' ciphertext directly
    /// (epoll): [`CIPHERTEXT_LIMIT`] while ciphertext waits for the socket
    /// (rustls does not say how much; that is its bound), else nothing.
    /// Returns (charged before, charged now).
    pub fn recharge(&mut self) -> (usize, usize) {
        let now = if self.conn.wants_write() {
            CIPHERTEXT_LIMIT
        } else {
            0
        };
        (std::mem::replace(&mut self.charged, now), now)
    }

    /// What [`Self::recharge`] charged last.
    pub fn charged(&self) -> usize {
        self.charged
    }

    /// The handshake has completed.
    pub fn is_established(&self) -> bool {
        self.established || !self.conn.is_handshaking()
    }

    /// Reads ciphertext from `src` (a socket, or `&mut &[u8]` over bytes
    /// already received) and decrypts it.
    pub fn receive(&mut self, src: &mut (impl Read + ?Sized)) -> Received {
        let mut src = FirstByte {
            inner: src,
            first: &mut self.first,
        };
        let n = match self.conn.read_tls(&mut src) {
            Ok(0) => return Received::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Received::Later,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Received::Later,
            // "received plaintext buffer full": the caller takes it first.
            Err(e) if e.kind() == io::ErrorKind::Other => return Received::Later,
            Err(e) => return Received::Error(e),
        };
        if !self.established && self.conn.is_handshaking() {
            self.handshake_read += n;
            if self.handshake_read > self.handshake_limit {
                return Received::Failed(self.failure());
            }
        }
        match self.conn.process_new_packets() {
            Ok(state) => {
                if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
                    return Received::Closed;
                }
                Received::Bytes(n)
            }
            Err(_) => Received::Failed(self.failure()),
        }
    }

    fn failure(&self) -> Failure {
        if self.established {
            Failure::Protocol
        } else if self.first.is_some_and(|b| b.is_ascii_uppercase()) {
            Failure::PlainHttp
        } else {
            Failure::Handshake
        }
    }

    /// The handshake completed since the last call (once per session):
    /// `Some(resumed)`, `resumed` when it resumed an earlier session.
    pub fn just_established(&mut self) -> Option<bool> {
        if self.established || self.conn.is_handshaking() {
            return None;
        }
        self.established = true;
        Some(self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }

    /// Moves decrypted bytes into `buf`; 0 when none is ready.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> usize {
        self.conn.reader().read(buf).unwrap_or(0)
    }

    /// Ciphertext (handshake messages, alerts, records) waits for the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes waiting ciphertext to `dst` (one vectored write).
    pub fn write_to(&mut self, dst: &mut (impl Write + ?Sized)) -> io::Result<usize> {
        struct Dst<'a, W: ?Sized>(&'a mut W);
        impl<W: Write + ?Sized> Write for Dst<'_, W> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.write(b)
            }
            fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
                self.0.write_vectored(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        self.conn.write_tls(&mut Dst(dst))
    }

    /// Application data can be encrypted (the handshake is over).
    pub fn can_encrypt(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// Encrypts from the front of `bufs` into records of up to 16 KiB (many
    /// small frames share one record), as much as [`CIPHERTEXT_LIMIT`]
    /// leaves room for; returns the plaintext bytes taken.
    pub fn encrypt(&mut self, bufs: &[IoSlice<'_>]) -> usize {
        if bufs.is_empty() {
            return 0;
        }
        // A large chunk (a big frame) starts a record of its own; runs of
        // small chunks share records.
        let large = |b: &IoSlice<'_>| b.len() >= ALIGN_RECORDS_FROM;
        let end = match bufs.iter().position(large) {
            Some(0) => 1,
            Some(i) => i,
            None => bufs.len(),
        };
        self.conn.writer().write_vectored(&bufs[..end]).unwrap_or(0)
    }

    /// Queues the `close_notify` alert.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> TlsConn {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        TlsConn::new(Arc::new(config), 8192).unwrap()
    }

    /// Runs of small frames share records; a large frame starts its own,
    /// so a client's frame reader finds it at a record boundary (measured:
    /// the load generator's CPU per 16 KiB frame, docs/BENCHMARKS.md).
    #[test]
    fn a_large_chunk_starts_a_record_and_small_ones_are_coalesced() {
        let mut tls = session();
        let (small, large) = ([1u8; 64], [2u8; ALIGN_RECORDS_FROM]);
        let iov = [
            IoSlice::new(&small),
            IoSlice::new(&small),
            IoSlice::new(&large),
            IoSlice::new(&small),
        ];
        assert_eq!(
            tls.encrypt(&iov),
            128,
            "the small run, up to the large chunk"
        );
        assert_eq!(
            tls.encrypt(&iov[2..]),
            ALIGN_RECORDS_FROM,
            "the large chunk alone"
        );
        assert_eq!(tls.encrypt(&iov[3..]), 64);
        assert_eq!(tls.encrypt(&[]), 0);
    }

    #[test]
    fn the_plain_http_answer_declares_its_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
    }
}
