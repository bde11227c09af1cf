//! Errors of the pull API: why a request is not a valid pull ([`ParseError`], each with its
//! status and OCI code), and the OCI error body spegel answers with.
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::digest::DigestError;

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
