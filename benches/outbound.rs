//! Queueing published frames for one subscriber: the per-subscriber cost of
//! fan-out before the write.
//!
//! One iteration queues a run of frames into an empty `OutQueue`, gathers it
//! into iovecs (what the backend hands `writev`) and marks it all written:
//! - `shared/<size>`: every frame pushed by reference (`push`, a refcount
//!   increment and one iovec per frame; 64 iovecs per `writev` at most);
//! - `copied/<size>`: `push_frame`, which copies frames below `COPY_BELOW`
//!   into the contiguous tail (after `reserve_tail` for the run) and shares
//!   the rest — what the server does.
//!
//! Run sizes: 200 × 66 B (a burst of 64-byte messages) and 50 × 1 KiB / 16 KiB
//! frames. `COPY_BELOW` = 1 KiB sits where copying stops paying.
//!
//! `trickle/<turns>x66B`: one 66-byte frame per turn (a steady rate),
//! reserved and copied turn by turn as `push_to` does, for a subscriber
//! written every `turns` turns (the overload benchmark's 10 000 subscribers
//! are written about every ten turns), then drained: the tail's growth.
//!
//! Run: `cargo bench --bench outbound`.

use bytes::Bytes;
use corecast::proto::OutQueue;
use corecast::proto::outbound::{COPY_BELOW, MAX_IOVECS};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::io::IoSlice;
use std::time::Duration;

/// Queue the run, then drain it the way the backend does: gather ≤ 64
/// iovecs, "write" them all, advance. Returns the writev calls needed.
fn queue_and_drain(frames: &[Bytes], copy: bool) -> usize {
    let mut q = OutQueue::new();
    if copy {
        let small: usize = frames
            .iter()
            .map(|f| f.len())
            .filter(|&n| n < COPY_BELOW)
            .sum();
        q.reserve_tail(small);
        for f in frames {
            q.push_frame(f);
        }
    } else {
        for f in frames {
            q.push(f.clone());
        }
    }
    let mut calls = 0;
    while !q.is_empty() {
        let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
        let n = q.gather(&mut iov);
        let bytes: usize = iov[..n].iter().map(|s| s.len()).sum();
        black_box(&iov[..n]);
        q.advance(bytes);
        calls += 1;
    }
    calls
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("outbound");
    g.measurement_time(Duration::from_secs(3));
    for (label, count, len) in [
        ("200x66B", 200, 66),
        ("50x1KiB", 50, 1026),
        ("50x16KiB", 50, 16388),
    ] {
        let frames: Vec<Bytes> = (0..count)
            .map(|i| Bytes::from(vec![i as u8; len]))
            .collect();
        g.throughput(Throughput::Elements(count as u64));
        g.bench_function(format!("shared/{label}"), |b| {
            b.iter(|| queue_and_drain(black_box(&frames), false))
        });
        g.bench_function(format!("copied/{label}"), |b| {
            b.iter(|| queue_and_drain(black_box(&frames), true))
        });
    }
    let frame = Bytes::from(vec![9u8; 66]);
    for turns in [1usize, 10] {
        g.throughput(Throughput::Elements(turns as u64));
        g.bench_function(format!("trickle/{turns}x66B"), |b| {
            b.iter(|| trickle(black_box(&frame), turns))
        });
    }
    g.finish();
}

/// `turns` runs of one frame each (a reservation, a copy), then the drain.
fn trickle(frame: &Bytes, turns: usize) -> usize {
    let mut q = OutQueue::new();
    for _ in 0..turns {
        q.reserve_tail(frame.len());
        q.push_frame(frame);
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
    let n = q.gather(&mut iov);
    let bytes: usize = iov[..n].iter().map(|s| s.len()).sum();
    black_box(&iov[..n]);
    q.advance(bytes);
    bytes
}

criterion_group!(benches, bench);
criterion_main!(benches);
