//! Upstream backoff: which registries are resting, and until when.
//!
//! A registry that rate-limits (429) or fails (5xx, connection failure, timeout) is remembered
//! as "backing off until T": T is now plus its `Retry-After` (seconds or an HTTP date, capped by
//! `--upstream-backoff-max`), or plus `--upstream-backoff` when it gave none. The serve policy
//! then sends the *next* intercepted tag requests for it to this node and its peers first; the
//! request in hand is never delayed, and a request nobody else can answer still goes upstream.
//! An answer from upstream ends its backoff. The map is bounded: when full, expired entries go
//! first, then the one that ends soonest.
use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::source::Origin;

/// Registries remembered at most (one entry per `host:port` containerd dialled).
const MAX_REGISTRIES: usize = 1024;

/// Which upstream registries are backing off, and until when.
#[derive(Debug)]
pub struct Backoff {
    /// After a failure without `Retry-After`.
    default: Duration,
    /// Longest backoff honoured, whatever `Retry-After` says; zero turns backoff off.
    max: Duration,
    until: Mutex<HashMap<String, Instant>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(300))
    }
}

impl Backoff {
    /// Backoff of `default` after failures that name no `Retry-After`, and never longer than
    /// `max` (zero: never back off).
    pub fn new(default: Duration, max: Duration) -> Self {
        Self {
            default,
            max,
            until: Mutex::new(HashMap::new()),
        }
    }

    /// How much longer the registry behind `origin` is backing off, if it is.
    pub fn remaining(&self, origin: &Origin) -> Option<Duration> {
        let key = key(origin);
        let mut until = self.lock();
        let end = *until.get(&key)?;
        let now = Instant::now();
        if end > now {
            return Some(end - now);
        }
        until.remove(&key);
        None
    }

    /// Upstream failed: back off for what it asked (`retry_after`), else the default, capped.
    pub fn failed(&self, origin: &Origin, retry_after: Option<Duration>) -> Duration {
        let wait = retry_after.unwrap_or(self.default).min(self.max);
        let key = key(origin);
        let mut until = self.lock();
        if wait.is_zero() {
            until.remove(&key);
            return wait;
        }
        let now = Instant::now();
        if until.len() >= MAX_REGISTRIES && !until.contains_key(&key) {
            until.retain(|_, end| *end > now);
            if until.len() >= MAX_REGISTRIES
                && let Some(soonest) = until
                    .iter()
                    .min_by_key(|(_, end)| **end)
                    .map(|(k, _)| k.clone())
            {
                until.remove(&soonest);
            }
        }
        until.insert(key, now + wait);
        wait
    }

    /// Upstream answered: whatever it said before no longer holds.
    pub fn answered(&self, origin: &Origin) {
        let key = key(origin);
        let mut until = self.lock();
        if !until.is_empty() {
            until.remove(&key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Every update leaves the map consistent: a panic elsewhere cannot corrupt it.
        self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The registry as containerd dialled it: the name it asked for and the port.
fn key(origin: &Origin) -> String {
    format!("{}:{}", origin.host, origin.addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(host: &str, port: u16) -> Origin {
        Origin {
            addr: ([10, 0, 0, 1], port).into(),
            host: host.to_owned(),
            tls: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_for_retry_after_or_the_default_capped() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let r = origin("r.test", 443);
        assert_eq!(backoff.remaining(&r), None);

        assert_eq!(backoff.failed(&r, None), Duration::from_secs(5));
        assert_eq!(backoff.remaining(&r), Some(Duration::from_secs(5)));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(backoff.remaining(&r), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(backoff.remaining(&r), None, "over when the time is up");

        assert_eq!(
            backoff.failed(&r, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(backoff.remaining(&r), Some(Duration::from_secs(30)));
        assert_eq!(
            backoff.failed(&r, Some(Duration::from_secs(86_400))),
            Duration::from_secs(60),
            "capped by the maximum"
        );
        assert_eq!(backoff.failed(&r, Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(backoff.remaining(&r), None, "Retry-After: 0 means now");
    }

    #[tokio::test(start_paused = true)]
    async fn registries_back_off_separately_and_answers_end_it() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let (a, a_other_port, b) = (
            origin("a.test", 443),
            origin("a.test", 5443),
            origin("b.test", 443),
        );
        backoff.failed(&a, None);
        assert!(backoff.remaining(&a).is_some());
        assert_eq!(backoff.remaining(&a_other_port), None);
        assert_eq!(backoff.remaining(&b), None);
        backoff.answered(&a);
        assert_eq!(backoff.remaining(&a), None);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_maximum_turns_backoff_off() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::ZERO);
        let r = origin("r.test", 443);
        backoff.failed(&r, Some(Duration::from_secs(30)));
        backoff.failed(&r, None);
        assert_eq!(backoff.remaining(&r), None);
        assert_eq!(backoff.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_is_bounded() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(600));
        for port in 0..MAX_REGISTRIES as u16 {
            // The first registry ends soonest.
            backoff.failed(
                &origin("r.test", port),
                Some(Duration::from_secs(10 + u64::from(port))),
            );
        }
        assert_eq!(backoff.len(), MAX_REGISTRIES);
        let newcomer = origin("new.test", 1);
        backoff.failed(&newcomer, None);
        assert_eq!(backoff.len(), MAX_REGISTRIES);
        assert!(backoff.remaining(&newcomer).is_some());
        assert_eq!(
            backoff.remaining(&origin("r.test", 0)),
            None,
            "the entry ending soonest made room"
        );
        assert!(backoff.remaining(&origin("r.test", 1)).is_some());

        // Expired entries go before live ones.
        tokio::time::advance(Duration::from_secs(20)).await;
        backoff.failed(&origin("newer.test", 1), None);
        assert_eq!(backoff.len(), MAX_REGISTRIES - 10);
    }
}
