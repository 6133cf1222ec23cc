//! Frame headers (RFC 6455 §5.2): parsing and encoding, no payload handling.
//!
//! ```text
//!  0               1               2               3
//!  FIN RSV1-3 opcode | MASK len7 | [len16 | len64] | [mask key 4] | payload
//! ```

use std::fmt;

/// Largest possible header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER_LEN: usize = 14;
/// Largest server (unmasked) header: 2 + 8.
pub const MAX_SERVER_HEADER_LEN: usize = 10;
/// Control frames carry at most 125 payload bytes (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes (§5.2). Reserved values are rejected while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: with permessage-deflate, the message is compressed (first
    /// frame of a data message only; the connection checks that).
    pub rsv1: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header occupied on the wire (2..=14).
    pub header_len: usize,
}

/// Why a header was rejected. Every variant maps to close code 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// RSV2 or RSV3 set (no extension defines them here).
    ReservedBits,
    /// Opcode 3-7 or 0xB-0xF.
    ReservedOpcode(u8),
    /// Control frame with FIN clear.
    FragmentedControl,
    /// Control frame with a 16- or 64-bit length. Its payload is at most
    /// 125 bytes (RFC 6455 §5.5), which the 7-bit form holds and so must
    /// carry (§5.2: the minimal encoding): refused before the length is
    /// read, whether it is over 125 or a small one in a longer form.
    ControlExtendedLength,
    /// 64-bit length with the most significant bit set.
    LengthOverflow,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReservedBits => f.write_str("reserved bits set"),
            Self::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            Self::FragmentedControl => f.write_str("fragmented control frame"),
            Self::ControlExtendedLength => f.write_str("control frame with an extended length"),
            Self::LengthOverflow => f.write_str("64-bit length with top bit set"),
        }
    }
}

/// Parses a frame header from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, HeaderError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x30 != 0 {
        return Err(HeaderError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(HeaderError::ReservedOpcode(b0 & 0x0f))?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(HeaderError::FragmentedControl);
        }
        // Over 125 is 126 or 127: the 16- or 64-bit form.
        if len7 as usize > MAX_CONTROL_PAYLOAD {
            return Err(HeaderError::ControlExtendedLength);
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(HeaderError::LengthOverflow);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        let Some(b) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        rsv1,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// Encodes a header with the minimal length encoding into `out`; returns its length.
/// `mask` is `None` for server frames, `Some(key)` for client frames.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (fin as u8) << 7 | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u16::MAX as u64 {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Builds a complete server frame (unmasked) in one allocation.
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    v
}

/// A complete unmasked frame whose payload is a compressed message's
/// deflate data (RSV1 set: permessage-deflate).
pub fn compressed_server_frame(opcode: OpCode, deflated: &[u8]) -> Vec<u8> {
    let mut v = server_frame(opcode, deflated);
    v[0] |= 0x40;
    v
}

/// Builds a complete masked client frame (used by the load generator and tests).
pub fn client_frame(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, fin, opcode, payload.len() as u64, Some(mask));
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    super::mask::apply_mask(&mut v[n..], mask, 0);
    v
}

/// Close status codes (RFC 6455 §7.4) that corecast sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    /// IANA-registered "Unauthorized": a token expired (not in the
    /// reserved ranges, so peers accept it in a close frame).
    pub const UNAUTHORIZED: Self = Self(3000);
    /// IANA-registered "Forbidden": the operator closed the connections of
    /// a user (`POST /disconnect`).
    pub const FORBIDDEN: Self = Self(3003);
    pub const PROTOCOL_ERROR: Self = Self(1002);
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    pub const INVALID_PAYLOAD: Self = Self(1007);
    pub const POLICY_VIOLATION: Self = Self(1008);
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// "Try Again Later" (IANA registry): the server is out of a resource.
    pub const TRY_AGAIN_LATER: Self = Self(1013);

    /// May this code appear in a close frame on the wire (§7.4.1, §7.4.2 and
    /// the IANA registry)? 1005, 1006 and 1015 are for local use only.
    pub fn is_valid_on_wire(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Payload of a close frame: the code in network order and a UTF-8 reason.
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    // Cut on a character boundary so a long reason stays valid UTF-8.
    let mut n = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    let reason = &reason.as_bytes()[..n];
    let mut v = Vec::with_capacity(2 + reason.len());
    v.extend_from_slice(&code.0.to_be_bytes());
    v.extend_from_slice(reason);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_length_encoding() {
        let h = parse_header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len, h.mask),
            (true, OpCode::Text, 5, 6, Some([1, 2, 3, 4]))
        );
        let h = parse_header(&[0x02, 0xfe, 0x01, 0x00, 9, 9, 9, 9])
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (false, OpCode::Binary, 256, 8)
        );
        let mut b = vec![0x82, 0xff];
        b.extend_from_slice(&(1u64 << 40).to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        let h = parse_header(&b).unwrap().unwrap();
        assert_eq!((h.payload_len, h.header_len), (1 << 40, 14));
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let full = client_frame(true, OpCode::Binary, &[7; 300], [1, 2, 3, 4]);
        for n in 0..8 {
            assert_eq!(parse_header(&full[..n]), Ok(None), "{n} bytes");
        }
        assert!(parse_header(&full[..8]).unwrap().is_some());
        let mut long = vec![0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(parse_header(&long[..9]), Ok(None));
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_header(&long), Ok(None));
    }

    #[test]
    fn rejects_protocol_violations() {
        // RSV1 is read (the connection decides: permessage-deflate or 1002).
        let h = parse_header(&[0xc1, 0x80, 0, 0, 0, 0]).unwrap().unwrap();
        assert!(h.rsv1 && h.fin);
        assert_eq!(parse_header(&[0x91, 0x80]), Err(HeaderError::ReservedBits));
        assert_eq!(parse_header(&[0xa1, 0x80]), Err(HeaderError::ReservedBits));
        for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
            assert_eq!(
                parse_header(&[0x80 | op, 0x80]),
                Err(HeaderError::ReservedOpcode(op))
            );
        }
        assert_eq!(
            parse_header(&[0x09, 0x80]),
            Err(HeaderError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&[0x89, 0xfe]),
            Err(HeaderError::ControlExtendedLength)
        );
        let mut b = vec![0x82, 0xff];
        b.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&b), Err(HeaderError::LengthOverflow));
    }

    #[test]
    fn encoding_is_minimal_and_round_trips() {
        for (len, hlen) in [
            (0u64, 2),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
            (1 << 40, 10),
        ] {
            let mut out = [0u8; MAX_HEADER_LEN];
            let n = encode_header(&mut out, true, OpCode::Binary, len, None);
            assert_eq!(n, hlen, "len {len}");
            let h = parse_header(&out[..n]).unwrap().unwrap();
            assert_eq!((h.payload_len, h.mask, h.fin), (len, None, true));
            let n = encode_header(&mut out, false, OpCode::Text, len, Some([9, 8, 7, 6]));
            assert_eq!(n, hlen + 4);
            let h = parse_header(&out[..n]).unwrap().unwrap();
            assert_eq!(
                (h.payload_len, h.mask, h.fin),
                (len, Some([9, 8, 7, 6]), false)
            );
        }
    }

    #[test]
    fn close_codes_on_the_wire() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode::is_valid_on_wire(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode::is_valid_on_wire(bad), "{bad}");
        }
    }

    #[test]
    fn close_reason_is_capped_to_control_size() {
        let p = close_payload(CloseCode::NORMAL, &"x".repeat(300));
        assert_eq!(p.len(), MAX_CONTROL_PAYLOAD);
        assert_eq!(&p[..2], &[0x03, 0xe8]);
        let p = close_payload(CloseCode::NORMAL, &"é".repeat(100));
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(p.len(), 124);
    }
}
