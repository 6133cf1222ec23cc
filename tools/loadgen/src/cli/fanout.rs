//! The `fanout` subcommand's flags and their validation into a
//! [`FanoutPlan`]: publish mode, payload size, topics, publishers.

use super::common::CommonArgs;
use super::plan::{FanoutPlan, PublishMode, Work};
use super::{MAX_MESSAGES, MAX_RATE, MAX_TOPICS, resolve, secs, size};
use crate::client;
use crate::topics::TopicDist;
use crate::url::{self, WsUrl};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct FanoutCmd {
    /// Subscribers' URL(s), e.g. ws://HOST:PORT/ws?topics=T; --connections of them.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Publisher URL: ws://HOST:PORT/publish/T (a WebSocket publisher) or
    /// http://HOST:PORT/publish/T (POST, keep-alive, pipelined). Repeat for
    /// several servers: every message goes to each publish URL once.
    #[arg(long, value_parser = url::parse_any, value_name = "URL", required = true)]
    pub publish_url: Vec<WsUrl>,

    /// A cluster: each message goes to ONE of the publish URLs, in turn
    /// (message i to URL i mod n), instead of to each: publishers on every
    /// node of one cluster. The order each topic is delivered in is then
    /// the cluster's (one order per topic, the same at every subscriber),
    /// which need not be the send order across URLs: `reordered` counts
    /// those interleavings, not faults.
    #[arg(long)]
    pub publish_spread: bool,

    /// Burst mode: publish K messages as fast as the server takes them.
    #[arg(long, value_name = "K", required_unless_present = "rate", conflicts_with_all = ["rate", "duration"])]
    pub messages: Option<u64>,

    /// Rate mode: messages per second (over all topics), for --duration seconds.
    #[arg(long, value_name = "R", requires = "duration")]
    pub rate: Option<f64>,

    /// Rate mode: seconds to publish for.
    #[arg(long, value_name = "SECS", requires = "rate")]
    pub duration: Option<u64>,

    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Publish text messages from FILE instead: one JSON object per line,
    /// used round-robin, each with the sequence number and send time put
    /// in front of its fields (e.g. tools/loadgen/corpus/quotes-1k.jsonl).
    #[arg(long, value_name = "FILE", conflicts_with = "size")]
    pub corpus: Option<std::path::PathBuf>,

    /// Offer permessage-deflate (RFC 7692) in the subscribers' upgrades and
    /// accept compressed frames; the report says how many agreed.
    #[arg(long)]
    pub permessage_deflate: bool,

    /// Only subscribers whose index is a multiple of N decode (and inflate)
    /// what they receive and check it (loss, order, content, latency); the
    /// others count frames and bytes, so the client's inflating does not
    /// decide the figures. 1: every subscriber checks.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub verify_every: usize,

    /// Topics: subscriber and publish URLs carry `{topic}`, replaced by
    /// 0..T; messages go to the topics round-robin.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub topics: usize,

    /// How subscribers spread over the topics: uniform or zipf:S.
    #[arg(long, default_value = "uniform", value_name = "DIST")]
    pub topic_dist: TopicDist,

    /// Seconds to wait for deliveries after the last publish.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub drain_timeout: u64,

    /// corecast metrics to read before and after (repeatable, e.g.
    /// http://HOST:PORT/metrics): the report gives the server's own count
    /// of frames sent (corecast_frames_sent_total) beside frames received.
    #[arg(long, value_parser = url::parse_http, value_name = "URL")]
    pub metrics_url: Vec<WsUrl>,
}

impl FanoutCmd {
    /// The plan: the common flags', with the fanout work and the
    /// subscribers' permessage-deflate offer.
    pub(super) fn plan(&self, limits: super::Limits) -> Result<super::Plan, String> {
        let mut plan = self.common.plan(self.work()?, limits)?;
        plan.connect.permessage_deflate = self.permessage_deflate;
        Ok(plan)
    }

    pub(super) fn work(&self) -> Result<Work, String> {
        let mode = match (self.messages, self.rate, self.duration) {
            (Some(k), None, None) => {
                if k == 0 || k > MAX_MESSAGES {
                    return Err(format!(
                        "--messages {k}: must be between 1 and {MAX_MESSAGES}"
                    ));
                }
                PublishMode::Burst { messages: k }
            }
            (None, Some(r), Some(t)) => {
                if !(r > 0.0 && r <= MAX_RATE) {
                    return Err(format!(
                        "--rate {r}: must be above 0 and at most {MAX_RATE}"
                    ));
                }
                let mode = PublishMode::Rate {
                    per_s: r,
                    duration: secs("duration", t, 1)?,
                };
                if mode.messages() == 0 || mode.messages() > MAX_MESSAGES {
                    return Err(format!(
                        "--rate {r} --duration {t} publishes {} messages: must be between 1 and {MAX_MESSAGES}",
                        mode.messages()
                    ));
                }
                mode
            }
            _ => return Err("give either --messages K, or --rate R with --duration T".into()),
        };
        if self.topics == 0 || self.topics > MAX_TOPICS {
            return Err(format!(
                "--topics {}: must be between 1 and {MAX_TOPICS}",
                self.topics
            ));
        }
        let placeholder = |u: &WsUrl| u.target.contains(client::TOPIC_PLACEHOLDER);
        if self.topics > 1
            && let Some(u) = self
                .common
                .url
                .iter()
                .chain(&self.publish_url)
                .find(|u| !placeholder(u))
        {
            return Err(format!(
                "--topics {}: {u} has no {{topic}} in its path (e.g. /ws?topics=t{{topic}} \
                 and /publish/t{{topic}})",
                self.topics
            ));
        }
        if self.publish_url.iter().any(|u| u.http) && self.publish_url.iter().any(|u| !u.http) {
            return Err("--publish-url: all ws:// or all http://, not both".into());
        }
        if self.verify_every == 0 {
            return Err("--verify-every must be at least 1".into());
        }
        let corpus = self
            .corpus
            .as_deref()
            .map(crate::payload::Corpus::load)
            .transpose()?;
        if corpus.is_some() && self.common.subprotocol.is_some() {
            return Err("--corpus: raw text payloads only, without --subprotocol".into());
        }
        Ok(Work::Fanout(FanoutPlan {
            publish: resolve(&self.publish_url)?,
            mode,
            size: match &corpus {
                Some(c) => c.mean_len(),
                None => size(self.size)?,
            },
            topics: self.topics,
            topic_dist: self.topic_dist,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
            metrics: self.metrics_url.clone(),
            corpus,
            verify_every: self.verify_every,
            spread: self.publish_spread,
        }))
    }
}
