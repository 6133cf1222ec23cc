//! Who may subscribe and publish: JSON Web Tokens, checked at the upgrade
//! (and at `POST`/`DELETE /publish`) against the keys of `--jwt-key` and
//! `--jwks`. Sans-IO: the key files are read once (start, reload), a
//! JWKS URL's body is handed in by the fetcher ([`Verifier::with_jwks`]);
//! a check takes the token and the wall-clock time from its caller and
//! answers a [`Grant`] or a [`Refusal`].
//!
//! - **Keys.** Each key verifies one algorithm, fixed when it is loaded
//!   (`--jwt-key [KID@]ALG=FILE`, or a JWKS key's own `alg`): a token whose
//!   header names another algorithm is not verified by it, so the header
//!   alone never chooses (no `none`, no HMAC with a public key). A token
//!   with a `kid` is checked by the keys of that id only; without one, by
//!   every key of its algorithm. A `kid` no key has is refused as
//!   [`Refusal::UnknownKey`] (the caller may ask for the set again); while
//!   a JWKS URL has not answered yet, a token it may hold the key of is
//!   refused as [`Refusal::KeysUnavailable`].
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

mod keys;
#[cfg(test)]
mod tests;

use crate::pubsub::{pattern, topic};
pub use keys::{JwksSource, MAX_KEY_BYTES, parse_jwks, parse_key_spec};
use keys::{Key, Validations};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Most rights of one kind a token may carry (each check is linear in them).
pub const MAX_RIGHTS: usize = 64;
/// The longest token looked at (a request head is at most 32 KiB anyway).
const MAX_TOKEN: usize = 8 * 1024;
/// Most keys a token without a `kid` is tried against: each costs a
/// signature check, before anything is known about the client.
pub const MAX_KEYS_WITHOUT_KID: usize = 4;

/// Why a request was refused for its token (401), or for a right its
/// token lacks (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, where one is needed.
    Missing,
    /// Not a JWT, a bad signature, an algorithm no key has, a wrong
    /// audience or issuer, no `exp`, a malformed right.
    Invalid,
    /// Past its `exp` (and the leeway).
    Expired,
    /// Before its `nbf` (less the leeway).
    NotYetValid,
    /// A valid token without the right asked for.
    Forbidden,
    /// A `kid` no key in force has (with a JWKS URL, the fetcher is asked
    /// for the set again).
    UnknownKey,
    /// The keys of the JWKS URL have not been fetched yet (unreachable
    /// since the start, or since a reload named another URL), and the
    /// token may be signed by one of them.
    KeysUnavailable,
}

impl Refusal {
    /// Every reason, in label order (metrics iterate it).
    pub const ALL: [Refusal; 7] = [
        Self::Missing,
        Self::Invalid,
        Self::Expired,
        Self::NotYetValid,
        Self::Forbidden,
        Self::UnknownKey,
        Self::KeysUnavailable,
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
            Self::UnknownKey => "unknown_key",
            Self::KeysUnavailable => "keys_unavailable",
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
            Self::UnknownKey => "token key unknown (no key has its kid)",
            Self::KeysUnavailable => "token keys not loaded yet (the JWKS URL has not answered)",
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
    /// `--jwks`: a file or a URL; its keys are used beside those of
    /// `keys`.
    pub jwks: Option<JwksSource>,
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

/// The keys in force and the claim rules.
pub struct Verifier {
    /// The keys of `--jwt-key` and of a JWKS file.
    local: Arc<[Key]>,
    /// The keys of a JWKS URL.
    remote: Remote,
    /// What a token must pass besides the times, by algorithm.
    validations: Arc<Validations>,
    leeway: u64,
    anonymous_subscribe: bool,
}

/// The keys of a JWKS URL, as far as the fetcher has got.
enum Remote {
    /// `--jwks` is not a URL.
    None,
    /// Not fetched yet.
    Pending(Box<str>),
    /// The set last fetched from the URL: a fetch that fails keeps it.
    Fetched(Box<str>, Arc<[Key]>),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.local.len())
            .field("fetched", &self.fetched_keys())
            .field("leeway", &self.leeway)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Only its type is checked here (a string, RFC 7519 §4.1.1; its value
    /// is `jsonwebtoken`'s to compare, which also takes a list): an `iss`
    /// of another type fails the decoding (outside probe: `["iss1"]` was
    /// taken).
    #[allow(dead_code)]
    iss: Option<String>,
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

impl Verifier {
    /// Reads the key files `settings` names; a key that cannot be read or
    /// used fails the whole load, naming its file. A JWKS URL is not
    /// fetched here: its keys are pending until [`Self::with_jwks`] (or
    /// [`Self::keeping_fetched`]) hands them in; with a URL, no other key
    /// is needed.
    pub fn load(settings: &JwtSettings) -> Result<Self, String> {
        let local = keys::read_local(settings)?;
        let remote = match settings.jwks.as_ref().and_then(JwksSource::url) {
            Some(url) => Remote::Pending(url.into()),
            None if local.is_empty() => return Err("--jwks: no key".into()),
            None => Remote::None,
        };
        Ok(Self {
            local: local.into(),
            remote,
            validations: Arc::new(Validations::new(settings)),
            leeway: settings.leeway.as_secs(),
            anonymous_subscribe: settings.anonymous_subscribe,
        })
    }

    /// The JWKS URL whose keys this verifier uses, if `--jwks` is one.
    pub fn jwks_url(&self) -> Option<&str> {
        match &self.remote {
            Remote::None => None,
            Remote::Pending(url) | Remote::Fetched(url, _) => Some(url),
        }
    }

    /// How many keys came from the JWKS URL; `None` before the first
    /// fetch (and without a URL).
    pub fn fetched_keys(&self) -> Option<usize> {
        match &self.remote {
            Remote::Fetched(_, keys) => Some(keys.len()),
            _ => None,
        }
    }

    /// This verifier with the keys of `body`, the JWKS its URL answered,
    /// in place of those fetched before; all or nothing, with the checks
    /// of a JWKS file (`keys::jwks`); an empty set is refused when
    /// there is no other key.
    pub fn with_jwks(&self, body: &[u8]) -> Result<Self, String> {
        let Some(url) = self.jwks_url() else {
            return Err("--jwks is not a URL".into());
        };
        let fetched = keys::jwks(body)?;
        if fetched.is_empty() && self.local.is_empty() {
            return Err("no key".into());
        }
        Ok(Self {
            local: Arc::clone(&self.local),
            remote: Remote::Fetched(url.into(), fetched.into()),
            validations: Arc::clone(&self.validations),
            leeway: self.leeway,
            anonymous_subscribe: self.anonymous_subscribe,
        })
    }

    /// This verifier, just loaded, with the keys `old` fetched when both
    /// name the same URL: a reload reads the files again and asks for a
    /// fetch, but does not drop the set in force meanwhile. A reload that
    /// names another URL starts without its keys.
    pub fn keeping_fetched(mut self, old: &Verifier) -> Self {
        if let (Remote::Pending(url), Remote::Fetched(old_url, keys)) = (&self.remote, &old.remote)
            && url == old_url
        {
            self.remote = Remote::Fetched(url.clone(), Arc::clone(keys));
        }
        self
    }

    /// Every key in force: the files', then the URL's.
    fn keys(&self) -> impl Iterator<Item = &Key> {
        let fetched: &[Key] = match &self.remote {
            Remote::Fetched(_, keys) => keys,
            _ => &[],
        };
        self.local.iter().chain(fetched)
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
        let pending = matches!(self.remote, Remote::Pending(_));
        if let Some(kid) = &header.kid
            && !self.keys().any(|k| k.kid.as_deref() == Some(kid.as_str()))
        {
            return Err(if pending {
                Refusal::KeysUnavailable
            } else {
                Refusal::UnknownKey
            });
        }
        let candidates = self.keys().filter(|k| {
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
            let validation = self.validations.get(k.alg);
            if let Ok(data) = jsonwebtoken::decode::<Claims>(token, &k.key, validation) {
                claims = Some(data.claims);
                break;
            }
        }
        let claims = claims.ok_or(if pending && header.kid.is_none() {
            // It may be signed by a key of the set not fetched yet.
            Refusal::KeysUnavailable
        } else {
            Refusal::Invalid
        })?;
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
