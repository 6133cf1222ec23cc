//! permessage-deflate (RFC 7692): reading a client's offers and writing the
//! answer, and compressing or inflating one message. No context is kept
//! between messages in either direction (the answer always says
//! `server_no_context_takeover; client_no_context_takeover`), so a
//! connection holds no compressor or inflater state while idle, and one
//! compressed frame can be shared by every subscriber that agreed to the
//! extension.
//!
//! Windows: every message is compressed with the full 32 KiB window, as a
//! fresh stream, so no back-reference reaches further than the message's
//! own length. A client that limits `server_max_window_bits` to N can
//! therefore inflate any of our compressed messages of at most 2^N bytes;
//! longer ones are sent to it uncompressed (RSV1 clear), which the
//! extension allows per message. The inflater uses the full window, which
//! reads whatever window the client compresses with.
//!
//! Sans-IO: bytes in, bytes out. The compressor and the inflater are
//! per thread (each worker's), reset before each message.

use super::frame::{OpCode, compressed_server_frame, server_frame};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// The extension's token.
pub const EXTENSION: &str = "permessage-deflate";

/// The bytes every message's deflate data is cut short of (the end of an
/// empty stored block, §7.2.1) and that the inflater gets back (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Payloads shorter than this are sent uncompressed. Measured
/// (`cargo bench --bench deflate -- deflate/small`, the first N bytes of
/// each corpus message): a compression costs 3.8 us at 16 B and 5.5 us at
/// 64 B, and saves nothing below 48 B, 2 % at 64 B, 7 % at 96 B, 12 % at
/// 128 B, 32 % at 256 B; below 128 B the bytes saved are not worth the CPU
/// (ours once per publication, but every echo and reply, and the client's
/// inflate on every message).
pub const COMPRESS_FROM: usize = 128;

/// Payloads longer than this are sent uncompressed too. Compressing runs
/// on a worker's thread in one go, at 25–60 MB/s for the texts an
/// attacker picks (16 MB of control characters as a JSON envelope, ~96 MB,
/// took 3–5 s, and every worker that needed the same form waited for it:
/// one publication stalled the whole server). At this bound one
/// compression costs a few milliseconds at worst; the messages a push
/// server compresses (prices, notifications) are far shorter.
pub const COMPRESS_UP_TO: usize = 64 * 1024;

/// What was agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// `server_max_window_bits` the client asked for (8..=15; 15 when it
    /// did not ask): our messages longer than 2^bits go uncompressed.
    pub server_window_bits: u8,
}

impl Agreed {
    /// Whether a message of `len` bytes may go to this client compressed:
    /// long enough to gain, not over [`COMPRESS_UP_TO`], and with a window
    /// under 15 bits short enough for it.
    pub fn compresses(self, len: usize) -> bool {
        (COMPRESS_FROM..=COMPRESS_UP_TO).contains(&len)
            && (self.server_window_bits >= 15 || len <= 1usize << self.server_window_bits)
    }

    /// The `Sec-WebSocket-Extensions` value answering the offer.
    pub fn response(self, offered_server_bits: bool) -> String {
        let mut s = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if offered_server_bits {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        s
    }
}

/// A client's accepted offer: the agreement, and whether the answer must
/// repeat `server_max_window_bits` (it must when the offer had it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub agreed: Agreed,
    pub offered_server_bits: bool,
}

/// The first permessage-deflate offer among `values` (each a
/// `Sec-WebSocket-Extensions` header value: comma-separated extensions,
/// each `name; param; param=value`) whose parameters are all known,
/// unrepeated and well-formed; `None` when there is none (the connection
/// then goes on without compression). Other extensions are ignored.
pub fn negotiate<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Accepted> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .find_map(accept_offer)
}

/// One offer (`permessage-deflate; …`), if it is permessage-deflate and
/// acceptable.
fn accept_offer(offer: &[u8]) -> Option<Accepted> {
    let mut parts = offer.split(|&b| b == b';').map(trim);
    if parts.next()? != EXTENSION.as_bytes() {
        return None;
    }
    let (mut server_nct, mut client_nct, mut server_bits, mut client_bits) =
        (false, false, None, false);
    for param in parts {
        let (name, value) = match param.iter().position(|&b| b == b'=') {
            Some(i) => (trim(&param[..i]), Some(unquote(trim(&param[i + 1..])))),
            None => (param, None),
        };
        let seen = match name {
            b"server_no_context_takeover" if value.is_none() => &mut server_nct,
            b"client_no_context_takeover" if value.is_none() => &mut client_nct,
            b"server_max_window_bits" => {
                if server_bits.is_some() {
                    return None;
                }
                server_bits = Some(window_bits(value?)?);
                continue;
            }
            b"client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                &mut client_bits
            }
            _ => return None,
        };
        if std::mem::replace(seen, true) {
            return None; // a parameter given twice
        }
    }
    Some(Accepted {
        agreed: Agreed {
            server_window_bits: server_bits.unwrap_or(15),
        },
        offered_server_bits: server_bits.is_some(),
    })
}

/// A window-bits value: a decimal 8 to 15 without a leading zero.
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// A quoted-string value (`"10"`) without its quotes.
fn unquote(b: &[u8]) -> &[u8] {
    match b {
        [b'"', inner @ .., b'"'] => inner,
        _ => b,
    }
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the cap (a decompression bomb, or just too big):
    /// 1009. At most the cap and one byte were inflated.
    TooBig,
    /// Not valid deflate data: 1002. The message broke the encoding the
    /// extension agreed on (a protocol error, as Python `websockets` has
    /// it), not its type; text that inflates to bad UTF-8 is the 1007 case.
    Invalid,
    /// The caller's check refused inflated bytes (text that is not
    /// UTF-8: 1007). Checked before the cap, so where a message fails does
    /// not depend on how its bytes arrived.
    Refused,
}

thread_local! {
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
}

/// Inflate output is grown by at least this much at a time.
const INFLATE_CHUNK: usize = 16 * 1024;

/// How much room to add to inflate output holding `len` bytes, under a
/// cap of `cap` (the buffer never gets room past the cap and a byte, so
/// decoding stops there): half of what it holds, at least
/// [`INFLATE_CHUNK`]. Geometric, so the copies that growing makes add up to
/// a few times the message, not its square over the chunk: grown by
/// 16 KiB at a time, a 16 MiB message was moved ~1 000 times (outside
/// probe: an echo of compressed 16 MiB messages spent a quarter of its
/// worker in `realloc`'s copies, and a second client's round trip waited).
fn inflate_room(len: usize, cap: usize) -> usize {
    let room = cap.saturating_add(1) - len.min(cap);
    INFLATE_CHUNK.max(len / 2).min(room).max(1)
}

/// What a connection's own inflater costs while it holds one (zlib-rs's
/// state and 32 KiB window, with margin): charged to the buffer budget.
pub const INFLATER_BYTES: usize = 48 * 1024;

/// Inflates one message's deflate data (`input`, without the tail) into
/// `out` (cleared first), refusing it as soon as it passes `cap` bytes.
pub fn inflate(input: &[u8], cap: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    inflate_checked(input, cap, out, &mut |_| true)
}

/// [`inflate`] with `check` called on each piece of output (within the
/// cap) as it comes: text validation that fails as early as it can.
pub fn inflate_checked(
    input: &[u8],
    cap: usize,
    out: &mut Vec<u8>,
    check: &mut impl FnMut(&[u8]) -> bool,
) -> Result<(), InflateError> {
    match inflate_whole(input, cap, &mut { usize::MAX }, out, check)? {
        Whole::Done => Ok(()),
        Whole::Paused { .. } => unreachable!("no room limit"),
    }
}

/// What [`inflate_whole`] made of a message's deflate data.
#[derive(Debug)]
pub enum Whole {
    /// All of it inflated, the message complete in the output.
    Done,
    /// The room ran out with `input[consumed..]` not inflated yet: the
    /// `inflater` holds the stream where it stopped, to be fed the rest
    /// (and finished) as a message arriving in pieces is.
    Paused { consumed: usize, inflater: Inflater },
}

/// [`inflate_checked`] by the worker's inflater, inflating at most about
/// `room` bytes (less what it inflated): a message that would inflate more
/// stops there ([`Whole::Paused`]), so one small compressed message (16 KB
/// inflates to 16 MiB) costs a turn no more than its room.
pub fn inflate_whole(
    input: &[u8],
    cap: usize,
    room: &mut usize,
    out: &mut Vec<u8>,
    check: &mut impl FnMut(&[u8]) -> bool,
) -> Result<Whole, InflateError> {
    if out.capacity() > cap.saturating_add(1) {
        *out = Vec::new();
    }
    out.clear();
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        match feed(&mut d, input, cap, room, out, check)? {
            Fed::Ended => Ok(Whole::Done),
            Fed::All => end_message(&mut d, cap, out, check).map(|()| Whole::Done),
            Fed::Paused(consumed) => {
                // The stream goes on in an inflater of its own; the
                // worker's gets a fresh state (allocated only here).
                let d = std::mem::replace(&mut *d, Decompress::new(false));
                Ok(Whole::Paused {
                    consumed,
                    inflater: Inflater {
                        d: Box::new(d),
                        ended: false,
                    },
                })
            }
        }
    })
}

/// An empty final block (BFINAL 1, fixed codes, end of block at once).
const EMPTY_FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// The end of a message whose data did not end the stream: the tail the
/// sender removed, which must complete its flush's empty stored block
/// and so leave the data at a block boundary (RFC 7692 §7.2.1–7.2.2). Data
/// cut short inside a block would take the tail as more of that block
/// (stored bytes, Huffman codes) and give output no sender wrote: such a
/// message is refused, as is one the tail leaves inside a block header
/// (after it an empty final block must end the stream at once, giving
/// nothing). An empty payload is taken as the empty message.
fn end_message(
    d: &mut Decompress,
    cap: usize,
    out: &mut Vec<u8>,
    check: &mut impl FnMut(&[u8]) -> bool,
) -> Result<(), InflateError> {
    if d.total_in() == 0 {
        return Ok(());
    }
    let before = out.len();
    let ended = feed(d, &TAIL, cap, &mut { usize::MAX }, out, check)?;
    if out.len() != before {
        return Err(InflateError::Invalid);
    }
    if matches!(ended, Fed::Ended) {
        return Ok(()); // a final empty stored block the tail completed
    }
    match feed(d, &EMPTY_FINAL_BLOCK, cap, &mut { usize::MAX }, out, check) {
        Ok(Fed::Ended) if out.len() == before => Ok(()),
        Err(InflateError::Invalid) | Ok(_) => Err(InflateError::Invalid),
        Err(e) => Err(e),
    }
}

/// An inflater of its own for a compressed message that arrives in
/// pieces (across reads or frames): fed each piece as it comes, so a bomb
/// or bad text is refused before the rest arrives and the compressed
/// bytes are never kept. Costs [`INFLATER_BYTES`] while it exists.
pub struct Inflater {
    d: Box<Decompress>,
    /// A final block ended the stream: the rest of the message is ignored.
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("ended", &self.ended)
            .finish()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self {
            d: Box::new(Decompress::new(false)),
            ended: false,
        }
    }
}

impl Inflater {
    /// Inflates the next piece of the message's deflate data into `out`,
    /// at most about `room` bytes (less what it inflated). Returns how much
    /// of `data` it took: all of it, or, when the room ran out first, a
    /// part (the rest is to be fed again, from where it stopped).
    pub fn feed(
        &mut self,
        data: &[u8],
        cap: usize,
        room: &mut usize,
        out: &mut Vec<u8>,
        check: &mut impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, InflateError> {
        if self.ended || data.is_empty() {
            return Ok(data.len());
        }
        Ok(match feed(&mut self.d, data, cap, room, out, check)? {
            Fed::Ended => {
                self.ended = true;
                data.len()
            }
            Fed::All => data.len(),
            Fed::Paused(consumed) => consumed,
        })
    }

    /// The message's last piece is in: the tail the sender removed.
    pub fn finish(
        &mut self,
        cap: usize,
        out: &mut Vec<u8>,
        check: &mut impl FnMut(&[u8]) -> bool,
    ) -> Result<(), InflateError> {
        if !self.ended {
            end_message(&mut self.d, cap, out, check)?;
            self.ended = true;
        }
        Ok(())
    }
}

/// How far [`feed`] got.
enum Fed {
    /// A final block (BFINAL) ended the stream: the rest is ignored.
    Ended,
    /// All of the data inflated.
    All,
    /// The room ran out with `data[n..]` left (zlib holds no output back
    /// then: it stopped for want of room with input left).
    Paused(usize),
}

/// Inflates `data` into `out` (grown a chunk at a time, never past `cap`
/// and a byte: `out` must not start with more room than that), `check`ing
/// each new piece within the cap before the cap itself, until all of it is
/// in or `room` (less each piece inflated) runs out with data left. Once
/// all the data is in, what zlib still holds of it comes out whatever the
/// room (a few symbols' worth: its bit buffer).
fn feed(
    d: &mut Decompress,
    data: &[u8],
    cap: usize,
    room: &mut usize,
    out: &mut Vec<u8>,
    check: &mut impl FnMut(&[u8]) -> bool,
) -> Result<Fed, InflateError> {
    let mut pos = 0;
    loop {
        if *room == 0 && pos < data.len() {
            return Ok(Fed::Paused(pos));
        }
        if out.len() == out.capacity() {
            out.reserve_exact(inflate_room(out.len(), cap));
        }
        let (was_in, was_out) = (d.total_in(), d.total_out());
        let before = out.len();
        // `out`'s room only ever grows to the cap and a byte (above), so
        // decoding stops there.
        let window = if pos < data.len() { *room } else { usize::MAX };
        let result = if out.capacity() - before <= window {
            d.decompress_vec(&data[pos..], out, FlushDecompress::Sync)
        } else {
            // More room in the buffer than this call may fill: a window
            // of what it may, zeroed (zlib writes to initialised bytes).
            out.resize(before + window, 0);
            let r = d.decompress(&data[pos..], &mut out[before..], FlushDecompress::Sync);
            out.truncate(before + (d.total_out() - was_out) as usize);
            r
        };
        let full = out.len() == out.capacity() || out.len() - before == window;
        *room = room.saturating_sub(out.len() - before);
        let consumed = (d.total_in() - was_in) as usize;
        pos += consumed;
        // What was inflated counts first, even in a call that then failed
        // (zlib may fill the output and only then meet a bad code): so a
        // message fails at the same point however its bytes arrived.
        let checked = out.len().min(cap);
        if checked > before && !check(&out[before..checked]) {
            return Err(InflateError::Refused);
        }
        if out.len() > cap {
            return Err(InflateError::TooBig);
        }
        let status = result.map_err(|_| InflateError::Invalid)?;
        if status == Status::StreamEnd {
            // A final block (BFINAL) ended the message: what follows it is
            // ignored (RFC 7692 §7.2.3.4 shows a sender adding a 0x00).
            return Ok(Fed::Ended);
        }
        if pos == data.len() && !full {
            return Ok(Fed::All); // all in, and the output was not the limit
        }
        if consumed == 0 && d.total_out() == was_out && !full {
            return Err(InflateError::Invalid); // stuck: cannot happen with valid data
        }
    }
}

/// One unfragmented server frame for a message: compressed (RSV1) when
/// `agreed` allows it for this length and it shrinks, else plain.
pub fn message_frame(agreed: Option<Agreed>, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    match agreed
        .filter(|a| a.compresses(payload.len()))
        .and_then(|_| compress(payload))
    {
        Some(c) => compressed_server_frame(opcode, &c),
        None => server_frame(opcode, payload),
    }
}

/// How much longer than `len` bytes of data their deflate encoding may
/// be, generously: an eighth and 64 bytes. A client that compresses every
/// message (browsers do, once the extension is agreed) sends
/// incompressible data longer than it is: stored blocks cost 5 bytes each,
/// 5 per 64 KiB for zlib at its defaults (its `deflateBound`, ~0.03 %),
/// but a compressor with a small memory level or window cuts them far
/// shorter (zlib at `memLevel` 1: ~4 %), and each fragment's sync flush
/// adds an empty block. The wire caps of a compressed frame or message
/// are the caps plus this, so that a message within `--max-message-size`
/// is not refused for its encoding; it costs no memory, since compressed
/// bytes are inflated as they come and not kept, and what a message
/// inflates to is still held to the cap itself.
pub fn encoded_slack(len: u64) -> u64 {
    len / 8 + 64
}

/// Compresses one message's payload as a fresh stream with the full
/// window, returning the deflate data without the 4-byte tail (what a
/// frame with RSV1 carries); `None` when it would not be smaller.
pub fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        // Room for the worst case (stored blocks) in one go.
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 8 + 64);
        loop {
            let done = c.total_in() as usize;
            c.compress_vec(&payload[done..], &mut out, FlushCompress::Sync)
                .ok()?;
            // Spare room left after a sync flush: the flush is complete.
            if c.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        // A sync flush ends with the empty stored block's 00 00 ff ff.
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then_some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inflate output grows geometrically, never past the cap and a byte:
    /// reaching 16 MiB takes a few dozen steps (it took 1 024), and the
    /// room is never more than half again what it holds, or a chunk.
    #[test]
    fn inflate_output_grows_geometrically_up_to_the_cap() {
        for cap in [0, 1, 100, 16 * 1024, 16 << 20, (16 << 20) + 12_345] {
            let (mut capacity, mut steps) = (0usize, 0);
            while capacity <= cap {
                let grow = inflate_room(capacity, cap);
                assert!(grow >= 1);
                assert!(
                    grow <= INFLATE_CHUNK.max(capacity / 2),
                    "{cap}: {capacity} + {grow}"
                );
                capacity += grow;
                steps += 1;
            }
            assert_eq!(capacity, cap + 1, "stops at the cap and a byte");
            assert!(steps <= 32, "{cap}: {steps} steps");
        }
    }

    fn offer(s: &str) -> Option<Accepted> {
        negotiate(std::iter::once(s.as_bytes()))
    }

    #[test]
    fn offers_are_accepted_by_their_parameters() {
        let plain = Accepted {
            agreed: Agreed {
                server_window_bits: 15,
            },
            offered_server_bits: false,
        };
        assert_eq!(offer("permessage-deflate"), Some(plain));
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits"),
            Some(plain),
            "what browsers send"
        );
        assert_eq!(
            offer(
                "permessage-deflate; client_no_context_takeover; server_no_context_takeover; client_max_window_bits=10"
            ),
            Some(plain)
        );
        let ten = offer("permessage-deflate; server_max_window_bits=\"10\"").unwrap();
        assert_eq!(
            (ten.agreed.server_window_bits, ten.offered_server_bits),
            (10, true)
        );
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; mystery",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        // The first acceptable of several, in order, across header lines.
        let values: [&[u8]; 2] = [
            b"foo, permessage-deflate; bogus",
            b"permessage-deflate; server_max_window_bits=12, permessage-deflate",
        ];
        let a = negotiate(values.into_iter()).unwrap();
        assert_eq!(a.agreed.server_window_bits, 12);
        assert_eq!(
            a.agreed.response(a.offered_server_bits),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"
        );
    }

    #[test]
    fn a_window_limit_sends_longer_messages_uncompressed() {
        let a = Agreed {
            server_window_bits: 9,
        };
        assert!(!a.compresses(COMPRESS_FROM - 1));
        assert!(a.compresses(512));
        assert!(!a.compresses(513));
        let full = Agreed {
            server_window_bits: 15,
        };
        assert!(
            full.compresses(1 << 15) && full.compresses(COMPRESS_UP_TO),
            "any length up to the bound"
        );
        assert!(!full.compresses(COMPRESS_UP_TO + 1) && !full.compresses(16 << 20));
    }

    fn json_like(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let mut i = 0u64;
        while v.len() < n {
            v.extend_from_slice(
                format!(
                    r#"{{"sym":"EURUSD","bid":1.{:04},"ask":1.{:04}}},"#,
                    i % 9973,
                    (i * 7) % 9973
                )
                .as_bytes(),
            );
            i += 1;
        }
        v.truncate(n);
        v
    }

    #[test]
    fn compressed_messages_inflate_back_and_to_a_small_window() {
        for n in [64, 200, 512, 4096, 100_000] {
            let p = json_like(n);
            let c = compress(&p).expect("JSON-like text shrinks");
            assert!(c.len() < p.len());
            let mut out = Vec::new();
            inflate(&c, n, &mut out).unwrap();
            assert_eq!(out, p, "{n}");
            if n <= 512 {
                // A 9-bit inflater reads a message of at most 512 bytes.
                let mut d = Decompress::new_with_window_bits(false, 9);
                let mut small = vec![0u8; n + 16];
                let mut input = c.clone();
                input.extend_from_slice(&TAIL);
                d.decompress(&input, &mut small, FlushDecompress::Sync)
                    .unwrap();
                assert_eq!(&small[..d.total_out() as usize], &p[..], "{n} at 9 bits");
            }
        }
        // Random bytes do not shrink: sent as they are.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress(&noise), None);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_cap_and_garbage_is_invalid() {
        let zeros = vec![0u8; 10 << 20];
        let bomb = compress(&zeros).unwrap();
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        let mut out = Vec::new();
        assert_eq!(inflate(&bomb, 1 << 20, &mut out), Err(InflateError::TooBig));
        assert!(
            out.capacity() <= (1 << 20) + INFLATE_CHUNK + 1,
            "inflated at most the cap and a chunk: {}",
            out.capacity()
        );
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 1000, &mut out),
            Err(InflateError::Invalid)
        );
        // An empty message is the empty string.
        inflate(&[0x00], 1000, &mut out).unwrap();
        assert!(out.is_empty());
        // RFC 7692 §7.2.3.4: "Hello" in a final block, then a 0x00.
        inflate(
            &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
            1000,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"Hello");
        // §7.2.3.1's "Hello" (no final block), and the same again as a
        // second message through the reset inflater.
        for _ in 0..2 {
            inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 1000, &mut out).unwrap();
            assert_eq!(out, b"Hello");
        }
        // The cap is exact: 5 bytes inflate under a cap of 5, not of 4.
        inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 5, &mut out).unwrap();
        assert_eq!(
            inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 4, &mut out),
            Err(InflateError::TooBig)
        );
        // A cap at the top of the range does not overflow.
        inflate(&[0x00], usize::MAX, &mut out).unwrap();
    }

    /// Data cut short inside a block is refused, whole or in pieces
    /// (outside probe: the tail was taken as more of the block, and
    /// `hello\0\0\xff\xff` or Huffman noise was published), while every
    /// message a sender can make still inflates: a sync flush's end, a
    /// final block, the empty message, an empty payload.
    #[test]
    fn data_cut_short_inside_a_block_is_invalid() {
        let whole = |data: &[u8]| {
            let mut out = Vec::new();
            inflate(data, 1 << 20, &mut out).map(|_| out)
        };
        let pieces = |data: &[u8]| {
            let mut inf = Inflater::default();
            let mut out = Vec::new();
            for piece in data.chunks(3) {
                // In rooms of 7 bytes: each piece fed on where it stopped.
                let mut at = 0;
                while at < piece.len() {
                    at += inf.feed(&piece[at..], 1 << 20, &mut 7, &mut out, &mut |_| true)?;
                }
            }
            inf.finish(1 << 20, &mut out, &mut |_| true).map(|_| out)
        };
        // A stored block announcing 10 bytes that carries 5.
        let stored = [&[0x00, 0x0a, 0x00, 0xf5, 0xff][..], b"hello"].concat();
        let p = json_like(4096);
        let c = compress(&p).unwrap();
        let mut bad = vec![stored];
        for cut in 1..=8 {
            bad.push(c[..c.len() - cut].to_vec());
        }
        for data in &bad {
            assert_eq!(whole(data), Err(InflateError::Invalid), "{data:?}");
            assert_eq!(pieces(data), Err(InflateError::Invalid), "{data:?}");
        }
        let final_block = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        for (data, want) in [
            (&c[..], &p[..]),
            (&final_block[..], &b"Hello"[..]),
            (&[0x00][..], &b""[..]),
            (&[][..], &b""[..]),
            // A final empty stored block, its LEN and NLEN the tail.
            (&[0x01][..], &b""[..]),
        ] {
            assert_eq!(whole(data).as_deref(), Ok(want), "{data:?}");
            assert_eq!(pieces(data).as_deref(), Ok(want), "{data:?}");
        }
    }
}
