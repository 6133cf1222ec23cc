//! The server: configuration, worker threads and their event loops.
//!
//! [`start`] binds one `SO_REUSEPORT` listener per worker, spawns the
//! workers (each pinned to a core unless disabled; with io_uring, as many
//! more as its rings need to hold `--max-connections`) and returns a
//! [`ServerHandle`] for the local address, statistics and shutdown.
//!
//! | module | holds |
//! |---|---|
//! | [`config`] | [`Config`] and its defaults |
//! | [`admission`] | the connection cap and the per-address limits |
//! | [`budget`] | the buffer budget's pool and each worker's lease of it |
//! | [`session`] | per-connection state and endpoints, independent of the backend |
//! | [`backend`] | the backend contract and the loop skeleton both backends share |
//! | [`worker`] | the backend-independent half of a worker: connection state, deadlines, delivery |
//! | [`epoll`] | the mio event loop |
//! | [`uring`] | the io_uring event loop |
//! | [`listener`] | `SO_REUSEPORT` listeners |
//! | [`pinning`] | whether worker threads are pinned to cores (`--pin`) |
//! | [`steering`] | which listener takes a new connection when io_uring needs overflow workers for room |
//! | [`stats`] | per-worker counters |
//! | [`metrics`] | Prometheus rendering of the counters |
//! | [`http`] | plain-HTTP responses and the publisher token check |
//! | [`admin`] | the optional separate `/metrics` + `/healthz` listener |
//! | [`auth`] | tokens: the keys, the checks, the refusals |
//! | [`jwks`] | the thread that fetches a `--jwks` URL's keys |

pub mod admin;
pub mod admission;
pub mod auth;
pub mod backend;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod epoll;
pub mod http;
pub mod jwks;
pub mod listener;
pub mod metrics;
pub mod origin;
#[cfg(test)]
mod panic_tests;
pub mod pinning;
pub mod session;
#[cfg(test)]
mod sim_tests;
pub mod stats;
pub mod steering;
pub mod tls;
pub mod uring;
pub mod worker;

use crate::pubsub::bus::{Bus, Wake};
use crate::pubsub::directory::{Directory, MAX_WORKERS};
pub use config::{Config, IoMode, PinMode};
use mio::{Poll, Waker};
use stats::{Snapshot, WorkerStats};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// State shared by all workers (read-mostly); opaque outside the crate.
pub struct Shared {
    pub(crate) config: Config,
    pub(crate) shutdown: AtomicBool,
    /// One entry per worker, indexed by worker id.
    pub(crate) stats: Box<[WorkerStats]>,
    /// Which workers have subscribers of which topic.
    pub(crate) directory: Arc<Directory>,
    /// Cross-worker publication batches and wake-ups.
    pub(crate) bus: Arc<Bus>,
    /// Connection counts and per-address limits.
    pub(crate) admission: admission::Admission,
    /// What is left of the buffer budget (`--max-buffered-bytes`), which
    /// every worker leases from, overflow workers included.
    pub(crate) budget: budget::Pool,
    /// What every WebSocket enforces on its client's frames.
    pub(crate) ws_limits: Arc<crate::proto::ws::WsLimits>,
    /// The same for subscribers, whose messages are control messages: a
    /// message over [`MAX_CONTROL_BYTES`](crate::pubsub::control::MAX_CONTROL_BYTES)
    /// closes 1009 as it arrives instead of being buffered to be refused.
    pub(crate) subscriber_limits: Arc<crate::proto::ws::WsLimits>,
    /// Which listeners take new connections (overflow workers wait).
    pub(crate) steering: steering::Steering,
    /// TLS on the main listener: the configuration new connections use.
    pub(crate) tls: Option<tls::Certs>,
    /// Workers `0..tls_workers` serve the main listener (TLS with
    /// `--tls-cert`); the rest serve `--plain-listen` in plain text.
    pub(crate) tls_workers: usize,
    /// Reloads (`SIGHUP`): succeeded, failed.
    pub(crate) reloads: [std::sync::atomic::AtomicU64; 2],
    /// The origins whose pages may use the server (`--allowed-origin`),
    /// replaced whole by a reload; read only for requests that carry an
    /// `Origin` header.
    pub(crate) origins: std::sync::RwLock<Arc<origin::AllowList>>,
    /// The token keys and rules in force, when `--jwt-key` or `--jwks`
    /// was given at start (replaced whole by a reload; never set or unset
    /// by one).
    pub(crate) auth: Option<std::sync::RwLock<Arc<auth::Verifier>>>,
    /// The JWKS fetcher's requests (from the workers, the reload) and
    /// counters.
    pub(crate) jwks: jwks::Jwks,
    /// The cluster link (`--nats-url`): what the workers and the NATS
    /// bridge share.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
    /// Subs whose connections the operator asked to close
    /// (`POST /disconnect`), numbered; each worker acts on those past the
    /// number it has seen at its next sweep. Kept [`REVOKED_FOR`].
    revoked: std::sync::Mutex<std::collections::VecDeque<(u64, Instant, Box<str>)>>,
    /// The number of the newest entry of `revoked`.
    pub(crate) revoked_last: std::sync::atomic::AtomicU64,
    /// Panics caught (`corecast_panics_total{scope}`): in one connection's
    /// input (that connection closed alone), in a worker (the server
    /// drains and exits; see [`Shared::worker_failed`]).
    pub(crate) panics: [std::sync::atomic::AtomicU64; 2],
    /// Told when a worker fails (`main` ends its wait for signals and
    /// drains); set once.
    on_failure: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// In the library's tests: the worker (id + 1) to panic at its next turn.
    #[cfg(test)]
    pub(crate) test_panic_worker: std::sync::atomic::AtomicUsize,
}

/// [`Shared::panics`] index: a connection's input.
pub(crate) const PANIC_CONNECTION: usize = 0;
/// [`Shared::panics`] index: a worker's loop.
pub(crate) const PANIC_WORKER: usize = 1;

/// How long a disconnection request is kept for the workers (each sweeps
/// at least once a second).
const REVOKED_FOR: Duration = Duration::from_secs(10);
/// Most disconnection requests kept at once (more within [`REVOKED_FOR`]
/// are refused `503`).
const MAX_REVOKED: usize = 1024;
/// The longest `sub` a disconnection request may name.
pub(crate) const MAX_REVOKED_SUB: usize = 256;

/// What a reload replaces (`None`: what is in force stays, but for the
/// TLS pair and the token keys, read again from the files named at start).
#[derive(Debug, Default)]
pub struct Reload {
    pub tls: Option<tls::TlsSettings>,
    pub namespaces: Option<Vec<crate::pubsub::policy::NamespacePolicy>>,
    pub origins: Option<Vec<String>>,
    pub jwt: Option<auth::JwtSettings>,
    /// `--max-connections`, and the per-address connection cap and
    /// connect rate (`None` while turning the per-address limits on or off
    /// waits for a restart; see [`admission::Admission::set_limits`]).
    pub limits: Option<(usize, Option<(u32, u32)>)>,
}

impl Shared {
    fn new(
        config: Config,
        stats: Box<[WorkerStats]>,
        directory: Arc<Directory>,
        bus: Arc<Bus>,
    ) -> Self {
        Self {
            admission: admission::Admission::new(config.admission_limits()),
            budget: budget::Pool::new(config.max_buffered_bytes),
            ws_limits: Arc::new(config.ws_limits()),
            subscriber_limits: Arc::new(config.subscriber_limits()),
            steering: steering::Steering::new(stats.len(), stats.len()),
            config,
            shutdown: AtomicBool::new(false),
            stats,
            directory,
            bus,
            tls: None,
            tls_workers: usize::MAX,
            reloads: Default::default(),
            origins: Default::default(),
            auth: None,
            jwks: Default::default(),
            cluster: None,
            revoked: Default::default(),
            revoked_last: Default::default(),
            panics: Default::default(),
            on_failure: Default::default(),
            #[cfg(test)]
            test_panic_worker: Default::default(),
        }
    }

    /// Why `/healthz` answers `503` now, if it does: `draining` (shutting
    /// down), or, in a cluster, NATS unreachable (publications are held or
    /// refused and nothing arrives from other nodes: a balancer should
    /// send clients to a node that has it).
    pub(crate) fn health(&self) -> Option<&'static str> {
        if self.shutdown.load(Ordering::Acquire) {
            Some("draining")
        } else if self.cluster.as_ref().is_some_and(|c| !c.is_up()) {
            Some("cluster: not connected to NATS")
        } else {
            None
        }
    }

    /// Worker `id` panicked outside any one connection's input, and its
    /// thread is gone with its connections: the shared state it touched
    /// (mailboxes, the topic directory) may be half-changed, so the server
    /// does not go on with one worker fewer. Counted, logged, and the
    /// whole server drains as on SIGTERM (`/healthz` answers `503`
    /// `draining` at once, 1001 closes spread over the drain window); the
    /// process then exits with a failure, for its supervisor to restart.
    pub(crate) fn worker_failed(&self, id: usize) {
        self.panics[PANIC_WORKER].fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            worker = id,
            "worker panicked (a bug: please report it with the log); draining and exiting"
        );
        self.shutdown.store(true, Ordering::Release);
        // What it had found and not delivered is not coming: its lag must
        // not hold the other workers' publishers through the drain.
        self.bus.forget_lag(id);
        for w in 0..self.bus.workers() {
            self.bus.wake(w);
        }
        if let Some(f) = self.on_failure.get() {
            f();
        }
    }

    /// Asks every worker to close the connections whose token names
    /// `sub`; `false` when too many requests are pending.
    pub(crate) fn revoke(&self, sub: &str) -> bool {
        let mut list = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while list
            .front()
            .is_some_and(|(_, at, _)| now.duration_since(*at) > REVOKED_FOR)
        {
            list.pop_front();
        }
        if list.len() >= MAX_REVOKED {
            return false;
        }
        let n = self.revoked_last.load(Ordering::Relaxed) + 1;
        list.push_back((n, now, sub.into()));
        self.revoked_last.store(n, Ordering::Release);
        true
    }

    /// The subs asked for after number `seen` (and the newest number), or
    /// `None` when there is nothing new: one atomic load per sweep.
    pub(crate) fn revoked_since(&self, seen: u64) -> Option<(u64, Vec<Box<str>>)> {
        let last = self.revoked_last.load(Ordering::Acquire);
        if last == seen {
            return None;
        }
        let list = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let subs = list
            .iter()
            .filter(|(n, _, _)| *n > seen)
            .map(|(_, _, s)| s.clone())
            .collect();
        Some((last, subs))
    }

    /// The token verifier in force, if tokens are on.
    pub(crate) fn verifier(&self) -> Option<Arc<auth::Verifier>> {
        self.auth
            .as_ref()
            .map(|a| Arc::clone(&a.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// Checks `token` at `now` with `verifier` (the one in force). A token
    /// refused for a key the set lacks, when the keys come from a JWKS
    /// URL, asks the fetcher for the set again without waiting: the
    /// request is refused now, a later one may pass.
    pub(crate) fn verify(
        &self,
        verifier: &auth::Verifier,
        token: &str,
        now: u64,
    ) -> Result<auth::Grant, auth::Refusal> {
        let result = verifier.verify(token, now);
        if let Err(auth::Refusal::UnknownKey | auth::Refusal::KeysUnavailable) = result
            && verifier.jwks_url().is_some()
        {
            self.jwks.want();
        }
        result
    }

    /// The verdict of the origin allow-list in force on a request's
    /// `Origin` header values.
    pub(crate) fn check_origin<'v>(
        &self,
        values: impl Iterator<Item = &'v [u8]>,
    ) -> Result<(), origin::Refused> {
        let mut values = values.peekable();
        if values.peek().is_none() {
            // Not from a browser: no lock taken.
            return Ok(());
        }
        let list = self.origins.read().unwrap_or_else(|p| p.into_inner());
        list.check(values)
    }

    /// The server's one reload (`SIGHUP`): everything that can change
    /// without a restart is read again, all or nothing: the TLS
    /// certificate and key (new connections use what was loaded, open ones
    /// keep what they started with), then, only if those loaded, the
    /// namespace table `namespaces` when given (see
    /// [`Directory::set_policies`]: it applies to existing topics too) and
    /// the origin allow-list `origins` and the token keys `jwt` (with tokens
    /// on) when given (new requests). A failure keeps the old state. A
    /// JWKS URL is not fetched here: the set fetched from the same URL
    /// stays in force and the fetcher is asked for it again at once.
    pub(crate) fn reload(&self, r: Reload) -> Result<(), String> {
        let Reload {
            tls,
            namespaces,
            origins,
            jwt,
            limits,
        } = r;
        // The fallible parts first; replacing the tables cannot fail.
        let result = (|| {
            let origins = origins
                .map(|o| origin::AllowList::new(&o).map_err(|e| format!("--allowed-origin {e}")))
                .transpose()?;
            // With tokens on, the key files are read again (those the file
            // names now, else those named at start).
            let verifier = match (&self.auth, jwt.or_else(|| self.config.jwt.clone())) {
                (Some(_), Some(settings)) => Some(auth::Verifier::load(&settings)?),
                _ => None,
            };
            if let Some(certs) = &self.tls {
                certs.reload(tls)?;
            }
            Ok((origins, verifier))
        })();
        let result = result.map(|(origins, verifier)| {
            if let Some((max, per_address)) = limits {
                let was = self.admission.current();
                self.admission.set_limits(max, per_address);
                if self.admission.current() != was {
                    info!(limits = ?self.admission.current(), "admission limits");
                }
            }
            if let Some(namespaces) = namespaces {
                self.directory.set_policies(namespaces);
            }
            if let Some(list) = origins {
                self.set_origins(list);
            }
            if let (Some(current), Some(v)) = (&self.auth, verifier) {
                let _update = self.jwks.lock_update();
                let v = v.keeping_fetched(&current.read().unwrap_or_else(|p| p.into_inner()));
                let url = v.jwks_url().is_some();
                *current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
                if url {
                    self.jwks.fetch_now();
                }
            }
        });
        self.count_reload(result)
    }

    /// Puts `list` in force for new requests (logged when it changes).
    fn set_origins(&self, list: origin::AllowList) {
        let mut current = self.origins.write().unwrap_or_else(|p| p.into_inner());
        if **current != list {
            info!(origins = %list, "allowed origins");
            *current = Arc::new(list);
        }
    }

    /// Counts a reload's outcome (`corecast_reloads_total{result}`).
    pub(crate) fn count_reload(&self, result: Result<(), String>) -> Result<(), String> {
        let i = usize::from(result.is_err());
        self.reloads[i].fetch_add(1, Ordering::Relaxed);
        result
    }
}

/// Builds what a [`session::Session`] needs outside a running server, for
/// the fuzz targets in `fuzz/` (a separate crate, so `Shared`'s crate-private
/// fields are out of its reach). Not part of the API: hidden, and free to change.
#[doc(hidden)]
pub mod fuzzing {
    use super::{Config, Shared, WorkerStats};
    use crate::pubsub::bus::{Bus, Wake};
    use crate::pubsub::directory::Directory;
    use crate::pubsub::shard::Shard;
    use std::sync::Arc;

    /// A wake-up nobody listens to: a single worker never sends itself a batch.
    struct NoWake;

    impl Wake for NoWake {
        fn wake(&self) {}
    }

    /// A one-worker [`Shared`] for `config`, and worker 0's [`Shard`].
    pub fn single_worker(config: Config) -> (Shared, Shard) {
        let (bus, _inboxes) = Bus::new(vec![Box::new(NoWake)]);
        // Epochs from 1, not the clock: two runs of one input agree.
        let directory = Arc::new(Directory::new().with_first_epoch(1));
        let shard = Shard::new(0, Arc::clone(&directory), Arc::clone(&bus));
        let shared = Shared::new(config, Box::new([WorkerStats::default()]), directory, bus);
        (shared, shard)
    }
}

/// A running server. Dropping it shuts the server down and waits for it.
pub struct ServerHandle {
    local_addr: SocketAddr,
    plain_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    admin: Option<admin::AdminHandle>,
    threads: Vec<JoinHandle<()>>,
    /// The JWKS fetcher, with tokens on.
    fetcher: Option<JoinHandle<()>>,
    /// The NATS bridge, in a cluster.
    bridge: Option<cluster::bridge::Bridge>,
    backend: Backend,
}

/// The event loop the workers run (resolved from [`IoMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Epoll,
    Uring,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "io_uring",
        }
    }

    /// Resolves `mode`, probing the kernel for io_uring where needed.
    pub fn choose(mode: IoMode) -> io::Result<Self> {
        match mode {
            IoMode::Epoll => Ok(Backend::Epoll),
            IoMode::Uring => uring::probe()
                .map(|()| Backend::Uring)
                .map_err(|e| io::Error::other(format!("io_uring unavailable: {e}"))),
            IoMode::Auto => Ok(match uring::probe() {
                Ok(()) => Backend::Uring,
                Err(e) => {
                    warn!(reason = %e, "io_uring unavailable; using epoll");
                    Backend::Epoll
                }
            }),
        }
    }
}

/// mio's waker (an eventfd on Linux) as the bus's wake-up.
struct MioWake(Waker);

impl Wake for MioWake {
    fn wake(&self) {
        // Fails only if the eventfd counter would overflow, i.e. the worker
        // already has a wake-up pending.
        let _ = self.0.wake();
    }
}

/// The largest request head the worker's read buffer can hold with room to spare.
const MAX_HANDSHAKE_CAP: usize = backend::READ_BUF_BYTES / 2;

/// Stack size of every worker thread, in bytes: 2 MiB.
///
/// That is std's default for a spawned thread, the stack the workers always
/// ran on, but the default moves with `RUST_MIN_STACK` in the environment;
/// pinned here, a worker's stack is the one its code was tested on. Public
/// so that tests and fuzz targets run worker code on a thread of this size:
/// a recursion that would overflow a worker then overflows there first.
///
/// The one recursive code a worker runs on client input is simd-json's
/// value builder (control messages): about 0.5 KiB of stack per nesting
/// level in a debug build, so 2 MiB holds some 4 000 levels and a message of
/// 6 000 nested arrays overflows it. Raising this size would only move that
/// line; the input's depth has to be bounded. Only the pages a thread
/// touches are backed by memory, so the size costs address space, not RAM.
pub const WORKER_STACK_BYTES: usize = 2 * 1024 * 1024;

/// Worker threads to start: `primaries` (one per core by default), and
/// for io_uring as many more *overflow* workers as it takes for the rings'
/// fixed-file tables, each capped at the open-file limit, to hold
/// `--max-connections` (see [`steering`]). An overflow worker takes
/// connections only once every primary is full, and until then costs a
/// thread blocked in its ring and its receive buffers, written at start
/// and so resident from the start (256 KiB; 2 MiB on kernels before 6.12,
/// without incremental buffers). epoll's descriptors all count against
/// the one process limit: it says so.
fn worker_threads(backend: Backend, config: &Config, primaries: usize) -> usize {
    match backend {
        Backend::Uring => {
            let Some(slots) = uring::table_slots(config) else {
                return primaries;
            };
            let needed = steering::rings_needed(config.max_connections, slots, primaries);
            // Each worker holds a few descriptors of its own (listener,
            // ring, eventfd): at most one worker per 256 of the limit, so
            // that a small limit is spent on connections.
            let most = usize::try_from(open_file_limit() / 256)
                .unwrap_or(usize::MAX)
                .clamp(primaries, MAX_WORKERS);
            if needed > most {
                warn!(
                    max_connections = config.max_connections,
                    ring_slots = slots,
                    "{most} rings of {slots} descriptors hold fewer connections than --max-connections; raise the open-file limit"
                );
            }
            needed.min(most)
        }
        Backend::Epoll => {
            let limit = open_file_limit();
            if (config.max_connections as u64) >= limit {
                warn!(
                    open_file_limit = limit,
                    max_connections = config.max_connections,
                    "epoll: the open-file limit caps connections below --max-connections (the io_uring backend holds more)"
                );
            }
            primaries
        }
    }
}

/// Raises the soft open-file limit to the hard one, as the Go runtime and
/// many servers do: the soft default (often 1 024) exists for programs
/// that use `select`, which nothing here does. It sizes epoll's reach and
/// each io_uring ring's table.
fn raise_open_file_limit() {
    raise_soft_limit(libc::RLIMIT_NOFILE, "open-file limit");
}

/// Raises a resource's soft limit to its hard limit, and says so.
fn raise_soft_limit(resource: libc::__rlimit_resource_t, name: &str) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; setrlimit reads it.
    unsafe {
        if libc::getrlimit(resource, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let from = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(resource, &lim) == 0 {
                info!(from, to = lim.rlim_max, "{name} raised to its hard limit");
            }
        }
    }
}

/// The process's open-file limit (`RLIMIT_NOFILE`, soft).
fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        u64::MAX
    }
}

/// Why [`start_on`] failed: io_uring workers that could not build their
/// rings are told apart, for `--io auto` to fall back to epoll.
enum StartError {
    Io(io::Error),
    UringWorkers(io::Error),
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// What an io_uring setup failure says to whoever reads the log: `ENOMEM`
/// here is almost always the locked-memory limit, which the kernel charges
/// each ring (about 1.3 MB per worker on Linux 6.x) to an unprivileged user.
fn uring_setup_error(e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        format!(
            "{e}: io_uring's rings count against the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`; systemd LimitMEMLOCK=, see deploy/corecast.service); raise it, or run with --io epoll"
        )
    } else {
        e.to_string()
    }
}

/// Starts a server with `config`; returns once every listener is bound.
///
/// With `--io auto` (the default), io_uring workers that cannot be set up
/// (typically an unprivileged user under the usual 8 MiB locked-memory
/// limit, which a start-up probe's one small ring does not reach) are not
/// the end: everything started is stopped and the server starts again on
/// epoll, with a warning that says why. `--io uring` fails instead.
pub fn start(config: Config) -> io::Result<ServerHandle> {
    let fallback = (config.io == IoMode::Auto).then(|| config.clone());
    match start_on(config) {
        Ok(server) => Ok(server),
        Err(StartError::Io(e)) => Err(e),
        Err(StartError::UringWorkers(e)) => match fallback {
            Some(mut config) => {
                warn!(
                    reason = %uring_setup_error(&e),
                    "io_uring workers could not be set up; using epoll"
                );
                config.io = IoMode::Epoll;
                start_on(config).map_err(|e| match e {
                    StartError::Io(e) | StartError::UringWorkers(e) => e,
                })
            }
            None => Err(io::Error::new(
                e.kind(),
                format!("io_uring worker setup: {}", uring_setup_error(&e)),
            )),
        },
    }
}

/// [`start`] on the backend `config.io` chooses.
fn start_on(mut config: Config) -> Result<ServerHandle, StartError> {
    let primaries = config.worker_count();
    if primaries > MAX_WORKERS {
        return Err(StartError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_WORKERS} workers are supported"),
        )));
    }
    if config.cluster.is_some() && config.max_topic_len > cluster::MAX_TOPIC_LEN {
        return Err(StartError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "--max-topic-len {} is over {} in a cluster (--nats-url): a topic is a NATS subject",
                config.max_topic_len,
                cluster::MAX_TOPIC_LEN
            ),
        )));
    }
    if config.max_handshake_size > MAX_HANDSHAKE_CAP {
        warn!(
            requested = config.max_handshake_size,
            cap = MAX_HANDSHAKE_CAP,
            "max handshake size capped"
        );
        config.max_handshake_size = MAX_HANDSHAKE_CAP;
    }
    let origins = origin::AllowList::new(&config.allowed_origins).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("--allowed-origin {e}"))
    })?;
    let verifier = config
        .jwt
        .as_ref()
        .map(auth::Verifier::load)
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = match &config.tls {
        Some(settings) => {
            let resumption = tls::Resumption::new().map_err(io::Error::other)?;
            let loaded = tls::load(settings, &resumption).map_err(io::Error::other)?;
            Some(tls::Certs::new(settings.clone(), resumption, loaded))
        }
        None => None,
    };
    let backend = Backend::choose(config.io)?;
    raise_open_file_limit();
    if backend == Backend::Uring {
        // Each worker's ring is charged to it (for a user without
        // CAP_IPC_LOCK); what the hard limit allows is ours to take.
        raise_soft_limit(libc::RLIMIT_MEMLOCK, "locked-memory limit");
    }
    let tls_workers = worker_threads(backend, &config, primaries);
    let (local_addr, listeners) =
        listener::bind_group(config.listen, tls_workers, config.tcp_keepalive)?;
    // `--plain-listen`: one more worker per core, on its own listener group,
    // speaking plain ws:// and http:// (ids after the main listener's).
    let (plain_addr, plain_listeners) = match config.plain_listen {
        Some(addr) => {
            let (a, l) = listener::bind_group(addr, primaries, config.tcp_keepalive)?;
            (Some(a), l)
        }
        None => (None, Vec::new()),
    };
    let workers = tls_workers + plain_listeners.len();
    let steering = steering::Steering::new(primaries, tls_workers);
    if let Err(e) = steering.start(&listeners[0]) {
        warn!(error = %e, "could not steer connections: overflow workers take them from the start");
    }
    let placement = pinning::Placement::decide(config.pin);
    // Each worker's wake-up: mio's waker for epoll, an eventfd read by the ring for io_uring.
    let mut polls = Vec::with_capacity(workers);
    let mut eventfds = Vec::with_capacity(workers);
    let mut wakers: Vec<Box<dyn Wake>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        match backend {
            Backend::Epoll => {
                let poll = Poll::new()?;
                wakers.push(Box::new(MioWake(Waker::new(
                    poll.registry(),
                    epoll::WAKER,
                )?)));
                polls.push(poll);
            }
            Backend::Uring => {
                let efd = Arc::new(uring::EventFd::new()?);
                wakers.push(Box::new(uring::EventFdWake(Arc::clone(&efd))));
                eventfds.push(efd);
            }
        }
    }
    let (bus, inboxes) = Bus::new(wakers);
    // In a cluster, a topic nobody here holds is not followed, so its
    // history here would go stale: none is retained (the stream keeps it).
    let retained_topics = if config.cluster.is_some() {
        0
    } else {
        config.retained_topics
    };
    let directory = Directory::with_policies(
        config.history,
        retained_topics,
        config.namespaces.clone(),
        config.last_value,
    );
    let cluster = config.cluster.clone().map(|settings| {
        let c = Arc::new(cluster::Cluster::new(settings, Arc::clone(&bus)));
        directory.set_link(Arc::clone(&c) as Arc<dyn crate::pubsub::remote::Link>);
        bus.add_external_sender();
        c
    });
    let mut shared = Shared::new(
        config,
        (0..workers).map(|_| WorkerStats::default()).collect(),
        Arc::new(directory),
        bus,
    );
    shared.steering = steering;
    shared.tls = tls;
    shared.tls_workers = tls_workers;
    shared.set_origins(origins);
    shared.auth = verifier.map(|v| std::sync::RwLock::new(Arc::new(v)));
    shared.cluster = cluster;
    let shared = Arc::new(shared);
    let admin = match shared.config.admin_listen {
        Some(addr) => Some(admin::start(addr, Arc::clone(&shared))?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.local_addr());
    // A JWKS URL is fetched once before the workers take connections.
    let fetcher = shared
        .auth
        .is_some()
        .then(|| jwks::Fetcher::first(Arc::clone(&shared)));
    let mut threads = Vec::with_capacity(workers);
    let mut polls = polls.into_iter();
    let mut eventfds = eventfds.into_iter();
    // io_uring workers build their ring on their own thread and report here.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let all_listeners = listeners.into_iter().chain(plain_listeners);
    for (id, (listener, inbox)) in all_listeners.zip(inboxes).enumerate() {
        let placement = placement.clone();
        let pin = move || placement.apply(id);
        let builder = std::thread::Builder::new()
            .name(format!("corecast-w{id}"))
            .stack_size(WORKER_STACK_BYTES);
        let thread = match backend {
            Backend::Epoll => {
                let poll = polls.next().expect("one poll per worker");
                let worker = epoll::Worker::new(id, poll, listener, inbox, Arc::clone(&shared))?;
                builder.spawn(move || {
                    pin();
                    worker.run();
                })?
            }
            Backend::Uring => {
                let efd = eventfds.next().expect("one eventfd per worker");
                let shared = Arc::clone(&shared);
                let ready = ready_tx.clone();
                builder.spawn(move || {
                    // Every worker reports exactly once, also if its setup
                    // panics: `start` waits for all of them.
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        pin();
                        uring::Worker::new(id, listener, inbox, efd, shared)
                    }))
                    .unwrap_or_else(|_| Err(io::Error::other("worker setup panicked")));
                    match built {
                        Ok(worker) => {
                            let _ = ready.send(Ok(()));
                            drop(ready);
                            worker.run();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })?
            }
        };
        threads.push(thread);
    }
    drop(ready_tx);
    if backend == Backend::Uring {
        let mut failure = None;
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some(io::Error::other("an io_uring worker died starting")),
            }
        }
        if let Some(e) = failure {
            // Everything started goes, its listeners closed, so that a start
            // on epoll can bind the same addresses.
            shared.shutdown.store(true, Ordering::Release);
            for w in 0..shared.bus.workers() {
                shared.bus.wake(w);
            }
            for t in threads {
                let _ = t.join();
            }
            if let Some(a) = admin {
                a.stop();
                a.join();
            }
            return Err(StartError::UringWorkers(e));
        }
    }
    let bridge = match &shared.cluster {
        Some(c) => Some(cluster::bridge::Bridge::spawn(
            Arc::clone(c),
            Arc::clone(&shared.directory),
            Arc::clone(&shared.bus),
            cluster::bridge::StreamSettings {
                per_topic: shared.config.history.size,
                max_bytes: shared.config.history.memory,
                replicas: c.replicas(),
            },
            shared.config.mailbox_high_water,
        )?),
        None => None,
    };
    let fetcher = fetcher.map(jwks::Fetcher::spawn).transpose()?;
    info!(%local_addr, workers = primaries, overflow_workers = tls_workers - primaries, io = backend.name(), pinned = placement.pinned(), tls = shared.tls.is_some(), plain_addr = ?plain_addr, "corecast listening");
    Ok(ServerHandle {
        local_addr,
        plain_addr,
        admin_addr,
        shared,
        admin,
        threads,
        fetcher,
        bridge,
        backend,
    })
}

impl ServerHandle {
    /// The bound address (with the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `--plain-listen` listener's bound address, when set.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    /// Reloads what can change without a restart (see `SIGHUP` in the
    /// README): all or nothing; on failure the old state stays and the
    /// error says why.
    pub fn reload(&self) -> Result<(), String> {
        self.shared.reload(Reload::default())
    }

    /// [`Self::reload`] with new TLS settings (paths and minimum version),
    /// a new namespace table and a new origin allow-list, from a re-read
    /// configuration file: all or nothing (see [`Reload`]); the tables,
    /// the list and the keys replaced only if the list parses, the keys
    /// load and the TLS part succeeded.
    pub fn reload_with(&self, r: Reload) -> Result<(), String> {
        self.shared.reload(r)
    }

    /// Counts a reload that failed before reaching the server (a
    /// configuration file that no longer parses); returns `why`.
    pub fn reload_failed(&self, why: String) -> String {
        let _ = self.shared.count_reload(Err(why.clone()));
        why
    }

    /// Calls `f` when a worker fails (also when one failed before this
    /// call; `f` may be called twice, so it must not mind): the server is
    /// then draining by itself, and whoever waits on it (`main`, on
    /// signals) should stop waiting and [`Self::join`]. Only the first
    /// call's `f` is kept.
    pub fn on_worker_failure(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_failure.set(Box::new(f));
        if self.worker_failed() {
            // Failed before anyone listened: tell now.
            if let Some(f) = self.shared.on_failure.get() {
                f();
            }
        }
    }

    /// Has a worker failed (panicked outside a connection's input)?
    pub fn worker_failed(&self) -> bool {
        self.shared.panics[PANIC_WORKER].load(Ordering::Relaxed) > 0
    }

    /// The I/O backend the workers run.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The admin listener's address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The Prometheus text `/metrics` serves.
    pub fn metrics(&self) -> String {
        String::from_utf8(http::render_metrics(&self.shared).to_vec()).expect("UTF-8 metrics")
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> Snapshot {
        let mut s = Snapshot::sum(self.shared.stats.iter());
        s.undelivered += self.shared.bus.stranded();
        s
    }

    /// Asks every worker to stop accepting, close its connections with 1001
    /// and exit within the drain timeout. Returns at once; see [`Self::join`].
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in 0..self.shared.bus.workers() {
            self.shared.bus.wake(w);
        }
        self.shared.jwks.wake();
        // The admin listener stays up through the drain (its /healthz
        // answers 503 `draining`); `join` stops it.
    }

    /// Waits for every worker to exit; `false` when one failed (see
    /// [`Self::on_worker_failure`]).
    pub fn join(mut self) -> bool {
        self.join_workers();
        !self.worker_failed()
    }

    fn join_workers(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a worker thread panicked");
            }
        }
        if let Some(a) = self.admin.take() {
            a.stop();
            a.join();
        }
        // Within a fetch's timeout.
        if let Some(f) = self.fetcher.take()
            && f.join().is_err()
        {
            warn!("the JWKS fetcher panicked");
        }
        // After the workers: what they published during the drain gets
        // its moment to be stored.
        if let Some(b) = self.bridge.take() {
            b.stop();
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
