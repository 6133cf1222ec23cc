//! Where worker threads run.
//!
//! Pinning a worker to a core keeps its caches warm and its neighbours
//! predictable, which pays when the server's cores are its own. On a
//! machine it shares (a load generator, a database, other services) a
//! pinned worker cannot leave a core another busy process holds: under a
//! sustained overload with the load generator on the same two cores, the
//! pinned server's p99 latency was the worst of the three policies
//! measured, while bursts showed no stable difference (docs/BENCHMARKS.md,
//! "Pinning").
//!
//! [`PinMode::Auto`], the default, decides from the CPUs the process may
//! run on (`sched_getaffinity`): when that set is smaller than the
//! machine's online CPUs, someone gave the server its own cores (a cpuset,
//! `taskset`, a container's `--cpuset-cpus`), and it pins, worker `i` to
//! the `i`-th of those CPUs (mod their count). Otherwise the scheduler
//! places the workers.

use super::config::PinMode;
use core_affinity::CoreId;
use tracing::warn;

/// How the workers of one server are placed (decided once at start).
#[derive(Debug, Clone)]
pub struct Placement {
    /// The CPUs to pin to, in order; empty: not pinned.
    cores: Vec<CoreId>,
}

impl Placement {
    /// Resolves `mode` against the CPUs this process may run on.
    pub fn decide(mode: PinMode) -> Self {
        let allowed = core_affinity::get_core_ids().unwrap_or_default();
        let pin = match mode {
            PinMode::Always => true,
            PinMode::Never => false,
            PinMode::Auto => allowed.len() < online_cpus(),
        };
        Self {
            cores: if pin { allowed } else { Vec::new() },
        }
    }

    /// Whether the workers are pinned.
    pub fn pinned(&self) -> bool {
        !self.cores.is_empty()
    }

    /// Runs on worker `id`'s own thread, first thing.
    pub fn apply(&self, id: usize) {
        if self.cores.is_empty() {
            return;
        }
        let core = self.cores[id % self.cores.len()];
        if !core_affinity::set_for_current(core) {
            warn!(worker = id, core = core.id, "could not pin worker to core");
        }
    }
}

/// Online CPUs of the machine.
fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affinity() -> Vec<usize> {
        core_affinity::get_core_ids()
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn auto_pins_only_when_the_process_was_given_fewer_cpus_than_the_machine() {
        let restricted = affinity().len() < online_cpus();
        assert_eq!(Placement::decide(PinMode::Auto).pinned(), restricted);
        assert!(Placement::decide(PinMode::Always).pinned());
        assert!(!Placement::decide(PinMode::Never).pinned());
    }

    #[test]
    fn a_restricted_process_pins_within_its_own_cpus() {
        let all = affinity();
        let first = all[0];
        let got = std::thread::spawn(move || {
            // What `taskset -c FIRST` does to a process: one CPU of the machine's.
            assert!(core_affinity::set_for_current(CoreId { id: first }));
            let auto = Placement::decide(PinMode::Auto);
            auto.apply(1);
            (auto.pinned(), affinity())
        })
        .join()
        .unwrap();
        if online_cpus() > 1 {
            assert_eq!(got, (true, vec![first]), "pinned to the one CPU it has");
        }
        let pinned = Placement::decide(PinMode::Always);
        let on = std::thread::spawn(move || {
            pinned.apply(1);
            affinity()
        })
        .join()
        .unwrap();
        assert_eq!(on, vec![all[1 % all.len()]], "worker 1 on the second CPU");
    }
}
