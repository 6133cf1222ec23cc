//! The token checks, on keys made at test time.

use super::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn settings(keys: Vec<String>) -> JwtSettings {
    JwtSettings {
        keys,
        jwks: None,
        audience: Vec::new(),
        issuer: Vec::new(),
        leeway: DEFAULT_LEEWAY,
        anonymous_subscribe: false,
    }
}

fn secret_file(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("corecast-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn hs256() -> Verifier {
    let path = secret_file("hs", SECRET);
    Verifier::load(&settings(vec![format!("HS256={path}")])).unwrap()
}

fn token(alg: Algorithm, claims: serde_json::Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

const NOW: u64 = 1_800_000_000;

#[test]
fn a_valid_token_grants_its_rights_with_sub_in_place() {
    let v = hs256();
    let t = token(
        Algorithm::HS256,
        json!({"sub": "alice", "exp": NOW + 60,
               "corecast": {"subscribe": ["prices.>", "user.{sub}.>"], "publish": ["chat.{sub}"]}}),
    );
    let g = v.verify(&t, NOW).unwrap();
    assert_eq!(g.sub.as_deref(), Some("alice"));
    assert_eq!(g.exp, NOW + 60);
    assert!(g.may_subscribe("prices.*.EUR"));
    assert!(g.may_subscribe("user.alice.inbox"));
    assert!(!g.may_subscribe("user.bob.inbox"));
    assert!(!g.may_subscribe(">"));
    assert!(g.may_publish("chat.alice"));
    assert!(!g.may_publish("chat.bob"));
    assert!(
        !g.may_publish("prices.fx"),
        "subscribe rights do not publish"
    );
}

#[test]
fn times_are_checked_against_the_given_clock_with_the_leeway() {
    let v = hs256();
    let t = token(Algorithm::HS256, json!({"exp": NOW, "nbf": NOW - 10}));
    assert!(v.verify(&t, NOW + 30).is_ok(), "within the leeway");
    assert_eq!(v.verify(&t, NOW + 31), Err(Refusal::Expired));
    let early = token(
        Algorithm::HS256,
        json!({"exp": NOW + 600, "nbf": NOW + 100}),
    );
    assert_eq!(v.verify(&early, NOW), Err(Refusal::NotYetValid));
    assert!(v.verify(&early, NOW + 70).is_ok());
    let future = token(
        Algorithm::HS256,
        json!({"exp": NOW + 600, "iat": NOW + 100}),
    );
    assert_eq!(v.verify(&future, NOW), Err(Refusal::Invalid));
    let forever = token(Algorithm::HS256, json!({"sub": "x"}));
    assert_eq!(
        v.verify(&forever, NOW),
        Err(Refusal::Invalid),
        "exp is required"
    );
    let text = token(Algorithm::HS256, json!({"exp": "tomorrow"}));
    assert_eq!(v.verify(&text, NOW), Err(Refusal::Invalid));
    let far = token(Algorithm::HS256, json!({"exp": 1e300}));
    assert_eq!(v.verify(&far, NOW).map(|g| g.exp), Ok(u64::MAX));
}

#[test]
fn the_header_cannot_choose_another_algorithm_or_key() {
    let v = hs256();
    let claims = json!({"exp": NOW + 60});
    // Signed right but labelled HS384: no HS384 key.
    assert_eq!(
        v.verify(&token(Algorithm::HS384, claims.clone()), NOW),
        Err(Refusal::Invalid)
    );
    // `alg: none` with no signature.
    let none = format!(
        "{}.{}.",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"alg":"none","typ":"JWT"}"#
        ),
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            claims.to_string()
        )
    );
    assert_eq!(v.verify(&none, NOW), Err(Refusal::Invalid));
    // A kid no key has.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("other".into());
    let t = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
    assert_eq!(v.verify(&t, NOW), Err(Refusal::UnknownKey));
    // Another secret.
    let t = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"another secret, 32 bytes long!!!"),
    )
    .unwrap();
    assert_eq!(v.verify(&t, NOW), Err(Refusal::Invalid));
    for junk in ["", "a.b", "a.b.c", "....", &"x".repeat(MAX_TOKEN + 1)] {
        assert_eq!(v.verify(junk, NOW), Err(Refusal::Invalid), "{junk:.20}");
    }
}

#[test]
fn rights_that_do_not_parse_or_smuggle_wildcards_through_sub_refuse_the_token() {
    let v = hs256();
    for (sub, right) in [
        ("a.>", "user.{sub}"),
        ("*", "user.{sub}.x"),
        ("", "user.{sub}"),
        ("ok", "user.{sub}.>.x"),
        ("ok", "a b"),
    ] {
        let t = token(
            Algorithm::HS256,
            json!({"sub": sub, "exp": NOW + 60, "corecast": {"subscribe": [right]}}),
        );
        assert_eq!(v.verify(&t, NOW), Err(Refusal::Invalid), "{sub} {right}");
    }
    let no_sub = token(
        Algorithm::HS256,
        json!({"exp": NOW + 60, "corecast": {"subscribe": ["user.{sub}"]}}),
    );
    assert_eq!(v.verify(&no_sub, NOW), Err(Refusal::Invalid));
    let many: Vec<String> = (0..=MAX_RIGHTS).map(|i| format!("t{i}")).collect();
    let t = token(
        Algorithm::HS256,
        json!({"exp": NOW + 60, "corecast": {"publish": many}}),
    );
    assert_eq!(v.verify(&t, NOW), Err(Refusal::Invalid));
}

#[test]
fn audience_and_issuer_are_required_when_configured() {
    let path = secret_file("hs-aud", SECRET);
    let mut s = settings(vec![format!("HS256={path}")]);
    s.audience = vec!["feeds".into()];
    s.issuer = vec!["https://auth.example".into()];
    let v = Verifier::load(&s).unwrap();
    let ok = token(
        Algorithm::HS256,
        json!({"exp": NOW + 60, "aud": "feeds", "iss": "https://auth.example"}),
    );
    assert!(v.verify(&ok, NOW).is_ok());
    for bad in [
        json!({"exp": NOW + 60, "iss": "https://auth.example"}),
        json!({"exp": NOW + 60, "aud": "other", "iss": "https://auth.example"}),
        json!({"exp": NOW + 60, "aud": "feeds", "iss": "https://evil.example"}),
        json!({"exp": NOW + 60, "aud": "feeds"}),
        // `iss` is one string (RFC 7519 §4.1.1), never a list.
        json!({"exp": NOW + 60, "aud": "feeds", "iss": ["https://auth.example"]}),
        json!({"exp": NOW + 60, "aud": "feeds", "iss": 7}),
    ] {
        assert_eq!(
            v.verify(&token(Algorithm::HS256, bad.clone()), NOW),
            Err(Refusal::Invalid),
            "{bad}"
        );
    }
    // Without --jwt-audience, a token naming an audience still passes.
    let plain = hs256();
    assert!(plain.verify(&ok, NOW).is_ok());
    // Without --jwt-issuer, an `iss` that is not a string is refused all
    // the same.
    let listed = token(Algorithm::HS256, json!({"exp": NOW + 60, "iss": ["a"]}));
    assert_eq!(plain.verify(&listed, NOW), Err(Refusal::Invalid));
}

#[test]
fn key_specs_and_files_are_checked() {
    assert!(parse_key_spec("HS256=/k").is_ok());
    assert!(parse_key_spec("k1@ES256=/k").is_ok());
    for bad in ["HS256", "XX256=/k", "@HS256=/k", "HS256=", "none=/k"] {
        assert!(parse_key_spec(bad).is_err(), "{bad}");
    }
    let short = secret_file("short", b"too short");
    let e = Verifier::load(&settings(vec![format!("HS256={short}")])).unwrap_err();
    assert!(e.contains("32 bytes") && e.contains(&short), "{e}");
    let missing = Verifier::load(&settings(vec!["RS256=/nonexistent/key.pem".into()])).unwrap_err();
    assert!(missing.contains("/nonexistent/key.pem"), "{missing}");
    let garbage = secret_file("garbage.pem", b"not a pem");
    let e = Verifier::load(&settings(vec![format!("ES256={garbage}")])).unwrap_err();
    assert!(e.contains(&garbage), "{e}");
}

#[test]
fn ec_keys_from_a_pem_file_or_a_jwks_each_verify_their_own_tokens() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = secret_file("ec.pem", pair.public_key_pem().as_bytes());
    let raw = other.public_key_raw();
    assert_eq!((raw.len(), raw[0]), (65, 4), "uncompressed P-256 point");
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k2",
        "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..]),
    }]});
    let jwks = secret_file("keys.json", jwks.to_string().as_bytes());
    let mut s = settings(vec![format!("k1@ES256={pem}")]);
    s.jwks = Some(JwksSource::File(jwks.into()));
    let v = Verifier::load(&s).unwrap();
    let sign = |kp: &rcgen::KeyPair, kid: Option<&str>| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        encode(&h, &json!({"exp": NOW + 60, "sub": "s"}), &key).unwrap()
    };
    assert!(v.verify(&sign(&pair, Some("k1")), NOW).is_ok());
    assert!(v.verify(&sign(&other, Some("k2")), NOW).is_ok());
    assert!(
        v.verify(&sign(&pair, None), NOW).is_ok(),
        "no kid: every ES256 key"
    );
    assert_eq!(
        v.verify(&sign(&pair, Some("k2")), NOW),
        Err(Refusal::Invalid)
    );
    // An HS256 token made with the public key's bytes as the secret
    // (the classic algorithm confusion) is refused: no HS256 key.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": NOW + 60}),
        &EncodingKey::from_secret(pair.public_key_pem().as_bytes()),
    )
    .unwrap();
    assert_eq!(v.verify(&forged, NOW), Err(Refusal::Invalid));
    // A JWKS key without "alg" is refused at load.
    let loose = secret_file("loose.json", br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
    let mut s = settings(Vec::new());
    s.jwks = Some(JwksSource::File(loose.clone().into()));
    let e = Verifier::load(&s).unwrap_err();
    assert!(e.contains("no \"alg\"") && e.contains(&loose), "{e}");
}

#[test]
fn tokens_come_from_the_bearer_header_or_the_query() {
    assert_eq!(token_of(Some(b"Bearer abc"), None), Some("abc"));
    assert_eq!(token_of(Some(b"bearer  abc "), None), Some("abc"));
    assert_eq!(token_of(Some(b"Basic abc"), Some("token=q")), Some("q"));
    assert_eq!(token_of(None, Some("topics=a&token=q")), Some("q"));
    assert_eq!(token_of(None, Some("topics=a")), None);
    // Hostile bytes: no panic, no token from the header.
    for hostile in [
        &b"Bearer\xC3\xA9xx"[..],
        b"Beare\xC3\xA9 xx",
        b"\xF0\x9F\x92\xA9\xF0\x9F\x92\xA9",
        b"Bearer \xFF\xFE",
        b"",
        b"Bearer",
    ] {
        assert_eq!(token_of(Some(hostile), None), None, "{hostile:?}");
    }
    assert_eq!(token_of(Some(b"Bearer \xC3\xA9"), None), Some("\u{e9}"));
}

/// A JWKS of HMAC secrets, `(kid, secret)`.
fn hmac_jwks(keys: &[(&str, &[u8])]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, secret)| json!({"kty": "oct", "alg": "HS256", "kid": kid, "k": b64.encode(secret)}))
        .collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

fn signed_with(kid: Option<&str>, secret: &[u8]) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    encode(
        &h,
        &json!({"exp": NOW + 60}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

const OTHER: &[u8] = b"another secret of 32 bytes or so";

fn url_settings(url: &str) -> JwtSettings {
    let mut s = settings(Vec::new());
    s.jwks = Some(parse_jwks(url).unwrap());
    s
}

#[test]
fn jwks_values_are_urls_of_http_or_https_else_paths() {
    for url in [
        "http://127.0.0.1:8080/jwks.json",
        "https://auth.example/.well-known/jwks.json",
        "HTTPS://auth.example",
        "http://[::1]:9/k?x=1",
    ] {
        assert_eq!(parse_jwks(url), Ok(JwksSource::Url(url.into())), "{url}");
    }
    assert_eq!(
        parse_jwks("/etc/corecast/jwks.json"),
        Ok(JwksSource::File("/etc/corecast/jwks.json".into()))
    );
    assert_eq!(
        parse_jwks("keys.json"),
        Ok(JwksSource::File("keys.json".into()))
    );
    for bad in [
        "",
        "file:///etc/jwks.json",
        "ftp://host/jwks",
        "http://",
        "https:///jwks.json",
        "http://user:pw@host/jwks",
        "http://host name/jwks",
    ] {
        assert!(parse_jwks(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_jwks_url_not_fetched_yet_refuses_as_unavailable_then_its_keys_verify() {
    let pending = Verifier::load(&url_settings("http://127.0.0.1:9/jwks")).unwrap();
    assert_eq!(pending.jwks_url(), Some("http://127.0.0.1:9/jwks"));
    assert_eq!(pending.fetched_keys(), None);
    assert_eq!(
        pending.verify(&signed_with(Some("a"), SECRET), NOW),
        Err(Refusal::KeysUnavailable)
    );
    assert_eq!(
        pending.verify(&signed_with(None, SECRET), NOW),
        Err(Refusal::KeysUnavailable),
        "no kid: it may be any key of the set"
    );
    assert_eq!(
        pending.verify("not.a.token", NOW),
        Err(Refusal::Invalid),
        "what is no JWT is invalid whatever the keys"
    );

    let v = pending
        .with_jwks(&hmac_jwks(&[("a", SECRET), ("b", OTHER)]))
        .unwrap();
    assert_eq!(v.fetched_keys(), Some(2));
    assert!(v.verify(&signed_with(Some("a"), SECRET), NOW).is_ok());
    assert!(v.verify(&signed_with(Some("b"), OTHER), NOW).is_ok());
    assert!(v.verify(&signed_with(None, OTHER), NOW).is_ok());
    assert_eq!(
        v.verify(&signed_with(Some("c"), SECRET), NOW),
        Err(Refusal::UnknownKey)
    );
    assert_eq!(
        v.verify(&signed_with(Some("a"), OTHER), NOW),
        Err(Refusal::Invalid),
        "a known kid, a wrong signature"
    );

    // A rotation: the new set replaces the old one whole.
    let rotated = v.with_jwks(&hmac_jwks(&[("b", OTHER)])).unwrap();
    assert_eq!(
        rotated.verify(&signed_with(Some("a"), SECRET), NOW),
        Err(Refusal::UnknownKey)
    );
    assert!(rotated.verify(&signed_with(Some("b"), OTHER), NOW).is_ok());
}

#[test]
fn a_fetched_set_that_does_not_pass_the_jwks_file_rules_is_refused_whole() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let v = Verifier::load(&url_settings("https://auth.example/jwks")).unwrap();
    let too_many: Vec<_> = (0..=64).map(|i| format!("k{i}")).collect();
    let too_many: Vec<(&str, &[u8])> = too_many.iter().map(|k| (k.as_str(), SECRET)).collect();
    let mut oversized = hmac_jwks(&[("a", SECRET)]);
    oversized.extend(std::iter::repeat_n(b' ', MAX_KEY_BYTES as usize));
    for (body, why) in [
        (b"<html>not found</html>".to_vec(), "expected value"),
        (
            br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#
                .to_vec(),
            "no \"alg\"",
        ),
        (hmac_jwks(&[("short", b"short")]), "at least 32 bytes"),
        (hmac_jwks(&too_many), "at most 64"),
        (oversized, "over 1048576 bytes"),
        (br#"{"keys": []}"#.to_vec(), "no key"),
    ] {
        let e = v.with_jwks(&body).unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
    }
    // An encryption key beside a signature key is left out, not refused.
    let mixed = json!({"keys": [
        {"kty": "oct", "alg": "HS256", "kid": "sig", "k": b64.encode(SECRET)},
        {"kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc", "n": "AQAB", "e": "AQAB"},
    ]});
    let v = v.with_jwks(mixed.to_string().as_bytes()).unwrap();
    assert_eq!(v.fetched_keys(), Some(1));
    assert!(v.verify(&signed_with(Some("sig"), SECRET), NOW).is_ok());
}

#[test]
fn a_reload_keeps_the_fetched_set_of_the_same_url_only_and_its_rules_apply_to_it() {
    let url = "http://127.0.0.1:9/jwks";
    let fetched = Verifier::load(&url_settings(url))
        .unwrap()
        .with_jwks(&hmac_jwks(&[("a", SECRET)]))
        .unwrap();
    // The same URL, a new audience: the keys stay, the new rule holds.
    let mut s = url_settings(url);
    s.audience = vec!["feeds".into()];
    let reloaded = Verifier::load(&s).unwrap().keeping_fetched(&fetched);
    assert_eq!(reloaded.fetched_keys(), Some(1));
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("a".into());
    let for_feeds = |aud: &str| {
        encode(
            &h,
            &json!({"exp": NOW + 60, "aud": aud}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    };
    assert!(reloaded.verify(&for_feeds("feeds"), NOW).is_ok());
    assert_eq!(
        reloaded.verify(&for_feeds("other"), NOW),
        Err(Refusal::Invalid)
    );
    // Another URL: its keys are not those of the old one.
    let moved = Verifier::load(&url_settings("http://127.0.0.1:9/other"))
        .unwrap()
        .keeping_fetched(&fetched);
    assert_eq!(moved.fetched_keys(), None);
    assert_eq!(
        moved.verify(&signed_with(Some("a"), SECRET), NOW),
        Err(Refusal::KeysUnavailable)
    );
    // A file-based verifier has no URL to take keys for.
    assert!(hs256().with_jwks(&hmac_jwks(&[("a", SECRET)])).is_err());
}

#[test]
fn keys_of_a_file_and_of_a_url_are_used_together() {
    let path = secret_file("hs-and-url", SECRET);
    let mut s = url_settings("http://127.0.0.1:9/jwks");
    s.keys = vec![format!("local@HS256={path}")];
    let v = Verifier::load(&s).unwrap();
    assert!(
        v.verify(&signed_with(Some("local"), SECRET), NOW).is_ok(),
        "the file's key works before the first fetch"
    );
    assert_eq!(
        v.verify(&signed_with(Some("remote"), OTHER), NOW),
        Err(Refusal::KeysUnavailable)
    );
    let v = v.with_jwks(&hmac_jwks(&[("remote", OTHER)])).unwrap();
    assert!(v.verify(&signed_with(Some("local"), SECRET), NOW).is_ok());
    assert!(v.verify(&signed_with(Some("remote"), OTHER), NOW).is_ok());
    // With a key of its own, an empty fetched set is taken.
    assert_eq!(
        v.with_jwks(br#"{"keys": []}"#).unwrap().fetched_keys(),
        Some(0)
    );
}

/// One algorithm's key as the server reads it (a secret, or a public key
/// in PEM) and the key that signs its tokens.
struct AlgKey {
    server_file: Vec<u8>,
    signing: EncodingKey,
}

/// A fresh key for `alg`: random secrets, and key pairs made with rcgen
/// (aws-lc-rs), so no key is committed.
fn fresh_key(alg: Algorithm) -> AlgKey {
    use rcgen::{KeyPair, RsaKeySize};
    let pair = |kp: KeyPair| {
        (
            kp.public_key_pem().into_bytes(),
            kp.serialize_pem().into_bytes(),
        )
    };
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            // Letters: the server trims trailing whitespace from a secret
            // file, so a random byte there (about one key in fifty) would
            // make the token's key differ from the server's.
            let secret: Vec<u8> = (0..64).map(|_| b'a' + rand_byte() % 26).collect();
            AlgKey {
                signing: EncodingKey::from_secret(&secret),
                server_file: secret,
            }
        }
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => {
            let kp = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
            let (public, private) = pair(kp);
            AlgKey {
                server_file: public,
                signing: EncodingKey::from_rsa_pem(&private).unwrap(),
            }
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            let curve = if alg == Algorithm::ES256 {
                &rcgen::PKCS_ECDSA_P256_SHA256
            } else {
                &rcgen::PKCS_ECDSA_P384_SHA384
            };
            let (public, private) = pair(KeyPair::generate_for(curve).unwrap());
            AlgKey {
                server_file: public,
                signing: EncodingKey::from_ec_pem(&private).unwrap(),
            }
        }
        Algorithm::EdDSA => {
            let (public, private) = pair(KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap());
            AlgKey {
                server_file: public,
                signing: EncodingKey::from_ed_pem(&private).unwrap(),
            }
        }
    }
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) as u8
}

#[test]
fn every_algorithm_takes_its_own_tokens_and_refuses_expired_early_foreign_wrong_key_none_and_confused_ones()
 {
    let b64 =
        |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    for (i, alg) in super::keys::ALGORITHMS.iter().copied().enumerate() {
        let key = fresh_key(alg);
        let other = fresh_key(alg);
        let path = secret_file(&format!("alg-{i}"), &key.server_file);
        let mut s = settings(vec![format!("{alg:?}={path}")]);
        s.audience = vec!["feeds".into()];
        let v = Verifier::load(&s).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        let sign = |claims: serde_json::Value, k: &EncodingKey| {
            encode(&Header::new(alg), &claims, k).unwrap()
        };
        let good = json!({"sub": "a", "exp": NOW + 60, "aud": "feeds",
                          "corecast": {"subscribe": ["t"]}});
        let g = v.verify(&sign(good.clone(), &key.signing), NOW);
        assert!(
            g.as_ref().is_ok_and(|g| g.may_subscribe("t")),
            "{alg:?}: valid: {g:?}"
        );
        let expired = json!({"exp": NOW - 31, "aud": "feeds"});
        assert_eq!(
            v.verify(&sign(expired, &key.signing), NOW),
            Err(Refusal::Expired),
            "{alg:?}"
        );
        let early = json!({"exp": NOW + 600, "nbf": NOW + 100, "aud": "feeds"});
        assert_eq!(
            v.verify(&sign(early, &key.signing), NOW),
            Err(Refusal::NotYetValid),
            "{alg:?}"
        );
        let foreign = json!({"exp": NOW + 60, "aud": "elsewhere"});
        assert_eq!(
            v.verify(&sign(foreign, &key.signing), NOW),
            Err(Refusal::Invalid),
            "{alg:?} audience"
        );
        assert_eq!(
            v.verify(&sign(good.clone(), &other.signing), NOW),
            Err(Refusal::Invalid),
            "{alg:?} wrong key"
        );
        // `alg: none`, unsigned.
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good.to_string().as_bytes())
        );
        assert_eq!(v.verify(&none, NOW), Err(Refusal::Invalid), "{alg:?} none");
        // Algorithm confusion: the server's own key file (a public key for
        // the asymmetric ones) used as an HMAC secret, under each HS label.
        for hs in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            if hs == alg {
                continue;
            }
            let t = encode(
                &Header::new(hs),
                &good,
                &EncodingKey::from_secret(&key.server_file),
            )
            .unwrap();
            assert_eq!(
                v.verify(&t, NOW),
                Err(Refusal::Invalid),
                "{alg:?} as {hs:?}"
            );
        }
        // The right signature under another label of the same family.
        let relabelled = {
            let t = sign(good.clone(), &key.signing);
            let (_, rest) = t.split_once('.').unwrap();
            let other_alg = if alg == Algorithm::ES256 {
                "ES384"
            } else {
                "ES256"
            };
            format!(
                "{}.{rest}",
                b64(format!(r#"{{"alg":"{other_alg}","typ":"JWT"}}"#).as_bytes())
            )
        };
        assert_eq!(
            v.verify(&relabelled, NOW),
            Err(Refusal::Invalid),
            "{alg:?} relabelled"
        );
    }
}
