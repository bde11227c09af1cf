//! End-to-end acceptance of CA continuity (issue 11): changing the mirrored registries and
//! restarting the daemon never fails a pull. Real containerd (CRI pulls), real eBPF, real TLS.
//!
//! Each scenario is its own test on its own 1-node rig, set up by
//! [`spegel_tests::cluster::transparent_for`] mirroring only the rig registry's TLS listener *by
//! name*, so the node CA containerd trusts covers that name and no IP. Then the daemon is
//! restarted mirroring the registry by IP too: its CA does not cover the IP, so it keeps the
//! installed CA, mints a next one beside it, and passes IP connections through untouched.
//!
//! - `a_changed_list_never_fails_a_pull`: after the change, a pull by IP works (spliced: the
//!   daemon serves none of it), a pull by name is still served by spegel, containerd logs no TLS
//!   failure, and the change shows in the metrics.
//! - `install_ca_and_a_containerd_restart_promote_the_next_ca`: after the change, the daemon
//!   has already put the next CA into containerd's trust bundle; `install-ca` (default: scoped
//!   to containerd) and a containerd restart: the daemon promotes the next CA, and a pull by IP
//!   is served by spegel again.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_ca` as root, after
//! `cargo build -p spegel-daemon`.

use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel_tests::cluster::{self, wait_attached};
use spegel_tests::rig::spegel::{LogMark, Spegel, SpegelOptions};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Rig};

const SPLICED_UNCOVERED: &str = "spegel_ca_spliced_uncovered_total";
const UNCOVERED: &str = "spegel_ca_uncovered_registries";
const PENDING: &str = "spegel_ca_next_pending";
const PROMOTED: &str = "spegel_ca_promoted_total";

/// A rig where node 0's daemon was restarted with the registry mirrored by name and by IP,
/// while containerd still trusts only the CA minted for the name.
struct Changed {
    rig: Rig,
    /// The restarted daemon.
    daemon: Spegel,
    /// Every mirrored registry after the change.
    mirrored: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_changed_list_never_fails_a_pull() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("a_changed_list_never_fails_a_pull", |changed: &Changed| {
        scenario_a_changed_list_never_fails_a_pull(changed).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn install_ca_and_a_containerd_restart_promote_the_next_ca() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "install_ca_and_a_containerd_restart_promote_the_next_ca",
        |changed: &Changed| scenario_promote(changed).boxed(),
    )
    .await;
}

/// Brings up the rig, changes the mirrored list, runs `scenario`, dumps logs on failure.
async fn run_scenario(name: &str, scenario: impl for<'a> FnOnce(&'a Changed) -> BoxFuture<'a, ()>) {
    let rig = Rig::builder()
        .nodes(1)
        .image(ImageSpec::new("byname").layers([200 * KIB]).seed(7301))
        .image(ImageSpec::new("byip").layers([300 * KIB]).seed(7302))
        .start()
        .await
        .expect("rig starts");
    eprintln!("{name}: rig {} up", rig.prefix());
    let changed = match change_mirrored_list(rig).await {
        Ok(changed) => changed,
        Err((rig, error)) => {
            dump(&rig, None);
            rig.shutdown().await.expect("clean teardown");
            panic!("set-up: {error:#}");
        }
    };
    let outcome = std::panic::AssertUnwindSafe(async {
        scenario(&changed).await;
        no_tls_failure_in_containerd(&changed.rig);
        no_daemon_errors(&changed.daemon);
    })
    .catch_unwind()
    .await;
    let Changed { rig, daemon, .. } = changed;
    if let Err(panic) = outcome {
        dump(&rig, Some(&daemon));
        rig.shutdown().await.expect("clean teardown");
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed");
    rig.shutdown().await.expect("clean teardown");
}

/// Transparent spegel mirroring the registry by name; then the daemon restarted mirroring it by
/// IP too.
async fn change_mirrored_list(rig: Rig) -> Result<Changed, (Rig, anyhow::Error)> {
    let registry = rig.registry();
    let by_name = vec![registry.host(Endpoint::Tls)];
    let mirrored = vec![
        registry.host(Endpoint::Tls),
        registry.ip_host(Endpoint::Tls),
    ];
    let first = match cluster::transparent_for(&rig, &by_name, SpegelOptions::transparent()).await {
        Ok(cluster) => cluster.daemons.into_iter().next(),
        Err(error) => return Err((rig, error)),
    };
    let Some(first) = first else {
        return Err((rig, anyhow::anyhow!("no daemon started")));
    };
    // The first install was promoted at start: containerd restarted after install-ca.
    let metrics = match first.metrics().await {
        Ok(metrics) => metrics,
        Err(error) => return Err((rig, error)),
    };
    if metrics.value(PROMOTED, &[]) != 1.0 || metrics.value(PENDING, &[]) != 0.0 {
        return Err((
            rig,
            anyhow::anyhow!(
                "the first CA was not promoted at start: {PROMOTED}={}, {PENDING}={}",
                metrics.value(PROMOTED, &[]),
                metrics.value(PENDING, &[])
            ),
        ));
    }
    if let Err(error) = first.stop().await {
        return Err((rig, error));
    }
    let options = SpegelOptions::transparent().mirrored_registries(mirrored.iter().cloned());
    let daemon = match rig.start_spegel(0, options).await {
        Ok(daemon) => daemon,
        Err(error) => return Err((rig, error)),
    };
    if let Err(error) = wait_attached(&daemon, LogMark::default()).await {
        return Err((rig, error));
    }
    Ok(Changed {
        rig,
        daemon,
        mirrored,
    })
}

async fn scenario_a_changed_list_never_fails_a_pull(changed: &Changed) {
    let (rig, daemon) = (&changed.rig, &changed.daemon);
    // Loud: a warning and the metrics.
    assert!(
        daemon
            .events()
            .iter()
            .any(|e| e.level == "WARN" && e.message.contains("minted a NEXT CA beside it")),
        "no warning about the next CA:\n{}",
        daemon.log_tail(40)
    );
    let metrics = daemon.metrics().await.unwrap();
    assert_eq!(metrics.value(UNCOVERED, &[]), 1.0, "the IP is uncovered");
    assert_eq!(metrics.value(PENDING, &[]), 1.0);
    assert_eq!(metrics.value(SPLICED_UNCOVERED, &[]), 0.0);

    eprintln!("--- pull by IP: not covered by the trusted CA, passed through");
    let image = rig.image("byip").expect("byip pushed");
    let mark = daemon.log_mark();
    rig.node(0)
        .cri_pull(&image.reference_by_ip(Endpoint::Tls))
        .await
        .expect("a pull by IP works after the change");
    let served = daemon.served_since(mark).unwrap();
    assert!(
        served.iter().all(|s| s.repository != image.repository),
        "the daemon served an uncovered registry: {served:#?}"
    );
    let spliced = daemon
        .metrics()
        .await
        .unwrap()
        .value(SPLICED_UNCOVERED, &[]);
    assert!(spliced >= 1.0, "no connection was passed through");

    eprintln!("--- pull by name: still covered, still served by spegel");
    let image = rig.image("byname").expect("byname pushed");
    let mark = daemon.log_mark();
    rig.node(0)
        .cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("a pull by name works after the change");
    let served = daemon.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "the daemon did not serve {} by name: {served:#?}",
            blob.digest
        );
    }
}

async fn scenario_promote(changed: &Changed) {
    let (rig, daemon) = (&changed.rig, &changed.daemon);
    let node = rig.node(0);
    eprintln!("--- the daemon already put the next CA into containerd's bundle");
    let bundle = daemon.data_dir().join("containerd-trust.pem");
    let next = std::fs::read_to_string(daemon.data_dir().join("ca/next.crt")).unwrap();
    let pem = std::fs::read_to_string(&bundle).unwrap();
    assert!(pem.contains(&next), "the bundle lacks the next CA");
    assert!(
        pem.contains(rig.ca().cert_pem()),
        "the bundle lacks the node's system roots"
    );

    eprintln!("--- install-ca with the new list, containerd restarted");
    let output = cluster::install_ca(rig, node, daemon.data_dir(), &changed.mirrored, &[])
        .await
        .expect("install-ca");
    eprintln!("{output}");
    let pem = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        pem.matches("BEGIN CERTIFICATE").count() >= 3,
        "the bundle lacks the system roots or one of the two node CAs"
    );
    let mark = daemon.log_mark();
    let trusted = cluster::restart_containerd_as_systemd(rig, node)
        .await
        .unwrap();
    assert_eq!(trusted, bundle);
    daemon
        .wait_for_event(mark, Duration::from_secs(30), |e| {
            e.message.contains("promoted it to current")
        })
        .await
        .expect("the daemon promotes the next CA once containerd restarted");
    // The redirect follows containerd's restart (same cgroup, so no re-attach is logged).
    let metrics = daemon.metrics().await.unwrap();
    assert_eq!(metrics.value(UNCOVERED, &[]), 0.0);
    assert_eq!(metrics.value(PENDING, &[]), 0.0);
    let spliced_before = metrics.value(SPLICED_UNCOVERED, &[]);

    eprintln!("--- pull by IP: served by spegel with the new CA");
    let image = rig.image("byip").expect("byip pushed");
    let mark = daemon.log_mark();
    node.cri_pull(&image.reference_by_ip(Endpoint::Tls))
        .await
        .expect("a pull by IP works after promotion");
    let served = daemon.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "the daemon did not serve {} by IP after promotion: {served:#?}",
            blob.digest
        );
    }
    let spliced = daemon
        .metrics()
        .await
        .unwrap()
        .value(SPLICED_UNCOVERED, &[]);
    assert_eq!(
        spliced, spliced_before,
        "a covered registry was passed through"
    );
}

/// containerd never failed a TLS handshake (spegel's leaf refused, or no certificate at all).
fn no_tls_failure_in_containerd(rig: &Rig) {
    for node in rig.nodes() {
        let log = node.containerd().read_log();
        for needle in [
            "x509:",
            "certificate signed by unknown authority",
            "tls: ",
            "handshake failure",
        ] {
            let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            assert!(
                hits.is_empty(),
                "containerd on {} logged a TLS failure ({needle}): {hits:#?}",
                node.name()
            );
        }
    }
}

fn no_daemon_errors(daemon: &Spegel) {
    let errors: Vec<_> = daemon
        .events()
        .into_iter()
        .filter(|e| e.level == "ERROR")
        .collect();
    assert!(errors.is_empty(), "the daemon logged errors: {errors:#?}");
}

fn dump(rig: &Rig, daemon: Option<&Spegel>) {
    if let Some(daemon) = daemon {
        eprintln!(
            "===== spegel on {} =====\n{}",
            daemon.node_name(),
            daemon.log_tail(80)
        );
    }
    for node in rig.nodes() {
        eprintln!(
            "===== containerd on {} =====\n{}",
            node.name(),
            node.containerd().log_tail(40)
        );
    }
}
