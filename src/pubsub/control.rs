//! Subscriber control messages: JSON text frames on a `/ws` connection.
//!
//! ```text
//! → {"op":"subscribe","topics":["a","b"]}     ← {"op":"subscribed","topics":["a","b"]}
//! → {"op":"unsubscribe","topics":["a"]}       ← {"op":"unsubscribed","topics":["a"]}
//! → anything else                             ← {"op":"error","reason":"..."}
//! ```
//!
//! Parsed in place with simd-json (the frame payload is a scratch buffer).

use super::topic::{self, TopicError};
use simd_json::prelude::*;
use std::fmt;

/// Largest control message accepted, in bytes: 64 topics of 128 bytes fit
/// several times over; anything bigger is an error reply, not a parse.
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Subscribe,
    Unsubscribe,
}

/// A well-formed control message with validated topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub op: Op,
    pub topics: Vec<String>,
}

/// Why a control message was refused; its `Display` is the `reason` of the
/// `{"op":"error"}` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    /// Over [`MAX_CONTROL_BYTES`].
    TooLarge,
    /// Not JSON.
    Malformed,
    /// No `"op"` string (or not an object at all).
    MissingOp,
    /// An `"op"` other than `subscribe` or `unsubscribe`.
    UnknownOp,
    /// `"topics"` missing, not an array, or holding a non-string.
    TopicsNotStrings,
    /// A topic name that breaks the [`topic`] rules.
    Topic(TopicError),
    /// More topics than one connection may hold.
    TooManyTopics { max: usize },
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "control message over {MAX_CONTROL_BYTES} bytes"),
            Self::Malformed => f.write_str("malformed JSON"),
            Self::MissingOp => f.write_str("missing \"op\""),
            Self::UnknownOp => f.write_str("unknown op; expected subscribe or unsubscribe"),
            Self::TopicsNotStrings => f.write_str("\"topics\" must be an array of strings"),
            Self::Topic(e) => e.fmt(f),
            Self::TooManyTopics { max } => {
                write!(f, "too many topics: at most {max} per connection")
            }
        }
    }
}

impl std::error::Error for ControlError {}

impl From<TopicError> for ControlError {
    fn from(e: TopicError) -> Self {
        Self::Topic(e)
    }
}

/// Parses a control message.
pub fn parse(buf: &mut [u8], max_topic_len: usize) -> Result<Control, ControlError> {
    if buf.len() > MAX_CONTROL_BYTES {
        return Err(ControlError::TooLarge);
    }
    let value = simd_json::to_borrowed_value(buf).map_err(|_| ControlError::Malformed)?;
    let op = match value.get("op").and_then(|v| v.as_str()) {
        Some("subscribe") => Op::Subscribe,
        Some("unsubscribe") => Op::Unsubscribe,
        Some(_) => return Err(ControlError::UnknownOp),
        None => return Err(ControlError::MissingOp),
    };
    let list = value
        .get("topics")
        .and_then(|v| v.as_array())
        .ok_or(ControlError::TopicsNotStrings)?;
    let mut topics: Vec<String> = Vec::with_capacity(list.len());
    for t in list {
        let name = t.as_str().ok_or(ControlError::TopicsNotStrings)?;
        topic::validate(name, max_topic_len)?;
        if !topics.iter().any(|x| x == name) {
            topics.push(name.to_owned());
        }
    }
    Ok(Control { op, topics })
}

/// `{"op":"subscribed"|"unsubscribed","topics":[...]}`. Topic names need no
/// escaping (see [`topic`]).
pub fn reply<S: AsRef<str>>(op: Op, topics: &[S]) -> String {
    let word = match op {
        Op::Subscribe => "subscribed",
        Op::Unsubscribe => "unsubscribed",
    };
    let mut s = format!("{{\"op\":\"{word}\",\"topics\":[");
    for (i, t) in topics.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        s.push_str(t.as_ref());
        s.push('"');
    }
    s.push_str("]}");
    s
}

/// `{"op":"error","reason":"..."}` with the reason JSON-escaped.
pub fn error(reason: &str) -> String {
    let mut s = String::from("{\"op\":\"error\",\"reason\":\"");
    for c in reason.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push_str("\"}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Control, ControlError> {
        parse(&mut s.as_bytes().to_vec(), 16)
    }

    #[test]
    fn parses_subscribe_and_unsubscribe() {
        assert_eq!(
            p(r#"{"op":"subscribe","topics":["a","b","a"]}"#),
            Ok(Control {
                op: Op::Subscribe,
                topics: vec!["a".into(), "b".into()]
            })
        );
        assert_eq!(
            p(r#" { "topics" : [] , "op" : "unsubscribe" } "#),
            Ok(Control {
                op: Op::Unsubscribe,
                topics: vec![]
            })
        );
    }

    #[test]
    fn every_mistake_has_a_reason() {
        for (input, needle) in [
            ("not json", "malformed"),
            (r#"{"topics":["a"]}"#, "missing \"op\""),
            (r#"{"op":"dance","topics":["a"]}"#, "unknown op"),
            (r#"{"op":"subscribe"}"#, "array of strings"),
            (r#"{"op":"subscribe","topics":"a"}"#, "array of strings"),
            (r#"{"op":"subscribe","topics":[1]}"#, "array of strings"),
            (r#"{"op":"subscribe","topics":["a b"]}"#, "allowed"),
            (
                r#"{"op":"subscribe","topics":["aaaaaaaaaaaaaaaaaaaa"]}"#,
                "longer than 16",
            ),
            (r#"{"op":"subscribe","topics":[""]}"#, "empty"),
            ("[1,2]", "missing \"op\""),
        ] {
            let err = p(input).unwrap_err().to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
        let big = format!(
            r#"{{"op":"subscribe","topics":["{}"]}}"#,
            "a".repeat(MAX_CONTROL_BYTES)
        );
        assert_eq!(p(&big), Err(ControlError::TooLarge));
        assert!(
            ControlError::TooLarge
                .to_string()
                .contains("over 65536 bytes")
        );
    }

    #[test]
    fn replies_are_json() {
        assert_eq!(
            reply(Op::Subscribe, &["a", "b"]),
            r#"{"op":"subscribed","topics":["a","b"]}"#
        );
        assert_eq!(
            reply::<&str>(Op::Unsubscribe, &[]),
            r#"{"op":"unsubscribed","topics":[]}"#
        );
        assert_eq!(
            error("bad \"x\"\n"),
            r#"{"op":"error","reason":"bad \"x\"\u000a"}"#
        );
        // Our replies parse with the same parser.
        let mut r = reply(Op::Subscribe, &["x"]).into_bytes();
        assert!(simd_json::to_borrowed_value(&mut r).is_ok());
    }
}
