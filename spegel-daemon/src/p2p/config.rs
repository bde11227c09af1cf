//! The router's configuration: command-line flags, [`P2pConfig`] with its [`Tunables`], what the
//! node announces about its registry, and the errors of building the router.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use libp2p::{Multiaddr, multiaddr::Protocol};

use super::DnsSeed;
use crate::membership::ClusterSecrets;
use crate::net::Cidr;

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    /// Where the libp2p router listens (TCP).
    #[arg(long, env = "SPEGEL_ROUTER_ADDR", default_value = "0.0.0.0:5001")]
    pub router_addr: SocketAddr,
    /// Static bootstrap peers, as multiaddrs (`/ip4/10.0.0.5/tcp/5001`, optionally ending in
    /// `/p2p/<peer id>`). Repeat the flag or separate with commas.
    #[arg(long, env = "SPEGEL_BOOTSTRAP_PEERS", value_delimiter = ',', value_parser = parse_multiaddr)]
    pub bootstrap_peers: Vec<Multiaddr>,
    /// A DNS name whose A/AAAA records are bootstrap peers, e.g. a headless Service
    /// (`spegel-bootstrap.spegel.svc.cluster.local`), optionally with `:port` (default: the
    /// router port).
    #[arg(long, env = "SPEGEL_BOOTSTRAP_DNS")]
    pub bootstrap_dns: Option<DnsSeed>,
    /// How other nodes reach this node's registry API: `:PORT` (they use the IP they reach this
    /// node at) or `IP:PORT`. Default: `:<registry port>`.
    #[arg(long, env = "SPEGEL_REGISTRY_ADVERTISE_ADDR")]
    pub registry_advertise_addr: Option<RegistryAdvertise>,
    /// The cluster's node networks (`10.0.0.0/16,fd00::/64`): a peer announcing its registry
    /// at a full `IP:PORT` is believed when the IP is within them; otherwise only the IP the
    /// peer is reached at is (loopback, link-local, unspecified and multicast never are).
    #[arg(
        long,
        env = "SPEGEL_NODE_CIDRS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub node_cidrs: Vec<Cidr>,
    /// How long a lookup may search for providers.
    #[arg(long, env = "SPEGEL_LOOKUP_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub lookup_timeout: Duration,
    /// How long lookup results are reused.
    #[arg(long, env = "SPEGEL_LOOKUP_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub lookup_cache_ttl: Duration,
    /// How often each advertised key is re-provided (minus up to a ninth of it, at random, to
    /// spread the load).
    #[arg(long, env = "SPEGEL_REPROVIDE_INTERVAL", value_parser = humantime::parse_duration, default_value = "15m")]
    pub reprovide_interval: Duration,
    /// How long other nodes keep this node's provider records; must exceed the reprovide
    /// interval.
    #[arg(long, env = "SPEGEL_PROVIDER_RECORD_TTL", value_parser = humantime::parse_duration, default_value = "19m")]
    pub provider_record_ttl: Duration,
    /// Provide queries in flight at once.
    #[arg(long, env = "SPEGEL_MAX_CONCURRENT_PROVIDES", default_value_t = NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN))]
    pub max_concurrent_provides: NonZeroUsize,
    /// Most libp2p connections established at once, in and out; further ones are denied.
    #[arg(long, env = "SPEGEL_ROUTER_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub router_max_connections: NonZeroU32,
    /// Most libp2p connections established with one peer at once (two when both sides dial at
    /// the same moment is normal).
    #[arg(long, env = "SPEGEL_ROUTER_MAX_CONNECTIONS_PER_PEER", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub router_max_connections_per_peer: NonZeroU32,
    /// Most incoming libp2p connections still being set up (handshake) at once.
    #[arg(long, env = "SPEGEL_ROUTER_MAX_PENDING_INCOMING", default_value_t = DEFAULT_MAX_PENDING_INCOMING)]
    pub router_max_pending_incoming: NonZeroU32,
    /// Memory budget of the whole daemon, in MiB, as libp2p sees it: while the process's resident
    /// memory is above it, new libp2p connections (in and out) are denied, so a flood of peers
    /// cannot grow it further. Established connections and the registry API are unaffected.
    #[arg(long, env = "SPEGEL_ROUTER_MAX_MEMORY_MIB", default_value_t = DEFAULT_MAX_MEMORY_MIB)]
    pub router_max_memory_mib: NonZeroU64,
}

/// Established connections at once unless told otherwise (the flag's default too).
const DEFAULT_MAX_CONNECTIONS: NonZeroU32 = NonZeroU32::new(1024).unwrap();
/// Established connections per peer unless told otherwise (the flag's default too).
const DEFAULT_MAX_CONNECTIONS_PER_PEER: NonZeroU32 = NonZeroU32::new(8).unwrap();
/// Incoming connections in their handshake unless told otherwise (the flag's default too).
const DEFAULT_MAX_PENDING_INCOMING: NonZeroU32 = NonZeroU32::new(256).unwrap();
/// Resident memory (MiB) above which new libp2p connections are denied unless told otherwise
/// (the flag's default too): far above what a node uses, so only runaway growth hits it.
const DEFAULT_MAX_MEMORY_MIB: NonZeroU64 = NonZeroU64::new(1024).unwrap();

/// How other nodes reach this node's registry API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryAdvertise {
    /// Only the port: other nodes pair it with the IP they reach this node at.
    Port(u16),
    /// A full address, used as-is.
    Addr(SocketAddr),
}

/// Why a [`RegistryAdvertise`] or [`DnsSeed`] string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub(super) String);

/// Which transport the swarm runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP (with DNS multiaddr support when the system resolver config is readable).
    Tcp,
    /// libp2p's in-process memory transport (`/memory/<n>` addresses), for tests.
    Memory,
}

/// Where the node's identity comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKey {
    /// `<dir>/node.key`, created (mode 0600) on first start, so the peer id survives restarts.
    Persistent(PathBuf),
    /// A fresh key on every start (tests).
    Ephemeral,
}

/// Everything [`P2pRouter::new`] needs.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// Where the node's identity comes from.
    pub key: NodeKey,
    /// Which transport the swarm runs over.
    pub transport: TransportKind,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/5001`, `/memory/0`, …).
    pub listen_addrs: Vec<Multiaddr>,
    /// Static bootstrap peers, with or without `/p2p/<id>`.
    pub bootstrap_peers: Vec<Multiaddr>,
    /// A DNS name to resolve for more bootstrap peers.
    pub bootstrap_dns: Option<DnsSeed>,
    /// What this node announces about its registry API.
    pub registry: RegistryAdvertise,
    /// Only holders of one of these secrets may connect; `None`: anyone.
    pub secrets: Option<ClusterSecrets>,
    /// Networks within which peers' announced registry IPs are believed.
    pub node_cidrs: Vec<Cidr>,
    /// Timings and limits.
    pub tunables: Tunables,
}

/// Timings and limits. [`Tunables::default`] holds the production values.
#[derive(Debug, Clone)]
pub struct Tunables {
    /// Upper bound on one lookup; the returned channel closes by then.
    pub lookup_timeout: Duration,
    /// How long lookup results are reused; zero disables the cache.
    pub lookup_cache_ttl: Duration,
    /// How long other nodes keep our provider records.
    pub provider_record_ttl: Duration,
    /// How often each key is re-provided.
    pub reprovide_interval: Duration,
    /// Each re-provide happens up to this much earlier than the interval, at random.
    pub reprovide_jitter: Duration,
    /// Delay before retrying a provide that reached no peer.
    pub provide_retry: Duration,
    /// Provide queries in flight at once.
    pub max_concurrent_provides: NonZeroUsize,
    /// Re-bootstrap (re-dial seeds, refresh the routing table) this often once connected.
    pub rebootstrap_interval: Duration,
    /// First retry delay while the routing table is empty; doubles up to `bootstrap_backoff_max`.
    pub bootstrap_backoff_min: Duration,
    /// Longest retry delay while the routing table is empty.
    pub bootstrap_backoff_max: Duration,
    /// Seeds taken from the DNS answer, per address family.
    pub dns_seeds_per_family: usize,
    /// Timeout of one Kademlia query (provide, bootstrap; lookups stop earlier).
    pub query_timeout: Duration,
    /// Idle connections close after this long.
    pub idle_connection_timeout: Duration,
    /// Keys for which this node stores other nodes' provider records, at most.
    pub max_stored_keys: usize,
    /// How long a peer's registry address is trusted without a fresh Identify.
    pub registry_addr_ttl: Duration,
    /// Granularity of lookup deadlines and the provide schedule.
    pub tick: Duration,
    /// Connections established at once, at most.
    pub max_connections: NonZeroU32,
    /// Connections established with one peer at once, at most.
    pub max_connections_per_peer: NonZeroU32,
    /// Incoming connections in their handshake at once, at most.
    pub max_pending_incoming: NonZeroU32,
    /// New connections are denied while the process's resident memory is above this many bytes.
    pub max_memory_bytes: usize,
}

/// Why the router could not be built.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    /// The node key file could not be read, created or written.
    #[error("node key {path}: {source}")]
    KeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node key file exists but does not hold a key.
    #[error("node key {path} is not a valid libp2p key: {reason}")]
    KeyDecode { path: PathBuf, reason: String },
    /// The transport could not be set up.
    #[error("transport: {0}")]
    Transport(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// The configuration is inconsistent.
    #[error("invalid router configuration: {0}")]
    Config(String),
}

// === impl RouterArgs ===

impl RouterArgs {
    /// The router configuration: the node key lives in `data_dir`; unless
    /// `--registry-advertise-addr` says otherwise, peers reach the registry on `registry_port`.
    /// Only holders of `secrets` may connect (`None`: anyone).
    pub fn to_config(
        &self,
        data_dir: &Path,
        registry_port: u16,
        secrets: Option<&ClusterSecrets>,
    ) -> Result<P2pConfig, P2pError> {
        let tunables = Tunables {
            lookup_timeout: self.lookup_timeout,
            lookup_cache_ttl: self.lookup_cache_ttl,
            provider_record_ttl: self.provider_record_ttl,
            reprovide_interval: self.reprovide_interval,
            reprovide_jitter: self.reprovide_interval / 9,
            max_concurrent_provides: self.max_concurrent_provides,
            max_connections: self.router_max_connections,
            max_connections_per_peer: self.router_max_connections_per_peer,
            max_pending_incoming: self.router_max_pending_incoming,
            max_memory_bytes: mib_to_bytes(self.router_max_memory_mib),
            ..Tunables::default()
        };
        let registry = match self.registry_advertise_addr {
            Some(advertise) => advertise,
            None if registry_port == 0 => {
                return Err(P2pError::Config("the registry port is 0".into()));
            }
            None => RegistryAdvertise::Port(registry_port),
        };
        let config = P2pConfig {
            key: NodeKey::Persistent(data_dir.to_path_buf()),
            transport: TransportKind::Tcp,
            listen_addrs: vec![socket_multiaddr(self.router_addr)],
            bootstrap_peers: self.bootstrap_peers.clone(),
            bootstrap_dns: self.bootstrap_dns.clone(),
            registry,
            secrets: secrets.cloned(),
            node_cidrs: self.node_cidrs.clone(),
            tunables,
        };
        config.validate()?;
        Ok(config)
    }
}

/// `mib` MiB in bytes, saturating on a 32-bit target.
fn mib_to_bytes(mib: NonZeroU64) -> usize {
    usize::try_from(mib.get().saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("invalid multiaddr `{s}`: {e}"))
}

/// `/ip4/<ip>/tcp/<port>` or `/ip6/<ip>/tcp/<port>`.
pub(crate) fn socket_multiaddr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(addr.port()))
}

// === impl RegistryAdvertise ===

impl FromStr for RegistryAdvertise {
    type Err = ParseError;

    /// `:5000`, `5000`, `10.0.0.5:5000` or `[fd00::5]:5000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port_only = s.strip_prefix(':').unwrap_or(s);
        if let Ok(port) = port_only.parse::<u16>() {
            return match port {
                0 => Err(ParseError("registry port must not be 0".into())),
                port => Ok(Self::Port(port)),
            };
        }
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 => Err(ParseError("registry port must not be 0".into())),
            Ok(addr) if addr.ip().is_unspecified() => Err(ParseError(format!(
                "`{s}`: an unspecified IP cannot be reached; use `:{}`",
                addr.port()
            ))),
            Ok(addr) => Ok(Self::Addr(addr)),
            Err(_) => Err(ParseError(format!(
                "invalid registry address `{s}` (use `:PORT` or `IP:PORT`)"
            ))),
        }
    }
}

impl fmt::Display for RegistryAdvertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port(port) => write!(f, ":{port}"),
            Self::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

// === impl P2pConfig ===

impl P2pConfig {
    /// A configuration with production tunables, no seeds and no listen address.
    pub fn new(key: NodeKey, transport: TransportKind, registry: RegistryAdvertise) -> Self {
        Self {
            key,
            transport,
            listen_addrs: Vec::new(),
            bootstrap_peers: Vec::new(),
            bootstrap_dns: None,
            registry,
            secrets: None,
            node_cidrs: Vec::new(),
            tunables: Tunables::default(),
        }
    }

    /// Checks the relations between settings that the types cannot express.
    pub fn validate(&self) -> Result<(), P2pError> {
        let t = &self.tunables;
        let fail = |msg: String| Err(P2pError::Config(msg));
        if t.provider_record_ttl <= t.reprovide_interval {
            return fail(format!(
                "provider record TTL ({:?}) must exceed the reprovide interval ({:?})",
                t.provider_record_ttl, t.reprovide_interval
            ));
        }
        if t.reprovide_jitter >= t.reprovide_interval {
            return fail("reprovide jitter must be shorter than the reprovide interval".into());
        }
        for (name, value) in [
            ("lookup timeout", t.lookup_timeout),
            ("reprovide interval", t.reprovide_interval),
            ("provide retry", t.provide_retry),
            ("rebootstrap interval", t.rebootstrap_interval),
            ("bootstrap backoff", t.bootstrap_backoff_min),
            ("query timeout", t.query_timeout),
            ("tick", t.tick),
        ] {
            if value.is_zero() {
                return fail(format!("{name} must not be zero"));
            }
        }
        if t.bootstrap_backoff_max < t.bootstrap_backoff_min {
            return fail("bootstrap backoff maximum is below its minimum".into());
        }
        if let RegistryAdvertise::Port(0) = self.registry {
            return fail("registry port must not be 0".into());
        }
        Ok(())
    }

    /// The TCP port DNS seeds are dialed on when the DNS flag names none: our own router port.
    pub(super) fn default_seed_port(&self) -> u16 {
        self.listen_addrs
            .iter()
            .flat_map(Multiaddr::iter)
            .find_map(|p| match p {
                Protocol::Tcp(port) if port != 0 => Some(port),
                _ => None,
            })
            .unwrap_or(5001)
    }
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            lookup_timeout: Duration::from_secs(5),
            lookup_cache_ttl: Duration::from_secs(5),
            provider_record_ttl: Duration::from_secs(19 * 60),
            reprovide_interval: Duration::from_secs(15 * 60),
            reprovide_jitter: Duration::from_secs(100),
            provide_retry: Duration::from_secs(30),
            max_concurrent_provides: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
            rebootstrap_interval: Duration::from_secs(5 * 60),
            bootstrap_backoff_min: Duration::from_millis(50),
            bootstrap_backoff_max: Duration::from_secs(10),
            dns_seeds_per_family: 3,
            query_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(60),
            max_stored_keys: 200_000,
            registry_addr_ttl: Duration::from_secs(30 * 60),
            tick: Duration::from_millis(100),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_pending_incoming: DEFAULT_MAX_PENDING_INCOMING,
            max_memory_bytes: mib_to_bytes(DEFAULT_MAX_MEMORY_MIB),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_advertise() {
        let parse = |s: &str| s.parse::<RegistryAdvertise>();
        assert_eq!(parse(":5000"), Ok(RegistryAdvertise::Port(5000)));
        assert_eq!(parse("5000"), Ok(RegistryAdvertise::Port(5000)));
        assert_eq!(
            parse("10.0.0.5:30020"),
            Ok(RegistryAdvertise::Addr("10.0.0.5:30020".parse().unwrap()))
        );
        assert_eq!(
            parse("[fd00::5]:5000"),
            Ok(RegistryAdvertise::Addr("[fd00::5]:5000".parse().unwrap()))
        );
        for bad in [
            "",
            ":0",
            "0",
            "0.0.0.0:5000",
            "host:5000",
            "10.0.0.5",
            ":70000",
        ] {
            assert!(parse(bad).is_err(), "`{bad}` accepted");
        }
    }

    #[test]
    fn args_build_a_valid_config() {
        use clap::Parser as _;

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            router: RouterArgs,
        }
        let peer = libp2p::PeerId::random();
        let cli = Cli::try_parse_from([
            "spegel".to_string(),
            "--bootstrap-peers".into(),
            format!("/ip4/10.0.0.1/tcp/5001/p2p/{peer},/ip4/10.0.0.2/tcp/5001"),
            "--bootstrap-dns".into(),
            "spegel-bootstrap.spegel.svc.cluster.local".into(),
            "--router-addr".into(),
            "0.0.0.0:6001".into(),
            "--node-cidrs".into(),
            "10.0.0.0/16,fd00::/64".into(),
        ])
        .unwrap();
        let config = cli
            .router
            .to_config(Path::new("/var/lib/spegel"), 5000, None)
            .unwrap();
        assert_eq!(config.registry, RegistryAdvertise::Port(5000));
        let cidrs: Vec<String> = config.node_cidrs.iter().map(Cidr::to_string).collect();
        assert_eq!(cidrs, ["10.0.0.0/16", "fd00::/64"]);
        assert_eq!(config.bootstrap_peers.len(), 2);
        assert_eq!(config.listen_addrs[0].to_string(), "/ip4/0.0.0.0/tcp/6001");
        assert_eq!(config.default_seed_port(), 6001);
        assert_eq!(
            config.key,
            NodeKey::Persistent(PathBuf::from("/var/lib/spegel"))
        );
        assert_eq!(config.tunables.reprovide_interval, Duration::from_secs(900));
        assert_eq!(
            config.tunables.provider_record_ttl,
            Duration::from_secs(1140)
        );
        let limits = |t: &Tunables| {
            [
                t.max_connections.get(),
                t.max_connections_per_peer.get(),
                t.max_pending_incoming.get(),
            ]
        };
        assert_eq!(limits(&config.tunables), [1024, 8, 256]);
        assert_eq!(config.tunables.max_memory_bytes, 1 << 30);
        let cli = Cli::try_parse_from([
            "spegel",
            "--router-max-connections",
            "10",
            "--router-max-connections-per-peer",
            "2",
            "--router-max-pending-incoming",
            "3",
            "--router-max-memory-mib",
            "200",
        ])
        .unwrap();
        let config = cli.router.to_config(Path::new("/tmp"), 5000, None).unwrap();
        assert_eq!(limits(&config.tunables), [10, 2, 3]);
        assert_eq!(config.tunables.max_memory_bytes, 200 << 20);

        let cli = Cli::try_parse_from([
            "spegel",
            "--registry-advertise-addr",
            "192.168.0.10:30020",
            "--reprovide-interval",
            "20m",
        ])
        .unwrap();
        assert!(
            matches!(
                cli.router.to_config(Path::new("/tmp"), 5000, None),
                Err(P2pError::Config(_))
            ),
            "a TTL shorter than the reprovide interval is refused"
        );
        assert!(Cli::try_parse_from(["spegel", "--bootstrap-peers", "not-a-multiaddr"]).is_err());
        assert!(Cli::try_parse_from(["spegel", "--router-max-connections", "0"]).is_err());
        assert!(Cli::try_parse_from(["spegel", "--router-max-memory-mib", "0"]).is_err());
        assert!(Cli::try_parse_from(["spegel", "--registry-advertise-addr", "x"]).is_err());
        assert!(Cli::try_parse_from(["spegel", "--node-cidrs", "10.0.0.0/33"]).is_err());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let base = || {
            P2pConfig::new(
                NodeKey::Ephemeral,
                TransportKind::Memory,
                RegistryAdvertise::Port(5000),
            )
        };
        assert!(base().validate().is_ok());
        let mut config = base();
        config.tunables.provider_record_ttl = config.tunables.reprovide_interval;
        assert!(config.validate().is_err());
        let mut config = base();
        config.tunables.lookup_timeout = Duration::ZERO;
        assert!(config.validate().is_err());
        let mut config = base();
        config.registry = RegistryAdvertise::Port(0);
        assert!(config.validate().is_err());
    }
}
