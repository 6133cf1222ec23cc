//! Reads counters from corecast's `GET /metrics` (Prometheus text format):
//! one blocking request per URL, bounded by a timeout.

use crate::url::WsUrl;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The server's count of published frames queued to subscribers.
pub const FRAMES_SENT: &str = "corecast_frames_sent_total";
/// The server's count of bytes written to sockets (all traffic), counted
/// where sends complete, on either backend.
pub const BYTES_SENT: &str = "corecast_bytes_sent_total";
/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest metrics page read.
const MAX_PAGE: u64 = 4 << 20;

/// The sum of every sample of `name` (all label sets) in a metrics page;
/// `None` if it has none.
pub fn sum_of(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `name 5` or `name{labels} 5`.
        let value = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Fetches one metrics page.
pub fn fetch(url: &WsUrl) -> Result<String, String> {
    let addr = url.resolve()?;
    let mut s =
        TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(SCRAPE_TIMEOUT)))
        .map_err(|e| format!("{url}: {e}"))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.target,
        url.host_header()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{url}: {e}"))?;
    let mut body = Vec::new();
    s.take(MAX_PAGE)
        .read_to_end(&mut body)
        .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, page) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: no complete HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "{url}: {}",
            head.lines().next().unwrap_or("empty response")
        ));
    }
    Ok(page.to_string())
}

/// Each of `names` summed over every URL's page (one scrape per URL).
pub fn scrape_sums(urls: &[WsUrl], names: &[&str]) -> Result<Vec<f64>, String> {
    let mut totals = vec![0.0; names.len()];
    for u in urls {
        let page = fetch(u)?;
        for (total, name) in totals.iter_mut().zip(names) {
            *total += sum_of(&page, name).ok_or_else(|| format!("{u}: no {name}"))?;
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_set_and_ignores_longer_names() {
        let page = "# HELP corecast_frames_sent_total x\n# TYPE corecast_frames_sent_total counter\n\
                    corecast_frames_sent_total 5\n\
                    corecast_frames_sent_total{worker=\"1\"} 7\n\
                    corecast_frames_sent_total_extra 100\n\
                    corecast_connections_open{worker=\"0\"} 3\n";
        assert_eq!(sum_of(page, FRAMES_SENT), Some(12.0));
        assert_eq!(sum_of(page, "corecast_connections_open"), Some(3.0));
        assert_eq!(sum_of(page, "nope"), None);
    }

    #[test]
    fn scrapes_a_live_corecast() {
        let srv = corecast::server::start(corecast::server::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 1,
            pin: corecast::server::PinMode::Never,
            ..Default::default()
        })
        .unwrap();
        let url = crate::url::parse_http(&format!("http://{}/metrics", srv.local_addr())).unwrap();
        let first = scrape_sums(std::slice::from_ref(&url), &[FRAMES_SENT, BYTES_SENT]).unwrap();
        assert_eq!(first[0], 0.0);
        // The first scrape's answer was written: the server counted its bytes.
        let second = scrape_sums(&[url], &[FRAMES_SENT, BYTES_SENT]).unwrap();
        assert_eq!(second[0], 0.0);
        assert!(second[1] > first[1] + 100.0, "{first:?} {second:?}");
        srv.shutdown();
        srv.join();
    }
}
