//! `cargo xtask demo`: a local three-node cluster pulling an image through spegel in transparent
//! mode, telling the user in plain words where every blob came from.
//!
//! Each node is a network namespace with its own containerd (in its own cgroup), next to a real
//! registry served over TLS. No node has any containerd mirror configuration: spegel's eBPF
//! programs redirect containerd's registry connections to the node's daemon.
use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use spegel_tests::rig::{
    Endpoint, Rig,
    spegel::{Spegel, SpegelOptions},
};

const NODES: usize = 3;

#[tokio::main]
async fn main() -> Result<()> {
    println!("spegel demo: {NODES} nodes, each with its own containerd, and one registry (TLS).");
    println!("Setting up network namespaces, containerd, the registry and test images…");
    let rig = Rig::builder()
        .nodes(NODES)
        .start()
        .await
        .context("cannot bring up the demo cluster")?;
    let result = demo(&rig).await;
    println!("\nTearing the cluster down…");
    rig.shutdown().await.context("teardown")?;
    result
}

async fn demo(rig: &Rig) -> Result<()> {
    let registry = rig.registry();
    println!(
        "  registry:   https://{} ({})",
        registry.host(Endpoint::Tls),
        registry.ip()
    );
    for node in rig.nodes() {
        println!(
            "  {}:  {}  containerd cgroup {}",
            node.name(),
            node.ip(),
            node.cgroup_dir().display()
        );
    }

    println!(
        "\nStarting spegel on every node (eBPF redirect on containerd's cgroup, peers found over libp2p)…"
    );
    let daemons = spegel_tests::cluster::transparent(rig, SpegelOptions::transparent()).await?;
    println!(
        "  spegel is running; containerd trusts each node's spegel CA. No hosts.toml anywhere."
    );

    let image = rig.images().four.clone();
    let reference = image.reference(Endpoint::Tls);
    let blobs: Vec<_> = image.pulled_blobs().into_iter().cloned().collect();
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    println!(
        "\nImage {reference}: {} blobs, {:.1} MiB.",
        blobs.len(),
        total as f64 / 1048576.0
    );

    let before = rig.registry_log().await?;
    let marks: Vec<_> = daemons.iter().map(Spegel::log_mark).collect();
    for (i, node) in rig.nodes().iter().enumerate() {
        if i > 0 {
            spegel_tests::cluster::wait_until_findable(
                &daemons[i],
                &image.registry(Endpoint::Tls),
                &image.repository,
                &blobs[blobs.len() - 1].digest,
            )
            .await?;
        }
        let started = std::time::Instant::now();
        node.cri_pull(&reference)
            .await
            .with_context(|| format!("pull on {}", node.name()))?;
        println!(
            "  {} pulled it (CRI, as kubelet does) in {:.2} s",
            node.name(),
            started.elapsed().as_secs_f64()
        );
    }

    println!("\nWhere each blob came from, per node:");
    let mut header = format!("  {:<20}", "blob");
    for node in rig.nodes() {
        header.push_str(&format!(" {:<12}", node.name()));
    }
    println!("{header}");
    let mut sources: Vec<BTreeMap<String, String>> = Vec::new();
    for (daemon, mark) in daemons.iter().zip(&marks) {
        let served = daemon.served_since(*mark)?;
        let map = served
            .into_iter()
            .filter(|s| s.kind == "blob" && !s.head && !s.peer_request)
            .map(|s| (s.digest, s.source))
            .collect();
        sources.push(map);
    }
    for blob in &blobs {
        let mut line = format!("  {:<20}", format!("{}…", &blob.digest[..19]));
        for map in &sources {
            let source = map.get(&blob.digest).map_or("?", String::as_str);
            let word = match source {
                "upstream" => "registry",
                "peer" => "peer",
                "local" => "local",
                other => other,
            };
            line.push_str(&format!(" {word:<12}"));
        }
        println!("{line}");
    }

    let log = rig.registry_log().await?.since(&before);
    let gets = log.blob_get_counts();
    let downloads: usize = blobs
        .iter()
        .map(|b| gets.get(&b.digest).copied().unwrap_or(0))
        .sum();
    println!(
        "\nThe registry served {downloads} blob download(s) for {} blobs pulled by {NODES} nodes \
         (without spegel: {}).",
        blobs.len(),
        blobs.len() * NODES
    );
    for (ip, per) in log.blob_gets_per_client() {
        let name = rig
            .nodes()
            .iter()
            .find(|n| n.ip() == ip)
            .map_or("?", |n| n.name());
        println!(
            "  {} blob GET(s) came from {name} ({ip})",
            per.values().sum::<usize>()
        );
    }
    if downloads != blobs.len() {
        bail!("expected every blob to leave the registry exactly once, got {downloads}");
    }
    println!("Every blob left the registry once; the other nodes got it from their peers.");
    Ok(())
}
