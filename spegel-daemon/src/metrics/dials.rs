//! What became of the upstream dials transparent mode makes ahead of a request
//! (`spegel_upstream_dials_ahead_*`), read at scrape time from the upstream client's
//! [`DialsAhead`]: the connections spegel opens to a registry beyond those its requests need
//! are the started ones no request took.
use std::{fmt, sync::Arc};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::upstream::DialsAhead;

/// Collects [`DialsAhead`] on every scrape.
#[derive(Debug)]
pub(super) struct DialsCollector(pub(super) Arc<DialsAhead>);

impl Collector for DialsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        super::collect::counters(
            &mut encoder,
            &[
                (
                    "spegel_upstream_dials_ahead",
                    "Connections to a mirrored registry dialled while containerd's handshake with \
                     the daemon ran, ahead of its first request.",
                    &stats.started,
                ),
                (
                    "spegel_upstream_dials_ahead_taken",
                    "Of those, connections a request took.",
                    &stats.taken,
                ),
                (
                    "spegel_upstream_dials_ahead_failed",
                    "Of those, dials that failed (the request dialled itself).",
                    &stats.failed,
                ),
            ],
        )
    }
}
