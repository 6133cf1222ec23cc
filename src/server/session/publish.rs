//! `POST /publish/{topic}`: the head's checks, the body, and the
//! publication it becomes.

use super::request::{keep_alive, topic_reject};
use super::{Ctx, Phase, Session, encode};
use crate::proto::MessageKind;
use crate::proto::handshake::{HeadScanner, Reject, Request, Status};
use crate::pubsub::remote::Refused;
use crate::pubsub::topic;
use crate::server::stats::WorkerStats;
use crate::server::{cluster, http};
use bytes::Bytes;

#[derive(Debug)]
pub(super) struct BodyState {
    pub(super) topic: Box<str>,
    /// Its conflation key (`?key=`), if any.
    pub(super) key: Option<std::sync::Arc<str>>,
    pub(super) kind: MessageKind,
    /// In a cluster, `?confirm=1`: the answer waits for the stream's number.
    pub(super) confirm: bool,
    pub(super) len: usize,
    pub(super) keep_alive: bool,
    pub(super) body: Vec<u8>,
    /// Requests completed on the connection, this one's head included.
    pub(super) requests: u32,
}

impl Session {
    /// Checks a `POST /publish/{topic}` head and starts reading its body.
    pub(super) fn begin_publish(
        &mut self,
        req: &Request<'_, '_>,
        name: &str,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Reject> {
        let cfg = &ctx.shared.config;
        topic::validate(name, cfg.max_topic_len).map_err(topic_reject)?;
        let key = topic::key_of(req.query).map_err(|why| Reject::new(Status::BadRequest, why))?;
        let confirm = match topic::query_param(req.query, "confirm") {
            None | Some("0") | Some("false") => false,
            Some("1") | Some("true") => true,
            Some(_) => {
                return Err(Reject::new(
                    Status::BadRequest,
                    "confirm must be 1 (true) or 0 (false)",
                ));
            }
        };
        if !ctx.shared.admission.allow_publish(ctx.peer) {
            ctx.stats.publish_rate_limited();
            return Err(Reject::new(
                Status::TooManyRequests,
                "publishing too fast (see --max-publish-rate)",
            ));
        }
        if req.header_values("transfer-encoding").next().is_some() {
            return Err(Reject::new(
                Status::LengthRequired,
                "Transfer-Encoding is not supported (chunked or any other); send Content-Length",
            ));
        }
        let len = req
            .header("content-length")
            .map_err(|_| Reject::new(Status::BadRequest, "duplicate Content-Length"))?
            .ok_or(Reject::new(
                Status::LengthRequired,
                "Content-Length required",
            ))?;
        let len: usize = std::str::from_utf8(len.trim_ascii())
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            // A number past usize is past the size limit too (413).
            .map(|s| s.parse().unwrap_or(usize::MAX))
            .ok_or(Reject::new(Status::BadRequest, "bad Content-Length"))?;
        if len > cfg.max_message_size {
            return Err(Reject::new(
                Status::PayloadTooLarge,
                "body over the message size limit (see --max-message-size)",
            ));
        }
        let is_text = req
            .header("content-type")
            .ok()
            .flatten()
            .is_some_and(|ct| ct.len() >= 5 && ct[..5].eq_ignore_ascii_case(b"text/"));
        // An HTTP/1.0 client's expectation is ignored (RFC 9110 §10.1.1);
        // an HTTP/1.1 one other than `100-continue` cannot be met (417).
        if req.version == 1 && !expectations_met(req) {
            return Err(Reject::new(
                Status::ExpectationFailed,
                "the only expectation taken is Expect: 100-continue",
            ));
        }
        if len > 0 && req.version == 1 && req.has_token("expect", "100-continue") {
            self.answer_published(ctx);
            self.out.push(Bytes::from_static(http::CONTINUE));
        }
        self.phase = Phase::Body(Box::new(BodyState {
            topic: name.into(),
            key,
            kind: if is_text {
                MessageKind::Text
            } else {
                MessageKind::Binary
            },
            confirm,
            len,
            keep_alive: keep_alive(req),
            body: Vec::new(),
            // Set by the caller once the head is done.
            requests: 0,
        }));
        Ok(())
    }

    /// Publishes a complete HTTP body and answers 204 (or 400 for a text
    /// body that is not UTF-8). Leaves the phase at `Head` (keep-alive) or `Done`.
    pub(super) fn finish_publish(&mut self, state: &BodyState, body: &[u8], ctx: &mut Ctx<'_>) {
        if state.kind == MessageKind::Text && simdutf8::basic::from_utf8(body).is_err() {
            self.answer_published(ctx);
            self.refuse(
                Reject::new(Status::BadRequest, "text/* body is not valid UTF-8"),
                ctx.stats,
            );
            return;
        }
        ctx.stats.http_request();
        if let Some(cluster) = ctx.shared.cluster.as_deref() {
            // In a cluster, every publication goes to the cluster (nodes
            // elsewhere may have subscribers, and its history is there),
            // and is numbered there: `204` at once (held for the stream),
            // or, asked with `?confirm=1`, once the stream gave it its
            // number (the connection then takes one request at a time).
            let text = state.kind == MessageKind::Text;
            let me = state.confirm.then(|| cluster::AckTo {
                worker: ctx.shard.worker() as u32,
                conn: ctx.me,
                request: state.requests,
            });
            match cluster::publish_http(cluster, &state.topic, body, text, state.key.clone(), me) {
                Ok(()) if state.confirm => {
                    ctx.stats.message_published();
                    self.phase = Phase::Confirming {
                        keep_alive: state.keep_alive,
                        requests: state.requests,
                    };
                }
                Ok(()) => {
                    ctx.stats.message_published();
                    self.out.push(http::published(state.keep_alive, None));
                    self.answered(state.keep_alive, state.requests);
                }
                Err(Refused::TooLarge) => self.refuse(
                    Reject::new(
                        Status::PayloadTooLarge,
                        "body larger than one NATS message (the cluster's max_payload)",
                    ),
                    ctx.stats,
                ),
                Err(Refused::Busy) => self.refuse(
                    Reject::new(
                        Status::ServiceUnavailable,
                        "the cluster is not taking publications (NATS unreachable or slow, --nats-max-pending reached)",
                    ),
                    ctx.stats,
                ),
            }
            return;
        }
        ctx.stats.message_published();
        // One directory lookup (and a walk of the patterns' trie when the
        // topic is unknown): nobody anywhere subscribed, to the topic or a
        // pattern matching it, means nothing to encode or deliver.
        let directory = ctx.shard.directory();
        let mut steps = 0;
        let topic = directory.get(&state.topic).or_else(|| {
            directory
                .pattern_matches_counted(&state.topic, &mut steps)
                .then(|| directory.entry(&state.topic))
        });
        // The walk counts toward the turn: a pipeline of requests naming
        // new topics against many long patterns yields instead of holding
        // the worker.
        ctx.count_match_steps(steps);
        let numbered = topic.is_some();
        if let Some(topic) = topic {
            let frame = encode(state.kind, body);
            ctx.published = true;
            // Numbered with the other publications of this read (its
            // worker's earlier ones with them), and answered with its
            // number then (`answer_published`).
            ctx.shard
                .publish_owned_acked(topic, frame, ctx.now, ctx.me, state.key.clone());
        }
        ctx.unanswered.push((state.keep_alive, numbered));
        self.answered(state.keep_alive, state.requests);
    }

    /// Answers the `POST /publish` requests of this input not answered yet,
    /// in order: what they published is numbered first (one dispatch for
    /// all of them), so each `204` carries its number. Called before
    /// anything else is answered, and at the end of the input.
    pub(super) fn answer_published(&mut self, ctx: &mut Ctx<'_>) {
        if ctx.unanswered.is_empty() {
            return;
        }
        let mut numbers = if ctx.unanswered.iter().any(|&(_, numbered)| numbered) {
            ctx.shard.dispatch();
            // Finding the workers of topics new to the patterns walked
            // the trie: counted like the walk above.
            let walked = ctx.shard.walked();
            ctx.count_match_steps(walked);
            ctx.shard.take_acks_of(ctx.me).into_iter()
        } else {
            Vec::new().into_iter()
        };
        for (keep_alive, numbered) in ctx.unanswered.drain(..) {
            let n = if numbered { numbers.next() } else { None };
            self.out.push(http::published(keep_alive, n));
        }
    }

    /// Answers the cluster publication this connection waits on
    /// ([`Phase::Confirming`]); `close`: the server is going away, so the
    /// answer is the last. Returns whether the connection reads its next
    /// request (else it is closing once the answer is written).
    pub fn confirm(&mut self, answer: Confirm, close: bool, stats: &WorkerStats) -> bool {
        let Phase::Confirming {
            keep_alive,
            requests,
        } = self.phase
        else {
            return false;
        };
        let keep_alive = keep_alive && !close;
        match answer {
            Confirm::Stored { epoch, seq } => self
                .out
                .push(http::published(keep_alive, Some((epoch, seq)))),
            Confirm::NotYet => self.out.push(http::accepted(keep_alive)),
            Confirm::Refused => {
                self.refuse(
                    Reject::new(
                        Status::ServiceUnavailable,
                        "NATS refused the publication for good (see the server's log)",
                    ),
                    stats,
                );
                return false;
            }
        }
        // Counted on: the deadline that covered this request does not
        // judge the next one (the worker arms a fresh one).
        self.answered(keep_alive, requests.wrapping_add(1));
        if !keep_alive {
            self.pending.clear();
        }
        keep_alive
    }

    /// A request is answered: read the next one, or close.
    fn answered(&mut self, keep_alive: bool, requests: u32) {
        self.phase = if keep_alive {
            Phase::Head {
                scan: HeadScanner::default(),
                requests,
            }
        } else {
            Phase::Done
        };
    }
}

/// How a cluster publication an HTTP publisher waits on ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The stream stored it as number `seq` of `epoch`: `204` with both.
    Stored { epoch: u64, seq: u64 },
    /// Not stored within the request deadline (NATS slow or away): `202`,
    /// the node still holds it and stores it once it can.
    NotYet,
    /// NATS refused it for good: `503`.
    Refused,
}

/// Is every expectation of the request one we meet? `100-continue` is the
/// only one defined (RFC 9110 §10.1.1); any other member of an `Expect`
/// field cannot be met and is answered 417.
fn expectations_met(req: &Request<'_, '_>) -> bool {
    req.header_values("expect").all(|v| {
        v.split(|&b| b == b',').all(|m| {
            let m = m.trim_ascii();
            m.is_empty() || m.eq_ignore_ascii_case(b"100-continue")
        })
    })
}
