//! One request to one peer: sending it, what its answer carries, and what a failure means for
//! that peer (a ban for a while, or quarantine for bad bytes).
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::{
    sync::OwnedSemaphorePermit,
    time::{Instant, timeout},
};

use super::{Inner, book::Active, bump, wire, wire::Span};
use crate::{
    membership::AUTH_HEADER,
    oci::{ByteRange, Reference, digest::Digest},
    routing::Peer,
    source::ObjectRequest,
};

/// Why one request to one peer did not produce a usable answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    /// 404: the peer does not have it (a stale record, or garbage-collected meanwhile).
    #[error("peer does not have it")]
    NotFound,
    /// Connecting failed, or the peer vanished mid-transfer.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The bytes did not hash to the digest.
    #[error("peer served content that does not match {0}")]
    Corrupt(Digest),
    /// Anything else: a bad status or bad headers.
    #[error("{0}")]
    Failed(String),
}

impl AttemptError {
    pub(super) fn summary(&self) -> &'static str {
        match self {
            AttemptError::NotFound => "peers did not have it",
            AttemptError::Unreachable(_) => "peers unreachable",
            AttemptError::Corrupt(_) => "peers served corrupt content",
            AttemptError::Failed(_) => "peers failed",
        }
    }
}

/// The headers of a peer's answer, and what keeps its slot taken while the body is read.
pub(super) struct PeerResponse {
    pub(super) status: StatusCode,
    pub(super) headers: http::HeaderMap,
    pub(super) span: Span,
    body: Incoming,
    _permit: OwnedSemaphorePermit,
    _active: Active,
}

/// Why the next bytes of a peer's answer did not come.
pub(super) enum ReadFailure {
    /// Nothing arrived within the stall timeout.
    Stalled,
    /// The connection failed.
    Broken(hyper::Error),
}

impl PeerResponse {
    /// The next data of the body (empty for a trailers frame), `None` at its end.
    pub(super) async fn data(&mut self, stall: Duration) -> Result<Option<Bytes>, ReadFailure> {
        match timeout(stall, self.body.frame()).await {
            Err(_) => Err(ReadFailure::Stalled),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(ReadFailure::Broken(e)),
            // Trailers carry no data: read on.
            Ok(Some(Ok(frame))) => Ok(Some(frame.into_data().unwrap_or_default())),
        }
    }
}

impl Inner {
    /// Record a failed attempt and ban the peer when the failure says it is gone or lying.
    pub(super) fn note_failure(&self, peer: &Peer, err: &AttemptError) {
        bump(&self.metrics.attempt_failures, 1);
        match err {
            AttemptError::Corrupt(digest) => {
                bump(&self.metrics.verify_failures, 1);
                self.quarantine(peer, *digest);
            }
            AttemptError::Unreachable(why) => {
                tracing::info!(peer = %peer.id, addr = %peer.addr, %why, backoff = ?self.config.backoff, "peer unreachable; skipping it for a while");
                self.peers
                    .ban(&peer.id, Instant::now() + self.config.backoff);
            }
            AttemptError::NotFound | AttemptError::Failed(_) => {
                tracing::debug!(peer = %peer.id, addr = %peer.addr, %err, "peer attempt failed");
            }
        }
    }

    /// Skip `peer` for the quarantine period: it served bytes that are not `digest`.
    pub(super) fn quarantine(&self, peer: &Peer, digest: Digest) {
        bump(&self.metrics.quarantines, 1);
        tracing::warn!(peer = %peer.id, addr = %peer.addr, %digest, period = ?self.config.quarantine, "peer served corrupt content; quarantined");
        self.peers
            .ban(&peer.id, Instant::now() + self.config.quarantine);
    }

    /// In an authenticated-plaintext cluster, signs `request` and returns the token its answer
    /// must be signed for; otherwise `None` (TLS or an open cluster).
    pub(super) fn sign<B>(&self, request: &mut Request<B>) -> Option<HeaderValue> {
        let auth = self.plaintext.as_ref()?;
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let token = auth.sign_request(request.method(), path, std::time::SystemTime::now());
        request.headers_mut().insert(AUTH_HEADER, token.clone());
        Some(token)
    }

    /// Whether `response` is the authentic answer to the request [`Inner::sign`] signed with
    /// `token` (always, when nothing was signed).
    pub(super) fn authentic<B>(&self, token: Option<&HeaderValue>, response: &Response<B>) -> bool {
        let (Some(auth), Some(token)) = (&self.plaintext, token) else {
            return true;
        };
        let headers = response.headers();
        auth.verify_response(
            token,
            response.status(),
            headers.get(crate::oci::CONTENT_DIGEST_HEADER),
            headers.get(AUTH_HEADER),
        )
    }

    /// Send one request to `peer` and wait for its headers. 2xx answers only, with the span of
    /// the object they carry.
    pub(super) async fn send(
        &self,
        peer: &Peer,
        method: Method,
        request: &ObjectRequest,
        reference: &str,
        range: Option<ByteRange>,
    ) -> Result<PeerResponse, AttemptError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| AttemptError::Failed("peer request limiter closed".into()))?;
        let active = self.peers.activate(&peer.id);
        let uri = wire::peer_uri(
            peer.addr,
            request.kind,
            &request.repository,
            reference,
            request.registry.as_deref(),
        )
        .map_err(AttemptError::Failed)?;
        let mut outgoing = wire::build_request(
            method,
            uri,
            request.kind,
            &request.headers,
            range,
            request.public_only,
        )
        .map_err(AttemptError::Failed)?;
        let token = self.sign(&mut outgoing);
        let started = Instant::now();
        let response = self.client.request(outgoing).await.map_err(|e| {
            if e.is_connect() {
                AttemptError::Unreachable(e.to_string())
            } else {
                AttemptError::Failed(format!("request failed: {e}"))
            }
        })?;
        let status = response.status();
        if !self.authentic(token.as_ref(), &response) {
            return Err(AttemptError::Failed(format!(
                "peer's answer ({status}) is not authenticated with our cluster secret"
            )));
        }
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::UNAUTHORIZED => {
                return Err(AttemptError::Failed(
                    "peer refused us (401): do both nodes hold the same cluster secret?".into(),
                ));
            }
            StatusCode::NOT_FOUND => return Err(AttemptError::NotFound),
            other => return Err(AttemptError::Failed(format!("peer answered {other}"))),
        }
        self.latency.record(started.elapsed());
        let (parts, body) = response.into_parts();
        let span = wire::span(status, &parts.headers).map_err(AttemptError::Failed)?;
        if let Some(digest) = request_digest(request) {
            check_digest_header(&parts.headers, digest)?;
        }
        Ok(PeerResponse {
            status,
            headers: parts.headers,
            span,
            body,
            _permit: permit,
            _active: active,
        })
    }
}

fn request_digest(request: &ObjectRequest) -> Option<Digest> {
    match request.reference {
        Reference::Digest(digest) => Some(digest),
        Reference::Tag(_) => None,
    }
}

/// A peer may omit `Docker-Content-Digest`, but must not name another digest than asked for.
fn check_digest_header(headers: &http::HeaderMap, digest: Digest) -> Result<(), AttemptError> {
    match headers.get(crate::oci::CONTENT_DIGEST_HEADER) {
        None => Ok(()),
        Some(value) => match value.to_str().ok().and_then(|v| v.parse::<Digest>().ok()) {
            Some(got) if got == digest => Ok(()),
            _ => Err(AttemptError::Failed(format!(
                "peer answered for {value:?}, not {digest}"
            ))),
        },
    }
}
