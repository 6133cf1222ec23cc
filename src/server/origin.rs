//! Which web pages may use the server through a visitor's browser: the
//! allow-list of `--allowed-origin` (cross-site WebSocket hijacking, and
//! cross-site `POST /publish`, which needs no CORS preflight as
//! `text/plain`). Pure: a request's `Origin` header in, a verdict out.
//!
//! A pattern is one of:
//! - `*`: every origin (the list is then open, as with no list at all);
//! - `null`: the opaque origin browsers send from sandboxed frames and
//!   `file:` pages;
//! - `[scheme://]host[:port]`: `host` a DNS name, an IPv4 address or a
//!   bracketed IPv6 one, or `*.` and a name for its subdomains at any depth
//!   (`*.good.example` takes `a.good.example` and `a.b.good.example`, not
//!   `good.example` itself, and never `evil-good.example`: the match is by
//!   whole labels); without a scheme, `http` and `https` both match; without
//!   a port, only the scheme's default port (80, 443; the origin may name it
//!   or not); `:*` any port.
//!
//! Names compare without regard to ASCII case, as browsers serialize them
//! in lower case anyway. A request without `Origin` is let through: a
//! browser sends one with every WebSocket handshake and every cross-site
//! `POST`, so a request without one does not come from a web page (tokens,
//! not origins, guard what non-browser clients may do). An `Origin` that
//! does not parse, or more than one, is refused like a foreign one.

use std::fmt;

/// The longest `Origin` value looked at (a DNS name is at most 253 bytes).
const MAX_ORIGIN: usize = 512;

/// Why an origin was refused (each a reason line of the 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A well-formed origin that no pattern takes.
    NotAllowed,
    /// An `Origin` header that is not `scheme://host[:port]` or `null`.
    Malformed,
    /// Several `Origin` headers: which one the browser meant is unknowable.
    Several,
}

impl Refused {
    /// Every reason, in label order (metrics iterate it).
    pub const ALL: [Refused; 3] = [Self::NotAllowed, Self::Malformed, Self::Several];

    /// Position in [`Refused::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Label of `corecast_origin_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::Malformed => "malformed",
            Self::Several => "several",
        }
    }

    /// The 403's reason line.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotAllowed => "origin not allowed (see --allowed-origin)",
            Self::Malformed => "malformed Origin header",
            Self::Several => "more than one Origin header",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// This name or address (lower case).
    Exact(String),
    /// Its subdomains, any depth: the suffix with its leading dot (`.good.example`).
    Below(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// The scheme's default port.
    Default,
    Exact(u16),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Lower case; `None`: `http` or `https`.
    scheme: Option<String>,
    host: Host,
    port: Port,
}

/// The allow-list in force (replaced as a whole by a reload); the default
/// takes every origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    patterns: Vec<Pattern>,
    null: bool,
    /// `*` was listed, or nothing was: every origin.
    open: bool,
}

/// An origin as a browser serializes it: `scheme://host[:port]`.
#[derive(Debug, PartialEq, Eq)]
struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    /// The port named, else the scheme's default, else `None`.
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        Some(443)
    } else {
        None
    }
}

fn valid_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// A DNS name, an IPv4 address (both: letters, digits, `-`, `.`; no empty
/// label) or a bracketed IPv6 address.
fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .is_some_and(|a| crate::proto::host::is_ip_literal(a.as_bytes()));
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits `host[:port]` (an IPv6 host in brackets).
fn split_port(s: &str) -> (&str, Option<&str>) {
    let after_host = if s.starts_with('[') {
        s.find(']').map_or(s.len(), |i| i + 1)
    } else {
        s.find(':').unwrap_or(s.len())
    };
    match s[after_host..].strip_prefix(':') {
        Some(port) => (&s[..after_host], Some(port)),
        None if after_host == s.len() => (s, None),
        // Something after the host that is not a port: keep it in the
        // host, where validation refuses it.
        None => (s, None),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

impl<'a> Origin<'a> {
    fn parse(v: &'a str) -> Option<Self> {
        let (scheme, rest) = v.split_once("://")?;
        if !valid_scheme(scheme) {
            return None;
        }
        let (host, port) = split_port(rest);
        if !valid_host(host) {
            return None;
        }
        let port = match port {
            Some(p) => Some(parse_port(p)?),
            None => default_port(scheme),
        };
        Some(Self { scheme, host, port })
    }
}

impl Pattern {
    fn parse(p: &str) -> Result<Self, String> {
        let (scheme, rest) = match p.split_once("://") {
            Some((s, rest)) if valid_scheme(s) => (Some(s.to_ascii_lowercase()), rest),
            Some(_) => return Err(format!("{p:?}: bad scheme")),
            None => (None, p),
        };
        let (host, port) = split_port(rest);
        let port = match port {
            None => Port::Default,
            Some("*") => Port::Any,
            Some(n) => Port::Exact(parse_port(n).ok_or_else(|| format!("{p:?}: bad port"))?),
        };
        let host = host.to_ascii_lowercase();
        let host = match host.strip_prefix("*.") {
            Some(name) if valid_host(name) && !name.starts_with('[') => {
                Host::Below(format!(".{name}"))
            }
            Some(_) => return Err(format!("{p:?}: `*.` must be followed by a DNS name")),
            None if valid_host(&host) => Host::Exact(host),
            None => {
                return Err(format!(
                    "{p:?}: expected [scheme://]host[:port], host a name, an address or *.name"
                ));
            }
        };
        Ok(Self { scheme, host, port })
    }

    fn takes(&self, o: &Origin<'_>) -> bool {
        let scheme_ok = match &self.scheme {
            Some(s) => s.eq_ignore_ascii_case(o.scheme),
            None => o.scheme.eq_ignore_ascii_case("http") || o.scheme.eq_ignore_ascii_case("https"),
        };
        let port_ok = match self.port {
            Port::Any => true,
            Port::Exact(n) => o.port == Some(n),
            Port::Default => o.port == default_port(o.scheme),
        };
        let host_ok = match &self.host {
            Host::Exact(h) => h.eq_ignore_ascii_case(o.host),
            Host::Below(suffix) => {
                // At least one whole label before the suffix, which starts
                // with its dot: `evil-good.example` does not end in
                // `.good.example`.
                o.host.len() > suffix.len()
                    && o.host.is_char_boundary(o.host.len() - suffix.len())
                    && o.host[o.host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && !o.host.starts_with('[')
            }
        };
        scheme_ok && port_ok && host_ok
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.scheme {
            write!(f, "{s}://")?;
        }
        match &self.host {
            Host::Exact(h) => f.write_str(h)?,
            Host::Below(s) => write!(f, "*{s}")?,
        }
        match self.port {
            Port::Default => Ok(()),
            Port::Exact(n) => write!(f, ":{n}"),
            Port::Any => f.write_str(":*"),
        }
    }
}

/// Checks one pattern (the flag's value parser).
pub fn parse_pattern(p: &str) -> Result<String, String> {
    let p = p.trim();
    if p == "*" || p.eq_ignore_ascii_case("null") {
        return Ok(p.to_ascii_lowercase());
    }
    Pattern::parse(p).map(|_| p.to_string())
}

impl Default for AllowList {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            null: false,
            open: true,
        }
    }
}

impl AllowList {
    /// The list of `patterns` (each as [`parse_pattern`] takes it); no
    /// pattern at all: every origin.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut list = Self {
            patterns: Vec::new(),
            null: false,
            open: patterns.is_empty(),
        };
        for p in patterns {
            let p = p.trim();
            if p == "*" {
                list.open = true;
            } else if p.eq_ignore_ascii_case("null") {
                list.null = true;
            } else {
                list.patterns.push(Pattern::parse(p)?);
            }
        }
        Ok(list)
    }

    /// Every origin passes (nothing, or `*`, listed).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The verdict on a request's `Origin` header values (none: not a
    /// browser, let through).
    pub fn check<'v>(&self, mut values: impl Iterator<Item = &'v [u8]>) -> Result<(), Refused> {
        if self.open {
            return Ok(());
        }
        let Some(value) = values.next() else {
            return Ok(());
        };
        if values.next().is_some() {
            return Err(Refused::Several);
        }
        let value = value.trim_ascii();
        if value.len() > MAX_ORIGIN {
            return Err(Refused::Malformed);
        }
        let value = std::str::from_utf8(value).map_err(|_| Refused::Malformed)?;
        if value.eq_ignore_ascii_case("null") {
            return if self.null {
                Ok(())
            } else {
                Err(Refused::NotAllowed)
            };
        }
        let origin = Origin::parse(value).ok_or(Refused::Malformed)?;
        if self.patterns.iter().any(|p| p.takes(&origin)) {
            Ok(())
        } else {
            Err(Refused::NotAllowed)
        }
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.open {
            return f.write_str("*");
        }
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let s = if first { "" } else { " " };
            first = false;
            f.write_str(s)
        };
        if self.null {
            sep(f)?;
            f.write_str("null")?;
        }
        for p in &self.patterns {
            sep(f)?;
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(p: &[&str]) -> AllowList {
        AllowList::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn check(l: &AllowList, origin: &str) -> Result<(), Refused> {
        l.check(std::iter::once(origin.as_bytes()))
    }

    #[test]
    fn no_list_or_a_star_takes_every_origin_and_no_origin_always_passes() {
        for l in [list(&[]), list(&["*"]), list(&["https://a.example", "*"])] {
            assert!(l.is_open());
            assert_eq!(check(&l, "https://evil.example"), Ok(()));
            assert_eq!(check(&l, "null"), Ok(()));
        }
        let strict = list(&["https://a.example"]);
        assert_eq!(strict.check(std::iter::empty()), Ok(()), "not a browser");
        let two = [&b"https://a.example"[..], &b"https://evil.example"[..]];
        assert_eq!(strict.check(two.into_iter()), Err(Refused::Several));
        assert_eq!(
            list(&[]).check(two.into_iter()),
            Ok(()),
            "no list, no check"
        );
    }

    #[test]
    fn subdomain_patterns_match_whole_labels_only() {
        let l = list(&["*.good.example"]);
        for ok in [
            "https://a.good.example",
            "http://a.b.good.example",
            "https://A.Good.Example",
            "https://a.good.example:443",
        ] {
            assert_eq!(check(&l, ok), Ok(()), "{ok}");
        }
        for no in [
            "https://good.example",
            "https://evil-good.example",
            "https://evilgood.example",
            "https://a.good.example.evil",
            "https://a.good.example:8443",
            "wss://a.good.example",
            "https://a.good.examplex",
        ] {
            assert_eq!(check(&l, no), Err(Refused::NotAllowed), "{no}");
        }
    }

    #[test]
    fn schemes_and_ports_follow_the_pattern() {
        let l = list(&[
            "https://app.example",
            "http://localhost:8080",
            "dev.example:*",
            "null",
        ]);
        assert_eq!(check(&l, "https://app.example"), Ok(()));
        assert_eq!(check(&l, "https://app.example:443"), Ok(()));
        assert_eq!(check(&l, "http://app.example"), Err(Refused::NotAllowed));
        assert_eq!(
            check(&l, "https://app.example:444"),
            Err(Refused::NotAllowed)
        );
        assert_eq!(check(&l, "http://localhost:8080"), Ok(()));
        assert_eq!(check(&l, "http://localhost"), Err(Refused::NotAllowed));
        assert_eq!(check(&l, "http://dev.example:3000"), Ok(()));
        assert_eq!(check(&l, "https://dev.example"), Ok(()));
        assert_eq!(check(&l, "ftp://dev.example"), Err(Refused::NotAllowed));
        assert_eq!(check(&l, "null"), Ok(()));
        assert_eq!(
            check(&list(&["https://a.example"]), "null"),
            Err(Refused::NotAllowed)
        );
        let v6 = list(&["http://[::1]:8080", "127.0.0.1:*"]);
        assert_eq!(check(&v6, "http://[::1]:8080"), Ok(()));
        assert_eq!(check(&v6, "http://127.0.0.1:5173"), Ok(()));
        assert_eq!(
            check(&v6, "http://127.0.0.2:5173"),
            Err(Refused::NotAllowed)
        );
    }

    #[test]
    fn malformed_origins_are_refused_not_matched() {
        let l = list(&["*.good.example"]);
        for bad in [
            "a.good.example",
            "https://",
            "https://a.good.example/",
            "https://a.good.example/path",
            "https://user@a.good.example",
            "https://a.good.example:99999",
            "https://a.good.example:",
            "https://a..good.example",
            "https://a.good.example.",
            "https://a good.example",
            "1https://a.good.example",
            "https://[::1",
        ] {
            assert_eq!(check(&l, bad), Err(Refused::Malformed), "{bad}");
        }
        assert_eq!(
            l.check(std::iter::once(&b"https://\xff.good.example"[..])),
            Err(Refused::Malformed)
        );
        let long = format!("https://{}.good.example", "a".repeat(600));
        assert_eq!(check(&l, &long), Err(Refused::Malformed));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_pattern_named() {
        for bad in [
            "https://*.",
            "*.*.example",
            "a.*.example",
            "https://a.example:port",
            "https://a.example/path",
            "*.[::1]",
            "",
            "1x://a.example",
        ] {
            let e = parse_pattern(bad).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{bad}: {e}");
        }
        assert_eq!(parse_pattern(" NULL ").unwrap(), "null");
        assert_eq!(
            list(&["HTTPS://*.Good.Example:*", "null"]).to_string(),
            "null https://*.good.example:*"
        );
    }

    proptest! {
        /// A subdomain pattern takes a host exactly when the host is one or
        /// more whole labels followed by the pattern's name.
        #[test]
        fn subdomains_are_whole_labels(
            prefix in "([a-z0-9-]{0,5}\\.){0,3}[a-z-]{0,2}",
            name in "[a-z]{1,6}\\.[a-z]{2,4}",
        ) {
            let l = list(&[&format!("*.{name}")]);
            let host = format!("{prefix}{name}");
            let origin = format!("https://{host}");
            let expected = prefix
                .strip_suffix('.')
                .is_some_and(|labels| labels.split('.').all(|l| !l.is_empty()));
            match check(&l, &origin) {
                Ok(()) => prop_assert!(expected, "{} taken", origin),
                Err(Refused::NotAllowed) => prop_assert!(!expected, "{} refused", origin),
                Err(Refused::Malformed) => prop_assert!(!valid_host(&host)),
                Err(e) => prop_assert!(false, "{:?}", e),
            }
        }
    }
}
