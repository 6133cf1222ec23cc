//! The opening handshake, client side: the upgrade request
//! ([`RequestTemplate`]) and the check of the server's 101
//! ([`check_response`]: status, `Upgrade`, `Connection`,
//! `Sec-WebSocket-Accept`).

use super::Failure;
use crate::url::WsUrl;
use corecast::proto::handshake::accept_key;

/// The subprotocol this process's requests offer (see
/// [`RequestTemplate::offering`]): the only one a response may choose.
static OFFERED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Sets what [`check_response`] accepts as the server's subprotocol.
pub fn set_offered(subprotocol: Option<&str>) {
    *OFFERED.lock().unwrap_or_else(|p| p.into_inner()) = subprotocol.map(str::to_owned);
}

/// Largest response head accepted from the server.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The `{topic}` placeholder in a request target (see `topics`).
pub const TOPIC_PLACEHOLDER: &str = "{topic}";

/// The upgrade request, rendered once per run; only the key (and, when the
/// target has a `{topic}` placeholder, the topic number) varies.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    /// Up to the placeholder (or up to the key when there is none).
    head: Vec<u8>,
    /// After the placeholder, up to the key; `None`: no placeholder.
    mid: Option<Vec<u8>>,
    /// `wss://`: the host name TLS verifies the certificate against.
    tls_host: Option<String>,
}

impl RequestTemplate {
    pub fn new(url: &WsUrl) -> Self {
        Self::offering(url, None)
    }

    /// [`Self::new`], offering `subprotocol` (`Sec-WebSocket-Protocol`).
    pub fn offering(url: &WsUrl, subprotocol: Option<&str>) -> Self {
        let offer = subprotocol
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        let rest = format!(
            " HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             {offer}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
            url.host_header()
        );
        match url.target.split_once(TOPIC_PLACEHOLDER) {
            Some((before, after)) => Self {
                head: format!("GET {before}").into_bytes(),
                mid: Some(format!("{after}{rest}").into_bytes()),
                tls_host: url.tls.then(|| url.host.clone()),
            },
            None => Self {
                head: format!("GET {}{rest}", url.target).into_bytes(),
                mid: None,
                tls_host: url.tls.then(|| url.host.clone()),
            },
        }
    }

    /// `wss://`: the host TLS verifies (`None` for `ws://`).
    pub fn tls_host(&self) -> Option<&str> {
        self.tls_host.as_deref()
    }

    /// The request with `key`, and `topic` in place of the placeholder
    /// (topic 0 when none is given).
    pub fn render(&self, key: &[u8; 24], topic: Option<usize>) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.head.len() + 64);
        v.extend_from_slice(&self.head);
        if let Some(mid) = &self.mid {
            v.extend_from_slice(topic.unwrap_or(0).to_string().as_bytes());
            v.extend_from_slice(mid);
        }
        v.extend_from_slice(key);
        v.extend_from_slice(b"\r\n\r\n");
        v
    }
}

/// Checks the server's response head in `buf` against the key we sent.
/// `Ok(None)`: incomplete. `Ok(Some(n))`: a valid 101 of `n` bytes (frames
/// may follow it in `buf`).
pub fn check_response(buf: &[u8], key: &[u8; 24]) -> Result<Option<usize>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(Failure::BadResponse("head_too_large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::BadResponse("too_many_headers"));
        }
        Err(_) => return Err(Failure::BadResponse("malformed_head")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(Failure::Status(code));
    }
    let values = |name: &'static str| {
        resp.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &'static str, token: &str| {
        values(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if !has_token("upgrade", "websocket") {
        return Err(Failure::BadResponse("no_upgrade_websocket"));
    }
    if !has_token("connection", "upgrade") {
        return Err(Failure::BadResponse("no_connection_upgrade"));
    }
    // We offered no extensions, and at most the one subprotocol
    // (RFC 6455 §4.1).
    if values("sec-websocket-extensions").next().is_some() {
        return Err(Failure::BadResponse("unrequested_extension"));
    }
    let offered = OFFERED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut chosen = values("sec-websocket-protocol");
    match (chosen.next(), chosen.next(), offered) {
        (None, _, _) => {}
        (Some(v), None, Some(o)) if v.trim_ascii() == o.as_bytes() => {}
        _ => return Err(Failure::BadResponse("unrequested_subprotocol")),
    }
    let mut accepts = values("sec-websocket-accept");
    match (accepts.next(), accepts.next()) {
        (Some(v), None) if v.trim_ascii() == accept_key(key) => Ok(Some(n)),
        _ => Err(Failure::BadAccept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::OpCode;
    use corecast::proto::frame::server_frame;

    const KEY: &[u8; 24] = b"dGhlIHNhbXBsZSBub25jZQ==";
    const OK: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    #[test]
    fn a_chosen_subprotocol_must_be_the_offered_one() {
        let with = |p: &str| {
            OK.replace(
                "\r\n\r\n",
                &format!("\r\nSec-WebSocket-Protocol: {p}\r\n\r\n"),
            )
        };
        set_offered(Some("corecast.v1.binary"));
        let ok = with("corecast.v1.binary");
        assert_eq!(check_response(ok.as_bytes(), KEY), Ok(Some(ok.len())));
        assert_eq!(
            check_response(with("chat").as_bytes(), KEY),
            Err(Failure::BadResponse("unrequested_subprotocol"))
        );
        set_offered(None);
        assert_eq!(
            check_response(ok.as_bytes(), KEY),
            Err(Failure::BadResponse("unrequested_subprotocol"))
        );
    }

    #[test]
    fn accepts_a_valid_101_and_finds_its_end() {
        let mut buf = OK.as_bytes().to_vec();
        assert_eq!(check_response(&buf, KEY), Ok(Some(OK.len())));
        buf.extend_from_slice(&server_frame(OpCode::Ping, b"x"));
        assert_eq!(check_response(&buf, KEY), Ok(Some(OK.len())));
        for cut in 0..OK.len() {
            assert_eq!(check_response(&buf[..cut], KEY), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn classifies_bad_responses() {
        let refused = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(refused.as_bytes(), KEY),
            Err(Failure::Status(503))
        );
        let wrong = OK.replace(
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        assert_eq!(
            check_response(wrong.as_bytes(), KEY),
            Err(Failure::BadAccept)
        );
        let missing = OK.replace("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", "");
        assert_eq!(
            check_response(missing.as_bytes(), KEY),
            Err(Failure::BadAccept)
        );
        let no_upgrade = OK.replace("Upgrade: websocket\r\n", "");
        assert!(matches!(
            check_response(no_upgrade.as_bytes(), KEY),
            Err(Failure::BadResponse(_))
        ));
        assert!(matches!(
            check_response(b"garbage\r\n\r\n", KEY),
            Err(Failure::BadResponse(_))
        ));
        let huge = vec![b'x'; MAX_RESPONSE_HEAD + 1];
        assert_eq!(
            check_response(b"HTTP/1.1 101 OK\r\nX: ", KEY),
            Ok(None),
            "partial"
        );
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.extend_from_slice(&huge);
        assert!(matches!(
            check_response(&long, KEY),
            Err(Failure::BadResponse("head_too_large"))
        ));
    }

    #[test]
    fn request_carries_the_key() {
        let url = crate::url::parse("ws://127.0.0.1:9101/echo").unwrap();
        let req = RequestTemplate::new(&url).render(KEY, None);
        let s = String::from_utf8(req).unwrap();
        assert!(s.starts_with("GET /echo HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"));
        assert!(s.ends_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"));
        let url = crate::url::parse("ws://127.0.0.1:9101/ws?topics=t{topic}").unwrap();
        let t = RequestTemplate::new(&url);
        let s = String::from_utf8(t.render(KEY, Some(42))).unwrap();
        assert!(s.starts_with("GET /ws?topics=t42 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"));
        assert!(s.ends_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"));
        let s = String::from_utf8(t.render(KEY, None)).unwrap();
        assert!(s.starts_with("GET /ws?topics=t0 HTTP/1.1"));
    }
}
