//! Tags answered in upstream's place (`spegel_tag_fallbacks_total{source}`) and mirror-mode
//! tags left to a reachable upstream, read at scrape time from [`TagStats`], which the serve policy counts into.
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::counter::ConstCounter,
};

/// Tags answered in upstream's place, and tags left to upstream, counted by the serve policy
/// (`serve::policy`) and exported here.
#[derive(Debug, Default)]
pub struct TagStats {
    /// Answered by this node's store while upstream was unreachable.
    pub from_local: AtomicU64,
    /// Answered by a peer while upstream was unreachable.
    pub from_peers: AtomicU64,
    /// Mirror mode: upstream was reachable, so containerd was sent there (404).
    pub left_to_upstream: AtomicU64,
}

/// Collects [`TagStats`] on every scrape.
#[derive(Debug)]
pub(super) struct TagCollector(pub(super) Arc<TagStats>);

impl Collector for TagCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        {
            let mut family = encoder.encode_descriptor(
                "spegel_tag_fallbacks",
                "Tags answered in upstream's place (upstream unreachable, failing or backing \
                 off), by who answered: this node's store or a peer.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (source, value) in [("local", &stats.from_local), ("peer", &stats.from_peers)] {
                let counter = ConstCounter::new(value.load(Ordering::Relaxed));
                counter.encode(family.encode_family(&[("source", source)])?)?;
            }
        }
        let counter = ConstCounter::new(stats.left_to_upstream.load(Ordering::Relaxed));
        counter.encode(encoder.encode_descriptor(
            "spegel_tags_left_to_upstream",
            "Mirror-mode tag requests answered 404 because the registry was reachable: \
             containerd asks it itself.",
            None,
            counter.metric_type(),
        )?)
    }
}
