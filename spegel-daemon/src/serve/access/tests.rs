use std::sync::Mutex as StdMutex;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::*;
use crate::{
    oci::Kind,
    source::{Origin, Payload},
};

/// Answers every request the same way, and remembers what it was asked.
struct Fake {
    answer: fn() -> Result<(), SourceError>,
    seen: StdMutex<Vec<ObjectRequest>>,
}

impl Fake {
    fn new(answer: fn() -> Result<(), SourceError>) -> Arc<Self> {
        Arc::new(Self {
            answer,
            seen: StdMutex::default(),
        })
    }
    fn seen(&self) -> Vec<ObjectRequest> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Source for Fake {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        self.seen.lock().unwrap().push(request.clone());
        (self.answer)()?;
        let digest = match request.reference {
            Reference::Digest(digest) => digest,
            Reference::Tag(_) => Digest::of(b"manifest"),
        };
        Ok(Object {
            digest,
            media_type: "x".into(),
            size: 1,
            range: None,
            body: Payload::Empty,
            source: "fake",
        })
    }
}

fn ok() -> Result<(), SourceError> {
    Ok(())
}
fn unauthorized() -> Result<(), SourceError> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"r\""),
    );
    Err(SourceError::Upstream {
        status: StatusCode::UNAUTHORIZED,
        headers,
        body: Bytes::new(),
    })
}
fn unavailable() -> Result<(), SourceError> {
    Err(SourceError::Unavailable("connection refused".into()))
}
fn server_error() -> Result<(), SourceError> {
    Err(SourceError::Upstream {
        status: StatusCode::SERVICE_UNAVAILABLE,
        headers: HeaderMap::new(),
        body: Bytes::new(),
    })
}

fn access(public: &str, all_public: bool) -> Arc<Access> {
    let args = AccessArgs {
        public_registries: vec![public.parse().unwrap()],
        all_public,
        access_cache_ttl: Duration::from_secs(60),
    };
    Arc::new(args.access(Arc::default()))
}

fn request(auth: Option<&'static str>, blob: &[u8]) -> ObjectRequest {
    let mut headers = HeaderMap::new();
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static(auth));
    }
    ObjectRequest {
        kind: Kind::Blob,
        registry: Some("private.test:5443".into()),
        repository: "team/app".into(),
        reference: Reference::Digest(Digest::of(blob)),
        range: None,
        head: false,
        headers,
        origin: Some(Origin {
            addr: "10.0.0.1:5443".parse().unwrap(),
            host: "private.test".into(),
            tls: true,
        }),
        mirrored: false,
        public_only: false,
    }
}

fn gate(peers: &Arc<Fake>, upstream: &Arc<Fake>, access: &Arc<Access>) -> ConfirmedPeers {
    ConfirmedPeers::new(
        Arc::clone(peers) as Arc<dyn Source>,
        Some(Arc::clone(upstream) as Arc<dyn Source>),
        Arc::clone(access),
    )
}

#[tokio::test]
async fn confirmed_by_upstream_then_served_from_peers_and_remembered() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(ok), access("", false));
    let gate = gate(&peers, &upstream, &access);
    let req = request(Some("Basic dXNlcjpwYXNz"), b"layer");
    assert_eq!(gate.fetch(&req).await.unwrap().source, "fake");
    let asked = upstream.seen();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].head, "upstream is asked with a HEAD");
    assert_eq!(
        asked[0].headers.get(header::AUTHORIZATION),
        req.headers.get(header::AUTHORIZATION),
        "with the client's own credentials"
    );
    gate.fetch(&req).await.unwrap();
    assert_eq!(upstream.seen().len(), 1, "the confirmation is remembered");
    assert_eq!(access.stats().confirmed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn other_credentials_are_confirmed_again() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(ok), access("", false));
    let gate = gate(&peers, &upstream, &access);
    gate.fetch(&request(Some("Basic YQ=="), b"layer"))
        .await
        .unwrap();
    gate.fetch(&request(None, b"layer")).await.unwrap();
    gate.fetch(&request(Some("Basic YQ=="), b"other layer"))
        .await
        .unwrap();
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn refused_by_upstream_gets_upstreams_answer_not_the_bytes() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(unauthorized), access("", false));
    let gate = gate(&peers, &upstream, &access);
    match gate.fetch(&request(None, b"layer")).await {
        Err(SourceError::Upstream {
            status, headers, ..
        }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(headers.contains_key(http::header::WWW_AUTHENTICATE));
        }
        other => panic!("expected upstream's 401, got {other:?}"),
    }
    assert_eq!(access.stats().refused.load(Ordering::Relaxed), 1);
    // Refusals are not remembered as confirmations.
    assert!(gate.fetch(&request(None, b"layer")).await.is_err());
}

#[tokio::test]
async fn unreachable_upstream_asks_peers_for_public_content_only() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(unavailable), access("", false));
    let gate = gate(&peers, &upstream, &access);
    gate.fetch(&request(Some("Basic YQ=="), b"layer"))
        .await
        .unwrap();
    let asked = peers.seen();
    let last = asked.last().unwrap();
    assert!(last.public_only, "the retry asks for public content only");
    assert_eq!(access.stats().public_only.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn failing_upstream_asks_peers_for_public_content_only() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(server_error), access("", false));
    let gate = gate(&peers, &upstream, &access);
    gate.fetch(&request(None, b"layer")).await.unwrap();
    assert!(peers.seen().last().unwrap().public_only);
}

#[tokio::test]
async fn tags_and_mirror_mode_ask_for_public_content_only() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(ok), access("", false));
    let gate = gate(&peers, &upstream, &access);
    let mut tag = request(None, b"x");
    tag.reference = Reference::Tag("v1".into());
    gate.fetch(&tag).await.unwrap();
    let mut mirror = request(None, b"layer");
    mirror.origin = None;
    gate.fetch(&mirror).await.unwrap();
    assert!(upstream.seen().is_empty());
    assert!(peers.seen().iter().all(|r| r.public_only));
}

#[tokio::test]
async fn public_registries_need_no_confirmation() {
    let (peers, upstream, access) = (
        Fake::new(ok),
        Fake::new(unauthorized),
        access("private.test:5443", false),
    );
    let gate = gate(&peers, &upstream, &access);
    gate.fetch(&request(None, b"layer")).await.unwrap();
    assert!(upstream.seen().is_empty());
    assert!(!peers.seen()[0].public_only);
}

#[tokio::test]
async fn all_public_needs_no_confirmation() {
    let (peers, upstream, access) = (Fake::new(ok), Fake::new(unauthorized), access("", true));
    gate(&peers, &upstream, &access)
        .fetch(&request(None, b"layer"))
        .await
        .unwrap();
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_node_gives_public_only_requests_what_it_knows_is_public() {
    let access = access("", false);
    let local = PublicOnly::new(Fake::new(ok) as Arc<dyn Source>, Arc::clone(&access));
    let mut asked = request(None, b"layer");
    asked.origin = None;
    asked.mirrored = true;
    asked.public_only = true;
    assert!(matches!(
        local.fetch(&asked).await,
        Err(SourceError::NotFound)
    ));
    assert_eq!(access.stats().withheld.load(Ordering::Relaxed), 1);
    // Read from upstream with credentials: still not public.
    access.confirm(&request(Some("Basic YQ=="), b"layer"), Digest::of(b"layer"));
    assert!(local.fetch(&asked).await.is_err());
    // Read without credentials: public.
    access.confirm(&request(None, b"layer"), Digest::of(b"layer"));
    assert!(local.fetch(&asked).await.is_ok());
    // A request that did not ask for public content only is answered as before.
    asked.public_only = false;
    asked.reference = Reference::Digest(Digest::of(b"private"));
    assert!(local.fetch(&asked).await.is_ok());
}

#[test]
fn registries_match_by_host_and_port() {
    let access = access("docker.io, 10.0.0.1:5000, https://ghcr.io", false);
    assert!(access.public_registry(Some("docker.io")));
    assert!(access.public_registry(Some("10.0.0.1:5000")));
    assert!(access.public_registry(Some("ghcr.io:443")));
    assert!(!access.public_registry(Some("10.0.0.1:5001")));
    assert!(!access.public_registry(Some("quay.io")));
    assert!(!access.public_registry(None));
}

#[tokio::test]
async fn what_upstream_gives_without_credentials_becomes_public() {
    let access = access("", false);
    let upstream = NotesPublic::new(Fake::new(ok) as Arc<dyn Source>, Arc::clone(&access));
    upstream
        .fetch(&request(Some("Basic YQ=="), b"private"))
        .await
        .unwrap();
    upstream.fetch(&request(None, b"public")).await.unwrap();
    assert!(!access.is_public(None, Digest::of(b"private")));
    assert!(access.is_public(None, Digest::of(b"public")));
    // Refused: nothing noted.
    let refusing = NotesPublic::new(
        Fake::new(unauthorized) as Arc<dyn Source>,
        Arc::clone(&access),
    );
    assert!(refusing.fetch(&request(None, b"other")).await.is_err());
    assert!(!access.is_public(None, Digest::of(b"other")));
}

#[tokio::test]
async fn a_tag_upstream_answered_confirms_its_manifest_for_that_client_only() {
    let access = access("", false);
    let upstream = NotesPublic::new(Fake::new(ok) as Arc<dyn Source>, Arc::clone(&access));
    let by_tag = |auth| ObjectRequest {
        kind: Kind::Manifest,
        reference: Reference::Tag("v1".into()),
        head: true,
        ..request(auth, b"")
    };
    let by_digest = |auth| ObjectRequest {
        kind: Kind::Manifest,
        ..request(auth, b"manifest")
    };
    upstream.fetch(&by_tag(Some("Basic YQ=="))).await.unwrap();
    // The manifest the tag named, by digest, with the same credentials: straight to peers.
    let (peers, checker) = (Fake::new(ok), Fake::new(ok));
    let gate = gate(&peers, &checker, &access);
    gate.fetch(&by_digest(Some("Basic YQ=="))).await.unwrap();
    assert!(checker.seen().is_empty(), "confirmed by the tag's answer");
    assert!(!access.is_public(None, Digest::of(b"manifest")));
    // Other credentials (or none) are still checked.
    gate.fetch(&by_digest(None)).await.unwrap();
    assert_eq!(checker.seen().len(), 1);
    // A peer's request says nothing about any client.
    let mirrored = ObjectRequest {
        mirrored: true,
        ..by_tag(Some("Basic Yg=="))
    };
    upstream.fetch(&mirrored).await.unwrap();
    gate.fetch(&by_digest(Some("Basic Yg=="))).await.unwrap();
    assert_eq!(checker.seen().len(), 2);
}

#[tokio::test]
async fn public_content_a_member_vouched_for_is_passed_on_as_public() {
    let access = access("", false);
    let peers = Fake::new(ok);
    let upstream = Fake::new(unavailable);
    gate(&peers, &upstream, &access)
        .fetch(&request(None, b"layer"))
        .await
        .unwrap();
    assert!(peers.seen().last().unwrap().public_only);
    assert!(access.is_public(None, Digest::of(b"layer")));
}
