//! Masking and unmasking of frame payloads (RFC 6455 §5.3).
//!
//! `payload[i] ^= mask[(phase + i) % 4]`. Masking is an involution, so the
//! same functions mask (client side) and unmask (server side).
//!
//! A payload can arrive in pieces, so every function takes the *phase*: the
//! index into the mask of the first byte of `buf` (0..4), and returns the
//! phase of the byte after the last one.
//!
//! Paths, chosen once at run time by [`apply_mask`]:
//! - [`apply_mask_bytewise`]: the definition, one byte at a time; the reference
//!   every other path is tested against.
//! - [`apply_mask_word`]: portable safe code, eight bytes per step.
//! - `apply_mask_sse2` / `apply_mask_avx2` (x86_64): 16 / 32 bytes per step.

use std::sync::OnceLock;

/// Signature shared by every masking path.
pub type MaskFn = fn(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize;

/// The definition: one byte at a time. Slow; the reference for tests.
pub fn apply_mask_bytewise(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) & 3];
    }
    (phase + buf.len()) & 3
}

/// The mask rotated so that index 0 lines up with `phase`.
#[inline]
fn rotated(mask: [u8; 4], phase: usize) -> [u8; 4] {
    let p = phase & 3;
    [
        mask[p],
        mask[(p + 1) & 3],
        mask[(p + 2) & 3],
        mask[(p + 3) & 3],
    ]
}

/// Portable path: XOR eight bytes at a time with a 64-bit mask. Safe code;
/// the compiler is free to vectorise it further.
pub fn apply_mask_word(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let m = rotated(mask, phase);
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let done = buf.len() / 8 * 8;
    for chunk in buf[..done].chunks_exact_mut(8) {
        // `chunks_exact_mut(8)` guarantees the length, so the conversion cannot fail.
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8 bytes"));
        chunk.copy_from_slice(&(word ^ m64).to_ne_bytes());
    }
    // Eight is a multiple of four: the phase of the tail is still `phase`.
    apply_mask_bytewise(&mut buf[done..], mask, phase);
    (phase + buf.len()) & 3
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{apply_mask_word, rotated};
    use std::arch::x86_64::*;

    /// SSE2 path: 16 bytes per step, the tail by the word path.
    ///
    /// # Safety
    /// The CPU must support SSE2 (every x86_64 CPU does; kept `unsafe` for symmetry
    /// with the AVX2 path and because it calls `target_feature` code).
    #[target_feature(enable = "sse2")]
    pub unsafe fn apply_mask_sse2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        let m = u32::from_ne_bytes(rotated(mask, phase));
        let vmask = _mm_set1_epi32(m as i32);
        let done = buf.len() / 16 * 16;
        for chunk in buf[..done].chunks_exact_mut(16) {
            let p = chunk.as_mut_ptr() as *mut __m128i;
            // SAFETY: `chunk` is exactly 16 initialised, writable bytes; the unaligned
            // load/store intrinsics have no alignment requirement.
            unsafe { _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), vmask)) };
        }
        // Sixteen is a multiple of four: the tail starts at the same phase.
        apply_mask_word(&mut buf[done..], mask, phase);
        (phase + buf.len()) & 3
    }

    /// AVX2 path: 32 bytes per step, the tail by the SSE2 path.
    ///
    /// # Safety
    /// The CPU must support AVX2 (checked by the dispatcher with
    /// `is_x86_feature_detected!`).
    #[target_feature(enable = "avx2")]
    pub unsafe fn apply_mask_avx2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        let m = u32::from_ne_bytes(rotated(mask, phase));
        let vmask = _mm256_set1_epi32(m as i32);
        let done = buf.len() / 32 * 32;
        for chunk in buf[..done].chunks_exact_mut(32) {
            let p = chunk.as_mut_ptr() as *mut __m256i;
            // SAFETY: `chunk` is exactly 32 initialised, writable bytes; the unaligned
            // load/store intrinsics have no alignment requirement.
            unsafe { _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), vmask)) };
        }
        // SAFETY: AVX2 implies SSE2, and this function only runs where AVX2 was detected.
        unsafe { apply_mask_sse2(&mut buf[done..], mask, phase) };
        (phase + buf.len()) & 3
    }
}

/// SSE2 path as a safe [`MaskFn`]. SSE2 is part of the x86_64 baseline.
#[cfg(target_arch = "x86_64")]
pub fn apply_mask_sse2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    // SAFETY: SSE2 is mandatory on x86_64, so the target feature is always present.
    unsafe { x86::apply_mask_sse2(buf, mask, phase) }
}

/// AVX2 path as a safe [`MaskFn`]; `None` when this CPU lacks AVX2.
#[cfg(target_arch = "x86_64")]
pub fn avx2_path() -> Option<MaskFn> {
    fn avx2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        // SAFETY: this function is only handed out after `is_x86_feature_detected!("avx2")`.
        unsafe { x86::apply_mask_avx2(buf, mask, phase) }
    }
    if std::is_x86_feature_detected!("avx2") {
        Some(avx2)
    } else {
        None
    }
}

/// The fastest path this CPU supports, with its name (for benches and logs).
pub fn best_path() -> (&'static str, MaskFn) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(f) = avx2_path() {
            return ("avx2", f);
        }
        ("sse2", apply_mask_sse2)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        ("word", apply_mask_word)
    }
}

/// Buffers shorter than this take the inlined word path: below 32 bytes the
/// AVX2 path makes no 32-byte step, and the indirect call costs more than it
/// saves (16 B: word 4.6 ns, dispatched AVX2 7.1 ns; `benches/unmask.rs`).
const SIMD_MIN_BYTES: usize = 32;

/// Masks or unmasks `buf` in place starting at mask index `phase`; returns the
/// phase after the last byte. Uses the fastest path of this CPU.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    if buf.len() < SIMD_MIN_BYTES {
        return apply_mask_word(buf, mask, phase);
    }
    static BEST: OnceLock<MaskFn> = OnceLock::new();
    (BEST.get_or_init(|| best_path().1))(buf, mask, phase)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every available path, by name.
    fn paths() -> Vec<(&'static str, MaskFn)> {
        #[allow(unused_mut)]
        let mut v: Vec<(&'static str, MaskFn)> =
            vec![("word", apply_mask_word), ("dispatch", apply_mask)];
        #[cfg(target_arch = "x86_64")]
        {
            v.push(("sse2", apply_mask_sse2));
            if let Some(f) = avx2_path() {
                v.push(("avx2", f));
            }
        }
        v
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Exhaustive: every length 0..=1024, every phase, unaligned starts 0..8.
    #[test]
    fn every_path_equals_bytewise_for_all_lengths_phases_offsets() {
        let mask = [0x12, 0x9a, 0xfe, 0x01];
        // Under Miri (which checks the SIMD loads and stores for out-of-bounds
        // and alignment errors) the same loops, over fewer lengths: every
        // length up to two AVX2 steps plus a tail covers every code path.
        let (max_len, offsets) = if cfg!(miri) { (72, 4) } else { (1024, 8) };
        let backing = pattern(1024 + 64);
        for (name, f) in paths() {
            for len in 0..=max_len {
                for phase in 0..4 {
                    for offset in 0..offsets {
                        let mut expect = backing.clone();
                        let mut got = backing.clone();
                        let pe =
                            apply_mask_bytewise(&mut expect[offset..offset + len], mask, phase);
                        let pg = f(&mut got[offset..offset + len], mask, phase);
                        assert_eq!(pe, pg, "{name}: phase after len={len} phase={phase}");
                        assert!(
                            expect == got,
                            "{name}: bytes differ at len={len} phase={phase} offset={offset}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn masking_twice_is_identity() {
        for (name, f) in paths() {
            let orig = pattern(777);
            let mut buf = orig.clone();
            f(&mut buf, [1, 2, 3, 4], 1);
            assert_ne!(buf, orig, "{name} changed nothing");
            f(&mut buf, [1, 2, 3, 4], 1);
            assert_eq!(buf, orig, "{name}");
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut buf = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        for (_, f) in paths() {
            let mut b = buf;
            f(&mut b, [0x37, 0xfa, 0x21, 0x3d], 0);
            assert_eq!(&b, b"Hello");
        }
        apply_mask(&mut buf, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&buf, b"Hello");
    }

    proptest! {
        /// Splitting a payload at arbitrary points and carrying the phase gives
        /// the same bytes as masking it in one call.
        #[cfg_attr(miri, ignore = "too slow under Miri; the exhaustive test covers every path")]
        #[test]
        fn split_masking_carries_phase(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            mask in any::<[u8; 4]>(),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let mut whole = data.clone();
            apply_mask_bytewise(&mut whole, mask, 0);
            for (name, f) in paths() {
                let mut pieces = data.clone();
                let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
                points.sort_unstable();
                let mut phase = 0;
                let mut start = 0;
                for p in points.into_iter().chain(std::iter::once(data.len())) {
                    phase = f(&mut pieces[start..p], mask, phase);
                    start = p;
                }
                prop_assert_eq!(phase, data.len() % 4, "{}", name);
                prop_assert!(pieces == whole, "{} differs", name);
            }
        }
    }
}
