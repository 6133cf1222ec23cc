//! What a storm subscriber asks the server for: its topics (the URL's
//! `topics=`), the request target it reconnects to (the same without
//! `topics=`, so that its topics come back only through the `subscribe`
//! with `since`: a topic already held is not recovered), and that
//! `subscribe` message.

use serde_json::{Map, Value, json};

/// Most topics per subscriber (the server's default `--max-topics-per-conn`).
pub const MAX_TOPICS: usize = 64;

/// The path and the query (without `?`) of a request target.
fn split(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The topics of a subscriber's request target: its `topics=` list,
/// split at commas, each percent-decoded as the server does; empty items
/// skipped, duplicates removed, order kept. Only the first `topics=`
/// counts (the server answers a target with two `400`).
pub fn topics_of(target: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let (_, Some(query)) = split(target) else {
        return out;
    };
    for list in query
        .split('&')
        .filter_map(|p| p.strip_prefix("topics="))
        .take(1)
    {
        for name in list.split(',').filter(|n| !n.is_empty()) {
            let name = percent_decode(name);
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// `%XX` escapes decoded when they decode to ASCII; everything else as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (b[i], hex) {
            (b'%', Some(v)) if v.is_ascii() => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The target a dropped subscriber reconnects to: the same without its
/// `topics=` parameters.
pub fn without_topics(target: &str) -> String {
    let (path, query) = split(target);
    let rest: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty() && !p.starts_with("topics="))
        .collect();
    if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

/// The topic a publisher URL's target publishes to (`/publish/T`).
pub fn publish_topic(target: &str) -> Option<&str> {
    let (path, _) = split(target);
    path.strip_prefix("/publish/").filter(|t| !t.is_empty())
}

/// `{"op":"subscribe","topics":[…],"since":{"a":{"epoch":E,"seq":S},…}}`:
/// every topic, with the position of those in `since` (`(topic index,
/// epoch, seq)`); no `since` key when there is none.
pub fn subscribe_message(
    topics: &[String],
    since: impl IntoIterator<Item = (usize, u64, u64)>,
) -> String {
    let mut positions = Map::new();
    for (t, epoch, seq) in since {
        positions.insert(topics[t].clone(), json!({"epoch": epoch, "seq": seq}));
    }
    let mut m = Map::new();
    m.insert("op".into(), json!("subscribe"));
    m.insert("topics".into(), json!(topics));
    if !positions.is_empty() {
        m.insert("since".into(), Value::Object(positions));
    }
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_come_from_the_query() {
        assert_eq!(topics_of("/ws?topics=s0,s1"), ["s0", "s1"]);
        assert_eq!(topics_of("/ws?x=1&topics=a,,b,a&y=2"), ["a", "b"]);
        assert_eq!(topics_of("/ws?topics=a&topics=b"), ["a"]);
        assert_eq!(topics_of("/ws?topics=news.%3E"), ["news.>"]);
        assert!(topics_of("/ws").is_empty());
        assert!(topics_of("/ws?topics=").is_empty());
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%e9"), "%e9", "not ASCII: left as is");
    }

    #[test]
    fn the_reconnect_target_has_no_topics() {
        assert_eq!(without_topics("/ws?topics=s0,s1"), "/ws");
        assert_eq!(without_topics("/ws?a=1&topics=s0&b=2"), "/ws?a=1&b=2");
        assert_eq!(without_topics("/ws"), "/ws");
        assert_eq!(without_topics("/sub/ws?topics=x&"), "/sub/ws");
    }

    #[test]
    fn publish_targets_name_their_topic() {
        assert_eq!(publish_topic("/publish/s0"), Some("s0"));
        assert_eq!(publish_topic("/publish/a/b?token=x"), Some("a/b"));
        assert_eq!(publish_topic("/publish/"), None);
        assert_eq!(publish_topic("/ws?topics=a"), None);
    }

    #[test]
    fn the_subscribe_carries_since_per_topic() {
        let topics = ["s0".to_string(), "s1".to_string()];
        let m = subscribe_message(&topics, [(1, 7, 42)]);
        let v: Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["op"], "subscribe");
        assert_eq!(v["topics"], json!(["s0", "s1"]));
        assert_eq!(v["since"], json!({"s1": {"epoch": 7, "seq": 42}}));
        let m = subscribe_message(&topics, []);
        assert_eq!(m, r#"{"op":"subscribe","topics":["s0","s1"]}"#);
    }
}
