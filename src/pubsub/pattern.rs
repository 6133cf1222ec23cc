//! Subscription patterns, NATS-style: a topic name is a list of tokens
//! separated by `.`; in a pattern, the token `*` matches any one token and
//! a final `>` matches one or more tokens. `prices.*.EUR` matches
//! `prices.fx.EUR`; `news.>` matches `news.a` and `news.a.b` but not
//! `news`; `>` alone matches every topic.
//!
//! Other bytes of the topic alphabet (`/`, `:`, `-`, …) are ordinary token
//! bytes: `a/b.*` matches `a/b.c`. `*` and `>` are not in the topic
//! alphabet, so a name holding them is a pattern or an error, never a
//! topic: `*` and `>` stand only for whole tokens, and `>` only last
//! (`a*`, `a.>.b` are refused).
//!
//! [`PatternTrie`] maps patterns to values and finds every pattern
//! matching a topic by walking the topic's tokens down a trie: the work
//! is bounded by the trie nodes whose path matches the topic's prefix,
//! not by how many patterns are stored (benches/wildcard.rs measures it
//! with 10 000 patterns). Its nodes live in one arena, so neither a walk
//! nor a drop recurses, whatever the depth.

use std::collections::HashMap;
use std::ops::ControlFlow;

/// Whether `name` (already in the topic alphabet plus `*` and `>`) holds a
/// wildcard token.
pub fn is_pattern(name: &str) -> bool {
    name.split('.').any(|t| t == "*" || t == ">")
}

/// Why a name with `*` or `>` is not a well-formed pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternError {
    /// `*` or `>` inside a token (`a*`, `>x`).
    PartToken,
    /// `>` before the last token.
    RestNotLast,
}

/// Checks the wildcard syntax of `name` (its other bytes are the caller's
/// to check): `*` and `>` only as whole tokens, `>` only last.
pub fn check(name: &str) -> Result<(), PatternError> {
    let mut tokens = name.split('.').peekable();
    while let Some(t) = tokens.next() {
        match t {
            "*" => {}
            ">" if tokens.peek().is_none() => {}
            ">" => return Err(PatternError::RestNotLast),
            t if t.bytes().any(|b| b == b'*' || b == b'>') => {
                return Err(PatternError::PartToken);
            }
            _ => {}
        }
    }
    Ok(())
}

/// The tokens of `pattern` (or of a topic name): what one
/// [`matches`] against a topic costs at most, in token comparisons.
pub fn token_count(pattern: &str) -> usize {
    pattern.bytes().filter(|&b| b == b'.').count() + 1
}

/// Whether `pattern` matches `topic`: one pattern against one name, for a
/// scan (a worker's topics when a pattern arrives, the directory's for a
/// pattern's snapshot). Linear in the two names.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut t = topic.split('.');
    for p in pattern.split('.') {
        match (p, t.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (p, Some(x)) if p == x => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Whether `right` (a topic or a pattern) covers `wanted` (a topic or a
/// pattern): every topic `wanted` matches, `right` matches too. So
/// `prices.>` covers `prices.*.EUR` and `prices.fx`, `prices.*` covers
/// `prices.fx` but not `prices.>`, and a topic covers only itself. What
/// an access right (a token's) is checked with. Linear in the two names.
pub fn covers(right: &str, wanted: &str) -> bool {
    let mut w = wanted.split('.');
    for r in right.split('.') {
        match (r, w.next()) {
            // One or more tokens, whatever they are.
            (">", Some(_)) => return true,
            (_, None) => return false,
            // Any one token, but not the rest of the name.
            ("*", Some(x)) if x != ">" => {}
            (r, Some(x)) if r == x && r != "*" && r != ">" => {}
            _ => return false,
        }
    }
    w.next().is_none()
}

/// No node.
const NONE: u32 = u32::MAX;

#[derive(Debug)]
struct Node<V> {
    /// Children by literal token.
    lits: HashMap<Box<str>, u32>,
    /// The child for `*`.
    star: u32,
    /// The value of the pattern ending at this node.
    here: Option<V>,
    /// The value of the pattern ending with `>` after this node.
    rest: Option<V>,
    /// The parent and the token leading here (for pruning).
    parent: u32,
    token: Box<str>,
}

impl<V> Node<V> {
    fn new(parent: u32, token: &str) -> Self {
        Self {
            lits: HashMap::new(),
            star: NONE,
            here: None,
            rest: None,
            parent,
            token: token.into(),
        }
    }

    fn is_empty(&self) -> bool {
        self.lits.is_empty() && self.star == NONE && self.here.is_none() && self.rest.is_none()
    }
}

/// Patterns and a value for each, searchable by topic.
#[derive(Debug)]
pub struct PatternTrie<V> {
    /// Node 0 is the root; freed nodes are `None` and listed in `free`.
    nodes: Vec<Option<Node<V>>>,
    free: Vec<u32>,
    len: usize,
}

impl<V> Default for PatternTrie<V> {
    fn default() -> Self {
        Self {
            nodes: vec![Some(Node::new(NONE, ""))],
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<V> PatternTrie<V> {
    /// Patterns held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn node(&self, id: u32) -> &Node<V> {
        self.nodes[id as usize].as_ref().expect("a live trie node")
    }

    fn node_mut(&mut self, id: u32) -> &mut Node<V> {
        self.nodes[id as usize].as_mut().expect("a live trie node")
    }

    fn alloc(&mut self, parent: u32, token: &str) -> u32 {
        let node = Some(Node::new(parent, token));
        match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).expect("trie nodes fit in u32")
            }
        }
    }

    /// The node `tokens` lead to, and whether the pattern ends with `>`;
    /// created on the way when `create`.
    fn walk(&mut self, pattern: &str, create: bool) -> Option<(u32, bool)> {
        let mut at = 0u32;
        let mut tokens = pattern.split('.').peekable();
        while let Some(t) = tokens.next() {
            if t == ">" && tokens.peek().is_none() {
                return Some((at, true));
            }
            let next = if t == "*" {
                self.node(at).star
            } else {
                self.node(at).lits.get(t).copied().unwrap_or(NONE)
            };
            at = match next {
                NONE if create => {
                    let id = self.alloc(at, t);
                    let n = self.node_mut(at);
                    if t == "*" {
                        n.star = id;
                    } else {
                        n.lits.insert(t.into(), id);
                    }
                    id
                }
                NONE => return None,
                id => id,
            };
        }
        Some((at, false))
    }

    /// The value of `pattern`, inserted with `make` if absent (well-formed
    /// patterns only: see [`check`]).
    pub fn get_or_insert_with(&mut self, pattern: &str, make: impl FnOnce() -> V) -> &mut V {
        let (at, rest) = self.walk(pattern, true).expect("created on the way");
        let node = self.node_mut(at);
        let slot = if rest { &mut node.rest } else { &mut node.here };
        if slot.is_none() {
            *slot = Some(make());
            self.len += 1;
        }
        let node = self.node_mut(at);
        let slot = if rest { &mut node.rest } else { &mut node.here };
        slot.as_mut().expect("just set")
    }

    /// The value of `pattern`, if held.
    pub fn get(&self, pattern: &str) -> Option<&V> {
        let mut at = 0u32;
        let mut tokens = pattern.split('.').peekable();
        while let Some(t) = tokens.next() {
            if t == ">" && tokens.peek().is_none() {
                return self.node(at).rest.as_ref();
            }
            let node = self.node(at);
            at = if t == "*" {
                node.star
            } else {
                node.lits.get(t).copied().unwrap_or(NONE)
            };
            if at == NONE {
                return None;
            }
        }
        self.node(at).here.as_ref()
    }

    /// The value of `pattern`, if held.
    pub fn get_mut(&mut self, pattern: &str) -> Option<&mut V> {
        let (at, rest) = self.walk(pattern, false)?;
        let node = self.node_mut(at);
        if rest {
            node.rest.as_mut()
        } else {
            node.here.as_mut()
        }
    }

    /// Removes `pattern`; nodes left empty go back to the arena.
    pub fn remove(&mut self, pattern: &str) -> Option<V> {
        let (mut at, rest) = self.walk(pattern, false)?;
        let node = self.node_mut(at);
        let v = if rest {
            node.rest.take()
        } else {
            node.here.take()
        }?;
        self.len -= 1;
        while at != 0 && self.node(at).is_empty() {
            let node = self.nodes[at as usize].take().expect("a live trie node");
            self.free.push(at);
            let parent = self.node_mut(node.parent);
            if parent.star == at {
                parent.star = NONE;
            } else {
                parent.lits.remove(&node.token);
            }
            at = node.parent;
        }
        Some(v)
    }

    /// Calls `f` with the value of every pattern matching `topic`, each
    /// once. Without recursion: a work list of (node, token index).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&V)) {
        self.try_for_each_match(topic, |v| {
            f(v);
            ControlFlow::Continue(())
        });
    }

    /// [`Self::for_each_match`] until `f` breaks: an answer that needs
    /// only some of the matches (is there one? which workers?) stops at
    /// it, rather than walking every matching pattern. `true` if it broke.
    pub fn try_for_each_match(&self, topic: &str, f: impl FnMut(&V) -> ControlFlow<()>) -> bool {
        self.try_for_each_match_counted(topic, &mut 0, f)
    }

    /// [`Self::try_for_each_match`], adding to `steps` the nodes it
    /// visited: what the walk cost, for its caller to charge (a trie of
    /// many long patterns that share prefixes with a name costs a visit
    /// per node along every partial match, matched or not).
    pub fn try_for_each_match_counted(
        &self,
        topic: &str,
        steps: &mut usize,
        mut f: impl FnMut(&V) -> ControlFlow<()>,
    ) -> bool {
        if self.len == 0 {
            return false;
        }
        let tokens: Vec<&str> = topic.split('.').collect();
        let mut work = vec![(0u32, 0usize)];
        while let Some((at, i)) = work.pop() {
            *steps += 1;
            let node = self.node(at);
            if i == tokens.len() {
                if let Some(v) = &node.here
                    && f(v).is_break()
                {
                    return true;
                }
                continue;
            }
            if let Some(v) = &node.rest
                && f(v).is_break()
            {
                return true;
            }
            if node.star != NONE {
                work.push((node.star, i + 1));
            }
            if let Some(&id) = node.lits.get(tokens[i]) {
                work.push((id, i + 1));
            }
        }
        false
    }

    /// Live nodes (the root included): the memory test's measure.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        assert!(is_pattern("a.*.b"));
        assert!(is_pattern(">"));
        assert!(!is_pattern("a.b"));
        assert!(
            !is_pattern("a*"),
            "not a whole token: an error, not a pattern"
        );
        assert_eq!(check("a.*.b"), Ok(()));
        assert_eq!(check("a.>"), Ok(()));
        assert_eq!(check(">"), Ok(()));
        assert_eq!(check("a*"), Err(PatternError::PartToken));
        assert_eq!(check("a.b>"), Err(PatternError::PartToken));
        assert_eq!(check("a.>.b"), Err(PatternError::RestNotLast));
        assert_eq!(check(">.>"), Err(PatternError::RestNotLast));
    }

    #[test]
    fn single_matches() {
        assert!(matches("prices.*.EUR", "prices.fx.EUR"));
        assert!(!matches("prices.*.EUR", "prices.fx.USD"));
        assert!(!matches("prices.*.EUR", "prices.EUR"));
        assert!(!matches("prices.*.EUR", "prices.a.b.EUR"));
        assert!(matches("news.>", "news.a"));
        assert!(matches("news.>", "news.a.b"));
        assert!(!matches("news.>", "news"));
        assert!(matches(">", "x"));
        assert!(matches("*", "x"));
        assert!(!matches("*", "x.y"));
        assert!(matches("a.*", "a."), "an empty token is a token");
        assert!(matches("a/b.*", "a/b.c"));
        assert!(matches("a.b", "a.b"));
    }

    fn matched(t: &PatternTrie<u32>, topic: &str) -> Vec<u32> {
        let mut v = Vec::new();
        t.for_each_match(topic, |&x| v.push(x));
        v.sort_unstable();
        v
    }

    /// The trie agrees with [`matches`] on every pair of a set of patterns
    /// and topics, and finds each matching pattern once.
    #[test]
    fn the_trie_agrees_with_single_matching() {
        let patterns = [
            "a", "a.b", "a.*", "a.>", "*", "*.b", "*.*", ">", "a.b.c", "a.*.c", "*.b.>", "a.b.>",
            "b.>", "*.*.*",
        ];
        let topics = [
            "a", "b", "a.b", "a.c", "b.b", "a.b.c", "a.x.c", "b.b.b", "a.b.c.d", "x.y.z", "a.",
        ];
        let mut t = PatternTrie::default();
        for (i, p) in patterns.iter().enumerate() {
            *t.get_or_insert_with(p, || 0) = i as u32;
        }
        assert_eq!(t.len(), patterns.len());
        for topic in topics {
            let want: Vec<u32> = (0..patterns.len() as u32)
                .filter(|&i| matches(patterns[i as usize], topic))
                .collect();
            assert_eq!(matched(&t, topic), want, "{topic}");
        }
    }

    /// A walk that breaks stops there: it says so, and visits no more.
    #[test]
    fn a_walk_stops_where_its_caller_breaks() {
        let mut t = PatternTrie::default();
        for (i, p) in ["a.*", "*.b", "a.b", ">", "a.>"].iter().enumerate() {
            *t.get_or_insert_with(p, || 0) = i as u32;
        }
        let mut seen = 0;
        let broke = t.try_for_each_match("a.b", |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(broke);
        assert_eq!(seen, 2, "of 5 matches");
        let mut all = 0;
        assert!(!t.try_for_each_match("a.b", |_| {
            all += 1;
            ControlFlow::Continue(())
        }));
        assert_eq!(all, 5);
        assert!(
            t.try_for_each_match("c", |_| ControlFlow::Break(())),
            "> matches c"
        );
        t.remove(">");
        assert!(
            !t.try_for_each_match("c", |_| ControlFlow::Break(())),
            "no match: no break"
        );
        assert!(!PatternTrie::<u32>::default().try_for_each_match("a", |_| ControlFlow::Break(())));
    }

    /// The walk counts a step per node visited, matched or not: a name
    /// that shares long prefixes with many patterns costs them all.
    #[test]
    fn a_walk_counts_the_nodes_it_visits() {
        let mut t = PatternTrie::default();
        // 64 patterns `a.a.….*.xN`: one shared chain of 10 nodes and a
        // leaf each under the star; a name `a.a.….q.r` walks the chain
        // and the star without matching any.
        for i in 0..64 {
            let p = format!("{}*.x{i}", "a.".repeat(10));
            *t.get_or_insert_with(&p, || 0) = i;
        }
        let name = format!("{}q.r", "a.".repeat(10));
        let mut steps = 0;
        assert!(!t.try_for_each_match_counted(&name, &mut steps, |_| ControlFlow::Break(())));
        assert_eq!(steps, 12, "the root, 10 chain nodes, the star, and no leaf");
        let mut steps = 0;
        let hit = format!("{}q.x5", "a.".repeat(10));
        assert!(t.try_for_each_match_counted(&hit, &mut steps, |_| ControlFlow::Break(())));
        assert_eq!(steps, 13, "and the leaf");
    }

    #[test]
    fn removal_prunes_to_the_root() {
        let mut t = PatternTrie::default();
        let base = t.node_count();
        *t.get_or_insert_with("a.b.c.>", || 1) = 1;
        *t.get_or_insert_with("a.*.c", || 2) = 2;
        assert_eq!(t.get_mut("a.b.c.>"), Some(&mut 1));
        assert_eq!(t.get_mut("a.b.c"), None);
        assert_eq!(t.get("a.*.c"), Some(&2));
        assert_eq!(t.get("a.*"), None);
        assert_eq!(t.get("a.b.>"), None);
        assert_eq!(t.get("q"), None);
        assert_eq!(matched(&t, "a.b.c"), vec![2]);
        assert_eq!(matched(&t, "a.b.c.d"), vec![1]);
        assert_eq!(t.remove("a.b.c.>"), Some(1));
        assert_eq!(t.remove("a.b.c.>"), None);
        assert_eq!(matched(&t, "a.b.c.d"), Vec::<u32>::new());
        assert_eq!(t.remove("a.*.c"), Some(2));
        assert_eq!(t.node_count(), base, "every node pruned");
        assert!(t.is_empty());
        // Reused nodes work as new.
        *t.get_or_insert_with("x.y", || 3) = 3;
        assert_eq!(matched(&t, "x.y"), vec![3]);
    }

    /// A pattern of 30 000 tokens is inserted, matched and dropped without
    /// recursion (a recursive drop or walk would overflow the stack).
    #[test]
    fn a_very_deep_pattern_needs_no_stack() {
        let deep = vec!["*"; 30_000].join(".");
        let topic = vec!["x"; 30_000].join(".");
        let mut t = PatternTrie::default();
        t.get_or_insert_with(&deep, || 7);
        assert_eq!(matched(&t, &topic), vec![7]);
        drop(t);
        let mut t = PatternTrie::default();
        t.get_or_insert_with(&deep, || 7);
        assert_eq!(t.remove(&deep), Some(7));
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn a_right_covers_what_it_contains_and_nothing_wider() {
        for (right, wanted) in [
            ("prices.>", "prices.*.EUR"),
            ("prices.>", "prices.fx"),
            ("prices.>", "prices.>"),
            ("prices.>", "prices.a.b.c"),
            ("prices.*", "prices.fx"),
            ("prices.*", "prices.*"),
            ("prices.fx", "prices.fx"),
            (">", "a"),
            (">", "*.>"),
            ("*.>", "a.*"),
        ] {
            assert!(covers(right, wanted), "{right} covers {wanted}");
        }
        for (right, wanted) in [
            ("prices.*.EUR", "prices.>"),
            ("prices.*", "prices.>"),
            ("prices.*", "prices.a.b"),
            ("prices.fx", "prices.*"),
            ("prices.>", "prices"),
            ("prices.fx", "prices.fx.EUR"),
            ("prices.fx", "prices.fxx"),
            ("a.*", ">"),
            ("*", "*.a"),
        ] {
            assert!(!covers(right, wanted), "{right} does not cover {wanted}");
        }
    }

    proptest::proptest! {
        /// `covers(r, w)` exactly when every topic that `w` matches, `r`
        /// matches: checked on every topic of up to four tokens from a
        /// small alphabet.
        #[test]
        fn covers_agrees_with_matching(
            r in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*", ">"]), 1..4),
            w in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*", ">"]), 1..4),
        ) {
            let (r, w) = (r.join("."), w.join("."));
            proptest::prop_assume!(check(&r).is_ok() && check(&w).is_ok());
            let mut topics = vec![String::new()];
            let mut all = Vec::new();
            for _ in 0..5 {
                topics = topics
                    .iter()
                    .flat_map(|t| ["a", "b", "c"].map(|x| if t.is_empty() { x.to_string() } else { format!("{t}.{x}") }))
                    .collect();
                all.extend(topics.iter().cloned());
            }
            let contained = all.iter().filter(|t| matches(&w, t)).all(|t| matches(&r, t));
            proptest::prop_assert_eq!(covers(&r, &w), contained, "{} {}", r, w);
        }
    }
}
