//! What the TLS 1.3 record layer (`src/server/tls/record.rs`) pays to
//! build an AEAD context from a key's bytes (it keeps contexts only while
//! a connection is busy: docs/ARCHITECTURE.md, "TLS") against what one
//! small record costs to seal, for the three TLS 1.3 suites, with the
//! aws-lc-rs the server links.
//!
//! And, for a full 16 KiB record of a shared frame, the two ways of
//! sealing it into the send buffer: copy the plaintext in and seal in
//! place (the record layer until 2026-12-05), or seal out of place from
//! the frame straight into the buffer (`seal_out_of_place_scatter`, with
//! the inner content type as the extra byte).
//!
//! Run: `cargo bench --bench aead`.

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;

const SUITES: [(&str, &Algorithm); 3] = [
    ("aes128gcm", &AES_128_GCM),
    ("aes256gcm", &AES_256_GCM),
    ("chacha20poly1305", &CHACHA20_POLY1305),
];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    for (name, algorithm) in SUITES {
        let raw = [7u8; 32];
        let raw = &raw[..algorithm.key_len()];
        g.bench_function(format!("build/{name}"), |b| {
            b.iter(|| LessSafeKey::new(UnboundKey::new(algorithm, black_box(raw)).unwrap()))
        });
        let key = LessSafeKey::new(UnboundKey::new(algorithm, raw).unwrap());
        // A 64-byte frame, its content type, as a record carries them.
        let mut record = [0u8; 65];
        let mut seq = 0u64;
        g.bench_function(format!("seal-65B/{name}"), |b| {
            b.iter(|| {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&seq.to_be_bytes());
                seq += 1;
                key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from([23u8, 3, 3, 0, 81]),
                    &mut record,
                )
                .unwrap()
            })
        });
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let frame: Vec<u8> = (0..16384u32).map(|i| i as u8).collect();
    let mut out = vec![0u8; 16384 + 1 + 16];
    let mut seq = 0u64;
    let mut nonce = move || {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        seq += 1;
        Nonce::assume_unique_for_key(n)
    };
    let aad = [23u8, 3, 3, 0x40, 0x11];
    g.bench_function("record-16KiB/copy-then-in-place/aes256gcm", |b| {
        b.iter(|| {
            let (body, tag_out) = out.split_at_mut(16384 + 1);
            body[..16384].copy_from_slice(black_box(&frame));
            body[16384] = 23;
            let tag = key
                .seal_in_place_separate_tag(nonce(), Aad::from(aad), body)
                .unwrap();
            tag_out.copy_from_slice(tag.as_ref());
        })
    });
    g.bench_function("record-16KiB/out-of-place/aes256gcm", |b| {
        b.iter(|| {
            let (cipher, kind_and_tag) = out.split_at_mut(16384);
            key.seal_out_of_place_scatter(
                nonce(),
                Aad::from(aad),
                black_box(&frame),
                cipher,
                &[23],
                kind_and_tag,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
