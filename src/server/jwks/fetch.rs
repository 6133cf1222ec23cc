//! One `GET` of a JWKS URL, bounded in time and bytes: the only HTTP
//! client in the server, run on the fetcher thread (never a worker).
//!
//! - [`FETCH_TIMEOUT`] for the whole exchange: name resolution,
//!   connection, TLS handshake, request, head and body.
//! - At most [`MAX_HEAD_BYTES`] of response head and
//!   [`MAX_KEY_BYTES`] of body (chunked or not); a longer one fails the
//!   fetch.
//! - No redirect is followed (a `3xx` fails like any answer but `200`),
//!   no proxy from the environment is used, no compression asked for.
//! - `https://` trusts the system's roots, read at each fetch
//!   (`SSL_CERT_FILE` or `SSL_CERT_DIR` name others), through rustls on
//!   the aws-lc-rs provider TLS already uses.

use crate::server::auth::MAX_KEY_BYTES;
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

/// The longest a fetch may take, all included: a JWKS is a few KiB from a
/// host meant to answer quickly, and a hung host must not hold the
/// fetcher (a reload's fetch waits behind it).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response head read, in bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The body `url` answers with `200`, or why there is none.
pub fn get(url: &str) -> Result<Vec<u8>, String> {
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .root_certs(roots(url)?)
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .max_redirects(0)
        .http_status_as_error(false)
        .proxy(None)
        .max_response_header_size(MAX_HEAD_BYTES)
        .user_agent(concat!("corecast/", env!("CARGO_PKG_VERSION")))
        .accept("application/jwk-set+json, application/json")
        .tls_config(tls)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let status = response.status();
    if status != ureq::http::StatusCode::OK {
        return Err(format!(
            "answered {status} (only 200 is taken, no redirect followed)"
        ));
    }
    response
        .body_mut()
        .with_config()
        .limit(MAX_KEY_BYTES)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// The roots `url` is checked against: the system's for `https://`, none
/// for `http://` (no TLS).
fn roots(url: &str) -> Result<RootCerts, String> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    if !https {
        return Ok(RootCerts::Specific(Arc::new(Vec::new())));
    }
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "no trusted root certificates (set SSL_CERT_FILE): {}",
            why.join("; ")
        ));
    }
    Ok(RootCerts::Specific(Arc::new(
        found
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    )))
}
