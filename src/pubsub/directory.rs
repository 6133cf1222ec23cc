//! The process-wide view of interest: for each topic, which workers have at
//! least one subscriber. A publish reads one atomic mask and visits only
//! those workers.
//!
//! The map itself sits behind a mutex, but it is locked only when a worker
//! gains its first or loses its last subscriber of a topic, when a WebSocket
//! publisher opens or closes ([`Directory::entry`], [`Directory::release`]),
//! once per HTTP publish, and on every `/metrics` rendering
//! ([`Directory::len`]); the delivery path reads the mask through an `Arc`
//! it already holds, lock-free.
//!
//! Lifetime rule: an entry stays in the map while anyone holds its `Arc`
//! besides the map (a worker with local subscribers, a publisher, a
//! publication not yet dispatched). So a publisher holding the `Arc`
//! always sees later subscribers, and topics nobody uses any more are
//! forgotten (no unbounded growth from clients trying random names).
//! Every holder lets go through [`Directory::release`] or
//! [`Directory::release_many`], under the map's lock, so the last one
//! always sees that only the map is left. A topic whose history holds
//! something is then *retained* rather than forgotten, so a subscriber
//! that reconnects can still recover: until its history ages out
//! (`--history-age`, judged by the workers' sweep) or more than
//! `--retained-topics` are retained (the longest retained goes first).
//! The entry's lifetime is the topic's history lifetime: its
//! [`epoch`](TopicInterest::epoch).
//!
//! Policies: each entry holds what the namespace covering its name sets
//! (history bounds, last value, slow-consumer policy, `max-rate`),
//! resolved when the entry is made and again, for every entry, when a
//! reload replaces the namespace table ([`Directory::set_policies`]).
//! Delivery reads them with one relaxed atomic load per run, so a changed
//! slow-consumer policy or `max-rate` applies from the next publication;
//! history bounds live beside the history, under its lock.

use super::envelope::Message;
use super::history::{History, HistoryLimits, HistoryMemory, Recovery, Since};
use super::pattern::{self, PatternTrie};
use super::policy::{self, LivePolicy, NamespacePolicy, Namespaces, Resolved, SlowConsumerPolicy};
use super::remote::Link;
use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::Instant;

/// What [`TopicInterest::adopt`] made of a number given elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// At or before the topic's newest: a copy already handed on.
    Old,
    /// The next number (or the first this entry sees).
    Next,
    /// Past the next: the publications between never reached this process.
    Gap,
    /// A later epoch: the topic's numbering started over.
    Restart,
}

/// Most workers a mask can describe.
pub const MAX_WORKERS: usize = 64;

/// One topic's name and interested workers.
#[derive(Debug)]
pub struct TopicInterest {
    name: Arc<str>,
    /// Bit `w` set: worker `w` has at least one local subscriber.
    workers: AtomicU64,
    /// This entry's history lifetime (see [`Self::epoch`]); changed only
    /// in a cluster, by [`Self::adopt`] under the topic's order lock.
    epoch: AtomicU64,
    /// The last sequence number given (0: none yet); advanced only under
    /// the topic's order lock ([`Bus::hold_order`](super::bus::Bus::hold_order)),
    /// or by the only worker.
    seq: AtomicU64,
    /// Recent publications, appended under the order lock, with the
    /// bounds they are kept to.
    history: Mutex<Kept>,
    /// The listing of this topic in the directory's retained topics that
    /// counts (0: not retained); written under the directory's lock.
    retained: AtomicU64,
    /// Its namespace's policies, written under the directory's lock (when
    /// the entry is made, and by [`Directory::set_policies`]).
    policy: LivePolicy,
    /// The workers with a pattern subscription matching this topic, as
    /// of pattern version `pattern_version` (see [`Directory::targets`]);
    /// both written only under the topic's order lock.
    pattern_workers: AtomicU64,
    pattern_version: AtomicU64,
    /// Its history here holds what there is to recover (always, alone;
    /// in a cluster, once filled from the stream: see [`Self::set_warm`]).
    warm: std::sync::atomic::AtomicBool,
}

/// A topic's history and the bounds it is kept to (its namespace's, or
/// the flags'), under one lock: a reload changes the bounds where appends
/// read them.
#[derive(Debug)]
struct Kept {
    history: History,
    limits: HistoryLimits,
}

impl Kept {
    /// Drops what is older than the bounds' age by `now` (the newest stays).
    fn expire(&mut self, memory: &HistoryMemory, now: Instant) {
        self.history.expire(&self.limits, memory, now);
    }
}

impl TopicInterest {
    fn new(name: Arc<str>, epoch: u64, r: &Resolved, warm: bool) -> Self {
        Self {
            name,
            workers: AtomicU64::new(0),
            epoch: AtomicU64::new(epoch),
            seq: AtomicU64::new(0),
            history: Mutex::new(Kept {
                history: History::default(),
                limits: r.limits,
            }),
            retained: AtomicU64::new(0),
            policy: LivePolicy::new(r),
            pattern_workers: AtomicU64::new(0),
            pattern_version: AtomicU64::new(0),
            warm: std::sync::atomic::AtomicBool::new(warm),
        }
    }

    /// Whether this process's history of the topic can answer a recovery:
    /// always on one machine; in a cluster, once the node filled it from
    /// the cluster's stream (until then a recovery is asked to retry).
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    /// The history was filled from the cluster's stream.
    pub fn set_warm(&self) {
        self.warm.store(true, Ordering::Release);
    }

    /// Takes the policies `r` (a reload): the history is trimmed to its
    /// new size and bytes at once (its new age applies wherever it is
    /// read: appends, recoveries, the sweep). The caller holds the
    /// directory's lock.
    fn apply(&self, r: &Resolved, memory: &HistoryMemory) {
        let mut kept = self.kept();
        kept.limits = r.limits;
        let Kept { history, limits } = &mut *kept;
        history.trim(limits, memory);
        self.policy.store(r);
    }

    /// The topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The workers with subscribers, as a bit mask.
    pub fn workers(&self) -> u64 {
        // Acquire pairs with the Release in `set`: a publisher that sees the bit
        // also sees the subscription that caused it.
        self.workers.load(Ordering::Acquire)
    }

    /// The topic's epoch: one value per history lifetime of the topic
    /// (this directory entry's), different from every epoch an earlier
    /// entry for the name had in this process or an earlier one (see
    /// [`Directory::new`]). Sequence numbers count from 1 within an epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The last sequence number given (0: none).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Gives the next sequence number. The caller holds the topic's order
    /// lock (or is the only worker): the number and the order in which
    /// the publication then reaches every mailbox are one.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes the number a publication got elsewhere (a cluster's
    /// sequencer) as this topic's newest. The caller holds the topic's
    /// order lock and, unless the answer is [`Adopt::Old`], hands the
    /// publication to the interested workers under it.
    pub fn adopt(&self, epoch: u64, seq: u64) -> Adopt {
        let (now_epoch, now) = (self.epoch(), self.seq());
        let step = if now == 0 {
            Adopt::Next
        } else if epoch == now_epoch {
            match seq {
                s if s <= now => return Adopt::Old,
                s if s == now + 1 => Adopt::Next,
                _ => Adopt::Gap,
            }
        } else if epoch < now_epoch {
            // Epochs are clock readings: a smaller one is an older lifetime.
            return Adopt::Old;
        } else {
            Adopt::Restart
        };
        self.epoch.store(epoch, Ordering::Relaxed);
        self.seq.store(seq, Ordering::Relaxed);
        step
    }

    /// Whether a new enveloped subscriber gets the topic's last value (its
    /// namespace's setting, or the flag's).
    pub fn last_value(&self) -> bool {
        self.policy.last_value()
    }

    /// Its namespace's slow-consumer policy, if it sets one.
    pub fn slow_consumer(&self) -> Option<SlowConsumerPolicy> {
        self.policy.slow_consumer()
    }

    /// Its namespace's most publications per second to one subscriber.
    pub fn max_rate(&self) -> Option<u32> {
        self.policy.max_rate()
    }

    /// Whether its history keeps anything.
    fn keeps(&self) -> bool {
        self.policy.keeps()
    }

    /// Its namespace (index in the directory's policies), if any; read
    /// under the directory's lock.
    fn namespace(&self) -> Option<usize> {
        self.policy.namespace()
    }

    /// The name, shared.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The history's bounds (its namespace's, or the flags').
    pub fn limits(&self) -> HistoryLimits {
        self.kept().limits
    }

    /// The topic's history and bounds. Locked under the order lock when
    /// appended and read, under the directory's lock by a sweep or a
    /// reload; never held while taking the directory's lock.
    fn kept(&self) -> MutexGuard<'_, Kept> {
        // Every operation leaves it consistent: poisoning ignored.
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Default most topics kept for their history once nobody holds them
/// (`--retained-topics`).
pub const DEFAULT_RETAINED_TOPICS: usize = 10_000;

/// The patterns subscribed to anywhere: each with the workers holding it
/// (bit `w`), and how many each worker holds.
#[derive(Debug)]
struct Patterns {
    trie: PatternTrie<u64>,
    /// Patterns each worker holds.
    per_worker: [u32; 64],
    /// The workers holding at least one (bit `w`).
    holders: u64,
}

impl Default for Patterns {
    fn default() -> Self {
        Self {
            trie: PatternTrie::default(),
            per_worker: [0; 64],
            holders: 0,
        }
    }
}

impl Patterns {
    /// Counts one pattern more or less for `worker`.
    fn count(&mut self, worker: usize, more: bool) {
        let n = &mut self.per_worker[worker];
        if more {
            *n += 1;
        } else {
            *n -= 1;
        }
        if *n == 0 {
            self.holders &= !(1 << worker);
        } else {
            self.holders |= 1 << worker;
        }
    }
}

/// Topic name → interest, shared by all workers.
#[derive(Debug)]
pub struct Directory {
    topics: Mutex<Topics>,
    /// The next entry's epoch.
    next_epoch: AtomicU64,
    /// What each topic's history keeps (the flags), and the total.
    limits: HistoryLimits,
    /// Per-namespace policies. Replaced (by [`Self::set_policies`]) only
    /// while the map's lock is held too, so under that lock the table and
    /// every entry's resolved policies agree; read-locked alone by the
    /// lookups for topics without an entry.
    policies: RwLock<Arc<Namespaces>>,
    /// Whether new enveloped subscribers get last values (the flag).
    last_value: bool,
    /// Most topics in `Topics::retained`.
    retained_max: usize,
    /// Every history's bytes together.
    memory: HistoryMemory,
    /// Patterns subscribed to anywhere, each with the workers holding it
    /// (bit `w`). Lock order: an order lock, then the map, then this.
    patterns: Mutex<Patterns>,
    /// Bumped (under `patterns`) whenever a pattern's workers change; 0
    /// while no pattern was ever subscribed to.
    pattern_version: AtomicU64,
    /// The cluster this process belongs to, if any (`--nats-url`): told
    /// when the process gains or loses interest in a topic or a pattern.
    link: OnceLock<Arc<dyn Link>>,
}

#[derive(Debug, Default)]
struct Topics {
    map: HashMap<Arc<str>, Arc<TopicInterest>>,
    /// Topics nobody holds any more, kept for their history, in the order
    /// they were let go (oldest first), each with its listing number. A
    /// topic taken again (or let go again) leaves a stale listing, skipped
    /// when its turn comes or a sweep passes.
    retained: VecDeque<(Arc<str>, u64)>,
    /// Listings that count: topics retained now.
    retained_count: usize,
    /// Of which per namespace (index in the directory's policies; grown
    /// on demand, recounted when the policies are replaced).
    retained_per_ns: Vec<usize>,
    /// The same listings per namespace, oldest first (stale ones skipped
    /// as in `retained`): a namespace over its `retained-topics` finds its
    /// oldest without a pass over every namespace's listings.
    retained_ns: Vec<VecDeque<(Arc<str>, u64)>>,
    /// The last listing number given.
    listings: u64,
}

impl Topics {
    /// `e` is no longer retained (taken again, or forgotten).
    fn unretain(&mut self, e: &TopicInterest) {
        if e.retained.swap(0, Ordering::Relaxed) != 0 {
            self.retained_count -= 1;
            if let Some(ns) = e.namespace() {
                self.retained_per_ns[ns] -= 1;
            }
        }
    }
}

/// What [`Directory::forget_listed`] did with a retained listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forget {
    /// Not the listing that counts (the topic was taken again, or is gone).
    Stale,
    /// Held for a moment (an HTTP publish to it): still listed.
    Held,
    /// Forgotten, with the messages its history held.
    Forgotten { dropped: usize },
}

impl Default for Directory {
    fn default() -> Self {
        Self::new()
    }
}

impl Directory {
    /// A directory with the default history limits.
    pub fn new() -> Self {
        Self::with_history(HistoryLimits::default(), DEFAULT_RETAINED_TOPICS)
    }

    /// [`Self::with_history`] with per-namespace policies and the
    /// last-value flag.
    pub fn with_policies(
        limits: HistoryLimits,
        retained_topics: usize,
        policies: Vec<NamespacePolicy>,
        last_value: bool,
    ) -> Self {
        Self {
            policies: RwLock::new(Arc::new(Namespaces::new(policies))),
            last_value,
            ..Self::with_history(limits, retained_topics)
        }
    }

    /// Epochs start at the wall-clock time in microseconds since 1970 and
    /// count up by one per entry: a restarted process starts past every
    /// epoch of the last one unless that one made more than a million
    /// topic entries per second of its life; below 2^53, so exact in
    /// JavaScript.
    pub fn with_history(limits: HistoryLimits, retained_topics: usize) -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Self {
            topics: Mutex::new(Topics::default()),
            next_epoch: AtomicU64::new(micros.max(1)),
            limits,
            policies: RwLock::new(Arc::default()),
            last_value: true,
            retained_max: retained_topics,
            memory: HistoryMemory::default(),
            patterns: Mutex::new(Patterns::default()),
            pattern_version: AtomicU64::new(0),
            link: OnceLock::new(),
        }
    }

    /// Joins this process's fan-out to a cluster (once, before any worker
    /// runs): interest changes go to `link`, and workers hand it their
    /// publications instead of numbering them ([`Self::link`]).
    pub fn set_link(&self, link: Arc<dyn Link>) {
        let _ = self.link.set(link);
    }

    /// The cluster link, if the process is in a cluster.
    pub fn link(&self) -> Option<&Arc<dyn Link>> {
        self.link.get()
    }

    /// Whether any worker has a subscriber of `name` (the cluster's view
    /// of this process's interest in a topic; a pattern's is
    /// [`Self::pattern_held`]).
    pub fn topic_held(&self, name: &str) -> bool {
        self.get(name).is_some_and(|t| t.workers() != 0)
    }

    /// Whether any worker holds a subscription to `pattern`.
    pub fn pattern_held(&self, pattern: &str) -> bool {
        self.patterns().trie.get(pattern).is_some_and(|m| *m != 0)
    }

    /// Puts `older` (oldest first, taken from a cluster's stream) in front
    /// of `topic`'s history: the run of them, in the topic's epoch, that
    /// ends right before the oldest number held (or at the topic's newest,
    /// when nothing is held). The caller holds the topic's order lock.
    pub fn fill_history(&self, topic: &TopicInterest, older: Vec<Arc<Message>>, now: Instant) {
        if !topic.keeps() {
            return;
        }
        {
            let mut k = topic.kept();
            let Some(mut want) = k
                .history
                .first_seq()
                .map_or(Some(topic.seq()), |f| f.checked_sub(1))
            else {
                return;
            };
            let epoch = topic.epoch();
            let mut run = Vec::new();
            for m in older.into_iter().rev() {
                if m.epoch != epoch || m.seq > want {
                    continue;
                }
                if m.seq < want || want == 0 {
                    break;
                }
                run.push(m);
                want -= 1;
            }
            run.reverse();
            let Kept { history, limits } = &mut *k;
            let unbounded = HistoryLimits {
                memory: usize::MAX,
                ..*limits
            };
            history.prepend(run, &unbounded, &self.memory, now);
        }
        if self.memory.bytes() > self.limits.memory {
            self.forget_retained_while_over(self.limits.memory);
            let mut k = topic.kept();
            let Kept { history, limits } = &mut *k;
            history.trim_to_memory(limits, &self.memory);
        }
    }

    /// Empties `topic`'s history (its numbering jumped: what it holds no
    /// longer leads without a hole to what comes). The caller holds the
    /// topic's order lock.
    pub fn clear_history(&self, topic: &TopicInterest) {
        topic.kept().history.clear(&self.memory);
    }

    /// The same, numbering epochs from `first` instead of the clock: for
    /// runs that must be repeatable (the fuzz targets compare two).
    pub fn with_first_epoch(self, first: u64) -> Self {
        Self {
            next_epoch: AtomicU64::new(first.max(1)),
            ..self
        }
    }

    fn patterns(&self) -> MutexGuard<'_, Patterns> {
        // Every operation leaves the trie consistent: poisoning ignored.
        self.patterns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `worker` as holding subscriptions to `pattern` or not (its
    /// first arrives, its last leaves). The caller holds every order lock
    /// when adding ([`Bus::hold_all_order`](super::bus::Bus::hold_all_order)),
    /// so each topic's publications reach the worker from one point on.
    pub fn set_pattern(&self, pattern: &str, worker: usize, interested: bool) {
        let bit = 1u64 << worker;
        let mut patterns = self.patterns();
        let (changed, edge) = if interested {
            let mask = patterns.trie.get_or_insert_with(pattern, || 0);
            let was = *mask;
            *mask |= bit;
            let changed = was != *mask;
            if changed {
                patterns.count(worker, true);
            }
            (changed, was == 0)
        } else {
            match patterns.trie.get_mut(pattern) {
                Some(mask) if *mask & bit != 0 => {
                    *mask &= !bit;
                    let gone = *mask == 0;
                    if gone {
                        patterns.trie.remove(pattern);
                    }
                    patterns.count(worker, false);
                    (true, gone)
                }
                _ => (false, false),
            }
        };
        drop(patterns);
        if changed {
            self.pattern_version.fetch_add(1, Ordering::Release);
        }
        if edge && let Some(link) = self.link.get() {
            link.interest_changed(pattern, true);
        }
    }

    /// The namespace table in force.
    fn policies(&self) -> RwLockReadGuard<'_, Arc<Namespaces>> {
        // Only ever replaced whole: poisoning ignored.
        self.policies.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The namespace table in force (the last reload's, or the start's).
    pub fn namespaces(&self) -> Arc<Namespaces> {
        Arc::clone(&self.policies())
    }

    /// The slow-consumer policy of topic `name` (its namespace's, if set).
    pub fn slow_consumer_of(&self, name: &str) -> Option<SlowConsumerPolicy> {
        policy::slow_consumer(&self.policies(), name)
    }

    /// The `max-rate` of topic `name`'s namespace, if set.
    pub fn max_rate_of(&self, name: &str) -> Option<u32> {
        let policies = self.policies();
        policies.covering(name).and_then(|i| policies[i].max_rate)
    }

    /// What `policies` give topic `name`.
    fn resolve(&self, policies: &Namespaces, name: &str) -> Resolved {
        policy::resolve(policies, name, &self.limits, self.last_value)
    }

    /// Replaces the namespace table (a reload) and resolves every entry
    /// again, under the map's lock: from now on each topic's publications
    /// see its new slow-consumer policy and `max-rate` (from the next
    /// run delivered), new subscribers its new last-value setting, and its
    /// history is trimmed at once to its new size and bytes (its new age
    /// applies at the next append, recovery or sweep). Retained topics are
    /// counted per namespace again, and a namespace over its new
    /// `retained-topics` forgets its longest retained at once. A table
    /// equal to the one in force changes nothing.
    pub fn set_policies(&self, policies: Vec<NamespacePolicy>) {
        let mut t = self.lock();
        let policies = Arc::new(Namespaces::new(policies));
        {
            let mut current = self.policies.write().unwrap_or_else(|p| p.into_inner());
            if **current == *policies {
                return;
            }
            *current = Arc::clone(&policies);
        }
        let Topics {
            map,
            retained_per_ns,
            ..
        } = &mut *t;
        *retained_per_ns = vec![0; policies.len()];
        for e in map.values() {
            let r = self.resolve(&policies, &e.name);
            e.apply(&r, &self.memory);
            if let Some(ns) = r.namespace
                && e.retained.load(Ordering::Relaxed) != 0
            {
                retained_per_ns[ns] += 1;
            }
        }
        self.forget_over_namespace_bounds(&mut t, &policies);
        Self::relist_namespaces(&mut t, &policies);
    }

    /// Forgets, the longest retained first, the retained topics of each
    /// namespace over its `retained-topics` (one pass over the listings;
    /// one held for a moment stays).
    fn forget_over_namespace_bounds(&self, t: &mut Topics, policies: &[NamespacePolicy]) {
        let mut excess: Vec<usize> = policies
            .iter()
            .zip(&t.retained_per_ns)
            .map(|(p, &n)| p.retained_topics.map_or(0, |b| n.saturating_sub(b)))
            .collect();
        if excess.iter().all(|&n| n == 0) {
            return;
        }
        let mut listings = std::mem::take(&mut t.retained);
        listings.retain(|(name, listing)| {
            let Some(ns) = t.map.get(name).and_then(|e| e.namespace()) else {
                return true;
            };
            if excess[ns] == 0 {
                return true;
            }
            match self.forget_listed(t, name, *listing) {
                Forget::Forgotten { dropped } => {
                    self.memory.evicted(dropped);
                    excess[ns] -= 1;
                    false
                }
                Forget::Held => true,
                Forget::Stale => false,
            }
        });
        t.retained = listings;
    }

    /// Distinct patterns subscribed to anywhere (for metrics).
    pub fn pattern_count(&self) -> usize {
        self.patterns().trie.len()
    }

    /// Whether some pattern subscribed to anywhere matches `name`: the
    /// walk stops at the first (outside probe: it went on through every
    /// matching pattern, for each publication to a topic without an entry).
    pub fn pattern_matches(&self, name: &str) -> bool {
        self.pattern_matches_counted(name, &mut 0)
    }

    /// [`Self::pattern_matches`], adding the trie nodes walked to `steps`
    /// (a publisher's request pays for the walk its new name costs).
    pub fn pattern_matches_counted(&self, name: &str, steps: &mut usize) -> bool {
        if self.pattern_version.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.patterns()
            .trie
            .try_for_each_match_counted(name, steps, |_| ControlFlow::Break(()))
    }

    /// The workers a publication to `topic` goes to: those with a
    /// subscriber of it, and those with a pattern subscription matching
    /// it. The caller holds the topic's order lock (or is the only
    /// worker). The pattern part is cached in the topic and recomputed
    /// (one walk of the pattern trie, whose cost does not grow with the
    /// patterns that do not match) only when the patterns changed.
    pub fn targets(&self, topic: &TopicInterest) -> u64 {
        self.targets_counted(topic, &mut 0)
    }

    /// [`Self::targets`], adding the trie nodes walked (if it walked) to
    /// `steps`.
    pub fn targets_counted(&self, topic: &TopicInterest, steps: &mut usize) -> u64 {
        let exact = topic.workers();
        let version = self.pattern_version.load(Ordering::Acquire);
        if version == 0 {
            return exact;
        }
        if topic.pattern_version.load(Ordering::Relaxed) != version {
            let trie = self.patterns();
            // Once every worker holding a pattern is in, the rest of the
            // walk could add nothing.
            let all = trie.holders;
            let mut mask = 0;
            trie.trie
                .try_for_each_match_counted(&topic.name, steps, |&m| {
                    mask |= m;
                    if mask == all {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
            // Read under the trie's lock: the mask is at least this recent.
            let version = self.pattern_version.load(Ordering::Relaxed);
            drop(trie);
            topic.pattern_workers.store(mask, Ordering::Relaxed);
            topic.pattern_version.store(version, Ordering::Relaxed);
        }
        exact | topic.pattern_workers.load(Ordering::Relaxed)
    }

    /// Up to `max` known topics matching `pattern` (for its snapshot),
    /// each held until the caller releases it, and how many topics it
    /// looked at. Linear in the topics known.
    pub fn matching(&self, pattern: &str, max: usize) -> (Vec<Arc<TopicInterest>>, usize) {
        let mut t = self.lock();
        let mut examined = 0;
        let found: Vec<Arc<TopicInterest>> = t
            .map
            .iter()
            .inspect(|_| examined += 1)
            .filter(|(name, _)| pattern::matches(pattern, name))
            .take(max)
            .map(|(_, e)| Arc::clone(e))
            .collect();
        for e in &found {
            t.unretain(e);
        }
        (found, examined)
    }

    /// `topic` (known from a publication's weak reference) held again, if
    /// it is still the directory's entry for its name: how a worker starts
    /// holding a topic it receives through a pattern. Under the map's lock,
    /// so it cannot race with the entry being forgotten.
    pub fn hold(&self, topic: &std::sync::Weak<TopicInterest>) -> Option<Arc<TopicInterest>> {
        let mut t = self.lock();
        let e = topic.upgrade()?;
        let current = t.map.get(&e.name).is_some_and(|m| Arc::ptr_eq(m, &e));
        if !current {
            drop(t);
            // Not the map's: some other holder keeps it; this one goes.
            drop(e);
            return None;
        }
        t.unretain(&e);
        Some(e)
    }

    fn lock(&self) -> MutexGuard<'_, Topics> {
        // A panic while holding the lock leaves the map consistent (every
        // operation is a single insert/remove), so poisoning is ignored.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `name`, created if absent. Holding it keeps it alive
    /// (and a retained topic is no longer retained).
    pub fn entry(&self, name: &str) -> Arc<TopicInterest> {
        let mut t = self.lock();
        if let Some(e) = t.map.get(name) {
            let e = Arc::clone(e);
            t.unretain(&e);
            return e;
        }
        let resolved = self.resolve(&self.policies(), name);
        let name: Arc<str> = Arc::from(name);
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        // In a cluster, a new entry's history is filled from the stream.
        let warm = self.link.get().is_none();
        let entry = Arc::new(TopicInterest::new(
            Arc::clone(&name),
            epoch,
            &resolved,
            warm,
        ));
        t.map.insert(name, Arc::clone(&entry));
        entry
    }

    /// The entry for `name` if anyone uses it or it is retained (no insert;
    /// for a hold of a moment, like a publish: a retained topic stays
    /// listed).
    pub fn get(&self, name: &str) -> Option<Arc<TopicInterest>> {
        self.lock().map.get(name).cloned()
    }

    /// Marks `worker` as interested in `topic` or not.
    pub fn set(&self, topic: &TopicInterest, worker: usize, interested: bool) {
        let bit = 1u64 << worker;
        let was = if interested {
            topic.workers.fetch_or(bit, Ordering::Release)
        } else {
            topic.workers.fetch_and(!bit, Ordering::Release)
        };
        let now = if interested { was | bit } else { was & !bit };
        if (was == 0) != (now == 0)
            && let Some(link) = self.link.get()
        {
            link.interest_changed(&topic.name, false);
        }
    }

    /// Drops the caller's `Arc`; a topic nobody else holds is forgotten,
    /// or retained for its history.
    pub fn release(&self, topic: Arc<TopicInterest>) {
        self.release_many(std::iter::once(topic));
    }

    /// [`Self::release`] for many references, under one lock.
    pub fn release_many(&self, topics: impl Iterator<Item = Arc<TopicInterest>>) {
        let mut t = self.lock();
        for topic in topics {
            // Under the lock, with every holder releasing through it, the
            // count can only grow by a clone of a reference still held
            // elsewhere: 2 means the map and this one only.
            if Arc::strong_count(&topic) == 2 {
                let name = Arc::clone(&topic.name);
                drop(topic);
                self.let_go(&mut t, &name);
            }
        }
        // Over the bound: forget the longest retained first. One held for
        // a moment (an HTTP publish to it) keeps its place; at most one
        // pass over the listings.
        let mut passes = t.retained.len();
        // Listings left stale by topics taken again: dropped in one pass
        // once they outnumber the live ones (amortised O(1) per listing).
        if t.retained.len() > 2 * t.retained_count + 64 {
            let mut listings = std::mem::take(&mut t.retained);
            listings.retain(|(name, listing)| {
                t.map
                    .get(name)
                    .is_some_and(|e| e.retained.load(Ordering::Relaxed) == *listing)
            });
            listings.shrink_to_fit();
            t.retained = listings;
        }
        while t.retained_count > self.retained_max && passes > 0 {
            passes -= 1;
            let Some((name, listing)) = t.retained.pop_front() else {
                break;
            };
            match self.forget_listed(&mut t, &name, listing) {
                Forget::Held => t.retained.push_back((name, listing)),
                Forget::Forgotten { dropped } => self.memory.evicted(dropped),
                Forget::Stale => {}
            }
        }
    }

    /// `name` is held by the map alone now: retain it if its history holds
    /// something, else forget it.
    fn let_go(&self, t: &mut Topics, name: &Arc<str>) {
        let Some(entry) = t.map.get(name) else {
            return;
        };
        if Arc::strong_count(entry) != 1 {
            return;
        }
        if entry.keeps() && !entry.kept().history.is_empty() {
            if entry.retained.load(Ordering::Relaxed) == 0 {
                t.listings += 1;
                entry.retained.store(t.listings, Ordering::Relaxed);
                t.retained.push_back((Arc::clone(name), t.listings));
                t.retained_count += 1;
                if let Some(ns) = entry.namespace() {
                    if t.retained_per_ns.len() <= ns {
                        t.retained_per_ns.resize(ns + 1, 0);
                    }
                    if t.retained_ns.len() <= ns {
                        t.retained_ns.resize_with(ns + 1, VecDeque::new);
                    }
                    t.retained_per_ns[ns] += 1;
                    let bound = self.policies()[ns].retained_topics;
                    if bound.is_some() {
                        let listing = (Arc::clone(name), t.listings);
                        t.retained_ns[ns].push_back(listing);
                        Self::drop_stale_of(t, ns);
                    }
                    if bound.is_some_and(|b| t.retained_per_ns[ns] > b) {
                        self.forget_oldest_of(t, ns);
                    }
                }
            }
        } else {
            let entry = Arc::clone(entry);
            t.unretain(&entry);
            entry.kept().history.clear(&self.memory);
            drop(entry);
            t.map.remove(name);
        }
    }

    /// Forgets `name` (its history dropped) if `listing` is the listing
    /// that counts for it and nobody holds it.
    fn forget_listed(&self, t: &mut Topics, name: &str, listing: u64) -> Forget {
        let Some(entry) = t.map.get(name) else {
            return Forget::Stale;
        };
        if entry.retained.load(Ordering::Relaxed) != listing {
            return Forget::Stale;
        }
        if Arc::strong_count(entry) != 1 {
            return Forget::Held;
        }
        let entry = Arc::clone(entry);
        t.unretain(&entry);
        let dropped = entry.kept().history.clear(&self.memory);
        drop(entry);
        t.map.remove(name);
        Forget::Forgotten { dropped }
    }

    /// Forgets the longest-retained topic of namespace `ns` that nobody
    /// holds, counting what its history dropped: a namespace over its
    /// `retained-topics`. From the front of the namespace's own listings
    /// (stale ones dropped, one held for a moment put back at most once
    /// each): amortised O(1) per listing, where a pass over every
    /// namespace's listings under this lock cost milliseconds per topic
    /// let go (outside code review).
    fn forget_oldest_of(&self, t: &mut Topics, ns: usize) {
        let Some(mut listings) = t.retained_ns.get_mut(ns).map(std::mem::take) else {
            return;
        };
        let mut held = VecDeque::new();
        while let Some((name, listing)) = listings.pop_front() {
            let valid = t.map.get(&name).is_some_and(|e| {
                e.namespace() == Some(ns) && e.retained.load(Ordering::Relaxed) == listing
            });
            if !valid {
                continue;
            }
            match self.forget_listed(t, &name, listing) {
                Forget::Forgotten { dropped } => {
                    self.memory.evicted(dropped);
                    break;
                }
                Forget::Held => held.push_back((name, listing)),
                Forget::Stale => {}
            }
        }
        // The held ones keep their place in front.
        held.append(&mut listings);
        t.retained_ns[ns] = held;
        Self::drop_stale_of(t, ns);
    }

    /// Drops namespace `ns`'s stale listings (topics taken again, or
    /// forgotten) once they outnumber its live ones: amortised O(1) per
    /// listing, and its listings at most about twice its retained topics.
    fn drop_stale_of(t: &mut Topics, ns: usize) {
        let live = t.retained_per_ns.get(ns).copied().unwrap_or(0);
        let Some(listings) = t.retained_ns.get_mut(ns) else {
            return;
        };
        if listings.len() > 2 * live + 64 {
            let map = &t.map;
            listings.retain(|(name, listing)| {
                map.get(name)
                    .is_some_and(|e| e.retained.load(Ordering::Relaxed) == *listing)
            });
        }
    }

    /// The per-namespace listings made again from `retained` (the
    /// namespaces were replaced), for the namespaces with a bound.
    fn relist_namespaces(t: &mut Topics, policies: &[NamespacePolicy]) {
        let mut per_ns = vec![VecDeque::new(); policies.len()];
        for (name, listing) in &t.retained {
            if let Some(e) = t.map.get(name)
                && e.retained.load(Ordering::Relaxed) == *listing
                && let Some(ns) = e.namespace()
                && policies
                    .get(ns)
                    .is_some_and(|p| p.retained_topics.is_some())
            {
                per_ns[ns].push_back((Arc::clone(name), *listing));
            }
        }
        t.retained_ns = per_ns;
    }

    /// Forgets retained topics whose history has aged out by `now`, and
    /// drops the listing of topics taken again. Linear in the retained
    /// topics (at most `--retained-topics`); called from the workers'
    /// periodic sweep.
    pub fn sweep(&self, now: Instant) {
        let mut t = self.lock();
        let mut names = std::mem::take(&mut t.retained);
        names.retain(|(name, listing)| {
            let Some(entry) = t.map.get(name) else {
                return false;
            };
            if entry.retained.load(Ordering::Relaxed) != *listing {
                return false; // stale
            }
            let mut k = entry.kept();
            k.expire(&self.memory, now);
            if k.history.stale(&k.limits, now) {
                drop(k);
                // Held for a moment: listed until the next sweep.
                return self.forget_listed(&mut t, name, *listing) == Forget::Held;
            }
            true
        });
        t.retained = names;
        // The room a burst of topics let go left behind (see
        // `Shard::shrink_registry`).
        super::shard::shrink_sparse(&mut t.map);
        let listed = t.retained.len();
        if super::shard::sparse(t.retained.capacity(), listed) {
            t.retained.shrink_to(listed * 2);
        }
    }

    /// Records `msg`, just numbered, in its topic's history. The caller
    /// holds the topic's order lock (numbers reach the history in order).
    ///
    /// Over `--history-memory`, the topics retained for their history alone
    /// go first (the longest retained first), then this topic's oldest.
    pub fn record(&self, topic: &TopicInterest, msg: &Arc<Message>) {
        if !topic.keeps() {
            return;
        }
        {
            let mut k = topic.kept();
            let unbounded = HistoryLimits {
                memory: usize::MAX,
                ..k.limits
            };
            k.history
                .append(msg, &unbounded, &self.memory, msg.published_at);
        }
        if self.memory.bytes() > self.limits.memory {
            // Lock order: order lock, then the directory, then histories
            // (nothing takes an order lock while holding the directory).
            self.forget_retained_while_over(self.limits.memory);
            let mut k = topic.kept();
            let Kept { history, limits } = &mut *k;
            history.trim_to_memory(limits, &self.memory);
        }
    }

    /// Forgets retained topics, the longest retained first, while all
    /// histories hold more than `limit` (at most one pass over them).
    fn forget_retained_while_over(&self, limit: usize) {
        let mut t = self.lock();
        let mut passes = t.retained.len();
        while self.memory.bytes() > limit && passes > 0 {
            passes -= 1;
            let Some((name, listing)) = t.retained.pop_front() else {
                break;
            };
            match self.forget_listed(&mut t, &name, listing) {
                Forget::Forgotten { dropped } => self.memory.evicted(dropped),
                // Held for a moment (a publish to it): keeps its place.
                Forget::Held => t.retained.push_back((name, listing)),
                Forget::Stale => {}
            }
        }
    }

    /// What a subscriber at `since` gets from `topic`'s history, the topic
    /// being at number `current`; at most `max_bytes` of frames. The caller
    /// holds the topic's order lock.
    pub fn recover(
        &self,
        topic: &TopicInterest,
        since: Since,
        current: u64,
        max_bytes: usize,
        now: Instant,
    ) -> Recovery {
        let mut k = topic.kept();
        k.expire(&self.memory, now);
        k.history.recover(since, topic.epoch(), current, max_bytes)
    }

    /// What `topic`'s history holds at `now`: its epoch and the numbers
    /// `first ..= last` it can replay (`first > last`: none), `last` being
    /// the topic's newest number.
    pub fn range(&self, topic: &TopicInterest, now: Instant) -> (u64, u64, u64) {
        let mut k = topic.kept();
        k.expire(&self.memory, now);
        let last = topic.seq();
        (
            topic.epoch(),
            k.history.first_seq().unwrap_or(last + 1),
            last,
        )
    }

    /// Deletes `name`'s history (its last value with it); returns the
    /// messages dropped, or `None` for a topic the directory does not
    /// know. A topic kept for its history alone is forgotten with it (the
    /// next use starts a new epoch); one in use keeps its epoch and
    /// numbers, and a recovery of the deleted numbers is told `too_old`.
    pub fn delete_history(&self, name: &str) -> Option<usize> {
        let mut t = self.lock();
        let entry = Arc::clone(t.map.get(name)?);
        let dropped = entry.kept().history.clear(&self.memory);
        let retained = entry.retained.load(Ordering::Relaxed);
        if retained != 0 {
            drop(entry);
            self.forget_listed(&mut t, name, retained);
        }
        Some(dropped)
    }

    /// Counts an envelope of `len` bytes just built for `msg` in `topic`'s
    /// history, if that holds `msg`.
    pub fn account_envelope(&self, topic: &TopicInterest, msg: &Message, len: usize) {
        if topic.keeps() {
            let mut k = topic.kept();
            let Kept { history, limits } = &mut *k;
            history.add_envelope(msg, len, limits, &self.memory);
        }
    }

    /// The last value of `topic`, now at number `current`: its newest
    /// message if the history holds it. The caller holds the order lock.
    pub fn last_value(&self, topic: &TopicInterest, current: u64, max_bytes: usize) -> Recovery {
        topic
            .kept()
            .history
            .last_value(topic.epoch(), current, max_bytes)
    }

    /// What every history holds together.
    pub fn history_memory(&self) -> &HistoryMemory {
        &self.memory
    }

    /// The history limits in force.
    pub fn history_limits(&self) -> &HistoryLimits {
        &self.limits
    }

    /// Topics kept for their history that nobody holds.
    pub fn retained_len(&self) -> usize {
        self.lock().retained_count
    }

    /// The room the topic map has (tests: it shrinks after a burst).
    #[cfg(test)]
    pub fn map_capacity(&self) -> usize {
        self.lock().map.capacity()
    }

    /// Topics currently known (for metrics).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_lifetimes() {
        let d = Directory::new();
        assert!(d.get("a").is_none());
        let a = d.entry("a");
        let a2 = d.entry("a");
        assert!(Arc::ptr_eq(&a, &a2));
        d.set(&a, 0, true);
        d.set(&a, 5, true);
        assert_eq!(a2.workers(), 0b100001);
        d.set(&a, 0, false);
        assert_eq!(a.workers(), 0b100000);
        d.release(a);
        assert_eq!(d.len(), 1, "still held by a2");
        let seen = d.get("a").expect("alive");
        d.release(seen);
        d.release(a2);
        assert!(d.is_empty(), "nobody holds it: forgotten");
    }

    fn numbered(t: &TopicInterest, at: Instant) -> Arc<Message> {
        let mut m = Message::new(bytes::Bytes::from_static(b"x"), at);
        m.epoch = t.epoch();
        m.seq = t.next_seq();
        Arc::new(m)
    }

    fn from_cluster(epoch: u64, seq: u64, at: Instant) -> Message {
        let mut m = Message::new(bytes::Bytes::from_static(b"x"), at);
        m.epoch = epoch;
        m.seq = seq;
        m
    }

    /// Numbers given elsewhere (a cluster): the first taken as is, then
    /// the next, copies and older epochs skipped, skips and new epochs told.
    #[test]
    fn adopted_numbers_follow_on_and_tell_skips_and_restarts() {
        let d = Directory::new();
        let t = d.entry("a");
        assert_eq!(t.adopt(500, 41), Adopt::Next, "nothing numbered here yet");
        assert_eq!((t.epoch(), t.seq()), (500, 41));
        assert_eq!(t.adopt(500, 42), Adopt::Next);
        assert_eq!(t.adopt(500, 42), Adopt::Old);
        assert_eq!(t.adopt(500, 40), Adopt::Old);
        assert_eq!(t.adopt(499, 90), Adopt::Old, "an older epoch");
        assert_eq!(t.adopt(500, 45), Adopt::Gap);
        assert_eq!(t.adopt(600, 1), Adopt::Restart);
        assert_eq!((t.epoch(), t.seq()), (600, 1));
        d.release(t);
    }

    /// A history filled from a cluster's stream: the run that ends right
    /// before what is held goes in front; other epochs, numbers past it
    /// and anything before a hole stay out.
    #[test]
    fn a_filled_history_takes_the_run_that_leads_to_what_is_held() {
        let d = Directory::new();
        let t = d.entry("a");
        let now = Instant::now();
        for s in [8, 9] {
            t.adopt(7, s);
            d.record(&t, &Arc::new(from_cluster(7, s, now)));
        }
        let older: Vec<Arc<Message>> = [(7, 2), (7, 4), (7, 5), (6, 6), (7, 6), (7, 7), (7, 9)]
            .into_iter()
            .map(|(e, s)| Arc::new(from_cluster(e, s, now)))
            .collect();
        d.fill_history(&t, older, now);
        let r = d.recover(&t, Since { epoch: 7, seq: 0 }, 9, usize::MAX, now);
        let seqs: Vec<u64> = r.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [4, 5, 6, 7, 8, 9]);
        assert!(r.messages.iter().all(|m| m.epoch == 7));
        // Nothing held: the run ending at the topic's newest number.
        let u = d.entry("b");
        u.adopt(3, 5);
        let older = (1..=6).map(|s| Arc::new(from_cluster(3, s, now))).collect();
        d.fill_history(&u, older, now);
        let r = d.recover(&u, Since { epoch: 3, seq: 0 }, 5, usize::MAX, now);
        assert_eq!(
            r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        d.release(t);
        d.release(u);
    }

    #[test]
    fn a_topic_with_history_is_retained_until_it_ages_out_or_is_pushed_out() {
        let limits = HistoryLimits {
            age: std::time::Duration::from_secs(10),
            ..HistoryLimits::default()
        };
        let d = Directory::with_history(limits, 2);
        let t0 = Instant::now();
        let a = d.entry("a");
        d.record(&a, &numbered(&a, t0));
        let epoch = a.epoch();
        d.release(a);
        assert_eq!((d.len(), d.retained_len()), (1, 1), "kept for its history");
        let again = d.entry("a");
        assert_eq!(
            (again.epoch(), again.seq()),
            (epoch, 1),
            "the same lifetime"
        );
        d.release(again);
        assert_eq!(d.retained_len(), 1, "listed once");
        let empty = d.entry("nothing");
        d.release(empty);
        assert_eq!(d.len(), 1, "no history: forgotten at once");
        d.sweep(t0 + std::time::Duration::from_secs(5));
        assert_eq!(d.len(), 1, "not yet aged out");
        d.sweep(t0 + std::time::Duration::from_secs(11));
        assert_eq!((d.len(), d.retained_len()), (0, 0), "aged out");
        assert_eq!(d.history_memory().bytes(), 0);
        for name in ["x", "y", "z"] {
            let t = d.entry(name);
            d.record(&t, &numbered(&t, t0));
            d.release(t);
        }
        assert_eq!(d.retained_len(), 2, "at most --retained-topics");
        assert!(d.get("x").is_none(), "the longest retained went first");
        assert_eq!(d.history_memory().entries(), 2);
    }

    /// The walks for a topic without an entry stop early (is there a
    /// match; every worker holding a pattern found) and still give what a
    /// whole walk gives, as workers take and drop patterns.
    #[test]
    fn early_stopping_walks_give_what_whole_walks_give() {
        let d = Directory::new();
        let whole = |d: &Directory, name: &str| {
            let mut mask = 0;
            d.patterns().trie.for_each_match(name, |&m| mask |= m);
            mask
        };
        let steps: [(&str, usize, bool); 9] = [
            ("a.*", 0, true),
            ("*.b", 1, true),
            ("a.>", 3, true),
            ("*.b", 3, true),
            ("a.*", 0, false),
            ("*.*", 0, true),
            ("a.>", 3, false),
            ("*.b", 1, false),
            ("*.b", 3, false),
        ];
        for (pattern, worker, on) in steps {
            d.set_pattern(pattern, worker, on);
            for name in ["a.b", "a.c", "x.b", "a", "a.b.c"] {
                let t = d.entry(name);
                assert_eq!(d.targets(&t), whole(&d, name), "{name} after {pattern}");
                assert_eq!(d.pattern_matches(name), whole(&d, name) != 0, "{name}");
            }
        }
        assert_eq!(d.patterns().holders, 0b1, "only worker 0's *.* is left");
        d.set_pattern("*.*", 0, false);
        assert_eq!(d.patterns().holders, 0);
        assert!(!d.pattern_matches("a.b"));
    }

    #[test]
    fn a_namespace_keeps_at_most_its_retained_topics_oldest_forgotten_first() {
        let policies = vec![NamespacePolicy {
            prefix: "ns".into(),
            retained_topics: Some(2),
            ..Default::default()
        }];
        let d = Directory::with_policies(HistoryLimits::default(), 100, policies, true);
        let t0 = Instant::now();
        for name in ["ns.a", "other.x", "ns.b", "ns.c", "other.y"] {
            let t = d.entry(name);
            d.record(&t, &numbered(&t, t0));
            d.release(t);
        }
        assert!(d.get("ns.a").is_none(), "the namespace's oldest went");
        for kept in ["ns.b", "ns.c", "other.x", "other.y"] {
            let t = d.get(kept).unwrap_or_else(|| panic!("{kept} kept"));
            d.release(t);
        }
        assert_eq!(d.retained_len(), 4);
        assert_eq!(d.history_memory().evicted_for_memory(), 1, "counted");
        // Taken again and let go: counted once.
        let b = d.entry("ns.b");
        d.release(b);
        let t = d.entry("ns.d");
        d.record(&t, &numbered(&t, t0));
        d.release(t);
        assert!(
            d.get("ns.c").is_none(),
            "b was let go again after c: c is older"
        );
        let b = d.get("ns.b").expect("kept");
        d.release(b);
    }

    #[test]
    fn a_new_namespace_table_applies_to_every_existing_topic_at_once() {
        let prices = |slow, rate, last, size| NamespacePolicy {
            prefix: "prices".into(),
            slow_consumer: slow,
            max_rate: rate,
            last_value: last,
            history_size: size,
            ..Default::default()
        };
        let d = Directory::with_policies(
            HistoryLimits::default(),
            100,
            vec![prices(
                Some(SlowConsumerPolicy::Conflate),
                Some(10),
                None,
                Some(5),
            )],
            true,
        );
        let t0 = Instant::now();
        let p = d.entry("prices.a");
        let other = d.entry("other.x");
        for _ in 0..5 {
            d.record(&p, &numbered(&p, t0));
        }
        assert_eq!(
            (
                p.slow_consumer(),
                p.max_rate(),
                p.last_value(),
                p.limits().size
            ),
            (Some(SlowConsumerPolicy::Conflate), Some(10), true, 5)
        );
        assert_eq!((other.max_rate(), other.slow_consumer()), (None, None));
        d.set_policies(vec![
            prices(Some(SlowConsumerPolicy::Always), None, Some(false), Some(2)),
            NamespacePolicy {
                prefix: "other".into(),
                max_rate: Some(5),
                ..Default::default()
            },
        ]);
        assert_eq!(
            (
                p.slow_consumer(),
                p.max_rate(),
                p.last_value(),
                p.limits().size
            ),
            (Some(SlowConsumerPolicy::Always), None, false, 2),
            "the held entry took the new table"
        );
        assert_eq!(p.kept().history.len(), 2, "trimmed at once, oldest first");
        assert_eq!(p.kept().history.first_seq(), Some(4));
        assert_eq!(
            d.history_memory().entries(),
            2,
            "the dropped ones uncounted"
        );
        assert_eq!(
            (other.max_rate(), d.max_rate_of("other.y")),
            (Some(5), Some(5))
        );
        assert_eq!(
            d.slow_consumer_of("prices.b"),
            Some(SlowConsumerPolicy::Always)
        );
        // History off: nothing kept, no last value, nothing recorded.
        d.set_policies(vec![prices(None, None, None, Some(0))]);
        assert_eq!((p.slow_consumer(), other.max_rate()), (None, None));
        assert_eq!((p.kept().history.len(), p.last_value()), (0, false));
        d.record(&p, &numbered(&p, t0));
        assert_eq!(d.history_memory().entries(), 0);
        // And on again, last value from the flag.
        d.set_policies(vec![prices(None, None, None, Some(3))]);
        d.record(&p, &numbered(&p, t0));
        assert_eq!((p.kept().history.len(), p.last_value()), (1, true));
        d.release_many([p, other].into_iter());
    }

    #[test]
    fn a_new_namespace_table_moves_topics_and_recounts_the_retained_per_namespace() {
        let ns = |prefix: &str, retained| NamespacePolicy {
            prefix: prefix.into(),
            retained_topics: retained,
            ..Default::default()
        };
        let d = Directory::with_policies(HistoryLimits::default(), 100, vec![ns("ns", None)], true);
        let t0 = Instant::now();
        for name in ["ns.x.1", "ns.x.2", "ns.y", "ns.x.3", "free"] {
            let t = d.entry(name);
            d.record(&t, &numbered(&t, t0));
            d.release(t);
        }
        assert_eq!(d.lock().retained_per_ns, [4]);
        // `ns.x` comes in front (indices shift) with room for two.
        d.set_policies(vec![ns("zz", None), ns("ns.x", Some(2)), ns("ns", Some(1))]);
        assert!(d.get("ns.x.1").is_none(), "over its bound: the oldest went");
        assert_eq!(d.lock().retained_per_ns, [0, 2, 1]);
        assert_eq!((d.retained_len(), d.len()), (4, 4));
        assert_eq!(d.history_memory().evicted_for_memory(), 1, "counted");
        // The counts hold: one more of `ns` pushes out `ns.y`, not a topic
        // of `ns.x`.
        let t = d.entry("ns.z");
        d.record(&t, &numbered(&t, t0));
        d.release(t);
        assert!(d.get("ns.y").is_none(), "the oldest of `ns`");
        for kept in ["ns.x.2", "ns.x.3", "ns.z", "free"] {
            let t = d.get(kept).unwrap_or_else(|| panic!("{kept} kept"));
            d.release(t);
        }
        assert_eq!(d.lock().retained_per_ns, [0, 2, 1]);
        // A topic held while the table changes is counted when let go.
        let held = d.entry("ns.x.2");
        d.set_policies(vec![ns("ns", None)]);
        assert_eq!(d.lock().retained_per_ns, [2]);
        d.release(held);
        assert_eq!(d.lock().retained_per_ns, [3]);
        assert_eq!(d.retained_len(), 4);
    }

    /// A namespace over its `retained-topics` forgets its own oldest from
    /// its own listings: 10 000 topics of another namespace retained cost
    /// it nothing (before: a pass over every listing under the directory
    /// lock per topic let go), and its listings stay within about twice
    /// its bound, taken again or not.
    #[test]
    fn a_namespace_over_its_bound_finds_its_oldest_in_its_own_listings() {
        let ns = |prefix: &str, retained| NamespacePolicy {
            prefix: prefix.into(),
            retained_topics: retained,
            ..Default::default()
        };
        let d = Directory::with_policies(
            HistoryLimits::default(),
            100_000,
            vec![ns("big", None), ns("small", Some(2))],
            true,
        );
        let t0 = Instant::now();
        let keep = |name: &str| {
            let t = d.entry(name);
            d.record(&t, &numbered(&t, t0));
            d.release(t);
        };
        for i in 0..10_000 {
            keep(&format!("big.{i}"));
        }
        for i in 0..5_000 {
            keep(&format!("small.{i}"));
            if i % 3 == 0 {
                // Taken again and let go again: a stale listing each.
                let again = d.entry(&format!("small.{i}"));
                d.release(again);
            }
        }
        let t = d.lock();
        assert_eq!(t.retained_per_ns, [10_000, 2]);
        assert!(
            t.retained_ns.first().is_none_or(VecDeque::is_empty),
            "unbounded: not listed"
        );
        assert!(
            t.retained_ns[1].len() <= 2 * 2 + 64 + 1,
            "{}",
            t.retained_ns[1].len()
        );
        drop(t);
        assert!(d.get("small.4999").is_some_and(|e| {
            d.release(e);
            true
        }));
        assert!(d.get("small.4997").is_none(), "the oldest go first");
        assert_eq!(d.retained_len(), 10_002);
    }

    #[test]
    fn over_the_total_retained_topics_go_before_an_active_topic_loses_its_history() {
        let entry_cost = 1 + crate::pubsub::history::ENTRY_OVERHEAD_BYTES;
        let limits = HistoryLimits {
            memory: 6 * entry_cost,
            ..HistoryLimits::default()
        };
        let d = Directory::with_history(limits, 100);
        let t0 = Instant::now();
        let old = d.entry("old");
        for _ in 0..3 {
            d.record(&old, &numbered(&old, t0));
        }
        d.release(old);
        assert_eq!(d.retained_len(), 1);
        let live = d.entry("live");
        for _ in 0..5 {
            d.record(&live, &numbered(&live, t0));
        }
        assert_eq!(d.retained_len(), 0, "the retained topic went first");
        assert_eq!(
            live.kept().history.len(),
            5,
            "the active topic kept everything"
        );
        assert_eq!(d.history_memory().evicted_for_memory(), 3);
        for _ in 0..3 {
            d.record(&live, &numbered(&live, t0));
        }
        assert_eq!(live.kept().history.len(), 6, "then its own oldest");
        assert!(d.history_memory().bytes() <= limits.memory);
    }
}
