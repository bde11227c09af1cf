//! The [`P2pRouter`] handle: a cheap, cloneable sender of [`Command`]s to the event loop, plus the
//! state the loop publishes for handles to read without a round trip.
use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use libp2p::{Multiaddr, PeerId};
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
    /// Registry addresses peers announced that the address policy refused (only their port
    /// was used).
    pub registry_addrs_refused: AtomicU64,
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
    pub(super) stats: Stats,
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
        let shared = Arc::new(Shared {
            peer_id: keypair.public().to_peer_id(),
            routing_table_size: AtomicUsize::new(0),
            advertised: AtomicUsize::new(0),
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
