//! What the tokio peers of tools/baselines (`tt-broadcast`,
//! `fws-broadcast`) share: the routes, the counters printed on exit, and
//! the runtime. The WebSocket libraries themselves are the binaries'.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters printed on exit.
#[derive(Debug, Default)]
pub struct Stats {
    pub subscribers: AtomicU64,
    pub publishers: AtomicU64,
    pub rejected: AtomicU64,
    pub published: AtomicU64,
    pub sent: AtomicU64,
    /// Times a subscriber found it had lagged.
    pub lag_events: AtomicU64,
    /// Messages lagged subscribers skipped, summed.
    pub lagged_messages: AtomicU64,
}

impl Stats {
    /// Prints the counters, prefixed with the server's name.
    pub fn report(&self, name: &str) {
        let c = |a: &AtomicU64| a.load(Relaxed);
        println!(
            "{name}: subscribers {}, publishers {}, rejected {}, published {}, sent {}, \
             lag events {}, lagged messages skipped {}",
            c(&self.subscribers),
            c(&self.publishers),
            c(&self.rejected),
            c(&self.published),
            c(&self.sent),
            c(&self.lag_events),
            c(&self.lagged_messages)
        );
    }
}

/// What a request path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Subscriber,
    Publisher,
}

/// `/ws` subscribes, `/publish/{topic}` publishes; anything else is unknown.
pub fn role_of(path: &str) -> Option<Role> {
    if path == "/ws" {
        Some(Role::Subscriber)
    } else if path
        .strip_prefix("/publish/")
        .is_some_and(|t| !t.is_empty())
    {
        Some(Role::Publisher)
    } else {
        None
    }
}

/// Runs `serve(workers)` on a multi-thread runtime of `workers` threads
/// (0: one per core); exits 1 with `name: error` when it fails.
pub fn run<F, Fut>(name: &str, workers: usize, serve: F)
where
    F: FnOnce(usize) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("cannot build the tokio runtime");
    if let Err(e) = rt.block_on(serve(workers)) {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_paths() {
        assert_eq!(role_of("/ws"), Some(Role::Subscriber));
        assert_eq!(role_of("/publish/bench"), Some(Role::Publisher));
        assert_eq!(role_of("/publish/"), None);
        assert_eq!(role_of("/echo"), None);
        assert_eq!(role_of("/wsx"), None);
    }
}
