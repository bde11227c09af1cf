//! Prometheus metrics: one `prometheus-client` registry holding every counter the daemon
//! exports, rendered at `/metrics` in the exposition format the scraper asks for.
//!
//! What was served from where is counted by [`Instrumented`] (which also logs every served
//! object once); the counters the subsystems keep themselves (peer fetching, interception, the
//! router, the registry API's connections) are read at scrape time by a collector.
use std::sync::Arc;

use prometheus_client::{encoding::text, registry::Registry};

use crate::{intercept::InterceptStats, p2p::P2pRouter, peers::FetchMetrics};

mod access;
mod ca;
mod collect;
mod dials;
mod exposition;
mod fallbacks;
mod format;
pub mod recent;
mod served;
mod subsystems;
mod tags;
#[cfg(test)]
mod tests;

pub use access::AccessStats;
#[doc(hidden)]
pub use exposition::exposition_of_every_family;
pub use fallbacks::{FallbackReason, FallbackStats};
pub use format::Format;
pub use served::Instrumented;
pub use subsystems::ConnectionStats;
pub use tags::TagStats;

use served::Served;
use subsystems::Subsystems;

/// Every metric the daemon exports, in one registry.
pub struct Metrics {
    registry: Registry,
    served: Served,
    api: Arc<ConnectionStats>,
    /// Whose registry holds libp2p's own metrics, encoded after ours.
    libp2p: Option<P2pRouter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None, None, None)
    }
}

impl Metrics {
    /// Metrics over the counters the subsystems keep (each optional).
    pub fn new(
        fetch: Option<Arc<FetchMetrics>>,
        intercept: Option<Arc<InterceptStats>>,
        router: Option<P2pRouter>,
    ) -> Self {
        let mut registry = Registry::default();
        let served = Served::register(&mut registry);
        let api = Arc::new(ConnectionStats::default());
        let libp2p = router.clone();
        registry.register_collector(Box::new(Subsystems {
            api: Arc::clone(&api),
            fetch,
            intercept,
            router,
        }));
        Self {
            registry,
            served,
            api,
            libp2p,
        }
    }

    /// The registry API's connection counters, for the server to count into.
    pub fn connection_stats(&self) -> Arc<ConnectionStats> {
        Arc::clone(&self.api)
    }

    /// Also exports the serve policy's tag counters (`spegel_tag_fallbacks_total`, ...).
    pub fn with_tags(mut self, stats: Arc<TagStats>) -> Self {
        self.registry
            .register_collector(Box::new(tags::TagCollector(stats)));
        self
    }

    /// Also exports who was given content from peers (`spegel_access_*`).
    pub fn with_access(mut self, stats: Arc<AccessStats>) -> Self {
        self.registry
            .register_collector(Box::new(access::AccessCollector(stats)));
        self
    }

    /// Also exports why requests were sent upstream (`spegel_upstream_fallbacks_total`).
    pub fn with_fallbacks(mut self, stats: Arc<FallbackStats>) -> Self {
        self.registry
            .register_collector(Box::new(fallbacks::FallbackCollector(stats)));
        self
    }

    /// Also exports what became of the upstream dials made ahead (`spegel_upstream_dials_ahead_*`).
    pub fn with_dials_ahead(mut self, stats: Arc<crate::upstream::DialsAhead>) -> Self {
        self.registry
            .register_collector(Box::new(dials::DialsCollector(stats)));
        self
    }

    /// Also exports the node CA's continuity stats (`spegel_ca_*`).
    pub fn with_ca(mut self, stats: Arc<crate::tls::continuity::CaStats>) -> Self {
        self.registry
            .register_collector(Box::new(ca::CaCollector(stats)));
        self
    }

    /// The OpenMetrics text exposition of every metric, `# EOF` included
    /// (see [`Format::render`] for the Prometheus text format).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry)?;
        if let Some(router) = &self.libp2p {
            text::encode_registry(&mut out, router.libp2p_metrics())?;
        }
        text::encode_eof(&mut out)?;
        Ok(out)
    }
}
