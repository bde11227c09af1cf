//! Peer blobs on their way to this node's containerd: streamed as they arrive when that is safe
//! and worth it, else received and verified whole before containerd gets its first byte.
//!
//! Every peer body holds the chunk that completes the blob back until the digest checks, so
//! containerd never gets a complete, wrong blob. The bytes before it are unverified, though, and
//! containerd *resumes* a cut blob after the bytes it already holds (at once, within the pull:
//! containerd 1.6 reconnects with a `Range`), so bytes from a corrupt peer fail that pull on the
//! digest. So:
//!
//! - a whole blob of at least `--peer-stream-min` bytes for this node's containerd streams as
//!   it arrives, and if it ends unverified containerd's partial copy is thrown away through its
//!   content API (see [`super::discard`]): a corrupt peer costs that pull attempt, the next one
//!   starts over. That is what keeps a blob from a peer next door as fast as from a registry
//!   next door (receiving it whole first adds its whole transfer time to every pull);
//! - smaller blobs, blobs for other nodes, and everything when the daemon cannot reach
//!   containerd's content API, are read whole first:
//!   - up to `--peer-buffer-max` bytes, into memory, out of `--peer-buffer-budget`;
//!   - larger ones, or when the memory budget is spent, into a file under `--peer-spool-dir`,
//!     out of `--peer-spool-budget` (see [`super::spool`]);
//!   - only when neither budget can take it (or both are off) does it stream unguarded with the
//!     tail held back; that is logged.
//!
//!   A failure while reading becomes `Unavailable` with nothing sent, and the next source (the
//!   upstream, or in mirror mode containerd's own fallback after our 404) serves the request: a
//!   corrupt peer costs no pull attempt.
//!
//! **Ranges** are served from the verified whole: a part cannot be checked against the digest of
//! the whole, and containerd asks for a range mostly to resume a blob whose first bytes it has
//! kept (containerd 1.6/1.7 after a failed transfer) — exactly the case where a bad byte fails
//! the pull. Fetching the whole blob from a peer on the local network costs less than a failed
//! pull; when neither budget can take it, the range is passed through unverified as before.
//!
//! Each buffer or spool file keeps its budget share until the response body is finished or
//! dropped: bytes a slow client has not taken yet still count. The peer transfer itself (and its
//! `--peer-concurrency` slot) ends when the last byte has arrived, before the client reads.
use std::{ops::Range, path::Path, path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures::Stream;

use super::{
    budget::{Budget, Share},
    discard::discard_unverified,
    spool::{Spool, SpoolError},
    verify::{BodyCheck, ReadError, read_whole},
};
use crate::{
    oci::Kind,
    source::{Body, Object, ObjectRequest, Payload, Source, SourceError},
    store::Ingests,
};

/// Flags of peer blob streaming, and of verify-before-send buffering and spooling.
#[derive(Debug, Clone, clap::Args)]
pub struct BufferArgs {
    /// Whole blobs from peers at least this big go to containerd as they arrive, the last
    /// chunk held back until the digest checks; one that fails has containerd's partial copy
    /// thrown away, so a corrupt peer costs that pull attempt. Smaller ones (and ranges) are
    /// verified whole before the first byte is sent. Above any blob size (e.g.
    /// 1099511627776): every peer blob is verified first.
    #[arg(long, env = "SPEGEL_PEER_STREAM_MIN", default_value_t = 1 << 20)]
    pub peer_stream_min: u64,
    /// Whole blobs from peers up to this many bytes are received into memory and verified
    /// before the first byte is sent; larger ones go to the disk spool (0: none in memory).
    #[arg(long, env = "SPEGEL_PEER_BUFFER_MAX", default_value_t = 64 << 20)]
    pub peer_buffer_max: u64,
    /// Memory all such buffers may take together, held until their responses are sent; beyond
    /// it, blobs go to the disk spool.
    #[arg(long, env = "SPEGEL_PEER_BUFFER_BUDGET", default_value_t = 256 << 20)]
    pub peer_buffer_budget: u64,
    /// Where peer blobs too big for memory are received and verified before the first byte is
    /// sent. Default: `spool` in the data directory. Leftover spool files are removed at start.
    #[arg(long, env = "SPEGEL_PEER_SPOOL_DIR")]
    pub peer_spool_dir: Option<PathBuf>,
    /// Disk space all spool files may take together, held until their responses are sent;
    /// beyond it, peer blobs stream with only their tail held back (0 turns the spool off).
    #[arg(long, env = "SPEGEL_PEER_SPOOL_BUDGET", default_value_t = 20 << 30)]
    pub peer_spool_budget: u64,
    /// Disk space (in the spool directory) the copies of shared upstream fetches may take
    /// together: concurrent GETs of one blob, and peers, read one fetch's copy. Beyond it, or
    /// at 0, each GET fetches on its own.
    #[arg(long, env = "SPEGEL_SHARED_FETCH_BUDGET", default_value_t = 20 << 30)]
    pub shared_fetch_budget: u64,
}

impl BufferArgs {
    /// The spool directory: `--peer-spool-dir`, or `spool` in `data_dir`.
    pub fn spool_dir(&self, data_dir: &Path) -> PathBuf {
        self.peer_spool_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("spool"))
    }
}

/// Streams big whole peer blobs to this node's containerd (with [`Buffered::with_ingests`]);
/// reads the others whole, into memory or the spool, before handing them on.
pub struct Buffered {
    inner: Arc<dyn Source>,
    /// Where containerd's partial copies are discarded; without it nothing streams.
    ingests: Option<Arc<dyn Ingests>>,
    stream_min: u64,
    max: u64,
    memory: Budget,
    spool: Option<Spool>,
}

/// Where a blob is received before it is sent.
enum Plan {
    Memory(Share),
    Disk(Share),
    Stream,
}

/// Bytes per chunk of a body served from memory, so the connection takes it piece by piece.
const CHUNK: usize = 256 << 10;

impl Buffered {
    /// Verify-before-send in front of `inner`; opens the spool (in `data_dir` unless
    /// `--peer-spool-dir` says otherwise) and removes what a previous run left in it.
    pub fn new(
        inner: Arc<dyn Source>,
        args: &BufferArgs,
        data_dir: &Path,
    ) -> std::io::Result<Self> {
        let spool = match args.peer_spool_budget {
            0 => None,
            budget => Some(Spool::open(&args.spool_dir(data_dir), budget)?),
        };
        Ok(Self {
            inner,
            ingests: None,
            stream_min: args.peer_stream_min,
            max: args.peer_buffer_max,
            memory: Budget::new(args.peer_buffer_budget),
            spool,
        })
    }

    /// Streams whole blobs of at least `--peer-stream-min` bytes to this node's containerd,
    /// discarding its partial copy through `ingests` when one ends unverified.
    pub fn with_ingests(mut self, ingests: Arc<dyn Ingests>) -> Self {
        self.ingests = Some(ingests);
        self
    }

    /// Where a whole blob for this request may stream to the client with its partial copy
    /// discarded on failure: a whole blob for this node's containerd.
    fn discards_for(&self, request: &ObjectRequest) -> Option<&Arc<dyn Ingests>> {
        self.ingests
            .as_ref()
            .filter(|_| request.range.is_none() && !request.mirrored)
    }

    fn plan(&self, object: &Object) -> Plan {
        if object.size <= self.max
            && let Some(share) = self.memory.try_take(object.size)
        {
            return Plan::Memory(share);
        }
        let Some(spool) = &self.spool else {
            tracing::debug!(digest = %object.digest, size = object.size, "peer blob not buffered (no memory budget, spool off); streaming");
            return Plan::Stream;
        };
        match spool.reserve(object.size) {
            Some(share) => Plan::Disk(share),
            None => {
                tracing::info!(digest = %object.digest, size = object.size, available = spool.available(), "spool budget spent; streaming the peer blob with only its tail held back");
                Plan::Stream
            }
        }
    }

    /// The memory budget left, for tests.
    #[cfg(test)]
    fn memory_available(&self) -> u64 {
        self.memory.available()
    }
}

#[async_trait::async_trait]
impl Source for Buffered {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        if request.kind != Kind::Blob || request.head {
            return self.inner.fetch(request).await;
        }
        let discards = self.discards_for(request);
        if discards.is_none() && self.max == 0 && self.spool.is_none() {
            return self.inner.fetch(request).await;
        }
        let mut whole = request.clone();
        whole.range = None;
        whole.headers.remove(http::header::RANGE);
        let mut object = self.inner.fetch(&whole).await?;
        if object.range.is_some() {
            return Err(SourceError::Unavailable(format!(
                "a peer answered a whole-blob request for {} with a range",
                object.digest
            )));
        }
        let size = object.size;
        if let Some(ingests) = discards
            && size >= self.stream_min
        {
            if let Some(body) = object.body.take() {
                tracing::debug!(digest = %object.digest, size, "streaming a peer blob to containerd as it arrives");
                object.body = Payload::Stream(streamed(body, object.digest, size, Some(ingests)));
            }
            return Ok(object);
        }
        let wanted = match request.range {
            None => 0..size,
            Some(range) => match range.resolve(size) {
                Some(r) => *r.start()..*r.end() + 1,
                // As a peer that refused the range: the next source answers it.
                None => {
                    tracing::debug!(digest = %object.digest, size, ?range, "range not satisfiable by the peer's blob");
                    return Err(SourceError::NotFound);
                }
            },
        };
        let plan = self.plan(&object);
        let Some(body) = object.body.take() else {
            return Ok(object);
        };
        let digest = object.digest;
        // The peer body checks the digest of a whole blob itself (tail held back); reading it
        // through a length check makes the whole answer known before the first byte is sent.
        let check = BodyCheck::part(size);
        let body = match plan {
            Plan::Memory(share) => {
                let bytes = read_whole(body, check)
                    .await
                    .map_err(|err| unavailable(digest, err))?;
                hold(chunked(bytes.slice(as_usize(&wanted))), share)
            }
            Plan::Disk(share) => {
                let Some(spool) = &self.spool else {
                    return Err(SourceError::Unavailable("no spool".into()));
                };
                let spooled = spool.fill(body, check, share).await.map_err(|err| match err {
                    SpoolError::Read(err) => unavailable(digest, err),
                    SpoolError::Disk(err) => {
                        tracing::warn!(%digest, %err, "cannot spool a peer blob; trying the next source");
                        SourceError::Unavailable(format!("cannot spool {digest}: {err}"))
                    }
                })?;
                tracing::debug!(%digest, size, "peer blob spooled and verified");
                spooled.into_body(wanted.clone())
            }
            Plan::Stream => {
                if request.range.is_none() {
                    object.body = Payload::Stream(streamed(body, digest, size, discards));
                    return Ok(object);
                }
                // Not the whole blob: ask for just the range (passed through unverified).
                drop(body);
                return self.inner.fetch(request).await;
            }
        };
        object.range = request
            .range
            .map(|_| wanted.start..=wanted.end.saturating_sub(1));
        object.body = Payload::Stream(body);
        Ok(object)
    }
}

/// A whole peer blob passed on as it arrives: for this node's containerd (`discards`), through
/// [`discard_unverified`], so an unverified end throws away containerd's partial copy.
fn streamed(
    body: Body,
    digest: crate::oci::digest::Digest,
    size: u64,
    discards: Option<&Arc<dyn Ingests>>,
) -> Body {
    match discards {
        Some(ingests) => discard_unverified(body, digest, size, Arc::clone(ingests)),
        None => body,
    }
}

fn unavailable(digest: crate::oci::digest::Digest, err: ReadError) -> SourceError {
    match err {
        ReadError::Io(err) => {
            tracing::warn!(%digest, %err, "peer blob failed before anything was sent; trying the next source");
            SourceError::Unavailable(format!("peer transfer of {digest} failed: {err}"))
        }
        ReadError::Verify(err) => SourceError::Unavailable(format!("peer {err} for {digest}")),
    }
}

/// `range` of a buffer that is in memory, so fits `usize`.
fn as_usize(range: &Range<u64>) -> Range<usize> {
    let end = usize::try_from(range.end).unwrap_or(usize::MAX);
    usize::try_from(range.start).unwrap_or(end).min(end)..end
}

/// `bytes` as a body of [`CHUNK`]-sized pieces.
fn chunked(bytes: Bytes) -> Body {
    let pieces: Vec<std::io::Result<Bytes>> = (0..bytes.len())
        .step_by(CHUNK)
        .map(|at| Ok(bytes.slice(at..(at + CHUNK).min(bytes.len()))))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

/// `body` with `share` kept until the body ends or is dropped.
fn hold(body: Body, share: Share) -> Body {
    Box::pin(Holding {
        body,
        share: Some(share),
    })
}

struct Holding {
    body: Body,
    share: Option<Share>,
}

impl Stream for Holding {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.body.as_mut().poll_next(cx));
        if item.is_none() {
            self.share = None;
        }
        std::task::Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests;
