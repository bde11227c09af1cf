//! Header names of the pull API and the typed readers of the response headers every client side
//! (peers, upstream) checks: `Content-Length`, `Content-Range` and `Docker-Content-Digest`.
use std::ops::RangeInclusive;

use http::{HeaderMap, HeaderName, header};

use super::digest::Digest;

/// Set by spegel nodes on requests to their peers: the receiver must never forward them again.
pub const MIRRORED_HEADER: HeaderName = HeaderName::from_static("x-spegel-mirrored");
/// Set by a node asking peers for content only if it is public (`serve::access`): upstream
/// could not confirm that the pulling client may read it.
pub const PUBLIC_ONLY_HEADER: HeaderName = HeaderName::from_static("x-spegel-public-only");
/// The API version header of the distribution spec's `/v2/` check.
pub const API_VERSION_HEADER: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");
/// The digest of the object a response carries.
pub const CONTENT_DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

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
    use http::HeaderValue;

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
}
