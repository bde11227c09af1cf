//! The multi-node rig: N containerd "nodes" in network namespaces plus an upstream registry.
//!
//! ```text
//!   host ── <prefix>br0 (.1) ──┬── <prefix>-reg  (.10)  docker-registry :5000 (HTTP), :5443 (TLS)
//!                              ├── <prefix>-n1   (.11)  containerd, cgroup <cg2>/<prefix>/n1
//!                              ├── <prefix>-n2   (.12)  containerd, cgroup <cg2>/<prefix>/n2
//!                              └── ...
//! ```
//!
//! Everything lives under `/tmp/spegel-<prefix>` (logs in `logs/`, the OCI layout in `layout/`,
//! node folders `n1/`..), and all names derive from the prefix, so [`leftovers`] can prove that
//! teardown removed it all. Namespaces have no default route: nothing can leak off the machine.
//!
//! Start with [`Rig::builder`]; end with [`Rig::shutdown`] (dropping the rig, e.g. when a test
//! panics, tears down too, synchronously).

mod accesslog;
mod cgroup;
mod cleanup;
mod cmd;
mod cri;
mod delay;
pub mod faultproxy;
mod images;
mod net;
mod node;
mod pki;
mod process;
pub mod prometheus;
pub mod proxycache;
mod registry;
pub mod shape;
pub mod spegel;
pub mod trap;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

pub use accesslog::{AccessEntry, RegistryLog};
pub use cgroup::cgroup2_mount;
pub use cleanup::{cleanup, cleanup_stale, leftovers};
pub use cri::{ContentInfo, CriImage, ImageRecord, K8S_NAMESPACE};
pub use images::{
    Blob, ImageManifest, ImageSpec, KIB, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER,
    MEDIA_TYPE_MANIFEST, MIB, Platform, TestImage,
};
pub use net::{MAX_PREFIX_LEN, Subnet, random_prefix};
pub use node::{HostEntry, Node};
pub use pki::{IssuedCert, TestCa};
pub use process::{DEFAULT_STOP_GRACE, NetnsMode, Process, ProcessSpec, Signal};
pub use registry::{AUTH_PASSWORD, AUTH_USER, Endpoint, REGISTRY_BIN, Registry};

use images::Layout;
use net::Names;
use process::ProcessTable;

/// Most nodes a rig supports (addresses `.11`..`.210`, veth names within 15 bytes).
pub const MAX_NODES: usize = 200;

/// Options for [`Rig`]; every one has a sensible default.
#[derive(Clone, Debug)]
pub struct RigBuilder {
    nodes: usize,
    prefix: Option<String>,
    subnet: Option<Ipv4Addr>,
    /// `(node index or None for all, key, value)`.
    containerd_env: Vec<(Option<usize>, String, String)>,
    extra_images: Vec<ImageSpec>,
}

impl Default for RigBuilder {
    fn default() -> Self {
        Self {
            nodes: 3,
            prefix: None,
            subnet: None,
            containerd_env: Vec::new(),
            extra_images: Vec::new(),
        }
    }
}

impl RigBuilder {
    /// Number of nodes (default 3).
    pub fn nodes(mut self, count: usize) -> Self {
        self.nodes = count;
        self
    }

    /// Name prefix (1-8 chars `[a-z][a-z0-9]*`); default: random per run (e.g. `spk3x9`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// The /24 to use, given by its network address (e.g. `10.99.1.0`); default: a random
    /// `10.x.y.0/24` that overlaps no address or route on this machine.
    pub fn subnet(mut self, base: Ipv4Addr) -> Self {
        self.subnet = Some(base);
        self
    }

    /// An environment variable for every node's containerd (e.g. `SSL_CERT_FILE`). containerd
    /// otherwise gets only `PATH`. Per node it can be changed later with
    /// [`Node::restart_containerd_with_env`].
    pub fn containerd_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.containerd_env.push((None, key.into(), value.into()));
        self
    }

    /// Like [`containerd_env`](Self::containerd_env), for node `index` (0-based) only; applied
    /// after the all-node variables, so it can override them.
    pub fn node_containerd_env(
        mut self,
        index: usize,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.containerd_env
            .push((Some(index), key.into(), value.into()));
        self
    }

    /// The containerd environment for node `index`: all-node variables, then its own.
    fn env_for(&self, index: usize) -> Vec<(String, String)> {
        let all = self
            .containerd_env
            .iter()
            .filter(|(node, _, _)| node.is_none());
        let own = self
            .containerd_env
            .iter()
            .filter(|(node, _, _)| *node == Some(index));
        all.chain(own)
            .map(|(_, key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// Builds and pushes another image during start-up (in parallel with the rest), in addition
    /// to the standard ones; see also [`Rig::push_image`].
    pub fn image(mut self, spec: ImageSpec) -> Self {
        self.extra_images.push(spec);
        self
    }

    /// Brings the rig up: network, CA, registry, containerd on every node, images built and
    /// pushed. On error everything created so far is removed again.
    pub async fn start(self) -> Result<Rig> {
        let started = Instant::now();
        ensure!(
            (1..=MAX_NODES).contains(&self.nodes),
            "a rig needs 1 to {MAX_NODES} nodes, not {}",
            self.nodes
        );
        let prefix = self.prefix.clone().unwrap_or_else(random_prefix);
        let names = Names::new(&prefix)?;
        let stale = leftovers(&prefix);
        if !stale.is_empty() {
            bail!(
                "prefix {prefix} is in use or was not cleaned up ({}); pick another prefix or run spegel_tests::rig::cleanup({prefix:?})",
                stale.join(", ")
            );
        }
        let scratch = names.scratch_dir();
        let logs_dir = scratch.join("logs");
        let cgroup_dir = cgroup2_mount()?.join(&prefix);
        let processes = Arc::new(ProcessTable::new(logs_dir.clone(), cgroup_dir.clone()));
        // From here on, an early return drops the guard, which removes everything again.
        let guard = TeardownGuard {
            names: names.clone(),
            processes: Arc::clone(&processes),
            cgroup_dir: cgroup_dir.clone(),
            armed: true,
        };
        std::fs::create_dir_all(&logs_dir)
            .with_context(|| format!("creating {}", logs_dir.display()))?;
        // Lets `cleanup_stale` tell a crashed run's remains from a live rig.
        let owner = scratch.join(cleanup::OWNER_FILE);
        std::fs::write(&owner, std::process::id().to_string())
            .with_context(|| format!("writing {}", owner.display()))?;
        cgroup::create(&cgroup_dir)?;
        let rig = self
            .bring_up(names, scratch, logs_dir, cgroup_dir, processes, guard)
            .await?;
        tracing::info!(
            prefix = rig.prefix(),
            subnet = %rig.subnet,
            nodes = rig.nodes.len(),
            elapsed = ?started.elapsed(),
            "rig up"
        );
        Ok(rig)
    }

    async fn bring_up(
        self,
        names: Names,
        scratch: PathBuf,
        logs_dir: PathBuf,
        cgroup_dir: PathBuf,
        processes: Arc<ProcessTable>,
        guard: TeardownGuard,
    ) -> Result<Rig> {
        let subnet = match self.subnet {
            Some(base) => Subnet::new(base)?,
            None => net::choose_subnet().await?,
        };
        let registry_ip = subnet.host(10);
        let node_ips: Vec<Ipv4Addr> = (0..self.nodes)
            .map(|index| node_ip(subnet, index))
            .collect::<Result<_>>()?;

        // Network: the bridge, then every namespace in parallel.
        net::create_bridge(&names, subnet).await?;
        let mut roles: Vec<(String, Ipv4Addr)> = vec![("reg".to_owned(), registry_ip)];
        roles.extend(
            node_ips
                .iter()
                .enumerate()
                .map(|(index, ip)| (node::node_name(index), *ip)),
        );
        futures::future::try_join_all(
            roles
                .iter()
                .map(|(role, ip)| net::create_netns(&names, role, *ip)),
        )
        .await?;
        let mut hosts_entries = vec![(registry_ip, names.registry_host())];
        hosts_entries.extend(
            roles
                .iter()
                .skip(1)
                .map(|(role, ip)| (*ip, names.node_host(role))),
        );
        for (role, _) in &roles {
            net::write_hosts_file(&names.netns(role), &hosts_entries)?;
        }

        // TLS material for the registry: a name (clients send no SNI for IP literals) and the IP.
        let ca = TestCa::generate(
            &scratch.join("ca"),
            &format!("spegel rig CA {}", names.prefix()),
        )?;
        let registry_cert = ca.issue(
            &scratch.join("ca"),
            "registry",
            &[names.registry_host(), registry_ip.to_string()],
        )?;

        // Images build on blocking threads while the daemons start.
        let layout = Arc::new(Layout::create(&scratch.join("layout"))?);
        let mut specs = vec![ImageSpec::small(), ImageSpec::four(), ImageSpec::multi()];
        specs.extend(self.extra_images.iter().cloned());
        let builds = futures::future::try_join_all(specs.into_iter().map(|spec| {
            let layout = Arc::clone(&layout);
            async move {
                tokio::task::spawn_blocking(move || layout.build(&spec))
                    .await
                    .context("image build task failed")?
            }
        }));

        // The cluster secret every daemon of this rig holds (a Kubernetes Secret in a cluster).
        write_cluster_secret(&scratch.join(CLUSTER_SECRET_FILE))?;
        let registry_netns = names.netns("reg");
        let registry_dir = scratch.join("registry");
        let registry_secret = format!("spegel-rig-{}", names.prefix());
        let registry_launch = Registry::launch(
            |spec| processes.spawn(spec, Some(registry_netns.clone())),
            names.registry_host(),
            registry_netns.clone(),
            registry_ip,
            &registry_dir,
            &registry_cert,
            &registry_secret,
        );
        let upstream = node::Upstream {
            hostname: names.registry_host(),
            ip: registry_ip,
            ca_cert: ca.cert_path().to_path_buf(),
        };
        let node_launches =
            futures::future::try_join_all(node_ips.iter().enumerate().map(|(index, ip)| {
                let name = node::node_name(index);
                Node::launch(node::NodeSetup {
                    index,
                    netns: names.netns(&name),
                    ip: *ip,
                    dir: scratch.join(&name),
                    cgroup_dir: cgroup_dir.join(&name),
                    processes: Arc::clone(&processes),
                    upstream: upstream.clone(),
                    env: self.env_for(index),
                })
            }));
        let (registry, nodes, built) = tokio::try_join!(registry_launch, node_launches, builds)?;

        let pushed = futures::future::try_join_all(built.into_iter().map(|image| {
            let layout_dir = layout.dir().to_path_buf();
            let target = registry.ip_host(Endpoint::Plain);
            let hostname = registry.hostname().to_owned();
            async move {
                images::push(
                    &layout_dir,
                    &image.spec.name,
                    &target,
                    &image.spec.repository,
                    &image.spec.tag,
                )
                .await?;
                Ok::<_, anyhow::Error>(TestImage::new(image, hostname, registry_ip))
            }
        }))
        .await?;
        let mut pushed = pushed.into_iter();
        let (Some(small), Some(four), Some(multi)) = (pushed.next(), pushed.next(), pushed.next())
        else {
            bail!("standard images missing after push");
        };
        let standard = StandardImages { small, four, multi };
        let mut all_images = vec![
            standard.small.clone(),
            standard.four.clone(),
            standard.multi.clone(),
        ];
        all_images.extend(pushed);

        Ok(Rig {
            names,
            subnet,
            scratch,
            logs_dir,
            cgroup_dir,
            processes,
            ca,
            registry,
            nodes,
            layout,
            standard,
            images: Mutex::new(all_images),
            guard,
        })
    }
}

/// The images every rig pushes at start-up (repositories `rig/<name>`, tag `v1`).
#[derive(Clone, Debug)]
pub struct StandardImages {
    /// One ~1 MiB layer.
    pub small: TestImage,
    /// Four layers: 64 KiB, 1 MiB, 4 MiB, 16 MiB.
    pub four: TestImage,
    /// An index with linux/amd64 and linux/arm64 manifests (one 1 MiB layer each).
    pub multi: TestImage,
}

/// A running rig. See the [module docs](self) for the layout.
pub struct Rig {
    names: Names,
    subnet: Subnet,
    scratch: PathBuf,
    logs_dir: PathBuf,
    cgroup_dir: PathBuf,
    processes: Arc<ProcessTable>,
    ca: TestCa,
    registry: Registry,
    nodes: Vec<Node>,
    layout: Arc<Layout>,
    standard: StandardImages,
    images: Mutex<Vec<TestImage>>,
    guard: TeardownGuard,
}

impl Rig {
    /// Starts configuring a rig (3 nodes, random prefix and subnet by default).
    pub fn builder() -> RigBuilder {
        RigBuilder::default()
    }

    /// The name prefix of every namespace, link, cgroup and the scratch folder.
    pub fn prefix(&self) -> &str {
        self.names.prefix()
    }

    /// The rig's /24.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// The host's address on the bridge (`.1`): where the test process itself appears.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.subnet.host(1)
    }

    /// The cluster secret file every daemon gets unless told otherwise.
    pub fn cluster_secret_path(&self) -> PathBuf {
        self.scratch_dir().join(CLUSTER_SECRET_FILE)
    }

    /// The scratch folder (`/tmp/spegel-<prefix>`), removed at teardown.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Where process logs go (`<scratch>/logs/<name>.log`).
    pub fn logs_dir(&self) -> &Path {
        &self.logs_dir
    }

    /// The rig's cgroup2 directory (`<cg2>/<prefix>`); nodes' cgroups are its children.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (0-based; node 0 is `n1`).
    ///
    /// # Panics
    ///
    /// If `index` is out of range, like slice indexing.
    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// The upstream registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry's access log so far, both listeners (waits briefly for in-flight lines).
    pub async fn registry_log(&self) -> Result<RegistryLog> {
        self.registry.log().await
    }

    /// The test CA that signed the registry's certificate.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The standard images (`small`, `four`, `multi`).
    pub fn images(&self) -> &StandardImages {
        &self.standard
    }

    /// Any pushed image by name (standard, builder-added or [`push_image`](Self::push_image)ed).
    pub fn image(&self, name: &str) -> Option<TestImage> {
        self.lock_images()
            .iter()
            .find(|image| image.name == name)
            .cloned()
    }

    /// Builds `spec` into the rig's layout and pushes it; names must be unique per rig. Use a new
    /// name or seed for an image no node has seen yet, e.g.
    /// `ImageSpec::new("big").layers([256 * MIB]).seed(7)`.
    pub async fn push_image(&self, spec: ImageSpec) -> Result<TestImage> {
        let layout = Arc::clone(&self.layout);
        let started = Instant::now();
        let built = tokio::task::spawn_blocking(move || layout.build(&spec))
            .await
            .context("image build task failed")??;
        tracing::debug!(image = %built.spec.name, elapsed = ?started.elapsed(), "image built");
        images::push(
            self.layout.dir(),
            &built.spec.name,
            &self.registry.ip_host(Endpoint::Plain),
            &built.spec.repository,
            &built.spec.tag,
        )
        .await?;
        let image = TestImage::new(
            built,
            self.registry.hostname().to_owned(),
            self.registry.ip(),
        );
        self.lock_images().push(image.clone());
        Ok(image)
    }

    /// Starts a long-running process in node `index`'s namespace (see [`Node::spawn`]).
    ///
    /// # Panics
    ///
    /// If `index` is out of range.
    pub fn spawn_in_node(&self, index: usize, spec: ProcessSpec) -> Result<Process> {
        self.node(index).spawn(spec)
    }

    /// Starts a long-running process in any namespace (`None`: the host's), e.g. a fake server in
    /// the registry's namespace.
    pub fn spawn_in_netns(&self, netns: Option<&str>, spec: ProcessSpec) -> Result<Process> {
        self.processes.spawn(spec, netns.map(str::to_owned))
    }

    /// Tears everything down (see [`leftovers`] for what is checked) and reports any problems.
    pub async fn shutdown(self) -> Result<()> {
        let Rig { mut guard, .. } = self;
        let problems = tokio::task::spawn_blocking(move || guard.run())
            .await
            .context("teardown task failed")?;
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("rig teardown incomplete: {}", problems.join("; "))
        }
    }

    fn lock_images(&self) -> std::sync::MutexGuard<'_, Vec<TestImage>> {
        self.images
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Rig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rig")
            .field("prefix", &self.prefix())
            .field("subnet", &self.subnet)
            .field("nodes", &self.nodes)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// Runs teardown exactly once: explicitly from [`Rig::shutdown`], or from `Drop` (a panicking
/// test, or a failed start-up).
struct TeardownGuard {
    names: Names,
    processes: Arc<ProcessTable>,
    cgroup_dir: PathBuf,
    armed: bool,
}

impl TeardownGuard {
    fn run(&mut self) -> Vec<String> {
        if !std::mem::replace(&mut self.armed, false) {
            return Vec::new();
        }
        cleanup::teardown(&self.names, &self.processes, Some(&self.cgroup_dir))
    }
}

impl Drop for TeardownGuard {
    fn drop(&mut self) {
        let problems = self.run();
        if !problems.is_empty() {
            // Drop cannot return an error; the leftovers check in the test will fail instead.
            eprintln!(
                "spegel rig {}: teardown problems: {}",
                self.names.prefix(),
                problems.join("; ")
            );
        }
    }
}

fn node_ip(subnet: Subnet, index: usize) -> Result<Ipv4Addr> {
    let host = u8::try_from(11 + index).context("too many nodes for one /24")?;
    Ok(subnet.host(host))
}

/// The spegel daemon binary: `$SPEGEL_BIN`, else `<target>/release/spegel`, else
/// `<target>/debug/spegel`, where `<target>` is `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn spegel_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SPEGEL_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "SPEGEL_BIN={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent folder")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = [
        target.join("release").join("spegel"),
        target.join("debug").join("spegel"),
    ];
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "spegel binary not found (looked at {} and {}); build it with `cargo build --release -p spegel-daemon` or set SPEGEL_BIN",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// The rig's cluster secret, in its scratch directory.
const CLUSTER_SECRET_FILE: &str = "cluster.secret";

/// Writes 32 random bytes, hex-encoded, to `path` (mode 0600): a fresh cluster secret.
pub fn write_cluster_secret(path: &Path) -> Result<()> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, hex::encode(bytes).as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rig_can_be_shared_across_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Rig>();
        assert_send_sync::<Node>();
        assert_send_sync::<Process>();
    }

    #[test]
    fn node_ips_follow_the_registry() {
        let subnet = Subnet::new(Ipv4Addr::new(10, 70, 1, 0)).unwrap();
        assert_eq!(node_ip(subnet, 0).unwrap(), Ipv4Addr::new(10, 70, 1, 11));
        assert_eq!(node_ip(subnet, 199).unwrap(), Ipv4Addr::new(10, 70, 1, 210));
        assert!(node_ip(subnet, 245).is_err());
    }

    #[tokio::test]
    async fn builder_rejects_bad_options_before_touching_the_system() {
        let error = Rig::builder().nodes(0).start().await.unwrap_err();
        assert!(error.to_string().contains("1 to 200 nodes"), "{error:#}");
        let error = Rig::builder().prefix("Bad!").start().await.unwrap_err();
        assert!(error.to_string().contains("prefix"), "{error:#}");
    }
}
