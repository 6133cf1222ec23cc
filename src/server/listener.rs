//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT`, so the kernel spreads incoming connections over the
//! workers without a shared accept queue or lock.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

/// Accept backlog requested from the kernel (it clamps to `net.core.somaxconn`).
/// Large so that connection storms queue in the kernel rather than fail.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds a non-blocking `SO_REUSEPORT` listener on `addr`.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(sock.into())
}

/// Binds `count` listeners on `addr`; when `addr` has port 0, the first
/// listener picks the port and the others join it.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..count {
        all.push(bind_reuseport(bound)?);
    }
    Ok((bound, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_shares_one_port() {
        let (addr, ls) = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(addr.port(), 0);
        for l in &ls {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }
}
