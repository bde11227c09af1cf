//! A p90 estimate of how long peers take to answer with headers, over a ring of recent samples.
use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

/// How many recent samples the estimate is taken over.
const WINDOW: usize = 64;
/// Below this many samples the estimate is the configured initial value: one or two fast
/// answers say little and would make hedging fire far too eagerly.
const MIN_SAMPLES: usize = 5;
/// Hedging sooner than this only doubles load on a healthy LAN; the scheduler's jitter alone is
/// in this range.
const FLOOR: Duration = Duration::from_millis(10);
/// A p90 above this means peers are overloaded or far away; waiting longer before hedging would
/// let one bad peer stall a pull. (Spegel's histogram also stops at 500 ms.)
const CEILING: Duration = Duration::from_millis(500);

/// Recent "time to response headers" of successful peer requests.
pub(super) struct LatencyEstimator {
    initial: Duration,
    ring: Mutex<Ring>,
}

struct Ring {
    samples: [Duration; WINDOW],
    len: usize,
    next: usize,
}

impl LatencyEstimator {
    /// An estimator that answers `initial` until it has seen enough samples.
    pub(super) fn new(initial: Duration) -> Self {
        Self {
            initial: initial.clamp(FLOOR, CEILING),
            ring: Mutex::new(Ring {
                samples: [Duration::ZERO; WINDOW],
                len: 0,
                next: 0,
            }),
        }
    }

    /// Record one successful request's time to headers.
    pub(super) fn record(&self, sample: Duration) {
        // A poisoned lock only means another thread panicked mid-update of plain numbers.
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let next = ring.next;
        ring.samples[next] = sample;
        ring.next = (next + 1) % WINDOW;
        ring.len = (ring.len + 1).min(WINDOW);
    }

    /// The 90th percentile of recent samples, clamped to a sensible band.
    pub(super) fn p90(&self) -> Duration {
        let mut sorted = {
            let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if ring.len < MIN_SAMPLES {
                return self.initial;
            }
            ring.samples[..ring.len].to_vec()
        };
        sorted.sort_unstable();
        // Nearest-rank percentile: the smallest sample with at least 90 % of samples at or below.
        let rank = (sorted.len() * 9).div_ceil(10);
        sorted[rank.saturating_sub(1)].clamp(FLOOR, CEILING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn initial_until_enough_samples() {
        let est = LatencyEstimator::new(50 * MS);
        assert_eq!(est.p90(), 50 * MS);
        for _ in 0..MIN_SAMPLES - 1 {
            est.record(200 * MS);
        }
        assert_eq!(est.p90(), 50 * MS);
        est.record(200 * MS);
        assert_eq!(est.p90(), 200 * MS);
    }

    #[test]
    fn percentile_and_clamping() {
        let est = LatencyEstimator::new(50 * MS);
        for i in 1..=10 {
            est.record(i * 20 * MS);
        }
        // 20..=200 ms: the 9th of 10 is 180 ms.
        assert_eq!(est.p90(), 180 * MS);
        // The window forgets: 64 fast samples push the slow ones out, then the floor applies.
        for _ in 0..WINDOW {
            est.record(MS);
        }
        assert_eq!(est.p90(), FLOOR);
        for _ in 0..WINDOW {
            est.record(10 * CEILING);
        }
        assert_eq!(est.p90(), CEILING);
    }
}
