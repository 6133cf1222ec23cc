//! Topic names and patterns as NATS subjects, and back.
//!
//! A publication to topic `T` enters the stream on `corecast.in.T` (the
//! subject the stream captures and the sequencer's compare-and-set names)
//! and reaches the nodes interested in it, in the stream's order, on
//! `corecast.t.T` (the stream republishes what it stored). Both are
//! `.`-separated token lists, like topic names and patterns, so a pattern
//! (`prices.*.EUR`, `news.>`) is a NATS wildcard subscription as it is.
//!
//! One difference: a topic token may be empty (`a..b`, `a.`), a NATS token
//! may not. An empty token is written `%`, which no topic name holds (the
//! alphabet is `A-Z a-z 0-9 - _ . : / @ ~`), so the mapping is one to one
//! and `*` still matches exactly what it matches in a topic.

/// The subject prefix the stream captures (publications in).
pub const IN_PREFIX: &str = "corecast.in.";
/// The subject prefix the stream republishes to (publications out, in order).
pub const OUT_PREFIX: &str = "corecast.t.";
/// What an empty topic token becomes.
const EMPTY_TOKEN: &str = "%";

/// `prefix` followed by `name`'s tokens (a topic name or a pattern).
fn subject(prefix: &str, name: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + name.len() + 4);
    s.push_str(prefix);
    for (i, token) in name.split('.').enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(if token.is_empty() { EMPTY_TOKEN } else { token });
    }
    s
}

/// The subject a publication to `topic` is sent to (the stream's input).
pub fn publish_subject(topic: &str) -> String {
    subject(IN_PREFIX, topic)
}

/// The subject a node subscribes to for `name` (a topic or a pattern).
pub fn interest_subject(name: &str) -> String {
    subject(OUT_PREFIX, name)
}

/// The topic a republished (or input) subject names, if it is one of ours.
pub fn topic_of(subject: &str) -> Option<String> {
    let rest = subject
        .strip_prefix(OUT_PREFIX)
        .or_else(|| subject.strip_prefix(IN_PREFIX))?;
    let mut name = String::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            name.push('.');
        }
        if token != EMPTY_TOKEN {
            name.push_str(token);
        }
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::pattern;
    use proptest::prelude::*;

    #[test]
    fn names_become_subjects_token_by_token() {
        assert_eq!(
            publish_subject("prices.EURUSD"),
            "corecast.in.prices.EURUSD"
        );
        assert_eq!(interest_subject("prices.*.EUR"), "corecast.t.prices.*.EUR");
        assert_eq!(interest_subject("news.>"), "corecast.t.news.>");
        assert_eq!(interest_subject("a..b."), "corecast.t.a.%.b.%");
        assert_eq!(interest_subject(".a"), "corecast.t.%.a");
        assert_eq!(topic_of("corecast.t.a.%.b.%").as_deref(), Some("a..b."));
        assert_eq!(topic_of("corecast.in.x/y:z").as_deref(), Some("x/y:z"));
        assert_eq!(topic_of("other.t.a"), None);
    }

    /// A NATS subject match, token by token (`*` one token, a last `>`
    /// one or more), to check the mapping against our own pattern rules.
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let (f, s): (Vec<_>, Vec<_>) = (filter.split('.').collect(), subject.split('.').collect());
        for (i, t) in f.iter().enumerate() {
            match *t {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if i < s.len() && s[i] == t => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    proptest! {
        /// The mapping is one to one, yields valid NATS subjects (no empty
        /// token, no space), and a pattern's subscription matches exactly
        /// the topics the pattern matches.
        #[test]
        fn round_trip_and_same_matches(
            topic in "[ab.]{1,8}",
            pat in prop::collection::vec(prop_oneof!["a", "b", "", "\\*"], 1..5),
            rest in any::<bool>(),
        ) {
            let subj = interest_subject(&topic);
            prop_assert!(subj.split('.').all(|t| !t.is_empty()));
            prop_assert_eq!(topic_of(&subj), Some(topic.clone()));
            let mut p = pat.join(".");
            if rest { p.push_str(".>"); }
            prop_assert_eq!(
                pattern::matches(&p, &topic),
                nats_matches(&interest_subject(&p), &subj),
                "pattern {:?} topic {:?}", p, topic
            );
        }
    }
}
