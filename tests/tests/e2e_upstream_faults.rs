//! End-to-end fault matrix for a misbehaving upstream: the rig's real registry behind a
//! [`FaultProxy`] (`registry.<prefix>.test:6443`, TLS with the rig CA), transparent spegel on
//! every node (real eBPF, real containerd pulling over CRI), and the proxy switched to a fault
//! while a node pulls.
//!
//! Each scenario is its own test on its own 3-node rig, so a failure hides no other:
//!
//! - `tag_from_peers_while_upstream_answers_503` / `…_429`: A pulls through a healthy upstream;
//!   then every upstream request is answered 503 (429) with `Retry-After: 30`. B pulls **by tag**:
//!   its daemon asks upstream once, falls back to A, and — backing off — does not ask upstream
//!   again for the next tag pull.
//! - `digest_from_peers_while_upstream_answers_503` / `…_429`: the same, **by digest**: B's pull
//!   never reaches upstream at all.
//! - `cold_pull_survives_a_stall_mid_blob` / `…_a_reset_mid_blob`: a pull nobody else can serve,
//!   where upstream stalls (resets the connection) after 1 MiB of the layer: the daemon resumes
//!   with `Range` and the pull succeeds with the right bytes.
//!
//! Every scenario then checks: the content in the puller's containerd hashes to its digests,
//! every daemon is still running, and its open fds and RSS come back near a baseline taken
//! before the fault (fds ≤ baseline + 8, RSS ≤ baseline + 32 MiB, within a minute), and no
//! daemon logged an error.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_upstream_faults` as root, after
//! `cargo build -p spegel-daemon`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use spegel_tests::cluster::{self, wait_discoverable};
use spegel_tests::rig::faultproxy::{Fault, FaultProxy};
use spegel_tests::rig::spegel::{Spegel, SpegelOptions};
use spegel_tests::rig::{ImageSpec, KIB, MIB, Node, Rig, TestImage};

/// How long a node may take to find content a peer advertised.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long daemons may take to give back fds and memory after a scenario.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);
/// Slack over the baseline.
const FD_SLACK: usize = 8;
const RSS_SLACK_KIB: u64 = 32 * 1024;
/// The daemons' `--upstream-idle-timeout`: how soon a stalled body is resumed.
const IDLE_TIMEOUT: &str = "2s";
/// Where body faults cut a blob.
const CUT_AFTER: u64 = MIB;

struct Suite {
    rig: Rig,
    proxy: FaultProxy,
    daemons: Vec<Spegel>,
}

impl Suite {
    fn daemon(&self, index: usize) -> &Spegel {
        &self.daemons[index]
    }

    fn dump_logs(&self) {
        eprintln!("===== fault proxy: {:?}", self.proxy);
        for request in self.proxy.requests() {
            eprintln!("  {request:?}");
        }
        for daemon in &self.daemons {
            eprintln!(
                "===== spegel on {} (running: {}) =====\n{}",
                daemon.node_name(),
                daemon.is_running(),
                daemon.log_tail(80)
            );
        }
        for node in self.rig.nodes() {
            eprintln!(
                "===== containerd on {} =====\n{}",
                node.name(),
                node.containerd().log_tail(30)
            );
        }
    }
}

macro_rules! e2e_test {
    ($name:ident, $images:expr, $scenario:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[cfg_attr(
            not(spegel_e2e),
            ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
        )]
        async fn $name() {
            spegel_tests::require_e2e!();
            let _serial = spegel_tests::serial().await;
            run_scenario(stringify!($name), $images, |suite: &Suite| {
                $scenario(suite).boxed()
            })
            .await;
        }
    };
}

e2e_test!(
    tag_from_peers_while_upstream_answers_503,
    [shared()],
    |suite| { scenario_from_peers(suite, 503, By::Tag) }
);
e2e_test!(
    digest_from_peers_while_upstream_answers_503,
    [shared()],
    |suite| { scenario_from_peers(suite, 503, By::Digest) }
);
e2e_test!(
    tag_from_peers_while_upstream_answers_429,
    [shared()],
    |suite| { scenario_from_peers(suite, 429, By::Tag) }
);
e2e_test!(
    digest_from_peers_while_upstream_answers_429,
    [shared()],
    |suite| { scenario_from_peers(suite, 429, By::Digest) }
);
e2e_test!(cold_pull_survives_a_stall_mid_blob, [cold()], |suite| {
    scenario_cold_pull(suite, false)
});
e2e_test!(cold_pull_survives_a_reset_mid_blob, [cold()], |suite| {
    scenario_cold_pull(suite, true)
});

/// An image A pulls and B then gets from A.
fn shared() -> ImageSpec {
    ImageSpec::new("shared")
        .layers([64 * KIB, 900 * KIB])
        .seed(7201)
}

/// An image only upstream has, with a layer well past [`CUT_AFTER`].
fn cold() -> ImageSpec {
    ImageSpec::new("cold").layers([4 * MIB]).seed(7202)
}

/// Starts a 3-node rig with `images`, the fault proxy in front of its registry and transparent
/// spegel on every node mirroring the proxy's name and address; runs `scenario`, then checks
/// that no daemon logged an error. On failure, dumps the logs.
async fn run_scenario<const N: usize>(
    name: &str,
    images: [ImageSpec; N],
    scenario: impl for<'a> FnOnce(&'a Suite) -> BoxFuture<'a, ()>,
) {
    let started = Instant::now();
    let mut builder = Rig::builder().nodes(3);
    for image in images {
        builder = builder.image(image);
    }
    let rig = builder.start().await.expect("rig starts");
    eprintln!(
        "{name}: rig {} ({}) up in {:?}",
        rig.prefix(),
        rig.subnet(),
        started.elapsed()
    );
    let proxy = FaultProxy::start(&rig).await.expect("fault proxy starts");
    let mirrored = vec![proxy.host(), proxy.ip_host()];
    let options = SpegelOptions::transparent()
        .intercept_ports([FaultProxy::PORT])
        .arg(format!("--upstream-idle-timeout={IDLE_TIMEOUT}"));
    let cluster = cluster::transparent_for(&rig, &mirrored, options)
        .await
        .expect("transparent set-up");
    let suite = Suite {
        rig,
        proxy,
        daemons: cluster.daemons,
    };
    eprintln!("{name}: daemons intercepting after {:?}", started.elapsed());

    let outcome = std::panic::AssertUnwindSafe(async {
        scenario(&suite).await;
        no_daemon_errors(&suite);
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        suite.dump_logs();
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed in {:?}", started.elapsed());
    let Suite { rig, proxy, .. } = suite;
    drop(proxy);
    rig.shutdown().await.expect("clean teardown");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    Tag,
    Digest,
}

/// A pulls `shared` through a healthy upstream; upstream turns to answering `status`; B pulls
/// `by` tag or digest from A.
async fn scenario_from_peers(suite: &Suite, status: u16, by: By) {
    let rig = &suite.rig;
    let proxy = &suite.proxy;
    let (a, b) = (rig.node(0), rig.node(1));
    let daemon_b = suite.daemon(1);
    let image = rig.image("shared").expect("shared pushed");

    pull(a, &proxy.reference(&image)).await;
    assert!(
        !proxy.requests_from(a.ip()).is_empty(),
        "A's pull went through the proxy"
    );
    // Only content: a tag is never resolved through peers while its registry accepts
    // connections (the proxy does), and A advertises the tag with its content.
    wait_discoverable(daemon_b, &image, None, DISCOVERY_TIMEOUT).await;
    let baseline = usages(suite);

    proxy.set_fault(Fault::Answer {
        status,
        retry_after: Some("30".to_owned()),
    });
    eprintln!("--- upstream answers {status}: B pulls by {by:?}");
    let mark = daemon_b.log_mark();
    let reference = match by {
        By::Tag => proxy.reference(&image),
        By::Digest => proxy.digest_reference(&image),
    };
    let pulled = pull(b, &reference).await;
    assert_eq!(pulled, image.config().digest);
    content_is_right(b, &image).await;

    let served = daemon_b.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
            "B did not get {} from a peer: {served:#?}",
            blob.digest
        );
    }
    let from_b = proxy.requests_from(b.ip());
    match by {
        By::Digest => assert!(
            from_b.is_empty(),
            "a pull by digest never needs upstream: {from_b:#?}"
        ),
        By::Tag => {
            assert_eq!(from_b.len(), 1, "one tag request upstream: {from_b:#?}");
            assert!(from_b[0].is_tag(&image.tag), "{from_b:#?}");
            assert_eq!(from_b[0].status, status);
            let fell_back = daemon_b.events_since(mark).into_iter().any(|event| {
                event.message.contains("tag answered in upstream's place")
                    && event.str("repository") == Some(image.repository.as_str())
                    && event
                        .str("why")
                        .is_some_and(|why| why.starts_with(&format!("upstream answered {status}")))
            });
            assert!(fell_back, "B's daemon never fell back for the tag");

            // Retry-After: 30 holds for the next pull: upstream is not asked again.
            let mark = daemon_b.log_mark();
            let pulled = pull(b, &proxy.reference(&image)).await;
            assert_eq!(pulled, image.config().digest);
            let from_b = proxy.requests_from(b.ip());
            assert_eq!(
                from_b.len(),
                1,
                "backing off: the second tag pull skips upstream: {from_b:#?}"
            );
            let skipped = daemon_b.events_since(mark).into_iter().any(|event| {
                event.message.contains("tag answered in upstream's place")
                    && event.str("why") == Some("upstream is backing off")
            });
            assert!(skipped, "B's daemon never said it skipped upstream");
        }
    }
    back_to_baseline(suite, &baseline).await;
}

/// A warms up with the small image; then upstream stalls (or resets) `cold`'s layer after
/// [`CUT_AFTER`] bytes, once, and A pulls `cold`, which nobody else has.
async fn scenario_cold_pull(suite: &Suite, reset: bool) {
    let rig = &suite.rig;
    let proxy = &suite.proxy;
    let a = rig.node(0);
    let daemon_a = suite.daemon(0);
    let image = rig.image("cold").expect("cold pushed");
    let layer = image.layers()[0].clone();
    assert!(layer.size > CUT_AFTER);

    pull(a, &proxy.reference(&rig.images().small)).await;
    let baseline = usages(suite);

    let fault = if reset {
        Fault::ResetBlobs {
            after: CUT_AFTER,
            times: 1,
        }
    } else {
        Fault::StallBlobs {
            after: CUT_AFTER,
            times: 1,
        }
    };
    proxy.set_fault(fault.clone());
    eprintln!("--- upstream {fault:?}: A pulls cold");
    let mark = daemon_a.log_mark();
    let started = Instant::now();
    let pulled = pull(a, &proxy.reference(&image)).await;
    eprintln!("A pulled cold in {:?}", started.elapsed());
    assert_eq!(pulled, image.config().digest);
    content_is_right(a, &image).await;

    let layer_requests: Vec<_> = proxy
        .requests_from(a.ip())
        .into_iter()
        .filter(|r| r.method == "GET" && r.is_blob(&layer.digest))
        .collect();
    assert!(
        layer_requests.iter().any(|r| r.fault.is_some()),
        "the fault was never applied: {layer_requests:#?}"
    );
    let resumed_from = format!("bytes={CUT_AFTER}-{}", layer.size - 1);
    assert!(
        layer_requests
            .iter()
            .any(|r| r.range.as_deref() == Some(resumed_from.as_str()) && r.status == 206),
        "the daemon never resumed with {resumed_from}: {layer_requests:#?}"
    );
    let resumed = daemon_a
        .events_since(mark)
        .into_iter()
        .any(|event| event.message.contains("resuming with Range"));
    assert!(resumed, "A's daemon never said it resumed");
    let served = daemon_a.served_since(mark).unwrap();
    assert!(
        served
            .iter()
            .any(|s| s.digest == layer.digest && s.is_blob_get() && s.source == "upstream"),
        "A did not get the layer from upstream: {served:#?}"
    );
    proxy.set_fault(Fault::PassThrough);
    back_to_baseline(suite, &baseline).await;
}

/// A CRI pull, bounded; returns the image ref (config digest).
async fn pull(node: &Node, reference: &str) -> String {
    tokio::time::timeout(PULL_TIMEOUT, node.cri_pull(reference))
        .await
        .unwrap_or_else(|_| panic!("{} pulling {reference} timed out", node.name()))
        .unwrap_or_else(|error| panic!("{} pulls {reference}: {error:#}", node.name()))
}

/// Every blob of `image` the node pulled is in its content store and hashes to its digest.
async fn content_is_right(node: &Node, image: &TestImage) {
    for blob in image.pulled_blobs() {
        let bytes = node
            .read_blob(&blob.digest)
            .await
            .unwrap_or_else(|error| panic!("{} reading {}: {error:#}", node.name(), blob.digest));
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        assert_eq!(digest, blob.digest, "{} holds corrupt content", node.name());
        assert_eq!(bytes.len() as u64, blob.size);
    }
}

/// A daemon's resident memory and open file descriptors.
#[derive(Clone, Copy, Debug)]
struct Usage {
    rss_kib: u64,
    fds: usize,
}

fn usage(daemon: &Spegel) -> Usage {
    assert!(daemon.is_running(), "{} is not running", daemon.node_name());
    let pid = daemon
        .process()
        .pid()
        .unwrap_or_else(|| panic!("{} has no pid", daemon.node_name()));
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(proc_dir.join("status"))
        .unwrap_or_else(|error| panic!("reading {}/status: {error}", proc_dir.display()));
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {}/status", proc_dir.display()));
    let fds = std::fs::read_dir(proc_dir.join("fd"))
        .unwrap_or_else(|error| panic!("listing {}/fd: {error}", proc_dir.display()))
        .count();
    Usage { rss_kib, fds }
}

fn usages(suite: &Suite) -> Vec<Usage> {
    let usages: Vec<Usage> = suite.daemons.iter().map(usage).collect();
    eprintln!("baseline: {usages:?}");
    usages
}

/// Every daemon is running, and within [`SETTLE_TIMEOUT`] its fds and RSS are back near
/// `baseline`.
async fn back_to_baseline(suite: &Suite, baseline: &[Usage]) {
    let started = Instant::now();
    for (daemon, base) in suite.daemons.iter().zip(baseline) {
        loop {
            let now = usage(daemon);
            if now.fds <= base.fds + FD_SLACK && now.rss_kib <= base.rss_kib + RSS_SLACK_KIB {
                eprintln!(
                    "{}: {now:?} (baseline {base:?}) after {:?}",
                    daemon.node_name(),
                    started.elapsed()
                );
                break;
            }
            assert!(
                started.elapsed() < SETTLE_TIMEOUT,
                "{} did not settle: {now:?}, baseline {base:?}",
                daemon.node_name()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// No daemon logged an error (warnings are shown, not judged).
fn no_daemon_errors(suite: &Suite) {
    for daemon in &suite.daemons {
        let events = daemon.events();
        for event in events.iter().filter(|e| e.level == "WARN") {
            eprintln!(
                "{} warning: {} {:?}",
                daemon.node_name(),
                event.message,
                event.fields
            );
        }
        let errors: Vec<_> = events.iter().filter(|e| e.level == "ERROR").collect();
        assert!(
            errors.is_empty(),
            "{} logged errors: {errors:#?}",
            daemon.node_name()
        );
    }
}
