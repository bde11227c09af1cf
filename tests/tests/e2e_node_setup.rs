//! End-to-end acceptance of `spegel node-setup` (the DaemonSet init container): containerd is
//! made to trust the node CA and restarted once, only when its trust changed; `--undo` puts the
//! node back. Each node's root is [`spegel_tests::cluster::node_root`] and the restart goes
//! through [`spegel_tests::cluster::node_setup`]'s hook, which restarts the rig node's containerd
//! with the environment the drop-ins set, as systemd would.
//!
//! One scenario per test, each on its own 1-node rig:
//!
//! - `containerd_trusts_the_node_ca_after_one_restart`: after node-setup containerd runs with
//!   the drop-in's `SSL_CERT_FILE` after exactly one restart, and a CRI pull by name with no
//!   `hosts.toml` is served by a transparent daemon with a leaf from the node CA.
//! - `a_second_run_restarts_nothing`: the same containerd process keeps running.
//! - `undo_leaves_the_node_as_it_was`: after `--undo` the node's files are as before node-setup
//!   (the whole root tree compared), the bundle is gone, containerd was restarted once more and
//!   runs without `SSL_CERT_FILE`.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_node_setup` as root, after
//! `SPEGEL_E2E=1 cargo build --all-targets`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel_tests::cluster::{self, node_root};
use spegel_tests::rig::spegel::SpegelOptions;
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Node, Rig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn containerd_trusts_the_node_ca_after_one_restart() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("containerd_trusts_the_node_ca_after_one_restart", |rig| {
        scenario_trusts(rig).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_second_run_restarts_nothing() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("a_second_run_restarts_nothing", |rig| {
        scenario_second_run(rig).boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn undo_leaves_the_node_as_it_was() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("undo_leaves_the_node_as_it_was", |rig| {
        scenario_undo(rig).boxed()
    })
    .await;
}

/// Brings up a 1-node rig without `hosts.toml` files, runs `scenario`, dumps logs on failure.
async fn run_scenario(name: &str, scenario: impl for<'a> FnOnce(&'a Rig) -> BoxFuture<'a, ()>) {
    let rig = Rig::builder()
        .nodes(1)
        .image(ImageSpec::new("setup").layers([200 * KIB]).seed(9201))
        .start()
        .await
        .expect("rig starts");
    eprintln!("{name}: rig {} up", rig.prefix());
    let certs = rig.node(0).certs_dir().to_owned();
    for entry in std::fs::read_dir(&certs).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    let outcome = std::panic::AssertUnwindSafe(scenario(&rig))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let node = rig.node(0);
        eprintln!(
            "===== containerd on {} =====\n{}",
            node.name(),
            node.containerd().log_tail(40)
        );
        rig.shutdown().await.expect("clean teardown");
        std::panic::resume_unwind(panic);
    }
    eprintln!("{name}: passed");
    rig.shutdown().await.expect("clean teardown");
}

fn mirrored(rig: &Rig) -> Vec<String> {
    vec![rig.registry().host(Endpoint::Tls)]
}

/// containerd's `SSL_CERT_FILE`, from its process environment.
fn containerd_ssl_cert_file(node: &Node) -> Option<String> {
    let pid = node.containerd().pid().expect("containerd runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix("SSL_CERT_FILE="))
        .map(str::to_owned)
}

async fn scenario_trusts(rig: &Rig) {
    let node = rig.node(0);
    let before = node.containerd().pid();
    let run = cluster::node_setup(rig, node, &mirrored(rig), &[])
        .await
        .expect("node-setup");
    eprintln!("{}", run.stdout);
    assert_eq!(
        run.restarts,
        ["containerd.service"],
        "exactly one restart of containerd's unit"
    );
    assert_ne!(
        node.containerd().pid(),
        before,
        "containerd was not restarted"
    );
    let bundle = node.dir().join("spegel/containerd-trust.pem");
    assert_eq!(
        containerd_ssl_cert_file(node).as_deref(),
        Some(bundle.to_str().unwrap()),
        "containerd does not run with the drop-in's SSL_CERT_FILE"
    );

    eprintln!("--- a transparent CRI pull by name, no hosts.toml: served with the node CA's leaf");
    let daemon = rig
        .start_spegel(
            0,
            SpegelOptions::transparent().mirrored_registries(mirrored(rig)),
        )
        .await
        .expect("daemon starts");
    cluster::wait_attached(&daemon, Default::default())
        .await
        .expect("interception attached");
    let image = rig.image("setup").expect("image pushed");
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
    let log = node.containerd().read_log();
    assert!(
        !log.contains("x509:") && !log.contains("certificate signed by unknown authority"),
        "containerd logged a TLS failure"
    );
}

async fn scenario_second_run(rig: &Rig) {
    let node = rig.node(0);
    let first = cluster::node_setup(rig, node, &mirrored(rig), &[])
        .await
        .expect("node-setup");
    assert_eq!(first.restarts.len(), 1, "{}", first.stdout);
    let pid = node.containerd().pid();
    let second = cluster::node_setup(rig, node, &mirrored(rig), &[])
        .await
        .expect("node-setup again");
    eprintln!("{}", second.stdout);
    assert!(
        second.restarts.is_empty(),
        "the second run restarted containerd: {second:?}"
    );
    assert!(
        second.stdout.contains("not restarting it"),
        "{}",
        second.stdout
    );
    assert_eq!(node.containerd().pid(), pid, "containerd's process changed");
}

async fn scenario_undo(rig: &Rig) {
    let node = rig.node(0);
    let root = node_root(rig, node).unwrap();
    let pristine = tree(&root);
    assert_eq!(containerd_ssl_cert_file(node), None);
    let setup = cluster::node_setup(rig, node, &mirrored(rig), &[])
        .await
        .expect("node-setup");
    assert_eq!(setup.restarts.len(), 1, "{}", setup.stdout);
    assert_ne!(
        tree(&root),
        pristine,
        "node-setup changed nothing under the root"
    );

    let undo = cluster::node_setup(rig, node, &mirrored(rig), &["--undo"])
        .await
        .expect("node-setup --undo");
    eprintln!("{}", undo.stdout);
    assert_eq!(undo.restarts, ["containerd.service"], "one restart to undo");
    let after = tree(&root);
    let differ: Vec<&PathBuf> = pristine
        .keys()
        .chain(after.keys())
        .filter(|path| pristine.get(*path) != after.get(*path))
        .collect();
    assert!(
        differ.is_empty(),
        "the node's files differ from before: {differ:?}"
    );
    let data_dir = node.dir().join("spegel");
    assert!(!data_dir.join("containerd-trust.pem").exists());
    assert!(!data_dir.join("node-setup").exists(), "the ledger is left");
    assert_eq!(
        containerd_ssl_cert_file(node),
        None,
        "containerd still runs with the bundle"
    );

    let again = cluster::node_setup(rig, node, &mirrored(rig), &["--undo"])
        .await
        .expect("node-setup --undo again");
    assert!(again.restarts.is_empty(), "{again:?}");
}

/// Every path under the node root's `etc/` and `usr/` with its contents (`None` for a
/// directory): the node's files. (The rig's node root is also containerd's `root`, whose
/// `io.containerd.*` state changes with every restart; it is not the node's configuration.)
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.join("etc"), root.join("usr")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.clone());
                out.insert(path, None);
            } else {
                out.insert(path.clone(), Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}
