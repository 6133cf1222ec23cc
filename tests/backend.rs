//! What differs between the backends, observed from outside: the backend
//! the server reports, and where its connections' descriptors live.

mod common;

use common::*;
use corecast::server::{Backend, IoMode};
use std::time::Duration;

/// `CORECAST_URING_PLAIN_FDS=1`: the io_uring backend's measuring switch
/// for plain descriptors instead of direct ones (docs/ARCHITECTURE.md).
fn uring_plain_fds() -> bool {
    std::env::var_os("CORECAST_URING_PLAIN_FDS").is_some_and(|v| v == "1")
}

#[test]
fn the_requested_backend_is_the_one_running() {
    let server = start();
    match io_mode() {
        IoMode::Epoll => assert_eq!(server.backend(), Backend::Epoll),
        IoMode::Uring => assert_eq!(server.backend(), Backend::Uring),
        IoMode::Auto => {}
    }
}

/// epoll connections are ordinary descriptors; io_uring accepts them as
/// direct descriptors in the ring's table, outside the process's table:
/// with N client sockets in this process, the count grows by ~2N on epoll
/// and by ~N (the clients' ends only) on io_uring (by ~2N again with its
/// plain-descriptor switch on).
#[test]
fn io_uring_connections_take_no_process_descriptors() {
    // Counts the process's descriptors: no other test may open hundreds meanwhile.
    let _alone = exclusive();
    let server = start();
    let addr = server.local_addr();
    const N: usize = 200;
    let before = open_fds();
    let conns: Vec<_> = (0..N).map(|_| raw_ws(addr, "/echo")).collect();
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        >= N as u64));
    let grown = open_fds() - before;
    // Margins, not exact counts: the other test in this binary opens and
    // closes a few descriptors (listeners, rings, eventfds) concurrently.
    match server.backend() {
        Backend::Epoll => assert!(grown > N * 3 / 2, "epoll: {grown} new descriptors"),
        Backend::Uring if uring_plain_fds() => assert!(
            grown > N * 3 / 2,
            "io_uring, plain descriptors: {grown} new descriptors"
        ),
        Backend::Uring => assert!(
            grown < N * 5 / 4,
            "io_uring: {grown} new descriptors for {N} connections"
        ),
    }
    drop(conns);
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
}

/// Short-lived connections one after another reuse the server's slots (on
/// io_uring, fixed-file table entries): every client must get its whole
/// answer, never another connection's shutdown or close. (The ordering
/// that guards this — a slot is closed only when nothing else runs on it —
/// guards a race that needs a delayed io-wq thread; this test exercises
/// the reuse but does not force that delay.)
#[test]
fn every_short_lived_connection_gets_its_own_answer() {
    let server = start();
    let addr = server.local_addr();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for i in 0..250 {
                    let got = refused(addr, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n");
                    assert!(got.starts_with("HTTP/1.1 404 "), "request {i}: {got:?}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || server
        .stats()
        .connections_open
        == 0));
}

/// io_uring holds connections as direct descriptors, at most a table's
/// worth per ring: the server starts overflow workers to reach
/// `max_connections`, fills the primaries first, then one overflow worker
/// at a time, and a publication still reaches every subscriber.
#[test]
fn full_rings_overflow_into_more_workers_and_every_subscriber_is_served() {
    let _alone = exclusive();
    let server = start_with(|c| {
        c.workers = 1;
        c.max_connections = 256;
        c.ring_slots = Some(64);
    });
    let addr = server.local_addr();
    let open = |server: &corecast::server::ServerHandle| -> Vec<u64> {
        let m = server.metrics();
        (0..)
            .map_while(|w| {
                let name = format!("corecast_connections_open{{worker=\"{w}\"}} ");
                m.lines()
                    .find_map(|l| l.strip_prefix(name.as_str()))
                    .map(|v| v.parse().unwrap())
            })
            .collect()
    };
    let uring = server.backend() == Backend::Uring && !uring_plain_fds();
    // 64 slots, 8 kept free: 56 per ring, five rings for 256.
    assert_eq!(open(&server).len(), if uring { 5 } else { 1 });
    let mut subs: Vec<Ws> = (0..130).map(|_| connect(addr, "/ws?topics=o")).collect();
    let per_worker = open(&server);
    eprintln!("connections per worker: {per_worker:?}");
    assert_eq!(per_worker.iter().sum::<u64>(), 130);
    if uring {
        // Filled in order: worker 0 to its mark, then 1, then 2.
        assert!((56..=64).contains(&per_worker[0]), "{per_worker:?}");
        assert!((56..=64).contains(&per_worker[1]), "{per_worker:?}");
        assert_eq!(per_worker[3..], [0, 0], "{per_worker:?}");
    }
    publish(addr, "o", b"to all");
    for ws in &mut subs {
        assert_eq!(
            ws.read().unwrap(),
            tungstenite::Message::binary(&b"to all"[..])
        );
    }
}

/// Runs the binary without `CAP_IPC_LOCK` (which exempts root from the
/// locked-memory limit) under the usual 8 MiB limit of an unprivileged
/// user: each io_uring worker's ring is charged to it, and the default
/// workers do not fit. `None` where setpriv(1)/prlimit(1) cannot do that.
fn under_the_usual_memlock_limit(flags: &[&str]) -> Option<ChildServer> {
    let works = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-ipc_lock",
            "--",
            "prlimit",
            "--memlock=8388608:8388608",
            "--",
            "true",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("skipped: setpriv/prlimit cannot drop CAP_IPC_LOCK and set RLIMIT_MEMLOCK here");
        return None;
    }
    Some(ChildServer::start_under(
        &[
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--",
            "prlimit",
            "--memlock=8388608:8388608",
            "--",
        ],
        flags,
    ))
}

#[test]
fn the_default_backend_falls_back_to_epoll_when_the_locked_memory_limit_refuses_the_rings() {
    // The default, --io auto, and many workers: the limit refuses their
    // rings (a start-up probe's one small ring passes). The server starts
    // anyway, on epoll, and says why.
    let Some(server) = under_the_usual_memlock_limit(&["--io", "auto", "--workers", "16"]) else {
        return;
    };
    // The line that gave the address is logged just after it is seen.
    assert!(eventually(Duration::from_secs(5), || server
        .log_text()
        .contains("corecast listening")));
    let log = server.log_text();
    let listening = log
        .lines()
        .find(|l| l.contains("corecast listening"))
        .expect("listening line");
    if listening.contains("io=\"uring\"") {
        // A kernel that does not charge rings to RLIMIT_MEMLOCK (before 6.x
        // region accounting, or with it raised): nothing to fall back from.
        eprintln!("skipped: the rings fit under the limit here");
        return;
    }
    assert!(listening.contains("io=\"epoll\""), "{listening}");
    assert!(
        log.contains("RLIMIT_MEMLOCK"),
        "the warning names the limit:\n{log}"
    );
    let mut s = raw(server.addr);
    let head = request_upgrade(&mut s, "/echo");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
}
