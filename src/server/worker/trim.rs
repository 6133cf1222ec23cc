//! Memory given back after a load. glibc's allocator keeps what a worker
//! frees in its arena for reuse instead of returning it to the kernel: after
//! a load that made the server hold hundreds of megabytes (slow subscribers'
//! queues, half-sent compressed messages), the process kept them as RSS
//! with every connection gone and nothing charged to the budget (outside
//! probe: 500 half-sent compression bombs peaked at ~960 MB; minutes after
//! the last one closed RSS was still 316 MB on epoll, 225 MB on io_uring).
//! The budget's charge does not show it: it was back at 0.
//!
//! Worker 0 looks at the process at its sweeps, at most once a second
//! ([`Trim::due`]): its resident memory, the bytes charged to the budget
//! and the bytes it has sent. When RSS has moved by [`GROWTH_BYTES`] since
//! the last trim (or the worker's start), less than half of that move is
//! charged (what the load held has been let go), and the process is quiet
//! (under [`QUIET_BYTES`] sent in that second), it asks glibc to return
//! what its arenas hold free (`malloc_trim`), and the RSS after that is the
//! new base if the process held nothing then (under [`CLEAN_BYTES`]
//! charged). A move down counts too: a load let go gives part of its memory
//! back by itself (chunks mapped on their own, an arena's top) and may keep
//! the rest in its arenas; a base that followed RSS down, or was taken
//! while the load still held memory, would never see that rest as growth.
//! A trim while something is held leaves the base and comes at most once
//! every 10 s. Only when quiet, because trimming an arena
//! holds that arena's lock while it walks it, and only after a large
//! growth, because a trim costs time in proportion to the heap: memory that
//! is in use but not charged (connections' state) costs one useless trim
//! per 32 MiB it grows.

use std::time::{Duration, Instant};

/// How far RSS must grow over its base before a trim.
pub const GROWTH_BYTES: u64 = 32 << 20;
/// Bytes the whole process may send in the second before a trim and still
/// count as quiet (keepalive pings and the odd publication are fine).
pub const QUIET_BYTES: u64 = 1 << 20;
/// How often the watch looks.
const EVERY: Duration = Duration::from_secs(1);
/// Charged bytes under which the process counts as holding nothing: the
/// RSS after a trim made then is the process's floor with the connections
/// it has, the next base.
pub const CLEAN_BYTES: u64 = GROWTH_BYTES / 4;
/// A trim made while more than [`CLEAN_BYTES`] is charged (a load that
/// holds part of what it grew, or one being let go) comes at most this
/// often, and leaves the base where it was.
const HELD_EVERY: Duration = Duration::from_secs(10);

/// The watch's state (worker 0's).
#[derive(Debug, Default)]
pub struct Trim {
    /// RSS after the last trim made holding nothing, or at the worker's
    /// start.
    base: u64,
    /// The last look trimmed holding nothing: the next one takes the RSS as
    /// the base.
    rebase: bool,
    /// When the last trim made while holding something was.
    held_trim: Option<Instant>,
    /// Bytes sent, process-wide, at the last look.
    sent: u64,
    /// When it last looked.
    at: Option<Instant>,
}

impl Trim {
    /// The watch of a process whose RSS is `rss` now (at the worker's
    /// start: the base a load's growth is measured from).
    pub fn new(rss: u64) -> Self {
        Self {
            base: rss,
            ..Self::default()
        }
    }

    /// Whether a look is due at `now` (at most one a second).
    pub fn looks(&self, now: Instant) -> bool {
        self.at.is_none_or(|at| now.duration_since(at) >= EVERY)
    }

    /// A look at the process at `now`: its resident bytes, the bytes
    /// charged to its budget, and the bytes it has sent in all (a counter).
    /// Whether to trim now.
    pub fn due(&mut self, now: Instant, rss: u64, charged: u64, sent: u64) -> bool {
        if !self.looks(now) {
            return false;
        }
        let first = self.at.is_none();
        let quiet = !first && sent.wrapping_sub(self.sent) < QUIET_BYTES;
        self.at = Some(now);
        self.sent = sent;
        if self.rebase {
            self.base = rss;
            self.rebase = false;
            return false;
        }
        // A growth held free, or a fall: a load let go may have given part
        // of its memory back by itself (chunks glibc had mapped on their
        // own, the top of an arena) and kept the rest in its arenas. The
        // base never follows RSS down without a trim, nor is it taken while
        // a load still holds memory (mid-load, or mid-way through letting
        // it go): what the load then frees and the arenas keep would never
        // be seen as growth again.
        let moved = rss.abs_diff(self.base);
        if !quiet || moved < GROWTH_BYTES || charged >= moved / 2 {
            return false;
        }
        if charged < CLEAN_BYTES {
            self.rebase = true;
        } else if self
            .held_trim
            .is_some_and(|at| now.duration_since(at) < HELD_EVERY)
        {
            return false;
        } else {
            self.held_trim = Some(now);
        }
        true
    }
}

/// The process's resident memory in bytes (`/proc/self/statm`), if it can
/// be read.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&p| p > 0)?)
}

/// Returns the free memory of every arena to the kernel (glibc), or does
/// nothing where the allocator is another.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and touches only the
    // allocator's own free lists, under each arena's lock; it may be called
    // from any thread at any time (glibc's malloc_trim(3)).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// A look each second from `start`: (rss, charged, sent) per second;
    /// which seconds trimmed.
    fn run(trim: &mut Trim, start: Instant, looks: &[(u64, u64, u64)]) -> Vec<usize> {
        looks
            .iter()
            .enumerate()
            .filter(|(i, (r, c, s))| trim.due(start + EVERY * *i as u32, *r, *c, *s))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn a_large_growth_is_trimmed_once_let_go_and_quiet() {
        let mut t = Trim::new(20 * MB);
        let start = Instant::now();
        // A load that holds up to 600 MB (charged) and sends little; then
        // everything closes (charge 0) but sending goes on for a second;
        // then quiet; after the trim RSS is 40 MB, the new base; later
        // 40 MB more, uncharged. The first look comes during the load: the
        // base is the RSS at the start.
        let looks = [
            (300 * MB, 280 * MB, 0),
            (700 * MB, 600 * MB, 0),
            (700 * MB, 0, 100 * MB),
            (700 * MB, 0, 100 * MB),
            (40 * MB, 0, 100 * MB + 1000),
            (40 * MB, 0, 100 * MB + 2000),
            (70 * MB, 0, 100 * MB + 3000),
            (80 * MB, 0, 100 * MB + 4000),
        ];
        assert_eq!(run(&mut t, start, &looks), [3, 7]);
    }

    /// A load that is quiet while it grows (it receives, it sends nothing)
    /// may be trimmed while it still holds memory; once it lets go, RSS
    /// falls part of the way by itself, and what the arenas kept is
    /// trimmed too (the base used to follow RSS down, and that rest stayed:
    /// 33 MiB over the start in `tests/memory.rs`).
    #[test]
    fn what_a_load_left_after_giving_back_part_by_itself_is_trimmed() {
        let mut t = Trim::new(15 * MB);
        let start = Instant::now();
        let looks = [
            (15 * MB, 0, 0),
            (500 * MB, 100 * MB, 0),
            (900 * MB, 850 * MB, 0),
            (60 * MB, 0, 0),
            (20 * MB, 0, 0),
            (20 * MB, 0, 0),
            (30 * MB, 0, 0),
        ];
        assert_eq!(run(&mut t, start, &looks), [1, 3]);
        // The same, with the trim made while the load is being let go (a
        // third still charged): the rest is trimmed once it is all let go.
        let mut t = Trim::new(15 * MB);
        let looks = [
            (15 * MB, 0, 0),
            (900 * MB, 850 * MB, 0),
            (500 * MB, 100 * MB, 0),
            (80 * MB, 0, 0),
            (20 * MB, 0, 0),
            (20 * MB, 0, 0),
        ];
        assert_eq!(run(&mut t, start, &looks), [2, 3]);
        // A quiet load that keeps a share charged (under half its growth,
        // over CLEAN_BYTES) is trimmed once every HELD_EVERY, not each look.
        let mut t = Trim::new(15 * MB);
        let mut looks = vec![(15 * MB, 0, 0)];
        looks.extend(std::iter::repeat_n((300 * MB, 100 * MB, 0), 20));
        assert_eq!(run(&mut t, start, &looks), [1, 11]);
        // RSS that fell by itself, with nothing to give back: one trim,
        // and the base is where it fell to.
        let mut t = Trim::new(200 * MB);
        let fell = [
            (200 * MB, 0, 0),
            (20 * MB, 0, 0),
            (20 * MB, 0, 0),
            (60 * MB, 0, 0),
        ];
        assert_eq!(run(&mut t, start, &fell), [1, 3]);
    }

    #[test]
    fn small_growth_held_memory_busy_processes_and_frequent_looks_do_not_trim() {
        let start = Instant::now();
        // Growth under GROWTH_BYTES, quiet, nothing charged.
        let mut t = Trim::new(100 * MB);
        let small = [
            (100 * MB, 0, 0),
            (100 * MB + GROWTH_BYTES - 1, 0, 0),
            (120 * MB, 0, 0),
        ];
        assert!(run(&mut t, start, &small).is_empty());
        // A large growth still held (charged), quiet.
        let mut t = Trim::new(10 * MB);
        let held = [
            (10 * MB, 0, 0),
            (500 * MB, 400 * MB, 0),
            (500 * MB, 300 * MB, 0),
        ];
        assert!(run(&mut t, start, &held).is_empty());
        // A large growth let go while the process sends a lot each second.
        let mut t = Trim::new(10 * MB);
        let busy = [
            (10 * MB, 0, 0),
            (500 * MB, 0, 10 * MB),
            (500 * MB, 0, 20 * MB),
        ];
        assert!(run(&mut t, start, &busy).is_empty());
        // A fall under the size of a growth does not trim.
        let mut t = Trim::new(100 * MB);
        let fell = [(100 * MB, 0, 0), (100 * MB - GROWTH_BYTES + 1, 0, 0)];
        assert!(run(&mut t, start, &fell).is_empty());
        // Looks closer together than a second are not looks.
        let mut t = Trim::new(10 * MB);
        assert!(!t.due(start, 10 * MB, 0, 0));
        assert!(!t.due(start + Duration::from_millis(10), 500 * MB, 0, 0));
        assert!(!t.due(start + Duration::from_millis(500), 500 * MB, 0, 0));
        assert!(t.due(start + Duration::from_millis(1000), 500 * MB, 0, 0));
    }

    /// The process's RSS reads, and the call itself can be made from any
    /// thread (glibc), giving back what was freed.
    #[test]
    fn resident_bytes_read_and_free_memory_is_released() {
        assert!(resident_bytes().is_some_and(|r| r > 0));
        let big: Vec<Vec<u8>> = (0..16).map(|_| vec![1u8; 1 << 20]).collect();
        drop(big);
        std::thread::spawn(release_free_memory).join().unwrap();
        release_free_memory();
    }
}
