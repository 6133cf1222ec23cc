//! The `storm` subcommand's flags and their validation into a
//! [`StormPlan`]: the subscribers' topics (their URL's `topics=`), one or
//! more publishers per topic, the publishing rate, and when and how the
//! subscribers drop and come back.

use super::common::{CommonArgs, Limits, default_source_addrs};
use super::plan::{DropMode, Plan, StormPlan, Target, Work};
use super::{MAX_MESSAGES, MAX_RATE, resolve, secs, size};
use crate::client::TOPIC_PLACEHOLDER;
use crate::storm::request::{MAX_TOPICS, publish_topic, topics_of};
use crate::url::{self, WsUrl};
use clap::Args;
use corecast::pubsub::envelope::{BINARY_PROTOCOL, JSON_PROTOCOL};
use std::time::Duration;

/// Longest reconnect jitter accepted, in milliseconds.
const MAX_JITTER_MS: u64 = 600_000;

#[derive(Debug, Clone, Args)]
pub struct StormCmd {
    /// Subscribers' URL(s), ws://HOST:PORT/ws?topics=A,B: every subscriber
    /// holds every topic of the list (the same list in each --url);
    /// --connections of them. --subprotocol: corecast.v1 (default) or
    /// corecast.v1.binary.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Publisher URL ws://HOST:PORT/publish/T, T a topic of the subscribers'
    /// topics= (repeat: at least one per topic; each message of T goes to
    /// every URL of T, e.g. one per server).
    #[arg(long, value_parser = url::parse, value_name = "URL", required = true)]
    pub publish_url: Vec<WsUrl>,

    /// Messages per second to each topic.
    #[arg(long, value_name = "R")]
    pub rate: f64,

    /// Seconds to publish for.
    #[arg(long, default_value_t = 12, value_name = "SECS")]
    pub duration: u64,

    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Seconds from the start of publishing to the drop (default: a third
    /// of --duration).
    #[arg(long, value_name = "SECS")]
    pub drop_at: Option<f64>,

    /// Share of the subscribers that drop, spread evenly over them.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub drop_fraction: f64,

    /// Each dropped subscriber reconnects after a uniform random delay in
    /// [0, J] milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "J")]
    pub reconnect_jitter_ms: u64,

    /// How a subscriber drops: reset (SO_LINGER 0, the server gets an RST)
    /// or close (a FIN; the closed sockets wait in TIME_WAIT, so twice the
    /// default source addresses are bound).
    #[arg(long, value_enum, default_value_t = DropMode::Reset)]
    pub drop_mode: DropMode,

    /// Seconds to wait for the last deliveries after the last publish.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub drain_timeout: u64,
}

impl StormCmd {
    pub(super) fn plan(&self, limits: Limits) -> Result<Plan, String> {
        let subprotocol = match self.common.subprotocol.as_deref() {
            None => JSON_PROTOCOL,
            Some(p) if p == JSON_PROTOCOL || p == BINARY_PROTOCOL => p,
            Some(p) => {
                return Err(format!(
                    "--subprotocol {p}: storm reads envelopes: {JSON_PROTOCOL} or {BINARY_PROTOCOL}"
                ));
            }
        };
        let mut plan = self.common.plan(Work::Storm(self.work()?), limits)?;
        plan.connect.subprotocol = Some(subprotocol.to_string());
        let n = plan.connect.connections;
        if !(0..n).any(|g| crate::storm::selected(g, self.drop_fraction)) {
            return Err(format!(
                "--drop-fraction {} of --connections {n} drops nobody",
                self.drop_fraction
            ));
        }
        // A closed socket's port waits in TIME_WAIT while its replacement
        // takes another: twice the ports.
        if self.drop_mode == DropMode::Close
            && self.common.source_addrs.is_empty()
            && !plan.connect.sources.is_empty()
        {
            let per_dst = plan
                .connect
                .connections
                .div_ceil(plan.connect.targets.len());
            plan.connect.sources = default_source_addrs(2 * per_dst);
        }
        Ok(plan)
    }

    fn work(&self) -> Result<StormPlan, String> {
        let topics = self.topics()?;
        let publish = self.publishers(&topics)?;
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(format!(
                "--rate {}: must be above 0 and at most {MAX_RATE}",
                self.rate
            ));
        }
        let duration = secs("duration", self.duration, 1)?;
        let messages = (self.rate * topics.len() as f64 * duration.as_secs_f64()).round();
        if messages < 1.0 || messages > MAX_MESSAGES as f64 {
            return Err(format!(
                "--rate {} to {} topics for --duration {} publishes {messages} messages: must be \
                 between 1 and {MAX_MESSAGES}",
                self.rate,
                topics.len(),
                self.duration
            ));
        }
        let drop_at_s = self.drop_at.unwrap_or(duration.as_secs_f64() / 3.0);
        if !(drop_at_s > 0.0 && drop_at_s < duration.as_secs_f64()) {
            return Err(format!(
                "--drop-at {drop_at_s}: must be above 0 and below --duration {}",
                self.duration
            ));
        }
        if !(self.drop_fraction > 0.0 && self.drop_fraction <= 1.0) {
            return Err(format!(
                "--drop-fraction {}: must be above 0 and at most 1",
                self.drop_fraction
            ));
        }
        if self.reconnect_jitter_ms > MAX_JITTER_MS {
            return Err(format!(
                "--reconnect-jitter-ms {}: at most {MAX_JITTER_MS}",
                self.reconnect_jitter_ms
            ));
        }
        let drop_at = Duration::from_secs_f64(drop_at_s);
        let jitter = Duration::from_millis(self.reconnect_jitter_ms);
        if drop_at + jitter >= duration {
            return Err(format!(
                "--drop-at {drop_at_s} plus --reconnect-jitter-ms {} reaches past --duration {}: \
                 every subscriber must be back while publishing goes on (time to caught up is \
                 measured to its first live publication)",
                self.reconnect_jitter_ms, self.duration
            ));
        }
        Ok(StormPlan {
            topics,
            publish,
            rate: self.rate,
            duration,
            size: size(self.size)?,
            drop_at,
            drop_fraction: self.drop_fraction,
            jitter,
            drop_mode: self.drop_mode,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
        })
    }

    fn topics(&self) -> Result<Vec<String>, String> {
        subscriber_topics(&self.common.url)
    }

    fn publishers(&self, topics: &[String]) -> Result<Vec<Vec<Target>>, String> {
        publishers_by_topic(&self.publish_url, topics)
    }
}

/// The subscribers' topics: the `topics=` of every --url, which must agree
/// (named topics, no `{topic}`). Conflation reads them the same way.
pub(super) fn subscriber_topics(urls: &[WsUrl]) -> Result<Vec<String>, String> {
    let mut topics: Option<Vec<String>> = None;
    for u in urls {
        if u.target.contains(TOPIC_PLACEHOLDER) {
            return Err(format!(
                "{u}: storm takes no {{topic}}: every subscriber holds all of topics=A,B"
            ));
        }
        let these = topics_of(&u.target);
        if these.is_empty() {
            return Err(format!(
                "{u}: name the subscribers' topics, e.g. /ws?topics=s0,s1"
            ));
        }
        if these.len() > MAX_TOPICS {
            return Err(format!("{u}: at most {MAX_TOPICS} topics"));
        }
        if let Some(p) = these.iter().find(|t| is_pattern(t)) {
            return Err(format!(
                "{u}: {p} is a pattern; storm recovers topics, name them"
            ));
        }
        match &topics {
            Some(t) if *t != these => {
                return Err(format!(
                    "{u}: every --url must name the same topics ({})",
                    t.join(",")
                ));
            }
            Some(_) => {}
            None => topics = Some(these),
        }
    }
    topics.ok_or_else(|| "give --url".into())
}

/// The publish URLs of each topic (at least one each).
pub(super) fn publishers_by_topic(
    publish_url: &[WsUrl],
    topics: &[String],
) -> Result<Vec<Vec<Target>>, String> {
    let mut by_topic = vec![Vec::new(); topics.len()];
    for (u, t) in publish_url.iter().zip(resolve(publish_url)?) {
        let name = publish_topic(&u.target)
            .ok_or_else(|| format!("--publish-url {u}: expected ws://HOST:PORT/publish/T"))?;
        let i = topics.iter().position(|t| t == name).ok_or_else(|| {
            format!(
                "--publish-url {u}: topic {name} is not among the subscribers' topics ({})",
                topics.join(",")
            )
        })?;
        by_topic[i].push(t);
    }
    if let Some(i) = by_topic.iter().position(Vec::is_empty) {
        return Err(format!(
            "topic {} has no --publish-url (give ws://HOST:PORT/publish/{})",
            topics[i], topics[i]
        ));
    }
    Ok(by_topic)
}

/// A wildcard pattern (or a bad name) rather than a topic name: `*` and
/// `>` are never topic bytes.
fn is_pattern(topic: &str) -> bool {
    topic.contains(['*', '>'])
}
