//! The operator's kit in `deploy/` checked against the server: every
//! metric (and label value) the Grafana dashboard and the Prometheus alert
//! rules select is one a running server's `/metrics` serves, and the sample
//! configuration starts and reloads the server, names every key the loader
//! accepts once, says for each whether `SIGHUP` reloads it as the loader
//! does, and sets nothing but the defaults and the admin listener.

mod common;

use common::*;
use corecast::config_file::{self, ConfigFile, NAMESPACE_KEYS};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::PathBuf;

const DASHBOARD: &str = "deploy/grafana/corecast-dashboard.json";
const ALERTS: &str = "deploy/prometheus/corecast-alerts.yml";
const SAMPLE: &str = "deploy/corecast.toml";

/// Made by Prometheus for every scrape target, not by the server.
const PROMETHEUS_MADE: [&str; 1] = ["up"];
/// Labels Prometheus attaches to every scraped sample.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];
/// Metrics the server renders only with `--tls-cert`.
const TLS_ONLY: [&str; 1] = ["corecast_tls_cert_not_after_seconds"];
/// The one key the sample sets to other than its default.
const SAMPLE_ADMIN_LISTEN: &str = "127.0.0.1:9002";

fn kit_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn kit(relative: &str) -> String {
    std::fs::read_to_string(kit_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// One vector selector of a PromQL expression: a metric and its label
/// matchers (label, operator, value).
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// Words of PromQL that are not metric names when not followed by `(`.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
];
/// Followed by a list of label names in parentheses.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past the `close` that matches the `open` at `at`.
fn skip_group(b: &[u8], at: usize, open: u8, close: u8) -> usize {
    let mut depth = 0;
    let mut i = at;
    while i < b.len() {
        match b[i] {
            b'"' => i = skip_string(b, i) - 1,
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!(
        "unbalanced {:?} in {:?}",
        open as char,
        String::from_utf8_lossy(b)
    );
}

/// The index just past the string literal starting at `at`.
fn skip_string(b: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    while b[i] != b'"' {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    i + 1
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The label matchers between `{` and `}`.
fn matchers(inner: &str) -> Vec<(String, String, String)> {
    let b = inner.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident_start(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let label = &inner[start..i];
        let op_start = i;
        while b[i] != b'"' {
            i += 1;
        }
        let op = inner[op_start..i].trim().to_string();
        let end = skip_string(b, i);
        out.push((label.to_string(), op, inner[i + 1..end - 1].to_string()));
        i = end;
    }
    out
}

/// Every vector selector of a PromQL expression (Grafana's `$variables`
/// ignored): a word that is not a function, aggregation, keyword or label
/// list is a metric name.
fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' {
            i = skip_string(b, i);
        } else if c == b'[' {
            i = skip_group(b, i, b'[', b']');
        } else if c == b'$' {
            i += 1;
            if b.get(i) == Some(&b'{') {
                i = skip_group(b, i, b'{', b'}');
            }
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < b.len() && b[next] == b' ' {
                next += 1;
            }
            let call = b.get(next) == Some(&b'(');
            if LABEL_LISTS.contains(&word) {
                if call {
                    i = skip_group(b, next, b'(', b')');
                }
            } else if !call && !AGGREGATIONS.contains(&word) && !KEYWORDS.contains(&word) {
                let mut sel = Selector {
                    metric: word.to_string(),
                    matchers: Vec::new(),
                };
                if b.get(i) == Some(&b'{') {
                    let end = skip_group(b, i, b'{', b'}');
                    sel.matchers = matchers(&expr[i + 1..end - 1]);
                    i = end;
                }
                out.push(sel);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// A `/metrics` body: each sample name with the label pairs of its samples.
fn samples(body: &str) -> BTreeMap<String, Vec<Vec<(String, String)>>> {
    let mut out: BTreeMap<String, Vec<Vec<(String, String)>>> = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let labels = match line[name_end..].strip_prefix('{') {
            Some(rest) => matchers(&rest[..rest.rfind('}').expect("closing brace")])
                .into_iter()
                .map(|(k, _, v)| (k, v))
                .collect(),
            None => Vec::new(),
        };
        out.entry(line[..name_end].to_string())
            .or_default()
            .push(labels);
    }
    out
}

/// What in `exprs` the scrape `served` lacks: unknown metrics, label
/// values no sample has; empty when every selector is served.
fn unserved(
    exprs: &[String],
    served: &BTreeMap<String, Vec<Vec<(String, String)>>>,
) -> Vec<String> {
    let mut missing = Vec::new();
    for expr in exprs {
        let sels = selectors(expr);
        assert!(!sels.is_empty(), "no metric found in {expr:?}");
        for sel in sels {
            if PROMETHEUS_MADE.contains(&sel.metric.as_str()) {
                continue;
            }
            let Some(label_sets) = served.get(&sel.metric) else {
                missing.push(format!("{} (in {expr})", sel.metric));
                continue;
            };
            for (label, op, value) in &sel.matchers {
                if TARGET_LABELS.contains(&label.as_str()) || value.contains('$') {
                    continue;
                }
                let found = label_sets.iter().any(|set| {
                    set.iter()
                        .any(|(k, v)| k == label && (op != "=" || v == value))
                });
                if !found {
                    missing.push(format!(
                        "{}{{{label}{op}{value:?}}} (in {expr})",
                        sel.metric
                    ));
                }
            }
        }
    }
    missing
}

/// Every `expr` of the dashboard's panels, and its variables' queries.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value = serde_json::from_str(&kit(DASHBOARD)).expect("dashboard JSON");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("a panel's targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}");
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        let q = var["query"]["query"].as_str().unwrap();
        let metric = q
            .strip_prefix("label_values(")
            .and_then(|r| r.split(',').next())
            .expect("label_values(METRIC, LABEL)");
        exprs.push(metric.trim().to_string());
    }
    exprs
}

/// Every `expr:` of the alert rules (one line, or a `|` / `>` block).
fn alert_exprs() -> Vec<String> {
    let text = kit(ALERTS);
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            let quoted = |q: char| value.len() > 1 && value.starts_with(q) && value.ends_with(q);
            let value = if quoted('\'') || quoted('"') {
                &value[1..value.len() - 1]
            } else {
                value
            };
            exprs.push(value.to_string());
        }
    }
    exprs
}

#[test]
fn the_extractor_finds_metrics_and_matchers_and_skips_functions_labels_and_variables() {
    let sels = selectors(
        "histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{x=\"1\",instance=~\"$instance\"}[$__rate_interval]))) > 0.25 * b offset 1h and on(job) sum without (worker) (c:d{y!=\"}\"}) > 1e3",
    );
    let names: Vec<&str> = sels.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b", "c:d"]);
    assert_eq!(sels[0].matchers[0], ("x".into(), "=".into(), "1".into()));
    assert_eq!(sels[2].matchers[0], ("y".into(), "!=".into(), "}".into()));
}

#[test]
fn a_metric_or_label_value_the_server_does_not_serve_is_reported() {
    let served = samples("corecast_x_total{reason=\"a\"} 0\ncorecast_y 1\n");
    let missing = unserved(
        &[
            "rate(corecast_x_total{reason=\"a\"}[5m]) + corecast_y".into(),
            "corecast_no_such_metric".into(),
            "corecast_x_total{reason=\"b\"}".into(),
            "corecast_y{worker!=\"0\"}".into(),
        ],
        &served,
    );
    assert_eq!(missing.len(), 3, "{missing:?}");
}

#[test]
fn every_metric_of_the_dashboard_and_the_alert_rules_is_served() {
    let plain = ChildServer::start(&[], None);
    let cert = test_cert();
    let tls = ChildServer::start(
        &[
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            cert.key.to_str().unwrap(),
        ],
        None,
    );
    let mut served = samples(&plain.metrics());
    let with_tls = samples(&tls.metrics());
    for name in TLS_ONLY {
        assert!(!served.contains_key(name), "{name} served without TLS");
        let samples = with_tls
            .get(name)
            .unwrap_or_else(|| panic!("{name} not served with TLS"));
        served.insert(name.to_string(), samples.clone());
    }
    let (dashboard, alerts) = (dashboard_exprs(), alert_exprs());
    assert!(
        dashboard.len() >= 40,
        "{} dashboard queries",
        dashboard.len()
    );
    assert!(alerts.len() >= 20, "{} alert rules", alerts.len());
    let missing = unserved(&dashboard, &served);
    assert!(
        missing.is_empty(),
        "{DASHBOARD} selects what /metrics lacks: {missing:#?}"
    );
    let missing = unserved(&alerts, &served);
    assert!(
        missing.is_empty(),
        "{ALERTS} selects what /metrics lacks: {missing:#?}"
    );
}

/// One setting line of the sample: its key, its table (`None` at the
/// top), whether it is commented out, and the comment above it.
#[derive(Debug)]
struct Entry {
    key: String,
    table: Option<String>,
    commented: bool,
    comment: String,
}

/// `key = ` or `# key = ` lines, and `[namespace…]` / `# [namespace…]` headers.
fn setting(line: &str) -> Option<(bool, &str)> {
    let (commented, rest) = match line.strip_prefix("# ") {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (key, _) = rest.split_once(" = ")?;
    key.bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        .then_some((commented, key))
}

fn header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("# ").unwrap_or(line);
    rest.starts_with("[namespace").then_some(rest)
}

fn entries(text: &str) -> Vec<Entry> {
    let lines: Vec<&str> = text.lines().collect();
    let mut table = None;
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if let Some(h) = header(line) {
            table = Some(h.to_string());
            continue;
        }
        let Some((commented, key)) = setting(line) else {
            continue;
        };
        let mut comment: Vec<&str> = lines[..n]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#') && setting(l).is_none() && header(l).is_none())
            .map(|l| l.trim_start_matches('#').trim())
            .collect();
        comment.reverse();
        out.push(Entry {
            key: key.to_string(),
            table: table.clone(),
            commented,
            comment: comment.join(" "),
        });
    }
    out
}

#[test]
fn the_sample_configuration_documents_every_key_once_and_each_reload_rule() {
    let text = kit(SAMPLE);
    let entries = entries(&text);
    let top: Vec<&Entry> = entries.iter().filter(|e| e.table.is_none()).collect();
    let top_keys: Vec<&str> = top.iter().map(|e| e.key.as_str()).collect();
    let mut accepted = config_file::keys();
    let mut listed: Vec<String> = top_keys.iter().map(|k| k.to_string()).collect();
    accepted.sort();
    listed.sort();
    assert_eq!(listed, accepted, "{SAMPLE}'s top-level keys, each once");
    let in_tables: BTreeSet<&str> = entries
        .iter()
        .filter(|e| e.table.is_some())
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(
        in_tables,
        NAMESPACE_KEYS.into_iter().collect::<BTreeSet<_>>(),
        "{SAMPLE}'s namespace settings"
    );
    for e in &entries {
        assert!(
            e.table.is_none() || e.commented,
            "{}: the namespace tables are examples, commented out",
            e.key
        );
        let reloaded = e.table.is_some() || config_file::reloadable(&e.key);
        let says = if reloaded {
            "SIGHUP: reloaded"
        } else {
            "SIGHUP: needs a restart"
        };
        assert!(e.comment.contains(says), "{}: say {says:?}: {e:?}", e.key);
        assert!(e.comment.contains("Default:"), "{}: say its default", e.key);
    }
    // The examples commented out are valid too: uncommented, the file reads.
    let uncommented: String = text
        .lines()
        .map(|l| match (setting(l), header(l)) {
            (Some((true, _)), _) | (_, Some(_)) => l.strip_prefix("# ").unwrap_or(l),
            _ => l,
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let path = std::env::temp_dir().join(format!(
        "corecast-deploy-uncommented-{}.toml",
        std::process::id()
    ));
    std::fs::write(&path, uncommented).unwrap();
    let file = ConfigFile::read(&path);
    let _ = std::fs::remove_file(&path);
    let file = file.unwrap_or_else(|e| panic!("uncommented {SAMPLE}: {e}"));
    assert!(!file.namespaces().is_empty());
}

#[test]
fn the_sample_configuration_sets_the_defaults_and_the_admin_listener_only() {
    let argv = |args: &[&str]| -> Vec<OsString> {
        ["corecast", "serve"]
            .iter()
            .chain(args)
            .map(OsString::from)
            .collect()
    };
    let sample = kit_path(SAMPLE);
    let serve_args = |argv: Vec<OsString>| {
        let (cli, _) = config_file::parse(&argv).expect("parses");
        let corecast::cli::Command::Serve(mut args) = cli.command;
        args.config = None;
        format!("{args:?}")
    };
    assert_eq!(
        serve_args(argv(&["--config", sample.to_str().unwrap()])),
        serve_args(argv(&["--admin-listen", SAMPLE_ADMIN_LISTEN])),
    );
}

#[test]
fn the_server_starts_and_reloads_with_the_sample_configuration_as_it_is() {
    let sample = kit_path(SAMPLE);
    let server = ChildServer::start(&["--config", sample.to_str().unwrap()], None);
    assert!(
        server
            .metrics()
            .contains("corecast_connections_open{worker=\"0\"}"),
        "{}",
        server.log_text()
    );
    server.hup();
    server.wait_reloads("ok", 1);
    assert_eq!(
        metric(
            &server.metrics(),
            "corecast_reloads_total{result=\"failed\"}"
        ),
        0
    );
}
