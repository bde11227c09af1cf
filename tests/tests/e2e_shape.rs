//! End-to-end check of the benchmarks' shaped upstream (`spegel_tests::rig::shape`): the delay
//! line between two TAP devices adds its round trip to every connect, `tc tbf` caps the rate,
//! and bytes cross intact.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_shape -- --nocapture` as root.

use std::time::Duration;

use spegel_tests::rig::{Endpoint, Rig, shape::Shaping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn shaped_link_adds_its_round_trip_caps_the_rate_and_keeps_bytes_intact() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let rig = Rig::builder().nodes(1).start().await.expect("rig starts");
    let shaping = Shaping {
        rate_bps: Some(40_000_000),
        rtt: Duration::from_millis(30),
    };
    let link = rig.shape_upstream(shaping).await.expect("link shaped");

    // A 1 MiB layer: its download is checked byte for byte against its digest.
    let small = rig.images().small.clone();
    let blob = small.layers()[0].clone();
    let measured = link
        .verify(
            &rig,
            rig.node(0),
            &small.repository,
            (&blob.digest, blob.size),
        )
        .await
        .expect("a download over the shaped link arrives intact");
    eprintln!("{}: {measured:?}", shaping.describe());
    assert!(
        measured.connect_min_ms >= 30.0,
        "a connect took {:.2} ms on a 30 ms RTT link",
        measured.connect_min_ms
    );
    assert!(
        measured.goodput_bps <= 40_000_000.0 * 1.1,
        "goodput {:.1} Mbit/s above the 40 Mbit/s rate",
        measured.goodput_bps / 1e6
    );

    // containerd pulls over it too (it verifies every digest).
    rig.node(0)
        .cri_pull(&rig.images().four.reference(Endpoint::Tls))
        .await
        .expect("CRI pull over the shaped link");

    link.remove().await;
    rig.shutdown().await.expect("clean teardown");
}
