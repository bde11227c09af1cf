//! Loads spegel's eBPF redirect programs, configures their maps, attaches them to a cgroup, and
//! hands the daemon each redirected connection's original destination.
//!
//! Links are fd-owned bpf_links, never pinned: when the daemon exits or crashes the kernel
//! detaches the programs and containerd's connections go direct again (fail-open).
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink, sock_ops::SockOpsLink,
    },
};
use spegel_common::{
    AF_INET, AF_INET6, CFG_FLAG_IPV6_LISTENER, CFG_FLAGS, CFG_OWN_CGROUP_HI, CFG_OWN_CGROUP_LO,
    CFG_PROXY_PORT, ConnKey, OrigDst, PassKey, REDIRECT_IPS_ENTRIES, REDIRECT_PORTS_ENTRIES,
};
use tokio::task::JoinHandle;

use crate::intercept::guard::GuardError;

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spegel"));

/// The `cgroup_sock_addr` programs, by their function names in `spegel-ebpf`.
const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];
/// The `sock_ops` program.
const SOCK_OPS_PROGRAM: &str = "spegel_sockops";

/// Errors of the eBPF loader.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF loader needs a tokio runtime (for the aya-log pump)")]
    NoRuntime,
    #[error("invalid redirect configuration: {0}")]
    Config(String),
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {kind} `{name}`")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map entry has an unknown address family {0}")]
    BadFamily(u32),
    #[error(transparent)]
    Guard(#[from] GuardError),
}

/// What the programs redirect, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The interception listener's port on 127.0.0.1 (and [::1]).
    pub listener_port: u16,
    /// Whether the listener also accepts on [::1]; without it IPv6 connects are left alone.
    pub ipv6_listener: bool,
    /// TCP destination ports whose connects are redirected (any address but loopback).
    pub ports: Vec<u16>,
    /// Destination addresses whose connects are redirected whatever the port (loopback included).
    pub ips: Vec<IpAddr>,
    /// Connects made from this cgroup (the daemon's own; a cgroup v2 id, the inode of its
    /// directory) are never redirected. Must not be zero.
    pub own_cgroup: u64,
}

impl RedirectConfig {
    fn validate(&self) -> Result<(), EbpfError> {
        if self.listener_port == 0 {
            return Err(EbpfError::Config("the listener port must not be 0".into()));
        }
        if self.own_cgroup == 0 {
            return Err(EbpfError::Config(
                "the daemon's own cgroup id must be known (not 0)".into(),
            ));
        }
        if self.ports.contains(&0) {
            return Err(EbpfError::Config("port 0 cannot be redirected".into()));
        }
        if self.ports.contains(&self.listener_port) {
            return Err(EbpfError::Config(format!(
                "the listener port {} cannot also be a redirected port",
                self.listener_port
            )));
        }
        if self.ports.len() > REDIRECT_PORTS_ENTRIES as usize {
            return Err(EbpfError::Config(format!(
                "at most {REDIRECT_PORTS_ENTRIES} redirected ports"
            )));
        }
        let (v4, v6) = self.ips.iter().fold((0, 0), |(v4, v6), ip| match ip {
            IpAddr::V4(_) => (v4 + 1, v6),
            IpAddr::V6(_) => (v4, v6 + 1),
        });
        if v4 > REDIRECT_IPS_ENTRIES as usize || v6 > REDIRECT_IPS_ENTRIES as usize {
            return Err(EbpfError::Config(format!(
                "at most {REDIRECT_IPS_ENTRIES} redirected addresses per family"
            )));
        }
        Ok(())
    }
}

/// A cgroup2 directory, identified by path and inode: a directory removed and recreated under
/// the same path is a different cgroup (and has lost its attachments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub path: PathBuf,
    pub ino: u64,
}

impl CgroupDir {
    /// Stats `path` now.
    pub fn stat(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        if !meta.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            ino: meta.ino(),
        })
    }
}

/// One attached program; dropping it detaches it.
#[derive(Debug)]
enum AttachedLink {
    SockAddr(#[expect(dead_code, reason = "held for its Drop")] CgroupSockAddrLink),
    SockOps(#[expect(dead_code, reason = "held for its Drop")] SockOpsLink),
}

/// The loaded programs and their maps. Dropping it detaches every program (and unloads them
/// once the last map handle is gone).
pub struct Redirector {
    // Field order matters: links drop (detach) before the programs they belong to.
    links: Vec<AttachedLink>,
    attached: Option<CgroupDir>,
    orig: OrigDstTable,
    pass: PassMap,
    log_pump: Option<JoinHandle<()>>,
    ebpf: Ebpf,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("attached", &self.attached)
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if let Some(pump) = self.log_pump.take() {
            pump.abort();
        }
        if let Some(cgroup) = &self.attached {
            tracing::info!(cgroup = %cgroup.path.display(), "detaching eBPF redirect programs");
        }
    }
}

impl Redirector {
    /// Loads and verifies the programs and fills the maps; nothing is attached yet. Must run
    /// inside a tokio runtime: eBPF log records are pumped to `tracing` by a task.
    pub fn load(config: &RedirectConfig) -> Result<Self, EbpfError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EbpfError::NoRuntime)?;
        raise_memlock_limit();

        // Records below the current tracing level are not even written by the programs.
        let level: u8 = match tracing::level_filters::LevelFilter::current()
            .into_level()
            .map(|l| l.as_str())
        {
            None => 0,
            Some("ERROR") => 1,
            Some("WARN") => 2,
            Some("INFO") => 3,
            Some("DEBUG") => 4,
            Some(_) => 5,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)?;
        let log_pump = start_log_pump(&mut ebpf, &runtime);

        configure_maps(&mut ebpf, config)?;
        for name in SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        sock_ops_program(&mut ebpf)?
            .load()
            .map_err(|source| EbpfError::Program {
                name: SOCK_OPS_PROGRAM,
                source,
            })?;

        let map = take_hash_map(&mut ebpf, "ORIG_BY_PORT")?;
        let pass = take_hash_map(&mut ebpf, "PASS")?;
        tracing::debug!(
            listener_port = config.listener_port,
            ports = ?config.ports,
            ips = ?config.ips,
            "eBPF redirect programs loaded"
        );
        Ok(Self {
            links: Vec::new(),
            attached: None,
            orig: OrigDstTable(Arc::new(Mutex::new(map))),
            pass: PassMap(Arc::new(Mutex::new(pass))),
            log_pump,
            ebpf,
        })
    }

    /// Attaches every program to `cgroup`, then detaches them from the cgroup they were attached
    /// to before (if any): containerd is never left without a redirect in between.
    pub fn attach(&mut self, cgroup: &CgroupDir) -> Result<(), EbpfError> {
        let dir = File::open(&cgroup.path).map_err(|source| EbpfError::Cgroup {
            path: cgroup.path.clone(),
            source,
        })?;
        let mut links = Vec::with_capacity(SOCK_ADDR_PROGRAMS.len() + 1);
        // On an error, `links` drops and detaches what was attached so far.
        for name in SOCK_ADDR_PROGRAMS {
            let program = sock_addr_program(&mut self.ebpf, name)?;
            // aya 0.14 turns the mode into bpf_link flags and the kernel rejects any flags on
            // cgroup links; links are multi-attach anyway and coexist with other programs.
            let id = program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            let link = program
                .take_link(id)
                .map_err(|source| EbpfError::Program { name, source })?;
            links.push(AttachedLink::SockAddr(link));
        }
        let program = sock_ops_program(&mut self.ebpf)?;
        let err = |source| EbpfError::Program {
            name: SOCK_OPS_PROGRAM,
            source,
        };
        let id = program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(err)?;
        links.push(AttachedLink::SockOps(program.take_link(id).map_err(err)?));

        let previous = self.attached.replace(cgroup.clone());
        self.links = links; // the old links drop here: detached from the previous cgroup
        match previous {
            Some(previous) if previous != *cgroup => tracing::info!(
                cgroup = %cgroup.path.display(),
                ino = cgroup.ino,
                previous = %previous.path.display(),
                previous_ino = previous.ino,
                "eBPF redirect re-attached (containerd's cgroup changed or was recreated)"
            ),
            _ => tracing::info!(
                cgroup = %cgroup.path.display(),
                ino = cgroup.ino,
                "eBPF redirect attached"
            ),
        }
        Ok(())
    }

    /// Tells the programs the daemon's own cgroup id anew (the daemon was moved to another
    /// cgroup): connects from there are never redirected.
    pub fn set_own_cgroup(&mut self, id: u64) -> Result<(), EbpfError> {
        if id == 0 {
            return Err(EbpfError::Config(
                "the daemon's own cgroup id must be known (not 0)".into(),
            ));
        }
        let mut cfg: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("CONFIG").ok_or(EbpfError::Missing {
                kind: "map",
                name: "CONFIG",
            })?)
            .map_err(|source| EbpfError::Map {
                name: "CONFIG",
                source,
            })?;
        set_own_cgroup(&mut cfg, id)
    }

    /// Detaches every program; connections from the cgroup go direct again.
    pub fn detach(&mut self) {
        self.links.clear();
        if let Some(cgroup) = self.attached.take() {
            tracing::info!(cgroup = %cgroup.path.display(), "eBPF redirect detached");
        }
    }

    /// The cgroup the programs are attached to.
    pub fn attached(&self) -> Option<&CgroupDir> {
        self.attached.as_ref()
    }

    /// The table of original destinations; it stays usable after the redirector is dropped
    /// (it then only drains what was recorded before).
    pub fn orig_dst_table(&self) -> OrigDstTable {
        self.orig.clone()
    }

    /// The destinations whose connects go direct (see [`PassMap`]).
    pub fn pass_map(&self) -> PassMap {
        self.pass.clone()
    }
}

/// Takes a hash map (plain or LRU) out of the object, to own it apart from the programs.
fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    HashMap::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn sock_ops_program(ebpf: &mut Ebpf) -> Result<&mut SockOps, EbpfError> {
    ebpf.program_mut(SOCK_OPS_PROGRAM)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name: SOCK_OPS_PROGRAM,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            name: SOCK_OPS_PROGRAM,
            source,
        })
}

/// Only needed before Linux 5.11 (eBPF memory is memcg-accounted since); may fail in sandboxes.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK (harmless on Linux >= 5.11)"
        );
    }
}

/// Forwards aya-log records (through the `log` facade, hence tracing-log) from the ring buffer.
fn start_log_pump(ebpf: &mut Ebpf, runtime: &tokio::runtime::Handle) -> Option<JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "eBPF log records will not be shown");
            return None;
        }
    };
    let _guard = runtime.enter();
    // SAFETY: the fd is the logger's ring buffer map fd, owned by the logger and never replaced;
    // the AsyncFd owns the logger, so the fd stays open and the same for the AsyncFd's lifetime.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(%error, "eBPF log records will not be shown");
            return None;
        }
    };
    Some(runtime.spawn(async move {
        loop {
            let mut guard = match logger.readable_mut().await {
                Ok(guard) => guard,
                Err(error) => {
                    tracing::warn!(%error, "eBPF log pump stopped");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

fn configure_maps(ebpf: &mut Ebpf, config: &RedirectConfig) -> Result<(), EbpfError> {
    let map_err = |name| move |source| EbpfError::Map { name, source };
    let missing = |name| EbpfError::Missing { kind: "map", name };

    let mut cfg: Array<_, u32> = Array::try_from(ebpf.map_mut("CONFIG").ok_or(missing("CONFIG"))?)
        .map_err(map_err("CONFIG"))?;
    let flags = if config.ipv6_listener {
        CFG_FLAG_IPV6_LISTENER
    } else {
        0
    };
    set_own_cgroup(&mut cfg, config.own_cgroup)?;
    cfg.set(CFG_FLAGS, flags, 0).map_err(map_err("CONFIG"))?;
    // The port last: a zero port disables everything, so the programs never see half a config.
    cfg.set(CFG_PROXY_PORT, u32::from(config.listener_port), 0)
        .map_err(map_err("CONFIG"))?;

    let mut ports: HashMap<_, u16, u8> = HashMap::try_from(
        ebpf.map_mut("REDIRECT_PORTS")
            .ok_or(missing("REDIRECT_PORTS"))?,
    )
    .map_err(map_err("REDIRECT_PORTS"))?;
    for port in &config.ports {
        ports
            .insert(port, 1, 0)
            .map_err(map_err("REDIRECT_PORTS"))?;
    }

    let mut ip4: HashMap<_, u32, u8> = HashMap::try_from(
        ebpf.map_mut("REDIRECT_IP4")
            .ok_or(missing("REDIRECT_IP4"))?,
    )
    .map_err(map_err("REDIRECT_IP4"))?;
    for ip in &config.ips {
        if let Some(v4) = as_ipv4(*ip) {
            ip4.insert(ip4_key(v4), 1, 0)
                .map_err(map_err("REDIRECT_IP4"))?;
        }
    }
    let mut ip6: HashMap<_, [u32; 4], u8> = HashMap::try_from(
        ebpf.map_mut("REDIRECT_IP6")
            .ok_or(missing("REDIRECT_IP6"))?,
    )
    .map_err(map_err("REDIRECT_IP6"))?;
    for ip in &config.ips {
        if let IpAddr::V6(v6) = ip
            && v6.to_ipv4_mapped().is_none()
        {
            ip6.insert(ip6_key(*v6), 1, 0)
                .map_err(map_err("REDIRECT_IP6"))?;
        }
    }
    Ok(())
}

/// Writes the daemon's own cgroup id into `CONFIG` (two 32-bit halves). A program that reads
/// the halves while they change sees an id that is no cgroup's: the daemon's connects are not
/// exempt for that moment, but the daemon's cgroup is never one the programs run for (the guard
/// refuses such an attach), so nothing changes.
fn set_own_cgroup(cfg: &mut Array<&mut MapData, u32>, id: u64) -> Result<(), EbpfError> {
    let map_err = |source| EbpfError::Map {
        name: "CONFIG",
        source,
    };
    let (lo, hi) = own_cgroup_halves(id);
    cfg.set(CFG_OWN_CGROUP_HI, hi, 0).map_err(map_err)?;
    cfg.set(CFG_OWN_CGROUP_LO, lo, 0).map_err(map_err)
}

/// A cgroup id as the `CONFIG` halves the programs reassemble: `(low, high)`.
pub(crate) fn own_cgroup_halves(id: u64) -> (u32, u32) {
    // Truncation is the point: the low and the high 32 bits.
    (id as u32, (id >> 32) as u32)
}

/// An IPv4 address, or the IPv4 address inside a v4-mapped IPv6 one (connect6 looks those up in
/// `REDIRECT_IP4`).
fn as_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// The `REDIRECT_IP4` key: network-order bytes in a native u32, as `bpf_sock_addr.user_ip4`.
pub(crate) fn ip4_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The `REDIRECT_IP6` key: network-order bytes in native u32 words, as `bpf_sock_addr.user_ip6`.
pub(crate) fn ip6_key(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The `PASS` key of a destination, as the programs build it (v4-mapped is IPv4).
pub(crate) fn pass_key(dst: SocketAddr) -> PassKey {
    let port = u32::from(dst.port());
    match as_ipv4(dst.ip()) {
        Some(v4) => PassKey {
            family: AF_INET,
            port,
            addr: [ip4_key(v4), 0, 0, 0],
        },
        None => PassKey {
            family: AF_INET6,
            port,
            addr: match dst.ip() {
                IpAddr::V6(v6) => ip6_key(v6),
                IpAddr::V4(_) => [0; 4], // handled above
            },
        },
    }
}

/// The programs' `PASS` map: destinations whose connects go direct until a `CLOCK_MONOTONIC`
/// time. Cheap to clone; it stays usable (and harmless) after the redirector is dropped.
#[derive(Clone)]
pub struct PassMap(Arc<Mutex<HashMap<MapData, PassKey, u64>>>);

impl std::fmt::Debug for PassMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassMap")
    }
}

impl PassMap {
    /// Connects to `dst` go direct until `until_ns` (`CLOCK_MONOTONIC` nanoseconds).
    pub fn insert(&self, dst: SocketAddr, until_ns: u64) -> Result<(), EbpfError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(pass_key(dst), until_ns, 0)
            .map_err(|source| EbpfError::Map {
                name: "PASS",
                source,
            })
    }

    /// Connects to `dst` are redirected again.
    pub fn remove(&self, dst: SocketAddr) -> Result<(), EbpfError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.remove(&pass_key(dst)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(EbpfError::Map {
                name: "PASS",
                source,
            }),
        }
    }
}

/// The `ORIG_BY_PORT` key for a connection accepted from `peer`.
pub(crate) fn conn_key(peer: SocketAddr) -> ConnKey {
    let family = match peer {
        SocketAddr::V4(_) => AF_INET,
        // The v6 listener is bound to [::1], so v4-mapped peers cannot occur; map them anyway.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => AF_INET,
        SocketAddr::V6(_) => AF_INET6,
    };
    ConnKey {
        family,
        port: u32::from(peer.port()),
    }
}

/// The original destination a map entry records; v4-mapped IPv6 becomes plain IPv4.
pub(crate) fn orig_to_socket_addr(orig: &OrigDst) -> Result<SocketAddr, EbpfError> {
    // The port field is host order and at most 16 bits wide; truncation is the kernel's layout.
    let port = orig.port as u16;
    match orig.family {
        AF_INET => Ok(SocketAddr::new(
            Ipv4Addr::from(orig.addr[0].to_ne_bytes()).into(),
            port,
        )),
        AF_INET6 => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(orig.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            let ip = Ipv6Addr::from(bytes);
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            Ok(SocketAddr::new(ip, port))
        }
        other => Err(EbpfError::BadFamily(other)),
    }
}

/// Where redirected connections were going, keyed by the client's port. Cheap to clone.
#[derive(Clone)]
pub struct OrigDstTable(Arc<Mutex<HashMap<MapData, ConnKey, OrigDst>>>);

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrigDstTable")
    }
}

impl OrigDstTable {
    /// Looks up and deletes the original destination of the connection accepted from `peer`.
    /// `Ok(None)`: nothing was recorded (the peer connected to the listener directly).
    pub fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError> {
        let key = conn_key(peer);
        let err = |source| EbpfError::Map {
            name: "ORIG_BY_PORT",
            source,
        };
        let orig = {
            // A poisoned lock only means another thread panicked mid-lookup; the map is the
            // kernel's and stays consistent.
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key, 0) {
                Ok(orig) => {
                    // Deleting may race with LRU eviction: a missing key is fine.
                    match map.remove(&key) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(error) => return Err(err(error)),
                    }
                    orig
                }
                Err(MapError::KeyNotFound) => return Ok(None),
                Err(error) => return Err(err(error)),
            }
        };
        orig_to_socket_addr(&orig).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_keys_hold_network_order_bytes() {
        let key = ip4_key(v4("10.231.0.2"));
        assert_eq!(key.to_ne_bytes(), [10, 231, 0, 2]);
        let orig = OrigDst {
            family: AF_INET,
            port: 443,
            addr: [key, 0, 0, 0],
        };
        assert_eq!(
            orig_to_socket_addr(&orig).unwrap(),
            "10.231.0.2:443".parse().unwrap()
        );
    }

    #[test]
    fn ipv6_keys_roundtrip() {
        let ip = v6("fd00:1:2:3::42");
        let key = ip6_key(ip);
        assert_eq!(key[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x01]);
        assert_eq!(key[3].to_ne_bytes(), [0, 0, 0, 0x42]);
        let orig = OrigDst {
            family: AF_INET6,
            port: 5000,
            addr: key,
        };
        assert_eq!(
            orig_to_socket_addr(&orig).unwrap(),
            "[fd00:1:2:3::42]:5000".parse().unwrap()
        );
    }

    #[test]
    fn v4_mapped_destination_becomes_ipv4() {
        let orig = OrigDst {
            family: AF_INET6,
            port: 80,
            addr: ip6_key(v6("::ffff:10.231.0.2")),
        };
        assert_eq!(
            orig_to_socket_addr(&orig).unwrap(),
            "10.231.0.2:80".parse().unwrap()
        );
    }

    #[test]
    fn unknown_family_is_an_error() {
        let orig = OrigDst {
            family: 1,
            port: 80,
            addr: [0; 4],
        };
        assert!(matches!(
            orig_to_socket_addr(&orig),
            Err(EbpfError::BadFamily(1))
        ));
    }

    #[test]
    fn pass_keys_as_the_programs_build_them() {
        let key = pass_key("10.231.0.2:443".parse().unwrap());
        assert_eq!(
            key,
            PassKey {
                family: AF_INET,
                port: 443,
                addr: [ip4_key(v4("10.231.0.2")), 0, 0, 0]
            }
        );
        // connect6 keys a v4-mapped destination as IPv4.
        assert_eq!(pass_key("[::ffff:10.231.0.2]:443".parse().unwrap()), key);
        let key = pass_key("[fd00::1]:5000".parse().unwrap());
        assert_eq!(key.family, AF_INET6);
        assert_eq!(key.port, 5000);
        assert_eq!(key.addr, ip6_key(v6("fd00::1")));
    }

    #[test]
    fn keys_by_peer_family() {
        assert_eq!(
            conn_key("127.0.0.1:40000".parse().unwrap()),
            ConnKey {
                family: AF_INET,
                port: 40000
            }
        );
        assert_eq!(
            conn_key("[::1]:40001".parse().unwrap()),
            ConnKey {
                family: AF_INET6,
                port: 40001
            }
        );
        assert_eq!(
            conn_key("[::ffff:127.0.0.1]:40002".parse().unwrap()),
            ConnKey {
                family: AF_INET,
                port: 40002
            }
        );
    }

    #[test]
    fn own_cgroup_id_in_two_halves() {
        assert_eq!(own_cgroup_halves(1), (1, 0));
        let id = 0x0000_0001_0000_2a2a_u64;
        let (lo, hi) = own_cgroup_halves(id);
        assert_eq!((lo, hi), (0x2a2a, 1));
        assert_eq!((u64::from(hi) << 32) | u64::from(lo), id);
    }

    #[test]
    fn config_validation() {
        let good = RedirectConfig {
            listener_port: 15001,
            ipv6_listener: true,
            ports: vec![443, 80],
            ips: vec!["10.0.0.1".parse().unwrap()],
            own_cgroup: 1,
        };
        assert!(good.validate().is_ok());
        let bad = |f: fn(&mut RedirectConfig)| {
            let mut c = good.clone();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.listener_port = 0));
        assert!(bad(|c| c.own_cgroup = 0));
        assert!(bad(|c| c.ports.push(0)));
        assert!(bad(|c| c.ports.push(15001)));
        assert!(bad(|c| c.ports = (1..=65).collect()));
        assert!(bad(|c| c.ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST); 1025]));
        assert_eq!(
            as_ipv4("::ffff:1.2.3.4".parse().unwrap()),
            Some(v4("1.2.3.4"))
        );
        assert_eq!(as_ipv4("::1".parse().unwrap()), None);
    }
}
