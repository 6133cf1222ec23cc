//! Market-data costs per publication (issue #16):
//! - `append/<size>`: one message into a topic's history at its default
//!   bounds (100 messages), the oldest dropped: what dispatch adds per
//!   publication, under the topic's order lock;
//! - `record/<size>`: the same through `Directory::record` (the topic's
//!   entry, its bounds and the total), with the topic's slow-consumer
//!   policy and `max-rate` read as delivery reads them once per run;
//! - `envelope/<form>/<size>`: building one envelope frame (once per
//!   publication per form, shared by every subscriber of the form);
//! - `recover/100`: a `since` replaying a full history of 100 messages.
//!
//! Run: `cargo bench --bench history`.

use bytes::Bytes;
use corecast::proto::OpCode;
use corecast::proto::frame::server_frame;
use corecast::pubsub::directory::Directory;
use corecast::pubsub::envelope::{Message, binary_frame, json_frame};
use corecast::pubsub::history::{History, HistoryLimits, HistoryMemory, Since};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn message(seq: u64, size: usize, at: Instant) -> Arc<Message> {
    let mut m = Message::new(
        Bytes::from(server_frame(OpCode::Binary, &vec![7u8; size])),
        at,
    );
    m.epoch = 1;
    m.seq = seq;
    Arc::new(m)
}

fn bench(c: &mut Criterion) {
    let limits = HistoryLimits::default();
    let now = Instant::now();
    let mut g = c.benchmark_group("history");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for size in [64usize, 16 * 1024] {
        // Messages made beforehand, so only the append is measured.
        let msgs: Vec<Arc<Message>> = (1..=10_000).map(|s| message(s, size, now)).collect();
        g.bench_function(format!("append/{size}"), |b| {
            let memory = HistoryMemory::default();
            let mut h = History::default();
            let mut i = 0;
            b.iter(|| {
                if i == msgs.len() {
                    h.clear(&memory);
                    i = 0;
                }
                h.append(&msgs[i], &limits, &memory, now);
                i += 1;
            });
        });
        g.bench_function(format!("record/{size}"), |b| {
            let d = Directory::with_history(limits, 100);
            let topic = d.entry("prices.EURUSD");
            let mut i = 0;
            b.iter(|| {
                if i == msgs.len() {
                    d.delete_history("prices.EURUSD");
                    i = 0;
                }
                d.record(&topic, &msgs[i]);
                black_box((topic.slow_consumer(), topic.max_rate()));
                i += 1;
            });
        });
        let payload = vec![b'a'; size];
        g.bench_function(format!("envelope/json-text/{size}"), |b| {
            b.iter(|| {
                json_frame(
                    "prices.EURUSD",
                    1_764_860_000_000_000,
                    42,
                    OpCode::Text,
                    black_box(&payload),
                )
            })
        });
        g.bench_function(format!("envelope/json-binary/{size}"), |b| {
            b.iter(|| {
                json_frame(
                    "prices.EURUSD",
                    1_764_860_000_000_000,
                    42,
                    OpCode::Binary,
                    black_box(&payload),
                )
            })
        });
        g.bench_function(format!("envelope/binary/{size}"), |b| {
            b.iter(|| {
                binary_frame(
                    "prices.EURUSD",
                    1_764_860_000_000_000,
                    42,
                    OpCode::Binary,
                    black_box(&payload),
                )
            })
        });
    }
    let memory = HistoryMemory::default();
    let mut h = History::default();
    for s in 1..=100 {
        h.append(&message(s, 64, now), &limits, &memory, now);
    }
    g.bench_function("recover/100", |b| {
        b.iter(|| h.recover(black_box(Since { epoch: 1, seq: 0 }), 1, 100, usize::MAX))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
