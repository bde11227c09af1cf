//! Transparent mode on the rig, then two measurements:
//!
//! - **Passthrough**: nginx in the registry's namespace on a port spegel intercepts but does not
//!   mirror; curl in node A's containerd cgroup (redirected to the daemon, which splices it)
//!   against the same curl outside the cgroup (not redirected). Throughput of a large file, and
//!   time to the first byte of a small one on a fresh connection (the splice's added latency:
//!   the redirected connect completes at the daemon, which connects onwards once it has read
//!   the request's first bytes).
//! - **Passthrough once learned**: by default the daemon learns that a spliced destination carries
//!   no mirrored registry and later connects to it skip the redirect (`--intercept-bypass-ttl`).
//!   The two measurements above run with that off (every connect spliced); this one runs a second
//!   set of daemons with it on: after one spliced connection, throughput of the same file through
//!   the cgroup against outside it, checking that the listener accepted none of them. That nginx
//!   runs on the other node: the registry's address is a mirrored registry's, never learned.
//! - **Passthrough on a rate-limited link**: the same throughput comparison with the
//!   registry's link limited to [`LINK_BPS`] (`tc tbf`, as a datacenter NIC would be). Unlimited,
//!   both ways are bound by this machine's CPU, and a spliced connection crosses one more TCP
//!   stack than a direct one (into the daemon and out again), which on 2 cores shows as lost
//!   throughput; on a link the CPU can fill, the splice should cost nothing.
//! - **Miss** ([`super::miss`]): a blob no node has, through the intercepting daemon.
//!
//! Runs alternate between the two ways, so both see the same machine.

use std::{io::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use spegel_tests::{
    cluster,
    rig::{Rig, shape::Shaping, spegel::SpegelOptions, spegel::rig_registry_hosts},
};

use super::client::{self, CurlTimes};
use super::nginx::Nginx;
use super::{Rng, Row, miss, percentile, sorted};
use crate::MIB;

/// Intercepted (in the daemon's port list), not mirrored.
const PORT: u16 = 18081;
const BIG_MIB: u64 = 256;
const THROUGHPUT_RUNS: usize = 15;
const LATENCY_RUNS: usize = 40;
/// The rate of the limited link (bits per second).
const LINK_BPS: u64 = 1_000_000_000;
/// Runs per way on the limited link (each about 2 s).
const LINK_RUNS: usize = 7;

#[derive(Debug, serde::Serialize)]
pub(crate) struct PassthroughResult {
    /// Bytes per second, per run.
    pub(crate) spliced_bps: Vec<f64>,
    pub(crate) direct_bps: Vec<f64>,
    /// Time to first byte on a fresh connection (ms), per run.
    pub(crate) spliced_first_byte_ms: Vec<f64>,
    pub(crate) direct_first_byte_ms: Vec<f64>,
    /// Bytes per second, per run, on the link limited to [`LINK_BPS`].
    pub(crate) link_bps: u64,
    pub(crate) link_spliced_bps: Vec<f64>,
    pub(crate) link_direct_bps: Vec<f64>,
    /// Bytes per second, per run, from inside the cgroup once the destination is learned.
    pub(crate) learned_bps: Vec<f64>,
    pub(crate) learned_direct_bps: Vec<f64>,
    pub(crate) miss: miss::MissResult,
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 0.5)
}

impl PassthroughResult {
    fn added_ms(&self) -> f64 {
        median(&self.spliced_first_byte_ms) - median(&self.direct_first_byte_ms)
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "spliced {:.0} MB/s vs direct {:.0} MB/s; learned {:.0} vs {:.0} MB/s ({:.0} vs {:.0} MB/s spliced on a {} Mbit/s link); first byte spliced {:.3} ms vs direct {:.3} ms (+{:.3} ms)\n  miss: {}",
            median(&self.spliced_bps) / 1e6,
            median(&self.direct_bps) / 1e6,
            median(&self.learned_bps) / 1e6,
            median(&self.learned_direct_bps) / 1e6,
            median(&self.link_spliced_bps) / 1e6,
            median(&self.link_direct_bps) / 1e6,
            self.link_bps / 1_000_000,
            median(&self.spliced_first_byte_ms),
            median(&self.direct_first_byte_ms),
            self.added_ms(),
            self.miss.summary()
        )
    }

    pub(crate) fn rows(&self) -> Vec<Row> {
        let throughput = median(&self.spliced_bps) / median(&self.direct_bps);
        let on_link = median(&self.link_spliced_bps) / median(&self.link_direct_bps);
        let learned = median(&self.learned_bps) / median(&self.learned_direct_bps);
        let mut rows = vec![
            Row {
                what: format!(
                    "Passthrough (spliced) throughput, {BIG_MIB} MiB over plain HTTP, median of {THROUGHPUT_RUNS}"
                ),
                measured: format!("{:.0} MB/s", median(&self.spliced_bps) / 1e6),
                baseline: format!("{:.0} MB/s (direct)", median(&self.direct_bps) / 1e6),
                ratio: Some(throughput),
                goal: "≥ 0.95× direct".into(),
                met: throughput >= 0.95,
            },
            Row {
                what: format!(
                    "Passthrough throughput once the destination is learned (connects go direct), {BIG_MIB} MiB, median of {THROUGHPUT_RUNS}"
                ),
                measured: format!("{:.0} MB/s", median(&self.learned_bps) / 1e6),
                baseline: format!(
                    "{:.0} MB/s (direct)",
                    median(&self.learned_direct_bps) / 1e6
                ),
                ratio: Some(learned),
                goal: "≥ 0.95× direct".into(),
                met: learned >= 0.95,
            },
            Row {
                what: format!(
                    "Passthrough (spliced) throughput on a {} Mbit/s link (tbf), {BIG_MIB} MiB, median of {LINK_RUNS}",
                    self.link_bps / 1_000_000
                ),
                measured: format!("{:.0} MB/s", median(&self.link_spliced_bps) / 1e6),
                baseline: format!("{:.0} MB/s (direct)", median(&self.link_direct_bps) / 1e6),
                ratio: Some(on_link),
                goal: "≥ 0.95× direct".into(),
                met: on_link >= 0.95,
            },
            Row {
                what: format!(
                    "Passthrough added latency: first byte on a new connection, median of {LATENCY_RUNS}"
                ),
                measured: format!("{:.3} ms", median(&self.spliced_first_byte_ms)),
                baseline: format!("{:.3} ms (direct)", median(&self.direct_first_byte_ms)),
                ratio: Some(
                    median(&self.direct_first_byte_ms) / median(&self.spliced_first_byte_ms),
                ),
                goal: format!("< 0.5 ms added (measured +{:.3} ms)", self.added_ms()),
                met: self.added_ms() < 0.5,
            },
        ];
        rows.extend(self.miss.rows());
        rows
    }
}

pub(crate) async fn run(rig: &Rig) -> Result<PassthroughResult> {
    let root = rig.scratch_dir().join("passthrough-files");
    write_files(&root)?;
    let registry = rig.registry();
    let nginx = Nginx::start(
        rig,
        "nginx-passthrough",
        Some(registry.netns()),
        registry.ip(),
        &root,
        PORT,
        None,
    )
    .await?;
    // Warnings only, but the set-up waits for the interception's "attached" line.
    let options = || {
        SpegelOptions::transparent()
            .log("warn,spegel::intercept=info")
            .intercept_ports([PORT])
    };
    let result = async {
        // Every connect spliced: nothing is learned.
        let spliced = options().args(["--intercept-bypass-ttl", "0s"]);
        let cluster = cluster::transparent_for(rig, &rig_registry_hosts(rig), spliced).await?;
        let measured = measure(rig, &nginx, &cluster).await;
        for daemon in &cluster.daemons {
            daemon.stop().await?;
        }
        let mut measured = measured?;
        let other = rig.node(1);
        let elsewhere = Nginx::start(
            rig,
            "nginx-learned",
            Some(other.netns()),
            other.ip(),
            &root,
            PORT,
            None,
        )
        .await?;
        let learned = async {
            let cluster =
                cluster::transparent_for(rig, &rig_registry_hosts(rig), options()).await?;
            let learned = measure_learned(rig, &elsewhere, &cluster.daemons[0]).await;
            for daemon in &cluster.daemons {
                daemon.stop().await?;
            }
            learned
        }
        .await;
        elsewhere.stop().await?;
        (measured.learned_bps, measured.learned_direct_bps) = learned?;
        Ok(measured)
    }
    .await;
    nginx.stop().await?;
    result
}

async fn measure(
    rig: &Rig,
    nginx: &Nginx,
    cluster: &cluster::Transparent,
) -> Result<PassthroughResult> {
    let node = rig.node(0);
    nginx.wait_listening(node).await?;
    let big = format!("http://{}/big", nginx.plain);
    let small = format!("http://{}/small", nginx.plain);
    let mut result = PassthroughResult {
        spliced_bps: Vec::new(),
        direct_bps: Vec::new(),
        spliced_first_byte_ms: Vec::new(),
        direct_first_byte_ms: Vec::new(),
        link_bps: LINK_BPS,
        link_spliced_bps: Vec::new(),
        link_direct_bps: Vec::new(),
        learned_bps: Vec::new(),
        learned_direct_bps: Vec::new(),
        miss: miss::MissResult::default(),
    };
    let fetch = |in_cgroup: bool, url: String, size: u64| fetch(node, in_cgroup, url, size);
    // One of each first: the page cache, and the daemon's first connection.
    fetch(true, big.clone(), BIG_MIB * MIB).await?;
    fetch(false, big.clone(), BIG_MIB * MIB).await?;
    for _ in 0..THROUGHPUT_RUNS {
        let spliced = fetch(true, big.clone(), BIG_MIB * MIB).await?;
        let direct = fetch(false, big.clone(), BIG_MIB * MIB).await?;
        result.spliced_bps.push(spliced.speed);
        result.direct_bps.push(direct.speed);
    }
    for _ in 0..LATENCY_RUNS {
        let spliced = fetch(true, small.clone(), SMALL).await?;
        let direct = fetch(false, small.clone(), SMALL).await?;
        result.spliced_first_byte_ms.push(spliced.first_byte * 1e3);
        result.direct_first_byte_ms.push(direct.first_byte * 1e3);
    }
    let image = rig.image(miss::IMAGE).context("miss image missing")?;
    let bundle = cluster.bundles.first().context("no trust bundle")?;
    result.miss = miss::measure(rig, &image, bundle).await?;
    // Last: the rate limit stays on the registry's link until the rig goes.
    let link = rig
        .shape_upstream(Shaping {
            rate_bps: Some(LINK_BPS),
            rtt: Duration::ZERO,
        })
        .await?;
    for _ in 0..LINK_RUNS {
        let spliced = fetch(true, big.clone(), BIG_MIB * MIB).await?;
        let direct = fetch(false, big.clone(), BIG_MIB * MIB).await?;
        result.link_spliced_bps.push(spliced.speed);
        result.link_direct_bps.push(direct.speed);
    }
    link.remove().await;
    Ok(result)
}

/// One GET with curl on `node`, inside containerd's cgroup or not; it must bring `size` bytes.
async fn fetch(
    node: &spegel_tests::rig::Node,
    in_cgroup: bool,
    url: String,
    size: u64,
) -> Result<CurlTimes> {
    let t = client::curl(node, in_cgroup, None, &url).await?;
    anyhow::ensure!(
        t.status == 200 && t.bytes == size,
        "GET {url}: {} with {} bytes",
        t.status,
        t.bytes
    );
    Ok(t)
}

/// With learning on: one spliced GET teaches `daemon` the destination, then the runs. Returns the
/// throughputs through the cgroup and outside it.
async fn measure_learned(
    rig: &Rig,
    nginx: &Nginx,
    daemon: &spegel_tests::rig::spegel::Spegel,
) -> Result<(Vec<f64>, Vec<f64>)> {
    const ACCEPTED: &str = "spegel_intercept_accepted_total";
    const LEARNED: &str = "spegel_intercept_bypass_learned_total";
    let node = rig.node(0);
    nginx.wait_listening(node).await?;
    let big = format!("http://{}/big", nginx.plain);
    fetch(node, true, big.clone(), BIG_MIB * MIB).await?;
    let started = std::time::Instant::now();
    while daemon.metrics().await?.sum(LEARNED) < 1.0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the daemon never learned the passed-through destination"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = daemon.metrics().await?.sum(ACCEPTED);
    let (mut learned, mut direct) = (Vec::new(), Vec::new());
    fetch(node, false, big.clone(), BIG_MIB * MIB).await?;
    for _ in 0..THROUGHPUT_RUNS {
        learned.push(fetch(node, true, big.clone(), BIG_MIB * MIB).await?.speed);
        direct.push(fetch(node, false, big.clone(), BIG_MIB * MIB).await?.speed);
    }
    let after = daemon.metrics().await?.sum(ACCEPTED);
    anyhow::ensure!(
        after == accepted,
        "{} connects to a learned destination were still redirected",
        after - accepted
    );
    Ok((learned, direct))
}

const SMALL: u64 = 1024;

/// `big` (pseudo-random, so nothing on the way can shrink it) and `small`.
fn write_files(root: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let mut rng = Rng::new(0xb16);
    let chunk: Vec<u8> = (0..MIB / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let mut big = std::io::BufWriter::new(std::fs::File::create(root.join("big"))?);
    for _ in 0..BIG_MIB {
        big.write_all(&chunk)?;
    }
    big.flush()?;
    std::fs::write(root.join("small"), &chunk[..SMALL as usize])?;
    Ok(())
}
