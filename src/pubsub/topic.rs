//! Topic names: what is allowed, and how lists of them arrive.
//!
//! A topic name is 1..=`max_len` bytes of `A-Z a-z 0-9 - _ . : / @ ~`. The set
//! needs no escaping in a path (`/publish/{topic}`), a query
//! (`?topics=a,b`) or JSON, so a name means the same wherever it appears.

use std::fmt;

/// Default longest topic name, in bytes (flag `--max-topic-len`).
pub const DEFAULT_MAX_TOPIC_LEN: usize = 128;
/// Default most topics one connection may subscribe to (flag `--max-topics-per-conn`).
pub const DEFAULT_MAX_TOPICS_PER_CONN: usize = 64;

/// Why a topic name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    TooLong { max: usize },
    BadChar(u8),
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
        }
    }
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'@' | b'~')
}

/// Checks one topic name.
pub fn validate(name: &str, max_len: usize) -> Result<&str, TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > max_len {
        return Err(TopicError::TooLong { max: max_len });
    }
    match name.bytes().find(|&b| !allowed(b)) {
        Some(b) => Err(TopicError::BadChar(b)),
        None => Ok(name),
    }
}

/// The value of `topics=` in a query string (`a,b,c`), if present. Other
/// parameters are ignored; an empty value means no topics.
pub fn from_query(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("topics="))
}

/// Splits and validates a comma list; duplicates are removed, order kept.
pub fn parse_list(list: &str, max_len: usize) -> Result<Vec<&str>, TopicError> {
    let mut out: Vec<&str> = Vec::new();
    for name in list.split(',').filter(|s| !s.is_empty()) {
        let name = validate(name, max_len)?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
        assert_eq!(parse_list("a,b,,a,c", 128), Ok(vec!["a", "b", "c"]));
        assert_eq!(parse_list("", 128), Ok(vec![]));
        assert_eq!(parse_list("a,b c", 128), Err(TopicError::BadChar(b' ')));
    }
}
