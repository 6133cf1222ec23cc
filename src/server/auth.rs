//! Who may subscribe and publish: JSON Web Tokens, checked at the upgrade
//! (and at `POST`/`DELETE /publish`) against the keys of `--jwt-key` and
//! `--jwks`. Sans-IO: the keys are read once (start, reload); a check
//! takes the token and the wall-clock time from its caller and answers a
//! [`Grant`] or a [`Refusal`].
//!
//! - **Keys.** Each key verifies one algorithm, fixed when it is loaded
//!   (`--jwt-key [KID@]ALG=FILE`, or a JWKS key's own `alg`): a token whose
//!   header names another algorithm is not verified by it, so the header
//!   alone never chooses (no `none`, no HMAC with a public key). A token
//!   with a `kid` is checked by the keys of that id only; without one, by
//!   every key of its algorithm.
//! - **Claims.** `exp` is required; `exp`, `nbf` and `iat` are compared
//!   with the time given, with `--jwt-leeway` of slack; `aud` and `iss`,
//!   when `--jwt-audience`/`--jwt-issuer` are set, must name one of them.
//! - **Rights** (`"corecast": {"subscribe": [...], "publish": [...]}`):
//!   topics or patterns in the wildcard syntax (`prices.>`), each with
//!   `{sub}` standing for the token's `sub` (a single topic token, or the
//!   token is refused). A right covers what it contains
//!   ([`pattern::covers`]): `prices.>` lets a client subscribe to
//!   `prices.*.EUR`; `prices.*.EUR` does not let it subscribe to
//!   `prices.>`.

use crate::pubsub::{pattern, topic};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The largest key or JWKS file read.
const MAX_KEY_FILE: u64 = 1024 * 1024;
/// Most rights of one kind a token may carry (each check is linear in them).
pub const MAX_RIGHTS: usize = 64;
/// The longest token looked at (a request head is at most 32 KiB anyway).
const MAX_TOKEN: usize = 8 * 1024;
/// Most keys in a JWKS.
const MAX_KEYS: usize = 64;
/// Most keys a token without a `kid` is tried against: each costs a
/// signature check, before anything is known about the client.
pub const MAX_KEYS_WITHOUT_KID: usize = 4;

/// Why a request was refused for its token (401), or for a right its
/// token lacks (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, where one is needed.
    Missing,
    /// Not a JWT, a bad signature, an unknown key or algorithm, a wrong
    /// audience or issuer, no `exp`, a malformed right.
    Invalid,
    /// Past its `exp` (and the leeway).
    Expired,
    /// Before its `nbf` (less the leeway).
    NotYetValid,
    /// A valid token without the right asked for.
    Forbidden,
}

impl Refusal {
    /// Every reason, in label order (metrics iterate it).
    pub const ALL: [Refusal; 5] = [
        Self::Missing,
        Self::Invalid,
        Self::Expired,
        Self::NotYetValid,
        Self::Forbidden,
    ];

    /// Position in [`Refusal::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Label of `corecast_auth_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Forbidden => "forbidden",
        }
    }

    /// The reason line of the refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "token required (Authorization: Bearer, or ?token=)",
            Self::Invalid => "token invalid",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::Forbidden => "the token grants no right to this topic",
        }
    }

    /// `403` for a right missing, `401` for the token itself.
    pub fn forbidden(self) -> bool {
        self == Self::Forbidden
    }
}

/// What the flags say about tokens (`--jwt-key`, `--jwks`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    /// `[KID@]ALG=FILE`, as given.
    pub keys: Vec<String>,
    pub jwks: Option<PathBuf>,
    pub audience: Vec<String>,
    pub issuer: Vec<String>,
    pub leeway: Duration,
    /// Subscribers without a token may subscribe (publishing always
    /// needs a token, or `--publish-token`).
    pub anonymous_subscribe: bool,
}

/// The default `--jwt-leeway`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// What a valid token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `sub`, if the token names one.
    pub sub: Option<Box<str>>,
    /// `exp`, Unix seconds.
    pub exp: u64,
    subscribe: Vec<Box<str>>,
    publish: Vec<Box<str>>,
}

impl Grant {
    /// May subscribe to `name` (a topic or a pattern)?
    pub fn may_subscribe(&self, name: &str) -> bool {
        self.subscribe.iter().any(|r| pattern::covers(r, name))
    }

    /// May publish to (or delete the history of) `topic`?
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|r| pattern::covers(r, topic))
    }
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// What a token must pass besides the times: its algorithm, and the
    /// audience and issuer when set (made once, at load).
    validation: Validation,
}

/// The keys in force and the claim rules.
pub struct Verifier {
    keys: Vec<Key>,
    leeway: u64,
    anonymous_subscribe: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("leeway", &self.leeway)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    #[serde(default)]
    corecast: Rights,
}

#[derive(Deserialize, Default)]
struct Rights {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Parses an algorithm name (`HS256`, `RS384`, `ES256`, `EdDSA`, …).
fn algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>().map_err(|_| {
        format!(
            "unknown algorithm {name:?}: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
        )
    })
}

/// Checks one `--jwt-key` value, `[KID@]ALG=FILE` (the flag's parser; the
/// file is read at start and at each reload).
pub fn parse_key_spec(spec: &str) -> Result<String, String> {
    split_key_spec(spec).map(|_| spec.to_string())
}

fn split_key_spec(spec: &str) -> Result<(Option<&str>, Algorithm, &str), String> {
    let (head, path) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: expected [KID@]ALG=FILE"))?;
    let (kid, alg) = match head.split_once('@') {
        Some((kid, alg)) if !kid.is_empty() => (Some(kid), alg),
        Some(_) => return Err(format!("{spec:?}: empty key id before @")),
        None => (None, head),
    };
    if path.is_empty() {
        return Err(format!("{spec:?}: no file after ="));
    }
    Ok((kid, algorithm(alg)?, path))
}

/// The checks `jsonwebtoken` makes for a key of `alg`: the algorithm, and
/// `aud` and `iss` when set; the times are [`Verifier::verify`]'s, against
/// the caller's clock.
fn validation(settings: &JwtSettings, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    let mut required = Vec::new();
    if settings.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&settings.audience);
        required.push("aud");
    }
    if !settings.issuer.is_empty() {
        v.set_issuer(&settings.issuer);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

fn decoding_key(alg: Algorithm, bytes: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
    use Algorithm::*;
    match alg {
        // The file holds the shared secret itself (a trailing newline is
        // not part of it).
        HS256 | HS384 | HS512 => Ok(DecodingKey::from_secret(bytes.trim_ascii_end())),
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_pem(bytes),
        ES256 | ES384 => DecodingKey::from_ec_pem(bytes),
        EdDSA => DecodingKey::from_ed_pem(bytes),
    }
}

impl Verifier {
    /// Reads the keys `settings` names; a key that cannot be read or used
    /// fails the whole load, naming its file.
    pub fn load(settings: &JwtSettings) -> Result<Self, String> {
        let mut keys = Vec::new();
        for spec in &settings.keys {
            let (kid, alg, path) = split_key_spec(spec)?;
            let bytes = crate::server::config::read_regular_file(path.as_ref(), MAX_KEY_FILE)
                .map_err(|e| format!("--jwt-key {path}: {e}"))?;
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
                && bytes.trim_ascii_end().len() < 32
            {
                return Err(format!(
                    "--jwt-key {path}: an HMAC secret needs at least 32 bytes"
                ));
            }
            let key = decoding_key(alg, &bytes)
                .map_err(|e| format!("--jwt-key {path}: {e} ({alg:?})"))?;
            keys.push((kid.map(str::to_string), alg, key));
        }
        if let Some(path) = &settings.jwks {
            let bytes = crate::server::config::read_regular_file(path, MAX_KEY_FILE)
                .map_err(|e| format!("--jwks {}: {e}", path.display()))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&bytes)
                .map_err(|e| format!("--jwks {}: {e}", path.display()))?;
            if set.keys.len() > MAX_KEYS {
                return Err(format!(
                    "--jwks {}: {} keys, at most {MAX_KEYS}",
                    path.display(),
                    set.keys.len()
                ));
            }
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone();
                let name = kid.as_deref().unwrap_or("(no kid)");
                let alg = jwk.common.key_algorithm.ok_or_else(|| {
                    format!(
                        "--jwks {}: key {name} has no \"alg\" (each key's algorithm is fixed)",
                        path.display()
                    )
                })?;
                let alg = algorithm(&alg.to_string())
                    .map_err(|e| format!("--jwks {}: key {name}: {e}", path.display()))?;
                if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(oct) = &jwk.algorithm {
                    use base64::Engine;
                    let len = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(oct.value.trim_end_matches('='))
                        .map_or(0, |k| k.len());
                    if len < 32 {
                        return Err(format!(
                            "--jwks {}: key {name}: an HMAC secret needs at least 32 bytes",
                            path.display()
                        ));
                    }
                }
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("--jwks {}: key {name}: {e}", path.display()))?;
                keys.push((kid, alg, key));
            }
        }
        if keys.is_empty() {
            return Err("--jwks: no key".into());
        }
        let keys = keys
            .into_iter()
            .map(|(kid, alg, key)| Key {
                kid,
                alg,
                key,
                validation: validation(settings, alg),
            })
            .collect();
        Ok(Self {
            keys,
            leeway: settings.leeway.as_secs(),
            anonymous_subscribe: settings.anonymous_subscribe,
        })
    }

    /// Whether a subscriber without a token may subscribe.
    pub fn anonymous_subscribe(&self) -> bool {
        self.anonymous_subscribe
    }

    /// The slack on token times, seconds.
    pub fn leeway_s(&self) -> u64 {
        self.leeway
    }

    /// Checks `token` at `now` (Unix seconds): its signature by a key of
    /// its algorithm, its times and claims, and its rights.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, Refusal> {
        if token.len() > MAX_TOKEN {
            return Err(Refusal::Invalid);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid)?;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg
                && match &header.kid {
                    Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
                    None => true,
                }
        });
        let mut claims = None;
        // Keys of one id are few by construction; without an id, at most
        // a handful are tried (past that, tokens must name their key).
        for k in candidates.take(MAX_KEYS_WITHOUT_KID) {
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                claims = Some(data.claims);
                break;
            }
        }
        let claims = claims.ok_or(Refusal::Invalid)?;
        let leeway = self.leeway as f64;
        let now_f = now as f64;
        let exp = claims.exp.ok_or(Refusal::Invalid)?;
        if !exp.is_finite() || now_f > exp + leeway {
            return Err(Refusal::Expired);
        }
        if let Some(nbf) = claims.nbf
            && (!nbf.is_finite() || now_f + leeway < nbf)
        {
            return Err(Refusal::NotYetValid);
        }
        if let Some(iat) = claims.iat
            && (!iat.is_finite() || iat > now_f + leeway)
        {
            return Err(Refusal::Invalid);
        }
        let sub = claims.sub;
        let rights = |list: Vec<String>| -> Result<Vec<Box<str>>, Refusal> {
            if list.len() > MAX_RIGHTS {
                return Err(Refusal::Invalid);
            }
            list.into_iter()
                .map(|r| expand(&r, sub.as_deref()).ok_or(Refusal::Invalid))
                .collect()
        };
        let subscribe = rights(claims.corecast.subscribe)?;
        let publish = rights(claims.corecast.publish)?;
        Ok(Grant {
            sub: sub.map(String::into_boxed_str),
            exp: exp.max(0.0).min(u64::MAX as f64) as u64,
            subscribe,
            publish,
        })
    }
}

/// A right with `{sub}` replaced, if it is a well-formed topic or pattern
/// then; `None` otherwise (also when it names `{sub}` and `sub` is not a
/// single topic token: no `.`, `*` or `>` may come in through it).
fn expand(right: &str, sub: Option<&str>) -> Option<Box<str>> {
    let name = if right.contains("{sub}") {
        let sub = sub.filter(|s| {
            !s.is_empty()
                && !s.contains(['.', '*', '>'])
                && topic::validate(s, topic::DEFAULT_MAX_TOPIC_LEN).is_ok()
        })?;
        right.replace("{sub}", sub)
    } else {
        right.to_string()
    };
    topic::validate_subscription(&name, usize::MAX).ok()?;
    Some(name.into_boxed_str())
}

/// The token a request carries: `Authorization: Bearer TOKEN` (scheme
/// case-insensitive), else `?token=TOKEN`.
pub fn token_of<'r>(authorization: Option<&'r [u8]>, query: Option<&'r str>) -> Option<&'r str> {
    // Bytes first: a multi-byte character across the scheme's end must
    // not be sliced as a string.
    if let Some(value) = authorization
        && let Some((scheme, rest)) = value.trim_ascii().split_at_checked(7)
        && scheme.eq_ignore_ascii_case(b"bearer ")
        && let Ok(token) = std::str::from_utf8(rest.trim_ascii_start())
    {
        return Some(token);
    }
    topic::query_param(query, "token")
}

#[cfg(test)]
mod tests {
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
        let missing =
            Verifier::load(&settings(vec!["RS256=/nonexistent/key.pem".into()])).unwrap_err();
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
}
