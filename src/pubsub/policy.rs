//! Per-namespace policies: history bounds and last value for the topics
//! under a name prefix, from the configuration file's `[namespace."…"]`
//! tables. A namespace `prices` covers the topic `prices` and every topic
//! that continues it after a separator (`prices.EURUSD`, `prices:fx`,
//! `prices/EURUSD`), not `pricesX`; the longest namespace covering a topic
//! wins, and what it leaves unset comes from the flags.

use super::history::HistoryLimits;
use std::time::Duration;

/// One namespace's settings; `None`: the flag's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// The name prefix (a valid topic name).
    pub prefix: String,
    pub history_size: Option<usize>,
    pub history_bytes: Option<usize>,
    pub history_age: Option<Duration>,
    pub last_value: Option<bool>,
}

/// Whether namespace `prefix` covers topic `name`.
pub fn covers(prefix: &str, name: &str) -> bool {
    match name.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => matches!(rest.as_bytes()[0], b'.' | b':' | b'/'),
        None => false,
    }
}

/// The history limits and last-value setting of topic `name`: the longest
/// covering namespace's, the rest from `global` / `last_value`. Linear in
/// the namespaces (a handful; resolved once per topic entry).
pub fn resolve(
    policies: &[NamespacePolicy],
    name: &str,
    global: &HistoryLimits,
    last_value: bool,
) -> (HistoryLimits, bool) {
    let best = policies
        .iter()
        .filter(|p| covers(&p.prefix, name))
        .max_by_key(|p| p.prefix.len());
    match best {
        None => (*global, last_value),
        Some(p) => (
            HistoryLimits {
                size: p.history_size.unwrap_or(global.size),
                bytes: p.history_bytes.unwrap_or(global.bytes),
                age: p.history_age.unwrap_or(global.age),
                memory: global.memory,
            },
            p.last_value.unwrap_or(last_value),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_covers_its_name_and_what_continues_it_after_a_separator() {
        assert!(covers("prices", "prices"));
        assert!(covers("prices", "prices.EURUSD"));
        assert!(covers("prices", "prices:fx"));
        assert!(covers("prices", "prices/EURUSD"));
        assert!(!covers("prices", "pricesX"));
        assert!(!covers("prices", "price"));
        assert!(covers("prices.fx", "prices.fx.EURUSD"));
    }

    #[test]
    fn the_longest_namespace_wins_and_unset_values_come_from_the_flags() {
        let global = HistoryLimits::default();
        let policies = vec![
            NamespacePolicy {
                prefix: "prices".into(),
                history_size: Some(1000),
                last_value: Some(false),
                ..Default::default()
            },
            NamespacePolicy {
                prefix: "prices.fx".into(),
                history_age: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
        ];
        let (l, lv) = resolve(&policies, "prices.eq.X", &global, true);
        assert_eq!((l.size, l.age, lv), (1000, global.age, false));
        let (l, lv) = resolve(&policies, "prices.fx.EURUSD", &global, true);
        assert_eq!(
            (l.size, l.age, lv),
            (global.size, Duration::from_secs(3600), true),
            "the longest wins alone (no inheritance between namespaces)"
        );
        assert_eq!(resolve(&policies, "news", &global, true), (global, true));
    }
}
