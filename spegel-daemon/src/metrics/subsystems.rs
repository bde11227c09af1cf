//! The counters subsystems keep themselves (peer fetching, interception, the router, the
//! registry API's connections), read at scrape time and exported under their `spegel_peer_*`,
//! `spegel_intercept_*`, `spegel_router_*` and `spegel_registry_*` names; with the latency
//! histograms peer fetching and the router keep (`spegel_peer_*_seconds`,
//! `spegel_p2p_lookup_duration_seconds`) and the router's gauges (`spegel_p2p_peers`,
//! `spegel_advertised_keys`).
use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
};

use crate::{
    intercept::InterceptStats,
    oci::Kind,
    p2p::{LookupOutcome, P2pRouter},
    peers::{FetchMetrics, FetchTimings},
    routing::Router as _,
};

/// What the registry API's server did to its connections. Kept here, not in `serve/`, because
/// `serve/` depends on this module; the server holds it and counts into it.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections closed at once because their client IP held its share of connections.
    pub refused: AtomicU64,
    /// Connections closed because the client stopped reading: a write made no progress for
    /// the write timeout.
    pub write_timeouts: AtomicU64,
    /// Content requests refused because they did not come from a cluster member (401).
    pub unauthorized: AtomicU64,
    /// Connections whose TLS handshake failed (no or a foreign client certificate).
    pub tls_failures: AtomicU64,
    /// Body bytes sent with `sendfile(2)` from containerd's content files (plain peer
    /// connections).
    pub sendfile_bytes: AtomicU64,
}

/// Collects the subsystems' counters on every scrape; each subsystem is optional but the
/// registry API, which every daemon runs.
#[derive(Debug)]
pub(super) struct Subsystems {
    pub(super) api: Arc<ConnectionStats>,
    pub(super) fetch: Option<Arc<FetchMetrics>>,
    pub(super) intercept: Option<Arc<InterceptStats>>,
    pub(super) router: Option<P2pRouter>,
}

impl Collector for Subsystems {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for (name, value, help) in [
            (
                "spegel_registry_refused_connections",
                &self.api.refused,
                "Registry API connections closed at once: their client held its share.",
            ),
            (
                "spegel_registry_write_timeouts",
                &self.api.write_timeouts,
                "Registry API connections closed because the client stopped reading.",
            ),
            (
                "spegel_registry_unauthorized_requests",
                &self.api.unauthorized,
                "Content requests refused (401): not from this node, nor a cluster member.",
            ),
            (
                "spegel_registry_tls_failures",
                &self.api.tls_failures,
                "Registry API connections whose TLS handshake failed (no cluster certificate).",
            ),
            (
                "spegel_registry_sendfile_bytes",
                &self.api.sendfile_bytes,
                "Body bytes sent with sendfile(2) from containerd's content files.",
            ),
        ] {
            counter(&mut encoder, name, help, load(value))?;
        }
        if let Some(fetch) = &self.fetch {
            let s = fetch.snapshot();
            for (name, value, help) in [
                (
                    "spegel_peer_lookups",
                    s.lookups,
                    "DHT lookups for peer fetches.",
                ),
                ("spegel_peer_hits", s.hits, "Objects served by a peer."),
                (
                    "spegel_peer_misses",
                    s.misses,
                    "Peer fetches that found no usable peer.",
                ),
                (
                    "spegel_peer_attempts",
                    s.attempts,
                    "Requests sent to peers.",
                ),
                (
                    "spegel_peer_attempt_failures",
                    s.attempt_failures,
                    "Peer requests that failed.",
                ),
                (
                    "spegel_peer_hedges",
                    s.hedges,
                    "Hedged second requests fired.",
                ),
                ("spegel_peer_bytes", s.bytes, "Bytes received from peers."),
                (
                    "spegel_peer_verify_failures",
                    s.verify_failures,
                    "Peer content that failed sha256 verification.",
                ),
                (
                    "spegel_peer_quarantines",
                    s.quarantines,
                    "Peers quarantined for bad content.",
                ),
                (
                    "spegel_peer_resumes",
                    s.resumes,
                    "Blob transfers resumed with Range after a failure.",
                ),
                (
                    "spegel_peer_resume_fallbacks",
                    s.resume_fallbacks,
                    "Blob transfers finished by the fallback source.",
                ),
            ] {
                counter(&mut encoder, name, help, value)?;
            }
            let timings = &fetch.timings;
            histograms(
                &mut encoder,
                "spegel_peer_first_byte_seconds",
                "Objects a peer served: time from asking the peers to an answer to respond with \
                 (a blob's headers, a manifest's verified bytes), by kind.",
                "kind",
                by_kind(&timings.first_byte),
            )?;
            histograms(
                &mut encoder,
                "spegel_peer_fetch_duration_seconds",
                "Objects a peer served: time from asking the peers to the last byte, verified, \
                 by kind.",
                "kind",
                by_kind(&timings.complete),
            )?;
        }
        if let Some(stats) = &self.intercept {
            for (name, value, help) in [
                (
                    "spegel_intercept_accepted",
                    &stats.accepted,
                    "Redirected connections accepted.",
                ),
                (
                    "spegel_intercept_no_origin",
                    &stats.no_origin,
                    "Accepted connections with no original destination.",
                ),
                (
                    "spegel_intercept_spliced",
                    &stats.spliced,
                    "Connections passed through untouched.",
                ),
                (
                    "spegel_intercept_bypass_learned",
                    &stats.bypass_learned,
                    "Destinations learned to carry no mirrored registry; their connects then go direct.",
                ),
                (
                    "spegel_intercept_mirrored",
                    &stats.mirrored,
                    "Connections to mirrored registries served by spegel.",
                ),
                (
                    "spegel_intercept_write_timeouts",
                    &stats.write_timeouts,
                    "Intercepted connections (passed through or served) closed because the client read nothing.",
                ),
                (
                    "spegel_intercept_probe_failures",
                    &stats.probe_failures,
                    "Health probes the interception listener did not accept in time.",
                ),
                (
                    "spegel_intercept_wedges",
                    &stats.wedges,
                    "Times the listener was wedged and the eBPF redirect detached.",
                ),
            ] {
                counter(&mut encoder, name, help, load(value))?;
            }
            let attached = ConstGauge::new(i64::from(stats.attached.load(Ordering::Relaxed)));
            attached.encode(encoder.encode_descriptor(
                "spegel_intercept_attached",
                "Whether the eBPF redirect is attached to containerd's cgroup.",
                None,
                attached.metric_type(),
            )?)?;
        }
        if let Some(router) = &self.router {
            let stats = router.stats();
            for (name, value, help) in [
                ("spegel_router_lookups", &stats.lookups, "Router lookups."),
                (
                    "spegel_router_lookup_cache_hits",
                    &stats.lookup_cache_hits,
                    "Lookups answered from the cache.",
                ),
                (
                    "spegel_router_peers_found",
                    &stats.peers_found,
                    "Providers found by lookups.",
                ),
                (
                    "spegel_router_provides_ok",
                    &stats.provides_ok,
                    "Provider records published.",
                ),
                (
                    "spegel_router_provides_failed",
                    &stats.provides_failed,
                    "Provider records that failed to publish.",
                ),
                (
                    "spegel_router_bootstraps",
                    &stats.bootstraps,
                    "Routing table refreshes (Kademlia bootstrap queries) run to their end.",
                ),
                (
                    "spegel_router_registry_addrs_refused",
                    &stats.registry_addrs_refused,
                    "Registry addresses peers announced that the address policy refused (their port is used with the IP they are reached at).",
                ),
            ] {
                counter(&mut encoder, name, help, load(value))?;
            }
            let has_peers = ConstGauge::new(i64::from(router.has_peers()));
            has_peers.encode(encoder.encode_descriptor(
                "spegel_router_has_peers",
                "Whether this node knows another node.",
                None,
                has_peers.metric_type(),
            )?)?;
            {
                let mut family = encoder.encode_descriptor(
                    "spegel_p2p_peers",
                    "Other nodes this node has a libp2p connection to (connected), and in its \
                     Kademlia routing table (routing_table).",
                    None,
                    MetricType::Gauge,
                )?;
                for (state, value) in [
                    ("connected", router.connected_peers()),
                    ("routing_table", router.routing_table_size()),
                ] {
                    ConstGauge::new(gauge_value(value))
                        .encode(family.encode_family(&[("state", state)])?)?;
                }
            }
            let advertised = ConstGauge::new(gauge_value(router.advertised_keys()));
            advertised.encode(encoder.encode_descriptor(
                "spegel_advertised_keys",
                "Keys (digests, image names) this node advertises in the DHT.",
                None,
                advertised.metric_type(),
            )?)?;
            let durations = &stats.lookup_durations;
            histograms(
                &mut encoder,
                "spegel_p2p_lookup_duration_seconds",
                "DHT lookups that went to the network (not answered from the cache), by outcome: \
                 found (timed to the first provider resolved), not_found, timeout, error.",
                "outcome",
                LookupOutcome::ALL.map(|outcome| (outcome.label(), durations.of(outcome))),
            )?;
        }
        Ok(())
    }
}

/// Writes histogram family `name`, one series per `label` value.
fn histograms<'h>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'static str, &'h Histogram)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (value, histogram) in series {
        histogram.encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

/// The series of a by-kind pair of histograms, labelled.
fn by_kind(histograms: &[Histogram; 2]) -> [(&'static str, &Histogram); 2] {
    [(Kind::Manifest, "manifest"), (Kind::Blob, "blob")]
        .map(|(kind, label)| (label, &histograms[FetchTimings::index(kind)]))
}

fn gauge_value(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Writes counter family `name` (its sample gets the `_total` suffix) with `value`.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}
