//! What a fanout publisher sends ([`Payloads`]): the synthetic binary
//! payload (`fanout::push_message`: sequence number, send time, zeros to
//! `--size`), or the lines of a corpus file (`--corpus`) as text messages.
//!
//! A corpus line is one JSON object (`{...}`). Message `seq` of a topic
//! carries line `seq mod L`, its opening brace replaced by the same header
//! the binary payload has, in text:
//!
//! ```text
//! {"seq":12,"sent_ns":123456789012,"type":"book",...the rest of the line
//! ```
//!
//! so the message is still one JSON object, and a subscriber that reads it
//! gets its sequence number and send time (for loss, order and latency)
//! and can check the rest against the corpus byte for byte
//! ([`Corpus::check`]).

use crate::fanout::push_message;
use corecast::proto::OpCode;
use corecast::proto::frame::{MAX_HEADER_LEN, encode_header};
use corecast::proto::mask::apply_mask;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest corpus file read.
const MAX_CORPUS_BYTES: u64 = 64 << 20;
/// The text header's start; the line's own `{` is dropped.
const SEQ_KEY: &str = "{\"seq\":";
/// Between the sequence number and the send time.
const SENT_KEY: &str = ",\"sent_ns\":";
/// The longest text header: two 20-digit numbers, the keys and a comma.
const MAX_TEXT_HEADER: usize = SEQ_KEY.len() + 20 + SENT_KEY.len() + 20 + 1;

/// The lines of a corpus file, each a JSON object on one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Corpus {
    pub path: PathBuf,
    lines: Vec<String>,
}

impl Corpus {
    /// Reads `path`: non-empty lines, each starting with `{` and ending
    /// with `}` (a JSON object), at least one.
    pub fn load(path: &Path) -> Result<Self, String> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CORPUS_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| format!("--corpus {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_CORPUS_BYTES {
            return Err(format!(
                "--corpus {}: over {MAX_CORPUS_BYTES} bytes",
                path.display()
            ));
        }
        Self::from_lines(path, &text)
    }

    fn from_lines(path: &Path, text: &str) -> Result<Self, String> {
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        if lines.is_empty() {
            return Err(format!("--corpus {}: no lines", path.display()));
        }
        if let Some(i) = lines
            .iter()
            .position(|l| !(l.starts_with('{') && l.ends_with('}')))
        {
            return Err(format!(
                "--corpus {}: line {} is not a JSON object on one line",
                path.display(),
                i + 1
            ));
        }
        let max = crate::client::MAX_FRAME_PAYLOAD as usize - MAX_TEXT_HEADER;
        if let Some(i) = lines.iter().position(|l| l.len() > max) {
            return Err(format!(
                "--corpus {}: line {} is over {max} bytes",
                path.display(),
                i + 1
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            lines,
        })
    }

    /// The line message `seq` carries.
    fn line(&self, seq: u64) -> &str {
        &self.lines[(seq % self.lines.len() as u64) as usize]
    }

    /// Mean length of a line, in bytes.
    pub fn mean_len(&self) -> usize {
        self.lines.iter().map(String::len).sum::<usize>() / self.lines.len()
    }

    /// Appends message `seq`'s payload to `out`.
    pub fn push_body(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64) {
        use std::io::Write;
        let _ = write!(out, "{SEQ_KEY}{seq}{SENT_KEY}{sent_ns},");
        out.extend_from_slice(&self.line(seq).as_bytes()[1..]);
    }

    /// Whether `payload` is exactly message `seq`'s, sent at `sent_ns`:
    /// what [`decode_text`] read from it.
    pub fn check(&self, payload: &[u8], seq: u64, sent_ns: u64) -> bool {
        let mut want = Vec::with_capacity(payload.len());
        self.push_body(&mut want, seq, sent_ns);
        want == payload
    }
}

/// `(seq, sent_ns)` from a corpus message's text header; `None` if it has
/// none.
pub fn decode_text(payload: &[u8]) -> Option<(u64, u64)> {
    fn number(b: &[u8]) -> Option<(u64, &[u8])> {
        let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let v = std::str::from_utf8(&b[..n]).ok()?.parse().ok()?;
        Some((v, &b[n..]))
    }
    let (seq, rest) = number(payload.strip_prefix(SEQ_KEY.as_bytes())?)?;
    let (sent, rest) = number(rest.strip_prefix(SENT_KEY.as_bytes())?)?;
    rest.starts_with(b",").then_some((seq, sent))
}

/// What the fanout publisher sends.
#[derive(Debug, Clone)]
pub enum Payloads {
    /// Binary: the sequence number and send time, zeros to `size` bytes.
    Synthetic { size: usize },
    /// Text: the corpus's lines, round-robin by sequence number.
    Corpus(Arc<Corpus>),
}

impl Payloads {
    /// The plan's payloads: its corpus if it has one, else synthetic ones.
    pub fn of(corpus: Option<&Corpus>, size: usize) -> Self {
        match corpus {
            Some(c) => Self::Corpus(Arc::new(c.clone())),
            None => Self::Synthetic { size },
        }
    }

    /// The `Content-Type` of an HTTP publish.
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Synthetic { .. } => "application/octet-stream",
            Self::Corpus(_) => "text/plain; charset=utf-8",
        }
    }

    /// Appends message `seq`'s payload to `out`.
    pub fn push_body(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64) {
        match self {
            Self::Synthetic { size } => {
                let start = out.len();
                out.extend_from_slice(&crate::fanout::encode_payload_header(seq, sent_ns));
                out.resize(start + size, 0);
            }
            Self::Corpus(c) => c.push_body(out, seq, sent_ns),
        }
    }

    /// Appends message `seq` as one masked, unfragmented client frame.
    pub fn push_frame(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64, mask: [u8; 4]) {
        let c = match self {
            Self::Synthetic { size } => return push_message(out, seq, sent_ns, *size, mask),
            Self::Corpus(c) => c,
        };
        let mut body = Vec::with_capacity(MAX_TEXT_HEADER + c.line(seq).len());
        c.push_body(&mut body, seq, sent_ns);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut hdr, true, OpCode::Text, body.len() as u64, Some(mask));
        out.extend_from_slice(&hdr[..n]);
        let start = out.len();
        out.extend_from_slice(&body);
        apply_mask(&mut out[start..], mask, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::parse_header;

    fn corpus() -> Corpus {
        Corpus::from_lines(
            Path::new("t.jsonl"),
            "{\"type\":\"quote\",\"px\":\"1.0\"}\n\n{\"type\":\"book\"}\n",
        )
        .unwrap()
    }

    #[test]
    fn a_corpus_message_is_the_line_behind_a_text_header() {
        let c = corpus();
        let mut out = Vec::new();
        c.push_body(&mut out, 3, 123_456_789_012);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"seq":3,"sent_ns":123456789012,"type":"book"}"#
        );
        assert_eq!(decode_text(&out), Some((3, 123_456_789_012)));
        assert!(c.check(&out, 3, 123_456_789_012));
        assert!(!c.check(&out, 2, 123_456_789_012), "another line");
        let mut bad = out.clone();
        *bad.last_mut().unwrap() = b']';
        assert!(!c.check(&bad, 3, 123_456_789_012), "a changed byte");
        for junk in [
            &b"{\"seq\":x"[..],
            b"{\"seq\":1,\"sent_ns\":2}",
            b"",
            b"[1,2]",
        ] {
            assert_eq!(decode_text(junk), None, "{junk:?}");
        }
        assert_eq!(c.mean_len(), (28 + 15) / 2);
    }

    #[test]
    fn a_corpus_must_hold_json_objects_one_per_line() {
        let p = Path::new("x");
        assert!(Corpus::from_lines(p, "\n\n").is_err());
        assert!(
            Corpus::from_lines(p, "{}\n[1]\n")
                .unwrap_err()
                .contains("line 2")
        );
        assert!(Corpus::from_lines(p, "{\n}\n").is_err());
    }

    #[test]
    fn the_committed_corpus_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/quotes-1k.jsonl");
        let c = Corpus::load(&path).unwrap();
        assert_eq!(c.lines.len(), 400);
        assert!((900..1150).contains(&c.mean_len()), "{}", c.mean_len());
    }

    #[test]
    fn frames_carry_the_payload_with_its_opcode() {
        let text = Payloads::of(Some(&corpus()), 0);
        let mut out = Vec::new();
        text.push_frame(&mut out, 0, 7, [1, 2, 3, 4]);
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!((h.opcode, h.fin), (OpCode::Text, true));
        let mut p = out[h.header_len..].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(decode_text(&p), Some((0, 7)));
        let mut body = Vec::new();
        text.push_body(&mut body, 0, 7);
        assert_eq!(p, body);
        assert_eq!(text.content_type(), "text/plain; charset=utf-8");

        let bin = Payloads::of(None, 64);
        let mut out = Vec::new();
        bin.push_frame(&mut out, 5, 9, [0; 4]);
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len), (OpCode::Binary, 64));
        let mut body = Vec::new();
        bin.push_body(&mut body, 5, 9);
        assert_eq!(&out[h.header_len..], &body[..]);
    }
}
