//! The task that owns the libp2p swarm: its `select!` over commands, swarm events and timers,
//! dispatching each to the part of the router it concerns.
use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use libp2p::{
    Swarm, identify,
    identity::Keypair,
    kad,
    metrics::{Metrics as Libp2pMetrics, Recorder as _},
    swarm::SwarmEvent,
};
use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

use super::{
    Command, P2pConfig, P2pError, Shared, Tunables,
    addresses::PeerBook,
    behaviour::{self, Behaviour, BehaviourEvent},
    bootstrap::Bootstrap,
    listen::Listening,
    lookup::{Env, Lookups},
    provide::Providing,
};

/// How often expired provider records and cache entries are dropped.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The router's event loop. Run it with [`EventLoop::run`]; it ends when the token is cancelled
/// or every [`super::P2pRouter`] handle is dropped.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    tunables: Tunables,
    bootstrap: Bootstrap,
    listening: Listening,
    peers: PeerBook,
    lookups: Lookups,
    providing: Providing,
    next_purge: Instant,
    /// Records swarm, Kademlia and Identify events into libp2p's metrics.
    recorder: Libp2pMetrics,
}

impl EventLoop {
    pub(super) fn new(
        config: &P2pConfig,
        keypair: &Keypair,
        commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
        recorder: Libp2pMetrics,
    ) -> Result<Self, P2pError> {
        let tunables = config.tunables.clone();
        let local = keypair.public().to_peer_id();
        let swarm = behaviour::build_swarm(config, keypair)?;
        Ok(Self {
            swarm,
            commands,
            shared,
            bootstrap: Bootstrap::new(config, local),
            listening: Listening::new(&config.listen_addrs),
            peers: PeerBook::new(tunables.registry_addr_ttl, config.node_cidrs.clone()),
            lookups: Lookups::new(local, tunables.lookup_timeout, tunables.lookup_cache_ttl),
            providing: Providing::default(),
            next_purge: Instant::now() + PURGE_INTERVAL,
            tunables,
            recorder,
        })
    }

    /// Drives the swarm until `shutdown` is cancelled or every handle is dropped. Open lookups
    /// end (their channels close) and connections drop when it returns.
    #[tracing::instrument(name = "p2p", skip_all, fields(peer_id = %self.shared.peer_id))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.tunables.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let bootstrap = tokio::time::sleep_until(self.bootstrap.at());
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
                    let first_peer = self.bootstrap.routing_table_size() == 0
                        && matches!(
                            event,
                            SwarmEvent::Behaviour(BehaviourEvent::Kad(
                                kad::Event::RoutingUpdated { .. }
                            ))
                        );
                    self.on_swarm_event(event);
                    if first_peer {
                        self.bootstrap.refresh_routing_table_size(&mut self.swarm, &self.shared);
                    }
                }
                () = &mut bootstrap => self.bootstrap.on_timer(&mut self.swarm),
                seeds = self.bootstrap.dns_answer() => {
                    self.bootstrap.on_dns_answer(&mut self.swarm, seeds, self.listening.addrs());
                }
                _ = tick.tick() => self.on_tick(),
            }
            if bootstrap.deadline() != self.bootstrap.at() {
                bootstrap.as_mut().reset(self.bootstrap.at());
            }
        }
        tracing::info!(
            peer_id = %self.shared.peer_id,
            advertised = self.providing.len(),
            "p2p router stopped"
        );
    }

    /// The lookups, and what they need of the rest of the router.
    fn lookups(&mut self) -> (&mut Lookups, Env<'_>) {
        let env = Env {
            swarm: &mut self.swarm,
            peers: &self.peers,
            stats: &self.shared.stats,
        };
        (&mut self.lookups, env)
    }

    /// A peer was identified, or cannot be: lookups waiting for it go on.
    fn peer_resolved(&mut self, peer: libp2p::PeerId) {
        let (lookups, env) = self.lookups();
        lookups.peer_resolved(env, peer);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Lookup { key, count, tx } => {
                let (lookups, env) = self.lookups();
                lookups.start(env, key, count, tx);
            }
            Command::Advertise { keys, reply } => {
                let local = self.shared.peer_id;
                let _ = reply.send(self.providing.advertise(&mut self.swarm, local, keys));
            }
            Command::Withdraw { keys, reply } => {
                self.providing.withdraw(&mut self.swarm, keys);
                let _ = reply.send(());
            }
            Command::ListenAddrs { reply } => self.listening.request(reply),
            Command::Peers { reply } => {
                let _ = reply.send(self.peers.connected_peers(Instant::now()));
            }
        }
        self.shared
            .advertised
            .store(self.providing.len(), std::sync::atomic::Ordering::Relaxed);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.bootstrap
            .refresh_routing_table_size(&mut self.swarm, &self.shared);
        let (lookups, env) = self.lookups();
        lookups.on_tick(env, now);
        // Providing into an empty routing table reaches nobody; keys stay due until peers appear.
        if self.bootstrap.routing_table_size() > 0 {
            self.providing
                .start_due(&mut self.swarm, now, &self.tunables);
        }
        if now >= self.next_purge {
            let purged = self
                .swarm
                .behaviour_mut()
                .kad
                .store_mut()
                .purge_expired(std::time::Instant::now());
            self.lookups.purge_cache(now);
            self.providing.compact();
            tracing::trace!(purged, "purged expired provider records");
            self.next_purge = now + PURGE_INTERVAL;
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.recorder.record(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                self.on_identify_event(event);
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listening.added(&mut self.swarm, address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listening.expired(&mut self.swarm, &address);
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
                self.bootstrap.dial_ended(connection_id);
                self.peers.connected(connection_id, peer_id, endpoint);
                self.count_connected();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.peers.closed(connection_id);
                if num_established == 0 {
                    self.count_connected();
                    self.peer_resolved(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                tracing::debug!(peer_id = ?peer_id, %error, "dial failed");
                self.bootstrap.dial_ended(connection_id);
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.peer_resolved(peer);
                }
            }
            _ => {}
        }
    }

    /// Publishes how many peers have a connection, for metrics.
    fn count_connected(&self) {
        let connected = self.swarm.connected_peers().count();
        self.shared
            .connected
            .store(connected, std::sync::atomic::Ordering::Relaxed);
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        self.recorder.record(&event);
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                stats,
                step,
            } => match result {
                kad::QueryResult::GetProviders(result) => {
                    let (lookups, env) = self.lookups();
                    lookups.on_providers(env, id, result, step.last);
                }
                kad::QueryResult::StartProviding(result)
                | kad::QueryResult::RepublishProvider(result) => {
                    let reached = result.is_ok() && stats.num_successes() > 0;
                    self.providing
                        .on_provided(id, reached, &self.tunables, &self.shared.stats);
                }
                kad::QueryResult::Bootstrap(result) => {
                    tracing::trace!(?result, "bootstrap step");
                    if step.last {
                        self.shared
                            .stats
                            .bootstraps
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
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
        self.recorder.record(&event);
        match event {
            identify::Event::Received {
                connection_id,
                peer_id,
                info,
            } => {
                if self.peers.identified(
                    &mut self.swarm,
                    connection_id,
                    peer_id,
                    &info,
                    &self.shared.stats.registry_addrs_refused,
                ) {
                    self.peer_resolved(peer_id);
                }
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(%peer_id, %error, "identify failed");
                self.peer_resolved(peer_id);
            }
            identify::Event::Sent { .. } | identify::Event::Pushed { .. } => {}
        }
    }
}
