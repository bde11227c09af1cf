//! Joining the DHT and staying in it: dialing the static and DNS seeds with backoff while the
//! routing table is empty, re-bootstrapping periodically once it is not, and tracking its size.
use std::{
    collections::HashMap, future::Future, io, pin::Pin, sync::atomic::Ordering, time::Duration,
};

use libp2p::{
    Multiaddr, PeerId, Swarm,
    swarm::{
        ConnectionId, DialError,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::time::Instant;

use super::{DnsSeed, P2pConfig, Shared, Tunables, behaviour::Behaviour, seeds::StaticSeed};

/// A DNS seed resolution in progress.
type DnsLookup = Pin<Box<dyn Future<Output = io::Result<Vec<Multiaddr>>> + Send>>;

/// The bootstrap state: seeds, the next attempt and its backoff, the routing table's size.
pub(super) struct Bootstrap {
    local: PeerId,
    tunables: Tunables,
    seeds: Vec<StaticSeed>,
    dns_seed: Option<DnsSeed>,
    dns_seed_port: u16,
    dns_lookup: Option<DnsLookup>,
    /// Dials to seeds of unknown peer id still under way, by address.
    seed_dials: HashMap<Multiaddr, ConnectionId>,
    /// When the bootstrap timer fires next.
    at: Instant,
    backoff: Duration,
    routing_table_size: usize,
}

impl Bootstrap {
    /// Seeds from `config`; the first attempt is due at once.
    pub(super) fn new(config: &P2pConfig, local: PeerId) -> Self {
        Self {
            local,
            tunables: config.tunables.clone(),
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
            at: Instant::now(),
            backoff: config.tunables.bootstrap_backoff_min,
            routing_table_size: 0,
        }
    }

    /// When [`Bootstrap::on_timer`] is due.
    pub(super) fn at(&self) -> Instant {
        self.at
    }

    /// Peers in the routing table, as last counted.
    pub(super) fn routing_table_size(&self) -> usize {
        self.routing_table_size
    }

    /// The answer of the DNS seed resolution under way; never resolves while there is none.
    pub(super) async fn dns_answer(&mut self) -> io::Result<Vec<Multiaddr>> {
        let Some(lookup) = &mut self.dns_lookup else {
            return std::future::pending().await;
        };
        let answer = lookup.await;
        self.dns_lookup = None;
        answer
    }

    /// The bootstrap timer fired: dial the seeds, then refresh the routing table (when it has
    /// peers) or retry with backoff (when it has none).
    pub(super) fn on_timer(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        self.dial_seeds(swarm);
        if self.routing_table_size > 0 {
            if let Err(error) = swarm.behaviour_mut().kad.bootstrap() {
                tracing::debug!(%error, "cannot refresh the routing table");
            }
            self.backoff = self.tunables.bootstrap_backoff_min;
            self.at = now + self.tunables.rebootstrap_interval;
        } else if self.seeds.is_empty() && self.dns_seed.is_none() {
            // Nothing to dial: this node waits for others to find it.
            self.at = now + self.tunables.rebootstrap_interval;
        } else {
            tracing::debug!(retry_in = ?self.backoff, "no peers yet, dialing seeds");
            self.at = now + self.backoff;
            self.backoff = (self.backoff * 2).min(self.tunables.bootstrap_backoff_max);
        }
    }

    fn dial_seeds(&mut self, swarm: &mut Swarm<Behaviour>) {
        let mut unknown = Vec::new();
        for seed in &self.seeds {
            match seed.peer {
                Some(peer) if peer == self.local => {}
                Some(peer) => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![seed.addr.clone()])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(error) = swarm.dial(opts)
                        && !matches!(error, DialError::DialPeerConditionFalse(_))
                    {
                        tracing::debug!(addr = %seed.addr, %error, "cannot dial seed");
                    }
                }
                None => unknown.push(seed.addr.clone()),
            }
        }
        for addr in unknown {
            self.dial_unknown(swarm, addr);
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
    fn dial_unknown(&mut self, swarm: &mut Swarm<Behaviour>, addr: Multiaddr) {
        if self.seed_dials.contains_key(&addr) {
            return;
        }
        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
        let connection = opts.connection_id();
        match swarm.dial(opts) {
            Ok(()) => {
                self.seed_dials.insert(addr, connection);
            }
            Err(error) => tracing::debug!(%addr, %error, "cannot dial seed"),
        }
    }

    /// The DNS seed name resolved: dial what it named, except this node's own addresses.
    pub(super) fn on_dns_answer(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        seeds: io::Result<Vec<Multiaddr>>,
        own_addrs: &[Multiaddr],
    ) {
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
            if !own_addrs.contains(&addr) {
                self.dial_unknown(swarm, addr);
            }
        }
    }

    /// A dial ended (connected or failed): a seed at that address may be dialed again.
    pub(super) fn dial_ended(&mut self, connection: ConnectionId) {
        self.seed_dials.retain(|_, dial| *dial != connection);
    }

    /// Counts the routing table (walking every bucket) and publishes the count; an empty table
    /// makes the next bootstrap due at once.
    pub(super) fn refresh_routing_table_size(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        shared: &Shared,
    ) {
        let size: usize = swarm
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
            self.backoff = self.tunables.bootstrap_backoff_min;
            self.at = Instant::now();
        } else if self.routing_table_size == 0 {
            tracing::info!(peers = size, "joined the DHT");
        }
        self.routing_table_size = size;
        shared.routing_table_size.store(size, Ordering::Relaxed);
    }
}
