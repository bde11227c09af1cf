//! What this node knows about other peers across requests: how busy each is (for least-used
//! selection), which this node finished a request with moments ago (its connection is likely
//! still pooled) and which are banned for a while (bad bytes, or unreachable).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::time::Instant;

use super::POOL_IDLE;

/// Beyond this many entries, entries that carry no information any more are dropped.
const PRUNE_ABOVE: usize = 1024;

#[derive(Debug, Default)]
struct Entry {
    active: usize,
    banned_until: Option<Instant>,
    /// When this node's last request to the peer ended.
    idle_since: Option<Instant>,
}

impl Entry {
    /// Whether the connection of the last request is likely still in the pool.
    fn warm(&self, now: Instant) -> bool {
        self.idle_since
            .is_some_and(|t| now.saturating_duration_since(t) < POOL_IDLE)
    }

    /// Whether the entry still says anything.
    fn informative(&self, now: Instant) -> bool {
        self.active > 0 || self.banned_until.is_some_and(|t| t > now) || self.warm(now)
    }
}

/// Per-peer state shared by all fetches.
#[derive(Debug, Default)]
pub(super) struct PeerBook {
    entries: Mutex<HashMap<String, Entry>>,
}

impl PeerBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Plain counters and instants: a panic elsewhere cannot leave them inconsistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Skip `id` until `until` (a longer ban already in place is kept).
    pub(super) fn ban(&self, id: &str, until: Instant) {
        let mut entries = self.lock();
        let entry = entries.entry(id.to_owned()).or_default();
        entry.banned_until = Some(entry.banned_until.map_or(until, |old| old.max(until)));
        prune(&mut entries);
    }

    /// Whether `id` is banned right now.
    pub(super) fn is_banned(&self, id: &str, now: Instant) -> bool {
        self.lock()
            .get(id)
            .and_then(|e| e.banned_until)
            .is_some_and(|t| t > now)
    }

    /// Drops banned and excluded peers from `candidates` and removes and returns the least busy
    /// of the rest; among equally busy ones, one this node finished a request with within the
    /// pool's idle timeout (no new connection, no handshake), then the earliest found. Returns
    /// the peer and how many were dropped for being banned.
    pub(super) fn pick<T>(
        &self,
        candidates: &mut Vec<T>,
        id: impl Fn(&T) -> &str,
        excluded: impl Fn(&str) -> bool,
        now: Instant,
    ) -> (Option<T>, usize) {
        let entries = self.lock();
        let before = candidates.len();
        candidates.retain(|c| {
            entries
                .get(id(c))
                .and_then(|e| e.banned_until)
                .is_none_or(|t| t <= now)
        });
        let banned = before - candidates.len();
        candidates.retain(|c| !excluded(id(c)));
        let best = candidates
            .iter()
            .enumerate()
            .min_by_key(|(i, c)| {
                let entry = entries.get(id(c));
                let active = entry.map_or(0, |e| e.active);
                let cold = !entry.is_some_and(|e| e.warm(now));
                (active, cold, *i)
            })
            .map(|(i, _)| i);
        (best.map(|i| candidates.remove(i)), banned)
    }

    /// Count a request to `id` as active until the guard is dropped.
    pub(super) fn activate(self: &Arc<Self>, id: &str) -> Active {
        let mut entries = self.lock();
        entries.entry(id.to_owned()).or_default().active += 1;
        prune(&mut entries);
        drop(entries);
        Active {
            book: Arc::clone(self),
            id: id.to_owned(),
        }
    }
}

/// One request to a peer in progress (headers or body).
pub(super) struct Active {
    book: Arc<PeerBook>,
    id: String,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut entries = self.book.lock();
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.active = entry.active.saturating_sub(1);
            entry.idle_since = Some(Instant::now());
        }
    }
}

/// Beyond [`PRUNE_ABOVE`] entries, drops those that say nothing any more.
fn prune(entries: &mut HashMap<String, Entry>) {
    if entries.len() > PRUNE_ABOVE {
        let now = Instant::now();
        entries.retain(|_, e| e.informative(now));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn picks_least_busy_and_skips_banned() {
        let book = Arc::new(PeerBook::default());
        let now = Instant::now();
        let _a = book.activate("a");
        let mut peers = vec!["a", "b", "c"];
        let (picked, banned) = book.pick(&mut peers, |p| p, |_| false, now);
        assert_eq!((picked, banned), (Some("b"), 0));
        assert_eq!(peers, ["a", "c"]);

        book.ban("c", now + Duration::from_secs(60));
        assert!(book.is_banned("c", now));
        assert!(!book.is_banned("c", now + Duration::from_secs(61)));
        let mut peers = vec!["a", "c", "d"];
        let (picked, banned) = book.pick(&mut peers, |p| p, |p| p == "d", now);
        assert_eq!((picked, banned), (Some("a"), 1));
        assert!(peers.is_empty());
    }

    #[test]
    fn bans_only_extend_and_active_is_released() {
        let book = Arc::new(PeerBook::default());
        let now = Instant::now();
        book.ban("a", now + Duration::from_secs(60));
        book.ban("a", now + Duration::from_secs(1));
        assert!(book.is_banned("a", now + Duration::from_secs(30)));
        {
            let _b1 = book.activate("b");
            let _b2 = book.activate("b");
            assert_eq!(book.lock()["b"].active, 2);
        }
        assert_eq!(book.lock()["b"].active, 0);
    }

    #[test]
    fn among_equally_busy_peers_one_just_used_comes_first() {
        let book = Arc::new(PeerBook::default());
        drop(book.activate("b"));
        let now = Instant::now();
        let mut peers = vec!["a", "b", "c"];
        assert_eq!(book.pick(&mut peers, |p| p, |_| false, now).0, Some("b"));

        // Busy outweighs warm: a peer still answering another request is not piled on.
        let busy = book.activate("b");
        let mut peers = vec!["a", "b"];
        assert_eq!(book.pick(&mut peers, |p| p, |_| false, now).0, Some("a"));
        drop(busy);

        // Once the pool has closed its connection, it is one peer among others.
        let later = Instant::now() + POOL_IDLE;
        let mut peers = vec!["a", "b"];
        assert_eq!(book.pick(&mut peers, |p| p, |_| false, later).0, Some("a"));
    }

    #[test]
    fn entries_that_say_nothing_are_pruned() {
        let book = Arc::new(PeerBook::default());
        for i in 0..=PRUNE_ABOVE {
            drop(book.activate(&i.to_string()));
        }
        // All warm: nothing to prune yet.
        assert_eq!(book.lock().len(), PRUNE_ABOVE + 1);
        let long_ago = Instant::now() - POOL_IDLE;
        for entry in book.lock().values_mut() {
            entry.idle_since = Some(long_ago);
        }
        drop(book.activate("x"));
        assert_eq!(book.lock().len(), 1);
    }
}
