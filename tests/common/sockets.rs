//! Raw TCP clients for byte-exact probes: plain, from a chosen source
//! address, with a tiny receive window, closed with a reset.

use socket2::{Domain, SockRef, Socket, Type};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use super::KIB;

/// Socket timeout so a broken server fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw TCP connection with a read timeout.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A raw connection to `addr` from the source address `from` (any of
/// 127.0.0.0/8 on loopback), for the per-address limits.
pub fn raw_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A raw connection with a 4 KiB receive buffer (the smallest window the
/// kernel allows it), for clients that do not read: what the server writes
/// to it fills the server's socket buffer (about 3 MiB on loopback here)
/// and then the server's queue.
pub fn tiny_window(addr: SocketAddr) -> TcpStream {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4 * KIB).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Closes `s` with a reset (RST) instead of a FIN: `SO_LINGER` of zero.
pub fn reset(s: TcpStream) {
    SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(s);
}

/// Reads until EOF (bounded by the socket timeout); returns everything.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

/// Asserts that the server ends the TCP connection cleanly (FIN) next.
pub fn assert_eof(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{n} more bytes where the connection should end"),
        Err(e) => panic!("expected the server's FIN, got {e}"),
    }
}
