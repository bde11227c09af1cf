//! Transparent mode on the rig, then two measurements:
//!
//! - **Passthrough**: nginx in the registry's namespace on a port spegel intercepts but does not
//!   mirror; curl in node A's containerd cgroup (redirected to the daemon, which splices it)
//!   against the same curl outside the cgroup (not redirected). Throughput of a large file, and
//!   time to the first byte of a small one on a fresh connection (the splice's added latency:
//!   the redirected connect completes at the daemon, which connects onwards once it has read
//!   the request's first bytes).
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
            "spliced {:.0} MB/s vs direct {:.0} MB/s ({:.0} vs {:.0} MB/s on a {} Mbit/s link); first byte spliced {:.3} ms vs direct {:.3} ms (+{:.3} ms)\n  miss: {}",
            median(&self.spliced_bps) / 1e6,
            median(&self.direct_bps) / 1e6,
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
    let result = async {
        let cluster = cluster::transparent_for(
            rig,
            &rig_registry_hosts(rig),
            // Warnings only, but the set-up waits for the interception's "attached" line.
            SpegelOptions::transparent()
                .log("warn,spegel::intercept=info")
                .intercept_ports([PORT]),
        )
        .await?;
        let measured = measure(rig, &nginx, &cluster).await;
        for daemon in &cluster.daemons {
            daemon.stop().await?;
        }
        measured
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
        miss: miss::MissResult::default(),
    };
    let fetch = |in_cgroup: bool, url: String, size: u64| async move {
        let t = client::curl(node, in_cgroup, None, &url).await?;
        anyhow::ensure!(
            t.status == 200 && t.bytes == size,
            "GET {url}: {} with {} bytes",
            t.status,
            t.bytes
        );
        Ok::<CurlTimes, anyhow::Error>(t)
    };
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
