//! Lookups: finding providers of a key and their registry addresses. A lookup streams providers
//! as they are resolved, skips this node, stops at the callers' `count` or at the timeout,
//! shares one Kademlia query among concurrent callers of one key, and caches its result.
use std::{
    collections::{HashMap, HashSet, VecDeque, hash_map},
    net::SocketAddr,
    sync::atomic::Ordering,
    time::Duration,
};

use libp2p::{PeerId, Swarm, kad};
use tokio::{sync::mpsc, time::Instant};

use super::{
    LookupOutcome, Stats, addresses::PeerBook, behaviour::Behaviour, key::ContentKey,
    lookup_cache::LookupCache,
};
use crate::routing::Peer;

/// Distinct keys being looked up at once; more lookups get an empty answer.
const MAX_LOOKUPS: usize = 1024;
/// Callers sharing one in-flight lookup, at most.
const MAX_SUBSCRIBERS: usize = 256;
/// Providers one lookup considers, at most (a hostile peer could name thousands).
const MAX_CANDIDATES: usize = 1024;
/// A provider that has not answered (dial + Identify) within this long no longer holds up the
/// lookup: the next candidate is tried too (the slow one may still answer).
const RESOLVE_PATIENCE: Duration = Duration::from_secs(1);

/// What the lookups need of the rest of the router.
pub(super) struct Env<'a> {
    pub(super) swarm: &'a mut Swarm<Behaviour>,
    pub(super) peers: &'a PeerBook,
    pub(super) stats: &'a Stats,
}

/// Every lookup in flight, and recent results.
pub(super) struct Lookups {
    local: PeerId,
    timeout: Duration,
    active: HashMap<ContentKey, Lookup>,
    queries: HashMap<kad::QueryId, ContentKey>,
    /// Lookups waiting for a peer's Identify (after dialing it).
    waiting: HashMap<PeerId, Vec<ContentKey>>,
    cache: LookupCache,
}

/// One in-flight lookup, shared by every caller asking for the same key meanwhile.
struct Lookup {
    key: String,
    subscribers: Vec<Subscriber>,
    /// Providers found, resolved to registry addresses, in order.
    found: Vec<Peer>,
    /// Providers named by the DHT so far.
    seen: HashSet<PeerId>,
    /// Named providers not yet resolved.
    candidates: VecDeque<PeerId>,
    /// Providers dialed or awaiting Identify, with when that started.
    resolving: HashMap<PeerId, Instant>,
    /// The Kademlia query, while it runs.
    query: Option<kad::QueryId>,
    /// The Kademlia query ended with an error (its own timeout).
    query_failed: bool,
    started: Instant,
    deadline: Instant,
}

/// A caller of [`Lookup`]: its channel, how many peers it wants and has got.
struct Subscriber {
    tx: mpsc::Sender<Peer>,
    want: usize,
    sent: usize,
}

// === impl Lookups ===

impl Lookups {
    /// No lookups yet; each will search for at most `timeout`, results are reused for
    /// `cache_ttl`.
    pub(super) fn new(local: PeerId, timeout: Duration, cache_ttl: Duration) -> Self {
        Self {
            local,
            timeout,
            active: HashMap::new(),
            queries: HashMap::new(),
            waiting: HashMap::new(),
            cache: LookupCache::new(cache_ttl),
        }
    }

    /// A caller wants up to `count` providers of `key` on `tx`: served from the cache, by
    /// joining the lookup of that key in flight, or by a new one.
    pub(super) fn start(
        &mut self,
        env: Env<'_>,
        key: String,
        count: usize,
        tx: mpsc::Sender<Peer>,
    ) {
        env.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let content_key = ContentKey::of(&key);
        let now = Instant::now();
        if let Some(peers) = self.cache.get(&content_key, count, now) {
            env.stats.lookup_cache_hits.fetch_add(1, Ordering::Relaxed);
            for peer in peers.iter().take(count) {
                if tx.try_send(peer.clone()).is_err() {
                    break;
                }
            }
            return;
        }
        let subscriber = Subscriber::new(tx, count);
        if let Some(lookup) = self.active.get_mut(&content_key) {
            if lookup.subscribers.len() < MAX_SUBSCRIBERS {
                lookup.add_subscriber(subscriber);
                self.drive(env, content_key);
            }
            // Otherwise the caller's channel closes empty: it falls back to other sources.
            return;
        }
        if self.active.len() >= MAX_LOOKUPS {
            tracing::warn!(%key, "too many lookups in flight, answering empty");
            return;
        }
        let query = env
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(content_key.record_key());
        self.queries.insert(query, content_key);
        let lookup = Lookup::new(key, subscriber, Some(query), now, now + self.timeout);
        self.active.insert(content_key, lookup);
    }

    /// A step of a provider query: new candidates, and whether the query is over.
    pub(super) fn on_providers(
        &mut self,
        env: Env<'_>,
        query: kad::QueryId,
        result: kad::GetProvidersResult,
        last: bool,
    ) {
        let Some(&content_key) = self.queries.get(&query) else {
            return;
        };
        if let Some(lookup) = self.active.get_mut(&content_key) {
            match result {
                Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                    for peer in providers {
                        if peer != self.local
                            && lookup.seen.len() < MAX_CANDIDATES
                            && lookup.seen.insert(peer)
                        {
                            lookup.candidates.push_back(peer);
                        }
                    }
                }
                Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                Err(error) => {
                    lookup.query_failed = true;
                    tracing::debug!(key = %lookup.key, %error, "provider query ended early");
                }
            }
            if last {
                lookup.query = None;
            }
        }
        if last {
            self.queries.remove(&query);
        }
        self.drive(env, content_key);
    }

    /// Resolves candidates until the callers' needs are covered, then ends the lookup if
    /// nothing more can come.
    fn drive(&mut self, env: Env<'_>, content_key: ContentKey) {
        let now = Instant::now();
        let Some(lookup) = self.active.get_mut(&content_key) else {
            return;
        };
        lookup.prune_subscribers();
        while lookup.need() > lookup.active_resolves(now) {
            let Some(peer) = lookup.candidates.pop_front() else {
                break;
            };
            if let Some(addr) = env.peers.registry_addr(&peer, now) {
                lookup.deliver(peer, addr, env.stats);
                continue;
            }
            if env.peers.start_resolve(env.swarm, content_key, peer) {
                lookup.resolving.insert(peer, now);
                self.waiting.entry(peer).or_default().push(content_key);
            }
        }
        lookup.prune_subscribers();
        let exhausted =
            lookup.query.is_none() && lookup.candidates.is_empty() && lookup.resolving.is_empty();
        if exhausted || lookup.subscribers.is_empty() {
            self.finish(env, content_key, exhausted);
        }
    }

    /// A peer was identified, or cannot be: hands its registry address (if any) to the lookups
    /// waiting for it.
    pub(super) fn peer_resolved(&mut self, mut env: Env<'_>, peer: PeerId) {
        let Some(keys) = self.waiting.remove(&peer) else {
            return;
        };
        let addr = env.peers.registry_addr(&peer, Instant::now());
        for content_key in keys {
            if let Some(lookup) = self.active.get_mut(&content_key)
                && lookup.resolving.remove(&peer).is_some()
                && let Some(addr) = addr
            {
                lookup.deliver(peer, addr, env.stats);
            }
            self.drive(env.reborrow(), content_key);
        }
    }

    /// Ends a lookup: stops its query, closes its callers' channels, caches what it found.
    /// `complete`: nothing more could come (rather than a deadline or callers leaving).
    fn finish(&mut self, env: Env<'_>, content_key: ContentKey, complete: bool) {
        let Some(lookup) = self.active.remove(&content_key) else {
            return;
        };
        let now = Instant::now();
        if lookup.found.is_empty() {
            // A found provider was timed when it was delivered.
            let outcome = match (complete, lookup.query_failed) {
                (true, false) => Some(LookupOutcome::NotFound),
                (true, true) => Some(LookupOutcome::Error),
                (false, _) if lookup.deadline <= now => Some(LookupOutcome::Timeout),
                // Every caller left before any answer: nobody waited for the rest.
                (false, _) => None,
            };
            if let Some(outcome) = outcome {
                env.stats
                    .lookup_durations
                    .observe(outcome, now.duration_since(lookup.started));
            }
        }
        if let Some(query) = lookup.query {
            self.queries.remove(&query);
            if let Some(mut query) = env.swarm.behaviour_mut().kad.query_mut(&query) {
                query.finish();
            }
        }
        for peer in lookup.resolving.keys() {
            if let hash_map::Entry::Occupied(mut entry) = self.waiting.entry(*peer) {
                entry.get_mut().retain(|k| *k != content_key);
                if entry.get().is_empty() {
                    entry.remove();
                }
            }
        }
        tracing::debug!(
            key = %lookup.key,
            found = lookup.found.len(),
            named = lookup.seen.len(),
            complete,
            elapsed = ?lookup.started.elapsed(),
            "lookup finished"
        );
        self.cache
            .insert(content_key, lookup.found, complete, Instant::now());
    }

    /// Ends lookups past their deadline, and lets lookups whose slow providers ran out of
    /// patience try further candidates.
    pub(super) fn on_tick(&mut self, mut env: Env<'_>, now: Instant) {
        let expired: Vec<ContentKey> = self
            .active
            .iter()
            .filter(|(_, lookup)| lookup.deadline <= now)
            .map(|(key, _)| *key)
            .collect();
        for content_key in expired {
            self.finish(env.reborrow(), content_key, false);
        }
        let slow: Vec<ContentKey> = self
            .active
            .iter()
            .filter(|(_, lookup)| !lookup.candidates.is_empty() && !lookup.resolving.is_empty())
            .map(|(key, _)| *key)
            .collect();
        for content_key in slow {
            self.drive(env.reborrow(), content_key);
        }
    }

    /// Drops expired cache entries.
    pub(super) fn purge_cache(&mut self, now: Instant) {
        self.cache.purge(now);
    }
}

// === impl Env ===

impl Env<'_> {
    /// The same environment for one more call.
    fn reborrow(&mut self) -> Env<'_> {
        Env {
            swarm: self.swarm,
            peers: self.peers,
            stats: self.stats,
        }
    }
}

// === impl Subscriber ===

impl Subscriber {
    /// A caller that wants up to `want` peers on `tx`.
    fn new(tx: mpsc::Sender<Peer>, want: usize) -> Self {
        Self { tx, want, sent: 0 }
    }
}

// === impl Lookup ===

impl Lookup {
    /// A lookup of `key` for one caller so far, running `query` until `deadline`.
    fn new(
        key: String,
        subscriber: Subscriber,
        query: Option<kad::QueryId>,
        started: Instant,
        deadline: Instant,
    ) -> Self {
        Self {
            key,
            subscribers: vec![subscriber],
            found: Vec::new(),
            seen: HashSet::new(),
            candidates: VecDeque::new(),
            resolving: HashMap::new(),
            query,
            query_failed: false,
            started,
            deadline,
        }
    }

    /// Registers a caller, first handing it what was found so far.
    fn add_subscriber(&mut self, mut subscriber: Subscriber) {
        for peer in self.found.iter().take(subscriber.want) {
            if subscriber.tx.try_send(peer.clone()).is_err() {
                return;
            }
            subscriber.sent += 1;
        }
        self.subscribers.push(subscriber);
    }

    /// Providers being resolved that are still within their patience.
    fn active_resolves(&self, now: Instant) -> usize {
        self.resolving
            .values()
            .filter(|started| now.duration_since(**started) < RESOLVE_PATIENCE)
            .count()
    }

    /// The most peers any caller still wants.
    fn need(&self) -> usize {
        self.subscribers
            .iter()
            .map(|s| s.want.saturating_sub(s.sent))
            .max()
            .unwrap_or(0)
    }

    /// Drops callers that have all they asked for (closing their channel) or went away.
    fn prune_subscribers(&mut self) {
        self.subscribers
            .retain(|s| s.sent < s.want && !s.tx.is_closed());
    }

    /// Hands a resolved provider to every caller that still wants one.
    fn deliver(&mut self, peer: PeerId, addr: SocketAddr, stats: &Stats) {
        let peer = Peer {
            id: peer.to_string(),
            addr,
        };
        stats.peers_found.fetch_add(1, Ordering::Relaxed);
        if self.found.is_empty() {
            stats
                .lookup_durations
                .observe(LookupOutcome::Found, self.started.elapsed());
        }
        for subscriber in &mut self.subscribers {
            if subscriber.sent < subscriber.want {
                match subscriber.tx.try_send(peer.clone()) {
                    Ok(()) => subscriber.sent += 1,
                    // Full cannot happen (capacity = want); closed means the caller left.
                    Err(_) => subscriber.sent = subscriber.want,
                }
            }
        }
        self.found.push(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn lookup_fans_out_to_subscribers() {
        let stats = Stats::default();
        let (tx_one, mut rx_one) = mpsc::channel(1);
        let (tx_three, mut rx_three) = mpsc::channel(3);
        let now = Instant::now();
        let mut lookup = Lookup::new("k".into(), Subscriber::new(tx_one, 1), None, now, now);
        assert_eq!(lookup.need(), 1);
        let first = PeerId::random();
        lookup.deliver(first, addr(1), &stats);
        // A late subscriber gets what was found so far first.
        lookup.add_subscriber(Subscriber::new(tx_three, 3));
        lookup.prune_subscribers();
        assert_eq!(lookup.subscribers.len(), 1, "the satisfied caller is done");
        assert_eq!(lookup.need(), 2);
        lookup.deliver(PeerId::random(), addr(2), &stats);
        drop(lookup);

        assert_eq!(rx_one.try_recv().unwrap().id, first.to_string());
        assert!(rx_one.try_recv().is_err());
        let got: Vec<u16> = std::iter::from_fn(|| rx_three.try_recv().ok())
            .map(|p| p.addr.port())
            .collect();
        assert_eq!(got, [1, 2]);
        assert_eq!(stats.peers_found.load(Ordering::Relaxed), 2);

        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut lookup_gone = Lookup::new("k".into(), Subscriber::new(tx, 1), None, now, now);
        lookup_gone.prune_subscribers();
        assert!(
            lookup_gone.subscribers.is_empty(),
            "a caller that left is dropped"
        );
    }
}
