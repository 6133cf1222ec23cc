//! A certificate's `notAfter`, read from its DER encoding (RFC 5280
//! section 4.1: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
//! [0] version OPTIONAL, serialNumber, signature, issuer, validity
//! SEQUENCE { notBefore, notAfter }, ... } ... }`), for the expiry metric.
//! Only what that needs: a walk over tag-length-value headers, bounded by
//! the certificate's length, and the two time forms.

/// One DER element at the start of `der`: (tag, contents, rest).
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Seconds since the Unix epoch of the leaf certificate's `notAfter`.
pub(super) fn not_after(cert: &[u8]) -> Option<i64> {
    let (0x30, certificate, _) = element(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = element(certificate)? else {
        return None;
    };
    // [0] EXPLICIT version, when present.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        tbs = element(tbs)?.2;
    }
    let (0x30, validity, _) = element(tbs)? else {
        return None;
    };
    let (_, _, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    parse_time(tag, time)
}

/// UTCTime (`YYMMDDHHMMSSZ`, 0x17) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`, 0x18), as RFC 5280 section 4.1.2.5 restricts them.
fn parse_time(tag: u8, s: &[u8]) -> Option<i64> {
    let digits = |b: &[u8]| -> Option<i64> {
        b.iter().try_fold(0i64, |a, &c| {
            c.is_ascii_digit().then(|| a * 10 + (c - b'0') as i64)
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (0x17, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (h, m, sec) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_time_forms_read_as_unix_seconds() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20380119031408Z"), Some(2_147_483_648));
        assert_eq!(parse_time(0x18, b"20000229120000Z"), Some(951_825_600));
        assert_eq!(parse_time(0x17, b"701301000000Z"), None, "month 13");
        assert_eq!(parse_time(0x17, b"7001010000000"), None, "no Z");
        assert_eq!(parse_time(0x18, b"700101000000Z"), None, "short");
    }

    #[test]
    fn truncated_or_hostile_der_reads_as_none() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x80]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x02]), None);
    }
}
