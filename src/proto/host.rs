//! The `Host` header's grammar (RFC 9112 §3.2, RFC 3986 §3.2.2), for
//! [`check_host`](super::handshake::check_host); its IP literal is the
//! origin check's too.

/// Whether `v` is a `Host` value (RFC 9112 §3.2, RFC 3986 §3.2.2):
/// `uri-host [ ":" port ]`, one pass, no allocation.
///
/// - The host is an IP literal, `[` an IPv6 address `]` (an IPv4 tail
///   included; [`is_ip_literal`]),
///   or a reg-name, which covers IPv4 addresses and DNS names. IPvFuture
///   (`[v1.x]`) is refused: no version is defined, nothing could be
///   reached by it.
/// - The port is `*DIGIT`, so `localhost:` is a host; one over 65535 names
///   no port and is refused.
/// - An empty value is a host (sent for a target without an authority),
///   but an empty host before a port is not (RFC 9110 §4.2.1).
///
/// No space is a host byte, so `Host: a, b` (two values folded into one
/// line) is refused.
pub(super) fn is_host(v: &[u8]) -> bool {
    let host_len = match v.first() {
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) if is_ip_literal(&v[1..end]) => end + 1,
            _ => return false,
        },
        _ => {
            let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
            if !is_reg_name(&v[..end]) {
                return false;
            }
            end
        }
    };
    match &v[host_len..] {
        [] => true,
        [b':', port @ ..] => host_len > 0 && is_port(port),
        _ => false,
    }
}

/// Inside the brackets of an IPv6 literal (a `Host` or an `Origin`): an
/// IPv6 address, an IPv4 tail included (RFC 3986 `IPv6address`, parsed by
/// the standard library: `[1]` or nine groups are not addresses). No zone
/// (`%25eth0`): RFC 3986 has none, and a browser never sends one.
pub fn is_ip_literal(a: &[u8]) -> bool {
    // The longest address is 45 bytes; anything longer is not parsed.
    a.len() <= 45 && std::str::from_utf8(a).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`: no `[`, `]` or
/// `:`, and each `%` followed by two hex digits.
fn is_reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&b) = h.get(i) {
        i += if b == b'%' {
            match h.get(i + 1..i + 3) {
                Some([x, y]) if x.is_ascii_hexdigit() && y.is_ascii_hexdigit() => 3,
                _ => return false,
            }
        } else if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) {
            1
        } else {
            return false;
        };
    }
    true
}

/// `port = *DIGIT`, at most 65535 (leading zeros allowed, as the grammar
/// allows them).
fn is_port(p: &[u8]) -> bool {
    let mut n: u32 = 0;
    for &b in p {
        if !b.is_ascii_digit() {
            return false;
        }
        // At most 65535 * 10 + 9 here: no overflow.
        n = n * 10 + u32::from(b - b'0');
        if n > u32::from(u16::MAX) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_a_name_or_address_and_an_optional_port() {
        let cases: &[(&str, bool)] = &[
            // The outside probe's values, each answered 200/101 before.
            ("[zz]", false),
            ("[::1", false),
            ("[::1]x", false),
            ("a:b", false),
            ("a:80:90", false),
            ("a:-1", false),
            ("::1", false),
            ("a]", false),
            // More of the same kinds.
            ("[]", false),
            ("[::1]:", true),
            ("[::1]:x", false),
            ("[[::1]]", false),
            ("[v1.x]", false),
            ("a[b", false),
            ("a%2", false),
            ("a%zz", false),
            (":80", false),
            ("a:65536", false),
            ("a:99999999999999999999", false),
            ("a b", false),
            ("a, b", false),
            ("a/b", false),
            ("a@b", false),
            // Hosts.
            ("", true),
            ("example.com", true),
            ("example.com:9001", true),
            ("127.0.0.1:80", true),
            ("[::1]:9001", true),
            ("[::ffff:127.0.0.1]", true),
            ("[1]", false),
            ("[1:2:3:4:5:6:7:8:9]", false),
            ("[1::2::3]", false),
            ("[::ffff:999.0.0.1]", false),
            ("[fe80::1%25eth0]", false),
            ("[2001:db8:0:0:0:0:2:1]:443", true),
            ("[:::]", false),
            ("xn--bcher-kva.example", true),
            ("a%20b", true),
            ("localhost:", true),
            ("a:65535", true),
            ("a:00080", true),
            ("a,b", true),
        ];
        for &(host, valid) in cases {
            assert_eq!(is_host(host.as_bytes()), valid, "{host:?}");
        }
    }
}
