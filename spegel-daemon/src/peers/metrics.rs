//! Counters of peer fetching, for metrics export.
use std::sync::atomic::{AtomicU64, Ordering};

/// Declares the counters once: the live atomics, the plain snapshot, and the copy between them.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of peer fetching, for metrics export.
        #[derive(Debug, Default)]
        pub struct FetchMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`FetchMetrics`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct FetchMetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl FetchMetrics {
            /// Current values.
            pub fn snapshot(&self) -> FetchMetricsSnapshot {
                FetchMetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Objects asked of peers (after the loop guard and tag filters).
    lookups,
    /// Objects a peer answered for.
    hits,
    /// Objects no peer served in time.
    misses,
    /// Requests refused because they came from another node (loop guard).
    mirrored_refused,
    /// Requests sent to peers, hedges and resumes included.
    attempts,
    /// Requests to peers that failed (404s included).
    attempt_failures,
    /// Requests started because earlier ones were slower than the p90 estimate.
    hedges,
    /// Peer candidates skipped because they were quarantined or backing off.
    banned_skipped,
    /// Bytes received from peers.
    bytes,
    /// Objects from peers whose bytes did not match their digest.
    verify_failures,
    /// Peers quarantined for bad bytes.
    quarantines,
    /// Blob bodies continued after a mid-stream failure (from a peer or the fallback).
    resumes,
    /// Resumes the fallback source took over.
    resume_fallbacks,
}

/// Add `n` to `counter`.
pub(super) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_copy_every_counter() {
        let metrics = FetchMetrics::default();
        bump(&metrics.lookups, 2);
        bump(&metrics.resume_fallbacks, 1);
        let snapshot = metrics.snapshot();
        assert_eq!(
            snapshot,
            FetchMetricsSnapshot {
                lookups: 2,
                resume_fallbacks: 1,
                ..FetchMetricsSnapshot::default()
            }
        );
    }
}
