//! Namespace lookups (issue #14's note: "namespace lookup is linear in the
//! number of namespaces"):
//! - `max_rate_of/<namespaces>`: the covering namespace's `max-rate` for a
//!   topic of four parts, covered by the second-longest of its prefixes
//!   (what a publication to a topic without an entry looks up twice);
//! - `uncovered/<namespaces>`: the same for a topic no namespace covers.
//!
//! Run: `cargo bench --bench namespaces`.

use corecast::pubsub::directory::Directory;
use corecast::pubsub::history::HistoryLimits;
use corecast::pubsub::policy::NamespacePolicy;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

/// `n` namespaces `venue<i>.prices`, each with a `max-rate`.
fn table(n: usize) -> Vec<NamespacePolicy> {
    (0..n)
        .map(|i| NamespacePolicy {
            prefix: format!("venue{i}.prices"),
            max_rate: Some(1 + (i % 1000) as u32),
            ..Default::default()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("namespaces");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 10_000] {
        let d = Directory::with_policies(HistoryLimits::default(), 1000, table(n), true);
        let covered = "venue7.prices.fx.EURUSD";
        let uncovered = "news.eu.de.politics";
        assert_eq!(d.max_rate_of(covered), Some(8));
        assert_eq!(d.max_rate_of(uncovered), None);
        g.bench_function(format!("max_rate_of/{n}"), |b| {
            b.iter(|| d.max_rate_of(black_box(covered)))
        });
        g.bench_function(format!("uncovered/{n}"), |b| {
            b.iter(|| d.max_rate_of(black_box(uncovered)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
