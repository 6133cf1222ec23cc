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

/// What the subscribers offer: the extension alone, no parameter. The
/// inflater is reset per message, so an answer must include
/// `server_no_context_takeover` (corecast's always does).
const DEFLATE_OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate\r\n";

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
    /// The request offers permessage-deflate.
    deflate: bool,
}

impl RequestTemplate {
    pub fn new(url: &WsUrl) -> Self {
        Self::offering(url, None, false)
    }

    /// [`Self::new`], offering `subprotocol` (`Sec-WebSocket-Protocol`)
    /// and, with `deflate`, permessage-deflate.
    pub fn offering(url: &WsUrl, subprotocol: Option<&str>, deflate: bool) -> Self {
        let mut offer = subprotocol
            .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
            .unwrap_or_default();
        if deflate {
            offer.push_str(DEFLATE_OFFER);
        }
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
                deflate,
            },
            None => Self {
                head: format!("GET {}{rest}", url.target).into_bytes(),
                mid: None,
                tls_host: url.tls.then(|| url.host.clone()),
                deflate,
            },
        }
    }

    /// Whether the request offers permessage-deflate: only then may the
    /// answer carry `Sec-WebSocket-Extensions`.
    pub fn offers_deflate(&self) -> bool {
        self.deflate
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

/// A verified 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of the response head (frames may follow it).
    pub len: usize,
    /// permessage-deflate was agreed: data frames may have RSV1 set.
    pub deflate: bool,
}

/// Checks the server's response head in `buf` against the key we sent
/// (and whether we offered permessage-deflate). `Ok(None)`: incomplete.
/// `Ok(Some(_))`: a valid 101 (frames may follow it in `buf`).
pub fn check_response(
    buf: &[u8],
    key: &[u8; 24],
    deflate_offered: bool,
) -> Result<Option<Opened>, Failure> {
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
    // At most the extension we offered, and the one subprotocol
    // (RFC 6455 §4.1).
    let mut extensions = values("sec-websocket-extensions").peekable();
    let deflate = match (extensions.peek().is_some(), deflate_offered) {
        (false, _) => false,
        (true, false) => return Err(Failure::BadResponse("unrequested_extension")),
        (true, true) => {
            check_deflate_answer(extensions)?;
            true
        }
    };
    let offered = OFFERED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut chosen = values("sec-websocket-protocol");
    match (chosen.next(), chosen.next(), offered) {
        (None, _, _) => {}
        (Some(v), None, Some(o)) if v.trim_ascii() == o.as_bytes() => {}
        _ => return Err(Failure::BadResponse("unrequested_subprotocol")),
    }
    let mut accepts = values("sec-websocket-accept");
    match (accepts.next(), accepts.next()) {
        (Some(v), None) if v.trim_ascii() == accept_key(key) => {
            Ok(Some(Opened { len: n, deflate }))
        }
        _ => Err(Failure::BadAccept),
    }
}

/// The answer to our bare `permessage-deflate` offer (RFC 7692 §7.1):
/// that extension once, with `server_no_context_takeover` (we inflate each
/// message as a fresh stream), optionally `client_no_context_takeover` and
/// `server_max_window_bits=8..15`; nothing else (we offered no
/// `client_max_window_bits`).
fn check_deflate_answer<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<(), Failure> {
    let bad = Failure::BadResponse("bad_extension_answer");
    let mut answers = values.flat_map(|v| v.split(|&b| b == b','));
    let (Some(answer), None) = (answers.next(), answers.next()) else {
        return Err(bad);
    };
    let mut parts = answer.split(|&b| b == b';').map(<[u8]>::trim_ascii);
    if parts.next() != Some(b"permessage-deflate".as_slice()) {
        return Err(bad);
    }
    let mut seen = [false; 3];
    for param in parts {
        let (name, value) = match param.iter().position(|&b| b == b'=') {
            Some(i) => (param[..i].trim_ascii(), Some(param[i + 1..].trim_ascii())),
            None => (param, None),
        };
        let i = match (name, value) {
            (b"server_no_context_takeover", None) => 0,
            (b"client_no_context_takeover", None) => 1,
            (b"server_max_window_bits", Some(v))
                if std::str::from_utf8(v.trim_ascii_start().strip_prefix(b"\"").unwrap_or(v))
                    .ok()
                    .map(|v| v.trim_end_matches('"'))
                    .and_then(|v| v.parse::<u8>().ok())
                    .is_some_and(|b| (8..=15).contains(&b)) =>
            {
                2
            }
            _ => return Err(bad),
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(bad);
        }
    }
    if !seen[0] {
        return Err(Failure::BadResponse("deflate_context_takeover"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::OpCode;
    use corecast::proto::frame::server_frame;

    const KEY: &[u8; 24] = b"dGhlIHNhbXBsZSBub25jZQ==";
    const OK: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    fn opened(len: usize) -> Opened {
        Opened {
            len,
            deflate: false,
        }
    }

    #[test]
    fn permessage_deflate_is_agreed_only_as_offered_and_without_context() {
        let with = |e: &str| {
            OK.replace(
                "\r\n\r\n",
                &format!("\r\nSec-WebSocket-Extensions: {e}\r\n\r\n"),
            )
        };
        let corecast =
            with("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert_eq!(
            check_response(corecast.as_bytes(), KEY, false),
            Err(Failure::BadResponse("unrequested_extension"))
        );
        let agreed = check_response(corecast.as_bytes(), KEY, true)
            .unwrap()
            .unwrap();
        assert_eq!((agreed.len, agreed.deflate), (corecast.len(), true));
        assert_eq!(
            check_response(OK.as_bytes(), KEY, true),
            Ok(Some(opened(OK.len())))
        );
        for ok in [
            "permessage-deflate;server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=\"15\"; server_no_context_takeover",
        ] {
            assert!(
                check_response(with(ok).as_bytes(), KEY, true).is_ok(),
                "{ok}"
            );
        }
        assert_eq!(
            check_response(with("permessage-deflate").as_bytes(), KEY, true),
            Err(Failure::BadResponse("deflate_context_takeover"))
        );
        for bad in [
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover, permessage-deflate",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(
                check_response(with(bad).as_bytes(), KEY, true),
                Err(Failure::BadResponse("bad_extension_answer")),
                "{bad}"
            );
        }
        let s = RequestTemplate::offering(&crate::url::parse("ws://h:1/ws").unwrap(), None, true)
            .render(KEY, None);
        assert!(
            String::from_utf8(s)
                .unwrap()
                .contains("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n")
        );
    }

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
        assert_eq!(
            check_response(ok.as_bytes(), KEY, false),
            Ok(Some(opened(ok.len())))
        );
        assert_eq!(
            check_response(with("chat").as_bytes(), KEY, false),
            Err(Failure::BadResponse("unrequested_subprotocol"))
        );
        set_offered(None);
        assert_eq!(
            check_response(ok.as_bytes(), KEY, false),
            Err(Failure::BadResponse("unrequested_subprotocol"))
        );
    }

    #[test]
    fn accepts_a_valid_101_and_finds_its_end() {
        let mut buf = OK.as_bytes().to_vec();
        assert_eq!(check_response(&buf, KEY, false), Ok(Some(opened(OK.len()))));
        buf.extend_from_slice(&server_frame(OpCode::Ping, b"x"));
        assert_eq!(check_response(&buf, KEY, false), Ok(Some(opened(OK.len()))));
        for cut in 0..OK.len() {
            assert_eq!(
                check_response(&buf[..cut], KEY, false),
                Ok(None),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn classifies_bad_responses() {
        let refused = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(refused.as_bytes(), KEY, false),
            Err(Failure::Status(503))
        );
        let wrong = OK.replace(
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
        assert_eq!(
            check_response(wrong.as_bytes(), KEY, false),
            Err(Failure::BadAccept)
        );
        let missing = OK.replace("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", "");
        assert_eq!(
            check_response(missing.as_bytes(), KEY, false),
            Err(Failure::BadAccept)
        );
        let no_upgrade = OK.replace("Upgrade: websocket\r\n", "");
        assert!(matches!(
            check_response(no_upgrade.as_bytes(), KEY, false),
            Err(Failure::BadResponse(_))
        ));
        assert!(matches!(
            check_response(b"garbage\r\n\r\n", KEY, false),
            Err(Failure::BadResponse(_))
        ));
        let huge = vec![b'x'; MAX_RESPONSE_HEAD + 1];
        assert_eq!(
            check_response(b"HTTP/1.1 101 OK\r\nX: ", KEY, false),
            Ok(None),
            "partial"
        );
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.extend_from_slice(&huge);
        assert!(matches!(
            check_response(&long, KEY, false),
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
