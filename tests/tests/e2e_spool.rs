//! End-to-end acceptance of disk-spooled verify-before-send: two containerd nodes in mirror
//! mode, each with its own spegel daemon; the fetching daemon keeps only tiny blobs in memory
//! (`--peer-buffer-max 1MiB`) and streams none (`--peer-stream-min 1TiB`), so a 4 MiB layer
//! from its peer is received into the disk spool and verified before containerd gets its first
//! byte.
//!
//! 1. The only other holder corrupts what it serves: the first CRI pull completes (the daemon
//!    answers "not available" before sending a byte and containerd takes the layer from the
//!    registry), no bad byte is committed, and the peer is quarantined.
//! 2. A sound holder: the layer comes from the peer through the spool, and the registry never
//!    serves it to the fetching node.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_spool` as root, after
//! `SPEGEL_E2E=1 cargo build -p spegel-daemon`.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sha2::{Digest as _, Sha256};
use spegel_tests::rig::spegel::{
    DEFAULT_REGISTRY_PORT, LogEvent, LogMark, Spegel, SpegelOptions, configure_mirror,
    registry_urls,
};
use spegel_tests::rig::{Blob, Endpoint, ImageSpec, MIB, Node, Rig, TestImage};

/// How long the fetcher may take to find what its peer holds (DHT provide + lookup).
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// The fetcher's `--peer-buffer-max`: far below the layer, so the layer is spooled.
const BUFFER_MAX: &str = "1048576";
/// The fetcher's `--peer-stream-min`: above any blob here, so every peer blob is verified
/// before containerd gets a byte (the operator's choice this suite covers).
const STREAM_MIN: &str = "1099511627776";
/// The layer: four times the memory limit.
const LAYER: u64 = 4 * MIB;

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

fn daemon_url(node: &Node) -> String {
    format!("http://{}:{DEFAULT_REGISTRY_PORT}", node.ip())
}

/// Polls `check` every 200 ms until it yields a value, or fails after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let started = Instant::now();
    loop {
        let last = match check().await {
            Ok(true) => return,
            Ok(false) => "not yet".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?} (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `daemon` (asked as containerd asks) finds `blob` through its peers.
async fn finds_blob(daemon: &Spegel, repository: &str, blob: &Blob, ns: &str) -> Result<bool> {
    let path = format!("/v2/{repository}/blobs/{}?{ns}", blob.digest);
    let response = daemon.request("HEAD", &path, &[]).await?;
    if response.status != 200 {
        return Ok(false);
    }
    let length = response.header("content-length").unwrap_or_default();
    if length != blob.size.to_string() {
        bail!("HEAD {path}: content-length {length:?}, want {}", blob.size);
    }
    Ok(true)
}

/// Every file in `node`'s content store hashes to its name: containerd committed no bad bytes.
fn assert_store_sound(node: &Node) {
    let dir = node.content_dir().join("blobs").join("sha256");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{name}"),
            "{}",
            path.display()
        );
        count += 1;
    }
    assert!(count > 0, "{} has an empty content store", node.name());
}

/// `node`'s containerd holds every pulled blob of `image` with the right bytes.
async fn assert_holds(node: &Node, image: &TestImage) {
    for blob in image.pulled_blobs() {
        let bytes = node
            .read_blob(&blob.digest)
            .await
            .unwrap_or_else(|e| panic!("{} reading {}: {e:#}", node.name(), blob.digest));
        assert_eq!(sha256(&bytes), blob.digest);
        assert_eq!(bytes.len() as u64, blob.size);
    }
}

fn errors_of(daemon: &Spegel) -> Vec<LogEvent> {
    daemon
        .events()
        .into_iter()
        .filter(|event| event.level == "ERROR")
        .collect()
}

fn events_for(daemon: &Spegel, mark: LogMark, message: &str, digest: &str) -> usize {
    daemon
        .events_since(mark)
        .iter()
        .filter(|event| event.message == message && event.str("digest") == Some(digest))
        .count()
}

/// Prints both daemons' log tails if the test panics (before the rig deletes them).
struct Diagnostics(Vec<spegel_tests::rig::Process>);

impl Drop for Diagnostics {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for process in &self.0 {
                eprintln!(
                    "===== {} ({}):\n{}",
                    process.name(),
                    process.log_path().display(),
                    process.log_tail(60)
                );
            }
        }
    }
}

/// Two nodes that both pulled the image from the registry (no daemon running yet); the
/// fetcher (n2) then forgets all but its config. The holder's daemon starts with `holder`'s
/// options, the fetcher's with a 1 MiB memory limit.
struct Setup {
    rig: Rig,
    image: TestImage,
    holder: Spegel,
    fetcher: Spegel,
    diagnostics: Diagnostics,
}

async fn set_up(seed: u64, holder: SpegelOptions) -> Setup {
    let rig = Rig::builder().nodes(2).start().await.expect("rig starts");
    let image = rig
        .push_image(ImageSpec::new("spooled").layers([LAYER]).seed(seed))
        .await
        .expect("push the image");
    for node in rig.nodes() {
        configure_mirror(
            node,
            &[daemon_url(node)],
            &registry_urls(&rig, Endpoint::Plain),
        )
        .await
        .expect("configure-mirror");
        node.cri_pull(&image.reference(Endpoint::Plain))
            .await
            .expect("pull from the registry");
    }
    // The fetcher forgets all but the config, so its pull asks the peer for the layer first.
    rig.node(1)
        .forget_image(&image, true)
        .await
        .expect("forget all but the config");
    let holder = rig.start_spegel(0, holder).await.expect("holder starts");
    let fetcher = rig
        .start_spegel(
            1,
            SpegelOptions::mirror()
                .bootstrap_other_nodes()
                .args(["--peer-buffer-max", BUFFER_MAX])
                .args(["--peer-stream-min", STREAM_MIN]),
        )
        .await
        .expect("fetcher starts");
    let diagnostics = Diagnostics(vec![
        holder.process().clone(),
        fetcher.process().clone(),
        rig.node(1).containerd().clone(),
    ]);
    let layer = image.layers()[0].clone();
    let ns = ns_query(&rig);
    eventually("the fetcher finds the layer", FIND_TIMEOUT, || {
        finds_blob(&fetcher, &image.repository, &layer, &ns)
    })
    .await;
    Setup {
        rig,
        image,
        holder,
        fetcher,
        diagnostics,
    }
}

/// The layer's GETs the registry served to `node` since `before`.
async fn layer_gets(
    rig: &Rig,
    node: &Node,
    before: &spegel_tests::rig::RegistryLog,
    digest: &str,
) -> usize {
    rig.registry_log()
        .await
        .unwrap()
        .since(before)
        .from_client(node.ip())
        .iter()
        .filter(|entry| entry.method == "GET" && entry.blob_digest() == Some(digest))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_corrupt_peer_above_the_memory_limit_costs_no_pull_attempt() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let setup = set_up(7101, SpegelOptions::mirror().corrupt_peer_blobs()).await;
    let (rig, fetcher) = (&setup.rig, &setup.fetcher);
    let node = rig.node(1);
    let layer = setup.image.layers()[0].digest.clone();
    let holder_id = setup.holder.peer_id().expect("holder's peer id");

    let before = rig.registry_log().await.unwrap();
    let mark = fetcher.log_mark();
    let first = node.cri_pull(&setup.image.reference(Endpoint::Plain)).await;
    let image_ref = first.unwrap_or_else(|e| panic!("the first pull must succeed: {e:#}"));
    assert_eq!(image_ref, setup.image.config().digest);

    // The fetcher got the layer from the corrupt peer, caught it before sending a byte and
    // quarantined the peer; containerd took the layer from the registry instead.
    assert!(events_for(fetcher, mark, "streaming blob from peer", &layer) > 0);
    let quarantined = fetcher.events_since(mark).iter().any(|event| {
        event.message == "peer served corrupt content; quarantined"
            && event.str("peer") == Some(holder_id.as_str())
    });
    assert!(quarantined, "the corrupt peer was not quarantined");
    assert_eq!(
        events_for(fetcher, mark, "peer blob spooled and verified", &layer),
        0
    );
    assert!(layer_gets(rig, node, &before, &layer).await > 0);
    assert_holds(node, &setup.image).await;
    assert_store_sound(node);
    for daemon in [&setup.holder, fetcher] {
        let errors = errors_of(daemon);
        assert!(
            errors.is_empty(),
            "{} logged errors: {errors:#?}",
            daemon.node_name()
        );
    }
    drop(setup.diagnostics);
    setup.rig.shutdown().await.expect("clean teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_big_blob_comes_from_the_peer_through_the_spool() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let setup = set_up(7102, SpegelOptions::mirror()).await;
    let (rig, fetcher) = (&setup.rig, &setup.fetcher);
    let node = rig.node(1);
    let layer = setup.image.layers()[0].digest.clone();

    let before = rig.registry_log().await.unwrap();
    let mark = fetcher.log_mark();
    let image_ref = node
        .cri_pull(&setup.image.reference(Endpoint::Plain))
        .await
        .unwrap_or_else(|e| panic!("pull through the spool: {e:#}"));
    assert_eq!(image_ref, setup.image.config().digest);

    assert_eq!(
        events_for(fetcher, mark, "peer blob spooled and verified", &layer),
        1
    );
    let served = fetcher.served_since(mark).expect("served lines parse");
    assert!(
        served
            .iter()
            .any(|s| s.digest == layer && s.is_blob_get() && s.source == "peer"),
        "the layer was not served from the peer: {served:#?}"
    );
    assert_eq!(
        layer_gets(rig, node, &before, &layer).await,
        0,
        "the registry served the layer"
    );
    assert_holds(node, &setup.image).await;
    assert_store_sound(node);
    let spool = fetcher.data_dir().join("spool");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap_or_else(|e| panic!("{}: {e}", spool.display()))
        .collect();
    assert!(left.is_empty(), "spool files left behind: {left:?}");
    let errors = errors_of(fetcher);
    assert!(errors.is_empty(), "the fetcher logged errors: {errors:#?}");
    drop(setup.diagnostics);
    setup.rig.shutdown().await.expect("clean teardown");
}
