//! Every metric family the daemon can export, rendered once: what dashboards and alert rules
//! may name (`tests/tests/deploy.rs` checks `deploy/` against it).
use std::{net::SocketAddr, sync::Arc};

use super::{AccessStats, Metrics, TagStats};
use crate::{
    intercept::InterceptStats,
    p2p::{NodeKey, P2pConfig, P2pRouter, RegistryAdvertise, TransportKind},
    peers::FetchMetrics,
    tls::continuity::CaStats,
};

/// The OpenMetrics text of a registry wired like the daemon's in transparent mode (every
/// subsystem present, so every family is there), all values at zero.
#[doc(hidden)]
pub fn exposition_of_every_family() -> String {
    // The router's event loop never runs; only its counters are read. Building its swarm wants
    // a runtime to be current.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
    let _entered = runtime.enter();
    let mut config = P2pConfig::new(
        NodeKey::Ephemeral,
        TransportKind::Memory,
        RegistryAdvertise::Addr(SocketAddr::from(([127, 0, 0, 1], 5000))),
    );
    config.listen_addrs = vec!["/memory/0".parse().expect("a memory multiaddr")];
    let (router, _event_loop) = P2pRouter::new(config).expect("a memory-transport router");
    let metrics = Metrics::new(
        Some(Arc::new(FetchMetrics::default())),
        Some(Arc::new(InterceptStats::default())),
        Some(router),
    )
    .with_tags(Arc::new(TagStats::default()))
    .with_fallbacks(Arc::new(super::FallbackStats::default()))
    .with_ca(Arc::new(CaStats::default()))
    .with_access(Arc::new(AccessStats::default()))
    .with_dials_ahead(Arc::new(crate::upstream::DialsAhead::default()));
    metrics
        .encode()
        .expect("encoding into a String cannot fail")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_subsystem_is_there() {
        let text = super::exposition_of_every_family();
        for family in [
            "spegel_served_objects",
            "spegel_peer_hits",
            "spegel_intercept_attached",
            "spegel_router_has_peers",
            "spegel_tag_fallbacks",
            "spegel_ca_next_pending",
            "spegel_registry_unauthorized_requests",
            "spegel_access_withheld",
            "spegel_upstream_fallbacks",
            "spegel_upstream_dials_ahead",
            "spegel_p2p_lookup_duration_seconds",
            "spegel_peer_first_byte_seconds",
            "spegel_peer_fetch_duration_seconds",
            "spegel_p2p_peers",
            "spegel_advertised_keys",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}: {text}"
            );
        }
    }
}
