//! End-to-end acceptance of mirror mode: a real spegel daemon on one rig node serves what that
//! node's containerd holds, byte for byte, to skopeo, curl and another node's containerd (through
//! `hosts.toml` written by `spegel configure-mirror`); misses are fast OCI 404s that containerd
//! falls back from; `configure-mirror --undo` restores the node's configuration exactly.
//!
//! Node roles: A (`n1`) pulls from the registry and runs the daemon; B (`n2`) pulls through A's
//! daemon; C (`n3`) is a plain client for skopeo and curl. Other nodes' clients read A's daemon
//! here, Spegel's way, so the daemon runs as an open cluster (`--insecure-open-cluster`); with a
//! cluster secret they get 401 (`e2e_trust.rs`).
//!
//! Each scenario is its own test on its own rig, where A holds every test image and runs the
//! daemon; scenarios that need B mirrored through A run `configure-mirror` first and check that
//! `--undo` restores B's configuration after. The tests hold [`spegel_tests::serial`]: rigs are
//! kept apart by their random prefixes and subnets, but several at once would saturate a small
//! CI machine and make the timing bounds flaky.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_mirror -- --nocapture` as root,
//! after `cargo build -p spegel-daemon`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use spegel_tests::rig::spegel::{
    HttpResponse, MANIFEST_ACCEPT, Spegel, SpegelOptions, configure_mirror, http_request,
    registry_urls, undo_mirror,
};
use spegel_tests::rig::{Endpoint, ImageSpec, K8S_NAMESPACE, KIB, Node, Rig, TestImage};

/// A miss must be answered within this (a functional bound: the daemon must not wait for
/// peers or upstream when it has nothing, since containerd tries hosts one by one).
const MISS_BOUND: Duration = Duration::from_secs(1);

/// The served-objects counter of A's local store, by kind.
const SERVED: &str = "spegel_served_objects_total";

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `registry.<prefix>.test:5000` percent-encoded, as containerd sends it in `?ns=`.
fn ns_query(rig: &Rig) -> String {
    format!(
        "ns={}",
        rig.registry().host(Endpoint::Plain).replace(':', "%3A")
    )
}

/// Each pulled blob (config + layers of the host manifest) once.
fn once_each(image: &TestImage) -> BTreeMap<String, usize> {
    image
        .pulled_blobs()
        .into_iter()
        .map(|blob| (blob.digest.clone(), 1))
        .collect()
}

/// `skopeo --insecure-policy <args>` inside `node`; the error carries skopeo's stderr.
async fn skopeo(node: &Node, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut argv = vec!["--insecure-policy"];
    argv.extend_from_slice(args);
    Ok(node.exec("skopeo", argv).await?.stdout)
}

/// Every file below `dir` (relative path → bytes and permission bits); directories map to
/// `None` content.
fn read_tree(dir: &Path) -> BTreeMap<PathBuf, (Option<Vec<u8>>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (Option<Vec<u8>>, u32)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(relative, (None, mode));
                walk(root, &path, out);
            } else {
                out.insert(relative, (Some(std::fs::read(&path).unwrap()), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn skopeo_reads_identical_content_by_digest() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "skopeo_reads_identical_content_by_digest",
        BThroughA::No,
        |rig: &Rig, daemon: &Spegel| {
            scenario_skopeo_reads_identical_content_by_digest(rig, daemon).boxed()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn tags_resolve_with_ns() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "tags_resolve_with_ns",
        BThroughA::No,
        |rig: &Rig, daemon: &Spegel| scenario_tags_resolve_with_ns(rig, daemon).boxed(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn node_b_pulls_everything_through_a() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "node_b_pulls_everything_through_a",
        BThroughA::Yes,
        |rig: &Rig, daemon: &Spegel| {
            scenario_node_b_pulls_everything_through_a(rig, daemon).boxed()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn misses_are_fast_404s_and_containerd_falls_back() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "misses_are_fast_404s_and_containerd_falls_back",
        BThroughA::Yes,
        |rig: &Rig, daemon: &Spegel| {
            scenario_misses_are_fast_404s_and_containerd_falls_back(rig, daemon).boxed()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn dead_and_restarted_daemon() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario(
        "dead_and_restarted_daemon",
        BThroughA::Yes,
        |rig: &Rig, daemon: &Spegel| scenario_dead_and_restarted_daemon(rig, daemon).boxed(),
    )
    .await;
}

/// Whether a scenario needs B's containerd mirrored through A's daemon.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BThroughA {
    /// B keeps the rig's default `hosts.toml`.
    No,
    /// `configure-mirror` points B at A's daemon before the scenario, and `--undo` after it
    /// must restore B's `certs.d` exactly.
    Yes,
}

/// Starts a 3-node rig where A holds every image (every platform of `multi`) and runs the
/// daemon in mirror mode, runs `scenario` on it (with B mirrored through A if `b_through_a`),
/// then checks that the daemon never failed a request for another reason than a miss and
/// logged no error, and (if B was mirrored) that `--undo` restores B's configuration.
async fn run_scenario(
    name: &str,
    b_through_a: BThroughA,
    scenario: impl for<'a> FnOnce(&'a Rig, &'a Spegel) -> BoxFuture<'a, ()>,
) {
    let started = Instant::now();
    let rig = Rig::builder().nodes(3).start().await.expect("rig starts");
    eprintln!(
        "{name}: rig {} ({}) up in {:?}",
        rig.prefix(),
        rig.subnet(),
        started.elapsed()
    );
    let images = rig.images().clone();
    let all = [&images.small, &images.four, &images.multi];

    // A pulls every image like kubelet does, and the other platform of `multi` with ctr, so
    // that A can serve the whole index to `skopeo copy --all`.
    let a = rig.node(0);
    for image in all {
        a.cri_pull(&image.reference(Endpoint::Plain))
            .await
            .expect("A pulls from the registry");
    }
    let hosts_dir = a.certs_dir().to_string_lossy().into_owned();
    a.ctr([
        "-n",
        K8S_NAMESPACE,
        "images",
        "pull",
        "--all-platforms",
        "--hosts-dir",
        &hosts_dir,
        &images.multi.reference(Endpoint::Plain),
    ])
    .await
    .expect("A pulls every platform of multi");
    for image in all {
        for blob in image.all_content() {
            assert!(
                a.has_blob(&blob.digest).await.unwrap(),
                "A lacks {} of {}",
                blob.digest,
                image.name
            );
        }
    }

    let daemon = rig
        .start_spegel(0, SpegelOptions::mirror().open_cluster())
        .await
        .expect("A's daemon starts and becomes ready");
    eprintln!(
        "{name}: daemon on A ready at {} (peer {:?}) after {:?}",
        daemon.url(),
        daemon.peer_id(),
        started.elapsed()
    );

    let b_certs_before = read_tree(rig.node(1).certs_dir());
    if b_through_a == BThroughA::Yes {
        mirror_b_through_a(&rig, &daemon).await;
    }
    scenario(&rig, &daemon).await;

    // The daemon never failed a request for another reason than a miss.
    let metrics = daemon.metrics().await.unwrap();
    assert_eq!(
        metrics.sum("spegel_served_errors_total"),
        0.0,
        "{:#?}",
        metrics.all()
    );

    // Nothing went wrong inside the daemon either (warnings are shown, not judged).
    let events = daemon.events();
    for event in events.iter().filter(|e| e.level == "WARN") {
        eprintln!("daemon warning: {} {:?}", event.message, event.fields);
    }
    let errors: Vec<_> = events.iter().filter(|e| e.level == "ERROR").collect();
    assert!(errors.is_empty(), "daemon errors: {errors:#?}");

    if b_through_a == BThroughA::Yes {
        // --undo puts B's certs.d back exactly as it was (files, bytes, modes; no backup left).
        undo_mirror(rig.node(1))
            .await
            .expect("configure-mirror --undo");
        assert_eq!(
            read_tree(rig.node(1).certs_dir()),
            b_certs_before,
            "B's certs.d after --undo"
        );
    }

    eprintln!("{name}: passed in {:?}", started.elapsed());
    rig.shutdown().await.expect("clean teardown");
}

/// Points B's containerd at A's daemon with `configure-mirror`, for the registry's plain
/// listener by name and by IP, and checks the `hosts.toml` it wrote.
async fn mirror_b_through_a(rig: &Rig, daemon: &Spegel) {
    let b = rig.node(1);
    configure_mirror(b, &[daemon.url()], &registry_urls(rig, Endpoint::Plain))
        .await
        .expect("configure-mirror");
    let hosts = std::fs::read_to_string(
        b.certs_dir()
            .join(rig.registry().host(Endpoint::Plain))
            .join("hosts.toml"),
    )
    .unwrap();
    assert!(
        hosts.contains(&format!("[host.\"{}\"]", daemon.url())),
        "{hosts}"
    );
    assert!(
        hosts.contains(&format!(
            "server = \"{}\"",
            rig.registry().url(Endpoint::Plain)
        )),
        "{hosts}"
    );
}

/// skopeo on C reads manifests, configs and blobs from A's daemon by digest (skopeo sends no
/// `?ns=`): identical to the registry's bytes and hashing to their digests, for a single-platform
/// image and a two-platform index. Tags without `?ns=` are a miss, as in Spegel.
async fn scenario_skopeo_reads_identical_content_by_digest(rig: &Rig, daemon: &Spegel) {
    eprintln!("--- skopeo by digest from A's daemon");
    let c = rig.node(2);
    let a_host = daemon.registry_addr().to_string();
    let registry = rig.registry().host(Endpoint::Plain);
    let mark = daemon.log_mark();
    let images = rig.images();
    for image in [&images.four, &images.multi] {
        let from_a =
            |reference: &str| format!("docker://{a_host}/{}@{reference}", image.repository);
        let from_registry =
            |reference: &str| format!("docker://{registry}/{}@{reference}", image.repository);

        // Raw manifests (the index and every platform's manifest) and configs.
        let mut manifests: Vec<&str> = vec![image.digest()];
        manifests.extend(image.manifests.iter().map(|m| m.manifest.digest.as_str()));
        manifests.dedup();
        for digest in manifests {
            let ours = skopeo(
                c,
                &["inspect", "--raw", "--tls-verify=false", &from_a(digest)],
            )
            .await
            .expect("skopeo inspect --raw from A");
            let theirs = skopeo(
                c,
                &[
                    "inspect",
                    "--raw",
                    "--tls-verify=false",
                    &from_registry(digest),
                ],
            )
            .await
            .expect("skopeo inspect --raw from the registry");
            assert_eq!(sha256(&ours), digest, "manifest bytes from A");
            assert_eq!(
                ours, theirs,
                "manifest {digest} differs from the registry's"
            );
        }
        for manifest in &image.manifests {
            let digest = &manifest.manifest.digest;
            let config = skopeo(
                c,
                &[
                    "inspect",
                    "--config",
                    "--raw",
                    "--tls-verify=false",
                    &from_a(digest),
                ],
            )
            .await
            .expect("skopeo inspect --config from A");
            assert_eq!(
                sha256(&config),
                manifest.config.digest,
                "config bytes from A"
            );
        }

        // Whole images, every platform, into dir: layouts; compared file by file.
        let ours_dir = rig.scratch_dir().join(format!("skopeo-a-{}", image.name));
        let theirs_dir = rig.scratch_dir().join(format!("skopeo-reg-{}", image.name));
        for (source, dir) in [
            (from_a(image.digest()), &ours_dir),
            (from_registry(image.digest()), &theirs_dir),
        ] {
            let target = format!("dir:{}", dir.display());
            skopeo(
                c,
                &["copy", "--all", "--src-tls-verify=false", &source, &target],
            )
            .await
            .unwrap_or_else(|error| panic!("skopeo copy --all {source}: {error:#}"));
        }
        let ours = read_tree(&ours_dir);
        let theirs = read_tree(&theirs_dir);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "file lists of the copies of {}",
            image.name
        );
        for (path, (content, _)) in &ours {
            assert!(
                *content == theirs[path].0,
                "{} differs between the copies of {}",
                path.display(),
                image.name
            );
        }
        // Every blob and manifest is there, and hashes to its digest.
        let top = ours
            .get(Path::new("manifest.json"))
            .and_then(|(content, _)| content.as_deref())
            .expect("manifest.json");
        assert_eq!(sha256(top), image.digest());
        for blob in image.all_content() {
            if blob.digest == image.digest() {
                continue;
            }
            let hex = blob.digest.trim_start_matches("sha256:");
            let file = [
                PathBuf::from(hex),
                PathBuf::from(format!("{hex}.manifest.json")),
            ]
            .into_iter()
            .find_map(|path| ours.get(&path).and_then(|(content, _)| content.clone()));
            let file = file.unwrap_or_else(|| {
                panic!("{} missing from the copy of {}", blob.digest, image.name)
            });
            assert_eq!(sha256(&file), blob.digest);
            assert_eq!(file.len() as u64, blob.size);
        }
    }

    // Everything came from A's own store, not from the registry behind it.
    let served = daemon.served_since(mark).unwrap();
    assert!(served.iter().all(|s| s.source == "local"), "{served:#?}");
    for blob in images.four.pulled_blobs() {
        assert!(
            served
                .iter()
                .any(|s| s.digest == blob.digest && s.is_blob_get()),
            "A never served {}",
            blob.digest
        );
    }

    // A tag without `?ns=` names no registry: a miss, as in Spegel.
    let by_tag = format!(
        "docker://{a_host}/{}:{}",
        images.four.repository, images.four.tag
    );
    let error = skopeo(c, &["inspect", "--raw", "--tls-verify=false", &by_tag])
        .await
        .expect_err("a tag without ns cannot be resolved");
    let message = format!("{error:#}").to_lowercase();
    assert!(message.contains("manifest unknown"), "{message}");
}

/// Tags with `?ns=` as a peer asks (`X-Spegel-Mirrored`) resolve to the registry's exact
/// manifest bytes and headers; HEAD and ranged blob reads agree. Asked as containerd asks, while
/// the registry is reachable, a tag is a 404: containerd gets it from the registry itself.
async fn scenario_tags_resolve_with_ns(rig: &Rig, daemon: &Spegel) {
    eprintln!("--- tags through ?ns=");
    let c = rig.node(2);
    let ns = ns_query(rig);
    let registry = rig.registry().url(Endpoint::Plain);
    let accept = [("Accept", MANIFEST_ACCEPT), ("X-Spegel-Mirrored", "true")];
    let images = rig.images();
    for image in [&images.small, &images.four, &images.multi] {
        let path = format!("/v2/{}/manifests/{}", image.repository, image.tag);
        let as_containerd = daemon
            .request("GET", &format!("{path}?{ns}"), &accept[..1])
            .await
            .unwrap();
        assert_eq!(
            as_containerd.status,
            404,
            "{}: a tag while the registry is up: {}",
            image.name,
            as_containerd.text()
        );
        let ours = daemon
            .request("GET", &format!("{path}?{ns}"), &accept)
            .await
            .unwrap();
        let theirs = http_request(c, "GET", &format!("{registry}{path}"), &accept)
            .await
            .unwrap();
        assert_eq!(ours.status, 200, "{}: {}", image.name, ours.text());
        assert_eq!(theirs.status, 200);
        assert_eq!(ours.body, theirs.body, "manifest bytes of {}", image.name);
        assert_eq!(ours.header("docker-content-digest"), Some(image.digest()));
        assert_eq!(
            ours.header("content-type"),
            theirs.header("content-type"),
            "media type of {}",
            image.name
        );
        let head = daemon
            .request("HEAD", &format!("{path}?{ns}"), &accept)
            .await
            .unwrap();
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("content-length"),
            Some(theirs.body.len().to_string().as_str())
        );
        assert_eq!(head.header("docker-content-digest"), Some(image.digest()));
    }

    // A ranged read of the largest layer matches the registry's bytes.
    let layer = &images.four.layers()[3];
    let path = format!("/v2/{}/blobs/{}", images.four.repository, layer.digest);
    let range = [("Range", "bytes=1000-1999")];
    let ours: HttpResponse = daemon
        .request("GET", &format!("{path}?{ns}"), &range)
        .await
        .unwrap();
    let theirs = http_request(c, "GET", &format!("{registry}{path}"), &range)
        .await
        .unwrap();
    assert_eq!(ours.status, 206, "{}", ours.text());
    assert_eq!(ours.body.len(), 1000);
    assert_eq!(
        ours.body, theirs.body,
        "bytes 1000-1999 of {}",
        layer.digest
    );
    assert_eq!(
        ours.header("content-range"),
        Some(format!("bytes 1000-1999/{}", layer.size).as_str())
    );
}

/// B's containerd, pointed at A's daemon by `configure-mirror`, pulls every image without a
/// single request to the registry.
async fn scenario_node_b_pulls_everything_through_a(rig: &Rig, daemon: &Spegel) {
    eprintln!("--- B pulls through A (configure-mirror)");
    let b = rig.node(1);
    let images = rig.images();
    let all = [&images.small, &images.four, &images.multi];
    let before = rig.registry_log().await.unwrap();
    let metrics_before = daemon.metrics().await.unwrap();
    let mark = daemon.log_mark();
    for image in all {
        let started = Instant::now();
        let image_ref = b
            .cri_pull(&image.reference(Endpoint::Plain))
            .await
            .expect("B pulls through A");
        assert_eq!(image_ref, image.config().digest);
        eprintln!(
            "B pulled {} through A in {:?}",
            image.name,
            started.elapsed()
        );
    }

    let log = rig.registry_log().await.unwrap().since(&before);
    let from_b = log.from_client(b.ip());
    assert_eq!(
        from_b.blob_gets().count(),
        0,
        "B fetched blobs from the registry: {:#?}",
        from_b.entries()
    );
    // Tags are the registry's to answer while it is up (A answers 404): B asked it for
    // nothing else.
    let tags: Vec<&str> = all.iter().map(|image| image.tag.as_str()).collect();
    assert!(
        from_b.iter().all(|entry| entry
            .manifest_reference()
            .is_some_and(|r| tags.contains(&r))),
        "B asked the registry for more than tags: {:#?}",
        from_b.entries()
    );

    // A served every blob B needed, from its local store, and B has it all.
    let served = daemon.served_since(mark).unwrap();
    let mut wanted = BTreeSet::new();
    for image in all {
        for blob in image.pulled_blobs() {
            assert!(b.has_blob(&blob.digest).await.unwrap());
            wanted.insert(blob.digest.clone());
            assert!(
                served
                    .iter()
                    .any(|s| s.digest == blob.digest && s.is_blob_get() && s.source == "local"),
                "A did not serve {} of {}",
                blob.digest,
                image.name
            );
        }
        assert!(
            served
                .iter()
                .any(|s| s.kind == "manifest" && s.digest == image.digest()),
            "A did not serve the manifest of {}",
            image.name
        );
    }
    let metrics = daemon.metrics().await.unwrap();
    let blob_local = [("kind", "blob"), ("source", "local")];
    let delta = metrics.value(SERVED, &blob_local) - metrics_before.value(SERVED, &blob_local);
    assert!(
        delta >= wanted.len() as f64,
        "served blob counter grew by {delta}, want at least {}",
        wanted.len()
    );
}

/// Content A does not have is a quick OCI 404, and containerd on B then gets it from the
/// registry itself.
async fn scenario_misses_are_fast_404s_and_containerd_falls_back(rig: &Rig, daemon: &Spegel) {
    eprintln!("--- misses");
    let fresh = rig
        .push_image(ImageSpec::new("fresh").layers([256 * KIB]).seed(4242))
        .await
        .expect("push a brand-new image");
    let ns = ns_query(rig);
    let misses_before = daemon
        .metrics()
        .await
        .unwrap()
        .sum("spegel_served_misses_total");
    let requests = [
        (
            format!("/v2/{}/manifests/{}?{ns}", fresh.repository, fresh.tag),
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/{}/manifests/{}?{ns}", fresh.repository, fresh.digest()),
            "MANIFEST_UNKNOWN",
        ),
        (
            format!(
                "/v2/{}/blobs/{}?{ns}",
                fresh.repository,
                fresh.layers()[0].digest
            ),
            "BLOB_UNKNOWN",
        ),
        (
            format!("/v2/{}/blobs/{}", fresh.repository, fresh.config().digest),
            "BLOB_UNKNOWN",
        ),
    ];
    for (path, code) in &requests {
        let response = daemon
            .request("GET", path, &[("Accept", MANIFEST_ACCEPT)])
            .await
            .unwrap();
        assert_eq!(response.status, 404, "{path}: {}", response.text());
        assert_eq!(response.oci_error_codes().unwrap(), [*code], "{path}");
        assert!(
            response
                .header("content-type")
                .is_some_and(|value| value.starts_with("application/json")),
            "{path}: {:?}",
            response.headers
        );
        assert!(
            response.elapsed < MISS_BOUND,
            "{path} took {:?}",
            response.elapsed
        );
    }
    let head = daemon
        .request("HEAD", &requests[0].0, &[("Accept", MANIFEST_ACCEPT)])
        .await
        .unwrap();
    assert_eq!(head.status, 404);
    let misses = daemon
        .metrics()
        .await
        .unwrap()
        .sum("spegel_served_misses_total");
    assert!(
        misses >= misses_before + 4.0,
        "misses went from {misses_before} to {misses}"
    );

    // B, still mirrored through A, gets the new image from the registry after A's 404s.
    let b = rig.node(1);
    let before = rig.registry_log().await.unwrap();
    let started = Instant::now();
    b.cri_pull(&fresh.reference(Endpoint::Plain))
        .await
        .expect("B falls back to the registry");
    eprintln!("B pulled fresh (miss on A) in {:?}", started.elapsed());
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(b.ip()), once_each(&fresh));
}

/// With A's daemon dead, B's pulls go straight to the registry (connection refused is an
/// instant fallback); once it is back, B is served by A again; a graceful stop exits cleanly.
async fn scenario_dead_and_restarted_daemon(rig: &Rig, daemon: &Spegel) {
    eprintln!("--- A's daemon killed, started, restarted");
    let b = rig.node(1);
    let small = rig.images().small.clone();
    daemon.kill().await.unwrap();
    assert!(!daemon.is_running());
    b.remove_all_images().await.unwrap();
    let before = rig.registry_log().await.unwrap();
    b.cri_pull(&small.reference(Endpoint::Plain))
        .await
        .expect("B pulls with A's daemon dead");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(b.ip()), once_each(&small));

    daemon.start().await.expect("A's daemon starts again");
    b.remove_all_images().await.unwrap();
    let before = rig.registry_log().await.unwrap();
    b.cri_pull(&small.reference(Endpoint::Plain))
        .await
        .expect("B pulls through A again");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(
        log.blob_gets_by(b.ip()).len(),
        0,
        "A serves again after a start"
    );

    let status = daemon.stop().await.unwrap().expect("it was running");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    daemon
        .start()
        .await
        .expect("A's daemon starts after a stop");
    daemon.restart().await.expect("A's daemon restarts");
    let mark = daemon.log_mark();
    let layer = &small.layers()[0];
    let response = daemon
        .get(&format!("/v2/{}/blobs/{}", small.repository, layer.digest))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(sha256(&response.body), layer.digest);
    let served = daemon.served_since(mark).unwrap();
    assert!(
        served
            .iter()
            .any(|s| s.digest == layer.digest && s.source == "local"),
        "{served:#?}"
    );
}
