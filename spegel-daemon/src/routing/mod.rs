//! Finding which nodes hold a key: the [`Router`] seam, an in-memory implementation for unit
//! tests, and the loop that keeps this node's advertisements in step with its store. The libp2p
//! Kademlia implementation is `crate::p2p`.
use std::net::SocketAddr;

use tokio::sync::mpsc;

/// Largest `count` a lookup honours, in every router; bounds the channel it returns.
pub const MAX_LOOKUP_COUNT: usize = 64;

/// A node that provides a key, and where its registry API listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The libp2p peer id, as text.
    pub id: String,
    /// The peer's registry API (plain HTTP).
    pub addr: SocketAddr,
}

/// Why the router could not answer.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router's event loop is gone (shutting down).
    #[error("router closed")]
    Closed,
    /// Any other failure.
    #[error("{0}")]
    Failed(String),
}

/// Content routing. Keys are `sha256:<hex>` digests and `registry/repo:tag` references.
#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    /// Whether this node knows at least one other node.
    fn has_peers(&self) -> bool;
    /// Peers that provide `key`, at most `count`, sent as they are found; the channel closes
    /// when the lookup is over. This node itself is never included.
    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RouterError>;
    /// Start providing `keys` (and keep re-providing them until withdrawn).
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError>;
    /// Stop providing `keys`.
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError>;
    /// This node's id and the authenticated cluster members it is connected to whose registry
    /// API is known (for picking one fetcher per blob in a cold burst, `peers::burst`). `None`
    /// when the router cannot tell.
    async fn members(&self) -> Option<(String, Vec<Peer>)> {
        None
    }
}

pub mod memory;
pub mod sync;
