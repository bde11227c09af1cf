//! The daemon's memory with many advertised keys: node A's containerd gets images holding more
//! than `keys` digests and tags (imported, not pulled: an OCI archive of small distinct blobs),
//! and node A's daemon advertises them all to node B's. Baseline: the same daemon, same run,
//! before the import.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Digest as _, Sha256};
use spegel_tests::rig::{Endpoint, Platform, Rig, spegel::SpegelOptions};
use tokio::time::Instant;

use super::Row;

/// Layers per imported image: with its manifest, config and tag, 103 keys per image.
const LAYERS_PER_IMAGE: usize = 100;
const KEYS_PER_IMAGE: usize = LAYERS_PER_IMAGE + 3;
/// The goal's bound.
const GOAL_MIB: f64 = 48.0;
const ADVERTISE_PATIENCE: Duration = Duration::from_secs(300);
/// Time for the provides to go out once every key is taken up.
const SETTLE: Duration = Duration::from_secs(15);

#[derive(Debug, serde::Serialize)]
pub(crate) struct RssResult {
    pub(crate) keys_advertised: u64,
    pub(crate) baseline_keys: u64,
    pub(crate) baseline_rss_kib: u64,
    pub(crate) rss_kib: u64,
    pub(crate) peak_rss_kib: u64,
    pub(crate) import_secs: f64,
    pub(crate) advertise_secs: f64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl RssResult {
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} keys advertised: RSS {:.1} MiB (peak {:.1}), with {} keys {:.1} MiB; import {:.1} s, all advertised {:.1} s later",
            self.keys_advertised,
            mib(self.rss_kib),
            mib(self.peak_rss_kib),
            self.baseline_keys,
            mib(self.baseline_rss_kib),
            self.import_secs,
            self.advertise_secs
        )
    }

    pub(crate) fn rows(&self) -> Vec<Row> {
        vec![Row {
            what: format!(
                "Daemon RSS with {} advertised keys (peak in brackets)",
                self.keys_advertised
            ),
            measured: format!(
                "{:.1} MiB ({:.1})",
                mib(self.rss_kib),
                mib(self.peak_rss_kib)
            ),
            baseline: format!(
                "{:.1} MiB ({} keys)",
                mib(self.baseline_rss_kib),
                self.baseline_keys
            ),
            ratio: None,
            goal: format!("≤ {GOAL_MIB} MiB"),
            met: mib(self.rss_kib) <= GOAL_MIB,
        }]
    }
}

pub(crate) async fn run(rig: &Rig, keys: usize) -> Result<RssResult> {
    let archive = rig.scratch_dir().join("rss-images.tar");
    let images = keys.div_ceil(KEYS_PER_IMAGE).max(1);
    write_archive(&archive, &rig.registry().host(Endpoint::Tls), images)?;
    let daemons = rig
        .start_spegel_everywhere(SpegelOptions::mirror().log("warn"))
        .await?;
    let result = measure(rig, &daemons[0], &archive, keys).await;
    for daemon in &daemons {
        daemon.stop().await?;
    }
    rig.node(0).remove_all_images().await?;
    result
}

async fn advertised(daemon: &spegel_tests::rig::spegel::Spegel) -> Result<u64> {
    Ok(daemon
        .metrics()
        .await?
        .get("spegel_advertised_keys", &[])
        .unwrap_or(0.0) as u64)
}

async fn measure(
    rig: &Rig,
    daemon: &spegel_tests::rig::spegel::Spegel,
    archive: &Path,
    keys: usize,
) -> Result<RssResult> {
    let pid = daemon.daemon_pid()?;
    tokio::time::sleep(SETTLE).await;
    let baseline_keys = advertised(daemon).await?;
    let baseline_rss_kib = super::proc_status_kib(pid, "VmRSS").context("daemon RSS")?;

    let started = Instant::now();
    let output = rig
        .node(0)
        .ctr([
            "-n".as_ref(),
            "k8s.io".as_ref(),
            "images".as_ref(),
            "import".as_ref(),
            "--no-unpack".as_ref(),
            archive.as_os_str(),
        ])
        .await?;
    ensure!(
        output.status.success(),
        "ctr import: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let import_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let keys_advertised = loop {
        let n = advertised(daemon).await?;
        if n >= keys as u64 {
            break n;
        }
        if started.elapsed() > ADVERTISE_PATIENCE {
            bail!("only {n} of {keys} keys advertised after {ADVERTISE_PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let advertise_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    Ok(RssResult {
        keys_advertised: advertised(daemon).await?.max(keys_advertised),
        baseline_keys,
        baseline_rss_kib,
        rss_kib: super::proc_status_kib(pid, "VmRSS").context("daemon RSS")?,
        peak_rss_kib: super::proc_status_kib(pid, "VmHWM").context("daemon peak RSS")?,
        import_secs,
        advertise_secs,
    })
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": digest(bytes),
        "size": bytes.len(),
    })
}

/// An OCI archive of `images` images named `<host>/rss/img-<n>:v1`, each of
/// [`LAYERS_PER_IMAGE`] small distinct layers.
fn write_archive(path: &Path, host: &str, images: usize) -> Result<()> {
    let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let add = |tar: &mut tar::Builder<_>, name: String, bytes: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes)?;
        Ok(())
    };
    let blob_name = |bytes: &[u8]| format!("blobs/sha256/{}", &digest(bytes)["sha256:".len()..]);
    let platform = Platform::host();
    let mut manifests = Vec::new();
    for image in 0..images {
        let layers: Vec<Vec<u8>> = (0..LAYERS_PER_IMAGE)
            .map(|l| format!("spegel rss benchmark: image {image}, layer {l}\n").into_bytes())
            .collect();
        for layer in &layers {
            add(&mut tar, blob_name(layer), layer)?;
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| digest(l)).collect::<Vec<_>>(),
            },
            "config": {},
        }))?;
        add(&mut tar, blob_name(&config), &config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers
                .iter()
                .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
                .collect::<Vec<_>>(),
        }))?;
        add(&mut tar, blob_name(&manifest), &manifest)?;
        let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
        entry["platform"] = serde_json::json!({
            "architecture": platform.architecture,
            "os": platform.os,
        });
        entry["annotations"] = serde_json::json!({
            "io.containerd.image.name": format!("{host}/rss/img-{image}:v1"),
            "org.opencontainers.image.ref.name": "v1",
        });
        manifests.push(entry);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    add(&mut tar, "index.json".into(), &index)?;
    add(
        &mut tar,
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}
