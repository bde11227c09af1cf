//! Why requests ended at upstream (`spegel_upstream_fallbacks_total{reason}`), read at scrape
//! time from [`FallbackStats`], which the serve policy counts into each time it asks upstream.
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
    metrics::{MetricType, counter::ConstCounter},
};

use crate::source::miss::PeerMiss;

/// Why a request was sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The peers' reason: neither this node nor a peer served it.
    Peers(PeerMiss),
    /// An intercepted tag: upstream answers tags first (peers only when it cannot).
    Tag,
    /// Nobody said why (the peers were not asked in this request's task).
    Unknown,
}

/// Every reason, in counter index order.
const REASONS: [FallbackReason; 9] = [
    FallbackReason::Peers(PeerMiss::NoPeers),
    FallbackReason::Peers(PeerMiss::NoProviders),
    FallbackReason::Peers(PeerMiss::LookupTimeout),
    FallbackReason::Peers(PeerMiss::LookupFailed),
    FallbackReason::Peers(PeerMiss::PeersFailed),
    FallbackReason::Peers(PeerMiss::PeersTimeout),
    FallbackReason::Peers(PeerMiss::NotForPeers),
    FallbackReason::Tag,
    FallbackReason::Unknown,
];

impl FallbackReason {
    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Peers(PeerMiss::NoPeers) => "no_peers",
            Self::Peers(PeerMiss::NoProviders) => "no_providers",
            Self::Peers(PeerMiss::LookupTimeout) => "lookup_timeout",
            Self::Peers(PeerMiss::LookupFailed) => "lookup_failed",
            Self::Peers(PeerMiss::PeersFailed) => "peers_failed",
            Self::Peers(PeerMiss::PeersTimeout) => "peers_timeout",
            Self::Peers(PeerMiss::NotForPeers) => "not_for_peers",
            Self::Tag => "tag",
            Self::Unknown => "unknown",
        }
    }

    fn index(self) -> usize {
        REASONS
            .iter()
            .position(|reason| *reason == self)
            .unwrap_or(REASONS.len() - 1)
    }
}

/// Requests sent upstream, by reason; counted by the serve policy (`serve::policy`).
#[derive(Debug, Default)]
pub struct FallbackStats {
    counts: [AtomicU64; REASONS.len()],
}

impl FallbackStats {
    /// Counts one request sent upstream for `reason`.
    pub fn count(&self, reason: FallbackReason) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests went upstream for `reason`.
    pub fn get(&self, reason: FallbackReason) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }
}

/// Collects [`FallbackStats`] on every scrape.
#[derive(Debug)]
pub(super) struct FallbackCollector(pub(super) Arc<FallbackStats>);

impl Collector for FallbackCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "spegel_upstream_fallbacks",
            "Requests this node's containerd made that were sent upstream, by why: the peers' \
             reason (no_peers, no_providers, lookup_timeout, lookup_failed, peers_failed, \
             peers_timeout, not_for_peers), tag (upstream answers tags first) or unknown.",
            None,
            MetricType::Counter,
        )?;
        for reason in REASONS {
            let counter = ConstCounter::new(self.0.get(reason));
            counter.encode(family.encode_family(&[("reason", reason.label())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let stats = FallbackStats::default();
        for (n, reason) in REASONS.into_iter().enumerate() {
            for _ in 0..=n {
                stats.count(reason);
            }
        }
        for (n, reason) in REASONS.into_iter().enumerate() {
            assert_eq!(stats.get(reason), n as u64 + 1, "{}", reason.label());
        }
    }
}
