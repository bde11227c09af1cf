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
//!   the peer is quarantined, so containerd's retry goes elsewhere.
//! - Ranged blob requests that do not cover the whole object are passed through **unverified**:
//!   a part cannot be checked against the digest of the whole, and reading the whole object to
//!   serve a part would defeat containerd's parallel ranged fetches. containerd verifies the
//!   digest of the blob it assembles, and refuses to commit a bad one. A range that covers the
//!   whole object (`bytes=0-`) is verified like a plain GET.
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

mod blob;
mod book;
mod latency;
mod race;
#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use regex::Regex;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, timeout},
};

use self::{
    blob::BlobStream,
    book::{Active, PeerBook},
    latency::LatencyEstimator,
    race::RaceError,
    wire::Span,
};
use crate::{
    oci::ByteRange, oci::Kind, oci::Reference, oci::digest::Digest, routing::Peer, routing::Router,
    source::Body, source::Object, source::ObjectRequest, source::Source, source::SourceError,
};

/// The largest manifest accepted from a peer (as Spegel's `ManifestMaxSize`).
const MANIFEST_MAX_SIZE: u64 = 4 << 20;

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// How many peers to look up per object; also bounds how many are tried.
    #[arg(long, env = "SPEGEL_MIRROR_RESOLVE_RETRIES", default_value_t = 3)]
    pub mirror_resolve_retries: usize,
    /// With no request to a peer in flight, how long to wait for a peer to turn up before
    /// treating the object as a miss.
    #[arg(long, env = "SPEGEL_MIRROR_RESOLVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20ms")]
    pub mirror_resolve_timeout: Duration,
    /// Resolve tags through peers (`true`/`false`). Tags from peers are checked against the
    /// manifest the peer serves, but not against what upstream says the tag is now.
    #[arg(long, env = "SPEGEL_RESOLVE_TAGS", default_value_t = true, action = clap::ArgAction::Set)]
    pub resolve_tags: bool,
    /// Regular expressions over `registry/repository:tag`; matching tags always come from
    /// upstream. Comma-separated in the environment; an empty value clears the default.
    #[arg(
        long = "tag-filter",
        env = "SPEGEL_TAG_FILTERS",
        value_delimiter = ',',
        default_value = ":latest$"
    )]
    pub tag_filters: Vec<String>,
    /// Most requests to peers in progress at once, streaming bodies included.
    #[arg(long, env = "SPEGEL_PEER_CONCURRENCY", default_value_t = 128)]
    pub peer_concurrency: usize,
    /// How long a peer that served bytes not matching their digest is skipped.
    #[arg(long, env = "SPEGEL_PEER_QUARANTINE", value_parser = humantime::parse_duration, default_value = "60s")]
    pub peer_quarantine: Duration,
    /// How long a peer that could not be reached, or died mid-transfer, is skipped.
    #[arg(long, env = "SPEGEL_PEER_BACKOFF", value_parser = humantime::parse_duration, default_value = "10s")]
    pub peer_backoff: Duration,
    /// A transfer from a peer with no byte for this long is resumed elsewhere.
    #[arg(long, env = "SPEGEL_PEER_STALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub peer_stall_timeout: Duration,
    /// A peer delivering less than this many bytes per second (measured over the stall timeout,
    /// counting only time spent waiting for it) is replaced if another peer or the fallback can
    /// take over; 0 disables the check.
    #[arg(long, env = "SPEGEL_PEER_MIN_RATE", default_value_t = 512 * 1024)]
    pub peer_min_rate: u64,
    /// Cap on a whole manifest or HEAD request to peers.
    #[arg(long, env = "SPEGEL_PEER_MANIFEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub peer_manifest_timeout: Duration,
}

/// Why the fetch flags are unusable.
#[derive(Debug, thiserror::Error)]
pub enum FetchConfigError {
    #[error("invalid --tag-filter `{pattern}`: {source}")]
    TagFilter {
        pattern: String,
        source: regex::Error,
    },
    #[error("--{0} must be greater than zero")]
    Zero(&'static str),
}

/// Validated settings of [`PeerSource`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Peers asked of the router per lookup.
    pub lookup_count: usize,
    /// See [`FetchArgs::mirror_resolve_timeout`].
    pub resolve_timeout: Duration,
    pub resolve_tags: bool,
    /// Tag keys (`registry/repository:tag`) matching any of these are never asked of peers.
    pub tag_filters: Vec<Regex>,
    pub max_concurrent: usize,
    pub quarantine: Duration,
    pub backoff: Duration,
    pub stall_timeout: Duration,
    /// See [`FetchArgs::peer_min_rate`].
    pub min_rate: u64,
    /// Cap on a manifest fetch or a HEAD, all attempts and the body included.
    pub manifest_timeout: Duration,
    /// TCP connect timeout to a peer (races are bounded tighter; this bounds the socket).
    pub connect_timeout: Duration,
    /// The hedge delay before enough latency samples exist.
    pub hedge_initial: Duration,
    /// With attempts in flight, give up after max(2×p90, this).
    pub race_timeout_floor: Duration,
    /// Attempts per race, hedges included (each peer found is tried at most once per race, so
    /// `lookup_count` bounds this too).
    pub max_attempts: usize,
    /// Resumes per blob body (each may try several peers, then the fallback).
    pub max_resumes: usize,
    /// Cap on getting the headers of a resume from the fallback source.
    pub fallback_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            lookup_count: 3,
            resolve_timeout: Duration::from_millis(20),
            resolve_tags: true,
            tag_filters: vec![Regex::new(":latest$").unwrap_or_else(|_| unreachable!())],
            max_concurrent: 128,
            quarantine: Duration::from_secs(60),
            backoff: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            min_rate: 512 * 1024,
            manifest_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            hedge_initial: Duration::from_millis(50),
            race_timeout_floor: Duration::from_millis(100),
            max_attempts: 4,
            max_resumes: 3,
            fallback_timeout: Duration::from_secs(30),
        }
    }
}

impl TryFrom<&FetchArgs> for FetchConfig {
    type Error = FetchConfigError;

    fn try_from(args: &FetchArgs) -> Result<Self, Self::Error> {
        let positive = |d: Duration, flag| {
            if d.is_zero() {
                Err(FetchConfigError::Zero(flag))
            } else {
                Ok(d)
            }
        };
        if args.mirror_resolve_retries == 0 {
            return Err(FetchConfigError::Zero("mirror-resolve-retries"));
        }
        if args.peer_concurrency == 0 {
            return Err(FetchConfigError::Zero("peer-concurrency"));
        }
        let tag_filters = args
            .tag_filters
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                Regex::new(p).map_err(|source| FetchConfigError::TagFilter {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            lookup_count: args.mirror_resolve_retries,
            resolve_timeout: positive(args.mirror_resolve_timeout, "mirror-resolve-timeout")?,
            resolve_tags: args.resolve_tags,
            tag_filters,
            max_concurrent: args.peer_concurrency,
            quarantine: args.peer_quarantine,
            backoff: args.peer_backoff,
            stall_timeout: positive(args.peer_stall_timeout, "peer-stall-timeout")?,
            min_rate: args.peer_min_rate,
            manifest_timeout: positive(args.peer_manifest_timeout, "peer-manifest-timeout")?,
            ..Self::default()
        })
    }
}

/// Counters of peer fetching, for metrics export.
#[derive(Debug, Default)]
pub struct FetchMetrics {
    /// Objects asked of peers (after the loop guard and tag filters).
    pub lookups: AtomicU64,
    /// Objects a peer answered for.
    pub hits: AtomicU64,
    /// Objects no peer served in time.
    pub misses: AtomicU64,
    /// Requests refused because they came from another node (loop guard).
    pub mirrored_refused: AtomicU64,
    /// Requests sent to peers, hedges and resumes included.
    pub attempts: AtomicU64,
    /// Requests to peers that failed (404s included).
    pub attempt_failures: AtomicU64,
    /// Requests started because earlier ones were slower than the p90 estimate.
    pub hedges: AtomicU64,
    /// Peer candidates skipped because they were quarantined or backing off.
    pub banned_skipped: AtomicU64,
    /// Bytes received from peers.
    pub bytes: AtomicU64,
    /// Objects from peers whose bytes did not match their digest.
    pub verify_failures: AtomicU64,
    /// Peers quarantined for bad bytes.
    pub quarantines: AtomicU64,
    /// Blob bodies continued after a mid-stream failure (from a peer or the fallback).
    pub resumes: AtomicU64,
    /// Resumes the fallback source took over.
    pub resume_fallbacks: AtomicU64,
}

/// A point-in-time copy of [`FetchMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchMetricsSnapshot {
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    pub mirrored_refused: u64,
    pub attempts: u64,
    pub attempt_failures: u64,
    pub hedges: u64,
    pub banned_skipped: u64,
    pub bytes: u64,
    pub verify_failures: u64,
    pub quarantines: u64,
    pub resumes: u64,
    pub resume_fallbacks: u64,
}

impl FetchMetrics {
    /// Current values.
    pub fn snapshot(&self) -> FetchMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FetchMetricsSnapshot {
            lookups: get(&self.lookups),
            hits: get(&self.hits),
            misses: get(&self.misses),
            mirrored_refused: get(&self.mirrored_refused),
            attempts: get(&self.attempts),
            attempt_failures: get(&self.attempt_failures),
            hedges: get(&self.hedges),
            banned_skipped: get(&self.banned_skipped),
            bytes: get(&self.bytes),
            verify_failures: get(&self.verify_failures),
            quarantines: get(&self.quarantines),
            resumes: get(&self.resumes),
            resume_fallbacks: get(&self.resume_fallbacks),
        }
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Why one request to one peer did not produce a usable answer.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
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
    fn summary(&self) -> &'static str {
        match self {
            AttemptError::NotFound => "peers did not have it",
            AttemptError::Unreachable(_) => "peers unreachable",
            AttemptError::Corrupt(_) => "peers served corrupt content",
            AttemptError::Failed(_) => "peers failed",
        }
    }
}

/// The headers of a peer's answer, and what keeps its slot taken while the body is read.
struct PeerResponse {
    status: StatusCode,
    headers: http::HeaderMap,
    span: Span,
    body: Incoming,
    _permit: OwnedSemaphorePermit,
    _active: Active,
}

/// What a request is looked up and asked for as.
struct Target {
    /// The routing key: the digest, or `registry/repository:tag`.
    key: String,
    /// The reference in the peer URI.
    reference: String,
    /// Known up front for digest references; tags learn it from the peer.
    digest: Option<Digest>,
}

/// A verified manifest.
struct Manifest {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// Serves objects from other nodes. See the module docs for the policy.
#[derive(Clone)]
pub struct PeerSource {
    inner: Arc<Inner>,
}

struct Inner {
    router: Arc<dyn Router>,
    client: Client<HttpConnector, Empty<Bytes>>,
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
    /// source in the [`crate::source::Chain`] for that).
    pub fn new(
        router: Arc<dyn Router>,
        config: FetchConfig,
        fallback: Option<Arc<dyn Source>>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                router,
                client,
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
}

#[async_trait::async_trait]
impl Source for PeerSource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let inner = &self.inner;
        if request.mirrored {
            // Loop guard: another node already asked us because it does not have it; asking
            // further peers would let requests bounce around the cluster.
            bump(&inner.metrics.mirrored_refused, 1);
            return Err(SourceError::NotFound);
        }
        let Some(target) = inner.target(request) else {
            return Err(SourceError::NotFound);
        };
        bump(&inner.metrics.lookups, 1);
        let result = match (request.kind, request.head) {
            (Kind::Manifest, _) => inner.fetch_manifest(request, &target).await,
            (Kind::Blob, true) => inner.head_blob(request, &target).await,
            (Kind::Blob, false) => inner.get_blob(request, &target).await,
        };
        match &result {
            Ok(object) => {
                bump(&inner.metrics.hits, 1);
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

    /// Record a failed attempt and ban the peer when the failure says it is gone or lying.
    fn note_failure(&self, peer: &Peer, err: &AttemptError) {
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
    fn quarantine(&self, peer: &Peer, digest: Digest) {
        bump(&self.metrics.quarantines, 1);
        tracing::warn!(peer = %peer.id, addr = %peer.addr, %digest, period = ?self.config.quarantine, "peer served corrupt content; quarantined");
        self.peers
            .ban(&peer.id, Instant::now() + self.config.quarantine);
    }

    /// Send one request to `peer` and wait for its headers. 2xx answers only, with the span of
    /// the object they carry.
    async fn send(
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
        let outgoing = wire::build_request(method, uri, request.kind, &request.headers, range)
            .map_err(AttemptError::Failed)?;
        let started = Instant::now();
        let response = self.client.request(outgoing).await.map_err(|e| {
            if e.is_connect() {
                AttemptError::Unreachable(e.to_string())
            } else {
                AttemptError::Failed(format!("request failed: {e}"))
            }
        })?;
        let status = response.status();
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
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

    /// Manifests, by digest or tag, GET or HEAD: always fetched whole and verified before
    /// anything is returned. HEAD gets the same treatment: it is what containerd resolves tags
    /// with, and the answer must be backed by a manifest the peer really holds.
    async fn fetch_manifest(
        &self,
        request: &ObjectRequest,
        target: &Target,
    ) -> Result<Object, SourceError> {
        let no_exclusions = HashSet::new();
        let race = self.race(&target.key, &no_exclusions, |peer| async move {
            let mut response = self
                .send(&peer, Method::GET, request, &target.reference, None)
                .await?;
            if response.status != StatusCode::OK {
                return Err(AttemptError::Failed(
                    "partial answer to a full request".into(),
                ));
            }
            let digest = match target.digest {
                Some(digest) => digest,
                None => crate::oci::content_digest(&response.headers)
                    .ok_or_else(|| AttemptError::Failed("tag answer without a digest".into()))?,
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
            let bytes = self
                .read_whole(&mut response.body, response.span.total)
                .await?;
            if Digest::of(&bytes) != digest {
                return Err(AttemptError::Corrupt(digest));
            }
            Ok(Manifest {
                digest,
                media_type,
                bytes,
            })
        });
        let (peer, manifest) = match timeout(self.config.manifest_timeout, race).await {
            Ok(result) => result.map_err(race_error)?,
            Err(_) => return Err(SourceError::NotFound),
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
            body,
            source: "peer",
        })
    }

    /// Read a body of exactly `len` bytes (`len` is within the manifest cap).
    async fn read_whole(&self, body: &mut Incoming, len: u64) -> Result<Bytes, AttemptError> {
        let mut buf = BytesMut::with_capacity(len as usize);
        loop {
            let frame = match timeout(self.config.stall_timeout, body.frame()).await {
                Err(_) => return Err(AttemptError::Failed("peer stalled".into())),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(AttemptError::Unreachable(e.to_string())),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                bump(&self.metrics.bytes, data.len() as u64);
                if (buf.len() + data.len()) as u64 > len {
                    return Err(AttemptError::Failed("body longer than announced".into()));
                }
                buf.extend_from_slice(&data);
            }
        }
        if buf.len() as u64 != len {
            return Err(AttemptError::Failed("body shorter than announced".into()));
        }
        Ok(buf.freeze())
    }

    /// HEAD of a blob: the peer's headers, checked for consistency (nothing to verify).
    async fn head_blob(
        &self,
        request: &ObjectRequest,
        target: &Target,
    ) -> Result<Object, SourceError> {
        let digest = target.digest.ok_or(SourceError::NotFound)?;
        let no_exclusions = HashSet::new();
        let race = self.race(&target.key, &no_exclusions, |peer| async move {
            let response = self
                .send(&peer, Method::HEAD, request, &target.reference, None)
                .await?;
            if response.status != StatusCode::OK {
                return Err(AttemptError::Failed("partial answer to HEAD".into()));
            }
            Ok(response.span.total)
        });
        let (_, size) = match timeout(self.config.manifest_timeout, race).await {
            Ok(result) => result.map_err(race_error)?,
            Err(_) => return Err(SourceError::NotFound),
        };
        let range = match request.range {
            None => None,
            Some(range) => Some(
                range
                    .resolve(size)
                    .ok_or(SourceError::RangeNotSatisfiable { size })?,
            ),
        };
        Ok(Object {
            digest,
            media_type: "application/octet-stream".into(),
            size,
            range,
            body: None,
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
        let no_exclusions = HashSet::new();
        let race = self.race(&target.key, &no_exclusions, |peer| async move {
            let response = self
                .send(
                    &peer,
                    Method::GET,
                    request,
                    &target.reference,
                    request.range,
                )
                .await?;
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
        });
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
            body: Some(body),
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

fn race_error(err: RaceError) -> SourceError {
    match err {
        RaceError::Miss { .. } => SourceError::NotFound,
        RaceError::Router(err) => SourceError::Unavailable(format!("peer lookup failed: {err}")),
    }
}

fn once_body(bytes: Bytes) -> Body {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}
