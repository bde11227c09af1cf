//! End-to-end acceptance of the address policy (issue 9, "Address policy") on the real rig: a
//! peer cannot make a node send requests to that node's own loopback or to a link-local address
//! by announcing it as its registry, and an upstream cannot by redirecting there.
//!
//! One scenario per test, each on its own rig (A is `n1`, B `n2`):
//!
//! - `peer_announcing_loopback_is_ignored`: A's daemon announces `registry=127.0.0.1:5000`
//!   (`--registry-advertise-addr`). B, which finds A's content through the DHT, never connects
//!   to its own `127.0.0.1:5000` (a trap listens there) and fetches from A at the IP it reaches
//!   A at instead; B counts the refusal (`spegel_router_registry_addrs_refused_total`) and warns
//!   once for A, not once per Identify.
//! - `peer_announcing_link_local_is_ignored`: the same with `169.254.77.1:5000`, an address B
//!   has (on its `lo`, with a trap on it).
//! - `upstream_redirect_to_loopback_is_refused`: transparent spegel on A; the fault proxy in
//!   front of the registry answers every blob request with `307` to
//!   `https://127.0.0.1:<port>/…`, where a trap listens in A's namespace. A's pull fails, with
//!   A's daemon logging the refusal and the trap never connected to (not by the daemon, nor by
//!   containerd, which never sees the redirect); once the proxy passes blobs through again,
//!   the same pull succeeds.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_addresses -- --test-threads=1`
//! as root, after `SPEGEL_E2E=1 cargo build --all-targets`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use spegel_tests::cluster;
use spegel_tests::eventually;
use spegel_tests::rig::faultproxy::{Fault, FaultProxy};
use spegel_tests::rig::spegel::{DEFAULT_REGISTRY_PORT, LogEvent, Spegel, SpegelOptions};
use spegel_tests::rig::trap::Trap;
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Node, Rig, TestImage};

/// How long B may take to find A's content (DHT provide + lookup).
const FIND_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);
/// The message B's daemon warns with when it refuses a peer's announced registry address.
const REFUSED_ANNOUNCEMENT: &str = "refusing the registry address a peer announced";
/// The message a daemon warns with when it refuses a redirect.
const REFUSED_REDIRECT: &str = "refusing an upstream redirect";
/// The link-local address of scenario (b), put on B's `lo`.
const LINK_LOCAL: &str = "169.254.77.1";
/// Where the redirect of scenario (c) points, on A's loopback.
const REDIRECT_PORT: u16 = 18_443;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Prints the daemons' and containerd's log tails if the test panics.
struct Diagnostics<'a> {
    rig: &'a Rig,
    daemons: Vec<&'a Spegel>,
}

impl Drop for Diagnostics<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peer_announcing_loopback_is_ignored() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    scenario_announced(IpAddr::from([127, 0, 0, 1])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peer_announcing_link_local_is_ignored() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    scenario_announced(LINK_LOCAL.parse().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn upstream_redirect_to_loopback_is_refused() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    scenario_redirect().await;
}

/// A holds the small image and its daemon announces its registry at `announced`:5000; B finds
/// A's content through the DHT and gets it from A's real address, never from `announced` on
/// B itself.
async fn scenario_announced(announced: IpAddr) {
    let started = Instant::now();
    let rig = Rig::builder().nodes(2).start().await.expect("rig starts");
    let (a, b) = (rig.node(0), rig.node(1));
    let image = rig.images().small.clone();
    let pulled = pull(a, &image.reference(Endpoint::Plain)).await;
    assert_eq!(pulled, image.config().digest);

    if !announced.is_loopback() {
        b.exec(
            "ip",
            ["addr", "add", &format!("{announced}/32"), "dev", "lo"],
        )
        .await
        .expect("the link-local address is added to B's lo");
    }
    let announced = SocketAddr::new(announced, DEFAULT_REGISTRY_PORT);
    let trap = Trap::start(b, announced)
        .await
        .expect("the trap listens on B");

    let daemon_a = rig
        .start_spegel(
            0,
            SpegelOptions::mirror().arg(format!("--registry-advertise-addr={announced}")),
        )
        .await
        .expect("A's daemon starts");
    let daemon_b = rig
        .start_spegel(1, SpegelOptions::mirror().bootstrap_nodes([0]))
        .await
        .expect("B's daemon starts");
    let diagnostics = Diagnostics {
        rig: &rig,
        daemons: vec![&daemon_a, &daemon_b],
    };

    // B finds every blob of A's through its peers (HEAD without `X-Spegel-Mirrored`).
    match wait_found(&daemon_b, &image).await {
        Ok(after) => eprintln!("B finds A's content after {after:?}"),
        Err(error) => panic!(
            "{error:#}; B connected {} time(s) to {announced} on itself",
            trap.connections()
        ),
    }
    let mark = daemon_b.log_mark();
    for blob in image.pulled_blobs() {
        let path = blob_path(&image, &blob.digest);
        let response = daemon_b.get(&path).await.expect("GET on B");
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        assert_eq!(sha256(&response.body), blob.digest);
    }
    let served = daemon_b.served_since(mark).expect("served lines parse");
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
            "B did not get {} from a peer: {served:#?}",
            blob.digest
        );
    }
    let served_by_a = daemon_a.served().expect("served lines parse");
    assert!(
        served_by_a
            .iter()
            .any(|s| s.peer_request && s.is_blob_get() && s.source == "local"),
        "A never served B: {served_by_a:#?}"
    );

    assert_eq!(
        trap.connections(),
        0,
        "B connected to the address A announced ({announced}) on itself"
    );
    let metrics = daemon_b.metrics().await.expect("B's metrics");
    let refused = metrics.value("spegel_router_registry_addrs_refused_total", &[]);
    assert!(refused >= 1.0, "B counted no refusal: {:?}", metrics.all());
    let announced_ip = announced.ip().to_string();
    let warnings: Vec<LogEvent> = daemon_b
        .events()
        .into_iter()
        .filter(|event| event.message == REFUSED_ANNOUNCEMENT && event.level == "WARN")
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "B warns once for A (refusals counted: {refused}): {warnings:#?}"
    );
    assert_eq!(
        warnings[0].str("announced"),
        Some(announced_ip.as_str()),
        "{warnings:#?}"
    );
    assert_eq!(
        warnings[0].str("peer_id"),
        daemon_a.peer_id().as_deref(),
        "{warnings:#?}"
    );

    drop(diagnostics);
    eprintln!("passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

/// Transparent spegel on A behind the fault proxy, which redirects every blob to a trap on A's
/// loopback.
async fn scenario_redirect() {
    let started = Instant::now();
    let rig = Rig::builder()
        .nodes(1)
        .image(redirected())
        .start()
        .await
        .expect("rig starts");
    let a = rig.node(0);
    let image = rig.image("redirected").expect("redirected pushed");
    let proxy = FaultProxy::start(&rig).await.expect("fault proxy starts");
    let mirrored = vec![proxy.host(), proxy.ip_host()];
    let options = SpegelOptions::transparent().intercept_ports([FaultProxy::PORT]);
    let cluster = cluster::transparent_for(&rig, &mirrored, options)
        .await
        .expect("transparent set-up");
    let daemon = &cluster.daemons[0];
    let diagnostics = Diagnostics {
        rig: &rig,
        daemons: vec![daemon],
    };
    let trap = Trap::start(a, SocketAddr::from(([127, 0, 0, 1], REDIRECT_PORT)))
        .await
        .expect("the trap listens on A");

    let to = format!("https://{}", trap.addr());
    proxy.set_fault(Fault::RedirectBlobs { to: to.clone() });
    let mark = daemon.log_mark();
    let reference = proxy.reference(&image);
    let outcome = tokio::time::timeout(PULL_TIMEOUT, a.cri_pull(&reference))
        .await
        .expect("the pull ends in time");
    let Err(error) = outcome else {
        panic!("the pull succeeded although every blob redirects to {to}: {outcome:?}");
    };
    eprintln!("A's pull failed as it should: {error:#}");
    let redirected: Vec<_> = proxy
        .requests_from(a.ip())
        .into_iter()
        .filter(|r| r.status == 307)
        .collect();
    assert!(
        !redirected.is_empty(),
        "the proxy never redirected A: {:#?}",
        proxy.requests()
    );
    assert_eq!(
        trap.connections(),
        0,
        "something on A followed the redirect to {to}"
    );
    let refusals: Vec<LogEvent> = daemon
        .events_since(mark)
        .into_iter()
        .filter(|event| event.message == REFUSED_REDIRECT)
        .collect();
    assert!(
        !refusals.is_empty(),
        "A's daemon never logged the refusal: {}",
        daemon.log_tail(40)
    );
    eprintln!("A's daemon refused: {:?}", refusals[0]);
    assert_eq!(refusals[0].level, "WARN", "{refusals:#?}");
    assert_eq!(refusals[0].str("reason"), Some("loopback address"));
    assert!(daemon.is_running(), "A's daemon died");

    // The refusal was the only thing wrong: with blobs passed through, the same pull works.
    proxy.set_fault(Fault::PassThrough);
    let pulled = pull(a, &reference).await;
    assert_eq!(pulled, image.config().digest);
    for blob in image.pulled_blobs() {
        let bytes = a.read_blob(&blob.digest).await.expect("blob readable");
        assert_eq!(sha256(&bytes), blob.digest);
    }
    assert_eq!(trap.connections(), 0);

    drop(diagnostics);
    drop(proxy);
    eprintln!("passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

/// The image of the redirect scenario (only upstream has it).
fn redirected() -> ImageSpec {
    ImageSpec::new("redirected")
        .layers([64 * KIB, 200 * KIB])
        .seed(7301)
}

async fn pull(node: &Node, reference: &str) -> String {
    tokio::time::timeout(PULL_TIMEOUT, node.cri_pull(reference))
        .await
        .unwrap_or_else(|_| panic!("{} pulling {reference} timed out", node.name()))
        .unwrap_or_else(|error| panic!("{} pulls {reference}: {error:#}", node.name()))
}

/// Waits until `daemon` answers 200 to a HEAD of every pulled blob of `image` (from its peers);
/// how long that took.
/// A blob's registry API path as containerd asks a mirror for it: `?ns=` names the (public)
/// registry the image came from, so peers may share it.
fn blob_path(image: &TestImage, digest: &str) -> String {
    let reference = image.reference(Endpoint::Plain);
    let registry = reference
        .split('/')
        .next()
        .expect("a reference names its registry");
    format!(
        "/v2/{}/blobs/{digest}?{}",
        image.repository,
        cluster::ns_query(registry)
    )
}

async fn wait_found(daemon: &Spegel, image: &TestImage) -> anyhow::Result<Duration> {
    let started = Instant::now();
    eventually(
        &format!(
            "{} finds {} through its peers",
            daemon.node_name(),
            image.name
        ),
        FIND_TIMEOUT,
        || async {
            for blob in image.pulled_blobs() {
                let path = blob_path(image, &blob.digest);
                if daemon.request("HEAD", &path, &[]).await?.status != 200 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    Ok(started.elapsed())
}
