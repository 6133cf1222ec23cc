//! Wildcard costs (issue #16):
//! - `match/<patterns>`: one walk of a pattern trie holding that many
//!   patterns (per-user `user.<i>.>`, per-venue `prices.<venue>.*`, and
//!   `*`-led ones), for a topic matching three of them: what a topic's
//!   worker mask costs to recompute after the patterns changed;
//! - `targets/<patterns>`: a publication's workers on the dispatch path
//!   with that many patterns subscribed elsewhere and nothing changed
//!   since (the cached case: every publication but the first after a
//!   change); `targets/0` is the path without any pattern;
//! - `targets-after-change/10000`: the same right after a pattern change
//!   (cache refreshed: one walk).
//! - `deep-unheld/2048`: a publication to a topic without an entry, with
//!   2 048 patterns of 64 tokens that all match it (the outside probe's
//!   set: every mix of `a` and `*` in the first 11 tokens, then 53 `*`),
//!   held by 2 workers: is there a match (`pattern_matches`), then the new
//!   entry's workers (`targets`), as the publish path does.
//!
//! Run: `cargo bench --bench wildcard`.

use corecast::pubsub::directory::Directory;
use corecast::pubsub::pattern::PatternTrie;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

/// `n` distinct patterns, three of which match `prices.venue7.EUR`.
fn patterns(n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n.saturating_sub(3))
        .map(|i| match i % 3 {
            0 => format!("user.{i}.>"),
            1 => format!("prices.v{i}.*"),
            _ => format!("*.x{i}.EUR"),
        })
        .collect();
    v.extend(["prices.venue7.*", "prices.>", "*.venue7.EUR"].map(String::from));
    v
}

fn bench(c: &mut Criterion) {
    let topic = "prices.venue7.EUR";
    let mut g = c.benchmark_group("wildcard");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 10_000] {
        let mut trie = PatternTrie::default();
        for (i, p) in patterns(n).iter().enumerate() {
            *trie.get_or_insert_with(p, || 0u64) = i as u64;
        }
        let mut found = 0;
        trie.for_each_match(topic, |_| found += 1);
        assert_eq!(found, 3);
        g.bench_function(format!("match/{n}"), |b| {
            b.iter(|| {
                let mut mask = 0u64;
                trie.for_each_match(black_box(topic), |&v| mask |= 1 << (v & 63));
                mask
            })
        });
    }
    for n in [0usize, 10_000] {
        let d = Directory::new();
        for (i, p) in patterns(n).iter().enumerate() {
            d.set_pattern(p, i % 4, true);
        }
        let t = d.entry(topic);
        g.bench_function(format!("targets/{n}"), |b| {
            b.iter(|| d.targets(black_box(&t)))
        });
    }
    let d = Directory::new();
    for (i, p) in patterns(10_000).iter().enumerate() {
        d.set_pattern(p, i % 4, true);
    }
    let t = d.entry(topic);
    g.bench_function("targets-after-change/10000", |b| {
        let mut on = false;
        b.iter(|| {
            // A pattern that matches nothing comes or goes: a new version.
            on = !on;
            d.set_pattern("zzz.none", 5, on);
            d.targets(black_box(&t))
        })
    });
    let deep: Vec<String> = (0..2048u32)
        .map(|i| {
            let mut toks: Vec<&str> = (0..11)
                .map(|j| if i >> j & 1 == 1 { "a" } else { "*" })
                .collect();
            toks.extend(std::iter::repeat_n("*", 53));
            toks.join(".")
        })
        .collect();
    let d = Directory::new();
    for (i, p) in deep.iter().enumerate() {
        d.set_pattern(p, i % 2, true);
    }
    let fresh: Vec<String> = (0..64u32)
        .map(|i| {
            let mut toks = vec!["a".to_string(); 11];
            toks.extend((0..53).map(|j| format!("{}", (i + j) % 7)));
            toks.join(".")
        })
        .collect();
    let mut next = 0;
    g.bench_function("deep-unheld/2048", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            let name = &fresh[next];
            assert!(d.pattern_matches(black_box(name)));
            let t = d.entry(name);
            d.targets(&t)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
