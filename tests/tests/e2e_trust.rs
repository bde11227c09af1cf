//! End-to-end acceptance of cluster membership: only holders of the cluster secret join the DHT
//! and read content, while the members' own pulls still come from peers.
//!
//! Node roles: A (`n1`) pulls from the registry; B (`n2`) holds the same secret and pulls from A;
//! C (`n3`) runs a daemon with another secret (a node that is not a member). Every node's
//! containerd mirrors through its own daemon (`configure-mirror`). The rig's host namespace plays
//! "a host outside the cluster".
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_trust -- --nocapture` as root,
//! after `SPEGEL_E2E=1 cargo build --all-targets`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use spegel_tests::cluster::{content_paths, ns_query, wait_discoverable};
use spegel_tests::eventually;
use spegel_tests::rig::spegel::{
    DEFAULT_REGISTRY_PORT, HttpResponse, Spegel, SpegelOptions, configure_mirror, http_request,
    registry_urls,
};
use spegel_tests::rig::{Endpoint, Node, Rig, TestImage, write_cluster_secret};

/// How long peers may take to find content another node just got (DHT provide + lookup).
const FIND_TIMEOUT: Duration = Duration::from_secs(30);

fn daemon_url(node: &Node) -> String {
    format!("http://{}:{DEFAULT_REGISTRY_PORT}", node.ip())
}

/// A rig whose nodes mirror through their own daemons.
async fn rig(nodes: usize) -> Rig {
    let rig = Rig::builder()
        .nodes(nodes)
        .start()
        .await
        .expect("rig starts");
    let registries = registry_urls(&rig, Endpoint::Plain);
    for node in rig.nodes() {
        configure_mirror(node, &[daemon_url(node)], &registries)
            .await
            .expect("configure-mirror");
    }
    rig
}

/// A (node 0) pulls `image` from the registry; once B's daemon finds it, B (node 1) pulls it
/// from its peers: each blob leaves the registry once, none for B.
async fn members_share(rig: &Rig, daemon_b: &Spegel, image: &TestImage) {
    let (a, b) = (rig.node(0), rig.node(1));
    let before = rig.registry_log().await.unwrap();
    a.cri_pull(&image.reference(Endpoint::Plain))
        .await
        .expect("A pulls");
    wait_discoverable(daemon_b, image, None, FIND_TIMEOUT).await;
    b.cri_pull(&image.reference(Endpoint::Plain))
        .await
        .expect("B pulls");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert!(
        log.blob_gets_by(b.ip()).is_empty(),
        "B got blobs from the registry: {:?}",
        log.blob_gets_by(b.ip())
    );
    for blob in image.pulled_blobs() {
        assert_eq!(
            log.blob_get_count(&blob.digest),
            1,
            "{} left the registry more than once",
            blob.digest
        );
    }
}

/// `curl` from the rig's host namespace (outside every node), like the rig's in-node requests.
async fn curl_from_host(url: &str, extra: &[&str]) -> Result<HttpResponse> {
    let started = Instant::now();
    let output = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--include",
            "--http1.1",
            "--max-time",
            "10",
        ])
        .args(extra)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("spawning curl")?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    HttpResponse::parse(&output.stdout, started.elapsed())
}

fn assert_unauthorized(who: &str, path: &str, response: &HttpResponse) {
    assert_eq!(
        response.status,
        401,
        "{who} GET {path}: {} {}",
        response.status,
        response.text()
    );
    assert!(
        response.text().contains("UNAUTHORIZED"),
        "{who} GET {path}: not an OCI error: {}",
        response.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn outsiders_neither_join_nor_read_while_members_share() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let rig = rig(3).await;
    let c = rig.node(2);
    let image = rig.images().small.clone();
    let foreign_secret = rig.scratch_dir().join("foreign.secret");
    write_cluster_secret(&foreign_secret).unwrap();

    let members = futures::future::try_join_all(
        (0..2).map(|i| rig.start_spegel(i, SpegelOptions::mirror().bootstrap_other_nodes())),
    )
    .await
    .expect("A's and B's daemons start");
    let outsider = rig
        .start_spegel(
            2,
            SpegelOptions::mirror()
                .bootstrap_other_nodes()
                .cluster_secrets(vec![foreign_secret]),
        )
        .await
        .expect("C's daemon starts");

    // A pulls (from the registry: nobody has it yet); B finds it through its peers.
    members_share(&rig, &members[1], &image).await;

    // C's daemon was refused by both members: it has no peer, finds nothing, and they logged why.
    let metrics = outsider.metrics().await.unwrap();
    assert_eq!(
        metrics.value("spegel_router_has_peers", &[]),
        0.0,
        "C joined the DHT"
    );
    let refused = |daemon: &Spegel| {
        daemon
            .events()
            .iter()
            .any(|e| e.message.contains("libp2p connection refused"))
    };
    eventually("a member logs that it refused C", FIND_TIMEOUT, || async {
        Ok(members.iter().any(refused).then_some(()))
    })
    .await
    .unwrap();

    // Not one byte of content for C (a process on a node without the secret) or the host, by
    // plain HTTP...
    let unauthorized_before = members[0]
        .metrics()
        .await
        .unwrap()
        .sum("spegel_registry_unauthorized_requests_total");
    let paths = content_paths(&image, Some(&rig.registry().host(Endpoint::Plain)));
    for path in &paths {
        let url = format!("{}{path}", members[0].url());
        let from_c = http_request(c, "GET", &url, &[])
            .await
            .expect("C reaches A");
        assert_unauthorized("C", path, &from_c);
        let from_host = curl_from_host(&url, &[]).await.expect("the host reaches A");
        assert_unauthorized("host", path, &from_host);
    }
    let unauthorized = members[0]
        .metrics()
        .await
        .unwrap()
        .sum("spegel_registry_unauthorized_requests_total");
    assert_eq!(unauthorized - unauthorized_before, 2.0 * paths.len() as f64);
    // ...nor by TLS without a cluster certificate (the handshake fails).
    let tls_url = format!("https://{}{}", members[0].registry_addr(), paths[0]);
    let tls = curl_from_host(&tls_url, &["--insecure"]).await;
    assert!(
        tls.is_err(),
        "TLS without a client certificate answered: {:?}",
        tls.map(|r| r.status)
    );

    // C's own pull works, from the registry alone.
    let before = rig.registry_log().await.unwrap();
    c.cri_pull(&image.reference(Endpoint::Plain))
        .await
        .expect("C pulls");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(
        log.blob_gets_by(c.ip()).len(),
        image.pulled_blobs().len(),
        "C should have got every blob from the registry"
    );

    for daemon in members.iter().chain([&outsider]) {
        let errors: Vec<_> = daemon
            .events()
            .into_iter()
            .filter(|e| e.level == "ERROR")
            .collect();
        assert!(
            errors.is_empty(),
            "{} logged errors: {errors:#?}",
            daemon.node_name()
        );
    }
    eprintln!("passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn authenticated_plaintext_peers_share_and_refuse_forged_requests() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let rig = rig(3).await;
    let c = rig.node(2);
    let image = rig.images().small.clone();
    let options = SpegelOptions::mirror()
        .bootstrap_other_nodes()
        .args(["--peer-transport=plaintext"]);
    let members =
        futures::future::try_join_all((0..2).map(|i| rig.start_spegel(i, options.clone())))
            .await
            .expect("A's and B's daemons start");

    members_share(&rig, &members[1], &image).await;
    // A served B's blobs from containerd's files, zero-copy.
    let sent = members[0]
        .metrics()
        .await
        .expect("A's metrics")
        .sum("spegel_registry_sendfile_bytes_total");
    let blobs: u64 = image.pulled_blobs().iter().map(|blob| blob.size).sum();
    assert!(
        sent >= blobs as f64,
        "A sent {sent} bytes with sendfile, B pulled {blobs} bytes of blobs"
    );

    // Without the header, or with a forged one, C gets 401.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged = format!("X-Spegel-Auth: v1 {now} {}", "00".repeat(32));
    let forged = forged.split_once(": ").unwrap();
    for path in content_paths(&image, Some(&rig.registry().host(Endpoint::Plain))) {
        let url = format!("{}{path}", members[0].url());
        let bare = http_request(c, "GET", &url, &[])
            .await
            .expect("C reaches A");
        assert_unauthorized("C", &path, &bare);
        let with_forged = http_request(c, "GET", &url, &[forged])
            .await
            .expect("C reaches A");
        assert_unauthorized("C (forged)", &path, &with_forged);
    }
    eprintln!("passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn a_rogue_member_cannot_change_a_tag_while_upstream_is_up() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    let started = Instant::now();
    let rig = rig(2).await;
    let (r, v) = (rig.node(0), rig.node(1));
    let images = rig.images().clone();
    let (small, four) = (&images.small, &images.four);
    let registry_host = rig.registry().host(Endpoint::Plain);

    // R holds the secret but lies: its containerd says `small`'s tag (and `small:latest`) is
    // `four`.
    r.cri_pull(&four.reference(Endpoint::Plain))
        .await
        .expect("R pulls four");
    let latest = format!("{registry_host}/{}:latest", small.repository);
    for alias in [small.reference(Endpoint::Plain), latest] {
        r.ctr([
            "-n",
            "k8s.io",
            "images",
            "tag",
            "--force",
            &four.reference(Endpoint::Plain),
            &alias,
        ])
        .await
        .expect("R re-tags four");
    }
    let options = SpegelOptions::mirror()
        .bootstrap_other_nodes()
        .args(["--advertise-resync=1s"]);
    let daemons =
        futures::future::try_join_all((0..2).map(|i| rig.start_spegel(i, options.clone())))
            .await
            .expect("R's and V's daemons start");
    let victim = &daemons[1];
    wait_discoverable(victim, four, None, FIND_TIMEOUT).await;

    // Registry up: V gets the real `small`, whatever R says.
    let pulled = v
        .cri_pull(&small.reference(Endpoint::Plain))
        .await
        .expect("V pulls small");
    assert_eq!(
        pulled,
        small.config().digest,
        "V got R's image for small's tag"
    );
    let tag_path = |tag: &str| {
        format!(
            "/v2/{}/manifests/{tag}?{}",
            small.repository,
            ns_query(&registry_host)
        )
    };
    let accept = [("Accept", spegel_tests::rig::spegel::MANIFEST_ACCEPT)];
    let asked = victim
        .request("HEAD", &tag_path(&small.tag), &accept)
        .await
        .unwrap();
    assert_eq!(
        asked.status, 404,
        "a tag while the registry is up is left to it"
    );

    // Registry down, V forgets small: an unfiltered tag is answered by a peer (here R's lie),
    // and logged and counted as such; a filtered one (`:latest`) never comes from peers.
    rig.registry().stop().await.expect("registry stops");
    v.remove_all_images().await.unwrap();
    let mark = victim.log_mark();
    let answered = eventually(
        "V resolves small's tag through peers",
        FIND_TIMEOUT,
        || async {
            let response = victim
                .request("HEAD", &tag_path(&small.tag), &accept)
                .await?;
            Ok((response.status == 200).then_some(response))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        answered.header("docker-content-digest"),
        Some(four.digest())
    );
    let logged = victim.events_since(mark).into_iter().any(|e| {
        e.message.contains("tag answered in upstream's place")
            && e.fields.get("source").and_then(|s| s.as_str()) == Some("peer")
    });
    assert!(logged, "the peer's tag answer was not logged");
    let metrics = victim.metrics().await.unwrap();
    assert!(metrics.value("spegel_tag_fallbacks_total", &[("source", "peer")]) >= 1.0);
    let filtered = victim
        .request("HEAD", &tag_path("latest"), &accept)
        .await
        .unwrap();
    assert_eq!(filtered.status, 404, "a filtered tag came from a peer");

    eprintln!("passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}
