//! The JWKS fetcher: one thread per process that keeps the keys of a
//! `--jwks` URL in force. The workers never wait on the network; they
//! only ask.
//!
//! - **When.** At start, before the workers take connections, for at most
//!   [`FETCH_TIMEOUT`] (a JWKS host that does not answer delays nothing
//!   further: the server starts, logs one line, and tokens that need the
//!   set are refused `401 keys_unavailable` until a fetch succeeds); then
//!   as the [`schedule`] says: every [`REFRESH_INTERVAL`], after a failure
//!   with a backoff from [`RETRY_FIRST`] to [`RETRY_MAX`], when a worker
//!   met a token naming a `kid` no key has (at most once per
//!   [`UNKNOWN_KID_INTERVAL`]), and at once on a reload.
//! - **Asking without waiting.** A worker that refuses a token as
//!   `unknown_key` or `keys_unavailable` calls `Jwks::want`: it sets a
//!   flag and unparks the thread only if the flag was clear. The flag
//!   stays set until a fetch begins, so a flood of unknown `kid`s costs a
//!   worker one atomic load per token and wakes the thread once.
//! - **Replacing the keys.** A fetched body becomes a new verifier
//!   ([`Verifier::with_jwks`]: all or nothing, the checks of a JWKS file)
//!   swapped into `Shared::auth` the way a reload swaps one, both under
//!   `Jwks::lock_update`, so neither undoes the other. A failed fetch
//!   changes nothing; it is logged (once per kind of failure in a row)
//!   and counted in `corecast_jwks_fetches_total{result="error"}`.
//!
//! [`Verifier::with_jwks`]: crate::server::auth::Verifier::with_jwks

mod fetch;
pub mod schedule;

use super::Shared;
pub use fetch::FETCH_TIMEOUT;
use schedule::{Asked, Next, Schedule, Why};
pub use schedule::{REFRESH_INTERVAL, RETRY_FIRST, RETRY_MAX, UNKNOWN_KID_INTERVAL};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// What the workers, the reload and the fetcher thread share.
#[derive(Debug, Default)]
pub(crate) struct Jwks {
    /// A worker met a token whose key the set may lack: set by
    /// [`Self::want`], cleared when a fetch begins.
    wanted: AtomicBool,
    /// A reload asked for a fetch now: set by [`Self::fetch_now`], cleared
    /// when a fetch begins.
    reload: AtomicBool,
    /// The fetcher, once spawned (to unpark it).
    thread: OnceLock<Thread>,
    /// Fetches by result: ok, error.
    fetches: [AtomicU64; 2],
    /// When the last fetch succeeded, Unix seconds; 0: never.
    last_ok_s: AtomicU64,
    /// Held while the verifier in force is replaced from the one in force
    /// (a reload keeping the fetched set, a fetch keeping the files' keys).
    update: Mutex<()>,
}

impl Jwks {
    /// Asks for the set again, without waiting: the caller has refused a
    /// token whose `kid` no key has. Wakes the fetcher only when no such
    /// request is already pending.
    pub(crate) fn want(&self) {
        if !self.wanted.load(Ordering::Relaxed) && !self.wanted.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Asks for the set now (a reload): not rate-limited.
    pub(crate) fn fetch_now(&self) {
        self.reload.store(true, Ordering::Release);
        self.wake();
    }

    /// Wakes the fetcher (to fetch, or to see the shutdown).
    pub(crate) fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Fetches so far: succeeded, failed.
    pub(crate) fn fetches(&self) -> [u64; 2] {
        self.fetches.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// When the last fetch succeeded, Unix seconds (0: never).
    pub(crate) fn last_ok_s(&self) -> u64 {
        self.last_ok_s.load(Ordering::Relaxed)
    }

    /// Taken by whoever replaces the verifier in force by one made from it.
    pub(crate) fn lock_update(&self) -> MutexGuard<'_, ()> {
        self.update.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was asked since the last fetch began.
    fn asked(&self) -> Asked {
        Asked {
            reload: self.reload.load(Ordering::Acquire),
            unknown_kid: self.wanted.load(Ordering::Acquire),
        }
    }

    /// A fetch begins: it answers everything asked so far.
    fn clear(&self) {
        self.reload.store(false, Ordering::Release);
        self.wanted.store(false, Ordering::Release);
    }
}

/// The fetcher's own state: its schedule and what it last saw, for logs
/// that say what changed rather than repeat themselves.
pub(crate) struct Fetcher {
    shared: Arc<Shared>,
    schedule: Schedule,
    /// A hash of the last body put in force, to log a new set once.
    last_body: Option<u64>,
    /// The last failure in a row, to log a new kind of failure once.
    last_error: Option<String>,
}

impl Fetcher {
    /// The fetcher of `shared` (tokens on), with the first fetch made
    /// here, on the caller's thread, when `--jwks` is a URL: the server
    /// then starts with the set in force, unless the host fails to answer
    /// within [`FETCH_TIMEOUT`].
    pub(crate) fn first(shared: Arc<Shared>) -> Self {
        let mut f = Self {
            shared,
            schedule: Schedule::new(Instant::now()),
            last_body: None,
            last_error: None,
        };
        if let Some(url) = f.url()
            && let Some(error) = f.fetch(&url, Why::Due)
        {
            warn!(
                url,
                %error,
                "JWKS unreachable at start: tokens that need its keys are refused (401 keys_unavailable) until a fetch succeeds; retrying"
            );
        }
        f
    }

    /// Runs the fetcher on a thread of its own until the server shuts down.
    pub(crate) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        let shared = Arc::clone(&self.shared);
        let handle = thread::Builder::new()
            .name("corecast-jwks".into())
            .spawn(move || self.run())?;
        let _ = shared.jwks.thread.set(handle.thread().clone());
        Ok(handle)
    }

    /// The URL of the verifier in force, if `--jwks` is one.
    fn url(&self) -> Option<String> {
        self.shared
            .verifier()
            .and_then(|v| v.jwks_url().map(str::to_string))
    }

    fn run(mut self) {
        loop {
            if self.shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let Some(url) = self.url() else {
                // No URL (a file, or none): a reload may name one.
                thread::park();
                continue;
            };
            match self.schedule.poll(Instant::now(), self.shared.jwks.asked()) {
                Next::Sleep(d) => thread::park_timeout(d),
                Next::Fetch(why) => {
                    if let Some(error) = self.fetch(&url, why) {
                        warn!(url, %error, why = why.label(), "JWKS fetch failed: the keys in force stay; retrying");
                    }
                }
            }
        }
    }

    /// One fetch of `url`: counted, and its set put in force if it is
    /// good. Returns the error when it failed otherwise than the fetch
    /// before (for the caller to log once; a repeat is logged at debug).
    fn fetch(&mut self, url: &str, why: Why) -> Option<String> {
        self.shared.jwks.clear();
        let began = Instant::now();
        let result = fetch::get(url).and_then(|body| {
            let keys = install(&self.shared, url, &body)?;
            Ok((keys, body))
        });
        self.schedule
            .handle_fetched(began, Instant::now(), why, result.is_ok());
        let jwks = &self.shared.jwks;
        match result {
            Ok((keys, body)) => {
                jwks.fetches[0].fetch_add(1, Ordering::Relaxed);
                jwks.last_ok_s.store(unix_now(), Ordering::Relaxed);
                let mut h = std::hash::DefaultHasher::new();
                body.hash(&mut h);
                let hash = h.finish();
                let recovered = self.last_error.take().is_some();
                if self.last_body != Some(hash) || recovered {
                    info!(url, keys, why = why.label(), "JWKS keys in force");
                } else {
                    debug!(url, keys, why = why.label(), "JWKS fetched, unchanged");
                }
                self.last_body = Some(hash);
                None
            }
            Err(error) => {
                jwks.fetches[1].fetch_add(1, Ordering::Relaxed);
                let again = self.last_error.as_deref() == Some(error.as_str());
                self.last_error = Some(error.clone());
                if again {
                    debug!(url, %error, why = why.label(), failures = self.schedule.failures(), "JWKS fetch failed again");
                    return None;
                }
                Some(error)
            }
        }
    }
}

/// Puts the keys of `body`, fetched from `url`, in force; the number of
/// keys, or why not (the set in force stays).
fn install(shared: &Shared, url: &str, body: &[u8]) -> Result<usize, String> {
    let auth = shared.auth.as_ref().ok_or("tokens are off")?;
    let _update = shared.jwks.lock_update();
    let current = Arc::clone(&auth.read().unwrap_or_else(|p| p.into_inner()));
    if current.jwks_url() != Some(url) {
        return Err("a reload named another URL during the fetch".into());
    }
    let next = current.with_jwks(body)?;
    let keys = next.fetched_keys().unwrap_or(0);
    *auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    Ok(keys)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
