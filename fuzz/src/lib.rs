//! What the fuzz targets share: a thread with a worker's stack to run each
//! input on, how one input is cut into reads, and an independent reader of
//! what the server wrote (HTTP responses, then server frames) that panics on
//! anything a conforming client would have to reject.
//!
//! The reader deliberately does not reuse `corecast::proto::frame`: a bug in
//! the parser under test must not also hide in the oracle.

use corecast::proto::OutQueue;
use corecast::proto::frame::{CloseCode, MAX_CONTROL_PAYLOAD};
use corecast::proto::outbound::MAX_IOVECS;
use corecast::server::WORKER_STACK_BYTES;
use std::io::IoSlice;
use std::sync::OnceLock;
use std::sync::mpsc;

/// Work for the worker-stack thread.
type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on a thread whose stack is a corecast worker's
/// ([`WORKER_STACK_BYTES`]) and returns its result.
///
/// libFuzzer calls a target on the process's main thread, whose stack is
/// `ulimit -s` (8 MiB by default): code that would overflow a worker could
/// pass there. So every target runs its input here. The thread is spawned
/// once and fed through a channel; spawning one per input would cost an
/// `mmap` of the stack and AddressSanitizer's per-thread set-up each time.
/// Coverage counters are process-wide, so inputs run here guide the fuzzer
/// as before.
///
/// A panic on this thread aborts the process (libfuzzer-sys's panic hook
/// aborts on every thread), and a stack overflow kills it with a signal:
/// either way libFuzzer saves the input as a crash, as for the main thread.
pub fn on_worker_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .expect("spawn the worker-stack thread");
        tx
    });
    let (done, result) = mpsc::sync_channel(1);
    jobs.send(Box::new(move || {
        // The receiver waits below; it cannot be gone.
        let _ = done.send(f());
    }))
    .expect("the worker-stack thread is running");
    result
        .recv()
        .expect("the worker-stack thread finished the input")
}

/// Read sizes given by the cut bytes at the front of an input.
const MAX_CUTS: usize = 15;

/// Size of one read from one cut byte: `0x00..=0x7f` give 1..=128 bytes (cuts
/// inside headers, UTF-8 sequences and masks), `0x80..=0xff` give 64..=8192
/// (whole frames, large payloads).
fn read_size(b: u8) -> usize {
    if b < 0x80 {
        b as usize + 1
    } else {
        (b as usize - 0x7f) * 64
    }
}

/// An input cut into reads. The first byte `k` says how many cut bytes follow
/// (`k % 16`); the read sizes they give are used in turn, cyclically, over
/// the rest of the input, so cuts land throughout a long stream, not only at
/// its start. No cut bytes: the stream is one read.
#[derive(Debug, Clone)]
pub struct Reads<'a> {
    rest: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl<'a> Reads<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let (k, data) = match data.split_first() {
            Some((&k, rest)) => ((k as usize % (MAX_CUTS + 1)).min(rest.len()), rest),
            None => (0, data),
        };
        let (cuts, stream) = data.split_at(k);
        Self {
            rest: stream,
            sizes: cuts.iter().map(|&b| read_size(b)).collect(),
            next: 0,
        }
    }

    /// The whole stream, uncut.
    pub fn stream(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Reads<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let n = if self.sizes.is_empty() {
            self.rest.len()
        } else {
            let n = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            n.min(self.rest.len())
        };
        let (read, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(read)
    }
}

/// Writes everything queued in `out` to `wire` the way a backend does
/// (gather, then advance by what was "written"); returns the bytes moved.
/// The queue is empty afterwards.
pub fn drain(out: &mut OutQueue, wire: &mut Vec<u8>) -> usize {
    let before = wire.len();
    while !out.is_empty() {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let n = out.gather(&mut iov);
        assert!(n > 0, "a non-empty queue gathered nothing");
        let written: usize = iov[..n].iter().map(|s| s.len()).sum();
        wire.extend(iov[..n].iter().flat_map(|s| s.iter().copied()));
        let queued = out.len();
        out.advance(written);
        assert_eq!(out.len(), queued - written, "advance lost count");
    }
    wire.len() - before
}

/// One thing the server wrote, in a form that does not depend on how the
/// input was cut into reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An HTTP response: its head verbatim, and its body.
    Http {
        head: Vec<u8>,
        body: Vec<u8>,
    },
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame's code. The reason is checked (UTF-8, fits a control
    /// frame) but not kept: it may rightly depend on the cuts (a text message
    /// cut mid-character fails as "truncated" rather than "invalid" UTF-8,
    /// both with 1007).
    Close(Option<u16>),
}

/// Reads server frames until `wire` ends. `max_data` bounds a data frame's
/// payload. Panics on: a masked or fragmented frame, reserved bits or
/// opcodes, a non-minimal length, a control frame over 125 bytes, a close
/// frame with a one-byte payload, a code not allowed on the wire or a reason
/// that is not UTF-8, invalid UTF-8 in a text frame, a truncated frame, and
/// anything after a close frame.
pub fn read_frames(mut wire: &[u8], max_data: usize, items: &mut Vec<Item>) {
    while !wire.is_empty() {
        assert!(
            !matches!(items.last(), Some(Item::Close(_))),
            "bytes after a close frame: {wire:02x?}"
        );
        assert!(wire.len() >= 2, "truncated frame header: {wire:02x?}");
        let (b0, b1) = (wire[0], wire[1]);
        assert_eq!(b0 & 0x80, 0x80, "server frame without FIN: {b0:#04x}");
        assert_eq!(b0 & 0x70, 0, "server frame with RSV bits: {b0:#04x}");
        assert_eq!(b1 & 0x80, 0, "masked server frame");
        let (len, hlen) = match b1 & 0x7f {
            126 => {
                assert!(wire.len() >= 4, "truncated 16-bit length");
                let n = u16::from_be_bytes([wire[2], wire[3]]) as usize;
                assert!(n >= 126, "non-minimal 16-bit length {n}");
                (n, 4)
            }
            127 => {
                assert!(wire.len() >= 10, "truncated 64-bit length");
                let n = u64::from_be_bytes(wire[2..10].try_into().unwrap());
                assert!(n > u16::MAX as u64, "non-minimal 64-bit length {n}");
                (usize::try_from(n).expect("length fits memory"), 10)
            }
            n => (n as usize, 2),
        };
        assert!(wire.len() - hlen >= len, "truncated frame payload");
        let payload = wire[hlen..hlen + len].to_vec();
        wire = &wire[hlen + len..];
        let opcode = b0 & 0x0f;
        if opcode & 0x8 != 0 {
            assert!(len <= MAX_CONTROL_PAYLOAD, "control frame of {len} bytes");
        } else {
            assert!(len <= max_data, "data frame of {len} bytes over {max_data}");
        }
        items.push(match opcode {
            0x1 => {
                assert!(
                    std::str::from_utf8(&payload).is_ok(),
                    "text frame not UTF-8: {payload:02x?}"
                );
                Item::Text(payload)
            }
            0x2 => Item::Binary(payload),
            0x8 => Item::Close(close_code(&payload)),
            0x9 => Item::Ping(payload),
            0xa => Item::Pong(payload),
            op => panic!("server frame with opcode {op:#x}"),
        });
    }
}

/// The code of a close payload, checked like a client checks it (RFC 6455 §5.5.1, §7.4).
fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [] => None,
        [_] => panic!("close frame with a one-byte payload"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            assert!(
                CloseCode::is_valid_on_wire(code),
                "close code {code} not allowed on the wire"
            );
            assert!(
                std::str::from_utf8(reason).is_ok(),
                "close reason not UTF-8: {reason:02x?}"
            );
            Some(code)
        }
    }
}

/// Statuses corecast answers with: every refusal it has
/// (`proto::handshake::Status::ALL`, so a new one is known here at once: a
/// fixed list here missed 417 when it was added) and 100, 101, 200, 204.
/// Not 500, which only a panic sends.
fn known_status(code: u16) -> bool {
    matches!(code, 100 | 101 | 200 | 204)
        || corecast::proto::handshake::Status::ALL
            .iter()
            .any(|s| s.code() == code)
}

/// Reads a whole connection's output: HTTP responses (keep-alive ones may
/// follow each other), and after a `101` the server frames (see
/// [`read_frames`]). Panics on a malformed or unknown response, a `101`
/// without a valid `Sec-WebSocket-Accept`, a body shorter than its
/// `Content-Length`, and anything after a `Connection: close` response.
pub fn read_transcript(mut wire: &[u8], max_data: usize) -> Vec<Item> {
    let mut items = Vec::new();
    while !wire.is_empty() {
        if let Some(Item::Http { head, .. }) = items.last() {
            assert!(
                !has_header(head, "connection", "close"),
                "bytes after a Connection: close response: {:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(wire) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "malformed response ({other:?}): {:?}",
                String::from_utf8_lossy(&wire[..wire.len().min(512)])
            ),
        };
        let code = resp.code.expect("complete response has a code");
        assert_eq!(resp.version, Some(1), "response is not HTTP/1.1");
        assert!(known_status(code), "unexpected status {code}");
        let content_length = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("numeric Content-Length")
            });
        if code == 101 {
            let accept = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .expect("101 without Sec-WebSocket-Accept");
            assert_eq!(
                accept.value.len(),
                28,
                "Sec-WebSocket-Accept is not 28 bytes"
            );
        }
        let head = wire[..n].to_vec();
        wire = &wire[n..];
        if code == 101 {
            items.push(Item::Http {
                head,
                body: Vec::new(),
            });
            read_frames(wire, max_data, &mut items);
            return items;
        }
        let len = content_length.unwrap_or(0);
        // A `HEAD` answer carries the `Content-Length` of the body it omits;
        // a body never starts like a status line, so the next response (or
        // the end) right after the head marks one.
        let head_request =
            code == 200 && len > 0 && (wire.is_empty() || wire.starts_with(b"HTTP/1.1 "));
        let len = if head_request { 0 } else { len };
        assert!(wire.len() >= len, "body shorter than Content-Length {len}");
        items.push(Item::Http {
            head,
            body: wire[..len].to_vec(),
        });
        wire = &wire[len..];
    }
    items
}

/// Does the response head carry header `name` with comma-list token `token`?
fn has_header(head: &[u8], name: &str, token: &str) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).expect("head parsed before");
    resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case(name)
            && h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}
