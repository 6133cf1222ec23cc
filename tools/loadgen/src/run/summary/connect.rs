//! The `connect` and `hold` figures: the server's CPU during the ramp-up;
//! what held connections cost the server (RSS, socket memory, CPU).

use super::{Summary, Verdict, diff};
use crate::cli::Plan;
use crate::report::{self, Totals};
use crate::run::Server;
use crate::sys::{self, Sockstat};
use serde_json::json;
use std::time::Duration;

/// `connect`: the server's CPU during the ramp-up.
pub(super) fn connect_figures<'t>(s: &mut Summary, t: &'t Totals, server: &Server) -> Verdict<'t> {
    s.put("latency_us", t.connect_latency.to_json_us());
    s.put("frames_expected", json!(0));
    s.put("frames_received", json!(0));
    s.put("delivered_fps", json!(0.0));
    s.put("lost", json!(0));
    s.put("out_of_order", json!(0));
    let ramp_cpu = diff(server.before.cpu_s, server.after.cpu_s);
    if let Some(cpu) = ramp_cpu {
        s.say("server CPU", format!("{cpu:.2} s during the ramp-up"));
    }
    s.put("server_cpu_s", json!(ramp_cpu));
    Verdict {
        clean: true,
        plot: &t.connect_latency,
        plot_title: "connect latency".into(),
    }
}

/// `hold`: what the held connections cost the server (RSS, socket memory,
/// CPU); clean when every connection up was still open at the end.
pub(super) fn hold_figures<'t>(
    s: &mut Summary,
    plan: &Plan,
    t: &'t Totals,
    server: &Server,
    duration: Duration,
) -> Verdict<'t> {
    let pids = &plan.server_pids;
    let Server { before, after, end } = server;
    s.put("latency_us", t.connect_latency.to_json_us());
    let bytes_per_conn = match (before.rss, after.rss) {
        (Some(b), Some(a)) if t.up > 0 => Some((a as f64 - b as f64) / t.up as f64),
        _ => None,
    };
    if !pids.is_empty() {
        let show = |v: Option<u64>| v.map_or("n/a".into(), report::bytes);
        s.say(
            "server RSS",
            format!(
                "pid {pids:?} (summed): before {}, after {}, end {}",
                show(before.rss),
                show(after.rss),
                show(end.rss)
            ),
        );
        s.say(
            "server memory",
            bytes_per_conn.map_or("n/a".into(), |b| {
                format!(
                    "{b:.0} bytes per connection (RSS after - before) / {}",
                    t.up
                )
            }),
        );
        if let Some(cpu) = diff(before.cpu_s, end.cpu_s) {
            s.say(
                "server CPU",
                format!("{cpu:.2} s from before the ramp-up to the end of the hold"),
            );
        }
    }
    let page = sys::page_size();
    for (label, st) in [
        ("before", before.sockstat),
        ("after", after.sockstat),
        ("end", end.sockstat),
    ] {
        if let Some(st) = st {
            s.say(
                &format!("sockstat {label}"),
                format!(
                    "TCP inuse {}, orphan {}, tw {}, alloc {}, mem {} pages ({})",
                    st.inuse,
                    st.orphan,
                    st.tw,
                    st.alloc,
                    st.mem_pages,
                    report::bytes(st.mem_pages * page)
                ),
            );
        }
    }
    s.say(
        "held",
        format!(
            "{} of {} open after {} s; {} pings answered, {} pongs and {} messages received",
            t.open_at_end,
            t.up,
            duration.as_secs(),
            t.pings_answered,
            t.pongs_received,
            t.messages_received
        ),
    );
    let sock = |st: Option<Sockstat>| st.map(Sockstat::to_json);
    s.put("connections_held", json!(t.open_at_end));
    s.put("hold_s", json!(duration.as_secs_f64()));
    s.put("server_rss_before", json!(before.rss));
    s.put("server_rss_after", json!(after.rss));
    s.put("server_rss_end", json!(end.rss));
    s.put("server_bytes_per_conn", json!(bytes_per_conn));
    s.put("server_cpu_s", json!(diff(before.cpu_s, end.cpu_s)));
    s.put("sockstat_before", json!(sock(before.sockstat)));
    s.put("sockstat_after", json!(sock(after.sockstat)));
    s.put("sockstat_end", json!(sock(end.sockstat)));
    s.put(
        "sockstat_mem_bytes_per_conn",
        json!(match (after.sockstat, before.sockstat) {
            (Some(a), Some(b)) if t.up > 0 =>
                Some((a.mem_pages as f64 - b.mem_pages as f64) * page as f64 / t.up as f64),
            _ => None,
        }),
    );
    s.put("frames_expected", json!(0));
    s.put("frames_received", json!(t.frames));
    s.put("delivered_fps", json!(0.0));
    s.put("lost", json!(t.ended_early()));
    s.put("out_of_order", json!(0));
    Verdict {
        clean: t.open_at_end == t.up,
        plot: &t.connect_latency,
        plot_title: "connect latency".into(),
    }
}
