//! A miss: a client in containerd's cgroup (so its connection is intercepted, as containerd's
//! is) asks for a blob no node has, so the node's daemon terminates TLS, finds no copy and goes
//! upstream (itself, after one claim at the blob's burst coordinator). Against: the same blob
//! straight from the registry, not intercepted. Both timed from TLS established to the first body
//! byte, each blob fetched once each way (direct first, so the registry's page cache is warm for
//! both).

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use spegel_tests::rig::{Endpoint, Rig, TestImage};

use super::client;
use super::{Row, percentile, sorted};

pub(crate) const IMAGE: &str = "micro-miss";
/// Blobs in the image.
pub(crate) const LAYERS: usize = 24;

/// Times to first byte, in ms, per blob.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct MissResult {
    pub(crate) intercepted_ms: Vec<f64>,
    pub(crate) direct_ms: Vec<f64>,
    /// Per blob: intercepted minus direct.
    pub(crate) added_ms: Vec<f64>,
}

fn p(values: &[f64], q: f64) -> f64 {
    percentile(&sorted(values.to_vec()), q)
}

impl MissResult {
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} blobs: first byte intercepted p50 {:.2} ms (direct {:.2} ms); added p50 {:.2} ms, p99 {:.2} ms",
            self.added_ms.len(),
            p(&self.intercepted_ms, 0.5),
            p(&self.direct_ms, 0.5),
            p(&self.added_ms, 0.5),
            p(&self.added_ms, 0.99)
        )
    }

    pub(crate) fn rows(&self) -> Vec<Row> {
        let ours = p(&self.intercepted_ms, 0.5);
        let theirs = p(&self.direct_ms, 0.5);
        vec![Row {
            what: format!(
                "Miss → upstream (transparent): first byte of a blob no node has, {} blobs, p50 (+added p50 / p99)",
                self.added_ms.len()
            ),
            measured: format!(
                "{ours:.2} ms (+{:.2} / +{:.2})",
                p(&self.added_ms, 0.5),
                p(&self.added_ms, 0.99)
            ),
            baseline: format!("{theirs:.2} ms (direct)"),
            ratio: Some(theirs / ours),
            goal: "≤ 20 ms added (p99)".into(),
            met: p(&self.added_ms, 0.99) <= 20.0,
        }]
    }
}

/// With spegel intercepting node A's containerd; `bundle` is what containerd trusts there.
pub(crate) async fn measure(rig: &Rig, image: &TestImage, bundle: &Path) -> Result<MissResult> {
    let node = rig.node(0);
    let base = format!(
        "https://{}/v2/{}/blobs",
        image
            .reference(Endpoint::Tls)
            .split('/')
            .next()
            .context("reference without host")?,
        image.repository
    );
    let mut result = MissResult {
        intercepted_ms: Vec::new(),
        direct_ms: Vec::new(),
        added_ms: Vec::new(),
    };
    for blob in image.layers() {
        let url = format!("{base}/{}", blob.digest);
        let direct = client::curl(node, false, Some(rig.ca().cert_path()), &url).await?;
        let ours = client::curl(node, true, Some(bundle), &url).await?;
        for (t, how) in [(&direct, "direct"), (&ours, "intercepted")] {
            ensure!(
                t.status == 200 && t.bytes == blob.size,
                "{how} GET {url}: {} with {} bytes",
                t.status,
                t.bytes
            );
        }
        let ms = |t: &client::CurlTimes| (t.first_byte - t.app_connect) * 1e3;
        result.intercepted_ms.push(ms(&ours));
        result.direct_ms.push(ms(&direct));
        result.added_ms.push(ms(&ours) - ms(&direct));
    }
    Ok(result)
}
