//! The two phases a cluster meets a new image in, measured per node: a rolling update and a
//! cold burst.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use spegel_tests::{
    cluster,
    rig::{Endpoint, ImageSpec, Rig, TestImage},
};
use tokio::time::Instant;

use crate::MIB;
use crate::scenario::{Running, Scenario};

/// The daemons' default `--lookup-cache-ttl`: how long a node reuses what a lookup found.
const LOOKUP_CACHE_TTL: Duration = Duration::from_secs(5);

/// How the nodes ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// Node 1 alone, then the others in batches (each batch at once), as a Deployment update.
    Rollout,
    /// Every node at once behind one barrier, as a new Deployment or a scale-out.
    Burst,
}

/// One measurement to make.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Case {
    pub(crate) scenario: Scenario,
    pub(crate) phase: Phase,
    pub(crate) size: u64,
    pub(crate) layers: usize,
    /// 0-based repetition (`--repeat`).
    pub(crate) round: usize,
}

impl Case {
    pub(crate) fn new(
        scenario: Scenario,
        phase: Phase,
        size: u64,
        layers: usize,
        round: usize,
    ) -> Self {
        Self {
            scenario,
            phase,
            size,
            layers,
            round,
        }
    }

    /// A name unique per case and round, so every measurement pulls digests nobody has.
    pub(crate) fn image_name(&self) -> String {
        let round = match self.round {
            0 => String::new(),
            n => format!("-r{n}"),
        };
        format!(
            "b-{:?}-{:?}-{}m-{}l{round}",
            self.scenario,
            self.phase,
            self.size / MIB,
            self.layers
        )
        .to_lowercase()
    }

    pub(crate) fn image_spec(&self) -> ImageSpec {
        let each = self.size / self.layers as u64;
        let seed = self.image_name().bytes().fold(0xbe7cu64, |h, b| {
            h.wrapping_mul(31).wrapping_add(u64::from(b))
        });
        ImageSpec::new(self.image_name())
            .layers(std::iter::repeat_n(each, self.layers))
            .seed(seed)
    }
}

/// One node's pull.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Pull {
    /// 0-based node index.
    pub(crate) node: usize,
    /// 0: the first node of a rollout (or everyone in a burst); 1, 2, ...: later batches.
    pub(crate) batch: usize,
    /// CRI `PullImage` as kubelet calls it, start to end.
    pub(crate) secs: f64,
}

/// Everything one case measured.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Measurement {
    pub(crate) scenario: Scenario,
    pub(crate) phase: Phase,
    /// Image bytes a node downloads (config and layers).
    pub(crate) image_bytes: u64,
    pub(crate) size_mib: u64,
    pub(crate) layers: usize,
    /// 0-based repetition; in [`medians`], how many rounds were folded.
    pub(crate) round: usize,
    pub(crate) pulls: Vec<Pull>,
    /// From the first pull's start until every node has the image.
    pub(crate) wall_secs: f64,
    /// Blob body bytes the registry sent (its access log), every client.
    pub(crate) upstream_bytes: u64,
    /// Largest peak RSS (VmHWM) of the scenario's daemons, if any, in KiB.
    pub(crate) daemon_peak_rss_kib: Option<u64>,
}

impl Measurement {
    /// Upstream egress in images.
    pub(crate) fn egress_x(&self) -> f64 {
        self.upstream_bytes as f64 / self.image_bytes.max(1) as f64
    }

    /// The first batch's mean pull time.
    pub(crate) fn first_secs(&self) -> f64 {
        mean(self.pulls.iter().filter(|p| p.batch == 0).map(|p| p.secs))
    }

    /// Later batches' mean pull time (`NaN` when there are none).
    pub(crate) fn later_secs(&self) -> f64 {
        mean(self.pulls.iter().filter(|p| p.batch > 0).map(|p| p.secs))
    }

    pub(crate) fn summary(&self) -> String {
        format!(
            "{:?} {} MiB/{} layer(s): first {:.3} s, others {:.3} s, all done {:.3} s, upstream {:.2}× image",
            self.phase,
            self.size_mib,
            self.layers,
            self.first_secs(),
            self.later_secs(),
            self.wall_secs,
            self.egress_x()
        )
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// The middle value (the mean of the two middle ones for an even count; `NaN` for none).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One measurement per scenario, phase and image, in the order they first appear: each node's
/// median pull time and the median wall time over the rounds, the largest upstream egress and
/// daemon RSS of any round (`round` says how many rounds were folded).
pub(crate) fn medians(results: &[Measurement]) -> Vec<Measurement> {
    let key = |m: &Measurement| (m.scenario, m.phase, m.size_mib, m.layers);
    let mut folded: Vec<Measurement> = Vec::new();
    for m in results {
        if folded.iter().any(|f| key(f) == key(m)) {
            continue;
        }
        let rounds: Vec<&Measurement> = results.iter().filter(|r| key(r) == key(m)).collect();
        let pulls = m
            .pulls
            .iter()
            .map(|p| Pull {
                secs: median(
                    rounds
                        .iter()
                        .flat_map(|r| r.pulls.iter().filter(|q| q.node == p.node))
                        .map(|q| q.secs),
                ),
                ..p.clone()
            })
            .collect();
        folded.push(Measurement {
            round: rounds.len(),
            pulls,
            wall_secs: median(rounds.iter().map(|r| r.wall_secs)),
            upstream_bytes: rounds.iter().map(|r| r.upstream_bytes).max().unwrap_or(0),
            daemon_peak_rss_kib: rounds.iter().filter_map(|r| r.daemon_peak_rss_kib).max(),
            ..m.clone()
        });
    }
    folded
}

/// Runs `case` with `image` (nobody has it yet) and removes nothing; the caller cleans up.
pub(crate) async fn run(
    rig: &Rig,
    running: &Running,
    case: &Case,
    image: &TestImage,
    batch: usize,
) -> Result<Measurement> {
    let before = rig.registry_log().await?;
    let reference = image.reference(Endpoint::Tls);
    let batches = batches(case.phase, rig.nodes().len(), batch);
    let mut wall = Duration::ZERO;
    let mut pulls = Vec::new();
    for (index, members) in batches.iter().enumerate() {
        if index > 0 && running.has_peers() {
            // What a real rollout gets for free: the previous batch finished a while ago and
            // its content (every blob and the manifest) is advertised.
            for node in members {
                let daemon = &running.daemons[*node];
                let (timeout, poll) = (Duration::from_secs(30), Duration::from_millis(20));
                cluster::find_all(daemon, image, None, timeout, poll).await?;
            }
        }
        if index > 0 {
            // What it does not get: the check above found the content through the very
            // daemons about to pull, and a node that looked its content up moments ago pulls
            // with every lookup cached. Wait until those results are stale, in every scenario
            // alike (a rollout waits between batches anyway; not counted in the wall time).
            tokio::time::sleep(LOOKUP_CACHE_TTL + Duration::from_millis(500)).await;
        }
        let started = Instant::now();
        let barrier = Arc::new(tokio::sync::Barrier::new(members.len()));
        let results = futures::future::try_join_all(members.iter().map(|node| {
            let barrier = Arc::clone(&barrier);
            let reference = reference.clone();
            async move {
                barrier.wait().await;
                let t = Instant::now();
                rig.node(*node)
                    .cri_pull(&reference)
                    .await
                    .with_context(|| format!("node {} pulling {reference}", node + 1))?;
                Ok::<_, anyhow::Error>(Pull {
                    node: *node,
                    batch: index,
                    secs: t.elapsed().as_secs_f64(),
                })
            }
        }))
        .await?;
        pulls.extend(results);
        wall += started.elapsed();
    }
    let log = rig.registry_log().await?.since(&before);
    let upstream_bytes = log
        .blob_gets()
        .filter(|e| e.is_success())
        .map(|e| e.bytes)
        .sum();
    let image_bytes = image.pulled_blobs().iter().map(|b| b.size).sum();
    let daemon_peak_rss_kib = running
        .daemons
        .iter()
        .filter_map(|d| d.process().pid())
        .filter_map(peak_rss_kib)
        .max();
    Ok(Measurement {
        scenario: case.scenario,
        phase: case.phase,
        image_bytes,
        size_mib: case.size / MIB,
        layers: case.layers,
        round: case.round,
        pulls,
        wall_secs: secs(wall),
        upstream_bytes,
        daemon_peak_rss_kib,
    })
}

/// Node indexes in the order they pull, in groups that pull at once.
fn batches(phase: Phase, nodes: usize, batch: usize) -> Vec<Vec<usize>> {
    let all: Vec<usize> = (0..nodes).collect();
    match phase {
        Phase::Burst => vec![all],
        Phase::Rollout => {
            let mut b = vec![vec![0]];
            b.extend(all[1..].chunks(batch.max(1)).map(<[usize]>::to_vec));
            b
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_starts_alone_then_goes_in_batches() {
        assert_eq!(
            batches(Phase::Rollout, 4, 2),
            vec![vec![0], vec![1, 2], vec![3]]
        );
        assert_eq!(batches(Phase::Rollout, 1, 2), vec![vec![0]]);
        assert_eq!(batches(Phase::Burst, 3, 2), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn every_case_has_its_own_image() {
        let a = Case::new(Scenario::Direct, Phase::Burst, 10 * MIB, 4, 0);
        let b = Case::new(Scenario::Proxy, Phase::Burst, 10 * MIB, 4, 0);
        let again = Case::new(Scenario::Direct, Phase::Burst, 10 * MIB, 4, 1);
        assert_ne!(a.image_name(), b.image_name());
        assert_eq!(a.image_name(), "b-direct-burst-10m-4l");
        assert_eq!(again.image_name(), "b-direct-burst-10m-4l-r1");
    }

    fn measured(scenario: Scenario, round: usize, secs: [f64; 3], egress: u64) -> Measurement {
        Measurement {
            scenario,
            phase: Phase::Rollout,
            image_bytes: 100,
            size_mib: 10,
            layers: 1,
            round,
            pulls: (0..3)
                .map(|node| Pull {
                    node,
                    batch: node.min(1),
                    secs: secs[node],
                })
                .collect(),
            wall_secs: secs.iter().sum(),
            upstream_bytes: egress,
            daemon_peak_rss_kib: None,
        }
    }

    #[test]
    fn rounds_fold_into_each_nodes_median() {
        let results = [
            measured(Scenario::Direct, 0, [1.0, 2.0, 9.0], 100),
            measured(Scenario::Mirror, 0, [1.0, 0.2, 0.2], 100),
            measured(Scenario::Direct, 1, [3.0, 4.0, 3.0], 100),
            measured(Scenario::Mirror, 1, [1.0, 0.4, 0.3], 250),
            measured(Scenario::Direct, 2, [2.0, 3.0, 5.0], 100),
            measured(Scenario::Mirror, 2, [1.0, 0.9, 0.1], 100),
        ];
        let folded = medians(&results);
        assert_eq!(folded.len(), 2);
        let (direct, mirror) = (&folded[0], &folded[1]);
        assert_eq!(
            (direct.scenario, mirror.scenario),
            (Scenario::Direct, Scenario::Mirror)
        );
        assert_eq!(direct.round, 3);
        let secs = |m: &Measurement| m.pulls.iter().map(|p| p.secs).collect::<Vec<_>>();
        assert_eq!(secs(direct), [2.0, 3.0, 5.0]);
        assert_eq!(secs(mirror), [1.0, 0.4, 0.2]);
        assert_eq!(direct.wall_secs, 10.0);
        assert_eq!(mirror.upstream_bytes, 250, "egress: the worst round");
    }

    #[test]
    fn the_median_of_an_even_count_is_the_middle_pair_s_mean() {
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }
}
