//! Subscriber control messages: JSON text frames on a `/ws` connection.
//!
//! ```text
//! → {"op":"subscribe","topics":["a","b"]}     ← {"op":"subscribed","topics":["a","b"]}
//! → {"op":"unsubscribe","topics":["a"]}       ← {"op":"unsubscribed","topics":["a"]}
//! → {"op":"history","topics":["a"]}           ← {"op":"history","history":{"a":{"epoch":E,"first":F,"last":L}}}
//! → {"op":"subscribe","topics":["a"],"since":{"a":{"epoch":E,"seq":S}}}
//!                                    ← {"op":"subscribed","topics":["a"],"recovery":{"a":{…}}}
//! → anything else                             ← {"op":"error","reason":"..."}
//! ```
//!
//! Parsed in place with simd-json (the frame payload is a scratch buffer),
//! after two checks that bound what the parse costs a worker: the size
//! ([`MAX_CONTROL_BYTES`]) and, in one pass over the bytes, the nesting
//! depth ([`MAX_CONTROL_DEPTH`]), because simd-json builds its value
//! recursively, one stack frame per level. simd-json (from 0.18) also stops
//! at 1 024 levels itself; the check here keeps the limit ours, small and
//! documented, whatever version is linked. A second pass refuses a `\u`
//! escape of half a surrogate pair, which simd-json would read as U+0000.

use super::history::{Recovery, Since};
use super::pattern;
use super::shard::PATTERN_REPLAY_TOPICS;
use super::topic::{self, DistinctNames, ListError, TopicError};
use simd_json::prelude::*;
use std::fmt;

/// Largest control message accepted, in bytes: 64 topics of 128 bytes fit
/// several times over; anything bigger is an error reply, not a parse.
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Deepest nesting of arrays and objects accepted in a control message.
///
/// A control message needs 2 levels (`{"op":…,"topics":[…]}`). Other keys
/// are ignored, so 16 leaves room for later protocol fields and a client's
/// own nested metadata. The bound is what keeps a parse off the end of a
/// worker's stack ([`WORKER_STACK_BYTES`](crate::server::WORKER_STACK_BYTES)):
/// simd-json's value builder recurses once per level, about 0.5 KiB each in a
/// debug build, so 16 levels take a few KiB where 6 000 overflowed 2 MiB.
pub const MAX_CONTROL_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Subscribe,
    Unsubscribe,
    /// What the named topics' histories hold (nothing subscribed).
    History,
    /// A new token for the connection (`{"op":"refresh","token":"…"}`;
    /// no topics).
    Refresh,
}

/// What a control message may ask for: the `--max-topic-len` and
/// `--max-topics-per-conn` in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest topic name, in bytes.
    pub max_topic_len: usize,
    /// Most distinct topics one connection holds, so the most one message
    /// may name (either op: a connection cannot hold more to unsubscribe).
    pub max_topics: usize,
    /// Most of them that may be patterns (`--max-patterns-per-conn`): a
    /// message naming more is refused before its `since` is read.
    pub max_patterns: usize,
}

/// A well-formed control message with validated topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub op: Op,
    pub topics: Vec<String>,
    /// A subscribe's positions to recover from, one per topic it names
    /// (`None` for a topic without one); empty when there is no `since`.
    pub since: Vec<Option<Since>>,
    /// Positions for topics the message does not name but one of its
    /// patterns matches (at most [`PATTERN_REPLAY_TOPICS`]).
    pub pattern_since: Vec<(String, Since)>,
    /// A subscribe's `max_rate`: the most publications per second of each
    /// topic of the names it lists (0 or absent: no limit).
    pub max_rate: Option<u32>,
    /// A refresh's token.
    pub token: Option<String>,
}

/// The most a `max_rate` may be (updates per second per topic).
pub const MAX_RATE: u32 = 1000;

/// Why a control message was refused; its `Display` is the `reason` of the
/// `{"op":"error"}` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    /// Over [`MAX_CONTROL_BYTES`].
    TooLarge,
    /// Arrays and objects nested deeper than [`MAX_CONTROL_DEPTH`].
    TooDeep,
    /// Not JSON.
    Malformed,
    /// A `\u` escape of a UTF-16 surrogate without its pair: JSON text,
    /// but no Unicode string (RFC 8259 §8.2).
    UnpairedSurrogate,
    /// No `"op"` string (or not an object at all).
    MissingOp,
    /// An `"op"` other than `subscribe` or `unsubscribe`.
    UnknownOp,
    /// `"topics"` missing, not an array, or holding a non-string.
    TopicsNotStrings,
    /// A topic name that breaks the [`topic`](super::topic) rules.
    Topic(TopicError),
    /// More distinct topics than one connection may hold: named in the
    /// message, or the message's new ones added to those held.
    TooManyTopics { max: usize },
    /// More patterns than one connection may hold, named in the message.
    TooManyPatterns { max: usize },
    /// `"since"` is not an object of `{"epoch":N,"seq":N}` for topics the
    /// message names or its patterns match.
    BadSince,
    /// `"since"` names a topic twice, or a position gives `"epoch"` or
    /// `"seq"` twice (parsers differ on which one counts, as for the
    /// message's own keys).
    DuplicateSince,
    /// `"max_rate"` is not an integer from 0 to [`MAX_RATE`] (or not on a
    /// subscribe).
    BadRate,
    /// A refresh without a `"token"` string.
    NoToken,
    /// A key this message's meaning rests on (`op`, `topics`, `since`,
    /// `max_rate`, `token`) given twice: parsers disagree on which one
    /// counts (first or last), so a proxy that checks the message could
    /// read another than ours.
    DuplicateKey(&'static str),
}

/// The keys a control message's meaning rests on: each at most once.
const KEYS: [&str; 5] = ["op", "topics", "since", "max_rate", "token"];

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "control message over {MAX_CONTROL_BYTES} bytes"),
            Self::TooDeep => write!(
                f,
                "control message nested deeper than {MAX_CONTROL_DEPTH} levels"
            ),
            Self::Malformed => f.write_str("malformed JSON"),
            Self::UnpairedSurrogate => f.write_str("malformed JSON: unpaired surrogate escape"),
            Self::MissingOp => f.write_str("missing \"op\""),
            Self::UnknownOp => {
                f.write_str("unknown op; expected subscribe, unsubscribe, history or refresh")
            }
            Self::NoToken => f.write_str("a refresh needs \"token\": a string"),
            Self::DuplicateKey(k) => write!(f, "\"{k}\" given more than once"),
            Self::TopicsNotStrings => f.write_str("\"topics\" must be an array of strings"),
            Self::Topic(e) => e.fmt(f),
            Self::TooManyTopics { max } => ListError::TooMany { max: *max }.fmt(f),
            Self::TooManyPatterns { max } => write!(
                f,
                "too many patterns: at most {max} per connection (see --max-patterns-per-conn)"
            ),
            Self::BadRate => write!(
                f,
                "\"max_rate\" must be an integer from 0 (no limit) to {MAX_RATE} updates per second, on a subscribe"
            ),
            Self::DuplicateSince => write!(
                f,
                "\"since\" names a topic, or a position its \"epoch\" or \"seq\", more than once"
            ),
            Self::BadSince => {
                write!(
                    f,
                    "\"since\" must map topics of \"topics\" (or matched by its patterns, \
                     at most {PATTERN_REPLAY_TOPICS}) to {{\"epoch\":N,\"seq\":N}}"
                )
            }
        }
    }
}

impl std::error::Error for ControlError {}

impl From<ListError> for ControlError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::Name(e) => Self::Topic(e),
            ListError::TooMany { max } => Self::TooManyTopics { max },
        }
    }
}

/// Parses a control message. The work is linear in the message: its depth
/// is checked in one pass before simd-json parses it, and its topic names
/// are read into a [`DistinctNames`], which refuses the message at the
/// first distinct name past `limits.max_topics`.
pub fn parse(buf: &mut [u8], limits: Limits) -> Result<Control, ControlError> {
    parse_counting(buf, limits, &mut 0, &mut 0)
}

/// [`parse`], adding to `work` the token comparisons it spent matching
/// `since` keys to patterns, refused or not (the caller charges them).
pub fn parse_charged(
    buf: &mut [u8],
    limits: Limits,
    work: &mut usize,
) -> Result<Control, ControlError> {
    parse_counting(buf, limits, &mut 0, work)
}

/// [`parse`], adding to `read` the topic names it read (the tests' measure
/// of its work) and to `work` its token comparisons.
fn parse_counting(
    buf: &mut [u8],
    limits: Limits,
    read: &mut usize,
    work: &mut usize,
) -> Result<Control, ControlError> {
    if buf.len() > MAX_CONTROL_BYTES {
        return Err(ControlError::TooLarge);
    }
    check_depth(buf, MAX_CONTROL_DEPTH)?;
    check_surrogates(buf)?;
    let value = simd_json::to_borrowed_value(buf).map_err(|_| ControlError::Malformed)?;
    if let Some(obj) = value.as_object() {
        // One pass over the keys (the parser keeps duplicates, and `get`
        // finds the first).
        let mut seen = [false; KEYS.len()];
        for (k, _) in obj.iter() {
            if let Some(i) = KEYS.iter().position(|&key| key == k.as_ref())
                && std::mem::replace(&mut seen[i], true)
            {
                return Err(ControlError::DuplicateKey(KEYS[i]));
            }
        }
    }
    let op = match value.get("op").and_then(|v| v.as_str()) {
        Some("subscribe") => Op::Subscribe,
        Some("unsubscribe") => Op::Unsubscribe,
        Some("history") => Op::History,
        Some("refresh") => Op::Refresh,
        Some(_) => return Err(ControlError::UnknownOp),
        None => return Err(ControlError::MissingOp),
    };
    if op == Op::Refresh {
        let token = value
            .get("token")
            .and_then(|v| v.as_str())
            .ok_or(ControlError::NoToken)?;
        return Ok(Control {
            op,
            topics: Vec::new(),
            since: Vec::new(),
            pattern_since: Vec::new(),
            max_rate: None,
            token: Some(token.to_string()),
        });
    }
    let list = value
        .get("topics")
        .and_then(|v| v.as_array())
        .ok_or(ControlError::TopicsNotStrings)?;
    let mut names = DistinctNames::new(limits.max_topic_len, limits.max_topics);
    let result = list.iter().try_for_each(|t| {
        let name = t.as_str().ok_or(ControlError::TopicsNotStrings)?;
        Ok::<(), ControlError>(names.add(name)?)
    });
    *read += names.read();
    result?;
    let topics: Vec<String> = names
        .into_vec()
        .into_iter()
        .map(|n| n.into_owned())
        .collect();
    if op == Op::History && topics.iter().any(|t| pattern::is_pattern(t)) {
        // A history is a topic's: name the topics.
        return Err(ControlError::Topic(TopicError::Pattern));
    }
    if op == Op::Subscribe
        && topics.iter().filter(|t| pattern::is_pattern(t)).count() > limits.max_patterns
    {
        // Refused before `since` is matched against them.
        return Err(ControlError::TooManyPatterns {
            max: limits.max_patterns,
        });
    }
    let (since, pattern_since) = match value.get("since") {
        None => (Vec::new(), Vec::new()),
        Some(v) if op == Op::Subscribe => read_since(v, &topics, limits.max_topic_len, work)?,
        Some(_) => return Err(ControlError::BadSince),
    };
    let max_rate = match value.get("max_rate") {
        None => None,
        Some(v) if op == Op::Subscribe => Some(
            v.as_u64()
                .filter(|&r| r <= u64::from(MAX_RATE))
                .ok_or(ControlError::BadRate)? as u32,
        ),
        Some(_) => return Err(ControlError::BadRate),
    };
    Ok(Control {
        op,
        topics,
        since,
        pattern_since,
        max_rate,
        token: None,
    })
}

/// `"since"`: `{"topic":{"epoch":N,"seq":N},…}`, every key one of `topics`
/// or a topic one of its patterns matches, each once, and each position's
/// `epoch` and `seq` once (else [`ControlError::DuplicateSince`]: the
/// parser keeps both copies, and parsers differ on which one counts).
/// Linear in the object times the patterns named, which are at most
/// `--max-patterns-per-conn`; the object has at most one entry per topic
/// named and [`PATTERN_REPLAY_TOPICS`] more. Adds the token comparisons to
/// `work`.
#[allow(clippy::type_complexity)]
fn read_since(
    v: &simd_json::BorrowedValue<'_>,
    topics: &[String],
    max_topic_len: usize,
    work: &mut usize,
) -> Result<(Vec<Option<Since>>, Vec<(String, Since)>), ControlError> {
    let obj = v.as_object().ok_or(ControlError::BadSince)?;
    if obj.len() > topics.len() + PATTERN_REPLAY_TOPICS {
        return Err(ControlError::BadSince);
    }
    let index: std::collections::HashMap<&str, usize> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let patterns: Vec<&str> = topics
        .iter()
        .map(String::as_str)
        .filter(|t| pattern::is_pattern(t))
        .collect();
    let mut since = vec![None; topics.len()];
    let mut matched: std::collections::HashMap<String, Since> = Default::default();
    for (k, pos) in obj.iter() {
        let fields = pos.as_object().ok_or(ControlError::BadSince)?;
        for key in ["epoch", "seq"] {
            if fields.iter().filter(|(f, _)| f.as_ref() == key).count() > 1 {
                return Err(ControlError::DuplicateSince);
            }
        }
        let num = |key: &str| pos.get(key).and_then(|n| n.as_u64());
        let s = match (num("epoch"), num("seq")) {
            (Some(epoch), Some(seq)) => Since { epoch, seq },
            _ => return Err(ControlError::BadSince),
        };
        match index.get(k.as_ref()) {
            Some(&i) if !pattern::is_pattern(k) => {
                if since[i].replace(s).is_some() {
                    return Err(ControlError::DuplicateSince);
                }
            }
            Some(_) => return Err(ControlError::BadSince),
            None => {
                let name = topic::validate(k, max_topic_len).map_err(|_| ControlError::BadSince)?;
                let tokens = pattern::token_count(name);
                let mut tried = 0;
                let found = patterns.iter().any(|p| {
                    tried += 1;
                    pattern::matches(p, name)
                });
                *work += tried * tokens;
                if !found {
                    return Err(ControlError::BadSince);
                }
                if matched.insert(name.to_owned(), s).is_some() {
                    return Err(ControlError::DuplicateSince);
                }
                if matched.len() > PATTERN_REPLAY_TOPICS {
                    return Err(ControlError::BadSince);
                }
            }
        }
    }
    let mut pattern_since: Vec<(String, Since)> = matched.into_iter().collect();
    pattern_since.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok((since, pattern_since))
}

/// Refuses `buf` if it nests arrays and objects deeper than `max`, in one
/// pass over its bytes and without recursion: what makes it safe to hand
/// `buf` to a recursive parser afterwards.
///
/// Counts each `[` and `{` outside strings, less the `]` and `}` outside
/// strings. A string runs from a `"` to the next `"` not escaped; inside it
/// a backslash escapes the byte after it, and brackets are text. For valid
/// JSON the count at each byte is the nesting depth there, so the check
/// agrees with the parser's structure (`check_depth_agrees_with_the_tree`).
/// Invalid JSON may count otherwise (a stray closer cannot take the count
/// below zero), but the parser refuses it without building a value.
fn check_depth(buf: &[u8], max: usize) -> Result<(), ControlError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in buf {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ControlError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses a `\u` escape of a surrogate that is not half of a pair: a high
/// one (`D800`-`DBFF`) not followed at once by a low one's escape
/// (`DC00`-`DFFF`), or a low one on its own. simd-json 0.18 reads a lone
/// high surrogate as U+0000, a byte the client never sent, and refuses a
/// lone low one; refused here, both get the same reason.
///
/// A second pass after [`check_depth`], so a message too deep is refused as
/// such whatever its strings hold. It needs no string state: a backslash
/// outside a string is not JSON, and simd-json refuses it.
fn check_surrogates(buf: &[u8]) -> Result<(), ControlError> {
    let mut i = 0;
    while let Some(&b) = buf.get(i) {
        if b != b'\\' {
            i += 1;
            continue;
        }
        i += match escaped_unit(buf, i) {
            Some(0xD800..=0xDBFF) => match escaped_unit(buf, i + 6) {
                Some(0xDC00..=0xDFFF) => 12,
                _ => return Err(ControlError::UnpairedSurrogate),
            },
            Some(0xDC00..=0xDFFF) => return Err(ControlError::UnpairedSurrogate),
            Some(_) => 6,
            // `\\`, `\"` and the other two-byte escapes: skipping both bytes
            // keeps an escaped backslash from being read as starting an
            // escape. A bad escape is left to simd-json.
            None => 2,
        };
    }
    Ok(())
}

/// The UTF-16 code unit of the `\uXXXX` escape at `at`, if one is there.
fn escaped_unit(buf: &[u8], at: usize) -> Option<u32> {
    match buf.get(at..at + 6)? {
        [b'\\', b'u', hex @ ..] => hex
            .iter()
            .try_fold(0, |n, &h| Some((n << 4) | char::from(h).to_digit(16)?)),
        _ => None,
    }
}

/// `{"op":"subscribed"|"unsubscribed","topics":[...]}`. Topic names need no
/// escaping (see [`topic`](super::topic)).
pub fn reply<S: AsRef<str>>(op: Op, topics: &[S]) -> String {
    let word = match op {
        Op::Subscribe => "subscribed",
        Op::Unsubscribe => "unsubscribed",
        Op::History => "history",
        Op::Refresh => "refreshed",
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

/// The subscribe reply with what each recovering topic gets:
/// `{"op":"subscribed","topics":[…],"recovery":{"a":{"epoch":E,"from":F,"to":T,"complete":true}}}`,
/// the messages numbered `from ..= to` following the reply (none when
/// `from > to`); an incomplete one adds `"reason"` (`epoch`, `too_old`,
/// `capped`, `ahead`).
pub fn subscribed_with_recovery<S: AsRef<str>>(
    topics: &[S],
    recovered: &[(&str, &Recovery)],
) -> String {
    let mut s = reply(Op::Subscribe, topics);
    if recovered.is_empty() {
        return s;
    }
    s.pop();
    s.push_str(",\"recovery\":{");
    for (i, (name, r)) in recovered.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "\"{name}\":{{\"epoch\":{},\"from\":{},\"to\":{},\"complete\":{}",
            r.epoch,
            r.first,
            r.last,
            r.gap.is_none()
        ));
        if let Some(g) = r.gap {
            s.push_str(&format!(",\"reason\":\"{}\"", g.as_str()));
        }
        s.push('}');
    }
    s.push_str("}}");
    s
}

/// A topic's history as `{"op":"history"}` reports it: (epoch, first, last).
pub type Range = (u64, u64, u64);

/// `{"op":"history","history":{"a":{"epoch":E,"first":F,"last":L}}}`: per
/// topic the numbers `F ..= L` its history holds (none when `F > L`; `L`
/// is the topic's newest number); a topic the server does not know is
/// `null`.
pub fn history_reply(ranges: &[(&str, Option<Range>)]) -> String {
    let mut s = String::from("{\"op\":\"history\",\"history\":{");
    for (i, (name, r)) in ranges.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match r {
            Some((epoch, first, last)) => s.push_str(&format!(
                "\"{name}\":{{\"epoch\":{epoch},\"first\":{first},\"last\":{last}}}"
            )),
            None => s.push_str(&format!("\"{name}\":null")),
        }
    }
    s.push_str("}}");
    s
}

/// The answer to a subscribe with `since` over `--max-recovery-rate`:
/// `{"op":"error","reason":"recovery busy: try again","retry_ms":N}`;
/// nothing of the message was applied.
pub fn busy(retry_ms: u32) -> String {
    busy_with("recovery busy: try again", retry_ms)
}

/// `{"op":"error","reason":R,"retry_ms":N}`: nothing was applied; the
/// same message may be sent again after `N` ms. `reason` needs no escaping.
pub fn busy_with(reason: &str, retry_ms: u32) -> String {
    format!(r#"{{"op":"error","reason":"{reason}","retry_ms":{retry_ms}}}"#)
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

    const LIMITS: Limits = Limits {
        max_topic_len: 16,
        max_topics: 64,
        max_patterns: 16,
    };

    fn p(s: &str) -> Result<Control, ControlError> {
        parse(&mut s.as_bytes().to_vec(), LIMITS)
    }

    /// A subscribe naming `names`, and how many names parsing it read.
    fn subscribe_counting(
        names: impl Iterator<Item = String>,
    ) -> (Result<Control, ControlError>, usize) {
        let list: Vec<String> = names.map(|n| format!("\"{n}\"")).collect();
        let msg = format!(r#"{{"op":"subscribe","topics":[{}]}}"#, list.join(","));
        assert!(msg.len() <= MAX_CONTROL_BYTES, "{} bytes", msg.len());
        let mut read = 0;
        let result = parse_counting(&mut msg.into_bytes(), LIMITS, &mut read, &mut 0);
        (result, read)
    }

    #[test]
    fn a_subscribe_naming_nine_thousand_topics_is_refused_after_reading_sixty_five() {
        // Issue #12: 9 000 distinct short names (63 kB) held a worker for
        // ~150 ms, each name compared with every name kept before it.
        let (result, read) = subscribe_counting((0..9000).map(|i| format!("{i:x}")));
        assert_eq!(result, Err(ControlError::TooManyTopics { max: 64 }));
        assert_eq!(read, 65, "the limit plus the one name that passed it");
        assert_eq!(
            ControlError::TooManyTopics { max: 64 }.to_string(),
            "too many topics: at most 64 per connection"
        );
    }

    #[test]
    fn nine_thousand_names_with_sixty_four_distinct_are_read_once_each_and_accepted() {
        let (result, read) = subscribe_counting((0..9000).map(|i| format!("{:x}", i % 64)));
        let topics = result.expect("64 distinct names fit").topics;
        assert_eq!(read, 9000);
        assert_eq!(topics.len(), 64);
        assert_eq!(topics[..3], ["0", "1", "2"]);
    }

    #[test]
    fn an_unsubscribe_may_not_name_more_topics_than_a_connection_holds() {
        let limits = Limits {
            max_topic_len: 16,
            max_topics: 2,
            max_patterns: 2,
        };
        let mut msg = br#"{"op":"unsubscribe","topics":["a","b","a","c"]}"#.to_vec();
        assert_eq!(
            parse(&mut msg, limits),
            Err(ControlError::TooManyTopics { max: 2 })
        );
    }

    #[test]
    fn parses_a_refresh_and_its_token() {
        let c = p(r#"{"op":"refresh","token":"a.b.c"}"#).unwrap();
        assert_eq!((c.op, c.token.as_deref()), (Op::Refresh, Some("a.b.c")));
        assert!(c.topics.is_empty());
        assert_eq!(p(r#"{"op":"refresh"}"#), Err(ControlError::NoToken));
        assert_eq!(
            p(r#"{"op":"refresh","token":7}"#),
            Err(ControlError::NoToken)
        );
    }

    #[test]
    fn parses_subscribe_and_unsubscribe() {
        assert_eq!(
            p(r#"{"op":"subscribe","topics":["a","b","a"]}"#),
            Ok(Control {
                op: Op::Subscribe,
                topics: vec!["a".into(), "b".into()],
                since: vec![],
                pattern_since: vec![],
                max_rate: None,
                token: None,
            })
        );
        assert_eq!(
            p(r#" { "topics" : [] , "op" : "unsubscribe" } "#),
            Ok(Control {
                op: Op::Unsubscribe,
                topics: vec![],
                since: vec![],
                pattern_since: vec![],
                max_rate: None,
                token: None,
            })
        );
    }

    #[test]
    fn a_subscribe_may_say_since_for_the_topics_it_names() {
        let c = p(r#"{"op":"subscribe","topics":["a","b"],"since":{"b":{"seq":4,"epoch":9007199254740991}}}"#)
            .unwrap();
        assert_eq!(
            c.since,
            vec![
                None,
                Some(Since {
                    epoch: 9_007_199_254_740_991,
                    seq: 4
                })
            ]
        );
        for bad in [
            r#"{"op":"subscribe","topics":["a"],"since":{"b":{"epoch":1,"seq":1}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":1}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":-1,"seq":1}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":1.5,"seq":1}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":[1,2]}"#,
            r#"{"op":"unsubscribe","topics":["a"],"since":{}}"#,
        ] {
            assert_eq!(p(bad), Err(ControlError::BadSince), "{bad}");
        }
        // Given twice: a topic (named, or matched by a pattern), a
        // position's epoch or seq. (The first or the last counted, by
        // level, as parsers differ; a proxy could read another.)
        for twice in [
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":1,"seq":2,"seq":8}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":1,"epoch":2,"seq":8}}}"#,
            r#"{"op":"subscribe","topics":["a"],"since":{"a":{"epoch":1,"seq":2},"a":{"epoch":1,"seq":8}}}"#,
            r#"{"op":"subscribe","topics":["a.*"],"since":{"a.b":{"epoch":1,"seq":2},"a.b":{"epoch":1,"seq":8}}}"#,
        ] {
            assert_eq!(p(twice), Err(ControlError::DuplicateSince), "{twice}");
        }
        let r = Recovery {
            epoch: 5,
            first: 3,
            last: 4,
            messages: vec![],
            gap: Some(crate::pubsub::history::Gap::TooOld),
        };
        let reply = subscribed_with_recovery(&["a", "b"], &[("a", &r)]);
        assert_eq!(
            reply,
            r#"{"op":"subscribed","topics":["a","b"],"recovery":{"a":{"epoch":5,"from":3,"to":4,"complete":false,"reason":"too_old"}}}"#
        );
        assert_eq!(
            subscribed_with_recovery(&["a"], &[]),
            r#"{"op":"subscribed","topics":["a"]}"#
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
            // Outside probe: the first of two took effect (most parsers,
            // and a proxy checking the message, take the last).
            (
                r#"{"op":"subscribe","op":"unsubscribe","topics":["a"]}"#,
                "\"op\" given more than once",
            ),
            (
                r#"{"op":"subscribe","topics":["a"],"x":1,"topics":["b"]}"#,
                "\"topics\" given more than once",
            ),
            (
                r#"{"op":"refresh","token":"a","token":"b"}"#,
                "\"token\" given more than once",
            ),
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
    fn an_unpaired_surrogate_escape_is_malformed_json_not_a_nul() {
        let unpaired = Err(ControlError::UnpairedSurrogate);
        for (input, want) in [
            // The outside probe's: simd-json read the first as `x\0y`.
            (r#"{"op":"subscribe","topics":["x\ud800y"]}"#, &unpaired),
            (r#"{"op":"subscribe","topics":["x\udc00y"]}"#, &unpaired),
            (
                r#"{"op":"subscribe","topics":["x\ud800\u0041"]}"#,
                &unpaired,
            ),
            (r#"{"op":"subscribe","topics":["x\uDBFF"]}"#, &unpaired),
            (r#"{"op":"subscribe","topics":["\ude00\ud83d"]}"#, &unpaired),
            (
                r#"{"op":"subscribe","topics":["a"],"x":"\ud800"}"#,
                &unpaired,
            ),
            // A pair is a character: refused by the topic rules, and
            // accepted where any string is.
            (
                r#"{"op":"subscribe","topics":["\ud83d\ude00"]}"#,
                &Err(ControlError::Topic(TopicError::BadChar(0xf0))),
            ),
            (
                r#"{"op":"subscribe","topics":["\u0061\u002e\uD83D\uDE00"]}"#,
                &Err(ControlError::Topic(TopicError::BadChar(0xf0))),
            ),
            // An escaped backslash starts no escape.
            (
                r#"{"op":"subscribe","topics":["\\ud800"]}"#,
                &Err(ControlError::Topic(TopicError::BadChar(b'\\'))),
            ),
        ] {
            assert_eq!(&p(input), want, "{input}");
        }
        let c = p(r#"{"op":"subscribe","topics":["a\u002eb"],"x":"\ud83d\ude00\\\n"}"#);
        assert_eq!(c.map(|c| c.topics), Ok(vec!["a.b".to_string()]));
        assert_eq!(
            ControlError::UnpairedSurrogate.to_string(),
            "malformed JSON: unpaired surrogate escape"
        );
    }

    /// `n` nested arrays: `[[…]]`.
    fn nested_arrays(n: usize) -> String {
        "[".repeat(n) + &"]".repeat(n)
    }

    /// A valid subscribe whose extra key `"x"` holds `value`.
    fn subscribe_with(value: &str) -> String {
        format!(r#"{{"op":"subscribe","topics":["a"],"x":{value}}}"#)
    }

    /// Parses on a thread with a worker's stack, as a worker would.
    fn p_on_worker_stack(s: String) -> Result<Control, ControlError> {
        std::thread::Builder::new()
            .stack_size(crate::server::WORKER_STACK_BYTES)
            .spawn(move || p(&s))
            .expect("spawn")
            .join()
            .expect("the parse did not panic")
    }

    #[test]
    fn six_thousand_nested_brackets_get_an_error_reply_not_a_stack_overflow() {
        // Issue #12: 6 000 `[` then 6 000 `]` (12 kB) overflowed a worker's
        // stack inside simd-json's recursive value builder.
        assert_eq!(
            p_on_worker_stack(nested_arrays(6000)),
            Err(ControlError::TooDeep)
        );
        let objects = r#"{"a":"#.repeat(6000) + "1" + &"}".repeat(6000);
        assert_eq!(p_on_worker_stack(objects), Err(ControlError::TooDeep));
        let mixed = r#"[{"a":"#.repeat(3000) + "1" + &"}]".repeat(3000);
        assert_eq!(p_on_worker_stack(mixed), Err(ControlError::TooDeep));
        assert!(error(&ControlError::TooDeep.to_string()).contains("nested deeper than 16 levels"));
    }

    #[test]
    fn simd_json_alone_refuses_six_thousand_levels_on_a_worker_stack() {
        // The second line of defence: simd-json 0.18 stops at 1 024 levels
        // (its `DEFAULT_MAX_DEPTH`) before building a value, should the
        // depth check ever be bypassed. 0.17 overflowed here.
        let refused = std::thread::Builder::new()
            .stack_size(crate::server::WORKER_STACK_BYTES)
            .spawn(|| {
                let mut deep = nested_arrays(6000).into_bytes();
                simd_json::to_borrowed_value(&mut deep).is_err()
            })
            .expect("spawn")
            .join()
            .expect("no panic");
        assert!(refused);
    }

    #[test]
    fn nesting_at_the_limit_parses_and_one_level_more_is_refused() {
        // The message object is level 1; `"x"` adds the rest.
        let at_limit = subscribe_with(&nested_arrays(MAX_CONTROL_DEPTH - 1));
        assert_eq!(
            p_on_worker_stack(at_limit).map(|c| c.topics),
            Ok(vec!["a".into()])
        );
        let over = subscribe_with(&nested_arrays(MAX_CONTROL_DEPTH));
        assert_eq!(p_on_worker_stack(over), Err(ControlError::TooDeep));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_toward_the_depth() {
        let deep_text = format!(r#""{}""#, nested_arrays(6000));
        assert_eq!(
            p_on_worker_stack(subscribe_with(&deep_text)).map(|c| c.op),
            Ok(Op::Subscribe)
        );
        // An escaped quote does not end the string, so the brackets after
        // it are still text.
        let escaped_quote = format!(r#""\"{}""#, "[".repeat(6000));
        assert_eq!(
            p_on_worker_stack(subscribe_with(&escaped_quote)).map(|c| c.op),
            Ok(Op::Subscribe)
        );
        // An escaped backslash does not escape the quote after it: the
        // string ends there and the brackets after it are structure.
        let escaped_backslash = format!(r#"["\\",{}]"#, nested_arrays(MAX_CONTROL_DEPTH));
        assert_eq!(
            p_on_worker_stack(subscribe_with(&escaped_backslash)),
            Err(ControlError::TooDeep)
        );
        // A topic name with brackets is still refused as a name, not for depth.
        assert_eq!(
            p(r#"{"op":"subscribe","topics":["[[[["]}"#),
            Err(ControlError::Topic(TopicError::BadChar(b'[')))
        );
    }

    /// A JSON value built by the tests, serialised by hand: independent of
    /// simd-json, so it can judge the depth check.
    #[derive(Debug, Clone)]
    enum Json {
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        fn depth(&self) -> usize {
            match self {
                Self::Str(_) => 0,
                Self::Arr(v) => 1 + v.iter().map(Json::depth).max().unwrap_or(0),
                Self::Obj(v) => 1 + v.iter().map(|(_, j)| j.depth()).max().unwrap_or(0),
            }
        }

        fn write(&self, out: &mut String) {
            let string = |s: &str, out: &mut String| {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            };
            match self {
                Self::Str(s) => string(s, out),
                Self::Arr(v) => {
                    out.push('[');
                    for (i, j) in v.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        j.write(out);
                    }
                    out.push(']');
                }
                Self::Obj(v) => {
                    out.push('{');
                    for (i, (k, j)) in v.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        string(k, out);
                        out.push(':');
                        j.write(out);
                    }
                    out.push('}');
                }
            }
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        // Strings full of what the scan must not mistake for structure.
        let text = r#"[\[\]{}"\\a:,]{0,6}"#;
        text.prop_map(Json::Str)
            .prop_recursive(24, 128, 4, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Arr),
                    prop::collection::vec((text, inner), 0..4).prop_map(Json::Obj),
                ]
            })
    }

    proptest::proptest! {
        #[test]
        fn check_depth_agrees_with_the_tree(json in arb_json()) {
            let mut text = String::new();
            json.write(&mut text);
            // The text is JSON: simd-json reads it back.
            let mut copy = text.clone().into_bytes();
            proptest::prop_assert!(simd_json::to_borrowed_value(&mut copy).is_ok());
            let depth = json.depth();
            proptest::prop_assert_eq!(check_depth(text.as_bytes(), depth), Ok(()));
            if depth > 0 {
                proptest::prop_assert_eq!(
                    check_depth(text.as_bytes(), depth - 1),
                    Err(ControlError::TooDeep)
                );
            }
        }
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
    /// A `since` is matched against at most `--max-patterns-per-conn`
    /// patterns, and holds at most one entry per topic named and
    /// PATTERN_REPLAY_TOPICS more: the outside review's message (63
    /// near-miss patterns, 382 copies of one long key; copies are refused
    /// since) took
    /// 46–68 ms to parse; refused now before any key is matched.
    #[test]
    fn a_since_is_matched_against_few_patterns_and_holds_few_keys() {
        let limits = Limits {
            max_topic_len: 128,
            max_topics: 64,
            max_patterns: 16,
        };
        let near: Vec<String> = (0..63)
            .map(|i| format!("\"{}*.b{i:02}\"", "a.".repeat(61)))
            .chain(["\">\"".to_string()])
            .collect();
        // Distinct keys of 63 tokens (a key given twice is refused at once).
        let since = |n: usize| {
            (0..n)
                .map(|i| format!("\"{}k{i}\":{{\"epoch\":1,\"seq\":1}}", "a.".repeat(62)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let msg = |patterns: &[String], n: usize| {
            format!(
                r#"{{"op":"subscribe","topics":[{}],"since":{{{}}}}}"#,
                patterns.join(","),
                since(n)
            )
        };
        let big = msg(&near, 370);
        assert!(big.len() <= MAX_CONTROL_BYTES, "{}", big.len());
        assert_eq!(
            parse(&mut big.into_bytes(), limits),
            Err(ControlError::TooManyPatterns { max: 16 })
        );
        // 16 patterns, keys past the bound: refused unmatched.
        let few: Vec<String> = near[48..].to_vec();
        assert_eq!(
            parse(
                &mut msg(&few, 16 + PATTERN_REPLAY_TOPICS + 1).into_bytes(),
                limits
            ),
            Err(ControlError::BadSince)
        );
        // Within both: accepted, the comparisons counted (15 near misses
        // and the `>`, per key, of 63 tokens), and counted when refused.
        let mut work = 0;
        let c = parse_charged(&mut msg(&few, 3).into_bytes(), limits, &mut work).unwrap();
        assert_eq!(c.pattern_since.len(), 3);
        assert_eq!(work, 3 * 16 * 63);
        work = 0;
        let only_near = &near[..16];
        assert_eq!(
            parse_charged(&mut msg(only_near, 1).into_bytes(), limits, &mut work),
            Err(ControlError::BadSince)
        );
        assert_eq!(work, 16 * 63);
    }
}
