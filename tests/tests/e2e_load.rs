//! End-to-end load and slow-client scenarios on a transparent cluster (real containerd, real
//! eBPF, real TLS, the real registry), each its own test on its own 3-node rig:
//!
//! - `many_connections_and_pulls`: 300 concurrent connections to node A's registry API (HEAD and
//!   GET of blobs and manifests, `/metrics`) while the three nodes pull 102 images at once: all
//!   succeed, and afterwards A's open file descriptors and RSS are back near their baseline (and
//!   the entry count of its eBPF maps (read with `bpftool`).
//! - `slowloris_does_not_delay_a_rollout`: nodes pull in turn, first without, then with slowloris
//!   connections (headers one byte every two seconds) on A's registry API and libp2p ports: the
//!   loaded pulls take at most about a second longer, and the daemon closes every slowloris
//!   connection by its timeouts.
//! - `slow_reader_is_cut_off`: a client GETs a large blob from A's registry API and reads a byte
//!   a second: other nodes' pulls are not delayed by more than about a second, A's RSS stays
//!   within a margin, and the write timeout closes the slow connection.
//! - `stuck_reader_on_the_interception_port_is_cut_off`: a client inside A's containerd cgroup
//!   (so its connection to the registry is redirected to A's interception port and TLS is
//!   terminated by A) GETs a large blob only node B holds, and stops reading: other nodes' pulls
//!   are not delayed, A's RSS stays within a margin, and `--intercept-write-timeout` closes the
//!   connection before the client has the whole blob.
//!
//! The test process reaches the daemons' registry API and libp2p ports over the rig's bridge (it
//! is the bridge's `.1`), so its connections come from one client address: the per-client
//! connection cap is raised for them. The interception port is reached as containerd reaches
//! it: by a process in the node's namespace and containerd's cgroup, connecting to the registry.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_load -- --test-threads=1` as
//! root, after `cargo build -p spegel-daemon`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel_tests::cluster;
use spegel_tests::rig::spegel::{Spegel, SpegelOptions};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, MIB, Node, Rig, TestImage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The daemons' write and header timeouts in these tests: short, so the tests need not wait.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How much longer a pull may take under load than without (loose: the "a second").
const LOADED_SLACK: Duration = Duration::from_secs(1);
/// RSS growth allowed over the baseline: the peer buffer budget (`--peer-buffer-max`, 32 MiB
/// here) plus a margin for allocator slack.
const RSS_MARGIN: u64 = 96 * MIB;
/// Open descriptors above the baseline still counted as "back to baseline" (pooled peer and
/// upstream connections, containerd's gRPC channel).
const FD_SLACK: usize = 24;

/// One scenario's rig with transparent spegel on every node.
struct Suite {
    rig: Rig,
    daemons: Vec<Spegel>,
    /// Per node: the CA bundle its containerd trusts (system roots, the node CA, the rig CA).
    bundles: Vec<PathBuf>,
}

impl Suite {
    fn dump_logs(&self) {
        for daemon in &self.daemons {
            eprintln!(
                "===== spegel on {} (running: {}) =====\n{}",
                daemon.node_name(),
                daemon.is_running(),
                daemon.log_tail(60)
            );
        }
    }

    /// `?ns=` naming the rig registry's TLS listener.
    fn ns(&self) -> String {
        format!("ns={}", self.rig.registry().host(Endpoint::Tls))
    }
}

async fn run_scenario(name: &str, scenario: impl for<'a> FnOnce(&'a Suite) -> BoxFuture<'a, ()>) {
    let started = Instant::now();
    let rig = Rig::builder().nodes(3).start().await.expect("rig starts");
    eprintln!("{name}: rig {} up in {:?}", rig.prefix(), started.elapsed());
    let registry = rig.registry();
    let mirrored = vec![
        registry.host(Endpoint::Tls),
        registry.ip_host(Endpoint::Tls),
    ];
    let timeout = format!("{}s", CLIENT_TIMEOUT.as_secs());
    let options = SpegelOptions::transparent().args([
        "--registry-write-timeout",
        &timeout,
        "--registry-header-timeout",
        &timeout,
        "--registry-max-connections-per-client",
        "512",
        "--intercept-write-timeout",
        &timeout,
        "--peer-buffer-max",
        "33554432",
    ]);
    let cluster = cluster::transparent_for(&rig, &mirrored, options)
        .await
        .expect("transparent set-up");
    let suite = Suite {
        rig,
        daemons: cluster.daemons,
        bundles: cluster.bundles,
    };
    let outcome = std::panic::AssertUnwindSafe(async {
        scenario(&suite).await;
        for daemon in &suite.daemons {
            assert!(daemon.is_running(), "{} died", daemon.node_name());
        }
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        suite.dump_logs();
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed in {:?}", started.elapsed());
    suite.rig.shutdown().await.expect("clean teardown");
}

// === The daemon's process ===

/// The daemon's resident memory in bytes and open descriptors.
fn usage(daemon: &Spegel) -> (u64, usize) {
    let pid = daemon.process().pid().expect("daemon running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    (rss_kib * 1024, fds)
}

/// Waits (up to a minute) for the daemon's descriptors to be back within [`FD_SLACK`] of `fds`;
/// its usage then.
async fn settled(daemon: &Spegel, fds: usize) -> (u64, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = usage(daemon);
        if now.1 <= fds + FD_SLACK || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Entries of every eBPF hash map (LRU or not) the daemon holds: the maps are found through
/// the daemon's descriptors (`/proc/<pid>/fdinfo`: `map_type`, `map_id`) and dumped with
/// `bpftool`. `None` when the daemon holds no such map or `bpftool` cannot dump one.
async fn bpf_map_entries(daemon: &Spegel) -> Option<usize> {
    /// `BPF_MAP_TYPE_HASH` and `BPF_MAP_TYPE_LRU_HASH`.
    const HASH_TYPES: [&str; 2] = ["1", "9"];
    let pid = daemon.process().pid()?;
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let Ok(info) = std::fs::read_to_string(entry.ok()?.path()) else {
            continue; // closed meanwhile
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
        };
        if let (Some(kind), Some(id)) = (field("map_type:"), field("map_id:"))
            && HASH_TYPES.contains(&kind.as_str())
        {
            ids.push(id);
        }
    }
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return None;
    }
    let mut entries = 0;
    for id in ids {
        let dump = tokio::process::Command::new("bpftool")
            .args(["--json", "map", "dump", "id", &id])
            .output()
            .await
            .ok()?;
        if !dump.status.success() {
            return None;
        }
        let dumped: serde_json::Value = serde_json::from_slice(&dump.stdout).ok()?;
        entries += dumped.as_array()?.len();
    }
    Some(entries)
}

/// Waits until `daemon`'s counter `metric` is above `before`, failing with `failure` after a
/// minute (twenty of the tests' client timeouts).
async fn counter_passes(daemon: &Spegel, metric: &str, before: f64, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.metrics().await.unwrap().sum(metric) <= before {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The router's TCP port, from its multiaddr.
fn router_addr(daemon: &Spegel) -> SocketAddr {
    let port = daemon
        .router_multiaddr()
        .rsplit('/')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("router port");
    SocketAddr::from((daemon.ip(), port))
}

// === Clients ===

/// A connection with a small receive buffer, so that not reading stalls the sender soon.
async fn connect_small(node: &Node, addr: SocketAddr) -> TcpStream {
    let socket = node.tcp_socket().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// One HTTP/1.1 request on a fresh connection (`connection: close`) from a process on `node`
/// (content is served to other nodes only over the members' transport): the status code and
/// the body's length.
async fn request(
    node: &Node,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, usize), String> {
    let socket = node.tcp_socket().map_err(|e| format!("socket: {e:#}"))?;
    let mut stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let head = format!("{method} {path} HTTP/1.1\r\nhost: spegel\r\nconnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within a minute".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line: {:?}", text.lines().next()))?;
    let body = text.find("\r\n\r\n").map_or(0, |at| answer.len() - at - 4);
    Ok((status, body))
}

/// Pulls `image` on node `index`; how long it took.
async fn timed_pull(suite: &Suite, index: usize, image: &TestImage) -> Duration {
    let started = Instant::now();
    let pulled = suite
        .rig
        .node(index)
        .cri_pull(&image.reference(Endpoint::Tls))
        .await
        .unwrap_or_else(|e| panic!("node {index} pulls {}: {e:#}", image.name));
    assert_eq!(pulled, image.config().digest);
    started.elapsed()
}

/// Pushes `count` small images named `<prefix>-<i>` (one 2 MiB layer each) and has node A
/// pull them, so that other nodes can get them from A.
async fn images_on_a(suite: &Suite, prefix: &str, count: usize, seed: u64) -> Vec<TestImage> {
    let mut images = Vec::new();
    for i in 0..count {
        let spec = ImageSpec::new(format!("{prefix}-{i}"))
            .layers([2 * MIB, 64 * KIB])
            .seed(seed + i as u64);
        let image = suite.rig.push_image(spec).await.expect("push");
        suite
            .rig
            .node(0)
            .cri_pull(&image.reference(Endpoint::Tls))
            .await
            .expect("A pulls");
        images.push(image);
    }
    images
}

/// Nodes B and C pull `images` in turn (a rollout), each pull timed.
async fn rollout(suite: &Suite, images: &[TestImage]) -> Vec<Duration> {
    let mut took = Vec::new();
    for (i, image) in images.iter().enumerate() {
        took.push(timed_pull(suite, 1 + i % 2, image).await);
    }
    took
}

fn slowest(durations: &[Duration]) -> Duration {
    durations.iter().copied().max().unwrap_or_default()
}

/// Loaded pulls took at most [`LOADED_SLACK`] (plus a quarter, for a busy CI machine) longer than
/// the slowest unloaded one.
fn assert_not_delayed(baseline: &[Duration], loaded: &[Duration]) {
    let bound = slowest(baseline) + slowest(baseline) / 4 + LOADED_SLACK;
    eprintln!("pulls without load {baseline:?}, with load {loaded:?} (bound {bound:?})");
    for took in loaded {
        assert!(*took <= bound, "a loaded pull took {took:?} > {bound:?}");
    }
}

// === Scenarios ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn many_connections_and_pulls() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("many_connections_and_pulls", |suite: &Suite| {
        scenario_many_connections_and_pulls(suite).boxed()
    })
    .await;
}

/// How many images each node pulls at once in [`scenario_many_connections_and_pulls`]: over
/// a hundred concurrent pulls across the three nodes.
const IMAGES_PER_NODE: usize = 34;

async fn scenario_many_connections_and_pulls(suite: &Suite) {
    let rig = &suite.rig;
    let a = &suite.daemons[0];
    let four = rig.images().four.clone();
    rig.node(0)
        .cri_pull(&four.reference(Endpoint::Tls))
        .await
        .expect("A pulls four");
    let mut images = Vec::new();
    for i in 0..IMAGES_PER_NODE {
        let spec = ImageSpec::new(format!("many-{i}"))
            .layers([256 * KIB, 32 * KIB])
            .seed(9100 + i as u64);
        images.push(rig.push_image(spec).await.expect("push"));
    }
    // Warm up, then the baseline.
    for _ in 0..3 {
        request(rig.node(0), a.registry_addr(), "GET", "/metrics")
            .await
            .unwrap();
    }
    let (rss_before, fds_before) = usage(a);
    let map_before = bpf_map_entries(a).await;
    eprintln!("A before: rss {rss_before} fds {fds_before} map entries {map_before:?}");

    let ns = suite.ns();
    // By digest: a tag asked outside interception is left to the registry while it answers.
    let manifest = format!("/v2/rig/four/manifests/{}?{ns}", four.digest());
    let blobs: Vec<String> = four
        .pulled_blobs()
        .iter()
        .map(|blob| format!("/v2/rig/four/blobs/{}?{ns}", blob.digest))
        .collect();
    let connections = (0..300).map(|i| {
        let (method, path) = match i % 5 {
            0 => ("GET", "/metrics".to_owned()),
            1 => ("HEAD", manifest.clone()),
            2 => ("GET", manifest.clone()),
            3 => ("HEAD", blobs[i % blobs.len()].clone()),
            _ => ("GET", blobs[i % blobs.len()].clone()),
        };
        let addr = a.registry_addr();
        async move {
            let answer = request(rig.node(0), addr, method, &path).await;
            (method, path, answer)
        }
    });
    let pulls = (0..3).flat_map(|node| {
        images.iter().map(move |image| async move {
            let result = rig
                .node(node)
                .cri_pull(&image.reference(Endpoint::Tls))
                .await;
            (
                node,
                image.name.clone(),
                result.map_err(|e| format!("{e:#}")),
            )
        })
    });
    let started = Instant::now();
    let (answers, pulled) = tokio::join!(
        futures::future::join_all(connections),
        futures::future::join_all(pulls)
    );
    eprintln!(
        "300 connections and {} pulls in {:?}",
        pulled.len(),
        started.elapsed()
    );
    for (method, path, answer) in answers {
        let (status, _) = answer.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(status, 200, "{method} {path}");
    }
    for (node, image, result) in pulled {
        result.unwrap_or_else(|e| panic!("node {node} pulls {image}: {e}"));
    }

    let (rss_after, fds_after) = settled(a, fds_before).await;
    eprintln!("A after: rss {rss_after} fds {fds_after}");
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "descriptors did not come back: {fds_before} → {fds_after}"
    );
    assert!(
        rss_after <= rss_before + RSS_MARGIN,
        "RSS grew: {rss_before} → {rss_after}"
    );
    match (map_before, bpf_map_entries(a).await) {
        (Some(before), Some(after)) => {
            eprintln!("eBPF map entries {before} → {after}");
            assert!(
                after <= before + 16,
                "eBPF map entries grew: {before} → {after}"
            );
        }
        _ => panic!(
            "cannot count the daemon's eBPF map entries: is bpftool installed? (cargo xtask prereqs installs it)"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn slowloris_does_not_delay_a_rollout() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("slowloris_does_not_delay_a_rollout", |suite: &Suite| {
        scenario_slowloris(suite).boxed()
    })
    .await;
}

/// Slowloris connections per port.
const SLOWLORIS_PER_PORT: usize = 100;

/// Sends `GET / HTTP/1.1\r\nx-a: …` one byte every two seconds until the server closes the
/// connection; whether it did within `within`.
async fn slowloris(addr: SocketAddr, within: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return true;
    };
    let deadline = Instant::now() + within;
    let bytes =
        b"GET / HTTP/1.1\r\nhost: spegel\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut buf = [0; 1024];
    for byte in bytes.iter().cycle() {
        if Instant::now() > deadline {
            return false;
        }
        if stream.write_all(&[*byte]).await.is_err() {
            return true;
        }
        // A closed connection reads as EOF (or an error); an answer (e.g. 408) then EOF too.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await
        {
            return true;
        }
    }
    false
}

async fn scenario_slowloris(suite: &Suite) {
    let a = &suite.daemons[0];
    let images = images_on_a(suite, "loris", 8, 9200).await;
    let baseline = rollout(suite, &images[..4]).await;

    let ports = [a.registry_addr(), router_addr(a)];
    let closed_within = Duration::from_secs(90);
    let loris: Vec<_> = ports
        .iter()
        .flat_map(|addr| {
            (0..SLOWLORIS_PER_PORT).map(move |_| tokio::spawn(slowloris(*addr, closed_within)))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rollout(suite, &images[4..]).await;
    assert_not_delayed(&baseline, &loaded);

    let mut open = 0;
    for task in loris {
        if !task.await.expect("slowloris task") {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "slowloris connections not closed within {closed_within:?}"
    );
    assert!(a.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn slow_reader_is_cut_off() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("slow_reader_is_cut_off", |suite: &Suite| {
        scenario_slow_reader(suite).boxed()
    })
    .await;
}

async fn scenario_slow_reader(suite: &Suite) {
    let a = &suite.daemons[0];
    let big = suite
        .rig
        .push_image(ImageSpec::new("big").layers([64 * MIB]).seed(9300))
        .await
        .expect("push big");
    suite
        .rig
        .node(0)
        .cri_pull(&big.reference(Endpoint::Tls))
        .await
        .expect("A pulls big");
    let images = images_on_a(suite, "slow", 8, 9310).await;
    let baseline = rollout(suite, &images[..4]).await;
    let (rss_before, _) = usage(a);
    let timeouts_before = a
        .metrics()
        .await
        .unwrap()
        .sum("spegel_registry_write_timeouts_total");

    // GET the large layer and read one byte a second.
    let mut slow = connect_small(suite.rig.node(0), a.registry_addr()).await;
    let path = format!(
        "/v2/rig/big/blobs/{}?{}",
        big.layers()[0].digest,
        suite.ns()
    );
    slow.write_all(format!("GET {path} HTTP/1.1\r\nhost: spegel\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let started = Instant::now();
        let mut read = 0usize;
        let mut byte = [0; 1];
        loop {
            match slow.read(&mut byte).await {
                Ok(0) | Err(_) => return (read, started.elapsed()),
                Ok(n) => read += n,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rollout(suite, &images[4..]).await;
    assert_not_delayed(&baseline, &loaded);
    let (rss_during, _) = usage(a);
    eprintln!("A's RSS {rss_before} → {rss_during} with a slow reader");
    assert!(
        rss_during <= rss_before + RSS_MARGIN,
        "RSS grew past the budget: {rss_before} → {rss_during}"
    );

    // The write timeout closes the slow connection; the client may still be reading what its
    // kernel buffered, so the daemon's count tells.
    counter_passes(
        a,
        "spegel_registry_write_timeouts_total",
        timeouts_before,
        "the slow connection was not closed by the write timeout",
    )
    .await;
    reader.abort();
    if let Ok((read, after)) = reader.await {
        eprintln!("the slow reader got {read} bytes before the end, after {after:?}");
        assert!((read as u64) < 64 * MIB);
    }
    assert!(Path::new(&format!("/proc/{}", a.process().pid().unwrap())).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn stuck_reader_on_the_interception_port_is_cut_off() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "stuck_reader_on_the_interception_port_is_cut_off",
        |suite: &Suite| scenario_intercepted_stuck_reader(suite).boxed(),
    )
    .await;
}

/// Size of the blob the stuck client asks for: above `--peer-buffer-max`, so A receives it from
/// B into its disk spool and holds that share of the spool budget while it sends.
const STUCK_BLOB: u64 = 48 * MIB;

async fn scenario_intercepted_stuck_reader(suite: &Suite) {
    let a = &suite.daemons[0];
    let registry = suite.rig.registry();
    let big = suite
        .rig
        .push_image(ImageSpec::new("stuck").layers([STUCK_BLOB]).seed(9400))
        .await
        .expect("push stuck");
    // Only B holds it, so A serves it from a peer (verified in its spool before the first byte).
    suite
        .rig
        .node(1)
        .cri_pull(&big.reference(Endpoint::Tls))
        .await
        .expect("B pulls stuck");
    let images = images_on_a(suite, "stuck", 8, 9410).await;
    let baseline = rollout(suite, &images[..4]).await;
    let (rss_before, _) = usage(a);
    let timeouts_before = a
        .metrics()
        .await
        .unwrap()
        .sum("spegel_intercept_write_timeouts_total");

    // In A's namespace and containerd's cgroup, as containerd would: TLS to the registry (A's
    // node CA answers), a GET of the blob, then nothing is read (its stdout is a pipe nobody
    // drains, so s_client stops reading the socket once the pipe is full).
    let node = suite.rig.node(0);
    let host = registry.host(Endpoint::Tls);
    let mark = a.log_mark();
    let mut client = node
        .command(true, "openssl")
        .args(["s_client", "-quiet"])
        .arg("-connect")
        .arg(&host)
        .arg("-servername")
        .arg(registry.hostname())
        .arg("-CAfile")
        .arg(&suite.bundles[0])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn openssl s_client");
    let mut stdin = client.stdin.take().expect("stdin");
    let path = format!("/v2/rig/stuck/blobs/{}", big.layers()[0].digest);
    stdin
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let mut stdout = client.stdout.take().expect("stdout");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rollout(suite, &images[4..]).await;
    assert_not_delayed(&baseline, &loaded);
    let (rss_during, _) = usage(a);
    eprintln!("A's RSS {rss_before} → {rss_during} with a stuck intercepted reader");
    // A terminated the TLS and answered from its peer (not passed the connection through).
    let served = a.served_since(mark).expect("served lines");
    assert!(
        served
            .iter()
            .any(|s| s.digest == big.layers()[0].digest && s.is_blob_get() && s.source == "peer"),
        "A did not serve the stuck client's blob from its peer: {served:#?}"
    );
    assert!(
        rss_during <= rss_before + RSS_MARGIN,
        "RSS grew past the budget: {rss_before} → {rss_during}"
    );

    // The interception write timeout closes the connection.
    counter_passes(
        a,
        "spegel_intercept_write_timeouts_total",
        timeouts_before,
        "the stuck intercepted connection was not closed by the write timeout",
    )
    .await;

    // What the client gets is the head and what was buffered, then the end: never the blob.
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_end(&mut received))
        .await
        .expect("the client still receives after the connection was closed")
        .expect("read the client's output");
    let head = String::from_utf8_lossy(&received[..received.len().min(64)]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "the client got {head:?}");
    eprintln!(
        "the stuck client got {} bytes before the end",
        received.len()
    );
    assert!(
        (received.len() as u64) < STUCK_BLOB,
        "the whole blob was sent"
    );
    drop(stdin);
    let _ = client.kill().await;
    assert!(Path::new(&format!("/proc/{}", a.process().pid().unwrap())).exists());
}
