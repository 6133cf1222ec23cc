//! Processes: `/proc` measurements of this one (where the in-process server
//! runs), and the `corecast` binary in a child process, for tests that need
//! the real process (a descriptor limit, a signal, more sockets than one
//! process may hold).

use corecast::server::IoMode;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::{io_mode, metrics};

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`: 100 on every
/// Linux architecture, whatever the kernel's own tick rate).
const USER_HZ: u64 = 100;

/// Replaces the file at `path` with `text` in one rename, so a reload
/// never reads half of it.
pub fn write_config(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Descriptors open in this process (the in-process server's included).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's resident set, in bytes.
pub fn rss_bytes() -> u64 {
    status_file_kib("/proc/self/status", "VmRSS:") * 1024
}

/// The resident set of process `pid`, in KiB, once it has settled: a
/// server that accepts connections may still be setting up its other
/// workers (io_uring rings and buffer rings: ~25 MiB more in a debug
/// build), so a reading taken at the first accept is too low and makes any
/// later reading look like growth. Waits (5 s at most) for two readings
/// 250 ms apart within 256 KiB of each other.
pub fn settled_rss_kib(pid: u32) -> u64 {
    let end = Instant::now() + Duration::from_secs(5);
    let mut last = status_kib(pid, "VmRSS:");
    loop {
        thread::sleep(Duration::from_millis(250));
        let now = status_kib(pid, "VmRSS:");
        if now.abs_diff(last) <= 256 || Instant::now() >= end {
            return now;
        }
        last = now;
    }
}

/// A field of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    status_file_kib(&format!("/proc/{pid}/status"), field)
}

fn status_file_kib(path: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(path).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix(" kB"))
        .unwrap_or_else(|| panic!("{field} not in {path}"))
        .trim()
        .parse()
        .unwrap()
}

/// The `--io` flag for the backend under test.
pub fn io_flag() -> &'static str {
    match io_mode() {
        IoMode::Epoll => "epoll",
        IoMode::Uring => "uring",
        IoMode::Auto => "auto",
    }
}

/// The `corecast` binary in a child process. Dropping it kills the child
/// (SIGKILL), so a failed assertion never leaves a server behind.
pub struct ChildServer {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener: `/metrics` requests there are served by the
    /// admin thread, so they never show in the workers' connection counts.
    pub admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// The address logged as `name=ADDR` in `line`.
fn logged_addr(line: &str, name: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .and_then(|a| a.parse().ok())
}

impl ChildServer {
    /// Starts `corecast serve` on an ephemeral loopback port with `flags`
    /// (and the backend under test, and an admin listener). With `nofile`,
    /// the child runs under that descriptor limit (set by prlimit(1), which
    /// then execs it: same pid).
    pub fn start(flags: &[&str], nofile: Option<u32>) -> Self {
        match nofile {
            Some(n) => {
                Self::start_full(&["prlimit", &format!("--nofile={n}:{n}"), "--"], flags, &[])
            }
            None => Self::start_full(&[], flags, &[]),
        }
    }

    /// [`Self::start`] with `env` set in the child's environment.
    pub fn start_with_env(flags: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(&[], flags, env)
    }

    /// [`Self::start`] with the binary run by `prefix` (a command that
    /// execs its last argument: `setpriv …`, `prlimit … --`). `--io` in
    /// `flags` replaces the backend under test.
    pub fn start_under(prefix: &[&str], flags: &[&str]) -> Self {
        Self::start_full(prefix, flags, &[])
    }

    fn start_full(prefix: &[&str], flags: &[&str], env: &[(&str, &str)]) -> Self {
        let bin = env!("CARGO_BIN_EXE_corecast");
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--no-pin",
        ]);
        if !flags.contains(&"--io") {
            cmd.args(["--io", io_flag()]);
        }
        cmd.args(flags)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("spawn corecast (with prlimit(1) for a limit)");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut server = ChildServer {
            child,
            addr: unknown,
            admin: unknown,
            log: Arc::clone(&log),
        };
        // Keeps reading stderr for the child's whole life, so it never
        // blocks on a full pipe (at the descriptor limit it logs retries).
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("admin listener") {
                    let _ = tx.send((true, logged_addr(&line, "addr")));
                } else if line.contains("corecast listening") {
                    let _ = tx.send((false, logged_addr(&line, "local_addr")));
                }
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        // The admin listener is logged before the main one; a start that
        // falls back to epoll logs a second admin listener, the one in use.
        while server.addr == unknown {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok((true, Some(a))) => server.admin = a,
                Ok((false, Some(a))) => server.addr = a,
                _ => panic!(
                    "the server did not report its addresses:\n{}",
                    server.log_text()
                ),
            }
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Log lines so far containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().filter(|l| l.contains(needle)).count()
    }

    pub fn metrics(&self) -> String {
        metrics(self.admin)
    }

    /// CPU time (user + system, all threads) the child has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at field 3.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 1000 / USER_HZ)
    }

    /// Descriptors open in the child.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Sends SIGTERM (through kill(1)).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Sends SIGHUP (a reload).
    pub fn hup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Waits until `corecast_reloads_total{result}` reaches `n`.
    pub fn wait_reloads(&self, result: &str, n: u64) {
        let name = format!("corecast_reloads_total{{result=\"{result}\"}}");
        let end = Instant::now() + Duration::from_secs(10);
        while super::metric(&self.metrics(), &name) < n {
            assert!(
                Instant::now() < end,
                "no reload counted:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the child to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
