//! End-to-end acceptance of the eBPF self-guard (issue 9): the daemon's own connections are
//! recognised by its cgroup, not its PID, and the daemon refuses to attach to a cgroup that
//! contains its own. One scenario per test, each on its own one-node rig:
//!
//! - `pid_namespace_daemon_never_redirects_itself`: the daemon runs in a PID namespace of its
//!   own (PID 1 there, another PID for the kernel, as a DaemonSet without `hostPID`) *and* in a
//!   cgroup below containerd's, so the programs attached to containerd's cgroup also run for
//!   the daemon's own sockets. The refusal of such a cgroup is turned off with a test-only
//!   switch, which leaves the in-kernel exemption as the only thing between the daemon and a
//!   loop. A transparent pull over TLS must then succeed through the daemon (its connections
//!   intercepted; passed through to the registry, since a daemon in its own PID namespace
//!   cannot yet promote its node CA, see tls/trust.rs), with every blob fetched from the
//!   registry once and no socket of the daemon connected to its own interception listener.
//!   With the former exemption by tgid the daemon's own connects to the registry were
//!   redirected to itself, again and again, and the pull failed (TLS handshake timeout).
//! - `cgroup_namespace_daemon_never_redirects_itself`: the same in a cgroup namespace of its
//!   own too, as an unprivileged pod: `/proc/self/cgroup` reads `0::/` and the daemon must find
//!   its cgroup on the (host's) cgroup2 mount by the PID its namespace gives it.
//! - `refuses_a_cgroup_containing_the_daemon`: the daemon runs in a cgroup below containerd's
//!   and is told to attach to containerd's: it logs an error naming both cgroups, attaches
//!   nothing (no program on the cgroup, `spegel_intercept_attached` 0), keeps running and
//!   containerd pulls directly.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_ebpf_guard -- --nocapture` as
//! root, after `SPEGEL_E2E=1 cargo build --all-targets`.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel::fault::switches;
use spegel_tests::cluster;
use spegel_tests::rig::spegel::{LogEvent, Spegel, SpegelOptions};
use spegel_tests::rig::{Endpoint, Rig};

/// The daemon's cgroup, below containerd's.
const DAEMON_CGROUP: &str = "spegel";
/// The daemon's interception listener (the daemon's default).
const INTERCEPT_PORT: u16 = 15001;
/// A pull that loops or hangs fails after this long.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn pid_namespace_daemon_never_redirects_itself() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    on_rig(
        "pid_namespace_daemon_never_redirects_itself",
        |rig: &Rig| {
            scenario_pid_namespace(rig, SpegelOptions::transparent().pid_namespace()).boxed()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn cgroup_namespace_daemon_never_redirects_itself() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    on_rig(
        "cgroup_namespace_daemon_never_redirects_itself",
        |rig: &Rig| {
            let options = SpegelOptions::transparent()
                .pid_namespace()
                .cgroup_namespace();
            scenario_pid_namespace(rig, options).boxed()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn refuses_a_cgroup_containing_the_daemon() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    on_rig("refuses_a_cgroup_containing_the_daemon", |rig: &Rig| {
        scenario_refusal(rig).boxed()
    })
    .await;
}

/// Runs `scenario` on a fresh one-node rig; on failure dumps the node's logs first.
async fn on_rig(name: &str, scenario: impl for<'a> FnOnce(&'a Rig) -> BoxFuture<'a, ()>) {
    let started = Instant::now();
    let rig = Rig::builder().nodes(1).start().await.expect("rig starts");
    eprintln!("{name}: rig {} up in {:?}", rig.prefix(), started.elapsed());
    let outcome = std::panic::AssertUnwindSafe(scenario(&rig))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        for entry in std::fs::read_dir(rig.logs_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("===== {} =====", entry.path().display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        rig.shutdown().await.ok();
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

/// The programs attached to cgroup `dir`, as `bpftool cgroup show` lists them (names).
async fn attached_programs(dir: &Path) -> Vec<String> {
    let output = tokio::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(dir)
        .output()
        .await
        .expect("bpftool runs");
    assert!(
        output.status.success(),
        "bpftool cgroup show {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let programs: serde_json::Value = serde_json::from_str(&text).expect("bpftool JSON");
    programs
        .as_array()
        .into_iter()
        .flatten()
        .map(|program| program["name"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The daemon's cgroup2 path (the `0::` line of `/proc/<pid>/cgroup`).
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup file");
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a cgroup2 line")
        .to_owned()
}

/// TCP connections in the node's network namespace owned by process `pid`, as `ss` lists
/// them (`local peer` pairs).
async fn connections_of(daemon: &Spegel, pid: u32) -> Vec<(String, String)> {
    let output = tokio::process::Command::new("ip")
        .args(["netns", "exec", daemon.netns(), "ss", "-Htnp"])
        .output()
        .await
        .expect("ss runs");
    let needle = format!("pid={pid},");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(3)?.to_string(), fields.get(4)?.to_string()))
        })
        .collect()
}

/// `options`: transparent, in a PID namespace of its own (and maybe a cgroup namespace).
async fn scenario_pid_namespace(rig: &Rig, options: SpegelOptions) {
    let node = rig.node(0);
    let registry = rig.registry();
    let mirrored = vec![
        registry.host(Endpoint::Tls),
        registry.ip_host(Endpoint::Tls),
    ];
    let options = options
        .cgroup_below_containerd(DAEMON_CGROUP)
        .arg(format!("--{}", switches::ATTACH_CONTAINING_CGROUP_FLAG));
    let cluster = cluster::transparent_for(rig, &mirrored, options)
        .await
        .expect("transparent set-up (the daemon attaches)");
    let daemon = &cluster.daemons[0];

    // The set-up under test: another PID namespace, and a cgroup the programs run for.
    let pid = daemon.daemon_pid().expect("the daemon's PID");
    let own_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let daemon_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    assert_ne!(
        own_ns, daemon_ns,
        "the daemon is not in a PID namespace of its own"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .expect("NSpid line");
    assert_eq!(
        nspid.split_whitespace().last(),
        Some("1"),
        "the daemon is not PID 1 of its namespace: NSpid {nspid}"
    );
    let own_cgroup_ns = std::fs::read_link("/proc/self/ns/cgroup").unwrap();
    let daemon_cgroup_ns = std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).unwrap();
    eprintln!(
        "the daemon's cgroup namespace: {} (this test's: {})",
        daemon_cgroup_ns.display(),
        own_cgroup_ns.display()
    );
    let containerd_cgroup = node.cgroup_dir();
    let daemon_cgroup = cgroup_of(pid);
    let containerd_name = containerd_cgroup.file_name().unwrap().to_string_lossy();
    assert!(
        daemon_cgroup.ends_with(&format!("/{containerd_name}/{DAEMON_CGROUP}")),
        "the daemon's cgroup {daemon_cgroup} is not below containerd's {}",
        containerd_cgroup.display()
    );
    let programs = attached_programs(containerd_cgroup).await;
    assert!(
        programs.iter().any(|name| name == "connect4"),
        "connect4 is not attached to containerd's cgroup: {programs:?}"
    );
    assert!(
        daemon.events().iter().any(|event| event.level == "WARN"
            && event.message.contains("TEST FAULTS ARE ON")
            && event.message.contains("contains this daemon")),
        "the refusal was not turned off by the test switch"
    );

    // A pull the daemon must fetch from upstream: a loop fails it or hangs it.
    let four = rig.images().four.clone();
    let before = rig.registry_log().await.unwrap();
    let mark = daemon.log_mark();
    let spliced_before = daemon
        .metrics()
        .await
        .expect("metrics")
        .sum("spegel_intercept_spliced_total");
    let pulled = tokio::time::timeout(PULL_TIMEOUT, node.cri_pull(&four.reference(Endpoint::Tls)))
        .await
        .expect("the pull does not hang")
        .expect("containerd pulls through the daemon");
    assert_eq!(pulled, four.config().digest);
    // containerd's connections went through the daemon. They are spliced to the registry, not
    // served: in a PID namespace of its own the daemon cannot see containerd's process, so it
    // never promotes its node CA to "trusted" (tls/trust.rs) and passes TLS through untouched.
    // Either way each one needs a connect of the daemon's own to the registry, which with the
    // exemption by tgid was redirected to the daemon again, and again (a loop, the pull failed).
    let metrics = daemon.metrics().await.expect("metrics");
    let accepted = metrics.sum("spegel_intercept_accepted_total");
    let spliced = metrics.sum("spegel_intercept_spliced_total");
    let mirrored_count = metrics.sum("spegel_intercept_mirrored_total");
    eprintln!("intercepted: accepted {accepted}, spliced {spliced}, mirrored {mirrored_count}");
    assert!(
        spliced + mirrored_count > spliced_before,
        "containerd's connections were not intercepted (the listener's own probes are neither spliced nor mirrored)"
    );
    let served = daemon.served_since(mark).unwrap();
    eprintln!("served by the daemon: {} objects", served.len());
    let log = rig.registry_log().await.unwrap().since(&before);
    let counts = log.blob_get_counts();
    for blob in four.pulled_blobs() {
        assert_eq!(
            counts.get(&blob.digest),
            Some(&1),
            "blob GETs at the registry, per digest: {:#?}",
            log.blob_gets_per_client()
        );
    }

    // No lasting socket of the daemon goes to its own listener (a redirected, pooled upstream
    // connection would; the listener's self-probes come and go within a second, so a
    // connection must show in every one of a few samples to count).
    let own_listener = [
        format!("127.0.0.1:{INTERCEPT_PORT}"),
        format!("[::1]:{INTERCEPT_PORT}"),
        format!("[::ffff:127.0.0.1]:{INTERCEPT_PORT}"),
    ];
    let mut lasting: Option<Vec<(String, String)>> = None;
    for _ in 0..4 {
        let to_listener: Vec<(String, String)> = connections_of(daemon, pid)
            .await
            .into_iter()
            .filter(|(_, peer)| own_listener.contains(peer))
            .collect();
        lasting = Some(match lasting {
            None => to_listener,
            Some(before) => before
                .into_iter()
                .filter(|c| to_listener.contains(c))
                .collect(),
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let lasting = lasting.unwrap_or_default();
    eprintln!(
        "daemon connections after the pull: {:?}",
        connections_of(daemon, pid).await
    );
    assert!(
        lasting.is_empty(),
        "the daemon is connected to its own interception listener: {lasting:?}"
    );
    daemon.kill().await.ok();
}

async fn scenario_refusal(rig: &Rig) {
    let node = rig.node(0);
    let daemon = rig
        .start_spegel(
            0,
            SpegelOptions::transparent().cgroup_below_containerd(DAEMON_CGROUP),
        )
        .await
        .expect("the daemon starts");
    let containerd_cgroup = node.cgroup_dir().to_path_buf();
    let daemon_cgroup = containerd_cgroup.join(DAEMON_CGROUP);
    let pid = daemon.daemon_pid().unwrap();
    assert!(
        cgroup_of(pid).ends_with(&format!(
            "/{}/{DAEMON_CGROUP}",
            containerd_cgroup.file_name().unwrap().to_string_lossy()
        )),
        "the daemon is not in {}",
        daemon_cgroup.display()
    );

    let names_both = |event: &LogEvent| {
        let text = format!("{} {:?}", event.message, event.fields);
        event.level == "ERROR"
            // The target alone (its path followed by `:`), and the daemon's own.
            && text.contains(&format!("{}:", containerd_cgroup.display()))
            && text.contains(&format!("{}", daemon_cgroup.display()))
    };
    let refusal = daemon
        .wait_for_event(Default::default(), Duration::from_secs(30), names_both)
        .await
        .expect("an error naming both cgroups");
    eprintln!("refusal: {} {:?}", refusal.message, refusal.fields);

    assert!(
        !daemon
            .events()
            .iter()
            .any(|event| event.message.starts_with("eBPF redirect attached")),
        "the daemon attached anyway"
    );
    let programs = attached_programs(&containerd_cgroup).await;
    assert!(
        programs.is_empty(),
        "programs attached to containerd's cgroup: {programs:?}"
    );
    let metrics = daemon.metrics().await.expect("metrics");
    assert_eq!(
        metrics.value("spegel_intercept_attached", &[]),
        0.0,
        "spegel_intercept_attached"
    );

    // The daemon keeps running and containerd pulls directly (fail open).
    assert!(daemon.is_running(), "the daemon exited");
    let four = rig.images().four.clone();
    let mark = daemon.log_mark();
    let pulled = tokio::time::timeout(PULL_TIMEOUT, node.cri_pull(&four.reference(Endpoint::Tls)))
        .await
        .expect("the pull does not hang")
        .expect("containerd pulls directly");
    assert_eq!(pulled, four.config().digest);
    let served = daemon.served_since(mark).unwrap();
    assert!(served.is_empty(), "the daemon served the pull: {served:#?}");
    assert!(daemon.is_running(), "the daemon exited");
}
