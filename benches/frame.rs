//! Frame header parsing and the whole inbound decode path.
//!
//! - `parse_header/*`: `corecast::proto::frame::parse_header` on headers of
//!   2 bytes (unmasked, 7-bit length), 4 bytes (unmasked, 16-bit length),
//!   6 bytes (masked, 7-bit length: the usual small client frame) and 14 bytes
//!   (masked, 64-bit length). Throughput in headers.
//! - `decode/*`: `WsConn::decode` over one buffer holding 1000 masked client
//!   frames of 64 payload bytes each, called until the buffer is consumed.
//!   Throughput in frames. `decode` unmasks in place, so every iteration needs
//!   a fresh masked copy of the input:
//!   - `binary_64B` / `text_64B`: the copy is made by `iter_batched` in the
//!     untimed setup; the timed part is the decode alone (on a freshly written,
//!     cache-warm buffer). `text` also runs UTF-8 validation.
//!   - `binary_64B_incl_memcpy`: the copy (`copy_from_slice` into a reused
//!     buffer) is inside the timed loop, so the figure includes one memcpy of
//!     the 70,000-byte input.
//!   - `memcpy_only`: that copy alone, for reference.
//!
//! Run: `cargo bench --bench frame`.

use corecast::proto::frame::{OpCode, client_frame, parse_header};
use corecast::proto::ws::DEFAULT_MAX_MESSAGE_BYTES;
use corecast::proto::{Event, OutQueue, WsConn};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

const FRAMES: usize = 1000;
const PAYLOAD: usize = 64;

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
}

fn bench_parse_header(c: &mut Criterion) {
    let mut h14 = vec![0x82, 0xff];
    h14.extend_from_slice(&(1u64 << 32).to_be_bytes());
    h14.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
    let cases: [(&str, Vec<u8>); 4] = [
        ("2B_unmasked_len7", vec![0x82, 0x7d]),
        ("4B_unmasked_len16", vec![0x82, 0x7e, 0x01, 0x00]),
        ("6B_masked_len7", vec![0x82, 0xc0, 0x37, 0xfa, 0x21, 0x3d]),
        ("14B_masked_len64", h14),
    ];
    let mut group = c.benchmark_group("parse_header");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    for (name, bytes) in &cases {
        let h = parse_header(bytes).unwrap().unwrap();
        assert_eq!(h.header_len, bytes.len(), "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| black_box(parse_header(black_box(&bytes[..]))))
        });
    }
    group.finish();
}

/// `FRAMES` masked client frames of `PAYLOAD` bytes, each with its own mask key.
fn client_frames(opcode: OpCode) -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..FRAMES {
        let payload: Vec<u8> = (0..PAYLOAD).map(|j| b'a' + ((i + j) % 26) as u8).collect();
        let key = (i as u32).wrapping_mul(0x9e37_79b9).to_be_bytes();
        buf.extend_from_slice(&client_frame(true, opcode, &payload, key));
    }
    buf
}

/// Decodes every frame in `input`; returns the number of messages seen.
fn decode_all(input: &mut [u8]) -> usize {
    let mut conn = WsConn::new(DEFAULT_MAX_MESSAGE_BYTES);
    let mut out = OutQueue::new();
    let mut pos = 0;
    let mut messages = 0;
    while pos < input.len() {
        let d = conn.decode(&mut input[pos..], &mut out);
        match d.event {
            Some(Event::Message { payload, .. }) => {
                black_box(payload);
                messages += 1;
            }
            other => panic!("unexpected event {other:?}"),
        }
        pos += d.consumed;
    }
    messages
}

fn bench_decode(c: &mut Criterion) {
    let binary = client_frames(OpCode::Binary);
    let text = client_frames(OpCode::Text);
    assert_eq!(decode_all(&mut binary.clone()), FRAMES);
    assert_eq!(decode_all(&mut text.clone()), FRAMES);

    let mut group = c.benchmark_group("decode");
    configure(&mut group);
    group.throughput(Throughput::Elements(FRAMES as u64));
    for (name, input) in [("binary_64B", &binary), ("text_64B", &text)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || input.clone(),
                |mut buf| {
                    black_box(decode_all(black_box(&mut buf)));
                    // Returned so that the free happens outside the timed part.
                    buf
                },
                BatchSize::LargeInput,
            )
        });
    }
    let mut scratch = binary.clone();
    group.bench_function("binary_64B_incl_memcpy", |b| {
        b.iter(|| {
            scratch.copy_from_slice(black_box(&binary));
            black_box(decode_all(black_box(&mut scratch)))
        })
    });
    group.bench_function("memcpy_only", |b| {
        b.iter(|| {
            scratch.copy_from_slice(black_box(&binary));
            black_box(&mut scratch);
        })
    });
    group.finish();
    eprintln!(
        "decode input: {FRAMES} frames, {} bytes ({} per frame)",
        binary.len(),
        binary.len() / FRAMES
    );
}

criterion_group!(benches, bench_parse_header, bench_decode);
criterion_main!(benches);
