//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! RFC 6455 §8.1 asks an endpoint to fail the connection (close 1007) as soon
//! as it sees invalid UTF-8, not only once the message is complete. The
//! validator therefore checks every chunk as it arrives and remembers at most
//! three bytes of a code point cut by a chunk boundary. A cut sequence that
//! can already never become valid (e.g. `F4 90`) fails at once: simdutf8's
//! `compat` API reports such prefixes with an error length, exactly like std.

use simdutf8::compat::from_utf8;

/// Streaming validator. 4 bytes of carry plus a length: cheap to keep per connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: u8,
}

/// The bytes seen so far can never be completed into valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Length of the sequence a lead byte starts (1..=4), or 0 for a byte that
/// cannot start a sequence.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next chunk of the message.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_len(self.carry[0]) - have;
            let take = need.min(chunk.len());
            self.carry[have..have + take].copy_from_slice(&chunk[..take]);
            let filled = have + take;
            match from_utf8(&self.carry[..filled]) {
                Ok(_) => {}
                // Still a valid prefix of a longer sequence: wait for more.
                Err(e) if e.error_len().is_none() => {}
                Err(_) => return Err(InvalidUtf8),
            }
            if take < need {
                self.carry_len = filled as u8;
                return Ok(());
            }
            self.carry_len = 0;
            chunk = &chunk[take..];
        }
        match from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(InvalidUtf8),
                None => {
                    // An incomplete but so far valid sequence at the very end
                    // (at most 3 bytes by construction of UTF-8).
                    let tail = &chunk[e.valid_up_to()..];
                    debug_assert!(tail.len() < 4);
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carry_len = tail.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Ends the message: valid only if no code point is left unfinished.
    /// Resets the validator for the next message.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let incomplete = self.carry_len != 0;
        *self = Self::default();
        if incomplete { Err(InvalidUtf8) } else { Ok(()) }
    }
}

/// Validates a complete payload in one pass (the fast path for unfragmented text).
#[inline]
pub fn validate(payload: &[u8]) -> Result<(), InvalidUtf8> {
    simdutf8::basic::from_utf8(payload)
        .map(|_| ())
        .map_err(|_| InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_split(bytes: &[u8], cuts: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &c in cuts {
            v.feed(&bytes[start..c])?;
            start = c;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn valid_text_split_everywhere() {
        let s = "κόσμε, hello, 𝄞 music, ẞ, 中文".as_bytes();
        for a in 0..=s.len() {
            for b in a..=s.len() {
                assert_eq!(feed_split(s, &[a, b]), Ok(()), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        // F4 90 would encode a code point above U+10FFFF: fail before the rest arrives.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[b'a', 0xf4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xf4, 0x90]), Err(InvalidUtf8));
        // Lone continuation byte, overlong encodings, surrogates.
        assert_eq!(Utf8Validator::new().feed(&[0x80]), Err(InvalidUtf8));
        assert_eq!(Utf8Validator::new().feed(&[0xc0, 0xaf]), Err(InvalidUtf8));
        assert_eq!(Utf8Validator::new().feed(&[0xed, 0xa0]), Err(InvalidUtf8));
        assert_eq!(Utf8Validator::new().feed(&[0xff]), Err(InvalidUtf8));
    }

    #[test]
    fn unfinished_code_point_fails_at_finish() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xe2, 0x82]), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // finish() resets: the next message starts clean.
        assert_eq!(v.feed(b"ok"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
    }

    proptest! {
        /// Streaming over any split agrees with validating the whole buffer.
        #[test]
        fn streaming_agrees_with_whole(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            text in ".{0,40}",
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
            use_text in any::<bool>(),
        ) {
            let data: Vec<u8> = if use_text { text.into_bytes() } else { bytes };
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            points.sort_unstable();
            let whole = std::str::from_utf8(&data).is_ok();
            prop_assert_eq!(feed_split(&data, &points).is_ok(), whole);
            prop_assert_eq!(validate(&data).is_ok(), whole);
        }
    }
}
