//! Ready-made clusters on the rig, shared by the demo and the benchmarks.
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::rig::{
    Rig,
    spegel::{Spegel, SpegelOptions, rig_registry_hosts},
};

/// Runs spegel in transparent mode on every node of `rig`, as an operator would deploy it: the
/// rig's default `hosts.toml` files are removed (containerd has no mirror configuration at all),
/// and each node's containerd is restarted once trusting the system roots, the registry's CA and
/// that node's spegel CA (`SSL_CERT_FILE`, read once per process by Go).
pub async fn transparent(rig: &Rig, options: SpegelOptions) -> Result<Vec<Spegel>> {
    for node in rig.nodes() {
        let dir = node.certs_dir();
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let daemons = rig.start_spegel_everywhere(options).await?;
    let registries = rig_registry_hosts(rig);
    for (node, daemon) in rig.nodes().iter().zip(&daemons) {
        let bundle = node.dir().join("ca-bundle.pem");
        daemon.write_ca_bundle(&registries, &bundle).await?;
        append(&bundle, rig.ca().cert_path())?;
        node.restart_containerd_with_env([("SSL_CERT_FILE", &bundle)])
            .await?;
    }
    Ok(daemons)
}

fn append(bundle: &Path, pem: &Path) -> Result<()> {
    use std::io::Write as _;
    let extra = std::fs::read(pem).with_context(|| format!("reading {}", pem.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(bundle)
        .with_context(|| format!("opening {}", bundle.display()))?;
    file.write_all(b"\n")?;
    file.write_all(&extra)?;
    Ok(())
}

/// Waits until `daemon` can find `digest` among its peers (content is advertised a moment after
/// a pull completes). Asks without `X-Spegel-Mirrored`, so the daemon looks peers up.
pub async fn wait_until_findable(daemon: &Spegel, repository: &str, digest: &str) -> Result<()> {
    let path = format!("/v2/{repository}/blobs/{digest}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(response) = daemon.request("HEAD", &path, &[]).await
            && response.status == 200
        {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} never found {digest} among its peers",
            daemon.node_name()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
