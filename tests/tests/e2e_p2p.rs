//! End-to-end acceptance of the peer-to-peer issue on the real multi-node rig: containerd
//! nodes, each with its own spegel daemon in mirror mode (`hosts.toml` from
//! `spegel configure-mirror` points every node at its *own* daemon, the registry last), the
//! daemons finding each other through the libp2p DHT.
//!
//! One scenario per test, each on its own rig (A is `n1`, B `n2`, ...):
//!
//! - `lonely_node_serves_its_own_content_alone`: A alone (no peers): ready, serves its own
//!   content.
//! - `peers_pull_what_a_has_each_blob_once_from_the_registry`: B and C pull what A has: the
//!   registry sees every blob downloaded once, by A.
//! - `registry_down_a_fresh_node_pulls_by_tag_and_digest_from_peers`: registry stopped: a node
//!   that never pulled anything pulls by tag and by digest from A.
//! - `peer_killed_mid_stream_the_pull_resumes_from_another_peer`: a large blob B streams from a
//!   throttled peer survives that peer's SIGKILL mid-stream (B's daemon resumes from the other
//!   holder).
//! - `fresh_node_pulls_correct_content_despite_a_corrupt_peer`: a peer serving corrupted bytes:
//!   no bad byte is committed by the fetching containerd, the peer is quarantined, and the pull
//!   completes (the one-chunk config reveals the corruption before containerd gets a byte).
//! - `a_corrupt_streamed_layer_costs_one_attempt_and_the_retry_starts_over`: the corrupt
//!   peer's first blob to a node is a layer above `--peer-stream-min`, streamed to containerd as
//!   it arrives, so bad bytes reach containerd before the mismatch shows: that attempt fails,
//!   containerd's partial copy is discarded, and the retry starts from byte 0 and completes.
//!
//! Every test ends by checking that no daemon logged an error.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_p2p -- --nocapture` as root,
//! after `cargo build -p spegel-daemon`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};
use spegel_tests::eventually;
use spegel_tests::rig::spegel::{
    DEFAULT_REGISTRY_PORT, LogEvent, LogMark, MANIFEST_ACCEPT, Spegel, SpegelOptions,
    configure_mirror, registry_urls,
};
use spegel_tests::rig::{Blob, Endpoint, ImageSpec, MIB, Node, Process, Rig, TestImage};

/// How long peers may take to find content another node just got (DHT provide + lookup).
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// The throttle on the peers a large blob is streamed from: far above the fetching daemon's
/// default `--peer-min-rate` (512 KiB/s), so only the kill makes it switch peers.
const THROTTLE_BYTES_PER_SECOND: u64 = 6 * MIB;
/// Size of the large layer of the kill scenario: ~5 s at the throttle, so the kill lands
/// mid-stream with seconds to spare on either side.
const BULKY_LAYER: u64 = 32 * MIB;
/// Bytes B must have received from the first peer before it is killed.
const KILL_AFTER: u64 = 4 * MIB;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `ns=registry.<prefix>.test%3A5000`, as containerd sends it to mirrors.
fn ns_query(rig: &Rig) -> String {
    format!(
        "ns={}",
        rig.registry().host(Endpoint::Plain).replace(':', "%3A")
    )
}

/// The URL a node's daemon will listen on (known before it starts, for `configure-mirror`).
fn daemon_url(node: &Node) -> String {
    format!("http://{}:{DEFAULT_REGISTRY_PORT}", node.ip())
}

/// Prints every daemon's and containerd's log tail if the test panics (before the rig, dropped
/// later, deletes the logs).
struct Diagnostics {
    processes: Vec<Process>,
}

impl Diagnostics {
    fn new(rig: &Rig) -> Self {
        Self {
            processes: rig
                .nodes()
                .iter()
                .map(|node| node.containerd().clone())
                .collect(),
        }
    }

    fn watch(&mut self, daemon: &Spegel) {
        self.processes.push(daemon.process().clone());
    }
}

impl Drop for Diagnostics {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for process in &self.processes {
            let log = process.read_log();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|line| line.contains("\"WARN\"") || line.contains("\"ERROR\""))
                .collect();
            eprintln!(
                "===== {} ({}): {} warning/error lines, last 20:\n{}\n----- last 40 lines:\n{}",
                process.name(),
                process.log_path().display(),
                warnings.len(),
                warnings[warnings.len().saturating_sub(20)..].join("\n"),
                process.log_tail(40)
            );
        }
    }
}

/// Whether `daemon` (asked as containerd asks: no `X-Spegel-Mirrored`, so it looks up peers)
/// answers 200 to a HEAD of every blob in `blobs`.
async fn finds_blobs(daemon: &Spegel, repository: &str, blobs: &[&Blob], ns: &str) -> Result<bool> {
    for blob in blobs {
        let path = format!("/v2/{repository}/blobs/{}?{ns}", blob.digest);
        let response = daemon.request("HEAD", &path, &[]).await?;
        if response.status != 200 {
            return Ok(false);
        }
        let length = response.header("content-length").unwrap_or_default();
        if length != blob.size.to_string() {
            bail!(
                "HEAD {path} on {}: content-length {length:?}, want {}",
                daemon.node_name(),
                blob.size
            );
        }
    }
    Ok(true)
}

/// Waits until `daemon` finds every pulled blob of `images` (and, with `tags`, resolves their
/// tags) through its peers. Tags are only resolved through peers while the registry is down.
async fn wait_findable(daemon: &Spegel, rig: &Rig, images: &[&TestImage], tags: bool) {
    let ns = ns_query(rig);
    let started = Instant::now();
    eventually(
        &format!("{} finds the content of its peers", daemon.node_name()),
        FIND_TIMEOUT,
        || async {
            for image in images {
                if !finds_blobs(daemon, &image.repository, &image.pulled_blobs(), &ns).await? {
                    return Ok(None);
                }
                if tags {
                    let path = format!("/v2/{}/manifests/{}?{ns}", image.repository, image.tag);
                    let response = daemon
                        .request("HEAD", &path, &[("Accept", MANIFEST_ACCEPT)])
                        .await?;
                    if response.status != 200 {
                        return Ok(None);
                    }
                    if response.header("docker-content-digest") != Some(image.digest()) {
                        bail!("tag of {} resolved to {:?}", image.name, response.headers);
                    }
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    eprintln!(
        "{} finds {} image(s) through peers after {:?}",
        daemon.node_name(),
        images.len(),
        started.elapsed()
    );
}

/// Each pulled blob of `images` once.
fn once_each(images: &[&TestImage]) -> BTreeMap<String, usize> {
    images
        .iter()
        .flat_map(|image| image.pulled_blobs())
        .map(|blob| (blob.digest.clone(), 1))
        .collect()
}

/// Asserts that `node`'s containerd holds every pulled blob of `images` with the right bytes
/// (Content.Read, re-hashed).
async fn assert_holds(node: &Node, images: &[&TestImage]) {
    for image in images {
        for blob in image.pulled_blobs() {
            let bytes = node.read_blob(&blob.digest).await.unwrap_or_else(|error| {
                panic!("{} reading {}: {error:#}", node.name(), blob.digest)
            });
            assert_eq!(
                sha256(&bytes),
                blob.digest,
                "{} on {}",
                blob.digest,
                node.name()
            );
            assert_eq!(bytes.len() as u64, blob.size);
        }
    }
}

/// Asserts that `daemon` streamed every pulled blob of `images` to its containerd from peers.
fn assert_served_from_peers(daemon: &Spegel, mark: LogMark, images: &[&TestImage]) {
    let served = daemon.served_since(mark).expect("served lines parse");
    for image in images {
        for blob in image.pulled_blobs() {
            assert!(
                served.iter().any(|s| s.digest == blob.digest
                    && s.is_blob_get()
                    && s.source == "peer"
                    && !s.peer_request),
                "{} did not stream {} of {} from a peer: {served:#?}",
                daemon.node_name(),
                blob.digest,
                image.name
            );
        }
    }
}

/// The first event after `mark` with `message` whose `digest` field is `digest`.
fn event_for(daemon: &Spegel, mark: LogMark, message: &str, digest: &str) -> Option<LogEvent> {
    daemon
        .events_since(mark)
        .into_iter()
        .find(|event| event.message == message && event.str("digest") == Some(digest))
}

/// A fresh rig of `nodes` nodes whose containerd each ask their *own* daemon first and the
/// registry last (no daemon runs yet: containerd meets connection refused and goes on).
async fn mirrored_rig(nodes: usize) -> (Rig, Diagnostics) {
    let started = Instant::now();
    let rig = Rig::builder()
        .nodes(nodes)
        .start()
        .await
        .expect("rig starts");
    let diagnostics = Diagnostics::new(&rig);
    eprintln!(
        "rig {} ({}) up in {:?}",
        rig.prefix(),
        rig.subnet(),
        started.elapsed()
    );
    let registries = registry_urls(&rig, Endpoint::Plain);
    for node in rig.nodes() {
        configure_mirror(node, &[daemon_url(node)], &registries)
            .await
            .expect("configure-mirror");
    }
    (rig, diagnostics)
}

/// A pulls every standard image and starts its daemon alone (see
/// [`lonely_node_serves_its_own_content`]); then every other node's daemon starts,
/// bootstrapping from all the others. Returns the daemons in node order.
async fn a_holds_everything_then_all_daemons(
    rig: &Rig,
    diagnostics: &mut Diagnostics,
) -> Vec<Spegel> {
    let a = lonely_node_serves_its_own_content(rig).await;
    diagnostics.watch(&a);
    let others = futures::future::try_join_all(
        (1..rig.nodes().len())
            .map(|index| rig.start_spegel(index, SpegelOptions::mirror().bootstrap_other_nodes())),
    )
    .await
    .expect("the other daemons start");
    let mut daemons = vec![a];
    daemons.extend(others);
    for daemon in &daemons {
        diagnostics.watch(daemon);
        assert_eq!(daemon.url(), daemon_url(rig.node(daemon.index())));
    }
    daemons
}

/// Every node's daemon at once, in mirror mode, bootstrapping from all the others.
async fn all_daemons(rig: &Rig, diagnostics: &mut Diagnostics) -> Vec<Spegel> {
    let daemons = rig
        .start_spegel_everywhere(SpegelOptions::mirror())
        .await
        .expect("every daemon starts");
    for daemon in &daemons {
        diagnostics.watch(daemon);
    }
    daemons
}

/// No daemon logged an error (a killed or corrupt one only WARNs); then teardown.
async fn finish(rig: Rig, diagnostics: Diagnostics, daemons: &[Spegel], started: Instant) {
    for daemon in daemons {
        let errors: Vec<LogEvent> = daemon
            .events()
            .into_iter()
            .filter(|event| event.level == "ERROR")
            .collect();
        assert!(
            errors.is_empty(),
            "{} logged errors: {errors:#?}",
            daemon.node_name()
        );
    }
    eprintln!("passed in {:?}", started.elapsed());
    drop(diagnostics);
    rig.shutdown().await.expect("clean teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn lonely_node_serves_its_own_content_alone() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let (rig, mut diagnostics) = mirrored_rig(1).await;
    let a = lonely_node_serves_its_own_content(&rig).await;
    diagnostics.watch(&a);
    finish(rig, diagnostics, &[a], started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peers_pull_what_a_has_each_blob_once_from_the_registry() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let (rig, mut diagnostics) = mirrored_rig(3).await;
    let daemons = a_holds_everything_then_all_daemons(&rig, &mut diagnostics).await;
    peers_pull_what_a_has_and_the_registry_serves_each_blob_once(&rig, &daemons).await;
    finish(rig, diagnostics, &daemons, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn registry_down_a_fresh_node_pulls_by_tag_and_digest_from_peers() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let (rig, mut diagnostics) = mirrored_rig(2).await;
    let daemons = a_holds_everything_then_all_daemons(&rig, &mut diagnostics).await;
    registry_down_d_pulls_by_tag_and_digest_from_peers(&rig, &daemons).await;
    finish(rig, diagnostics, &daemons, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peer_killed_mid_stream_the_pull_resumes_from_another_peer() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let (rig, mut diagnostics) = mirrored_rig(3).await;
    let daemons = all_daemons(&rig, &mut diagnostics).await;
    peer_killed_mid_stream_the_pull_resumes_elsewhere(&rig, &daemons).await;
    finish(rig, diagnostics, &daemons, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn fresh_node_pulls_correct_content_despite_a_corrupt_peer() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let (rig, mut diagnostics) = mirrored_rig(2).await;
    let daemons = all_daemons(&rig, &mut diagnostics).await;
    fresh_node_pulls_despite_a_corrupt_peer(&rig, &daemons).await;
    finish(rig, diagnostics, &daemons, started).await;
}

/// A pulls every standard image from the registry (its daemon is not running yet: connection
/// refused, containerd goes straight on to the registry). Then A's daemon starts with no
/// bootstrap peers and nobody else running: it is ready and serves what A holds.
async fn lonely_node_serves_its_own_content(rig: &Rig) -> Spegel {
    eprintln!("--- A alone");
    let a = rig.node(0);
    let images = rig.images();
    for image in [&images.small, &images.four, &images.multi] {
        let image_ref = a
            .cri_pull(&image.reference(Endpoint::Plain))
            .await
            .expect("A pulls from the registry");
        assert_eq!(image_ref, image.config().digest);
    }

    let daemon = rig
        .start_spegel(0, SpegelOptions::mirror())
        .await
        .expect("A's daemon becomes ready without any peer");
    let ready = daemon.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "/readyz: {}", ready.text());
    let metrics = daemon.metrics().await.unwrap();
    assert_eq!(
        metrics.get("spegel_router_has_peers", &[]),
        Some(0.0),
        "A has no peers yet"
    );

    // Its own content, by tag (with ns, as containerd asks) and by digest.
    let mark = daemon.log_mark();
    let four = &images.four;
    let manifest = daemon
        .request(
            "GET",
            &format!(
                "/v2/{}/manifests/{}?{}",
                four.repository,
                four.tag,
                ns_query(rig)
            ),
            // As a peer asks: its own store (containerd's own tag requests go to the registry
            // while it is up).
            &[("Accept", MANIFEST_ACCEPT), ("X-Spegel-Mirrored", "true")],
        )
        .await
        .unwrap();
    assert_eq!(manifest.status, 200, "{}", manifest.text());
    assert_eq!(sha256(&manifest.body), four.digest());
    for blob in four.pulled_blobs() {
        let response = daemon
            .get(&format!("/v2/{}/blobs/{}", four.repository, blob.digest))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}: {}", blob.digest, response.text());
        assert_eq!(sha256(&response.body), blob.digest);
    }
    let served = daemon.served_since(mark).unwrap();
    assert!(!served.is_empty());
    assert!(
        served.iter().all(|s| s.source == "local"),
        "a lonely node serves from its store: {served:#?}"
    );
    daemon
}

/// B and C pull every image A has, through their own daemons, at the same time. The registry
/// served each blob exactly once in total: to A.
async fn peers_pull_what_a_has_and_the_registry_serves_each_blob_once(
    rig: &Rig,
    daemons: &[Spegel],
) {
    eprintln!("--- B and C pull what A has");
    let images = rig.images().clone();
    let all = [&images.small, &images.four, &images.multi];

    // A learns of the others through their inbound connections.
    eventually("A sees peers", FIND_TIMEOUT, || async {
        let metrics = daemons[0].metrics().await?;
        Ok((metrics.value("spegel_router_has_peers", &[]) == 1.0).then_some(()))
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    // A's content is advertised before anyone pulls; both fetchers must see it.
    for daemon in &daemons[1..3] {
        // Tags are left to the registry while it is up: only blobs are looked for.
        wait_findable(daemon, rig, &all, false).await;
    }

    let marks: Vec<LogMark> = daemons.iter().map(Spegel::log_mark).collect();
    let pull_all = |node: &'static str, index: usize| {
        let node_ref = rig.node(index);
        async move {
            let started = Instant::now();
            for image in all {
                let image_ref = node_ref
                    .cri_pull(&image.reference(Endpoint::Plain))
                    .await
                    .unwrap_or_else(|error| panic!("{node} pulls {}: {error:#}", image.name));
                assert_eq!(image_ref, image.config().digest);
            }
            eprintln!(
                "{node} pulled every image through peers in {:?}",
                started.elapsed()
            );
        }
    };
    tokio::join!(pull_all("B", 1), pull_all("C", 2));

    // The registry's whole log: every blob once, all by A.
    let log = rig.registry_log().await.unwrap();
    assert_eq!(
        log.blob_get_counts(),
        once_each(&all),
        "blob downloads from the registry: {:#?}",
        log.blob_gets_per_client()
    );
    let clients: BTreeSet<IpAddr> = log.blob_gets_per_client().into_keys().collect();
    assert_eq!(clients, BTreeSet::from([IpAddr::from(rig.node(0).ip())]));
    for index in [1, 2] {
        let node = rig.node(index);
        let from_node = log.from_client(node.ip());
        if !from_node.is_empty() {
            // Manifests may legitimately come from upstream; show it, it is not the criterion.
            eprintln!(
                "note: {} made {} registry request(s) (no blobs): {:?}",
                node.name(),
                from_node.len(),
                from_node
                    .iter()
                    .map(|e| format!("{} {}", e.method, e.path))
                    .collect::<Vec<_>>()
            );
        }
        assert_holds(node, &all).await;
        assert_served_from_peers(&daemons[index], marks[index], &all);
        let metrics = daemons[index].metrics().await.unwrap();
        assert_eq!(metrics.sum("spegel_peer_verify_failures_total"), 0.0);
        assert!(metrics.sum("spegel_peer_hits_total") > 0.0);
    }
}

/// The registry is stopped; D, which has never pulled anything, pulls every image by tag and
/// by digest, served by the other nodes alone.
async fn registry_down_d_pulls_by_tag_and_digest_from_peers(rig: &Rig, daemons: &[Spegel]) {
    eprintln!("--- registry down: D pulls from peers");
    let images = rig.images().clone();
    let all = [&images.small, &images.four, &images.multi];
    let last = daemons.len() - 1;
    let d = rig.node(last);
    let daemon = &daemons[last];
    rig.registry().stop().await.expect("registry stops");
    assert!(!rig.registry().is_running());
    let before = rig.registry_log().await.unwrap();
    wait_findable(daemon, rig, &all, true).await;

    let mark = daemon.log_mark();
    // `small` by digest first (its content comes in through a digest pull), the others by tag
    // first; then each the other way round (resolution through peers again).
    let mut references = Vec::new();
    for image in all {
        let (by_tag, by_digest) = (
            image.reference(Endpoint::Plain),
            image.digest_reference(Endpoint::Plain),
        );
        if image.name == images.small.name {
            references.extend([by_digest, by_tag]);
        } else {
            references.extend([by_tag, by_digest]);
        }
    }
    for reference in &references {
        let started = Instant::now();
        d.cri_pull(reference).await.unwrap_or_else(|error| {
            panic!("D pulls {reference} with the registry down: {error:#}")
        });
        eprintln!("D pulled {reference} from peers in {:?}", started.elapsed());
    }

    // CRI knows every image by tag and by digest.
    let cri = d.cri_images().await.unwrap();
    for image in all {
        let record = cri
            .iter()
            .find(|record| record.id == image.config().digest)
            .unwrap_or_else(|| panic!("D's CRI lacks {}: {cri:#?}", image.name));
        assert!(
            record.repo_tags.contains(&image.reference(Endpoint::Plain)),
            "{record:?}"
        );
        assert!(
            record
                .repo_digests
                .contains(&image.digest_reference(Endpoint::Plain)),
            "{record:?}"
        );
    }
    assert_holds(d, &all).await;
    assert_served_from_peers(daemon, mark, &all);
    // Manifests, by tag and by digest, came from peers too (nothing else was up).
    let served = daemon.served_since(mark).unwrap();
    for image in all {
        assert!(
            served
                .iter()
                .any(|s| s.kind == "manifest" && s.digest == image.digest() && s.source == "peer"),
            "D's daemon did not serve the manifest of {} from a peer: {served:#?}",
            image.name
        );
    }

    rig.registry().start().await.expect("registry starts again");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert!(
        log.from_client(d.ip()).is_empty(),
        "the registry was down, yet logged D: {:#?}",
        log.entries()
    );
}

/// A and C hold a large image and serve peers throttled; B pulls it through its daemon, which
/// streams the layer from one of them. That one is SIGKILLed mid-stream: B's daemon resumes
/// from the other holder with a Range request, and B's pull succeeds with the right bytes,
/// without the registry.
async fn peer_killed_mid_stream_the_pull_resumes_elsewhere(rig: &Rig, daemons: &[Spegel]) {
    eprintln!("--- a peer killed mid-stream");
    let bulky = rig
        .push_image(ImageSpec::new("bulky").layers([BULKY_LAYER]).seed(7001))
        .await
        .expect("push the large image");
    let layer = bulky.layers()[0].clone();
    assert!(layer.size >= BULKY_LAYER, "{layer:?}");

    // A and C fetch it from the registry while their daemons are down (connection refused:
    // containerd goes straight on), then serve peers throttled.
    let holders = [0, 2];
    for &index in &holders {
        daemons[index].stop().await.expect("stop a holder's daemon");
    }
    for &index in &holders {
        rig.node(index)
            .cri_pull(&bulky.reference(Endpoint::Plain))
            .await
            .expect("a holder pulls from the registry");
    }
    for &index in &holders {
        let daemon = &daemons[index];
        daemon.set_peer_throttle(Some(THROTTLE_BYTES_PER_SECOND));
        daemon
            .start()
            .await
            .expect("a holder's daemon starts throttled");
    }
    let holder_ids: Vec<String> = holders
        .iter()
        .map(|&index| daemons[index].peer_id().expect("holder logged its peer id"))
        .collect();

    // B must know both holders before it pulls, or the resume would have nowhere to go.
    let b = rig.node(1);
    let fetcher = &daemons[1];
    let ns = ns_query(rig);
    eventually(
        "B finds both holders of the large layer",
        FIND_TIMEOUT,
        || async {
            let mark = fetcher.log_mark();
            if !finds_blobs(fetcher, &bulky.repository, &[&layer], &ns).await? {
                return Ok(None);
            }
            let found = fetcher
                .events_since(mark)
                .into_iter()
                .filter(|event| {
                    event.message == "lookup finished" && event.str("key") == Some(&layer.digest)
                })
                .filter_map(|event| event.u64("found"))
                .max();
            Ok((found >= Some(2)).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));

    let before = rig.registry_log().await.unwrap();
    let bytes_before = fetcher
        .metrics()
        .await
        .unwrap()
        .value("spegel_peer_bytes_total", &[]);
    let resumes_before = fetcher
        .metrics()
        .await
        .unwrap()
        .value("spegel_peer_resumes_total", &[]);
    let mark = fetcher.log_mark();
    let started = Instant::now();
    let pull = async {
        let result = b.cri_pull(&bulky.reference(Endpoint::Plain)).await;
        eprintln!("B's pull of bulky ended after {:?}", started.elapsed());
        result
    };
    let killer = async {
        // Which holder is B streaming from?
        let streaming = eventually("B streams the layer from a peer", FIND_TIMEOUT, || async {
            Ok(event_for(
                fetcher,
                mark,
                "streaming blob from peer",
                &layer.digest,
            ))
        })
        .await?;
        let peer = streaming.str("peer").context("no peer field")?.to_owned();
        let position = holder_ids
            .iter()
            .position(|id| *id == peer)
            .with_context(|| format!("B streams from {peer}, not a holder ({holder_ids:?})"))?;
        let victim = &daemons[holders[position]];
        // Let a few MiB through, then crash it.
        let received = eventually("B receives the first MiBs", FIND_TIMEOUT, || async {
            let bytes = fetcher
                .metrics()
                .await?
                .value("spegel_peer_bytes_total", &[])
                - bytes_before;
            Ok((bytes >= KILL_AFTER as f64).then_some(bytes))
        })
        .await?;
        if received >= layer.size as f64 {
            bail!(
                "the whole layer arrived before the kill ({received} bytes): the throttle did not hold"
            );
        }
        victim.kill().await?;
        eprintln!(
            "killed {}'s daemon after B received {:.1} MiB of {:.1} MiB",
            victim.node_name(),
            received / MIB as f64,
            layer.size as f64 / MIB as f64
        );
        Ok::<_, anyhow::Error>(position)
    };
    let (pulled, killed) = tokio::join!(pull, killer);
    let victim = killed.unwrap_or_else(|error| panic!("{error:#}"));
    let (victim_id, survivor_id) = (&holder_ids[victim], &holder_ids[1 - victim]);
    let image_ref = pulled.unwrap_or_else(|error| panic!("B's pull after the kill: {error:#}"));
    assert_eq!(image_ref, bulky.config().digest);

    // B's daemon noticed the failure mid-stream and continued from the survivor.
    let failed = event_for(
        fetcher,
        mark,
        "peer transfer failed mid-stream",
        &layer.digest,
    )
    .expect("B's daemon logged the failed transfer");
    let offset = failed.u64("offset").expect("offset");
    assert!(
        offset > 0 && offset < layer.size,
        "failure at byte {offset} of {}",
        layer.size
    );
    assert_eq!(failed.str("peer"), Some(victim_id.as_str()));
    let resumed = event_for(fetcher, mark, "resumed from another peer", &layer.digest)
        .expect("B's daemon resumed from another peer");
    assert_eq!(resumed.str("peer"), Some(survivor_id.as_str()));
    assert_eq!(resumed.u64("offset"), Some(offset));
    let metrics = fetcher.metrics().await.unwrap();
    assert!(
        metrics.value("spegel_peer_resumes_total", &[]) > resumes_before,
        "spegel_peer_resumes_total did not grow: {:#?}",
        metrics.all()
    );
    assert_eq!(metrics.sum("spegel_peer_verify_failures_total"), 0.0);
    assert_holds(b, &[&bulky]).await;
    let log = rig.registry_log().await.unwrap().since(&before);
    assert!(
        log.blob_gets_by(b.ip()).is_empty(),
        "B downloaded from the registry: {:#?}",
        log.entries()
    );
}

/// Every file in `node`'s content store hashes to its name: containerd committed no bad bytes.
fn assert_store_sound(node: &Node) {
    let dir = node.content_dir().join("blobs").join("sha256");
    let mut count = 0;
    for entry in
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{name}"),
            "{} on {}",
            path.display(),
            node.name()
        );
        count += 1;
    }
    assert!(count > 0, "{} has an empty content store", node.name());
}

/// The events after `mark` that quarantine `peer`.
fn quarantines_of(daemon: &Spegel, mark: LogMark, peer: &str) -> usize {
    daemon
        .events_since(mark)
        .iter()
        .filter(|event| {
            event.message == "peer served corrupt content; quarantined"
                && event.str("peer") == Some(peer)
        })
        .count()
}

/// C, and nobody else, holds a new image and corrupts every blob it serves to peers. D, a node
/// that has nothing of the image, pulls it. containerd fetches the (one-chunk) config first:
/// D's daemon finds it corrupt before sending a byte, quarantines C, and containerd retries;
/// D's daemon now answers 404 and containerd takes everything from the registry. One pull,
/// correct content.
async fn fresh_node_pulls_despite_a_corrupt_peer(rig: &Rig, daemons: &[Spegel]) {
    eprintln!("--- a corrupt peer");
    let tainted = rig
        .push_image(ImageSpec::new("tainted").layers([4 * MIB]).seed(7002))
        .await
        .expect("push the image");
    let (corrupt, fetcher) = (&daemons[0], &daemons[1]);
    let d = rig.node(1);
    corrupt.stop().await.unwrap();
    rig.node(0)
        .cri_pull(&tainted.reference(Endpoint::Plain))
        .await
        .expect("C pulls from the registry");
    corrupt.set_corrupt_peer_blobs(true);
    corrupt.start().await.expect("C's daemon starts corrupting");
    let corrupt_id = corrupt.peer_id().expect("C's peer id");
    wait_findable(fetcher, rig, &[&tainted], false).await;

    let mark = fetcher.log_mark();
    let corrupt_mark = corrupt.log_mark();
    let started = Instant::now();
    let image_ref = d
        .cri_pull(&tainted.reference(Endpoint::Plain))
        .await
        .unwrap_or_else(|error| panic!("D's pull with a corrupt peer: {error:#}"));
    eprintln!("D pulled tainted in {:?}", started.elapsed());
    assert_eq!(image_ref, tainted.config().digest);

    // C did serve D corrupted bytes; D's daemon caught them and quarantined C.
    assert!(
        corrupt
            .events_since(corrupt_mark)
            .iter()
            .any(|event| event.message.starts_with("TEST FAULT: corrupting")),
        "C never served a corrupted blob"
    );
    let metrics = fetcher.metrics().await.unwrap();
    assert!(
        metrics.value("spegel_peer_verify_failures_total", &[]) > 0.0,
        "{:#?}",
        metrics.all()
    );
    assert!(metrics.value("spegel_peer_quarantines_total", &[]) > 0.0);
    assert!(
        quarantines_of(fetcher, mark, &corrupt_id) > 0,
        "D's daemon did not quarantine C"
    );
    assert_holds(d, &[&tainted]).await;
    assert_store_sound(d);
}

/// A node that kept only the config of an image pulls it again while the only
/// other holder corrupts what it serves: the first blob it wants from that peer is a layer
/// above `--peer-stream-min`, which its daemon streams to containerd as the bytes come; only the
/// final chunk (held back) reveals the mismatch. The daemon quarantines the peer, throws away
/// containerd's partial copy through its content API and only then cuts the transfer: that
/// PullImage fails (containerd resumes the cut body within the attempt, and its commit refuses
/// the bytes), nothing bad is committed, and kubelet's retry starts the layer from byte 0 (from
/// the registry, once the daemon answers 404) and completes.
///
/// Why it matters: containerd 1.6.20 keeps the bytes it already received and resumes the
/// download at that offset (`Range`) in every later attempt too: without the discard, the bad
/// bytes sent before the mismatch showed would fail every retry ("unexpected commit digest").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_corrupt_streamed_layer_costs_one_attempt_and_the_retry_starts_over() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let started = Instant::now();
    let rig = Rig::builder().nodes(2).start().await.expect("rig starts");
    let mut diagnostics = Diagnostics::new(&rig);
    let tainted = rig
        .push_image(ImageSpec::new("tainted").layers([4 * MIB]).seed(7003))
        .await
        .expect("push the image");
    let layer = tainted.layers()[0].clone();
    let fetcher_node = rig.node(1);
    for node in rig.nodes() {
        configure_mirror(
            node,
            &[daemon_url(node)],
            &registry_urls(&rig, Endpoint::Plain),
        )
        .await
        .expect("configure-mirror");
        // No daemon runs yet: both get the image from the registry.
        node.cri_pull(&tainted.reference(Endpoint::Plain))
            .await
            .expect("pull from the registry");
    }
    fetcher_node
        .forget_image(&tainted, true)
        .await
        .expect("forget the image");

    let corrupt = rig
        .start_spegel(0, SpegelOptions::mirror().corrupt_peer_blobs())
        .await
        .expect("the corrupt holder's daemon starts");
    diagnostics.watch(&corrupt);
    let fetcher = rig
        .start_spegel(1, SpegelOptions::mirror().bootstrap_other_nodes())
        .await
        .expect("the fetcher's daemon starts");
    diagnostics.watch(&fetcher);
    let corrupt_id = corrupt.peer_id().expect("peer id");
    let ns = ns_query(&rig);
    eventually("the fetcher finds the layer", FIND_TIMEOUT, || async {
        Ok(finds_blobs(&fetcher, &tainted.repository, &[&layer], &ns)
            .await?
            .then_some(()))
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));

    let mark = fetcher.log_mark();
    let pull_started = Instant::now();
    let first = fetcher_node
        .cri_pull(&tainted.reference(Endpoint::Plain))
        .await;
    eprintln!(
        "the first pull ended after {:?}: {}",
        pull_started.elapsed(),
        match &first {
            Ok(image_ref) => format!("ok, {image_ref}"),
            Err(error) => format!("{error:#}"),
        }
    );

    // The daemon streamed the layer from the corrupt peer, caught it and quarantined the peer.
    let streamed = event_for(&fetcher, mark, "streaming blob from peer", &layer.digest)
        .expect("the daemon streamed the layer from a peer");
    assert_eq!(streamed.str("peer"), Some(corrupt_id.as_str()));
    assert!(
        quarantines_of(&fetcher, mark, &corrupt_id) > 0,
        "the corrupt peer was not quarantined"
    );
    assert!(
        fetcher
            .metrics()
            .await
            .unwrap()
            .value("spegel_peer_verify_failures_total", &[])
            > 0.0
    );

    // That attempt failed (containerd resumes a cut body at once, within the attempt, and its
    // commit then refuses the bytes), after the daemon discarded containerd's partial copy.
    if let Ok(image_ref) = &first {
        panic!("the first pull completed ({image_ref}) on a corrupt peer's layer");
    }
    let discarded = event_for(
        &fetcher,
        mark,
        "discarded containerd's partial copy of a peer blob that did not verify; its next attempt starts from the first byte",
        &layer.digest,
    )
    .expect("the daemon discarded containerd's partial copy");
    assert!(discarded.u64("count").unwrap_or(0) >= 1, "{discarded:?}");
    assert_store_sound(fetcher_node);
    assert!(!fetcher_node.has_blob(&layer.digest).await.unwrap());

    // kubelet retries a failed pull; the peer is quarantined now and the daemon says 404.
    let before_retry = rig.registry_log().await.unwrap();
    let image_ref = fetcher_node
        .cri_pull(&tainted.reference(Endpoint::Plain))
        .await
        .unwrap_or_else(|error| panic!("the retry after the corrupt layer: {error:#}"));
    assert_eq!(image_ref, tainted.config().digest);
    assert_holds(fetcher_node, &[&tainted]).await;
    assert_store_sound(fetcher_node);
    for daemon in [&corrupt, &fetcher] {
        let errors: Vec<LogEvent> = daemon
            .events()
            .into_iter()
            .filter(|event| event.level == "ERROR")
            .collect();
        assert!(
            errors.is_empty(),
            "{} logged errors: {errors:#?}",
            daemon.node_name()
        );
    }

    // The retry took the whole layer from byte 0: no resume after the discarded bytes.
    let log = rig.registry_log().await.unwrap().since(&before_retry);
    let layer_gets: Vec<(u16, u64)> = log
        .from_client(fetcher_node.ip())
        .iter()
        .filter(|entry| entry.method == "GET" && entry.blob_digest() == Some(layer.digest.as_str()))
        .map(|entry| (entry.status, entry.bytes))
        .collect();
    assert_eq!(
        layer_gets,
        vec![(200, layer.size)],
        "the fetcher's registry GETs of the layer (status, bytes)"
    );

    eprintln!(
        "layer-first corrupt peer scenario passed in {:?}",
        started.elapsed()
    );
    drop(diagnostics);
    rig.shutdown().await.expect("clean teardown");
}
