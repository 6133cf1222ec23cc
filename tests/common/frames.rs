//! WebSocket frames on raw sockets: client frames built byte by byte
//! (lying headers included), server frames and close codes read back, and
//! numbered messages.

use std::io::Read;
use std::net::TcpStream;

use super::assert_eof;

/// The masking key of every client frame the tests build.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The payload length field (with the mask bit) and extended length of a
/// client frame of `len` bytes, minimal encoding.
pub fn length_field(len: u64, masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    match len {
        0..=125 => vec![m | len as u8],
        126..=0xffff => {
            let mut v = vec![m | 126];
            v.extend_from_slice(&(len as u16).to_be_bytes());
            v
        }
        _ => {
            let mut v = vec![m | 127];
            v.extend_from_slice(&len.to_be_bytes());
            v
        }
    }
}

/// A frame with any first byte (FIN, RSV bits, any opcode, reserved ones
/// included), masked with `mask` when given.
pub fn frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![b0];
    f.extend(length_field(payload.len() as u64, mask.is_some()));
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A masked header declaring `len` payload bytes in the 64-bit encoding,
/// whatever `len` is (so lengths with the top bit set can be sent).
pub fn header64(b0: u8, len: u64) -> Vec<u8> {
    let mut h = vec![b0, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&MASK);
    h
}

/// Masks `payload` as the bytes starting at `offset` of a frame payload.
pub fn masked(payload: &[u8], offset: usize) -> Vec<u8> {
    payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ MASK[(offset + i) % 4])
        .collect()
}

/// A server frame: (fin, opcode, payload).
pub fn read_frame(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let (b0, p) = read_frame_head_byte(s);
    (b0 & 0x80 != 0, b0 & 0x0f, p)
}

/// A server frame: its first byte (FIN, RSV1-3, opcode) and its payload.
pub fn read_frame_head_byte(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

/// Reads the server's close frame and returns its code.
pub fn read_close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (_, op, p) = read_frame(s);
        if op == 0x8 {
            assert!(p.len() >= 2, "close frame carries a code");
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

/// Reads the server's close frame (skipping frames before it), checks that
/// the TCP connection ends after it, and returns the close code.
pub fn close_code_then_eof(s: &mut TcpStream) -> u16 {
    let code = read_close_code(s);
    assert_eof(s);
    code
}

/// A `size`-byte message numbered `i` in its first four bytes.
pub fn numbered(i: u32, size: usize) -> Vec<u8> {
    let mut m = vec![0x5a; size];
    m[..4].copy_from_slice(&i.to_be_bytes());
    m
}

/// The number of a message made by [`numbered`].
pub fn number_of(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("a numbered message"))
}
