//! A real `nats-server` with JetStream for the cluster tests, on a free
//! loopback port below 32768, its store in a fresh directory; stopped
//! (and its store removed) when dropped. `.ci/run` installs the Debian
//! package; elsewhere, without it, [`NatsServer::start`] returns `None`
//! after a loud message, unless `CORECAST_REQUIRE_NATS` is set (as in CI),
//! when it panics.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// More command-line flags (TLS, say).
    extra: Vec<String>,
}

/// A port below 32768 nothing listens on now, never the same twice in
/// one test process (tests of a file run in parallel).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let seed = std::process::id() as u16;
    loop {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(i < 2000, "no free port below 32768");
        let port = 20000 + (seed.wrapping_mul(7).wrapping_add(i.wrapping_mul(13))) % 12000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl NatsServer {
    /// Starts one, or `None` when `nats-server` is missing outside CI.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// [`Self::start`] with more flags for `nats-server`.
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        let found = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var_os("CORECAST_REQUIRE_NATS").is_some() {
                panic!("nats-server is not installed (CORECAST_REQUIRE_NATS is set)");
            }
            eprintln!(
                "\n*** SKIPPED: nats-server is not installed; the cluster tests need it \
                 (apt-get install nats-server) ***\n"
            );
            return None;
        }
        let port = free_port();
        let store =
            std::env::temp_dir().join(format!("corecast-nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        let mut me = Self {
            port,
            store,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        me.run();
        Some(me)
    }

    /// (Re)starts the server process on the same port and store.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "nats-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Ours, not another's on the same port: it is still running.
        std::thread::sleep(Duration::from_millis(50));
        let exited = self.child.as_mut().map(|c| c.try_wait());
        assert!(
            matches!(exited, Some(Ok(None))),
            "nats-server on port {} exited at start (port taken?)",
            self.port
        );
    }

    /// Stops the server process (the store stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A TCP relay in front of a NATS server that can cut its clients off:
/// [`Relay::cut`] closes every connection through it and refuses new ones
/// until it is lifted (what a node sees when NATS cuts it as a slow
/// consumer, or its network fails).
pub struct Relay {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(nats_port: u16) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stall = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (is_cut, live) = (Arc::clone(&cut), Arc::clone(&open));
        let stalled = Arc::clone(&stall);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if is_cut.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", nats_port)) else {
                    continue;
                };
                {
                    let mut live = live.lock().unwrap();
                    live.push(client.try_clone().unwrap());
                    live.push(upstream.try_clone().unwrap());
                }
                let pump = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pump(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                // NATS to the client: not read while stalled.
                let stalled = Arc::clone(&stalled);
                let (mut from, mut to) = (upstream, client);
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                    loop {
                        if stalled.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        match from.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) if to.write_all(&buf[..n]).is_ok() => {}
                            Ok(_) => break,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self {
            port,
            cut,
            stall,
            open,
        }
    }

    /// Cuts every connection through the relay and refuses new ones
    /// (`true`), or lets them through again (`false`).
    pub fn cut(&self, on: bool) {
        self.cut.store(on, std::sync::atomic::Ordering::Relaxed);
        if on {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Stops (or resumes) passing on what NATS sends: the client reads
    /// nothing, like a node too slow for NATS.
    pub fn stall(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}
