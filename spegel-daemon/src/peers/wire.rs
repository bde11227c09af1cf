//! The HTTP shape of requests to peers: URIs, headers, and which bytes a peer's answer covers.
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use http_body_util::Empty;

use crate::oci::{
    ByteRange, Kind, MANIFEST_ACCEPT, MIRRORED_HEADER, PUBLIC_ONLY_HEADER, content_length,
    content_range,
};

/// `http://<peer>/v2/<repository>/<kind>/<reference>?ns=<registry>`.
///
/// The parts come from a parsed client request, but they are checked again here: they are pasted
/// into a URI, and a stray `?`, `#` or `%` would change what the peer is asked for.
pub(crate) fn peer_uri(
    addr: SocketAddr,
    kind: Kind,
    repository: &str,
    reference: &str,
    registry: Option<&str>,
) -> Result<Uri, String> {
    let path_ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
    };
    if !path_ok(repository, b"/")
        || repository
            .split('/')
            .any(|seg| seg.is_empty() || seg == "..")
    {
        return Err(format!(
            "repository `{repository}` cannot be sent to a peer"
        ));
    }
    if !path_ok(reference, b":") {
        return Err(format!("reference `{reference}` cannot be sent to a peer"));
    }
    let kind = match kind {
        Kind::Manifest => "manifests",
        Kind::Blob => "blobs",
    };
    let mut uri = format!("http://{addr}/v2/{repository}/{kind}/{reference}");
    if let Some(registry) = registry {
        if !path_ok(registry, b":[]") {
            return Err(format!("registry `{registry}` cannot be sent to a peer"));
        }
        uri.push_str("?ns=");
        uri.push_str(registry);
    }
    Uri::try_from(uri).map_err(|e| format!("bad peer URI: {e}"))
}

/// A request to a peer. Only `Accept` is forwarded from the client: `Authorization` is meant for
/// the upstream registry and must never leak to other nodes.
pub(crate) fn build_request(
    method: Method,
    uri: Uri,
    kind: Kind,
    client_headers: &HeaderMap,
    range: Option<ByteRange>,
    public_only: bool,
) -> Result<Request<Empty<Bytes>>, String> {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::USER_AGENT, "spegel")
        .header(MIRRORED_HEADER, "true");
    if public_only {
        builder = builder.header(PUBLIC_ONLY_HEADER, "true");
    }
    let mut accepts = client_headers.get_all(header::ACCEPT).iter().peekable();
    if accepts.peek().is_some() {
        for value in accepts {
            builder = builder.header(header::ACCEPT, value);
        }
    } else if kind == Kind::Manifest {
        for value in MANIFEST_ACCEPT.split(", ") {
            builder = builder.header(header::ACCEPT, value);
        }
    }
    if let Some(range) = range {
        builder = builder.header(header::RANGE, range.header_value());
    }
    builder
        .body(Empty::new())
        .map_err(|e| format!("cannot build peer request: {e}"))
}

/// Which bytes of an object a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// Offset of the first byte.
    pub(crate) start: u64,
    /// How many bytes.
    pub(crate) len: u64,
    /// Size of the whole object.
    pub(crate) total: u64,
}

impl Span {
    /// One past the last byte.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The span a 200 or 206 answer covers, from `Content-Length` / `Content-Range`.
pub(crate) fn span(status: StatusCode, headers: &HeaderMap) -> Result<Span, String> {
    match status {
        StatusCode::OK => {
            let total = content_length(headers).ok_or("200 without a Content-Length")?;
            Ok(Span {
                start: 0,
                len: total,
                total,
            })
        }
        StatusCode::PARTIAL_CONTENT => {
            let value = headers
                .get(header::CONTENT_RANGE)
                .ok_or("206 without a Content-Range")?;
            let (range, total) =
                content_range(headers).ok_or_else(|| format!("bad Content-Range {value:?}"))?;
            let (start, len) = (*range.start(), range.end() - range.start() + 1);
            if content_length(headers).is_some_and(|n| n != len) {
                return Err("Content-Length disagrees with Content-Range".into());
            }
            Ok(Span { start, len, total })
        }
        other => Err(format!("unexpected status {other}")),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn uris() {
        let addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let uri = peer_uri(
            addr,
            Kind::Blob,
            "library/nginx",
            "sha256:abc",
            Some("docker.io"),
        )
        .unwrap();
        assert_eq!(
            uri.to_string(),
            "http://10.0.0.1:5000/v2/library/nginx/blobs/sha256:abc?ns=docker.io"
        );
        let v6: SocketAddr = "[::1]:5000".parse().unwrap();
        let uri = peer_uri(v6, Kind::Manifest, "a/b", "1.0", Some("[fd00::1]:5000")).unwrap();
        assert_eq!(
            uri.to_string(),
            "http://[::1]:5000/v2/a/b/manifests/1.0?ns=[fd00::1]:5000"
        );
        assert!(peer_uri(addr, Kind::Blob, "a/../b", "x", None).is_err());
        assert!(peer_uri(addr, Kind::Blob, "a?b", "x", None).is_err());
        assert!(peer_uri(addr, Kind::Blob, "a", "x#y", None).is_err());
        assert!(peer_uri(addr, Kind::Blob, "a", "x", Some("r&ns=evil")).is_err());
        assert!(peer_uri(addr, Kind::Blob, "", "x", None).is_err());
    }

    #[test]
    fn spans() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert_eq!(
            span(StatusCode::OK, &h),
            Ok(Span {
                start: 0,
                len: 10,
                total: 10
            })
        );
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 2-11/100"),
        );
        let s = span(StatusCode::PARTIAL_CONTENT, &h).unwrap();
        assert_eq!((s.start, s.len, s.total, s.end()), (2, 10, 100, 12));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 2-12/100"),
        );
        assert!(span(StatusCode::PARTIAL_CONTENT, &h).is_err());
        h.remove(header::CONTENT_LENGTH);
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "bytes 0-1/*",
            "0-1/2",
        ] {
            h.insert(header::CONTENT_RANGE, HeaderValue::from_static(bad));
            assert!(span(StatusCode::PARTIAL_CONTENT, &h).is_err(), "{bad}");
        }
        assert!(span(StatusCode::OK, &HeaderMap::new()).is_err());
        assert!(span(StatusCode::NOT_FOUND, &h).is_err());
    }

    #[test]
    fn requests_forward_only_accept() {
        let mut client = HeaderMap::new();
        client.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        let uri = Uri::from_static("http://127.0.0.1:1/v2/a/manifests/t");
        let req = build_request(
            Method::GET,
            uri.clone(),
            Kind::Manifest,
            &client,
            None,
            false,
        )
        .unwrap();
        assert!(req.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(req.headers()[MIRRORED_HEADER], "true");
        assert!(!req.headers().contains_key(PUBLIC_ONLY_HEADER));
        assert_eq!(req.headers().get_all(header::ACCEPT).iter().count(), 4);
        client.append(header::ACCEPT, HeaderValue::from_static("a/b"));
        let range = ByteRange::From {
            start: 5,
            end: None,
        };
        let req = build_request(Method::GET, uri, Kind::Blob, &client, Some(range), true).unwrap();
        assert_eq!(req.headers()[header::ACCEPT], "a/b");
        assert_eq!(req.headers()[header::RANGE], "bytes=5-");
        assert_eq!(req.headers()[PUBLIC_ONLY_HEADER], "true");
    }
}
