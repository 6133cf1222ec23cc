//! The start-up probe: does the kernel run everything this backend uses?

use super::accept::AcceptAddr;
use super::bufring::{BGID, BufRing};
use io_uring::{IoUring, cqueue, opcode, types};
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Does the kernel run everything this backend uses? Tries it for real on
/// loopback: an accept into a sparse fixed-file table that reports the
/// peer's address, a multishot receive into a provided-buffer ring,
/// cancellation and a close by index.
/// Probed once per process, on a thread of its own: the probe ring's
/// teardown may run task work on the thread that used it, which would
/// interrupt (EINTR) that thread's blocking calls.
pub fn probe() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("corecast-probe".into())
                .spawn(probe_now)
                .map_err(|e| format!("probe thread: {e}"))?
                .join()
                .unwrap_or_else(|_| Err("the probe panicked".into()))
        })
        .clone()
}

fn probe_now() -> Result<(), String> {
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("probe: {e}"))?;
    for (code, name) in [
        (opcode::Accept::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Send::CODE, "send"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::Read::CODE, "read"),
        (opcode::Shutdown::CODE, "shutdown"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("opcode {name} not supported"));
        }
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| format!("sparse file table: {e}"))?;
    let mut bufs = BufRing::new(&ring).map_err(|e| format!("buffer ring: {e}"))?;
    // The worker's reserve group is registered beside it.
    let reserve = BufRing::reserve(&ring).map_err(|e| format!("reserve buffer ring: {e}"))?;
    let _ = reserve.unregister(&ring);
    drop(reserve);
    let mut peer = Box::new(AcceptAddr::new());
    let result = probe_loopback(&mut ring, &mut bufs, &mut peer);
    if result.is_err() {
        // An operation may still point into the buffers or the address:
        // never free them.
        std::mem::forget(bufs);
        std::mem::forget(peer);
        return result;
    }
    // Nothing is in flight any more.
    let _ = bufs.unregister(&ring);
    drop(ring);
    drop(bufs);
    result
}

fn probe_loopback(
    ring: &mut IoUring,
    bufs: &mut BufRing,
    peer: &mut AcceptAddr,
) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let accept = peer
        .accept(types::Fd(listener.as_raw_fd()))
        .file_index(Some(types::DestinationSlot::auto_target()))
        .build()
        .user_data(1);
    // SAFETY: the accept writes into `peer`, which the caller leaks if the
    // probe fails (the accept may then still be in flight).
    unsafe { ring.submission().push(&accept) }.map_err(|_| "queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    let mut client =
        std::net::TcpStream::connect(addr).map_err(|e| format!("loopback connect: {e}"))?;
    let cqe = wait_one(ring)?;
    if cqe.1 < 0 {
        return Err(format!("accept: {}", io::Error::from_raw_os_error(-cqe.1)));
    }
    let local = client.local_addr().map_err(|e| e.to_string())?;
    if peer.peer() != Some(local.ip()) {
        return Err("accept did not report the peer address".into());
    }
    let slot = cqe.1 as u32;
    let recv = opcode::RecvMulti::new(types::Fixed(slot), BGID)
        .build()
        .user_data(2);
    // SAFETY: the receive uses the registered buffer ring, alive until after the ring.
    unsafe { ring.submission().push(&recv) }.map_err(|_| "queue full".to_string())?;
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    io::Write::write_all(&mut client, b"probe").map_err(|e| e.to_string())?;
    let cqe = wait_one(ring)?;
    let Some(bid) = cqueue::buffer_select(cqe.2) else {
        return Err(format!(
            "multishot recv: {}",
            io::Error::from_raw_os_error(-cqe.1.min(0))
        ));
    };
    let len = cqe.1.max(0) as usize;
    let got = bufs.data(bid, len) == b"probe";
    bufs.consumed(bid, len, cqueue::buffer_more(cqe.2));
    if !got {
        return Err("multishot recv returned the wrong bytes".into());
    }
    let cancel = opcode::AsyncCancel::new(2).build().user_data(3);
    let close = opcode::Close::new(types::Fixed(slot)).build().user_data(4);
    for sqe in [&cancel, &close] {
        // SAFETY: no pointers in these entries.
        unsafe { ring.submission().push(sqe) }.map_err(|_| "queue full".to_string())?;
    }
    ring.submit().map_err(|e| format!("submit: {e}"))?;
    // Reap until the receive has ended (it is cancelled).
    let mut open = 1;
    let deadline = Instant::now() + Duration::from_secs(1);
    while open > 0 && Instant::now() < deadline {
        let (ud, _, flags) = wait_one(ring)?;
        if let Some(bid) = cqueue::buffer_select(flags) {
            bufs.consumed(bid, 0, cqueue::buffer_more(flags));
        }
        if ud == 2 && !cqueue::more(flags) {
            open -= 1;
        }
    }
    if open > 0 {
        return Err("cancellation did not complete".into());
    }
    Ok(())
}

pub(super) fn wait_one(ring: &mut IoUring) -> Result<(u64, i32, u32), String> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(c) = ring.completion().next() {
            return Ok((c.user_data(), c.result(), c.flags()));
        }
        if Instant::now() >= deadline {
            return Err("no completion within 1 s".into());
        }
        let ts = types::Timespec::from(Duration::from_millis(50));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::bufring::GEOMETRIES;
    use super::*;

    /// The probe's whole sequence passes with either buffer geometry, so
    /// the fallback for kernels without incremental buffers is exercised
    /// here too.
    #[test]
    fn the_probe_passes_with_both_buffer_geometries() {
        for geometry in GEOMETRIES {
            let mut ring = IoUring::new(8).unwrap();
            ring.submitter().register_files_sparse(4).unwrap();
            let mut bufs = BufRing::with_geometry(&ring, geometry).unwrap();
            let mut peer = Box::new(AcceptAddr::new());
            probe_loopback(&mut ring, &mut bufs, &mut peer).unwrap();
            bufs.unregister(&ring).unwrap();
        }
    }
}
