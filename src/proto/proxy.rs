//! The PROXY protocol (HAProxy, versions 1 and 2): the header a load
//! balancer sends before the client's first byte, naming the client's
//! address. Sans-IO: bytes in, the header's verdict out.
//!
//! - v1: `PROXY TCP4|TCP6|UNKNOWN <src> <dst> <sport> <dport>\r\n`, at most
//!   107 bytes; `UNKNOWN` names no address.
//! - v2: a 12-byte signature, version 2 and a command (`LOCAL`: the
//!   balancer's own connection, no address; `PROXY`), a family and
//!   protocol (TCP over IPv4 or IPv6; anything else carries no address
//!   we use), a length, the addresses, then TLVs (skipped). The whole
//!   header is at most 16 + [`MAX_V2_BODY`] bytes here.
//!
//! A listener that expects the header refuses a connection without one:
//! letting it through would let any client that reaches the port directly
//! claim any address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, with its CRLF (the specification's bound).
pub const MAX_V1: usize = 107;
/// The most a v2 header's body may hold here: the addresses (36 bytes for
/// IPv6) and TLVs a balancer sends (SSL, authority, unique id, …).
pub const MAX_V2_BODY: usize = 1024;
/// The longest header of either version: whatever a connection has sent
/// before its header is judged is at most this long.
pub const MAX_HEADER: usize = 16 + MAX_V2_BODY;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client, as the balancer saw it.
    Client(SocketAddr),
    /// No address to use (v1 `UNKNOWN`, v2 `LOCAL`, or another family):
    /// keep the socket's.
    Unknown,
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither signature.
    NotProxy,
    /// A v1 line that breaks the grammar or passes 107 bytes.
    BadV1,
    /// A v2 header with a bad version, command, length or address block.
    BadV2,
}

impl ProxyError {
    pub const ALL: [ProxyError; 3] = [Self::NotProxy, Self::BadV1, Self::BadV2];

    /// Label of `corecast_proxy_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotProxy => "missing",
            Self::BadV1 => "bad_v1",
            Self::BadV2 => "bad_v2",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The reason sent in the 400 answer.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotProxy => "this listener expects a PROXY protocol header first",
            Self::BadV1 => "malformed PROXY protocol v1 header",
            Self::BadV2 => "malformed PROXY protocol v2 header",
        }
    }
}

/// Reads a header from the start of `buf`: `Ok(None)` when more bytes are
/// needed, `Ok(Some((source, n)))` with the header's length `n` (the
/// client's own bytes follow), or why it is not one. Linear in the header.
pub fn parse(buf: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    let prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..prefix] == V2_SIGNATURE[..prefix] && !buf.is_empty() && buf[0] == b'\r' {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let p = buf.len().min(6);
    if buf[..p] != b"PROXY "[..p] {
        return Err(ProxyError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    let Some(end) = buf.iter().take(MAX_V1).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_V1 {
            Err(ProxyError::BadV1)
        } else {
            Ok(None)
        };
    };
    let line = buf[..end].strip_suffix(b"\r").ok_or(ProxyError::BadV1)?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::BadV1)?;
    let mut parts = line.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::BadV1);
    }
    let family = parts.next().ok_or(ProxyError::BadV1)?;
    if family == "UNKNOWN" {
        // Whatever follows is ignored (the specification's rule).
        return Ok(Some((Source::Unknown, end + 1)));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::BadV1);
    };
    let parse_ip = |s: &str| -> Result<IpAddr, ProxyError> {
        match family {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => return Err(ProxyError::BadV1),
        }
        .map_err(|_| ProxyError::BadV1)
    };
    let parse_port = |s: &str| -> Result<u16, ProxyError> {
        // Decimal, no sign, no leading zero (but "0" itself).
        if s.is_empty()
            || s.len() > 5
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyError::BadV1);
        }
        s.parse().map_err(|_| ProxyError::BadV1)
    };
    let src = parse_ip(src)?;
    parse_ip(dst)?;
    let sport = parse_port(sport)?;
    parse_port(dport)?;
    Ok(Some((Source::Client(SocketAddr::new(src, sport)), end + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Source, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::BadV2),
    };
    let fam = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_V2_BODY {
        return Err(ProxyError::BadV2);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let n = 16 + len;
    if local {
        return Ok(Some((Source::Unknown, n)));
    }
    let source = match fam {
        // TCP over IPv4: src, dst (4 each), sport, dport.
        0x11 => {
            let a = body.get(..12).ok_or(ProxyError::BadV2)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Source::Client(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // TCP over IPv6: src, dst (16 each), sport, dport.
        0x21 => {
            let a = body.get(..36).ok_or(ProxyError::BadV2)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Source::Client(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, UDP, UNIX: nothing we can use.
        _ => Source::Unknown,
    };
    Ok(Some((source, n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_lines_give_the_client_and_their_length() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1";
        let (s, n) = parse(line).unwrap().unwrap();
        assert_eq!(s, Source::Client("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(&line[n..], b"GET / HTTP/1.1");
        let six = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 443\r\n";
        assert_eq!(
            parse(six).unwrap().unwrap().0,
            Source::Client("[2001:db8::1]:1".parse().unwrap())
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n").unwrap(),
            Some((Source::Unknown, 24))
        );
        // Incomplete: more is needed, at every cut.
        for cut in 0..line.len().min(45) {
            assert_eq!(parse(&line[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn bad_v1_lines_and_other_bytes_are_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 443\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 443\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 443\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 443\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(ProxyError::BadV1),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(
            parse(&long),
            Err(ProxyError::BadV1),
            "past 107 bytes without a line end"
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(
            parse(b"\x16\x03\x01"),
            Err(ProxyError::NotProxy),
            "a TLS ClientHello"
        );
    }

    #[test]
    fn v2_headers_give_the_client_skip_tlvs_and_honour_local() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']); // a TLV
        let h = v2(1, 0x11, &body);
        let mut stream = h.clone();
        stream.extend_from_slice(b"\x16\x03\x01");
        let (s, n) = parse(&stream).unwrap().unwrap();
        assert_eq!(s, Source::Client("192.0.2.1:56324".parse().unwrap()));
        assert_eq!(&stream[n..], b"\x16\x03\x01");
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(None), "cut {cut}");
        }
        let mut six = vec![0u8; 36];
        six[0] = 0x20;
        six[1] = 0x01;
        six[15] = 1;
        six[32..34].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &six)).unwrap().unwrap().0,
            Source::Client("[2001::1]:9".parse().unwrap())
        );
        assert_eq!(
            parse(&v2(0, 0x11, &body)).unwrap().unwrap().0,
            Source::Unknown,
            "LOCAL"
        );
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216])).unwrap().unwrap().0,
            Source::Unknown,
            "UNIX"
        );
    }

    #[test]
    fn bad_v2_headers_are_refused() {
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert_eq!(parse(&wrong_version), Err(ProxyError::BadV2));
        assert_eq!(
            parse(&v2(2, 0x11, &[0; 12])),
            Err(ProxyError::BadV2),
            "command 2"
        );
        assert_eq!(
            parse(&v2(1, 0x11, &[0; 8])),
            Err(ProxyError::BadV2),
            "short IPv4 block"
        );
        assert_eq!(
            parse(&v2(1, 0x21, &[0; 20])),
            Err(ProxyError::BadV2),
            "short IPv6 block"
        );
        let mut huge = v2(1, 0x11, &[0; 12]);
        huge[14..16].copy_from_slice(&((MAX_V2_BODY + 1) as u16).to_be_bytes());
        assert_eq!(
            parse(&huge),
            Err(ProxyError::BadV2),
            "over the body bound, refused at once"
        );
    }
}
