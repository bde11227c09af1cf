//! The `Range` request header: exactly one byte range, parsed strictly.
//!
//! Hand-written rather than taken from `headers::Range` or `http-range-header`: those accept
//! range lists (`bytes=0-1,2-3`) and spaces inside the spec, and answer without saying which rule
//! broke, where spegel must refuse everything but one range (a peer or upstream answers one
//! `Content-Range`), name the reason in the OCI `RANGE_INVALID` error, and stay bounded on hostile
//! input (overflow is checked, nothing is allocated).
use std::ops::RangeInclusive;

use http::HeaderValue;

use super::ParseError;

/// A `Range` header as the client sent it; resolved against the object's size by whoever knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-end` (end inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// The inclusive byte range this selects in an object of `size` bytes, or `None` when it
    /// cannot be satisfied (RFC 9110 §14.1.2).
    pub fn resolve(self, size: u64) -> Option<RangeInclusive<u64>> {
        match self {
            ByteRange::From { start, end } => {
                if start >= size {
                    return None;
                }
                let last = end.map_or(size - 1, |end| end.min(size - 1));
                (last >= start).then_some(start..=last)
            }
            ByteRange::Suffix(0) => None,
            ByteRange::Suffix(n) => (size > 0).then(|| size.saturating_sub(n)..=size - 1),
        }
    }

    /// The `Range` header value asking for this range.
    pub fn header_value(self) -> HeaderValue {
        let text = match self {
            ByteRange::From { start, end: None } => format!("bytes={start}-"),
            ByteRange::From {
                start,
                end: Some(end),
            } => format!("bytes={start}-{end}"),
            ByteRange::Suffix(n) => format!("bytes=-{n}"),
        };
        // Digits, `bytes=` and `-` only: always a valid header value.
        HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("bytes=0-"))
    }
}

/// Parse a `Range` header value: exactly one byte range, `bytes=a-b`, `bytes=a-` or `bytes=-n`.
/// The unit is case-insensitive (RFC 9110 §14.1); whitespace only around the whole value.
pub fn parse_range(value: &[u8]) -> Result<ByteRange, ParseError> {
    let value = value.trim_ascii();
    let Some((unit, spec)) = split_once_byte(value, b'=') else {
        return Err(ParseError::Range("expected bytes=<range>"));
    };
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return Err(ParseError::Range("only the bytes unit is supported"));
    }
    if spec.contains(&b',') {
        return Err(ParseError::Range("multiple ranges are not supported"));
    }
    let Some((first, last)) = split_once_byte(spec, b'-') else {
        return Err(ParseError::Range("expected <first>-<last>"));
    };
    match (first.is_empty(), last.is_empty()) {
        (true, true) => Err(ParseError::Range("empty range")),
        (true, false) => Ok(ByteRange::Suffix(parse_u64(last)?)),
        (false, true) => Ok(ByteRange::From {
            start: parse_u64(first)?,
            end: None,
        }),
        (false, false) => {
            let (start, end) = (parse_u64(first)?, parse_u64(last)?);
            if end < start {
                return Err(ParseError::Range("last byte before first byte"));
            }
            Ok(ByteRange::From {
                start,
                end: Some(end),
            })
        }
    }
}

/// Decimal digits only (no sign, no whitespace), checked for overflow.
fn parse_u64(digits: &[u8]) -> Result<u64, ParseError> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Range("positions must be decimal numbers"));
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(d - b'0')))
            .ok_or(ParseError::Range("position out of range"))
    })
}

fn split_once_byte(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_range(value: &[u8], expected: Option<ByteRange>) {
        let got = parse_range(value);
        match expected {
            Some(range) => assert_eq!(got, Ok(range), "{:?}", String::from_utf8_lossy(value)),
            None => assert!(
                matches!(got, Err(ParseError::Range(_))),
                "{:?} must be rejected, got {got:?}",
                String::from_utf8_lossy(value)
            ),
        }
    }

    #[test]
    fn ranges() {
        let from = |start, end| Some(ByteRange::From { start, end });
        check_range(b"bytes=0-99", from(0, Some(99)));
        check_range(b"bytes=5-5", from(5, Some(5)));
        check_range(b"bytes=100-", from(100, None));
        check_range(b"bytes=-10", Some(ByteRange::Suffix(10)));
        check_range(b"bytes=-0", Some(ByteRange::Suffix(0)));
        check_range(b"Bytes=1-2", from(1, Some(2)));
        check_range(b"  bytes=1-2 ", from(1, Some(2)));
        check_range(b"bytes=18446744073709551615-", from(u64::MAX, None));

        for bad in [
            &b""[..],
            b"bytes",
            b"bytes=",
            b"bytes=-",
            b"bytes=0-1,2-3",
            b"bytes=0-1, 2-3",
            b"bytes=,0-1",
            b"items=0-1",
            b"bytes =0-1",
            b"bytes= 0-1",
            b"bytes=0 -1",
            b"bytes=+1-2",
            b"bytes=1-+2",
            b"bytes=--1",
            b"bytes=1-2-3",
            b"bytes=a-b",
            b"bytes=0x10-",
            b"bytes=5-4",
            b"bytes=18446744073709551616-",
            b"bytes=-99999999999999999999999",
            b"bytes=1\xff-2",
            b"\xff\xfe",
        ] {
            check_range(bad, None);
        }
        check_range(format!("bytes={}-", "9".repeat(10_000)).as_bytes(), None);
    }

    #[test]
    fn range_header_values() {
        assert_eq!(ByteRange::Suffix(3).header_value(), "bytes=-3");
        let from = ByteRange::From {
            start: 7,
            end: None,
        };
        assert_eq!(from.header_value(), "bytes=7-");
        let span = ByteRange::From {
            start: 7,
            end: Some(9),
        };
        assert_eq!(span.header_value(), "bytes=7-9");
    }
}
