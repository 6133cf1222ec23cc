//! Enveloped subscribers (`corecast.v1`, `corecast.v1.binary`) as a test
//! client sees them: connecting with a subprotocol, reading publications,
//! snapshot markers and control replies. JSON read with serde_json.

use super::{Ws, ws_url};
use std::net::SocketAddr;
use std::time::Duration;
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

/// A subscriber offering `protocols`; returns it with the subprotocol the
/// server chose.
pub fn subscribe_with(addr: SocketAddr, path: &str, protocols: &str) -> (Ws, Option<String>) {
    let mut req = ws_url(addr, path).into_client_request().unwrap();
    if !protocols.is_empty() {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    }
    let (ws, resp) = tungstenite::connect(req).expect("handshake");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let chosen = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

/// One publication as a subscriber of either envelope form sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    pub topic: String,
    pub epoch: u64,
    pub seq: u64,
    pub text: bool,
    pub payload: Vec<u8>,
    /// Announced by a snapshot marker: the topic's last value.
    pub snapshot: bool,
}

/// The next publication; a snapshot marker before it is checked against
/// it and noted.
pub fn read_env(ws: &mut Ws) -> Env {
    match read_incoming(ws) {
        Incoming::Pub(e) => e,
        Incoming::Reply(v) => panic!("expected a publication, got {v}"),
    }
}

pub fn read_plain_env(m: Message) -> Env {
    match m {
        Message::Text(t) => {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("JSON");
            assert_eq!(v["op"], "pub", "{t}");
            let (text, payload) = match (v.get("text"), v.get("base64")) {
                (Some(s), None) => (true, s.as_str().unwrap().as_bytes().to_vec()),
                (None, Some(b)) => {
                    use base64::Engine;
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(b.as_str().unwrap())
                        .unwrap();
                    (false, b)
                }
                _ => panic!("exactly one of text and base64: {t}"),
            };
            Env {
                topic: v["topic"].as_str().unwrap().to_owned(),
                epoch: v["epoch"].as_u64().unwrap(),
                seq: v["seq"].as_u64().unwrap(),
                text,
                payload,
                snapshot: false,
            }
        }
        Message::Binary(b) => {
            assert_eq!(b[0], 1, "kind: publication");
            let n = u16::from_be_bytes([b[2], b[3]]) as usize;
            Env {
                text: b[1] & 1 == 1,
                epoch: u64::from_be_bytes(b[4..12].try_into().unwrap()),
                seq: u64::from_be_bytes(b[12..20].try_into().unwrap()),
                topic: String::from_utf8(b[20..20 + n].to_vec()).unwrap(),
                payload: b[20 + n..].to_vec(),
                snapshot: false,
            }
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A publication or a control reply, as an enveloped subscriber reads them.
pub enum Incoming {
    Pub(Env),
    Reply(serde_json::Value),
}

pub fn read_incoming(ws: &mut Ws) -> Incoming {
    let m = ws.read().expect("a message");
    let marker = match &m {
        Message::Text(t) if t.as_str().starts_with(r#"{"op":"snapshot""#) => true,
        Message::Text(t) if !t.as_str().starts_with(r#"{"op":"pub""#) => {
            return Incoming::Reply(serde_json::from_str(t.as_str()).expect("JSON"));
        }
        Message::Binary(b) => b[0] == 2,
        _ => false,
    };
    if !marker {
        return Incoming::Pub(read_plain_env(m));
    }
    let (topic, epoch, seq) = marker_of(m);
    let e = read_plain_env(ws.read().expect("a message"));
    assert_eq!(
        (topic.as_str(), epoch, seq),
        (e.topic.as_str(), e.epoch, e.seq),
        "a marker names the publication after it"
    );
    Incoming::Pub(Env {
        snapshot: true,
        ..e
    })
}

/// Subscribes to `topic` by control message (with `since` if given);
/// returns the reply (publications read before it are returned too).
pub fn subscribe_since(
    ws: &mut Ws,
    topic: &str,
    since: Option<(u64, u64)>,
) -> (serde_json::Value, Vec<Env>) {
    let msg = match since {
        Some((epoch, seq)) => format!(
            r#"{{"op":"subscribe","topics":["{topic}"],"since":{{"{topic}":{{"epoch":{epoch},"seq":{seq}}}}}}}"#
        ),
        None => format!(r#"{{"op":"subscribe","topics":["{topic}"]}}"#),
    };
    ws.send(Message::text(msg)).unwrap();
    let mut early = Vec::new();
    loop {
        match read_incoming(ws) {
            Incoming::Reply(v) => return (v, early),
            Incoming::Pub(e) => early.push(e),
        }
    }
}

pub fn read_marker(ws: &mut Ws) -> (String, u64, u64) {
    marker_of(ws.read().expect("a marker"))
}

pub fn marker_of(m: Message) -> (String, u64, u64) {
    match m {
        Message::Text(t) => {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            assert_eq!(v["op"], "snapshot", "{t}");
            (
                v["topic"].as_str().unwrap().to_owned(),
                v["epoch"].as_u64().unwrap(),
                v["seq"].as_u64().unwrap(),
            )
        }
        Message::Binary(b) => {
            assert_eq!(b[0], 2, "kind: snapshot");
            let n = u16::from_be_bytes([b[2], b[3]]) as usize;
            assert_eq!(b.len(), 20 + n, "a marker has no payload");
            (
                String::from_utf8(b[20..].to_vec()).unwrap(),
                u64::from_be_bytes(b[4..12].try_into().unwrap()),
                u64::from_be_bytes(b[12..20].try_into().unwrap()),
            )
        }
        other => panic!("{other:?}"),
    }
}
