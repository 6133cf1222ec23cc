//! The configuration file (`corecast serve --config FILE`): a TOML file
//! whose keys are the long names of `serve`'s flags, read into the same
//! arguments the command line gives, so every setting has one parser, one
//! default and one meaning whichever way it arrives.
//!
//! ```toml
//! listen = "0.0.0.0:443"
//! max-connections = 500000
//! subprotocol = ["chat", "superchat"]   # a repeatable flag: a list
//! no-pin = true                         # a switch: true or false
//! tls-cert = "/etc/corecast/cert.pem"
//! tls-key = "/etc/corecast/key.pem"
//! ```
//!
//! Precedence: a flag on the command line, then the file, then the
//! environment (`CORECAST_PUBLISH_TOKEN`), then the default. A key the
//! command line also sets is ignored whole (a list is replaced, not
//! extended), as is one that conflicts with a flag given (`pin` in the
//! file, `--no-pin` on the command line).
//!
//! Every key is checked before the server starts: an unknown key, a value
//! of the wrong type or one the flag's own parser refuses fails with the
//! file, the line and the reason. The file is read again on `SIGHUP`
//! ([`Changes`]): the keys [`reloadable`] names (TLS, origins, tokens,
//! connection limits) and
//! the `[namespace."…"]` tables take effect with the reload, every other
//! change is reported as waiting for a restart. [`keys`] and
//! [`NAMESPACE_KEYS`] list every key a file may hold (deploy/corecast.toml
//! documents each, checked by tests/deploy.rs).

use crate::cli::Cli;
use crate::pubsub::policy::NamespacePolicy;
use clap::{ArgAction, CommandFactory, Parser};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// Largest configuration file read: a wrong path (a log, a disk image)
/// fails at once instead of being read whole.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The keys of tokens: a reload applies them, but only while tokens stay
/// on (or off) as the server started.
pub const JWT_KEYS: [&str; 6] = [
    "jwt-key",
    "jwks",
    "jwt-audience",
    "jwt-issuer",
    "jwt-leeway",
    "anonymous-subscribe",
];

/// The settings a `[namespace."…"]` table accepts: the list the loader
/// checks every key of a table against (and names in its error).
pub const NAMESPACE_KEYS: [&str; 8] = [
    "history-size",
    "history-bytes",
    "history-age",
    "last-value",
    "slow-consumer",
    "retained-topics",
    "max-rate",
    "anonymous-subscribe",
];

/// `serve`'s command, whose flags are the file's keys.
fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .expect("the serve subcommand")
        .clone()
}

/// Every key the file accepts at its top level, in `--help` order: the
/// long names of `serve`'s flags, less `config` (a file cannot name
/// another). The loader looks each key of a file up in this list.
pub fn keys() -> Vec<String> {
    serve_command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|&long| long != "config")
        .map(String::from)
        .collect()
}

/// The per-address limits a reload changes, but only while they stay on
/// (or off) as the server started: their table is made at start.
pub const PER_ADDRESS_KEYS: [&str; 2] = ["max-connections-per-ip", "max-connect-rate-per-ip"];

/// Whether a reload applies a change of `key` (besides the
/// `[namespace."…"]` tables, which it always applies); every other change
/// waits for a restart. The TLS keys, the token keys and the per-address
/// limits apply only while TLS, tokens or the per-address limits stay on
/// (or off) as the server started.
pub fn reloadable(key: &str) -> bool {
    matches!(
        key,
        "tls-cert" | "tls-key" | "tls-min-version" | "allowed-origin" | "max-connections"
    ) || JWT_KEYS.contains(&key)
        || PER_ADDRESS_KEYS.contains(&key)
}

/// One setting of the file: its key, its line and the arguments it stands
/// for (`--key=value`, once per list element; a switch is `--key` or
/// nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    key: String,
    line: usize,
    args: Vec<String>,
}

/// A configuration file, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    path: PathBuf,
    settings: Vec<Setting>,
    /// The `[namespace."…"]` tables.
    namespaces: Vec<NamespacePolicy>,
}

/// What changed between two readings of the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys the reload applies (the TLS settings; `namespace` for the
    /// namespace tables).
    pub applied: Vec<String>,
    /// Keys whose change waits for a restart.
    pub need_restart: Vec<String>,
}

/// The `--config` path on a command line (`--config PATH` or
/// `--config=PATH`, after the subcommand), if any.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().skip(2);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Parses a command line whose `serve` may name a configuration file:
/// the file's settings come first, then the command line's, which win.
/// Returns the parsed command line and the file it read.
pub fn parse(argv: &[OsString]) -> Result<(Cli, Option<ConfigFile>), clap::Error> {
    let is_serve = argv.get(1).is_some_and(|a| a == "serve");
    let Some(path) = config_path(argv).filter(|_| is_serve) else {
        return Ok((Cli::try_parse_from(argv)?, None));
    };
    let file = ConfigFile::read(&path)
        .map_err(|e| Cli::command().error(clap::error::ErrorKind::ValueValidation, e))?;
    Ok((parse_with(argv, &file)?, Some(file)))
}

/// A command line that fails only with `file`'s settings beside it (a
/// setting that needs another) says so.
fn blame(e: clap::Error, file: &ConfigFile, argv: &[OsString]) -> clap::Error {
    use clap::error::ErrorKind::*;
    let kind = e.kind();
    if matches!(
        kind,
        DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return e;
    }
    // The command line alone fails the same way: its own error.
    let first = |e: &clap::Error| first_line(&e.to_string());
    if Cli::command()
        .try_get_matches_from(argv)
        .is_err_and(|alone| alone.kind() == kind && first(&alone) == first(&e))
    {
        return e;
    }
    let text = e.to_string();
    let text = text.split("\n\nUsage:").next().unwrap_or(&text);
    let text = text.strip_prefix("error: ").unwrap_or(text);
    Cli::command().error(
        kind,
        format!("{} with the command line: {text}", file.path.display()),
    )
}

/// Parses `argv` with `file`'s settings before its own (`file` is also
/// the one a reload has just read again).
pub fn parse_with(argv: &[OsString], file: &ConfigFile) -> Result<Cli, clap::Error> {
    let matches = Cli::command()
        .try_get_matches_from(file.merge(argv))
        .map_err(|e| blame(e, file, argv))?;
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
}

/// The file's lines are counted from 1.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl ConfigFile {
    /// Reads and checks `path`: TOML, known keys, values of the right type
    /// that the flags' own parsers accept one by one.
    pub fn read(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let data = crate::server::config::read_regular_file(path, MAX_FILE_BYTES)
            .map_err(|e| format!("{shown}: {e}"))?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "{shown}: more than a configuration file may hold ({MAX_FILE_BYTES} bytes)"
            ));
        }
        let text = String::from_utf8(data).map_err(|_| format!("{shown}: not UTF-8 text"))?;
        let blame = |(line, why): (Option<usize>, String)| match line {
            Some(line) => format!("{shown}:{line}: {why}"),
            None => format!("{shown}: {why}"),
        };
        let settings = Self::settings(&text).map_err(blame)?;
        let namespaces = Self::read_namespaces(&text).map_err(blame)?;
        Ok(Self {
            path: path.to_path_buf(),
            settings,
            namespaces,
        })
    }

    /// The per-namespace policies (`[namespace."prices"]` tables).
    pub fn namespaces(&self) -> &[NamespacePolicy] {
        &self.namespaces
    }

    /// The `[namespace."…"]` tables of a file's text: each a valid topic
    /// name with settings of [`NAMESPACE_KEYS`] (each optional, read by
    /// the flag's own parser).
    fn read_namespaces(text: &str) -> Result<Vec<NamespacePolicy>, (Option<usize>, String)> {
        let table = DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            (line, format!("not valid TOML: {}", e.message()))
        })?;
        let Some(ns) = table.get_ref().get("namespace") else {
            return Ok(Vec::new());
        };
        let line = line_of(text, ns.span().start);
        let DeValue::Table(ns) = ns.get_ref() else {
            return Err((
                Some(line),
                "`namespace`: tables `[namespace.\"prefix\"]`".into(),
            ));
        };
        let mut out = Vec::new();
        for (prefix, settings) in ns.iter() {
            let line = line_of(text, prefix.span().start);
            let prefix = prefix.get_ref().to_string();
            let fail = |why: String| (Some(line), format!("`namespace.\"{prefix}\"`: {why}"));
            crate::pubsub::topic::validate(&prefix, 65_535).map_err(|e| fail(e.to_string()))?;
            let DeValue::Table(settings) = settings.get_ref() else {
                return Err(fail("a table of settings".into()));
            };
            let mut p = NamespacePolicy {
                prefix: prefix.clone(),
                ..Default::default()
            };
            for (key, value) in settings.iter() {
                let line = line_of(text, key.span().start);
                let key = key.get_ref().to_string();
                let fail =
                    |why: String| (Some(line), format!("`namespace.\"{prefix}\".{key}`: {why}"));
                if !NAMESPACE_KEYS.contains(&key.as_str()) {
                    return Err(fail(format!(
                        "unknown namespace setting ({})",
                        NAMESPACE_KEYS.join(", ")
                    )));
                }
                let v = scalar(value.get_ref()).map_err(&fail)?;
                match key.as_str() {
                    "history-size" => {
                        p.history_size =
                            Some(v.parse().map_err(|_| fail(format!("not a count: {v}")))?)
                    }
                    "history-bytes" => {
                        p.history_bytes = Some(crate::cli::parse_size(&v).map_err(&fail)?)
                    }
                    "history-age" => {
                        p.history_age = Some(crate::cli::parse_duration(&v).map_err(&fail)?)
                    }
                    "last-value" => {
                        p.last_value = Some(match value.get_ref() {
                            DeValue::Boolean(b) => *b,
                            _ => return Err(fail("`true` or `false`".into())),
                        })
                    }
                    "anonymous-subscribe" => {
                        p.anonymous_subscribe = Some(match value.get_ref() {
                            DeValue::Boolean(b) => *b,
                            _ => return Err(fail("`true` or `false`".into())),
                        })
                    }
                    "max-rate" => {
                        let max = crate::pubsub::control::MAX_RATE;
                        p.max_rate = Some(
                            v.parse::<u32>()
                                .ok()
                                .filter(|r| (1..=max).contains(r))
                                .ok_or_else(|| {
                                    fail(format!("1 to {max} updates per second, not {v}"))
                                })?,
                        )
                    }
                    "retained-topics" => {
                        p.retained_topics =
                            Some(v.parse().map_err(|_| fail(format!("not a count: {v}")))?)
                    }
                    "slow-consumer" => {
                        p.slow_consumer = Some(
                            crate::pubsub::policy::SlowConsumerPolicy::parse(&v).map_err(&fail)?,
                        )
                    }
                    other => {
                        // Listed in NAMESPACE_KEYS but not read here: the
                        // unit test `every_namespace_key_is_read` fails first.
                        return Err(fail(format!("{other}: listed but not read")));
                    }
                }
            }
            out.push(p);
        }
        Ok(out)
    }

    /// The path the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings of a file's text, each checked alone against `serve`.
    fn settings(text: &str) -> Result<Vec<Setting>, (Option<usize>, String)> {
        let table = DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            (line, format!("not valid TOML: {}", e.message()))
        })?;
        let mut cmd = Cli::command();
        let serve = serve_command();
        let keys = keys();
        let mut settings = Vec::new();
        for (key, value) in table.get_ref().iter() {
            let line = line_of(text, key.span().start);
            let key = key.get_ref().to_string();
            if key == "namespace" {
                continue; // `Self::namespaces`
            }
            let fail = |why: String| (Some(line), format!("`{key}`: {why}"));
            if key == "config" {
                return Err(fail("a configuration file cannot name another".into()));
            }
            let arg = serve
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()));
            let Some(arg) = arg.filter(|_| keys.contains(&key)) else {
                return Err(fail(
                    "unknown setting (the keys are `corecast serve --help`'s flags without `--`)"
                        .into(),
                ));
            };
            let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
            let list = matches!(arg.get_action(), ArgAction::Append);
            let args = match value.get_ref() {
                DeValue::Boolean(on) if switch => {
                    if *on {
                        vec![format!("--{key}")]
                    } else {
                        Vec::new()
                    }
                }
                _ if switch => return Err(fail("a switch: `true` or `false`".into())),
                DeValue::Array(items) if list => {
                    let mut args = Vec::new();
                    for item in items {
                        args.push(format!(
                            "--{key}={}",
                            scalar(item.get_ref()).map_err(&fail)?
                        ));
                    }
                    args
                }
                DeValue::Array(_) => {
                    return Err(fail("takes one value, not a list".into()));
                }
                other => vec![format!("--{key}={}", scalar(other).map_err(&fail)?)],
            };
            // The flag's own parser and rules, for this setting alone.
            let alone = ["corecast".to_string(), "serve".to_string()]
                .into_iter()
                .chain(args.iter().cloned())
                .chain(companions(&key));
            if let Err(e) = cmd.try_get_matches_from_mut(alone) {
                return Err(fail(first_line(&e.to_string())));
            }
            settings.push(Setting { key, line, args });
        }
        Ok(settings)
    }

    /// `argv` with the file's settings inserted after `serve`, less those
    /// the command line sets itself (or conflicts with).
    fn merge(&self, argv: &[OsString]) -> Vec<OsString> {
        let overridden = overridden_by(argv);
        let mut out: Vec<OsString> = argv.iter().take(2).cloned().collect();
        for s in &self.settings {
            if !overridden(&s.key) {
                out.extend(s.args.iter().map(OsString::from));
            }
        }
        out.extend(argv.iter().skip(2).cloned());
        out
    }

    /// The keys whose arguments differ between `self` (the file the
    /// server started with) and `new`, sorted, less those the command line
    /// `argv` overrides (the file does not matter for them): what a reload
    /// applies and what waits for a restart.
    pub fn changes(&self, new: &ConfigFile, argv: &[OsString]) -> Changes {
        let overridden = overridden_by(argv);
        let map = |f: &ConfigFile| -> BTreeMap<String, Vec<String>> {
            f.settings
                .iter()
                .map(|s| (s.key.clone(), s.args.clone()))
                .collect()
        };
        let mut changes = Changes::default();
        if self.namespaces != new.namespaces {
            changes.applied.push("namespace".into());
        }
        let (old, new) = (map(self), map(new));
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            if old.get(key) != new.get(key) && !overridden(key) {
                if reloadable(key) {
                    changes.applied.push(key.clone());
                } else {
                    changes.need_restart.push(key.clone());
                }
            }
        }
        changes
    }
}

/// Whether the command line `argv` sets a key itself, or a flag that
/// conflicts with it either way (`--no-pin` given, `pin` in the file): such
/// a file key is dropped.
fn overridden_by(argv: &[OsString]) -> impl Fn(&str) -> bool {
    let serve = serve_command();
    let given: Vec<String> = argv
        .iter()
        .skip(2)
        .filter_map(|a| {
            let a = a.to_string_lossy();
            let long = a.strip_prefix("--")?;
            Some(long.split('=').next().unwrap_or(long).to_string())
        })
        .collect();
    move |key: &str| {
        let find = |long: &str| serve.get_arguments().find(|a| a.get_long() == Some(long));
        let Some(arg) = find(key) else {
            return false;
        };
        given.iter().any(|g| {
            g == key
                || serve
                    .get_arg_conflicts_with(arg)
                    .iter()
                    .any(|c| c.get_long() == Some(g.as_str()))
                || find(g).is_some_and(|ga| {
                    serve
                        .get_arg_conflicts_with(ga)
                        .iter()
                        .any(|c| c.get_long() == Some(key))
                })
        })
    }
}

/// The flags a setting needs beside it to be checked alone (`tls-cert`
/// and `tls-key` come as a pair; `plain-listen` needs both;
/// `plain-proxy-protocol` needs `plain-listen`; the NATS credentials and
/// CA need a NATS URL).
fn companions(key: &str) -> Vec<String> {
    let needs: &[&str] = match key {
        "tls-cert" => &["--tls-key=x"],
        "tls-key" => &["--tls-cert=x"],
        "plain-listen" => &["--tls-cert=x", "--tls-key=x"],
        "plain-proxy-protocol" => &["--plain-listen=127.0.0.1:1", "--tls-cert=x", "--tls-key=x"],
        "nats-credentials" | "nats-ca" => &["--nats-url=nats://127.0.0.1:4222"],
        _ => &[],
    };
    needs.iter().map(|a| a.to_string()).collect()
}

/// A scalar as the text a flag would be given.
fn scalar(value: &DeValue<'_>) -> Result<String, String> {
    match value {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
            .map(|n| n.to_string())
            .map_err(|_| format!("integer {} out of range", i.as_str())),
        DeValue::Float(f) => Ok(f.as_str().to_string()),
        DeValue::Boolean(b) => Ok(b.to_string()),
        DeValue::Datetime(_) => Err("a date is not a value any setting takes".into()),
        DeValue::Array(_) => Err("a list inside a list".into()),
        DeValue::Table(_) => Err("a table is not a setting's value".into()),
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;
    use std::io::Write;

    fn file(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("corecast.toml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        (dir, path)
    }

    /// A directory removed at drop.
    mod tempdir {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct Dir(pub PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "corecast-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// `corecast serve --config PATH` and `extra` flags after it.
    fn with_file(path: &Path, extra: &[&str]) -> Result<crate::server::Config, String> {
        let mut args = argv(&["corecast", "serve", "--config", path.to_str().unwrap()]);
        args.extend(extra.iter().map(OsString::from));
        serve(&args)
    }

    fn serve(argv: &[OsString]) -> Result<crate::server::Config, String> {
        let (cli, _) = parse(argv).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command;
        Ok(args.to_config())
    }

    #[test]
    fn the_file_sets_what_the_command_line_does_not() {
        let (_d, path) = file(
            "listen = \"127.0.0.1:9300\"\nmax-connections = 1_000\nsubprotocol = [\"a\", \"b\"]\nno-pin = true\nping-interval = \"5s\"\n",
        );
        let p = path.to_str().unwrap();
        let c = with_file(&path, &[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9300".parse().unwrap());
        assert_eq!(c.max_connections, 1000);
        assert_eq!(c.subprotocols, ["a", "b"]);
        assert_eq!(c.pin, crate::server::config::PinMode::Never);
        assert_eq!(c.ping_interval, Some(std::time::Duration::from_secs(5)));
        // The command line wins, a list is replaced, a conflict is dropped.
        let c = serve(&argv(&[
            "corecast",
            "serve",
            "--max-connections=7",
            "--config",
            p,
            "--subprotocol",
            "c",
            "--pin",
            "always",
        ]))
        .unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.subprotocols, ["c"]);
        assert_eq!(c.pin, crate::server::config::PinMode::Always);
        assert_eq!(c.listen, "127.0.0.1:9300".parse().unwrap());
        // The other way round: `pin` in the file, `--no-pin` given.
        let (_d2, path2) = file("pin = \"always\"\n");
        let c = with_file(&path2, &["--no-pin"]).unwrap();
        assert_eq!(c.pin, crate::server::config::PinMode::Never);
    }

    #[test]
    fn an_error_of_the_command_line_alone_is_not_blamed_on_the_file() {
        let (_d, path) = file("workers = 2\n");
        let e = with_file(&path, &["--listen", "nowhere"]).unwrap_err();
        assert!(!e.contains("with the command line"), "{e}");
        assert!(e.contains("--listen"), "{e}");
    }

    #[test]
    fn a_false_switch_and_an_empty_file_change_nothing() {
        let (_d, path) = file("no-pin = false\n");
        let c = with_file(&path, &[]).unwrap();
        assert_eq!(c.pin, crate::server::config::Config::default().pin);
        let (_d, path) = file("# nothing\n");
        let c = with_file(&path, &[]).unwrap();
        assert_eq!(
            c.max_connections,
            crate::server::config::Config::default().max_connections
        );
    }

    /// Each bad file fails with the file, the line and the reason.
    #[test]
    fn bad_settings_name_the_file_line_and_reason() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "listen = \"127.0.0.1:1\"\nmax-conections = 5\n",
                2,
                "unknown setting",
            ),
            (
                "\n\nmax-message-size = \"12 parsecs\"\n",
                3,
                "max-message-size",
            ),
            ("workers = \"many\"\n", 1, "workers"),
            ("no-pin = 1\n", 1, "a switch"),
            ("listen = [\"a\", \"b\"]\n", 1, "not a list"),
            ("subprotocol = [[\"a\"]]\n", 1, "a list inside a list"),
            (
                "[namespace.prices]\nhistory = 5\n",
                2,
                "unknown namespace setting",
            ),
            (
                "[namespace.prices]\nhistory-size = \"x\"\n",
                2,
                "not a count",
            ),
            (
                "[namespace.prices]\nhistory-age = \"5 parsecs\"\n",
                2,
                "history-age",
            ),
            (
                "[namespace.prices]\nlast-value = 1\n",
                2,
                "`true` or `false`",
            ),
            ("[namespace.\"a b\"]\nlast-value = true\n", 1, "allowed"),
            ("namespace = 5\n", 1, "tables"),
            ("[namespace]\nprices = 5\n", 2, "a table of settings"),
            ("config = \"other.toml\"\n", 1, "cannot name another"),
            ("ipv6-prefix-len = 129\n", 1, "ipv6-prefix-len"),
            (
                "max-connections = 5\nmax-connections = 6\n",
                2,
                "not valid TOML",
            ),
            ("listen = \n", 1, "not valid TOML"),
            ("plain-listen = \"nonsense\"\n", 1, "plain-listen"),
            ("tls-min-version = \"1.1\"\n", 1, "tls-min-version"),
            ("workers = 99999999999999999999\n", 1, "workers"),
        ];
        for &(text, line, why) in cases {
            let (_d, path) = file(text);
            let err = ConfigFile::read(&path).unwrap_err();
            let want = format!("{}:{line}: ", path.display());
            assert!(err.starts_with(&want), "{text:?}: {err}");
            assert!(err.contains(why), "{text:?}: {err}");
            // And the command line fails the same way, before anything starts.
            let e = with_file(&path, &[]).unwrap_err();
            assert!(e.contains(&want), "{e}");
        }
    }

    #[test]
    fn namespace_tables_give_per_namespace_policies_and_a_reload_applies_their_changes() {
        let (_d, path) = file(
            "workers = 2\n[namespace.prices]\nhistory-size = 1_000\nhistory-age = \"60m\"\nslow-consumer = \"always\"\nmax-rate = 10\n\n[namespace.\"news/eu\"]\nlast-value = false\nhistory-bytes = \"64KiB\"\n",
        );
        let f = ConfigFile::read(&path).unwrap();
        let mut ns = f.namespaces().to_vec();
        ns.sort_by(|a, b| b.prefix.cmp(&a.prefix));
        assert_eq!(ns.len(), 2);
        assert_eq!(ns[0].prefix, "prices");
        assert_eq!(ns[0].history_size, Some(1000));
        assert_eq!(
            ns[0].history_age,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!((ns[0].history_bytes, ns[0].last_value), (None, None));
        assert_eq!(
            ns[0].slow_consumer,
            Some(crate::pubsub::policy::SlowConsumerPolicy::Always)
        );
        assert_eq!(ns[0].max_rate, Some(10));
        assert_eq!(ns[1].prefix, "news/eu");
        assert_eq!(
            (ns[1].history_bytes, ns[1].last_value),
            (Some(65_536), Some(false))
        );
        let (_d2, path2) = file("workers = 2\n[namespace.prices]\nhistory-size = 5\n");
        let changes = f.changes(&ConfigFile::read(&path2).unwrap(), &[]);
        assert_eq!(changes.applied, ["namespace"]);
        assert!(changes.need_restart.is_empty(), "{changes:?}");
    }

    #[test]
    fn the_keys_are_serves_flags_less_config() {
        let keys = keys();
        for k in ["listen", "no-pin", "subprotocol", "tls-cert", "jwt-key"] {
            assert!(keys.iter().any(|x| x == k), "{k} missing: {keys:?}");
        }
        for k in ["config", "help"] {
            assert!(!keys.iter().any(|x| x == k), "{k} listed: {keys:?}");
        }
        assert!(reloadable("tls-cert") && reloadable("jwt-key") && !reloadable("listen"));
    }

    /// A key listed in `NAMESPACE_KEYS` that the loader does not read
    /// fails here, not in an operator's file.
    #[test]
    fn every_namespace_key_is_read() {
        let value = |key: &str| match key {
            "last-value" | "anonymous-subscribe" => "false",
            "history-bytes" => "\"1KiB\"",
            "history-age" => "\"1s\"",
            "slow-consumer" => "\"drop-newest\"",
            _ => "1",
        };
        for key in NAMESPACE_KEYS {
            let (_d, path) = file(&format!("[namespace.prices]\n{key} = {}\n", value(key)));
            let f = ConfigFile::read(&path).unwrap_or_else(|e| panic!("{key}: {e}"));
            let p = &f.namespaces()[0];
            let read = match key {
                "history-size" => p.history_size.is_some(),
                "history-bytes" => p.history_bytes.is_some(),
                "history-age" => p.history_age.is_some(),
                "last-value" => p.last_value.is_some(),
                "slow-consumer" => p.slow_consumer.is_some(),
                "retained-topics" => p.retained_topics.is_some(),
                "max-rate" => p.max_rate.is_some(),
                "anonymous-subscribe" => p.anonymous_subscribe.is_some(),
                other => panic!("{other}: add it to this test"),
            };
            assert!(read, "{key} parsed but not stored");
        }
    }

    #[test]
    fn a_setting_that_needs_another_names_the_file() {
        let (_d, path) = file("plain-listen = \"127.0.0.1:9\"\n");
        let e = with_file(&path, &[]).unwrap_err();
        assert!(
            e.contains(&format!("{} with the command line", path.display())),
            "{e}"
        );
        assert!(e.contains("--tls-cert"), "{e}");
        // Given on the command line, the pair completes the file.
        let ok = with_file(&path, &["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert_eq!(ok.plain_listen, Some("127.0.0.1:9".parse().unwrap()));
    }

    #[test]
    fn a_missing_or_huge_file_is_refused_by_name() {
        let dir = tempdir::Dir::new();
        let missing = dir.0.join("nope.toml");
        let err = ConfigFile::read(&missing).unwrap_err();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
        let huge = dir.0.join("huge.toml");
        std::fs::write(&huge, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = ConfigFile::read(&huge).unwrap_err();
        assert!(
            err.contains("more than a configuration file may hold"),
            "{err}"
        );
    }

    #[test]
    fn a_reread_file_tells_what_a_reload_applies_and_what_waits() {
        let (_d, path) = file("tls-cert = \"a.pem\"\ntls-key = \"a.key\"\nworkers = 2\n");
        let old = ConfigFile::read(&path).unwrap();
        std::fs::write(
            &path,
            "tls-cert = \"b.pem\"\ntls-key = \"a.key\"\nworkers = 3\nmax-frame-size = 9\n",
        )
        .unwrap();
        let new = ConfigFile::read(&path).unwrap();
        let cli = argv(&["corecast", "serve", "--config", path.to_str().unwrap()]);
        let c = old.changes(&new, &cli);
        assert_eq!(c.applied, ["tls-cert"]);
        assert_eq!(c.need_restart, ["max-frame-size", "workers"]);
        assert_eq!(new.changes(&new, &cli), Changes::default());
        // A key the command line sets is not the file's to change.
        let mut cli = cli;
        cli.push("--workers=5".into());
        cli.push("--tls-cert=c.pem".into());
        let c = old.changes(&new, &cli);
        assert!(c.applied.is_empty(), "{c:?}");
        assert_eq!(c.need_restart, ["max-frame-size"]);
    }
}
