//! Which topic each subscriber takes and which topic each message goes to.
//!
//! With `--topics T`, the subscriber URL's `{topic}` becomes the topic's
//! number `0..T`. Subscribers are spread over the topics by a distribution
//! (`uniform`: round-robin; `zipf:S`: topic k gets a share proportional to
//! 1/(k+1)^S, in contiguous blocks of the global connection index), so every
//! process derives the same assignment from the connection index alone.
//! Messages are published round-robin: message j goes to topic j mod T as
//! that topic's sequence number j div T.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How subscribers are spread over the topics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum TopicDist {
    /// Subscriber i takes topic i mod T.
    Uniform,
    /// Topic k has a share of subscribers proportional to 1/(k+1)^s.
    Zipf(f64),
}

impl FromStr for TopicDist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Self::Uniform),
            _ => {
                let s_val = s
                    .strip_prefix("zipf:")
                    .ok_or_else(|| format!("{s:?}: expected uniform or zipf:S"))?;
                match s_val.parse::<f64>() {
                    Ok(v) if v.is_finite() && v > 0.0 && v <= 10.0 => Ok(Self::Zipf(v)),
                    _ => Err(format!("{s:?}: the zipf exponent must be in (0, 10]")),
                }
            }
        }
    }
}

impl fmt::Display for TopicDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uniform => write!(f, "uniform"),
            Self::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// The topic of every subscriber of a run.
#[derive(Debug, Clone)]
pub struct TopicMap {
    topics: usize,
    dist: TopicDist,
    /// Zipf: `ends[k]` is one past the last subscriber index of topic k.
    ends: Vec<usize>,
}

impl TopicMap {
    /// `connections` subscribers over `topics` topics (`topics >= 1`).
    pub fn new(connections: usize, topics: usize, dist: TopicDist) -> Self {
        let topics = topics.max(1);
        let ends = match dist {
            TopicDist::Uniform => Vec::new(),
            TopicDist::Zipf(s) => {
                let w: Vec<f64> = (0..topics)
                    .map(|k| 1.0 / ((k + 1) as f64).powf(s))
                    .collect();
                let total: f64 = w.iter().sum();
                let exact: Vec<f64> = w.iter().map(|x| x / total * connections as f64).collect();
                let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
                // Largest remainders get the subscribers rounding left over.
                let mut order: Vec<usize> = (0..topics).collect();
                order.sort_by(|&a, &b| {
                    let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
                    rb.total_cmp(&ra).then(a.cmp(&b))
                });
                let short = connections - counts.iter().sum::<usize>();
                for &k in order.iter().take(short) {
                    counts[k] += 1;
                }
                counts
                    .iter()
                    .scan(0, |acc, &c| {
                        *acc += c;
                        Some(*acc)
                    })
                    .collect()
            }
        };
        Self { topics, dist, ends }
    }

    /// The topic of subscriber `g` (a global connection index).
    pub fn topic_of(&self, g: usize) -> usize {
        match self.dist {
            TopicDist::Uniform => g % self.topics,
            // The first topic whose block ends after g.
            TopicDist::Zipf(_) => self
                .ends
                .partition_point(|&end| end <= g)
                .min(self.topics - 1),
        }
    }
}

/// Messages each topic got when `published` messages went round-robin.
pub fn per_topic(published: u64, topics: usize) -> Vec<u64> {
    let t = topics.max(1) as u64;
    (0..t)
        .map(|k| published / t + u64::from(k < published % t))
        .collect()
}

/// The topic and its sequence number of message `j`.
pub fn route(j: u64, topics: usize) -> (usize, u64) {
    let t = topics.max(1) as u64;
    ((j % t) as usize, j / t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_round_robin() {
        let m = TopicMap::new(10, 3, TopicDist::Uniform);
        let got: Vec<usize> = (0..7).map(|g| m.topic_of(g)).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn zipf_gives_contiguous_shrinking_blocks_covering_everyone() {
        let n = 10_000;
        let m = TopicMap::new(n, 10, "zipf:1".parse().unwrap());
        let mut counts = [0usize; 10];
        let mut last = 0;
        for g in 0..n {
            let t = m.topic_of(g);
            assert!(t >= last, "blocks are contiguous");
            last = t;
            counts[t] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), n);
        assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
        // 1/H(10) of 10 000 = 3414.
        assert_eq!(counts[0], 3414);
        // Few subscribers, many topics: some topics get nobody.
        let m = TopicMap::new(3, 100, TopicDist::Zipf(2.0));
        assert_eq!((0..3).map(|g| m.topic_of(g)).collect::<Vec<_>>(), [0, 0, 1]);
    }

    #[test]
    fn messages_round_robin_over_topics() {
        assert_eq!(per_topic(10, 3), [4, 3, 3]);
        assert_eq!(per_topic(2, 3), [1, 1, 0]);
        assert_eq!(per_topic(5, 1), [5]);
        assert_eq!(route(7, 3), (1, 2));
        assert_eq!(route(7, 1), (0, 7));
    }

    #[test]
    fn parses_distributions() {
        assert_eq!("uniform".parse::<TopicDist>(), Ok(TopicDist::Uniform));
        assert_eq!("zipf:1.2".parse::<TopicDist>(), Ok(TopicDist::Zipf(1.2)));
        for bad in ["zipf", "zipf:0", "zipf:-1", "zipf:x", "normal", "zipf:NaN"] {
            assert!(bad.parse::<TopicDist>().is_err(), "{bad}");
        }
        assert_eq!(TopicDist::Zipf(1.5).to_string(), "zipf:1.5");
    }
}
