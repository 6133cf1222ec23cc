//! Where the keys come from: `--jwt-key [KID@]ALG=FILE` specs, PEM and
//! secret files, and JSON Web Key Sets, each key with its algorithm fixed
//! when it is read.

use super::JwtSettings;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// The largest key or JWKS file read.
const MAX_KEY_FILE: u64 = 1024 * 1024;
/// Most keys in a JWKS.
const MAX_KEYS: usize = 64;

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
pub(super) fn validation(settings: &JwtSettings, alg: Algorithm) -> Validation {
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

/// Reads the keys `settings` names, each with its id and algorithm; a key
/// that cannot be read or used fails the whole load, naming its file.
pub(super) fn read(
    settings: &JwtSettings,
) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
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
        let key =
            decoding_key(alg, &bytes).map_err(|e| format!("--jwt-key {path}: {e} ({alg:?})"))?;
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
    Ok(keys)
}
