//! Running the real `spegel` daemon on rig nodes: options, start-up and readiness, lifecycle,
//! HTTP requests from inside a node, `/metrics`, the JSON log, and `spegel configure-mirror`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use spegel_tests::rig::{Endpoint, Rig};
//! use spegel_tests::rig::spegel::{SpegelOptions, configure_mirror, registry_urls};
//!
//! let rig = Rig::builder().nodes(2).start().await?;
//! let four = rig.images().four.clone();
//! rig.node(0).cri_pull(&four.reference(Endpoint::Plain)).await?;
//! let daemon = rig.start_spegel(0, SpegelOptions::mirror()).await?;
//! // Node 2's containerd asks node 1's daemon first, then the registry.
//! configure_mirror(rig.node(1), &[daemon.url()], &registry_urls(&rig, Endpoint::Plain)).await?;
//! rig.node(1).cri_pull(&four.reference(Endpoint::Plain)).await?;
//! assert!(daemon.served()?.iter().any(|served| served.source == "local"));
//! # Ok(())
//! # }
//! ```
//!
//! The daemon runs in its node's network namespace through `nsenter --net` (so `/sys` and the
//! cgroup2 mount stay visible, as interception needs) with the node's `/etc/hosts`, logs JSON by
//! default, and keeps its state in `<node dir>/spegel`.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Map, Value};
use spegel::fault::switches;

use super::{
    DEFAULT_STOP_GRACE, Endpoint, NetnsMode, Node, Process, ProcessSpec, Rig, cgroup2_mount,
    spegel_bin,
};

/// The daemon's registry API port unless [`SpegelOptions::registry_port`] says otherwise.
pub const DEFAULT_REGISTRY_PORT: u16 = 5000;
/// The daemon's libp2p router port unless [`SpegelOptions::router_port`] says otherwise.
pub const DEFAULT_ROUTER_PORT: u16 = 5001;
/// How long [`Rig::start_spegel`] waits for `/readyz` by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The default log filter: the daemon's own debug lines (one per request) and everyone's info.
pub const DEFAULT_LOG_FILTER: &str = "info,spegel=debug";
/// How long one HTTP request made with [`http_request`] may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// `Accept` for manifest requests: everything containerd accepts, so registries never convert.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json, */*";

/// How the daemon meets containerd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpegelMode {
    /// Classic mirror: `--intercept=false`; containerd reaches the daemon through `hosts.toml`
    /// (see [`configure_mirror`]).
    Mirror,
    /// Transparent: eBPF redirects the node containerd's connections to the rig registry (both
    /// listeners, by name and IP) to the daemon, which verifies upstream with the rig's CA.
    Transparent,
}

/// Which bootstrap peers the daemon is given.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bootstrap {
    /// None: a lonely node (or one that others bootstrap from).
    None,
    /// Every other node's router (whether or not a daemon runs there yet; libp2p retries).
    OtherNodes,
    /// These nodes' routers (0-based indexes; the node itself is skipped).
    Nodes(Vec<usize>),
    /// Explicit multiaddrs (`/ip4/10.1.2.11/tcp/5001`).
    Addrs(Vec<String>),
}

/// How to run one daemon. Start from [`SpegelOptions::mirror`] or [`SpegelOptions::transparent`]
/// and chain setters; everything has a working default.
#[derive(Clone, Debug)]
pub struct SpegelOptions {
    mode: SpegelMode,
    registry_port: u16,
    router_port: u16,
    bootstrap: Bootstrap,
    log_filter: String,
    json_logs: bool,
    mirrored_registries: Option<Vec<String>>,
    intercept_ports: Vec<u16>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    ready_timeout: Duration,
    wait_ready: bool,
    membership: Membership,
    pid_namespace: bool,
    cgroup_namespace: bool,
    cgroup_below_containerd: Option<String>,
}

/// Which cluster the daemon belongs to.
#[derive(Debug, Clone)]
enum Membership {
    /// Holds the rig's cluster secret (the default).
    Rig,
    /// Holds these secret files, in this order.
    Secrets(Vec<PathBuf>),
    /// No secret: `--insecure-open-cluster`.
    Open,
}

impl SpegelOptions {
    /// Mirror mode (no interception), no bootstrap peers, JSON logs.
    pub fn mirror() -> Self {
        Self::new(SpegelMode::Mirror)
    }

    /// Transparent mode (interception of the rig registry's ports), JSON logs.
    pub fn transparent() -> Self {
        Self::new(SpegelMode::Transparent)
    }

    /// Options for `mode` with every other setting at its default.
    pub fn new(mode: SpegelMode) -> Self {
        Self {
            mode,
            registry_port: DEFAULT_REGISTRY_PORT,
            router_port: DEFAULT_ROUTER_PORT,
            bootstrap: Bootstrap::None,
            log_filter: DEFAULT_LOG_FILTER.to_owned(),
            json_logs: true,
            mirrored_registries: None,
            intercept_ports: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            wait_ready: true,
            membership: Membership::Rig,
            pid_namespace: false,
            cgroup_namespace: false,
            cgroup_below_containerd: None,
        }
    }

    /// Hold these cluster secret files (the first signs) instead of the rig's secret.
    pub fn cluster_secrets(mut self, files: Vec<PathBuf>) -> Self {
        self.membership = Membership::Secrets(files);
        self
    }

    /// Hold no cluster secret: `--insecure-open-cluster`.
    pub fn open_cluster(mut self) -> Self {
        self.membership = Membership::Open;
        self
    }

    /// The mode.
    pub fn mode(&self) -> SpegelMode {
        self.mode
    }

    /// Port of the registry API on the node's IP (default 5000).
    pub fn registry_port(mut self, port: u16) -> Self {
        self.registry_port = port;
        self
    }

    /// Port of the libp2p router on the node's IP (default 5001). Bootstrap addresses derived
    /// from node indexes assume every daemon uses the same router port.
    pub fn router_port(mut self, port: u16) -> Self {
        self.router_port = port;
        self
    }

    /// Bootstrap from every other node's router.
    pub fn bootstrap_other_nodes(mut self) -> Self {
        self.bootstrap = Bootstrap::OtherNodes;
        self
    }

    /// Bootstrap from these nodes' routers (0-based indexes).
    pub fn bootstrap_nodes(mut self, nodes: impl IntoIterator<Item = usize>) -> Self {
        self.bootstrap = Bootstrap::Nodes(nodes.into_iter().collect());
        self
    }

    /// Bootstrap from these multiaddrs (see [`Spegel::router_multiaddr`]).
    pub fn bootstrap_peers<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.bootstrap = Bootstrap::Addrs(addrs.into_iter().map(Into::into).collect());
        self
    }

    /// The `--log` filter (default [`DEFAULT_LOG_FILTER`]).
    pub fn log(mut self, filter: impl Into<String>) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Human-readable logs instead of JSON ([`Spegel::events`] then finds nothing).
    pub fn human_logs(mut self) -> Self {
        self.json_logs = false;
        self
    }

    /// Transparent mode: the registries the daemon serves (`host:port`), replacing the default
    /// (the rig registry's two listeners, by name and by IP).
    pub fn mirrored_registries<I, S>(mut self, registries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.mirrored_registries = Some(registries.into_iter().map(Into::into).collect());
        self
    }

    /// Transparent mode: more destination ports to redirect, besides 443, 80 and the rig
    /// registry's ports.
    pub fn intercept_ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.intercept_ports.extend(ports);
        self
    }

    /// TEST FAULT: corrupt every blob this daemon serves to peers.
    pub fn corrupt_peer_blobs(self) -> Self {
        self.arg(format!("--{}", switches::CORRUPT_PEER_BLOBS_FLAG))
    }

    /// TEST FAULT: serve blobs to peers at most `bytes_per_second`.
    pub fn throttle_peer_bytes(self, bytes_per_second: u64) -> Self {
        self.arg(format!(
            "--{}={bytes_per_second}",
            switches::THROTTLE_PEER_BYTES_FLAG
        ))
    }

    /// One more argument to `spegel run` (after the generated ones, so it can override them).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments to `spegel run`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// An environment variable for the daemon (it otherwise gets only `PATH` and
    /// `RUST_BACKTRACE=1`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// How long to wait for `/readyz` (default [`DEFAULT_READY_TIMEOUT`]).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Return as soon as the process is spawned, without waiting for `/readyz` (for tests of
    /// start-up itself; call [`Spegel::wait_ready`] later).
    pub fn no_wait(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Runs the daemon in a PID namespace of its own (`unshare --pid --fork --mount-proc`), as a
    /// DaemonSet without `hostPID` does: it is PID 1 there and the kernel knows it by another
    /// PID. `unshare` ignores SIGTERM while it waits for its child, so [`Spegel::stop`] ends in
    /// SIGKILL after the grace (the daemon dies with `unshare`, `--kill-child`); prefer
    /// [`Spegel::kill`] at the end of a test.
    pub fn pid_namespace(mut self) -> Self {
        self.pid_namespace = true;
        self
    }

    /// With [`SpegelOptions::pid_namespace`], a cgroup namespace of its own too (`unshare
    /// --cgroup`), as a pod that is not privileged has: `/proc/self/cgroup` reads `0::/` while
    /// the cgroup2 mount it sees is still the host's.
    pub fn cgroup_namespace(mut self) -> Self {
        self.cgroup_namespace = true;
        self
    }

    /// Starts the daemon in cgroup `<containerd's cgroup>/<child>` instead of the test's own
    /// cgroup: a cgroup that containerd's contains (created on demand, removed at teardown).
    pub fn cgroup_below_containerd(mut self, child: impl Into<String>) -> Self {
        self.cgroup_below_containerd = Some(child.into());
        self
    }

    /// The `spegel run` arguments for `node` of `rig`.
    fn run_args(&self, rig: &Rig, node: &Node, data_dir: &Path) -> Result<Vec<OsString>> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: &dyn AsRef<OsStr>| {
            let mut arg = OsString::from(flag);
            arg.push("=");
            arg.push(value.as_ref());
            args.push(arg);
        };
        push("--log", &self.log_filter);
        push(
            "--log-format",
            &if self.json_logs { "json" } else { "human" },
        );
        push("--data-dir", &data_dir);
        push("--containerd-sock", &node.socket());
        push("--containerd-content-path", &node.content_dir());
        push(
            "--registry-addr",
            &SocketAddr::from((node.ip(), self.registry_port)).to_string(),
        );
        push(
            "--router-addr",
            &SocketAddr::from((node.ip(), self.router_port)).to_string(),
        );
        match &self.membership {
            Membership::Rig => push("--cluster-secret-file", &rig.cluster_secret_path()),
            Membership::Secrets(files) => {
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                push("--cluster-secret-file", &files.join(","));
            }
            Membership::Open => push("--insecure-open-cluster", &"true"),
        }
        let peers = self.bootstrap_addrs(rig, node.index())?;
        if !peers.is_empty() {
            push("--bootstrap-peers", &peers.join(","));
        }
        // The rig's images are public except on the basic-auth listener, and an operator would
        // say so: with no credentials to confirm (mirror mode, or the registry down), peers
        // share only what is declared or known to be public.
        push("--public-registries", &rig_public_hosts(rig).join(","));
        match self.mode {
            SpegelMode::Mirror => push("--intercept", &"false"),
            SpegelMode::Transparent => {
                push("--intercept", &"true");
                push("--containerd-cgroup", &node.cgroup_dir());
                push("--cgroup2-mount", &cgroup2_mount()?);
                let registries = self
                    .mirrored_registries
                    .clone()
                    .unwrap_or_else(|| rig_registry_hosts(rig));
                push("--mirrored-registries", &registries.join(","));
                let mut ports = vec![443, 80];
                ports.extend(Endpoint::ALL.map(Endpoint::port));
                ports.extend(&self.intercept_ports);
                ports.sort_unstable();
                ports.dedup();
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                push("--intercept-ports", &ports.join(","));
                push("--upstream-ca-file", &rig.ca().cert_path());
            }
        }
        args.extend(self.args.iter().cloned());
        Ok(args)
    }

    fn bootstrap_addrs(&self, rig: &Rig, own: usize) -> Result<Vec<String>> {
        let indexes: Vec<usize> = match &self.bootstrap {
            Bootstrap::None => return Ok(Vec::new()),
            Bootstrap::Addrs(addrs) => return Ok(addrs.clone()),
            Bootstrap::OtherNodes => (0..rig.nodes().len()).collect(),
            Bootstrap::Nodes(indexes) => indexes.clone(),
        };
        indexes
            .into_iter()
            .filter(|index| *index != own)
            .map(|index| {
                let node = rig
                    .nodes()
                    .get(index)
                    .with_context(|| format!("bootstrap node {index} is not in the rig"))?;
                Ok(router_multiaddr(node.ip(), self.router_port))
            })
            .collect()
    }
}

/// `/ip4/<ip>/tcp/<port>`: how `--bootstrap-peers` names a router.
pub fn router_multiaddr(ip: Ipv4Addr, port: u16) -> String {
    format!("/ip4/{ip}/tcp/{port}")
}

/// The rig registry as `host:port` for both listeners, by name and by IP: what a transparent
/// daemon mirrors.
pub fn rig_registry_hosts(rig: &Rig) -> Vec<String> {
    let registry = rig.registry();
    Endpoint::ALL
        .iter()
        .flat_map(|endpoint| [registry.host(*endpoint), registry.ip_host(*endpoint)])
        .collect()
}

/// The rig registry's listeners whose images are public — every one but [`Endpoint::Auth`],
/// and the fault proxy's port in front of it — by name and by IP.
pub fn rig_public_hosts(rig: &Rig) -> Vec<String> {
    let registry = rig.registry();
    let proxy = super::faultproxy::FaultProxy::PORT;
    Endpoint::ALL
        .iter()
        .filter(|endpoint| **endpoint != Endpoint::Auth)
        .flat_map(|endpoint| [registry.host(*endpoint), registry.ip_host(*endpoint)])
        .chain([
            format!("{}:{proxy}", registry.hostname()),
            format!("{}:{proxy}", registry.ip()),
        ])
        .collect()
}

/// The rig registry's `endpoint` as `configure-mirror --mirrored-registries` URLs, by name and
/// by IP (`http://registry.<prefix>.test:5000`, `http://10.x.y.10:5000`).
pub fn registry_urls(rig: &Rig, endpoint: Endpoint) -> Vec<String> {
    let registry = rig.registry();
    [registry.host(endpoint), registry.ip_host(endpoint)]
        .into_iter()
        .map(|host| format!("{}://{host}", endpoint.scheme()))
        .collect()
}

impl Rig {
    /// Starts a spegel daemon on node `index` and (unless [`SpegelOptions::no_wait`]) waits
    /// until its `/readyz` answers 200. Teardown stops it with the rest of the rig.
    ///
    /// # Panics
    ///
    /// If `index` is out of range, like [`Rig::node`].
    pub async fn start_spegel(&self, index: usize, options: SpegelOptions) -> Result<Spegel> {
        let node = self.node(index);
        let data_dir = node.dir().join("spegel");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let binary = spegel_bin()?;
        let name = format!("spegel-{}", node.name());
        let spec = if options.pid_namespace {
            ProcessSpec::new(name, "unshare")
                .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .args(options.cgroup_namespace.then_some("--cgroup"))
                .arg("--")
                .arg(&binary)
        } else {
            ProcessSpec::new(name, &binary)
        };
        let mut spec = spec
            .arg("run")
            .args(options.run_args(self, node, &data_dir)?)
            .mode(NetnsMode::Nsenter)
            .env("RUST_BACKTRACE", "1")
            .envs(options.env.iter().map(|(k, v)| (k, v)));
        if let Some(child) = &options.cgroup_below_containerd {
            let containerd = node
                .cgroup_dir()
                .file_name()
                .context("node cgroup directory has no name")?
                .to_string_lossy()
                .into_owned();
            spec = spec.cgroup(format!("{containerd}/{child}"));
        }
        let process = node.spawn(spec)?;
        let daemon = Spegel {
            index,
            node_name: node.name().to_owned(),
            netns: node.netns().to_owned(),
            ip: node.ip(),
            mode: options.mode,
            registry_port: options.registry_port,
            router_port: options.router_port,
            data_dir,
            process,
            ready_timeout: options.ready_timeout,
            pid_namespace: options.pid_namespace,
        };
        if options.wait_ready {
            daemon.wait_ready().await?;
        }
        Ok(daemon)
    }

    /// Starts a daemon on every node at once, each bootstrapping from all the others, and
    /// waits until all are ready. `options` applies to every node.
    pub async fn start_spegel_everywhere(&self, options: SpegelOptions) -> Result<Vec<Spegel>> {
        let options = match options.bootstrap {
            Bootstrap::None => options.bootstrap_other_nodes(),
            _ => options,
        };
        futures::future::try_join_all(
            (0..self.nodes().len()).map(|index| self.start_spegel(index, options.clone())),
        )
        .await
    }
}

/// A spegel daemon running on a rig node. Teardown stops it whatever happens to the handle.
#[derive(Clone, Debug)]
pub struct Spegel {
    index: usize,
    node_name: String,
    netns: String,
    ip: Ipv4Addr,
    mode: SpegelMode,
    registry_port: u16,
    router_port: u16,
    data_dir: PathBuf,
    process: Process,
    ready_timeout: Duration,
    pid_namespace: bool,
}

/// A position in a daemon's log; events after it are what an action under test caused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogMark(usize);

impl Spegel {
    /// The node's 0-based index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's name (`n1`).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's IP, where the daemon listens.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The mode it runs in.
    pub fn mode(&self) -> SpegelMode {
        self.mode
    }

    /// The registry API's address.
    pub fn registry_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.registry_port))
    }

    /// The registry API as a URL (`http://10.x.y.11:5000`), e.g. a mirror target.
    pub fn url(&self) -> String {
        format!("http://{}", self.registry_addr())
    }

    /// The router's address as a bootstrap multiaddr (`/ip4/10.x.y.11/tcp/5001`).
    pub fn router_multiaddr(&self) -> String {
        router_multiaddr(self.ip, self.router_port)
    }

    /// The daemon's state folder (`<node dir>/spegel`: libp2p key, node CA).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The rig process (PID, signals, raw log path).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The daemon's own PID as this test sees it: the rig process itself, or, in a PID
    /// namespace of its own ([`SpegelOptions::pid_namespace`]), the only child of `unshare`.
    pub fn daemon_pid(&self) -> Result<u32> {
        let pid = self
            .process
            .pid()
            .with_context(|| format!("spegel on {} is not running", self.node_name))?;
        if !self.pid_namespace {
            return Ok(pid);
        }
        let path = format!("/proc/{pid}/task/{pid}/children");
        let children = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        children
            .split_whitespace()
            .next()
            .and_then(|child| child.parse().ok())
            .with_context(|| format!("unshare ({pid}) has no child yet"))
    }

    /// Whether the daemon is running.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Test fault for the next (re)start: while `file` exists, the interception accept loop
    /// accepts nothing (the daemon stays alive); `None` turns the switch off.
    pub fn set_intercept_wedge_file(&self, file: Option<&Path>) {
        match file {
            Some(file) => self
                .process
                .set_env(switches::WEDGE_INTERCEPT_FILE_ENV, file),
            None => self.process.remove_env(switches::WEDGE_INTERCEPT_FILE_ENV),
        }
    }

    /// TEST FAULT for the next (re)start: serve blobs to peers at most `bytes_per_second`
    /// (`None`: unthrottled again).
    pub fn set_peer_throttle(&self, bytes_per_second: Option<u64>) {
        match bytes_per_second {
            Some(rate) => self
                .process
                .set_env(switches::THROTTLE_PEER_BYTES_ENV, rate.to_string()),
            None => self.process.remove_env(switches::THROTTLE_PEER_BYTES_ENV),
        }
    }

    /// TEST FAULT for the next (re)start: corrupt every blob served to peers (or stop doing so).
    pub fn set_corrupt_peer_blobs(&self, corrupt: bool) {
        if corrupt {
            self.process
                .set_env(switches::CORRUPT_PEER_BLOBS_ENV, "true");
        } else {
            self.process.remove_env(switches::CORRUPT_PEER_BLOBS_ENV);
        }
    }

    /// The daemon's resident memory and open file descriptors now (from `/proc/<pid>`).
    pub fn resources(&self) -> Result<Resources> {
        let pid = self
            .process
            .pid()
            .with_context(|| format!("spegel on {} is not running", self.node_name))?;
        Resources::of_pid(pid)
    }

    // === Lifecycle ===

    /// SIGKILL: a crash, as far as containerd and the peers can tell.
    pub async fn kill(&self) -> Result<Option<ExitStatus>> {
        self.process.kill().await
    }

    /// SIGTERM and wait for the graceful shutdown (SIGKILL after [`DEFAULT_STOP_GRACE`]).
    pub async fn stop(&self) -> Result<Option<ExitStatus>> {
        self.process.stop(DEFAULT_STOP_GRACE).await
    }

    /// Starts it again after [`stop`](Self::stop) or [`kill`](Self::kill) and waits until it is
    /// ready. The data dir (and so the peer ID and CA) is kept.
    pub async fn start(&self) -> Result<()> {
        self.process.start().await?;
        self.wait_ready().await
    }

    /// [`stop`](Self::stop), then [`start`](Self::start).
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.start().await
    }

    /// Polls `/readyz` from inside the node until it answers 200; fails with the log tail when
    /// the daemon exits or the ready timeout passes.
    pub async fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        let url = format!("{}/readyz", self.url());
        loop {
            if !self.process.is_running() {
                bail!(
                    "spegel on {} exited during start-up ({:?}); log tail:\n{}",
                    self.node_name,
                    self.process.exit_status(),
                    self.process.log_tail(40)
                );
            }
            let last = match http_request_in(&self.netns, "GET", &url, &[], Duration::from_secs(5))
                .await
            {
                Ok(response) if response.status == 200 => {
                    tracing::debug!(node = %self.node_name, elapsed = ?started.elapsed(), "spegel ready");
                    return Ok(());
                }
                Ok(response) => format!("{}: {}", response.status, response.text()),
                Err(error) => format!("{error:#}"),
            };
            if started.elapsed() >= self.ready_timeout {
                bail!(
                    "spegel on {} not ready within {:?} (last /readyz: {last}); log tail:\n{}",
                    self.node_name,
                    self.ready_timeout,
                    self.process.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // === HTTP ===

    /// `GET <daemon><path_and_query>` from inside the daemon's node, e.g.
    /// `/v2/rig/four/manifests/v1?ns=registry.x.test%3A5000`.
    pub async fn get(&self, path_and_query: &str) -> Result<HttpResponse> {
        self.request("GET", path_and_query, &[]).await
    }

    /// A request to the daemon from inside its node, with extra headers.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse> {
        let url = format!("{}{path_and_query}", self.url());
        http_request_in(&self.netns, method, &url, headers, HTTP_TIMEOUT).await
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> Result<Metrics> {
        let response = self.get("/metrics").await?;
        ensure!(
            response.status == 200,
            "GET /metrics on {} answered {}: {}",
            self.node_name,
            response.status,
            response.text()
        );
        Ok(Metrics::parse(&response.text()))
    }

    // === Logs ===

    /// The whole log (stdout and stderr, all runs; the rig adds a `--- rig: starting` line per start).
    pub fn log(&self) -> String {
        self.process.read_log()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The current end of the log.
    pub fn log_mark(&self) -> LogMark {
        LogMark(self.log().len())
    }

    /// Every JSON log event so far.
    pub fn events(&self) -> Vec<LogEvent> {
        LogEvent::parse_all(&self.log())
    }

    /// The JSON log events written after `mark`.
    pub fn events_since(&self, mark: LogMark) -> Vec<LogEvent> {
        let log = self.log();
        LogEvent::parse_all(log.get(mark.0..).unwrap_or_default())
    }

    /// Every object served so far (the daemon's `serving` lines).
    pub fn served(&self) -> Result<Vec<Served>> {
        self.events()
            .iter()
            .filter_map(Served::from_event)
            .collect()
    }

    /// The objects served after `mark`.
    pub fn served_since(&self, mark: LogMark) -> Result<Vec<Served>> {
        self.events_since(mark)
            .iter()
            .filter_map(Served::from_event)
            .collect()
    }

    /// Waits until an event after `mark` matches `predicate`; fails with the log tail after
    /// `timeout`.
    pub async fn wait_for_event(
        &self,
        mark: LogMark,
        timeout: Duration,
        predicate: impl Fn(&LogEvent) -> bool,
    ) -> Result<LogEvent> {
        let started = Instant::now();
        loop {
            if let Some(event) = self.events_since(mark).into_iter().find(|e| predicate(e)) {
                return Ok(event);
            }
            if started.elapsed() >= timeout {
                bail!(
                    "spegel on {}: no matching log event within {timeout:?}; log tail:\n{}",
                    self.node_name,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The libp2p peer ID the daemon logged at its latest start (`router started`).
    pub fn peer_id(&self) -> Option<String> {
        self.events()
            .iter()
            .rev()
            .find(|event| event.message == "router started")
            .and_then(|event| event.str("peer_id").map(str::to_owned))
    }

    // === Transparent mode ===

    /// Writes a CA bundle (the system roots under `trust_root` plus this daemon's node CA) to
    /// `out` with `spegel install-ca --bundle`, for containerd's `SSL_CERT_FILE` (and a systemd
    /// drop-in, if `trust_root` has a unit directory). `trust_root` must be a node root such as
    /// [`crate::cluster::node_root`], never `/`: install-ca changes the trust store and systemd
    /// units under it. Call after the daemon has started once (it creates the CA). `registries`
    /// must be the daemon's mirrored registries (default: [`rig_registry_hosts`]), so both derive
    /// the same CA.
    pub async fn write_ca_bundle(
        &self,
        registries: &[String],
        trust_root: &Path,
        out: &Path,
    ) -> Result<()> {
        anyhow::ensure!(
            trust_root != Path::new("/"),
            "install-ca on the rig must not touch the machine's own trust store"
        );
        let mut data_dir = OsString::from("--data-dir=");
        data_dir.push(&self.data_dir);
        let mut root = OsString::from("--trust-root=");
        root.push(trust_root);
        let mut bundle = OsString::from("--bundle=");
        bundle.push(out);
        let args = [
            OsString::from("install-ca"),
            data_dir,
            OsString::from(format!("--mirrored-registries={}", registries.join(","))),
            root,
            bundle,
        ];
        run_spegel(&args).await?;
        Ok(())
    }
}

// === Resources ===

/// A process's resident memory and open file descriptors at one moment: the baseline and the
/// "back to baseline" check of the fault tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    /// `VmRSS` from `/proc/<pid>/status`, in bytes.
    pub rss_bytes: u64,
    /// Entries in `/proc/<pid>/fd`.
    pub open_fds: usize,
}

impl Resources {
    /// Reads `/proc/<pid>/status` and counts `/proc/<pid>/fd`.
    pub fn of_pid(pid: u32) -> Result<Self> {
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("reading {status_path}"))?;
        let rss_bytes =
            parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {status_path}"))?;
        let fd_dir = format!("/proc/{pid}/fd");
        let open_fds = std::fs::read_dir(&fd_dir)
            .with_context(|| format!("listing {fd_dir}"))?
            .count();
        Ok(Self {
            rss_bytes,
            open_fds,
        })
    }

    /// Whether `self` is back near `baseline`: at most `extra_fds` more descriptors and
    /// `extra_rss` more bytes resident.
    pub fn within(&self, baseline: &Self, extra_fds: usize, extra_rss: u64) -> bool {
        self.open_fds <= baseline.open_fds + extra_fds
            && self.rss_bytes <= baseline.rss_bytes + extra_rss
    }
}

/// `VmRSS:   12345 kB` → bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

// === configure-mirror ===

/// Runs `spegel configure-mirror` for `node`'s `certs.d`: `targets` (daemon URLs such as
/// [`Spegel::url`]) are tried first, in order, for `registries` (`http(s)://host[:port]`, see
/// [`registry_urls`]); an empty `registries` means every registry (`_default`). The first run
/// backs up the folder; [`undo_mirror`] restores it.
pub async fn configure_mirror<T, R>(node: &Node, targets: &[T], registries: &[R]) -> Result<()>
where
    T: AsRef<str>,
    R: AsRef<str>,
{
    ensure!(!targets.is_empty(), "configure_mirror needs a target");
    let mut args = vec![
        OsString::from("configure-mirror"),
        config_path_arg(node),
        OsString::from(format!("--mirror-targets={}", join(targets))),
    ];
    if !registries.is_empty() {
        args.push(OsString::from(format!(
            "--mirrored-registries={}",
            join(registries)
        )));
    }
    run_spegel(&args).await?;
    Ok(())
}

/// Runs `spegel configure-mirror --undo` for `node`'s `certs.d`.
pub async fn undo_mirror(node: &Node) -> Result<()> {
    let args = [
        OsString::from("configure-mirror"),
        config_path_arg(node),
        OsString::from("--undo"),
    ];
    run_spegel(&args).await?;
    Ok(())
}

fn config_path_arg(node: &Node) -> OsString {
    let mut arg = OsString::from("--containerd-registry-config-path=");
    arg.push(node.certs_dir());
    arg
}

fn join<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the spegel binary on the host with a clean environment (no stray `SPEGEL_*`).
async fn run_spegel(args: &[OsString]) -> Result<Output> {
    let binary = spegel_bin()?;
    let output = tokio::process::Command::new(&binary)
        .args(args)
        .env_clear()
        .env("PATH", host_path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("spawning {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "`spegel {}` failed ({}): {}{}",
        args.iter()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout),
    );
    Ok(output)
}

fn host_path() -> OsString {
    std::env::var_os("PATH").unwrap_or_else(|| {
        OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    })
}

// === HTTP from inside a node ===

/// An HTTP response as curl received it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD).
    pub body: Vec<u8>,
    /// From spawning the client to its exit: an upper bound of the request's duration.
    pub elapsed: Duration,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {}", self.text()))
    }

    /// The `errors[].code` values of an OCI error body.
    pub fn oci_error_codes(&self) -> Result<Vec<String>> {
        let json = self.json()?;
        let errors = json
            .get("errors")
            .and_then(Value::as_array)
            .with_context(|| format!("no errors array in {json}"))?;
        errors
            .iter()
            .map(|error| {
                error
                    .get("code")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .with_context(|| format!("error without a code in {json}"))
            })
            .collect()
    }

    /// Parses curl's `--include` output: status line, headers, blank line, body. Interim 1xx
    /// responses are skipped.
    pub fn parse(raw: &[u8], elapsed: Duration) -> Result<Self> {
        let mut rest = raw;
        loop {
            let end = find(rest, b"\r\n\r\n").with_context(|| {
                format!(
                    "no header block in curl output: {}",
                    String::from_utf8_lossy(&raw[..raw.len().min(200)])
                )
            })?;
            let head = std::str::from_utf8(&rest[..end]).context("response headers not UTF-8")?;
            let body = &rest[end + 4..];
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .with_context(|| format!("bad status line {status_line:?}"))?;
            if (100..200).contains(&status) {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect();
            return Ok(Self {
                status,
                headers,
                body: body.to_vec(),
                elapsed,
            });
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Makes an HTTP/1.1 request with curl inside `node`'s namespace (so the node's `/etc/hosts`
/// applies and the server sees the node's address). Only transport failures are errors; any
/// status is a response.
pub async fn http_request(
    node: &Node,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    http_request_in(node.netns(), method, url, headers, HTTP_TIMEOUT).await
}

/// `GET url` from inside `node`; see [`http_request`].
pub async fn http_get(node: &Node, url: &str) -> Result<HttpResponse> {
    http_request(node, "GET", url, &[]).await
}

async fn http_request_in(
    netns: &str,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        netns.into(),
        "curl".into(),
        "--silent".into(),
        "--show-error".into(),
        "--include".into(),
        "--http1.1".into(),
        "--max-time".into(),
        format!("{:.3}", timeout.as_secs_f64()),
    ];
    if method == "HEAD" {
        args.push("--head".into());
    } else {
        args.extend(["--request".into(), method.into()]);
    }
    for (name, value) in headers {
        args.extend(["--header".into(), format!("{name}: {value}")]);
    }
    args.push(url.into());
    let started = Instant::now();
    let output = tokio::process::Command::new("ip")
        .args(&args)
        .env_clear()
        .env("PATH", host_path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("spawning curl")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "{method} {url} from {netns} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    HttpResponse::parse(&output.stdout, elapsed).with_context(|| format!("{method} {url}"))
}

// === Metrics ===

/// A `/metrics` scrape: `name{labels}` (labels sorted by name) → value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    /// Parses the text exposition format; comments and unparsable lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut values = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.find('}') {
                Some(end) => (&line[..=end], line[end + 1..].trim()),
                None => match line.split_once(char::is_whitespace) {
                    Some((series, value)) => (series, value.trim()),
                    None => continue,
                },
            };
            // A timestamp may follow the value.
            let value = value.split_whitespace().next().unwrap_or_default();
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if let Some(key) = normalise_series(series) {
                values.insert(key, value);
            }
        }
        Self(values)
    }

    /// The value of series `name` with exactly `labels`; `None` if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.get(&series_key(name, labels)).copied()
    }

    /// Like [`get`](Self::get), with 0 for an absent series.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over every series of `name`, whatever their labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(key, _)| {
                key.strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Every series.
    pub fn all(&self) -> &BTreeMap<String, f64> {
        &self.0
    }
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// `name{b="2",a="1"}` → `name{a="1",b="2"}`.
fn normalise_series(series: &str) -> Option<String> {
    let Some((name, labels)) = series.split_once('{') else {
        return Some(series.to_owned());
    };
    let labels = labels.strip_suffix('}')?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut rest = labels.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        // Values escape `"` and `\` with a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        pairs.push((key.trim().to_owned(), value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim();
    }
    let labels: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Some(series_key(name, &labels))
}

// === JSON log ===

/// One line of the daemon's JSON log (`tracing-subscriber`'s format).
#[derive(Clone, Debug, PartialEq)]
pub struct LogEvent {
    /// `INFO`, `DEBUG`, ...
    pub level: String,
    /// The module that logged it (`spegel::metrics`).
    pub target: String,
    /// The message (`serving`, `router started`, ...).
    pub message: String,
    /// The event's fields besides the message.
    pub fields: Map<String, Value>,
}

impl LogEvent {
    /// Parses every JSON line of `log`; other lines (rig markers, panics) are skipped.
    pub fn parse_all(log: &str) -> Vec<Self> {
        log.lines().filter_map(Self::parse).collect()
    }

    /// Parses one JSON line.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        if !line.starts_with('{') {
            return None;
        }
        let Value::Object(mut object) = serde_json::from_str::<Value>(line).ok()? else {
            return None;
        };
        let mut fields = match object.remove("fields") {
            Some(Value::Object(fields)) => fields,
            _ => Map::new(),
        };
        let message = match fields.remove("message") {
            Some(Value::String(message)) => message,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let text = |value: Option<Value>| match value {
            Some(Value::String(text)) => text,
            _ => String::new(),
        };
        Some(Self {
            level: text(object.remove("level")),
            target: text(object.remove("target")),
            message,
            fields,
        })
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// An unsigned number field (also accepts numbers logged as strings).
    pub fn u64(&self, name: &str) -> Option<u64> {
        match self.fields.get(name)? {
            Value::Number(number) => number.as_u64(),
            Value::String(text) => text.parse().ok(),
            _ => None,
        }
    }

    /// A boolean field (also accepts `"true"`/`"false"`).
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.fields.get(name)? {
            Value::Bool(value) => Some(*value),
            Value::String(text) => text.parse().ok(),
            _ => None,
        }
    }
}

/// An object the daemon served (its `serving` log line, written once per response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// `manifest` or `blob`.
    pub kind: String,
    /// The repository asked for.
    pub repository: String,
    /// The object's digest.
    pub digest: String,
    /// Its full size.
    pub size: u64,
    /// `local`, `peer` or `upstream`.
    pub source: String,
    /// Whether the request came from another spegel node.
    pub peer_request: bool,
    /// Whether it was a HEAD.
    pub head: bool,
}

impl Served {
    /// `None` for other events; an error for a `serving` line missing a field.
    fn from_event(event: &LogEvent) -> Option<Result<Self>> {
        if event.message != "serving" {
            return None;
        }
        let parse = || -> Result<Self> {
            let text = |name: &str| {
                event
                    .str(name)
                    .map(str::to_owned)
                    .with_context(|| format!("serving line without {name}: {event:?}"))
            };
            Ok(Self {
                kind: text("kind")?,
                repository: text("repository")?,
                digest: text("digest")?,
                size: event
                    .u64("size")
                    .with_context(|| format!("serving line without size: {event:?}"))?,
                source: text("source")?,
                peer_request: event.bool("peer_request").unwrap_or(false),
                head: event.bool("head").unwrap_or(false),
            })
        };
        Some(parse())
    }

    /// Whether a blob's body was served (not just its headers).
    pub fn is_blob_get(&self) -> bool {
        self.kind == "blob" && !self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_normalises_label_order() {
        let metrics = Metrics::parse(
            "# HELP x y\n# TYPE spegel_served_objects_total counter\n\
             spegel_served_objects_total{source=\"local\",kind=\"blob\"} 7\n\
             spegel_served_objects_total{kind=\"manifest\",source=\"local\"} 2\n\
             spegel_router_has_peers 1\n\
             spegel_weird{a=\"x\\\"y\"} 3 1700000000\n\
             garbage\n",
        );
        assert_eq!(
            metrics.get(
                "spegel_served_objects_total",
                &[("kind", "blob"), ("source", "local")]
            ),
            Some(7.0)
        );
        assert_eq!(metrics.sum("spegel_served_objects_total"), 9.0);
        assert_eq!(metrics.get("spegel_router_has_peers", &[]), Some(1.0));
        assert_eq!(metrics.get("spegel_weird", &[("a", "x\"y")]), Some(3.0));
        assert_eq!(metrics.value("spegel_missing", &[]), 0.0);
        assert_eq!(metrics.all().len(), 4);
    }

    #[test]
    fn log_events_and_served_lines() {
        let log = "--- rig: starting spegel run\n\
            {\"timestamp\":\"t\",\"level\":\"INFO\",\"fields\":{\"message\":\"serving\",\"kind\":\"blob\",\"repository\":\"rig/four\",\"digest\":\"sha256:ab\",\"size\":12,\"source\":\"local\",\"peer_request\":false,\"head\":true},\"target\":\"spegel::metrics\"}\n\
            {\"timestamp\":\"t\",\"level\":\"INFO\",\"fields\":{\"message\":\"router started\",\"peer_id\":\"12D3\"},\"target\":\"spegel::daemon\"}\n\
            thread 'main' panicked\n";
        let events = LogEvent::parse_all(log);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].str("peer_id"), Some("12D3"));
        assert_eq!(events[0].target, "spegel::metrics");
        let served: Vec<Served> = events
            .iter()
            .filter_map(Served::from_event)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            served,
            [Served {
                kind: "blob".into(),
                repository: "rig/four".into(),
                digest: "sha256:ab".into(),
                size: 12,
                source: "local".into(),
                peer_request: false,
                head: true,
            }]
        );
        assert!(!served[0].is_blob_get());
        let broken = LogEvent::parse(r#"{"fields":{"message":"serving","kind":"blob"}}"#).unwrap();
        assert!(Served::from_event(&broken).unwrap().is_err());
    }

    #[test]
    fn curl_output_is_split_into_status_headers_and_body() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nX-A: b:c\r\n\r\n{\"errors\":[{\"code\":\"BLOB_UNKNOWN\",\"message\":\"m\"}]}";
        let response = HttpResponse::parse(raw, Duration::from_millis(3)).unwrap();
        assert_eq!(response.status, 404);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.header("X-A"), Some("b:c"));
        assert_eq!(response.oci_error_codes().unwrap(), ["BLOB_UNKNOWN"]);
        let binary = b"HTTP/1.1 200 OK\r\n\r\n\x00\xff\r\n\r\n";
        let response = HttpResponse::parse(binary, Duration::ZERO).unwrap();
        assert_eq!(response.body, b"\x00\xff\r\n\r\n");
        assert!(HttpResponse::parse(b"garbage", Duration::ZERO).is_err());
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tspegel\nVmPeak:\t  200 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: lots kB\n"), None);
        let own = Resources::of_pid(std::process::id()).unwrap();
        assert!(own.rss_bytes > 0 && own.open_fds > 0, "{own:?}");
        let base = Resources {
            rss_bytes: 100,
            open_fds: 10,
        };
        assert!(base.within(&base, 0, 0));
        assert!(
            Resources {
                rss_bytes: 150,
                open_fds: 12
            }
            .within(&base, 2, 50)
        );
        assert!(
            !Resources {
                rss_bytes: 100,
                open_fds: 13
            }
            .within(&base, 2, 50)
        );
    }

    #[test]
    fn options_render_flags() {
        let options = SpegelOptions::transparent()
            .registry_port(5080)
            .throttle_peer_bytes(1024)
            .corrupt_peer_blobs()
            .bootstrap_peers(["/ip4/10.0.0.1/tcp/5001"]);
        assert_eq!(options.mode(), SpegelMode::Transparent);
        assert_eq!(options.registry_port, 5080);
        assert_eq!(
            options.args,
            [
                OsString::from(format!("--{}=1024", switches::THROTTLE_PEER_BYTES_FLAG)),
                OsString::from(format!("--{}", switches::CORRUPT_PEER_BLOBS_FLAG))
            ]
        );
        assert_eq!(
            router_multiaddr(Ipv4Addr::new(10, 0, 0, 2), 5001),
            "/ip4/10.0.0.2/tcp/5001"
        );
    }
}
