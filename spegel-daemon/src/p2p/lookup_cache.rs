//! Recent lookup results, reused for a short TTL (shorter for "nobody has it"), bounded in
//! entries with the least recently stored evicted first.
use std::{num::NonZeroUsize, time::Duration};

use lru::LruCache;
use tokio::time::Instant;

use super::key::ContentKey;
use crate::routing::Peer;

/// Entries in the lookup result cache, at most.
const LOOKUP_CACHE_CAPACITY: usize = 8192;
/// How long "nobody has it" stays cached. Short: content is advertised a moment after a pull
/// finishes, and a node asking just before must not be told "nobody" for the full TTL (that made
/// the next node of a rollout go upstream for seconds).
const NEGATIVE_CACHE_TTL: Duration = Duration::from_millis(500);

/// Recent lookup results.
pub(super) struct LookupCache {
    ttl: Duration,
    entries: LruCache<ContentKey, CachedLookup>,
}

struct CachedLookup {
    peers: Vec<Peer>,
    /// The query ran to its end: these are all the providers there were.
    complete: bool,
    at: Instant,
}

impl LookupCache {
    /// An empty cache whose results are reused for `ttl`; zero disables it.
    pub(super) fn new(ttl: Duration) -> Self {
        let capacity = NonZeroUsize::new(LOOKUP_CACHE_CAPACITY).unwrap_or(NonZeroUsize::MIN);
        Self {
            ttl,
            entries: LruCache::new(capacity),
        }
    }

    /// Cached providers for a lookup of `count`: fresh, and either all there are or enough.
    pub(super) fn get(&self, key: &ContentKey, count: usize, now: Instant) -> Option<&[Peer]> {
        let entry = self.entries.peek(key)?;
        let ttl = match entry.peers.is_empty() {
            true => self.ttl.min(NEGATIVE_CACHE_TTL),
            false => self.ttl,
        };
        let fresh = now.duration_since(entry.at) < ttl;
        (fresh && (entry.complete || entry.peers.len() >= count)).then_some(&entry.peers[..])
    }

    /// Stores what a lookup found; `complete` if the query ran to its end.
    pub(super) fn insert(
        &mut self,
        key: ContentKey,
        peers: Vec<Peer>,
        complete: bool,
        now: Instant,
    ) {
        if self.ttl.is_zero() {
            return;
        }
        self.entries.put(
            key,
            CachedLookup {
                peers,
                complete,
                at: now,
            },
        );
    }

    /// Drops expired entries.
    pub(super) fn purge(&mut self, now: Instant) {
        let ttl = self.ttl;
        let expired: Vec<ContentKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| now.duration_since(entry.at) >= ttl)
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            self.entries.pop(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn peer(n: u16) -> Peer {
        Peer {
            id: format!("peer-{n}"),
            addr: SocketAddr::from(([127, 0, 0, 1], n)),
        }
    }

    #[test]
    fn lookup_cache_serves_complete_or_large_enough_results() {
        let now = Instant::now();
        let mut cache = LookupCache::new(Duration::from_secs(5));
        let partial = ContentKey::of("partial");
        let complete = ContentKey::of("complete");
        cache.insert(partial, vec![peer(1)], false, now);
        cache.insert(complete, Vec::new(), true, now);
        assert_eq!(cache.get(&partial, 1, now).map(<[Peer]>::len), Some(1));
        assert!(
            cache.get(&partial, 3, now).is_none(),
            "more wanted than found"
        );
        assert_eq!(cache.get(&complete, 3, now).map(<[Peer]>::len), Some(0));
        let soon = now + NEGATIVE_CACHE_TTL;
        assert!(
            cache.get(&complete, 3, soon).is_none(),
            "\"none found\" expires early"
        );
        assert!(
            cache.get(&partial, 1, soon).is_some(),
            "found peers keep the full TTL"
        );
        let later = now + Duration::from_secs(5);
        assert!(cache.get(&partial, 1, later).is_none(), "expired");
        cache.purge(later);
        assert!(cache.entries.is_empty());

        let mut disabled = LookupCache::new(Duration::ZERO);
        disabled.insert(partial, vec![peer(1)], true, now);
        assert!(disabled.get(&partial, 1, now).is_none());
    }
}
