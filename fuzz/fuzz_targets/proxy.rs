//! Arbitrary bytes as a connection's first bytes on a `--proxy-protocol`
//! listener: `proto::proxy::parse`, whole and at every cut.
//!
//! Input: the bytes. Invariants:
//! - no panic, and a header taken is never longer than `MAX_HEADER`;
//! - a verdict does not depend on how the bytes arrive: every prefix of
//!   a header asks for more (`Ok(None)`), and the header alone gives the
//!   same source and length as the header followed by anything;
//! - a refusal stays a refusal however many bytes follow (a header cannot
//!   be repaired by sending more);
//! - a v1 header is at most 107 bytes.
#![no_main]

use corecast::proto::proxy::{MAX_HEADER, MAX_V1, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(2 * MAX_HEADER)];
    match parse(data) {
        Ok(Some((source, n))) => {
            assert!(n <= MAX_HEADER && n <= data.len());
            if data[0] == b'P' {
                assert!(n <= MAX_V1, "v1 header of {n} bytes");
            }
            assert_eq!(parse(&data[..n]), Ok(Some((source, n))));
            for cut in 0..n {
                assert_eq!(parse(&data[..cut]), Ok(None), "cut {cut} of {n}");
            }
        }
        Ok(None) => {
            assert!(
                data.len() < MAX_HEADER,
                "{} bytes still undecided",
                data.len()
            );
            for cut in 0..data.len() {
                assert_eq!(parse(&data[..cut]), Ok(None), "cut {cut}");
            }
        }
        Err(e) => {
            // Every longer input with this prefix is refused alike: check
            // the first prefix that is refused is refused for the same reason.
            let first = (0..=data.len())
                .find(|&k| parse(&data[..k]).is_err())
                .unwrap();
            assert_eq!(parse(&data[..first]), Err(e));
            for k in first..=data.len() {
                assert_eq!(parse(&data[..k]), Err(e), "prefix {k}");
            }
        }
    }
});
