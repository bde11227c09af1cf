//! Ready-made clusters on the rig, shared by the end-to-end tests, the demo and the benchmarks:
//! the one way to bring up spegel in transparent mode on every node.
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};

use crate::rig::{
    Node, Rig, TestImage,
    spegel::{LogMark, Spegel, SpegelOptions, rig_registry_hosts},
    spegel_bin,
};

/// Transparent spegel on every node of a rig, as [`transparent_for`] set it up.
pub struct Transparent {
    /// Per node (in node order): its daemon, intercepting containerd's registry connections.
    pub daemons: Vec<Spegel>,
    /// Per node: the CA bundle containerd trusts (`SSL_CERT_FILE`): the system roots, the node's
    /// spegel CA and the rig's test CA.
    pub bundles: Vec<PathBuf>,
}

/// Runs spegel in transparent mode on every node of `rig` for the rig registry's listeners (by
/// name and by IP); see [`transparent_for`]. Any `mirrored_registries` in `options` is replaced.
pub async fn transparent(rig: &Rig, options: SpegelOptions) -> Result<Vec<Spegel>> {
    let cluster = transparent_for(rig, &rig_registry_hosts(rig), options).await?;
    Ok(cluster.daemons)
}

/// Runs spegel in transparent mode on every node of `rig`, mirroring `mirrored` (`host:port`),
/// as an operator would deploy it: the rig's default `hosts.toml` files are removed (containerd
/// has no mirror configuration at all); `spegel install-ca --bundle` creates each node's CA, and
/// each node's containerd is restarted once trusting that bundle plus the rig's CA
/// (`SSL_CERT_FILE`, read once per process by Go); then the daemons start, and this returns once
/// every daemon's redirect is attached. Any `mirrored_registries` in `options` is replaced.
pub async fn transparent_for(
    rig: &Rig,
    mirrored: &[String],
    options: SpegelOptions,
) -> Result<Transparent> {
    for node in rig.nodes() {
        remove_hosts_toml(node)?;
    }
    let bundles = futures::future::try_join_all(
        rig.nodes()
            .iter()
            .map(|node| trust_node_ca(rig, node, mirrored)),
    )
    .await?;
    let options = options.mirrored_registries(mirrored.iter().cloned());
    let daemons = rig.start_spegel_everywhere(options).await?;
    for daemon in &daemons {
        wait_attached(daemon, LogMark::default()).await?;
    }
    Ok(Transparent { daemons, bundles })
}

/// Deletes everything under the node's `certs.d` (the rig writes a default `hosts.toml` per
/// registry listener): transparent mode must work without any.
fn remove_hosts_toml(node: &Node) -> Result<()> {
    let dir = node.certs_dir();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// `spegel install-ca --bundle` for the node's daemon data dir (creating its CA), plus the rig
/// CA, as containerd's `SSL_CERT_FILE`; containerd is restarted to load it (Go reads the roots
/// once per process). Returns the bundle's path.
async fn trust_node_ca(rig: &Rig, node: &Node, mirrored: &[String]) -> Result<PathBuf> {
    let data_dir = node.dir().join("spegel");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let bundle = node.dir().join("ca-bundle.pem");
    let mut data_arg = OsString::from("--data-dir=");
    data_arg.push(&data_dir);
    let mut bundle_arg = OsString::from("--bundle=");
    bundle_arg.push(&bundle);
    let output = tokio::process::Command::new(spegel_bin()?)
        .arg("install-ca")
        .arg(data_arg)
        .arg(format!("--mirrored-registries={}", mirrored.join(",")))
        .arg(bundle_arg)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .await
        .context("spawning spegel install-ca")?;
    ensure!(
        output.status.success(),
        "spegel install-ca failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let node_ca = data_dir.join("ca");
    ensure!(
        node_ca.is_dir(),
        "install-ca did not create {}",
        node_ca.display()
    );
    append_rig_ca(&bundle, rig.ca().cert_pem())?;
    node.restart_containerd_with_env([("SSL_CERT_FILE", &bundle)])
        .await?;
    Ok(bundle)
}

/// Appends the rig CA's PEM to the bundle at `bundle`, on a line of its own.
fn append_rig_ca(bundle: &Path, ca_pem: &str) -> Result<()> {
    let mut pem =
        std::fs::read_to_string(bundle).with_context(|| format!("reading {}", bundle.display()))?;
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem.push_str(ca_pem);
    std::fs::write(bundle, pem).with_context(|| format!("writing {}", bundle.display()))
}

/// Waits until `daemon` logged (after `mark`) that its redirect programs are attached.
pub async fn wait_attached(daemon: &Spegel, mark: LogMark) -> Result<()> {
    daemon
        .wait_for_event(mark, Duration::from_secs(30), |event| {
            event.message.starts_with("eBPF redirect attached")
                || event.message.starts_with("eBPF redirect re-attached")
        })
        .await
        .map(drop)
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

/// `registry:port` percent-encoded for `?ns=`.
pub fn ns_query(host: &str) -> String {
    format!("ns={}", host.replace(':', "%3A"))
}

/// The registry API paths of `image`'s content: every pulled blob, the manifest by digest and,
/// with `tag_registry`, the manifest by tag (`?ns=` as containerd asks).
pub fn content_paths(image: &TestImage, tag_registry: Option<&str>) -> Vec<String> {
    let mut paths: Vec<String> = image
        .pulled_blobs()
        .iter()
        .map(|blob| format!("/v2/{}/blobs/{}", image.repository, blob.digest))
        .collect();
    paths.push(format!(
        "/v2/{}/manifests/{}",
        image.repository,
        image.digest()
    ));
    if let Some(registry) = tag_registry {
        paths.push(format!(
            "/v2/{}/manifests/{}?{}",
            image.repository,
            image.tag,
            ns_query(registry)
        ));
    }
    paths
}

/// Polls `daemon`'s registry API (not intercepted: local store, then peers) until every pulled
/// blob of `image`, its manifest and, if given, its tag for registry `tag_registry` are found;
/// panics after `timeout`.
pub async fn wait_discoverable(
    daemon: &Spegel,
    image: &TestImage,
    tag_registry: Option<&str>,
    timeout: Duration,
) {
    let started = std::time::Instant::now();
    for path in content_paths(image, tag_registry) {
        loop {
            let response = daemon
                .request(
                    "HEAD",
                    &path,
                    &[("Accept", crate::rig::spegel::MANIFEST_ACCEPT)],
                )
                .await
                .unwrap_or_else(|error| panic!("HEAD {path} on {}: {error:#}", daemon.node_name()));
            if response.status == 200 {
                break;
            }
            assert!(
                started.elapsed() < timeout,
                "{} still cannot find {path} after {:?} (last status {})",
                daemon.node_name(),
                started.elapsed(),
                response.status
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!(
        "{} finds {} through its peers after {:?}",
        daemon.node_name(),
        image.name,
        started.elapsed()
    );
}
