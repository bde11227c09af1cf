//! Counters and latency histograms of peer fetching, for metrics export.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use crate::{
    oci::Kind,
    source::{Body, Object, Payload},
};

/// Declares the counters once: the live atomics, the plain snapshot, and the copy between them.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of peer fetching, for metrics export.
        #[derive(Debug, Default)]
        pub struct FetchMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// How long objects served by a peer took, by kind.
            pub timings: FetchTimings,
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

/// Bucket bounds (seconds) of peer fetch durations: a manifest or small layer from a node in
/// the same zone takes milliseconds; a large layer seconds to minutes.
const FETCH_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Latency of objects a peer served (GET only; HEAD requests and misses are not timed), by kind
/// (index 0 manifests, 1 blobs):
/// - **first byte**: from the request reaching this source to an answer it can respond with:
///   for a blob, the winning peer's headers; for a manifest, its verified bytes;
/// - **complete**: to the body's last byte, verified (a blob read by the verify-before-send
///   buffer is read at the peer's pace; one streamed to containerd at containerd's).
#[derive(Debug)]
pub struct FetchTimings {
    pub first_byte: [Histogram; 2],
    pub complete: [Histogram; 2],
}

impl Default for FetchTimings {
    fn default() -> Self {
        let buckets = || std::array::from_fn(|_| Histogram::new(FETCH_BUCKETS));
        Self {
            first_byte: buckets(),
            complete: buckets(),
        }
    }
}

impl FetchTimings {
    /// The histogram index of `kind`.
    pub const fn index(kind: Kind) -> usize {
        match kind {
            Kind::Manifest => 0,
            Kind::Blob => 1,
        }
    }

    pub(super) fn first_byte(&self, kind: Kind, elapsed: Duration) {
        self.first_byte[Self::index(kind)].observe(elapsed.as_secs_f64());
    }

    pub(super) fn complete(&self, kind: Kind, elapsed: Duration) {
        self.complete[Self::index(kind)].observe(elapsed.as_secs_f64());
    }
}

/// Records `object`'s first byte now (`started` is when the request reached the peer source)
/// and, once its body has handed out its last byte (or ended) without an error, its completion.
pub(super) fn time(metrics: &Arc<FetchMetrics>, kind: Kind, started: Instant, object: &mut Object) {
    metrics.timings.first_byte(kind, started.elapsed());
    let len = object
        .range
        .as_ref()
        .map_or(object.size, |range| range.end() - range.start() + 1);
    if let Some(body) = object.body.take() {
        object.body = Payload::Stream(Box::pin(TimedBody {
            inner: body,
            metrics: Arc::clone(metrics),
            kind,
            started,
            remaining: len,
            failed: false,
        }));
    }
}

/// A peer body that records its completion when its last byte is through (verified: the
/// verifier holds the last chunk back until the digest checks). At the last byte, not at the
/// end of the stream: a server that knows the length stops reading there.
struct TimedBody {
    inner: Body,
    metrics: Arc<FetchMetrics>,
    kind: Kind,
    started: Instant,
    /// Bytes still to come.
    remaining: u64,
    /// An error ended the body, or its end was recorded: nothing more to record.
    failed: bool,
}

impl TimedBody {
    fn record(&mut self) {
        if !self.failed {
            self.failed = true;
            self.metrics
                .timings
                .complete(self.kind, self.started.elapsed());
        }
    }
}

impl Stream for TimedBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = ready!(self.inner.as_mut().poll_next(cx));
        match &item {
            Some(Ok(chunk)) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                if self.remaining == 0 {
                    self.record();
                }
            }
            Some(Err(_)) => self.failed = true,
            None => self.record(),
        }
        Poll::Ready(item)
    }
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
