//! What a TLS handshake costs the server with the loaded key, and how many
//! handshake steps a worker may therefore take per loop turn.
//!
//! A step (one read of a session whose handshake has not completed) is
//! cheap but for one: the read that brings the ClientHello, answered with
//! the server's whole flight, key exchange and signature included (TLS
//! 1.3's `CertificateVerify`, TLS 1.2's `ServerKeyExchange`). The rest are
//! a key agreement at most (TLS 1.2's `ClientKeyExchange`: rustls offers
//! only ECDHE suites, never RSA key transport, so no private-key operation
//! happens after the ClientHello) or a MAC. The signature's cost depends
//! on the key by two orders of magnitude (here P-256 19–26 µs, RSA-2048
//! 0.7–0.9 ms, RSA-4096 5–6.5 ms; 9.6 ms on another machine), so the steps
//! per turn follow from the signature, timed when the key is loaded.

use rustls::SignatureScheme;
use rustls::sign::SigningKey;
use std::time::{Duration, Instant};

/// Signing a worker may do per loop turn for handshakes: what a turn may
/// keep its established connections waiting for signatures. The rest of a
/// ClientHello step (key exchange, transcript, the flight's encoding and
/// encryption; ~0.15 ms, whatever the key) is bounded by the cap on steps,
/// [`HANDSHAKE_STEPS_PER_TURN`](super::HANDSHAKE_STEPS_PER_TURN).
pub const SIGNING_BUDGET_PER_TURN: Duration = Duration::from_millis(3);

/// Signatures timed when a key is loaded, after one untimed: the least of
/// them is its cost (a preempted or descheduled signature only reads
/// slower, never faster).
const TIMED_SIGNATURES: usize = 3;

/// What a key is asked to sign with: every scheme a TLS client may offer,
/// so that the key picks the one it uses in a handshake (an ECDSA key has
/// one; an RSA key the first of its own preference the list holds).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::ED448,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::ML_DSA_44,
    SignatureScheme::ML_DSA_65,
    SignatureScheme::ML_DSA_87,
];

/// What a TLS 1.3 server signs in its `CertificateVerify` (RFC 8446
/// §4.4.3): 64 spaces, the context string, a zero byte and the transcript
/// hash (SHA-256 with the AES-128 suite we choose), 130 bytes.
const SIGNED_CONTENT_BYTES: usize = 64 + 33 + 1 + 32;

/// How long one signature with `key` takes here: the least of
/// [`TIMED_SIGNATURES`] (`None` if the key signs with none of
/// [`SCHEMES`], or fails to sign).
pub fn signature_cost(key: &dyn SigningKey) -> Option<Duration> {
    let signer = key.choose_scheme(SCHEMES)?;
    let content = [b' '; SIGNED_CONTENT_BYTES];
    // The first signature may pay for lazily built state (blinding,
    // precomputed tables): not a handshake's cost.
    signer.sign(&content).ok()?;
    let mut least = Duration::MAX;
    for _ in 0..TIMED_SIGNATURES {
        let start = Instant::now();
        signer.sign(&content).ok()?;
        least = least.min(start.elapsed());
    }
    Some(least)
}

/// The handshake steps per loop turn for a key whose signature costs
/// `signature`: as many ClientHello steps as sign within
/// [`SIGNING_BUDGET_PER_TURN`], at least 1 (a turn makes progress on
/// handshakes whatever the key) and at most
/// [`HANDSHAKE_STEPS_PER_TURN`](super::HANDSHAKE_STEPS_PER_TURN).
pub fn steps_per_turn(signature: Duration) -> u32 {
    let fit = SIGNING_BUDGET_PER_TURN.as_nanos() / signature.as_nanos().max(1);
    fit.clamp(1, u128::from(super::HANDSHAKE_STEPS_PER_TURN)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    fn signing_key(key: &rcgen::KeyPair) -> std::sync::Arc<dyn SigningKey> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(der)
            .unwrap()
    }

    #[test]
    fn the_steps_per_turn_fall_with_the_signatures_cost_and_stay_at_least_one() {
        let cap = crate::server::tls::HANDSHAKE_STEPS_PER_TURN;
        let us = Duration::from_micros;
        assert_eq!(steps_per_turn(Duration::ZERO), cap);
        // P-256 (ECDSA ~0.03 ms): the cap, as before costs were measured.
        assert_eq!(steps_per_turn(us(30)), cap);
        // RSA-2048 (~1 ms): a few.
        assert_eq!(steps_per_turn(us(1_000)), 3);
        assert_eq!(steps_per_turn(us(93)), 32);
        assert_eq!(steps_per_turn(us(94)), 31);
        // RSA-4096 (~10 ms), and a signature that takes longer than the
        // whole budget: one a turn, never none.
        assert_eq!(steps_per_turn(us(9_600)), 1);
        assert_eq!(steps_per_turn(Duration::from_secs(1)), 1);
        assert_eq!(steps_per_turn(Duration::MAX), 1);
        let mut last = cap;
        for cost in (0..20_000).step_by(37).map(us) {
            let steps = steps_per_turn(cost);
            assert!((1..=last).contains(&steps), "{cost:?}: {steps}");
            last = steps;
        }
    }

    /// Coarse on purpose (no timed bound that a loaded machine could
    /// break): an RSA-4096 signature costs more than a P-256 one by two
    /// orders of magnitude, so it gets fewer steps whatever the machine.
    #[test]
    fn an_rsa_4096_key_gets_fewer_steps_than_a_p256_key() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rsa =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
                .unwrap();
        let p256 = signature_cost(&*signing_key(&p256)).unwrap();
        let rsa = signature_cost(&*signing_key(&rsa)).unwrap();
        assert!(rsa > p256, "RSA-4096 {rsa:?}, P-256 {p256:?}");
        assert!(steps_per_turn(rsa) < steps_per_turn(p256));
        assert!(steps_per_turn(rsa) >= 1);
    }
}
