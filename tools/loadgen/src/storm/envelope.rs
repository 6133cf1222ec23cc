//! Reading what an enveloped subscriber receives ([`Envelope`]):
//! publications, snapshot and conflation markers, and the replies to its
//! control messages, in both forms of `docs/PROTOCOL.md`, "Envelopes".
//!
//! JSON (`corecast.v1`, text frames): a publication is read by a fast path
//! that expects the server's key order (`op`, `topic`, `epoch`, `seq`, then
//! `text` or `base64`); anything else goes through `serde_json`, so a
//! reordered but valid object is still understood. Binary
//! (`corecast.v1.binary`): kind, flags, topic length, epoch, seq (big-endian),
//! topic, payload. Control replies are JSON text in both forms.
//!
//! A publication's payload is loadgen's (see `fanout`): its first 16 bytes
//! are the publisher's number for the message and its send time, read here
//! from the raw bytes or from the first 24 characters of the base64.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use corecast::proto::OpCode;
use corecast::pubsub::envelope::{
    BINARY_HEADER_LEN, BINARY_KIND_CONFLATED, BINARY_KIND_PUBLICATION, BINARY_KIND_SNAPSHOT,
};
use serde_json::Value;
use std::borrow::Cow;

/// One recovering topic of a `subscribed` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub epoch: u64,
    /// The recovered publications `from ..= to` follow the reply (none when
    /// `from > to`); live ones continue at `to + 1`.
    pub from: u64,
    pub to: u64,
    pub complete: bool,
    /// Why not complete (`epoch`, `too_old`, `capped`, `ahead`, ...).
    pub reason: Option<String>,
}

/// What one frame from the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// A publication; `header` is loadgen's `(number, sent_ns)` from its
    /// payload, when it carries one.
    Pub {
        topic: Cow<'a, [u8]>,
        epoch: u64,
        seq: u64,
        header: Option<(u64, u64)>,
    },
    /// The next publication of `topic` is its last value.
    Snapshot {
        topic: Cow<'a, [u8]>,
        epoch: u64,
        seq: u64,
    },
    /// The next publication of `topic` replaced `replaced` older ones.
    Conflated {
        topic: Cow<'a, [u8]>,
        epoch: u64,
        seq: u64,
        replaced: u64,
    },
    /// The reply to a `subscribe`; `recovery` per topic that had a `since`
    /// (entries that do not read as one are left out).
    Subscribed { recovery: Vec<(String, Recovery)> },
    /// An error reply; `retry_ms` when the server asks to send the same
    /// again later ("recovery busy", over its `--max-recovery-rate`).
    Error {
        reason: String,
        retry_ms: Option<u64>,
    },
    /// Well-formed, but not anything a subscriber expects (another `op`,
    /// another binary kind): its name.
    Other(String),
    /// Not an envelope at all.
    Malformed,
}

impl Envelope<'_> {
    /// Reads one data frame.
    pub fn parse(opcode: OpCode, payload: &[u8]) -> Envelope<'_> {
        match opcode {
            OpCode::Binary => parse_binary(payload),
            _ => parse_json(payload),
        }
    }
}

/// A binary envelope.
fn parse_binary(b: &[u8]) -> Envelope<'_> {
    if b.len() < BINARY_HEADER_LEN {
        return Envelope::Malformed;
    }
    let n = u16::from_be_bytes([b[2], b[3]]) as usize;
    let be = |r: &[u8]| u64::from_be_bytes(r.try_into().expect("8 bytes"));
    let (epoch, seq) = (be(&b[4..12]), be(&b[12..20]));
    let Some(topic) = b.get(BINARY_HEADER_LEN..BINARY_HEADER_LEN + n) else {
        return Envelope::Malformed;
    };
    let rest = &b[BINARY_HEADER_LEN + n..];
    let topic = Cow::Borrowed(topic);
    match b[0] {
        BINARY_KIND_PUBLICATION => Envelope::Pub {
            topic,
            epoch,
            seq,
            header: crate::fanout::decode_payload(rest),
        },
        BINARY_KIND_SNAPSHOT => Envelope::Snapshot { topic, epoch, seq },
        BINARY_KIND_CONFLATED => match rest.get(..8) {
            Some(r) => Envelope::Conflated {
                topic,
                epoch,
                seq,
                replaced: be(r),
            },
            None => Envelope::Malformed,
        },
        kind => Envelope::Other(format!("binary_kind_{kind}")),
    }
}

/// A JSON envelope or reply: the fast path for publications, `serde_json`
/// for the rest.
fn parse_json(b: &[u8]) -> Envelope<'_> {
    if let Some(e) = fast_pub(b) {
        return e;
    }
    match serde_json::from_slice::<Value>(b) {
        Ok(v) => from_value(&v).unwrap_or(Envelope::Malformed),
        Err(_) => Envelope::Malformed,
    }
}

/// `{"op":"pub","topic":"T","epoch":E,"seq":S,"base64":"…"}` (or `"text"`)
/// in the server's key order; `None` for anything else.
fn fast_pub(b: &[u8]) -> Option<Envelope<'_>> {
    let rest = b.strip_prefix(br#"{"op":"pub","topic":""#)?;
    let q = rest.iter().position(|&c| c == b'"')?;
    let topic = &rest[..q];
    let rest = rest[q..].strip_prefix(br#"","epoch":"#)?;
    let (epoch, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","seq":"#)?;
    let (seq, rest) = number(rest)?;
    let (body, binary) = match rest.strip_prefix(br#","base64":""#) {
        Some(r) => (r, true),
        None => (rest.strip_prefix(br#","text":""#)?, false),
    };
    let body = body.strip_suffix(br#""}"#)?;
    Some(Envelope::Pub {
        topic: Cow::Borrowed(topic),
        epoch,
        seq,
        header: if binary { base64_header(body) } else { None },
    })
}

/// A decimal number at the start of `b`, and what follows it.
fn number(b: &[u8]) -> Option<(u64, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..n] {
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((v, &b[n..]))
}

/// Loadgen's payload header from the start of a base64 payload: 24
/// characters decode to 18 bytes, of which the first 16 are the header.
fn base64_header(b64: &[u8]) -> Option<(u64, u64)> {
    let mut raw = [0u8; 18];
    let n = BASE64.decode_slice(b64.get(..24)?, &mut raw).ok()?;
    crate::fanout::decode_payload(&raw[..n])
}

/// Any JSON frame, read from its parsed value.
fn from_value(v: &Value) -> Option<Envelope<'static>> {
    let op = v.get("op")?.as_str()?;
    let topic = || {
        v.get("topic")
            .and_then(Value::as_str)
            .map(|t| Cow::Owned(t.as_bytes().to_vec()))
    };
    let int = |k: &str| v.get(k).and_then(Value::as_u64);
    Some(match op {
        "pub" => Envelope::Pub {
            topic: topic()?,
            epoch: int("epoch")?,
            seq: int("seq")?,
            header: v
                .get("base64")
                .and_then(Value::as_str)
                .and_then(|s| base64_header(s.as_bytes())),
        },
        "snapshot" => Envelope::Snapshot {
            topic: topic()?,
            epoch: int("epoch")?,
            seq: int("seq")?,
        },
        "conflated" => Envelope::Conflated {
            topic: topic()?,
            epoch: int("epoch")?,
            seq: int("seq")?,
            replaced: int("replaced")?,
        },
        "subscribed" => Envelope::Subscribed {
            recovery: v
                .get("recovery")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(name, r)| Some((name.clone(), recovery(r)?)))
                        .collect()
                })
                .unwrap_or_default(),
        },
        "error" => Envelope::Error {
            reason: v
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            retry_ms: v.get("retry_ms").and_then(Value::as_u64),
        },
        other => Envelope::Other(format!("op_{other}")),
    })
}

fn recovery(r: &Value) -> Option<Recovery> {
    let int = |k: &str| r.get(k).and_then(Value::as_u64);
    Some(Recovery {
        epoch: int("epoch")?,
        from: int("from")?,
        to: int("to")?,
        complete: r.get("complete")?.as_bool()?,
        reason: r.get("reason").and_then(Value::as_str).map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::encode_payload_header;
    use corecast::pubsub::envelope::snapshot_marker;
    use corecast::pubsub::envelope::{Form, binary_frame, conflated_marker, json_frame};

    /// The payload of a frame built by the server's own code (its
    /// WebSocket header has at most 10 bytes before a 64 B-ish payload).
    fn body(frame: &[u8]) -> &[u8] {
        let h = corecast::proto::frame::parse_header(frame)
            .unwrap()
            .unwrap();
        &frame[h.header_len..]
    }

    fn payload(n: u64, ns: u64, size: usize) -> Vec<u8> {
        let mut p = encode_payload_header(n, ns).to_vec();
        p.resize(size, 0);
        p
    }

    #[test]
    fn json_publications_of_the_server_are_read_by_the_fast_path() {
        for size in [16, 17, 18, 64, 1000] {
            let f = json_frame(
                "s0",
                1_764_860_000_000_000,
                42,
                OpCode::Binary,
                &payload(7, 99, size),
            );
            let b = body(&f);
            assert!(fast_pub(b).is_some(), "size {size}");
            assert_eq!(
                Envelope::parse(OpCode::Text, b),
                Envelope::Pub {
                    topic: Cow::Borrowed(b"s0"),
                    epoch: 1_764_860_000_000_000,
                    seq: 42,
                    header: Some((7, 99)),
                }
            );
        }
        // A text payload: a publication without loadgen's header.
        let f = json_frame("t", 1, 2, OpCode::Text, b"h\"i");
        assert!(matches!(
            Envelope::parse(OpCode::Text, body(&f)),
            Envelope::Pub {
                seq: 2,
                header: None,
                ..
            }
        ));
    }

    #[test]
    fn other_key_orders_are_read_through_serde() {
        let b64 = BASE64.encode(payload(3, 4, 32));
        let text = format!(r#"{{"seq":5,"op":"pub","epoch":9,"base64":"{b64}","topic":"a"}}"#);
        assert_eq!(
            Envelope::parse(OpCode::Text, text.as_bytes()),
            Envelope::Pub {
                topic: Cow::Owned(b"a".to_vec()),
                epoch: 9,
                seq: 5,
                header: Some((3, 4)),
            }
        );
    }

    #[test]
    fn markers_in_both_forms() {
        for form in [Form::Json, Form::Binary] {
            let opcode = if form == Form::Json {
                OpCode::Text
            } else {
                OpCode::Binary
            };
            let snap = snapshot_marker(form, "s1", 3, 10).unwrap();
            assert_eq!(
                Envelope::parse(opcode, body(&snap)),
                match form {
                    Form::Json => Envelope::Snapshot {
                        topic: Cow::Owned(b"s1".to_vec()),
                        epoch: 3,
                        seq: 10
                    },
                    _ => Envelope::Snapshot {
                        topic: Cow::Borrowed(b"s1"),
                        epoch: 3,
                        seq: 10
                    },
                }
            );
            let c = conflated_marker(form, "s1", 3, 20, 4).unwrap();
            assert!(matches!(
                Envelope::parse(opcode, body(&c)),
                Envelope::Conflated {
                    epoch: 3,
                    seq: 20,
                    replaced: 4,
                    ..
                }
            ));
        }
    }

    #[test]
    fn binary_publications_and_bad_frames() {
        let f = binary_frame("s0", 5, 6, OpCode::Binary, &payload(1, 2, 64));
        assert_eq!(
            Envelope::parse(OpCode::Binary, body(&f)),
            Envelope::Pub {
                topic: Cow::Borrowed(b"s0"),
                epoch: 5,
                seq: 6,
                header: Some((1, 2)),
            }
        );
        let b = body(&f);
        assert_eq!(
            Envelope::parse(OpCode::Binary, &b[..19]),
            Envelope::Malformed
        );
        assert_eq!(
            Envelope::parse(OpCode::Binary, &b[..21]),
            Envelope::Malformed,
            "cut topic"
        );
        let mut other = b.to_vec();
        other[0] = 9;
        assert_eq!(
            Envelope::parse(OpCode::Binary, &other),
            Envelope::Other("binary_kind_9".into())
        );
        assert_eq!(
            Envelope::parse(OpCode::Text, b"{not json"),
            Envelope::Malformed
        );
        assert_eq!(Envelope::parse(OpCode::Text, b"[1,2]"), Envelope::Malformed);
        assert_eq!(
            Envelope::parse(OpCode::Text, br#"{"op":"pub","topic":"a"}"#),
            Envelope::Malformed,
            "a publication without its numbers"
        );
        assert_eq!(
            Envelope::parse(
                OpCode::Text,
                br#"{"op":"pub","topic":"a","epoch":1,"seq":99999999999999999999999,"text":""}"#
            ),
            Envelope::Malformed,
            "a number past u64"
        );
        assert_eq!(
            Envelope::parse(OpCode::Text, br#"{"op":"history","history":{}}"#),
            Envelope::Other("op_history".into())
        );
    }

    #[test]
    fn replies_with_recovery_and_errors() {
        use corecast::pubsub::history::{Gap, Recovery as Server};
        let server = |first, last, gap| Server {
            epoch: 7,
            first,
            last,
            messages: Vec::new(),
            gap,
        };
        let (a, b) = (server(43, 57, None), server(90, 95, Some(Gap::TooOld)));
        let text = corecast::pubsub::control::subscribed_with_recovery(
            &["a", "b", "c"],
            &[("a", &a), ("b", &b)],
        );
        let mut recovery = vec![
            (
                "a".to_string(),
                Recovery {
                    epoch: 7,
                    from: 43,
                    to: 57,
                    complete: true,
                    reason: None,
                },
            ),
            (
                "b".to_string(),
                Recovery {
                    epoch: 7,
                    from: 90,
                    to: 95,
                    complete: false,
                    reason: Some("too_old".into()),
                },
            ),
        ];
        assert_eq!(
            Envelope::parse(OpCode::Text, text.as_bytes()),
            Envelope::Subscribed {
                recovery: recovery.clone()
            }
        );
        // An entry that does not read as a recovery is left out.
        let bad = text.replace(r#""b":{"epoch":7"#, r#""b":{"epoch":"x""#);
        recovery.pop();
        assert_eq!(
            Envelope::parse(OpCode::Text, bad.as_bytes()),
            Envelope::Subscribed { recovery }
        );
        assert_eq!(
            Envelope::parse(OpCode::Text, br#"{"op":"subscribed","topics":["a"]}"#),
            Envelope::Subscribed { recovery: vec![] }
        );
        assert_eq!(
            Envelope::parse(
                OpCode::Text,
                br#"{"op":"error","reason":"too many topics"}"#
            ),
            Envelope::Error {
                reason: "too many topics".into(),
                retry_ms: None
            }
        );
        let busy = corecast::pubsub::control::busy(12);
        assert_eq!(
            Envelope::parse(OpCode::Text, busy.as_bytes()),
            Envelope::Error {
                reason: "recovery busy: try again".into(),
                retry_ms: Some(12)
            }
        );
    }
}
