//! Topic names: what is allowed, and how lists of them arrive.
//!
//! A topic name is 1..=`max_len` bytes of `A-Z a-z 0-9 - _ . : / @ ~`. The set
//! needs no escaping in a path (`/publish/{topic}`), a query
//! (`?topics=a,b`) or JSON, so a name means the same wherever it appears.
//! A subscription may also name a [`pattern`](super::pattern): `.`-separated
//! tokens where `*` stands for one token and a last `>` for the rest.
//! In `?topics=`, names are percent-decoded (browsers send `>` as `%3E`)
//! after the list is split at its commas.

use super::pattern::{self, PatternError};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// Default longest topic name, in bytes (flag `--max-topic-len`).
pub const DEFAULT_MAX_TOPIC_LEN: usize = 128;
/// Default most topics one connection may subscribe to (flag `--max-topics-per-conn`).
pub const DEFAULT_MAX_TOPICS_PER_CONN: usize = 64;
/// Default most patterns among them (flag `--max-patterns-per-conn`): a
/// pattern costs each publication to a topic it matches a trie walk on a
/// change of patterns, and its worker a scan of its topics when it
/// arrives and leaves.
pub const DEFAULT_MAX_PATTERNS_PER_CONN: usize = 16;

/// Why a topic name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    TooLong {
        max: usize,
    },
    BadChar(u8),
    /// A well-formed pattern where one topic is needed (publishing).
    Pattern,
    /// `*` or `>` used otherwise than as a whole token, `>` not last.
    BadWildcard,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty topic name"),
            Self::TooLong { max } => write!(f, "topic name longer than {max} bytes"),
            Self::BadChar(b) => write!(
                f,
                "topic name has byte {b:#04x}; allowed: A-Z a-z 0-9 - _ . : / @ ~"
            ),
            Self::Pattern => f.write_str(
                "a pattern (a * or > token) names no single topic: publish to a topic name",
            ),
            Self::BadWildcard => f.write_str(
                "bad pattern: * and > stand for whole .-separated tokens, and > only last",
            ),
        }
    }
}

/// Why a list of topic names was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListError {
    /// A name in the list is refused.
    Name(TopicError),
    /// More distinct names than one connection may hold.
    TooMany { max: usize },
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(e) => e.fmt(f),
            Self::TooMany { max } => write!(f, "too many topics: at most {max} per connection"),
        }
    }
}

impl std::error::Error for ListError {}

impl From<TopicError> for ListError {
    fn from(e: TopicError) -> Self {
        Self::Name(e)
    }
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'@' | b'~')
}

/// Checks one topic name (a pattern is refused: [`TopicError::Pattern`]).
pub fn validate(name: &str, max_len: usize) -> Result<&str, TopicError> {
    match validate_subscription(name, max_len)? {
        Name::Topic(n) => Ok(n),
        Name::Pattern(_) => Err(TopicError::Pattern),
    }
}

/// What a subscription names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    Topic(&'a str),
    Pattern(&'a str),
}

/// Checks a name a subscription may hold: a topic or a pattern.
pub fn validate_subscription(name: &str, max_len: usize) -> Result<Name<'_>, TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > max_len {
        return Err(TopicError::TooLong { max: max_len });
    }
    let mut wild = false;
    for b in name.bytes() {
        if b == b'*' || b == b'>' {
            wild = true;
        } else if !allowed(b) {
            return Err(TopicError::BadChar(b));
        }
    }
    if !wild {
        return Ok(Name::Topic(name));
    }
    match pattern::check(name) {
        Ok(()) => Ok(Name::Pattern(name)),
        Err(PatternError::PartToken | PatternError::RestNotLast) => Err(TopicError::BadWildcard),
    }
}

/// The byte the `%XX` escape at `b[i]` stands for, if one is there.
fn escape_at(b: &[u8], i: usize) -> Option<u8> {
    let hex = |at: usize| (*b.get(at)? as char).to_digit(16);
    (b[i] == b'%').then_some(())?;
    Some((hex(i + 1)? * 16 + hex(i + 2)?) as u8)
}

/// `name` with its `%XX` escapes decoded (borrowed when it has none). An
/// escape that is not two hex digits, or that decodes to a byte outside
/// ASCII, is left as it is, so the name is then refused for its `%`.
pub fn percent_decode(name: &str) -> Cow<'_, str> {
    if !name.contains('%') {
        return Cow::Borrowed(name);
    }
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(c) = escape_at(b, i).filter(u8::is_ascii) {
            out.push(c);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was decoded into a valid UTF-8 string: still valid.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| name.to_owned()))
}

/// `s` with every `%XX` escape decoded, whatever byte it stands for; `None`
/// when the result is not UTF-8 or an escape is malformed (a `%` without
/// two hex digits). For values that are not topic names, such as a token's
/// `sub` (`POST /disconnect?sub=`), which may be any string.
pub fn percent_decode_utf8(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(escape_at(b, i)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The value of `topics=` in a query string (`a,b,c`), if present. Other
/// parameters are ignored; an empty value means no topics.
pub fn from_query(query: Option<&str>) -> Option<&str> {
    query_param(query, "topics")
}

/// The value of parameter `key` in a query string, if present.
pub fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The first of `names` given more than once in a query string, if any:
/// parsers differ on which one counts (the first, the last, a list), so a
/// proxy checking a request could read another value than the server.
/// Names are compared percent-decoded, as such a proxy may read them
/// (review: `%74oken=NONE&token=GOOD` is one `token` undecoded, two
/// decoded); the server itself reads only the plain name.
pub fn repeated_param<'n>(query: Option<&str>, names: &[&'n str]) -> Option<&'n str> {
    let query = query?;
    names.iter().copied().find(|&name| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .filter(|&k| k == name || (k.contains('%') && percent_decode(k) == name))
            .nth(1)
            .is_some()
    })
}

/// Most bytes of a conflation key (`?key=` on a publish).
pub const MAX_KEY_LEN: usize = 128;

/// Whether `key` may be a conflation key: 1 to [`MAX_KEY_LEN`] bytes of
/// visible ASCII (`!` to `~`) other than `%`.
pub fn key_ok(key: &str) -> bool {
    let ok = |b: u8| b.is_ascii_graphic() && b != b'%';
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(ok)
}

/// The conflation key `?key=` of a publish request's query, if any:
/// percent-decoded, 1 to [`MAX_KEY_LEN`] bytes of visible ASCII (`!` to
/// `~`) other than `%` (so an escape that does not decode to ASCII is
/// refused, not kept literally). `Err` with the reason a publisher is told
/// otherwise.
pub fn key_of(query: Option<&str>) -> Result<Option<std::sync::Arc<str>>, &'static str> {
    let Some(raw) = query_param(query, "key") else {
        return Ok(None);
    };
    let key = percent_decode(raw);
    if !key_ok(&key) {
        return Err(
            "key must be 1 to 128 bytes of visible ASCII other than % (percent-encoded as needed)",
        );
    }
    Ok(Some(std::sync::Arc::from(key.as_ref())))
}

/// Splits, percent-decodes and validates a comma list; duplicates are
/// removed, order kept. Refused as soon as it names more than `max_count`
/// distinct topics (see [`DistinctNames`]): the rest of the list is not read.
pub fn parse_list(
    list: &str,
    max_len: usize,
    max_count: usize,
) -> Result<Vec<Cow<'_, str>>, ListError> {
    parse_list_counting(list, max_len, max_count, &mut 0)
}

/// [`parse_list`], adding to `read` the names it read: the tests' measure
/// of its work.
fn parse_list_counting<'a>(
    list: &'a str,
    max_len: usize,
    max_count: usize,
    read: &mut usize,
) -> Result<Vec<Cow<'a, str>>, ListError> {
    let mut names = DistinctNames::new(max_len, max_count);
    let result = list
        .split(',')
        .filter(|s| !s.is_empty())
        .try_for_each(|name| names.add(percent_decode(name)));
    *read += names.read();
    result.map(|()| names.into_vec())
}

/// Valid, distinct topic names in the order first seen, at most
/// `max_count` of them: what a `?topics=` list or a control message's
/// `"topics"` array is read into.
///
/// Every [`add`](Self::add) costs one validation (linear in the name) and
/// one probe of a hash set, and the name that would be distinct number
/// `max_count + 1` is refused as it is read. So reading a list costs time
/// linear in its length whatever it holds: no name is compared with every
/// name before it, and a list of thousands of names is refused at the
/// first one past the limit. The set's hasher is std's, keyed per process,
/// so names chosen to collide cannot turn probes into scans.
#[derive(Debug)]
pub struct DistinctNames<'a> {
    names: Vec<Cow<'a, str>>,
    seen: HashSet<Cow<'a, str>>,
    max_len: usize,
    max_count: usize,
    read: usize,
}

impl<'a> DistinctNames<'a> {
    /// An empty list for names of at most `max_len` bytes, at most
    /// `max_count` distinct.
    pub fn new(max_len: usize, max_count: usize) -> Self {
        Self {
            names: Vec::new(),
            seen: HashSet::new(),
            max_len,
            max_count,
            read: 0,
        }
    }

    /// Validates `name` (a topic or a pattern) and adds it unless it is
    /// already in the list.
    pub fn add(&mut self, name: impl Into<Cow<'a, str>>) -> Result<(), ListError> {
        self.read += 1;
        let name = name.into();
        validate_subscription(&name, self.max_len)?;
        if !self.seen.contains(&name) {
            self.seen.insert(name.clone());
            if self.names.len() == self.max_count {
                return Err(ListError::TooMany {
                    max: self.max_count,
                });
            }
            self.names.push(name);
        }
        Ok(())
    }

    /// Names passed to [`add`](Self::add) so far, refused ones included.
    pub fn read(&self) -> usize {
        self.read
    }

    /// The distinct names, in the order first seen.
    pub fn into_vec(self) -> Vec<Cow<'a, str>> {
        self.names
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conflation_keys_are_short_visible_ascii_percent_decoded() {
        use super::key_of;
        assert_eq!(key_of(None), Ok(None));
        assert_eq!(key_of(Some("token=x")), Ok(None));
        assert_eq!(
            key_of(Some("key=EURUSD")).unwrap().as_deref(),
            Some("EURUSD")
        );
        assert_eq!(
            key_of(Some("a=1&key=EUR%2FUSD")).unwrap().as_deref(),
            Some("EUR/USD")
        );
        assert!(key_of(Some("key=")).is_err());
        assert!(key_of(Some("key=a%20b")).is_err(), "a space");
        assert!(key_of(Some("key=%C3%A9")).is_err(), "not ASCII");
        assert!(key_of(Some(&format!("key={}", "k".repeat(129)))).is_err());
        assert!(key_of(Some(&format!("key={}", "k".repeat(128)))).is_ok());
    }

    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate("prices/EURUSD", 128), Ok("prices/EURUSD"));
        assert_eq!(validate("a.b:c-d_e@f~g", 128), Ok("a.b:c-d_e@f~g"));
        assert_eq!(validate("", 128), Err(TopicError::Empty));
        assert_eq!(validate("abcd", 3), Err(TopicError::TooLong { max: 3 }));
        assert_eq!(validate("a b", 128), Err(TopicError::BadChar(b' ')));
        assert_eq!(validate("a,b", 128), Err(TopicError::BadChar(b',')));
        assert_eq!(validate("é", 128), Err(TopicError::BadChar(0xc3)));
        assert!(TopicError::BadChar(b'%').to_string().contains("allowed"));
    }

    #[test]
    fn query_lists() {
        assert_eq!(from_query(Some("x=1&topics=a,b")), Some("a,b"));
        assert_eq!(from_query(Some("topics=")), Some(""));
        assert_eq!(from_query(Some("x=1")), None);
        assert_eq!(from_query(None), None);
        assert_eq!(
            query_param(Some("topics=a&max_rate=5"), "max_rate"),
            Some("5")
        );
        assert_eq!(query_param(Some("max_rates=5"), "max_rate"), None);
        let names = ["topics", "token"];
        assert_eq!(
            repeated_param(Some("token=a&token=b"), &names),
            Some("token")
        );
        assert_eq!(
            repeated_param(Some("topics=a&x=1&topics="), &names),
            Some("topics")
        );
        assert_eq!(
            repeated_param(Some("token=a&tokens=b&topics=c"), &names),
            None
        );
        assert_eq!(
            repeated_param(Some("token&token"), &names),
            None,
            "no value: not read"
        );
        assert_eq!(repeated_param(None, &names), None);
        assert_eq!(
            repeated_param(Some("%74oken=a&token=b"), &names),
            Some("token"),
            "as a decoding proxy reads it"
        );
        assert_eq!(repeated_param(Some("%74oken=a&topics=b"), &names), None);
        assert_eq!(query_param(None, "max_rate"), None);
        assert_eq!(
            parse_list("a,b,,a,c", 128, 64),
            Ok(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(parse_list("", 128, 64), Ok(vec![]));
        assert_eq!(
            parse_list("a,b c", 128, 64),
            Err(ListError::Name(TopicError::BadChar(b' ')))
        );
    }

    #[test]
    fn a_query_list_may_repeat_names_but_not_hold_more_distinct_ones_than_the_limit() {
        assert_eq!(
            parse_list("a,b,a,b,a", 128, 2),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_list("a,b,c", 128, 2),
            Err(ListError::TooMany { max: 2 })
        );
        assert_eq!(parse_list("", 128, 0), Ok(vec![]));
        assert_eq!(parse_list("a", 128, 0), Err(ListError::TooMany { max: 0 }));
        assert!(
            ListError::TooMany { max: 64 }
                .to_string()
                .contains("at most 64")
        );
    }

    #[test]
    fn a_query_list_of_nine_thousand_names_is_refused_after_reading_sixty_five() {
        let list: Vec<String> = (0..9000).map(|i| format!("t{i}")).collect();
        let list = list.join(",");
        let mut read = 0;
        assert_eq!(
            parse_list_counting(&list, 128, 64, &mut read),
            Err(ListError::TooMany { max: 64 })
        );
        assert_eq!(read, 65, "the limit plus the one name that passed it");
    }

    #[test]
    fn repeated_names_are_kept_once_in_first_seen_order_and_count_once() {
        // 9 000 names, 64 of them distinct: accepted at a limit of 64.
        let list: Vec<String> = (0..9000).map(|i| format!("t{}", i % 64)).collect();
        let list = list.join(",");
        let mut read = 0;
        let kept = parse_list_counting(&list, 128, 64, &mut read).expect("64 distinct fit");
        assert_eq!(read, 9000);
        assert_eq!(kept.len(), 64);
        assert_eq!(kept[..3], ["t0", "t1", "t2"]);
    }

    #[test]
    fn patterns_are_subscription_names_but_not_topics() {
        assert_eq!(
            validate_subscription("prices.*.EUR", 128),
            Ok(Name::Pattern("prices.*.EUR"))
        );
        assert_eq!(validate_subscription("a.b", 128), Ok(Name::Topic("a.b")));
        assert_eq!(validate_subscription(">", 128), Ok(Name::Pattern(">")));
        assert_eq!(
            validate_subscription("a*", 128),
            Err(TopicError::BadWildcard)
        );
        assert_eq!(
            validate_subscription("a.>.b", 128),
            Err(TopicError::BadWildcard)
        );
        assert_eq!(
            validate_subscription("a.* b", 128),
            Err(TopicError::BadChar(b' '))
        );
        assert_eq!(validate("news.>", 128), Err(TopicError::Pattern));
        assert_eq!(validate("news>", 128), Err(TopicError::BadWildcard));
        assert!(
            TopicError::Pattern
                .to_string()
                .contains("publish to a topic")
        );
    }

    #[test]
    fn any_string_is_percent_decoded_when_it_is_utf8() {
        assert_eq!(percent_decode_utf8("alice").as_deref(), Some("alice"));
        assert_eq!(percent_decode_utf8("%C3%A9").as_deref(), Some("\u{e9}"));
        assert_eq!(percent_decode_utf8("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode_utf8("z%c3%ab").as_deref(), Some("z\u{eb}"));
        for bad in ["%FF", "%C3", "%zz", "end%3", "%", "%%41"] {
            assert_eq!(percent_decode_utf8(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_names_are_percent_decoded_after_splitting() {
        assert_eq!(percent_decode("news.%3E"), "news.>");
        assert_eq!(percent_decode("a%2Ab"), "a*b");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%3"), "end%3");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%C3%A9"), "%C3%A9", "non-ASCII left encoded");
        assert_eq!(
            parse_list("prices.*.EUR,news.%3E,a%2Fb", 128, 64),
            Ok(vec!["prices.*.EUR".into(), "news.>".into(), "a/b".into()])
        );
        assert_eq!(
            parse_list("a%2Cb", 128, 64),
            Err(ListError::Name(TopicError::BadChar(b','))),
            "an encoded comma is part of a name, not a separator"
        );
        assert_eq!(
            parse_list("x%3E", 128, 64),
            Err(ListError::Name(TopicError::BadWildcard))
        );
    }

    #[test]
    fn a_bad_name_is_refused_before_it_counts() {
        let mut list = DistinctNames::new(4, 1);
        assert_eq!(list.add("a"), Ok(()));
        assert_eq!(
            list.add("toolong"),
            Err(ListError::Name(TopicError::TooLong { max: 4 }))
        );
        assert_eq!(list.add("a"), Ok(()), "a repeat does not count again");
        assert_eq!(list.add("b"), Err(ListError::TooMany { max: 1 }));
    }
}
