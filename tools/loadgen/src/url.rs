//! `ws://` and `http://` URLs: just enough of RFC 3986 for a load generator.
//!
//! `ws://HOST[:PORT][/PATH][?QUERY]`, where HOST is a name, an IPv4 address
//! or a bracketed IPv6 address, and `wss://` (TLS, see `client::tls`).
//! `http://` is accepted where a plain HTTP request is made: HTTP
//! publishers (`POST /publish/T`) and `/metrics`; `https://` is refused
//! there (use a `wss://` publisher).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// A parsed `ws://` (or, from [`parse_any`] and [`parse_http`], `http://`) URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsUrl {
    /// `http://` rather than `ws://`.
    #[serde(default)]
    pub http: bool,
    /// `wss://`: the connection speaks TLS.
    #[serde(default)]
    pub tls: bool,
    /// Host as written, without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Request target: path plus `?query` if any; never empty.
    pub target: String,
}

impl WsUrl {
    /// The `Host` header value: the port is left out when it is 80.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolves the host (once; a name may block on DNS) to its first address.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {:?}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{:?} resolves to no address", self.host))
    }
}

impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.http, self.tls) {
            (true, _) => "http",
            (false, true) => "wss",
            (false, false) => "ws",
        };
        write!(f, "{scheme}://{}{}", self.host_header(), self.target)
    }
}

/// Parses a `ws://` URL.
pub fn parse(s: &str) -> Result<WsUrl, String> {
    parse_with(s, false, true)
}

/// Parses an `http://` URL.
pub fn parse_http(s: &str) -> Result<WsUrl, String> {
    parse_with(s, true, false)
}

/// Parses a `ws://` or an `http://` URL.
pub fn parse_any(s: &str) -> Result<WsUrl, String> {
    parse_with(s, true, true)
}

fn parse_with(s: &str, http_ok: bool, ws_ok: bool) -> Result<WsUrl, String> {
    let s = s.trim();
    let expected = match (ws_ok, http_ok) {
        (true, true) => "ws:// or http://",
        (false, true) => "http://",
        _ => "ws://",
    };
    let (http, tls, rest) = match s.split_once("://") {
        Some((scheme, rest)) if ws_ok && scheme.eq_ignore_ascii_case("ws") => (false, false, rest),
        Some((scheme, rest)) if ws_ok && scheme.eq_ignore_ascii_case("wss") => (false, true, rest),
        Some((scheme, rest)) if http_ok && scheme.eq_ignore_ascii_case("http") => {
            (true, false, rest)
        }
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(format!(
                "{s:?}: https:// is not supported here; use {expected} (or a wss:// publisher)"
            ));
        }
        Some((scheme, _)) => {
            return Err(format!(
                "{s:?}: unsupported scheme {scheme:?}; use {expected}"
            ));
        }
        None => return Err(format!("{s:?}: expected {expected}HOST:PORT/PATH")),
    };
    // A fragment is never sent to the server.
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(split);
    if authority.contains('@') {
        return Err(format!(
            "{s:?}: user information in the URL is not supported"
        ));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (host, tail) = after
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unterminated IPv6 address"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{s:?}: invalid IPv6 address {host:?}"));
        }
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: unexpected {t:?} after the IPv6 address"))?,
            ),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{s:?}: missing host"));
    }
    if !host.contains(':')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("{s:?}: invalid host {host:?}"));
    }
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("{s:?}: invalid port {p:?}")),
            Ok(p) => p,
        },
    };
    let target = match target {
        "" => "/".to_string(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_string(),
    };
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!(
            "{s:?}: the path contains spaces or control characters"
        ));
    }
    Ok(WsUrl {
        http,
        tls,
        host: host.to_string(),
        port,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (String, u16, String) {
        let u = parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (u.host, u.port, u.target)
    }

    #[test]
    fn parses_host_port_path() {
        assert_eq!(
            ok("ws://127.0.0.1:9101/echo"),
            ("127.0.0.1".into(), 9101, "/echo".into())
        );
        assert_eq!(
            ok("WS://localhost/a/b?x=1&y=2"),
            ("localhost".into(), 80, "/a/b?x=1&y=2".into())
        );
        assert_eq!(ok("ws://h"), ("h".into(), 80, "/".into()));
        assert_eq!(ok("ws://h:1?q"), ("h".into(), 1, "/?q".into()));
        assert_eq!(ok("ws://h:65535/p#frag"), ("h".into(), 65535, "/p".into()));
        assert_eq!(ok("ws://[::1]:9/x"), ("::1".into(), 9, "/x".into()));
        assert_eq!(ok("ws://[::1]"), ("::1".into(), 80, "/".into()));
    }

    #[test]
    fn host_header_and_display() {
        let u = parse("ws://127.0.0.1:9101/echo").unwrap();
        assert_eq!(u.host_header(), "127.0.0.1:9101");
        assert_eq!(u.to_string(), "ws://127.0.0.1:9101/echo");
        assert_eq!(parse("ws://a.b/").unwrap().host_header(), "a.b");
        assert_eq!(parse("ws://[::1]:7/").unwrap().host_header(), "[::1]:7");
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "",
            "127.0.0.1:9101/echo",
            "http://127.0.0.1/",
            "https://127.0.0.1/",
            "ws://",
            "ws:///echo",
            "ws://:80/",
            "ws://h:0/",
            "ws://h:65536/",
            "ws://h:x/",
            "ws://h:/",
            "ws://u@h/",
            "ws://[::1/",
            "ws://[nope]/",
            "ws://[::1]x/",
            "ws://h h/",
            "ws://h/a b",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(
            parse_any("https://h/")
                .unwrap_err()
                .contains("not supported")
        );
    }

    #[test]
    fn wss_urls_speak_tls_on_port_443_by_default() {
        let u = parse("wss://127.0.0.1/echo").unwrap();
        assert!(u.tls && !u.http);
        assert_eq!((u.port, u.host_header()), (443, "127.0.0.1".to_string()));
        assert_eq!(u.to_string(), "wss://127.0.0.1/echo");
        let u = parse("wss://h:9001/ws").unwrap();
        assert_eq!(u.to_string(), "wss://h:9001/ws");
    }

    #[test]
    fn http_urls_where_allowed() {
        let u = parse_any("http://127.0.0.1:9/publish/t").unwrap();
        assert!(u.http);
        assert_eq!(u.to_string(), "http://127.0.0.1:9/publish/t");
        assert!(!parse_any("ws://h/").unwrap().http);
        assert!(parse("http://h/").is_err());
        assert!(parse_http("ws://h/").is_err());
        assert!(
            parse_http("https://h/")
                .unwrap_err()
                .contains("wss:// publisher")
        );
        assert_eq!(parse_http("http://h:1/metrics").unwrap().target, "/metrics");
    }

    #[test]
    fn resolves_literal_addresses() {
        let u = parse("ws://127.0.0.1:9101/").unwrap();
        assert_eq!(u.resolve().unwrap(), "127.0.0.1:9101".parse().unwrap());
    }
}
