//! End-to-end acceptance of `/metrics` on the real rig: a real Prometheus server scrapes every
//! node's spegel daemon while the cluster pulls an image (A from the registry, then B and C
//! from A through their daemons), and PromQL over what it scraped agrees with the daemons' own
//! `/metrics`: every target up, every blob byte of B and C served from peers; and the latency
//! histograms, DHT gauges and libp2p's own metrics scraped with values that fit the pulls.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_metrics -- --nocapture` as root,
//! after `cargo build -p spegel-daemon`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use spegel_tests::eventually;
use spegel_tests::rig::prometheus::{Prometheus, SCRAPE_JOB};
use spegel_tests::rig::spegel::{
    DEFAULT_REGISTRY_PORT, Spegel, SpegelOptions, configure_mirror, registry_urls,
};
use spegel_tests::rig::{Endpoint, Rig, TestImage};

/// A condition on one query's values, by series.
type Check = Box<dyn Fn(&BTreeMap<String, f64>) -> bool>;

/// How long peers may take to find content another node just got (DHT provide + lookup).
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Prometheus may take to scrape what the daemons count (1 s scrape interval).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);
const SERVED_BYTES: &str = "spegel_served_bytes_total";

/// Waits until `daemon` finds every pulled blob of `image` through its peers.
async fn wait_findable(daemon: &Spegel, rig: &Rig, image: &TestImage) {
    let ns = format!(
        "ns={}",
        rig.registry().host(Endpoint::Plain).replace(':', "%3A")
    );
    eventually(
        &format!("{} finds {} through peers", daemon.node_name(), image.name),
        FIND_TIMEOUT,
        || async {
            for blob in image.pulled_blobs() {
                let path = format!("/v2/{}/blobs/{}?{ns}", image.repository, blob.digest);
                if daemon.request("HEAD", &path, &[]).await?.status != 200 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
}

/// Blob bytes each daemon's own `/metrics` says it served from `source`, by node name.
async fn served_blob_bytes(daemons: &[Spegel], source: &str) -> BTreeMap<String, f64> {
    let mut by_node = BTreeMap::new();
    for daemon in daemons {
        let metrics = daemon.metrics().await.expect("daemon /metrics");
        by_node.insert(
            daemon.node_name().to_owned(),
            metrics.value(SERVED_BYTES, &[("kind", "blob"), ("source", source)]),
        );
    }
    by_node
}

/// `promql`'s result as node name → value.
async fn by_node(prometheus: &Prometheus, promql: &str) -> Result<BTreeMap<String, f64>> {
    Ok(prometheus
        .query(promql)
        .await?
        .into_iter()
        .map(|sample| (sample.label("node").to_owned(), sample.value))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn prometheus_scrapes_every_daemon_and_sees_bytes_served_by_peers() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let started = Instant::now();
    let rig = Rig::builder().nodes(3).start().await.expect("rig starts");
    eprintln!(
        "rig {} ({}) up in {:?}",
        rig.prefix(),
        rig.subnet(),
        started.elapsed()
    );

    // Every node's containerd asks its own daemon first and the registry last.
    let registries = registry_urls(&rig, Endpoint::Plain);
    for node in rig.nodes() {
        let url = format!("http://{}:{DEFAULT_REGISTRY_PORT}", node.ip());
        configure_mirror(node, &[url], &registries)
            .await
            .expect("configure-mirror");
    }
    let daemons = rig
        .start_spegel_everywhere(SpegelOptions::mirror())
        .await
        .expect("a daemon on every node");
    let prometheus = rig
        .start_prometheus(&daemons)
        .await
        .expect("prometheus starts");
    eprintln!(
        "prometheus on {} scraping {} daemons",
        prometheus.addr(),
        daemons.len()
    );

    // Every target is scraped, and its OpenMetrics answer parses: `up` is 1 only then.
    let nodes: Vec<String> = daemons.iter().map(|d| d.node_name().to_owned()).collect();
    let up = eventually(
        "every daemon is up in prometheus",
        SCRAPE_TIMEOUT,
        || async {
            let up = by_node(&prometheus, &format!("up{{job=\"{SCRAPE_JOB}\"}}")).await?;
            Ok((up.len() == nodes.len() && up.values().all(|v| *v == 1.0)).then_some(up))
        },
    )
    .await
    .unwrap_or_else(|error| {
        panic!(
            "{error:#}\nprometheus log:\n{}",
            prometheus.process().log_tail(30)
        )
    });
    assert_eq!(up.keys().cloned().collect::<Vec<_>>(), nodes);

    // A pulls from the registry; B and C, once they find A's content, pull it from A.
    let image = rig.images().four.clone();
    let reference = image.reference(Endpoint::Plain);
    rig.node(0).cri_pull(&reference).await.expect("A pulls");
    for daemon in &daemons[1..] {
        wait_findable(daemon, &rig, &image).await;
    }
    let (b, c) = tokio::join!(
        rig.node(1).cri_pull(&reference),
        rig.node(2).cri_pull(&reference)
    );
    b.expect("B pulls");
    c.expect("C pulls");

    // What the daemons themselves say: B and C got every blob from peers.
    let from_peers = served_blob_bytes(&daemons, "peer").await;
    let from_local = served_blob_bytes(&daemons, "local").await;
    eprintln!("daemons' /metrics: blob bytes from peers {from_peers:?}, local {from_local:?}");
    let blob_bytes: f64 = image
        .pulled_blobs()
        .iter()
        .map(|blob| blob.size as f64)
        .sum();
    for node in &nodes[1..] {
        assert_eq!(from_peers[node], blob_bytes, "{node} served from peers");
    }

    // Prometheus, once it has scraped past the pulls, agrees series by series...
    let query = |source: &str| {
        format!("{SERVED_BYTES}{{job=\"{SCRAPE_JOB}\",kind=\"blob\",source=\"{source}\"}}")
    };
    let scraped = eventually("prometheus scrapes the pulls", SCRAPE_TIMEOUT, || async {
        let peer = by_node(&prometheus, &query("peer")).await?;
        let local = by_node(&prometheus, &query("local")).await?;
        Ok((peer == from_peers && local == from_local).then_some(peer))
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}: want peer {from_peers:?}, local {from_local:?}"));
    eprintln!("prometheus: blob bytes from peers by node {scraped:?}");

    // ...and on the sum over nodes, by source.
    let sums = prometheus
        .query(&format!(
            "sum by (source) ({SERVED_BYTES}{{job=\"{SCRAPE_JOB}\",kind=\"blob\"}})"
        ))
        .await
        .expect("sum query");
    let sums: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|sample| (sample.label("source").to_owned(), sample.value))
        .collect();
    eprintln!("prometheus: blob bytes by source, summed over nodes: {sums:?}");
    assert_eq!(sums["peer"], 2.0 * blob_bytes);
    assert!(sums["peer"] > 0.0);
    assert_eq!(sums["peer"], from_peers.values().sum::<f64>());
    assert_eq!(sums["local"], from_local.values().sum::<f64>());
    // Every byte a daemon got from a peer, a peer served from its local content.
    assert!(sums["local"] >= sums["peer"], "{sums:?}");

    // The latency histograms, the DHT gauges and libp2p's own metrics, as Prometheus has them.
    let blobs = image.pulled_blobs().len() as f64;
    let job = format!("job=\"{SCRAPE_JOB}\"");
    let checks: Vec<(String, Check)> = vec![
        (
            // B and C timed every blob they got from a peer, to the first and the last byte.
            format!("spegel_peer_fetch_duration_seconds_count{{{job},kind=\"blob\"}}"),
            Box::new(move |v| v.values().filter(|n| **n >= blobs).count() == 2),
        ),
        (
            format!("spegel_peer_first_byte_seconds_count{{{job},kind=\"blob\"}}"),
            Box::new(move |v| v.values().filter(|n| **n >= blobs).count() == 2),
        ),
        (
            // Their lookups found A.
            format!("spegel_p2p_lookup_duration_seconds_count{{{job},outcome=\"found\"}}"),
            Box::new(|v| v.values().filter(|n| **n >= 1.0).count() >= 2),
        ),
        (
            // Three nodes: each is connected to both others.
            format!("spegel_p2p_peers{{{job},state=\"connected\"}}"),
            Box::new(|v| v.len() == 3 && v.values().all(|n| *n == 2.0)),
        ),
        (
            // Each advertises what it has (A first, then B and C what they pulled).
            format!("spegel_advertised_keys{{{job}}}"),
            Box::new(move |v| v.len() == 3 && v.values().all(|n| *n >= blobs)),
        ),
        (
            // libp2p's own metrics: the connections between the three.
            format!("sum by (node) (libp2p_swarm_connections_established_total{{{job}}})"),
            Box::new(|v| v.len() == 3 && v.values().all(|n| *n >= 1.0)),
        ),
        (
            // Mirror mode has no upstream to fall back to.
            format!("sum by (node) (spegel_upstream_fallbacks_total{{{job}}})"),
            Box::new(|v| v.len() == 3 && v.values().all(|n| *n == 0.0)),
        ),
    ];
    for (promql, fits) in &checks {
        let got = eventually(
            &format!("prometheus has {promql}"),
            SCRAPE_TIMEOUT,
            || async {
                let got = by_node(&prometheus, promql).await?;
                Ok(fits(&got).then_some(got))
            },
        )
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
        eprintln!("prometheus: {promql} = {got:?}");
    }

    drop(prometheus);
    rig.shutdown().await.expect("clean teardown");
}
