//! `cargo xtask bench [rollout]`: spegel against a baseline run in the same invocation.
//!
//! `rollout` — an image rolled out to every node one after the other, as a Deployment update
//! does. Baseline: every node pulls straight from the registry. Then the same nodes, emptied,
//! pull the same image through spegel in transparent mode. Printed: pull times, the registry's
//! egress, and the daemon's peak memory, each as a ratio against the baseline.
//!
//! Environment: `SPEGEL_BENCH_NODES` (default 3), `SPEGEL_BENCH_LAYERS_MIB` (comma-separated layer
//! sizes, default `1,16,64,128`), `SPEGEL_BENCH_ROUNDS` (default 3; the median is reported).
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use spegel_tests::{
    cluster,
    rig::{Endpoint, ImageSpec, Rig, TestImage, spegel::SpegelOptions},
};

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> Result<()> {
    let which = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "rollout".to_owned());
    if which != "rollout" {
        bail!("unknown benchmark `{which}` (available: rollout)");
    }
    let nodes = env_parse("SPEGEL_BENCH_NODES", 3usize)?;
    let rounds = env_parse("SPEGEL_BENCH_ROUNDS", 3usize)?.max(1);
    let layers: Vec<u64> = std::env::var("SPEGEL_BENCH_LAYERS_MIB")
        .unwrap_or_else(|_| "1,16,64,128".to_owned())
        .split(',')
        .map(|s| s.trim().parse::<u64>().map(|m| m * MIB))
        .collect::<Result<_, _>>()
        .context("SPEGEL_BENCH_LAYERS_MIB")?;
    let size: u64 = layers.iter().sum();
    println!(
        "rollout benchmark: {nodes} nodes, image of {} layers ({} MiB), {rounds} round(s), median reported",
        layers.len(),
        size / MIB
    );

    let rig = Rig::builder().nodes(nodes).start().await?;
    let result = run(&rig, &layers, rounds).await;
    rig.shutdown().await?;
    result
}

struct Rollout {
    /// Per node, in rollout order.
    pulls: Vec<Duration>,
    /// Blob bytes the registry sent.
    egress: u64,
}

impl Rollout {
    fn total(&self) -> Duration {
        self.pulls.iter().sum()
    }
    fn followers(&self) -> Duration {
        self.pulls.iter().skip(1).sum()
    }
}

async fn run(rig: &Rig, layers: &[u64], rounds: usize) -> Result<()> {
    let mut baseline = Vec::new();
    for round in 0..rounds {
        let image = push(rig, layers, round as u64).await?;
        baseline.push(rollout(rig, &image, None).await?);
    }
    let daemons = cluster::transparent(rig, SpegelOptions::transparent().log("info")).await?;
    let mut spegel = Vec::new();
    for round in 0..rounds {
        // Fresh digests every round: nothing is on any node yet.
        let image = push(rig, layers, 1000 + round as u64).await?;
        spegel.push(rollout(rig, &image, Some(&daemons)).await?);
    }
    let peak_rss = daemons
        .iter()
        .filter_map(|d| d.process().pid())
        .filter_map(peak_rss_kib)
        .max();

    let median = |runs: &[Rollout], f: fn(&Rollout) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    let row = |name: &str, f: fn(&Rollout) -> Duration| {
        let (b, s) = (median(&baseline, f), median(&spegel, f));
        println!(
            "  {name:<34} baseline {:>8.3} s   spegel {:>8.3} s   ratio {:>5.2}",
            b.as_secs_f64(),
            s.as_secs_f64(),
            s.as_secs_f64() / b.as_secs_f64()
        );
    };
    println!("\nresults (ratio = spegel / baseline; below 1 is better):");
    row("whole rollout", Rollout::total);
    row("first node (cold, upstream)", |r| r.pulls[0]);
    row("other nodes (peers available)", Rollout::followers);
    let egress = |runs: &[Rollout]| runs.iter().map(|r| r.egress).sum::<u64>() / runs.len() as u64;
    let (b, s) = (egress(&baseline), egress(&spegel));
    println!(
        "  {:<34} baseline {:>8} MiB spegel {:>8} MiB ratio {:>5.2}",
        "registry egress per rollout",
        b / MIB,
        s / MIB,
        s as f64 / b as f64
    );
    if let Some(kib) = peak_rss {
        println!(
            "  {:<34} {:>8.1} MiB (largest of the daemons)",
            "daemon peak RSS",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}

async fn push(rig: &Rig, layers: &[u64], seed: u64) -> Result<TestImage> {
    let spec = ImageSpec::new(format!("bench{seed}"))
        .layers(layers.iter().copied())
        .seed(0xbe7c + seed);
    rig.push_image(spec).await
}

/// Pulls `image` on every node in turn (by tag over TLS, as kubelet would), then removes it
/// again so the next round starts cold.
async fn rollout(
    rig: &Rig,
    image: &TestImage,
    daemons: Option<&[spegel_tests::rig::spegel::Spegel]>,
) -> Result<Rollout> {
    let before = rig.registry_log().await?;
    let last_layer = image
        .pulled_blobs()
        .last()
        .map(|b| b.digest.clone())
        .context("image without blobs")?;
    let mut pulls = Vec::new();
    for (i, node) in rig.nodes().iter().enumerate() {
        if let (Some(daemons), true) = (daemons, i > 0) {
            // What a real rollout gets for free: the previous node's pull finished a while ago.
            cluster::wait_until_findable(&daemons[i], &image.repository, &last_layer).await?;
        }
        let start = Instant::now();
        node.cri_pull(&image.reference(Endpoint::Tls)).await?;
        pulls.push(start.elapsed());
    }
    let log = rig.registry_log().await?.since(&before);
    let sizes: std::collections::BTreeMap<&str, u64> = image
        .all_content()
        .into_iter()
        .map(|b| (b.digest.as_str(), b.size))
        .collect();
    let egress = log
        .blob_gets()
        .filter_map(|e| e.blob_digest().and_then(|d| sizes.get(d)))
        .sum();
    for node in rig.nodes() {
        node.remove_all_images().await?;
    }
    Ok(Rollout { pulls, egress })
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}: cannot parse `{v}`")),
        Err(_) => Ok(default),
    }
}
