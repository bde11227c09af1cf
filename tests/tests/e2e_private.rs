//! End-to-end acceptance of private images (issue 9): content a node pulled with credentials
//! reaches another node's containerd only once upstream has confirmed, with **that** node's
//! credentials, that it may read it.
//!
//! The rig registry's [`Endpoint::Auth`] listener serves the shared storage only with basic auth
//! ([`AUTH_USER`], [`AUTH_PASSWORD`]): every image there is private. Each test gets its own
//! 3-node rig in transparent mode (no `hosts.toml`; the auth listener is mirrored like the
//! others) and a private image that node A (n1) pulls through CRI with the credentials, as
//! kubelet does for a pod with an image pull secret; then, one scenario per test:
//!
//! - `refused_by_tag_without_credentials`: node B pulls it by tag with no credentials: the pull
//!   fails and none of its content reaches B's store.
//! - `refused_by_digest_without_credentials`: node B pulls it by digest (what a peer could answer
//!   alone) with no credentials: the pull fails and B's daemon counts upstream's refusal (A's
//!   copy, fetched while upstream was asked, is dropped unseen).
//! - `served_from_the_peer_with_credentials`: node C pulls it with the credentials: it gets every
//!   blob from A (no blob GET from C at the registry), each confirmed by upstream first.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_private` as root, after
//! `SPEGEL_E2E=1 cargo build --all-targets`.

use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use spegel_tests::cluster;
use spegel_tests::rig::spegel::{Spegel, SpegelOptions, rig_registry_hosts};
use spegel_tests::rig::{AUTH_PASSWORD, AUTH_USER, Endpoint, ImageSpec, KIB, MIB, Rig, TestImage};

/// A 3-node transparent rig whose node A holds a private image.
struct Private {
    rig: Rig,
    daemons: Vec<Spegel>,
    image: TestImage,
}

impl Private {
    fn dump_logs(&self) {
        for daemon in &self.daemons {
            eprintln!(
                "===== spegel on {} =====\n{}",
                daemon.node_name(),
                daemon.log_tail(60)
            );
        }
    }

    /// Whether any of the image's pulled blobs is in node `index`'s content store.
    fn holds_any_blob(&self, index: usize) -> bool {
        let content = self.rig.node(index).content_dir();
        self.image.pulled_blobs().iter().any(|blob| {
            let hex = blob.digest.trim_start_matches("sha256:");
            content.join("blobs/sha256").join(hex).exists()
        })
    }
}

async fn run_scenario(name: &str, scenario: impl for<'a> FnOnce(&'a Private) -> BoxFuture<'a, ()>) {
    let rig = Rig::builder().nodes(3).start().await.expect("rig starts");
    eprintln!("{name}: rig {}", rig.prefix());
    let hosts = rig_registry_hosts(&rig);
    let cluster = cluster::transparent_for(&rig, &hosts, SpegelOptions::transparent())
        .await
        .expect("transparent set-up");
    let image = rig
        .push_image(
            ImageSpec::new("private")
                .layers([MIB, 64 * KIB])
                .seed(rand_seed()),
        )
        .await
        .expect("push the private image");
    let private = Private {
        rig,
        daemons: cluster.daemons,
        image,
    };
    let outcome = std::panic::AssertUnwindSafe(async {
        a_pulls_with_credentials(&private).await;
        scenario(&private).await;
    })
    .catch_unwind()
    .await;
    if let Err(panic) = outcome {
        private.dump_logs();
        std::panic::resume_unwind(panic);
    }
}

/// A seed no other image of this run shares: a digest public elsewhere would be public here too.
fn rand_seed() -> u64 {
    u64::from(std::process::id()) << 16 | 0x9_000
}

/// Node A pulls the private image with the credentials, then waits until its daemon has
/// advertised the new content (so that other nodes can find it).
async fn a_pulls_with_credentials(private: &Private) {
    let a = &private.daemons[0];
    let mark = a.log_mark();
    let pulled = private
        .rig
        .node(0)
        .cri_pull_with_credentials(
            &private.image.reference(Endpoint::Auth),
            AUTH_USER,
            AUTH_PASSWORD,
        )
        .await
        .expect("A pulls the private image with credentials");
    assert_eq!(pulled, private.image.config().digest);
    a.wait_for_event(mark, Duration::from_secs(90), |event| {
        event.message == "advertised keys"
    })
    .await
    .expect("A advertises the private image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn refused_by_tag_without_credentials() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("refused_by_tag_without_credentials", |private| {
        async move {
            let pulled = private
                .rig
                .node(1)
                .cri_pull(&private.image.reference(Endpoint::Auth))
                .await;
            assert!(
                pulled.is_err(),
                "B pulled the private image by tag: {pulled:?}"
            );
            assert!(
                !private.holds_any_blob(1),
                "B's store holds private content"
            );
        }
        .boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn refused_by_digest_without_credentials() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("refused_by_digest_without_credentials", |private| {
        async move {
            let b = &private.daemons[1];
            let refused_before = b
                .metrics()
                .await
                .unwrap()
                .sum("spegel_access_refused_total");
            let pulled = private
                .rig
                .node(1)
                .cri_pull(&private.image.digest_reference(Endpoint::Auth))
                .await;
            assert!(
                pulled.is_err(),
                "B pulled the private image by digest: {pulled:?}"
            );
            assert!(
                !private.holds_any_blob(1),
                "B's store holds private content"
            );
            let refused = b
                .metrics()
                .await
                .unwrap()
                .sum("spegel_access_refused_total");
            assert!(
                refused > refused_before,
                "B's daemon did not count upstream's refusal ({refused_before} → {refused})"
            );
        }
        .boxed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn served_from_the_peer_with_credentials() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;
    run_scenario("served_from_the_peer_with_credentials", |private| {
        async move {
            let c = &private.daemons[2];
            let before = private.rig.registry().log().await.unwrap();
            let pulled = private
                .rig
                .node(2)
                .cri_pull_with_credentials(
                    &private.image.reference(Endpoint::Auth),
                    AUTH_USER,
                    AUTH_PASSWORD,
                )
                .await
                .expect("C pulls the private image with credentials");
            assert_eq!(pulled, private.image.config().digest);
            let log = private.rig.registry().log().await.unwrap().since(&before);
            let from_c = log.blob_gets_by(private.rig.node(2).ip());
            assert!(
                from_c.is_empty(),
                "C fetched blobs from the registry instead of from A: {from_c:?}"
            );
            let confirmed = c
                .metrics()
                .await
                .unwrap()
                .sum("spegel_access_confirmed_total");
            assert!(
                confirmed >= private.image.pulled_blobs().len() as f64,
                "upstream confirmed {confirmed} objects for C, fewer than the blobs it got"
            );
        }
        .boxed()
    })
    .await;
}
