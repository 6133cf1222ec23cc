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
    /// What rustls was given of `incoming` and kept (a handshake message
    /// going on in the next record).
    rustls_seen: Seen,
}

/// The bytes at the front of a session's input that rustls was given and
/// kept: it must be given them again, and more, never fewer (it tracks its
/// progress in them). rustls may rewrite them (it joins a handshake
/// message's pieces in place, over the headers of the records after the
/// first), so the end of the record they end in is remembered here, not
/// read again from them.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Bytes given and kept.
    given: usize,
    /// Where the record the last of them belongs to starts, and ends
    /// (≥ `given`; past the input's end while that record is not all
    /// there; [`UNKNOWN_END`] while its header is not: rustls got less
    /// than a header of it, left as it was, and it is read again).
    record_start: usize,
    record_end: usize,
}

/// The end of a record whose header is not all there.
const UNKNOWN_END: usize = usize::MAX;

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

/// The end of the record that starts at `buf[from..]` (past `buf`'s end
/// if it is not all there; [`UNKNOWN_END`] if its header is not); `None` if
/// its header says it is longer than `max`, refused on the header instead
/// of waiting for the rest. `from` must be a record boundary of bytes
/// rustls has not been given (it rewrites those it was).
fn record_end(buf: &[u8], from: usize, max: usize) -> Option<usize> {
    let Some(h) = buf.get(from..from + record::HEADER) else {
        return Some(UNKNOWN_END);
    };
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    (len <= max).then_some(from + record::HEADER + len)
}

/// The longest record a client may send now: before the server has said
/// anything (`spoke`, or a flight waiting in `sink`) every record is
/// plaintext, 2^14 bytes at most (RFC 8446 §5.1, RFC 5246 §6.2.1); after,
/// 2^14 + 256 (RFC 8446 §5.2; no suite we offer, TLS 1.2's included,
/// expands a record by more). Judged as each header is read, so the
/// answer does not depend on how the records were cut into reads.
fn max_record(spoke: bool, sink: &Wire) -> usize {
    if spoke || !sink.is_empty() {
        record::MAX_CIPHERTEXT
    } else {
        record::MAX_PLAINTEXT
    }
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
    seen: &mut Seen,
    spoke: bool,
    plain: &mut Vec<u8>,
    sink: &mut Wire,
    write: &mut Writer<'_>,
) -> (usize, Stop) {
    let (at, stop, given, (start, end)) = run_given(conn, buf, *seen, spoke, plain, sink, write);
    let kept = given.saturating_sub(at);
    *seen = if kept == 0 {
        Seen::default()
    } else {
        Seen {
            given: kept,
            record_start: start.saturating_sub(at),
            record_end: if end == UNKNOWN_END {
                UNKNOWN_END
            } else {
                end.max(given) - at
            },
        }
    };
    (at, stop)
}

/// [`run`], returning also how far into `buf` rustls was given bytes, and
/// where the record the last of them belongs to starts and ends.
fn run_given(
    conn: &mut UnbufferedServerConnection,
    buf: &mut [u8],
    seen: Seen,
    spoke: bool,
    plain: &mut Vec<u8>,
    sink: &mut Wire,
    write: &mut Writer<'_>,
) -> (usize, Stop, usize, (usize, usize)) {
    let (mut at, mut closed) = (0, false);
    // While the handshake runs, `end` is always a record boundary (or the
    // end of `buf`), so that the next header read is one: what rustls kept
    // may end inside a record (a partial one), and goes on to that
    // record's end, remembered from the last call (its header is read
    // again only if rustls got less than all of it: it may have rewritten
    // one it had).
    let mut given = seen.given.min(buf.len());
    let mut record = (seen.record_start, seen.given);
    if conn.is_handshaking() && seen.given > 0 {
        record.1 = match seen.record_end {
            UNKNOWN_END => match record_end(buf, record.0, max_record(spoke, sink)) {
                Some(e) => e,
                None => return (0, Stop::Overflow, given, record),
            },
            e => e.max(seen.given),
        };
    }
    let mut end = record.1.min(buf.len());
    loop {
        let limit = if conn.is_handshaking() {
            if end <= at {
                let Some(e) = record_end(buf, at, max_record(spoke, sink)) else {
                    return (at, Stop::Overflow, given, record);
                };
                record = (at, e);
                end = e.min(buf.len());
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
            let Some(e) = record_end(buf, limit, max_record(spoke, sink)) else {
                return (at, Stop::Overflow, given, record);
            };
            record = (limit, e);
            end = e.min(buf.len());
        }
        match stop {
            None => {}
            Some(Stop::Failed) => {
                alert(conn, sink);
                return (at, Stop::Failed, given, record);
            }
            Some(_) if closed => return (at, Stop::PeerClosed, given, record),
            Some(stop) => return (at, stop, given, record),
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
            rustls_seen: Seen::default(),
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
        let spoke_before = self.spoke;
        let result = self.receive_any(data);
        self.spoke |= !self.pending.is_empty();
        if result.is_ok() && !self.is_established() {
            self.handshake_read += received;
            if self.handshake_read > self.handshake_limit {
                // Nothing of it is kept. A client refused before we said
                // anything (a ClientHello past the bound) is told so in
                // the clear, as no keys are in use yet (RFC 8446 §6: a
                // failure gets an alert). The answer does not depend on
                // how the network cut the hello: a flight rustls wrote
                // for the very bytes that crossed the bound is not sent.
                self.incoming = Vec::new();
                self.plain = Vec::new();
                self.plain_at = 0;
                if !spoke_before {
                    self.pending = Wire::default();
                    self.spoke = false;
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
            spoke,
            ..
        } = self;
        let Session::Rustls(conn) = session else {
            return Err(Failure::Protocol);
        };
        let mut nothing = |_: &mut WriteTraffic<'_, ServerConnectionData>, _: &mut Wire| true;
        let stop = if incoming.is_empty() {
            // Nothing kept: rustls has seen none of `data`.
            *rustls_seen = Seen::default();
            let (used, stop) = run(
                conn,
                data,
                rustls_seen,
                *spoke,
                plain,
                pending,
                &mut nothing,
            );
            incoming.extend_from_slice(&data[used..]);
            stop
        } else {
            incoming.extend_from_slice(data);
            let (used, stop) = run(
                conn,
                incoming,
                rustls_seen,
                *spoke,
                plain,
                pending,
                &mut nothing,
            );
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
        self.rustls_seen = Seen::default();
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
            spoke,
            ..
        } = self;
        let Session::Rustls(conn) = session else {
            return Stop::Failed;
        };
        let sink = sink.unwrap_or(pending);
        let (used, stop) = run(conn, incoming, rustls_seen, *spoke, plain, sink, write);
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
#[path = "conn_tests.rs"]
mod tests;
