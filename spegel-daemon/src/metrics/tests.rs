//! Counting through [`Instrumented`], and the daemon's real `/metrics` answer checked by
//! Prometheus's own `promtool`.
use std::{
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::atomic::Ordering,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, Request, header};
use http_body_util::{BodyExt as _, Empty};

use super::*;
use crate::{
    oci::{Kind, Reference, digest::Digest},
    p2p::{NodeKey, P2pConfig, RegistryAdvertise, TransportKind},
    serve::api::{Registry as Api, RequestContext},
    source::{Object, ObjectRequest, Payload, Source, SourceError},
};

struct Peerish;

#[async_trait::async_trait]
impl Source for Peerish {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        if request.repository == "missing" {
            return Err(SourceError::NotFound);
        }
        Ok(Object {
            digest: Digest::of(b"abc"),
            media_type: "application/octet-stream".into(),
            size: 3,
            range: None,
            body: Payload::Stream(Box::pin(futures::stream::iter([Ok(Bytes::from_static(
                b"abc",
            ))]))),
            source: "peer",
        })
    }
}

fn request(repository: &str) -> ObjectRequest {
    ObjectRequest {
        kind: Kind::Blob,
        registry: None,
        repository: repository.into(),
        reference: Reference::Digest(Digest::of(b"abc")),
        range: None,
        head: false,
        headers: HeaderMap::new(),
        origin: None,
        mirrored: false,
        public_only: false,
    }
}

/// Serves one blob (3 bytes from a peer) and misses one through `source`.
async fn serve_one_and_miss_one(source: &Instrumented) {
    let object = source.fetch(&request("a/b")).await.unwrap();
    let body: Vec<_> = object.body.into_body().unwrap().collect().await;
    assert_eq!(body.len(), 1);
    assert!(source.fetch(&request("missing")).await.is_err());
}

#[tokio::test]
async fn counts_objects_bytes_and_misses() {
    let metrics = Arc::new(Metrics::default());
    let source = Instrumented::new(Arc::new(Peerish), Arc::clone(&metrics));
    serve_one_and_miss_one(&source).await;
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("spegel_served_objects_total{kind=\"blob\",source=\"peer\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("spegel_served_bytes_total{kind=\"blob\",source=\"peer\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("spegel_served_misses_total{kind=\"blob\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("spegel_served_objects_total{kind=\"manifest\",source=\"local\"} 0"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

/// Metrics as the daemon wires them, every subsystem present and every counter moved.
async fn busy_metrics() -> (Arc<Metrics>, Instrumented) {
    let fetch = Arc::new(FetchMetrics::default());
    fetch.hits.fetch_add(2, Ordering::Relaxed);
    fetch.bytes.fetch_add(4096, Ordering::Relaxed);
    let blob = crate::peers::FetchTimings::index(Kind::Blob);
    fetch.timings.first_byte[blob].observe(0.2);
    fetch.timings.complete[blob].observe(1.5);
    let intercept = Arc::new(InterceptStats::default());
    intercept.accepted.fetch_add(5, Ordering::Relaxed);
    intercept.mirrored.fetch_add(3, Ordering::Relaxed);
    let mut config = P2pConfig::new(
        NodeKey::Ephemeral,
        TransportKind::Memory,
        RegistryAdvertise::Addr(SocketAddr::from(([127, 0, 0, 1], 5000))),
    );
    config.listen_addrs = vec!["/memory/0".parse().unwrap()];
    // The event loop never runs: the router's counters are all the test reads.
    let (router, _event_loop) = P2pRouter::new(config).unwrap();
    router.stats().lookups.fetch_add(7, Ordering::Relaxed);
    router.stats().bootstraps.fetch_add(3, Ordering::Relaxed);
    router.stats().lookup_durations.observe(
        crate::p2p::LookupOutcome::Found,
        std::time::Duration::from_millis(30),
    );
    let fallbacks = Arc::new(FallbackStats::default());
    fallbacks.count(FallbackReason::Tag);
    fallbacks.count(FallbackReason::Tag);
    fallbacks.count(FallbackReason::Peers(
        crate::source::miss::PeerMiss::NoProviders,
    ));
    let dials = Arc::new(crate::upstream::DialsAhead::default());
    dials.started.fetch_add(4, Ordering::Relaxed);
    dials.taken.fetch_add(3, Ordering::Relaxed);
    let metrics = Arc::new(
        Metrics::new(Some(fetch), Some(intercept), Some(router))
            .with_fallbacks(fallbacks)
            .with_dials_ahead(dials),
    );
    let api = metrics.connection_stats();
    api.refused.fetch_add(11, Ordering::Relaxed);
    api.write_timeouts.fetch_add(13, Ordering::Relaxed);
    let source = Instrumented::new(Arc::new(Peerish), Arc::clone(&metrics));
    serve_one_and_miss_one(&source).await;
    (metrics, source)
}

/// `GET /metrics` on the registry API as the daemon builds it, with `accept` if given:
/// the `Content-Type` and the body.
async fn scrape(accept: Option<&str>) -> (String, String) {
    let (metrics, source) = busy_metrics().await;
    let api = Api::new(Arc::new(source)).with_metrics(Arc::new(move || metrics.encode()));
    let mut request = Request::get("/metrics");
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    let response = api
        .handle(
            request.body(Empty::<Bytes>::new()).unwrap(),
            RequestContext::default(),
        )
        .await;
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()[header::VARY], "accept");
    let content_type = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn openmetrics_scrape_is_complete() {
    let prometheus_accept = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,\
        text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, text) = scrape(Some(prometheus_accept)).await;
    assert_eq!(content_type, Format::OpenMetrics.content_type());
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    for sample in [
        "spegel_served_bytes_total{kind=\"blob\",source=\"peer\"} 3",
        "spegel_peer_hits_total 2",
        "spegel_peer_bytes_total 4096",
        "spegel_intercept_accepted_total 5",
        "spegel_intercept_mirrored_total 3",
        "spegel_router_lookups_total 7",
        "spegel_router_bootstraps_total 3",
        "spegel_router_has_peers 0",
        "spegel_registry_refused_connections_total 11",
        "spegel_registry_write_timeouts_total 13",
        "spegel_upstream_fallbacks_total{reason=\"tag\"} 2",
        "spegel_upstream_fallbacks_total{reason=\"no_providers\"} 1",
        "spegel_upstream_fallbacks_total{reason=\"peers_timeout\"} 0",
        "spegel_upstream_dials_ahead_total 4",
        "spegel_upstream_dials_ahead_taken_total 3",
        "spegel_upstream_dials_ahead_failed_total 0",
        "spegel_peer_first_byte_seconds_count{kind=\"blob\"} 1",
        "spegel_peer_first_byte_seconds_count{kind=\"manifest\"} 0",
        "spegel_peer_fetch_duration_seconds_sum{kind=\"blob\"} 1.5",
        "spegel_peer_fetch_duration_seconds_bucket{le=\"2.5\",kind=\"blob\"} 1",
        "spegel_peer_fetch_duration_seconds_bucket{le=\"1.0\",kind=\"blob\"} 0",
        "spegel_p2p_lookup_duration_seconds_count{outcome=\"found\"} 1",
        "spegel_p2p_lookup_duration_seconds_count{outcome=\"timeout\"} 0",
        "spegel_p2p_peers{state=\"connected\"} 0",
        "spegel_p2p_peers{state=\"routing_table\"} 0",
        "spegel_advertised_keys 0",
    ] {
        assert!(text.lines().any(|line| line == sample), "{sample}: {text}");
    }
    assert!(text.contains("# TYPE spegel_peer_hits counter\n"), "{text}");
    assert!(
        text.contains("# TYPE spegel_router_has_peers gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE spegel_p2p_lookup_duration_seconds histogram\n"),
        "{text}"
    );
    // libp2p's own families come from the router's registry, before the one `# EOF`.
    assert!(
        text.contains("# TYPE libp2p_identify_errors counter\n"),
        "{text}"
    );
}

/// Runs `promtool check metrics` on `text`: its exit status and what it said.
fn promtool_check(text: &str) -> (std::process::ExitStatus, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!(
            "cannot run `promtool` ({err}): install the Debian package `prometheus` \
             (`cargo xtask prereqs` does)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, said)
}

#[tokio::test]
async fn promtool_accepts_the_prometheus_text_scrape() {
    // What `curl -H 'Accept: text/plain' …/metrics | promtool check metrics` sees.
    let (content_type, text) = scrape(Some("text/plain")).await;
    assert_eq!(content_type, Format::Prometheus.content_type());
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("spegel_served_bytes_total{kind=\"blob\",source=\"peer\"} 3\n"),
        "{text}"
    );
    let (status, said) = promtool_check(&text);
    assert!(
        status.success(),
        "promtool check metrics: {status}\n{said}\n--- input:\n{text}"
    );
}

#[test]
fn promtool_rejects_what_it_should() {
    // The check above is only worth something if promtool does complain about bad input.
    let (status, said) = promtool_check("# TYPE spegel_x counter\nspegel_x 1\n");
    assert!(!status.success(), "{said}");
}
