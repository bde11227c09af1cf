//! Upstream faults against an in-process hyper server on loopback that stalls or breaks blob
//! bodies and answers 503/429: bodies resume with `Range` (bounded, never splicing other bytes),
//! and failures set the backoff while answers end it.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt as _, stream::BoxStream};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use tokio::net::TcpListener;

use super::{request, short_timeouts};
use crate::{
    oci::{ByteRange, Kind, Reference, digest::Digest},
    source::{Body, Origin, Source as _, SourceError},
    upstream::{Backoff, UpstreamClient, UpstreamSource},
};

const DATA: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// How a response body ends after the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Finish,
    /// Nothing more, ever (the client's idle timeout ends it).
    Stall,
    /// The connection breaks.
    Break,
}

/// One answer: status, headers, body bytes and how the body ends.
struct Plan {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    end: End,
}

/// The answer to request number `n` (from 0), given its `Range` header.
type Planner = Arc<dyn Fn(usize, Option<&str>) -> Plan + Send + Sync>;

struct Server {
    addr: SocketAddr,
    /// The `Range` header of every request, in order.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }

    fn origin(&self) -> Origin {
        Origin {
            addr: self.addr,
            host: "registry.test".into(),
            tls: false,
        }
    }
}

type FrameStream = BoxStream<'static, Result<Frame<Bytes>, io::Error>>;

async fn server(planner: Planner) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ranges);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let planner = Arc::clone(&planner);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let range = request
                        .headers()
                        .get(http::header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(range.clone());
                        seen.len() - 1
                    };
                    let plan = planner(n, range.as_deref());
                    let first = futures::stream::iter([Ok(Frame::data(Bytes::from(plan.body)))]);
                    let frames: FrameStream = match plan.end {
                        End::Finish => first.boxed(),
                        End::Stall => first.chain(futures::stream::pending()).boxed(),
                        // A moment after the bytes, so that they reach the client first.
                        End::Break => first
                            .chain(futures::stream::once(async {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                Err(io::Error::other("break"))
                            }))
                            .boxed(),
                    };
                    let mut response = Response::builder().status(plan.status);
                    for (name, value) in plan.headers {
                        response = response.header(name, value);
                    }
                    let response = response.body(StreamBody::new(frames)).unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Server { addr, ranges, task }
}

/// `bytes=a-b` → `(a, b)`.
fn parse_range(range: &str) -> (usize, usize) {
    let (a, b) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// `DATA` as a registry serves it (206 for a range), cut after `cut` bytes ending as `end`.
fn serve(range: Option<&str>, cut: Option<(usize, End)>) -> Plan {
    let (status, first, last) = match range {
        Some(range) => {
            let (a, b) = parse_range(range);
            (206, a, b)
        }
        None => (200, 0, DATA.len() - 1),
    };
    let mut headers = vec![("content-length", (last - first + 1).to_string())];
    if status == 206 {
        headers.push((
            "content-range",
            format!("bytes {first}-{last}/{}", DATA.len()),
        ));
    }
    let mut body = DATA[first..=last].to_vec();
    let mut end = End::Finish;
    if let Some((n, how)) = cut {
        body.truncate(n);
        end = how;
    }
    Plan {
        status,
        headers,
        body,
        end,
    }
}

fn source(resumes: usize) -> UpstreamSource {
    let client = UpstreamClient::with_roots(RootCertStore::empty(), short_timeouts()).unwrap();
    UpstreamSource::new(client).with_resumes(resumes)
}

/// Fetches `digest` (or a range of it) and reads the body: the bytes it gave before it ended,
/// and its error, if any.
async fn fetch(
    server: &Server,
    resumes: usize,
    digest: Digest,
    range: Option<ByteRange>,
) -> (Vec<u8>, Option<io::Error>) {
    let mut req = request(Kind::Blob, Reference::Digest(digest), Some(server.origin()));
    req.range = range;
    let object = source(resumes).fetch(&req).await.unwrap();
    drain(object.body.into_body().unwrap()).await
}

async fn drain(mut body: Body) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    let read = async {
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(err) => return Some(err),
            }
        }
        None
    };
    let err = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("every body ends");
    (out, err)
}

#[tokio::test]
async fn stalled_and_broken_bodies_resume_with_range() {
    for end in [End::Stall, End::Break] {
        let server = server(Arc::new(move |n, range| {
            serve(range, (n == 0).then_some((10, end)))
        }))
        .await;
        let (bytes, err) = fetch(&server, 3, Digest::of(DATA), None).await;
        assert!(err.is_none(), "{end:?}: {err:?}");
        assert_eq!(bytes, DATA, "{end:?}");
        assert_eq!(
            server.ranges(),
            [None, Some("bytes=10-35".to_owned())],
            "{end:?}"
        );
    }
}

#[tokio::test]
async fn a_range_resumes_within_itself() {
    let server = server(Arc::new(|n, range| {
        serve(range, (n == 0).then_some((6, End::Break)))
    }))
    .await;
    let range = ByteRange::From {
        start: 4,
        end: Some(29),
    };
    let (bytes, err) = fetch(&server, 3, Digest::of(DATA), Some(range)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(bytes, &DATA[4..30]);
    assert_eq!(
        server.ranges(),
        [
            Some("bytes=4-29".to_owned()),
            Some("bytes=10-29".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_resume_never_splices_other_bytes() {
    let wrong_bytes: Planner = Arc::new(|n, range| {
        let mut plan = serve(range, (n == 0).then_some((10, End::Break)));
        if n > 0 {
            plan.body.iter_mut().for_each(|b| *b = b'!');
        }
        plan
    });
    let cases: [(&str, Planner); 3] = [
        (
            "upstream ignores Range",
            Arc::new(|n, _| serve(None, (n == 0).then_some((10, End::Break)))),
        ),
        (
            "another span",
            Arc::new(|n, range| {
                let range = range.map(|_| "bytes=0-35");
                serve(range, (n == 0).then_some((10, End::Break)))
            }),
        ),
        ("the right span with wrong bytes", wrong_bytes),
    ];
    for (name, planner) in cases {
        let server = server(planner).await;
        let (bytes, err) = fetch(&server, 3, Digest::of(DATA), None).await;
        let err = err.unwrap_or_else(|| panic!("{name}: the body must fail"));
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{name}: {err}");
        assert_eq!(bytes, &DATA[..10], "{name}: only the right bytes got out");
        assert_eq!(server.ranges().len(), 2, "{name}: no second resume");
    }
}

#[tokio::test]
async fn resumes_are_bounded() {
    // Every answer carries five bytes, then breaks.
    let server = server(Arc::new(|_, range| serve(range, Some((5, End::Break))))).await;
    let (bytes, err) = fetch(&server, 2, Digest::of(DATA), None).await;
    let err = err.expect("the body fails once the resumes are used up");
    assert!(err.to_string().contains("after 2 resumes"), "{err}");
    assert_eq!(bytes, &DATA[..15]);
    assert_eq!(
        server.ranges(),
        [
            None,
            Some("bytes=5-35".to_owned()),
            Some("bytes=10-35".to_owned())
        ]
    );
}

#[tokio::test]
async fn failures_set_the_backoff_and_answers_end_it() {
    let server = server(Arc::new(|n, range| match n {
        0 => Plan {
            status: 503,
            headers: vec![("retry-after", "7".to_owned())],
            body: b"busy".to_vec(),
            end: End::Finish,
        },
        1 => Plan {
            status: 429,
            headers: Vec::new(),
            body: Vec::new(),
            end: End::Finish,
        },
        _ => serve(range, None),
    }))
    .await;
    let backoff = Arc::new(Backoff::new(
        Duration::from_secs(2),
        Duration::from_secs(60),
    ));
    let upstream = source(0).with_backoff(Arc::clone(&backoff));
    let origin = server.origin();
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(DATA)),
        Some(origin.clone()),
    );

    // The request in hand gets upstream's answer at once.
    let result = upstream.fetch(&req).await;
    assert!(
        matches!(&result, Err(SourceError::Upstream { status, .. }) if status.as_u16() == 503),
        "{result:?}"
    );
    let remaining = backoff.remaining(&origin).expect("503 backs off");
    assert!(
        remaining > Duration::from_secs(6) && remaining <= Duration::from_secs(7),
        "Retry-After: 7 gave {remaining:?}"
    );

    let result = upstream.fetch(&req).await;
    assert!(
        matches!(&result, Err(SourceError::Upstream { status, .. }) if status.as_u16() == 429),
        "{result:?}"
    );
    let remaining = backoff.remaining(&origin).expect("429 backs off");
    assert!(
        remaining > Duration::from_secs(1) && remaining <= Duration::from_secs(2),
        "no Retry-After: the default, got {remaining:?}"
    );

    let object = upstream.fetch(&req).await.unwrap();
    assert_eq!(drain(object.body.into_body().unwrap()).await.0, DATA);
    assert_eq!(
        backoff.remaining(&origin),
        None,
        "an answer ends the backoff"
    );

    // Nobody listening: a connection failure backs off with the default.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = Origin {
        addr: closed.local_addr().unwrap(),
        host: "gone.test".into(),
        tls: false,
    };
    drop(closed);
    let req = request(
        Kind::Blob,
        Reference::Digest(Digest::of(DATA)),
        Some(gone.clone()),
    );
    assert!(matches!(
        upstream.fetch(&req).await,
        Err(SourceError::Unavailable(_))
    ));
    assert!(backoff.remaining(&gone).is_some());
}
