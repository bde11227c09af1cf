//! Fetching content from other nodes: DHT lookup, hedged requests, sha256 verification while
//! streaming, resume after mid-stream failures, and quarantine of peers that serve bad bytes.
//!
//! Spegel relays peer bytes unchecked and lets containerd find corruption (weakness 1), gives a
//! blob to one peer at a time (7) and keeps trying stale providers of dead nodes (8). Here:
//!
//! - Every byte from a peer is hashed. Manifests (≤ 4 MiB) are read whole and verified before
//!   anything is returned, so a bad peer costs a retry, not a failed pull. Blobs stream through,
//!   but the chunk that completes the object is only released once the digest checks; on a
//!   mismatch the body ends with an error (the client never gets a complete, wrong object) and
//!   the peer is quarantined, so containerd's retry goes elsewhere. In the daemon,
//!   `body::buffered` streams big whole blobs for this node's containerd this way (discarding
//!   containerd's partial copy when one fails) and reads the others whole (memory or disk
//!   spool) before the client gets a byte; what is said here is what this source does alone.
//! - Ranged blob requests that do not cover the whole object are passed through **unverified**
//!   here: a part cannot be checked against the digest of the whole. `body::buffered` asks this
//!   source for the whole blob instead and cuts the range from the verified copy; only when its
//!   budgets are spent does a range reach peers. A range that covers the whole object
//!   (`bytes=0-`) is verified like a plain GET.
//! - A request's `--peer-concurrency` slot is held while its answer is read from the peer: a
//!   blob body gives it back with its last byte (a streamed body is read at the client's pace;
//!   a buffered or spooled one at the peer's).
//! - Tag references resolve only through peers that hand over the manifest itself; its bytes
//!   must hash to the digest the peer claims. That proves the peer holds that manifest, not that
//!   upstream still maps the tag to it: hence `--tag-filter` (default `:latest$`) and
//!   `--resolve-tags=false`.
//! - A mid-stream failure continues the *same* response with a `Range` request to another peer
//!   (same hasher), then to the fallback source (upstream in transparent mode). A peer that
//!   trickles below `--peer-min-rate` is replaced the same way, but only when something else can
//!   take over (slow beats failed). Dead peers are skipped for a while, so stale DHT records
//!   cost one failed dial, not one per request.
pub(crate) mod wire;

mod attempt;
mod blob;
mod book;
pub mod burst;
mod claim;
mod config;
mod connector;
mod latency;
mod manifest;
mod metrics;
mod race;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Empty;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use tokio::{sync::Semaphore, time::Instant, time::timeout};

use self::{
    attempt::AttemptError, blob::BlobStream, book::PeerBook, connector::PeerConnector,
    latency::LatencyEstimator, metrics::bump, race::RaceError,
};
pub use self::{
    config::{FetchArgs, FetchConfig, FetchConfigError},
    metrics::{FetchMetrics, FetchMetricsSnapshot, FetchTimings},
};
use crate::{
    membership::{PeerAuth, PlaintextAuth},
    oci::{ByteRange, Kind, Reference, digest::Digest},
    routing::Router,
    source::{
        Body, Object, ObjectRequest, Payload, Source, SourceError,
        miss::{self, PeerMiss},
    },
};

/// How long an idle connection to a peer stays in the pool.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// What a request is looked up and asked for as.
struct Target {
    /// The routing key: the digest, or `registry/repository:tag`.
    key: String,
    /// The reference in the peer URI.
    reference: String,
    /// Known up front for digest references; tags learn it from the peer.
    digest: Option<Digest>,
}

/// Serves objects from other nodes. See the module docs for the policy.
#[derive(Clone)]
pub struct PeerSource {
    inner: Arc<Inner>,
}

struct Inner {
    router: Arc<dyn Router>,
    client: Client<PeerConnector, Empty<Bytes>>,
    /// Signs requests and checks answers in authenticated-plaintext mode.
    plaintext: Option<PlaintextAuth>,
    config: FetchConfig,
    latency: LatencyEstimator,
    peers: Arc<PeerBook>,
    permits: Arc<Semaphore>,
    metrics: Arc<FetchMetrics>,
    /// Where a blob body continues when no peer can resume it (upstream in transparent mode).
    fallback: Option<Arc<dyn Source>>,
}

impl PeerSource {
    /// A source that asks the peers `router` finds. `fallback` is used only to resume blob bodies
    /// that peers started but could not finish; never for whole objects (put it after this
    /// source in the [`crate::source::Chain`] for that). Peers are asked with `auth`.
    pub fn new(
        router: Arc<dyn Router>,
        config: FetchConfig,
        fallback: Option<Arc<dyn Source>>,
        auth: PeerAuth,
    ) -> Self {
        let (tls, plaintext) = match auth {
            PeerAuth::Open => (None, None),
            PeerAuth::Tls(tls) => (Some(tls), None),
            PeerAuth::Plaintext(plaintext) => (None, Some(plaintext)),
        };
        let connector = PeerConnector::new(config.connect_timeout, tls);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                router,
                client,
                plaintext,
                latency: LatencyEstimator::new(config.hedge_initial),
                peers: Arc::new(PeerBook::default()),
                permits: Arc::new(Semaphore::new(config.max_concurrent)),
                metrics: Arc::new(FetchMetrics::default()),
                fallback,
                config,
            }),
        }
    }

    /// The counters, to export.
    pub fn metrics(&self) -> Arc<FetchMetrics> {
        Arc::clone(&self.inner.metrics)
    }

    /// Whether the peer with this libp2p id is being skipped (quarantined or backing off).
    pub fn is_banned(&self, peer_id: &str) -> bool {
        self.inner.peers.is_banned(peer_id, Instant::now())
    }

    /// `--peer-concurrency` slots not taken, for tests.
    #[cfg(test)]
    fn free_slots(&self) -> usize {
        self.inner.permits.available_permits()
    }
}

#[async_trait::async_trait]
impl Source for PeerSource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let inner = &self.inner;
        if request.mirrored {
            // Loop guard: another node already asked us because it does not have it; asking
            // further peers would let requests bounce around the cluster.
            bump(&inner.metrics.mirrored_refused, 1);
            miss::note(PeerMiss::NotForPeers);
            return Err(SourceError::NotFound);
        }
        let Some(target) = inner.target(request) else {
            miss::note(PeerMiss::NotForPeers);
            return Err(SourceError::NotFound);
        };
        bump(&inner.metrics.lookups, 1);
        let started = Instant::now();
        let mut result = match (request.kind, request.head) {
            (Kind::Manifest, _) => inner.fetch_manifest(request, &target).await,
            (Kind::Blob, true) => inner.head_blob(request, &target).await,
            (Kind::Blob, false) => inner.get_blob(request, &target).await,
        };
        match &mut result {
            Ok(object) => {
                bump(&inner.metrics.hits, 1);
                if !request.head {
                    metrics::time(&inner.metrics, request.kind, started, object);
                }
                tracing::debug!(key = %target.key, size = object.size, "peer hit");
            }
            Err(SourceError::NotFound) => {
                bump(&inner.metrics.misses, 1);
                tracing::debug!(key = %target.key, "peer miss");
            }
            Err(err) => tracing::debug!(key = %target.key, %err, "peer fetch failed"),
        }
        result
    }
}

impl Inner {
    /// What to look up for `request`, or `None` when it must not go to peers at all.
    fn target(&self, request: &ObjectRequest) -> Option<Target> {
        match &request.reference {
            Reference::Digest(digest) => Some(Target {
                key: digest.to_string(),
                reference: digest.to_string(),
                digest: Some(*digest),
            }),
            Reference::Tag(tag) => {
                if request.kind != Kind::Manifest || !self.config.resolve_tags {
                    return None;
                }
                // Tag keys name the registry; without one the tag is ambiguous.
                let registry = request.registry.as_deref()?;
                let key = format!("{registry}/{}:{tag}", request.repository);
                if self.config.tag_filters.iter().any(|re| re.is_match(&key)) {
                    tracing::debug!(%key, "tag filtered: left to upstream");
                    return None;
                }
                Some(Target {
                    key,
                    reference: tag.clone(),
                    digest: None,
                })
            }
        }
    }

    /// HEAD of a blob: the peer's headers, checked for consistency (nothing to verify).
    async fn head_blob(
        &self,
        request: &ObjectRequest,
        target: &Target,
    ) -> Result<Object, SourceError> {
        let digest = target.digest.ok_or(SourceError::NotFound)?;
        let race = self.ask(request, target, Method::HEAD, None, |response| async move {
            if response.status != StatusCode::OK {
                return Err(AttemptError::Failed("partial answer to HEAD".into()));
            }
            Ok(response.span.total)
        });
        let (_, size) = match timeout(self.config.manifest_timeout, race).await {
            Ok(result) => result.map_err(race_error)?,
            Err(_) => return Err(timed_out()),
        };
        let range = request.resolve_range(size)?;
        Ok(Object {
            digest,
            media_type: "application/octet-stream".into(),
            size,
            range,
            body: Payload::Empty,
            source: "peer",
        })
    }

    /// GET of a blob (or a range of it), streamed with verification and resume.
    async fn get_blob(
        self: &Arc<Self>,
        request: &ObjectRequest,
        target: &Target,
    ) -> Result<Object, SourceError> {
        let digest = target.digest.ok_or(SourceError::NotFound)?;
        let race = self.ask(
            request,
            target,
            Method::GET,
            request.range,
            |response| async move {
                let span = response.span;
                let want = wanted(request.range, span.total).ok_or_else(|| {
                    AttemptError::Failed(format!("range not satisfiable for {} bytes", span.total))
                })?;
                if span.start > want.start || span.end() < want.end {
                    return Err(AttemptError::Failed(format!(
                        "peer sent bytes {}..{} of {}, not {}..{}",
                        span.start,
                        span.end(),
                        span.total,
                        want.start,
                        want.end
                    )));
                }
                if span.total == 0 && digest != Digest::of(b"") {
                    return Err(AttemptError::Corrupt(digest));
                }
                Ok((response, want))
            },
        );
        let (peer, (response, want)) = race.await.map_err(race_error)?;
        let total = response.span.total;
        let range = request
            .range
            .is_some()
            .then(|| want.start..=want.end.saturating_sub(1));
        tracing::debug!(peer = %peer.id, %digest, total, ?range, "streaming blob from peer");
        let body = BlobStream::start(
            Arc::clone(self),
            request.clone(),
            target.key.clone(),
            digest,
            peer,
            response,
            want,
        );
        Ok(Object {
            digest,
            media_type: "application/octet-stream".into(),
            size: total,
            range,
            body: Payload::Stream(body),
            source: "peer",
        })
    }
}

/// The half-open byte range of an object of `total` bytes that a request wants.
fn wanted(range: Option<ByteRange>, total: u64) -> Option<std::ops::Range<u64>> {
    match range {
        None => Some(0..total),
        Some(range) => range.resolve(total).map(|r| *r.start()..*r.end() + 1),
    }
}

/// The answer a failed race gives; why it failed is noted for the serve policy.
fn race_error(err: RaceError) -> SourceError {
    match err {
        RaceError::Miss { kind, .. } => {
            miss::note(kind);
            SourceError::NotFound
        }
        RaceError::Router(err) => {
            miss::note(PeerMiss::LookupFailed);
            SourceError::Unavailable(format!("peer lookup failed: {err}"))
        }
    }
}

/// The miss of a race cut short by the request's own timeout.
fn timed_out() -> SourceError {
    miss::note(PeerMiss::PeersTimeout);
    SourceError::NotFound
}

fn once_body(bytes: Bytes) -> Body {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}
