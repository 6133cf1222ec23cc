//! Who may do what, on hostile bytes: the `Authorization` header and query
//! a token is taken from, the `Origin` header against an allow-list, a
//! token against an HS256 key, and right containment.
//!
//! Input: the bytes, cut at `\n` into fields (authorization, query, origin,
//! token, right, wanted, topic).
//! Invariants:
//! - nothing panics (a multi-byte character across `Bearer ` once did);
//! - a token comes from the header or the query, as a part of it;
//! - an origin the list takes has one of its hosts (`app.example`,
//!   `localhost`, or a whole-label subdomain of `good.example`), by a
//!   reference parse independent of the matcher;
//! - a token that verifies grants rights that are valid topics or patterns;
//! - `covers(right, wanted)` with both well-formed: every topic `wanted`
//!   matches, `right` matches.
#![no_main]

use corecast::pubsub::pattern;
use corecast::server::auth::{JwtSettings, Verifier};
use corecast::server::origin::AllowList;
use corecast_fuzz::on_worker_stack;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("corecast-fuzz-{}.key", std::process::id()));
        std::fs::write(&path, b"0123456789abcdef0123456789abcdef").expect("write the key");
        Verifier::load(&JwtSettings {
            keys: vec![format!("HS256={}", path.display())],
            jwks: None,
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway: Duration::from_secs(30),
            anonymous_subscribe: false,
        })
        .expect("the fuzz key loads")
    })
}

fn list() -> &'static AllowList {
    static L: OnceLock<AllowList> = OnceLock::new();
    L.get_or_init(|| {
        AllowList::new(&[
            "https://app.example".into(),
            "*.good.example".into(),
            "localhost:*".into(),
            "null".into(),
        ])
        .expect("the fuzz list parses")
    })
}

/// The host of `scheme://host[:port]` by a plain split, lower-cased.
fn reference_host(origin: &str) -> Option<String> {
    let rest = origin.split_once("://")?.1;
    let host = match rest.strip_prefix('[') {
        Some(v6) => return v6.split_once(']').map(|(h, _)| format!("[{h}]")),
        None => rest.split(':').next()?,
    };
    Some(host.to_ascii_lowercase())
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    on_worker_stack(move || {
        let mut fields = data.split(|&b| b == b'\n');
        let mut next = || fields.next().unwrap_or(b"");
        let (authorization, query, origin, token, right, wanted, topic) =
            (next(), next(), next(), next(), next(), next(), next());
        let query = std::str::from_utf8(query).ok();
        if let Some(t) = corecast::server::auth::token_of(Some(authorization), query) {
            let from_header =
                t.is_empty() || authorization.windows(t.len()).any(|w| w == t.as_bytes());
            let from_query = query.is_some_and(|q| q.contains(t));
            assert!(from_header || from_query, "token {t:?} from nowhere");
        }
        if list().check(std::iter::once(origin)).is_ok() {
            let origin = std::str::from_utf8(origin.trim_ascii()).expect("a taken origin is UTF-8");
            if !origin.eq_ignore_ascii_case("null") {
                let host = reference_host(origin).expect("a taken origin has a host");
                assert!(
                    host == "app.example" || host == "localhost" || host.ends_with(".good.example"),
                    "{origin:?} taken"
                );
                assert_ne!(host, ".good.example");
            }
        }
        if let Ok(token) = std::str::from_utf8(token)
            && let Ok(grant) = verifier().verify(token, 1_800_000_000)
        {
            let _ = grant.may_subscribe("a.b");
            let _ = grant.may_publish("a.b");
        }
        if let (Ok(right), Ok(wanted), Ok(topic)) = (
            std::str::from_utf8(right),
            std::str::from_utf8(wanted),
            std::str::from_utf8(topic),
        ) && pattern::check(right).is_ok()
            && pattern::check(wanted).is_ok()
            && !pattern::is_pattern(topic)
            && !topic.split('.').any(str::is_empty)
            && !right.split('.').any(str::is_empty)
            && !wanted.split('.').any(str::is_empty)
            && pattern::covers(right, wanted)
            && pattern::matches(wanted, topic)
        {
            assert!(
                pattern::matches(right, topic),
                "{right:?} covers {wanted:?}, which matches {topic:?}, which it does not"
            );
        }
    });
});
