//! Per-namespace policies: history bounds, last value and the
//! slow-consumer policy for the topics under a name prefix, from the
//! configuration file's `[namespace."…"]` tables. A namespace `prices` covers the topic `prices` and every topic
//! that continues it after a separator (`prices.EURUSD`, `prices:fx`,
//! `prices/EURUSD`), not `pricesX`; the longest namespace covering a topic
//! wins, and what it leaves unset comes from the flags.
//!
//! A topic's resolved policies ([`Resolved`]) live in its directory entry
//! as a [`LivePolicy`]: a reload replaces them while delivery reads them.

use super::history::HistoryLimits;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
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
    /// With tokens on: whether subscribers without a token may subscribe
    /// to its topics (`None`: `--anonymous-subscribe`).
    pub anonymous_subscribe: Option<bool>,
}

/// The namespace table with its lookups. The longest namespace covering a
/// name is found by one hash lookup per separator in the name (at most its
/// length, itself bounded by `--max-topic-len`), not by a scan of the
/// table: a publication to a topic without an entry, and every new entry,
/// look it up, and an operator's table may hold thousands. The namespaces
/// whose prefix begins with a pattern's literal part are a range of the
/// table sorted by prefix. Dereferences to the table, in the file's order
/// (a namespace's index is its place there).
#[derive(Debug, Default)]
pub struct Namespaces {
    table: Vec<NamespacePolicy>,
    /// Prefix -> index in `table` (of two equal prefixes, the later).
    by_prefix: HashMap<Box<str>, usize>,
    /// Indices into `table`, ordered by prefix.
    sorted: Vec<usize>,
    /// `lengths[n]`: some prefix is `n` bytes long. A candidate of
    /// another length (any longer than the longest) is not looked up.
    lengths: Vec<bool>,
}

impl Namespaces {
    pub fn new(table: Vec<NamespacePolicy>) -> Self {
        let mut by_prefix = HashMap::with_capacity(table.len());
        for (i, p) in table.iter().enumerate() {
            by_prefix.insert(p.prefix.as_str().into(), i);
        }
        let mut sorted: Vec<usize> = (0..table.len()).collect();
        sorted.sort_by(|&a, &b| table[a].prefix.cmp(&table[b].prefix));
        let longest = table.iter().map(|p| p.prefix.len()).max().unwrap_or(0);
        let mut lengths = vec![false; longest + 1];
        for p in &table {
            lengths[p.prefix.len()] = true;
        }
        Self {
            table,
            by_prefix,
            sorted,
            lengths,
        }
    }

    /// The index of the namespace covering `name` (the longest), if any:
    /// `name` itself, then each part of it before a separator, longest
    /// first.
    pub fn covering(&self, name: &str) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let find = |prefix: &str| {
            if self.lengths.get(prefix.len()) == Some(&true) {
                self.by_prefix.get(prefix).copied()
            } else {
                None
            }
        };
        find(name).or_else(|| {
            name.rmatch_indices(['.', ':', '/'])
                .find_map(|(at, _)| find(&name[..at]))
        })
    }

    /// The namespaces whose prefix begins with `literal`.
    pub fn starting_with<'a>(
        &'a self,
        literal: &'a str,
    ) -> impl Iterator<Item = &'a NamespacePolicy> + 'a {
        let from = self
            .sorted
            .partition_point(|&i| self.table[i].prefix.as_str() < literal);
        self.sorted[from..]
            .iter()
            .map(|&i| &self.table[i])
            .take_while(move |p| p.prefix.starts_with(literal))
    }
}

impl From<Vec<NamespacePolicy>> for Namespaces {
    fn from(table: Vec<NamespacePolicy>) -> Self {
        Self::new(table)
    }
}

impl Deref for Namespaces {
    type Target = [NamespacePolicy];
    fn deref(&self) -> &[NamespacePolicy] {
        &self.table
    }
}

impl PartialEq for Namespaces {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table
    }
}

/// With tokens on, may a subscriber without a token subscribe to `name`
/// (a topic or a pattern)? The setting of the longest namespace covering
/// it, else `default` (`--anonymous-subscribe`). A pattern also needs every
/// namespace it may reach to allow it: any namespace whose prefix begins
/// with the pattern's literal part (what comes before its first wildcard)
/// and resolves to no, refuses it (`prices.>` is refused when
/// `prices.private` is closed, even if `prices` is open).
pub fn anonymous_may_subscribe(policies: &Namespaces, name: &str, default: bool) -> bool {
    let setting = |p: &NamespacePolicy| p.anonymous_subscribe.unwrap_or(default);
    if !crate::pubsub::pattern::is_pattern(name) {
        return policies
            .covering(name)
            .map_or(default, |i| setting(&policies[i]));
    }
    let literal = name
        .split('.')
        .take_while(|t| *t != "*" && *t != ">")
        .map(|t| t.len() + 1)
        .sum::<usize>();
    let literal = &name[..literal.min(name.len())];
    let at_prefix = policies
        .covering(literal.trim_end_matches('.'))
        .map_or(default, |i| setting(&policies[i]));
    at_prefix && policies.starting_with(literal).all(setting)
}

/// The slow-consumer policy of topic `name`: the longest covering
/// namespace's if it sets one (`None`: the flag's).
pub fn slow_consumer(policies: &Namespaces, name: &str) -> Option<SlowConsumerPolicy> {
    policies
        .covering(name)
        .and_then(|i| policies[i].slow_consumer)
}

/// What the namespace table gives one topic: the covering namespace's
/// settings, the rest from the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub limits: HistoryLimits,
    pub last_value: bool,
    pub slow_consumer: Option<SlowConsumerPolicy>,
    /// The namespace's index in the table, if one covers the topic.
    pub namespace: Option<usize>,
    pub max_rate: Option<u32>,
}

/// The policies of topic `name`: the longest covering namespace's, the
/// history limits and last value it leaves unset from `global` /
/// `last_value` (the flags). One lookup per separator in `name` (once per
/// topic entry, and per entry at a reload).
pub fn resolve(
    policies: &Namespaces,
    name: &str,
    global: &HistoryLimits,
    last_value: bool,
) -> Resolved {
    let namespace = policies.covering(name);
    match namespace.map(|i| &policies[i]) {
        None => Resolved {
            limits: *global,
            last_value,
            slow_consumer: None,
            namespace: None,
            max_rate: None,
        },
        Some(p) => Resolved {
            limits: HistoryLimits {
                size: p.history_size.unwrap_or(global.size),
                bytes: p.history_bytes.unwrap_or(global.bytes),
                age: p.history_age.unwrap_or(global.age),
                memory: global.memory,
            },
            last_value: p.last_value.unwrap_or(last_value),
            slow_consumer: p.slow_consumer,
            namespace,
            max_rate: p.max_rate,
        },
    }
}

/// A topic's [`Resolved`] policies (less its history limits, which live
/// with its history), replaceable while they are read: written under the
/// directory's lock, read with one relaxed load each. Each is a setting of
/// its own: a reader that sees one old value for a moment after a reload
/// does no harm.
#[derive(Debug)]
pub struct LivePolicy {
    /// Whether its history keeps anything (`limits.size > 0`): a
    /// publication to a topic without history takes no lock for it.
    keeps: AtomicBool,
    /// Whether a new enveloped subscriber gets its last value (the
    /// setting, and a history that keeps it).
    last_value: AtomicBool,
    /// [`encode`]d; 0: the flag's.
    slow_consumer: AtomicU8,
    /// [`NO_NAMESPACE`]: none.
    namespace: AtomicU32,
    /// 0: not set (it is at least 1 when set).
    max_rate: AtomicU32,
}

/// [`LivePolicy::namespace`] of a topic no namespace covers.
const NO_NAMESPACE: u32 = u32::MAX;

/// A slow-consumer policy as [`LivePolicy`] holds it.
fn encode(p: Option<SlowConsumerPolicy>) -> u8 {
    match p {
        None => 0,
        Some(SlowConsumerPolicy::Disconnect) => 1,
        Some(SlowConsumerPolicy::DropNewest) => 2,
        Some(SlowConsumerPolicy::Conflate) => 3,
        Some(SlowConsumerPolicy::Always) => 4,
    }
}

/// The inverse of [`encode`].
fn decode(v: u8) -> Option<SlowConsumerPolicy> {
    match v {
        1 => Some(SlowConsumerPolicy::Disconnect),
        2 => Some(SlowConsumerPolicy::DropNewest),
        3 => Some(SlowConsumerPolicy::Conflate),
        4 => Some(SlowConsumerPolicy::Always),
        _ => None,
    }
}

impl LivePolicy {
    pub fn new(r: &Resolved) -> Self {
        let p = Self {
            keeps: AtomicBool::new(false),
            last_value: AtomicBool::new(false),
            slow_consumer: AtomicU8::new(0),
            namespace: AtomicU32::new(NO_NAMESPACE),
            max_rate: AtomicU32::new(0),
        };
        p.store(r);
        p
    }

    /// Takes `r` (a reload).
    pub fn store(&self, r: &Resolved) {
        let keeps = r.limits.size > 0;
        let namespace = r.namespace.map_or(NO_NAMESPACE, |i| i as u32);
        self.keeps.store(keeps, Ordering::Relaxed);
        self.last_value
            .store(r.last_value && keeps, Ordering::Relaxed);
        self.slow_consumer
            .store(encode(r.slow_consumer), Ordering::Relaxed);
        self.namespace.store(namespace, Ordering::Relaxed);
        self.max_rate
            .store(r.max_rate.unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether the topic's history keeps anything.
    pub fn keeps(&self) -> bool {
        self.keeps.load(Ordering::Relaxed)
    }

    /// Whether a new enveloped subscriber gets the topic's last value.
    pub fn last_value(&self) -> bool {
        self.last_value.load(Ordering::Relaxed)
    }

    /// Its namespace's slow-consumer policy, if it sets one.
    pub fn slow_consumer(&self) -> Option<SlowConsumerPolicy> {
        decode(self.slow_consumer.load(Ordering::Relaxed))
    }

    /// Its namespace's index in the table, if any.
    pub fn namespace(&self) -> Option<usize> {
        let ns = self.namespace.load(Ordering::Relaxed);
        (ns != NO_NAMESPACE).then_some(ns as usize)
    }

    /// Its namespace's `max-rate`, if set.
    pub fn max_rate(&self) -> Option<u32> {
        Some(self.max_rate.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether namespace `prefix` covers topic `name` (the definition).
    fn covers(prefix: &str, name: &str) -> bool {
        match name.strip_prefix(prefix) {
            Some("") => true,
            Some(rest) => matches!(rest.as_bytes()[0], b'.' | b':' | b'/'),
            None => false,
        }
    }

    /// The covering namespace by the definition: a scan of the table
    /// (the lookup before the index), the later of two equal prefixes.
    fn covering_by_scan(table: &[NamespacePolicy], name: &str) -> Option<usize> {
        table
            .iter()
            .enumerate()
            .filter(|(_, p)| covers(&p.prefix, name))
            .max_by_key(|(_, p)| p.prefix.len())
            .map(|(i, _)| i)
    }

    fn named(prefix: &str) -> NamespacePolicy {
        NamespacePolicy {
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_index_finds_what_a_scan_of_the_table_finds() {
        let table = Namespaces::new(
            [
                "prices",
                "prices.fx",
                "prices:fx",
                "news/eu",
                "a",
                "a.b.c",
                "a.b",
                "x",
                "x",
            ]
            .into_iter()
            .map(named)
            .collect(),
        );
        for name in [
            "prices",
            "prices.fx.EURUSD",
            "prices:fx",
            "prices:fx.X",
            "prices/eu",
            "pricesX",
            "price",
            "news/eu/de",
            "news/e",
            "a.b.c.d",
            "a.b.cd",
            "a.b:c",
            "ab",
            "x.y",
            "x",
            ".",
            "a.",
            "",
        ] {
            assert_eq!(
                table.covering(name),
                covering_by_scan(&table, name),
                "{name:?}"
            );
        }
        assert_eq!(
            table.covering("x"),
            Some(8),
            "the later of two equal prefixes"
        );
        let under = |literal: &'static str| {
            let mut v: Vec<&str> = table
                .starting_with(literal)
                .map(|p| p.prefix.as_str())
                .collect();
            v.sort();
            v
        };
        assert_eq!(under("prices."), ["prices.fx"]);
        assert_eq!(under("a."), ["a.b", "a.b.c"]);
        assert_eq!(under(""), {
            let mut all: Vec<&str> = table.iter().map(|p| p.prefix.as_str()).collect();
            all.sort();
            all
        });
        assert!(under("z").is_empty());
        assert_eq!(Namespaces::default().covering("a"), None);
    }

    proptest::proptest! {
        /// Over random tables and names from a small alphabet with every
        /// separator, the index agrees with the scan, and the range under
        /// a literal with a filter of the table.
        #[test]
        fn the_index_agrees_with_the_scan_on_any_table(
            prefixes in proptest::collection::vec("[ab.:/]{0,6}", 0..12),
            names in proptest::collection::vec("[ab.:/]{0,8}", 1..12),
        ) {
            let table = Namespaces::new(prefixes.iter().map(|p| named(p)).collect());
            for name in &names {
                proptest::prop_assert_eq!(table.covering(name), covering_by_scan(&table, name));
                let mut by_range: Vec<&str> =
                    table.starting_with(name).map(|p| p.prefix.as_str()).collect();
                let mut by_filter: Vec<&str> = table
                    .iter()
                    .filter(|p| p.prefix.starts_with(name.as_str()))
                    .map(|p| p.prefix.as_str())
                    .collect();
                by_range.sort();
                by_filter.sort();
                proptest::prop_assert_eq!(by_range, by_filter);
            }
        }
    }

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
        let policies = Namespaces::from(vec![
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
        ]);
        let r = resolve(&policies, "prices.eq.X", &global, true);
        assert_eq!(
            (r.limits.size, r.limits.age, r.last_value, r.namespace),
            (1000, global.age, false, Some(0))
        );
        let r = resolve(&policies, "prices.fx.EURUSD", &global, true);
        assert_eq!(
            (r.limits.size, r.limits.age, r.last_value, r.namespace),
            (global.size, Duration::from_secs(3600), true, Some(1)),
            "the longest wins alone (no inheritance between namespaces)"
        );
        let r = resolve(&policies, "news", &global, true);
        assert_eq!((r.limits, r.last_value, r.namespace), (global, true, None));
    }

    #[test]
    fn a_live_policy_gives_back_what_it_was_given() {
        let global = HistoryLimits::default();
        let mut r = resolve(&Namespaces::default(), "t", &global, true);
        let live = LivePolicy::new(&r);
        assert_eq!(
            (
                live.keeps(),
                live.last_value(),
                live.namespace(),
                live.max_rate()
            ),
            (true, true, None, None)
        );
        for p in [
            SlowConsumerPolicy::Disconnect,
            SlowConsumerPolicy::DropNewest,
            SlowConsumerPolicy::Conflate,
            SlowConsumerPolicy::Always,
        ] {
            r.slow_consumer = Some(p);
            live.store(&r);
            assert_eq!(live.slow_consumer(), Some(p));
        }
        r.namespace = Some(7);
        r.max_rate = Some(1000);
        r.limits.size = 0;
        live.store(&r);
        assert_eq!(
            (
                live.keeps(),
                live.last_value(),
                live.namespace(),
                live.max_rate()
            ),
            (false, false, Some(7), Some(1000)),
            "no last value without a history"
        );
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
        let policies = Namespaces::from(vec![
            NamespacePolicy {
                prefix: "prices".into(),
                slow_consumer: Some(SlowConsumerPolicy::Always),
                ..Default::default()
            },
            NamespacePolicy {
                prefix: "prices.eq".into(),
                ..Default::default()
            },
        ]);
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

    #[test]
    fn anonymous_subscribers_follow_the_longest_namespace_and_patterns_every_one_they_reach() {
        let ns = |prefix: &str, anon: Option<bool>| NamespacePolicy {
            prefix: prefix.into(),
            anonymous_subscribe: anon,
            ..Default::default()
        };
        let table = Namespaces::from(vec![
            ns("public", Some(true)),
            ns("public.private", Some(false)),
            ns("public.quiet", None),
            ns("news", None),
        ]);
        let may = |name: &str, default: bool| anonymous_may_subscribe(&table, name, default);
        assert!(may("public.a", false));
        assert!(may("public:fx", false));
        assert!(!may("public.private.a", false));
        assert!(!may("public.quiet.a", false), "unset: the flag's");
        assert!(may("public.quiet.a", true));
        assert!(!may("news.a", false));
        assert!(!may("other", false));
        assert!(may("other", true));
        // Patterns: allowed where every namespace they may reach allows.
        assert!(may("public.news.*", false));
        assert!(!may("public.>", false), "reaches public.private");
        assert!(
            !may("public.*", false),
            "reaches public.private and public.quiet"
        );
        assert!(!may("public.>", true), "public.private says no");
        assert!(!may(">", true));
        assert!(!may("public.private.*", true));
        let open = Namespaces::from(vec![ns("a", Some(true))]);
        assert!(anonymous_may_subscribe(&open, ">", true));
        assert!(
            !anonymous_may_subscribe(&open, ">", false),
            "topics outside any namespace"
        );
        assert!(anonymous_may_subscribe(&open, "a.>", false));
    }
}
