//! The OCI distribution pull API's vocabulary: strict parsers for paths, names, tags, `Range` and
//! `?ns=`, the OCI error body, and media types.
//!
//! Every parser here takes untrusted bytes straight from the wire. They are hand-written state
//! machines over bytes: they never decode percent-escapes in paths (a `%` is simply invalid there,
//! which rules out `%2e%2e` traversal), never allocate proportionally to hostile input before
//! checking its length, and never panic.

pub mod digest;
mod object;

use bytes::Bytes;
use http::{HeaderName, StatusCode};
pub use object::{
    ByteRange, Kind, Reference, content_digest, content_length, content_range,
    unsatisfied_range_size,
};
use serde::{Deserialize, Serialize};

use crate::oci::digest::{Digest, DigestError};

/// The longest repository name accepted. The distribution spec says many clients cap
/// `registry/name` at 255 characters; the name alone can be no longer than that.
pub const MAX_NAME_LEN: usize = 255;
/// The longest tag the distribution spec allows.
pub const MAX_TAG_LEN: usize = 128;
/// Longest path considered at all: name + `/manifests/` + the longest reference, with room to spare.
const MAX_PATH_LEN: usize = 1024;
/// Longest `?ns=` host accepted (a DNS name is at most 253 characters, plus `:65535`).
const MAX_HOST_LEN: usize = 253 + 6;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list, schema 2.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Bytes of unknown type, and every ranged blob response.
pub const OCTET_STREAM: &str = "application/octet-stream";
/// The four manifest media types a pull may ask for, in the order clients list them in `Accept`.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
];

/// Set by spegel nodes on requests to their peers: the receiver must never forward them again.
pub const MIRRORED_HEADER: HeaderName = HeaderName::from_static("x-spegel-mirrored");
/// The API version header of the distribution spec's `/v2/` check.
pub const API_VERSION_HEADER: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");
/// The digest of the object a response carries.
pub const CONTENT_DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

/// What we ask a registry for when the client named no manifest types: every manifest media type,
/// indexes first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Whether `media_type` (parameters and case ignored) is an OCI or Docker schema 2 manifest or
/// index: what may be served from `/manifests/` and must not be served from `/blobs/`.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or_default().trim();
    MANIFEST_MEDIA_TYPES
        .iter()
        .any(|known| known.eq_ignore_ascii_case(essence))
}

/// The path of one pull: `/v2/<repository>/<manifests|blobs>/<reference>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPath {
    pub repository: String,
    pub kind: Kind,
    pub reference: Reference,
}

/// Why a request is not a valid pull. Each variant knows its OCI error code and status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The path is not a manifest or blob path of the pull API (catalog, tags list, push, …).
    #[error("unsupported path")]
    Unsupported,
    /// The repository name breaks the distribution spec's grammar.
    #[error("invalid repository name: {0}")]
    Name(&'static str),
    /// The tag breaks `[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}`.
    #[error("invalid tag")]
    Tag,
    /// The reference looks like a digest but is not a valid one.
    #[error("invalid digest: {0}")]
    Digest(DigestError),
    /// Blobs are addressed by digest only.
    #[error("blobs must be referenced by digest")]
    BlobTag,
    /// The `Range` header is not a single valid byte range.
    #[error("invalid Range header: {0}")]
    Range(&'static str),
    /// The `ns` query parameter is not a `host[:port]`.
    #[error("invalid ns parameter: {0}")]
    Namespace(&'static str),
}

impl ParseError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ParseError::Unsupported | ParseError::Digest(DigestError::UnsupportedAlgorithm) => {
                StatusCode::NOT_FOUND
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The OCI error code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::Unsupported | ParseError::Digest(DigestError::UnsupportedAlgorithm) => {
                ErrorCode::Unsupported
            }
            ParseError::Name(_) | ParseError::Namespace(_) => ErrorCode::NameInvalid,
            ParseError::Tag => ErrorCode::TagInvalid,
            ParseError::Digest(_) | ParseError::BlobTag => ErrorCode::DigestInvalid,
            ParseError::Range(_) => ErrorCode::RangeInvalid,
        }
    }
}

/// Parse a request path as a pull. `path` is the full path (`/v2/library/nginx/manifests/1.27`),
/// without the query. Nothing is percent-decoded.
pub fn parse_object_path(path: &str) -> Result<ObjectPath, ParseError> {
    if path.len() > MAX_PATH_LEN {
        return Err(ParseError::Name("path too long"));
    }
    let rest = path.strip_prefix("/v2/").ok_or(ParseError::Unsupported)?;
    // The reference and the kind are the last two components; everything before is the name, so
    // a repository may itself contain a `blobs` or `manifests` component.
    let (rest, reference) = rest.rsplit_once('/').ok_or(ParseError::Unsupported)?;
    let (repository, kind) = rest.rsplit_once('/').ok_or(ParseError::Unsupported)?;
    let kind = match kind {
        "manifests" => Kind::Manifest,
        "blobs" => Kind::Blob,
        _ => return Err(ParseError::Unsupported),
    };
    validate_repository(repository)?;
    let reference = parse_reference(reference)?;
    if kind == Kind::Blob && matches!(reference, Reference::Tag(_)) {
        return Err(ParseError::BlobTag);
    }
    Ok(ObjectPath {
        repository: repository.to_owned(),
        kind,
        reference,
    })
}

/// Check a repository name against the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by `/`, at most [`MAX_NAME_LEN`] bytes.
pub fn validate_repository(name: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::Name("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ParseError::Name("longer than 255 characters"));
    }
    name.split('/').try_for_each(validate_component)
}

/// One path component of a repository name.
fn validate_component(component: &str) -> Result<(), ParseError> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() {
        return Err(ParseError::Name("empty path component"));
    }
    let mut i = 0;
    loop {
        // An alphanumeric run, at least one character long.
        let run_start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == run_start {
            return Err(ParseError::Name(
                "path components must start and end with [a-z0-9]",
            ));
        }
        let Some(&separator) = bytes.get(i) else {
            return Ok(());
        };
        // A separator: `.`, `_`, `__` or a run of `-`.
        let sep_start = i;
        match separator {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return Err(ParseError::Name("only [a-z0-9._-] are allowed")),
        }
        debug_assert!(i > sep_start);
        if i == bytes.len() {
            return Err(ParseError::Name(
                "path components must start and end with [a-z0-9]",
            ));
        }
    }
}

/// A reference: a digest if it contains `:` (tags cannot), else a tag.
pub fn parse_reference(reference: &str) -> Result<Reference, ParseError> {
    if reference.contains(':') {
        return reference
            .parse::<Digest>()
            .map(Reference::Digest)
            .map_err(ParseError::Digest);
    }
    validate_tag(reference)?;
    Ok(Reference::Tag(reference.to_owned()))
}

/// Check a tag against `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ParseError> {
    let bytes = tag.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && bytes.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(ParseError::Tag)
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

/// The registry named by the `ns` parameter of a query string, normalised by
/// [`parse_registry_host`]. `None` when absent; an error when invalid or given twice.
pub fn parse_ns_query(query: Option<&str>) -> Result<Option<String>, ParseError> {
    let mut found = None;
    for pair in query.unwrap_or_default().split('&') {
        let Some(value) = pair.strip_prefix("ns=") else {
            continue;
        };
        if found.is_some() {
            return Err(ParseError::Namespace("given more than once"));
        }
        let decoded = percent_decode(value)?;
        found = Some(parse_registry_host(&decoded)?);
    }
    Ok(found)
}

/// Decode `%XX` escapes (containerd sends `ns=10.0.0.1%3A5000`). The result must be ASCII;
/// anything else cannot be a host anyway.
fn percent_decode(value: &str) -> Result<String, ParseError> {
    if value.len() > MAX_HOST_LEN * 3 {
        return Err(ParseError::Namespace("too long"));
    }
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(ParseError::Namespace("truncated percent escape"))?;
            let mut decoded = [0u8; 1];
            hex::decode_to_slice(hex, &mut decoded)
                .map_err(|_| ParseError::Namespace("bad percent escape"))?;
            out.push(ascii_char(decoded[0])?);
            i += 3;
        } else {
            out.push(ascii_char(b)?);
            i += 1;
        }
    }
    Ok(out)
}

fn ascii_char(b: u8) -> Result<char, ParseError> {
    if b.is_ascii_graphic() {
        Ok(char::from(b))
    } else {
        Err(ParseError::Namespace("not a printable ASCII host"))
    }
}

/// Check and normalise a registry `host[:port]`: a DNS name or IPv4 address (lowercased), or a
/// bracketed IPv6 address, optionally followed by a port in 1..=65535.
pub fn parse_registry_host(host: &str) -> Result<String, ParseError> {
    if host.is_empty() {
        return Err(ParseError::Namespace("empty"));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(ParseError::Namespace("too long"));
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or(ParseError::Namespace("unclosed IPv6 bracket"))?;
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| ParseError::Namespace("bad IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or(ParseError::Namespace("junk after IPv6 address"))?,
            ),
        };
        (&host[..v6.len() + 2], port)
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if !name.starts_with('[') {
        validate_dns_name(name)?;
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(ParseError::Namespace("bad port"));
        }
    }
    Ok(host.to_ascii_lowercase())
}

/// DNS labels of `[A-Za-z0-9-]`, 1..=63 characters, not starting or ending with `-`.
fn validate_dns_name(name: &str) -> Result<(), ParseError> {
    if name.is_empty() || name.len() > 253 {
        return Err(ParseError::Namespace("bad host name length"));
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let valid = (1..=63).contains(&bytes.len())
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-');
        if !valid {
            return Err(ParseError::Namespace("bad host name"));
        }
    }
    Ok(())
}

/// An OCI error code (distribution spec "Error Codes", plus Docker's `UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    Unavailable,
}

/// One entry of an OCI error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The OCI error body: `{"errors":[{"code":…,"message":…,"detail":…}]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub errors: Vec<ErrorInfo>,
}

impl ErrorBody {
    /// A body holding one error.
    pub fn new(
        code: ErrorCode,
        message: impl Into<String>,
        detail: Option<serde_json::Value>,
    ) -> Self {
        Self {
            errors: vec![ErrorInfo {
                code,
                message: message.into(),
                detail,
            }],
        }
    }

    /// The JSON encoding.
    pub fn to_bytes(&self) -> Bytes {
        // Serialising plain structs of strings and a `Value` cannot fail; an empty body would
        // still be a valid error response if it ever did.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[track_caller]
    fn check_path(path: &str, expected: Result<(&str, Kind, &str), ParseError>) {
        let got = parse_object_path(path).map(|p| {
            let reference = match p.reference {
                Reference::Tag(tag) => tag,
                Reference::Digest(digest) => digest.to_string(),
            };
            (p.repository, p.kind, reference)
        });
        let expected = expected.map(|(r, k, s)| (r.to_owned(), k, s.to_owned()));
        assert_eq!(got, expected, "path {path:?}");
    }

    #[test]
    fn object_paths() {
        let digest = format!("sha256:{HEX}");
        let ok = |r, k, s| Ok((r, k, s));
        check_path(
            "/v2/library/nginx/manifests/1.27",
            ok("library/nginx", Kind::Manifest, "1.27"),
        );
        check_path(
            &format!("/v2/library/nginx/manifests/{digest}"),
            ok("library/nginx", Kind::Manifest, &digest),
        );
        check_path(
            &format!("/v2/a/blobs/{digest}"),
            ok("a", Kind::Blob, &digest),
        );
        // A repository may contain the words `blobs` and `manifests`.
        check_path(
            &format!("/v2/x/blobs/manifests/y/blobs/{digest}"),
            ok("x/blobs/manifests/y", Kind::Blob, &digest),
        );
        check_path(
            "/v2/a.b_c__d---e/f0/manifests/_Tag.-1",
            ok("a.b_c__d---e/f0", Kind::Manifest, "_Tag.-1"),
        );

        let unsupported = Err(ParseError::Unsupported);
        for path in [
            "/v2/",
            "/v2",
            "/v3/a/manifests/latest",
            "/v2/_catalog",
            "/v2/a/tags/list",
            "/v2/a/blobs/uploads/",
            "/v2/manifests/latest",
            "/v2/../../etc/passwd",
            "/v2/a/referrers/x",
            "v2/a/manifests/latest",
        ] {
            check_path(path, unsupported.clone());
        }
    }

    #[test]
    fn object_path_rejections() {
        let name = |path: &str| {
            assert!(
                matches!(parse_object_path(path), Err(ParseError::Name(_))),
                "{path:?} must be a name error"
            );
        };
        name("/v2/../manifests/latest");
        name("/v2/a/../b/manifests/latest");
        name("/v2/%2e%2e/manifests/latest");
        name("/v2/a/%2e%2e/manifests/latest");
        name("/v2//a/manifests/latest");
        name("/v2/a//b/manifests/latest");
        name("/v2/a//manifests/latest");
        name("/v2/Library/nginx/manifests/latest");
        name("/v2/a./manifests/latest");
        name("/v2/.a/manifests/latest");
        name("/v2/a..b/manifests/latest");
        name("/v2/a___b/manifests/latest");
        name("/v2/a._b/manifests/latest");
        name("/v2/a-/manifests/latest");
        name("/v2/a b/manifests/latest");
        name("/v2/naïve/manifests/latest");
        name(&format!("/v2/{}/manifests/latest", "a".repeat(256)));
        name(&format!("/v2/{}/manifests/latest", "a/".repeat(2000)));
        check_path(
            &format!("/v2/{}/manifests/x", "a".repeat(255)),
            Ok(("a".repeat(255).leak(), Kind::Manifest, "x")),
        );

        let tag = Err(ParseError::Tag);
        check_path("/v2/a/manifests/", tag.clone());
        check_path("/v2/a/manifests/.tag", tag.clone());
        check_path("/v2/a/manifests/-tag", tag.clone());
        check_path("/v2/a/manifests/ta%67", tag.clone());
        check_path("/v2/a/manifests/..", tag.clone());
        check_path(&format!("/v2/a/manifests/{}", "t".repeat(129)), tag.clone());
        check_path(
            &format!("/v2/a/manifests/{}", "t".repeat(128)),
            Ok(("a", Kind::Manifest, "t".repeat(128).leak())),
        );

        check_path("/v2/a/blobs/latest", Err(ParseError::BlobTag));
        check_path(
            "/v2/a/blobs/sha256:abc",
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        check_path(
            &format!("/v2/a/blobs/sha256:{}", HEX.to_uppercase()),
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        // The traversal is split on `/`: `etc` is not a kind, so it is not a pull at all.
        check_path(
            "/v2/a/blobs/sha256:../../../etc/passwd",
            Err(ParseError::Unsupported),
        );
        check_path(
            "/v2/a/blobs/sha256:..%2f..%2fetc",
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        check_path(
            &format!("/v2/a/manifests/sha512:{HEX}"),
            Err(ParseError::Digest(DigestError::UnsupportedAlgorithm)),
        );
    }

    #[test]
    fn parse_errors_map_to_oci_codes() {
        let cases = [
            (
                ParseError::Unsupported,
                StatusCode::NOT_FOUND,
                ErrorCode::Unsupported,
            ),
            (
                ParseError::Name("x"),
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
            ),
            (
                ParseError::Namespace("x"),
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
            ),
            (
                ParseError::Tag,
                StatusCode::BAD_REQUEST,
                ErrorCode::TagInvalid,
            ),
            (
                ParseError::Digest(DigestError::BadHex),
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
            ),
            (
                ParseError::Digest(DigestError::UnsupportedAlgorithm),
                StatusCode::NOT_FOUND,
                ErrorCode::Unsupported,
            ),
            (
                ParseError::BlobTag,
                StatusCode::BAD_REQUEST,
                ErrorCode::DigestInvalid,
            ),
            (
                ParseError::Range("x"),
                StatusCode::BAD_REQUEST,
                ErrorCode::RangeInvalid,
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!((err.status(), err.code()), (status, code), "{err:?}");
        }
    }

    #[test]
    fn repositories_and_tags() {
        assert!(validate_repository("a").is_ok());
        assert!(validate_repository("0/1/2").is_ok());
        assert!(validate_repository("a-b--c").is_ok());
        assert!(validate_repository("").is_err());
        assert!(validate_repository("/a").is_err());
        assert!(validate_repository("a/").is_err());
        assert!(validate_repository("a_").is_err());
        assert!(validate_repository("a__").is_err());
        assert!(validate_repository("a.-b").is_err());
        assert!(validate_repository("a-.b").is_err());
        assert!(validate_repository("a\0").is_err());
        assert!(validate_tag("latest").is_ok());
        assert!(validate_tag("_").is_ok());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag("a:b").is_err());
        assert!(validate_tag("a\u{e9}").is_err());
        assert_eq!(
            parse_reference("sha256:x"),
            Err(ParseError::Digest(DigestError::BadHex))
        );
        assert_eq!(
            parse_reference(":"),
            Err(ParseError::Digest(DigestError::UnsupportedAlgorithm))
        );
    }

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
    fn ns_parameter() {
        let ok = |q: &str, host: &str| {
            assert_eq!(parse_ns_query(Some(q)), Ok(Some(host.to_owned())), "{q:?}");
        };
        ok("ns=docker.io", "docker.io");
        ok("ns=Docker.IO", "docker.io");
        ok("ns=10.213.0.10%3A5000", "10.213.0.10:5000");
        ok("ns=10.213.0.10%3a5000", "10.213.0.10:5000");
        ok("ns=registry:5000", "registry:5000");
        ok("foo=bar&ns=ghcr.io&x", "ghcr.io");
        ok("ns=%5B%3A%3A1%5D%3A5000", "[::1]:5000");
        ok("ns=[fd00::1]", "[fd00::1]");
        assert_eq!(parse_ns_query(None), Ok(None));
        assert_eq!(parse_ns_query(Some("")), Ok(None));
        assert_eq!(parse_ns_query(Some("nsx=docker.io")), Ok(None));

        for bad in [
            "ns=",
            "ns=docker.io&ns=ghcr.io",
            "ns=docker.io/library",
            "ns=docker.io%2Flibrary",
            "ns=..",
            "ns=%2e%2e",
            "ns=a..b",
            "ns=-a.io",
            "ns=a-.io",
            "ns=a_b.io",
            "ns=host:",
            "ns=host:0",
            "ns=host:65536",
            "ns=host:+80",
            "ns=host:80:80",
            "ns=::1",
            "ns=[::1",
            "ns=[::1]x",
            "ns=[::g]",
            "ns=%",
            "ns=%4",
            "ns=%zz",
            "ns=%00",
            "ns=%FF",
            "ns=a+b",
            "ns=caf%C3%A9.io",
        ] {
            assert!(
                matches!(parse_ns_query(Some(bad)), Err(ParseError::Namespace(_))),
                "{bad:?} must be rejected"
            );
        }
        let long = format!("ns={}", "a".repeat(300));
        assert!(parse_ns_query(Some(&long)).is_err());
        let huge = format!("ns={}", "%41".repeat(100_000));
        assert!(parse_ns_query(Some(&huge)).is_err());
        let label = format!("ns={}.io", "a".repeat(64));
        assert!(parse_ns_query(Some(&label)).is_err());
    }

    #[test]
    fn media_types() {
        for mt in MANIFEST_MEDIA_TYPES {
            assert!(is_manifest_media_type(mt));
        }
        assert!(is_manifest_media_type(
            "Application/VND.oci.image.manifest.v1+json; charset=utf-8"
        ));
        for mt in [
            OCI_CONFIG,
            DOCKER_CONFIG,
            OCI_LAYER_GZIP,
            DOCKER_LAYER_GZIP,
            OCTET_STREAM,
            "",
        ] {
            assert!(!is_manifest_media_type(mt), "{mt}");
        }
        // Our constants agree with oci-spec's.
        use oci_spec::image::MediaType;
        assert_eq!(MediaType::ImageManifest.to_string(), OCI_MANIFEST);
        assert_eq!(MediaType::ImageIndex.to_string(), OCI_INDEX);
        assert_eq!(MediaType::ImageConfig.to_string(), OCI_CONFIG);
        assert_eq!(MediaType::ImageLayerGzip.to_string(), OCI_LAYER_GZIP);
    }

    #[test]
    fn error_bodies() {
        let body = ErrorBody::new(
            ErrorCode::BlobUnknown,
            "no such blob",
            Some(serde_json::json!({"attempts": 0})),
        );
        let json: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"errors":[{"code":"BLOB_UNKNOWN","message":"no such blob","detail":{"attempts":0}}]})
        );
        let no_detail = ErrorBody::new(ErrorCode::TooManyRequests, "", None).to_bytes();
        assert_eq!(
            &no_detail[..],
            br#"{"errors":[{"code":"TOOMANYREQUESTS","message":""}]}"#
        );
        for (code, text) in [
            (ErrorCode::RangeInvalid, "RANGE_INVALID"),
            (ErrorCode::TagInvalid, "TAG_INVALID"),
            (ErrorCode::NameInvalid, "NAME_INVALID"),
            (ErrorCode::ManifestUnknown, "MANIFEST_UNKNOWN"),
            (ErrorCode::DigestInvalid, "DIGEST_INVALID"),
            (ErrorCode::Unauthorized, "UNAUTHORIZED"),
            (ErrorCode::Unsupported, "UNSUPPORTED"),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), text);
        }
        // Round trip: what we send is what an OCI client parses.
        let back: ErrorBody = serde_json::from_slice(&body.to_bytes()).unwrap();
        assert_eq!(back, body);
    }
}
