//! PeerSource against fake peers: real HTTP servers on 127.0.0.1 that can hang, die or stall
//! mid-stream, serve wrong bytes or 404, found through a scripted router.
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::mpsc};

use super::*;
use crate::routing::{Peer, RouterError};

const REPO: &str = "library/app";
const REGISTRY: &str = "docker.io";
const CHUNK: usize = 16 * 1024;
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Every test finishes well within this, or fails.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("test step took far too long")
}

fn blob_bytes(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

// === fake peers ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Good,
    /// Never answers.
    Hang,
    /// Sends this many body bytes, then drops the connection.
    DieAfter(usize),
    /// Sends this many body bytes, then nothing, forever.
    StallAfter(usize),
    /// Flips the last byte of everything it serves.
    Corrupt,
    /// Sends 1 KiB every 20 ms (about 50 KiB/s).
    Trickle,
}

#[derive(Clone)]
struct Stored {
    bytes: Bytes,
    content_type: &'static str,
    digest: Option<String>,
}

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    range: Option<String>,
    mirrored: bool,
    authorization: bool,
}

struct PeerState {
    behaviour: Mutex<Behaviour>,
    objects: Mutex<HashMap<String, Stored>>,
    seen: Mutex<Vec<Seen>>,
    /// Connections accepted.
    connections: std::sync::atomic::AtomicUsize,
}

struct FakePeer {
    peer: Peer,
    state: Arc<PeerState>,
}

type ServerBody = UnsyncBoxBody<Bytes, io::Error>;

impl FakePeer {
    async fn start(id: &str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(PeerState {
            behaviour: Mutex::new(behaviour),
            objects: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(serve(&state, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            peer: Peer {
                id: id.to_owned(),
                addr,
            },
            state,
        }
    }

    fn put(&self, path: String, stored: Stored) {
        self.state.objects.lock().unwrap().insert(path, stored);
    }

    fn blob(&self, bytes: &Bytes) -> Digest {
        let digest = Digest::of(bytes);
        self.put(
            format!("/v2/{REPO}/blobs/{digest}"),
            Stored {
                bytes: bytes.clone(),
                content_type: "application/octet-stream",
                digest: Some(digest.to_string()),
            },
        );
        digest
    }

    fn manifest(&self, reference: &str, bytes: &Bytes, digest: Digest) {
        self.put(
            format!("/v2/{REPO}/manifests/{reference}"),
            Stored {
                bytes: bytes.clone(),
                content_type: MANIFEST_TYPE,
                digest: Some(digest.to_string()),
            },
        );
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

fn parse_range(value: &str, total: usize) -> Option<(usize, usize)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.parse().ok()?;
    let end = if end.is_empty() {
        total
    } else {
        end.parse::<usize>().ok()?.min(total - 1) + 1
    };
    (start < end).then_some((start, end))
}

async fn serve(state: &PeerState, req: Request<hyper::body::Incoming>) -> Response<ServerBody> {
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap().to_owned());
    state.seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        range: range.clone(),
        mirrored: req
            .headers()
            .get(crate::oci::MIRRORED_HEADER)
            .is_some_and(|v| v == "true"),
        authorization: req.headers().contains_key(header::AUTHORIZATION),
    });
    let behaviour = *state.behaviour.lock().unwrap();
    if behaviour == Behaviour::Hang {
        std::future::pending::<()>().await;
    }
    let stored = state.objects.lock().unwrap().get(req.uri().path()).cloned();
    let Some(stored) = stored else {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    };
    let mut bytes = stored.bytes.to_vec();
    if behaviour == Behaviour::Corrupt
        && let Some(last) = bytes.last_mut()
    {
        *last ^= 0xff;
    }
    let total = bytes.len();
    let (status, start, end) = match range.as_deref().and_then(|r| parse_range(r, total)) {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end),
        None => (StatusCode::OK, 0, total),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, stored.content_type)
        .header(header::CONTENT_LENGTH, end - start);
    if let Some(digest) = &stored.digest {
        builder = builder.header(crate::oci::CONTENT_DIGEST_HEADER, digest);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", end - 1),
        );
    }
    let payload = Bytes::from(bytes).slice(start..end);
    let cut = match behaviour {
        Behaviour::DieAfter(n) | Behaviour::StallAfter(n) => n.min(payload.len()),
        _ => payload.len(),
    };
    let chunks: Vec<Result<Frame<Bytes>, io::Error>> = payload
        .slice(..cut)
        .chunks(CHUNK)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let head = futures::stream::iter(chunks);
    let body: ServerBody = match behaviour {
        Behaviour::Trickle => {
            let slices: Vec<Result<Frame<Bytes>, io::Error>> = payload
                .chunks(1024)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let slow = futures::stream::iter(slices).then(|slice| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                slice
            });
            StreamBody::new(slow).boxed_unsync()
        }
        Behaviour::DieAfter(_) => {
            // Let the bytes reach the client before the connection goes.
            let die = futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(io::Error::other("peer died"))
            });
            StreamBody::new(head.chain(die)).boxed_unsync()
        }
        Behaviour::StallAfter(_) => {
            StreamBody::new(head.chain(futures::stream::pending())).boxed_unsync()
        }
        _ => StreamBody::new(head).boxed_unsync(),
    };
    builder.body(body).unwrap()
}

fn empty() -> ServerBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

// === scripted router ===

/// Answers lookups with the peers set for a key, in order. For keys nobody provides, the lookup
/// stays open and finds nothing (a slow DHT).
#[derive(Default)]
struct FakeRouter {
    providers: Mutex<HashMap<String, Vec<Peer>>>,
    lookups: Mutex<Vec<String>>,
    open: Mutex<Vec<mpsc::Sender<Peer>>>,
}

impl FakeRouter {
    fn provide(&self, key: impl ToString, peers: &[&FakePeer]) {
        self.providers.lock().unwrap().insert(
            key.to_string(),
            peers.iter().map(|p| p.peer.clone()).collect(),
        );
    }

    fn lookups(&self) -> Vec<String> {
        self.lookups.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Router for FakeRouter {
    fn has_peers(&self) -> bool {
        true
    }

    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        self.lookups.lock().unwrap().push(key.to_owned());
        let (tx, rx) = mpsc::channel(count.max(1));
        match self.providers.lock().unwrap().get(key) {
            Some(peers) => {
                for peer in peers.iter().take(count) {
                    tx.try_send(peer.clone()).unwrap();
                }
            }
            None => self.open.lock().unwrap().push(tx),
        }
        Ok(rx)
    }

    async fn advertise(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }

    async fn withdraw(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }
}

/// Serves an object from memory, honouring ranges; records what it was asked.
struct FakeUpstream {
    bytes: Bytes,
    asked: Mutex<Vec<Option<ByteRange>>>,
}

#[async_trait::async_trait]
impl Source for FakeUpstream {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        self.asked.lock().unwrap().push(request.range);
        let size = self.bytes.len() as u64;
        let range = match request.range {
            None => None,
            Some(r) => Some(
                r.resolve(size)
                    .ok_or(SourceError::RangeNotSatisfiable { size })?,
            ),
        };
        let part = match &range {
            Some(r) => self.bytes.slice(*r.start() as usize..=*r.end() as usize),
            None => self.bytes.clone(),
        };
        Ok(Object {
            digest: Digest::of(&self.bytes),
            media_type: "application/octet-stream".into(),
            size,
            range,
            body: Payload::Stream(once_body(part)),
            source: "upstream",
        })
    }
}

// === helpers ===

/// Test settings: generous race deadlines and a late first hedge, so a loaded machine cannot
/// turn a slow answer into a spurious miss or hedge. Tests about those set them back.
fn config() -> FetchConfig {
    FetchConfig {
        resolve_timeout: Duration::from_millis(500),
        race_timeout_floor: Duration::from_secs(5),
        hedge_initial: Duration::from_millis(500),
        stall_timeout: Duration::from_millis(300),
        ..FetchConfig::default()
    }
}

fn source(router: &Arc<FakeRouter>, config: FetchConfig) -> PeerSource {
    PeerSource::new(
        Arc::clone(router) as Arc<dyn Router>,
        config,
        None,
        crate::membership::PeerAuth::Open,
    )
}

/// A router on which `peers` provide `key`, and a peer source with the default config on it.
fn providing(key: impl ToString, peers: &[&FakePeer]) -> (Arc<FakeRouter>, PeerSource) {
    let router = Arc::new(FakeRouter::default());
    router.provide(key, peers);
    let source = source(&router, config());
    (router, source)
}

fn request(kind: Kind, reference: Reference) -> ObjectRequest {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer upstream-token"),
    );
    ObjectRequest {
        kind,
        registry: Some(REGISTRY.into()),
        repository: REPO.into(),
        reference,
        range: None,
        head: false,
        headers,
        origin: None,
        mirrored: false,
        public_only: false,
    }
}

fn blob_request(digest: Digest) -> ObjectRequest {
    request(Kind::Blob, Reference::Digest(digest))
}

/// The bytes a body released, and the error that ended it, if any.
async fn drain(body: Body) -> (Vec<u8>, Option<io::Error>) {
    let mut body = body;
    let mut out = Vec::new();
    while let Some(item) = bounded(body.next()).await {
        match item {
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(err) => {
                assert!(
                    bounded(body.next()).await.is_none(),
                    "a body goes on after its error"
                );
                return (out, Some(err));
            }
        }
    }
    (out, None)
}

async fn fetch_ok(source: &PeerSource, request: &ObjectRequest) -> Object {
    bounded(source.fetch(request))
        .await
        .expect("the peer source should serve it")
}

// === tests ===

#[tokio::test]
async fn hit_from_first_peer() {
    let bytes = blob_bytes(100_000);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let (_, source) = providing(digest, &[&a]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    assert_eq!(
        (object.digest, object.size, object.source),
        (digest, 100_000, "peer")
    );
    assert_eq!(object.media_type, "application/octet-stream");
    assert_eq!(object.range, None);
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, bytes);

    let seen = a.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(
        seen[0].uri,
        format!("/v2/{REPO}/blobs/{digest}?ns={REGISTRY}")
    );
    assert!(
        seen[0].mirrored,
        "peer requests must carry X-Spegel-Mirrored"
    );
    assert!(
        !seen[0].authorization,
        "upstream credentials must not go to peers"
    );
    assert_eq!(seen[0].range, None);
    let m = source.metrics().snapshot();
    assert_eq!((m.hits, m.misses, m.bytes, m.hedges), (1, 0, 100_000, 0));
    // Timed to the first byte and to the last one, as a blob.
    let timings = &source.metrics().timings;
    let blob = super::FetchTimings::index(Kind::Blob);
    assert_eq!(timings.first_byte[blob].count(), 1);
    assert_eq!(timings.complete[blob].count(), 1);
    assert_eq!(timings.first_byte[1 - blob].count(), 0);
    assert!(timings.complete[blob].sum() >= timings.first_byte[blob].sum());
}

/// A server that knows the length stops reading a body at its last byte; the completion is
/// recorded there, not only at the end of the stream.
#[tokio::test]
async fn a_blob_read_to_its_last_byte_is_timed_complete() {
    let bytes = blob_bytes(100_000);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let (_, source) = providing(digest, &[&a]);
    let object = fetch_ok(&source, &blob_request(digest)).await;
    let mut body = object.body.into_body().unwrap();
    let mut got = 0;
    while got < bytes.len() {
        got += body.next().await.unwrap().unwrap().len();
    }
    let blob = super::FetchTimings::index(Kind::Blob);
    assert_eq!(source.metrics().timings.complete[blob].count(), 1);
}

#[tokio::test]
async fn miss_when_no_peer_turns_up_in_time() {
    let router = Arc::new(FakeRouter::default());
    let source = source(
        &router,
        FetchConfig {
            resolve_timeout: Duration::from_millis(20),
            ..config()
        },
    );
    let digest = Digest::of(b"nobody has this");
    // The lookup never finds anyone and never ends: only the resolve timeout ends the wait.
    let (result, why) = bounded(miss::scope(async {
        (source.fetch(&blob_request(digest)).await, miss::noted())
    }))
    .await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    assert_eq!(why, Some(PeerMiss::LookupTimeout));
    assert_eq!(router.lookups(), [digest.to_string()]);
    assert_eq!(source.metrics().snapshot().misses, 1);
    let timings = &source.metrics().timings;
    assert_eq!(timings.first_byte[1].count(), 0, "misses are not timed");
}

#[tokio::test]
async fn miss_when_every_peer_lacks_it() {
    let a = FakePeer::start("a", Behaviour::Good).await;
    let b = FakePeer::start("b", Behaviour::Good).await;
    let digest = Digest::of(b"gone");
    let (_, source) = providing(digest, &[&a, &b]);
    let (result, why) = bounded(miss::scope(async {
        (source.fetch(&blob_request(digest)).await, miss::noted())
    }))
    .await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    assert_eq!(
        why,
        Some(PeerMiss::PeersFailed),
        "providers named, none had it"
    );
    // A failure moves on to the next peer at once: both were asked.
    assert_eq!((a.seen().len(), b.seen().len()), (1, 1));
    // 404 is not a fault: nobody is banned for it.
    assert!(!source.is_banned("a") && !source.is_banned("b"));
}

#[tokio::test]
async fn hedge_fires_when_first_peer_is_slow_and_fast_one_wins() {
    let bytes = blob_bytes(50_000);
    let slow = FakePeer::start("slow", Behaviour::Hang).await;
    let fast = FakePeer::start("fast", Behaviour::Good).await;
    let digest = slow.blob(&bytes);
    fast.blob(&bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(digest, &[&slow, &fast]);
    let source = source(
        &router,
        FetchConfig {
            hedge_initial: Duration::from_millis(50),
            ..config()
        },
    );

    // The slow peer never answers: without a hedge this could only end in a miss.
    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, bytes);
    assert_eq!((slow.seen().len(), fast.seen().len()), (1, 1));
    let m = source.metrics().snapshot();
    assert_eq!((m.hedges, m.attempts, m.hits), (1, 2, 1));
}

#[tokio::test]
async fn slow_peers_cannot_stall_a_pull() {
    let slow = FakePeer::start("slow", Behaviour::Hang).await;
    let bytes = blob_bytes(10);
    let digest = slow.blob(&bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(digest, &[&slow]);
    let source = source(
        &router,
        FetchConfig {
            race_timeout_floor: Duration::from_millis(100),
            ..config()
        },
    );
    let result = bounded(source.fetch(&blob_request(digest))).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    let result = bounded(source.fetch(&request(Kind::Manifest, Reference::Digest(digest)))).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
}

#[tokio::test]
async fn mid_stream_death_resumes_from_another_peer() {
    let bytes = blob_bytes(200_000);
    let dying = FakePeer::start("dying", Behaviour::DieAfter(65_536)).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    let digest = dying.blob(&bytes);
    good.blob(&bytes);
    let (_, source) = providing(digest, &[&dying, &good]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    assert_eq!(object.size, 200_000);
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes, "resumed body differs from the blob");
    let resumed = good.seen();
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].range.as_deref(), Some("bytes=65536-199999"));
    let m = source.metrics().snapshot();
    assert_eq!(
        (m.resumes, m.resume_fallbacks, m.verify_failures),
        (1, 0, 0)
    );
    // A peer that died mid-transfer is skipped for a while.
    assert!(source.is_banned("dying"));
}

#[tokio::test]
async fn stalled_transfer_resumes_from_another_peer() {
    let bytes = blob_bytes(100_000);
    let stalling = FakePeer::start("stalling", Behaviour::StallAfter(40_000)).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    let digest = stalling.blob(&bytes);
    good.blob(&bytes);
    let (_, source) = providing(digest, &[&stalling, &good]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes, "resumed body differs from the blob");
    assert_eq!(good.seen()[0].range.as_deref(), Some("bytes=40000-99999"));
}

#[tokio::test]
async fn trickling_peer_is_replaced_by_a_faster_one() {
    let bytes = blob_bytes(64 * 1024);
    let slow = FakePeer::start("slow", Behaviour::Trickle).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    let digest = slow.blob(&bytes);
    good.blob(&bytes);
    let (_, source) = providing(digest, &[&slow, &good]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes, "resumed body differs from the blob");
    let resumed = good.seen();
    assert_eq!(resumed.len(), 1);
    let range = resumed[0]
        .range
        .as_deref()
        .expect("the faster peer resumes");
    assert!(
        range.starts_with("bytes=") && range.ends_with("-65535"),
        "{range}"
    );
    assert_eq!(source.metrics().snapshot().resumes, 1);
    // Slow is not dead: no ban.
    assert!(!source.is_banned("slow"));
}

#[tokio::test]
async fn trickling_peer_is_kept_when_nothing_else_can_serve() {
    let bytes = blob_bytes(32 * 1024);
    let slow = FakePeer::start("slow", Behaviour::Trickle).await;
    let digest = slow.blob(&bytes);
    let (_, source) = providing(digest, &[&slow]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "slow must beat failed: {err:?}");
    assert!(got == bytes);
    assert_eq!(source.metrics().snapshot().resumes, 0);
    assert_eq!(slow.seen().len(), 1);
}

#[tokio::test]
async fn corrupted_peer_fails_before_last_byte_and_is_quarantined() {
    let bytes = blob_bytes(300_000);
    let bad = FakePeer::start("bad", Behaviour::Corrupt).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    let digest = bad.blob(&bytes);
    good.blob(&bytes);
    let (router, source) = providing(digest, &[&bad]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    let err = err.expect("a corrupt body must end in an error");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    // Everything released is genuine, and the object never completed.
    assert!(got.len() < bytes.len(), "the final chunk was released");
    assert_eq!(got[..], bytes[..got.len()]);
    assert!(source.is_banned("bad"));
    let m = source.metrics().snapshot();
    assert_eq!((m.verify_failures, m.quarantines), (1, 1));

    // containerd retries: the quarantined peer is skipped even though the DHT still lists it.
    router.provide(digest, &[&bad, &good]);
    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, bytes);
    assert_eq!((bad.seen().len(), good.seen().len()), (1, 1));
    assert!(source.metrics().snapshot().banned_skipped >= 1);
}

#[tokio::test]
async fn corruption_after_resume_is_still_caught() {
    let bytes = blob_bytes(100_000);
    let dying = FakePeer::start("dying", Behaviour::DieAfter(20_000)).await;
    let bad = FakePeer::start("bad", Behaviour::Corrupt).await;
    let digest = dying.blob(&bytes);
    bad.blob(&bytes);
    let (_, source) = providing(digest, &[&dying, &bad]);

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_some(), "the hash spans both peers' bytes");
    assert!(got.len() < bytes.len());
    assert!(source.is_banned("bad"));
}

#[tokio::test]
async fn manifest_is_verified_before_the_first_byte() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
    let digest = Digest::of(&manifest);
    let bad = FakePeer::start("bad", Behaviour::Corrupt).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    bad.manifest(&digest.to_string(), &manifest, digest);
    good.manifest(&digest.to_string(), &manifest, digest);
    let (router, source) = providing(digest, &[&bad]);
    let req = request(Kind::Manifest, Reference::Digest(digest));

    // Only a corrupt peer: nothing at all is returned, not even headers.
    let result = bounded(source.fetch(&req)).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    assert!(source.is_banned("bad"));
    assert_eq!(source.metrics().snapshot().verify_failures, 1);

    // With a good peer too, the corrupt one is skipped and the answer is the verified bytes.
    router.provide(digest, &[&bad, &good]);
    let object = fetch_ok(&source, &req).await;
    assert_eq!(object.digest, digest);
    assert_eq!(object.media_type, MANIFEST_TYPE);
    assert_eq!(object.size, manifest.len() as u64);
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none());
    assert_eq!(got, manifest);
    assert_eq!(bad.seen().len(), 1);
}

#[tokio::test]
async fn corrupt_manifest_moves_on_to_the_next_peer() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
    let digest = Digest::of(&manifest);
    let bad = FakePeer::start("bad", Behaviour::Corrupt).await;
    let good = FakePeer::start("good", Behaviour::Good).await;
    bad.manifest(&digest.to_string(), &manifest, digest);
    good.manifest(&digest.to_string(), &manifest, digest);
    let (_, source) = providing(digest, &[&bad, &good]);

    let object = fetch_ok(&source, &request(Kind::Manifest, Reference::Digest(digest))).await;
    let (got, _) = drain(object.body.into_body().unwrap()).await;
    assert_eq!(got, manifest);
    assert!(source.is_banned("bad"));
    assert_eq!((bad.seen().len(), good.seen().len()), (1, 1));
}

#[tokio::test]
async fn mirrored_request_is_never_forwarded() {
    let bytes = blob_bytes(10);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let (router, source) = providing(digest, &[&a]);
    let mut req = blob_request(digest);
    req.mirrored = true;
    let result = bounded(source.fetch(&req)).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    assert!(router.lookups().is_empty());
    assert!(a.seen().is_empty());
    assert_eq!(source.metrics().snapshot().mirrored_refused, 1);
}

#[tokio::test]
async fn tag_lookup_returns_the_verified_manifest() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"config":{},"layers":[]}"#);
    let digest = Digest::of(&manifest);
    let a = FakePeer::start("a", Behaviour::Good).await;
    a.manifest("1.0", &manifest, digest);
    let router = Arc::new(FakeRouter::default());
    let key = format!("{REGISTRY}/{REPO}:1.0");
    router.provide(&key, &[&a]);
    let source = source(&router, config());

    let req = request(Kind::Manifest, Reference::Tag("1.0".into()));
    let object = fetch_ok(&source, &req).await;
    assert_eq!(object.digest, digest);
    assert_eq!(object.media_type, MANIFEST_TYPE);
    let (got, _) = drain(object.body.into_body().unwrap()).await;
    assert_eq!(got, manifest);
    assert_eq!(router.lookups(), std::slice::from_ref(&key));
    assert_eq!(
        a.seen()[0].uri,
        format!("/v2/{REPO}/manifests/1.0?ns={REGISTRY}")
    );

    // HEAD (containerd's resolve) is answered from the same verified manifest.
    let mut head = req.clone();
    head.head = true;
    let object = fetch_ok(&source, &head).await;
    assert_eq!(
        (object.digest, object.size),
        (digest, manifest.len() as u64)
    );
    assert!(object.body.is_empty());
}

#[tokio::test]
async fn tag_answer_must_match_the_digest_it_claims() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let a = FakePeer::start("a", Behaviour::Good).await;
    a.manifest("1.0", &manifest, Digest::of(b"something else"));
    let (_, source) = providing(format!("{REGISTRY}/{REPO}:1.0"), &[&a]);
    let result =
        bounded(source.fetch(&request(Kind::Manifest, Reference::Tag("1.0".into())))).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
    assert!(source.is_banned("a"));
}

#[tokio::test]
async fn filtered_and_disabled_tags_go_nowhere() {
    let router = Arc::new(FakeRouter::default());
    let latest = request(Kind::Manifest, Reference::Tag("latest".into()));
    let source1 = source(&router, config());
    let result = bounded(source1.fetch(&latest)).await;
    assert!(matches!(result, Err(SourceError::NotFound)));

    let source2 = source(
        &router,
        FetchConfig {
            resolve_tags: false,
            ..config()
        },
    );
    let result =
        bounded(source2.fetch(&request(Kind::Manifest, Reference::Tag("1.0".into())))).await;
    assert!(matches!(result, Err(SourceError::NotFound)));

    let mut no_registry = request(Kind::Manifest, Reference::Tag("1.0".into()));
    no_registry.registry = None;
    let result = bounded(source1.fetch(&no_registry)).await;
    assert!(matches!(result, Err(SourceError::NotFound)));
    assert!(router.lookups().is_empty(), "{:?}", router.lookups());
}

#[tokio::test]
async fn fallback_resumes_when_no_peer_can() {
    let bytes = blob_bytes(150_000);
    let dying = FakePeer::start("dying", Behaviour::DieAfter(49_152)).await;
    let digest = dying.blob(&bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(digest, &[&dying]);
    let upstream = Arc::new(FakeUpstream {
        bytes: bytes.clone(),
        asked: Mutex::new(Vec::new()),
    });
    let source = PeerSource::new(
        Arc::clone(&router) as Arc<dyn Router>,
        config(),
        Some(Arc::clone(&upstream) as Arc<dyn Source>),
        crate::membership::PeerAuth::Open,
    );

    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes, "resumed body differs from the blob");
    assert_eq!(
        *upstream.asked.lock().unwrap(),
        [Some(ByteRange::From {
            start: 49_152,
            end: Some(149_999)
        })]
    );
    let m = source.metrics().snapshot();
    assert_eq!((m.resumes, m.resume_fallbacks), (1, 1));
}

#[tokio::test]
async fn body_fails_when_nothing_can_resume() {
    let bytes = blob_bytes(100_000);
    let dying = FakePeer::start("dying", Behaviour::DieAfter(32_768)).await;
    let digest = dying.blob(&bytes);
    let (_, source) = providing(digest, &[&dying]);
    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_some());
    assert_eq!(got[..], bytes[..got.len()]);
    assert!(got.len() < bytes.len());
}

#[tokio::test]
async fn ranges_pass_through_and_full_ranges_are_verified() {
    let bytes = blob_bytes(100_000);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let (_, source) = providing(digest, &[&a]);

    let mut req = blob_request(digest);
    req.range = Some(ByteRange::From {
        start: 1000,
        end: Some(50_999),
    });
    let object = fetch_ok(&source, &req).await;
    assert_eq!(object.size, 100_000);
    assert_eq!(object.range, Some(1000..=50_999));
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none());
    assert_eq!(got[..], bytes[1000..51_000]);
    assert_eq!(a.seen()[0].range.as_deref(), Some("bytes=1000-50999"));

    // `bytes=0-` covers the whole object: a corrupt peer is caught as for a plain GET.
    *a.state.behaviour.lock().unwrap() = Behaviour::Corrupt;
    req.range = Some(ByteRange::From {
        start: 0,
        end: None,
    });
    let object = fetch_ok(&source, &req).await;
    assert_eq!(object.range, Some(0..=99_999));
    let (_, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_some());
    assert!(source.is_banned("a"));
}

#[tokio::test]
async fn blob_head_and_digest_header_checks() {
    let bytes = blob_bytes(1234);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let (router, source) = providing(digest, &[&a]);

    let mut head = blob_request(digest);
    head.head = true;
    let object = fetch_ok(&source, &head).await;
    assert_eq!((object.digest, object.size), (digest, 1234));
    assert!(object.body.is_empty());
    assert_eq!(a.seen()[0].method, Method::HEAD);

    // A peer answering for another digest is not believed.
    let other = Digest::of(b"other");
    a.put(
        format!("/v2/{REPO}/blobs/{other}"),
        Stored {
            bytes: bytes.clone(),
            content_type: "application/octet-stream",
            digest: Some(digest.to_string()),
        },
    );
    router.provide(other, &[&a]);
    let result = bounded(source.fetch(&blob_request(other))).await;
    assert!(matches!(result, Err(SourceError::NotFound)), "{result:?}");
}

#[tokio::test]
async fn unreachable_peer_is_skipped_for_a_while() {
    // Bind then drop a listener: its port refuses connections.
    let dead_addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let bytes = blob_bytes(100);
    let good = FakePeer::start("good", Behaviour::Good).await;
    let digest = good.blob(&bytes);
    let dead = Peer {
        id: "dead".into(),
        addr: dead_addr,
    };
    let router = Arc::new(FakeRouter::default());
    router
        .providers
        .lock()
        .unwrap()
        .insert(digest.to_string(), vec![dead, good.peer.clone()]);
    let source = source(&router, config());
    let object = fetch_ok(&source, &blob_request(digest)).await;
    let (got, _) = drain(object.body.into_body().unwrap()).await;
    assert_eq!(got, bytes);
    assert!(source.is_banned("dead"));
    let attempts = source.metrics().snapshot().attempts;
    fetch_ok(&source, &blob_request(digest)).await;
    // The second fetch went straight to the good peer.
    assert_eq!(source.metrics().snapshot().attempts, attempts + 1);
}

/// The objects of one pull go to the peer this node has just used, over the connection still
/// in the pool, rather than to whichever provider a lookup happens to name first.
#[tokio::test]
async fn the_next_object_goes_to_the_peer_just_used() {
    let (config_bytes, layer_bytes) = (blob_bytes(1_000), blob_bytes(50_000));
    let a = FakePeer::start("a", Behaviour::Good).await;
    let b = FakePeer::start("b", Behaviour::Good).await;
    let config_digest = b.blob(&config_bytes);
    let layer_digest = b.blob(&layer_bytes);
    a.blob(&layer_bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(config_digest, &[&b]);
    // `a` is named first.
    router.provide(layer_digest, &[&a, &b]);
    let source = source(&router, config());

    for (digest, bytes) in [(config_digest, &config_bytes), (layer_digest, &layer_bytes)] {
        let object = fetch_ok(&source, &blob_request(digest)).await;
        let (got, err) = drain(object.body.into_body().unwrap()).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(&got, bytes);
    }
    assert!(a.seen().is_empty(), "{:?}", a.seen());
    assert_eq!(b.seen().len(), 2);
    let connections = b
        .state
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(connections, 1, "both requests over one connection");
}

#[test]
fn config_from_flags() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        fetch: FetchArgs,
    }
    let parse = |args: &[&str]| {
        let cli =
            Cli::try_parse_from(std::iter::once("spegel").chain(args.iter().copied())).unwrap();
        FetchConfig::try_from(&cli.fetch)
    };
    let config = parse(&[]).unwrap();
    assert_eq!(config.lookup_count, 3);
    assert_eq!(config.resolve_timeout, Duration::from_millis(20));
    assert!(config.resolve_tags);
    assert_eq!(config.tag_filters.len(), 1);
    assert!(config.tag_filters[0].is_match("docker.io/library/nginx:latest"));
    assert!(!config.tag_filters[0].is_match("docker.io/library/nginx:1.27"));

    let config = parse(&["--tag-filter=", "--resolve-tags", "false"]).unwrap();
    assert!(config.tag_filters.is_empty());
    assert!(!config.resolve_tags);
    let config = parse(&["--tag-filter", ":latest$,^ghcr\\.io/"]).unwrap();
    assert_eq!(config.tag_filters.len(), 2);
    assert!(matches!(
        parse(&["--tag-filter", "("]),
        Err(FetchConfigError::TagFilter { .. })
    ));
    assert!(matches!(
        parse(&["--mirror-resolve-retries", "0"]),
        Err(FetchConfigError::Zero(_))
    ));
    assert!(matches!(
        parse(&["--mirror-resolve-timeout", "0ms"]),
        Err(FetchConfigError::Zero(_))
    ));
}

/// A `--peer-concurrency` slot stands for the transfer from the peer: a streamed body holds it
/// while the client reads (the transfer goes at the client's pace), and gives it back with the
/// last byte.
#[tokio::test]
async fn a_streamed_blob_holds_its_slot_until_its_last_byte_arrives() {
    let bytes = blob_bytes(300_000);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let digest = a.blob(&bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(digest, &[&a]);
    let source = source(
        &router,
        FetchConfig {
            max_concurrent: 1,
            ..config()
        },
    );
    let object = fetch_ok(&source, &blob_request(digest)).await;
    assert_eq!(source.free_slots(), 0, "the transfer is still under way");
    let (got, err) = drain(object.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, bytes);
    assert_eq!(source.free_slots(), 1);
}

/// Once verify-before-send has the whole blob (in memory or spooled), the transfer is over: its
/// slot is free although the client has not read a byte, so a slow client cannot starve other
/// pulls of peer slots.
#[tokio::test]
async fn a_received_blob_frees_its_slot_before_the_client_reads() {
    use crate::body::buffered::{BufferArgs, Buffered};

    let small = blob_bytes(100_000);
    let big = blob_bytes(700_000);
    let a = FakePeer::start("a", Behaviour::Good).await;
    let (small_digest, big_digest) = (a.blob(&small), a.blob(&big));
    let router = Arc::new(FakeRouter::default());
    router.provide(small_digest, &[&a]);
    router.provide(big_digest, &[&a]);
    let peers = source(
        &router,
        FetchConfig {
            max_concurrent: 1,
            ..config()
        },
    );
    let data_dir = tempfile::tempdir().unwrap();
    let args = BufferArgs {
        peer_stream_min: 1 << 20,
        peer_buffer_max: 200_000,
        peer_buffer_budget: 1 << 20,
        peer_spool_dir: None,
        peer_spool_budget: 1 << 20,
        shared_fetch_budget: 0,
    };
    let buffered = Buffered::new(Arc::new(peers.clone()), &args, data_dir.path()).unwrap();

    // In memory: nobody reads it, yet the slot is free…
    let in_memory = bounded(buffered.fetch(&blob_request(small_digest)))
        .await
        .unwrap();
    assert_eq!(peers.free_slots(), 1);
    // …so the next blob (too big for memory: spooled) gets it, and gives it back too.
    let spooled = bounded(buffered.fetch(&blob_request(big_digest)))
        .await
        .unwrap();
    assert_eq!(peers.free_slots(), 1);

    let (got, err) = drain(spooled.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, big);
    let (got, err) = drain(in_memory.body.into_body().unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, small);
}

/// A corrupt peer behind verify-before-send: the blob is unavailable before any byte is sent
/// (so the next source serves it) and the peer is quarantined, also when it is spooled.
#[tokio::test]
async fn a_corrupt_spooled_blob_is_unavailable_and_its_peer_quarantined() {
    use crate::body::buffered::{BufferArgs, Buffered};

    let bytes = blob_bytes(700_000);
    let bad = FakePeer::start("bad", Behaviour::Corrupt).await;
    let digest = bad.blob(&bytes);
    let router = Arc::new(FakeRouter::default());
    router.provide(digest, &[&bad]);
    let peers = source(&router, config());
    let data_dir = tempfile::tempdir().unwrap();
    let args = BufferArgs {
        peer_stream_min: 1 << 20,
        peer_buffer_max: 200_000,
        peer_buffer_budget: 1 << 20,
        peer_spool_dir: None,
        peer_spool_budget: 1 << 20,
        shared_fetch_budget: 0,
    };
    let buffered = Buffered::new(Arc::new(peers.clone()), &args, data_dir.path()).unwrap();
    let result = bounded(buffered.fetch(&blob_request(digest))).await;
    assert!(
        matches!(result, Err(SourceError::Unavailable(_))),
        "{result:?}"
    );
    assert!(peers.is_banned("bad"));
    assert_eq!(peers.free_slots(), config().max_concurrent);
}
