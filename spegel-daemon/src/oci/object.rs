//! What a pull names and the headers that describe a partial or digested answer: [`Kind`],
//! [`Reference`], [`ByteRange`], and the `Range`, `Content-Range`, `Content-Length` and
//! `Docker-Content-Digest` values every client side (peers, upstream) reads and writes.
use std::ops::RangeInclusive;

use http::{HeaderMap, HeaderValue, header};

use super::{CONTENT_DIGEST_HEADER, digest::Digest};

/// Manifest or blob: the two kinds of object the pull API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Manifest,
    Blob,
}

/// What the client named: a tag (manifests only) or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

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
}

impl ByteRange {
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

/// `Content-Length` as a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes <first>-<last>/<total>` with `first <= last < total` → (first..=last,
/// total).
pub fn content_range(headers: &HeaderMap) -> Option<(RangeInclusive<u64>, u64)> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, total): (u64, u64, u64) = (
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (first <= last && last < total).then_some((first..=last, total))
}

/// `Content-Range: bytes */<total>`, as a 416 carries it.
pub fn unsatisfied_range_size(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    value.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// `Docker-Content-Digest`, when present and well formed.
pub fn content_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(CONTENT_DIGEST_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_range(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_RANGE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn parses_content_ranges() {
        assert_eq!(
            content_range(&with_range("bytes 2-5/10")),
            Some((2..=5, 10))
        );
        assert_eq!(content_range(&with_range("bytes 2-5/*")), None);
        assert_eq!(content_range(&with_range("bytes 5-2/10")), None);
        assert_eq!(content_range(&with_range("bytes 2-10/10")), None);
        assert_eq!(unsatisfied_range_size(&with_range("bytes */10")), Some(10));
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
