//! Tags answered in upstream's place (`spegel_tag_fallbacks_total{source}`) and mirror-mode
//! tags left to a reachable upstream, read at scrape time from the serve policy's [`TagStats`].
use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::counter::ConstCounter,
};

use crate::serve::policy::TagStats;

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
