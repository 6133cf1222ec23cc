//! Where the keys come from: `--jwt-key [KID@]ALG=FILE` specs, PEM and
//! secret files, and JSON Web Key Sets (a file, or the body a JWKS URL
//! answered), each key with its algorithm fixed when it is read.

use super::JwtSettings;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::fmt;
use std::path::PathBuf;

/// The largest key file, JWKS file or JWKS response body read, in bytes.
pub const MAX_KEY_BYTES: u64 = 1024 * 1024;
/// Most keys in a JWKS.
const MAX_KEYS: usize = 64;

/// Where the keys of `--jwks` come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A file, read at start and at each reload.
    File(PathBuf),
    /// An `http://` or `https://` URL, fetched by the server's JWKS
    /// fetcher thread (at start, periodically, when a token names a key
    /// the set lacks, and at each reload), never by a worker.
    Url(String),
}

impl JwksSource {
    /// The URL, when the keys come from one.
    pub fn url(&self) -> Option<&str> {
        match self {
            Self::Url(u) => Some(u),
            Self::File(_) => None,
        }
    }
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

/// Parses a `--jwks` value: an `http://` or `https://` URL (with a host,
/// no user name or password in it), else a file path. Another scheme
/// (`file://`, `ftp://`) is refused rather than taken for a path.
pub fn parse_jwks(value: &str) -> Result<JwksSource, String> {
    let Some((scheme, _)) = value.split_once("://") else {
        if value.is_empty() {
            return Err("empty --jwks".into());
        }
        return Ok(JwksSource::File(value.into()));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "{value:?}: a JWKS URL is http:// or https:// (a file is a plain path)"
        ));
    }
    let uri: ureq::http::Uri = value.parse().map_err(|e| format!("{value:?}: {e}"))?;
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| format!("{value:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{value:?}: no user or password in a JWKS URL (it is logged)"
        ));
    }
    Ok(JwksSource::Url(value.to_string()))
}

/// One key: the id tokens name it by, the one algorithm it verifies, and
/// the key itself.
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Algorithm,
    pub(super) key: DecodingKey,
}

/// Every algorithm a key may have, in [`Validations`]' order.
pub(super) const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What `jsonwebtoken` checks for a key of each algorithm, made once per
/// load from the settings, so that keys themselves depend on nothing but
/// their bytes (a fetched set is kept across a reload that changes the
/// audience).
pub(super) struct Validations([Validation; ALGORITHMS.len()]);

impl Validations {
    pub(super) fn new(settings: &JwtSettings) -> Self {
        Self(ALGORITHMS.map(|alg| validation(settings, alg)))
    }

    /// The checks for a key of `alg`.
    pub(super) fn get(&self, alg: Algorithm) -> &Validation {
        let i = ALGORITHMS
            .iter()
            .position(|&a| a == alg)
            .expect("every algorithm is listed");
        &self.0[i]
    }
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
///
/// [`Verifier::verify`]: super::Verifier::verify
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

/// Reads the keys of `--jwt-key` and of a JWKS file (not a URL: the
/// fetcher's); a key that cannot be read or used fails the whole load,
/// naming its file.
pub(super) fn read_local(settings: &JwtSettings) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for spec in &settings.keys {
        let (kid, alg, path) = split_key_spec(spec)?;
        let bytes = crate::server::config::read_regular_file(path.as_ref(), MAX_KEY_BYTES)
            .map_err(|e| format!("--jwt-key {path}: {e}"))?;
        if is_hmac(alg) && bytes.trim_ascii_end().len() < MIN_HMAC_BYTES {
            return Err(format!(
                "--jwt-key {path}: an HMAC secret needs at least {MIN_HMAC_BYTES} bytes"
            ));
        }
        let key =
            decoding_key(alg, &bytes).map_err(|e| format!("--jwt-key {path}: {e} ({alg:?})"))?;
        keys.push(Key {
            kid: kid.map(str::to_string),
            alg,
            key,
        });
    }
    if let Some(JwksSource::File(path)) = &settings.jwks {
        let bytes = crate::server::config::read_regular_file(path, MAX_KEY_BYTES)
            .map_err(|e| format!("--jwks {}: {e}", path.display()))?;
        keys.extend(jwks(&bytes).map_err(|e| format!("--jwks {}: {e}", path.display()))?);
    }
    Ok(keys)
}

/// The shortest HMAC secret taken, in bytes: the output size of HS256,
/// below which a secret is weaker than the MAC (RFC 7518, 3.2).
const MIN_HMAC_BYTES: usize = 32;

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The keys of a JSON Web Key Set (a file's bytes or a fetched body), all
/// or nothing: at most [`MAX_KEY_BYTES`] and [`MAX_KEYS`] keys; every
/// signature key names its `alg`; an HMAC secret holds at least
/// [`MIN_HMAC_BYTES`]. A key marked `"use": "enc"` is for encryption, not
/// signatures, and is left out (identity providers publish both in one
/// set).
pub(super) fn jwks(bytes: &[u8]) -> Result<Vec<Key>, String> {
    if bytes.len() as u64 > MAX_KEY_BYTES {
        return Err(format!("over {MAX_KEY_BYTES} bytes"));
    }
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if set.keys.len() > MAX_KEYS {
        return Err(format!("{} keys, at most {MAX_KEYS}", set.keys.len()));
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        if jwk.common.public_key_use == Some(jsonwebtoken::jwk::PublicKeyUse::Encryption) {
            continue;
        }
        let kid = jwk.common.key_id.clone();
        let name = kid.as_deref().unwrap_or("(no kid)");
        let alg = jwk
            .common
            .key_algorithm
            .ok_or_else(|| format!("key {name} has no \"alg\" (each key's algorithm is fixed)"))?;
        let alg = algorithm(&alg.to_string()).map_err(|e| format!("key {name}: {e}"))?;
        if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(oct) = &jwk.algorithm {
            use base64::Engine;
            let len = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(oct.value.trim_end_matches('='))
                .map_or(0, |k| k.len());
            if len < MIN_HMAC_BYTES {
                return Err(format!(
                    "key {name}: an HMAC secret needs at least {MIN_HMAC_BYTES} bytes"
                ));
            }
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
        keys.push(Key { kid, alg, key });
    }
    Ok(keys)
}
