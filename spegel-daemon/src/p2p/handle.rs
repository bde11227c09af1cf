//! The [`P2pRouter`] handle: a cheap, cloneable sender of [`Command`]s to the event loop, plus the
//! state the loop publishes for handles to read without a round trip.
use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use libp2p::{Multiaddr, PeerId};
use prometheus_client::{metrics::histogram::Histogram, registry::Registry};
use tokio::sync::{mpsc, oneshot};

use super::{EventLoop, MAX_LOOKUP_COUNT, NodeKey, P2pConfig, P2pError, identity};
use crate::routing::{Peer, Router, RouterError};

/// Capacity of the command channel between handles and the event loop.
const COMMAND_BUFFER: usize = 256;

/// Counters of the router's work (for metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Lookups asked for.
    pub lookups: AtomicU64,
    /// Lookups answered from the result cache.
    pub lookup_cache_hits: AtomicU64,
    /// Providers handed to callers, resolved to a registry address.
    pub peers_found: AtomicU64,
    /// Provide queries that reached at least one peer.
    pub provides_ok: AtomicU64,
    /// Provide queries that reached no peer (retried).
    pub provides_failed: AtomicU64,
    /// Bootstrap queries (routing table refreshes: this node's own, Kademlia's while the
    /// table is small) run to their last step.
    pub bootstraps: AtomicU64,
    /// Registry addresses peers announced that the address policy refused (only their port
    /// was used).
    pub registry_addrs_refused: AtomicU64,
    /// How long DHT lookups took, by outcome.
    pub lookup_durations: LookupDurations,
}

/// How a DHT lookup ended, for [`LookupDurations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupOutcome {
    /// The first provider was resolved to a registry address (timed to that moment).
    Found,
    /// The query ran to its end and named no provider that could be resolved.
    NotFound,
    /// The lookup's deadline (`--lookup-timeout`) passed first.
    Timeout,
    /// The Kademlia query itself failed (its own timeout) before any provider was resolved.
    Error,
}

impl LookupOutcome {
    /// Every outcome, in [`LookupDurations`] index order.
    pub const ALL: [Self; 4] = [Self::Found, Self::NotFound, Self::Timeout, Self::Error];

    /// The `outcome` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Found => "found",
            Self::NotFound => "not_found",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }
}

/// Bucket bounds (seconds) of lookup durations: a lookup of a warm DHT takes milliseconds, a
/// cold one a dial and an Identify per hop; the default lookup timeout is a few seconds.
const LOOKUP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Durations of the lookups that went to the DHT (cache hits and callers joining a lookup in
/// flight are not timed), one histogram per [`LookupOutcome`]. Lookups every caller gave up on
/// before any answer are not timed either.
#[derive(Debug)]
pub struct LookupDurations([Histogram; 4]);

impl Default for LookupDurations {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Histogram::new(LOOKUP_BUCKETS)))
    }
}

impl LookupDurations {
    /// Records a lookup that ended with `outcome` after `elapsed`.
    pub fn observe(&self, outcome: LookupOutcome, elapsed: std::time::Duration) {
        self.0[outcome as usize].observe(elapsed.as_secs_f64());
    }

    /// The histogram of `outcome`, to export.
    pub fn of(&self, outcome: LookupOutcome) -> &Histogram {
        &self.0[outcome as usize]
    }
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
pub(super) struct Shared {
    pub(super) peer_id: PeerId,
    pub(super) routing_table_size: AtomicUsize,
    /// Keys this node advertises (provides), as of the event loop's last change.
    pub(super) advertised: AtomicUsize,
    /// Peers with at least one open connection, as of the event loop's last change.
    pub(super) connected: AtomicUsize,
    pub(super) stats: Stats,
    /// libp2p's own metrics (`libp2p_*`: swarm, Kademlia, Identify), recorded by the event loop.
    pub(super) libp2p_metrics: Registry,
}

/// What a handle asks of the event loop.
#[derive(Debug)]
pub(super) enum Command {
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
    Peers {
        reply: oneshot::Sender<Vec<PeerStatus>>,
    },
}

/// A connected peer, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: PeerId,
    /// The remote addresses of its connections.
    pub addresses: Vec<Multiaddr>,
    /// Its registry API, if learned.
    pub registry: Option<std::net::SocketAddr>,
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
        let mut libp2p_metrics = Registry::default();
        let recorder = libp2p::metrics::Metrics::new(&mut libp2p_metrics);
        let shared = Arc::new(Shared {
            peer_id: keypair.public().to_peer_id(),
            routing_table_size: AtomicUsize::new(0),
            advertised: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            stats: Stats::default(),
            libp2p_metrics,
        });
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_BUFFER);
        let event_loop = EventLoop::new(
            &config,
            &keypair,
            commands_rx,
            Arc::clone(&shared),
            recorder,
        )?;
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

    /// The connected peers (for the status page).
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, RouterError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Peers { reply }).await?;
        rx.await.map_err(|_| RouterError::Closed)
    }

    /// Peers in the routing table.
    pub fn routing_table_size(&self) -> usize {
        self.shared.routing_table_size.load(Ordering::Relaxed)
    }

    /// Keys this node advertises.
    pub fn advertised_keys(&self) -> usize {
        self.shared.advertised.load(Ordering::Relaxed)
    }

    /// Peers this node has a connection to.
    pub fn connected_peers(&self) -> usize {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// libp2p's own metrics (`libp2p_*` families), for `/metrics`.
    pub fn libp2p_metrics(&self) -> &Registry {
        &self.shared.libp2p_metrics
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
    async fn members(&self) -> Option<(String, Vec<Peer>)> {
        // Connected peers passed the membership handshake: they are members.
        let peers = self.peers().await.ok()?;
        let members = peers
            .into_iter()
            .filter_map(|peer| {
                Some(Peer {
                    id: peer.id.to_string(),
                    addr: peer.registry?,
                })
            })
            .collect();
        Some((self.peer_id().to_string(), members))
    }

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
