//! In-process tests of the p2p router: many routers over the memory transport, a few over
//! loopback TCP.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use libp2p::{Multiaddr, multiaddr::Protocol};
use sha2::{Digest as _, Sha256};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::routing::{Peer, Router, RouterError};

/// Patience for anything that depends on the network settling; far above what it needs.
const PATIENCE: Duration = Duration::from_secs(60);

/// Short timings so expiry and retries happen within a test.
fn test_tunables() -> Tunables {
    Tunables {
        lookup_timeout: Duration::from_secs(5),
        lookup_cache_ttl: Duration::from_millis(100),
        provider_record_ttl: Duration::from_secs(60),
        reprovide_interval: Duration::from_secs(30),
        reprovide_jitter: Duration::from_secs(1),
        provide_retry: Duration::from_millis(200),
        rebootstrap_interval: Duration::from_secs(60),
        bootstrap_backoff_min: Duration::from_millis(50),
        bootstrap_backoff_max: Duration::from_millis(500),
        query_timeout: Duration::from_secs(10),
        tick: Duration::from_millis(50),
        ..Tunables::default()
    }
}

/// A running router.
struct Node {
    router: P2pRouter,
    /// What its lookups should report as its registry.
    registry: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Node {
    fn start(config: P2pConfig) -> Self {
        let registry = match config.registry {
            RegistryAdvertise::Addr(addr) => addr,
            RegistryAdvertise::Port(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let (router, event_loop) = P2pRouter::new(config).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(event_loop.run(shutdown.clone()));
        Self {
            router,
            registry,
            shutdown,
            task,
        }
    }

    /// A memory-transport node whose registry is "at" 127.0.0.1:(20000 + n).
    fn memory(n: u16, seeds: Vec<Multiaddr>, tunables: Tunables) -> Self {
        Self::member(n, seeds, tunables, None)
    }

    /// [`Node::memory`] that connects only with holders of `secret`.
    fn member(n: u16, seeds: Vec<Multiaddr>, tunables: Tunables, secret: Option<&str>) -> Self {
        let registry = SocketAddr::from(([127, 0, 0, 1], 20_000 + n));
        let mut config = P2pConfig::new(
            NodeKey::Ephemeral,
            TransportKind::Memory,
            RegistryAdvertise::Addr(registry),
        );
        config.listen_addrs = vec!["/memory/0".parse().unwrap()];
        config.bootstrap_peers = seeds;
        config.tunables = tunables;
        config.secrets = secret.map(|s| crate::membership::ClusterSecrets::new(&[s]).unwrap());
        Self::start(config)
    }

    fn peer(&self) -> Peer {
        Peer {
            id: self.router.peer_id().to_string(),
            addr: self.registry,
        }
    }

    /// The node's first listen address, with its peer id.
    async fn addr(&self) -> Multiaddr {
        let addrs = tokio::time::timeout(PATIENCE, self.router.listen_addrs())
            .await
            .expect("no listen address")
            .unwrap();
        addrs[0].clone().with(Protocol::P2p(self.router.peer_id()))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// Every peer a lookup yields, until its channel closes.
async fn lookup(router: &dyn Router, key: &str, count: usize) -> Vec<Peer> {
    let mut rx = router.lookup(key, count).await.unwrap();
    let mut peers = Vec::new();
    let drained = tokio::time::timeout(PATIENCE, async {
        while let Some(peer) = rx.recv().await {
            peers.push(peer);
        }
    })
    .await;
    assert!(drained.is_ok(), "lookup channel for {key} never closed");
    peers
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=spegel=debug`).
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it holds, panicking after `PATIENCE`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Looks `key` up from `router` until `expected` (exactly) comes back; any other non-empty
/// answer fails at once.
async fn expect_found(router: &P2pRouter, key: &str, count: usize, expected: &[Peer]) {
    let expected: BTreeSet<_> = expected.iter().map(|p| (p.id.clone(), p.addr)).collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got: BTreeSet<_> = lookup(router, key, count)
            .await
            .into_iter()
            .map(|p| (p.id, p.addr))
            .collect();
        if got == expected {
            return;
        }
        assert!(
            got.is_subset(&expected),
            "lookup of {key} from {} returned {got:?}, expected {expected:?}",
            router.peer_id()
        );
        assert!(
            Instant::now() < deadline,
            "{key} not found from {}: got {got:?}",
            router.peer_id()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_cluster_secret_join() {
    init_tracing();
    const SECRET: &str = "cluster-secret-0123456789";
    let first = Node::member(0, Vec::new(), test_tunables(), Some(SECRET));
    let seed = first.addr().await;
    let member = Node::member(1, vec![seed.clone()], test_tunables(), Some(SECRET));
    let stranger = Node::member(
        2,
        vec![seed.clone()],
        test_tunables(),
        Some("another-secret-0123456789"),
    );
    let open = Node::memory(3, vec![seed], test_tunables());
    eventually("the member joins", || async { member.router.has_peers() }).await;
    let key = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    member.router.advertise(vec![key.to_owned()]).await.unwrap();
    eventually("the first node finds the member's key", || async {
        lookup(&first.router, key, 5).await == vec![member.peer()]
    })
    .await;
    // Given time to bootstrap (the member joined meanwhile), neither outsider got in.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for outsider in [&stranger, &open] {
        assert!(!outsider.router.has_peers());
        assert!(lookup(&outsider.router, key, 5).await.is_empty());
    }
    for node in [first, member, stranger, open] {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_routers_find_each_others_keys() {
    const NODES: u16 = 50;
    init_tracing();
    let mut nodes: Vec<Node> = Vec::new();
    for n in 0..NODES {
        // Each node knows the first node and its predecessor: one connected network.
        let mut seeds = Vec::new();
        if let Some(first) = nodes.first() {
            seeds.push(first.addr().await);
        }
        if nodes.len() > 1 {
            seeds.push(nodes[nodes.len() - 1].addr().await);
        }
        nodes.push(Node::memory(n, seeds, test_tunables()));
    }
    eventually("every router has peers", || async {
        nodes.iter().all(|n| n.router.has_peers())
    })
    .await;

    // Every tenth node provides a digest and a tag of its own; two nodes share one more key.
    let mut keys: Vec<(String, Peer)> = Vec::new();
    for node in nodes.iter().step_by(10) {
        let digest = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(node.router.peer_id().to_bytes()))
        );
        let tag = format!("registry.test/image-{}:v1", node.registry.port());
        node.router
            .advertise(vec![digest.clone(), tag.clone()])
            .await
            .unwrap();
        keys.push((digest, node.peer()));
        keys.push((tag, node.peer()));
    }
    for n in [3, 7] {
        nodes[n]
            .router
            .advertise(vec!["shared".into()])
            .await
            .unwrap();
    }

    let keys = Arc::new(keys);
    let checks = nodes.iter().map(|node| {
        let keys = Arc::clone(&keys);
        let router = node.router.clone();
        async move {
            for (key, provider) in keys.iter() {
                if provider.id == router.peer_id().to_string() {
                    // Self is never returned: our own key looks unprovided.
                    assert!(lookup(&router, key, 3).await.is_empty());
                } else {
                    expect_found(&router, key, 1, std::slice::from_ref(provider)).await;
                }
            }
        }
    });
    futures::future::join_all(checks).await;

    // Both providers of a shared key, from a node that provides neither.
    expect_found(
        &nodes[20].router,
        "shared",
        3,
        &[nodes[3].peer(), nodes[7].peer()],
    )
    .await;
    // count bounds the answer.
    assert_eq!(lookup(&nodes[20].router, "shared", 1).await.len(), 1);
    assert!(
        lookup(&nodes[20].router, "never-advertised", 3)
            .await
            .is_empty()
    );

    let stats = nodes[20].router.stats();
    assert!(stats.lookups.load(Ordering::Relaxed) >= keys.len() as u64);
    assert!(stats.peers_found.load(Ordering::Relaxed) > 0);
    assert!(nodes[0].router.stats().provides_ok.load(Ordering::Relaxed) >= 2);

    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn concurrent_lookups_share_one_query_and_results_are_cached() {
    let mut tunables = test_tunables();
    tunables.lookup_cache_ttl = Duration::from_secs(60);
    let a = Node::memory(0, Vec::new(), tunables.clone());
    let b = Node::memory(1, vec![a.addr().await], tunables);
    eventually("the two routers see each other", || async {
        a.router.has_peers() && b.router.has_peers()
    })
    .await;
    a.router.advertise(vec!["k".into()]).await.unwrap();
    expect_found(&b.router, "k", 1, &[a.peer()]).await;

    let hits_before = b.router.stats().lookup_cache_hits.load(Ordering::Relaxed);
    let results = futures::future::join_all((0..10).map(|_| lookup(&b.router, "k", 1))).await;
    for peers in results {
        assert_eq!(peers, vec![a.peer()]);
    }
    assert_eq!(
        b.router.stats().lookup_cache_hits.load(Ordering::Relaxed),
        hits_before + 10,
        "answered from the cache"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn lone_router_has_no_peers_and_answers_empty() {
    let mut tunables = test_tunables();
    // A lookup that waited for its timeout would take this long; an empty DHT must not.
    tunables.lookup_timeout = Duration::from_secs(30);
    let node = Node::memory(0, Vec::new(), tunables);
    node.addr().await;
    assert!(!node.router.has_peers());
    node.router
        .advertise(vec!["sha256:mine".into()])
        .await
        .unwrap();
    let started = Instant::now();
    assert!(lookup(&node.router, "sha256:mine", 3).await.is_empty());
    assert!(lookup(&node.router, "sha256:other", 3).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "lookups waited for their timeout"
    );
    assert_eq!(lookup(&node.router, "k", 0).await, Vec::new());
    node.router
        .withdraw(vec!["sha256:mine".into()])
        .await
        .unwrap();
    assert!(!node.router.has_peers());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_reprovided_until_withdrawn() {
    let mut tunables = test_tunables();
    tunables.provider_record_ttl = Duration::from_secs(2);
    tunables.reprovide_interval = Duration::from_millis(800);
    tunables.reprovide_jitter = Duration::from_millis(100);
    let first = Node::memory(0, Vec::new(), tunables.clone());
    let seed = first.addr().await;
    let mut nodes = vec![first];
    for n in 1..5 {
        nodes.push(Node::memory(n, vec![seed.clone()], tunables.clone()));
    }
    eventually("every router has peers", || async {
        nodes.iter().all(|n| n.router.has_peers())
    })
    .await;

    nodes[1].router.advertise(vec!["k".into()]).await.unwrap();
    expect_found(&nodes[4].router, "k", 1, &[nodes[1].peer()]).await;
    // Well past the record TTL: still found, because the provider re-provides.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        lookup(&nodes[4].router, "k", 1).await,
        vec![nodes[1].peer()]
    );
    assert!(nodes[1].router.stats().provides_ok.load(Ordering::Relaxed) >= 3);

    nodes[1].router.withdraw(vec!["k".into()]).await.unwrap();
    // Other nodes keep the record until it expires, then nobody finds it.
    eventually("the withdrawn key is gone", || async {
        lookup(&nodes[4].router, "k", 1).await.is_empty()
            && lookup(&nodes[2].router, "k", 1).await.is_empty()
    })
    .await;
    // And it stays gone: no re-provide brings it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(lookup(&nodes[4].router, "k", 1).await.is_empty());

    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn peer_id_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = P2pConfig::new(
            NodeKey::Persistent(dir.path().to_path_buf()),
            TransportKind::Memory,
            RegistryAdvertise::Port(5000),
        );
        config.listen_addrs = vec!["/memory/0".parse().unwrap()];
        config
    };
    let first = Node::start(config());
    let id = first.router.peer_id();
    first.stop().await;
    let second = Node::start(config());
    assert_eq!(second.router.peer_id(), id);
    second.stop().await;

    let other = tempfile::tempdir().unwrap();
    let mut config = config();
    config.key = NodeKey::Persistent(other.path().to_path_buf());
    let third = Node::start(config);
    assert_ne!(third.router.peer_id(), id);
    third.stop().await;
}

#[tokio::test]
async fn stops_on_shutdown_or_when_handles_drop() {
    let node = Node::memory(0, Vec::new(), test_tunables());
    let router = node.router.clone();
    node.stop().await;
    assert!(matches!(
        router.lookup("k", 1).await,
        Err(RouterError::Closed)
    ));
    assert!(matches!(
        router.advertise(vec!["k".into()]).await,
        Err(RouterError::Closed)
    ));

    let node = Node::memory(1, Vec::new(), test_tunables());
    let task = node.task;
    drop(node.router);
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("event loop outlived its handles")
        .unwrap();
}

/// Over loopback TCP with port-only registry announcements: the registry address is the IP the
/// provider was reached at plus its own port, and a node can bootstrap from a DNS name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routers_pair_reached_ip_with_announced_port() {
    let tcp = |port: u16, seeds: Vec<Multiaddr>, dns: Option<DnsSeed>| {
        let mut config = P2pConfig::new(
            NodeKey::Ephemeral,
            TransportKind::Tcp,
            RegistryAdvertise::Port(port),
        );
        config.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        config.bootstrap_peers = seeds;
        config.bootstrap_dns = dns;
        config.tunables = test_tunables();
        Node::start(config)
    };
    let a = tcp(15_000, Vec::new(), None);
    let a_addr = a.addr().await;
    let a_port = a_addr
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    let b = tcp(15_001, vec![a_addr], None);
    let c = tcp(
        15_002,
        Vec::new(),
        Some(format!("localhost:{a_port}").parse().unwrap()),
    );
    eventually("the TCP routers see each other", || async {
        [&a, &b, &c].iter().all(|n| n.router.has_peers())
    })
    .await;

    a.router
        .advertise(vec!["sha256:on-a".into()])
        .await
        .unwrap();
    c.router
        .advertise(vec!["sha256:on-c".into()])
        .await
        .unwrap();
    expect_found(&b.router, "sha256:on-a", 1, &[a.peer()]).await;
    expect_found(&b.router, "sha256:on-c", 1, &[c.peer()]).await;
    expect_found(&c.router, "sha256:on-a", 1, &[a.peer()]).await;
    expect_found(&a.router, "sha256:on-c", 1, &[c.peer()]).await;

    for node in [a, b, c] {
        node.stop().await;
    }
}

/// A router that joins another refreshes its routing table (a Kademlia bootstrap) and counts
/// it once the query has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_router_counts_its_routing_table_refresh() {
    let a = Node::memory(0, Vec::new(), test_tunables());
    let b = Node::memory(1, vec![a.addr().await], test_tunables());
    eventually("b's bootstrap ends", || async {
        b.router.stats().bootstraps.load(Ordering::Relaxed) >= 1
    })
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_lookup_durations_and_libp2p_metrics_follow_the_network() {
    let a = Node::memory(0, Vec::new(), test_tunables());
    let b = Node::memory(1, vec![a.addr().await], test_tunables());
    eventually("the two routers are connected", || async {
        a.router.connected_peers() == 1 && b.router.connected_peers() == 1
    })
    .await;
    eventually("each has the other in its routing table", || async {
        a.router.routing_table_size() == 1 && b.router.routing_table_size() == 1
    })
    .await;
    assert_eq!(a.router.advertised_keys(), 0);
    a.router
        .advertise(vec!["k".into(), "k2".into()])
        .await
        .unwrap();
    // The event loop counts the keys it provides as it takes them up, not before `advertise`
    // returns.
    eventually("a counts the keys it advertises", || async {
        a.router.advertised_keys() == 2
    })
    .await;

    let durations = &b.router.stats().lookup_durations;
    expect_found(&b.router, "k", 1, &[a.peer()]).await;
    assert!(durations.of(LookupOutcome::Found).count() >= 1);
    // expect_found's early tries (before the record spread) may have ended not found too.
    let not_found = durations.of(LookupOutcome::NotFound).count();
    assert!(lookup(&b.router, "nobody-has-this", 1).await.is_empty());
    assert_eq!(durations.of(LookupOutcome::NotFound).count(), not_found + 1);
    assert_eq!(durations.of(LookupOutcome::Timeout).count(), 0);

    let mut libp2p = String::new();
    prometheus_client::encoding::text::encode_registry(&mut libp2p, b.router.libp2p_metrics())
        .unwrap();
    for family in [
        "libp2p_swarm_connections_established",
        "libp2p_kad_query_result_get_providers_ok",
        "libp2p_identify_errors",
    ] {
        assert!(
            libp2p.contains(&format!("# TYPE {family} ")),
            "{family}: {libp2p}"
        );
    }

    a.stop().await;
    eventually("b notices a is gone", || async {
        b.router.connected_peers() == 0
    })
    .await;
    b.stop().await;
}
