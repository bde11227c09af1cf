//! Object fetches and passthrough against fake registries on loopback (TLS and plain).
//! Resumes and backoff, against a fake that stalls and breaks bodies, are in `faults`.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Timeouts, UpstreamClient, UpstreamSource, redirect::MAX_REDIRECTS};

mod faults;
mod warm;
use crate::{
    oci::{ByteRange, Kind, Reference, digest::Digest},
    source::{Body, ObjectRequest, Origin, Source as _, SourceError},
};

/// What a fake registry saw.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

enum Reply {
    Respond(Response<Full<Bytes>>),
    /// Accept the request and never answer.
    Hang,
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A registry fake on 127.0.0.1:0, TLS when given a server config.
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted, and those of them that ended.
    connections: Arc<Connections>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Connections {
    accepted: AtomicUsize,
    ended: AtomicUsize,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn fake(tls: Option<Arc<ServerConfig>>, handler: Handler) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_server = Arc::clone(&seen);
    let connections = Arc::new(Connections::default());
    let counted = Arc::clone(&connections);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counted.accepted.fetch_add(1, Ordering::SeqCst);
            let counted = Arc::clone(&counted);
            let handler = Arc::clone(&handler);
            let seen = Arc::clone(&seen_by_server);
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    let seen = Arc::clone(&seen);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let record = Seen {
                            method: parts.method,
                            path_and_query: parts
                                .uri
                                .path_and_query()
                                .map(|pq| pq.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                        };
                        seen.lock().unwrap().push(record.clone());
                        match handler(&record) {
                            Reply::Respond(response) => Ok::<_, Infallible>(response),
                            Reply::Hang => std::future::pending().await,
                        }
                    }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    Some(config) => match TlsAcceptor::from(config).accept(tcp).await {
                        Ok(stream) => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Err(_) => Ok(()),
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
                counted.ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Fake {
        addr,
        seen,
        connections,
        task,
    }
}

/// A test CA and a server certificate for `registry.test`, `localhost` and 127.0.0.1.
struct Pki {
    roots: RootCertStore,
    server: Arc<ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![
        "registry.test".to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
    Pki {
        roots,
        server: Arc::new(server),
    }
}

fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(500),
        response: Duration::from_millis(500),
        tag_response: Duration::from_millis(500),
        idle: Duration::from_millis(500),
    }
}

fn source(pki: &Pki) -> UpstreamSource {
    UpstreamSource::new(UpstreamClient::with_roots(pki.roots.clone(), Timeouts::default()).unwrap())
}

fn origin(fake: &Fake, tls: bool) -> Origin {
    Origin {
        addr: fake.addr,
        host: "registry.test".to_owned(),
        tls,
    }
}

fn request(kind: Kind, reference: Reference, origin: Option<Origin>) -> ObjectRequest {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer secret"),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("containerd/2.1"),
    );
    headers.insert("x-not-forwarded", HeaderValue::from_static("1"));
    ObjectRequest {
        kind,
        registry: Some("registry.test".to_owned()),
        repository: "library/app".to_owned(),
        reference,
        range: None,
        head: false,
        headers,
        origin,
        mirrored: false,
        public_only: false,
    }
}

fn respond(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> Reply {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    Reply::Respond(response.body(Full::new(Bytes::from_static(body))).unwrap())
}

async fn collect(body: Body) -> Result<Vec<u8>, io::Error> {
    let mut body = body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

const BLOB: &[u8] = b"0123456789";

fn blob_handler() -> Handler {
    Arc::new(|seen: &Seen| {
        if seen.path_and_query.contains(&Digest::of(BLOB).to_string()) {
            if let Some(range) = seen.headers.get(header::RANGE) {
                assert_eq!(range, "bytes=2-5");
                return respond(206, &[("content-range", "bytes 2-5/10")], b"2345");
            }
            return respond(200, &[("content-type", "application/octet-stream")], BLOB);
        }
        // Any other digest: serve the wrong bytes.
        respond(200, &[], b"not the content")
    })
}

#[tokio::test]
async fn fetches_and_verifies_a_blob() {
    let pki = pki();
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let digest = Digest::of(BLOB);
    let req = request(
        Kind::Blob,
        Reference::Digest(digest),
        Some(origin(&registry, true)),
    );
    let object = source(&pki).fetch(&req).await.unwrap();
    assert_eq!(object.digest, digest);
    assert_eq!(object.size, 10);
    assert_eq!(object.source, "upstream");
    assert_eq!(
        collect(object.body.into_body().unwrap()).await.unwrap(),
        BLOB
    );
    let seen = registry.seen();
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(
        seen[0].path_and_query,
        format!("/v2/library/app/blobs/{digest}")
    );
    assert_eq!(
        seen[0].headers[header::HOST],
        format!("registry.test:{}", registry.addr.port())
    );
    assert_eq!(seen[0].headers[header::AUTHORIZATION], "Bearer secret");
    assert_eq!(seen[0].headers[header::USER_AGENT], "containerd/2.1");
    assert!(!seen[0].headers.contains_key("x-not-forwarded"));
}

#[tokio::test]
async fn wrong_bytes_end_the_body_with_an_error() {
    let pki = pki();
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    // Same length as the served bytes, so only the digest can tell.
    let digest = Digest::of(b"NOT THE CONTENT");
    let req = request(
        Kind::Blob,
        Reference::Digest(digest),
        Some(origin(&registry, true)),
    );
    let object = source(&pki).fetch(&req).await.unwrap();
    let err = collect(object.body.into_body().unwrap()).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn forwards_ranges() {
    let pki = pki();
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let mut req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin(&registry, true)),
    );
    req.range = Some(ByteRange::From {
        start: 2,
        end: Some(5),
    });
    let object = source(&pki).fetch(&req).await.unwrap();
    assert_eq!(object.range, Some(2..=5));
    assert_eq!(object.size, 10);
    assert_eq!(
        collect(object.body.into_body().unwrap()).await.unwrap(),
        b"2345"
    );
    assert_eq!(registry.seen()[0].headers[header::RANGE], "bytes=2-5");
}

#[tokio::test]
async fn manifests_are_verified() {
    const MANIFEST: &[u8] = br#"{"schemaVersion":2}"#;
    let pki = pki();
    let digest = Digest::of(MANIFEST);
    let announced = digest.to_string();
    let registry = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(move |seen: &Seen| {
            let headers = [
                ("content-type", "application/vnd.oci.image.manifest.v1+json"),
                ("docker-content-digest", announced.as_str()),
            ];
            if seen.path_and_query.ends_with("/manifests/latest") {
                respond(200, &headers, MANIFEST)
            } else if seen.path_and_query.ends_with("/manifests/lying") {
                // Announces a digest the bytes do not have.
                respond(200, &headers, b"{}")
            } else if seen.path_and_query.ends_with(&announced) {
                respond(200, &headers, MANIFEST)
            } else {
                respond(200, &[], b"{}")
            }
        }),
    )
    .await;
    let upstream = source(&pki);
    let at = Some(origin(&registry, true));

    let object = upstream
        .fetch(&request(
            Kind::Manifest,
            Reference::Digest(digest),
            at.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(
        object.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        collect(object.body.into_body().unwrap()).await.unwrap(),
        MANIFEST
    );
    // containerd's Accept was absent: the manifest types were asked for.
    assert!(
        registry.seen()[0].headers[header::ACCEPT]
            .to_str()
            .unwrap()
            .contains("application/vnd.oci.image.index.v1+json")
    );

    let by_tag = upstream
        .fetch(&request(
            Kind::Manifest,
            Reference::Tag("latest".into()),
            at.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(by_tag.digest, digest);
    assert_eq!(by_tag.size, MANIFEST.len() as u64);

    let lying = upstream
        .fetch(&request(
            Kind::Manifest,
            Reference::Tag("lying".into()),
            at.clone(),
        ))
        .await;
    assert!(
        matches!(lying, Err(SourceError::Unavailable(_))),
        "{lying:?}"
    );

    let other = Digest::of(b"something else");
    let wrong = upstream
        .fetch(&request(Kind::Manifest, Reference::Digest(other), at))
        .await;
    assert!(
        matches!(wrong, Err(SourceError::Unavailable(_))),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn challenges_pass_through_and_404_is_not_found() {
    let pki = pki();
    let registry = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(|seen: &Seen| {
            if seen.path_and_query.contains("/missing/") {
                return respond(404, &[], b"");
            }
            respond(
                401,
                &[
                    (
                        "www-authenticate",
                        r#"Bearer realm="https://auth.test/token",service="registry.test""#,
                    ),
                    ("content-type", "application/json"),
                    ("connection", "close"),
                ],
                br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            )
        }),
    )
    .await;
    let upstream = source(&pki);
    let at = Some(origin(&registry, true));
    let err = upstream
        .fetch(&request(
            Kind::Manifest,
            Reference::Tag("v1".into()),
            at.clone(),
        ))
        .await
        .unwrap_err();
    let SourceError::Upstream {
        status,
        headers,
        body,
    } = err
    else {
        panic!("expected the upstream answer, got {err:?}");
    };
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers[header::WWW_AUTHENTICATE],
        r#"Bearer realm="https://auth.test/token",service="registry.test""#
    );
    assert!(!headers.contains_key(header::CONNECTION));
    assert_eq!(&body[..], br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);

    let mut missing = request(Kind::Manifest, Reference::Tag("v1".into()), at);
    missing.repository = "missing/app".into();
    assert!(matches!(
        upstream.fetch(&missing).await,
        Err(SourceError::NotFound)
    ));
}

#[tokio::test]
async fn follows_redirects_and_drops_credentials_across_hosts() {
    let pki = pki();
    let cdn = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let cdn_port = cdn.addr.port();
    let digest = Digest::of(BLOB);
    let registry = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(move |seen: &Seen| {
            if seen.path_and_query.starts_with("/v2/") {
                // First hop: same host, relative Location.
                let location = format!("/redirected/{digest}");
                return Reply::Respond(
                    Response::builder()
                        .status(302)
                        .header(header::LOCATION, location)
                        .body(Full::default())
                        .unwrap(),
                );
            }
            // Second hop: another host (resolved with DNS), carrying a signed query.
            let location = format!("https://localhost:{cdn_port}/v2/x/blobs/{digest}?sig=abc");
            Reply::Respond(
                Response::builder()
                    .status(307)
                    .header(header::LOCATION, location)
                    .body(Full::default())
                    .unwrap(),
            )
        }),
    )
    .await;
    let req = request(
        Kind::Blob,
        Reference::Digest(digest),
        Some(origin(&registry, true)),
    );
    // The fakes are all on loopback, where redirects go only when the operator allows it.
    let client = UpstreamClient::with_roots_allowing_redirects_to(
        pki.roots.clone(),
        Timeouts::default(),
        vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
    )
    .unwrap();
    let object = UpstreamSource::new(client).fetch(&req).await.unwrap();
    assert_eq!(
        collect(object.body.into_body().unwrap()).await.unwrap(),
        BLOB
    );

    let at_registry = registry.seen();
    assert_eq!(at_registry.len(), 2);
    assert!(
        at_registry
            .iter()
            .all(|seen| seen.headers[header::AUTHORIZATION] == "Bearer secret")
    );
    let at_cdn = cdn.seen();
    assert_eq!(at_cdn.len(), 1);
    assert_eq!(
        at_cdn[0].path_and_query,
        format!("/v2/x/blobs/{digest}?sig=abc")
    );
    assert_eq!(
        at_cdn[0].headers[header::HOST],
        format!("localhost:{cdn_port}")
    );
    assert!(!at_cdn[0].headers.contains_key(header::AUTHORIZATION));
    assert_eq!(at_cdn[0].headers[header::USER_AGENT], "containerd/2.1");
}

/// The intercepted origin on loopback is fine (it is not a redirect), but its redirect to
/// `localhost` (another host, resolved with DNS) or to a loopback IP is refused unless allowed.
#[tokio::test]
async fn redirects_to_loopback_are_refused() {
    let pki = pki();
    let cdn = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let cdn_port = cdn.addr.port();
    let digest = Digest::of(BLOB);
    for host in ["localhost", "127.0.0.1", "[::ffff:127.0.0.1]"] {
        let location = format!("https://{host}:{cdn_port}/v2/x/blobs/{digest}");
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(move |_: &Seen| {
                Reply::Respond(
                    Response::builder()
                        .status(307)
                        .header(header::LOCATION, location.clone())
                        .body(Full::default())
                        .unwrap(),
                )
            }),
        )
        .await;
        let req = request(
            Kind::Blob,
            Reference::Digest(digest),
            Some(origin(&registry, true)),
        );
        let result = source(&pki).fetch(&req).await;
        let Err(SourceError::Unavailable(message)) = &result else {
            panic!("{host}: {result:?}");
        };
        assert!(
            message.contains("refusing redirect") && message.contains("loopback"),
            "{host}: {message}"
        );
        assert_eq!(
            registry.seen().len(),
            1,
            "{host}: the origin itself is asked"
        );
        assert!(cdn.seen().is_empty(), "{host}: the redirect was followed");
    }
}

#[tokio::test]
async fn redirect_loops_are_bounded() {
    let pki = pki();
    let registry = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(|_: &Seen| respond(302, &[("location", "/again")], b"")),
    )
    .await;
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin(&registry, true)),
    );
    let result = source(&pki).fetch(&req).await;
    assert!(
        matches!(result, Err(SourceError::Unavailable(_))),
        "{result:?}"
    );
    assert_eq!(registry.seen().len(), MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn untrusted_certificates_are_refused() {
    let pki = pki();
    let other = self::pki();
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin(&registry, true)),
    );
    let result = source(&other).fetch(&req).await;
    let Err(SourceError::Unavailable(msg)) = result else {
        panic!("expected a TLS failure, got {result:?}");
    };
    assert!(msg.contains("certificate"), "{msg}");
    assert!(registry.seen().is_empty());
    // The right CA but the wrong name: refused too.
    let mut wrong_name = origin(&registry, true);
    wrong_name.host = "elsewhere.test".to_owned();
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(wrong_name),
    );
    assert!(matches!(
        source(&pki).fetch(&req).await,
        Err(SourceError::Unavailable(_))
    ));
}

#[tokio::test]
async fn plain_http_origins_work() {
    let registry = fake(None, blob_handler()).await;
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin(&registry, false)),
    );
    let object = source(&pki()).fetch(&req).await.unwrap();
    assert_eq!(
        collect(object.body.into_body().unwrap()).await.unwrap(),
        BLOB
    );
}

#[tokio::test]
async fn only_intercepted_requests_are_fetched() {
    let pki = pki();
    let upstream = source(&pki);
    let req = request(Kind::Blob, Reference::Digest(Digest::of(BLOB)), None);
    assert!(matches!(
        upstream.fetch(&req).await,
        Err(SourceError::NotFound)
    ));
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let mut mirrored = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin(&registry, true)),
    );
    mirrored.mirrored = true;
    assert!(matches!(
        upstream.fetch(&mirrored).await,
        Err(SourceError::NotFound)
    ));
    let mut bad = request(
        Kind::Manifest,
        Reference::Tag("v1".into()),
        Some(origin(&registry, true)),
    );
    bad.repository = "../../etc".into();
    assert!(matches!(
        upstream.fetch(&bad).await,
        Err(SourceError::Invalid(_))
    ));
    assert!(registry.seen().is_empty());
}

#[tokio::test]
async fn every_wait_is_bounded() {
    let pki = pki();
    let client = UpstreamClient::with_roots(pki.roots.clone(), short_timeouts()).unwrap();
    let upstream = UpstreamSource::new(client.clone());
    let digest = Digest::of(BLOB);

    // A peer that accepts TCP and never speaks TLS.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_origin = Origin {
        addr: silent.local_addr().unwrap(),
        host: "registry.test".into(),
        tls: true,
    };
    let req = request(Kind::Blob, Reference::Digest(digest), Some(silent_origin));
    let result = tokio::time::timeout(Duration::from_secs(10), upstream.fetch(&req))
        .await
        .expect("bounded by the connect timeout");
    assert!(
        matches!(result, Err(SourceError::Unavailable(_))),
        "{result:?}"
    );

    // A registry that takes the request and never answers.
    let hanging = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(|_: &Seen| Reply::Hang),
    )
    .await;
    let req = request(
        Kind::Blob,
        Reference::Digest(digest),
        Some(origin(&hanging, true)),
    );
    let result = tokio::time::timeout(Duration::from_secs(10), upstream.fetch(&req))
        .await
        .expect("bounded by the response timeout");
    let Err(SourceError::Unavailable(msg)) = result else {
        panic!("expected a timeout, got {result:?}");
    };
    assert!(msg.contains("did not answer"), "{msg}");
    assert_eq!(hanging.seen().len(), 1);
}

#[tokio::test]
async fn a_stalled_body_is_aborted() {
    // Headers and half the body, then silence: hand-written HTTP over plain TCP.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await.unwrap();
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let client = UpstreamClient::with_roots(RootCertStore::empty(), short_timeouts()).unwrap();
    let origin = Origin {
        addr,
        host: "registry.test".into(),
        tls: false,
    };
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(BLOB)),
        Some(origin),
    );
    // Not resumed: the stall itself ends the body (resumes are tested in `faults`).
    let object = UpstreamSource::new(client)
        .with_resumes(0)
        .fetch(&req)
        .await
        .unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        collect(object.body.into_body().unwrap()),
    )
    .await
    .expect("bounded by the idle timeout")
    .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    server.abort();
}

#[tokio::test]
async fn forward_passes_requests_through_verbatim() {
    let pki = pki();
    let registry = fake(
        Some(Arc::clone(&pki.server)),
        Arc::new(|seen: &Seen| {
            Reply::Respond(
                Response::builder()
                    .status(if seen.path_and_query.starts_with("/token") {
                        200
                    } else {
                        401
                    })
                    .header("www-authenticate", "Bearer realm=x")
                    .header("connection", "keep-alive, x-hop")
                    .header("x-hop", "1")
                    .header("x-end", "2")
                    .body(Full::new(seen.body.clone()))
                    .unwrap(),
            )
        }),
    )
    .await;
    let client = UpstreamClient::with_roots(pki.roots.clone(), Timeouts::default()).unwrap();
    let at = origin(&registry, true);

    let request = Request::builder()
        .method(Method::POST)
        .uri("/token?scope=repository%3Alibrary%2Fapp%3Apull")
        .header(header::HOST, "registry.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "1")
        .body(Full::new(Bytes::from_static(b"grant_type=refresh_token")))
        .unwrap();
    let response = client.forward(&at, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-end"], "2");
    assert!(!response.headers().contains_key("x-hop"));
    assert!(!response.headers().contains_key(header::CONNECTION));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"grant_type=refresh_token");

    let seen = registry.seen();
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(
        seen[0].path_and_query,
        "/token?scope=repository%3Alibrary%2Fapp%3Apull"
    );
    assert_eq!(seen[0].headers[header::HOST], "registry.test");
    assert_eq!(
        seen[0].headers[header::CONTENT_TYPE],
        "application/x-www-form-urlencoded"
    );
    assert!(!seen[0].headers.contains_key("x-client-hop"));

    // An HTTP/2-style request: the host is in the URI, not in a Host header.
    let probe = Request::builder()
        .method(Method::GET)
        .uri("https://registry.test/v2/")
        .version(Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = client.forward(&at, probe).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer realm=x");
    let seen = registry.seen();
    assert_eq!(seen[1].path_and_query, "/v2/");
    assert_eq!(seen[1].headers[header::HOST], "registry.test");
}

#[tokio::test]
async fn forward_failures_become_gateway_errors() {
    let client = UpstreamClient::with_roots(RootCertStore::empty(), short_timeouts()).unwrap();
    let request = || Request::new(Empty::<Bytes>::new());
    let response = client.forward_or_respond(None, request()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // Nothing listens there any more: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let refused = Origin {
        addr,
        host: "registry.test".into(),
        tls: false,
    };
    let response = client.forward_or_respond(Some(&refused), request()).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);

    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = Origin {
        addr: silent.local_addr().unwrap(),
        host: "registry.test".into(),
        tls: false,
    };
    let response = client.forward_or_respond(Some(&hanging), request()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
}
