//! The registry API against an in-memory store and fake sources: in process through
//! [`Registry::handle`], and over real sockets with hyper clients (HTTP/1.1 and h2c).
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    oci::{ByteRange, digest::Digest},
    source::{
        Body, Chain, Object, ObjectRequest, Origin, SourceError,
        local::{LocalSource, tests::FakeStore},
    },
};

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
const LAYER: &[u8] = b"0123456789abcdefghij";

/// A store with a tagged manifest, a layer, and an object of unknown type.
struct Fixture {
    store: Arc<FakeStore>,
    manifest: Digest,
    layer: Digest,
    untyped: Digest,
}

fn fixture() -> Fixture {
    let store = Arc::new(FakeStore::default());
    let manifest = store.insert(MANIFEST, Some(oci::OCI_MANIFEST));
    let layer = store.insert(LAYER, Some(oci::DOCKER_LAYER_GZIP));
    let untyped = store.insert(b"untyped", None);
    store.tag("docker.io/library/nginx:1.27", manifest);
    store.tag("10.0.0.1:5000/team/app:v1", manifest);
    Fixture {
        store,
        manifest,
        layer,
        untyped,
    }
}

fn local_registry(f: &Fixture) -> Registry {
    Registry::new(Arc::new(LocalSource::new(f.store.clone())))
}

type Answer = Box<dyn Fn(&ObjectRequest) -> Result<Object, SourceError> + Send + Sync>;

/// A source answering from a closure, recording every request it sees.
struct FakeSource {
    answer: Answer,
    seen: Mutex<Vec<ObjectRequest>>,
}

impl FakeSource {
    fn new(
        answer: impl Fn(&ObjectRequest) -> Result<Object, SourceError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            answer: Box::new(answer),
            seen: Mutex::default(),
        })
    }

    fn seen(&self) -> Vec<ObjectRequest> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Source for FakeSource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        self.seen.lock().unwrap().push(request.clone());
        (self.answer)(request)
    }
}

/// A blob object whose body is `chunks`, announced as `size` bytes.
fn streamed(digest: Digest, size: u64, chunks: Vec<io::Result<Bytes>>) -> Object {
    Object {
        digest,
        media_type: oci::OCTET_STREAM.into(),
        size,
        range: None,
        body: Payload::Stream(Box::pin(futures::stream::iter(chunks))),
        source: "fake",
    }
}

/// A passthrough that answers 299 with the method, URI and request body it got.
#[derive(Default)]
struct FakePassthrough {
    origins: Mutex<Vec<Option<Origin>>>,
}

#[async_trait::async_trait]
impl Passthrough for FakePassthrough {
    async fn forward(
        &self,
        request: Request<HttpBody>,
        origin: Option<&Origin>,
    ) -> Response<HttpBody> {
        self.origins.lock().unwrap().push(origin.cloned());
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let text = format!(
            "{} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
        let mut response = Response::new(
            Full::new(Bytes::from(text))
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::from_u16(299).unwrap();
        response
    }
}

fn origin() -> Origin {
    Origin {
        addr: "192.0.2.1:443".parse().unwrap(),
        host: "registry-1.docker.io".into(),
        tls: true,
    }
}

fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Empty::new()).unwrap()
}

/// What a response must look like.
enum Expect<'a> {
    /// Exactly these bytes.
    Body(&'a [u8]),
    /// An OCI error body with this code.
    Code(&'a str),
    /// No bytes at all.
    Empty,
}

/// Send one request through `handle` and compare status, headers (`None`: must be absent) and
/// body.
async fn check(
    registry: &Registry,
    ctx: RequestContext,
    request: Request<Empty<Bytes>>,
    status: u16,
    headers: &[(&str, Option<&str>)],
    expect: Expect<'_>,
) {
    let what = format!("{} {}", request.method(), request.uri());
    let response = registry.handle(request, ctx).await;
    let (parts, body) = response.into_parts();
    let (got_status, got_headers) = (parts.status, parts.headers);
    let body = body.collect().await.map(|c| c.to_bytes());
    assert_eq!(got_status.as_u16(), status, "status of {what}: {body:?}");
    for (name, value) in headers {
        let got = got_headers.get(*name).map(|v| v.to_str().unwrap());
        assert_eq!(got, *value, "header {name} of {what}");
    }
    let body = body.unwrap_or_else(|err| panic!("body of {what} failed: {err}"));
    match expect {
        Expect::Body(expected) => assert_eq!(&body[..], expected, "body of {what}"),
        Expect::Empty => assert!(body.is_empty(), "body of {what} must be empty: {body:?}"),
        Expect::Code(code) => {
            let parsed: oci::ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|err| {
                panic!("body of {what} is not an OCI error ({err}): {body:?}")
            });
            assert_eq!(
                serde_json::to_value(parsed.errors[0].code).unwrap(),
                code,
                "error code of {what}"
            );
            assert_eq!(
                got_headers.get("content-type").unwrap(),
                "application/json",
                "{what}"
            );
        }
    }
}

const GET: Method = Method::GET;
const HEAD: Method = Method::HEAD;

#[tokio::test]
async fn api_version_and_probes() {
    let f = fixture();
    let registry = local_registry(&f);
    let ctx = RequestContext::default;
    let version = [("docker-distribution-api-version", Some("registry/2.0"))];
    check(
        &registry,
        ctx(),
        request(GET, "/v2/", &[]),
        200,
        &version,
        Expect::Body(b"{}"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(GET, "/v2", &[]),
        200,
        &version,
        Expect::Body(b"{}"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(HEAD, "/v2/", &[]),
        200,
        &[("content-length", Some("2"))],
        Expect::Empty,
    )
    .await;
    check(
        &registry,
        ctx(),
        request(GET, "/livez", &[]),
        200,
        &[],
        Expect::Body(b"ok"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(GET, "/readyz", &[]),
        200,
        &[],
        Expect::Body(b"ok"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(GET, "/metrics", &[]),
        404,
        &[],
        Expect::Code("UNSUPPORTED"),
    )
    .await;
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        for path in ["/v2/", "/livez", "/readyz", "/metrics"] {
            check(
                &registry,
                ctx(),
                request(method.clone(), path, &[]),
                405,
                &[("allow", Some("GET, HEAD"))],
                Expect::Code("UNSUPPORTED"),
            )
            .await;
        }
    }
    for path in [
        "/",
        "/foo",
        "/v2/_catalog",
        "/v2/library/nginx/tags/list",
        "/v1/x",
        "/v2/a/blobs/uploads/",
    ] {
        check(
            &registry,
            ctx(),
            request(GET, path, &[]),
            404,
            &[],
            Expect::Code("UNSUPPORTED"),
        )
        .await;
        check(
            &registry,
            ctx(),
            request(Method::PATCH, path, &[]),
            404,
            &[],
            Expect::Code("UNSUPPORTED"),
        )
        .await;
    }
}

#[tokio::test]
async fn readiness_and_metrics() {
    let f = fixture();
    let registry = local_registry(&f)
        .with_readiness(Arc::new(StoreReadiness::new(f.store.clone())))
        .with_metrics(Arc::new(|| Ok("# EOF\n".to_owned())));
    let ctx = RequestContext::default;
    check(
        &registry,
        ctx(),
        request(GET, "/readyz", &[]),
        200,
        &[],
        Expect::Body(b"ok"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(GET, "/metrics", &[]),
        200,
        &[(
            "content-type",
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        Expect::Body(b"# EOF\n"),
    )
    .await;
    f.store
        .down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    check(
        &registry,
        ctx(),
        request(GET, "/readyz", &[]),
        503,
        &[],
        Expect::Body(b"containerd is down"),
    )
    .await;
    let failing = local_registry(&f).with_metrics(Arc::new(|| Err(std::fmt::Error)));
    check(
        &failing,
        ctx(),
        request(GET, "/metrics", &[]),
        500,
        &[],
        Expect::Body(b"cannot encode metrics"),
    )
    .await;
}

#[tokio::test]
async fn manifests() {
    let f = fixture();
    let registry = local_registry(&f);
    let ctx = RequestContext::default;
    let digest = f.manifest.to_string();
    let length = MANIFEST.len().to_string();
    let headers = [
        ("content-type", Some(oci::OCI_MANIFEST)),
        ("content-length", Some(length.as_str())),
        ("docker-content-digest", Some(digest.as_str())),
        ("accept-ranges", None),
        ("content-range", None),
    ];
    for uri in [
        "/v2/library/nginx/manifests/1.27?ns=docker.io".to_owned(),
        "/v2/library/nginx/manifests/1.27?ns=DOCKER.IO&other=x".to_owned(),
        "/v2/team/app/manifests/v1?ns=10.0.0.1%3A5000".to_owned(),
        format!("/v2/library/nginx/manifests/{digest}?ns=docker.io"),
        // A digest needs no registry.
        format!("/v2/library/nginx/manifests/{digest}"),
        format!("/v2/any/other/repo/manifests/{digest}"),
    ] {
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[]),
            200,
            &headers,
            Expect::Body(MANIFEST),
        )
        .await;
        check(
            &registry,
            ctx(),
            request(HEAD, &uri, &[]),
            200,
            &headers,
            Expect::Empty,
        )
        .await;
    }
    // As Spegel: a tag without a registry cannot be looked up.
    check(
        &registry,
        ctx(),
        request(GET, "/v2/library/nginx/manifests/1.27", &[]),
        404,
        &[],
        Expect::Code("MANIFEST_UNKNOWN"),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(HEAD, "/v2/library/nginx/manifests/1.27", &[]),
        404,
        &[],
        Expect::Empty,
    )
    .await;
    for uri in [
        "/v2/library/nginx/manifests/1.28?ns=docker.io".to_owned(),
        "/v2/library/nginx/manifests/1.27?ns=ghcr.io".to_owned(),
        // Not manifests: a layer and an object nothing could type.
        format!("/v2/library/nginx/manifests/{}", f.layer),
        format!("/v2/library/nginx/manifests/{}", f.untyped),
        format!("/v2/library/nginx/manifests/{}", Digest::of(b"absent")),
    ] {
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[]),
            404,
            &[],
            Expect::Code("MANIFEST_UNKNOWN"),
        )
        .await;
    }
    // Manifests are never served in pieces.
    check(
        &registry,
        ctx(),
        request(
            GET,
            &format!("/v2/a/manifests/{digest}"),
            &[("range", "bytes=0-1")],
        ),
        400,
        &[],
        Expect::Code("RANGE_INVALID"),
    )
    .await;
}

#[tokio::test]
async fn blobs() {
    let f = fixture();
    let registry = local_registry(&f);
    let ctx = RequestContext::default;
    let digest = f.layer.to_string();
    let uri = format!("/v2/library/nginx/blobs/{digest}?ns=docker.io");
    let full = [
        ("content-type", Some(oci::DOCKER_LAYER_GZIP)),
        ("content-length", Some("20")),
        ("docker-content-digest", Some(digest.as_str())),
        ("accept-ranges", Some("bytes")),
        ("content-range", None),
    ];
    check(
        &registry,
        ctx(),
        request(GET, &uri, &[]),
        200,
        &full,
        Expect::Body(LAYER),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(HEAD, &uri, &[]),
        200,
        &full,
        Expect::Empty,
    )
    .await;

    let untyped = format!("/v2/x/blobs/{}", f.untyped);
    check(
        &registry,
        ctx(),
        request(GET, &untyped, &[]),
        200,
        &[("content-type", Some(oci::OCTET_STREAM))],
        Expect::Body(b"untyped"),
    )
    .await;

    for (range, content_range, bytes) in [
        ("bytes=2-5", "bytes 2-5/20", &LAYER[2..=5]),
        ("bytes=0-0", "bytes 0-0/20", &LAYER[..1]),
        ("bytes=15-", "bytes 15-19/20", &LAYER[15..]),
        ("bytes=10-999", "bytes 10-19/20", &LAYER[10..]),
        ("bytes=-3", "bytes 17-19/20", &LAYER[17..]),
        ("bytes=-100", "bytes 0-19/20", LAYER),
    ] {
        let length = bytes.len().to_string();
        let headers = [
            ("content-type", Some(oci::OCTET_STREAM)),
            ("content-length", Some(length.as_str())),
            ("content-range", Some(content_range)),
            ("accept-ranges", Some("bytes")),
            ("docker-content-digest", Some(digest.as_str())),
        ];
        let ranged = || request(GET, &uri, &[("range", range)]);
        check(
            &registry,
            ctx(),
            ranged(),
            206,
            &headers,
            Expect::Body(bytes),
        )
        .await;
        let head = request(HEAD, &uri, &[("range", range)]);
        check(&registry, ctx(), head, 206, &headers, Expect::Empty).await;
    }
    for range in ["bytes=20-", "bytes=100-200", "bytes=-0"] {
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[("range", range)]),
            416,
            &[("content-range", Some("bytes */20"))],
            Expect::Code("RANGE_INVALID"),
        )
        .await;
    }
    for range in [
        "bytes=0-1,4-5",
        "bytes=1-0",
        "bytes=a-b",
        "lines=0-1",
        "bytes=99999999999999999999-",
        "bytes=",
        "garbage",
    ] {
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[("range", range)]),
            400,
            &[],
            Expect::Code("RANGE_INVALID"),
        )
        .await;
    }
    let two_ranges = request(GET, &uri, &[("range", "bytes=0-1"), ("range", "bytes=2-3")]);
    check(
        &registry,
        ctx(),
        two_ranges,
        400,
        &[],
        Expect::Code("RANGE_INVALID"),
    )
    .await;

    // A manifest asked for as a blob, and a blob nobody has.
    for missing in [f.manifest, Digest::of(b"absent")] {
        let uri = format!("/v2/library/nginx/blobs/{missing}");
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[]),
            404,
            &[],
            Expect::Code("BLOB_UNKNOWN"),
        )
        .await;
    }
}

#[tokio::test]
async fn bad_requests() {
    let f = fixture();
    let registry = local_registry(&f);
    let ctx = RequestContext::default;
    let digest = f.layer.to_string();
    let long_name = "a".repeat(256);
    let long_tag = "t".repeat(129);
    for (uri, status, code) in [
        (
            "/v2/../manifests/latest?ns=docker.io".to_owned(),
            400,
            "NAME_INVALID",
        ),
        (format!("/v2/%2e%2e/blobs/{digest}"), 400, "NAME_INVALID"),
        (
            format!("/v2/a/%2E%2E/b/blobs/{digest}"),
            400,
            "NAME_INVALID",
        ),
        (format!("/v2//a/blobs/{digest}"), 400, "NAME_INVALID"),
        (format!("/v2/Upper/blobs/{digest}"), 400, "NAME_INVALID"),
        (
            format!("/v2/{long_name}/blobs/{digest}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/a/manifests/{long_tag}?ns=docker.io"),
            400,
            "TAG_INVALID",
        ),
        ("/v2/a/manifests/-x?ns=docker.io".into(), 400, "TAG_INVALID"),
        ("/v2/a/blobs/latest".into(), 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:abc".into(), 400, "DIGEST_INVALID"),
        (
            format!("/v2/a/blobs/sha256:{}", f.layer.hex().to_uppercase()),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/blobs/sha512:{}", f.layer.hex()),
            404,
            "UNSUPPORTED",
        ),
        ("/v2/../../etc/passwd".into(), 404, "UNSUPPORTED"),
        (
            "/v2/a/manifests/latest?ns=evil/path".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/a/manifests/latest?ns=a%2Fb".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/a/manifests/latest?ns=x&ns=y".into(),
            400,
            "NAME_INVALID",
        ),
        (format!("/v2/a/blobs/{digest}?ns=%zz"), 400, "NAME_INVALID"),
    ] {
        check(
            &registry,
            ctx(),
            request(GET, &uri, &[]),
            status,
            &[],
            Expect::Code(code),
        )
        .await;
    }
    let uri = format!("/v2/library/nginx/blobs/{digest}");
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        check(
            &registry,
            ctx(),
            request(method, &uri, &[]),
            405,
            &[("allow", Some("GET, HEAD"))],
            Expect::Code("UNSUPPORTED"),
        )
        .await;
    }
}

#[tokio::test]
async fn store_outage_is_a_miss_in_mirror_mode_and_a_bad_gateway_when_intercepted() {
    let f = fixture();
    let registry = local_registry(&f);
    f.store
        .down
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let uri = format!("/v2/library/nginx/blobs/{}", f.layer);
    check(
        &registry,
        RequestContext::default(),
        request(GET, &uri, &[]),
        404,
        &[],
        Expect::Code("BLOB_UNKNOWN"),
    )
    .await;
    let intercepted = RequestContext {
        origin: Some(origin()),
        ..RequestContext::default()
    };
    check(
        &registry,
        intercepted,
        request(GET, &uri, &[]),
        502,
        &[],
        Expect::Code("UNAVAILABLE"),
    )
    .await;
}

#[tokio::test]
async fn the_request_reaches_the_source_as_parsed() {
    let f = fixture();
    let source = FakeSource::new(|_| Err(SourceError::NotFound));
    let registry = Registry::new(source.clone());
    let uri = format!("/v2/library/nginx/blobs/{}?ns=10.0.0.1%3A5000", f.layer);
    let headers = [
        ("x-spegel-mirrored", "true"),
        ("authorization", "Bearer token"),
        ("accept", "application/vnd.oci.image.manifest.v1+json"),
        ("range", "bytes=5-"),
        ("connection", "keep-alive"),
        ("host", "10.0.0.2:5000"),
    ];
    check(
        &registry,
        RequestContext::default(),
        request(GET, &uri, &headers),
        404,
        &[],
        Expect::Code("BLOB_UNKNOWN"),
    )
    .await;
    check(
        &registry,
        RequestContext::default(),
        request(
            HEAD,
            "/v2/a/manifests/v1?ns=ghcr.io",
            &[("X-Spegel-Mirrored", "TRUE")],
        ),
        404,
        &[],
        Expect::Empty,
    )
    .await;
    let seen = source.seen();
    assert_eq!(seen.len(), 2);
    let blob = &seen[0];
    assert_eq!(blob.kind, Kind::Blob);
    assert_eq!(blob.registry.as_deref(), Some("10.0.0.1:5000"));
    assert_eq!(blob.repository, "library/nginx");
    assert_eq!(blob.reference, Reference::Digest(f.layer));
    assert_eq!(
        blob.range,
        Some(ByteRange::From {
            start: 5,
            end: None
        })
    );
    assert!(!blob.head);
    assert!(blob.mirrored);
    assert!(blob.origin.is_none());
    let mut forwarded: Vec<_> = blob.headers.keys().map(|k| k.as_str()).collect();
    forwarded.sort_unstable();
    assert_eq!(forwarded, ["accept", "authorization"]);

    let manifest = &seen[1];
    assert_eq!(manifest.kind, Kind::Manifest);
    assert_eq!(manifest.reference, Reference::Tag("v1".into()));
    assert_eq!(manifest.registry.as_deref(), Some("ghcr.io"));
    assert!(manifest.head);
    assert!(manifest.mirrored);
    assert!(manifest.headers.is_empty());

    // Without the header, or with another value, the request may be forwarded.
    check(
        &registry,
        RequestContext::default(),
        request(GET, &uri, &[("x-spegel-mirrored", "false")]),
        404,
        &[],
        Expect::Code("BLOB_UNKNOWN"),
    )
    .await;
    assert!(!source.seen()[2].mirrored);
}

#[tokio::test]
async fn source_errors_map_to_answers() {
    let f = fixture();
    let layer = f.layer;
    let uri = format!("/v2/a/blobs/{layer}");
    let mirror = RequestContext::default;
    let intercepted = || RequestContext {
        origin: Some(origin()),
        ..RequestContext::default()
    };
    let registry = |answer: fn(Digest) -> Result<Object, SourceError>| {
        Registry::new(FakeSource::new(move |_| answer(layer)))
    };

    let upstream = registry(|_| {
        let mut headers = HeaderMap::new();
        headers.insert(
            "www-authenticate",
            "Bearer realm=\"https://auth\"".parse().unwrap(),
        );
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("connection", "close".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        Err(SourceError::Upstream {
            status: StatusCode::UNAUTHORIZED,
            headers,
            body: Bytes::from_static(br#"{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}"#),
        })
    });
    for ctx in [mirror(), intercepted()] {
        check(
            &upstream,
            ctx,
            request(GET, &uri, &[]),
            401,
            &[
                ("www-authenticate", Some("Bearer realm=\"https://auth\"")),
                ("connection", None),
                ("transfer-encoding", None),
                ("content-length", Some("50")),
            ],
            Expect::Code("UNAUTHORIZED"),
        )
        .await;
    }

    let invalid = registry(|_| Err(SourceError::Invalid("nope".into())));
    check(
        &invalid,
        mirror(),
        request(GET, &uri, &[]),
        400,
        &[],
        Expect::Code("UNSUPPORTED"),
    )
    .await;

    let not_found = registry(|_| Err(SourceError::NotFound));
    check(
        &not_found,
        intercepted(),
        request(GET, &uri, &[]),
        404,
        &[],
        Expect::Code("BLOB_UNKNOWN"),
    )
    .await;

    let unsatisfiable = registry(|_| Err(SourceError::RangeNotSatisfiable { size: 7 }));
    check(
        &unsatisfiable,
        mirror(),
        request(GET, &uri, &[("range", "bytes=9-")]),
        416,
        &[("content-range", Some("bytes */7"))],
        Expect::Code("RANGE_INVALID"),
    )
    .await;

    // Answers a correct source cannot give are failures of that source.
    let wrong_digest = registry(|_| {
        Ok(streamed(
            Digest::of(b"other"),
            1,
            vec![Ok(Bytes::from("x"))],
        ))
    });
    let bad_range = registry(|digest| {
        let mut object = streamed(digest, 5, vec![Ok(Bytes::from("x"))]);
        object.range = Some(4..=5);
        Ok(object)
    });
    let no_body = registry(|digest| {
        let mut object = streamed(digest, 5, vec![]);
        object.body = Payload::Empty;
        Ok(object)
    });
    for broken in [&wrong_digest, &bad_range, &no_body] {
        check(
            broken,
            mirror(),
            request(GET, &uri, &[]),
            404,
            &[],
            Expect::Code("BLOB_UNKNOWN"),
        )
        .await;
        check(
            broken,
            intercepted(),
            request(GET, &uri, &[]),
            502,
            &[],
            Expect::Code("UNAVAILABLE"),
        )
        .await;
    }
    // HEAD needs no body; an empty object needs none either.
    check(
        &no_body,
        mirror(),
        request(HEAD, &uri, &[]),
        200,
        &[("content-length", Some("5"))],
        Expect::Empty,
    )
    .await;
    let empty = registry(|digest| {
        let mut object = streamed(digest, 0, vec![]);
        object.body = Payload::Empty;
        Ok(object)
    });
    check(
        &empty,
        mirror(),
        request(GET, &uri, &[]),
        200,
        &[("content-length", Some("0"))],
        Expect::Empty,
    )
    .await;
}

/// The error a response body ends with, or `None` if it ends cleanly.
async fn body_error(registry: &Registry, uri: &str) -> Option<String> {
    let response = registry
        .handle(request(GET, uri, &[]), RequestContext::default())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    response
        .into_body()
        .collect()
        .await
        .err()
        .map(|err| err.to_string())
}

#[tokio::test]
async fn bodies_that_go_wrong_abort_the_response() {
    let digest = Digest::of(b"whatever");
    let uri = format!("/v2/a/blobs/{digest}");
    let failing = Registry::new(FakeSource::new(move |_| {
        Ok(streamed(
            digest,
            10,
            vec![
                Ok(Bytes::from("01234")),
                Err(io::Error::other("peer went away")),
            ],
        ))
    }));
    assert_eq!(
        body_error(&failing, &uri).await.as_deref(),
        Some("peer went away")
    );

    let short = Registry::new(FakeSource::new(move |_| {
        Ok(streamed(digest, 10, vec![Ok(Bytes::from("01234"))]))
    }));
    assert_eq!(
        body_error(&short, &uri).await.as_deref(),
        Some("source ended 5 bytes early")
    );

    let long = Registry::new(FakeSource::new(move |_| {
        Ok(streamed(
            digest,
            3,
            vec![Ok(Bytes::from("01")), Ok(Bytes::from("234"))],
        ))
    }));
    assert_eq!(
        body_error(&long, &uri).await.as_deref(),
        Some("source sent 2 bytes more than announced")
    );

    let exact = Registry::new(FakeSource::new(move |_| {
        Ok(streamed(
            digest,
            5,
            vec![Ok(Bytes::from("01")), Ok(Bytes::from("234"))],
        ))
    }));
    assert_eq!(body_error(&exact, &uri).await, None);
}

#[tokio::test]
async fn transparent_mode_serves_pulls_and_passes_everything_else_through() {
    let f = fixture();
    let passthrough = Arc::new(FakePassthrough::default());
    let registry = local_registry(&f);
    let ctx = || RequestContext {
        origin: Some(origin()),
        registry: Some("docker.io".into()),
        passthrough: Some(passthrough.clone()),
        ..RequestContext::default()
    };
    // Pulls: from the source, the registry taken from the connection.
    check(
        &registry,
        ctx(),
        request(GET, "/v2/library/nginx/manifests/1.27", &[]),
        200,
        &[("content-type", Some(oci::OCI_MANIFEST))],
        Expect::Body(MANIFEST),
    )
    .await;
    // The connection's registry wins over `?ns=`.
    check(
        &registry,
        ctx(),
        request(GET, "/v2/library/nginx/manifests/1.27?ns=ghcr.io", &[]),
        200,
        &[],
        Expect::Body(MANIFEST),
    )
    .await;
    check(
        &registry,
        ctx(),
        request(
            GET,
            &format!("/v2/library/nginx/blobs/{}", f.layer),
            &[("range", "bytes=-2")],
        ),
        206,
        &[("content-range", Some("bytes 18-19/20"))],
        Expect::Body(b"ij"),
    )
    .await;
    // A miss is still answered here: the source chain includes the upstream in this mode.
    check(
        &registry,
        ctx(),
        request(GET, "/v2/library/nginx/manifests/9.99", &[]),
        404,
        &[],
        Expect::Code("MANIFEST_UNKNOWN"),
    )
    .await;
    // Everything else: the upstream's business.
    for (method, uri) in [
        (GET, "/v2/"),
        (HEAD, "/v2/"),
        (GET, "/livez"),
        (GET, "/v2/library/nginx/tags/list?n=10"),
        (GET, "/token?scope=repository:library/nginx:pull"),
        (Method::POST, "/v2/library/nginx/blobs/uploads/"),
        (Method::PUT, "/v2/library/nginx/manifests/1.27"),
        (GET, "/v2/Bad/Name/manifests/1.27"),
        (GET, "/v2/a/blobs/sha512:00"),
    ] {
        let expected = format!("{method} {uri} ");
        check(
            &registry,
            ctx(),
            request(method, uri, &[]),
            299,
            &[],
            Expect::Body(expected.as_bytes()),
        )
        .await;
    }
    // A ranged manifest request is odd, so the upstream decides.
    check(
        &registry,
        ctx(),
        request(
            GET,
            &format!("/v2/a/manifests/{}", f.manifest),
            &[("range", "bytes=0-1")],
        ),
        299,
        &[],
        Expect::Body(format!("GET /v2/a/manifests/{} ", f.manifest).as_bytes()),
    )
    .await;
    // A tag with no registry at all cannot be resolved here.
    let no_registry = RequestContext {
        registry: None,
        ..ctx()
    };
    check(
        &registry,
        no_registry,
        request(GET, "/v2/library/nginx/manifests/1.27", &[]),
        299,
        &[],
        Expect::Body(b"GET /v2/library/nginx/manifests/1.27 "),
    )
    .await;
    // The passthrough gets the request body and the origin.
    let post = Request::post("/token")
        .body(Full::new(Bytes::from_static(b"grant_type=password")))
        .unwrap();
    let response = registry.handle(post, ctx()).await;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST /token grant_type=password");
    let origins = passthrough.origins.lock().unwrap();
    assert!(origins.iter().all(|o| o.as_ref() == Some(&origin())));
    assert_eq!(origins.len(), 12);
}

// === Over real sockets ===

/// Waits for `future`, failing the test instead of hanging it when `what` never happens.
async fn within<F: Future>(future: F, what: &str) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(20), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A registry serving the fixture, plus three special blobs: `<poisoned>` sends 5 of its 10
/// bytes, then fails when `fail` is notified; `<instant_poison>` does the same without waiting;
/// `<held>` sends `first`, then `second` when `release` is notified.
struct Server {
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    fixture: Fixture,
    poisoned: Digest,
    instant_poison: Digest,
    fail: Arc<tokio::sync::Notify>,
    held: Digest,
    release: Arc<tokio::sync::Notify>,
}

/// `first`, then `then` once `notify` is notified.
fn two_part_body(
    first: &'static str,
    notify: Arc<tokio::sync::Notify>,
    then: io::Result<Bytes>,
) -> Body {
    let first = futures::stream::iter([Ok(Bytes::from(first))]);
    let second = futures::stream::once(async move {
        notify.notified().await;
        then
    });
    Box::pin(first.chain(second))
}

async fn start(max_connections: usize) -> Server {
    start_with(max_connections, |registry| registry).await
}

/// [`start`], with `bounds` setting further limits on the registry.
async fn start_with(max_connections: usize, bounds: impl FnOnce(Registry) -> Registry) -> Server {
    let fixture = fixture();
    let poisoned = Digest::of(b"poisoned");
    let instant_poison = Digest::of(b"instant poison");
    let held = Digest::of(b"held");
    let release = Arc::new(tokio::sync::Notify::new());
    let fail = Arc::new(tokio::sync::Notify::new());
    let (release_, fail_) = (release.clone(), fail.clone());
    let special = FakeSource::new(move |request| {
        let digest = match request.reference {
            Reference::Digest(digest) => digest,
            Reference::Tag(_) => return Err(SourceError::NotFound),
        };
        let mut object = streamed(digest, 10, vec![]);
        object.body = Payload::Stream(if digest == poisoned {
            two_part_body(
                "01234",
                fail_.clone(),
                Err(io::Error::other("disk on fire")),
            )
        } else if digest == instant_poison {
            Box::pin(futures::stream::iter([
                Ok(Bytes::from("01234")),
                Err(io::Error::other("disk on fire")),
            ]))
        } else if digest == held {
            object.size = 11;
            two_part_body("first", release_.clone(), Ok(Bytes::from("second")))
        } else {
            return Err(SourceError::NotFound);
        });
        Ok(object)
    });
    let chain = Chain::new(vec![
        special,
        Arc::new(LocalSource::new(fixture.store.clone())),
    ]);
    let registry = Arc::new(bounds(
        Registry::new(Arc::new(chain))
            .with_max_connections(NonZeroUsize::new(max_connections).unwrap()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, registry.clone(), shutdown.clone()));
    Server {
        addr,
        registry,
        shutdown,
        task,
        fixture,
        poisoned,
        instant_poison,
        fail,
        held,
        release,
    }
}

/// A client on one connection, HTTP/1.1 or h2c.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    async fn connect(addr: SocketAddr, h2: bool) -> Self {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Response<hyper::body::Incoming> {
        self.try_send(method, path, headers).await.unwrap()
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> hyper::Result<Response<hyper::body::Incoming>> {
        let mut request = request(method, path, headers);
        match self {
            Client::H1(send) => {
                request
                    .headers_mut()
                    .insert("host", "spegel".parse().unwrap());
                send.ready().await?;
                send.send_request(request).await
            }
            Client::H2(send) => {
                *request.uri_mut() = format!("http://spegel{path}").parse().unwrap();
                send.ready().await?;
                send.send_request(request).await
            }
        }
    }
}

#[tokio::test]
async fn serves_over_http1_and_h2c() {
    let server = start(16).await;
    let layer = server.fixture.layer;
    for h2 in [false, true] {
        let mut client = Client::connect(server.addr, h2).await;
        let what = if h2 { "h2c" } else { "http/1.1" };

        let response = client.send(GET, "/v2/", &[]).await;
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(
            response.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );

        let uri = format!("/v2/library/nginx/blobs/{layer}?ns=docker.io");
        let response = client.send(GET, &uri, &[]).await;
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(response.headers()["content-length"], "20", "{what}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], LAYER, "{what}");

        let response = client.send(GET, &uri, &[("range", "bytes=3-6")]).await;
        assert_eq!(response.status(), 206, "{what}");
        assert_eq!(
            response.headers()["content-range"],
            "bytes 3-6/20",
            "{what}"
        );
        assert_eq!(response.headers()["content-length"], "4", "{what}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"3456", "{what}");

        let response = client.send(HEAD, &uri, &[]).await;
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(response.headers()["content-length"], "20", "{what}");
        assert_eq!(
            response.headers()["docker-content-digest"],
            layer.to_string().as_str()
        );
        assert_eq!(response.headers()["accept-ranges"], "bytes", "{what}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.is_empty(), "{what}");

        let manifest = "/v2/library/nginx/manifests/1.27?ns=docker.io";
        let response = client.send(HEAD, manifest, &[]).await;
        assert_eq!(response.status(), 200, "{what}");
        assert_eq!(
            response.headers()["content-length"],
            MANIFEST.len().to_string().as_str()
        );
        assert_eq!(
            response.headers()["content-type"],
            oci::OCI_MANIFEST,
            "{what}"
        );
        assert!(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );

        let response = client.send(GET, &uri, &[("range", "bytes=50-")]).await;
        assert_eq!(response.status(), 416, "{what}");
        assert_eq!(response.headers()["content-range"], "bytes */20", "{what}");

        let response = client.send(HEAD, "/v2/a/manifests/latest", &[]).await;
        assert_eq!(response.status(), 404, "{what}");
        assert!(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );

        // The connection survives all of the above.
        let response = client.send(GET, "/livez", &[]).await;
        assert_eq!(response.status(), 200, "{what}");
    }
    server.shutdown.cancel();
    server.task.await.unwrap();
}

#[tokio::test]
async fn a_source_failing_mid_stream_aborts_the_response() {
    let server = start(16).await;
    for h2 in [false, true] {
        let mut client = Client::connect(server.addr, h2).await;
        let uri = format!("/v2/a/blobs/{}", server.poisoned);
        let response = client.send(GET, &uri, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-length"], "10");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"01234", "h2={h2}");
        server.fail.notify_one();
        match within(body.frame(), "the body to fail").await {
            Some(Err(_)) => {}
            other => panic!("h2={h2}: the body must fail, got {other:?}"),
        }

        // Failing before the headers even left: the client sees an error either way, never a
        // clean short body.
        let mut client = Client::connect(server.addr, h2).await;
        let uri = format!("/v2/a/blobs/{}", server.instant_poison);
        match client.try_send(GET, &uri, &[]).await {
            Err(_) => {}
            Ok(response) => {
                let body = within(response.into_body().collect(), "the body").await;
                assert!(body.is_err(), "h2={h2}: the body must fail");
            }
        }
    }
    server.shutdown.cancel();
    server.task.await.unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_requests_and_stops_accepting() {
    let server = start(16).await;
    let mut client = Client::connect(server.addr, false).await;
    let response = client
        .send(GET, &format!("/v2/a/blobs/{}", server.held), &[])
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");

    server.shutdown.cancel();
    let mut task = server.task;
    // The request is still in flight, so the server must not have stopped. (This can only
    // pass wrongly on a very slow machine, never fail wrongly.)
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), &mut task)
            .await
            .is_err()
    );
    server.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second");
    task.await.unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_wait() {
    let server = start(1).await;
    let mut first = Client::connect(server.addr, false).await;
    assert_eq!(first.send(GET, "/livez", &[]).await.status(), 200);

    // The second connection sits in the backlog until the first one closes.
    let addr = server.addr;
    let mut second = tokio::spawn(async move {
        let mut client = Client::connect(addr, false).await;
        client.send(GET, "/livez", &[]).await.status()
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), &mut second)
            .await
            .is_err()
    );
    drop(first);
    assert_eq!(second.await.unwrap(), 200);
    server.shutdown.cancel();
    server.task.await.unwrap();
}

/// One connection's sender and the task driving it, which ends when the server closes it.
async fn raw_connection(
    stream: TcpStream,
    h2: bool,
) -> (Client, tokio::task::JoinHandle<hyper::Result<()>>) {
    let io = hyper_util::rt::TokioIo::new(stream);
    if h2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        (Client::H2(send), tokio::spawn(conn))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        (Client::H1(send), tokio::spawn(conn))
    }
}

#[tokio::test]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let idle = std::time::Duration::from_millis(300);
    let server = start_with(16, |registry| registry.with_idle_timeout(idle)).await;
    let held = server.held.to_string();
    for h2 in [false, true] {
        let what = if h2 { "h2c" } else { "http/1.1" };
        let (mut client, conn) =
            raw_connection(TcpStream::connect(server.addr).await.unwrap(), h2).await;
        assert_eq!(
            client.send(GET, "/livez", &[]).await.status(),
            200,
            "{what}"
        );

        // A response still being sent keeps the connection open past the idle timeout.
        let path = format!("/v2/a/blobs/{held}");
        let response = client.send(GET, &path, &[]).await;
        assert_eq!(response.status(), 200, "{what}");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first", "{what}");
        tokio::time::sleep(idle * 3).await;
        assert!(
            !conn.is_finished(),
            "{what}: closed with a response in flight"
        );
        server.release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second", "{what}");

        // Then nothing: the server closes the connection.
        let quiet = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(10), conn)
            .await
            .unwrap_or_else(|_| panic!("{what}: idle connection still open"))
            .unwrap()
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        assert!(quiet.elapsed() >= idle / 2, "{what}: closed too early");
    }
    server.shutdown.cancel();
    server.task.await.unwrap();
}

#[tokio::test]
async fn a_client_beyond_its_share_is_refused_while_others_are_served() {
    let per_client = NonZeroUsize::new(2).unwrap();
    let server = start_with(16, |registry| {
        registry.with_max_connections_per_client(per_client)
    })
    .await;
    let mut held = Vec::new();
    for h2 in [false, true] {
        let (mut client, conn) =
            raw_connection(TcpStream::connect(server.addr).await.unwrap(), h2).await;
        assert_eq!(client.send(GET, "/livez", &[]).await.status(), 200);
        held.push((client, conn));
    }

    // The third connection from 127.0.0.1 is closed without an answer.
    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut extra, b"GET /livez HTTP/1.1\r\nhost: spegel\r\n\r\n")
        .await
        .ok();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut extra, &mut answer),
    )
    .await
    .expect("the extra connection was left open");
    assert!(read.is_err() || answer.is_empty(), "answered: {answer:?}");
    assert_eq!(server.registry.refused_connections(), 1);

    // Another client address is still served.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let (mut client, _conn) =
        raw_connection(other.connect(server.addr).await.unwrap(), false).await;
    assert_eq!(client.send(GET, "/livez", &[]).await.status(), 200);

    // A slot given back can be taken again.
    drop(held.pop());
    let again = async {
        loop {
            let (mut client, _conn) =
                raw_connection(TcpStream::connect(server.addr).await.unwrap(), false).await;
            if let Ok(response) = client.try_send(GET, "/livez", &[]).await {
                return response.status();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), again)
        .await
        .expect("the freed slot was not given back");
    assert_eq!(status, 200);
    server.shutdown.cancel();
    server.task.await.unwrap();
}

#[tokio::test]
async fn serve_connection_uses_the_context_of_the_connection() {
    let f = fixture();
    let passthrough = Arc::new(FakePassthrough::default());
    let registry = Arc::new(local_registry(&f));
    let ctx = RequestContext {
        origin: Some(origin()),
        registry: Some("docker.io".into()),
        passthrough: Some(passthrough.clone()),
        ..RequestContext::default()
    };
    let shutdown = CancellationToken::new();
    for h2 in [false, true] {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn({
            let registry = registry.clone();
            let ctx = ctx.clone();
            let shutdown = shutdown.child_token();
            async move {
                registry
                    .serve_connection(server_io, ctx, shutdown, Duration::from_secs(30))
                    .await
            }
        });
        let io = hyper_util::rt::TokioIo::new(client_io);
        let (mut client, conn) = if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            (
                Client::H2(send),
                tokio::spawn(async move { conn.await.is_ok() }),
            )
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            (
                Client::H1(send),
                tokio::spawn(async move { conn.await.is_ok() }),
            )
        };
        let response = client
            .send(GET, "/v2/library/nginx/manifests/1.27", &[])
            .await;
        assert_eq!(response.status(), 200, "h2={h2}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], MANIFEST);
        let response = client.send(GET, "/v2/", &[]).await;
        assert_eq!(response.status(), 299, "h2={h2}");
        // Both the client and the response (which keeps an h2 stream open) go away.
        drop(response);
        drop(client);
        assert!(within(conn, "the client connection to end").await.unwrap());
        within(
            served,
            &format!("the connection to end after the client left (h2={h2})"),
        )
        .await
        .unwrap()
        .unwrap();
    }

    // Cancelling the token closes an idle connection...
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn({
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        let ctx = ctx.clone();
        async move {
            registry
                .serve_connection(server_io, ctx, shutdown, Duration::from_secs(30))
                .await
        }
    });
    let (send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(client_io),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let mut client = Client::H1(send);
    assert_eq!(
        client
            .send(GET, "/v2/library/nginx/manifests/1.27", &[])
            .await
            .status(),
        200
    );
    // ...and one that never sent a request (it ends with a "cancelled" error: nothing was
    // lost).
    let (server_io, _client_io) = tokio::io::duplex(64 * 1024);
    let never_used = tokio::spawn({
        let registry = registry.clone();
        let shutdown = shutdown.clone();
        async move {
            registry
                .serve_connection(server_io, ctx, shutdown, Duration::from_secs(30))
                .await
        }
    });
    shutdown.cancel();
    within(served, "the connection to end on shutdown")
        .await
        .unwrap()
        .unwrap();
    within(conn, "the client to see the connection close")
        .await
        .unwrap()
        .unwrap();
    within(never_used, "the unused connection to end on shutdown")
        .await
        .unwrap()
        .unwrap_err();
}

/// A log sink for one test: everything `tracing` writes on this thread while `f` runs.
async fn logs_of<F: Future<Output = ()>>(f: F) -> String {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    f.await;
    drop(guard);
    String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn access_log() {
    let f = fixture();
    let registry = local_registry(&f);
    let uri = format!("/v2/library/nginx/blobs/{}", f.layer);
    let logs = logs_of(async {
        let response = registry
            .handle(request(GET, &uri, &[]), RequestContext::default())
            .await;
        response.into_body().collect().await.unwrap();
    })
    .await;
    for field in [
        " DEBUG ",
        "method=GET",
        &format!("path={uri}"),
        "status=200",
        "bytes=20",
        "source=\"local\"",
        "duration_ms=",
        "complete=true",
    ] {
        assert!(logs.contains(field), "{field:?} missing from {logs}");
    }

    let digest = Digest::of(b"x");
    let failing = Registry::new(FakeSource::new(move |_| {
        Ok(streamed(
            digest,
            10,
            vec![Err(io::Error::other("disk on fire"))],
        ))
    }));
    let logs = logs_of(async {
        let uri = format!("/v2/a/blobs/{digest}");
        let response = failing
            .handle(request(GET, &uri, &[]), RequestContext::default())
            .await;
        assert!(response.into_body().collect().await.is_err());
    })
    .await;
    assert!(logs.contains(" WARN "), "{logs}");
    assert!(logs.contains("error=disk on fire"), "{logs}");
    assert!(logs.contains("source=\"fake\""), "{logs}");
}

#[test]
fn flags() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
    }
    use clap::Parser as _;
    let defaults = Cli::try_parse_from(["spegel"]).unwrap().registry;
    assert_eq!(defaults.registry_addr, "0.0.0.0:5000".parse().unwrap());
    assert_eq!(defaults.registry_max_connections.get(), 1024);
    let set = Cli::try_parse_from([
        "spegel",
        "--registry-addr",
        "127.0.0.1:5555",
        "--registry-max-connections",
        "3",
    ])
    .unwrap()
    .registry;
    assert_eq!(set.registry_addr, "127.0.0.1:5555".parse().unwrap());
    assert_eq!(set.registry_max_connections.get(), 3);
    assert!(Cli::try_parse_from(["spegel", "--registry-max-connections", "0"]).is_err());
    assert!(Cli::try_parse_from(["spegel", "--registry-addr", "localhost"]).is_err());
    assert_eq!(defaults.registry_max_connections_per_client.get(), 64);
    assert_eq!(defaults.registry_idle_timeout, Duration::from_secs(120));
    let set = Cli::try_parse_from([
        "spegel",
        "--registry-max-connections-per-client",
        "5",
        "--registry-idle-timeout",
        "90s",
    ])
    .unwrap()
    .registry;
    assert_eq!(set.registry_max_connections_per_client.get(), 5);
    assert_eq!(set.registry_idle_timeout, Duration::from_secs(90));
    for bad in [
        ["--registry-max-connections-per-client", "0"],
        ["--registry-idle-timeout", "0s"],
        ["--registry-idle-timeout", "soon"],
    ] {
        assert!(
            Cli::try_parse_from(["spegel", bad[0], bad[1]]).is_err(),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn members_claim_blobs_and_learn_the_first_claimant() {
    use crate::{
        body::shared::SharedFetch,
        membership::{ClusterSecrets, PlaintextAuth},
        peers::burst::Claims,
    };
    let upstream = FakeSource::new(|_| Err(SourceError::NotFound));
    let shared = SharedFetch::new(upstream.clone(), None);
    let claims = Arc::new(Claims::new("coordinator".into(), shared.in_flight()));
    let auth =
        PlaintextAuth::new(&ClusterSecrets::new(&["a cluster secret, long enough"]).unwrap());
    let registry = Registry::new(upstream)
        .with_peer_auth(PeerAuth::Plaintext(auth))
        .with_claims(Some(claims));
    let digest = Digest::of(b"blob");
    let claim = |by: &str| format!("/spegel/v1/burst/claim/{digest}?by={by}");
    let member = || RequestContext {
        caller: Caller::Local,
        ..RequestContext::default()
    };
    let post = Method::POST;
    check(
        &registry,
        member(),
        request(post.clone(), &claim("first"), &[]),
        200,
        &[],
        Expect::Body(b"first"),
    )
    .await;
    check(
        &registry,
        member(),
        request(post.clone(), &claim("second"), &[]),
        200,
        &[],
        Expect::Body(b"first"),
    )
    .await;
    // Not a member: refused like content.
    let remote = RequestContext::default();
    check(
        &registry,
        remote,
        request(post.clone(), &claim("third"), &[]),
        401,
        &[],
        Expect::Code("UNAUTHORIZED"),
    )
    .await;
    check(
        &registry,
        member(),
        request(GET, &claim("third"), &[]),
        405,
        &[],
        Expect::Code("UNSUPPORTED"),
    )
    .await;
    let bad_digest = "/spegel/v1/burst/claim/sha256:nothex?by=x";
    check(
        &registry,
        member(),
        request(post.clone(), bad_digest, &[]),
        400,
        &[],
        Expect::Code("DIGEST_INVALID"),
    )
    .await;
    for by in ["", "?by=", "?by=a%20b", "?by=a/b"] {
        let uri = format!("/spegel/v1/burst/claim/{digest}{by}");
        check(
            &registry,
            member(),
            request(post.clone(), &uri, &[]),
            400,
            &[],
            Expect::Code("UNSUPPORTED"),
        )
        .await;
    }
    let uncoordinated = Registry::new(FakeSource::new(|_| Err(SourceError::NotFound)));
    check(
        &uncoordinated,
        member(),
        request(post, &claim("first"), &[]),
        404,
        &[],
        Expect::Code("UNSUPPORTED"),
    )
    .await;
}
