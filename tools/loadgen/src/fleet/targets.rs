//! Where the connections of a run go ([`Targets`]): connection `g` to
//! destination `g mod D` from source address `(g div D) mod S`, with its
//! topic when the request target has a `{topic}`.

use crate::client::RequestTemplate;
use crate::topics::TopicMap;
use std::net::{IpAddr, SocketAddr};

/// Where the connections of a run go.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Destinations, used round-robin by connection index, each with its request.
    pub dsts: Vec<(SocketAddr, RequestTemplate)>,
    /// Source addresses; empty: let the kernel choose.
    pub sources: Vec<IpAddr>,
    /// Subscribers' topics, for a `{topic}` in the request target.
    pub topics: Option<TopicMap>,
}

impl Targets {
    /// Destination and request template of connection `g`.
    pub fn dst(&self, g: usize) -> &(SocketAddr, RequestTemplate) {
        &self.dsts[g % self.dsts.len()]
    }

    /// Source address (port 0) of connection `g`.
    pub fn src(&self, g: usize) -> Option<SocketAddr> {
        match self.sources.as_slice() {
            [] => None,
            s => Some(SocketAddr::new(s[(g / self.dsts.len()) % s.len()], 0)),
        }
    }

    /// Topic of connection `g`, when topics are in use.
    pub fn topic(&self, g: usize) -> Option<usize> {
        self.topics.as_ref().map(|m| m.topic_of(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_connections_over_destinations_and_sources() {
        let url = crate::url::parse("ws://127.0.0.1:1/ws?topics=t{topic}").unwrap();
        let d = |p: u16| {
            (
                SocketAddr::from(([127, 0, 0, 1], p)),
                RequestTemplate::new(&url),
            )
        };
        let t = Targets {
            dsts: vec![d(1), d(2), d(3)],
            sources: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2])],
            topics: Some(TopicMap::new(12, 4, crate::topics::TopicDist::Uniform)),
        };
        let pairs: Vec<(u16, u8)> = (0..12)
            .map(|g| {
                let IpAddr::V4(src) = t.src(g).unwrap().ip() else {
                    unreachable!()
                };
                (t.dst(g).0.port(), src.octets()[3])
            })
            .collect();
        // Every destination gets every source equally often.
        for port in 1..=3 {
            for src in 1..=2 {
                assert_eq!(pairs.iter().filter(|&&p| p == (port, src)).count(), 2);
            }
        }
        assert_eq!(t.topic(5), Some(1));
    }
}
