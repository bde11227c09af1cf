//! The store conformance suite (`spegel::store::conformance`) against a rig node's real
//! containerd after real CRI pulls: the content, labels and the three image records per image
//! that kubelet pulls leave behind, read both directly from the content directory and through
//! containerd's API. Also checks that the store follows pulls and removals through events.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_store -- --nocapture` as root.

use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use spegel::config::{Cli, Command};
use spegel::oci::digest::Digest;
use spegel::store::Store;
use spegel::store::conformance::{self, Expected, Fixture};
use spegel::store::containerd::{ContainerdArgs, ContainerdStore};
use spegel_tests::rig::{
    Endpoint, ImageSpec, KIB, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER,
    MEDIA_TYPE_MANIFEST, Node, Rig, TestImage,
};

/// How long the store may take to notice a pull or removal through containerd's events.
const EVENT_BOUND: Duration = Duration::from_secs(10);

fn digest(text: &str) -> Digest {
    text.parse()
        .unwrap_or_else(|error| panic!("bad digest {text}: {error:?}"))
}

/// The store's flags exactly as `spegel run` parses them for this node.
fn store_args(node: &Node, content_path: &Path) -> ContainerdArgs {
    let cli = Cli::try_parse_from([
        "spegel".as_ref(),
        "run".as_ref(),
        "--containerd-sock".as_ref(),
        node.socket().as_os_str(),
        "--containerd-content-path".as_ref(),
        content_path.as_os_str(),
    ])
    .expect("spegel run flags parse");
    match cli.command {
        Command::Run(args) => args.containerd,
        other => panic!("parsed {other:?}"),
    }
}

/// What a store must answer after CRI pulls (by registry name) of `pulled`; `multi`'s other
/// platform was never pulled.
fn fixture(rig: &Rig, pulled: &[&TestImage]) -> Fixture {
    let host = rig.registry().host(Endpoint::Plain);
    let mut fixture = Fixture::default();
    for image in pulled {
        let name = format!("{host}/{}", image.repository);
        fixture
            .tags
            .push((format!("{name}:{}", image.tag), digest(image.digest())));
        // CRI's other two records, and names the node never pulled, must not resolve.
        fixture.unknown_tags.extend([
            format!("{name}@{}", image.digest()),
            image.config().digest.clone(),
            format!("{name}:not-pulled"),
            format!("{}:{}", image.repository, image.tag),
            format!(
                "{}/{}:{}",
                rig.registry().ip_host(Endpoint::Plain),
                image.repository,
                image.tag
            ),
        ]);
        let present = |digest_text: &str, size: u64, media_type: &str| Expected {
            digest: digest(digest_text),
            size,
            media_type: Some(media_type.to_owned()),
            advertised: true,
        };
        if let Some(index) = &image.index {
            fixture
                .objects
                .push(present(&index.digest, index.size, MEDIA_TYPE_INDEX));
        }
        let host_manifest = image.host_manifest();
        for manifest in &image.manifests {
            if manifest == host_manifest {
                let m = &manifest.manifest;
                fixture
                    .objects
                    .push(present(&m.digest, m.size, MEDIA_TYPE_MANIFEST));
                let c = &manifest.config;
                fixture
                    .objects
                    .push(present(&c.digest, c.size, MEDIA_TYPE_CONFIG));
                for layer in &manifest.layers {
                    fixture
                        .objects
                        .push(present(&layer.digest, layer.size, MEDIA_TYPE_LAYER));
                }
            } else {
                fixture.absent.extend(
                    std::iter::once(&manifest.manifest)
                        .chain(manifest.blobs())
                        .map(|blob| digest(&blob.digest)),
                );
            }
        }
    }
    fixture.unknown_tags.push(format!("{host}/rig/absent:v1"));
    fixture.absent.push(Digest::of(b"e2e_store: never stored"));
    fixture
}

/// Polls `check` until it holds or `EVENT_BOUND` passes (no refresh call: events must do it).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT_BOUND;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {EVENT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn containerd_store_conforms_after_real_cri_pulls() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let rig = Rig::builder().nodes(1).start().await.expect("rig starts");
    let node = rig.node(0);
    let images = rig.images().clone();
    let pulled = [&images.small, &images.four, &images.multi];
    for image in pulled {
        node.cri_pull(&image.reference(Endpoint::Plain))
            .await
            .expect("CRI pull");
    }
    let fixture = fixture(&rig, &pulled);
    assert_eq!(fixture.tags.len(), 3);
    assert_eq!(
        fixture.objects.len(),
        3 + 6 + 4,
        "manifest, config and layers of small and four; multi's index and amd64 manifest, config, layer"
    );
    assert_eq!(
        fixture.absent.len(),
        4,
        "multi's other platform and one never stored"
    );

    // Reading the content directory directly, and (with a path that does not exist) through
    // containerd's Content API: both must pass the whole suite.
    let direct = ContainerdStore::connect(&store_args(node, &node.content_dir()))
        .await
        .expect("store connects");
    assert_eq!(
        direct.blobs_dir(),
        Some(node.content_dir().join("blobs").join("sha256").as_path())
    );
    let missing = rig.scratch_dir().join("no-such-content-dir");
    let via_api = ContainerdStore::connect(&store_args(node, &missing))
        .await
        .expect("store connects");
    assert_eq!(via_api.blobs_dir(), None);
    for (how, store) in [("direct reads", &direct), ("Content API", &via_api)] {
        if let Err(failures) = conformance::check(store, &fixture).await {
            panic!("{how}: {failures}");
        }
    }

    // A pull while connected: the image event makes the store advertise it, no refresh needed.
    let fresh = rig
        .push_image(
            ImageSpec::new("fresh")
                .layers([100 * KIB, 300 * KIB])
                .seed(77),
        )
        .await
        .expect("push");
    let fresh_tag = format!(
        "{}/{}:{}",
        rig.registry().host(Endpoint::Plain),
        fresh.repository,
        fresh.tag
    );
    let mut changes = direct.changes();
    changes.mark_unchanged();
    node.cri_pull(&fresh.reference(Endpoint::Plain))
        .await
        .expect("CRI pull");
    eventually("the new image is advertised", async || {
        direct
            .keys()
            .await
            .is_ok_and(|keys| keys.tags.contains(&fresh_tag))
    })
    .await;
    assert!(changes.has_changed().unwrap(), "changes() moved");
    assert_eq!(
        direct.resolve(&fresh_tag).await.unwrap(),
        digest(fresh.digest())
    );
    let keys = direct.keys().await.unwrap();
    for blob in fresh.pulled_blobs() {
        assert!(
            keys.digests.contains(&digest(&blob.digest)),
            "{}",
            blob.digest
        );
    }

    // Removing every image (and the content, by GC) withdraws everything.
    node.remove_all_images().await.expect("remove images");
    eventually("nothing is advertised after removal", async || {
        direct
            .keys()
            .await
            .is_ok_and(|keys| keys.tags.is_empty() && keys.digests.is_empty())
    })
    .await;
    assert!(direct.resolve(&fresh_tag).await.is_err());
    assert!(
        direct
            .descriptor(&digest(&images.four.layers()[0].digest))
            .await
            .is_err(),
        "garbage-collected content is gone"
    );

    drop((direct, via_api));
    rig.shutdown().await.expect("clean teardown");
}
