//! One connection's TLS state, sans-IO, over rustls' unbuffered API: the
//! backend hands it ciphertext (bytes a socket read or the kernel placed in
//! a buffer) and takes plaintext for the core; it hands it the queue's
//! plaintext and takes ciphertext for the socket, in a [`Wire`] the backend
//! owns. rustls holds no buffer of its own here; every byte this module
//! buffers is in a `Vec` that is freed when empty and counted by
//! [`TlsConn::held`] for the worker's budget.
//!
//! Once a TLS 1.3 handshake is over, the session leaves rustls: its
//! traffic keys go to [`Records`] (`record.rs`), and rustls' connection,
//! state machine and key schedule are dropped, so an idle session is two
//! AEAD keys and rustls' `KernelConnection` (for key updates). TLS 1.2
//! sessions stay with rustls to the end.

use super::record::{self, Opened, Records};
use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
use std::cell::RefCell;
use std::io::IoSlice;
use std::sync::Arc;

/// Ciphertext a connection may hold that its socket has not taken yet:
/// plaintext is encrypted only while less than this waits. Four 16 KiB
/// records: a flush writes up to this much per system call, and a stalled
/// reader holds at most this much ciphertext besides its plaintext queue.
pub const CIPHERTEXT_LIMIT: usize = 64 * 1024;

/// A queued chunk at least this long is encrypted from a record boundary.
const ALIGN_RECORDS_FROM: usize = 4096;

/// The largest plaintext of one TLS record.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

/// Room reserved per record for its header, content type, padding and tag
/// (TLS 1.3: 22 bytes; TLS 1.2 GCM: 29), and once per call for a key
/// update rustls may write first; a short guess is corrected by rustls'
/// `InsufficientSize` answer.
const RECORD_OVERHEAD: usize = 64;

/// Unprocessed ciphertext an established session may hold: a partial
/// record, or the fragments of a post-handshake message (a key update is a
/// few bytes; nothing legitimate spans two full records).
const INCOMING_LIMIT: usize = 2 * (MAX_RECORD_PLAINTEXT + 2048 + 5);

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

/// The answer to plain HTTP on the TLS port.
pub const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 45\r\nConnection: close\r\n\r\nthis port speaks TLS: use https:// or wss://\n";

/// Freed [`Wire`] buffers a worker thread keeps for its next busy
/// connections: a burst to thousands of subscribers frees and takes a
/// buffer per flush, and a fresh one would be allocated, zeroed and (once
/// the allocator has returned the pages) faulted in again each time
/// (measured: 1.6× the server CPU per 16 KiB frame on epoll). At most
/// this many, each at most [`POOLED_WIRE_MAX_BYTES`]: ≤ 4 MiB per worker.
const POOLED_WIRES: usize = 32;
const POOLED_WIRE_MAX_BYTES: usize = 128 * 1024;

thread_local! {
    static WIRES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Ciphertext waiting for the socket: `buf[sent..filled]`. The buffer's
/// length is a high-water mark (filling it again zeroes nothing); [`free`]
/// gives it back to the thread's pool, so an idle connection holds none.
///
/// [`free`]: Wire::free
#[derive(Default)]
pub struct Wire {
    buf: Vec<u8>,
    filled: usize,
    sent: usize,
}

impl Wire {
    /// The bytes not yet sent.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.sent..self.filled]
    }

    pub fn is_empty(&self) -> bool {
        self.sent == self.filled
    }

    /// Bytes not yet sent.
    pub fn len(&self) -> usize {
        self.filled - self.sent
    }

    /// What the buffer holds allocated (the budget's charge).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// `n` bytes of [`Self::pending`] were sent.
    pub fn consume(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.filled);
        if self.sent == self.filled {
            self.sent = 0;
            self.filled = 0;
        }
    }

    /// Gives the buffer back (nothing may be pending): to the thread's
    /// pool, or to the allocator.
    pub fn free(&mut self) {
        *self = Self::default();
    }

    /// Takes the buffer (nothing may be pending, and no send may be
    /// reading it), leaving the wire without one.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        debug_assert!(self.is_empty());
        let buf = std::mem::take(&mut self.buf);
        *self = Self::default();
        buf
    }

    /// Gives an empty wire `buf` to fill (its length a high-water mark:
    /// filling it again zeroes nothing).
    pub fn adopt(&mut self, buf: Vec<u8>) {
        debug_assert!(self.buf.capacity() == 0 && self.is_empty());
        *self = Self {
            buf,
            filled: 0,
            sent: 0,
        };
    }

    /// Appends `bytes`.
    pub fn extend(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        self.room(n)[..n].copy_from_slice(bytes);
        self.filled += n;
    }

    /// At least `n` writable bytes after the pending ones.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.buf.is_empty()
            && let Ok(Some(pooled)) = WIRES.try_with(|pool| pool.borrow_mut().pop())
        {
            self.buf = pooled;
        }
        if self.buf.len() < self.filled + n {
            self.buf.resize(self.filled + n, 0);
        }
        &mut self.buf[self.filled..]
    }
}

/// Who protects the session's records.
enum Session {
    /// rustls: the handshake, and TLS 1.2 sessions throughout.
    Rustls(Box<UnbufferedServerConnection>),
    /// An established TLS 1.3 session: our record layer.
    Own(Box<Records>),
    /// Neither: the hand-over failed (the session failed with it).
    Gone,
}

/// One connection's TLS session.
pub struct TlsConn {
    session: Session,
    /// The handshake resumed an earlier session (known once established).
    resumed: bool,
    /// Ciphertext received and not processed yet: a partial record, or
    /// fragments of a handshake message (empty and unallocated otherwise).
    incoming: Vec<u8>,
    /// Decrypted bytes the backend has not taken: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext rustls produced on its own (handshake flights, tickets,
    /// alerts) that no [`Wire`] has taken yet.
    pending: Wire,
    /// The first byte the client sent (a TLS record starts with 0x16).
    first: Option<u8>,
    /// The handshake has completed (and was counted).
    established: bool,
    /// The client sent its `close_notify`.
    peer_closed: bool,
    /// Our `close_notify` was queued: nothing more is encrypted.
    sent_close: bool,
    /// The session failed; nothing more is processed.
    failed: bool,
    /// Ciphertext read while the handshake was not complete, and how much
    /// may be.
    handshake_read: usize,
    handshake_limit: usize,
    /// rustls has produced a flight (the ServerHello, say): from then on
    /// only rustls may speak, under the keys it agreed.
    spoke: bool,
    /// Bytes at the front of `incoming` rustls was given and kept (a
    /// handshake message going on in the next record): it must be given
    /// them again, and more, never fewer (it tracks its progress in them).
    rustls_seen: usize,
}

/// A fatal `internal_error` alert in a plaintext record (before any keys):
/// what a client whose handshake passes the bound we hold is sent.
const PLAIN_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80];

/// A fatal `record_overflow` alert in a plaintext record (before any
/// keys): what a client that sends a record over 2^14 + 256 bytes before
/// the server's flight is sent (RFC 8446 §5.1, §5.2).
const PLAIN_RECORD_OVERFLOW: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 22];

/// Where one run of rustls' state machine stopped.
enum Stop {
    /// Every complete record was processed; application data may be sent.
    Ready,
    /// The handshake needs more input.
    Blocked,
    /// The peer sent `close_notify`.
    PeerClosed,
    Failed,
    /// A record longer than any a client may send, seen on its header
    /// during the handshake (rustls was not given it).
    Overflow,
}

thread_local! {
    /// Application data is encrypted through this: small chunks are copied
    /// here to share a record.
    static STAGE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(MAX_RECORD_PLAINTEXT));
}

impl Drop for Wire {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() || buf.capacity() > POOLED_WIRE_MAX_BYTES {
            return;
        }
        // During the thread's exit the pool may be gone: then freed.
        let _ = WIRES.try_with(move |pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOLED_WIRES {
                pool.push(buf);
            }
        });
    }
}

impl Wire {
    /// `n` bytes were written into [`Self::room`].
    fn commit(&mut self, n: usize) {
        self.filled += n;
    }
}

/// Writes into `sink` through `put`, which answers the bytes it wrote, or
/// `Err(Some(n))` when it needs `n` bytes of room (given them, it is asked
/// again), or `Err(None)` when it refuses. rustls' encoders all work so.
fn fill(
    sink: &mut Wire,
    mut want: usize,
    mut put: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> bool {
    loop {
        match put(sink.room(want)) {
            Ok(n) => {
                sink.commit(n);
                return true;
            }
            Err(Some(required)) if required > want => want = required,
            Err(_) => return false,
        }
    }
}

/// The room an encryption asked for, if that is why it failed.
fn room_asked(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// Encodes a handshake record (or alert) rustls queued into `sink`.
fn encode(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, ServerConnectionData>,
    sink: &mut Wire,
) -> bool {
    fill(sink, 1024, |room| match e.encode(room) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
        Err(EncodeError::AlreadyEncoded) => Ok(0),
    })
}

/// Encrypts `data` (split into records of up to 16 KiB) into `sink`.
fn seal(w: &mut WriteTraffic<'_, ServerConnectionData>, data: &[u8], sink: &mut Wire) -> bool {
    let records = data.len() / MAX_RECORD_PLAINTEXT + 1;
    let want = data.len() + (records + 1) * RECORD_OVERHEAD;
    fill(sink, want, |room| w.encrypt(data, room).map_err(room_asked))
}

/// Encrypts from the front of `bufs` into `sink` while it holds less than
/// `limit`: runs of small chunks (frames) are copied to share records, a
/// large chunk is encrypted from its own bytes and starts a record (a
/// client's frame reader finds it at a record boundary). `seal` seals one
/// slice (rustls' or our record layer). Returns the plaintext bytes taken,
/// `None` if `seal` refused (keys exhausted).
fn seal_queue(
    seal: &mut dyn FnMut(&[u8], &mut Wire) -> bool,
    bufs: &[IoSlice<'_>],
    sink: &mut Wire,
    limit: usize,
) -> Option<usize> {
    let large = |b: &IoSlice<'_>| b.len() >= ALIGN_RECORDS_FROM;
    let (mut i, mut off, mut taken) = (0, 0, 0);
    while i < bufs.len() && sink.len() < limit {
        if large(&bufs[i]) {
            let rest = &bufs[i][off..];
            let records = ((limit - sink.len()) / (MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD)).max(1);
            let n = rest.len().min(records * MAX_RECORD_PLAINTEXT);
            if !seal(&rest[..n], sink) {
                return None;
            }
            taken += n;
            off += n;
            if off == bufs[i].len() {
                (i, off) = (i + 1, 0);
            }
            continue;
        }
        if bufs.get(i + 1).is_none_or(large) {
            // A small chunk alone (the last, or before a large one): its
            // record is sealed from its own bytes, no copy to the stage.
            let rest = &bufs[i][off..];
            if !seal(rest, sink) {
                return None;
            }
            taken += rest.len();
            (i, off) = (i + 1, 0);
            continue;
        }
        let sealed = STAGE.with_borrow_mut(|stage| {
            stage.clear();
            while i < bufs.len() && !large(&bufs[i]) && stage.len() < MAX_RECORD_PLAINTEXT {
                let rest = &bufs[i][off..];
                let n = rest.len().min(MAX_RECORD_PLAINTEXT - stage.len());
                stage.extend_from_slice(&rest[..n]);
                off += n;
                if off == bufs[i].len() {
                    (i, off) = (i + 1, 0);
                }
            }
            taken += stage.len();
            stage.is_empty() || seal(stage, sink)
        });
        if !sealed {
            return None;
        }
    }
    Some(taken)
}

/// What runs when rustls can take application data.
type Writer<'a> = dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Wire) -> bool + 'a;

/// The end of the record that starts at `buf[from..]`, or `buf.len()` if
/// it is not all there; `None` if its header says it is longer than any
/// record a client may send (2^14 + 256 bytes, RFC 8446 §5.2; no suite we
/// offer, TLS 1.2's included, expands a record by more), refused on the
/// header instead of waiting for the rest.
fn record_end(buf: &[u8], from: usize) -> Option<usize> {
    let Some(h) = buf.get(from..from + record::HEADER) else {
        return Some(buf.len());
    };
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    (len <= record::MAX_CIPHERTEXT).then(|| (from + record::HEADER + len).min(buf.len()))
}

/// The session's handshake is over and it goes to our record layer: rustls
/// must not see a record after the one that ended the handshake (it would
/// keep state of its own for it: a key update's answer, a fragment).
fn handing_over(conn: &UnbufferedServerConnection) -> bool {
    !conn.is_handshaking()
        && conn
            .negotiated_cipher_suite()
            .is_some_and(Records::supports)
}

/// Runs rustls' state machine over the ciphertext in `buf` until every
/// complete record is processed (or it needs more input, or fails):
/// ciphertext it produces goes to `sink` in order, decrypted application
/// data to `plain`, and `write` runs at the point where application data
/// may be sent. While the handshake runs, rustls gets one record at a
/// time, so that a session handed over to our record layer stops right
/// after the record that ended it (what follows stays in `buf`). `seen`:
/// the bytes at the front of `buf` rustls was given and kept in an earlier
/// call (given again, never fewer); on return, those of what is left.
/// Returns the bytes of `buf` consumed and where it stopped.
fn run(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    seen: &mut usize,
    plain: &mut Vec<u8>,
    sink: &mut Wire,
    write: &mut Writer<'_>,
) -> (usize, Stop) {
    let (at, stop, given) = run_given(conn, buf, *seen, plain, sink, write);
    *seen = given.saturating_sub(at);
    (at, stop)
}

/// [`run`], returning also how far into `buf` rustls was given bytes.
fn run_given(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    seen: usize,
    plain: &mut Vec<u8>,
    sink: &mut Wire,
    write: &mut Writer<'_>,
) -> (usize, Stop, usize) {
    let (mut at, mut closed) = (0, false);
    let mut end = seen.min(buf.len());
    if conn.is_handshaking() {
        // What rustls kept may end inside a record (a partial one): `end`
        // goes on to that record's end, so that it is always a record
        // boundary (or the end of `buf`) and the next header read is one.
        end = 0;
        while end < seen.min(buf.len()) {
            let Some(e) = record_end(buf, end) else {
                return (0, Stop::Overflow, seen);
            };
            end = e;
        }
    }
    let mut given = end;
    loop {
        let limit = if conn.is_handshaking() {
            if end <= at {
                let Some(e) = record_end(buf, at) else {
                    return (at, Stop::Overflow, given);
                };
                end = e;
            }
            end
        } else if handing_over(conn) {
            end.max(at)
        } else {
            buf.len()
        };
        let total = buf.len();
        given = given.max(limit);
        let mut grow = false;
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut buf[at..limit]);
        let mut extra = 0;
        let stop = match state {
            Err(_) => Some(Stop::Failed),
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut stop = None;
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => {
                            extra += record.discard;
                            plain.extend_from_slice(record.payload);
                        }
                        Err(_) => {
                            stop = Some(Stop::Failed);
                            break;
                        }
                    }
                }
                stop
            }
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                (!encode(&mut e, sink)).then_some(Stop::Failed)
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // What was encoded stays in `sink`, in order, until the
                // backend sends it.
                t.done();
                None
            }
            // More records wait: the next one; if rustls kept what it was
            // given (a handshake message that goes on in the next record),
            // that one as well.
            Ok(ConnectionState::BlockedHandshake) if limit < total => {
                grow = discard == 0;
                None
            }
            Ok(ConnectionState::BlockedHandshake) => Some(Stop::Blocked),
            Ok(ConnectionState::WriteTraffic(mut w)) => Some(if write(&mut w, sink) {
                Stop::Ready
            } else {
                Stop::Failed
            }),
            Ok(ConnectionState::PeerClosed) => {
                closed = true;
                None
            }
            Ok(ConnectionState::Closed) => Some(Stop::PeerClosed),
            // Early data (0-RTT is off) or a state this version does not know.
            Ok(_) => Some(Stop::Failed),
        };
        at = (at + discard + extra).min(buf.len());
        if grow {
            let Some(e) = record_end(buf, limit) else {
                return (at, Stop::Overflow, given);
            };
            end = e;
        }
        match stop {
            None => {}
            Some(Stop::Failed) => {
                alert(conn, sink);
                return (at, Stop::Failed, given);
            }
            Some(_) if closed => return (at, Stop::PeerClosed, given),
            Some(stop) => return (at, stop, given),
        }
    }
}

/// After a failure: the alert rustls queued, if any, into `sink`. The
/// input that failed is not given again (rustls would deframe it again);
/// what is queued comes out before any input is looked at.
fn alert(conn: &mut UnbufferedServerConnection, sink: &mut Wire) {
    for _ in 0..4 {
        if !conn.wants_write() {
            return;
        }
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                if !encode(&mut e, sink) {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Seals `data` with our record layer into `sink`.
fn seal_own(records: &mut Records, data: &[u8], sink: &mut Wire) -> bool {
    let want = data.len() + Records::overhead(data.len());
    fill(sink, want, |room| {
        records.seal(data, room).map_err(|_| None)
    })
}

/// Seals alert `description` with our record layer into `sink`.
fn alert_own(records: &mut Records, description: u8, sink: &mut Wire) {
    fill(sink, Records::overhead(2) + 2, |room| {
        records.seal_alert(description, room).map_err(|_| None)
    });
}

/// Opens every complete record at the front of `buf` with our record
/// layer: application data to `plain`; stops after the client's
/// `close_notify` (setting `closed`; what follows it is ignored). Returns
/// the bytes consumed (a partial record stays).
fn open_all(
    records: &mut Records,
    buf: &mut [u8],
    plain: &mut Vec<u8>,
    closed: &mut bool,
) -> Result<usize, record::Fatal> {
    let mut at = 0;
    while let Some(len) = Records::complete(&buf[at..])? {
        let one = &mut buf[at..at + len];
        match records.open(one)? {
            Opened::Data(range) => plain.extend_from_slice(&one[range]),
            Opened::Nothing => {}
            Opened::Closed => {
                *closed = true;
                return Ok(buf.len());
            }
        }
        at += len;
    }
    Ok(at)
}

impl TlsConn {
    /// A session for a new connection under `config`; its client may send
    /// [`MAX_HANDSHAKE_FLIGHT_BYTES`](super::MAX_HANDSHAKE_FLIGHT_BYTES)
    /// plus `max_head` bytes before its handshake completes.
    pub fn new(config: Arc<ServerConfig>, max_head: usize) -> Result<Self, rustls::Error> {
        Ok(Self {
            session: Session::Rustls(Box::new(UnbufferedServerConnection::new(config)?)),
            resumed: false,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            pending: Wire::default(),
            first: None,
            established: false,
            peer_closed: false,
            sent_close: false,
            failed: false,
            handshake_read: 0,
            handshake_limit: super::MAX_HANDSHAKE_FLIGHT_BYTES + max_head,
            spoke: false,
            rustls_seen: 0,
        })
    }

    /// Bytes this session holds in its buffers (its keys and state aside):
    /// what the worker's budget is charged for it. Zero while idle.
    pub fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.pending.capacity()
    }

    /// The handshake has completed.
    pub fn is_established(&self) -> bool {
        self.established
            || match &self.session {
                Session::Rustls(conn) => !conn.is_handshaking(),
                Session::Own(_) | Session::Gone => true,
            }
    }

    /// Our record layer protects the session (a TLS 1.3 session after its
    /// handshake).
    pub fn is_own_records(&self) -> bool {
        matches!(self.session, Session::Own(_))
    }

    /// Processes ciphertext the client sent: decrypted bytes wait for
    /// [`Self::read_plain`], ciphertext to send (handshake flights,
    /// tickets, alerts) for [`Self::take_pending`]. `data` is decrypted in
    /// place (scratch afterwards); a partial record is kept. On failure, an
    /// alert may wait in [`Self::take_pending`].
    pub fn receive(&mut self, data: &mut [u8]) -> Result<(), Failure> {
        if self.failed {
            return Err(self.failure());
        }
        if self.first.is_none() {
            self.first = data.first().copied();
        }
        // Counted against the handshake's bound only if the handshake is
        // still not complete once `data` is processed: what a client sends
        // right after its Finished, in the same flight (a request body
        // written before the handshake completed), is not handshake.
        let received = data.len();
        let result = self.receive_any(data);
        self.spoke |= !self.pending.is_empty();
        if result.is_ok() && !self.is_established() {
            self.handshake_read += received;
            if self.handshake_read > self.handshake_limit {
                // Nothing of it is kept. A client refused before we said
                // anything (a ClientHello past the bound) is told so in
                // the clear, as no keys are in use yet (RFC 8446 §6: a
                // failure gets an alert; whether the whole hello came in
                // one read, and was taken, is up to the network).
                self.incoming = Vec::new();
                self.plain = Vec::new();
                self.plain_at = 0;
                if !self.spoke {
                    self.pending.extend(&PLAIN_INTERNAL_ERROR);
                }
                return Err(self.fail());
            }
        }
        result
    }

    fn receive_any(&mut self, data: &mut [u8]) -> Result<(), Failure> {
        if self.plain_at > 0 {
            self.plain.drain(..self.plain_at);
            self.plain_at = 0;
        }
        if self.is_own_records() {
            return self.receive_own(data);
        }
        let Self {
            session,
            incoming,
            plain,
            pending,
            rustls_seen,
            ..
        } = self;
        let Session::Rustls(conn) = session else {
            return Err(Failure::Protocol);
        };
        let mut nothing = |_: &mut WriteTraffic<'_, ServerConnectionData>, _: &mut Wire| true;
        let stop = if incoming.is_empty() {
            // Nothing kept: rustls has seen none of `data`.
            *rustls_seen = 0;
            let (used, stop) = run(conn, data, rustls_seen, plain, pending, &mut nothing);
            incoming.extend_from_slice(&data[used..]);
            stop
        } else {
            incoming.extend_from_slice(data);
            let (used, stop) = run(conn, incoming, rustls_seen, plain, pending, &mut nothing);
            incoming.drain(..used);
            stop
        };
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        match stop {
            Stop::Failed => Err(self.fail()),
            Stop::Overflow => {
                // rustls answers `decode_error`, on the header only from
                // 2^14 + 2 048 bytes (TLS 1.2's bound), below it once the
                // whole record is read (RFC 8446 §5.1 asks for
                // `record_overflow`). Told so in the clear if
                // we have not spoken yet; after the server's flight only
                // rustls' keys may speak, and the session closes without
                // an alert (RFC 8446 §6.2: an alert SHOULD be sent).
                if !self.spoke && self.pending.is_empty() {
                    self.pending.extend(&PLAIN_RECORD_OVERFLOW);
                }
                Err(self.fail())
            }
            Stop::PeerClosed => {
                self.peer_closed = true;
                Ok(())
            }
            Stop::Ready | Stop::Blocked => {
                if matches!(stop, Stop::Ready) {
                    self.hand_over()?;
                    if self.is_own_records() {
                        // What the client sent after its Finished, in the
                        // same read, is ours to open now.
                        return self.receive_own(&mut []);
                    }
                }
                if self.is_established() && self.incoming.len() > INCOMING_LIMIT {
                    return Err(self.fail());
                }
                Ok(())
            }
        }
    }

    /// An established TLS 1.3 session leaves rustls for our record layer
    /// (at the point where rustls would take application data: every
    /// record it had was processed and nothing of its own waits).
    fn hand_over(&mut self) -> Result<(), Failure> {
        let Session::Rustls(conn) = &self.session else {
            return Ok(());
        };
        if !handing_over(conn) {
            return Ok(());
        }
        self.resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let Session::Rustls(conn) = std::mem::replace(&mut self.session, Session::Gone) else {
            return Ok(());
        };
        match conn.dangerous_into_kernel_connection() {
            Ok((secrets, kernel)) => match Records::new(secrets, kernel) {
                Ok(records) => {
                    self.session = Session::Own(Box::new(records));
                    Ok(())
                }
                Err(_) => Err(self.fail()),
            },
            Err(_) => Err(self.fail()),
        }
    }

    /// [`Self::receive`] once our record layer has the session.
    fn receive_own(&mut self, data: &mut [u8]) -> Result<(), Failure> {
        if self.peer_closed {
            return Ok(());
        }
        let Self {
            session,
            incoming,
            plain,
            pending,
            peer_closed,
            ..
        } = self;
        let Session::Own(records) = session else {
            return Err(Failure::Protocol);
        };
        let opened = if incoming.is_empty() {
            open_all(records, data, plain, peer_closed).map(|used| {
                incoming.extend_from_slice(&data[used..]);
            })
        } else {
            incoming.extend_from_slice(data);
            open_all(records, incoming, plain, peer_closed).map(|used| {
                incoming.drain(..used);
            })
        };
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        match opened {
            Ok(()) => Ok(()),
            Err(fatal) => {
                if let Some(description) = fatal.alert() {
                    alert_own(records, description, pending);
                }
                Err(self.fail())
            }
        }
    }

    /// Marks the session failed and frees what it buffered (a queued alert
    /// stays for [`Self::take_pending`]).
    fn fail(&mut self) -> Failure {
        self.failed = true;
        self.incoming = Vec::new();
        self.rustls_seen = 0;
        self.plain = Vec::new();
        self.plain_at = 0;
        self.failure()
    }

    fn failure(&self) -> Failure {
        if self.is_established() {
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
        if self.established || !self.is_established() {
            return None;
        }
        self.established = true;
        Some(match &self.session {
            Session::Rustls(conn) => conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            Session::Own(_) | Session::Gone => self.resumed,
        })
    }

    /// Moves decrypted bytes into `buf`; 0 when none is ready.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> usize {
        let ready = &self.plain[self.plain_at..];
        let n = ready.len().min(buf.len());
        buf[..n].copy_from_slice(&ready[..n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        n
    }

    /// The client sent its `close_notify` and every byte before it was
    /// taken.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed && self.plain_at == self.plain.len()
    }

    /// Ciphertext rustls produced on its own waits for a [`Wire`].
    pub fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Appends the ciphertext rustls produced on its own (handshake
    /// flights, tickets, alerts) to `wire`.
    pub fn take_pending(&mut self, wire: &mut Wire) {
        if !self.pending.is_empty() {
            wire.extend(self.pending.pending());
            self.pending.free();
        }
    }

    /// Why the session failed, if it did (see [`Self::failed`]).
    pub fn failure_kind(&self) -> Option<Failure> {
        self.failed.then(|| self.failure())
    }

    /// The session failed (bad input, or rustls refused to encrypt more:
    /// a TLS 1.2 session's keys used up); its last ciphertext (an alert,
    /// `close_notify`) may wait in [`Self::take_pending`] or was sealed
    /// into the caller's [`Wire`].
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Application data can be encrypted (the handshake is over).
    pub fn can_encrypt(&self) -> bool {
        !self.failed
            && !self.sent_close
            && match &self.session {
                Session::Rustls(conn) => !conn.is_handshaking(),
                Session::Own(_) => true,
                Session::Gone => false,
            }
    }

    /// Encrypts from the front of `bufs` into `wire` (after what rustls
    /// queued on its own), in records of up to 16 KiB, many small frames
    /// to a record, while `wire` holds less than `limit`; returns the
    /// plaintext bytes taken.
    pub fn encrypt(&mut self, bufs: &[IoSlice<'_>], wire: &mut Wire, limit: usize) -> usize {
        self.take_pending(wire);
        if bufs.is_empty() || !self.can_encrypt() || wire.len() >= limit {
            return 0;
        }
        if let Session::Own(records) = &mut self.session {
            let mut sealer = |data: &[u8], sink: &mut Wire| seal_own(records, data, sink);
            return match seal_queue(&mut sealer, bufs, wire, limit) {
                Some(taken) => taken,
                None => {
                    self.fail();
                    0
                }
            };
        }
        let mut taken = None;
        let mut write = |w: &mut WriteTraffic<'_, ServerConnectionData>, sink: &mut Wire| {
            let mut sealer = |data: &[u8], sink: &mut Wire| seal(w, data, sink);
            taken = seal_queue(&mut sealer, bufs, sink, limit);
            taken.is_some()
        };
        if matches!(
            self.at_write_point(Some(wire), &mut write),
            Stop::Failed | Stop::Overflow
        ) {
            self.fail();
            return 0;
        }
        taken.unwrap_or(0)
    }

    /// Runs rustls over the unprocessed input up to the point where it
    /// takes application data (every complete record was processed when
    /// it arrived, so none is here) and calls `write` there; output goes to
    /// `sink`, or to `pending` without one.
    fn at_write_point(&mut self, sink: Option<&mut Wire>, write: &mut Writer<'_>) -> Stop {
        let Self {
            session,
            incoming,
            plain,
            pending,
            rustls_seen,
            ..
        } = self;
        let Session::Rustls(conn) = session else {
            return Stop::Failed;
        };
        let sink = sink.unwrap_or(pending);
        let (used, stop) = run(conn, incoming, rustls_seen, plain, sink, write);
        incoming.drain(..used);
        stop
    }

    /// A sweep period ended (the worker's periodic sweep): an established
    /// TLS 1.3 session not busy in it lets its AEAD contexts go.
    pub fn sweep(&mut self) {
        if let Session::Own(records) = &mut self.session {
            records.sweep();
        }
    }

    /// Whether our record layer's (receive, send) AEAD contexts are built.
    #[cfg(test)]
    fn built(&self) -> Option<(bool, bool)> {
        match &self.session {
            Session::Own(records) => Some(records.built()),
            _ => None,
        }
    }

    /// Queues the `close_notify` alert for [`Self::take_pending`].
    pub fn close(&mut self) {
        if !self.can_encrypt() {
            return;
        }
        self.sent_close = true;
        if let Session::Own(records) = &mut self.session {
            alert_own(records, 0, &mut self.pending);
            return;
        }
        let mut write = |w: &mut WriteTraffic<'_, ServerConnectionData>, sink: &mut Wire| {
            fill(sink, RECORD_OVERHEAD, |room| {
                w.queue_close_notify(room).map_err(room_asked)
            })
        };
        self.at_write_point(None, &mut write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_with(rustls::DEFAULT_VERSIONS)
    }

    /// The client offers `versions`, and its keys can be taken out (to
    /// write records a rustls client would not).
    fn configs_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        // As `tls::load` sets it: TLS 1.3 sessions move to `record.rs`.
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// A server session and an independent (buffered) rustls client,
    /// connected in memory.
    struct Pair {
        server: TlsConn,
        client: rustls::ClientConnection,
        wire: Wire,
        /// What the client decrypted.
        got: Vec<u8>,
    }

    impl Pair {
        /// A TLS 1.3 session: past its handshake, our record layer has it.
        fn new() -> Self {
            let pair = Self::with(configs());
            assert!(pair.server.is_own_records(), "TLS 1.3 leaves rustls");
            pair
        }

        fn with((server, client): (Arc<ServerConfig>, Arc<rustls::ClientConfig>)) -> Self {
            let mut pair = Pair {
                server: TlsConn::new(server, 8192).unwrap(),
                client: rustls::ClientConnection::new(client, "localhost".try_into().unwrap())
                    .unwrap(),
                wire: Wire::default(),
                got: Vec::new(),
            };
            pair.pump();
            assert!(pair.server.is_established());
            assert_eq!(pair.server.just_established(), Some(false));
            pair
        }

        /// Moves ciphertext both ways until neither side has any to send.
        fn pump(&mut self) {
            for _ in 0..8 {
                let mut up = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut up).unwrap();
                }
                if !up.is_empty() {
                    self.server.receive(&mut up).unwrap();
                }
                self.server.take_pending(&mut self.wire);
                let down = self.wire.pending().to_vec();
                self.wire.consume(down.len());
                self.deliver(&down);
                if !self.client.wants_write() && !self.server.wants_write() {
                    return;
                }
            }
        }

        fn deliver(&mut self, mut down: &[u8]) {
            while !down.is_empty() {
                self.client.read_tls(&mut down).unwrap();
                self.client.process_new_packets().unwrap();
                let _ = self.client.reader().read_to_end(&mut self.got);
            }
        }

        fn client_reads(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.got)
        }

        /// The client's pending ciphertext.
        fn client_sends(&mut self) -> Vec<u8> {
            let mut up = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut up).unwrap();
            }
            up
        }

        /// The server encrypts `data`; the client must read it back.
        fn round_trip_down(&mut self, data: &[u8]) {
            let n = self
                .server
                .encrypt(&[IoSlice::new(data)], &mut self.wire, CIPHERTEXT_LIMIT);
            assert_eq!(n, data.len());
            let sent = self.wire.pending().to_vec();
            self.wire.consume(sent.len());
            self.deliver(&sent);
            assert_eq!(self.client_reads(), data);
        }

        /// The server's failure reaches the client as `alert`.
        fn client_gets_alert(&mut self, alert: rustls::AlertDescription) {
            let mut wire = Wire::default();
            self.server.take_pending(&mut wire);
            let mut down = wire.pending();
            assert!(!down.is_empty(), "an alert was sent");
            self.client.read_tls(&mut down).unwrap();
            match self.client.process_new_packets() {
                Err(rustls::Error::AlertReceived(a)) => assert_eq!(a, alert),
                other => panic!("client saw {other:?}, not {alert:?}"),
            }
        }
    }

    /// The nonce of record number `seq` (RFC 8446 §5.3: the IV XOR the
    /// number), and the number moved on.
    fn next_nonce(iv: &[u8; 12], seq: &mut u64) -> [u8; 12] {
        let mut nonce = *iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        *seq += 1;
        nonce
    }

    /// Records a rustls client would never send, sealed with its keys.
    struct Forger {
        key: aws_lc_rs::aead::LessSafeKey,
        iv: [u8; 12],
        seq: u64,
        /// The server's direction, to read what it answers.
        rx: (aws_lc_rs::aead::LessSafeKey, [u8; 12], u64),
    }

    impl Forger {
        /// Takes the client's keys (the pair's client is spent).
        fn take(p: Pair) -> (TlsConn, Forger) {
            let secrets = p.client.dangerous_extract_secrets().unwrap();
            let keys = |(seq, secret)| {
                let rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } = secret else {
                    panic!("the default client agrees on AES-256-GCM")
                };
                let key =
                    aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key.as_ref())
                        .unwrap();
                let iv: [u8; 12] = iv.as_ref().try_into().unwrap();
                (aws_lc_rs::aead::LessSafeKey::new(key), iv, seq)
            };
            let (key, iv, seq) = keys(secrets.tx);
            let forger = Forger {
                key,
                iv,
                seq,
                rx: keys(secrets.rx),
            };
            (p.server, forger)
        }

        /// One record: outer type 23, `inner` (content, type, padding).
        fn record(&mut self, inner: &[u8]) -> Vec<u8> {
            let len = (inner.len() + 16) as u16;
            let mut out = vec![23, 3, 3];
            out.extend(len.to_be_bytes());
            let nonce = next_nonce(&self.iv, &mut self.seq);
            let mut body = inner.to_vec();
            let aad: [u8; 5] = out[..5].try_into().unwrap();
            self.key
                .seal_in_place_append_tag(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(aad),
                    &mut body,
                )
                .unwrap();
            out.extend(body);
            out
        }

        /// The inner plaintext (content, then its type) of the first
        /// record of what the server sent.
        fn open(&mut self, wire: &[u8]) -> Vec<u8> {
            let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
            let aad: [u8; 5] = wire[..5].try_into().unwrap();
            let (key, iv, seq) = &mut self.rx;
            let nonce = next_nonce(iv, seq);
            let mut body = wire[5..5 + len].to_vec();
            let plain = key
                .open_in_place(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(aad),
                    &mut body,
                )
                .unwrap();
            plain.to_vec()
        }
    }

    /// The content types of the records in `wire`.
    fn records(mut wire: &[u8]) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        while wire.len() >= 5 {
            let len = u16::from_be_bytes([wire[3], wire[4]]) as usize;
            out.push((wire[0], len));
            wire = &wire[5 + len..];
        }
        assert!(wire.is_empty(), "records end at the wire's end");
        out
    }

    #[test]
    fn small_frames_share_a_record_and_a_large_chunk_starts_its_own() {
        let mut p = Pair::new();
        let (small, large) = ([1u8; 64], [2u8; ALIGN_RECORDS_FROM]);
        let iov = [
            IoSlice::new(&small),
            IoSlice::new(&small),
            IoSlice::new(&large),
            IoSlice::new(&small),
        ];
        let taken = p.server.encrypt(&iov, &mut p.wire, CIPHERTEXT_LIMIT);
        assert_eq!(taken, 128 + ALIGN_RECORDS_FROM + 64);
        let sent = p.wire.pending().to_vec();
        let data = records(&sent);
        assert_eq!(data.len(), 3, "two small, the large, one small: {data:?}");
        assert!(data.iter().all(|&(ty, _)| ty == 23));
        p.wire.consume(sent.len());
        p.deliver(&sent);
        let mut want = Vec::new();
        want.extend_from_slice(&small);
        want.extend_from_slice(&small);
        want.extend_from_slice(&large);
        want.extend_from_slice(&small);
        assert_eq!(p.client_reads(), want);
    }

    /// `tls::load`'s configuration chooses AES-128-GCM for a client that
    /// prefers AES-256-GCM (a rustls client's default order), in TLS 1.3
    /// and 1.2; a client without AES-128-GCM gets its own choice; and the
    /// records flow either way.
    #[test]
    fn the_loaded_configuration_chooses_aes_128_gcm_first() {
        use rustls::CipherSuite as S;
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let dir = std::env::temp_dir().join(format!("corecast-suites-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), signing_key.serialize_pem()).unwrap();
        let settings = super::super::TlsSettings {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            min_version: super::super::MinVersion::Tls12,
        };
        let loaded =
            super::super::load(&settings, &super::super::Resumption::new().unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let cases = [
            (None, &rustls::version::TLS13, S::TLS13_AES_128_GCM_SHA256),
            (
                None,
                &rustls::version::TLS12,
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
            (
                Some(vec![
                    cs::TLS13_AES_256_GCM_SHA384,
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                ]),
                &rustls::version::TLS13,
                S::TLS13_AES_256_GCM_SHA384,
            ),
            (
                Some(vec![cs::TLS13_CHACHA20_POLY1305_SHA256]),
                &rustls::version::TLS13,
                S::TLS13_CHACHA20_POLY1305_SHA256,
            ),
        ];
        for (only, version, want) in cases {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            assert_eq!(
                provider.cipher_suites[0].suite(),
                S::TLS13_AES_256_GCM_SHA384,
                "the client prefers AES-256-GCM"
            );
            if let Some(only) = only {
                provider.cipher_suites = only;
            }
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let mut p = Pair::with((Arc::clone(&loaded.config), Arc::new(client)));
            assert_eq!(p.client.negotiated_cipher_suite().unwrap().suite(), want);
            p.round_trip_down(b"tick");
        }
    }

    #[test]
    fn encryption_stops_at_the_limit_and_goes_on_where_it_stopped() {
        let mut p = Pair::new();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut at = 0;
        let mut got = Vec::new();
        while at < big.len() {
            let n = p
                .server
                .encrypt(&[IoSlice::new(&big[at..])], &mut p.wire, CIPHERTEXT_LIMIT);
            assert!(n > 0);
            assert!(
                p.wire.len() < CIPHERTEXT_LIMIT + 2 * (MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD),
                "{}",
                p.wire.len()
            );
            at += n;
            let sent = p.wire.pending().to_vec();
            p.wire.consume(sent.len());
            p.deliver(&sent);
            got.extend(p.client_reads());
        }
        assert_eq!(got, big);
    }

    /// The io_uring backend's scratch hand-back: a buffer taken from one
    /// wire and adopted by another is the same allocation, filled from its
    /// start, and the wire it left holds nothing.
    #[test]
    fn a_wire_buffer_moves_between_wires_without_reallocating() {
        let mut a = Wire::default();
        a.extend(&[1u8; 3000]);
        a.consume(3000);
        let buf = a.take_buffer();
        let at = buf.as_ptr();
        assert_eq!((a.capacity(), a.len()), (0, 0));
        let mut b = Wire::default();
        b.adopt(buf);
        b.extend(b"abc");
        assert_eq!(b.pending(), b"abc");
        assert_eq!(
            b.pending().as_ptr(),
            at,
            "the same allocation, from its start"
        );
        let mut n = Pair::new();
        let taken = n.server.encrypt(
            &[IoSlice::new(b"sealed into an adopted buffer")],
            &mut b,
            CIPHERTEXT_LIMIT,
        );
        assert_eq!(taken, 29);
        assert_eq!(b.pending()[..3], *b"abc");
        n.deliver(&b.pending()[3..]);
        assert_eq!(n.client_reads(), b"sealed into an adopted buffer");
    }

    #[test]
    fn client_data_is_decrypted_and_an_idle_session_holds_no_buffer() {
        let mut p = Pair::new();
        p.client.writer().write_all(b"hello").unwrap();
        p.pump();
        let mut buf = [0u8; 64];
        let n = p.server.read_plain(&mut buf);
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(p.server.read_plain(&mut buf), 0);
        let n = p
            .server
            .encrypt(&[IoSlice::new(b"world")], &mut p.wire, CIPHERTEXT_LIMIT);
        assert_eq!(n, 5);
        let sent = p.wire.pending().to_vec();
        p.wire.consume(sent.len());
        p.wire.free();
        p.deliver(&sent);
        assert_eq!(p.client_reads(), b"world");
        assert_eq!(p.server.held(), 0, "an idle session buffers nothing");
    }

    #[test]
    fn a_record_split_across_reads_is_kept_until_whole() {
        let mut p = Pair::new();
        p.client.writer().write_all(&[7u8; 3000]).unwrap();
        let mut up = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut up).unwrap();
        }
        let mut buf = vec![0u8; 4096];
        let (a, b) = up.split_at_mut(1000);
        p.server.receive(a).unwrap();
        assert_eq!(p.server.read_plain(&mut buf), 0);
        assert!(p.server.held() >= 1000, "the partial record is held");
        p.server.receive(b).unwrap();
        assert_eq!(p.server.read_plain(&mut buf), 3000);
        assert_eq!(p.server.held(), 0);
    }

    #[test]
    fn close_notify_is_seen_after_the_data_before_it() {
        let mut p = Pair::new();
        p.client.writer().write_all(b"last").unwrap();
        p.client.send_close_notify();
        p.pump();
        assert!(!p.server.peer_closed(), "data first");
        let mut buf = [0u8; 16];
        assert_eq!(p.server.read_plain(&mut buf), 4);
        assert!(p.server.peer_closed());
        p.server.close();
        assert!(p.server.wants_write(), "our close_notify");
    }

    #[test]
    fn garbage_after_the_handshake_fails_with_an_alert() {
        let mut p = Pair::new();
        let mut junk = [23u8, 3, 3, 0, 40].to_vec();
        junk.extend([0u8; 40]);
        assert_eq!(p.server.receive(&mut junk), Err(Failure::Protocol));
        let mut wire = Wire::default();
        p.server.take_pending(&mut wire);
        assert_eq!(records(wire.pending()).len(), 1, "one alert record");
        assert_eq!(p.server.receive(&mut [23u8]), Err(Failure::Protocol));
        assert_eq!(p.server.held(), 0);
    }

    #[test]
    fn plain_http_and_garbage_hellos_are_told_apart() {
        let (server, _) = configs();
        let mut s = TlsConn::new(server.clone(), 8192).unwrap();
        let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(s.receive(&mut req), Err(Failure::PlainHttp));
        let mut s = TlsConn::new(server, 8192).unwrap();
        let mut junk = [22u8, 3, 1, 0, 4, 9, 9, 9, 9].to_vec();
        assert_eq!(s.receive(&mut junk), Err(Failure::Handshake));
    }

    #[test]
    fn a_handshake_flight_past_its_limit_fails() {
        let (server, _) = configs();
        let mut s = TlsConn::new(server, 0).unwrap();
        // A ClientHello announcing a long message (which rustls would
        // reassemble up to 64 KiB), its records dribbled in: refused once
        // past the flight limit, holding nothing.
        let mut flight = Vec::new();
        for i in 0..4 {
            flight.extend_from_slice(&[22u8, 3, 1, 0x40, 0]);
            let mut record = vec![0u8; 0x4000];
            if i == 0 {
                record[..4].copy_from_slice(&[1, 0, 0xff, 0xff]);
            }
            flight.extend_from_slice(&record);
        }
        let mut result = Ok(());
        let mut sent = 0;
        for chunk in flight.chunks(4096) {
            result = s.receive(&mut chunk.to_vec());
            sent += chunk.len();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Failure::Handshake));
        assert!(
            sent <= 16 * 1024 + 4096,
            "refused within one read of the limit"
        );
        // Told so with a fatal alert in the clear (nothing was said before).
        let mut wire = Wire::default();
        s.take_pending(&mut wire);
        assert_eq!(wire.pending(), PLAIN_INTERNAL_ERROR);
        assert_eq!(s.held(), 0);
    }

    /// A rustls client's first flight: its ClientHello, one record.
    fn client_hello(client: &Arc<rustls::ClientConfig>) -> Vec<u8> {
        let mut c =
            rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        assert_eq!(records(&hello).len(), 1);
        hello
    }

    #[test]
    fn a_record_over_the_limit_before_the_handshake_is_refused_on_its_header_with_record_overflow()
    {
        let (server, client) = configs();
        // rustls would wait for all of a record under 2^14 + 2 048 bytes,
        // then say decode_error: refused on the header, told so in the
        // clear.
        for len in [16_641u16, 18_431, 18_432, 65_535] {
            let mut s = TlsConn::new(server.clone(), 8192).unwrap();
            let mut header = [22u8, 3, 1, (len >> 8) as u8, len as u8].to_vec();
            assert_eq!(s.receive(&mut header), Err(Failure::Handshake), "{len}");
            let mut wire = Wire::default();
            s.take_pending(&mut wire);
            assert_eq!(wire.pending(), PLAIN_RECORD_OVERFLOW, "{len}");
            assert_eq!(s.held(), 0);
        }
        // The largest a record may be waits for the rest.
        let mut s = TlsConn::new(server.clone(), 8192).unwrap();
        assert_eq!(s.receive(&mut [22u8, 3, 1, 0x41, 0x00].to_vec()), Ok(()));
        // After the server's flight its keys are rustls': refused, without
        // an alert of ours in the clear.
        let mut s = TlsConn::new(server, 8192).unwrap();
        assert_eq!(s.receive(&mut client_hello(&client)), Ok(()));
        let mut flight = Wire::default();
        s.take_pending(&mut flight);
        assert!(!flight.is_empty());
        let mut header = [23u8, 3, 3, 0x41, 0x01].to_vec();
        assert_eq!(s.receive(&mut header), Err(Failure::Handshake));
        let mut wire = Wire::default();
        s.take_pending(&mut wire);
        assert!(wire.is_empty());
    }

    /// Record headers are read at record boundaries only, wherever the
    /// reads cut: within a header, within a record, within a handshake
    /// message that goes on in the next record.
    #[test]
    fn a_client_hello_cut_anywhere_is_answered_with_the_servers_flight() {
        let (server, client) = configs();
        let hello = client_hello(&client);
        // The same message in two records, cut 100 bytes in.
        let body = &hello[5..];
        let mut two = Vec::new();
        for part in [&body[..100], &body[100..]] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        for flight in [hello, two] {
            let cuts = (1..16)
                .chain((16..flight.len()).step_by(29))
                .chain(100..112);
            for cut in cuts {
                let mut s = TlsConn::new(server.clone(), 8192).unwrap();
                for piece in [&flight[..cut], &flight[cut..]] {
                    assert_eq!(s.receive(&mut piece.to_vec()), Ok(()), "cut at {cut}");
                }
                assert!(s.wants_write(), "cut at {cut}: the server's flight");
            }
        }
    }

    #[test]
    fn a_freed_wire_buffer_serves_the_next_busy_connection() {
        let mut a = Wire::default();
        a.extend(&[1u8; 70_000]);
        let at = a.pending().as_ptr();
        a.consume(70_000);
        a.free();
        assert_eq!(a.capacity(), 0, "an idle connection holds no buffer");
        let mut b = Wire::default();
        b.extend(b"next");
        assert_eq!(b.pending().as_ptr(), at, "the pooled buffer, not a new one");
        assert_eq!(b.pending(), b"next");
        // Past the pool's size bound, a buffer goes back to the allocator.
        let mut big = Wire::default();
        big.extend(&vec![0u8; POOLED_WIRE_MAX_BYTES + 1]);
        big.consume(big.len());
        big.free();
        let mut c = Wire::default();
        c.extend(b"x");
        assert!(c.capacity() <= POOLED_WIRE_MAX_BYTES);
    }

    #[test]
    fn data_sent_with_the_clients_finished_is_not_counted_against_the_handshake_bound() {
        // A client that writes its request before the handshake completes
        // (curl posting a body, say) sends its Finished and ~60 KiB of
        // application data in one flight, which the server reads at once:
        // past the handshake bound (16 KiB + the head bound) but not
        // handshake bytes.
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (server, client) = configs_with(versions);
            let mut server = TlsConn::new(server, 8192).unwrap();
            let mut client =
                rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
            let body: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
            client.writer().write_all(&body).unwrap();
            let mut got = Vec::new();
            for _ in 0..6 {
                let mut up = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut up).unwrap();
                }
                if !up.is_empty() {
                    server.receive(&mut up).unwrap();
                }
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let n = server.read_plain(&mut buf);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let mut wire = Wire::default();
                server.take_pending(&mut wire);
                let mut down = wire.pending();
                while !down.is_empty() {
                    client.read_tls(&mut down).unwrap();
                    client.process_new_packets().unwrap();
                }
            }
            assert!(server.is_established());
            assert_eq!(got.len(), body.len(), "{versions:?}");
            assert!(got == body);
        }
    }

    #[test]
    fn a_quiet_session_keeps_key_bytes_only_and_a_busy_one_its_contexts() {
        let mut p = Pair::new();
        // One message each way after the handshake: built for it, let go.
        p.client.writer().write_all(b"GET").unwrap();
        p.pump();
        let mut buf = [0u8; 8];
        assert_eq!(p.server.read_plain(&mut buf), 3);
        p.round_trip_down(b"101");
        assert_eq!(
            p.server.built(),
            Some((false, false)),
            "one use builds and drops"
        );
        // Busy: the second use in a sweep period keeps the send context.
        p.round_trip_down(b"a");
        assert_eq!(p.server.built(), Some((false, true)));
        p.round_trip_down(b"b");
        p.server.sweep();
        assert_eq!(
            p.server.built(),
            Some((false, true)),
            "used in the period: kept"
        );
        p.server.sweep();
        assert_eq!(
            p.server.built(),
            Some((false, false)),
            "a quiet period: let go"
        );
        // And it works on from the key bytes.
        p.round_trip_down(b"again");
        p.client.writer().write_all(b"up").unwrap();
        p.pump();
        assert_eq!(p.server.read_plain(&mut buf), 2);
        assert_eq!(&buf[..2], b"up");
    }

    #[test]
    fn a_tls12_session_stays_with_rustls_and_works() {
        let mut p = Pair::with(configs_with(&[&rustls::version::TLS12]));
        assert!(!p.server.is_own_records());
        p.client.writer().write_all(b"up").unwrap();
        p.pump();
        let mut buf = [0u8; 8];
        assert_eq!(p.server.read_plain(&mut buf), 2);
        p.round_trip_down(b"down");
    }

    #[test]
    fn key_updates_the_client_asks_for_are_answered_and_both_sides_go_on() {
        let mut p = Pair::new();
        for i in 0..5u8 {
            p.client.refresh_traffic_keys().unwrap();
            p.client.writer().write_all(&[i; 100]).unwrap();
            let mut up = p.client_sends();
            p.server.receive(&mut up).unwrap();
            let mut buf = [0u8; 256];
            assert_eq!(p.server.read_plain(&mut buf), 100);
            assert_eq!(buf[..100], [i; 100]);
            // Our own key update comes first, then the data, under the new
            // key (the client reads it only if it followed).
            let n = p
                .server
                .encrypt(&[IoSlice::new(b"after")], &mut p.wire, CIPHERTEXT_LIMIT);
            assert_eq!(n, 5);
            let sent = p.wire.pending().to_vec();
            p.wire.consume(sent.len());
            assert_eq!(records(&sent).len(), 2, "a key update, then the data");
            p.deliver(&sent);
            assert_eq!(p.client_reads(), b"after");
        }
    }

    #[test]
    fn what_follows_the_client_finished_in_the_same_read_goes_to_our_record_layer() {
        // The client's Finished, a key update asking for ours, and data, in
        // one read: rustls must stop at the Finished (it would answer the
        // key update itself, out of our sight), the rest is ours.
        let (server, client) = configs();
        let mut server = TlsConn::new(server, 8192).unwrap();
        let mut client =
            rustls::ClientConnection::new(client, "localhost".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut hello).unwrap();
        }
        server.receive(&mut hello).unwrap();
        let mut flight = Wire::default();
        server.take_pending(&mut flight);
        let mut down = flight.pending();
        while !down.is_empty() {
            client.read_tls(&mut down).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(
            !client.is_handshaking(),
            "the client has its Finished to send"
        );
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"first words").unwrap();
        let mut up = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut up).unwrap();
        }
        server.receive(&mut up).unwrap();
        assert!(server.is_own_records());
        let mut buf = [0u8; 32];
        let n = server.read_plain(&mut buf);
        assert_eq!(&buf[..n], b"first words");
        let mut p = Pair {
            server,
            client,
            wire: Wire::default(),
            got: Vec::new(),
        };
        // The tickets, then our key update, then the reply: the client
        // reads the reply only under the keys it asked for (`encrypt` takes
        // what is pending first).
        p.round_trip_down(b"reply");
        p.round_trip_down(b"and on");
    }

    #[test]
    fn empty_records_and_oversized_inner_plaintexts_are_bounded() {
        // 32 empty records in a row are read, the 33rd is one too many.
        let (mut server, mut forger) = Forger::take(Pair::new());
        for _ in 0..32 {
            assert_eq!(server.receive(&mut forger.record(b"\x17")), Ok(()));
        }
        assert_eq!(
            server.receive(&mut forger.record(b"\x17")),
            Err(Failure::Protocol)
        );
        // Data between them resets the count.
        let (mut server, mut forger) = Forger::take(Pair::new());
        for i in 0..100 {
            let inner: &[u8] = if i % 30 == 29 { b"x\x17" } else { b"\x17\0" };
            assert_eq!(
                server.receive(&mut forger.record(inner)),
                Ok(()),
                "record {i}"
            );
        }
        // Content, type and padding past 2^14 + 1 bytes: record_overflow,
        // however short the content.
        let (mut server, mut forger) = Forger::take(Pair::new());
        let mut inner = b"x\x17".to_vec();
        inner.resize(16_386, 0);
        assert_eq!(
            server.receive(&mut forger.record(&inner)),
            Err(Failure::Protocol)
        );
        let (mut server, mut forger) = Forger::take(Pair::new());
        inner.truncate(16_385);
        assert_eq!(server.receive(&mut forger.record(&inner)), Ok(()));
        // A fatal alert from the client ends it without ours, and so does
        // a warning TLS 1.3 does not have (an error alert whatever its
        // level, RFC 8446 §6); an alert of no known level is a decode error.
        let mut wire = Wire::default();
        assert_eq!(
            server.receive(&mut forger.record(b"\x02\x28\x15")),
            Err(Failure::Protocol)
        );
        server.take_pending(&mut wire);
        assert!(wire.is_empty(), "no alert answers a fatal alert");
        let (mut server, mut forger) = Forger::take(Pair::new());
        assert_eq!(
            server.receive(&mut forger.record(b"\x01\x28\x15")),
            Err(Failure::Protocol)
        );
        server.take_pending(&mut wire);
        assert!(
            wire.is_empty(),
            "no alert answers a warning-level error alert"
        );
        let (mut server, mut forger) = Forger::take(Pair::new());
        assert_eq!(
            server.receive(&mut forger.record(b"\x03\x28\x15")),
            Err(Failure::Protocol)
        );
        server.take_pending(&mut wire);
        assert!(!wire.is_empty(), "decode_error");
    }

    #[test]
    fn too_many_key_updates_in_a_row_fail_the_session() {
        let mut p = Pair::new();
        let mut failed = None;
        for i in 0..40 {
            p.client.refresh_traffic_keys().unwrap();
            let mut up = p.client_sends();
            if p.server.receive(&mut up).is_err() {
                failed = Some(i);
                break;
            }
            // Answer the client, so that it follows our key changes.
            p.server
                .encrypt(&[IoSlice::new(b"")], &mut p.wire, CIPHERTEXT_LIMIT);
        }
        assert_eq!(failed, Some(32), "the 33rd in a row without data");
    }

    #[test]
    fn a_tampered_record_fails_with_bad_record_mac() {
        let mut p = Pair::new();
        p.client.writer().write_all(b"secret").unwrap();
        let mut up = p.client_sends();
        *up.last_mut().unwrap() ^= 1;
        assert_eq!(p.server.receive(&mut up), Err(Failure::Protocol));
        p.client_gets_alert(rustls::AlertDescription::BadRecordMac);
        assert_eq!(p.server.held(), 0);
    }

    /// The alert each malformed message after the handshake gets (outside
    /// probe: a key update of the wrong length was answered
    /// unexpected_message, and a warning-level bad_certificate
    /// decode_error).
    #[test]
    fn malformed_messages_after_the_handshake_get_the_rfcs_alerts() {
        const UNEXPECTED_MESSAGE: u8 = 10;
        const DECODE_ERROR: u8 = 50;
        let cases: [(&[u8], Option<u8>); 5] = [
            // KeyUpdate whose length says 2, two bytes of body.
            (b"\x18\0\0\x02\0\0\x16", Some(DECODE_ERROR)),
            // KeyUpdate whose length says 0.
            (b"\x18\0\0\0\x16", Some(DECODE_ERROR)),
            // A whole KeyUpdate and a byte after it in its record.
            (b"\x18\0\0\x01\0\x07\x16", Some(UNEXPECTED_MESSAGE)),
            // A warning-level alert TLS 1.3 does not have: the client
            // failed the session, nothing of ours answers it.
            (b"\x01\x2a\x15", None),
            // An alert of no level.
            (b"\x07\x00\x15", Some(DECODE_ERROR)),
        ];
        for (inner, alert) in cases {
            let (mut server, mut forger) = Forger::take(Pair::new());
            assert_eq!(
                server.receive(&mut forger.record(inner)),
                Err(Failure::Protocol),
                "{inner:?}"
            );
            let mut wire = Wire::default();
            server.take_pending(&mut wire);
            match alert {
                None => assert!(wire.is_empty(), "{inner:?}: no alert"),
                Some(code) => assert_eq!(
                    forger.open(wire.pending()),
                    [2, code, 21],
                    "{inner:?}: fatal alert {code}"
                ),
            }
        }
    }

    #[test]
    fn records_no_client_sends_after_the_handshake_fail_with_their_alerts() {
        use rustls::AlertDescription as A;
        // A change_cipher_spec, a plaintext alert, a plaintext handshake
        // record: unexpected_message; a record over 2^14 + 256: overflow.
        for (bytes, alert) in [
            (vec![20u8, 3, 3, 0, 1, 1], A::UnexpectedMessage),
            (vec![21u8, 3, 3, 0, 2, 2, 40], A::UnexpectedMessage),
            (vec![22u8, 3, 3, 0, 4, 24, 0, 0, 1], A::UnexpectedMessage),
            (vec![23u8, 3, 3, 0x41, 0x01], A::RecordOverflow),
        ] {
            let mut p = Pair::new();
            let mut bytes = bytes;
            assert_eq!(p.server.receive(&mut bytes), Err(Failure::Protocol));
            p.client_gets_alert(alert);
        }
    }

    #[test]
    fn forged_inner_records_are_checked_like_rustls_would() {
        type Case = (&'static [&'static [u8]], Option<Failure>);
        let cases: [Case; 9] = [
            // Data with padding after its content type: fine.
            (&[b"hi\x17\0\0\0"], None),
            // An empty data record, and one of padding alone after it.
            (&[b"\x17", b"\x17\0"], None),
            // No content type at all (all padding): refused.
            (&[b"\0\0\0"], Some(Failure::Protocol)),
            // A key update split over two records: fine.
            (&[b"\x18\0\x16", b"\0\x01\x00\x16"], None),
            // A key update with a byte after it in its record.
            (&[b"\x18\0\0\x01\x00\x07\x16"], Some(Failure::Protocol)),
            // request_update 2: illegal.
            (&[b"\x18\0\0\x01\x02\x16"], Some(Failure::Protocol)),
            // A NewSessionTicket (or any other handshake message).
            (&[b"\x04\0\0\x01\x00\x16"], Some(Failure::Protocol)),
            // A key update cut by data.
            (&[b"\x18\0\x16", b"x\x17"], Some(Failure::Protocol)),
            // An alert other than close_notify or user_canceled.
            (&[b"\x02\x28\x15"], Some(Failure::Protocol)),
        ];
        for (i, (inners, expect)) in cases.iter().enumerate() {
            let (mut server, mut forger) = Forger::take(Pair::new());
            let mut result = Ok(());
            for inner in inners.iter() {
                let mut rec = forger.record(inner);
                result = server.receive(&mut rec);
            }
            assert_eq!(result.err(), *expect, "case {i}");
        }
        // user_canceled four times is read, the fifth is one too many.
        let (mut server, mut forger) = Forger::take(Pair::new());
        for _ in 0..4 {
            assert_eq!(server.receive(&mut forger.record(b"\x01\x5a\x15")), Ok(()));
        }
        let mut rec = forger.record(b"\x01\x5a\x15");
        assert_eq!(server.receive(&mut rec), Err(Failure::Protocol));
        // After a key update, the old key no longer opens anything.
        let (mut server, mut forger) = Forger::take(Pair::new());
        assert_eq!(
            server.receive(&mut forger.record(b"\x18\0\0\x01\x00\x16")),
            Ok(())
        );
        let mut rec = forger.record(b"x\x17");
        assert_eq!(server.receive(&mut rec), Err(Failure::Protocol));
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
