//! Counters of peer fetching, for metrics export.
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of peer fetching, for metrics export.
#[derive(Debug, Default)]
pub struct FetchMetrics {
    /// Objects asked of peers (after the loop guard and tag filters).
    pub lookups: AtomicU64,
    /// Objects a peer answered for.
    pub hits: AtomicU64,
    /// Objects no peer served in time.
    pub misses: AtomicU64,
    /// Requests refused because they came from another node (loop guard).
    pub mirrored_refused: AtomicU64,
    /// Requests sent to peers, hedges and resumes included.
    pub attempts: AtomicU64,
    /// Requests to peers that failed (404s included).
    pub attempt_failures: AtomicU64,
    /// Requests started because earlier ones were slower than the p90 estimate.
    pub hedges: AtomicU64,
    /// Peer candidates skipped because they were quarantined or backing off.
    pub banned_skipped: AtomicU64,
    /// Bytes received from peers.
    pub bytes: AtomicU64,
    /// Objects from peers whose bytes did not match their digest.
    pub verify_failures: AtomicU64,
    /// Peers quarantined for bad bytes.
    pub quarantines: AtomicU64,
    /// Blob bodies continued after a mid-stream failure (from a peer or the fallback).
    pub resumes: AtomicU64,
    /// Resumes the fallback source took over.
    pub resume_fallbacks: AtomicU64,
}

/// A point-in-time copy of [`FetchMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchMetricsSnapshot {
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    pub mirrored_refused: u64,
    pub attempts: u64,
    pub attempt_failures: u64,
    pub hedges: u64,
    pub banned_skipped: u64,
    pub bytes: u64,
    pub verify_failures: u64,
    pub quarantines: u64,
    pub resumes: u64,
    pub resume_fallbacks: u64,
}

impl FetchMetrics {
    /// Current values.
    pub fn snapshot(&self) -> FetchMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FetchMetricsSnapshot {
            lookups: get(&self.lookups),
            hits: get(&self.hits),
            misses: get(&self.misses),
            mirrored_refused: get(&self.mirrored_refused),
            attempts: get(&self.attempts),
            attempt_failures: get(&self.attempt_failures),
            hedges: get(&self.hedges),
            banned_skipped: get(&self.banned_skipped),
            bytes: get(&self.bytes),
            verify_failures: get(&self.verify_failures),
            quarantines: get(&self.quarantines),
            resumes: get(&self.resumes),
            resume_fallbacks: get(&self.resume_fallbacks),
        }
    }
}

pub(super) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}
