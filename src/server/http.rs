//! The plain-HTTP side of the port: response heads for `POST /publish/{topic}`,
//! `GET /metrics` and `GET /healthz`, and the publisher token check. Refusals
//! use [`handshake::error_response`](crate::proto::handshake::error_response).

use super::Shared;
use super::metrics;
use super::stats::WorkerStats;
use crate::proto::handshake::{Reject, Request, Status};
use bytes::Bytes;

/// `Content-Type` of plain-text answers.
const PLAIN: &str = "text/plain; charset=utf-8";

/// An answer to an admin request: the head, and the body (shared: one
/// `/metrics` rendering serves every request of a loop turn).
pub(crate) struct AdminResponse {
    pub head: Vec<u8>,
    /// Empty for `HEAD`.
    pub body: Bytes,
}

/// Answers `GET|HEAD /metrics` and `/healthz` (on the main port or the admin
/// listener); `None` for any other path. `counted` is bumped before the
/// metrics are rendered, so they include this request. `render` returns
/// the metrics body: the caller decides how often it is really rendered
/// (the workers: at most once per loop turn, whatever is pipelined).
///
/// `unhealthy`: why `/healthz` answers `503` instead of `ok`: `draining`
/// (the server is shutting down, from the first SIGINT or SIGTERM, so a
/// load balancer sends no new clients while the open ones are closed), or
/// the cluster's NATS is unreachable ([`Shared::health`]).
pub(crate) fn admin_response(
    req: &Request<'_, '_>,
    keep_alive: bool,
    unhealthy: Option<&'static str>,
    counted: Option<&WorkerStats>,
    render: impl FnOnce() -> Bytes,
) -> Option<Result<AdminResponse, Reject>> {
    let is_metrics = match req.path {
        "/metrics" => true,
        "/healthz" => false,
        _ => return None,
    };
    if req.method != "GET" && req.method != "HEAD" {
        return Some(Err(Reject::method("use GET", "GET, HEAD")));
    }
    if req.has_body() {
        // Answering and reading on would take the body for the next request.
        return Some(Err(Reject::new(
            Status::BadRequest,
            "GET and HEAD take no body here",
        )));
    }
    if let Some(why) = unhealthy.filter(|_| !is_metrics) {
        return Some(Err(Reject::new(Status::ServiceUnavailable, why)));
    }
    if let Some(stats) = counted {
        stats.http_request();
    }
    let (content_type, body) = if is_metrics {
        (metrics::CONTENT_TYPE, render())
    } else {
        (PLAIN, Bytes::from_static(b"ok\n"))
    };
    let head = ok_head(content_type, body.len(), keep_alive);
    let body = if req.method == "HEAD" {
        Bytes::new()
    } else {
        body
    };
    Some(Ok(AdminResponse { head, body }))
}

/// The metrics as `/metrics` serves them.
pub(crate) fn render_metrics(shared: &Shared) -> Bytes {
    let mut s = metrics::render(&shared.stats, shared.directory.len(), shared.bus.stranded());
    let d = &shared.directory;
    let h = d.history_memory();
    metrics::render_history(
        &mut s,
        h.bytes(),
        h.entries(),
        d.retained_len(),
        h.evicted_for_memory(),
        h.too_large(),
    );
    let reloads = shared
        .reloads
        .each_ref()
        .map(|r| r.load(std::sync::atomic::Ordering::Relaxed));
    let panics = shared
        .panics
        .each_ref()
        .map(|r| r.load(std::sync::atomic::Ordering::Relaxed));
    let process = metrics::Process {
        draining: shared.shutdown.load(std::sync::atomic::Ordering::Acquire),
        max_connections: shared.admission.current().max_connections,
        max_buffered_bytes: shared.config.max_buffered_bytes,
    };
    metrics::render_process(
        &mut s,
        process,
        shared.tls.as_ref().map(|c| c.not_after()),
        reloads,
        panics,
    );
    if shared.auth.is_some() {
        metrics::render_jwks(&mut s, shared.jwks.fetches(), shared.jwks.last_ok_s());
    }
    if let Some(c) = &shared.cluster {
        metrics::render_cluster(&mut s, c.is_up(), c.pending_bytes(), &c.stats);
    }
    Bytes::from(s)
}

/// The answer to an accepted publish: `204 No Content`, with the epoch and
/// sequence number the message was given (`Corecast-Epoch`,
/// `Corecast-Seq`) when the topic numbered it.
pub fn published(keep_alive: bool, numbered: Option<(u64, u64)>) -> Bytes {
    match numbered {
        None => Bytes::from_static(no_content(keep_alive)),
        Some((epoch, seq)) => Bytes::from(format!(
            "HTTP/1.1 204 No Content\r\nCorecast-Epoch: {epoch}\r\nCorecast-Seq: {seq}\r\n{}\r\n",
            if keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        )),
    }
}

/// `202 Accepted`: in a cluster, a publication the node holds for the
/// stream that did not store it within the request deadline (it is stored
/// once NATS takes it, or counted as abandoned if the node stops first).
pub fn accepted(keep_alive: bool) -> Bytes {
    Bytes::from_static(if keep_alive {
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    } else {
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    })
}

/// `204 No Content`, the answer to an accepted publish.
pub fn no_content(keep_alive: bool) -> &'static [u8] {
    if keep_alive {
        b"HTTP/1.1 204 No Content\r\n\r\n"
    } else {
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The head of a `200 OK` with a body of `len` bytes.
pub fn ok_head(content_type: &str, len: usize, keep_alive: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nCache-Control: no-store\r\n"
    );
    if !keep_alive {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Does the request carry `token`, as `Authorization: Bearer <token>` or a
/// `token=` query parameter? Compared in constant time.
pub fn authorized(token: &str, authorization: Option<&[u8]>, query: Option<&str>) -> bool {
    let bearer = authorization
        .and_then(|v| {
            let v = v.trim_ascii();
            let (scheme, rest) = v.split_at(v.len().min(7));
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then_some(rest.trim_ascii())
        })
        .is_some_and(|t| constant_time_eq(t, token.as_bytes()));
    let in_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    bearer || in_query
}

/// Equality whose time depends on the lengths only, not on where bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(authorized("s3", Some(b"Bearer s3"), None));
        assert!(authorized("s3", Some(b"bearer   s3 "), None));
        assert!(!authorized("s3", Some(b"Bearer s4"), None));
        assert!(!authorized("s3", Some(b"Basic s3"), None));
        assert!(!authorized("s3", Some(b"Bearer"), None));
        assert!(authorized("s3", None, Some("a=1&token=s3")));
        assert!(!authorized("s3", None, Some("token=s")));
        assert!(!authorized("s3", None, None));
    }

    #[test]
    fn responses() {
        let r = String::from_utf8(ok_head("text/plain", 3, false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 3\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        assert!(!String::from_utf8_lossy(no_content(true)).contains("close"));
    }
}
