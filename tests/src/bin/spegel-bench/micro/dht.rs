//! DHT lookup latency with many routers in one process: the daemon's own router (Kademlia,
//! Identify, the membership handshake, noise and yamux) over libp2p's memory transport. There
//! is no network delay here: this is the protocol's hop count and CPU cost; on a real network
//! every hop adds a round trip.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use spegel::{
    membership::ClusterSecrets,
    p2p::{NodeKey, P2pConfig, P2pRouter, RegistryAdvertise, TransportKind, Tunables},
    routing::Router as _,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Rng, Row, percentile, sorted};

/// Routers started at once; each wave waits until all of its routers have joined.
const WAVE: usize = 50;
/// Routers every other router bootstraps from.
const SEEDS: usize = 4;
/// Keys advertised, each by a router chosen at random.
const KEYS: usize = 100;
/// Lookups per key, each from another router chosen at random.
const LOOKUPS_PER_KEY: usize = 10;
/// Patience for joining and providing.
const PATIENCE: Duration = Duration::from_secs(120);
/// The DHT counts as settled when no bootstrap has ended for this long.
const QUIET: Duration = Duration::from_secs(2);
/// Patience for a wave's bootstraps.
const SETTLE_PATIENCE: Duration = Duration::from_secs(600);
const SECRET: &str = "spegel-bench-cluster-secret-0123456789";

/// What the lookups took.
#[derive(Debug, serde::Serialize)]
pub(crate) struct DhtResult {
    pub(crate) routers: usize,
    pub(crate) lookups: usize,
    pub(crate) found: usize,
    /// Provide queries (one per key) that reached no router.
    pub(crate) provides_failed: usize,
    /// Each key's time from `advertise` to the end of its provide query (ms).
    pub(crate) provide_ms: Vec<f64>,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Every lookup's time to its first provider (ms); lookups that found nothing are not here.
    pub(crate) found_ms: Vec<f64>,
    pub(crate) start_secs: f64,
    /// The bench process's resident memory with every router running, per router (KiB).
    pub(crate) rss_per_router_kib: Option<u64>,
}

impl DhtResult {
    pub(crate) fn summary(&self) -> String {
        let provides = sorted(self.provide_ms.clone());
        format!(
            "{} routers up in {:.1} s; provides p50 {:.0} ms, max {:.0} ms; {} of {} lookups found a provider: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.routers,
            self.start_secs,
            percentile(&provides, 0.5),
            provides.last().copied().unwrap_or(f64::NAN),
            self.found,
            self.lookups,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }

    pub(crate) fn rows(&self) -> Vec<Row> {
        vec![Row {
            what: format!(
                "DHT lookup, first provider, {} routers (memory transport), p50 / p99",
                self.routers
            ),
            measured: format!("{:.1} / {:.1} ms", self.p50_ms, self.p99_ms),
            baseline: String::new(),
            ratio: None,
            goal: "p99 ≤ 100 ms, every lookup found".into(),
            met: self.p99_ms <= 100.0 && self.found == self.lookups,
        }]
    }
}

struct Running {
    router: P2pRouter,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Bootstrap queries this router has run to their end.
    fn bootstraps(&self) -> u64 {
        self.router
            .stats()
            .bootstraps
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn start(n: usize, seeds: Vec<String>) -> Result<Running> {
    let mut config = P2pConfig::new(
        NodeKey::Ephemeral,
        TransportKind::Memory,
        // As the daemon's own in-process tests do: memory-transport peers have no IP to check an
        // announced address against.
        RegistryAdvertise::Addr(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            20_000 + n as u16,
        ))),
    );
    config.listen_addrs = vec!["/memory/0".parse()?];
    config.bootstrap_peers = seeds.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    config.secrets = Some(ClusterSecrets::new(&[SECRET])?);
    // Production timings, except: no lookup result cache (every lookup goes to the DHT), no
    // memory guard (it reads this process's memory, which holds every router), and no periodic
    // routing table refresh within the run: each node's refresh every few minutes is its own
    // small background cost on its own machine, but a thousand of them on these two cores
    // would leave no moment without one (joining takes longer than the interval).
    config.tunables = Tunables {
        lookup_cache_ttl: Duration::ZERO,
        max_memory_bytes: usize::MAX,
        rebootstrap_interval: Duration::from_secs(24 * 60 * 60),
        ..Tunables::default()
    };
    let (router, event_loop) = P2pRouter::new(config)?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(event_loop.run(shutdown.clone()));
    Ok(Running {
        router,
        shutdown,
        task,
    })
}

/// Waits until every router has finished a bootstrap (its routing table refresh on joining)
/// and none has ended for [`QUIET`]. Joining costs each router a few hundred dials and noise
/// handshakes; spread over a cluster's machines that is nothing, but here every router shares
/// two cores, so a wave's refreshes are let finish before the next wave or any measurement
/// starts (a lookup during them measures the queue for the CPU, not the DHT).
async fn settle(routers: &[Running]) -> Result<()> {
    let deadline = Instant::now() + SETTLE_PATIENCE;
    let mut last = bootstraps(routers);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = bootstraps(routers);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        let all_refreshed = routers.iter().all(|r| r.bootstraps() > 0);
        if all_refreshed && since.elapsed() >= QUIET {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the routers' bootstraps did not settle within {SETTLE_PATIENCE:?}");
        }
    }
}

/// Bootstrap queries ended, over every router.
fn bootstraps(routers: &[Running]) -> u64 {
    routers.iter().map(Running::bootstraps).sum()
}

async fn seed_addr(router: &P2pRouter) -> Result<String> {
    let addrs = tokio::time::timeout(PATIENCE, router.listen_addrs())
        .await
        .context("no listen address")??;
    let addr = addrs.first().context("no listen address")?;
    Ok(format!("{addr}/p2p/{}", router.peer_id()))
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub(crate) async fn run(count: usize) -> Result<DhtResult> {
    let started = Instant::now();
    let mut routers: Vec<Running> = Vec::with_capacity(count);
    let result = measure(count, &mut routers, started).await;
    for r in &routers {
        r.shutdown.cancel();
    }
    for r in routers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r.task).await;
    }
    result
}

async fn measure(count: usize, routers: &mut Vec<Running>, started: Instant) -> Result<DhtResult> {
    anyhow::ensure!(
        count > SEEDS,
        "the DHT benchmark needs more than {SEEDS} routers"
    );
    routers.push(start(0, Vec::new())?);
    let mut seeds = vec![seed_addr(&routers[0].router).await?];
    for n in 1..SEEDS {
        routers.push(start(n, seeds.clone())?);
        let router = &routers[n].router;
        wait_until("a seed joins", || router.has_peers()).await?;
        seeds.push(seed_addr(router).await?);
    }
    while routers.len() < count {
        let wave = routers.len()..(routers.len() + WAVE).min(count);
        for n in wave.clone() {
            routers.push(start(n, seeds.clone())?);
        }
        let joining = &routers[wave];
        wait_until("a wave of routers joins", || {
            joining.iter().all(|r| r.router.has_peers())
        })
        .await?;
        settle(routers).await?;
        println!(
            "  {} routers joined and settled after {:.1} s",
            routers.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let start_secs = started.elapsed().as_secs_f64();
    let rss_per_router_kib =
        super::proc_status_kib(std::process::id(), "VmRSS").map(|kib| kib / count as u64);
    println!(
        "  {count} routers joined in {start_secs:.1} s ({} bootstraps ended); advertising {KEYS} keys",
        bootstraps(routers)
    );

    let mut rng = Rng::new(0xd47);
    let mut providers = Vec::with_capacity(KEYS);
    let mut provides_failed = 0;
    let mut provide_ms = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let provider = rng.below(count);
        let key = format!("sha256:{:064x}", 0xb0b0_0000u64 + k as u64);
        let router = &routers[provider].router;
        let ended = || {
            let stats = router.stats();
            let ok = stats.provides_ok.load(std::sync::atomic::Ordering::Relaxed);
            (
                ok,
                ok + stats
                    .provides_failed
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let (ok_before, ended_before) = ended();
        let t = Instant::now();
        router.advertise(vec![key.clone()]).await?;
        // Until the provide query ended; one that reached nobody shows as lookups that find
        // nothing, which the goal counts.
        wait_until("a provide query ends", || ended().1 > ended_before).await?;
        provide_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if (k + 1) % 10 == 0 {
            println!(
                "  {} keys provided after {:.1} s ({} bootstraps ended)",
                k + 1,
                started.elapsed().as_secs_f64(),
                bootstraps(routers)
            );
        }
        if ended().0 == ok_before {
            provides_failed += 1;
        }
        providers.push((key, provider));
    }

    let mut found_ms = Vec::new();
    let mut lookups = 0;
    for (key, provider) in &providers {
        for _ in 0..LOOKUPS_PER_KEY {
            let mut from = rng.below(count);
            while from == *provider {
                from = rng.below(count);
            }
            let router = &routers[from].router;
            lookups += 1;
            let t = Instant::now();
            let mut rx = router.lookup(key, 1).await?;
            if rx.recv().await.is_some() {
                found_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    if provides_failed > 0 {
        println!("  {provides_failed} of {KEYS} provide queries reached no router");
    }
    let found = found_ms.len();
    let by_time = sorted(found_ms.clone());
    Ok(DhtResult {
        routers: count,
        lookups,
        found,
        provides_failed,
        provide_ms,
        p50_ms: percentile(&by_time, 0.5),
        p99_ms: percentile(&by_time, 0.99),
        max_ms: by_time.last().copied().unwrap_or(f64::NAN),
        found_ms,
        start_secs,
        rss_per_router_kib,
    })
}
