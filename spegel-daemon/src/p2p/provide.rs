//! Providing: the keys this node advertises, each re-provided on its own schedule (the interval
//! minus random jitter, sooner after a failure), with a cap on provide queries in flight.
//!
//! Kademlia's own republish job is off: it republishes every key at once. The schedule is a
//! binary heap of due times with lazy deletion (a withdrawn or rescheduled key leaves a stale
//! entry that is skipped, and the heap is rebuilt when stale entries dominate it).
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::atomic::Ordering,
    time::Duration,
};

use libp2p::{
    PeerId, Swarm,
    kad::{self, store::RecordStore as _},
};
use rand::Rng as _;
use tokio::time::Instant;

use super::{Stats, Tunables, behaviour::Behaviour, key::ContentKey};
use crate::routing::RouterError;

/// The keys this node provides and when each is (re-)provided next.
#[derive(Default)]
pub(super) struct Providing {
    keys: HashMap<ContentKey, Provided>,
    /// Due times; an entry is current only if its `seq` matches the key's (lazy deletion).
    queue: BinaryHeap<Reverse<(Instant, u64, ContentKey)>>,
    in_flight: HashMap<kad::QueryId, (ContentKey, u64)>,
    next_seq: u64,
}

struct Provided {
    key: String,
    seq: u64,
    /// `None` while a provide query runs.
    due: Option<Instant>,
}

// === impl Providing ===

impl Providing {
    /// Keys provided.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Starts providing `keys`; each is recorded in the local store at once and provided to
    /// the DHT when the schedule gets to it.
    pub(super) fn advertise(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        local: PeerId,
        keys: Vec<String>,
    ) -> Result<(), RouterError> {
        let now = Instant::now();
        let mut added = 0usize;
        let mut refused = None;
        for key in keys {
            let content_key = ContentKey::of(&key);
            if !self.add(content_key, key, now) {
                continue;
            }
            // Record it locally at once: nodes that ask us see it before the provide query runs.
            let record = kad::ProviderRecord::new(content_key.record_key(), local, Vec::new());
            if let Err(error) = swarm.behaviour_mut().kad.store_mut().add_provider(record) {
                self.remove(&content_key);
                refused = Some(error);
                continue;
            }
            added += 1;
        }
        tracing::debug!(added, total = self.keys.len(), "advertising keys");
        match refused {
            None => Ok(()),
            Some(error) => Err(RouterError::Failed(format!(
                "provider store refused a key: {error}"
            ))),
        }
    }

    /// Stops providing `keys`. Local only: other nodes forget us when our records expire.
    pub(super) fn withdraw(&mut self, swarm: &mut Swarm<Behaviour>, keys: Vec<String>) {
        let mut removed = 0usize;
        for key in keys {
            let content_key = ContentKey::of(&key);
            if self.remove(&content_key) {
                swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&content_key.record_key());
                removed += 1;
            }
        }
        tracing::debug!(removed, total = self.keys.len(), "withdrew keys");
    }

    /// Starts provide queries for the keys due by `now`, up to the in-flight cap.
    pub(super) fn start_due(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        now: Instant,
        tunables: &Tunables,
    ) {
        let limit = tunables.max_concurrent_provides.get();
        while self.in_flight.len() < limit {
            let Some((content_key, seq)) = self.pop_due(now) else {
                break;
            };
            match swarm
                .behaviour_mut()
                .kad
                .start_providing(content_key.record_key())
            {
                Ok(query) => {
                    self.in_flight.insert(query, (content_key, seq));
                }
                Err(error) => {
                    tracing::warn!(key = ?content_key, %error, "cannot start providing");
                    self.schedule(content_key, now + tunables.provide_retry);
                }
            }
        }
    }

    /// A provide query ended, having `reached` at least one peer or not.
    pub(super) fn on_provided(
        &mut self,
        query: kad::QueryId,
        reached: bool,
        tunables: &Tunables,
        stats: &Stats,
    ) {
        let Some(key) = self.finished(query, reached, Instant::now(), tunables) else {
            return;
        };
        let counter = if reached {
            &stats.provides_ok
        } else {
            &stats.provides_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if reached {
            tracing::trace!(%key, "provided");
        } else {
            tracing::debug!(%key, "provide reached no peer, will retry");
        }
    }

    /// Starts tracking a key, due now; `false` if it is already provided.
    fn add(&mut self, content_key: ContentKey, key: String, now: Instant) -> bool {
        if self.keys.contains_key(&content_key) {
            return false;
        }
        self.keys.insert(
            content_key,
            Provided {
                key,
                seq: 0,
                due: None,
            },
        );
        self.schedule(content_key, now);
        true
    }

    /// Stops tracking a key; its queue entries and in-flight query are ignored from now on.
    fn remove(&mut self, content_key: &ContentKey) -> bool {
        self.keys.remove(content_key).is_some()
    }

    fn schedule(&mut self, content_key: ContentKey, due: Instant) {
        let Some(provided) = self.keys.get_mut(&content_key) else {
            return;
        };
        self.next_seq += 1;
        provided.seq = self.next_seq;
        provided.due = Some(due);
        self.queue.push(Reverse((due, self.next_seq, content_key)));
    }

    /// The next key due by `now`, marked in flight.
    fn pop_due(&mut self, now: Instant) -> Option<(ContentKey, u64)> {
        loop {
            let Reverse((due, seq, content_key)) = *self.queue.peek()?;
            if due > now {
                return None;
            }
            self.queue.pop();
            if let Some(provided) = self.keys.get_mut(&content_key)
                && provided.seq == seq
                && provided.due.is_some()
            {
                provided.due = None;
                return Some((content_key, seq));
            }
        }
    }

    /// A provide query ended: schedules the key's next provide. Returns the key string if the
    /// query was one of ours for a key still provided.
    fn finished(
        &mut self,
        query: kad::QueryId,
        reached: bool,
        now: Instant,
        tunables: &Tunables,
    ) -> Option<String> {
        let (content_key, seq) = self.in_flight.remove(&query)?;
        let provided = self.keys.get(&content_key).filter(|p| p.seq == seq)?;
        let key = provided.key.clone();
        let due = if reached {
            now + tunables.reprovide_interval - random_up_to(tunables.reprovide_jitter)
        } else {
            now + tunables.provide_retry
        };
        self.schedule(content_key, due);
        Some(key)
    }

    /// Rebuilds the queue when stale entries (from withdrawn keys) dominate it.
    pub(super) fn compact(&mut self) {
        if self.queue.len() <= 2 * self.keys.len() + 1024 {
            return;
        }
        self.queue = self
            .keys
            .iter()
            .filter_map(|(content_key, p)| p.due.map(|due| Reverse((due, p.seq, *content_key))))
            .collect();
    }
}

fn random_up_to(max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::store::ProviderStore;

    /// Real query ids (they have no public constructor), from a behaviour that never runs.
    fn query_ids(n: usize) -> Vec<kad::QueryId> {
        let local = PeerId::random();
        let mut kad = kad::Behaviour::new(local, ProviderStore::new(local, 10));
        (0..n)
            .map(|i| kad.get_providers(ContentKey::of(&i.to_string()).record_key()))
            .collect()
    }

    fn tunables() -> Tunables {
        Tunables {
            reprovide_interval: Duration::from_secs(900),
            reprovide_jitter: Duration::from_secs(100),
            provide_retry: Duration::from_secs(30),
            ..Tunables::default()
        }
    }

    #[test]
    fn provide_schedule() {
        let t = tunables();
        let now = Instant::now();
        let queries = query_ids(3);
        let mut providing = Providing::default();
        let a = ContentKey::of("a");
        let b = ContentKey::of("b");
        assert!(providing.add(a, "a".into(), now));
        assert!(!providing.add(a, "a".into(), now), "already provided");
        assert!(providing.add(b, "b".into(), now));

        let (first, seq_first) = providing.pop_due(now).unwrap();
        let (second, seq_second) = providing.pop_due(now).unwrap();
        assert!(providing.pop_due(now).is_none(), "both in flight");
        let by_key = |key| if key == first { seq_first } else { seq_second };
        providing.in_flight.insert(queries[0], (a, by_key(a)));
        providing.in_flight.insert(queries[1], (b, by_key(b)));
        assert_ne!(first, second);

        // Success: next provide within [interval - jitter, interval].
        assert_eq!(
            providing.finished(queries[0], true, now, &t).as_deref(),
            Some("a")
        );
        let due = providing.keys[&a].due.unwrap();
        assert!(due <= now + t.reprovide_interval);
        assert!(due >= now + t.reprovide_interval - t.reprovide_jitter);
        // Nobody reached: retried sooner.
        providing.finished(queries[1], false, now, &t);
        assert_eq!(providing.keys[&b].due, Some(now + t.provide_retry));
        assert!(
            providing
                .pop_due(now + t.provide_retry - Duration::from_secs(1))
                .is_none()
        );
        assert_eq!(
            providing.pop_due(now + t.provide_retry).map(|(k, _)| k),
            Some(b)
        );

        // Withdrawn while in flight: the result is ignored and nothing is rescheduled.
        let seq = providing.keys[&b].seq;
        providing.in_flight.insert(queries[2], (b, seq));
        assert!(providing.remove(&b));
        assert_eq!(providing.finished(queries[2], true, now, &t), None);
        assert!(!providing.keys.contains_key(&b));
        assert_eq!(
            providing
                .pop_due(now + Duration::from_secs(3600))
                .map(|(k, _)| k),
            Some(a),
            "only the provided key comes due"
        );
        assert!(providing.pop_due(now + Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn stale_queue_entries_are_compacted() {
        let now = Instant::now();
        let mut providing = Providing::default();
        for i in 0..3000 {
            let key = i.to_string();
            providing.add(ContentKey::of(&key), key, now);
        }
        for i in 0..2990 {
            providing.remove(&ContentKey::of(&i.to_string()));
        }
        assert_eq!(providing.queue.len(), 3000);
        providing.compact();
        assert_eq!(providing.queue.len(), 10);
        let mut due = 0;
        while providing.pop_due(now).is_some() {
            due += 1;
        }
        assert_eq!(due, 10);
    }
}
