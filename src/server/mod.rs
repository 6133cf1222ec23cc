//! The server: configuration, worker threads and their event loops.
//!
//! [`start`] binds one `SO_REUSEPORT` listener per worker, spawns the
//! workers (each pinned to a core unless disabled) and returns a
//! [`ServerHandle`] for the local address, statistics and shutdown.
//!
//! | module | holds |
//! |---|---|
//! | [`config`] | [`Config`] and its defaults |
//! | [`session`] | per-connection state and endpoints, independent of the backend |
//! | [`epoll`] | the mio event loop |
//! | [`listener`] | `SO_REUSEPORT` listeners |
//! | [`stats`] | per-worker counters |

pub mod config;
pub mod epoll;
pub mod listener;
pub mod session;
pub mod stats;

pub use config::Config;
use mio::{Poll, Waker};
use stats::{Snapshot, WorkerStats};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use tracing::{info, warn};

/// State shared by all workers (read-mostly).
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) shutdown: AtomicBool,
    /// One entry per worker, indexed by worker id.
    pub(crate) stats: Box<[WorkerStats]>,
}

/// A running server. Dropping it shuts the server down and waits for it.
pub struct ServerHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    wakers: Vec<Waker>,
    threads: Vec<JoinHandle<()>>,
}

/// The largest request head the worker's read buffer can hold with room to spare.
const MAX_HANDSHAKE_CAP: usize = epoll::READ_BUF_BYTES / 2;

/// Starts a server with `config`; returns once every listener is bound.
pub fn start(mut config: Config) -> io::Result<ServerHandle> {
    let workers = config.worker_count();
    if config.max_handshake_size > MAX_HANDSHAKE_CAP {
        warn!(
            requested = config.max_handshake_size,
            cap = MAX_HANDSHAKE_CAP,
            "max handshake size capped"
        );
        config.max_handshake_size = MAX_HANDSHAKE_CAP;
    }
    let (local_addr, listeners) = listener::bind_group(config.listen, workers)?;
    let cores = if config.pin_cores {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let shared = Arc::new(Shared {
        config,
        shutdown: AtomicBool::new(false),
        stats: (0..workers).map(|_| WorkerStats::default()).collect(),
    });
    let mut wakers = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for (id, listener) in listeners.into_iter().enumerate() {
        let poll = Poll::new()?;
        wakers.push(Waker::new(poll.registry(), epoll::WAKER)?);
        let worker = epoll::Worker::new(id, poll, listener, Arc::clone(&shared))?;
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let thread = std::thread::Builder::new()
            .name(format!("corecast-w{id}"))
            .spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    warn!(worker = id, core = core.id, "could not pin worker to core");
                }
                worker.run();
            })?;
        threads.push(thread);
    }
    info!(%local_addr, workers, pinned = !cores.is_empty(), "corecast listening");
    Ok(ServerHandle {
        local_addr,
        shared,
        wakers,
        threads,
    })
}

impl ServerHandle {
    /// The bound address (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> Snapshot {
        Snapshot::sum(self.shared.stats.iter())
    }

    /// Asks every worker to stop accepting, close its connections with 1001
    /// and exit within the drain timeout. Returns at once; see [`Self::join`].
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Waits for every worker to exit.
    pub fn join(mut self) {
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a worker thread panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            self.join_workers();
        }
    }
}
