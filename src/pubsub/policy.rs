//! Per-namespace policies: history bounds, last value and the
//! slow-consumer policy for the topics under a name prefix, from the
//! configuration file's `[namespace."…"]` tables. A namespace `prices` covers the topic `prices` and every topic
//! that continues it after a separator (`prices.EURUSD`, `prices:fx`,
//! `prices/EURUSD`), not `pricesX`; the longest namespace covering a topic
//! wins, and what it leaves unset comes from the flags.

use super::history::HistoryLimits;
use std::time::Duration;

/// What happens to a subscriber that falls behind a topic's publications:
/// when its queue would pass `--max-outbound-bytes` (or the worker's
/// buffer budget is spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close with 1008 "slow consumer" (queued frames not yet started are
    /// discarded), then drop the socket if it does not read the close in time.
    #[default]
    Disconnect,
    /// Skip the message for that subscriber, keep the connection.
    DropNewest,
    /// Keep only the newest waiting publication of the topic for that
    /// subscriber, sent (marked as replacing the others, which are
    /// counted) once its queue has gone to the kernel.
    Conflate,
    /// The same at all times: at most one publication of the topic waits
    /// for the subscriber's queue to go to the kernel, the newest.
    Always,
}

impl SlowConsumerPolicy {
    /// Parses `disconnect`, `drop-newest`, `conflate` or `always`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "disconnect" => Ok(Self::Disconnect),
            "drop-newest" => Ok(Self::DropNewest),
            "conflate" => Ok(Self::Conflate),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "unknown policy {other:?}: use disconnect, drop-newest, conflate or always"
            )),
        }
    }

    /// Whether publications may wait in a subscriber's conflation table.
    pub fn conflates(self) -> bool {
        matches!(self, Self::Conflate | Self::Always)
    }
}

/// One namespace's settings; `None`: the flag's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// The name prefix (a valid topic name).
    pub prefix: String,
    pub history_size: Option<usize>,
    pub history_bytes: Option<usize>,
    pub history_age: Option<Duration>,
    pub last_value: Option<bool>,
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// Most topics of the namespace kept for their history alone (within
    /// `--retained-topics` for all).
    pub retained_topics: Option<usize>,
    /// Most publications per second of one of its topics to one
    /// subscriber (the newest; 1 to 1000).
    pub max_rate: Option<u32>,
}

/// Whether namespace `prefix` covers topic `name`.
pub fn covers(prefix: &str, name: &str) -> bool {
    match name.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => matches!(rest.as_bytes()[0], b'.' | b':' | b'/'),
        None => false,
    }
}

/// The index in `policies` of the namespace covering `name` (the longest),
/// if any.
pub fn namespace_of(policies: &[NamespacePolicy], name: &str) -> Option<usize> {
    policies
        .iter()
        .enumerate()
        .filter(|(_, p)| covers(&p.prefix, name))
        .max_by_key(|(_, p)| p.prefix.len())
        .map(|(i, _)| i)
}

/// The slow-consumer policy of topic `name`: the longest covering
/// namespace's if it sets one (`None`: the flag's).
pub fn slow_consumer(policies: &[NamespacePolicy], name: &str) -> Option<SlowConsumerPolicy> {
    namespace_of(policies, name).and_then(|i| policies[i].slow_consumer)
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
    match namespace_of(policies, name).map(|i| &policies[i]) {
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

    #[test]
    fn slow_consumer_policies_parse_and_resolve_per_namespace() {
        for (s, p) in [
            ("disconnect", SlowConsumerPolicy::Disconnect),
            ("drop-newest", SlowConsumerPolicy::DropNewest),
            ("conflate", SlowConsumerPolicy::Conflate),
            ("always", SlowConsumerPolicy::Always),
        ] {
            assert_eq!(SlowConsumerPolicy::parse(s), Ok(p));
        }
        assert!(
            SlowConsumerPolicy::parse("newest")
                .unwrap_err()
                .contains("conflate")
        );
        let policies = vec![
            NamespacePolicy {
                prefix: "prices".into(),
                slow_consumer: Some(SlowConsumerPolicy::Always),
                ..Default::default()
            },
            NamespacePolicy {
                prefix: "prices.eq".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            slow_consumer(&policies, "prices.fx"),
            Some(SlowConsumerPolicy::Always)
        );
        assert_eq!(
            slow_consumer(&policies, "prices.eq.X"),
            None,
            "the longest, alone"
        );
        assert_eq!(slow_consumer(&policies, "news"), None);
    }
}
