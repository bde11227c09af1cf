//! End-to-end acceptance of CA trust scoped to containerd (issue 9): with `spegel install-ca`'s
//! default, containerd trusts the node CA and no other process on the node does.
//!
//! Each node's filesystem root, as `install-ca --trust-root` sees it, is
//! [`spegel_tests::cluster::node_root`] (a Debian layout with the machine's system roots plus the
//! rig CA, and a systemd unit directory); containerd is restarted as systemd would, with the
//! environment `install-ca`'s drop-in sets. "A process outside containerd" trusts what the node's
//! trust store holds: its system bundle plus every locally added CA (what `update-ca-certificates`
//! folds into the bundle, which the tests cannot run against another root). The check is
//! `openssl verify` of a leaf the node CA signs for the mirrored registry's name.
//!
//! Each scenario is its own test on its own 1-node rig:
//!
//! - `containerd_trusts_the_node_ca`: after the default install (drop-in applied), containerd's
//!   `SSL_CERT_FILE` is the bundle and a TLS pull by name is served by spegel: containerd
//!   accepted the node CA's leaf.
//! - `no_other_process_trusts_the_node_ca`: same set-up; the node's trust store does not verify
//!   the leaf and holds the node CA in no file; containerd's bundle verifies it.
//! - `host_wide_makes_every_process_trust_it`: the control that shows the check can fail: after
//!   `install-ca --host-wide` the node's trust store verifies the leaf; the default install
//!   afterwards takes it out again.
//! - `the_bundle_follows_the_system_roots`: a CA added to the node's system roots reaches
//!   containerd's bundle without `install-ca` (the running daemon rewrites it), the node CA
//!   stays, and after a containerd restart pulls are still served by spegel.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_trust_scope` as root, after
//! `SPEGEL_E2E=1 cargo build --all-targets`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use spegel_tests::cluster::{self, NODE_LOCAL_ANCHORS, NODE_SYSTEM_ROOTS, node_root};
use spegel_tests::rig::spegel::{Spegel, SpegelOptions};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Rig};

/// A 1-node rig in transparent mode (default `install-ca`), mirroring the registry by name.
struct Scoped {
    rig: Rig,
    daemon: Spegel,
    /// containerd's `SSL_CERT_FILE`.
    bundle: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn containerd_trusts_the_node_ca() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("containerd_trusts_the_node_ca", |scoped| {
        scenario_containerd_trusts(scoped).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn no_other_process_trusts_the_node_ca() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("no_other_process_trusts_the_node_ca", |scoped| {
        scenario_no_other_process(scoped).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn host_wide_makes_every_process_trust_it() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("host_wide_makes_every_process_trust_it", |scoped| {
        scenario_host_wide(scoped).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn the_bundle_follows_the_system_roots() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("the_bundle_follows_the_system_roots", |scoped| {
        scenario_follows_system_roots(scoped).boxed()
    })
    .await;
}

/// Brings up the rig in transparent mode, runs `scenario`, dumps logs on failure.
async fn run_scenario(name: &str, scenario: impl for<'a> FnOnce(&'a Scoped) -> BoxFuture<'a, ()>) {
    let rig = Rig::builder()
        .nodes(1)
        .image(ImageSpec::new("scoped").layers([200 * KIB]).seed(9101))
        .start()
        .await
        .expect("rig starts");
    eprintln!("{name}: rig {} up", rig.prefix());
    let mirrored = vec![rig.registry().host(Endpoint::Tls)];
    let cluster =
        match cluster::transparent_for(&rig, &mirrored, SpegelOptions::transparent()).await {
            Ok(cluster) => cluster,
            Err(error) => {
                dump(&rig, None);
                rig.shutdown().await.expect("clean teardown");
                panic!("set-up: {error:#}");
            }
        };
    let daemon = cluster.daemons.into_iter().next().expect("one daemon");
    let bundle = cluster.bundles[0].clone();
    let scoped = Scoped {
        rig,
        daemon,
        bundle,
    };
    let outcome = std::panic::AssertUnwindSafe(scenario(&scoped))
        .catch_unwind()
        .await;
    let Scoped { rig, daemon, .. } = scoped;
    if let Err(panic) = outcome {
        dump(&rig, Some(&daemon));
        rig.shutdown().await.expect("clean teardown");
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed");
    rig.shutdown().await.expect("clean teardown");
}

async fn scenario_containerd_trusts(scoped: &Scoped) {
    let (rig, daemon) = (&scoped.rig, &scoped.daemon);
    let node = rig.node(0);
    assert_eq!(
        scoped.bundle,
        daemon.data_dir().join("containerd-trust.pem"),
        "the drop-in names the default bundle"
    );
    let pid = node.containerd().pid().expect("containerd runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let wanted = format!("SSL_CERT_FILE={}", scoped.bundle.display());
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|entry| entry == wanted.as_bytes()),
        "containerd does not run with {wanted}"
    );

    eprintln!("--- a TLS pull by name: served by spegel with a leaf from the node CA");
    let image = rig.image("scoped").expect("image pushed");
    let mark = daemon.log_mark();
    node.cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("containerd pulls through spegel");
    let served = daemon.served_since(mark).unwrap();
    for blob in image.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "the daemon did not serve {}: {served:#?}",
            blob.digest
        );
    }
    no_tls_failure_in_containerd(rig);
}

async fn scenario_no_other_process(scoped: &Scoped) {
    let (rig, daemon) = (&scoped.rig, &scoped.daemon);
    let node = rig.node(0);
    let root = node_root(rig, node).unwrap();
    let name = rig.registry().hostname().to_owned();
    let leaf = node_ca_leaf(
        daemon.data_dir(),
        &name,
        &rig.scratch_dir().join("leaf.crt"),
    );
    let node_ca = node_ca_pem(daemon.data_dir());

    eprintln!("--- the node's trust store: no node CA, the leaf is refused");
    for file in trust_store_files(&root) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(node_ca.trim()),
            "{} holds the node CA",
            file.display()
        );
    }
    let store = node_trust_store(&root, rig.scratch_dir());
    let (verified, output) = openssl_verifies(&store, &leaf, &name).await;
    assert!(
        !verified,
        "a process trusting the node's trust store accepts the node CA's leaf: {output}"
    );
    // Refused for the right reason: the issuer is unknown, not some other defect.
    assert!(
        output.contains("unable to get local issuer certificate"),
        "{output}"
    );

    eprintln!("--- containerd's bundle: the leaf is accepted");
    let (verified, output) = openssl_verifies(&scoped.bundle, &leaf, &name).await;
    assert!(verified, "containerd's bundle refuses the leaf: {output}");
}

async fn scenario_host_wide(scoped: &Scoped) {
    let (rig, daemon) = (&scoped.rig, &scoped.daemon);
    let node = rig.node(0);
    let root = node_root(rig, node).unwrap();
    let name = rig.registry().hostname().to_owned();
    let leaf = node_ca_leaf(
        daemon.data_dir(),
        &name,
        &rig.scratch_dir().join("leaf.crt"),
    );
    let mirrored = vec![rig.registry().host(Endpoint::Tls)];

    eprintln!("--- install-ca --host-wide: every process trusts the node CA");
    let output = cluster::install_ca(rig, node, daemon.data_dir(), &mirrored, &["--host-wide"])
        .await
        .expect("install-ca --host-wide");
    eprintln!("{output}");
    let store = node_trust_store(&root, rig.scratch_dir());
    let (verified, output) = openssl_verifies(&store, &leaf, &name).await;
    assert!(
        verified,
        "after --host-wide the node's trust store still refuses the leaf: {output}"
    );

    eprintln!("--- install-ca again (default): the host-wide copy is removed");
    let output = cluster::install_ca(rig, node, daemon.data_dir(), &mirrored, &[])
        .await
        .expect("install-ca");
    eprintln!("{output}");
    assert!(output.contains("containerd must be restarted"), "{output}");
    let store = node_trust_store(&root, rig.scratch_dir());
    let (verified, output) = openssl_verifies(&store, &leaf, &name).await;
    assert!(!verified, "the host-wide copy was kept: {output}");
    let output = cluster::install_ca(rig, node, daemon.data_dir(), &mirrored, &[])
        .await
        .expect("install-ca");
    assert!(
        output.contains("nothing changed: containerd needs no restart"),
        "{output}"
    );
}

async fn scenario_follows_system_roots(scoped: &Scoped) {
    let (rig, daemon) = (&scoped.rig, &scoped.daemon);
    let node = rig.node(0);
    let root = node_root(rig, node).unwrap();
    let node_ca = node_ca_pem(daemon.data_dir());
    let drop_in_env = cluster::containerd_drop_in_env(rig, node).unwrap();

    eprintln!("--- a CA added to the node's system roots reaches containerd's bundle");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let added = params.self_signed(&key).unwrap().pem();
    let system_roots = root.join(NODE_SYSTEM_ROOTS);
    let mut pem = std::fs::read_to_string(&system_roots).unwrap();
    pem.push_str(&added);
    std::fs::write(&system_roots, &pem).unwrap();
    let started = Instant::now();
    loop {
        let bundle = std::fs::read_to_string(&scoped.bundle).unwrap();
        if bundle.contains(added.trim()) {
            assert!(
                bundle.starts_with(&pem),
                "the bundle does not start with the system roots"
            );
            assert!(
                bundle.contains(node_ca.trim()),
                "the node CA left the bundle"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon did not rewrite containerd's bundle within {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("rewritten after {:?}", started.elapsed());
    assert_eq!(
        cluster::containerd_drop_in_env(rig, node).unwrap(),
        drop_in_env,
        "the drop-in changed"
    );

    eprintln!("--- containerd restarted: pulls are still served by spegel");
    cluster::restart_containerd_as_systemd(rig, node)
        .await
        .unwrap();
    let image = rig.image("scoped").expect("image pushed");
    let mark = daemon.log_mark();
    node.cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("containerd pulls through spegel");
    let served = daemon.served_since(mark).unwrap();
    assert!(
        served.iter().any(|s| s.repository == image.repository),
        "the daemon served nothing after the restart: {served:#?}"
    );
    no_tls_failure_in_containerd(rig);
}

/// The node CA's certificate (PEM): the current one, or the one waiting to be trusted.
fn node_ca_pem(data_dir: &Path) -> String {
    ["ca/ca.crt", "ca/next.crt"]
        .iter()
        .find_map(|rel| std::fs::read_to_string(data_dir.join(rel)).ok())
        .expect("a node CA")
}

/// A server leaf for `name` signed by the node CA (as the daemon mints them), written to `out`.
fn node_ca_leaf(data_dir: &Path, name: &str, out: &Path) -> PathBuf {
    let stem = if data_dir.join("ca/ca.crt").exists() {
        "ca"
    } else {
        "next"
    };
    let ca_pem = std::fs::read_to_string(data_dir.join(format!("ca/{stem}.crt"))).unwrap();
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(data_dir.join(format!("ca/{stem}.key"))).unwrap(),
    )
    .unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(out, leaf.pem()).unwrap();
    out.to_owned()
}

/// Every file of the node's trust store: its system bundle and its locally added CAs.
fn trust_store_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join(NODE_SYSTEM_ROOTS)];
    for entry in std::fs::read_dir(root.join(NODE_LOCAL_ANCHORS)).unwrap() {
        files.push(entry.unwrap().path());
    }
    files
}

/// What a process on the node trusts, as one PEM file in `scratch`: the system bundle plus every
/// locally added CA (what the distribution's refresh folds into the bundle).
fn node_trust_store(root: &Path, scratch: &Path) -> PathBuf {
    let mut pem = String::new();
    for file in trust_store_files(root) {
        pem.push_str(&std::fs::read_to_string(&file).unwrap());
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
    }
    let out = scratch.join("node-trust-store.pem");
    std::fs::write(&out, pem).unwrap();
    out
}

/// Whether `openssl verify` accepts `leaf` as a TLS server certificate for `name`, trusting
/// only the CAs in `ca_file`; and what it said.
async fn openssl_verifies(ca_file: &Path, leaf: &Path, name: &str) -> (bool, String) {
    let output = tokio::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_file)
        .args(["-purpose", "sslserver", "-verify_hostname", name])
        .arg(leaf)
        .output()
        .await
        .expect("running openssl verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

/// containerd never failed a TLS handshake.
fn no_tls_failure_in_containerd(rig: &Rig) {
    for node in rig.nodes() {
        let log = node.containerd().read_log();
        for needle in ["x509:", "certificate signed by unknown authority", "tls: "] {
            let hits: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            assert!(
                hits.is_empty(),
                "containerd on {} logged a TLS failure ({needle}): {hits:#?}",
                node.name()
            );
        }
    }
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
