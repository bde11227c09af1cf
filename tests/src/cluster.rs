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
    /// Per node: the CA bundle containerd trusts (`SSL_CERT_FILE`, as `install-ca`'s drop-in
    /// sets it): the node's system roots (with the rig's test CA) and the node's spegel CA.
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
/// has no mirror configuration at all); `spegel install-ca` (default: trust scoped to
/// containerd) creates each node's CA, its containerd trust bundle and the systemd drop-in under
/// the node's root ([`node_root`]); each node's containerd is restarted once as systemd would,
/// with the drop-in's `SSL_CERT_FILE` ([`restart_containerd_as_systemd`]); then the daemons
/// start, and this returns once every daemon's redirect is attached. Any `mirrored_registries`
/// in `options` is replaced.
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

/// The system CA bundle of the machine the rig runs on.
const HOST_SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Relative to a node root: the system bundle every process on the node trusts.
pub const NODE_SYSTEM_ROOTS: &str = "etc/ssl/certs/ca-certificates.crt";
/// Relative to a node root: where a Debian node keeps locally added CAs (`--host-wide`).
pub const NODE_LOCAL_ANCHORS: &str = "usr/local/share/ca-certificates";
/// Relative to a node root: where systemd keeps containerd's drop-ins.
pub const NODE_CONTAINERD_DROP_INS: &str = "etc/systemd/system/containerd.service.d";

/// The node's filesystem root as `spegel install-ca --trust-root` sees it (the rig's nodes share
/// the machine's filesystem, and a test must never change the machine's trust store or systemd
/// units): a Debian layout whose system bundle is the machine's plus the rig's test CA (the
/// registry's CA, as an operator would have added it to the node's trust store), an empty local
/// CA directory and an empty systemd unit directory. Created on first use.
pub fn node_root(rig: &Rig, node: &Node) -> Result<PathBuf> {
    let root = node.dir().join("root");
    let system_roots = root.join(NODE_SYSTEM_ROOTS);
    if !system_roots.exists() {
        for dir in [NODE_LOCAL_ANCHORS, "etc/systemd/system", "etc/ssl/certs"] {
            std::fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating {}", root.join(dir).display()))?;
        }
        let mut pem = std::fs::read_to_string(HOST_SYSTEM_ROOTS)
            .with_context(|| format!("reading {HOST_SYSTEM_ROOTS}"))?;
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        pem.push_str(rig.ca().cert_pem());
        std::fs::write(&system_roots, pem)
            .with_context(|| format!("writing {}", system_roots.display()))?;
    }
    Ok(root)
}

/// Runs `spegel install-ca` for the daemon data dir `data_dir` and `mirrored` against the
/// node's root ([`node_root`]), with `extra` arguments (e.g. `--host-wide`). Returns its
/// standard output.
pub async fn install_ca(
    rig: &Rig,
    node: &Node,
    data_dir: &Path,
    mirrored: &[String],
    extra: &[&str],
) -> Result<String> {
    let root = node_root(rig, node)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let mut data_arg = OsString::from("--data-dir=");
    data_arg.push(data_dir);
    let mut root_arg = OsString::from("--trust-root=");
    root_arg.push(&root);
    let output = tokio::process::Command::new(spegel_bin()?)
        .arg("install-ca")
        .arg(data_arg)
        .arg(format!("--mirrored-registries={}", mirrored.join(",")))
        .arg(root_arg)
        .args(extra)
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
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The environment the drop-ins for containerd's unit under the node's root set
/// (`Environment=KEY=VALUE` lines, in file-name order, as systemd applies them).
pub fn containerd_drop_in_env(rig: &Rig, node: &Node) -> Result<Vec<(String, String)>> {
    let dir = node_root(rig, node)?.join(NODE_CONTAINERD_DROP_INS);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("reading {}", dir.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    files.retain(|path| path.extension().is_some_and(|ext| ext == "conf"));
    files.sort();
    let mut env = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for line in text.lines() {
            if let Some((key, value)) = line
                .strip_prefix("Environment=")
                .and_then(|assignment| assignment.split_once('='))
            {
                env.push((key.to_owned(), value.to_owned()));
            }
        }
    }
    Ok(env)
}

/// Restarts the node's containerd as `systemctl daemon-reload && systemctl restart containerd`
/// would: with the environment its drop-ins set. Returns the `SSL_CERT_FILE` they set.
pub async fn restart_containerd_as_systemd(rig: &Rig, node: &Node) -> Result<PathBuf> {
    let env = containerd_drop_in_env(rig, node)?;
    let bundle = env
        .iter()
        .rev()
        .find(|(key, _)| key == "SSL_CERT_FILE")
        .map(|(_, value)| PathBuf::from(value))
        .with_context(|| {
            format!(
                "no drop-in for containerd on {} sets SSL_CERT_FILE",
                node.name()
            )
        })?;
    node.restart_containerd_with_env(env).await?;
    Ok(bundle)
}

/// `spegel install-ca` (trust scoped to containerd) for the node's daemon data dir, creating
/// its CA; containerd is restarted with the drop-in's `SSL_CERT_FILE` (Go reads the roots once
/// per process). Returns the bundle's path.
async fn trust_node_ca(rig: &Rig, node: &Node, mirrored: &[String]) -> Result<PathBuf> {
    let data_dir = node.dir().join("spegel");
    install_ca(rig, node, &data_dir, mirrored, &[]).await?;
    let node_ca = data_dir.join("ca");
    ensure!(
        node_ca.is_dir(),
        "install-ca did not create {}",
        node_ca.display()
    );
    restart_containerd_as_systemd(rig, node).await
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

/// Waits until `daemon` can find `digest` of `registry`'s `repository` among its peers (content
/// is advertised a moment after a pull completes). Asks without `X-Spegel-Mirrored`, so the
/// daemon looks peers up, and with `?ns=`, as containerd does: without a registry, peers answer
/// only with content they learned is public from upstream themselves, which in mirror mode they
/// never do (containerd fetches from upstream directly).
pub async fn wait_until_findable(
    daemon: &Spegel,
    registry: &str,
    repository: &str,
    digest: &str,
) -> Result<()> {
    let path = format!("/v2/{repository}/blobs/{digest}?{}", ns_query(registry));
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
/// with `tag_registry`, the manifest by tag, each with `?ns=` as containerd asks a mirror (the
/// registry named decides whether peers may share it: the rig's are public but for
/// [`Endpoint::Auth`](crate::rig::Endpoint::Auth)). Requests to the registry API that were not
/// intercepted never go upstream, so a 200 means this node or a peer has it.
pub fn content_paths(image: &TestImage, tag_registry: Option<&str>) -> Vec<String> {
    let registry = image.registry(crate::rig::Endpoint::Tls);
    let ns = ns_query(tag_registry.unwrap_or(&registry));
    let mut paths: Vec<String> = image
        .pulled_blobs()
        .iter()
        .map(|blob| format!("/v2/{}/blobs/{}?{ns}", image.repository, blob.digest))
        .collect();
    paths.push(format!(
        "/v2/{}/manifests/{}?{ns}",
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

/// Polls `daemon`'s registry API (not intercepted: local store, then peers) every `poll` until
/// every pulled blob of `image`, its manifest and, if given, its tag for registry `tag_registry`
/// are found; fails after `timeout`.
pub async fn find_all(
    daemon: &Spegel,
    image: &TestImage,
    tag_registry: Option<&str>,
    timeout: Duration,
    poll: Duration,
) -> Result<()> {
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
                .with_context(|| format!("HEAD {path} on {}", daemon.node_name()))?;
            if response.status == 200 {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{} still cannot find {path} after {:?} (last status {})",
                daemon.node_name(),
                started.elapsed(),
                response.status
            );
            tokio::time::sleep(poll).await;
        }
    }
    Ok(())
}

/// [`find_all`], polling every 250 ms; panics after `timeout`.
pub async fn wait_discoverable(
    daemon: &Spegel,
    image: &TestImage,
    tag_registry: Option<&str>,
    timeout: Duration,
) {
    let started = std::time::Instant::now();
    let poll = Duration::from_millis(250);
    if let Err(error) = find_all(daemon, image, tag_registry, timeout, poll).await {
        panic!("{error:#}");
    }
    eprintln!(
        "{} finds {} through its peers after {:?}",
        daemon.node_name(),
        image.name,
        started.elapsed()
    );
}

/// What one `spegel node-setup` run ([`node_setup`]) printed, and the containerd restarts it
/// asked for (the unit named each time).
#[derive(Debug, Clone)]
pub struct NodeSetupRun {
    pub stdout: String,
    pub restarts: Vec<String>,
}

/// Runs `spegel node-setup` as the DaemonSet's init container would, for the node's daemon data
/// dir (`<node dir>/spegel`, as [`Rig::start_spegel`] uses) and `mirrored`, against the node's
/// root ([`node_root`]), with `extra` arguments (e.g. `--undo`).
///
/// The rig's containerd is no systemd unit, so `--restart-command` reaches back into the test:
/// it connects to a listener here (loopback, the host's namespace) and names the unit; the test
/// restarts the node's containerd as `systemctl daemon-reload && systemctl restart` would — with
/// the `SSL_CERT_FILE` the drop-ins now set, or without one when none does — and answers, so the
/// command succeeds only once containerd answers again.
pub async fn node_setup(
    rig: &Rig,
    node: &Node,
    mirrored: &[String],
    extra: &[&str],
) -> Result<NodeSetupRun> {
    let root = node_root(rig, node)?;
    let data_dir = node.dir().join("spegel");
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the restart hook")?;
    let port = hook.local_addr()?.port();
    let restart_command = format!(
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && echo {{unit}} >&3 && read -r reply <&3 \
         && test \"$reply\" = restarted'"
    );
    let mut data_arg = OsString::from("--data-dir=");
    data_arg.push(&data_dir);
    let mut root_arg = OsString::from("--trust-root=");
    root_arg.push(&root);
    let mut child = tokio::process::Command::new(spegel_bin()?)
        .arg("node-setup")
        .arg(data_arg)
        .arg(format!("--mirrored-registries={}", mirrored.join(",")))
        .arg(root_arg)
        .arg(format!("--restart-command={restart_command}"))
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning spegel node-setup")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let output = tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        (out, err)
    });
    let mut restarts = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for spegel node-setup")?,
            accepted = hook.accept() => {
                let (stream, _) = accepted.context("accepting on the restart hook")?;
                restarts.push(restart_for_hook(rig, node, stream).await?);
            }
            () = &mut deadline => anyhow::bail!("spegel node-setup did not finish within 120 s"),
        }
    };
    let (out, err) = output.await.context("reading node-setup's output")?;
    let stdout = String::from_utf8_lossy(&out).into_owned();
    ensure!(
        status.success(),
        "spegel node-setup failed ({status}): {stdout}{}",
        String::from_utf8_lossy(&err)
    );
    Ok(NodeSetupRun { stdout, restarts })
}

/// Serves one restart request on the hook: reads the unit, restarts the node's containerd with
/// the environment its drop-ins set now, answers `restarted`. Returns the unit.
async fn restart_for_hook(rig: &Rig, node: &Node, stream: tokio::net::TcpStream) -> Result<String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut unit = String::new();
    tokio::io::BufReader::new(read)
        .read_line(&mut unit)
        .await
        .context("reading the unit from the restart hook")?;
    let env = containerd_drop_in_env(rig, node)?;
    if !env.iter().any(|(key, _)| key == "SSL_CERT_FILE") {
        // No drop-in sets it any more: containerd starts with its unit's own environment.
        node.containerd().remove_env("SSL_CERT_FILE");
    }
    node.restart_containerd_with_env(env).await?;
    write.write_all(b"restarted\n").await?;
    Ok(unit.trim().to_owned())
}
