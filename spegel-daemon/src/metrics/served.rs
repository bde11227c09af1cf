//! What the daemon served, by kind and by the source that had it: the `spegel_served_*`
//! counters, and [`Instrumented`], the [`Source`] wrapper that counts (and logs) every answer.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{
    oci::Kind,
    source::{Object, ObjectRequest, Source, SourceError},
};

use super::Metrics;

/// Source labels, in counter index order; an unknown source counts as the first.
const SOURCES: [&str; 3] = ["local", "peer", "upstream"];
/// Kinds, in counter index order.
const KINDS: [Kind; 2] = [Kind::Manifest, Kind::Blob];

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Manifest => "manifest",
        Kind::Blob => "blob",
    }
}

fn kind_index(kind: Kind) -> usize {
    usize::from(kind == Kind::Blob)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindSource {
    kind: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindOnly {
    kind: &'static str,
}

/// Handles on every served-object series, created (at 0) when registered so each kind and
/// source is exported from the start; counting is then one atomic add.
#[derive(Debug)]
pub(super) struct Served {
    objects: [[Counter; 3]; 2],
    bytes: [[Counter; 3]; 2],
    misses: [Counter; 2],
    errors: [Counter; 2],
}

impl Served {
    /// Registers the `spegel_served_*` families in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let by_kind_and_source = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<KindSource, Counter>::default();
            registry.register(name, help, family.clone());
            std::array::from_fn(|k| {
                std::array::from_fn(|s| {
                    family
                        .get_or_create(&KindSource {
                            kind: kind_name(KINDS[k]),
                            source: SOURCES[s],
                        })
                        .clone()
                })
            })
        };
        let by_kind = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<KindOnly, Counter>::default();
            registry.register(name, help, family.clone());
            std::array::from_fn(|k| {
                family
                    .get_or_create(&KindOnly {
                        kind: kind_name(KINDS[k]),
                    })
                    .clone()
            })
        };
        Self {
            objects: by_kind_and_source(
                registry,
                "spegel_served_objects",
                "Objects served, by kind and by the source that had them.",
            ),
            bytes: by_kind_and_source(
                registry,
                "spegel_served_bytes",
                "Body bytes served, by kind and source.",
            ),
            misses: by_kind(
                registry,
                "spegel_served_misses",
                "Requests no source could answer.",
            ),
            errors: by_kind(
                registry,
                "spegel_served_errors",
                "Requests that failed for another reason than a miss.",
            ),
        }
    }
}

/// A [`Source`] that counts and logs what the wrapped source serves.
pub struct Instrumented {
    inner: Arc<dyn Source>,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    /// Counts into `metrics` what `inner` serves.
    pub fn new(inner: Arc<dyn Source>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait::async_trait]
impl Source for Instrumented {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let served = &self.metrics.served;
        let k = kind_index(request.kind);
        let mut object = match self.inner.fetch(request).await {
            Ok(object) => object,
            Err(err) => {
                match err {
                    SourceError::NotFound => &served.misses[k],
                    _ => &served.errors[k],
                }
                .inc();
                return Err(err);
            }
        };
        let s = SOURCES
            .iter()
            .position(|s| *s == object.source)
            .unwrap_or(0);
        served.objects[k][s].inc();
        // The target the demo and the rig's log reader know these lines by.
        tracing::info!(
            target: "spegel::metrics",
            kind = kind_name(request.kind),
            repository = %request.repository,
            digest = %object.digest,
            size = object.size,
            source = object.source,
            peer_request = request.mirrored,
            head = request.head,
            "serving"
        );
        let bytes = served.bytes[k][s].clone();
        object.body.observe(move |sent| {
            bytes.inc_by(sent);
        });
        Ok(object)
    }
}
