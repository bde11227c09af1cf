//! The listener's connection counters (read by the metrics endpoint).
use std::sync::atomic::AtomicU64;

/// Counters of the listener.
#[derive(Debug, Default)]
pub struct InterceptStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Accepted connections with no recorded original destination (closed at once).
    pub no_origin: AtomicU64,
    /// Connections passed through to their original destination.
    pub spliced: AtomicU64,
    /// Connections handed to the mirrored-registry handler.
    pub mirrored: AtomicU64,
}
