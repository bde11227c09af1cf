//! `cargo xtask bench [all | rollout | burst | preflight] [flags]`: spegel's performance record.
//!
//! One invocation, one rig, one shaped upstream (default 100 Mbit/s, 20 ms RTT; see
//! `spegel_tests::rig::shape`), verified before anything is measured. Then every scenario
//! (`direct`: nodes pull from the registry; `proxy`: a central pull-through cache;
//! `mirror`: spegel in mirror mode; `transparent`: spegel with eBPF interception) runs every
//! phase (`rollout`: node 1 alone, then the others in batches; `burst`: all nodes at once
//! behind one barrier) for every image (sizes × layer counts), each measurement with an image
//! nobody has pulled before, on nodes whose containerd has pulled once before (see
//! [`scenario::Running::warm_up`]). `--repeat N` runs all of it N times over, each round with
//! images of its own, the scenarios taking turns so a machine's drift reaches them alike.
//! Output: every raw number as JSON under `target/bench/`, a markdown table of ratios against
//! `direct` (each node's median over the rounds), and a PNG chart. Nothing here asserts a timing.
//!
//! `micro` runs the per-path benchmarks instead (`micro/`): DHT lookups, peer serving against
//! nginx, passthrough and a miss against direct, the daemon's memory with 10,000 keys.
//!
//! Every flag has a `SPEGEL_BENCH_*` environment twin; `--help` lists them.

mod micro;
mod phase;
mod plot;
mod report;
mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use spegel_tests::rig::{
    ImageSpec, Rig,
    shape::{Preflight, Shaping},
};

use crate::micro::Micro;
use crate::phase::{Case, Phase};
use crate::scenario::Scenario;

const MIB: u64 = 1 << 20;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Both phases.
    All,
    /// Rolling update only.
    Rollout,
    /// Cold burst only.
    Burst,
    /// Only shape the link and verify it.
    Preflight,
    /// The micro benchmarks (`--micro` chooses which), on an unshaped rig.
    Micro,
}

#[derive(Debug, Parser)]
#[command(
    name = "spegel-bench",
    about = "spegel's benchmarks: ratios against a baseline run in the same invocation"
)]
struct Args {
    /// Which benchmark to run.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Nodes in the rig (1 to 8).
    #[arg(long, env = "SPEGEL_BENCH_NODES", default_value_t = 4)]
    nodes: usize,
    /// Image sizes in MiB, comma-separated.
    #[arg(long, env = "SPEGEL_BENCH_SIZES_MIB", value_delimiter = ',', default_values_t = [10u64, 100])]
    sizes_mib: Vec<u64>,
    /// Also run a 1 GiB image.
    #[arg(long, env = "SPEGEL_BENCH_GIB")]
    gib: bool,
    /// Layer counts, comma-separated (each image split into equal layers).
    #[arg(long, env = "SPEGEL_BENCH_LAYERS", value_delimiter = ',', default_values_t = [1usize, 4])]
    layers: Vec<usize>,
    /// Scenarios, comma-separated, in the order they run (`direct` is always included).
    #[arg(long, env = "SPEGEL_BENCH_SCENARIOS", value_delimiter = ',', value_enum,
          default_values_t = [Scenario::Direct, Scenario::Proxy, Scenario::Mirror, Scenario::Transparent])]
    scenarios: Vec<Scenario>,
    /// Rounds of every case (each with images of its own), scenario after scenario so drift
    /// reaches every scenario alike; the table and chart show each node's median.
    #[arg(long, env = "SPEGEL_BENCH_REPEAT", default_value_t = 1)]
    repeat: usize,
    /// Nodes per batch after the first in a rollout.
    #[arg(long, env = "SPEGEL_BENCH_BATCH", default_value_t = 2)]
    batch: usize,
    /// Upstream rate in Mbit/s (0: unlimited).
    #[arg(long, env = "SPEGEL_BENCH_RATE_MBIT", default_value_t = 100)]
    rate_mbit: u64,
    /// Upstream round-trip time in ms (0: no delay line).
    #[arg(long, env = "SPEGEL_BENCH_RTT_MS", default_value_t = 20)]
    rtt_ms: u64,
    /// No shaping at all: the registry on the LAN (same as `--rate-mbit 0 --rtt-ms 0`).
    #[arg(long, env = "SPEGEL_BENCH_UNSHAPED")]
    unshaped: bool,
    /// Where results go (default `<workspace>/target/bench`).
    #[arg(long, env = "SPEGEL_BENCH_OUT")]
    out: Option<PathBuf>,
    /// Also copy the chart to `docs/bench/latest.png` and the table into README.md.
    #[arg(long, env = "SPEGEL_BENCH_README")]
    readme: bool,
    /// Micro benchmarks to run, comma-separated (with `micro`).
    #[arg(long, env = "SPEGEL_BENCH_MICRO", value_delimiter = ',', value_enum,
          default_values_t = [Micro::Dht, Micro::Serving, Micro::Rss, Micro::Passthrough])]
    micro: Vec<Micro>,
    /// Routers in the DHT micro benchmark.
    #[arg(long, env = "SPEGEL_BENCH_DHT_ROUTERS", default_value_t = 1000)]
    dht_routers: usize,
    /// Size of the blob the serving micro benchmark moves, in MiB.
    #[arg(long, env = "SPEGEL_BENCH_BLOB_MIB", default_value_t = 256)]
    blob_mib: u64,
    /// Keys (digests and tags) the memory micro benchmark has the daemon advertise.
    #[arg(long, env = "SPEGEL_BENCH_RSS_KEYS", default_value_t = 10_000)]
    rss_keys: usize,
    /// The daemons' `--log` filter in the rollout and burst phases (`info,spegel=debug` to trace
    /// a pull; the rig keeps every log under its directory).
    #[arg(long, env = "SPEGEL_BENCH_DAEMON_LOG", default_value = "info")]
    daemon_log: String,
}

impl Args {
    fn shaping(&self) -> Shaping {
        if self.unshaped {
            return Shaping {
                rate_bps: None,
                rtt: Duration::ZERO,
            };
        }
        Shaping {
            rate_bps: (self.rate_mbit > 0).then_some(self.rate_mbit * 1_000_000),
            rtt: Duration::from_millis(self.rtt_ms),
        }
    }

    fn phases(&self) -> Vec<Phase> {
        match self.which {
            Which::All => vec![Phase::Rollout, Phase::Burst],
            Which::Rollout => vec![Phase::Rollout],
            Which::Burst => vec![Phase::Burst],
            Which::Preflight | Which::Micro => Vec::new(),
        }
    }

    fn scenarios(&self) -> Vec<Scenario> {
        let mut all = vec![Scenario::Direct];
        for s in &self.scenarios {
            if !all.contains(s) {
                all.push(*s);
            }
        }
        all
    }

    /// Every (size, layers) to measure.
    fn images(&self) -> Vec<(u64, usize)> {
        let mut sizes: Vec<u64> = self.sizes_mib.iter().map(|m| m * MIB).collect();
        if self.gib {
            sizes.push(1024 * MIB);
        }
        sizes
            .iter()
            .flat_map(|s| self.layers.iter().map(move |l| (*s, *l)))
            .collect()
    }
}

/// Everything one invocation measured; written as JSON.
#[derive(Debug, serde::Serialize)]
struct Record {
    date: String,
    machine: report::Machine,
    shaping: String,
    nodes: usize,
    batch: usize,
    /// Rounds of every case (`--repeat`).
    repeat: usize,
    preflight: Option<Preflight>,
    /// Every round's measurements, in the order they were made.
    results: Vec<phase::Measurement>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!((1..=8).contains(&args.nodes), "--nodes must be 1 to 8");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.repeat >= 1, "--repeat must be at least 1");
    ensure!(
        args.layers.iter().all(|l| *l >= 1),
        "--layers must be at least 1"
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench"));
    if args.which == Which::Micro {
        let settings = micro::Settings {
            which: args.micro.clone(),
            dht_routers: args.dht_routers,
            blob_mib: args.blob_mib,
            rss_keys: args.rss_keys,
        };
        return micro::run(&settings, &out, args.readme.then(workspace_root)).await;
    }
    let shaping = args.shaping();
    let phases = args.phases();
    let scenarios = args.scenarios();
    let images = args.images();
    let mut cases = Vec::new();
    for round in 0..args.repeat {
        for scenario in &scenarios {
            for phase in &phases {
                for (size, layers) in &images {
                    cases.push(Case::new(*scenario, *phase, *size, *layers, round));
                }
            }
        }
    }
    println!(
        "spegel bench: {} node(s), {} round(s), upstream {}, scenarios {:?}, phases {:?}, images {:?}",
        args.nodes,
        args.repeat,
        shaping.describe(),
        scenarios,
        phases,
        images
            .iter()
            .map(|(s, l)| format!("{} MiB/{l} layer(s)", s / MIB))
            .collect::<Vec<_>>()
    );
    let mut builder = Rig::builder()
        .nodes(args.nodes)
        .image(preflight_image())
        .image(scenario::warm_up_image());
    for case in &cases {
        builder = builder.image(case.image_spec());
    }
    // Images are built and pushed during start-up, before the link is shaped.
    let rig = builder.start().await?;
    let result = run(&rig, &args, shaping, &cases).await;
    let shutdown = rig.shutdown().await;
    let record = result?;
    shutdown?;
    if record.results.is_empty() {
        return Ok(());
    }
    report::write(&out, &record, args.readme.then(workspace_root))?;
    Ok(())
}

async fn run(rig: &Rig, args: &Args, shaping: Shaping, cases: &[Case]) -> Result<Record> {
    let date = report::now_utc()?;
    let link = rig.shape_upstream(shaping).await?;
    let result = measure(rig, args, &link, cases).await;
    link.remove().await;
    let (preflight, results) = result?;
    Ok(Record {
        date,
        machine: report::Machine::this()?,
        shaping: shaping.describe(),
        nodes: args.nodes,
        batch: args.batch,
        repeat: args.repeat,
        preflight,
        results,
    })
}

async fn measure(
    rig: &Rig,
    args: &Args,
    link: &spegel_tests::rig::shape::ShapedLink,
    cases: &[Case],
) -> Result<(Option<Preflight>, Vec<phase::Measurement>)> {
    let probe = rig
        .image(PREFLIGHT_IMAGE)
        .context("preflight image missing")?;
    let blob = probe
        .layers()
        .first()
        .context("preflight image without layers")?;
    let preflight = link
        .verify(
            rig,
            rig.node(0),
            &probe.repository,
            (&blob.digest, blob.size),
        )
        .await?;
    println!(
        "preflight ({}): connect median {:.2} ms (min {:.2}), goodput {:.1} Mbit/s over {} MiB",
        link.shaping().describe(),
        preflight.connect_median_ms,
        preflight.connect_min_ms,
        preflight.goodput_bps / 1e6,
        preflight.blob_bytes / MIB
    );
    check_preflight(link.shaping(), &preflight)?;
    let mut results = Vec::new();
    let mut current: Option<scenario::Running> = None;
    for case in cases {
        if current.as_ref().map(|r| r.scenario) != Some(case.scenario) {
            if let Some(running) = current.take() {
                running.stop(rig).await?;
            }
            println!(
                "\n== scenario {:?}, round {}",
                case.scenario,
                case.round + 1
            );
            current = Some(scenario::Running::start(rig, case.scenario, &args.daemon_log).await?);
            scenario::Running::warm_up(rig).await?;
        }
        let running = current.as_ref().context("no scenario running")?;
        let image = rig
            .image(&case.image_name())
            .context("case image missing")?;
        let m = phase::run(rig, running, case, &image, args.batch).await?;
        println!("  {}", m.summary());
        results.push(m);
        for node in rig.nodes() {
            node.remove_all_images().await?;
        }
    }
    if let Some(running) = current.take() {
        running.stop(rig).await?;
    }
    Ok((Some(preflight), results))
}

/// Refuses to measure on a link that is not shaped (a connect faster than the round trip,
/// goodput above the rate); warns when it is slower than asked (a loaded machine), which the
/// table then says next to the verified numbers.
fn check_preflight(shaping: Shaping, p: &Preflight) -> Result<()> {
    let rtt_ms = shaping.rtt.as_secs_f64() * 1e3;
    if rtt_ms > 0.0 && p.connect_min_ms < rtt_ms {
        bail!(
            "shaping check failed: a connect took {:.2} ms on a {rtt_ms} ms RTT link",
            p.connect_min_ms
        );
    }
    if let Some(rate) = shaping.rate_bps {
        if p.goodput_bps > rate as f64 * 1.1 {
            bail!(
                "shaping check failed: goodput {:.1} Mbit/s above the rate of {} Mbit/s",
                p.goodput_bps / 1e6,
                rate / 1_000_000
            );
        }
        if p.goodput_bps < rate as f64 * 0.7 {
            println!(
                "WARNING: goodput {:.1} Mbit/s is well below the {} Mbit/s asked for (a loaded machine?)",
                p.goodput_bps / 1e6,
                rate / 1_000_000
            );
        }
    }
    if rtt_ms > 0.0 && p.connect_median_ms > rtt_ms * 1.5 + 2.0 {
        println!(
            "WARNING: median connect {:.2} ms is well above the {rtt_ms} ms RTT asked for (a loaded machine?)",
            p.connect_median_ms
        );
    }
    Ok(())
}

const PREFLIGHT_IMAGE: &str = "bench-preflight";

/// One 8 MiB layer: long enough at 100 Mbit/s to measure goodput past TCP's slow start.
fn preflight_image() -> ImageSpec {
    ImageSpec::new(PREFLIGHT_IMAGE)
        .layers([8 * MIB])
        .seed(0xbe7c)
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}
