//! permessage-deflate's per-message work on the committed corpus
//! (tools/loadgen/corpus/quotes-1k.jsonl: 400 JSON messages of 921–1146
//! bytes): compressing each message as a fresh raw-deflate stream ended by
//! a sync flush, and inflating it back, with two implementations:
//!
//! - `zlib-rs`: flate2 with its zlib-rs backend, what the server links
//!   (`Compress`/`Decompress`, reset per message, as `proto::deflate` does);
//! - `miniz_oxide`: the crate behind flate2's default `rust_backend`,
//!   called the way that backend calls it (`CompressorOxide` with
//!   `set_format_and_level`, `deflate::stream::deflate` with `MZFlush::Sync`;
//!   `InflateState` reset with `FullReset`), since flate2 links one backend
//!   per build.
//!
//! Both at level 6 (flate2's `Compression::default()`, the server's) and 1.
//! For comparison, compression only: libdeflate (the `libdeflater` crate)
//! at 6 and at 12, its near-optimal parser, which shows how small a message
//! compressed on its own can get.
//! `server` rows are `proto::deflate::compress` and `inflate` themselves
//! (zlib-rs at level 6, plus the output allocation and the tail handling).
//! One iteration handles all 400 messages; throughput is uncompressed
//! bytes. Compressed sizes are printed before the timings.
//!
//! `deflate/small` measures where compressing stops paying
//! (`proto::deflate::COMPRESS_FROM`): the first N bytes of every corpus
//! message (JSON text with the corpus's byte statistics), compressed by the
//! server's `compress`, for N from 16 to 512; the printed table gives each
//! N's mean compressed size (a message that does not shrink is counted at
//! its own size, since it goes out uncompressed) and how many shrink.
//!
//! Run: `cargo bench --bench deflate`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use miniz_oxide::deflate::core::CompressorOxide;
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush};
use std::hint::black_box;
use std::time::Duration;

const CORPUS: &str = include_str!("../tools/loadgen/corpus/quotes-1k.jsonl");
/// The end of a sync flush: an empty stored block (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

fn messages() -> Vec<&'static [u8]> {
    CORPUS.lines().map(str::as_bytes).collect()
}

/// Room for any message's deflate data (stored blocks at worst).
fn out_buf(messages: &[&[u8]]) -> Vec<u8> {
    let max = messages.iter().map(|m| m.len()).max().unwrap_or(0);
    vec![0; max + max / 8 + 64]
}

/// One message compressed by zlib-rs into `out`; its length (with the tail).
fn zlib_rs_compress(c: &mut Compress, msg: &[u8], out: &mut [u8]) -> usize {
    c.reset();
    c.compress(msg, out, FlushCompress::Sync)
        .expect("room enough");
    assert_eq!(c.total_in() as usize, msg.len());
    c.total_out() as usize
}

/// One message compressed by miniz_oxide into `out`; its length (with the tail).
fn miniz_compress(c: &mut CompressorOxide, msg: &[u8], out: &mut [u8]) -> usize {
    c.reset();
    let r = miniz_oxide::deflate::stream::deflate(c, msg, out, MZFlush::Sync);
    assert!(r.status.is_ok() && r.bytes_consumed == msg.len());
    r.bytes_written
}

fn miniz_compressor(level: u8) -> Box<CompressorOxide> {
    let mut c = Box::<CompressorOxide>::default();
    c.set_format_and_level(DataFormat::Raw, level);
    c
}

fn libdeflate_compressor(level: i32) -> libdeflater::Compressor {
    libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level).expect("level"))
}

/// One message (deflate data ending with the tail) inflated by zlib-rs.
fn zlib_rs_inflate(d: &mut Decompress, data: &[u8], out: &mut [u8]) -> usize {
    d.reset(false);
    d.decompress(data, out, FlushDecompress::Sync)
        .expect("valid");
    d.total_out() as usize
}

/// The same by miniz_oxide.
fn miniz_inflate(d: &mut InflateState, data: &[u8], out: &mut [u8]) -> usize {
    d.reset_as(miniz_oxide::inflate::stream::FullReset(DataFormat::Raw));
    let r = miniz_oxide::inflate::stream::inflate(d, data, out, MZFlush::Sync);
    assert!(r.status.is_ok());
    r.bytes_written
}

/// Compressed sizes per implementation and level, each message checked to
/// inflate back (by the other implementation) to itself.
fn report_sizes(messages: &[&[u8]]) {
    let total: usize = messages.iter().map(|m| m.len()).sum();
    let mut out = out_buf(messages);
    let mut back = vec![0; out.len() * 2];
    println!(
        "deflate sizes: {} messages, {total} bytes, mean {:.1} B; compressed without the 4-byte tail:",
        messages.len(),
        total as f64 / messages.len() as f64
    );
    for level in [1u8, 6] {
        let mut z = Compress::new(Compression::new(level.into()), false);
        let mut m = miniz_compressor(level);
        let (mut zt, mut mt) = (0, 0);
        for msg in messages {
            let n = zlib_rs_compress(&mut z, msg, &mut out);
            zt += n - TAIL.len();
            let k = miniz_inflate(
                &mut InflateState::new_boxed(DataFormat::Raw),
                &out[..n],
                &mut back,
            );
            assert_eq!(&back[..k], *msg);
            let n = miniz_compress(&mut m, msg, &mut out);
            mt += n - TAIL.len();
            let k = zlib_rs_inflate(&mut Decompress::new(false), &out[..n], &mut back);
            assert_eq!(&back[..k], *msg);
        }
        for (name, bytes) in [("zlib-rs", zt), ("miniz_oxide", mt)] {
            println!(
                "  {name:12} level {level}: {bytes} bytes, {:.1} B per message, {:.3} of the input",
                bytes as f64 / messages.len() as f64,
                bytes as f64 / total as f64
            );
        }
    }
    // libdeflate writes one complete stream (its last block final); on the
    // wire that is its output and one 0x00 byte (RFC 7692 §7.2.3.4).
    for level in [6, 9, 12] {
        let mut c = libdeflate_compressor(level);
        let mut bytes = 0;
        for msg in messages {
            let n = c.deflate_compress(msg, &mut out).expect("room");
            let k = zlib_rs_inflate(&mut Decompress::new(false), &out[..n], &mut back);
            assert_eq!(&back[..k], *msg);
            bytes += n + 1;
        }
        println!(
            "  {:12} level {level}: {bytes} bytes, {:.1} B per message, {:.3} of the input",
            "libdeflate",
            bytes as f64 / messages.len() as f64,
            bytes as f64 / total as f64
        );
    }
    let server: usize = messages
        .iter()
        .map(|m| corecast::proto::deflate::compress(m).map_or(m.len(), |c| c.len()))
        .sum();
    println!(
        "  server (proto::deflate::compress): {server} bytes, {:.3} of the input",
        server as f64 / total as f64
    );
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
}

fn bench_compress(c: &mut Criterion) {
    let messages = messages();
    report_sizes(&messages);
    let total: usize = messages.iter().map(|m| m.len()).sum();
    let mut out = out_buf(&messages);
    let mut g = c.benchmark_group("deflate/compress");
    configure(&mut g);
    g.throughput(Throughput::Bytes(total as u64));
    for level in [1u8, 6] {
        let mut z = Compress::new(Compression::new(level.into()), false);
        g.bench_function(format!("zlib-rs/level{level}"), |b| {
            b.iter(|| {
                for msg in &messages {
                    black_box(zlib_rs_compress(&mut z, msg, &mut out));
                }
            })
        });
        let mut m = miniz_compressor(level);
        g.bench_function(format!("miniz_oxide/level{level}"), |b| {
            b.iter(|| {
                for msg in &messages {
                    black_box(miniz_compress(&mut m, msg, &mut out));
                }
            })
        });
    }
    for level in [6, 12] {
        let mut c = libdeflate_compressor(level);
        g.bench_function(format!("libdeflate/level{level}"), |b| {
            b.iter(|| {
                for msg in &messages {
                    black_box(c.deflate_compress(msg, &mut out).expect("room"));
                }
            })
        });
    }
    g.bench_function("server/level6", |b| {
        b.iter(|| {
            for msg in &messages {
                black_box(corecast::proto::deflate::compress(msg));
            }
        })
    });
    g.finish();
}

fn bench_inflate(c: &mut Criterion) {
    let messages = messages();
    let total: usize = messages.iter().map(|m| m.len()).sum();
    // What the server sends: zlib-rs at level 6.
    let mut z = Compress::new(Compression::default(), false);
    let mut buf = out_buf(&messages);
    let compressed: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            let n = zlib_rs_compress(&mut z, m, &mut buf);
            buf[..n].to_vec()
        })
        .collect();
    let mut out = vec![0; buf.len() * 2];
    let mut g = c.benchmark_group("deflate/inflate");
    configure(&mut g);
    g.throughput(Throughput::Bytes(total as u64));
    let mut d = Decompress::new(false);
    g.bench_function("zlib-rs", |b| {
        b.iter(|| {
            for data in &compressed {
                black_box(zlib_rs_inflate(&mut d, data, &mut out));
            }
        })
    });
    let mut m = InflateState::new_boxed(DataFormat::Raw);
    g.bench_function("miniz_oxide", |b| {
        b.iter(|| {
            for data in &compressed {
                black_box(miniz_inflate(&mut m, data, &mut out));
            }
        })
    });
    let without_tail: Vec<&[u8]> = compressed
        .iter()
        .map(|c| &c[..c.len() - TAIL.len()])
        .collect();
    let mut v = Vec::new();
    g.bench_function("server", |b| {
        b.iter(|| {
            for data in &without_tail {
                corecast::proto::deflate::inflate(data, 1 << 20, &mut v).expect("valid");
                black_box(v.len());
            }
        })
    });
    g.finish();
}

const SMALL: [usize; 8] = [16, 32, 48, 64, 96, 128, 256, 512];

fn bench_small(c: &mut Criterion) {
    let messages = messages();
    println!("deflate/small: the first N bytes of each corpus message, server compress:");
    println!("  N     shrink  mean size sent  saved per message");
    for n in SMALL {
        let mut sent = 0;
        let mut shrunk = 0;
        for m in &messages {
            match corecast::proto::deflate::compress(&m[..n]) {
                Some(c) => {
                    shrunk += 1;
                    sent += c.len();
                }
                None => sent += n,
            }
        }
        let mean = sent as f64 / messages.len() as f64;
        println!(
            "  {n:<5} {:>5.1} %  {mean:>8.1} B      {:>6.1} B ({:.0} %)",
            100.0 * shrunk as f64 / messages.len() as f64,
            n as f64 - mean,
            100.0 * (1.0 - mean / n as f64)
        );
    }
    let mut g = c.benchmark_group("deflate/small");
    configure(&mut g);
    // Time per message: one iteration compresses one prefix of each message.
    g.throughput(Throughput::Elements(messages.len() as u64));
    for n in SMALL {
        g.bench_function(format!("server/{n}B"), |b| {
            b.iter(|| {
                for m in &messages {
                    black_box(corecast::proto::deflate::compress(&m[..n]));
                }
            })
        });
    }
    g.finish();
}

/// One large message inflated into a fresh buffer, as the server takes a
/// compressed message: 16 MiB of one repeated byte (16 KiB compressed, the
/// ratio a compression bomb has). The cost must be linear in the message:
/// growing the output 16 KiB at a time moved it ~1 000 times.
fn bench_large(c: &mut Criterion) {
    let size = 16 << 20;
    let mut z = Compress::new(Compression::default(), false);
    let message = vec![b'a'; size];
    let mut buf = vec![0; size];
    let n = zlib_rs_compress(&mut z, &message, &mut buf);
    let data = buf[..n - TAIL.len()].to_vec();
    let mut g = c.benchmark_group("deflate/large");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("server/16MiB", |b| {
        b.iter(|| {
            let mut v = Vec::new();
            corecast::proto::deflate::inflate(&data, 64 << 20, &mut v).expect("valid");
            black_box(v.len())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_compress,
    bench_inflate,
    bench_small,
    bench_large
);
criterion_main!(benches);
