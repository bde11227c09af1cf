//! Who was given content from peers (`serve::access`): upstream's confirmations and refusals,
//! public content served unconfirmed, and public-only requests this node declined.
use std::{
    fmt,
    sync::{Arc, atomic::AtomicU64},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

/// Counted by `serve::access`, exported here.
#[derive(Debug, Default)]
pub struct AccessStats {
    /// Upstream confirmed, with the client's credentials, that it may read an object.
    pub confirmed: AtomicU64,
    /// Upstream refused (401, 403, 404): the client got upstream's answer, not peers' bytes.
    pub refused: AtomicU64,
    /// Upstream could not confirm (unreachable, failing): public content came from peers.
    pub public_only: AtomicU64,
    /// Another node asked for public content only, and this node did not know it to be public.
    pub withheld: AtomicU64,
}

/// Collects [`AccessStats`] on every scrape.
#[derive(Debug)]
pub(super) struct AccessCollector(pub(super) Arc<AccessStats>);

impl Collector for AccessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        super::collect::counters(
            &mut encoder,
            &[
                (
                    "spegel_access_confirmed",
                    "Objects upstream confirmed the pulling client may read (with its own \
                 credentials) before peers' copy was served.",
                    &stats.confirmed,
                ),
                (
                    "spegel_access_refused",
                    "Requests upstream refused (401/403/404): the client got upstream's answer, \
                 never peers' bytes.",
                    &stats.refused,
                ),
                (
                    "spegel_access_public_only",
                    "Objects served from peers unconfirmed because upstream could not answer: \
                 public content only.",
                    &stats.public_only,
                ),
                (
                    "spegel_access_withheld",
                    "Public-only requests from other nodes for content this node does not know to \
                 be public (answered 404).",
                    &stats.withheld,
                ),
            ],
        )
    }
}
