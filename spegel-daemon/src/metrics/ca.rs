//! The node CA's continuity gauges and counters (`spegel_ca_*`), read at scrape time from the
//! [`CaStats`] the CA set keeps: a CA that no longer covers the mirrored registries, or nears
//! expiry, shows here as well as in the log.
use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::gauge::ConstGauge,
};

use crate::tls::continuity::CaStats;

/// Collects [`CaStats`] on every scrape.
#[derive(Debug)]
pub(super) struct CaCollector(pub(super) Arc<CaStats>);

impl Collector for CaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        for (name, help, value) in [
            (
                "spegel_ca_uncovered_registries",
                "Mirrored registry names the node CA containerd trusts does not cover; their \
                 connections are passed through until the next CA is trusted.",
                stats.uncovered_registries.load(Ordering::Relaxed) as i64,
            ),
            (
                "spegel_ca_next_pending",
                "1 while a next node CA waits for containerd to trust it (run `spegel \
                 node-setup`, or `spegel install-ca` and restart containerd).",
                stats.next_pending.load(Ordering::Relaxed) as i64,
            ),
            (
                "spegel_ca_current_not_after_seconds",
                "When the node CA containerd trusts expires (Unix time; 0 without one).",
                stats.current_not_after.load(Ordering::Relaxed),
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        super::collect::counters(
            &mut encoder,
            &[
                (
                    "spegel_ca_minted",
                    "Next node CAs minted beside the current one.",
                    &stats.minted,
                ),
                (
                    "spegel_ca_promoted",
                    "Next node CAs promoted to current once containerd trusted them.",
                    &stats.promoted,
                ),
                (
                    "spegel_ca_spliced_uncovered",
                    "TLS connections to mirrored registries passed through because the trusted \
                 node CA does not cover them.",
                    &stats.spliced_uncovered,
                ),
            ],
        )
    }
}
