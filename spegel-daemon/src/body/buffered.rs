//! Verify-before-send for blobs from peers.
//!
//! Peer blobs are streamed with their last chunk held back until the digest checks, and a
//! mismatch aborts the response. That keeps bad content out of containerd's store, but
//! containerd 1.6 *resumes* an aborted blob from the bytes it already has, so the bytes sent
//! before the mismatch was known would still fail that pull attempt (a kubelet retry then
//! succeeds). Whole-blob GETs up to `--peer-buffer-max` are therefore read completely — and so
//! verified — before the first byte goes out; a failure becomes `Unavailable`, and the next source
//! (the upstream, or in mirror mode containerd's own fallback after our 404) serves the request
//! with nothing bad sent. Larger blobs, ranges and HEADs pass through unchanged. Buffers come
//! out of a fixed memory budget; when it is spent, blobs stream instead of waiting.
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::verify::{BodyCheck, ReadError, read_whole};
use crate::{
    oci::Kind,
    source::{Object, ObjectRequest, Source, SourceError},
};

/// Flags of verify-before-send buffering.
#[derive(Debug, Clone, clap::Args)]
pub struct BufferArgs {
    /// Whole blobs from peers up to this many bytes are verified before the first byte is sent
    /// (0 turns this off: every peer blob streams with only its tail held back).
    #[arg(long, env = "SPEGEL_PEER_BUFFER_MAX", default_value_t = 64 << 20)]
    pub peer_buffer_max: u64,
    /// Memory all such buffers may take together; beyond it, blobs stream.
    #[arg(long, env = "SPEGEL_PEER_BUFFER_BUDGET", default_value_t = 256 << 20)]
    pub peer_buffer_budget: u64,
}

/// Budget accounting unit: one permit per 64 KiB.
const UNIT: u64 = 64 << 10;

/// Reads eligible peer blobs whole before handing them on.
pub struct Buffered {
    inner: Arc<dyn Source>,
    max: u64,
    budget: Arc<Semaphore>,
}

impl Buffered {
    pub fn new(inner: Arc<dyn Source>, args: &BufferArgs) -> Self {
        let permits = usize::try_from(args.peer_buffer_budget / UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            inner,
            max: args.peer_buffer_max,
            budget: Arc::new(Semaphore::new(permits)),
        }
    }
}

#[async_trait::async_trait]
impl Source for Buffered {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let eligible =
            request.kind == Kind::Blob && !request.head && request.range.is_none() && self.max > 0;
        let mut object = self.inner.fetch(request).await?;
        if !eligible || object.range.is_some() || object.size > self.max {
            return Ok(object);
        }
        let Ok(units) = u32::try_from(object.size.div_ceil(UNIT).max(1)) else {
            return Ok(object);
        };
        let Ok(permit) = Arc::clone(&self.budget).try_acquire_many_owned(units) else {
            tracing::debug!(digest = %object.digest, size = object.size, "buffer budget spent; streaming");
            return Ok(object);
        };
        let Some(body) = object.body.take() else {
            return Ok(object);
        };
        // The peer body checks the digest of a whole blob itself (tail held back); reading it
        // through a length check makes the whole answer known before the first byte is sent.
        let bytes = read_whole(body, BodyCheck::part(object.size))
            .await
            .map_err(|err| match err {
                ReadError::Io(err) => {
                    tracing::warn!(digest = %object.digest, %err, "peer blob failed before anything was sent; trying the next source");
                    SourceError::Unavailable(format!("peer transfer of {} failed: {err}", object.digest))
                }
                ReadError::Verify(err) => {
                    SourceError::Unavailable(format!("peer {err} for {}", object.digest))
                }
            })?;
        // The budget is returned once the client has taken the bytes.
        object.body = Some(Box::pin(futures::stream::once(async move {
            let _permit = permit;
            Ok(bytes)
        })));
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use bytes::Bytes;
    use futures::StreamExt as _;
    use http::HeaderMap;

    use super::*;
    use crate::oci::{ByteRange, Reference, digest::Digest};

    /// Serves `data` in 1 KiB chunks, failing before the last chunk when `fail`.
    struct Chunked {
        data: Bytes,
        fail: bool,
    }

    #[async_trait::async_trait]
    impl Source for Chunked {
        async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
            let mut chunks: Vec<io::Result<Bytes>> = self
                .data
                .chunks(1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            if self.fail {
                chunks.pop();
                chunks.push(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "digest mismatch",
                )));
            }
            Ok(Object {
                digest: Digest::of(&self.data),
                media_type: "application/octet-stream".into(),
                size: self.data.len() as u64,
                range: None,
                body: Some(Box::pin(futures::stream::iter(chunks))),
                source: "peer",
            })
        }
    }

    fn request(range: Option<ByteRange>) -> ObjectRequest {
        ObjectRequest {
            kind: Kind::Blob,
            registry: None,
            repository: "r".into(),
            reference: Reference::Digest(Digest::of(b"x")),
            range,
            head: false,
            headers: HeaderMap::new(),
            origin: None,
            mirrored: false,
        }
    }

    fn args(max: u64, budget: u64) -> BufferArgs {
        BufferArgs {
            peer_buffer_max: max,
            peer_buffer_budget: budget,
        }
    }

    async fn collect(object: Object) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut body = object.body.expect("body");
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_bad_blob_becomes_unavailable_before_any_byte_is_sent() {
        let data = Bytes::from(vec![3u8; 10_000]);
        let source = Buffered::new(
            Arc::new(Chunked { data, fail: true }),
            &args(1 << 20, 1 << 20),
        );
        assert!(matches!(
            source.fetch(&request(None)).await,
            Err(SourceError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_good_blob_arrives_whole_and_returns_its_budget() {
        let data = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let source = Buffered::new(
            Arc::new(Chunked {
                data: data.clone(),
                fail: false,
            }),
            &args(1 << 20, 1 << 20),
        );
        let before = source.budget.available_permits();
        let object = source.fetch(&request(None)).await.unwrap();
        assert!(
            source.budget.available_permits() < before,
            "buffer holds budget"
        );
        assert_eq!(collect(object).await.unwrap(), data);
        assert_eq!(source.budget.available_permits(), before, "budget returned");
    }

    #[tokio::test]
    async fn large_ranged_or_over_budget_blobs_stream() {
        let data = Bytes::from(vec![1u8; 200_000]);
        // Over the size limit: the failure reaches the body, as before.
        let big = Buffered::new(
            Arc::new(Chunked {
                data: data.clone(),
                fail: true,
            }),
            &args(100_000, 1 << 20),
        );
        assert!(
            collect(big.fetch(&request(None)).await.unwrap())
                .await
                .is_err()
        );
        // A range is never buffered.
        let ranged = Buffered::new(
            Arc::new(Chunked {
                data: data.clone(),
                fail: true,
            }),
            &args(1 << 20, 1 << 20),
        );
        let range = Some(ByteRange::From {
            start: 0,
            end: None,
        });
        assert!(
            collect(ranged.fetch(&request(range)).await.unwrap())
                .await
                .is_err()
        );
        // No budget left: stream rather than wait.
        let poor = Buffered::new(Arc::new(Chunked { data, fail: true }), &args(1 << 20, UNIT));
        assert!(
            collect(poor.fetch(&request(None)).await.unwrap())
                .await
                .is_err()
        );
    }
}
