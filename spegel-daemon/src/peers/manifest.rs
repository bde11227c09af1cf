//! Manifests from peers, by digest or tag: read whole and verified before anything is returned.
use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, header};
use tokio::time::timeout;

use super::{
    Inner, Target, attempt::AttemptError, attempt::PeerResponse, attempt::ReadFailure, bump,
    once_body, race_error, timed_out,
};
use crate::{
    body::{BodyCheck, VerifyError},
    oci::digest::Digest,
    source::{Object, ObjectRequest, SourceError},
};

/// The largest manifest accepted from a peer (as Spegel's `ManifestMaxSize`).
pub(super) const MANIFEST_MAX_SIZE: u64 = 4 << 20;

/// A verified manifest.
struct Manifest {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

impl Inner {
    /// Manifests, by digest or tag, GET or HEAD: always fetched whole and verified before
    /// anything is returned. HEAD gets the same treatment: it is what containerd resolves tags
    /// with, and the answer must be backed by a manifest the peer really holds.
    pub(super) async fn fetch_manifest(
        &self,
        request: &ObjectRequest,
        target: &Target,
    ) -> Result<Object, SourceError> {
        let race = self.ask(
            request,
            target,
            Method::GET,
            None,
            |mut response| async move {
                if response.status != StatusCode::OK {
                    return Err(AttemptError::Failed(
                        "partial answer to a full request".into(),
                    ));
                }
                let digest = match target.digest {
                    Some(digest) => digest,
                    None => crate::oci::content_digest(&response.headers).ok_or_else(|| {
                        AttemptError::Failed("tag answer without a digest".into())
                    })?,
                };
                let media_type = response
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| AttemptError::Failed("manifest without a Content-Type".into()))?
                    .to_owned();
                if response.span.total > MANIFEST_MAX_SIZE {
                    return Err(AttemptError::Failed(format!(
                        "manifest of {} bytes is over the {MANIFEST_MAX_SIZE}-byte limit",
                        response.span.total
                    )));
                }
                let bytes = self.read_manifest(&mut response, digest).await?;
                Ok(Manifest {
                    digest,
                    media_type,
                    bytes,
                })
            },
        );
        let (peer, manifest) = match timeout(self.config.manifest_timeout, race).await {
            Ok(result) => result.map_err(race_error)?,
            Err(_) => return Err(timed_out()),
        };
        tracing::debug!(peer = %peer.id, digest = %manifest.digest, "manifest verified from peer");
        let size = manifest.bytes.len() as u64;
        let (range, bytes) = match request.range {
            None => (None, manifest.bytes),
            Some(range) => {
                let resolved = range
                    .resolve(size)
                    .ok_or(SourceError::RangeNotSatisfiable { size })?;
                let slice = manifest
                    .bytes
                    .slice(*resolved.start() as usize..=*resolved.end() as usize);
                (Some(resolved), slice)
            }
        };
        let body = (!request.head).then(|| once_body(bytes));
        Ok(Object {
            digest: manifest.digest,
            media_type: manifest.media_type,
            size,
            range,
            body: body.into(),
            source: "peer",
        })
    }

    /// Read a manifest answer whole, checked against its announced length (within the manifest
    /// cap) and `digest`.
    async fn read_manifest(
        &self,
        response: &mut PeerResponse,
        digest: Digest,
    ) -> Result<Bytes, AttemptError> {
        let len = response.span.total;
        let mut check = BodyCheck::whole(digest, len);
        let mut buf = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        loop {
            let data = match response.data(self.config.stall_timeout).await {
                Err(ReadFailure::Stalled) => {
                    return Err(AttemptError::Failed("peer stalled".into()));
                }
                Err(ReadFailure::Broken(e)) => {
                    return Err(AttemptError::Unreachable(e.to_string()));
                }
                Ok(None) => break,
                Ok(Some(data)) => data,
            };
            bump(&self.metrics.bytes, data.len() as u64);
            if let Some(bytes) = check.push(data).map_err(manifest_error)? {
                buf.extend_from_slice(&bytes);
            }
        }
        if let Some(tail) = check.finish().map_err(manifest_error)? {
            buf.extend_from_slice(&tail);
        }
        Ok(buf.freeze())
    }
}

/// A manifest of the wrong length is a bad answer; one that does not hash right is corrupt.
fn manifest_error(err: VerifyError) -> AttemptError {
    match err {
        VerifyError::Mismatch { digest } => AttemptError::Corrupt(digest),
        VerifyError::TooLong { .. } => AttemptError::Failed("body longer than announced".into()),
        VerifyError::TooShort { .. } => AttemptError::Failed("body shorter than announced".into()),
    }
}
