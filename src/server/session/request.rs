//! Requests: where each goes (routing), and the WebSocket upgrade that
//! gives an open connection its role.

use super::{Ctx, Phase, Publisher, Role, Session, subscriber};
use crate::proto::WsConn;
use crate::proto::deflate;
use crate::proto::handshake::{
    HeadScanner, MAX_HEADERS, Reject, Request, Status, check_host, choose_subprotocol, parse_head,
    validate_upgrade, write_switching_protocols_with,
};
use crate::proto::rate::TokenBucket;
use crate::pubsub::envelope::{Form, JSON_PROTOCOL, PUBLISHER_PROTOCOLS, SUBSCRIBER_PROTOCOLS};
use crate::pubsub::pattern;
use crate::pubsub::shard::SubList;
use crate::pubsub::topic::{self, TopicError};
use crate::server::config::Config;
use crate::server::{auth, http};
use bytes::Bytes;
use std::sync::Arc;

/// Where a request goes.
enum Route<'p> {
    Upgrade(Upgrade<'p>),
    Publish(&'p str),
    /// `DELETE /publish/{topic}`: its retained history and last value.
    Delete(&'p str),
    /// `/metrics` or `/healthz` on the main port.
    Admin,
}

enum Upgrade<'p> {
    Echo,
    Subscribe,
    Publish(&'p str),
}

fn route<'p>(req: &Request<'p, '_>, cfg: &Config) -> Result<Route<'p>, Reject> {
    let admin_here = cfg.admin_listen.is_none();
    match req.path {
        "/echo" => Ok(Route::Upgrade(Upgrade::Echo)),
        "/ws" => Ok(Route::Upgrade(Upgrade::Subscribe)),
        "/metrics" | "/healthz" if admin_here => Ok(Route::Admin),
        p => match p.strip_prefix("/publish/") {
            Some(t) if req.method == "POST" => Ok(Route::Publish(t)),
            Some(t) if req.method == "GET" => Ok(Route::Upgrade(Upgrade::Publish(t))),
            Some(t) if req.method == "DELETE" => Ok(Route::Delete(t)),
            Some(_) => Err(Reject::method(
                "publish with POST or a WebSocket (GET), delete a topic's history with DELETE",
                "GET, POST, DELETE",
            )),
            None if !IMPLEMENTED.contains(&req.method) => Err(Reject::new(
                Status::NotImplemented,
                "method not implemented here (GET, HEAD, POST and DELETE are)",
            )),
            None => Err(Reject::new(Status::NotFound, "no such endpoint")),
        },
    }
}

/// The methods some endpoint takes. Another on a path that is no endpoint
/// (`OPTIONS *`, `CONNECT host:port`, `PUT /x`) is answered `501` (RFC 9110
/// §15.6.2); on an endpoint, `405` naming the ones it takes.
const IMPLEMENTED: [&str; 4] = ["GET", "HEAD", "POST", "DELETE"];

pub(super) fn topic_reject(e: TopicError) -> Reject {
    Reject::new(
        Status::BadRequest,
        match e {
            TopicError::Empty => "empty topic name",
            TopicError::TooLong { .. } => "topic name too long (see --max-topic-len)",
            TopicError::BadChar(_) => "bad topic name; allowed: A-Z a-z 0-9 - _ . : / @ ~",
            TopicError::Pattern => "cannot publish to a pattern (a * or > token): name one topic",
            TopicError::BadWildcard => {
                "bad pattern: * and > stand for whole .-separated tokens, > only last"
            }
        },
    )
}

/// A request refused for its token (counted): `401`, or `403` for a right
/// the token lacks.
pub(super) fn refuse(why: auth::Refusal, ctx: &Ctx<'_>) -> Reject {
    ctx.stats.auth_refused(why);
    let status = if why.forbidden() {
        Status::Forbidden
    } else {
        Status::Unauthorized
    };
    Reject::new(status, why.reason())
}

/// May this request publish to (or delete) topic `name`? Without tokens
/// on, `--publish-token` decides as before. With tokens on: the
/// `--publish-token` itself, if set, may publish anywhere (a back end's
/// credential); any other request needs a token (`401`) whose rights cover
/// `name` (`403`; a bad name is `400` before that). Returns the token's
/// grant.
pub(super) fn authorize_publish(
    req: &Request<'_, '_>,
    name: &str,
    ctx: &Ctx<'_>,
) -> Result<Option<Arc<auth::Grant>>, Reject> {
    let cfg = &ctx.shared.config;
    let Some(verifier) = ctx.shared.verifier() else {
        check_publisher(req, cfg)?;
        return Ok(None);
    };
    let authorization = req.header("authorization").ok().flatten();
    if let Some(token) = &cfg.publish_token
        && http::authorized(token, authorization, req.query)
    {
        return Ok(None);
    }
    let token = auth::token_of(authorization, req.query)
        .ok_or_else(|| refuse(auth::Refusal::Missing, ctx))?;
    let grant = ctx
        .shared
        .verify(&verifier, token, ctx.wall_s)
        .map_err(|why| refuse(why, ctx))?;
    topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
    if !grant.may_publish(name) {
        return Err(refuse(auth::Refusal::Forbidden, ctx));
    }
    Ok(Some(Arc::new(grant)))
}

/// May this subscriber subscribe to `names` (topics and patterns)? With
/// tokens on: a token whose rights cover every name (`401` without one,
/// unless `--anonymous-subscribe`; `403` for a name not covered). Returns
/// the token's grant.
fn authorize_subscribe(
    req: &Request<'_, '_>,
    names: &[&str],
    ctx: &Ctx<'_>,
) -> Result<Option<Arc<auth::Grant>>, Reject> {
    let Some(verifier) = ctx.shared.verifier() else {
        return Ok(None);
    };
    let authorization = req.header("authorization").ok().flatten();
    let Some(token) = auth::token_of(authorization, req.query) else {
        return if anonymous_may_subscribe(names, &verifier, ctx) {
            Ok(None)
        } else {
            Err(refuse(auth::Refusal::Missing, ctx))
        };
    };
    let grant = ctx
        .shared
        .verify(&verifier, token, ctx.wall_s)
        .map_err(|why| refuse(why, ctx))?;
    if names.iter().any(|n| !grant.may_subscribe(n)) {
        return Err(refuse(auth::Refusal::Forbidden, ctx));
    }
    Ok(Some(Arc::new(grant)))
}

/// May a subscriber without a token subscribe to every one of `names`
/// (`--anonymous-subscribe`, and the namespaces' `anonymous-subscribe`)?
pub(super) fn anonymous_may_subscribe<S: AsRef<str>>(
    names: &[S],
    verifier: &auth::Verifier,
    ctx: &Ctx<'_>,
) -> bool {
    let namespaces = ctx.shared.directory.namespaces();
    names.iter().all(|n| {
        crate::pubsub::policy::anonymous_may_subscribe(
            &namespaces,
            n.as_ref(),
            verifier.anonymous_subscribe(),
        )
    })
}

pub(super) fn check_publisher(req: &Request<'_, '_>, cfg: &Config) -> Result<(), Reject> {
    let Some(token) = &cfg.publish_token else {
        return Ok(());
    };
    let authorization = req.header("authorization").ok().flatten();
    if http::authorized(token, authorization, req.query) {
        Ok(())
    } else {
        Err(Reject::new(
            Status::Unauthorized,
            "publisher token missing or wrong",
        ))
    }
}

/// The query parameters the server reads, each of which a request may
/// give once.
const PARAMS: [&str; 5] = ["topics", "token", "key", "confirm", "max_rate"];

/// The header fields the server reads as one value, each of which a
/// request may give once (`Content-Length`, `Host` and the WebSocket
/// fields are checked where they are read).
const SINGLE_HEADERS: [(&str, &str); 2] = [
    ("authorization", "duplicate Authorization header"),
    ("content-type", "duplicate Content-Type header"),
];

/// Refuses a request that gives a parameter or field the server reads
/// twice, or a token both ways with two values: parsers differ on which
/// one counts, so a proxy checking the request could read another than
/// the server (outside probe: `?token=GOOD&token=NONE` was taken, the
/// reverse refused; two `Authorization` fields were answered `401 token
/// required`). The same rule as the control messages' repeated keys.
fn refuse_repeats(req: &Request<'_, '_>) -> Result<(), Reject> {
    if let Some(name) = topic::repeated_param(req.query, &PARAMS) {
        return Err(Reject::new(
            Status::BadRequest,
            match name {
                "topics" => "duplicate query parameter: topics (list them in one: topics=a,b)",
                "token" => "duplicate query parameter: token",
                "key" => "duplicate query parameter: key",
                "confirm" => "duplicate query parameter: confirm",
                _ => "duplicate query parameter: max_rate",
            },
        ));
    }
    for (name, reason) in SINGLE_HEADERS {
        if req.header(name).is_err() {
            return Err(Reject::new(Status::BadRequest, reason));
        }
    }
    let authorization = req.header("authorization").ok().flatten();
    if let Some(query_token) = topic::query_param(req.query, "token")
        && let Some(header_token) = auth::token_of(authorization, None)
        && header_token != query_token
    {
        return Err(Reject::new(
            Status::BadRequest,
            "two different tokens (Authorization and ?token=): send one",
        ));
    }
    Ok(())
}

/// Does the client want the connection kept open after this request?
/// HTTP/1.1 unless it says `close`; HTTP/1.0 never (its keep-alive needs a
/// `Connection: keep-alive` in every answer, which ours, HTTP/1.1 answers,
/// do not carry: such a client is answered `Connection: close` instead).
pub(super) fn keep_alive(req: &Request<'_, '_>) -> bool {
    req.version == 1 && !req.has_token("connection", "close")
}

impl Session {
    /// Handles a complete request head: upgrade, publish request, metrics.
    pub(super) fn request(&mut self, head: &[u8], ctx: &mut Ctx<'_>) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse_head(head, &mut headers)?;
        if req.version == 1 {
            check_host(&req)?;
        }
        let route = route(&req, cfg)?;
        refuse_repeats(&req)?;
        if !matches!(route, Route::Admin) {
            // A web page of a foreign origin may neither open a WebSocket
            // nor publish through its visitor's browser.
            ctx.shared
                .check_origin(req.header_values("origin"))
                .map_err(|why| {
                    ctx.stats.origin_refused(why);
                    Reject::new(Status::Forbidden, why.reason())
                })?;
        }
        match route {
            Route::Upgrade(up) => self.upgrade(&req, up, ctx),
            Route::Publish(name) => {
                authorize_publish(&req, name, ctx)?;
                self.begin_publish(&req, name, ctx)
            }
            Route::Delete(name) => {
                authorize_publish(&req, name, ctx)?;
                topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
                if req.has_body() {
                    return Err(Reject::new(Status::BadRequest, "DELETE takes no body"));
                }
                if ctx.shared.cluster.is_some() {
                    // The history is the cluster's stream's, not this
                    // node's to drop.
                    return Err(Reject::method(
                        "not in a cluster (--nats-url): the cluster's stream keeps the topic's history",
                        "POST",
                    ));
                }
                let dropped = ctx
                    .shard
                    .directory()
                    .delete_history(name)
                    .ok_or(Reject::new(
                        Status::NotFound,
                        "no such topic: nothing of it is kept",
                    ))?;
                ctx.stats.http_request();
                let ka = keep_alive(&req);
                self.out.push(Bytes::from(format!(
                    "HTTP/1.1 204 No Content\r\nCorecast-Deleted: {dropped}\r\n{}\r\n",
                    if ka { "" } else { "Connection: close\r\n" }
                )));
                self.phase = if ka {
                    Phase::Head {
                        scan: HeadScanner::default(),
                        // Set by the caller once the head is done.
                        requests: 0,
                    }
                } else {
                    Phase::Done
                };
                Ok(())
            }
            Route::Admin => {
                let ka = keep_alive(&req);
                let (shared, now, stats) = (ctx.shared, ctx.now, ctx.stats);
                let cache = &mut *ctx.metrics;
                let render = || match cache {
                    // Pipelined requests in one turn share one rendering.
                    Some((at, body)) if *at == now => body.clone(),
                    _ => {
                        stats.metrics_rendered();
                        cache.insert((now, http::render_metrics(shared))).1.clone()
                    }
                };
                let response =
                    http::admin_response(&req, ka, shared.health(), Some(ctx.stats), render)
                        .expect("routed by path")?;
                self.out.push_copy(&response.head);
                // Shared with the turn's other requests, but charged to
                // this connection like its own bytes: a client pipelining
                // scrapes it does not read holds a new rendering per turn,
                // up to --max-outbound-bytes (reading pauses above it), and
                // the budget must see that across connections.
                self.out.push(response.body);
                self.phase = if ka {
                    Phase::Head {
                        scan: HeadScanner::default(),
                        // Set by the caller once the head is done.
                        requests: 0,
                    }
                } else {
                    Phase::Done
                };
                Ok(())
            }
        }
    }

    /// Validates an upgrade; on success queues the `101` and opens the WebSocket.
    fn upgrade(
        &mut self,
        req: &Request<'_, '_>,
        up: Upgrade<'_>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        let upgrade = validate_upgrade(req)?;
        // permessage-deflate: the first acceptable offer, if enabled.
        let deflate = cfg
            .permessage_deflate
            .then(|| deflate::negotiate(req.header_values("sec-websocket-extensions")))
            .flatten();
        let mut subprotocol = choose_subprotocol(req, &cfg.subprotocols);
        let mut snapshots = Vec::new();
        let role = match up {
            Upgrade::Echo => Role::Echo,
            Upgrade::Publish(name) => {
                ctx.grant = authorize_publish(req, name, ctx)?;
                topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
                let key =
                    topic::key_of(req.query).map_err(|why| Reject::new(Status::BadRequest, why))?;
                subprotocol = subprotocol.or_else(|| choose_subprotocol(req, &PUBLISHER_PROTOCOLS));
                Role::Publisher(Box::new(Publisher {
                    topic: Some(ctx.shard.directory().entry(name)),
                    acks: subprotocol == Some(JSON_PROTOCOL),
                    key,
                    pace: TokenBucket::full(cfg.max_publish_rate, ctx.now_ms),
                }))
            }
            Upgrade::Subscribe => {
                let list = topic::from_query(req.query).unwrap_or("");
                let names = topic::parse_list(list, cfg.max_topic_len, cfg.max_topics_per_conn)
                    .map_err(|e| match e {
                        topic::ListError::Name(e) => topic_reject(e),
                        topic::ListError::TooMany { .. } => Reject::new(
                            Status::BadRequest,
                            "too many topics for one connection (see --max-topics-per-conn)",
                        ),
                    })?;
                // `--subprotocol`'s names first (raw payloads, the
                // application's own protocol), then the envelopes.
                subprotocol =
                    subprotocol.or_else(|| choose_subprotocol(req, &SUBSCRIBER_PROTOCOLS));
                // Compressed publications for a subscriber that agreed to
                // permessage-deflate with the full window: the shared
                // frames use it (a smaller window gets them uncompressed).
                let full_window = deflate.is_some_and(|a| a.agreed.server_window_bits == 15);
                let form = Form::of_subprotocol(subprotocol).deflated(full_window);
                let mut rate = None;
                if let Some(r) = topic::query_param(req.query, "max_rate") {
                    let per_second = r
                        .parse::<u32>()
                        .ok()
                        .filter(|&r| r <= crate::pubsub::control::MAX_RATE)
                        .ok_or(Reject::new(
                            Status::BadRequest,
                            "max_rate must be an integer from 0 (no limit) to 1000 updates per second",
                        ))?;
                    rate = Some(per_second);
                }
                let names: Vec<&str> = names.iter().map(|n| n.as_ref()).collect();
                ctx.grant = authorize_subscribe(req, &names, ctx)?;
                let patterns = names.iter().filter(|n| pattern::is_pattern(n)).count();
                if patterns > cfg.max_patterns_per_conn {
                    return Err(Reject::new(
                        Status::BadRequest,
                        "too many patterns for one connection (see --max-patterns-per-conn)",
                    ));
                }
                let new_patterns = names
                    .iter()
                    .filter(|n| pattern::is_pattern(n) && ctx.shard.pattern_id(n).is_none())
                    .count();
                if (patterns > 0 && ctx.shard.admit_scans(ctx.now_ms).is_err())
                    || (new_patterns > 0
                        && ctx.shard.admit_patterns(new_patterns, ctx.now_ms).is_err())
                {
                    return Err(Reject::new(
                        Status::TooManyRequests,
                        "patterns changing too fast on this worker: try again",
                    ));
                }
                let mut subs = SubList::new(form);
                // Last values: at most half a queue for the whole list.
                let mut cap_left = cfg.max_outbound_bytes / 2;
                let (frames, _) = subscriber::subscribe_names(
                    &names,
                    &[],
                    &[],
                    &mut subs,
                    &mut cap_left,
                    ctx,
                    &mut 0,
                );
                snapshots = frames;
                if rate.is_some() {
                    // The query's rate is its topics'.
                    ctx.rated = Some((rate, names.iter().map(|n| n.to_string()).collect()));
                }
                Role::Subscriber { subs }
            }
        };
        let mut response = Vec::with_capacity(192);
        let extension = deflate.map(|a| a.agreed.response(a.offered_server_bits));
        write_switching_protocols_with(
            &mut response,
            upgrade.key,
            subprotocol,
            extension.as_deref(),
        );
        self.out.push(Bytes::from(response));
        // Each topic's last value (marker and message), right after the 101.
        for f in &snapshots {
            self.out.push_frame(f);
        }
        ctx.stats.handshake_accepted();
        let limits = match role {
            Role::Subscriber { .. } => &ctx.shared.subscriber_limits,
            _ => &ctx.shared.ws_limits,
        };
        let mut ws = WsConn::with_limits(Arc::clone(limits), ctx.now_ms);
        ws.set_deflate(deflate.map(|a| a.agreed));
        self.phase = Phase::Ws { ws, role };
        Ok(())
    }
}
