//! The protocols the swarm speaks — Kademlia in server mode over this node's provider store, and
//! Identify carrying the registry announcement — and the swarm built around them.
use libp2p::{
    StreamProtocol, Swarm, identify, identity::Keypair, kad, swarm, swarm::NetworkBehaviour,
};

use super::{
    IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL, P2pConfig, P2pError, registry_addr,
    store::ProviderStore, transport,
};

/// The protocols the swarm speaks.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) kad: kad::Behaviour<ProviderStore>,
    pub(super) identify: identify::Behaviour,
}

/// Builds the swarm (transport, Kademlia, Identify) and binds the listen addresses.
pub(super) fn build_swarm(
    config: &P2pConfig,
    keypair: &Keypair,
) -> Result<Swarm<Behaviour>, P2pError> {
    let tunables = &config.tunables;
    let local = keypair.public().to_peer_id();
    let transport = transport::build(config.transport, keypair)?;

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
    Ok(swarm)
}
