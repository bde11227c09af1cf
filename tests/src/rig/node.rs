//! A rig node: a network namespace with its own containerd 1.6, cgroup, certs.d and helpers to
//! pull, inspect and restart it and to run more processes "on" it.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cmd;
use super::cri::{self, ContentInfo, CriImage, ImageRecord, K8S_NAMESPACE};
use super::process::{DEFAULT_STOP_GRACE, Process, ProcessSpec, ProcessTable};
use super::registry::Endpoint;

/// How long containerd may take to answer on its socket after start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The upstream registry as nodes see it (for default and mirror `hosts.toml` files).
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    pub(crate) hostname: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) ca_cert: PathBuf,
}

impl Upstream {
    /// The `host:port` spellings a reference to this endpoint can use (name first, then IP).
    fn hosts(&self, endpoint: Endpoint) -> [String; 2] {
        [
            format!("{}:{}", self.hostname, endpoint.port()),
            format!("{}:{}", self.ip, endpoint.port()),
        ]
    }
}

/// One `[host."<url>"]` entry of a containerd `hosts.toml`: a mirror tried before the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    /// `http://127.0.0.1:30020`, `https://10.64.3.12:30021`, ...
    pub url: String,
    /// Usually `["pull", "resolve"]`.
    pub capabilities: Vec<String>,
    /// A CA certificate to trust for this host.
    pub ca: Option<PathBuf>,
    /// Skip TLS verification for this host.
    pub skip_verify: bool,
    /// Use the URL's path as-is instead of appending `/v2`.
    pub override_path: bool,
}

impl HostEntry {
    /// A pull/resolve mirror at `url`.
    pub fn mirror(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            capabilities: vec!["pull".to_owned(), "resolve".to_owned()],
            ca: None,
            skip_verify: false,
            override_path: false,
        }
    }

    /// Trusts `ca` (a PEM file) for this host.
    pub fn with_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.ca = Some(ca.into());
        self
    }
}

/// Everything [`Node::launch`] needs.
pub(crate) struct NodeSetup {
    pub(crate) index: usize,
    pub(crate) netns: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) dir: PathBuf,
    pub(crate) cgroup_dir: PathBuf,
    pub(crate) processes: Arc<ProcessTable>,
    pub(crate) upstream: Upstream,
    pub(crate) env: Vec<(String, String)>,
}

/// A rig node. Obtain with [`Rig::node`](super::Rig::node).
#[derive(Debug)]
pub struct Node {
    index: usize,
    name: String,
    netns: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    socket: PathBuf,
    certs_dir: PathBuf,
    cgroup_dir: PathBuf,
    containerd: Process,
    processes: Arc<ProcessTable>,
    upstream: Upstream,
}

impl Node {
    /// Creates the node's folders and config and starts its containerd; returns once it answers.
    pub(crate) async fn launch(setup: NodeSetup) -> Result<Self> {
        let NodeSetup {
            index,
            netns,
            ip,
            dir,
            cgroup_dir,
            processes,
            upstream,
            env,
        } = setup;
        let name = node_name(index);
        let socket = dir.join("containerd.sock");
        let certs_dir = dir.join("certs.d");
        for sub in ["root", "state", "opt", "cni"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        std::fs::create_dir_all(&certs_dir)
            .with_context(|| format!("creating {}", certs_dir.display()))?;
        let config = dir.join("config.toml");
        std::fs::write(&config, containerd_config(&dir, &socket, &certs_dir))
            .with_context(|| format!("writing {}", config.display()))?;
        let cgroup_name = cgroup_dir
            .file_name()
            .and_then(OsStr::to_str)
            .context("node cgroup directory has no name")?
            .to_owned();
        let spec = ProcessSpec::new(format!("containerd-{name}"), "containerd")
            .arg("--config")
            .arg(&config)
            .cgroup(cgroup_name)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let containerd = processes.spawn(spec, Some(netns.clone()))?;
        let node = Self {
            index,
            name,
            netns,
            ip,
            dir,
            socket,
            certs_dir,
            cgroup_dir,
            containerd,
            processes,
            upstream,
        };
        for endpoint in Endpoint::ALL {
            node.set_mirrors(endpoint, &[])?;
        }
        node.wait_ready().await?;
        Ok(node)
    }

    /// 0-based position in the rig.
    pub fn index(&self) -> usize {
        self.index
    }

    /// `n1`, `n2`, ... (1-based, as in the namespace and cgroup names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace (`<prefix>-n1`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// An unconnected TCP socket in this node's network namespace: a connection made with it
    /// comes from a process on the node (as containerd's do), not from the network.
    pub fn tcp_socket(&self) -> Result<tokio::net::TcpSocket> {
        super::net::in_netns(&self.netns, || {
            tokio::net::TcpSocket::new_v4().context("a TCP socket")
        })
    }

    /// The node's address on the bridge (`.11`, `.12`, ...); the registry log shows it as client.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The node's folder (containerd root, state, config, certs.d).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's gRPC socket (reachable from the host: Unix sockets ignore network namespaces).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `config_path` folder holding `<host:port>/hosts.toml` files (re-read on every pull).
    pub fn certs_dir(&self) -> &Path {
        &self.certs_dir
    }

    /// containerd's cgroup2 directory (`<cg2>/<prefix>/n1`), where eBPF programs attach.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// A command running `program` in the node's namespace, inside containerd's cgroup
    /// (`in_cgroup`: the node's spegel intercepts its connections as it would containerd's) or
    /// not; with only `PATH` in its environment, no stdin, and killed when dropped.
    pub fn command(&self, in_cgroup: bool, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("sh");
        if in_cgroup {
            command
                .arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(self.cgroup_dir.join("cgroup.procs"));
        } else {
            command.arg("-c").arg(r#"exec "$@""#).arg("sh");
        }
        command
            .args(["ip", "netns", "exec", &self.netns, program])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// containerd's content store root (`<root>/io.containerd.content.v1.content`).
    pub fn content_dir(&self) -> PathBuf {
        self.dir
            .join("root")
            .join("io.containerd.content.v1.content")
    }

    /// The containerd process.
    pub fn containerd(&self) -> &Process {
        &self.containerd
    }

    // === Pulls and image inspection ===

    /// Pulls like kubelet: CRI `PullImage`, performed inside containerd. Returns the image ref
    /// (the config digest).
    pub async fn cri_pull(&self, reference: &str) -> Result<String> {
        cri::cri_pull(&self.socket, reference, None)
            .await
            .with_context(|| format!("on node {}", self.name))
    }

    /// CRI `PullImage` with a pull secret's user and password, as kubelet does for a pod
    /// that names one.
    pub async fn cri_pull_with_credentials(
        &self,
        reference: &str,
        user: &str,
        password: &str,
    ) -> Result<String> {
        cri::cri_pull(&self.socket, reference, Some((user, password)))
            .await
            .with_context(|| format!("on node {}", self.name))
    }

    /// CRI `ListImages`.
    pub async fn cri_images(&self) -> Result<Vec<CriImage>> {
        cri::cri_images(&self.socket).await
    }

    /// CRI `RemoveImage`.
    pub async fn cri_remove(&self, reference: &str) -> Result<()> {
        cri::cri_remove(&self.socket, reference).await
    }

    /// Pulls with `ctr -n k8s.io images pull --hosts-dir <certs.d>` (the download happens in the
    /// `ctr` process, not in containerd). `ctr` runs in the node's namespace *and* containerd's
    /// cgroup, so cgroup-attached interception applies to it too.
    pub async fn ctr_pull(&self, reference: &str) -> Result<Output> {
        let hosts_dir = self.certs_dir.to_string_lossy().into_owned();
        self.ctr([
            "-n",
            K8S_NAMESPACE,
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            reference,
        ])
        .await
    }

    /// Runs `ctr -a <socket> <args>` in the node (namespace and containerd's cgroup).
    pub async fn ctr<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let procs = self.cgroup_dir.join("cgroup.procs");
        let mut argv: Vec<std::ffi::OsString> = vec![
            "-c".into(),
            r#"echo $$ > "$0" && exec "$@""#.into(),
            procs.into_os_string(),
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.netns.clone().into(),
            "ctr".into(),
            "-a".into(),
            self.socket.clone().into_os_string(),
        ];
        argv.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        cmd::run("sh", argv).await
    }

    /// Image records in a containerd namespace (`k8s.io` for CRI, see [`K8S_NAMESPACE`]).
    pub async fn images(&self, namespace: &str) -> Result<Vec<ImageRecord>> {
        cri::images(&self.socket, namespace).await
    }

    /// Deletes every image record in every namespace and waits for garbage collection, leaving
    /// an empty content store (a node that has never pulled anything).
    pub async fn remove_all_images(&self) -> Result<()> {
        for namespace in cri::namespaces(&self.socket).await? {
            let records = cri::images(&self.socket, &namespace).await?;
            let count = records.len();
            for (position, record) in records.into_iter().enumerate() {
                // Synchronous GC once, after the last delete, is enough to drop the content.
                let last = position + 1 == count;
                cri::delete_image(&self.socket, &namespace, &record.name, last).await?;
            }
        }
        Ok(())
    }

    /// Content.Info of a blob in `k8s.io`; `None` if the node does not have it.
    pub async fn content_info(&self, digest: &str) -> Result<Option<ContentInfo>> {
        cri::content_info(&self.socket, K8S_NAMESPACE, digest).await
    }

    /// Deletes every record of `image` (by tag, by digest, and the image ID CRI names it by)
    /// and garbage-collects, then checks its layers are gone. With `keep_config` the config blob
    /// survives as a GC root that no longer pins the unpacked snapshots, so a later pull fetches
    /// the layers but not the config.
    pub async fn forget_image(&self, image: &super::TestImage, keep_config: bool) -> Result<()> {
        let config = image.config().digest.clone();
        if keep_config {
            self.ctr([
                "-n",
                K8S_NAMESPACE,
                "content",
                "label",
                &config,
                "containerd.io/gc.root=spegel-tests",
                "containerd.io/gc.ref.snapshot.overlayfs=",
            ])
            .await
            .context("relabel the config")?;
        }
        let names = [
            image.reference(Endpoint::Plain),
            image.digest_reference(Endpoint::Plain),
            config.clone(),
        ];
        let mut args = vec!["-n", K8S_NAMESPACE, "images", "rm", "--sync"];
        args.extend(names.iter().map(String::as_str));
        self.ctr(args).await.context("ctr images rm")?;
        for layer in image.layers() {
            if self.has_blob(&layer.digest).await? {
                bail!("{} kept layer {}", self.name(), layer.digest);
            }
        }
        if self.has_blob(&config).await? != keep_config {
            bail!("{}: config present is not {keep_config}", self.name());
        }
        Ok(())
    }

    /// Whether the node's `k8s.io` content store has the blob.
    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.content_info(digest).await?.is_some())
    }

    /// Every blob in the node's `k8s.io` content store.
    pub async fn blobs(&self) -> Result<Vec<ContentInfo>> {
        cri::list_content(&self.socket, K8S_NAMESPACE).await
    }

    /// Reads a whole blob through containerd's Content.Read (digest verified).
    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        cri::read_content(&self.socket, K8S_NAMESPACE, digest).await
    }

    // === Registry configuration (hosts.toml) ===

    /// Writes `certs.d/<registry_host>/hosts.toml` with `server` as upstream (top-level `ca`
    /// applies to it) and `hosts` tried first, in order. `registry_host` is `host:port` as written
    /// in image references, or `_default`.
    pub fn write_hosts_toml(
        &self,
        registry_host: &str,
        server: Option<&str>,
        server_ca: Option<&Path>,
        hosts: &[HostEntry],
    ) -> Result<PathBuf> {
        let dir = self.certs_dir.join(registry_host);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("hosts.toml");
        std::fs::write(&path, hosts_toml(server, server_ca, hosts))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Points pulls from the rig registry's `endpoint` at `mirrors` first (then the registry
    /// itself), for references by name and by IP. An empty slice restores the default (registry
    /// only). Takes effect on the next pull; containerd needs no restart.
    pub fn set_mirrors(&self, endpoint: Endpoint, mirrors: &[HostEntry]) -> Result<()> {
        for host in self.upstream.hosts(endpoint) {
            let server = format!("{}://{host}", endpoint.scheme());
            let ca = (endpoint == Endpoint::Tls).then_some(self.upstream.ca_cert.as_path());
            self.write_hosts_toml(&host, Some(&server), ca, mirrors)?;
        }
        Ok(())
    }

    // === containerd lifecycle ===

    /// Restarts containerd (SIGTERM, wait, start, wait until it answers) with its current env.
    pub async fn restart_containerd(&self) -> Result<()> {
        self.stop_containerd().await?;
        self.start_containerd().await
    }

    /// Restarts containerd with `env` added to (or replacing entries of) its environment, e.g.
    /// `[("SSL_CERT_FILE", bundle)]` to make it trust another CA. The env sticks for later restarts.
    pub async fn restart_containerd_with_env<I, K, V>(&self, env: I) -> Result<()>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in env {
            self.containerd.set_env(key, value);
        }
        self.restart_containerd().await
    }

    /// Stops containerd (SIGTERM, then SIGKILL after the grace period).
    pub async fn stop_containerd(&self) -> Result<()> {
        self.containerd.stop(DEFAULT_STOP_GRACE).await?;
        Ok(())
    }

    /// Starts containerd again and waits until it answers.
    pub async fn start_containerd(&self) -> Result<()> {
        self.containerd.start().await?;
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let Err(error) = cri::version(&self.socket).await else {
                return Ok(());
            };
            if !self.containerd.is_running() {
                bail!(
                    "containerd on {} exited during start-up; log tail:\n{}",
                    self.name,
                    self.containerd.log_tail(30)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "containerd on {} did not answer within {READY_TIMEOUT:?} ({error:#}); log tail:\n{}",
                    self.name,
                    self.containerd.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // === Other processes and the network ===

    /// Starts a long-running process in this node's namespace (see [`ProcessSpec`] for the
    /// namespace mode, cgroup and env). Teardown stops it.
    pub fn spawn(&self, spec: ProcessSpec) -> Result<Process> {
        self.processes.spawn(spec, Some(self.netns.clone()))
    }

    /// Runs a short command in the node's namespace (`ip netns exec`), failing on a non-zero exit.
    pub async fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv: Vec<std::ffi::OsString> = vec![
            "netns".into(),
            "exec".into(),
            self.netns.clone().into(),
            program.into(),
        ];
        argv.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        cmd::run("ip", argv).await
    }

    /// Takes the node's `eth0` down: peers see no ARP answer (~3 s per request in containerd 1.6).
    pub async fn link_down(&self) -> Result<()> {
        cmd::run("ip", ["-n", &self.netns, "link", "set", "eth0", "down"]).await?;
        Ok(())
    }

    /// Brings `eth0` back up.
    pub async fn link_up(&self) -> Result<()> {
        cmd::run("ip", ["-n", &self.netns, "link", "set", "eth0", "up"]).await?;
        Ok(())
    }
}

/// `n1` for index 0.
pub(crate) fn node_name(index: usize) -> String {
    format!("n{}", index + 1)
}

/// containerd 1.6 config: every path under the node's folder, overlayfs, CRI on, layers kept
/// after unpack (a P2P mirror serves them from the content store), registry config from certs.d.
fn containerd_config(dir: &Path, socket: &Path, certs_dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that cannot work here only add start-up time and log noise.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        socket = socket.display(),
        certs = certs_dir.display(),
    )
}

fn hosts_toml(server: Option<&str>, server_ca: Option<&Path>, hosts: &[HostEntry]) -> String {
    let mut text = String::new();
    if let Some(server) = server {
        text.push_str(&format!("server = {}\n", toml_string(server)));
    }
    if let Some(ca) = server_ca {
        text.push_str(&format!("ca = {}\n", toml_string(&ca.to_string_lossy())));
    }
    if hosts.is_empty() {
        // containerd 1.6 rejects a file without a `host` table ("invalid `host` tree") and then
        // falls back to https for the server; an empty table means "just the server".
        text.push_str("\n[host]\n");
    }
    for host in hosts {
        text.push_str(&format!("\n[host.{}]\n", toml_string(&host.url)));
        let capabilities: Vec<String> = host.capabilities.iter().map(|c| toml_string(c)).collect();
        text.push_str(&format!("  capabilities = [{}]\n", capabilities.join(", ")));
        if let Some(ca) = &host.ca {
            text.push_str(&format!("  ca = {}\n", toml_string(&ca.to_string_lossy())));
        }
        if host.skip_verify {
            text.push_str("  skip_verify = true\n");
        }
        if host.override_path {
            text.push_str("  override_path = true\n");
        }
    }
    text
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_lists_mirrors_before_the_server() {
        let text = hosts_toml(
            Some("https://registry.x.test:5443"),
            Some(Path::new("/s/ca.crt")),
            &[
                HostEntry::mirror("http://127.0.0.1:30020"),
                HostEntry::mirror("https://10.1.2.12:30021").with_ca("/s/peer.crt"),
            ],
        );
        assert_eq!(
            text,
            "server = \"https://registry.x.test:5443\"\n\
             ca = \"/s/ca.crt\"\n\
             \n[host.\"http://127.0.0.1:30020\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             \n[host.\"https://10.1.2.12:30021\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/s/peer.crt\"\n"
        );
    }

    #[test]
    fn hosts_toml_without_mirrors_has_an_empty_host_table() {
        assert_eq!(
            hosts_toml(Some("http://r.x.test:5000"), None, &[]),
            "server = \"http://r.x.test:5000\"\n\n[host]\n"
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\ny"), "\"x\\u000ay\"");
    }

    #[test]
    fn containerd_config_keeps_everything_in_the_node_dir() {
        let dir = Path::new("/tmp/spegel-x/n1");
        let text = containerd_config(dir, &dir.join("containerd.sock"), &dir.join("certs.d"));
        assert!(text.contains("root = \"/tmp/spegel-x/n1/root\""));
        assert!(text.contains("address = \"/tmp/spegel-x/n1/containerd.sock\""));
        assert!(text.contains("discard_unpacked_layers = false"));
        assert!(text.contains("config_path = \"/tmp/spegel-x/n1/certs.d\""));
        assert!(text.contains("snapshotter = \"overlayfs\""));
        assert_eq!(node_name(0), "n1");
    }
}
