//! Content routing over a libp2p Kademlia DHT: the [`P2pRouter`] handle and its event loop.
//!
//! # Design
//!
//! - **One owner.** The libp2p `Swarm` lives in one task, the [`EventLoop`]. [`P2pRouter`] is a
//!   cheap, cloneable handle that sends it commands over a bounded channel and gets answers over
//!   oneshot channels (rust-libp2p's "swarm as an actor" shape).
//! - **Wire.** TCP + noise + yamux (or the in-process memory transport, for tests); Kademlia in
//!   server mode on `/spegel/kad/1.0.0`; Identify, whose listen addresses are fed into Kademlia's
//!   routing table (rust-libp2p does not do that by itself).
//! - **Keys.** A key string (`sha256:<hex>` or `registry/repo:tag`) maps to the Kademlia key
//!   `0x12 0x20 || sha256(utf8(key))` (a sha2-256 multihash, as in Spegel's CIDs).
//! - **Where a provider's registry is.** Kademlia only says *which peer* provides a key. Each node
//!   announces how to reach its registry API in its Identify agent version
//!   (`spegel/<version> registry=:5000` or `registry=10.0.0.5:5000`). Identify runs over the
//!   noise-authenticated connection, so the claim comes from the peer itself and is refreshed on
//!   every connection; no extra DHT record can go stale or be overwritten by someone else. With a
//!   bare port, the IP is the one we actually reached the peer at (the address we dialed), so
//!   nodes may use different registry ports and need not know their own routable IP. A lookup
//!   dials providers it has no entry for (using the addresses from the provider records) and
//!   waits for their Identify; results are cached per peer.
//! - **Providing.** Kademlia's own republish job is off: it republishes every key at once. This
//!   module re-provides each key on its own schedule (interval minus random jitter) with a cap
//!   on concurrent provide queries, and only while the routing table is non-empty.
//! - **Lookups** stream providers as they are found, skip this node, stop at `count` or at the
//!   lookup timeout, collapse concurrent lookups of one key into one query, and cache results
//!   briefly.
//! - **Bootstrap.** Static multiaddrs (with or without `/p2p/<id>`) and/or a DNS name (a headless
//!   Service: the first few IPs per family, sorted, so all nodes converge on the same seeds). While
//!   the routing table is empty the seeds are retried with backoff (50 ms → 10 s); after that the
//!   node re-bootstraps periodically.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::routing::{Peer, Router, RouterError};

mod bootstrap;
mod event_loop;
mod identity;
mod registry_addr;
mod store;
#[cfg(test)]
mod tests;

pub use bootstrap::DnsSeed;
pub use event_loop::EventLoop;

/// The Kademlia protocol name; nodes with another name do not see each other.
pub const KAD_PROTOCOL: &str = "/spegel/kad/1.0.0";
/// The Identify protocol version this node announces.
const IDENTIFY_PROTOCOL_VERSION: &str = "/spegel/1.0.0";
/// The file, inside the data directory, that holds the node's Ed25519 key.
pub const NODE_KEY_FILE: &str = "node.key";
/// Largest `count` a lookup honours; bounds the channel it returns.
pub const MAX_LOOKUP_COUNT: usize = 64;
/// Capacity of the command channel between handles and the event loop.
const COMMAND_BUFFER: usize = 256;

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
}

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
pub struct ParseError(String);

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
    pub key: NodeKey,
    pub transport: TransportKind,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/5001`, `/memory/0`, …).
    pub listen_addrs: Vec<Multiaddr>,
    /// Static bootstrap peers, with or without `/p2p/<id>`.
    pub bootstrap_peers: Vec<Multiaddr>,
    /// A DNS name to resolve for more bootstrap peers.
    pub bootstrap_dns: Option<DnsSeed>,
    /// What this node announces about its registry API.
    pub registry: RegistryAdvertise,
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

/// Counters of the router's work (for metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub lookups: AtomicU64,
    pub lookup_cache_hits: AtomicU64,
    pub peers_found: AtomicU64,
    pub provides_ok: AtomicU64,
    pub provides_failed: AtomicU64,
}

/// A handle to the router. Cheap to clone; the event loop stops when every handle is dropped
/// or its shutdown token is cancelled.
#[derive(Debug, Clone)]
pub struct P2pRouter {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// State the event loop publishes for handles to read without a round trip.
#[derive(Debug)]
struct Shared {
    peer_id: PeerId,
    routing_table_size: AtomicUsize,
    stats: Stats,
}

/// What a handle asks of the event loop.
#[derive(Debug)]
enum Command {
    Lookup {
        key: String,
        count: usize,
        tx: mpsc::Sender<Peer>,
    },
    Advertise {
        keys: Vec<String>,
        reply: oneshot::Sender<Result<(), RouterError>>,
    },
    Withdraw {
        keys: Vec<String>,
        reply: oneshot::Sender<()>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
}

/// A DHT key: the sha2-256 multihash of a key string. Fixed size and `Ord`, so it is cheap to
/// keep in maps and queues; [`ContentKey::record_key`] converts it for Kademlia.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ContentKey([u8; 34]);

// === impl RouterArgs ===

impl RouterArgs {
    /// The router configuration: the node key lives in `data_dir`; unless
    /// `--registry-advertise-addr` says otherwise, peers reach the registry on `registry_port`.
    pub fn to_config(&self, data_dir: &Path, registry_port: u16) -> Result<P2pConfig, P2pError> {
        let tunables = Tunables {
            lookup_timeout: self.lookup_timeout,
            lookup_cache_ttl: self.lookup_cache_ttl,
            provider_record_ttl: self.provider_record_ttl,
            reprovide_interval: self.reprovide_interval,
            reprovide_jitter: self.reprovide_interval / 9,
            max_concurrent_provides: self.max_concurrent_provides,
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
            tunables,
        };
        config.validate()?;
        Ok(config)
    }
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
    fn default_seed_port(&self) -> u16 {
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
        }
    }
}

// === impl P2pRouter ===

impl P2pRouter {
    /// Builds the swarm (loading or creating the node key, binding the listen addresses) and
    /// returns a handle plus the event loop, which the caller must run, e.g.
    /// `tokio::spawn(event_loop.run(shutdown))`. Must be called inside a tokio runtime.
    pub fn new(config: P2pConfig) -> Result<(Self, EventLoop), P2pError> {
        config.validate()?;
        let keypair = match &config.key {
            NodeKey::Persistent(dir) => identity::load_or_create(dir)?,
            NodeKey::Ephemeral => libp2p::identity::Keypair::generate_ed25519(),
        };
        let shared = Arc::new(Shared {
            peer_id: keypair.public().to_peer_id(),
            routing_table_size: AtomicUsize::new(0),
            stats: Stats::default(),
        });
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_BUFFER);
        let event_loop = EventLoop::new(&config, &keypair, commands_rx, Arc::clone(&shared))?;
        tracing::info!(peer_id = %shared.peer_id, registry = %config.registry, "p2p router ready");
        let router = Self {
            commands: commands_tx,
            shared,
        };
        Ok((router, event_loop))
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// The addresses the swarm listens on, once at least one listener is up.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, RouterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListenAddrs { reply }).await?;
        rx.await.map_err(|_| RouterError::Closed)
    }

    /// Work counters, for metrics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    async fn send(&self, command: Command) -> Result<(), RouterError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RouterError::Closed)
    }
}

#[async_trait::async_trait]
impl Router for P2pRouter {
    fn has_peers(&self) -> bool {
        self.shared.routing_table_size.load(Ordering::Relaxed) > 0
    }

    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        let count = count.min(MAX_LOOKUP_COUNT);
        let (tx, rx) = mpsc::channel(count.max(1));
        if count > 0 {
            self.send(Command::Lookup {
                key: key.to_owned(),
                count,
                tx,
            })
            .await?;
        }
        Ok(rx)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Advertise { keys, reply }).await?;
        rx.await.map_err(|_| RouterError::Closed)?
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Withdraw { keys, reply }).await?;
        rx.await.map_err(|_| RouterError::Closed)
    }
}

// === impl ContentKey ===

impl ContentKey {
    /// sha2-256 multihash code and digest length.
    const MULTIHASH_PREFIX: [u8; 2] = [0x12, 0x20];

    fn of(key: &str) -> Self {
        let mut bytes = [0u8; 34];
        bytes[..2].copy_from_slice(&Self::MULTIHASH_PREFIX);
        bytes[2..].copy_from_slice(&Sha256::digest(key.as_bytes()));
        Self(bytes)
    }

    fn record_key(&self) -> libp2p::kad::RecordKey {
        libp2p::kad::RecordKey::new(&self.0)
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[2..]))
    }
}
