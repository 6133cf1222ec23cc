//! One non-blocking WebSocket client connection: connect from a chosen
//! source address, send the upgrade request, verify the `101` (status line,
//! `Upgrade`, `Connection`, `Sec-WebSocket-Accept`), then read server frames
//! and answer pings and closes with masked frames.
//!
//! The protocol work is corecast's: [`accept_key`] for the accept value,
//! [`parse_header`] and [`client_frame`] for framing. The socket is a mio
//! stream registered edge-triggered by the caller (see `fleet`).
//!
//! [`accept_key`]: corecast::proto::handshake::accept_key
//! [`parse_header`]: corecast::proto::frame::parse_header
//! [`client_frame`]: corecast::proto::frame::client_frame
//!
//! Here: the generator of keys and masks ([`Rng`]) and why a connection did
//! not open ([`Failure`]) or ended ([`End`]). `handshake` renders the
//! upgrade request and checks the 101, `frames` splits the server's bytes
//! into frames, and `conn` is the connection itself ([`Conn`]: connect,
//! drive, answer, close, flush).

mod conn;
mod frames;
mod handshake;
pub mod tls;

pub use conn::{Conn, Counters, NoSink, Sink, Step, inflate};
pub use frames::MAX_FRAME_PAYLOAD;
pub use handshake::{RequestTemplate, TOPIC_PLACEHOLDER, set_offered};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::io;

/// A small, fast, non-cryptographic generator (SplitMix64) for
/// `Sec-WebSocket-Key`s and mask keys. RFC 6455 asks for unpredictable masks
/// to protect intermediaries; a load generator on loopback only needs them
/// to vary.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Seeded from the clock and the process id.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::new(t ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    /// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64-encoded.
    pub fn ws_key(&mut self) -> [u8; 24] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        raw[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        let mut key = [0u8; 24];
        let n = BASE64
            .encode_slice(raw, &mut key)
            .expect("16 bytes encode to 24");
        debug_assert_eq!(n, 24);
        key
    }
}

/// Why a connection did not open. [`Failure::key`] names the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// socket/bind/connect failed, or the TCP handshake did.
    Connect(io::ErrorKind),
    /// The server answered with a status other than 101.
    Status(u16),
    /// A 101 whose Sec-WebSocket-Accept is missing or wrong.
    BadAccept,
    /// A malformed or non-conforming response head.
    BadResponse(&'static str),
    /// EOF before a complete response head.
    ClosedBeforeResponse,
    /// A read or write error during the handshake.
    Io(io::ErrorKind),
    /// No verified 101 within the handshake timeout (or the connect phase ended).
    Timeout,
}

impl Failure {
    /// The counter this failure is reported under.
    pub fn key(&self) -> String {
        match self {
            Self::Connect(kind) => format!("connect_error:{kind:?}"),
            Self::Status(code) => format!("handshake_status_{code}"),
            Self::BadAccept => "bad_accept".into(),
            Self::BadResponse(why) => format!("bad_response:{why}"),
            Self::ClosedBeforeResponse => "closed_before_response".into(),
            Self::Io(kind) => format!("handshake_io_error:{kind:?}"),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// How an open connection ended. [`End::key`] names the counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// We sent a close, the server answered and closed the TCP connection.
    Clean,
    /// The server sent a close frame first (with its code, if any).
    ServerClosed(Option<u16>),
    /// The TCP connection ended without a close handshake.
    Eof,
    /// A socket error.
    Io(io::ErrorKind),
    /// The server broke the protocol.
    Protocol(&'static str),
}

impl End {
    pub fn key(&self) -> String {
        match self {
            Self::Clean => "clean_close".into(),
            Self::ServerClosed(Some(code)) => format!("server_close_{code}"),
            Self::ServerClosed(None) => "server_close_no_code".into(),
            Self::Eof => "eof_without_close".into(),
            Self::Io(kind) => format!("io_error:{kind:?}"),
            Self::Protocol(why) => format!("protocol_error:{why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keys_name_the_cause() {
        assert_eq!(Failure::Status(404).key(), "handshake_status_404");
        assert_eq!(
            Failure::Connect(io::ErrorKind::ConnectionRefused).key(),
            "connect_error:ConnectionRefused"
        );
        assert_eq!(Failure::Timeout.key(), "timeout");
        assert_eq!(End::ServerClosed(Some(1001)).key(), "server_close_1001");
    }

    #[test]
    fn keys_are_valid_and_vary() {
        let mut rng = Rng::new(7);
        let (a, b) = (rng.ws_key(), rng.ws_key());
        assert_ne!(a, b);
        assert_eq!(BASE64.decode(a).unwrap().len(), 16);
    }
}
