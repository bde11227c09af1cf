//! The task that owns the libp2p swarm: it serves the handles' commands, runs lookups, the
//! provide schedule and bootstrap, and learns peers' registry addresses from Identify.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque, hash_map},
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport as _,
    core::{
        ConnectedPoint,
        muxing::StreamMuxerBox,
        transport::{Boxed, MemoryTransport},
        upgrade::Version,
    },
    dns, identify,
    identity::Keypair,
    kad::{self, store::RecordStore as _},
    noise,
    swarm::{
        self, ConnectionId, DialError, NetworkBehaviour, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
    tcp, yamux,
};
use rand::Rng as _;
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use super::{
    Command, ContentKey, DnsSeed, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, P2pConfig, P2pError,
    Shared, Stats, TransportKind, Tunables,
    bootstrap::StaticSeed,
    registry_addr::{self, RegistryCache},
    store::ProviderStore,
};
use crate::routing::{Peer, RouterError};

/// Limit on connection setup (TCP/memory + noise + yamux).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Distinct keys being looked up at once; more lookups get an empty answer.
const MAX_LOOKUPS: usize = 1024;
/// Callers sharing one in-flight lookup, at most.
const MAX_SUBSCRIBERS: usize = 256;
/// Providers one lookup considers, at most (a hostile peer could name thousands).
const MAX_CANDIDATES: usize = 1024;
/// Entries in the lookup result cache, at most.
const LOOKUP_CACHE_CAPACITY: usize = 8192;
/// How long "nobody has it" stays cached. Short: content is advertised a moment after a pull
/// finishes, and a node asking just before must not be told "nobody" for the full TTL (that made
/// the next node of a rollout go upstream for seconds).
const NEGATIVE_CACHE_TTL: Duration = Duration::from_millis(500);
/// Peers whose registry address is remembered, at most.
const REGISTRY_CACHE_CAPACITY: usize = 16_384;
/// How often expired provider records and cache entries are dropped.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// A provider that has not answered (dial + Identify) within this long no longer holds up the
/// lookup: the next candidate is tried too (the slow one may still answer).
const RESOLVE_PATIENCE: Duration = Duration::from_secs(1);
/// Callers waiting for the first listen address, at most.
const MAX_LISTEN_WAITERS: usize = 64;

/// A DNS seed resolution in progress.
type DnsLookup = Pin<Box<dyn Future<Output = io::Result<Vec<Multiaddr>>> + Send>>;

/// The protocols the swarm speaks.
#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<ProviderStore>,
    identify: identify::Behaviour,
}

/// The router's event loop. Run it with [`EventLoop::run`]; it ends when the token is cancelled
/// or every [`super::P2pRouter`] handle is dropped.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    tunables: Tunables,
    local: PeerId,
    kad_protocol: StreamProtocol,

    seeds: Vec<StaticSeed>,
    dns_seed: Option<DnsSeed>,
    dns_seed_port: u16,
    dns_lookup: Option<DnsLookup>,
    /// Dials to seeds of unknown peer id still under way, by address.
    seed_dials: HashMap<Multiaddr, ConnectionId>,
    bootstrap_at: Instant,
    bootstrap_backoff: Duration,
    routing_table_size: usize,

    listen_addrs: Vec<Multiaddr>,
    /// Whether loopback listen addresses are announced (only when told to listen on loopback).
    announce_loopback: bool,
    listen_waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    connections: HashMap<ConnectionId, Connection>,
    registry: RegistryCache,

    lookups: HashMap<ContentKey, Lookup>,
    lookup_queries: HashMap<kad::QueryId, ContentKey>,
    /// Lookups waiting for a peer's Identify (after dialing it).
    waiting: HashMap<PeerId, Vec<ContentKey>>,
    cache: LookupCache,

    providing: Providing,
    next_purge: Instant,
}

/// An established connection, as far as registry addresses are concerned.
#[derive(Debug)]
struct Connection {
    peer: PeerId,
    endpoint: ConnectedPoint,
    /// Identify has answered on this connection.
    identified: bool,
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
    started: Instant,
    deadline: Instant,
}

/// A caller of [`Lookup`]: its channel, how many peers it wants and has got.
struct Subscriber {
    tx: mpsc::Sender<Peer>,
    want: usize,
    sent: usize,
}

/// Recent lookup results.
struct LookupCache {
    ttl: Duration,
    entries: HashMap<ContentKey, CachedLookup>,
}

struct CachedLookup {
    peers: Vec<Peer>,
    /// The query ran to its end: these are all the providers there were.
    complete: bool,
    at: Instant,
}

/// The keys this node provides and when each is (re-)provided next.
#[derive(Default)]
struct Providing {
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

// === impl EventLoop ===

impl EventLoop {
    pub(super) fn new(
        config: &P2pConfig,
        keypair: &Keypair,
        commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
    ) -> Result<Self, P2pError> {
        let tunables = config.tunables.clone();
        let local = keypair.public().to_peer_id();
        let transport = build_transport(config.transport, keypair)?;

        let kad_protocol = StreamProtocol::new(KAD_PROTOCOL);
        let mut kad_config = kad::Config::new(kad_protocol.clone());
        kad_config
            .set_query_timeout(tunables.query_timeout)
            // No value records: nothing to replicate or republish.
            .set_replication_interval(None)
            .set_publication_interval(None)
            .set_provider_record_ttl(Some(tunables.provider_record_ttl))
            // Re-providing is scheduled here, spread out and bounded; libp2p's job would
            // republish every key at once.
            .set_provider_publication_interval(None)
            // Bootstrap is driven here, with seeds and backoff.
            .set_periodic_bootstrap_interval(None);
        let mut kad = kad::Behaviour::with_config(
            local,
            ProviderStore::new(local, tunables.max_stored_keys),
            kad_config,
        );
        // Every node serves the DHT; without this libp2p waits for a confirmed external address.
        kad.set_mode(Some(kad::Mode::Server));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), keypair.public())
                .with_agent_version(registry_addr::agent_version(config.registry))
                .with_push_listen_addr_updates(true),
        );
        let mut swarm = Swarm::new(
            transport,
            Behaviour { kad, identify },
            local,
            swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(tunables.idle_connection_timeout),
        );
        for addr in &config.listen_addrs {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| P2pError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        }

        let now = Instant::now();
        Ok(Self {
            swarm,
            commands,
            shared,
            local,
            kad_protocol,
            seeds: config
                .bootstrap_peers
                .iter()
                .cloned()
                .map(StaticSeed::new)
                .collect(),
            dns_seed: config.bootstrap_dns.clone(),
            dns_seed_port: config.default_seed_port(),
            dns_lookup: None,
            seed_dials: HashMap::new(),
            bootstrap_at: now,
            bootstrap_backoff: tunables.bootstrap_backoff_min,
            routing_table_size: 0,
            listen_addrs: Vec::new(),
            announce_loopback: config
                .listen_addrs
                .iter()
                .all(|addr| registry_addr::ip_of(addr).is_some_and(|ip| ip.is_loopback())),
            listen_waiters: Vec::new(),
            connections: HashMap::new(),
            registry: RegistryCache::new(tunables.registry_addr_ttl, REGISTRY_CACHE_CAPACITY),
            lookups: HashMap::new(),
            lookup_queries: HashMap::new(),
            waiting: HashMap::new(),
            cache: LookupCache {
                ttl: tunables.lookup_cache_ttl,
                entries: HashMap::new(),
            },
            providing: Providing::default(),
            next_purge: now + PURGE_INTERVAL,
            tunables,
        })
    }

    /// Drives the swarm until `shutdown` is cancelled or every handle is dropped. Open lookups
    /// end (their channels close) and connections drop when it returns.
    #[tracing::instrument(name = "p2p", skip_all, fields(peer_id = %self.local))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.tunables.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let bootstrap = tokio::time::sleep_until(self.bootstrap_at);
        tokio::pin!(bootstrap);

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => {
                    // Counting the table walks every bucket, so it is counted on each tick;
                    // only the first peer is noticed at once, to leave bootstrap backoff early.
                    let first_peer = self.routing_table_size == 0
                        && matches!(
                            event,
                            SwarmEvent::Behaviour(BehaviourEvent::Kad(
                                kad::Event::RoutingUpdated { .. }
                            ))
                        );
                    self.on_swarm_event(event);
                    if first_peer {
                        self.refresh_routing_table_size();
                    }
                }
                () = &mut bootstrap => self.on_bootstrap_timer(),
                seeds = poll_option(&mut self.dns_lookup) => {
                    self.dns_lookup = None;
                    self.on_dns_seeds(seeds);
                }
                _ = tick.tick() => self.on_tick(),
            }
            if bootstrap.deadline() != self.bootstrap_at {
                bootstrap.as_mut().reset(self.bootstrap_at);
            }
        }
        tracing::info!(
            peer_id = %self.local,
            advertised = self.providing.keys.len(),
            "p2p router stopped"
        );
    }

    // --- commands ---

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Lookup { key, count, tx } => self.start_lookup(key, count, tx),
            Command::Advertise { keys, reply } => {
                let _ = reply.send(self.advertise(keys));
            }
            Command::Withdraw { keys, reply } => {
                self.withdraw(keys);
                let _ = reply.send(());
            }
            Command::ListenAddrs { reply } => {
                if !self.listen_addrs.is_empty() {
                    let _ = reply.send(self.listen_addrs.clone());
                } else if self.listen_waiters.len() < MAX_LISTEN_WAITERS {
                    self.listen_waiters.push(reply);
                } else {
                    let _ = reply.send(Vec::new());
                }
            }
        }
    }

    fn advertise(&mut self, keys: Vec<String>) -> Result<(), RouterError> {
        let now = Instant::now();
        let mut added = 0usize;
        let mut refused = None;
        for key in keys {
            let content_key = ContentKey::of(&key);
            if !self.providing.add(content_key, key, now) {
                continue;
            }
            // Record it locally at once: nodes that ask us see it before the provide query runs.
            let record = kad::ProviderRecord::new(content_key.record_key(), self.local, Vec::new());
            if let Err(error) = self
                .swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .add_provider(record)
            {
                self.providing.remove(&content_key);
                refused = Some(error);
                continue;
            }
            added += 1;
        }
        tracing::debug!(added, total = self.providing.keys.len(), "advertising keys");
        match refused {
            None => Ok(()),
            Some(error) => Err(RouterError::Failed(format!(
                "provider store refused a key: {error}"
            ))),
        }
    }

    fn withdraw(&mut self, keys: Vec<String>) {
        let mut removed = 0usize;
        for key in keys {
            let content_key = ContentKey::of(&key);
            if self.providing.remove(&content_key) {
                // Local only: other nodes forget us when our records expire.
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&content_key.record_key());
                removed += 1;
            }
        }
        tracing::debug!(removed, total = self.providing.keys.len(), "withdrew keys");
    }

    // --- lookups ---

    fn start_lookup(&mut self, key: String, count: usize, tx: mpsc::Sender<Peer>) {
        self.shared.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let content_key = ContentKey::of(&key);
        let now = Instant::now();
        if let Some(peers) = self.cache.get(&content_key, count, now) {
            self.shared
                .stats
                .lookup_cache_hits
                .fetch_add(1, Ordering::Relaxed);
            for peer in peers.iter().take(count) {
                if tx.try_send(peer.clone()).is_err() {
                    break;
                }
            }
            return;
        }
        let subscriber = Subscriber {
            tx,
            want: count,
            sent: 0,
        };
        if let Some(lookup) = self.lookups.get_mut(&content_key) {
            if lookup.subscribers.len() < MAX_SUBSCRIBERS {
                lookup.add_subscriber(subscriber);
                self.drive_lookup(content_key);
            }
            // Otherwise the caller's channel closes empty: it falls back to other sources.
            return;
        }
        if self.lookups.len() >= MAX_LOOKUPS {
            tracing::warn!(%key, "too many lookups in flight, answering empty");
            return;
        }
        let query = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(content_key.record_key());
        self.lookup_queries.insert(query, content_key);
        self.lookups.insert(
            content_key,
            Lookup {
                key,
                subscribers: vec![subscriber],
                found: Vec::new(),
                seen: HashSet::new(),
                candidates: VecDeque::new(),
                resolving: HashMap::new(),
                query: Some(query),
                started: now,
                deadline: now + self.tunables.lookup_timeout,
            },
        );
    }

    fn on_providers(&mut self, query: kad::QueryId, result: kad::GetProvidersResult, last: bool) {
        let Some(&content_key) = self.lookup_queries.get(&query) else {
            return;
        };
        if let Some(lookup) = self.lookups.get_mut(&content_key) {
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
                    tracing::debug!(key = %lookup.key, %error, "provider query ended early");
                }
            }
            if last {
                lookup.query = None;
            }
        }
        if last {
            self.lookup_queries.remove(&query);
        }
        self.drive_lookup(content_key);
    }

    /// Resolves candidates until the callers' needs are covered, then ends the lookup if
    /// nothing more can come.
    fn drive_lookup(&mut self, content_key: ContentKey) {
        let now = Instant::now();
        let Some(lookup) = self.lookups.get_mut(&content_key) else {
            return;
        };
        lookup.prune_subscribers();
        while lookup.need() > lookup.active_resolves(now) {
            let Some(peer) = lookup.candidates.pop_front() else {
                break;
            };
            if let Some(addr) = self.registry.get(&peer, now) {
                lookup.deliver(peer, addr, &self.shared.stats);
                continue;
            }
            if start_resolve(&mut self.swarm, &self.connections, content_key, peer) {
                lookup.resolving.insert(peer, now);
                self.waiting.entry(peer).or_default().push(content_key);
            }
        }
        lookup.prune_subscribers();
        let exhausted =
            lookup.query.is_none() && lookup.candidates.is_empty() && lookup.resolving.is_empty();
        if exhausted || lookup.subscribers.is_empty() {
            self.finish_lookup(content_key, exhausted);
        }
    }

    /// A peer was identified, or cannot be: hands its registry address (if any) to the lookups
    /// waiting for it.
    fn peer_resolved(&mut self, peer: PeerId) {
        let Some(keys) = self.waiting.remove(&peer) else {
            return;
        };
        let addr = self.registry.get(&peer, Instant::now());
        for content_key in keys {
            if let Some(lookup) = self.lookups.get_mut(&content_key)
                && lookup.resolving.remove(&peer).is_some()
                && let Some(addr) = addr
            {
                lookup.deliver(peer, addr, &self.shared.stats);
            }
            self.drive_lookup(content_key);
        }
    }

    /// Ends a lookup: stops its query, closes its callers' channels, caches what it found.
    fn finish_lookup(&mut self, content_key: ContentKey, complete: bool) {
        let Some(lookup) = self.lookups.remove(&content_key) else {
            return;
        };
        if let Some(query) = lookup.query {
            self.lookup_queries.remove(&query);
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&query) {
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

    // --- providing ---

    fn start_due_provides(&mut self, now: Instant) {
        let limit = self.tunables.max_concurrent_provides.get();
        while self.providing.in_flight.len() < limit {
            let Some((content_key, seq)) = self.providing.pop_due(now) else {
                break;
            };
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(content_key.record_key())
            {
                Ok(query) => {
                    self.providing.in_flight.insert(query, (content_key, seq));
                }
                Err(error) => {
                    tracing::warn!(key = ?content_key, %error, "cannot start providing");
                    self.providing
                        .schedule(content_key, now + self.tunables.provide_retry);
                }
            }
        }
    }

    fn on_provided(&mut self, query: kad::QueryId, reached: bool) {
        let now = Instant::now();
        let Some(key) = self.providing.finished(query, reached, now, &self.tunables) else {
            return;
        };
        let counter = if reached {
            &self.shared.stats.provides_ok
        } else {
            &self.shared.stats.provides_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if reached {
            tracing::trace!(%key, "provided");
        } else {
            tracing::debug!(%key, "provide reached no peer, will retry");
        }
    }

    // --- bootstrap ---

    fn on_bootstrap_timer(&mut self) {
        let now = Instant::now();
        self.dial_seeds();
        if self.routing_table_size > 0 {
            if let Err(error) = self.swarm.behaviour_mut().kad.bootstrap() {
                tracing::debug!(%error, "cannot refresh the routing table");
            }
            self.bootstrap_backoff = self.tunables.bootstrap_backoff_min;
            self.bootstrap_at = now + self.tunables.rebootstrap_interval;
        } else if self.seeds.is_empty() && self.dns_seed.is_none() {
            // Nothing to dial: this node waits for others to find it.
            self.bootstrap_at = now + self.tunables.rebootstrap_interval;
        } else {
            tracing::debug!(retry_in = ?self.bootstrap_backoff, "no peers yet, dialing seeds");
            self.bootstrap_at = now + self.bootstrap_backoff;
            self.bootstrap_backoff =
                (self.bootstrap_backoff * 2).min(self.tunables.bootstrap_backoff_max);
        }
    }

    fn dial_seeds(&mut self) {
        let mut unknown = Vec::new();
        for seed in &self.seeds {
            match seed.peer {
                Some(peer) if peer == self.local => {}
                Some(peer) => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![seed.addr.clone()])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(error) = self.swarm.dial(opts)
                        && !matches!(error, DialError::DialPeerConditionFalse(_))
                    {
                        tracing::debug!(addr = %seed.addr, %error, "cannot dial seed");
                    }
                }
                None => unknown.push(seed.addr.clone()),
            }
        }
        for addr in unknown {
            self.dial_unknown(addr);
        }
        if let Some(seed) = &self.dns_seed
            && self.dns_lookup.is_none()
        {
            let seed = seed.clone();
            let port = self.dns_seed_port;
            let per_family = self.tunables.dns_seeds_per_family;
            self.dns_lookup = Some(Box::pin(
                async move { seed.resolve(port, per_family).await },
            ));
        }
    }

    /// Dials a seed whose peer id is unknown (Kademlia adds it once connected), unless a dial
    /// to that address is still under way: an unreachable seed must not pile up dials while
    /// bootstrap retries.
    fn dial_unknown(&mut self, addr: Multiaddr) {
        if self.seed_dials.contains_key(&addr) {
            return;
        }
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let connection = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.seed_dials.insert(addr, connection);
            }
            Err(error) => tracing::debug!(%addr, %error, "cannot dial seed"),
        }
    }

    fn on_dns_seeds(&mut self, seeds: io::Result<Vec<Multiaddr>>) {
        let seeds = match seeds {
            Ok(seeds) => seeds,
            Err(error) => {
                let name = self.dns_seed.as_ref().map(ToString::to_string);
                tracing::warn!(name, %error, "cannot resolve bootstrap DNS name");
                return;
            }
        };
        tracing::debug!(count = seeds.len(), "dialing DNS seeds");
        for addr in seeds {
            // The answer usually includes this node; dialing it would only fail.
            if !self.listen_addrs.contains(&addr) {
                self.dial_unknown(addr);
            }
        }
    }

    fn refresh_routing_table_size(&mut self) {
        let size: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|bucket| bucket.num_entries())
            .sum();
        if size == self.routing_table_size {
            return;
        }
        if size == 0 {
            tracing::warn!("routing table empty, bootstrapping again");
            self.bootstrap_backoff = self.tunables.bootstrap_backoff_min;
            self.bootstrap_at = Instant::now();
        } else if self.routing_table_size == 0 {
            tracing::info!(peers = size, "joined the DHT");
        }
        self.routing_table_size = size;
        self.shared
            .routing_table_size
            .store(size, Ordering::Relaxed);
    }

    // --- timers ---

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.refresh_routing_table_size();
        let expired: Vec<ContentKey> = self
            .lookups
            .iter()
            .filter(|(_, lookup)| lookup.deadline <= now)
            .map(|(key, _)| *key)
            .collect();
        for content_key in expired {
            self.finish_lookup(content_key, false);
        }
        // Slow providers may have run out of patience: try further candidates.
        let slow: Vec<ContentKey> = self
            .lookups
            .iter()
            .filter(|(_, lookup)| !lookup.candidates.is_empty() && !lookup.resolving.is_empty())
            .map(|(key, _)| *key)
            .collect();
        for content_key in slow {
            self.drive_lookup(content_key);
        }
        // Providing into an empty routing table reaches nobody; keys stay due until peers appear.
        if self.routing_table_size > 0 {
            self.start_due_provides(now);
        }
        if now >= self.next_purge {
            let purged = self
                .swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .purge_expired(std::time::Instant::now());
            self.cache.purge(now);
            self.providing.compact();
            tracing::trace!(purged, "purged expired provider records");
            self.next_purge = now + PURGE_INTERVAL;
        }
    }

    // --- swarm events ---

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                self.on_identify_event(event);
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p router listening");
                // Kademlia announces only external addresses in provider records; without them
                // other nodes learn where a provider is only if it happens to be in their routing
                // table. Every listen address but loopback is one here (pod and node networks are
                // flat, and nodes have no NAT between them).
                let loopback = registry_addr::ip_of(&address).is_some_and(|ip| ip.is_loopback());
                if !loopback || self.announce_loopback {
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addrs.push(address);
                for waiter in self.listen_waiters.drain(..) {
                    let _ = waiter.send(self.listen_addrs.clone());
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "p2p listener error");
            }
            SwarmEvent::ListenerClosed {
                addresses,
                reason: Err(error),
                ..
            } => {
                tracing::warn!(?addresses, %error, "p2p listener closed");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                tracing::trace!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.seed_dials.retain(|_, dial| *dial != connection_id);
                self.connections.insert(
                    connection_id,
                    Connection {
                        peer: peer_id,
                        endpoint,
                        identified: false,
                    },
                );
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.peer_resolved(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                tracing::debug!(peer_id = ?peer_id, %error, "dial failed");
                self.seed_dials.retain(|_, dial| *dial != connection_id);
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.peer_resolved(peer);
                }
            }
            _ => {}
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                stats,
                step,
            } => match result {
                kad::QueryResult::GetProviders(result) => {
                    self.on_providers(id, result, step.last);
                }
                kad::QueryResult::StartProviding(result)
                | kad::QueryResult::RepublishProvider(result) => {
                    self.on_provided(id, result.is_ok() && stats.num_successes() > 0);
                }
                kad::QueryResult::Bootstrap(result) => {
                    tracing::trace!(?result, "bootstrap step");
                }
                _ => {}
            },
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            } => {
                tracing::trace!(%peer, "peer added to the routing table");
            }
            _ => {}
        }
    }

    fn on_identify_event(&mut self, event: identify::Event) {
        match event {
            identify::Event::Received {
                connection_id,
                peer_id,
                info,
            } => {
                let Some(connection) = self.connections.get_mut(&connection_id) else {
                    return;
                };
                connection.identified = true;
                let endpoint = connection.endpoint.clone();
                // rust-libp2p's Kademlia learns listen addresses only from us: without this, a
                // peer that dialed us would never enter our routing table.
                if info.protocols.contains(&self.kad_protocol) {
                    let remote = endpoint.get_remote_address();
                    for addr in registry_addr::routable_listen_addrs(&info.listen_addrs, remote) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
                match registry_addr::parse_agent_version(&info.agent_version) {
                    Some(advertise) => {
                        match registry_addr::resolve(advertise, &endpoint, &info.listen_addrs) {
                            Some((addr, quality)) => {
                                self.registry.insert(peer_id, addr, quality, Instant::now());
                            }
                            None => tracing::debug!(
                                %peer_id,
                                %advertise,
                                "no IP to pair the peer's registry port with"
                            ),
                        }
                    }
                    None => {
                        tracing::debug!(
                            %peer_id,
                            agent = %info.agent_version,
                            "peer announces no registry"
                        );
                        self.registry.remove(&peer_id);
                    }
                }
                self.peer_resolved(peer_id);
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(%peer_id, %error, "identify failed");
                self.peer_resolved(peer_id);
            }
            identify::Event::Sent { .. } | identify::Event::Pushed { .. } => {}
        }
    }
}

/// Starts learning a provider's registry address: dial it (Identify follows), or wait for the
/// Identify of a connection that is already up. `false` if nothing will come of it.
fn start_resolve(
    swarm: &mut Swarm<Behaviour>,
    connections: &HashMap<ConnectionId, Connection>,
    content_key: ContentKey,
    peer: PeerId,
) -> bool {
    if swarm.is_connected(&peer) {
        // Identify runs once per new connection: if it already answered, it gave no address.
        return !connections.values().any(|c| c.peer == peer && c.identified);
    }
    // Addresses from the provider record, in case the record came from our own store (the
    // query's addresses reach the dialer through Kademlia itself).
    let addresses = swarm
        .behaviour_mut()
        .kad
        .store_mut()
        .providers(&content_key.record_key())
        .into_iter()
        .find(|record| record.provider == peer)
        .map(|record| record.addresses)
        .unwrap_or_default();
    let opts = DialOpts::peer_id(peer)
        .condition(PeerCondition::DisconnectedAndNotDialing)
        .addresses(addresses)
        .extend_addresses_through_behaviour()
        .build();
    match swarm.dial(opts) {
        // A dial already under way counts: its outcome is awaited the same way.
        Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => true,
        Err(error) => {
            tracing::debug!(%peer, %error, "cannot dial provider");
            false
        }
    }
}

/// Awaits the future if there is one, else never resolves (a `select!` branch that is off).
async fn poll_option<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

fn build_transport(
    kind: TransportKind,
    keypair: &Keypair,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, P2pError> {
    let noise = noise::Config::new(keypair).map_err(|e| P2pError::Transport(e.to_string()))?;
    let yamux = yamux::Config::default();
    Ok(match kind {
        TransportKind::Memory => MemoryTransport::default()
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
        TransportKind::Tcp => {
            let tcp_config = tcp::Config::new().nodelay(true);
            match dns::tokio::Transport::system(tcp::tokio::Transport::new(tcp_config.clone())) {
                Ok(transport) => transport
                    .upgrade(Version::V1)
                    .authenticate(noise)
                    .multiplex(yamux)
                    .timeout(HANDSHAKE_TIMEOUT)
                    .boxed(),
                Err(error) => {
                    tracing::warn!(%error, "no system DNS config; /dns multiaddrs cannot be dialed");
                    tcp::tokio::Transport::new(tcp_config)
                        .upgrade(Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux)
                        .timeout(HANDSHAKE_TIMEOUT)
                        .boxed()
                }
            }
        }
    })
}

// === impl Lookup ===

impl Lookup {
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

    fn deliver(&mut self, peer: PeerId, addr: std::net::SocketAddr, stats: &Stats) {
        let peer = Peer {
            id: peer.to_string(),
            addr,
        };
        stats.peers_found.fetch_add(1, Ordering::Relaxed);
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

// === impl LookupCache ===

impl LookupCache {
    /// Cached providers for a lookup of `count`: fresh, and either all there are or enough.
    fn get(&self, key: &ContentKey, count: usize, now: Instant) -> Option<&[Peer]> {
        let entry = self.entries.get(key)?;
        let ttl = match entry.peers.is_empty() {
            true => self.ttl.min(NEGATIVE_CACHE_TTL),
            false => self.ttl,
        };
        let fresh = now.duration_since(entry.at) < ttl;
        (fresh && (entry.complete || entry.peers.len() >= count)).then_some(&entry.peers[..])
    }

    fn insert(&mut self, key: ContentKey, peers: Vec<Peer>, complete: bool, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= LOOKUP_CACHE_CAPACITY && !self.entries.contains_key(&key) {
            self.purge(now);
            if self.entries.len() >= LOOKUP_CACHE_CAPACITY {
                return;
            }
        }
        self.entries.insert(
            key,
            CachedLookup {
                peers,
                complete,
                at: now,
            },
        );
    }

    fn purge(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.entries
            .retain(|_, entry| now.duration_since(entry.at) < ttl);
    }
}

// === impl Providing ===

impl Providing {
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
    fn compact(&mut self) {
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
    use std::net::SocketAddr;

    use super::*;

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

    fn peer(n: u16) -> Peer {
        Peer {
            id: format!("peer-{n}"),
            addr: SocketAddr::from(([127, 0, 0, 1], n)),
        }
    }

    #[test]
    fn lookup_cache_serves_complete_or_large_enough_results() {
        let now = Instant::now();
        let mut cache = LookupCache {
            ttl: Duration::from_secs(5),
            entries: HashMap::new(),
        };
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

        let mut disabled = LookupCache {
            ttl: Duration::ZERO,
            entries: HashMap::new(),
        };
        disabled.insert(partial, vec![peer(1)], true, now);
        assert!(disabled.get(&partial, 1, now).is_none());
    }

    #[test]
    fn lookup_fans_out_to_subscribers() {
        let stats = Stats::default();
        let (tx_one, mut rx_one) = mpsc::channel(1);
        let (tx_three, mut rx_three) = mpsc::channel(3);
        let now = Instant::now();
        let mut lookup = Lookup {
            key: "k".into(),
            subscribers: vec![Subscriber {
                tx: tx_one,
                want: 1,
                sent: 0,
            }],
            found: Vec::new(),
            seen: HashSet::new(),
            candidates: VecDeque::new(),
            resolving: HashMap::new(),
            query: None,
            started: now,
            deadline: now,
        };
        assert_eq!(lookup.need(), 1);
        let first = PeerId::random();
        lookup.deliver(first, peer(1).addr, &stats);
        // A late subscriber gets what was found so far first.
        lookup.add_subscriber(Subscriber {
            tx: tx_three,
            want: 3,
            sent: 0,
        });
        lookup.prune_subscribers();
        assert_eq!(lookup.subscribers.len(), 1, "the satisfied caller is done");
        assert_eq!(lookup.need(), 2);
        lookup.deliver(PeerId::random(), peer(2).addr, &stats);
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
        let mut lookup_gone = Lookup {
            key: "k".into(),
            subscribers: vec![Subscriber {
                tx,
                want: 1,
                sent: 0,
            }],
            found: Vec::new(),
            seen: HashSet::new(),
            candidates: VecDeque::new(),
            resolving: HashMap::new(),
            query: None,
            started: now,
            deadline: now,
        };
        lookup_gone.prune_subscribers();
        assert!(
            lookup_gone.subscribers.is_empty(),
            "a caller that left is dropped"
        );
    }
}
