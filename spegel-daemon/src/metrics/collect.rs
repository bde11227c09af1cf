//! What the scrape-time collectors (`ca.rs`, `access.rs`, …) share: counters read from atomics.
use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::counter::ConstCounter,
};

/// Encodes one unlabelled counter family per `(name, help, value)`, read now.
pub(super) fn counters(
    encoder: &mut DescriptorEncoder,
    families: &[(&str, &str, &AtomicU64)],
) -> fmt::Result {
    for &(name, help, value) in families {
        let counter = ConstCounter::new(value.load(Ordering::Relaxed));
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}
