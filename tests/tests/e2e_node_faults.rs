//! End-to-end fault matrix on a node (issue 11): real containerd, real registry, real daemons in
//! transparent mode (set up by [`spegel_tests::cluster::transparent_for`]). One fault per test,
//! each on its own rig, so one failure hides no other:
//!
//! - `containerd_restarted_during_a_pull`: A's containerd restarts while A streams a layer from
//!   a (throttled) peer. The daemon keeps running (same process, no crash loop), reconnects, a
//!   kubelet-style retry of the pull succeeds with correct content, and content A pulls after
//!   the restart is found by another node (events and walks work again).
//! - `daemon_restarted_during_a_pull`: A's daemon is `kill -9`ed mid-blob and started again:
//!   the pull (or its retry) succeeds with correct content; the new daemon attaches and serves.
//! - `peer_link_cut_mid_blob`: the link of the peer A streams a layer from goes down mid-blob:
//!   A's pull completes from another source with correct content.
//! - `malformed_input_on_the_interception_port`: truncated and garbage ClientHellos, huge SNIs,
//!   oversized and garbage HTTP heads and silent connections, from inside containerd's cgroup
//!   (redirected) and straight at the listener: the daemon stays up and closes or passes them
//!   on, while another node pulls from it meanwhile.
//! - `wedged_listener_detaches_then_reattaches`: A's interception accept loop is wedged (the
//!   daemon alive, accepting nothing; a test-only switch): the daemon detaches its eBPF programs
//!   within `--intercept-wedge-timeout`, a pull meanwhile goes straight to the registry and
//!   succeeds, and once the listener is healthy again the programs are re-attached and the next
//!   pull is served by spegel.
//!
//! After each fault: the daemons are alive, and the affected daemon's open fds and RSS are back
//! near a baseline taken before (loose bounds). "Correct content" means containerd holds every
//! blob with the right digest and every file of its content store hashes to its name.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_node_faults -- --nocapture` as
//! root, after `cargo build -p spegel-daemon`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};
use spegel_tests::cluster::{self, wait_attached};
use spegel_tests::eventually;
use spegel_tests::rig::spegel::{
    LogEvent, LogMark, MANIFEST_ACCEPT, Resources, Spegel, SpegelOptions,
};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, MIB, Node, Process, Rig, TestImage};

/// How long a node may take to find content a peer advertised.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// The throttle on peers a large layer streams from: ~5 s for [`BULKY_LAYER`], so a fault
/// lands mid-blob with seconds to spare, yet far above `--peer-min-rate`.
const THROTTLE_BYTES_PER_SECOND: u64 = 6 * MIB;
/// The large layer streamed from peers.
const BULKY_LAYER: u64 = 32 * MIB;
/// Bytes the fetching daemon must have received before the fault strikes.
const FAULT_AFTER: u64 = 4 * MIB;
/// How many times a pull is retried after a failed one, as kubelet would (with backoff).
const PULL_RETRIES: usize = 3;
/// How long the daemon's open fds and RSS may take to settle after a fault.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);
/// Loose bounds over the baseline: fds (pooled connections, a re-dialled peer) and RSS
/// (allocator slack after a 32 MiB verified-whole peer blob).
const EXTRA_FDS: usize = 16;
const EXTRA_RSS: u64 = 96 * MIB;
/// The daemon's interception listener (its default `--intercept-port`).
const INTERCEPT_PORT: u16 = 15001;
/// How long a malformed client waits for the far side to close before giving up itself.
const CLIENT_WAIT_SECS: u64 = 12;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// === The suite ===

/// A rig with transparent spegel on every node, mirroring the registry's TLS listener.
struct Suite {
    rig: Rig,
    daemons: Vec<Spegel>,
}

impl Suite {
    async fn start(name: &str, nodes: usize, images: Vec<ImageSpec>) -> Self {
        let started = Instant::now();
        let mut builder = Rig::builder().nodes(nodes);
        for image in images {
            builder = builder.image(image);
        }
        let rig = builder.start().await.expect("rig starts");
        let registry = rig.registry();
        let mirrored = vec![
            registry.host(Endpoint::Tls),
            registry.ip_host(Endpoint::Tls),
        ];
        let cluster = cluster::transparent_for(&rig, &mirrored, SpegelOptions::transparent())
            .await
            .unwrap_or_else(|error| panic!("transparent set-up: {error:#}"));
        eprintln!(
            "{name}: rig {} ({}) intercepting after {:?}",
            rig.prefix(),
            rig.subnet(),
            started.elapsed()
        );
        Self {
            rig,
            daemons: cluster.daemons,
        }
    }

    fn daemon(&self, index: usize) -> &Spegel {
        &self.daemons[index]
    }

    fn image(&self, name: &str) -> TestImage {
        self.rig
            .image(name)
            .unwrap_or_else(|| panic!("{name} pushed"))
    }

    /// Node `index` pulls `image` by tag over TLS (through its daemon), successfully.
    async fn pull(&self, index: usize, image: &TestImage) {
        let pulled = self
            .rig
            .node(index)
            .cri_pull(&image.reference(Endpoint::Tls))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{} pulls {}: {error:#}",
                    self.rig.node(index).name(),
                    image.name
                )
            });
        assert_eq!(pulled, image.config().digest);
    }

    /// Makes `holders` pull `image` and restarts their daemons serving peers throttled.
    async fn throttled_holders(&self, holders: &[usize], image: &TestImage) {
        for &index in holders {
            self.pull(index, image).await;
        }
        for &index in holders {
            let daemon = self.daemon(index);
            daemon.set_peer_throttle(Some(THROTTLE_BYTES_PER_SECOND));
            let mark = daemon.log_mark();
            daemon.restart().await.expect("a holder restarts throttled");
            wait_attached(daemon, mark).await.expect("re-attached");
        }
    }

    /// Prints what is worth seeing when a scenario fails.
    fn dump_logs(&self) {
        let mut processes: Vec<Process> =
            self.daemons.iter().map(|d| d.process().clone()).collect();
        processes.extend(self.rig.nodes().iter().map(|n| n.containerd().clone()));
        for process in processes {
            eprintln!(
                "===== {} (running: {}) =====\n{}",
                process.name(),
                process.is_running(),
                process.log_tail(60)
            );
        }
    }

    /// Every daemon is alive and logged no error; then teardown.
    async fn finish(self, name: &str, started: Instant) {
        for daemon in &self.daemons {
            assert!(
                daemon.is_running(),
                "{}'s daemon is not running",
                daemon.node_name()
            );
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
        eprintln!("{name}: passed in {:?}", started.elapsed());
        self.rig.shutdown().await.expect("clean teardown");
    }
}

/// Runs `scenario` on `suite`, dumping the logs if it panics.
async fn run<F: Future<Output = ()>>(suite: &Suite, scenario: F) {
    use futures::FutureExt as _;
    if let Err(panic) = std::panic::AssertUnwindSafe(scenario).catch_unwind().await {
        suite.dump_logs();
        std::panic::resume_unwind(panic);
    }
}

// === Helpers ===

/// Waits until `daemon` (asked as containerd asks, so it looks peers up) finds every pulled
/// blob of `image`.
async fn wait_discoverable(daemon: &Spegel, image: &TestImage) {
    let started = Instant::now();
    // As containerd asks a mirror: with the registry in `?ns=` (public on the rig).
    let reference = image.reference(Endpoint::Tls);
    let registry = reference
        .split('/')
        .next()
        .expect("a reference names its registry");
    for blob in image.pulled_blobs() {
        let path = format!(
            "/v2/{}/blobs/{}?ns={registry}",
            image.repository, blob.digest
        );
        eventually(
            &format!("{} finds {}", daemon.node_name(), blob.digest),
            DISCOVERY_TIMEOUT,
            || async {
                let response = daemon
                    .request("HEAD", &path, &[("Accept", MANIFEST_ACCEPT)])
                    .await?;
                Ok((response.status == 200).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
    }
    eprintln!(
        "{} finds {} after {:?}",
        daemon.node_name(),
        image.name,
        started.elapsed()
    );
}

/// containerd on `node` holds every pulled blob of `image` with the right bytes.
async fn assert_holds(node: &Node, image: &TestImage) {
    for blob in image.pulled_blobs() {
        let bytes = node
            .read_blob(&blob.digest)
            .await
            .unwrap_or_else(|error| panic!("{} reading {}: {error:#}", node.name(), blob.digest));
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

/// Every file in `node`'s content store hashes to its name: containerd committed no bad byte.
fn assert_store_sound(node: &Node) {
    let dir = node.content_dir().join("blobs").join("sha256");
    let mut count = 0;
    for entry in
        std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
    {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(&path).expect("read a content file");
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

/// Pulls `image` on `node` once; if that fails, retries up to [`PULL_RETRIES`] times with a
/// short backoff, as kubelet does. Returns the first attempt's error, if any.
async fn pull_with_retries(
    node: &Node,
    image: &TestImage,
    first: Result<String>,
) -> Option<String> {
    let reference = image.reference(Endpoint::Tls);
    let first_error = match first {
        Ok(pulled) => {
            assert_eq!(pulled, image.config().digest);
            return None;
        }
        Err(error) => format!("{error:#}"),
    };
    eprintln!("{}: first pull failed: {first_error}", node.name());
    let mut last = first_error.clone();
    for attempt in 1..=PULL_RETRIES {
        tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
        match node.cri_pull(&reference).await {
            Ok(pulled) => {
                assert_eq!(pulled, image.config().digest);
                eprintln!("{}: retry {attempt} succeeded", node.name());
                return Some(first_error);
            }
            Err(error) => {
                last = format!("{error:#}");
                eprintln!("{}: retry {attempt} failed: {last}", node.name());
            }
        }
    }
    panic!(
        "{}: the pull of {} kept failing: {last}",
        node.name(),
        image.name
    );
}

/// The first event after `mark` with `message` about `digest`.
fn event_for(daemon: &Spegel, mark: LogMark, message: &str, digest: &str) -> Option<LogEvent> {
    daemon
        .events_since(mark)
        .into_iter()
        .find(|event| event.message == message && event.str("digest") == Some(digest))
}

/// Waits until `fetcher` streams `digest` from a peer and has received [`FAULT_AFTER`] bytes
/// from peers since `bytes_before`; returns the peer's ID.
async fn wait_mid_blob(fetcher: &Spegel, mark: LogMark, digest: &str, bytes_before: f64) -> String {
    let streaming = eventually(
        "the layer streams from a peer",
        DISCOVERY_TIMEOUT,
        || async { Ok(event_for(fetcher, mark, "streaming blob from peer", digest)) },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    let peer = streaming
        .str("peer")
        .expect("a peer field on the streaming event")
        .to_owned();
    let received = eventually("the first MiBs arrive", DISCOVERY_TIMEOUT, || async {
        let bytes = fetcher
            .metrics()
            .await?
            .value("spegel_peer_bytes_total", &[])
            - bytes_before;
        Ok((bytes >= FAULT_AFTER as f64).then_some(bytes))
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    assert!(
        received < BULKY_LAYER as f64,
        "the whole layer arrived before the fault ({received} bytes): the throttle did not hold"
    );
    eprintln!(
        "{} received {:.1} MiB of the layer from {peer}",
        fetcher.node_name(),
        received / MIB as f64
    );
    peer
}

/// `daemon`'s peer-byte counter now.
async fn peer_bytes(daemon: &Spegel) -> f64 {
    daemon
        .metrics()
        .await
        .expect("metrics")
        .value("spegel_peer_bytes_total", &[])
}

/// `daemon`'s resources, printed.
fn baseline(daemon: &Spegel) -> Resources {
    let resources = daemon.resources().expect("daemon resources");
    eprintln!("{} baseline: {resources:?}", daemon.node_name());
    resources
}

/// Waits until `daemon`'s open fds and RSS are back near `baseline`.
async fn assert_back_to_baseline(daemon: &Spegel, baseline: &Resources) {
    let mut last = None;
    let settled = eventually(
        &format!("{}'s fds and RSS settle", daemon.node_name()),
        SETTLE_TIMEOUT,
        || {
            let now = daemon.resources();
            if let Ok(now) = &now {
                last = Some(*now);
            }
            async move {
                let now = now?;
                Ok(now.within(baseline, EXTRA_FDS, EXTRA_RSS).then_some(now))
            }
        },
    )
    .await;
    match settled {
        Ok(now) => eprintln!(
            "{} back near its baseline: {now:?} (baseline {baseline:?})",
            daemon.node_name()
        ),
        Err(error) => panic!("{error:#}; baseline {baseline:?}, last {last:?}"),
    }
}

// === containerd restarted during a pull ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn containerd_restarted_during_a_pull() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let name = "containerd_restarted_during_a_pull";
    let started = Instant::now();
    let images = vec![
        ImageSpec::new("bulky").layers([BULKY_LAYER]).seed(7201),
        ImageSpec::new("warm").layers([256 * KIB]).seed(7202),
        ImageSpec::new("after").layers([300 * KIB]).seed(7203),
    ];
    let suite = Suite::start(name, 3, images).await;
    run(&suite, scenario_containerd_restarted(&suite)).await;
    suite.finish(name, started).await;
}

/// A (`n1`) streams a layer from B (`n2`, throttled) when A's containerd restarts. C (`n3`)
/// later finds what A pulled after the restart.
async fn scenario_containerd_restarted(suite: &Suite) {
    let rig = &suite.rig;
    let (a, daemon) = (rig.node(0), suite.daemon(0));
    let bulky = suite.image("bulky");
    let layer = bulky.layers()[0].digest.clone();
    suite.throttled_holders(&[1], &bulky).await;
    suite.pull(0, &suite.image("warm")).await;
    wait_discoverable(daemon, &bulky).await;
    let base = baseline(daemon);
    let pid = daemon.process().pid().expect("daemon pid");
    let starts = daemon.log().matches("--- rig: starting").count();

    let mark = daemon.log_mark();
    let bytes_before = peer_bytes(daemon).await;
    let reference = bulky.reference(Endpoint::Tls);
    let pull = a.cri_pull(&reference);
    let fault = async {
        wait_mid_blob(daemon, mark, &layer, bytes_before).await;
        a.restart_containerd().await.expect("containerd restarts");
        eprintln!("A's containerd restarted mid-blob");
    };
    let (first, ()) = tokio::join!(pull, fault);
    let first_error = pull_with_retries(a, &bulky, first).await;
    eprintln!("first attempt: {first_error:?}");
    assert_holds(a, &bulky).await;
    assert_store_sound(a);

    // The same process, never restarted, and no crash loop.
    assert_eq!(
        daemon.process().pid(),
        Some(pid),
        "the daemon was restarted"
    );
    assert_eq!(
        daemon.log().matches("--- rig: starting").count(),
        starts,
        "the daemon was started again"
    );
    let stream_ends = daemon
        .events_since(mark)
        .iter()
        .filter(|event| event.message == "containerd event stream ended")
        .count();
    assert!(
        stream_ends <= 5,
        "the daemon lost containerd {stream_ends} times for one restart: {}",
        daemon.log_tail(40)
    );

    // Interception and the store work again: A pulls a new image through its daemon, and C
    // finds it through its peers (A advertised it: events or walks follow the new containerd).
    let after = suite.image("after");
    let mark = daemon.log_mark();
    suite.pull(0, &after).await;
    let served = daemon.served_since(mark).expect("served lines");
    for blob in after.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "A's daemon did not serve {} after containerd's restart: {served:#?}",
            blob.digest
        );
    }
    wait_discoverable(suite.daemon(2), &after).await;
    let local = daemon
        .request(
            "HEAD",
            &format!(
                "/v2/{}/blobs/{}",
                after.repository,
                after.layers()[0].digest
            ),
            &[("X-Spegel-Mirrored", "true")],
        )
        .await
        .expect("HEAD from the local store");
    assert_eq!(local.status, 200, "A's store does not serve what A pulled");
    let ready = daemon.get("/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200, "/readyz: {}", ready.text());
    assert_back_to_baseline(daemon, &base).await;
}

// === The daemon restarted during a pull ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn daemon_restarted_during_a_pull() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let name = "daemon_restarted_during_a_pull";
    let started = Instant::now();
    let images = vec![
        ImageSpec::new("bulky").layers([BULKY_LAYER]).seed(7211),
        ImageSpec::new("warm").layers([256 * KIB]).seed(7212),
        ImageSpec::new("after").layers([300 * KIB]).seed(7213),
    ];
    let suite = Suite::start(name, 2, images).await;
    run(&suite, scenario_daemon_restarted(&suite)).await;
    suite.finish(name, started).await;
}

/// A (`n1`) streams a layer from B (`n2`, throttled) when A's daemon is killed; it is started
/// again at once.
async fn scenario_daemon_restarted(suite: &Suite) {
    let rig = &suite.rig;
    let (a, daemon, holder) = (rig.node(0), suite.daemon(0), suite.daemon(1));
    let bulky = suite.image("bulky");
    let layer = bulky.layers()[0].digest.clone();
    suite.throttled_holders(&[1], &bulky).await;
    suite.pull(0, &suite.image("warm")).await;
    wait_discoverable(daemon, &bulky).await;
    let holder_base = baseline(holder);

    let mark = daemon.log_mark();
    let bytes_before = peer_bytes(daemon).await;
    let reference = bulky.reference(Endpoint::Tls);
    let pull = a.cri_pull(&reference);
    let fault = async {
        wait_mid_blob(daemon, mark, &layer, bytes_before).await;
        daemon.kill().await.expect("kill -9");
        let mark = daemon.log_mark();
        daemon.start().await.expect("the daemon starts again");
        wait_attached(daemon, mark)
            .await
            .expect("the new daemon attaches");
        eprintln!("A's daemon killed mid-blob and started again");
        mark
    };
    let (first, restarted) = tokio::join!(pull, fault);
    let first_error = pull_with_retries(a, &bulky, first).await;
    eprintln!("first attempt: {first_error:?}");
    assert_holds(a, &bulky).await;
    assert_store_sound(a);

    // The new daemon intercepts and serves the next pull.
    let after = suite.image("after");
    suite.pull(0, &after).await;
    let served = daemon.served_since(restarted).expect("served lines");
    for blob in after.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "the restarted daemon did not serve {}: {served:#?}",
            blob.digest
        );
        assert!(a.has_blob(&blob.digest).await.expect("content info"));
    }
    assert_back_to_baseline(holder, &holder_base).await;
}

// === A peer's link cut mid-blob ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peer_link_cut_mid_blob() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let name = "peer_link_cut_mid_blob";
    let started = Instant::now();
    let images = vec![
        ImageSpec::new("bulky").layers([BULKY_LAYER]).seed(7221),
        ImageSpec::new("warm").layers([256 * KIB]).seed(7222),
    ];
    let suite = Suite::start(name, 3, images).await;
    run(&suite, scenario_peer_link_cut(&suite)).await;
    suite.finish(name, started).await;
}

/// B (`n2`) and C (`n3`) hold a large image and serve it throttled; A (`n1`) pulls it. The link
/// of the one A streams from goes down mid-blob.
async fn scenario_peer_link_cut(suite: &Suite) {
    let rig = &suite.rig;
    let (a, daemon) = (rig.node(0), suite.daemon(0));
    let bulky = suite.image("bulky");
    let layer = bulky.layers()[0].digest.clone();
    suite.throttled_holders(&[1, 2], &bulky).await;
    let holder_ids: Vec<String> = [1, 2]
        .iter()
        .map(|&index| suite.daemon(index).peer_id().expect("peer id"))
        .collect();
    suite.pull(0, &suite.image("warm")).await;
    wait_discoverable(daemon, &bulky).await;
    let base = baseline(daemon);

    let before = rig.registry_log().await.expect("registry log");
    let mark = daemon.log_mark();
    let bytes_before = peer_bytes(daemon).await;
    let pull_started = Instant::now();
    let reference = bulky.reference(Endpoint::Tls);
    let pull = a.cri_pull(&reference);
    let fault = async {
        let peer = wait_mid_blob(daemon, mark, &layer, bytes_before).await;
        let position = holder_ids
            .iter()
            .position(|id| *id == peer)
            .unwrap_or_else(|| panic!("A streams from {peer}, not a holder {holder_ids:?}"));
        let victim = rig.node(1 + position);
        victim.link_down().await.expect("link down");
        eprintln!("{}'s link is down", victim.name());
        (peer, 1 + position)
    };
    let (pulled, (victim_id, victim)) = tokio::join!(pull, fault);
    eprintln!("A's pull ended after {:?}", pull_started.elapsed());
    rig.node(victim).link_up().await.expect("link up");
    let pulled = pulled.unwrap_or_else(|error| panic!("A's pull with a peer cut off: {error:#}"));
    assert_eq!(pulled, bulky.config().digest);
    assert_holds(a, &bulky).await;
    assert_store_sound(a);

    // The daemon noticed the dead peer mid-blob and finished from another source.
    let failed = event_for(daemon, mark, "peer transfer failed mid-stream", &layer)
        .expect("A's daemon logged the failed transfer");
    assert_eq!(failed.str("peer"), Some(victim_id.as_str()));
    let offset = failed.u64("offset").expect("offset");
    assert!(
        offset > 0 && offset < BULKY_LAYER,
        "failure at byte {offset}"
    );
    let resumed_from_peer = event_for(daemon, mark, "resumed from another peer", &layer);
    let log = rig
        .registry_log()
        .await
        .expect("registry log")
        .since(&before);
    let from_upstream = log.blob_gets_by(a.ip()).contains_key(layer.as_str());
    eprintln!(
        "resumed from a peer: {:?}; layer from the registry: {from_upstream}",
        resumed_from_peer
            .as_ref()
            .and_then(|event| event.str("peer"))
    );
    assert!(
        resumed_from_peer.is_some() || from_upstream,
        "the layer came from neither another peer nor upstream"
    );
    if let Some(event) = &resumed_from_peer {
        assert_ne!(event.str("peer"), Some(victim_id.as_str()));
    }
    assert_back_to_baseline(daemon, &base).await;
    assert!(suite.daemon(victim).is_running());
}

// === Malformed input on the interception port ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn malformed_input_on_the_interception_port() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let name = "malformed_input_on_the_interception_port";
    let started = Instant::now();
    let images = vec![ImageSpec::new("shared").layers([4 * MIB]).seed(7231)];
    let suite = Suite::start(name, 2, images).await;
    run(&suite, scenario_malformed_input(&suite)).await;
    suite.finish(name, started).await;
}

/// A TLS 1.2-style ClientHello with one cipher suite and only an SNI extension for `sni`.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    let be16 = |n: usize| u16::try_from(n).expect("fits in u16").to_be_bytes();
    let mut server_name = Vec::new();
    server_name.extend(be16(sni.len() + 3));
    server_name.push(0); // host_name
    server_name.extend(be16(sni.len()));
    server_name.extend(sni);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend(be16(server_name.len()));
    extensions.extend(server_name);
    let mut hello = vec![3, 3];
    hello.extend([0x5a; 32]); // random
    hello.push(0); // session id
    hello.extend(be16(2));
    hello.extend([0xc0, 0x2f]);
    hello.extend([1, 0]); // compression: null
    hello.extend(be16(extensions.len()));
    hello.extend(extensions);
    let length = u32::try_from(hello.len()).expect("fits").to_be_bytes();
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&length[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 3, 1];
    record.extend(be16(handshake.len()));
    record.extend(handshake);
    record
}

/// What one malformed client sends, and whether the far side must close it on its own.
struct Abuse {
    name: &'static str,
    bytes: Vec<u8>,
    /// Inside containerd's cgroup to the registry (redirected), or straight at the listener.
    redirected: bool,
    /// The connection must be closed by the far side before the client gives up.
    must_close: bool,
}

fn abuses(registry_host: &str) -> Vec<Abuse> {
    let valid = client_hello(registry_host.as_bytes());
    let mut hello_then_garbage = valid.clone();
    hello_then_garbage.extend([0x17, 3, 3, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let mut garbage_tls = vec![0x16, 3, 1, 0, 40];
    garbage_tls.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    let mut oversized_http = b"GET /v2/ HTTP/1.1\r\nHost: ".to_vec();
    oversized_http.extend(registry_host.as_bytes());
    oversized_http.extend(b"\r\nX-Pad: ");
    oversized_http.extend(std::iter::repeat_n(b'a', 20 * 1024));
    oversized_http.extend(b"\r\n\r\n");
    let garbage_http = b"GET /v2/ HTTP/1.1\r\nHo\x00st\x01: \xff\xfe\r\n\x07\x08\r\n\r\n".to_vec();
    let huge_sni = client_hello(&[b'a'; 16_000]);
    let giant_sni = client_hello(&[b'b'; 60_000]);
    let mut in_cgroup = vec![
        (
            "truncated ClientHello",
            valid[..valid.len() / 2].to_vec(),
            false,
        ),
        ("garbage TLS record", garbage_tls.clone(), false),
        ("ClientHello, 16,000-byte SNI", huge_sni, false),
        ("ClientHello, 60,000-byte SNI", giant_sni, false),
        ("oversized HTTP head", oversized_http.clone(), false),
        ("garbage HTTP head", garbage_http.clone(), false),
        ("nothing", Vec::new(), false),
        (
            "mirrored ClientHello, then garbage",
            hello_then_garbage,
            true,
        ),
    ];
    let mut abuses: Vec<Abuse> = in_cgroup
        .drain(..)
        .map(|(name, bytes, must_close)| Abuse {
            name,
            bytes,
            redirected: true,
            must_close,
        })
        .collect();
    // Straight at the listener there is no original destination: closed at once.
    for (name, bytes) in [
        (
            "direct: truncated ClientHello",
            valid[..valid.len() / 2].to_vec(),
        ),
        ("direct: garbage TLS record", garbage_tls),
        ("direct: oversized HTTP head", oversized_http),
        ("direct: garbage HTTP head", garbage_http),
        ("direct: nothing", Vec::new()),
    ] {
        abuses.push(Abuse {
            name,
            bytes,
            redirected: false,
            must_close: true,
        });
    }
    abuses
}

/// Connects from `node` (inside containerd's cgroup or not) to `ip:port` with bash's
/// `/dev/tcp`, sends `payload`, and reads until the far side closes or [`CLIENT_WAIT_SECS`]
/// pass. Returns whether the far side closed (or reset) the connection.
async fn abuse(node: &Node, in_cgroup: bool, ip: &str, port: u16, payload: &Path) -> Result<bool> {
    let script = r#"exec 3<>"/dev/tcp/$1/$2" || exit 3
cat "$3" >&3 2>/dev/null
timeout "$4" cat <&3 >/dev/null 2>&1
echo "read-exit=$?""#;
    let mut command = node.command(in_cgroup, "bash");
    command
        .args(["-c", script, "bash", ip])
        .arg(port.to_string())
        .arg(payload)
        .arg(CLIENT_WAIT_SECS.to_string());
    let output = tokio::time::timeout(Duration::from_secs(CLIENT_WAIT_SECS + 30), command.output())
        .await
        .context("the client hung")?
        .context("spawning the client")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let code = stdout
        .lines()
        .find_map(|line| line.strip_prefix("read-exit="))
        .with_context(|| {
            format!(
                "the client did not connect ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    // `timeout` exits 124 when it had to stop `cat`: nobody closed the connection.
    Ok(code.trim() != "124")
}

/// While A (`n1`) is abused on its interception port, B (`n2`) pulls from A.
async fn scenario_malformed_input(suite: &Suite) {
    let rig = &suite.rig;
    let (a, daemon) = (rig.node(0), suite.daemon(0));
    let shared = suite.image("shared");
    suite.pull(0, &shared).await;
    let daemon_b = suite.daemon(1);
    wait_discoverable(daemon_b, &shared).await;
    let base = baseline(daemon);
    let accepted_before = daemon
        .metrics()
        .await
        .expect("metrics")
        .sum("spegel_intercept_accepted_total");

    let registry = rig.registry();
    let registry_ip = registry.ip().to_string();
    let payload_dir: PathBuf = rig.scratch_dir().join("abuse");
    std::fs::create_dir_all(&payload_dir).expect("payload dir");
    let abuses = abuses(registry.hostname());
    let mut clients = Vec::new();
    for (index, abuse_case) in abuses.iter().enumerate() {
        let path = payload_dir.join(format!("{index}.bin"));
        std::fs::write(&path, &abuse_case.bytes).expect("write a payload");
        let (ip, port) = if abuse_case.redirected {
            (registry_ip.clone(), Endpoint::Tls.port())
        } else {
            ("127.0.0.1".to_owned(), INTERCEPT_PORT)
        };
        clients.push(async move {
            let started = Instant::now();
            let closed = abuse(a, abuse_case.redirected, &ip, port, &path).await;
            (abuse_case, closed, started.elapsed())
        });
    }
    let mark_b = daemon_b.log_mark();
    let pull = async {
        // Let the abuse start first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let pulled = rig.node(1).cri_pull(&shared.reference(Endpoint::Tls)).await;
        (pulled, started.elapsed())
    };
    let (outcomes, (pulled, pull_took)) = tokio::join!(futures::future::join_all(clients), pull);
    let pulled = pulled.unwrap_or_else(|error| panic!("B's pull during the abuse: {error:#}"));
    assert_eq!(pulled, shared.config().digest);
    eprintln!("B pulled from A during the abuse in {pull_took:?}");
    let served = daemon_b.served_since(mark_b).expect("served lines");
    for blob in shared.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
            "B did not get {} from its peer A: {served:#?}",
            blob.digest
        );
    }
    assert_holds(rig.node(1), &shared).await;

    for (abuse_case, closed, took) in outcomes {
        let closed = closed.unwrap_or_else(|error| panic!("{}: {error:#}", abuse_case.name));
        eprintln!(
            "{}: {} after {took:?}",
            abuse_case.name,
            if closed {
                "closed by the far side"
            } else {
                "still open when the client gave up"
            }
        );
        if abuse_case.must_close {
            assert!(closed, "{}: the daemon did not close it", abuse_case.name);
        }
    }
    assert!(
        daemon.is_running(),
        "A's daemon died: {}",
        daemon.log_tail(40)
    );
    let accepted = daemon
        .metrics()
        .await
        .expect("metrics")
        .sum("spegel_intercept_accepted_total");
    let redirected = abuses.iter().filter(|abuse| abuse.redirected).count() as f64;
    assert!(
        accepted >= accepted_before + redirected,
        "not every abusive connection was intercepted: {accepted_before} → {accepted}"
    );
    let ready = daemon.get("/readyz").await.expect("readyz");
    assert_eq!(ready.status, 200);
    assert_back_to_baseline(daemon, &base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn wedged_listener_detaches_then_reattaches() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let name = "wedged_listener_detaches_then_reattaches";
    let started = Instant::now();
    let images = vec![
        ImageSpec::new("while-wedged").layers([2 * MIB]).seed(7251),
        ImageSpec::new("after-wedge").layers([2 * MIB]).seed(7252),
    ];
    let suite = Suite::start(name, 1, images).await;
    run(&suite, scenario_wedged(&suite)).await;
    suite.finish(name, started).await;
}

/// `daemon`'s eBPF redirect is attached (1) or not (0), and how often it was detached for a wedge.
async fn redirect_state(daemon: &Spegel) -> Result<(f64, f64, f64)> {
    let metrics = daemon.metrics().await?;
    Ok((
        metrics.sum("spegel_intercept_attached"),
        metrics.sum("spegel_intercept_wedges_total"),
        metrics.sum("spegel_intercept_accepted_total"),
    ))
}

async fn scenario_wedged(suite: &Suite) {
    let daemon = suite.daemon(0);
    let wedge = suite.rig.scratch_dir().join("wedge-intercept");
    daemon.set_intercept_wedge_file(Some(&wedge));
    daemon
        .process()
        .set_env("SPEGEL_INTERCEPT_WEDGE_TIMEOUT", "2s");
    daemon
        .process()
        .set_env("SPEGEL_INTERCEPT_RECOVER_AFTER", "3s");
    let mark = daemon.log_mark();
    daemon
        .restart()
        .await
        .expect("restart with the wedge switch");
    wait_attached(daemon, mark).await.expect("attached");
    let base = baseline(daemon);
    let (attached, wedges, _) = redirect_state(daemon).await.expect("metrics");
    assert_eq!((attached, wedges), (1.0, 0.0));

    // Wedged: the health watch notices and detaches.
    std::fs::write(&wedge, b"").expect("engage the wedge");
    let wedged_at = Instant::now();
    let accepted_wedged = eventually("the redirect detached", Duration::from_secs(30), || async {
        let (attached, wedges, accepted) = redirect_state(daemon).await?;
        Ok((attached == 0.0 && wedges >= 1.0).then_some(accepted))
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    eprintln!("detached {:?} after the wedge", wedged_at.elapsed());

    // containerd goes straight to the registry meanwhile: the pull works, spegel sees none of it.
    let during = suite.image("while-wedged");
    let pull_started = Instant::now();
    suite.pull(0, &during).await;
    eprintln!("pulled while wedged in {:?}", pull_started.elapsed());
    assert_holds(suite.rig.node(0), &during).await;
    let (attached, _, accepted) = redirect_state(daemon).await.expect("metrics");
    assert_eq!(attached, 0.0, "re-attached while still wedged");
    assert_eq!(
        accepted, accepted_wedged,
        "a connection was redirected to the wedged listener"
    );

    // Healthy again: re-attached after --intercept-recover-after, and spegel serves again.
    std::fs::remove_file(&wedge).expect("release the wedge");
    eventually(
        "the redirect re-attached",
        Duration::from_secs(30),
        || async {
            let (attached, _, _) = redirect_state(daemon).await?;
            Ok((attached == 1.0).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    let after = suite.image("after-wedge");
    let mark = daemon.log_mark();
    suite.pull(0, &after).await;
    assert_holds(suite.rig.node(0), &after).await;
    let served = daemon.served_since(mark).expect("served lines");
    for blob in after.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "spegel did not serve {} after the wedge: {served:#?}",
            blob.digest
        );
    }
    assert!(
        daemon.events().iter().any(|event| event.level == "WARN"
            && event.message.starts_with("interception listener wedged")),
        "the wedge was not logged"
    );
    assert_back_to_baseline(daemon, &base).await;
}
