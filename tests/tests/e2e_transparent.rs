//! End-to-end acceptance of transparent interception: real eBPF redirects containerd's registry
//! connections to a real spegel daemon on every node, which terminates TLS with a leaf from its
//! node CA and serves pulls from its store, its peers or the registry. No node has a
//! `hosts.toml`; containerd only trusts a bundle (`SSL_CERT_FILE`) with the system roots, the
//! rig's test CA (the registry's real certificate) and its node's spegel CA.
//!
//! Each scenario is its own test on its own 3-node rig (set up by
//! [`spegel_tests::cluster::transparent_for`]), so a failure hides no other:
//!
//! - `pulls_fetch_each_blob_once`: A (`n1`) pulls through its daemon from the registry, then B
//!   and C from their peers: the registry serves every blob once in total.
//! - `pull_by_registry_ip`: the same for an image referenced by the registry's IP (no SNI: the
//!   daemon matches the original destination, the leaf names the IP).
//! - `splices_what_is_not_mirrored`: from inside A's containerd cgroup, TLS to what is not
//!   mirrored (another port, another name on the mirrored address, the plain port) is spliced:
//!   the client sees the real server certificate. Connections from outside the cgroup are not
//!   redirected at all.
//! - `an_unmirrored_registry_goes_direct_after_its_first_connection`: with the registry not in
//!   the mirrored list, A's first pull is spliced and the daemon learns the registry's address;
//!   after a containerd restart (no connection kept) A's next pull reaches the registry without
//!   a connection through the daemon.
//! - `fails_open_and_resumes`: `kill -9` of A's daemon: A still pulls, straight from the
//!   registry (fail-open); a restarted daemon intercepts the next pull again.
//! - `peers_serve_while_the_registry_is_down`: A pulls two images; with the registry stopped,
//!   B pulls them (only A has them), by digest and by tag.
//!
//! Every test ends by checking that no node has a `hosts.toml` and no daemon logged an error.
//! The tests hold [`spegel_tests::serial`]: rigs are kept apart by their random prefixes and
//! subnets, but several at once would saturate a small CI machine and make the timeouts flaky.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_transparent -- --nocapture` as
//! root, after `cargo build -p spegel-daemon`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel_tests::cluster::{self, wait_attached, wait_discoverable};
use spegel_tests::rig::spegel::{Metrics, Spegel, SpegelOptions, http_get};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Node, ProcessSpec, Rig, TestImage};

/// A TLS port on the registry's address that is redirected but not mirrored.
const ALT_TLS_PORT: u16 = 8443;
/// How long a node may take to find content a peer advertised.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one helper command (curl, openssl) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

const ACCEPTED: &str = "spegel_intercept_accepted_total";
const MIRRORED: &str = "spegel_intercept_mirrored_total";
const SPLICED: &str = "spegel_intercept_spliced_total";
const LEARNED: &str = "spegel_intercept_bypass_learned_total";

/// Each pulled blob (config + layers of the host manifest) once.
fn once_each(image: &TestImage) -> BTreeMap<String, usize> {
    image
        .pulled_blobs()
        .into_iter()
        .map(|blob| (blob.digest.clone(), 1))
        .collect()
}

/// One scenario's rig with transparent spegel on every node.
struct Suite {
    rig: Rig,
    daemons: Vec<Spegel>,
    /// Per node: containerd's `SSL_CERT_FILE`.
    bundles: Vec<PathBuf>,
}

impl Suite {
    fn daemon(&self, index: usize) -> &Spegel {
        &self.daemons[index]
    }

    /// The rig CA's file: trusting only it, a client accepts the registry's real certificate and
    /// refuses any spegel leaf.
    fn rig_ca(&self) -> &Path {
        self.rig.ca().cert_path()
    }

    fn registry_name(&self) -> &str {
        self.rig.registry().hostname()
    }

    /// Everything worth seeing when a scenario fails.
    fn dump_logs(&self) {
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
async fn pulls_fetch_each_blob_once() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("pulls_fetch_each_blob_once", [], |suite: &Suite| {
        scenario_pulls_fetch_each_blob_once(suite).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn pull_by_registry_ip() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let images = [ImageSpec::new("byip").layers([300 * KIB]).seed(7101)];
    run_scenario("pull_by_registry_ip", images, |suite: &Suite| {
        scenario_pull_by_registry_ip(suite).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn splices_what_is_not_mirrored() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("splices_what_is_not_mirrored", [], |suite: &Suite| {
        scenario_splices_what_is_not_mirrored(suite).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn an_unmirrored_registry_goes_direct_after_its_first_connection() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario_mirroring(
        "an_unmirrored_registry_goes_direct_after_its_first_connection",
        two_images(),
        // Something else: the rig's registry is not mirrored.
        |rig| vec![format!("elsewhere.{}.test", rig.prefix())],
        |suite: &Suite| scenario_an_unmirrored_registry_goes_direct(suite).boxed(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn fails_open_and_resumes() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("fails_open_and_resumes", two_images(), |suite: &Suite| {
        scenario_fails_open_and_resumes(suite).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn peers_serve_while_the_registry_is_down() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "peers_serve_while_the_registry_is_down",
        two_images(),
        |suite: &Suite| scenario_peers_serve_while_the_registry_is_down(suite).boxed(),
    )
    .await;
}

/// `failopen` and `resumed`: images no node has pulled yet.
fn two_images() -> [ImageSpec; 2] {
    [
        ImageSpec::new("failopen")
            .layers([64 * KIB, 700 * KIB])
            .seed(7102),
        ImageSpec::new("resumed").layers([600 * KIB]).seed(7103),
    ]
}

/// Starts a 3-node rig with `images` (besides the default ones) and transparent spegel on every
/// node, runs `scenario` on it, then checks that no node has a `hosts.toml` and no daemon
/// logged an error. On failure, dumps the logs (and keeps them, see [`keep_logs`]).
async fn run_scenario<const N: usize>(
    name: &str,
    images: [ImageSpec; N],
    scenario: impl for<'a> FnOnce(&'a Suite) -> BoxFuture<'a, ()>,
) {
    let mirrored = |rig: &Rig| {
        let registry = rig.registry();
        vec![
            registry.host(Endpoint::Tls),
            registry.ip_host(Endpoint::Tls),
        ]
    };
    run_scenario_mirroring(name, images, mirrored, scenario).await;
}

/// [`run_scenario`], the daemons mirroring what `mirrored` names instead of the registry.
async fn run_scenario_mirroring<const N: usize>(
    name: &str,
    images: [ImageSpec; N],
    mirrored: impl FnOnce(&Rig) -> Vec<String>,
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

    let mirrored = mirrored(&rig);
    let options = SpegelOptions::transparent().intercept_ports([ALT_TLS_PORT]);
    let cluster = match cluster::transparent_for(&rig, &mirrored, options).await {
        Ok(cluster) => cluster,
        Err(error) => {
            keep_logs(&rig);
            panic!("transparent set-up: {error:#}");
        }
    };
    let suite = Suite {
        rig,
        daemons: cluster.daemons,
        bundles: cluster.bundles,
    };
    no_hosts_toml_anywhere(&suite);
    eprintln!("{name}: daemons intercepting after {:?}", started.elapsed());

    let outcome = std::panic::AssertUnwindSafe(async {
        scenario(&suite).await;
        no_hosts_toml_anywhere(&suite);
        no_daemon_errors(&suite);
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        suite.dump_logs();
        keep_logs(&suite.rig);
        std::panic::resume_unwind(panic);
    }

    eprintln!("{name}: passed in {:?}", started.elapsed());
    let Suite { rig, .. } = suite;
    keep_logs(&rig);
    rig.shutdown().await.expect("clean teardown");
}

/// With `SPEGEL_E2E_KEEP_LOGS=<dir>`, copies every process log of the rig into `<dir>/<prefix>/`
/// before teardown removes them (for reading the daemons' debug lines after a run).
fn keep_logs(rig: &Rig) {
    let Some(dir) = std::env::var_os("SPEGEL_E2E_KEEP_LOGS") else {
        return;
    };
    let target = Path::new(&dir).join(rig.prefix());
    let copy = || -> std::io::Result<()> {
        std::fs::create_dir_all(&target)?;
        for entry in std::fs::read_dir(rig.logs_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), target.join(entry.file_name()))?;
            }
        }
        Ok(())
    };
    match copy() {
        Ok(()) => eprintln!("rig logs kept in {}", target.display()),
        Err(error) => eprintln!("cannot keep the rig logs in {}: {error}", target.display()),
    }
}

/// Every `hosts.toml` below `dir`.
fn find_hosts_toml(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(find_hosts_toml(&path));
        } else if path.file_name().is_some_and(|name| name == "hosts.toml") {
            found.push(path);
        }
    }
    found
}

fn no_hosts_toml_anywhere(suite: &Suite) {
    let registry = suite.rig.registry();
    for node in suite.rig.nodes() {
        let found = find_hosts_toml(node.certs_dir());
        assert!(
            found.is_empty(),
            "{} has hosts.toml files: {found:?}",
            node.name()
        );
        for endpoint in Endpoint::ALL {
            for host in [registry.host(endpoint), registry.ip_host(endpoint)] {
                let path = node.certs_dir().join(&host).join("hosts.toml");
                assert!(!path.exists(), "{} exists", path.display());
            }
        }
    }
}

/// Runs `program args` in `node`'s namespace, inside containerd's cgroup (`in_cgroup`) or not.
/// Returns the output whatever the exit status.
async fn run_on(node: &Node, in_cgroup: bool, program: &str, args: &[&str]) -> Output {
    let mut command = node.command(in_cgroup, program);
    command.args(args);
    tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} on {} timed out", node.name()))
        .unwrap_or_else(|error| panic!("spawning {program}: {error}"))
}

/// The certificate a TLS server presents, as `openssl s_client` saw it.
#[derive(Debug)]
struct SeenCert {
    /// The leaf's issuer (`CN = spegel rig CA ...`).
    issuer: String,
    /// Whether it verified against the given CA file, for the given name or IP.
    verified: bool,
    /// Everything s_client printed, for assertion messages.
    #[expect(dead_code, reason = "only read through Debug in assertion messages")]
    output: String,
}

/// Connects with `openssl s_client` from `node` (inside containerd's cgroup or not) to
/// `connect` (`host:port`), sending `sni` (or none), and verifies the chain against `ca_file`
/// for `verify_name` (a DNS name or an IP).
async fn seen_cert(
    node: &Node,
    in_cgroup: bool,
    connect: &str,
    sni: Option<&str>,
    ca_file: &Path,
    verify_name: &str,
) -> SeenCert {
    let ca = ca_file.to_string_lossy().into_owned();
    let mut args = vec!["s_client", "-connect", connect, "-CAfile", &ca];
    match sni {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    if verify_name.parse::<std::net::IpAddr>().is_ok() {
        args.extend(["-verify_ip", verify_name]);
    } else {
        args.extend(["-verify_hostname", verify_name]);
    }
    let output = run_on(node, in_cgroup, "openssl", &args).await;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let issuer = text
        .lines()
        .skip_while(|line| !line.starts_with("Certificate chain"))
        .map(str::trim)
        .find_map(|line| line.strip_prefix("i:"))
        .unwrap_or_else(|| panic!("no certificate from {connect} (sni {sni:?}):\n{text}"))
        .trim()
        .to_owned();
    let verified = text.contains("Verify return code: 0 (ok)");
    SeenCert {
        issuer,
        verified,
        output: text,
    }
}

/// The interception counters of a daemon.
async fn counters(daemon: &Spegel) -> [f64; 3] {
    let metrics: Metrics = daemon.metrics().await.expect("metrics");
    [ACCEPTED, MIRRORED, SPLICED].map(|name| metrics.sum(name))
}

/// A pulls through its daemon (intercepted, from upstream), then B and C (from
/// peers): every blob leaves the registry exactly once.
async fn scenario_pulls_fetch_each_blob_once(suite: &Suite) {
    eprintln!("--- A, B, C pull `four` by name over TLS");
    let rig = &suite.rig;
    let four = rig.images().four.clone();
    let reference = four.reference(Endpoint::Tls);
    let before = rig.registry_log().await.unwrap();

    let a = rig.node(0);
    let daemon_a = suite.daemon(0);
    let mark = daemon_a.log_mark();
    let [accepted_before, mirrored_before, _] = counters(daemon_a).await;
    let pulled = a
        .cri_pull(&reference)
        .await
        .expect("A pulls through its daemon");
    assert_eq!(pulled, four.config().digest);
    let served = daemon_a.served_since(mark).unwrap();
    for blob in four.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "upstream"),
            "A's daemon did not serve {} from upstream: {served:#?}",
            blob.digest
        );
        assert!(a.has_blob(&blob.digest).await.unwrap());
    }
    assert!(
        served
            .iter()
            .any(|s| s.kind == "manifest" && s.digest == four.digest() && s.source == "upstream"),
        "the tag was not resolved upstream first: {served:#?}"
    );
    // The first request upstream did not wait for its own dial: the daemon dialled the
    // registry while containerd was still in its handshake.
    let metrics = daemon_a.metrics().await.expect("metrics");
    assert!(
        metrics.sum("spegel_upstream_dials_ahead_taken_total") >= 1.0,
        "A's daemon did not dial the registry ahead of its first request:\n{}",
        daemon_a.log_tail(40)
    );
    let [accepted, mirrored, _] = counters(daemon_a).await;
    assert!(
        accepted > accepted_before,
        "no connection intercepted ({accepted_before} → {accepted})"
    );
    assert!(
        mirrored > mirrored_before,
        "no connection handed to the registry API ({mirrored_before} → {mirrored})"
    );

    for index in [1, 2] {
        let node = rig.node(index);
        let daemon = suite.daemon(index);
        wait_discoverable(daemon, &four, None, DISCOVERY_TIMEOUT).await;
        let mark = daemon.log_mark();
        let started = Instant::now();
        let pulled = node
            .cri_pull(&reference)
            .await
            .unwrap_or_else(|error| panic!("{} pulls: {error:#}", node.name()));
        assert_eq!(pulled, four.config().digest);
        eprintln!("{} pulled four in {:?}", node.name(), started.elapsed());
        let served = daemon.served_since(mark).unwrap();
        for blob in four.pulled_blobs() {
            assert!(
                served
                    .iter()
                    .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
                "{}'s daemon did not serve {} from a peer: {served:#?}",
                node.name(),
                blob.digest
            );
        }
    }

    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(
        log.blob_get_counts(),
        once_each(&four),
        "blob GETs at the registry, per digest: {:#?}",
        log.blob_gets_per_client()
    );
}

/// By IP: references by `IP:5443` carry no SNI; the daemon matches the original
/// destination and mints a leaf for the IP. B then gets it from A.
async fn scenario_pull_by_registry_ip(suite: &Suite) {
    eprintln!("--- A and B pull `byip` by the registry's IP");
    let rig = &suite.rig;
    let image = rig.image("byip").expect("byip pushed");
    let reference = image.reference_by_ip(Endpoint::Tls);
    let before = rig.registry_log().await.unwrap();
    let daemon_a = suite.daemon(0);
    let mark = daemon_a.log_mark();
    let [_, mirrored_before, _] = counters(daemon_a).await;
    rig.node(0)
        .cri_pull(&reference)
        .await
        .expect("A pulls by IP through its daemon");
    let served = daemon_a.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "upstream"),
            "A's daemon did not serve {} from upstream: {served:#?}",
            blob.digest
        );
    }
    let [_, mirrored, _] = counters(daemon_a).await;
    assert!(mirrored > mirrored_before, "no IP connection was mirrored");

    let daemon_b = suite.daemon(1);
    wait_discoverable(daemon_b, &image, None, DISCOVERY_TIMEOUT).await;
    let mark = daemon_b.log_mark();
    rig.node(1)
        .cri_pull(&reference)
        .await
        .expect("B pulls by IP");
    let served = daemon_b.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
            "B's daemon did not serve {} from a peer: {served:#?}",
            blob.digest
        );
    }
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_get_counts(), once_each(&image));
}

/// Inside containerd's cgroup, mirrored destinations meet spegel's leaf while
/// everything else is spliced to the real server; outside the cgroup nothing is redirected.
async fn scenario_splices_what_is_not_mirrored(suite: &Suite) {
    eprintln!("--- splicing and the cgroup boundary");
    let rig = &suite.rig;
    let a = rig.node(0);
    let daemon = suite.daemon(0);
    let registry = rig.registry();
    let name = suite.registry_name().to_owned();
    let ip = registry.ip().to_string();
    let rig_ca = suite.rig_ca().to_path_buf();
    let bundle = suite.bundles[0].clone();
    let rig_issuer = format!("spegel rig CA {}", rig.prefix());

    // A second TLS server on the registry's address, at a port that is redirected but not
    // mirrored, with a certificate from the rig CA.
    let cert = rig
        .ca()
        .issue(rig.scratch_dir(), "alt-tls", &[name.clone(), ip.clone()])
        .unwrap();
    let port = ALT_TLS_PORT.to_string();
    rig.spawn_in_netns(
        Some(registry.netns()),
        ProcessSpec::new("alt-tls", "openssl")
            .args(["s_server", "-accept", &port, "-www", "-cert"])
            .arg(&cert.cert_path)
            .arg("-key")
            .arg(&cert.key_path),
    )
    .unwrap();
    let alt_url = format!("https://{name}:{ALT_TLS_PORT}/");
    let rig_ca_arg = rig_ca.to_string_lossy().into_owned();
    let curl = |url: &str| {
        vec![
            "--silent".to_owned(),
            "--show-error".to_owned(),
            "--verbose".to_owned(),
            "--max-time".to_owned(),
            "20".to_owned(),
            "--cacert".to_owned(),
            rig_ca_arg.clone(),
            "--write-out".to_owned(),
            "\n%{http_code}".to_owned(),
            url.to_owned(),
        ]
    };
    let curl_ok = |output: &Output| {
        output.status.success()
            && String::from_utf8_lossy(&output.stdout)
                .trim_end()
                .ends_with("200")
    };

    // Outside the cgroup (and waiting for s_server to listen): neither port is redirected.
    let [accepted_before, ..] = counters(daemon).await;
    let started = Instant::now();
    loop {
        let args = curl(&alt_url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run_on(a, false, "curl", &args).await;
        if curl_ok(&output) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the extra TLS server never answered: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outside = seen_cert(
        a,
        false,
        &registry.host(Endpoint::Tls),
        Some(&name),
        &rig_ca,
        &name,
    )
    .await;
    assert!(
        outside.issuer.contains(&rig_issuer) && outside.verified,
        "outside the cgroup the mirrored registry must show its own certificate: {outside:#?}"
    );
    let args = curl(&format!("{}/v2/", registry.url(Endpoint::Tls)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run_on(a, false, "curl", &args).await;
    assert!(
        curl_ok(&output),
        "curl to the registry from outside the cgroup: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let response = http_get(a, &format!("{}/v2/", registry.url(Endpoint::Plain)))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let [accepted, ..] = counters(daemon).await;
    assert_eq!(
        accepted, accepted_before,
        "connections from outside containerd's cgroup were redirected"
    );

    // Control: inside the cgroup a mirrored destination is terminated with the node CA's leaf,
    // by name and by IP (no SNI).
    let [_, mirrored_before, spliced_before] = counters(daemon).await;
    let by_name = seen_cert(
        a,
        true,
        &registry.host(Endpoint::Tls),
        Some(&name),
        &bundle,
        &name,
    )
    .await;
    assert!(
        by_name.issuer.contains("spegel node CA") && by_name.verified,
        "the mirrored registry by name must be terminated by spegel: {by_name:#?}"
    );
    let by_ip = seen_cert(
        a,
        true,
        &registry.ip_host(Endpoint::Tls),
        None,
        &bundle,
        &ip,
    )
    .await;
    assert!(
        by_ip.issuer.contains("spegel node CA") && by_ip.verified,
        "the mirrored registry by IP must be terminated by spegel with an IP leaf: {by_ip:#?}"
    );
    let [_, mirrored, spliced] = counters(daemon).await;
    assert!(
        mirrored >= mirrored_before + 2.0,
        "{mirrored_before} → {mirrored}"
    );
    assert_eq!(spliced, spliced_before);

    // Not mirrored: another port on the same address.
    let alt = seen_cert(
        a,
        true,
        &format!("{name}:{ALT_TLS_PORT}"),
        Some(&name),
        &rig_ca,
        &name,
    )
    .await;
    assert!(
        alt.issuer.contains(&rig_issuer) && alt.verified,
        "a redirected, non-mirrored port must be spliced to the real server: {alt:#?}"
    );
    let args = curl(&alt_url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run_on(a, true, "curl", &args).await;
    assert!(
        curl_ok(&output),
        "HTTPS through the splice: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Not mirrored: another name (SNI) on the mirrored address and port.
    let other = format!("other.{}.test", rig.prefix());
    let renamed = seen_cert(
        a,
        true,
        &registry.ip_host(Endpoint::Tls),
        Some(&other),
        &rig_ca,
        &ip,
    )
    .await;
    assert!(
        renamed.issuer.contains(&rig_issuer) && renamed.verified,
        "an unmirrored SNI must be spliced even to a mirrored address: {renamed:#?}"
    );

    // Not mirrored: the registry's plain-HTTP port (redirected: it is in the port list).
    let before = rig.registry_log().await.unwrap();
    let plain = format!("{}/v2/", registry.url(Endpoint::Plain));
    let output = run_on(
        a,
        true,
        "curl",
        &[
            "--silent",
            "--max-time",
            "20",
            "--write-out",
            "\n%{http_code}",
            &plain,
        ],
    )
    .await;
    assert!(
        curl_ok(&output),
        "plain HTTP through the splice: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let log = rig.registry_log().await.unwrap().since(&before);
    assert!(
        log.from_client(a.ip())
            .iter()
            .any(|entry| entry.is_success()),
        "the spliced request did not reach the registry from A: {:#?}",
        log.entries()
    );

    let [_, mirrored_after, spliced_after] = counters(daemon).await;
    assert_eq!(
        mirrored_after, mirrored,
        "non-mirrored connections reached the registry API"
    );
    assert!(
        spliced_after >= spliced + 4.0,
        "expected 4 spliced connections, counter {spliced} → {spliced_after}"
    );
    // Each of those would have let its destination go direct, but all are on the address the
    // mirrored registry was seen at: none may be left out of the redirect.
    let metrics: Metrics = daemon.metrics().await.expect("metrics");
    assert_eq!(
        metrics.sum(LEARNED),
        0.0,
        "a destination on the mirrored registry's address was learned"
    );
}

/// The registry is not mirrored: A's first pull is passed through and teaches its daemon the
/// registry's address; once containerd has no connection left to reuse, its next pull opens new
/// ones that go straight to the registry, never through the daemon.
async fn scenario_an_unmirrored_registry_goes_direct(suite: &Suite) {
    eprintln!("--- an unmirrored registry: spliced once, then direct");
    let rig = &suite.rig;
    let a = rig.node(0);
    let daemon = suite.daemon(0);
    let first = rig.image("failopen").expect("failopen pushed");
    let before = rig.registry_log().await.unwrap();
    a.cri_pull(&first.reference(Endpoint::Tls))
        .await
        .expect("A pulls through the splice");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(a.ip()), once_each(&first));
    let metrics: Metrics = daemon.metrics().await.expect("metrics");
    assert!(
        metrics.sum(SPLICED) >= 1.0,
        "the first pull was not intercepted"
    );
    assert_eq!(metrics.sum(MIRRORED), 0.0);
    assert!(
        metrics.sum(LEARNED) >= 1.0,
        "the registry's address was not learned"
    );

    // No connection of the first pull survives a restart.
    a.restart_containerd().await.expect("containerd restarts");
    let [accepted, ..] = counters(daemon).await;
    let second = rig.image("resumed").expect("resumed pushed");
    let before = rig.registry_log().await.unwrap();
    a.cri_pull(&second.reference(Endpoint::Tls))
        .await
        .expect("A pulls directly");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(a.ip()), once_each(&second));
    let [accepted_after, ..] = counters(daemon).await;
    assert_eq!(
        accepted_after, accepted,
        "containerd's connects to a learned registry went through the daemon"
    );
}

/// A crashed daemon leaves no redirect behind; a restarted one intercepts again.
async fn scenario_fails_open_and_resumes(suite: &Suite) {
    eprintln!("--- kill -9 of A's daemon, then restart");
    let rig = &suite.rig;
    let a = rig.node(0);
    let daemon = suite.daemon(0);
    let failopen = rig.image("failopen").expect("failopen pushed");
    daemon.kill().await.unwrap();
    assert!(!daemon.is_running());

    let before = rig.registry_log().await.unwrap();
    let started = Instant::now();
    a.cri_pull(&failopen.reference(Endpoint::Tls))
        .await
        .expect("A pulls with its daemon dead (fail-open)");
    eprintln!("A pulled failopen directly in {:?}", started.elapsed());
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(a.ip()), once_each(&failopen));

    let mark = daemon.log_mark();
    daemon.start().await.expect("A's daemon starts again");
    wait_attached(daemon, mark).await.unwrap();
    let resumed = rig.image("resumed").expect("resumed pushed");
    let before = rig.registry_log().await.unwrap();
    a.cri_pull(&resumed.reference(Endpoint::Tls))
        .await
        .expect("A pulls through its restarted daemon");
    let served = daemon.served_since(mark).unwrap();
    for blob in resumed.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "upstream"),
            "the restarted daemon did not intercept {}: {served:#?}",
            blob.digest
        );
    }
    let [accepted, mirrored, _] = counters(daemon).await;
    assert!(accepted > 0.0 && mirrored > 0.0, "{accepted} {mirrored}");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(a.ip()), once_each(&resumed));
}

/// With the registry down, B gets what only A has (A pulls it first), by digest and by tag (tags ask
/// upstream first, then fall back to peers).
async fn scenario_peers_serve_while_the_registry_is_down(suite: &Suite) {
    eprintln!("--- registry stopped: B pulls from A by digest and by tag");
    let rig = &suite.rig;
    let b = rig.node(1);
    let daemon_b = suite.daemon(1);
    let by_digest = rig.image("failopen").expect("failopen pushed");
    let by_tag = rig.image("resumed").expect("resumed pushed");
    let registry_host = rig.registry().host(Endpoint::Tls);
    for image in [&by_digest, &by_tag] {
        rig.node(0)
            .cri_pull(&image.reference(Endpoint::Tls))
            .await
            .unwrap_or_else(|error| panic!("A pulls {}: {error:#}", image.name));
    }
    for image in [&by_digest, &by_tag] {
        for blob in image.pulled_blobs() {
            assert!(
                !b.has_blob(&blob.digest).await.unwrap(),
                "B already has {}",
                blob.digest
            );
        }
    }
    wait_discoverable(daemon_b, &by_digest, None, DISCOVERY_TIMEOUT).await;
    // Tags are resolved through peers only while the registry cannot be reached.
    rig.registry().stop().await.unwrap();
    wait_discoverable(daemon_b, &by_tag, Some(&registry_host), DISCOVERY_TIMEOUT).await;
    let mark = daemon_b.log_mark();
    let started = Instant::now();
    let pulled = b
        .cri_pull(&by_digest.digest_reference(Endpoint::Tls))
        .await
        .expect("B pulls by digest with the registry down");
    assert_eq!(pulled, by_digest.config().digest);
    eprintln!("B pulled failopen by digest in {:?}", started.elapsed());
    let started = Instant::now();
    let pulled = b
        .cri_pull(&by_tag.reference(Endpoint::Tls))
        .await
        .expect("B pulls by tag with the registry down");
    assert_eq!(pulled, by_tag.config().digest);
    eprintln!("B pulled resumed by tag in {:?}", started.elapsed());

    // The tag went to the registry first and fell back to the peers because it was down.
    let fell_back = daemon_b.events_since(mark).into_iter().any(|event| {
        event.message.contains("tag answered in upstream's place")
            && event.str("repository") == Some(by_tag.repository.as_str())
            && event
                .str("why")
                .is_some_and(|why| why.starts_with("upstream unreachable"))
    });
    assert!(
        fell_back,
        "B's daemon never fell back from upstream for the tag"
    );
    let served = daemon_b.served_since(mark).unwrap();
    for image in [&by_digest, &by_tag] {
        for blob in image.pulled_blobs() {
            assert!(
                served
                    .iter()
                    .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "peer"),
                "B did not get {} from a peer: {served:#?}",
                blob.digest
            );
            assert!(b.has_blob(&blob.digest).await.unwrap());
        }
        assert!(
            served
                .iter()
                .any(|s| s.kind == "manifest" && s.digest == image.digest() && s.source == "peer"),
            "B did not get the manifest of {} from a peer: {served:#?}",
            image.name
        );
    }
    rig.registry().start().await.expect("registry starts again");
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
