//! The one seam every content source implements: the local containerd store, peers found in the
//! DHT, and the upstream registry. The registry API asks a source for an object; a [`Chain`]
//! tries sources in order.

pub mod local;
pub mod miss;
use std::{io, net::SocketAddr, ops::RangeInclusive, pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::Stream;
use http::HeaderMap;

use crate::oci::{ByteRange, Kind, Reference, digest::Digest};

/// Where a transparently intercepted request was originally going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The address containerd dialled.
    pub addr: SocketAddr,
    /// The host name containerd asked for (SNI or `Host`), or the IP when it used an IP literal.
    pub host: String,
    /// Whether the original connection was TLS.
    pub tls: bool,
}

/// One request for an object, as the registry API parsed it.
#[derive(Debug, Clone)]
pub struct ObjectRequest {
    pub kind: Kind,
    /// The image's registry (`docker.io`, `10.1.2.3:5000`): from `?ns=` in mirror mode, from the
    /// intercepted connection in transparent mode. `None` when the client did not say.
    pub registry: Option<String>,
    /// The repository, e.g. `library/nginx`.
    pub repository: String,
    pub reference: Reference,
    pub range: Option<ByteRange>,
    /// HEAD: headers only; sources may skip opening the body.
    pub head: bool,
    /// Headers of the client's request a source may forward (`Authorization`, `Accept`, …).
    pub headers: HeaderMap,
    /// Set for transparently intercepted requests.
    pub origin: Option<Origin>,
    /// Set when the request came from another spegel node: it must never be forwarded again.
    pub mirrored: bool,
    /// Set when only content known to be public may answer (upstream could not confirm the
    /// client may read it: `serve::access`). Travels to peers as `x-spegel-public-only`.
    pub public_only: bool,
}

/// A body: bytes as they arrive. An `Err` item aborts the response (the client sees a truncated
/// transfer and must not commit it).
pub type Body = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An object a source can serve.
pub struct Object {
    pub digest: Digest,
    pub media_type: String,
    /// The size of the whole object.
    pub size: u64,
    /// The bytes `body` holds when the request had a satisfiable range.
    pub range: Option<RangeInclusive<u64>>,
    /// Empty for HEAD.
    pub body: Payload,
    /// Which source served it, for logs and metrics: `local`, `peer`, `upstream`.
    pub source: &'static str,
}

/// An object's bytes: a stream, or a region of a file that a server able to `sendfile(2)`
/// takes as it is and any other reader reads as a stream.
///
/// There is one field for both on purpose: a wrapper that rewrites, paces or tees the bytes
/// [`Payload::take`]s them (a file turns into a stream of its reads) and puts back a `Stream`,
/// so rewritten bytes can never leave by `sendfile` from the original file. A wrapper that only
/// counts them uses [`Payload::observe`], which keeps a file a file.
#[derive(Default)]
pub enum Payload {
    /// No body (HEAD, or an object with nothing to send).
    #[default]
    Empty,
    Stream(Body),
    File(FileBody),
}

impl Payload {
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Empty)
    }

    /// The bytes as a stream, leaving `Empty` behind.
    pub fn take(&mut self) -> Option<Body> {
        std::mem::take(self).into_body()
    }

    /// The bytes as a stream.
    pub fn into_body(self) -> Option<Body> {
        match self {
            Self::Empty => None,
            Self::Stream(body) => Some(body),
            Self::File(file) => Some(file.into_stream()),
        }
    }

    /// Calls `observer` with the length of every piece of the body sent, however it is sent.
    pub fn observe(&mut self, observer: impl Fn(u64) + Send + Sync + 'static) {
        match std::mem::take(self) {
            Self::Empty => {}
            Self::Stream(body) => *self = Self::Stream(observed(body, observer)),
            Self::File(mut file) => {
                file.observers.push(Box::new(observer));
                *self = Self::File(file);
            }
        }
    }
}

impl From<Option<Body>> for Payload {
    fn from(body: Option<Body>) -> Self {
        body.map_or(Self::Empty, Self::Stream)
    }
}

/// `body`, calling `observer` with the length of each chunk as it passes.
fn observed(body: Body, observer: impl Fn(u64) + Send + Sync + 'static) -> Body {
    use futures::StreamExt as _;
    Box::pin(body.inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            observer(chunk.len() as u64);
        }
    }))
}

/// A store's reader as a body, [`READ_BUFFER`] at a time.
pub fn reader_body(reader: crate::store::Reader) -> Body {
    Box::pin(tokio_util::io::ReaderStream::with_capacity(
        reader,
        READ_BUFFER,
    ))
}

/// How much one read of a local object hands to the HTTP layer. Each read is a trip through tokio's
/// blocking pool: at 64 KiB those trips capped a TLS peer transfer at about 0.9× nginx; at
/// 256 KiB it runs at 1.6× (`cargo xtask bench micro --micro serving`), for at most 256 KiB
/// held per response in flight.
const READ_BUFFER: usize = 256 * 1024;

/// [`Payload::File`]: the region, and who wants to know how much of it was sent.
pub struct FileBody {
    pub region: crate::store::FileRegion,
    observers: Vec<Box<dyn Fn(u64) + Send + Sync>>,
}

impl FileBody {
    pub fn new(region: crate::store::FileRegion) -> Self {
        Self {
            region,
            observers: Vec::new(),
        }
    }

    /// Report `bytes` of the region sent to the client.
    pub fn sent(&self, bytes: u64) {
        for observer in &self.observers {
            observer(bytes);
        }
    }

    /// The region read as a stream (on the file's own descriptor), observed as it is read.
    pub fn into_stream(self) -> Body {
        let Self { region, observers } = self;
        let body: Body = match region.into_reader() {
            Ok(reader) => reader_body(reader),
            Err(err) => Box::pin(futures::stream::once(std::future::ready(Err(err)))),
        };
        if observers.is_empty() {
            return body;
        }
        observed(body, move |len| {
            for observer in &observers {
                observer(len);
            }
        })
    }
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBody")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl ObjectRequest {
    /// The bytes its `Range` asks for in an object of `size` bytes (`None`: the whole object),
    /// or `RangeNotSatisfiable`.
    pub fn resolve_range(&self, size: u64) -> Result<Option<RangeInclusive<u64>>, SourceError> {
        self.range
            .map(|range| {
                range
                    .resolve(size)
                    .ok_or(SourceError::RangeNotSatisfiable { size })
            })
            .transpose()
    }
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("digest", &self.digest)
            .field("media_type", &self.media_type)
            .field("size", &self.size)
            .field("range", &self.range)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Why a source could not serve an object.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// This source does not have it; the next one may.
    #[error("not found")]
    NotFound,
    /// The object exists but the range cannot be satisfied.
    #[error("range not satisfiable for an object of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// The request is malformed in a way only the source could tell (e.g. a manifest asked for as a blob).
    #[error("{0}")]
    Invalid(String),
    /// An upstream answered with a status the client should see as is (401 with its challenge, 429…).
    #[error("upstream answered {status}")]
    Upstream {
        status: http::StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// The source failed (I/O, timeout, bad peer); the next source may still succeed.
    #[error("{0}")]
    Unavailable(String),
}

/// Something that can serve objects.
#[async_trait::async_trait]
pub trait Source: Send + Sync + 'static {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError>;
}

/// Tries sources in order. `NotFound` and `Unavailable` move on to the next source; any other
/// error is the answer. When every source misses, the last `Unavailable` (if any) is reported,
/// else `NotFound`.
#[derive(Clone, Default)]
pub struct Chain {
    sources: Vec<Arc<dyn Source>>,
}

impl Chain {
    pub fn new(sources: Vec<Arc<dyn Source>>) -> Self {
        Self { sources }
    }
}

#[async_trait::async_trait]
impl Source for Chain {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let mut last = SourceError::NotFound;
        for source in &self.sources {
            match source.fetch(request).await {
                Ok(object) => return Ok(object),
                Err(err @ SourceError::Unavailable(_)) => last = err,
                Err(SourceError::NotFound) => {}
                Err(other) => return Err(other),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve() {
        let from = |start, end| ByteRange::From { start, end };
        assert_eq!(from(0, None).resolve(10), Some(0..=9));
        assert_eq!(from(2, Some(4)).resolve(10), Some(2..=4));
        assert_eq!(from(2, Some(400)).resolve(10), Some(2..=9));
        assert_eq!(from(10, None).resolve(10), None);
        assert_eq!(from(5, Some(4)).resolve(10), None);
        assert_eq!(from(0, None).resolve(0), None);
        assert_eq!(ByteRange::Suffix(3).resolve(10), Some(7..=9));
        assert_eq!(ByteRange::Suffix(30).resolve(10), Some(0..=9));
        assert_eq!(ByteRange::Suffix(0).resolve(10), None);
        assert_eq!(ByteRange::Suffix(3).resolve(0), None);
    }

    /// A payload of bytes 2..8 of a file holding `0123456789`, and a counter its observer adds to.
    fn file_payload() -> (Payload, Arc<std::sync::atomic::AtomicU64>) {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"0123456789").unwrap();
        let region = crate::store::FileRegion {
            file,
            offset: 2,
            len: 6,
        };
        let mut payload = Payload::File(FileBody::new(region));
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        payload.observe(move |n| {
            counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        });
        (payload, seen)
    }

    #[test]
    fn observing_a_file_keeps_it_a_file() {
        let (payload, seen) = file_payload();
        let Payload::File(file) = payload else {
            panic!("an observed file must stay a file");
        };
        file.sent(6);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn a_taken_file_is_read_as_a_stream_and_still_observed() {
        use futures::TryStreamExt as _;
        let (mut payload, seen) = file_payload();
        let body = payload.take().unwrap();
        assert!(
            payload.is_empty(),
            "taking the bytes must leave no file behind"
        );
        let chunks: Vec<Bytes> = body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"234567");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 6);
    }
}
