//! What a subscriber receives for one publication, by the protocol it
//! negotiated: the publisher's payload as it was (`corecast.raw`, the
//! default), or the payload in an envelope naming its topic, the topic's
//! epoch and the publication's sequence number: a JSON text form
//! (`corecast.v1`) or a compact binary form (`corecast.v1.binary`).
//! docs/PROTOCOL.md ("Envelopes") describes both byte by byte.
//!
//! A [`Message`] is one sequenced publication. Its raw frame is built by the
//! publisher's worker; each envelope form is built the first time any
//! worker delivers the message to a subscriber of that form, once, and
//! shared by every such subscriber on every worker. Nobody subscribed with
//! an envelope: nothing is built.

use crate::proto::frame::{MAX_HEADER_LEN, OpCode, encode_header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The subprotocol of the JSON envelope.
pub const JSON_PROTOCOL: &str = "corecast.v1";
/// The subprotocol of the binary envelope.
pub const BINARY_PROTOCOL: &str = "corecast.v1.binary";
/// The subprotocol naming today's raw payloads (also what a subscriber
/// gets without any subprotocol).
pub const RAW_PROTOCOL: &str = "corecast.raw";

/// The subprotocols a WebSocket publisher may negotiate besides
/// `--subprotocol`'s: with it, every message it publishes is acknowledged
/// with the epoch and number it got.
pub const PUBLISHER_PROTOCOLS: [&str; 1] = [JSON_PROTOCOL];

/// The acknowledgement of one published message (a text frame's payload).
pub fn ack(epoch: u64, seq: u64) -> String {
    format!(r#"{{"op":"ack","epoch":{epoch},"seq":{seq}}}"#)
}

/// The subprotocols a subscriber may negotiate besides `--subprotocol`'s,
/// in the server's order of preference.
pub const SUBSCRIBER_PROTOCOLS: [&str; 3] = [BINARY_PROTOCOL, JSON_PROTOCOL, RAW_PROTOCOL];

/// How a subscriber receives publications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Form {
    /// The payload as published, with the publisher's opcode.
    #[default]
    Raw = 0,
    /// A text frame holding one JSON object.
    Json = 1,
    /// A binary frame: a fixed header, the topic, the payload.
    Binary = 2,
    /// [`Self::Raw`] compressed (permessage-deflate), when it gains.
    RawDeflate = 3,
    /// [`Self::Json`] compressed, when it gains.
    JsonDeflate = 4,
    /// [`Self::Binary`] compressed, when it gains.
    BinaryDeflate = 5,
}

/// How many forms there are (for arrays indexed by `form as usize`).
pub const FORMS: usize = 6;

impl Form {
    /// The same form compressed (permessage-deflate agreed), or not.
    pub fn deflated(self, yes: bool) -> Self {
        match (self.base(), yes) {
            (Self::Raw, true) => Self::RawDeflate,
            (Self::Json, true) => Self::JsonDeflate,
            (Self::Binary, true) => Self::BinaryDeflate,
            (base, _) => base,
        }
    }

    /// The uncompressed form this one is built from.
    pub fn base(self) -> Self {
        match self {
            Self::RawDeflate => Self::Raw,
            Self::JsonDeflate => Self::Json,
            Self::BinaryDeflate => Self::Binary,
            plain => plain,
        }
    }

    /// Whether this is a compressed form.
    pub fn is_deflated(self) -> bool {
        self != self.base()
    }

    /// The form a negotiated subprotocol asks for (`--subprotocol`'s own
    /// names and no subprotocol at all: raw).
    pub fn of_subprotocol(name: Option<&str>) -> Self {
        match name {
            Some(JSON_PROTOCOL) => Self::Json,
            Some(BINARY_PROTOCOL) => Self::Binary,
            _ => Self::Raw,
        }
    }
}

/// Byte 0 of a binary envelope: a publication.
pub const BINARY_KIND_PUBLICATION: u8 = 1;
/// Byte 0 of a binary marker: the next publication of the topic is its
/// last value, published before the subscription (a snapshot).
pub const BINARY_KIND_SNAPSHOT: u8 = 2;
/// Kind byte of a binary conflation marker ([`conflated_marker`]).
pub const BINARY_KIND_CONFLATED: u8 = 3;
/// Flag bit (byte 1) of a binary envelope: the payload was published as text.
pub const BINARY_FLAG_TEXT: u8 = 1;
/// Bytes of a binary envelope before the topic name.
pub const BINARY_HEADER_LEN: usize = 20;

/// What a worker may still compress for its subscribers in this turn.
///
/// Compressing runs in one go on the worker's thread at 12–60 MB/s (level 6
/// on text an attacker picks, e.g. random `acgt`: ~5 ms for 60 KiB), so
/// publications compressed without a bound could hold a worker for
/// seconds: outside probe, one publisher of 100 messages of 60 KiB to a
/// topic with one permessage-deflate subscriber stalled every other
/// connection of the worker for half a second, three subscriber forms for
/// three seconds. Past the bound a publication goes uncompressed.
#[derive(Debug, Clone, Copy)]
pub struct CompressRoom {
    /// Bytes of base frames still to compress (the one that crosses the
    /// bound is compressed whole).
    pub bytes: usize,
    /// Publication forms settled uncompressed because the room was spent.
    pub skipped: usize,
}

impl CompressRoom {
    /// A turn's room: [`COMPRESS_PER_TURN`] bytes.
    pub fn turn() -> Self {
        Self {
            bytes: COMPRESS_PER_TURN,
            skipped: 0,
        }
    }

    /// No bound (a replay, a test).
    pub fn unbounded() -> Self {
        Self {
            bytes: usize::MAX,
            skipped: 0,
        }
    }
}

/// Bytes of publications a worker compresses per turn, at most (and one
/// more message, up to [`COMPRESS_UP_TO`](crate::proto::deflate::COMPRESS_UP_TO)):
/// ~2 ms at the speed of typical text (60 MB/s), ~15 ms on the slowest
/// text found (12 MB/s); a fan-out turn may take as long delivering
/// ([`MAX_DELIVERIES_PER_TURN`](crate::server::worker::MAX_DELIVERIES_PER_TURN)).
/// A burst of 1 KiB messages to 10 000 subscribers delivers ~100 of them a
/// turn per worker: all compressed.
pub const COMPRESS_PER_TURN: usize = 128 * 1024;

/// One publication, sequenced: its raw frame, and its envelope forms once built.
#[derive(Debug)]
pub struct Message {
    /// The complete raw server frame (header + payload), built once by the
    /// publisher's worker.
    pub frame: Bytes,
    /// The topic's history lifetime ([`TopicInterest::epoch`](super::directory::TopicInterest::epoch)).
    pub epoch: u64,
    /// Position in the topic's one order (from 1); 0 until dispatched.
    pub seq: u64,
    /// When the publisher's worker decoded it (for the latency histogram).
    pub published_at: Instant,
    /// The topic's name, set when it is numbered: what a worker receiving
    /// it through a pattern needs when the topic's entry is gone already.
    pub topic: Option<Arc<str>>,
    /// Its conflation key (`?key=` when published), if any: a conflating
    /// subscriber keeps the newest publication per key of a topic
    /// instead of per topic.
    pub key: Option<Arc<str>>,
    /// Bytes of envelopes built while a history held the message (what
    /// the history counts for it besides the raw frame; changed under
    /// the topic's history lock).
    pub envelope_bytes: std::sync::atomic::AtomicUsize,
    json: OnceLock<Bytes>,
    binary: OnceLock<Bytes>,
    /// The compressed forms (indexed by base form), built on first use;
    /// `None`: compressing does not gain, the base frame is sent (no
    /// second reference to it is kept: the ledger judges a frame held by
    /// its reference count).
    /// Boxed: a message nobody compresses pays one pointer and a state.
    deflated: OnceLock<Box<[OnceLock<Option<Bytes>>; 3]>>,
}

impl Message {
    /// A message not yet sequenced.
    pub fn new(frame: Bytes, published_at: Instant) -> Self {
        Self {
            frame,
            epoch: 0,
            seq: 0,
            published_at,
            topic: None,
            key: None,
            envelope_bytes: std::sync::atomic::AtomicUsize::new(0),
            json: OnceLock::new(),
            binary: OnceLock::new(),
            deflated: Default::default(),
        }
    }

    /// Bytes of every frame the message holds now: its raw frame and each
    /// form built for it (what keeping the message keeps).
    pub fn frames_len(&self) -> usize {
        let built = |c: &OnceLock<Bytes>| c.get().map_or(0, Bytes::len);
        let deflated = self.deflated.get().map_or(0, |cells| {
            cells
                .iter()
                .map(|c| c.get().and_then(Option::as_ref).map_or(0, Bytes::len))
                .sum()
        });
        self.frame.len() + built(&self.json) + built(&self.binary) + deflated
    }

    /// The same message with conflation key `key`.
    pub fn with_key(self, key: Option<Arc<str>>) -> Self {
        Self { key, ..self }
    }

    /// The frame for `form`, with `topic` the message's topic name; an
    /// envelope is built on first use (`built` is then called with its
    /// form and frame: a compressed form may build its base form too).
    pub fn frame_for(
        &self,
        form: Form,
        topic: &str,
        built: &mut impl FnMut(Form, &Bytes),
    ) -> &Bytes {
        self.frame_within(form, topic, built, &mut CompressRoom::unbounded())
    }

    /// [`Self::frame_for`], compressing only while `room` lasts: a
    /// compressed form whose frame is not built yet, found with no room
    /// left, is settled as its base frame (uncompressed, for every
    /// subscriber of the form, as permessage-deflate allows) and counted
    /// in `room.skipped`.
    pub fn frame_within(
        &self,
        form: Form,
        topic: &str,
        built: &mut impl FnMut(Form, &Bytes),
        room: &mut CompressRoom,
    ) -> &Bytes {
        if form.is_deflated() {
            return self.deflated_for(form, topic, built, room);
        }
        let (cell, encode): (_, fn(&Self, &str) -> Bytes) = match form {
            Form::Json => (&self.json, Self::encode_json),
            Form::Binary => (&self.binary, Self::encode_binary),
            _ => return &self.frame,
        };
        if let Some(f) = cell.get() {
            return f;
        }
        let mut fresh = None;
        let f = cell.get_or_init(|| {
            let f = encode(self, topic);
            fresh = Some(f.clone());
            f
        });
        if let Some(f) = &fresh {
            built(form, f);
        }
        f
    }

    /// A compressed form's frame: its base form's frame compressed once
    /// (permessage-deflate, a fresh stream: any subscriber that agreed to
    /// the extension can inflate it), or, when compressing does not gain
    /// (short, or not smaller), the base frame itself. `built` is called
    /// for each frame made (the base one too, if it is new).
    fn deflated_for(
        &self,
        form: Form,
        topic: &str,
        built: &mut impl FnMut(Form, &Bytes),
        room: &mut CompressRoom,
    ) -> &Bytes {
        let cells = self.deflated.get_or_init(Default::default);
        let cell = &cells[form.base() as usize];
        if let Some(f) = cell.get() {
            return f.as_ref().unwrap_or_else(|| self.base_frame(form));
        }
        let base = self.frame_for(form.base(), topic, built);
        let mut fresh = false;
        let f = cell.get_or_init(|| {
            let header = crate::proto::frame::parse_header(base)
                .ok()
                .flatten()
                .expect("a frame built here");
            let body = &base[header.header_len..];
            let compress =
                crate::proto::deflate::COMPRESS_FROM..=crate::proto::deflate::COMPRESS_UP_TO;
            if !compress.contains(&body.len()) {
                return None;
            }
            if room.bytes == 0 {
                room.skipped += 1;
                return None;
            }
            room.bytes = room.bytes.saturating_sub(body.len());
            let compressed = crate::proto::deflate::compress(body)?;
            fresh = true;
            Some(Bytes::from(crate::proto::frame::compressed_server_frame(
                header.opcode,
                &compressed,
            )))
        });
        match f {
            Some(f) => {
                if fresh {
                    built(form, f);
                }
                f
            }
            None => base,
        }
    }

    /// The base frame of `form`, built (a compressed form is only built
    /// after its base).
    fn base_frame(&self, form: Form) -> &Bytes {
        self.frame_of(form.base())
            .expect("a compressed form is built after its base")
    }

    /// The length of the frame of `form` (built or not: computed without
    /// building it; linear in the payload for JSON text). A compressed
    /// form not built yet counts as its base form (an upper bound).
    pub fn frame_len(&self, form: Form, topic: &str) -> usize {
        if let Some(f) = self.frame_of(form) {
            return f.len();
        }
        let form = form.base();
        if let Some(f) = self.frame_of(form) {
            return f.len();
        }
        let (opcode, payload) = self.payload();
        let body = match form {
            Form::Raw | Form::RawDeflate => return self.frame.len(),
            Form::Binary | Form::BinaryDeflate => BINARY_HEADER_LEN + topic.len() + payload.len(),
            Form::Json | Form::JsonDeflate => {
                let text = opcode == OpCode::Text;
                json_head(topic, self.epoch, self.seq, text).len()
                    + json_body_len(payload, text)
                    + 2
            }
        };
        let mut header = [0u8; MAX_HEADER_LEN];
        encode_header(&mut header, true, OpCode::Text, body as u64, None) + body
    }

    /// The frame of `form`, if built (the raw one always is).
    pub fn frame_of(&self, form: Form) -> Option<&Bytes> {
        match form {
            Form::Raw => Some(&self.frame),
            Form::Json => self.json.get(),
            Form::Binary => self.binary.get(),
            deflated => match self.deflated.get()?[deflated.base() as usize].get()? {
                Some(f) => Some(f),
                None => self.frame_of(deflated.base()),
            },
        }
    }

    /// The publisher's opcode and payload, read back from the raw frame.
    pub fn payload(&self) -> (OpCode, &[u8]) {
        let f = &self.frame;
        let opcode = if f[0] & 0x0F == OpCode::Text as u8 {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        let header = crate::proto::frame::parse_header(f)
            .ok()
            .flatten()
            .expect("a server frame built by encode_header")
            .header_len;
        (opcode, &f[header..])
    }

    fn encode_json(&self, topic: &str) -> Bytes {
        let (opcode, payload) = self.payload();
        Bytes::from(json_frame(topic, self.epoch, self.seq, opcode, payload))
    }

    fn encode_binary(&self, topic: &str) -> Bytes {
        let (opcode, payload) = self.payload();
        Bytes::from(binary_frame(topic, self.epoch, self.seq, opcode, payload))
    }
}

/// The JSON envelope up to the payload's string:
/// `{"op":"pub","topic":T,"epoch":E,"seq":S,"text":"` (or `"base64":"`).
fn json_head(topic: &str, epoch: u64, seq: u64, text: bool) -> String {
    let mut head = String::with_capacity(64 + topic.len());
    // Topic names need no escaping (see `topic`).
    head.push_str("{\"op\":\"pub\",\"topic\":\"");
    head.push_str(topic);
    head.push_str("\",\"epoch\":");
    head.push_str(itoa(epoch).as_str());
    head.push_str(",\"seq\":");
    head.push_str(itoa(seq).as_str());
    head.push_str(if text {
        ",\"text\":\""
    } else {
        ",\"base64\":\""
    });
    head
}

/// Bytes the payload takes inside the JSON envelope's string.
fn json_body_len(payload: &[u8], text: bool) -> usize {
    if text {
        escaped_len(payload)
    } else {
        base64::encoded_len(payload.len(), true).expect("payloads fit in memory")
    }
}

/// A complete text frame holding the JSON envelope:
/// `{"op":"pub","topic":T,"epoch":E,"seq":S,"text":"…"}` for a text
/// payload (a JSON string: `"`, `\` and control characters escaped, the
/// rest as is), `"base64":"…"` instead of `"text"` for a binary one.
pub fn json_frame(topic: &str, epoch: u64, seq: u64, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let text = opcode == OpCode::Text;
    let head = json_head(topic, epoch, seq, text);
    let body_len = json_body_len(payload, text);
    let len = head.len() + body_len + 2;
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, OpCode::Text, len as u64, None);
    let mut out = Vec::with_capacity(n + len);
    out.extend_from_slice(&hdr[..n]);
    out.extend_from_slice(head.as_bytes());
    if text {
        escape_into(payload, &mut out);
    } else {
        let at = out.len();
        out.resize(at + body_len, 0);
        let written = BASE64
            .encode_slice(payload, &mut out[at..])
            .expect("sized by encoded_len");
        debug_assert_eq!(written, body_len);
    }
    out.extend_from_slice(b"\"}");
    debug_assert_eq!(out.len(), n + len);
    out
}

/// A complete binary frame holding the binary envelope (all integers
/// big-endian): kind `1`, flags (bit 0: text), topic length (u16), epoch
/// (u64), seq (u64), the topic, the payload.
pub fn binary_frame(topic: &str, epoch: u64, seq: u64, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    binary_frame_of_kind(BINARY_KIND_PUBLICATION, topic, epoch, seq, opcode, payload)
}

fn binary_frame_of_kind(
    kind: u8,
    topic: &str,
    epoch: u64,
    seq: u64,
    opcode: OpCode,
    payload: &[u8],
) -> Vec<u8> {
    let topic_len = u16::try_from(topic.len()).expect("topic names are at most 65 535 bytes");
    let len = BINARY_HEADER_LEN + topic.len() + payload.len();
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, OpCode::Binary, len as u64, None);
    let mut out = Vec::with_capacity(n + len);
    out.extend_from_slice(&hdr[..n]);
    out.push(kind);
    out.push(if opcode == OpCode::Text {
        BINARY_FLAG_TEXT
    } else {
        0
    });
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The marker sent before a topic's last value to a new subscriber:
/// JSON `{"op":"snapshot","topic":T,"epoch":E,"seq":S}` (text), or a
/// binary frame with the publication's header layout, kind
/// [`BINARY_KIND_SNAPSHOT`], no payload. `None` for raw subscribers, who
/// get no snapshot.
pub fn snapshot_marker(form: Form, topic: &str, epoch: u64, seq: u64) -> Option<Bytes> {
    marker(form, topic, epoch, seq, None)
}

/// The marker sent before a publication that replaced `replaced` older
/// ones waiting for this subscriber (conflation): JSON
/// `{"op":"conflated","topic":T,"epoch":E,"seq":S,"replaced":N,"from":F}`
/// (text), or a binary frame with the publication's header layout, kind
/// [`BINARY_KIND_CONFLATED`] and as its payload `replaced` then `from`,
/// 8 bytes big-endian each. The publication numbered `seq` follows it;
/// numbers `from = seq - replaced` to `seq - 1` were replaced, not lost.
/// `None` for raw subscribers.
pub fn conflated_marker(
    form: Form,
    topic: &str,
    epoch: u64,
    seq: u64,
    replaced: u64,
) -> Option<Bytes> {
    conflated_marker_from(form, topic, epoch, seq, replaced, seq - replaced)
}

/// [`conflated_marker`] for a run of publications with conflation keys:
/// the newest of each key of the topic follow it, in number order, the
/// last numbered `seq`; of the numbers `from` to `seq`, the `replaced`
/// that do not follow were replaced.
pub fn conflated_marker_from(
    form: Form,
    topic: &str,
    epoch: u64,
    seq: u64,
    replaced: u64,
    from: u64,
) -> Option<Bytes> {
    marker(form, topic, epoch, seq, Some((replaced, from)))
}

/// A snapshot marker, or with `(replaced, from)` a conflation marker.
fn marker(
    form: Form,
    topic: &str,
    epoch: u64,
    seq: u64,
    replaced: Option<(u64, u64)>,
) -> Option<Bytes> {
    // Markers are short: never compressed.
    match form.base() {
        Form::Raw | Form::RawDeflate | Form::JsonDeflate | Form::BinaryDeflate => None,
        Form::Json => {
            let json = match replaced {
                None => {
                    format!(r#"{{"op":"snapshot","topic":"{topic}","epoch":{epoch},"seq":{seq}}}"#)
                }
                Some((n, from)) => format!(
                    r#"{{"op":"conflated","topic":"{topic}","epoch":{epoch},"seq":{seq},"replaced":{n},"from":{from}}}"#
                ),
            };
            Some(Bytes::from(crate::proto::frame::server_frame(
                OpCode::Text,
                json.as_bytes(),
            )))
        }
        Form::Binary => {
            let count = replaced.map(|(n, from)| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&n.to_be_bytes());
                b[8..].copy_from_slice(&from.to_be_bytes());
                b
            });
            let (kind, payload): (u8, &[u8]) = match &count {
                None => (BINARY_KIND_SNAPSHOT, &[]),
                Some(n) => (BINARY_KIND_CONFLATED, n),
            };
            Some(Bytes::from(binary_frame_of_kind(
                kind,
                topic,
                epoch,
                seq,
                OpCode::Binary,
                payload,
            )))
        }
    }
}

/// Decimal digits of `v`, without allocating.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).expect("ASCII digits")
    }
}

fn itoa(mut v: u64) -> Digits {
    let mut buf = [0u8; 20];
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    Digits { buf, start }
}

/// What byte `b` becomes inside a JSON string: itself (`None`) or an escape.
fn escape(b: u8) -> Option<&'static [u8]> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    const CONTROL: [[u8; 6]; 32] = {
        let mut t = [[0u8; 6]; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = [b'\\', b'u', b'0', b'0', HEX[i >> 4], HEX[i & 15]];
            i += 1;
        }
        t
    };
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        b'\n' => Some(b"\\n"),
        b'\r' => Some(b"\\r"),
        b'\t' => Some(b"\\t"),
        0..=0x1F => Some(&CONTROL[b as usize]),
        _ => None,
    }
}

/// Whether `b` needs an escape inside a JSON string.
#[inline]
fn special(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte of `chunk` needs an escape: no early exit, so the
/// compiler vectorizes it.
#[inline]
fn any_special(chunk: &[u8]) -> bool {
    chunk.iter().fold(false, |acc, &b| acc | special(b))
}

/// Bytes `text` takes as the inside of a JSON string. 64-byte blocks
/// without a special byte (most text) count as themselves.
fn escaped_len(text: &[u8]) -> usize {
    text.chunks(64)
        .map(|c| {
            if any_special(c) {
                c.iter().map(|&b| escape(b).map_or(1, <[u8]>::len)).sum()
            } else {
                c.len()
            }
        })
        .sum()
}

/// Appends `text` escaped as the inside of a JSON string: runs that need
/// no escape (whole 64-byte blocks found at vector speed) are copied whole.
fn escape_into(text: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    let mut at = 0;
    for c in text.chunks(64) {
        if any_special(c) {
            for (k, &b) in c.iter().enumerate() {
                if let Some(e) = escape(b) {
                    out.extend_from_slice(&text[start..at + k]);
                    out.extend_from_slice(e);
                    start = at + k + 1;
                }
            }
        }
        at += c.len();
    }
    out.extend_from_slice(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::server_frame;

    fn payload_of(frame: &[u8]) -> &[u8] {
        let h = match frame[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        &frame[h..]
    }

    #[test]
    fn the_json_form_of_a_text_payload_is_one_json_object_with_the_text_as_a_string() {
        let text = "quote \"x\" \\ \n\t\u{1}é€";
        let f = json_frame("prices.EURUSD", 7, 42, OpCode::Text, text.as_bytes());
        assert_eq!(f[0], 0x81, "FIN + text");
        let v: serde_json::Value = serde_json::from_slice(payload_of(&f)).expect("valid JSON");
        assert_eq!(v["op"], "pub");
        assert_eq!(v["topic"], "prices.EURUSD");
        assert_eq!(v["epoch"], 7);
        assert_eq!(v["seq"], 42);
        assert_eq!(v["text"], text);
        assert!(v.get("base64").is_none());
        assert_eq!(
            std::str::from_utf8(payload_of(&json_frame("t", 1, 2, OpCode::Text, b"hi"))),
            Ok(r#"{"op":"pub","topic":"t","epoch":1,"seq":2,"text":"hi"}"#),
            "the documented example"
        );
    }

    #[test]
    fn the_json_form_of_a_binary_payload_carries_it_in_base64() {
        let bytes: Vec<u8> = (0..=255).collect();
        let f = json_frame("t", u64::MAX, 1, OpCode::Binary, &bytes);
        let v: serde_json::Value = serde_json::from_slice(payload_of(&f)).expect("valid JSON");
        assert_eq!(v["epoch"], u64::MAX);
        assert_eq!(BASE64.decode(v["base64"].as_str().unwrap()).unwrap(), bytes);
        assert!(v.get("text").is_none());
        assert_eq!(
            std::str::from_utf8(payload_of(&json_frame(
                "t",
                1,
                2,
                OpCode::Binary,
                &[0, 255]
            ))),
            Ok(r#"{"op":"pub","topic":"t","epoch":1,"seq":2,"base64":"AP8="}"#)
        );
    }

    #[test]
    fn every_length_gets_a_correct_frame_header() {
        for n in [0, 1, 50, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![b'a'; n];
            for f in [
                json_frame("t", 1, 1, OpCode::Text, &payload),
                json_frame("t", 1, 1, OpCode::Binary, &payload),
                binary_frame("t", 1, 1, OpCode::Binary, &payload),
            ] {
                let h = crate::proto::frame::parse_header(&f)
                    .expect("valid")
                    .expect("complete");
                assert_eq!(
                    h.header_len as u64 + h.payload_len,
                    f.len() as u64,
                    "n = {n}"
                );
            }
        }
    }

    #[test]
    fn the_binary_form_is_header_topic_payload() {
        let f = binary_frame("ab", 0x0102, 0x0304, OpCode::Text, b"xyz");
        let p = payload_of(&f);
        assert_eq!(f[0], 0x82, "FIN + binary");
        assert_eq!(
            p,
            [
                1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 3, 4, b'a', b'b', b'x', b'y',
                b'z'
            ]
        );
        assert_eq!(
            binary_frame("ab", 1, 1, OpCode::Binary, b"")[3],
            0,
            "flags: binary"
        );
    }

    #[test]
    fn a_message_builds_each_form_once_and_reads_its_payload_back() {
        let mut m = Message::new(
            Bytes::from(server_frame(OpCode::Text, &[b'q'; 300])),
            Instant::now(),
        );
        m.epoch = 9;
        m.seq = 3;
        assert_eq!(m.payload(), (OpCode::Text, &[b'q'; 300][..]));
        let mut built = 0;
        let raw = m.frame_for(Form::Raw, "t", &mut |_, _| built += 1).clone();
        assert_eq!(raw, m.frame);
        let a = m.frame_for(Form::Json, "t", &mut |_, _| built += 1).clone();
        let b = m.frame_for(Form::Json, "t", &mut |_, _| built += 1).clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one frame, shared");
        let c = m
            .frame_for(Form::Binary, "t", &mut |_, _| built += 1)
            .clone();
        assert_eq!(built, 2, "each envelope once, raw never");
        // The length without building, for every size and form.
        for n in [0, 1, 100, 125, 126, 65_535, 65_536, 70_000] {
            for op in [OpCode::Text, OpCode::Binary] {
                let payload: Vec<u8> = (0..n).map(|i| (i % 40) as u8).collect();
                let mut m = Message::new(Bytes::from(server_frame(op, &payload)), Instant::now());
                m.epoch = 1_764_860_000_000_000;
                m.seq = 12_345;
                for form in [Form::Raw, Form::Json, Form::Binary] {
                    let predicted = m.frame_len(form, "prices.EURUSD");
                    let built = m.frame_for(form, "prices.EURUSD", &mut |_, _| {}).len();
                    assert_eq!(predicted, built, "{n} bytes, {op:?}, {form:?}");
                }
            }
        }
        assert_eq!(&c[4..6], &[1, 1]);
        assert_eq!(
            Form::of_subprotocol(Some("corecast.v1.binary")),
            Form::Binary
        );
        assert_eq!(Form::of_subprotocol(Some("corecast.v1")), Form::Json);
        assert_eq!(Form::of_subprotocol(Some("chat")), Form::Raw);
        assert_eq!(Form::of_subprotocol(None), Form::Raw);
    }

    #[test]
    fn numbers_print_in_decimal() {
        for v in [0, 9, 10, 12_345, u64::MAX] {
            assert_eq!(itoa(v).as_str(), v.to_string());
        }
    }

    #[test]
    fn escaping_agrees_with_an_independent_json_reader_at_every_length_and_position() {
        // Specials at every offset around the 64-byte blocks.
        for len in [0, 1, 63, 64, 65, 127, 128, 200] {
            for at in [0, 1, 31, 63, 64, 65, 127, 199] {
                for special in [b'"', b'\\', b'\n', 0x01, 0x1f, b'a'] {
                    let mut text = vec![b'x'; len];
                    if at < len {
                        text[at] = special;
                    }
                    let mut out = Vec::new();
                    escape_into(&text, &mut out);
                    assert_eq!(out.len(), escaped_len(&text), "len {len} at {at}");
                    let quoted = [&b"\""[..], &out, &b"\""[..]].concat();
                    let back: String = serde_json::from_slice(&quoted).expect("valid JSON string");
                    assert_eq!(back.as_bytes(), &text[..], "len {len} at {at}");
                }
            }
        }
    }
    /// A publication longer than COMPRESS_UP_TO goes to deflate
    /// subscribers uncompressed, in every form: compressing 16 MB of
    /// control characters as a JSON envelope (~96 MB) took seconds, while
    /// every worker needing that form waited (outside probe). Up to the
    /// bound it is compressed.
    #[test]
    fn a_publication_over_the_compression_bound_goes_uncompressed() {
        use crate::proto::deflate::COMPRESS_UP_TO;
        let rsv1 = |f: &Bytes| f[0] & 0x40 != 0;
        for (len, compressed) in [(COMPRESS_UP_TO, true), (COMPRESS_UP_TO + 1, false)] {
            let m = Message::new(
                Bytes::from(server_frame(OpCode::Text, &vec![b'a'; len])),
                Instant::now(),
            );
            let raw = m.frame_for(Form::RawDeflate, "t", &mut |_, _| {}).clone();
            assert_eq!(rsv1(&raw), compressed, "{len} B, raw");
            assert_eq!(raw == m.frame, !compressed);
            // The JSON envelope is longer than the payload: over the bound.
            let json = m.frame_for(Form::JsonDeflate, "t", &mut |_, _| {}).clone();
            assert!(!rsv1(&json), "{len} B as JSON");
        }
    }

    #[test]
    fn compression_stops_where_the_turns_room_ends_and_that_frame_stays_plain() {
        let rsv1 = |f: &Bytes| f[0] & 0x40 != 0;
        let text = |i: u8| {
            Message::new(
                Bytes::from(server_frame(OpCode::Text, &vec![b'a' + i; 40 * 1024])),
                Instant::now(),
            )
        };
        let mut room = CompressRoom {
            bytes: 100 * 1024,
            skipped: 0,
        };
        let msgs: Vec<Message> = (0..5).map(text).collect();
        let mut built = 0;
        let frames: Vec<Bytes> = msgs
            .iter()
            .map(|m| {
                m.frame_within(Form::RawDeflate, "t", &mut |_, _| built += 1, &mut room)
                    .clone()
            })
            .collect();
        // 40 KiB each: the third crosses the bound and is compressed
        // whole; the fourth finds no room.
        let compressed: Vec<bool> = frames.iter().map(rsv1).collect();
        assert_eq!(compressed, [true, true, true, false, false]);
        assert_eq!((room.bytes, room.skipped, built), (0, 2, 3));
        assert!(frames[3] == msgs[3].frame && frames[4] == msgs[4].frame);
        // Settled: a later turn with room sends the same plain frame, so
        // every subscriber of the form gets the same bytes.
        let mut fresh = CompressRoom::turn();
        let again = msgs[3].frame_within(Form::RawDeflate, "t", &mut |_, _| {}, &mut fresh);
        assert!(!rsv1(again) && fresh.bytes == COMPRESS_PER_TURN && fresh.skipped == 0);
        // Plain forms need no room.
        let mut none = CompressRoom {
            bytes: 0,
            skipped: 0,
        };
        let json = msgs[4].frame_within(Form::Json, "t", &mut |_, _| {}, &mut none);
        assert!(!rsv1(json) && none.skipped == 0);
    }
}
