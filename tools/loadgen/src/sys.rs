//! What the kernel says about processes and sockets: a process's resident
//! set and CPU time (`/proc/PID/status`, `/proc/PID/stat`), TCP socket
//! totals (`/proc/net/sockstat`), this process's own usage (`getrusage`),
//! and the descriptor and port limits that bound one loadgen process.

use std::fs;
use std::io;

/// `VmRSS` of a process, in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kb(&status, "VmRSS:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU time of a process (all its threads), in seconds.
pub fn process_cpu_s(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 / clock_ticks_per_s())
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

/// utime + stime (fields 14 and 15) in clock ticks. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after the
/// last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// The `TCP:` line of `/proc/net/sockstat` (whole network namespace: both
/// ends of a loopback connection are counted, and so is everyone else's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    /// Pages of memory used by TCP socket buffers.
    pub mem_pages: u64,
}

impl Sockstat {
    pub fn read() -> io::Result<Self> {
        let s = fs::read_to_string("/proc/net/sockstat")?;
        Self::parse(&s).ok_or_else(|| io::Error::other("no TCP line in /proc/net/sockstat"))
    }

    fn parse(s: &str) -> Option<Self> {
        let line = s.lines().find_map(|l| l.strip_prefix("TCP:"))?;
        let mut out = Self::default();
        let mut it = line.split_whitespace();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let v: u64 = v.parse().ok()?;
            match k {
                "inuse" => out.inuse = v,
                "orphan" => out.orphan = v,
                "tw" => out.tw = v,
                "alloc" => out.alloc = v,
                "mem" => out.mem_pages = v,
                _ => {}
            }
        }
        Some(out)
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "tcp_inuse": self.inuse,
            "tcp_orphan": self.orphan,
            "tcp_tw": self.tw,
            "tcp_alloc": self.alloc,
            "tcp_mem_pages": self.mem_pages,
            "tcp_mem_bytes": self.mem_pages * page_size(),
        })
    }
}

/// This process's CPU time and peak resident set.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfUsage {
    pub user_s: f64,
    pub sys_s: f64,
    pub max_rss_bytes: u64,
}

impl SelfUsage {
    /// This process (every thread).
    pub fn now() -> Self {
        Self::of(libc::RUSAGE_SELF)
    }

    /// Every child process that has exited and been waited for.
    pub fn children() -> Self {
        Self::of(libc::RUSAGE_CHILDREN)
    }

    /// The calling thread.
    pub fn thread() -> Self {
        Self::of(libc::RUSAGE_THREAD)
    }

    fn of(who: libc::c_int) -> Self {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } != 0 {
            return Self::default();
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            user_s: secs(ru.ru_utime),
            sys_s: secs(ru.ru_stime),
            max_rss_bytes: ru.ru_maxrss as u64 * 1024,
        }
    }

    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_s() -> f64 {
    SelfUsage::thread().cpu_s()
}

/// Whole-machine CPU time from the `cpu` line of `/proc/stat`, in clock
/// ticks: `(busy, total)`, where idle and iowait are the non-busy part.
/// Other processes count too: this tells whether the machine was saturated.
pub fn machine_cpu_ticks() -> io::Result<(u64, u64)> {
    let s = fs::read_to_string("/proc/stat")?;
    parse_proc_stat(&s).ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))
}

fn parse_proc_stat(s: &str) -> Option<(u64, u64)> {
    let line = s.lines().find_map(|l| l.strip_prefix("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPUs this process may run on.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises the soft open-file limit to the hard one; returns the soft limit
/// now in force.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid resource and struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// Ephemeral ports per (source address, destination), from
/// `ip_local_port_range`.
pub fn ephemeral_ports() -> u64 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u64>());
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) if hi >= lo => Some(hi - lo + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_stat_and_sockstat() {
        let status = "Name:\tcorecast\nVmHWM:\t   9000 kB\nVmRSS:\t   8123 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(8123));
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        let sock =
            "sockets: used 90\nTCP: inuse 5 orphan 1 tw 438 alloc 7 mem 3\nUDP: inuse 0 mem 0\n";
        assert_eq!(
            Sockstat::parse(sock),
            Some(Sockstat {
                inuse: 5,
                orphan: 1,
                tw: 438,
                alloc: 7,
                mem_pages: 3
            })
        );
    }

    #[test]
    fn parses_proc_stat() {
        let s = "cpu  100 5 50 800 20 1 4 0 7 0\ncpu0 50 2 25 400 10 0 2 0 0 0\n";
        assert_eq!(parse_proc_stat(s), Some((160, 980)));
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(process_cpu_s(pid).unwrap() >= 0.0);
        assert!(SelfUsage::now().max_rss_bytes > 0);
        assert!(thread_cpu_s() <= SelfUsage::now().cpu_s() + 0.01);
        assert!(Sockstat::read().is_ok());
        assert!(ephemeral_ports() > 0);
        let (busy, total) = machine_cpu_ticks().unwrap();
        assert!(busy <= total && total > 0);
    }
}
