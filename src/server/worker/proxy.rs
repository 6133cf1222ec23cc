//! The PROXY protocol header on a listener that expects one
//! (`--proxy-protocol`, `--plain-proxy-protocol`): the first bytes of each
//! connection, before TLS and before the request, name the client the
//! balancer accepted. The backend hands them here before anything else
//! reads them; once the header is whole the connection is admitted by the
//! client's address (the per-address limits, the publish rate), and the
//! bytes after it go on to TLS or the session as on any connection.

use super::*;
use crate::proto::proxy::{self, MAX_HEADER, Source};

/// What [`Core::proxy_header`] made of a connection's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The header is not whole yet: keep the bytes (at most
    /// [`MAX_HEADER`]) and offer them again with what follows.
    Wait,
    /// The header took this many bytes; what follows is the client's.
    Done(usize),
    /// Refused (no header, a malformed one, or the client's address over
    /// a per-address limit): the queue holds a plain-text answer, the
    /// connection is closing, and nothing more of its input is read. A TLS
    /// backend drops the connection's TLS session so that the answer goes
    /// out as it is.
    Refused,
}

impl<S> Core<S> {
    /// Do this worker's connections start with a PROXY protocol header?
    /// Workers `0..tls_workers` serve the main listener, the rest
    /// `--plain-listen`.
    pub(super) fn expects_proxy(&self) -> bool {
        let config = &self.shared.config;
        if self.id < self.shared.tls_workers {
            config.proxy_protocol
        } else {
            config.plain_proxy_protocol
        }
    }

    /// Judges the first bytes of `key`'s connection, which
    /// [`Conn::awaits_proxy`]: `buf` is everything received so far (what
    /// an earlier [`Header::Wait`] kept, then the new bytes). Linear in the
    /// header, which is at most [`MAX_HEADER`] bytes.
    pub fn proxy_header(&mut self, key: usize, buf: &[u8]) -> Header {
        let judged = &buf[..buf.len().min(MAX_HEADER)];
        let (source, n) = match proxy::parse(judged) {
            Ok(None) => return Header::Wait,
            Ok(Some(header)) => header,
            Err(why) => {
                let stats = &self.shared.stats[self.id];
                stats.proxy_refused(why);
                debug!(
                    worker = self.id,
                    reason = why.label(),
                    "PROXY header refused"
                );
                let conn = &mut self.conns[key];
                conn.set_flag(AWAIT_PROXY, false);
                conn.session.clear_pending();
                conn.session
                    .refuse(Reject::new(Status::BadRequest, why.reason()), stats);
                self.start_closing(key);
                return Header::Refused;
            }
        };
        let conn = &mut self.conns[key];
        conn.set_flag(AWAIT_PROXY, false);
        conn.session.clear_pending();
        // v1 UNKNOWN, v2 LOCAL (the balancer's own health check) and other
        // families name no client: the process-wide cap, already counted,
        // is all that applies.
        let peer = match source {
            Source::Client(addr) => Some(addr.ip()),
            Source::Unknown => None,
        };
        match self.shared.admission.admit_address(peer) {
            Ok(ticket) => {
                if let (true, Some(ip)) = (ticket.per_ip, peer) {
                    self.addresses.insert(key, ip);
                }
                Header::Done(n)
            }
            Err(why) => {
                // Still counted against the process cap (ADMITTED): released
                // when the entry retires, like any connection.
                self.refuse_admission(key, why, peer);
                Header::Refused
            }
        }
    }
}
