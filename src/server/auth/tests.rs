//! The token checks, on keys made at test time.

use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
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
    assert_eq!(v.verify(&t, NOW), Err(Refusal::Invalid));
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
    s.jwks = Some(jwks.into());
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
    s.jwks = Some(loose.clone().into());
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
