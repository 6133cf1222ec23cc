//! Throughput of every payload (un)masking path in `corecast::proto::mask`.
//!
//! One criterion group per buffer size (16 B, 1 KiB, 64 KiB), so each group
//! compares the paths on equal input. Every path runs twice per size:
//! - `aligned`: the slice starts on a 64-byte boundary, phase 0;
//! - `unaligned`: the slice starts one byte later, phase 3 (a payload that
//!   continues a previous read).
//!
//! Masking is an involution, so each iteration masks the same buffer in place
//! again; the work per iteration is constant.
//!
//! Run: `cargo bench --bench unmask`.

use corecast::proto::mask;
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use std::hint::black_box;
use std::time::Duration;

const SIZES: [(usize, &str); 3] = [(16, "16B"), (1024, "1KiB"), (64 * 1024, "64KiB")];
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A buffer with room for `len` bytes starting at a 64-byte boundary plus an
/// extra byte for the unaligned start; returns it and the aligned offset.
fn aligned_buffer(len: usize) -> (Vec<u8>, usize) {
    let buf: Vec<u8> = (0..len + 128).map(|i| (i * 31 + 7) as u8).collect();
    let base = buf.as_ptr().align_offset(64);
    assert!(base + 1 + len <= buf.len());
    (buf, base)
}

/// Benchmarks one path at one size, aligned and unaligned. Generic so that the
/// plain functions are called directly (and may be inlined), as in the server;
/// only the AVX2 path is reached through the function pointer `avx2_path()`
/// hands out, which is also how the dispatcher reaches it.
fn bench_path<F>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    buf: &mut [u8],
    base: usize,
    len: usize,
    name: &str,
    f: F,
) where
    F: Fn(&mut [u8], [u8; 4], usize) -> usize,
{
    for (variant, offset, phase) in [("aligned", 0usize, 0usize), ("unaligned", 1, 3)] {
        let start = base + offset;
        group.bench_function(BenchmarkId::new(name, variant), |b| {
            b.iter(|| {
                let slice = black_box(&mut buf[start..start + len]);
                black_box(f(slice, black_box(MASK), black_box(phase)))
            })
        });
    }
}

fn bench_unmask(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    let avx2: Option<mask::MaskFn> = mask::avx2_path();
    eprintln!(
        "dispatcher path on this CPU (buffers >= 16 B): {}",
        mask::best_path().0
    );
    for (len, label) in SIZES {
        let mut group = c.benchmark_group(format!("unmask/{label}"));
        group
            .throughput(Throughput::Bytes(len as u64))
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sample_size(30);
        let (mut buf, base) = aligned_buffer(len);
        let buf = &mut buf[..];
        bench_path(
            &mut group,
            buf,
            base,
            len,
            "bytewise",
            mask::apply_mask_bytewise,
        );
        bench_path(&mut group, buf, base, len, "word", mask::apply_mask_word);
        #[cfg(target_arch = "x86_64")]
        {
            bench_path(&mut group, buf, base, len, "sse2", mask::apply_mask_sse2);
            match avx2 {
                Some(f) => bench_path(&mut group, buf, base, len, "avx2", f),
                None => eprintln!("no AVX2 on this CPU: avx2 path skipped"),
            }
        }
        bench_path(&mut group, buf, base, len, "dispatch", mask::apply_mask);
        group.finish();
    }
}

criterion_group!(benches, bench_unmask);
criterion_main!(benches);
