//! The `conflation` subcommand's flags and their validation into a
//! [`ConflationPlan`]: the subscribers' topics (their URL's `topics=`,
//! read as storm reads them), a publisher per topic, the publishing rate,
//! which share of the subscribers reads slowly and how slowly, and an
//! optional `max_rate` appended to the subscribers' URL.

use super::common::{CommonArgs, Limits};
use super::plan::{ConflationPlan, Plan, Work};
use super::storm::{publishers_by_topic, subscriber_topics};
use super::{MAX_MESSAGES, MAX_RATE, secs, size};
use crate::url::{self, WsUrl};
use clap::Args;
use corecast::pubsub::envelope::{BINARY_PROTOCOL, JSON_PROTOCOL};

/// The most a subscriber's `max_rate` may be (the server's bound).
const MAX_SUBSCRIBER_RATE: u32 = 1000;

#[derive(Debug, Clone, Args)]
pub struct ConflationCmd {
    /// Subscribers' URL(s), ws://HOST:PORT/ws?topics=A,B: every subscriber
    /// holds every topic of the list (the same list in each --url);
    /// --connections of them. --subprotocol: corecast.v1 (default) or
    /// corecast.v1.binary.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Publisher URL ws://HOST:PORT/publish/T, T a topic of the subscribers'
    /// topics= (repeat: at least one per topic).
    #[arg(long, value_parser = url::parse, value_name = "URL", required = true)]
    pub publish_url: Vec<WsUrl>,

    /// Messages per second to each topic.
    #[arg(long, value_name = "R")]
    pub rate: f64,

    /// Seconds to publish for.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,

    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Share of the subscribers that read slowly, spread evenly over them.
    #[arg(long, default_value_t = 0.1, value_name = "F")]
    pub slow_fraction: f64,

    /// How fast a slow subscriber reads while publishing goes on: at most
    /// this many bytes per second (an allowance renewed every 50 ms; the
    /// kernel's receive buffer, 128 KiB by default, still holds more).
    #[arg(long, default_value_t = 2048, value_name = "B")]
    pub slow_read_bytes_per_s: u64,

    /// Ask the server for at most N publications per second per topic:
    /// `max_rate=N` appended to every subscriber's URL (1 to 1000).
    #[arg(long, value_name = "N")]
    pub max_rate: Option<u32>,

    /// Seconds to wait, after the last publish, for every subscriber to
    /// have every topic's last publication (slow ones read at full speed
    /// then).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub drain_timeout: u64,
}

impl ConflationCmd {
    pub(super) fn plan(&self, limits: Limits) -> Result<Plan, String> {
        let subprotocol = match self.common.subprotocol.as_deref() {
            None => JSON_PROTOCOL,
            Some(p) if p == JSON_PROTOCOL || p == BINARY_PROTOCOL => p,
            Some(p) => {
                return Err(format!(
                    "--subprotocol {p}: conflation reads envelopes: {JSON_PROTOCOL} or {BINARY_PROTOCOL}"
                ));
            }
        };
        let mut plan = self.common.plan(Work::Conflation(self.work()?), limits)?;
        plan.connect.subprotocol = Some(subprotocol.to_string());
        if let Some(n) = self.max_rate {
            for t in &mut plan.connect.targets {
                t.url.target = with_max_rate(&t.url.target, n);
            }
        }
        Ok(plan)
    }

    fn work(&self) -> Result<ConflationPlan, String> {
        let topics = subscriber_topics(&self.common.url)?;
        let publish = publishers_by_topic(&self.publish_url, &topics)?;
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
        if !(0.0..=1.0).contains(&self.slow_fraction) {
            return Err(format!(
                "--slow-fraction {}: must be from 0 to 1",
                self.slow_fraction
            ));
        }
        if self.slow_read_bytes_per_s == 0 || self.slow_read_bytes_per_s > 1 << 30 {
            return Err(format!(
                "--slow-read-bytes-per-s {}: must be from 1 to {}",
                self.slow_read_bytes_per_s,
                1u64 << 30
            ));
        }
        if let Some(n) = self.max_rate
            && !(1..=MAX_SUBSCRIBER_RATE).contains(&n)
        {
            return Err(format!(
                "--max-rate {n}: must be from 1 to {MAX_SUBSCRIBER_RATE}"
            ));
        }
        if self
            .common
            .url
            .iter()
            .any(|u| u.target.contains("max_rate="))
        {
            return Err("give the subscribers' rate as --max-rate N, not in --url".into());
        }
        Ok(ConflationPlan {
            topics,
            publish,
            rate: self.rate,
            duration,
            size: size(self.size)?,
            slow_fraction: self.slow_fraction,
            slow_read_bytes_per_s: self.slow_read_bytes_per_s,
            max_rate: self.max_rate,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
        })
    }
}

/// A request target with `max_rate=N` appended to its query.
fn with_max_rate(target: &str, n: u32) -> String {
    let sep = if target.contains('?') { '&' } else { '?' };
    format!("{target}{sep}max_rate={n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_rate_is_appended_to_the_query() {
        assert_eq!(
            with_max_rate("/ws?topics=a,b", 5),
            "/ws?topics=a,b&max_rate=5"
        );
        assert_eq!(with_max_rate("/ws", 1), "/ws?max_rate=1");
    }
}
