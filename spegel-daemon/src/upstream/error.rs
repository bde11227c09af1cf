//! Why talking to an upstream failed, and how each failure shows to a client.
use std::{io, path::PathBuf, time::Duration};

use http::StatusCode;

use crate::source::SourceError;

/// Why the upstream client failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An `--upstream-ca-file` could not be read.
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An `--upstream-ca-file` holds no usable certificate.
    #[error("CA file {path} holds no usable certificate")]
    NoCertificates { path: PathBuf },
    /// No response headers in time.
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    /// Connecting, the TLS handshake (including certificate verification) or the exchange failed.
    #[error("request to {target} failed: {detail}")]
    Request { target: String, detail: String },
    /// A redirect could not be followed.
    #[error("bad redirect from {target}: {reason}")]
    Redirect { target: String, reason: String },
    /// A redirect led to an address the redirect address policy refuses (the message says
    /// which and why).
    #[error("{0}")]
    RedirectRefused(String),
    /// The TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// The request cannot be expressed upstream (bad origin host, bad path).
    #[error("invalid upstream request: {0}")]
    InvalidRequest(String),
}

impl UpstreamError {
    /// The status a client should see for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

impl From<UpstreamError> for SourceError {
    fn from(err: UpstreamError) -> Self {
        match err {
            UpstreamError::InvalidRequest(msg) => SourceError::Invalid(msg),
            other => SourceError::Unavailable(other.to_string()),
        }
    }
}

/// An error and its sources, `: `-joined (hyper-util's own message is only "client error").
pub(super) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
