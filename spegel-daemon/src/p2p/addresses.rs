//! Peers' registry addresses: the connections they came over, what their Identify answers say
//! (fed into Kademlia's routing table and the per-peer address cache), and dialing a provider to
//! learn its address.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm,
    core::ConnectedPoint,
    identify,
    kad::store::RecordStore as _,
    swarm::{
        ConnectionId, DialError,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use lru::LruCache;
use tokio::time::Instant;

use super::{
    KAD_PROTOCOL,
    behaviour::Behaviour,
    key::ContentKey,
    registry_addr::{self, Quality, Refused},
};
use crate::net::Cidr;

/// Peers whose registry address is remembered, at most.
const REGISTRY_CACHE_CAPACITY: usize = 16_384;
/// Peers remembered as already warned about for a refused registry announcement, at most.
const WARNED_CAPACITY: usize = 4096;

/// What this node knows about its peers' registry APIs.
pub(super) struct PeerBook {
    connections: HashMap<ConnectionId, Connection>,
    registry: RegistryCache,
    kad_protocol: StreamProtocol,
    /// Where peers may announce their registry besides the IP we reach them at.
    node_cidrs: Vec<Cidr>,
    /// Peers whose refused registry announcement was logged at warn already (once per peer,
    /// not per Identify).
    warned: LruCache<PeerId, ()>,
}

/// An established connection, as far as registry addresses are concerned.
#[derive(Debug)]
struct Connection {
    peer: PeerId,
    endpoint: ConnectedPoint,
    /// Identify has answered on this connection.
    identified: bool,
}

/// Registry addresses of peers, learned from Identify; least recently learned evicted first.
#[derive(Debug)]
pub(super) struct RegistryCache {
    entries: LruCache<PeerId, Entry>,
    ttl: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr: SocketAddr,
    quality: Quality,
    learned: Instant,
}

// === impl PeerBook ===

impl PeerBook {
    /// Nothing known yet; addresses are trusted for `ttl` without a fresh Identify; peers may
    /// announce registry addresses within `node_cidrs`.
    pub(super) fn new(ttl: Duration, node_cidrs: Vec<Cidr>) -> Self {
        Self {
            connections: HashMap::new(),
            registry: RegistryCache::new(ttl, REGISTRY_CACHE_CAPACITY),
            kad_protocol: StreamProtocol::new(KAD_PROTOCOL),
            node_cidrs,
            warned: LruCache::new(NonZeroUsize::new(WARNED_CAPACITY).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// A connection to `peer` is up.
    pub(super) fn connected(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        endpoint: ConnectedPoint,
    ) {
        self.connections.insert(
            connection,
            Connection {
                peer,
                endpoint,
                identified: false,
            },
        );
    }

    /// A connection closed.
    pub(super) fn closed(&mut self, connection: ConnectionId) {
        self.connections.remove(&connection);
    }

    /// Every connected peer with the remote addresses of its connections and its registry
    /// address (if learned), sorted by peer id (for the status page).
    pub(super) fn connected_peers(&self, now: Instant) -> Vec<super::PeerStatus> {
        let mut peers: std::collections::BTreeMap<PeerId, Vec<libp2p::Multiaddr>> =
            std::collections::BTreeMap::new();
        for connection in self.connections.values() {
            peers
                .entry(connection.peer)
                .or_default()
                .push(connection.endpoint.get_remote_address().clone());
        }
        peers
            .into_iter()
            .map(|(id, mut addresses)| {
                // Several connections to one peer often share its address.
                addresses.sort();
                addresses.dedup();
                (id, addresses)
            })
            .map(|(id, addresses)| super::PeerStatus {
                registry: self.registry_addr(&id, now),
                id,
                addresses,
            })
            .collect()
    }

    /// The peer's registry address, if learned recently enough.
    pub(super) fn registry_addr(&self, peer: &PeerId, now: Instant) -> Option<SocketAddr> {
        self.registry.get(peer, now)
    }

    /// A peer identified itself on `connection`: its listen addresses go into Kademlia's routing
    /// table, its registry announcement into the cache (refusals counted in `refused`). `false`
    /// if the connection is unknown (already closed), in which case nothing was learned.
    pub(super) fn identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        connection: ConnectionId,
        peer: PeerId,
        info: &identify::Info,
        refused: &AtomicU64,
    ) -> bool {
        let Some(connection) = self.connections.get_mut(&connection) else {
            return false;
        };
        connection.identified = true;
        let endpoint = &connection.endpoint;
        // rust-libp2p's Kademlia learns listen addresses only from us: without this, a peer
        // that dialed us would never enter our routing table.
        if info.protocols.contains(&self.kad_protocol) {
            let remote = endpoint.get_remote_address();
            for addr in registry_addr::routable_listen_addrs(&info.listen_addrs, remote) {
                swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
        }
        match registry_addr::parse_agent_version(&info.agent_version) {
            Some(advertise) => {
                let resolved = registry_addr::resolve(
                    advertise,
                    endpoint,
                    &info.listen_addrs,
                    &self.node_cidrs,
                );
                if let Some((ip, reason)) = resolved.refused {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let used = resolved.addr.map(|(addr, _)| addr);
                    log_refused(
                        &mut self.warned,
                        peer,
                        endpoint.get_remote_address(),
                        ip,
                        reason,
                        used,
                    );
                }
                match resolved.addr {
                    Some((addr, quality)) => {
                        self.registry.insert(peer, addr, quality, Instant::now());
                    }
                    None => tracing::debug!(
                        peer_id = %peer,
                        %advertise,
                        "no IP to pair the peer's registry port with"
                    ),
                }
            }
            None => {
                tracing::debug!(
                    peer_id = %peer,
                    agent = %info.agent_version,
                    "peer announces no registry"
                );
                self.registry.remove(&peer);
            }
        }
        true
    }

    /// Starts learning a provider's registry address: dial it (Identify follows), or wait for
    /// the Identify of a connection that is already up. `false` if nothing will come of it.
    pub(super) fn start_resolve(
        &self,
        swarm: &mut Swarm<Behaviour>,
        content_key: ContentKey,
        peer: PeerId,
    ) -> bool {
        if swarm.is_connected(&peer) {
            // Identify runs once per new connection: if it already answered, it gave no address.
            return !self
                .connections
                .values()
                .any(|c| c.peer == peer && c.identified);
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
}

/// Logs a refused registry announcement: at warn the first time for `peer`, then at debug
/// (Identify repeats it on every connection and push); `warned` remembers who was warned about.
fn log_refused(
    warned: &mut LruCache<PeerId, ()>,
    peer: PeerId,
    remote: &Multiaddr,
    announced: IpAddr,
    reason: Refused,
    used: Option<SocketAddr>,
) {
    let reason = match reason {
        Refused::Special(special) => special.to_string(),
        Refused::NotThePeer => {
            "neither the address the peer is reached at nor within --node-cidrs".to_owned()
        }
    };
    let message = "refusing the registry address a peer announced";
    if warned.put(peer, ()).is_none() {
        tracing::warn!(peer_id = %peer, %remote, %announced, %reason, ?used, "{message}");
    } else {
        tracing::debug!(peer_id = %peer, %remote, %announced, %reason, ?used, "{message}");
    }
}

// === impl RegistryCache ===

impl RegistryCache {
    /// An empty cache of at most `capacity` peers whose entries are trusted for `ttl`.
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            entries: LruCache::new(capacity),
            ttl,
        }
    }

    /// The peer's registry address, if learned within the TTL.
    pub(super) fn get(&self, peer: &PeerId, now: Instant) -> Option<SocketAddr> {
        // `peek`: only learning refreshes an entry, so eviction goes by when it was learned.
        self.entries
            .peek(peer)
            .filter(|e| now.duration_since(e.learned) < self.ttl)
            .map(|e| e.addr)
    }

    /// Records what a peer told us; a fresh, better-founded address is not replaced by a
    /// weaker guess (e.g. a dialed IP by the source IP of an inbound connection).
    pub(super) fn insert(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        quality: Quality,
        now: Instant,
    ) {
        let ttl = self.ttl;
        if let Some(old) = self.entries.get_mut(&peer) {
            let fresh = now.duration_since(old.learned) < ttl;
            if fresh && old.quality > quality {
                if old.addr.port() != addr.port() && old.quality != Quality::Advertised {
                    // Same peer, new registry port: keep the better IP, take the new port.
                    old.addr.set_port(addr.port());
                }
                old.learned = now;
                return;
            }
        }
        // New, or replacing a weaker or stale entry; when full, the least recently learned
        // entry makes room.
        self.entries.put(
            peer,
            Entry {
                addr,
                quality,
                learned: now,
            },
        );
    }

    /// Drops what a peer told us, e.g. when it announced no registry any more.
    pub(super) fn remove(&mut self, peer: &PeerId) {
        self.entries.pop(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cache_keeps_better_addresses_and_expires() {
        let mut cache = RegistryCache::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        let a = PeerId::random();
        cache.insert(a, sa("10.0.0.8:5000"), Quality::Dialed, now);
        cache.insert(a, sa("172.16.0.1:5000"), Quality::Guessed, now);
        assert_eq!(cache.get(&a, now), Some(sa("10.0.0.8:5000")));
        // A new port is taken, the better IP kept.
        cache.insert(a, sa("172.16.0.1:6000"), Quality::Guessed, now);
        assert_eq!(cache.get(&a, now), Some(sa("10.0.0.8:6000")));
        cache.insert(a, sa("10.0.0.9:5000"), Quality::Dialed, now);
        assert_eq!(cache.get(&a, now), Some(sa("10.0.0.9:5000")));
        // Expired: gone, and any new guess replaces it.
        let later = now + Duration::from_secs(61);
        assert_eq!(cache.get(&a, later), None);
        cache.insert(a, sa("172.16.0.1:5000"), Quality::Guessed, later);
        assert_eq!(cache.get(&a, later), Some(sa("172.16.0.1:5000")));

        // Bounded: the oldest entry makes room.
        let b = PeerId::random();
        let c = PeerId::random();
        cache.insert(
            b,
            sa("10.0.0.2:5000"),
            Quality::Dialed,
            later + Duration::from_secs(1),
        );
        cache.insert(
            c,
            sa("10.0.0.3:5000"),
            Quality::Dialed,
            later + Duration::from_secs(2),
        );
        let at = later + Duration::from_secs(2);
        assert_eq!(cache.get(&a, at), None);
        assert!(cache.get(&b, at).is_some() && cache.get(&c, at).is_some());
        cache.remove(&b);
        assert_eq!(cache.get(&b, at), None);
    }
}
