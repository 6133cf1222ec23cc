//! Reading frames: [`FrameReader`] splits the server's bytes into
//! [`Frame`]s (unmasked, at most [`MAX_FRAME_PAYLOAD`] bytes each).

use corecast::proto::OpCode;
use corecast::proto::frame::parse_header;

/// Largest data frame buffered from the server.
pub const MAX_FRAME_PAYLOAD: u64 = 1 << 20;

/// A frame from the server, borrowed from the reader's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    /// RSV1: compressed, when permessage-deflate was agreed.
    pub rsv1: bool,
    pub opcode: OpCode,
    pub payload: &'a [u8],
}

/// Splits server bytes into frames. Server frames must be unmasked.
///
/// Consumed frames are skipped by a cursor and the buffer is compacted once
/// per [`FrameReader::push`], not once per frame: a read holding hundreds of
/// small frames costs one move, not hundreds.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte.
    pos: usize,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. Once everything is consumed, a
    /// large buffer is given back: thousands of idle connections must not
    /// each keep their last read.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, &'static str> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.pos = 0;
            self.buf.clear();
            if self.buf.capacity() > 4096 {
                self.buf = Vec::new();
            }
        }
        let buf = &self.buf[self.pos..];
        let h = match parse_header(buf) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(_) => return Err("bad_frame_header"),
        };
        if h.mask.is_some() {
            return Err("masked_server_frame");
        }
        if h.payload_len > MAX_FRAME_PAYLOAD {
            return Err("frame_too_large");
        }
        let end = h.header_len + h.payload_len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let payload = &buf[h.header_len..end];
        self.pos += end;
        Ok(Some(Frame {
            fin: h.fin,
            rsv1: h.rsv1,
            opcode: h.opcode,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corecast::proto::frame::{client_frame, server_frame};

    #[test]
    fn frame_reader_splits_and_rejects_masked_frames() {
        let mut r = FrameReader::default();
        let mut bytes = server_frame(OpCode::Ping, b"hi");
        bytes.extend_from_slice(&server_frame(OpCode::Text, b"hello"));
        r.push(&bytes[..3]);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&bytes[3..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OpCode::Ping, &b"hi"[..]));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.opcode, f.fin, f.rsv1), (OpCode::Text, true, false));
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&corecast::proto::frame::compressed_server_frame(
            OpCode::Text,
            b"\x02\x00",
        ));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(
            (f.opcode, f.rsv1, f.payload),
            (OpCode::Text, true, &b"\x02\x00"[..])
        );
        r.push(&client_frame(true, OpCode::Text, b"x", [1, 2, 3, 4]));
        assert_eq!(r.next_frame(), Err("masked_server_frame"));
    }

    #[test]
    fn frame_reader_keeps_partial_frames_and_frees_consumed_buffers() {
        let mut r = FrameReader::default();
        let big = server_frame(OpCode::Binary, &[7; 10_000]);
        let mut bytes = big.clone();
        bytes.extend_from_slice(&big[..5000]);
        r.push(&bytes);
        assert_eq!(r.next_frame().unwrap().unwrap().payload.len(), 10_000);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&big[5000..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.payload, &big[4..]);
        assert_eq!(r.next_frame(), Ok(None));
        assert_eq!(r.buf.capacity(), 0, "an emptied large buffer is freed");
    }
}
