//! Prometheus metrics: what was served from where, plus the counters each subsystem keeps,
//! rendered in the text exposition format at `/metrics`. Also logs every served object once,
//! with the source that served it (the demo reads those lines).
use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::StreamExt as _;

use crate::{
    intercept::InterceptStats, oci::Kind, p2p::P2pRouter, peers::FetchMetrics, source::Object,
    source::ObjectRequest, source::Source, source::SourceError,
};

const SOURCES: [&str; 3] = ["local", "peer", "upstream"];
const KINDS: [Kind; 2] = [Kind::Manifest, Kind::Blob];

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Manifest => "manifest",
        Kind::Blob => "blob",
    }
}

/// Counters of served objects, by kind and source.
#[derive(Debug, Default)]
struct Served {
    objects: [[AtomicU64; 3]; 2],
    bytes: [[AtomicU64; 3]; 2],
    misses: [AtomicU64; 2],
    errors: [AtomicU64; 2],
}

/// Every counter the daemon exports.
#[derive(Default)]
pub struct Metrics {
    served: Served,
    pub fetch: Option<Arc<FetchMetrics>>,
    pub intercept: Option<Arc<InterceptStats>>,
    pub router: Option<P2pRouter>,
}

impl Metrics {
    /// Metrics over the counters the subsystems keep (each optional).
    pub fn new(
        fetch: Option<Arc<FetchMetrics>>,
        intercept: Option<Arc<InterceptStats>>,
        router: Option<P2pRouter>,
    ) -> Self {
        Self {
            served: Served::default(),
            fetch,
            intercept,
            router,
        }
    }

    /// The text exposition of every counter.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str| -> std::fmt::Result {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} counter")
        };
        counter(
            &mut out,
            "spegel_served_objects_total",
            "Objects served, by kind and by the source that had them.",
        )?;
        for (k, kind) in KINDS.iter().enumerate() {
            for (s, source) in SOURCES.iter().enumerate() {
                let n = self.served.objects[k][s].load(Ordering::Relaxed);
                writeln!(
                    out,
                    "spegel_served_objects_total{{kind=\"{}\",source=\"{source}\"}} {n}",
                    kind_name(*kind)
                )?;
            }
        }
        counter(
            &mut out,
            "spegel_served_bytes_total",
            "Body bytes served, by kind and source.",
        )?;
        for (k, kind) in KINDS.iter().enumerate() {
            for (s, source) in SOURCES.iter().enumerate() {
                let n = self.served.bytes[k][s].load(Ordering::Relaxed);
                writeln!(
                    out,
                    "spegel_served_bytes_total{{kind=\"{}\",source=\"{source}\"}} {n}",
                    kind_name(*kind)
                )?;
            }
        }
        counter(
            &mut out,
            "spegel_served_misses_total",
            "Requests no source could answer.",
        )?;
        for (k, kind) in KINDS.iter().enumerate() {
            writeln!(
                out,
                "spegel_served_misses_total{{kind=\"{}\"}} {}",
                kind_name(*kind),
                self.served.misses[k].load(Ordering::Relaxed)
            )?;
        }
        counter(
            &mut out,
            "spegel_served_errors_total",
            "Requests that failed for another reason than a miss.",
        )?;
        for (k, kind) in KINDS.iter().enumerate() {
            writeln!(
                out,
                "spegel_served_errors_total{{kind=\"{}\"}} {}",
                kind_name(*kind),
                self.served.errors[k].load(Ordering::Relaxed)
            )?;
        }
        if let Some(fetch) = &self.fetch {
            let s = fetch.snapshot();
            for (name, value, help) in [
                (
                    "spegel_peer_lookups_total",
                    s.lookups,
                    "DHT lookups for peer fetches.",
                ),
                (
                    "spegel_peer_hits_total",
                    s.hits,
                    "Objects served by a peer.",
                ),
                (
                    "spegel_peer_misses_total",
                    s.misses,
                    "Peer fetches that found no usable peer.",
                ),
                (
                    "spegel_peer_attempts_total",
                    s.attempts,
                    "Requests sent to peers.",
                ),
                (
                    "spegel_peer_attempt_failures_total",
                    s.attempt_failures,
                    "Peer requests that failed.",
                ),
                (
                    "spegel_peer_hedges_total",
                    s.hedges,
                    "Hedged second requests fired.",
                ),
                (
                    "spegel_peer_bytes_total",
                    s.bytes,
                    "Bytes received from peers.",
                ),
                (
                    "spegel_peer_verify_failures_total",
                    s.verify_failures,
                    "Peer content that failed sha256 verification.",
                ),
                (
                    "spegel_peer_quarantines_total",
                    s.quarantines,
                    "Peers quarantined for bad content.",
                ),
                (
                    "spegel_peer_resumes_total",
                    s.resumes,
                    "Blob transfers resumed with Range after a failure.",
                ),
                (
                    "spegel_peer_resume_fallbacks_total",
                    s.resume_fallbacks,
                    "Blob transfers finished by the fallback source.",
                ),
            ] {
                counter(&mut out, name, help)?;
                writeln!(out, "{name} {value}")?;
            }
        }
        if let Some(stats) = &self.intercept {
            for (name, value, help) in [
                (
                    "spegel_intercept_accepted_total",
                    &stats.accepted,
                    "Redirected connections accepted.",
                ),
                (
                    "spegel_intercept_no_origin_total",
                    &stats.no_origin,
                    "Accepted connections with no original destination.",
                ),
                (
                    "spegel_intercept_spliced_total",
                    &stats.spliced,
                    "Connections passed through untouched.",
                ),
                (
                    "spegel_intercept_mirrored_total",
                    &stats.mirrored,
                    "Connections to mirrored registries served by spegel.",
                ),
            ] {
                counter(&mut out, name, help)?;
                writeln!(out, "{name} {}", value.load(Ordering::Relaxed))?;
            }
        }
        if let Some(router) = &self.router {
            let stats = router.stats();
            for (name, value, help) in [
                (
                    "spegel_router_lookups_total",
                    &stats.lookups,
                    "Router lookups.",
                ),
                (
                    "spegel_router_lookup_cache_hits_total",
                    &stats.lookup_cache_hits,
                    "Lookups answered from the cache.",
                ),
                (
                    "spegel_router_peers_found_total",
                    &stats.peers_found,
                    "Providers found by lookups.",
                ),
                (
                    "spegel_router_provides_ok_total",
                    &stats.provides_ok,
                    "Provider records published.",
                ),
                (
                    "spegel_router_provides_failed_total",
                    &stats.provides_failed,
                    "Provider records that failed to publish.",
                ),
            ] {
                counter(&mut out, name, help)?;
                writeln!(out, "{name} {}", value.load(Ordering::Relaxed))?;
            }
            writeln!(
                out,
                "# HELP spegel_router_has_peers Whether this node knows another node."
            )?;
            writeln!(out, "# TYPE spegel_router_has_peers gauge")?;
            writeln!(
                out,
                "spegel_router_has_peers {}",
                u8::from(crate::routing::Router::has_peers(router))
            )?;
        }
        Ok(out)
    }
}

/// A [`Source`] that counts and logs what the wrapped source serves.
pub struct Instrumented {
    inner: Arc<dyn Source>,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Source>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait::async_trait]
impl Source for Instrumented {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let k = usize::from(request.kind == Kind::Blob);
        let result = self.inner.fetch(request).await;
        let mut object = match result {
            Ok(object) => object,
            Err(err) => {
                match err {
                    SourceError::NotFound => &self.metrics.served.misses[k],
                    _ => &self.metrics.served.errors[k],
                }
                .fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
        };
        let s = SOURCES
            .iter()
            .position(|s| *s == object.source)
            .unwrap_or(0);
        self.metrics.served.objects[k][s].fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            kind = kind_name(request.kind),
            repository = %request.repository,
            digest = %object.digest,
            size = object.size,
            source = object.source,
            peer_request = request.mirrored,
            head = request.head,
            "serving"
        );
        if let Some(body) = object.body.take() {
            let metrics = Arc::clone(&self.metrics);
            object.body = Some(Box::pin(body.inspect(move |chunk| {
                if let Ok(bytes) = chunk {
                    metrics.served.bytes[k][s].fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            })));
        }
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;

    use super::*;
    use crate::{oci::Reference, oci::digest::Digest};

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
                body: Some(Box::pin(futures::stream::iter([Ok(Bytes::from_static(
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
        }
    }

    #[tokio::test]
    async fn counts_objects_bytes_and_misses() {
        let metrics = Arc::new(Metrics::default());
        let source = Instrumented::new(Arc::new(Peerish), Arc::clone(&metrics));
        let object = source.fetch(&request("a/b")).await.unwrap();
        let body: Vec<_> = object.body.unwrap().collect().await;
        assert_eq!(body.len(), 1);
        assert!(source.fetch(&request("missing")).await.is_err());
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
    }
}
