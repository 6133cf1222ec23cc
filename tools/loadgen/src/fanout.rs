//! `loadgen fanout`: N subscribers and one publisher on one mio `Poll`;
//! measures what the server delivers: frames received per second, lost,
//! out-of-order and duplicated messages, and publish-to-receive latency.
//!
//! Every payload is binary and starts with a 16-byte header, padded with
//! zeros to `--size` bytes:
//!
//! ```text
//! 0        8              16
//! | seq LE | sent_ns LE   | padding ...
//! ```
//!
//! `sent_ns` is nanoseconds since an [`Instant`] (CLOCK_MONOTONIC) origin
//! taken in this process, which both publisher and subscribers share, so
//! latency needs no clock synchronisation. It is the time the message was
//! encoded, just before it is handed to the socket.
//!
//! Burst mode publishes K messages as fast as the socket takes them; rate
//! mode publishes R per second for T seconds on a deadline schedule (message
//! i is due at `start + i / R`; a late loop catches up rather than drifting,
//! and how late it was is reported as the publish lag). The run ends when
//! every open subscriber has every message, or `--drain-timeout` after the
//! last publish.
//!
//! One thread drives everything, so at high rates loadgen itself can be the
//! bottleneck: the report gives its CPU time in the delivery phase next to
//! the wall time, and says so when it was CPU-bound.

use crate::client::{RequestTemplate, Rng, Sink};
use crate::fleet::Fleet;
use crate::report;
use crate::sys::{self, SelfUsage};
use crate::{FanoutPlan, PublishMode};
use corecast::proto::OpCode;
use corecast::proto::frame::{MAX_HEADER_LEN, encode_header};
use corecast::proto::mask::apply_mask;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Bytes of sequence number and timestamp at the start of each payload.
pub const PAYLOAD_HEADER: usize = 16;
/// The publisher encodes at most this many bytes ahead of the socket, so
/// timestamps are taken close to the write.
const PUBLISH_BATCH_BYTES: usize = 16 * 1024;
/// How long the publisher connection may take to open.
const PUBLISHER_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Burst mode gives up publishing after this long (a server that stops
/// reading would otherwise hold the run forever).
const BURST_PUBLISH_LIMIT: Duration = Duration::from_secs(120);
/// How long the final close handshakes may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Holes (runs of missing sequence numbers) remembered per subscriber;
/// beyond this, new holes are counted as lost but not remembered, and a
/// number below the highest seen that is in no remembered hole is then
/// ambiguous (counted as a late arrival while such untracked losses remain).
const MAX_TRACKED_GAPS: usize = 1024;
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Delivery-phase CPU over wall time above which loadgen counts as CPU-bound.
const CPU_BOUND: f64 = 0.9;

/// The payload header: sequence number and send time, little-endian.
pub fn encode_payload_header(seq: u64, sent_ns: u64) -> [u8; PAYLOAD_HEADER] {
    let mut h = [0u8; PAYLOAD_HEADER];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..].copy_from_slice(&sent_ns.to_le_bytes());
    h
}

/// `(seq, sent_ns)` from a payload; `None` if it is too short.
pub fn decode_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((seq, sent))
}

/// Appends one masked, unfragmented binary client frame whose payload is
/// the header for `(seq, sent_ns)` padded with zeros to `size` bytes
/// (`size >= PAYLOAD_HEADER`).
pub fn push_message(out: &mut Vec<u8>, seq: u64, sent_ns: u64, size: usize, mask: [u8; 4]) {
    debug_assert!(size >= PAYLOAD_HEADER);
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, OpCode::Binary, size as u64, Some(mask));
    out.extend_from_slice(&hdr[..n]);
    let start = out.len();
    out.extend_from_slice(&encode_payload_header(seq, sent_ns));
    out.resize(start + size, 0);
    apply_mask(&mut out[start..], mask, 0);
}

/// How one arrival relates to what the subscriber saw before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next number expected.
    InOrder,
    /// Ahead of the next expected: this many numbers were skipped (so far).
    Gap(u64),
    /// A number that had been skipped: late, out of order.
    Late,
    /// Seen before.
    Duplicate,
}

/// Sequence accounting for one subscriber. Publish order is 0, 1, 2, ...;
/// in-order delivery allocates nothing, and each hole costs one map entry
/// however long it is.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// One past the highest number seen.
    next: u64,
    /// Distinct numbers received.
    pub received: u64,
    /// Holes below `next` not received yet, as `start -> end` (exclusive).
    missing: BTreeMap<u64, u64>,
    /// Numbers below `next` not received and in no hole of `missing`.
    untracked_missing: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
}

impl SeqTracker {
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq == self.next {
            self.next += 1;
            self.received += 1;
            return Arrival::InOrder;
        }
        if seq > self.next {
            let gap = seq - self.next;
            if self.missing.len() < MAX_TRACKED_GAPS {
                self.missing.insert(self.next, seq);
            } else {
                self.untracked_missing += gap;
            }
            self.next = seq + 1;
            self.received += 1;
            return Arrival::Gap(gap);
        }
        let hole = self
            .missing
            .range(..=seq)
            .next_back()
            .map(|(&start, &end)| (start, end))
            .filter(|&(_, end)| seq < end);
        if let Some((start, end)) = hole {
            self.missing.remove(&start);
            if start < seq {
                self.missing.insert(start, seq);
            }
            if seq + 1 < end {
                self.missing.insert(seq + 1, end);
            }
            self.out_of_order += 1;
            self.received += 1;
            Arrival::Late
        } else if self.untracked_missing > 0 {
            // Cannot tell: assume the late arrival of an untracked number.
            self.untracked_missing -= 1;
            self.out_of_order += 1;
            self.received += 1;
            Arrival::Late
        } else {
            self.duplicates += 1;
            Arrival::Duplicate
        }
    }

    /// Numbers below `expected` never received.
    pub fn lost(&self, expected: u64) -> u64 {
        let holes: u64 = self
            .missing
            .range(..expected)
            .map(|(&start, &end)| end.min(expected) - start)
            .sum();
        holes + self.untracked_missing + expected.saturating_sub(self.next)
    }
}

/// The subscribers' side: a [`Sink`] fed by the fleet.
struct Delivery {
    origin: Instant,
    /// Tokens below this are subscribers; `tracked[t]` when `t` was up.
    tracked: Vec<bool>,
    trackers: Vec<SeqTracker>,
    /// Messages each subscriber should get (the plan, then what was published).
    target: u64,
    /// Subscribers with `target` distinct messages.
    complete: usize,
    frames: u64,
    malformed: u64,
    not_binary: u64,
    latency_ns: Histogram<u64>,
    first_receive: Option<Instant>,
    last_receive: Option<Instant>,
}

impl Delivery {
    fn new(tracked: Vec<bool>, target: u64, origin: Instant) -> Self {
        Self {
            origin,
            trackers: vec![SeqTracker::default(); tracked.len()],
            tracked,
            target,
            complete: 0,
            frames: 0,
            malformed: 0,
            not_binary: 0,
            // 1 ns .. 1 hour, 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
            first_receive: None,
            last_receive: None,
        }
    }

    /// Fewer messages were published than planned: judge completion by those.
    fn set_target(&mut self, target: u64) {
        self.target = target;
        self.complete = self
            .trackers
            .iter()
            .filter(|t| t.received >= target)
            .count();
    }
}

impl Sink for Delivery {
    fn message(&mut self, conn: usize, opcode: OpCode, payload: &[u8], at: Instant) {
        if !self.tracked.get(conn).copied().unwrap_or(false) {
            return; // the publisher's connection
        }
        self.frames += 1;
        self.first_receive.get_or_insert(at);
        self.last_receive = Some(at);
        if opcode != OpCode::Binary {
            self.not_binary += 1;
        }
        let Some((seq, sent_ns)) = decode_payload(payload) else {
            self.malformed += 1;
            return;
        };
        let t = &mut self.trackers[conn];
        match t.record(seq) {
            Arrival::Duplicate => return,
            _ if t.received == self.target => self.complete += 1,
            _ => {}
        }
        let now_ns = at.saturating_duration_since(self.origin).as_nanos() as u64;
        self.latency_ns
            .saturating_record(now_ns.saturating_sub(sent_ns).max(1));
    }
}

/// The publishing side: what is due, what was sent.
struct Publisher {
    mode: PublishMode,
    size: usize,
    planned: u64,
    sent: u64,
    start: Instant,
    origin: Instant,
    rng: Rng,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Largest delay between a message's due time and its encoding (rate mode).
    max_lag: Duration,
}

impl Publisher {
    fn due(&self, i: u64) -> Instant {
        match self.mode {
            PublishMode::Burst { .. } => self.start,
            PublishMode::Rate { per_s, .. } => {
                self.start + Duration::from_secs_f64(i as f64 / per_s)
            }
        }
    }

    fn done(&self) -> bool {
        self.sent >= self.planned
    }

    /// Encodes what is due and hands it to the socket, until the socket is
    /// full, nothing more is due, or everything is sent.
    fn fill(&mut self, conn: &mut crate::client::Conn) -> std::io::Result<()> {
        // Each pass sends at least one message or stops: bounded by `planned`.
        loop {
            let now = Instant::now();
            while !self.done() && conn.pending() < PUBLISH_BATCH_BYTES && self.due(self.sent) <= now
            {
                let t = Instant::now();
                self.max_lag = self
                    .max_lag
                    .max(t.saturating_duration_since(self.due(self.sent)));
                let ns = t.saturating_duration_since(self.origin).as_nanos() as u64;
                let mask = self.rng.mask();
                push_message(conn.outbox(), self.sent, ns, self.size, mask);
                self.first.get_or_insert(t);
                self.sent += 1;
            }
            conn.flush()?;
            if conn.pending() > 0 || self.done() || self.due(self.sent) > Instant::now() {
                return Ok(());
            }
        }
    }
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// Runs the scenario and prints the summary; `Ok(true)` when every
/// subscriber opened and received every message once, in order.
pub fn run(plan: &FanoutPlan) -> Result<bool, String> {
    let c = &plan.connect;
    let planned = plan.mode.messages();
    eprintln!(
        "fanout: {} subscribers to {} ({}), publisher {}, {} messages of {} B ({})",
        c.connections,
        c.url,
        c.dst,
        plan.publish_url,
        planned,
        plan.size,
        plan.mode.describe()
    );
    let mut fleet = Fleet::for_plan(c)?;
    let ramp = fleet
        .ramp_up(Instant::now() + c.connect_timeout)
        .map_err(|e| format!("event loop failed during ramp-up: {e}"))?;
    let up = ramp.latencies_us.len();
    eprintln!(
        "fanout: {up} subscribers up in {:.3} s",
        ramp.elapsed.as_secs_f64()
    );
    let tracked: Vec<bool> = (0..c.connections)
        .map(|t| fleet.conn_mut(t).is_some())
        .collect();
    let pub_token = fleet
        .open_extra(
            plan.publish_dst,
            &RequestTemplate::new(&plan.publish_url),
            Instant::now() + PUBLISHER_OPEN_TIMEOUT,
        )
        .map_err(|e| format!("event loop failed opening the publisher: {e}"))?
        .ok_or_else(|| {
            format!(
                "the publisher connection to {} did not open (failures so far: {})",
                plan.publish_url,
                report::counts(&fleet.failures)
            )
        })?;

    let server_cpu_before = plan.server_pid.and_then(|p| sys::process_cpu_s(p).ok());
    let usage_before = SelfUsage::now();
    let machine_before = sys::machine_cpu_ticks().ok();
    let origin = Instant::now();
    let mut delivery = Delivery::new(tracked, planned, origin);
    let mut publisher = Publisher {
        mode: plan.mode,
        size: plan.size,
        planned,
        sent: 0,
        start: origin,
        origin,
        rng: Rng::from_entropy(),
        first: None,
        last: None,
        max_lag: Duration::ZERO,
    };
    let publish_limit = origin
        + match plan.mode {
            PublishMode::Burst { .. } => BURST_PUBLISH_LIMIT,
            PublishMode::Rate { duration, .. } => duration + plan.drain_timeout,
        };
    let mut publish_problem: Option<String> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut next_progress = origin + PROGRESS_EVERY;
    let timed_out = loop {
        let now = Instant::now();
        if drain_deadline.is_none() {
            let mut stop = |why: Option<String>, p: &mut Publisher, d: &mut Delivery| {
                publish_problem = why;
                p.last = Some(Instant::now());
                d.set_target(p.sent);
                drain_deadline = Some(now + plan.drain_timeout);
            };
            match fleet.conn_mut(pub_token) {
                None => stop(
                    Some(format!(
                        "publisher connection ended: {}",
                        report::counts(&fleet.ended)
                    )),
                    &mut publisher,
                    &mut delivery,
                ),
                Some(conn) => match publisher.fill(conn) {
                    Err(e) => stop(
                        Some(format!("publisher write failed: {e}")),
                        &mut publisher,
                        &mut delivery,
                    ),
                    Ok(()) if publisher.done() && conn.pending() == 0 => {
                        stop(None, &mut publisher, &mut delivery)
                    }
                    Ok(()) if now >= publish_limit => stop(
                        Some(format!(
                            "publishing stopped at the time limit after {} of {planned} messages",
                            publisher.sent
                        )),
                        &mut publisher,
                        &mut delivery,
                    ),
                    Ok(()) => {}
                },
            }
        }
        let subs_open = fleet.open() - usize::from(fleet.conn_mut(pub_token).is_some());
        if let Some(d) = drain_deadline {
            if delivery.complete >= subs_open {
                break false;
            }
            if now >= d {
                break true;
            }
        }
        if now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            eprintln!(
                "  {:>5.1}s: published {}/{planned}, {} frames received, {} subscribers complete",
                (now - origin).as_secs_f64(),
                publisher.sent,
                delivery.frames,
                delivery.complete
            );
        }
        let wait = match drain_deadline {
            Some(d) => d.saturating_duration_since(now),
            None if publisher.done() => Duration::from_millis(100),
            None => publisher.due(publisher.sent).saturating_duration_since(now),
        };
        fleet
            .serve(wait, &mut delivery)
            .map_err(|e| format!("event loop failed during delivery: {e}"))?;
    };
    let end = Instant::now();
    let usage_after = SelfUsage::now();
    let machine_after = sys::machine_cpu_ticks().ok();
    let server_cpu_after = plan.server_pid.and_then(|p| sys::process_cpu_s(p).ok());
    let subs_still_open = fleet.open() - usize::from(fleet.conn_mut(pub_token).is_some());
    let ended_during_run: u64 = fleet.ended.values().sum();
    let close = fleet
        .close_all(Instant::now() + CLOSE_TIMEOUT)
        .map_err(|e| format!("event loop failed while closing: {e}"))?;
    let usage_end = SelfUsage::now();

    // Figures.
    let published = publisher.sent;
    let frames_expected = up as u64 * published;
    let (mut lost, mut out_of_order, mut duplicates) = (0, 0, 0);
    for (t, tr) in delivery.trackers.iter().enumerate() {
        if delivery.tracked[t] {
            lost += tr.lost(published);
            out_of_order += tr.out_of_order;
            duplicates += tr.duplicates;
        }
    }
    let first_publish = publisher.first.unwrap_or(origin);
    let delivery_s = delivery.last_receive.map_or(0.0, |l| {
        l.saturating_duration_since(first_publish).as_secs_f64()
    });
    let delivered_fps = if delivery_s > 0.0 {
        delivery.frames as f64 / delivery_s
    } else {
        0.0
    };
    let publish_s = publisher.last.map_or(0.0, |l| {
        l.saturating_duration_since(first_publish).as_secs_f64()
    });
    let phase_wall_s = end.saturating_duration_since(origin).as_secs_f64();
    let loadgen_phase_cpu = usage_after.cpu_s() - usage_before.cpu_s();
    let server_phase_cpu = match (server_cpu_before, server_cpu_after) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    let h = &delivery.latency_ns;
    let q = |quantile: f64| (!h.is_empty()).then(|| h.value_at_quantile(quantile) as f64 / 1000.0);
    let latency = [
        ("p50", q(0.5)),
        ("p90", q(0.9)),
        ("p99", q(0.99)),
        ("p999", q(0.999)),
        ("max", (!h.is_empty()).then(|| h.max() as f64 / 1000.0)),
    ];
    // Cores busy on the whole machine in the delivery phase (every process).
    let machine_busy_cores = match (machine_before, machine_after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some((b1 - b0) as f64 / (t1 - t0) as f64 * sys::online_cpus() as f64)
        }
        _ => None,
    };
    let loadgen_bound = phase_wall_s > 0.0 && loadgen_phase_cpu / phase_wall_s > CPU_BOUND;
    let failed: u64 = fleet.failures.values().sum();

    // Human summary.
    println!("scenario        fanout ({})", plan.mode.describe());
    println!(
        "subscribers     {} requested, {up} up, {failed} failed to open, {ended_during_run} ended during the run, {subs_still_open} open at the end",
        c.connections
    );
    if failed > 0 {
        println!("failures        {}", report::counts(&fleet.failures));
    }
    if ended_during_run > 0 {
        println!("ended           {}", report::counts(&fleet.ended));
    }
    println!(
        "published       {published} of {planned} messages of {} B in {publish_s:.3} s ({:.0}/s){}",
        plan.size,
        if publish_s > 0.0 {
            published as f64 / publish_s
        } else {
            0.0
        },
        match plan.mode {
            PublishMode::Rate { .. } => format!(
                ", max lag behind schedule {:.3} ms",
                publisher.max_lag.as_secs_f64() * 1e3
            ),
            PublishMode::Burst { .. } => String::new(),
        }
    );
    if let Some(p) = &publish_problem {
        println!("publish problem {p}");
    }
    println!(
        "frames          {frames_expected} expected, {} received ({:.3}%), lost {lost}, out of order {out_of_order}, duplicates {duplicates}, malformed {}, not binary {}, fragments {}",
        delivery.frames,
        pct(delivery.frames as f64, frames_expected as f64),
        delivery.malformed,
        delivery.not_binary,
        fleet.counters.fragments_received
    );
    println!(
        "delivery        {delivered_fps:.0} frames/s ({} payload/s) over {delivery_s:.3} s from first publish to last receive{}",
        report::bytes((delivered_fps * plan.size as f64) as u64),
        if timed_out {
            "; ended at the drain timeout"
        } else {
            ""
        }
    );
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    println!(
        "latency (us)    {}",
        latency
            .iter()
            .map(|(k, v)| format!("{k} {}", show(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "loadgen CPU     {loadgen_phase_cpu:.2} s in the {phase_wall_s:.3} s delivery phase ({:.0}% of one core); {:.2} s for the whole run (user {:.2}, sys {:.2})",
        pct(loadgen_phase_cpu, phase_wall_s),
        usage_end.cpu_s(),
        usage_end.user_s,
        usage_end.sys_s
    );
    if let (Some(pid), Some(s)) = (plan.server_pid, server_phase_cpu) {
        println!(
            "server CPU      pid {pid}: {s:.2} s in the delivery phase ({:.0}% of one core)",
            pct(s, phase_wall_s)
        );
    }
    if let Some(b) = machine_busy_cores {
        println!(
            "machine CPU     {b:.2} of {} cores busy in the delivery phase (all processes)",
            sys::online_cpus()
        );
    }
    if loadgen_bound {
        println!(
            "note            loadgen was CPU-bound (one thread at >{:.0}% in the delivery phase): \
             these figures are a floor for the server, not its ceiling",
            CPU_BOUND * 100.0
        );
    }
    println!(
        "close           {} clean, {} dropped at the {} s close deadline",
        close.clean,
        close.timed_out,
        CLOSE_TIMEOUT.as_secs()
    );

    if let Some(path) = &plan.json {
        let lat: serde_json::Map<String, serde_json::Value> = latency
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let (mode, rate, duration_s) = match plan.mode {
            PublishMode::Burst { .. } => ("burst", None, None),
            PublishMode::Rate { per_s, duration } => {
                ("rate", Some(per_s), Some(duration.as_secs()))
            }
        };
        let params = json!({
            "url": c.url.to_string(),
            "publish_url": plan.publish_url.to_string(),
            "connections": c.connections,
            "mode": mode,
            "messages": planned,
            "rate": rate,
            "duration_s": duration_s,
            "size": plan.size,
            "in_flight": c.in_flight,
            "drain_timeout_s": plan.drain_timeout.as_secs(),
            "source_addrs": c.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        let v = json!({
            "scenario": "fanout",
            "connections": c.connections,
            "subscribers_up": up,
            "failures": fleet.failures,
            "ended": fleet.ended,
            "published": published,
            "publish_s": publish_s,
            "publish_problem": publish_problem,
            "publish_max_lag_ms": publisher.max_lag.as_secs_f64() * 1e3,
            "frames_expected": frames_expected,
            "frames_received": delivery.frames,
            "delivery_s": delivery_s,
            "delivered_fps": delivered_fps,
            "lost": lost,
            "out_of_order": out_of_order,
            "duplicates": duplicates,
            "malformed": delivery.malformed,
            "not_binary": delivery.not_binary,
            "fragments": fleet.counters.fragments_received,
            "drain_timed_out": timed_out,
            "latency_us": lat,
            "loadgen_cpu_s": usage_end.cpu_s(),
            "loadgen_cpu_user_s": usage_end.user_s,
            "loadgen_cpu_sys_s": usage_end.sys_s,
            "loadgen_delivery_cpu_s": loadgen_phase_cpu,
            "loadgen_cpu_bound": loadgen_bound,
            "delivery_phase_wall_s": phase_wall_s,
            "server_pid": plan.server_pid,
            "server_delivery_cpu_s": server_phase_cpu,
            "machine_busy_cores": machine_busy_cores,
            "machine_cores": sys::online_cpus(),
            "close": { "clean": close.clean, "timed_out": close.timed_out },
            "params": params,
        });
        let text = serde_json::to_string_pretty(&v).expect("a JSON value serializes");
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("fanout: wrote {}", path.display());
    }
    let clean = delivery.malformed == 0 && delivery.not_binary == 0;
    Ok(up == c.connections
        && publish_problem.is_none()
        && lost == 0
        && out_of_order == 0
        && duplicates == 0
        && clean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::parse_header;

    /// A minimal pub/sub server on blocking sockets: accepts `subs`
    /// subscribers then one publisher, forwards `messages` messages as
    /// server frames, then answers every client's close.
    fn fake_server(
        listener: std::net::TcpListener,
        subs: usize,
        messages: u64,
    ) -> std::thread::JoinHandle<()> {
        use corecast::proto::frame::{parse_header, server_frame};
        use corecast::proto::handshake::write_switching_protocols;
        use std::io::{Read, Write};
        fn upgrade(s: &mut std::net::TcpStream) -> String {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            let text = String::from_utf8(head).unwrap();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let mut resp = Vec::new();
            write_switching_protocols(&mut resp, key.as_bytes(), None);
            s.write_all(&resp).unwrap();
            text.split(' ').nth(1).unwrap().to_string()
        }
        fn read_frame(s: &mut std::net::TcpStream) -> (OpCode, Vec<u8>) {
            let mut buf = vec![0u8; 2];
            s.read_exact(&mut buf).unwrap();
            let h = loop {
                if let Some(h) = parse_header(&buf).unwrap() {
                    break h;
                }
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                buf.push(b[0]);
            };
            let mut p = vec![0u8; h.payload_len as usize];
            s.read_exact(&mut p).unwrap();
            apply_mask(&mut p, h.mask.unwrap(), 0);
            (h.opcode, p)
        }
        std::thread::spawn(move || {
            let mut clients = Vec::new();
            for _ in 0..subs {
                let mut s = listener.accept().unwrap().0;
                assert_eq!(upgrade(&mut s), "/ws?topics=t");
                clients.push(s);
            }
            let mut publisher = listener.accept().unwrap().0;
            assert_eq!(upgrade(&mut publisher), "/publish/t");
            for _ in 0..messages {
                let (op, payload) = read_frame(&mut publisher);
                let frame = server_frame(op, &payload);
                for c in &mut clients {
                    c.write_all(&frame).unwrap();
                }
            }
            clients.push(publisher);
            for c in &mut clients {
                let (op, payload) = read_frame(c);
                assert_eq!(op, OpCode::Close);
                c.write_all(&server_frame(OpCode::Close, &payload)).unwrap();
            }
        })
    }

    #[test]
    fn a_whole_run_against_a_fake_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let server = fake_server(listener, 20, 30);
        let json = std::env::temp_dir().join(format!("fanout-test-{}.json", std::process::id()));
        let plan = FanoutPlan {
            connect: crate::ConnectPlan {
                url: crate::url::parse(&format!("ws://{dst}/ws?topics=t")).unwrap(),
                dst,
                sources: vec![],
                connections: 20,
                in_flight: 4,
                connect_timeout: Duration::from_secs(10),
                handshake_timeout: Duration::from_secs(5),
            },
            publish_url: crate::url::parse(&format!("ws://{dst}/publish/t")).unwrap(),
            publish_dst: dst,
            mode: PublishMode::Rate {
                per_s: 30.0,
                duration: Duration::from_secs(1),
            },
            size: 100,
            drain_timeout: Duration::from_secs(5),
            server_pid: Some(std::process::id()),
            json: Some(json.clone()),
        };
        assert_eq!(run(&plan), Ok(true));
        server.join().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        std::fs::remove_file(&json).unwrap();
        assert_eq!(v["frames_expected"], 600);
        assert_eq!(v["frames_received"], 600);
        assert_eq!(
            (v["lost"].as_u64(), v["out_of_order"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(v["close"]["clean"], 21);
        assert!(v["latency_us"]["p50"].as_f64().unwrap() > 0.0);
        assert!(v["delivered_fps"].as_f64().unwrap() > 0.0);
        // Paced: 30 messages at 30/s take about a second, not a burst.
        assert!(v["publish_s"].as_f64().unwrap() > 0.9, "{v}");
    }

    #[test]
    fn payload_round_trips_through_a_masked_frame() {
        let mut out = Vec::new();
        push_message(&mut out, 7, 123_456_789, 64, [1, 2, 3, 4]);
        push_message(&mut out, u64::MAX, 1, 300, [9, 8, 7, 6]);
        let h = parse_header(&out).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len), (true, OpCode::Binary, 64));
        let mask = h.mask.expect("client frames are masked");
        let mut p = out[h.header_len..h.header_len + 64].to_vec();
        apply_mask(&mut p, mask, 0);
        assert_eq!(decode_payload(&p), Some((7, 123_456_789)));
        assert!(p[PAYLOAD_HEADER..].iter().all(|&b| b == 0));
        let rest = &out[h.header_len + 64..];
        let h2 = parse_header(rest).unwrap().unwrap();
        assert_eq!((h2.payload_len, h2.header_len), (300, 8));
        let mut p = rest[h2.header_len..].to_vec();
        assert_eq!(p.len(), 300);
        apply_mask(&mut p, h2.mask.unwrap(), 0);
        assert_eq!(decode_payload(&p), Some((u64::MAX, 1)));
        assert_eq!(decode_payload(&[0; 15]), None);
        assert_eq!(
            encode_payload_header(1, 2)[..9],
            [1, 0, 0, 0, 0, 0, 0, 0, 2]
        );
    }

    #[test]
    fn in_order_delivery_counts_nothing_wrong() {
        let mut t = SeqTracker::default();
        for s in 0..100 {
            assert_eq!(t.record(s), Arrival::InOrder);
        }
        assert_eq!(
            (t.received, t.lost(100), t.out_of_order, t.duplicates),
            (100, 0, 0, 0)
        );
        assert!(t.missing.is_empty());
        // Messages never seen at the end are lost too.
        assert_eq!(t.lost(103), 3);
    }

    #[test]
    fn gaps_reorders_and_duplicates() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(0), Arrival::InOrder);
        assert_eq!(t.record(3), Arrival::Gap(2));
        assert_eq!(t.lost(4), 2);
        assert_eq!(t.record(1), Arrival::Late);
        assert_eq!(t.record(1), Arrival::Duplicate);
        assert_eq!(t.record(3), Arrival::Duplicate);
        assert_eq!(t.record(0), Arrival::Duplicate);
        assert_eq!(t.record(4), Arrival::InOrder);
        assert_eq!(t.record(9), Arrival::Gap(4));
        assert_eq!(
            (t.received, t.lost(10), t.out_of_order, t.duplicates),
            (5, 5, 1, 3)
        );
        assert_eq!(t.record(2), Arrival::Late);
        assert_eq!(t.lost(10), 4);
        // Only numbers below the expected count are lost.
        assert_eq!(t.lost(7), 2);
    }

    #[test]
    fn a_huge_gap_is_one_hole() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(1_000_000), Arrival::Gap(1_000_000));
        assert_eq!(t.missing.len(), 1);
        assert_eq!(t.lost(1_000_001), 1_000_000);
        assert_eq!(t.record(5), Arrival::Late);
        assert_eq!(t.record(5), Arrival::Duplicate);
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.record(999_999), Arrival::Late);
        assert_eq!(t.missing.len(), 2, "{:?}", t.missing);
        assert_eq!(t.lost(1_000_001), 999_997);
        assert_eq!((t.out_of_order, t.duplicates), (3, 1));
    }

    #[test]
    fn holes_beyond_the_cap_are_counted_not_remembered() {
        let mut t = SeqTracker::default();
        // Every other number lost: one hole each.
        for i in 0..(MAX_TRACKED_GAPS as u64 + 10) {
            t.record(2 * i + 1);
        }
        assert_eq!(t.missing.len(), MAX_TRACKED_GAPS);
        let n = 2 * (MAX_TRACKED_GAPS as u64 + 10);
        assert_eq!(t.lost(n), n / 2);
        // A remembered hole is filled exactly; an untracked one is assumed late.
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.record(0), Arrival::Late);
        assert_eq!(t.lost(n), n / 2 - 2);
    }

    #[test]
    fn delivery_counts_completion_latency_and_strays() {
        let origin = Instant::now();
        let mut d = Delivery::new(vec![true, false, true], 2, origin);
        let frame = |seq: u64, sent_ns: u64| {
            let mut p = encode_payload_header(seq, sent_ns).to_vec();
            p.resize(64, 0);
            p
        };
        let at = origin + Duration::from_micros(500);
        d.message(0, OpCode::Binary, &frame(0, 100_000), at);
        d.message(0, OpCode::Binary, &frame(1, 200_000), at);
        d.message(0, OpCode::Binary, &frame(1, 200_000), at);
        d.message(1, OpCode::Binary, &frame(0, 0), at); // not a subscriber
        d.message(2, OpCode::Text, &frame(0, 0), at);
        d.message(2, OpCode::Binary, b"short", at);
        assert_eq!(
            (d.frames, d.complete, d.not_binary, d.malformed),
            (5, 1, 1, 1)
        );
        assert_eq!(d.latency_ns.len(), 3);
        assert_eq!(d.latency_ns.max() / 1000, 500);
        d.set_target(1);
        assert_eq!(d.complete, 2);
    }
}
