//! End-to-end acceptance of the admin endpoint and `spegel status`.
//!
//! - `status_shows_interception_peers_and_sources`: on a 2-node transparent rig, after node 1
//!   pulled an image from the registry and node 2 pulled it through node 1, `spegel status
//!   --json` run on node 2 says it is ready, attached to node 2's containerd cgroup, connected
//!   to node 1's peer id, and that node 2 served the image's layers from a peer; node 1's says it
//!   served them itself (`local`) to its peer. The human output and exit status agree.
//! - `the_status_page_loads_in_a_real_browser`: headless Debian `chromium` loads `/` from the
//!   node's loopback; the DOM shows readiness, the cgroup, the node CA and the pulled objects; a
//!   screenshot is written and its path printed. Needs `chromium` (`cargo xtask prereqs`).
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_status` as root, after
//! `SPEGEL_E2E=1 cargo build --all-targets`.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use futures::FutureExt as _;
use serde_json::Value;
use spegel_tests::cluster;
use spegel_tests::rig::spegel::{Spegel, SpegelOptions};
use spegel_tests::rig::{Endpoint, ImageSpec, KIB, Node, Rig, spegel_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn status_shows_interception_peers_and_sources() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let rig = Rig::builder()
        .nodes(2)
        .image(
            ImageSpec::new("status")
                .layers([300 * KIB, 200 * KIB])
                .seed(9301),
        )
        .start()
        .await
        .expect("rig starts");
    eprintln!("rig {} up", rig.prefix());
    let daemons = cluster::transparent(&rig, SpegelOptions::transparent())
        .await
        .expect("transparent cluster");
    let outcome = std::panic::AssertUnwindSafe(scenario_sources(&rig, &daemons))
        .catch_unwind()
        .await;
    finish(rig, &daemons, outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn the_status_page_loads_in_a_real_browser() {
    spegel_tests::require_e2e!();
    let chromium = which("chromium").unwrap_or_else(|| {
        panic!(
            "chromium is not installed: this test loads the status page in headless Debian \
             chromium; run `cargo xtask prereqs` (or `apt-get install chromium`)"
        )
    });
    let _serial = spegel_tests::serial().await;
    let rig = Rig::builder()
        .nodes(1)
        .image(ImageSpec::new("page").layers([100 * KIB]).seed(9302))
        .start()
        .await
        .expect("rig starts");
    let daemons = cluster::transparent(&rig, SpegelOptions::transparent())
        .await
        .expect("transparent cluster");
    let outcome = std::panic::AssertUnwindSafe(scenario_browser(&rig, &daemons, &chromium))
        .catch_unwind()
        .await;
    finish(rig, &daemons, outcome).await;
}

async fn scenario_sources(rig: &Rig, daemons: &[Spegel]) {
    let image = rig.image("status").expect("image pushed");
    let (n1, n2) = (rig.node(0), rig.node(1));
    n1.cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("node 1 pulls from the registry");
    let registry = &image.registry(Endpoint::Tls);
    for blob in image.pulled_blobs() {
        cluster::wait_until_findable(&daemons[1], registry, &image.repository, &blob.digest)
            .await
            .expect("node 2 finds node 1's copy");
    }
    let mark = daemons[1].log_mark();
    n2.cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("node 2 pulls through its peer");
    let served = daemons[1].served_since(mark).unwrap();
    eprintln!("node 2 served: {served:#?}");

    let (code, json) = status_json(n2).await;
    eprintln!("node 2 status: {json:#}");
    assert_eq!(code, Some(0), "ready exits 0");
    assert_eq!(json["ready"], true, "{json:#}");
    assert_eq!(json["interception"]["attached"], true);
    assert_eq!(
        json["interception"]["cgroup"].as_str(),
        n2.cgroup_dir().to_str(),
        "attached to node 2's containerd cgroup"
    );
    assert_eq!(json["ca"]["containerd_trusts"], true);
    let (_, n1_json) = status_json(n1).await;
    let n1_peer = n1_json["peer_id"].as_str().expect("node 1's peer id");
    let peers = json["peers"].as_array().expect("peers");
    let peer = peers
        .iter()
        .find(|peer| peer["id"] == n1_peer)
        .unwrap_or_else(|| panic!("node 1 ({n1_peer}) is not among node 2's peers: {peers:#?}"));
    let n1_ip = n1.ip().to_string();
    assert!(
        peer["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|addr| addr.as_str().unwrap().contains(&n1_ip)),
        "{peer:#}"
    );

    let recent = json["recent"].as_array().expect("recent");
    for blob in image.pulled_blobs() {
        let path = format!("/v2/{}/blobs/{}", image.repository, blob.digest);
        let record = recent
            .iter()
            .find(|record| record["path"] == path.as_str() && record["method"] == "GET")
            .unwrap_or_else(|| panic!("{path} is not among node 2's last served: {recent:#?}"));
        assert_eq!(record["source"], "peer", "{record:#}");
        assert_eq!(record["bytes"].as_u64(), Some(blob.size), "{record:#}");
        assert_eq!(record["complete"], true);
        // Node 1 served the same layer to node 2 from its own store.
        let n1_recent = n1_json["recent"].as_array().unwrap();
        assert!(
            n1_recent
                .iter()
                .any(|r| r["path"] == path.as_str() && r["source"] == "local"),
            "node 1 did not record serving {path} locally: {n1_recent:#?}"
        );
    }
    // Node 1 advertises what it holds (node 2 found it through the DHT); node 2 advertises its
    // copy a moment after its pull, so its count is not checked.
    assert!(
        n1_json["advertised_keys"].as_u64().unwrap() > 0,
        "{n1_json:#}"
    );
    // Node 1 pulled from the registry itself.
    assert!(
        n1_json["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["source"] == "upstream"),
        "{n1_json:#}"
    );

    let human = run_status(n2, &[]).await;
    let text = String::from_utf8_lossy(&human.stdout);
    eprintln!("{text}");
    assert_eq!(human.status.code(), Some(0));
    assert!(text.starts_with("ready\n"), "{text}");
    assert!(text.contains(n1_peer), "{text}");
    assert!(text.contains("peer "), "{text}");
}

async fn scenario_browser(rig: &Rig, daemons: &[Spegel], chromium: &Path) {
    let node = rig.node(0);
    let image = rig.image("page").expect("image pushed");
    node.cri_pull(&image.reference(Endpoint::Tls))
        .await
        .expect("pull through spegel");
    let _ = daemons;
    let profile = rig.scratch_dir().join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let url = "http://127.0.0.1:5002/";

    let dom = browse(node, chromium, &profile, &["--dump-dom", url]).await;
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        stderr_tail(&dom)
    );
    for needle in [
        "<strong>Ready</strong>".to_owned(),
        format!("attached to {}", node.cgroup_dir().display()),
        "containerd trusts it</th><td>yes".to_owned(),
        "Last ".to_owned(),
    ] {
        assert!(html.contains(&needle), "the page lacks {needle:?}:\n{html}");
    }
    for blob in image.pulled_blobs() {
        assert!(
            html.contains(&blob.digest),
            "the page does not list {}:\n{html}",
            blob.digest
        );
    }
    assert!(
        html.contains("<td class=\"source\">upstream</td>"),
        "{html}"
    );

    let screenshot = std::env::temp_dir().join(format!("spegel-status-page-{}.png", rig.prefix()));
    let _ = std::fs::remove_file(&screenshot);
    let mut shot_arg = std::ffi::OsString::from("--screenshot=");
    shot_arg.push(&screenshot);
    let shot = browse(
        node,
        chromium,
        &profile,
        &[shot_arg.to_str().unwrap(), "--window-size=1280,1400", url],
    )
    .await;
    assert!(
        shot.status.success(),
        "chromium failed: {}",
        stderr_tail(&shot)
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "not a real PNG"
    );
    println!("status page screenshot: {}", screenshot.display());
    eprintln!("status page screenshot: {}", screenshot.display());
}

/// Runs headless chromium in the node's network namespace (where the admin endpoint listens on
/// loopback).
async fn browse(node: &Node, chromium: &Path, profile: &Path, args: &[&str]) -> Output {
    let mut profile_arg = std::ffi::OsString::from("--user-data-dir=");
    profile_arg.push(profile);
    let command = tokio::process::Command::new("ip")
        .args(["netns", "exec", node.netns()])
        .arg(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(profile_arg)
        .args(args)
        .env("HOME", profile)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(90), command)
        .await
        .expect("chromium finished within 90 s")
        .expect("running chromium")
}

fn stderr_tail(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `spegel status --json` in the node's namespace: the exit code and the parsed JSON.
async fn status_json(node: &Node) -> (Option<i32>, Value) {
    let output = run_status(node, &["--json"]).await;
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "spegel status --json printed no JSON ({error}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), json)
}

async fn run_status(node: &Node, args: &[&str]) -> Output {
    tokio::process::Command::new("ip")
        .args(["netns", "exec", node.netns()])
        .arg(spegel_bin().unwrap())
        .arg("status")
        .args(args)
        .output()
        .await
        .expect("running spegel status")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Dumps logs if the scenario panicked, tears the rig down, re-raises the panic.
async fn finish(rig: Rig, daemons: &[Spegel], outcome: Result<(), Box<dyn std::any::Any + Send>>) {
    if let Err(panic) = outcome {
        for daemon in daemons {
            eprintln!(
                "===== spegel on {} =====\n{}",
                daemon.node_name(),
                daemon.log_tail(60)
            );
        }
        rig.shutdown().await.expect("clean teardown");
        std::panic::resume_unwind(panic);
    }
    rig.shutdown().await.expect("clean teardown");
}
