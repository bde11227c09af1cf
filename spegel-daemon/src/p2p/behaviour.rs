//! The protocols the swarm speaks — Kademlia in server mode over this node's provider store, and
//! Identify carrying the registry announcement — within connection and memory limits, and the
//! swarm built around them.
use libp2p::{
    StreamProtocol, Swarm, connection_limits, identify, identity::Keypair, kad,
    memory_connection_limits, swarm, swarm::NetworkBehaviour,
};

use super::{
    IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, P2pConfig, P2pError, registry_addr,
    store::ProviderStore, transport,
};

/// The protocols the swarm speaks, and the connection limits it keeps.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Denies connections beyond the configured limits; first, so it decides before the others
    /// set anything up.
    pub(super) limits: connection_limits::Behaviour,
    /// Denies new connections while the process's resident memory is above the budget.
    pub(super) memory: memory_connection_limits::Behaviour,
    pub(super) kad: kad::Behaviour<ProviderStore>,
    pub(super) identify: identify::Behaviour,
}

/// Builds the swarm (transport, connection and memory limits, Kademlia, Identify) and binds the listen addresses.
pub(super) fn build_swarm(
    config: &P2pConfig,
    keypair: &Keypair,
) -> Result<Swarm<Behaviour>, P2pError> {
    let tunables = &config.tunables;
    let local = keypair.public().to_peer_id();
    let transport = transport::build(config.transport, keypair, config.secrets.as_ref())?;

    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config
        .set_query_timeout(tunables.query_timeout)
        // No value records: nothing to replicate or republish.
        .set_replication_interval(None)
        .set_publication_interval(None)
        .set_provider_record_ttl(Some(tunables.provider_record_ttl))
        // Re-providing is scheduled by `provide`, spread out and bounded; libp2p's job would
        // republish every key at once.
        .set_provider_publication_interval(None)
        // Bootstrap is driven by `bootstrap`, with seeds and backoff.
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
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(tunables.max_connections.get()))
            .with_max_established_per_peer(Some(tunables.max_connections_per_peer.get()))
            .with_max_pending_incoming(Some(tunables.max_pending_incoming.get())),
    );
    let mut swarm = Swarm::new(
        transport,
        Behaviour {
            limits,
            memory: memory_connection_limits::Behaviour::with_max_bytes(tunables.max_memory_bytes),
            kad,
            identify,
        },
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
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use futures::StreamExt as _;
    use libp2p::{
        Multiaddr,
        swarm::{ListenError, SwarmEvent},
    };
    use tokio::task::JoinHandle;

    use super::*;
    use crate::p2p::{NodeKey, RegistryAdvertise, TransportKind, Tunables};

    /// A memory-transport swarm listening on a fresh address, with `limits` applied.
    fn swarm(limits: impl FnOnce(&mut Tunables)) -> Swarm<Behaviour> {
        let mut config = P2pConfig::new(
            NodeKey::Ephemeral,
            TransportKind::Memory,
            RegistryAdvertise::Port(5000),
        );
        config.listen_addrs = vec!["/memory/0".parse().unwrap()];
        limits(&mut config.tunables);
        build_swarm(&config, &Keypair::generate_ed25519()).unwrap()
    }

    /// Drives `swarm` in the background until the task is aborted.
    fn drive(mut swarm: Swarm<Behaviour>) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        })
    }

    async fn listen_addr(swarm: &mut Swarm<Behaviour>) -> Multiaddr {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    }

    /// Drives `target` until it denies an incoming connection; why.
    async fn until_denied_by(target: &mut Swarm<Behaviour>) -> swarm::ConnectionDenied {
        let denied = async {
            loop {
                if let SwarmEvent::IncomingConnectionError {
                    error: ListenError::Denied { cause },
                    ..
                } = target.select_next_some().await
                {
                    return cause;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), denied)
            .await
            .expect("no connection was denied")
    }

    /// Drives `target` until the connection limits deny an incoming connection; the limit hit.
    async fn until_denied(target: &mut Swarm<Behaviour>) -> u32 {
        until_denied_by(target)
            .await
            .downcast::<connection_limits::Exceeded>()
            .expect("denied by something other than the connection limits")
            .limit()
    }

    #[tokio::test]
    async fn connections_beyond_the_memory_budget_are_denied() {
        // Any process is above a one-byte budget.
        let mut target = swarm(|t| t.max_memory_bytes = 1);
        let addr = listen_addr(&mut target).await;
        let mut dialer = swarm(|_| {});
        dialer.dial(addr).unwrap();
        let dialer = drive(dialer);
        let exceeded = until_denied_by(&mut target)
            .await
            .downcast::<memory_connection_limits::MemoryUsageLimitExceeded>()
            .expect("denied by something other than the memory budget");
        assert_eq!(exceeded.max_allowed_bytes(), 1);
        assert!(exceeded.process_physical_memory_bytes() > 1);
        assert_eq!(target.connected_peers().count(), 0);
        dialer.abort();
    }

    #[tokio::test]
    async fn connections_beyond_the_total_limit_are_denied() {
        let mut target = swarm(|t| t.max_connections = NonZeroU32::MIN);
        let addr = listen_addr(&mut target).await;
        let dialers: Vec<_> = (0..2)
            .map(|_| {
                let mut dialer = swarm(|_| {});
                dialer.dial(addr.clone()).unwrap();
                drive(dialer)
            })
            .collect();
        assert_eq!(until_denied(&mut target).await, 1);
        assert_eq!(target.connected_peers().count(), 1);
        dialers.iter().for_each(JoinHandle::abort);
    }

    #[tokio::test]
    async fn connections_beyond_the_per_peer_limit_are_denied() {
        let mut target = swarm(|t| t.max_connections_per_peer = NonZeroU32::MIN);
        let addr = listen_addr(&mut target).await;
        let mut dialer = swarm(|_| {});
        dialer.dial(addr.clone()).unwrap();
        dialer.dial(addr).unwrap();
        let dialer = drive(dialer);
        assert_eq!(until_denied(&mut target).await, 1);
        assert_eq!(target.connected_peers().count(), 1);
        dialer.abort();
    }
}
