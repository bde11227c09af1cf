//! An in-process [`Router`] for unit tests of other modules: every router handed out by one
//! [`MemoryNetwork`] sees the keys the others advertise, immediately and exactly.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::mpsc;

use super::{MAX_LOOKUP_COUNT, Peer, Router, RouterError};

/// A shared registry of key → providers. Clones share the same network.
#[derive(Debug, Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<NetworkState>>,
}

#[derive(Debug, Default)]
struct NetworkState {
    /// Every node that joined, by id.
    nodes: BTreeMap<String, Peer>,
    /// key → ids of the nodes providing it.
    providers: HashMap<String, BTreeSet<String>>,
}

/// One node's view of a [`MemoryNetwork`].
#[derive(Debug, Clone)]
pub struct MemoryRouter {
    network: MemoryNetwork,
    peer: Peer,
}

// === impl MemoryNetwork ===

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A router for the node `id` whose registry listens at `addr`. Joining again with the same
    /// id replaces the address and keeps what the node advertised.
    pub fn router(&self, id: impl Into<String>, addr: SocketAddr) -> MemoryRouter {
        let peer = Peer {
            id: id.into(),
            addr,
        };
        self.lock().nodes.insert(peer.id.clone(), peer.clone());
        MemoryRouter {
            network: self.clone(),
            peer,
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetworkState> {
        // No code panics while holding the lock, and the state stays consistent even if it did:
        // every mutation is a single insert or remove.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl MemoryRouter ===

impl MemoryRouter {
    /// A new, empty network to hand out routers from.
    pub fn network() -> MemoryNetwork {
        MemoryNetwork::new()
    }

    /// This node, as other nodes' lookups return it.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The keys this node currently advertises, sorted.
    pub fn advertised(&self) -> BTreeSet<String> {
        self.network
            .lock()
            .providers
            .iter()
            .filter(|(_, ids)| ids.contains(&self.peer.id))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl Router for MemoryRouter {
    fn has_peers(&self) -> bool {
        self.network
            .lock()
            .nodes
            .keys()
            .any(|id| *id != self.peer.id)
    }

    async fn lookup(&self, key: &str, count: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        let count = count.min(MAX_LOOKUP_COUNT);
        let (tx, rx) = mpsc::channel(count.max(1));
        let state = self.network.lock();
        let peers = state
            .providers
            .get(key)
            .into_iter()
            .flatten()
            .filter(|id| **id != self.peer.id)
            .filter_map(|id| state.nodes.get(id))
            .take(count);
        for peer in peers {
            // Cannot fail: the channel holds `count` peers and nobody has received yet.
            if tx.try_send(peer.clone()).is_err() {
                break;
            }
        }
        Ok(rx)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let mut state = self.network.lock();
        for key in keys {
            state
                .providers
                .entry(key)
                .or_default()
                .insert(self.peer.id.clone());
        }
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let mut state = self.network.lock();
        for key in keys {
            if let Some(ids) = state.providers.get_mut(&key) {
                ids.remove(&self.peer.id);
                if ids.is_empty() {
                    state.providers.remove(&key);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn collect(router: &MemoryRouter, key: &str, count: usize) -> Vec<Peer> {
        let mut rx = router.lookup(key, count).await.unwrap();
        let mut peers = Vec::new();
        while let Some(peer) = rx.recv().await {
            peers.push(peer);
        }
        peers
    }

    #[tokio::test]
    async fn routers_see_each_other() {
        let network = MemoryRouter::network();
        let a = network.router("a", addr(1));
        assert!(!a.has_peers(), "alone in the network");
        let b = network.router("b", addr(2));
        let c = network.router("c", addr(3));
        assert!(a.has_peers());

        a.advertise(vec!["k".into()]).await.unwrap();
        b.advertise(vec!["k".into(), "only-b".into()])
            .await
            .unwrap();

        assert_eq!(
            collect(&c, "k", 10).await,
            vec![a.peer().clone(), b.peer().clone()]
        );
        assert_eq!(collect(&c, "k", 1).await, vec![a.peer().clone()]);
        assert_eq!(
            collect(&a, "k", 10).await,
            vec![b.peer().clone()],
            "self is skipped"
        );
        assert!(collect(&c, "missing", 10).await.is_empty());
        assert!(collect(&c, "k", 0).await.is_empty());
        assert_eq!(
            b.advertised(),
            BTreeSet::from(["k".to_string(), "only-b".to_string()])
        );

        b.withdraw(vec!["k".into()]).await.unwrap();
        assert_eq!(collect(&c, "k", 10).await, vec![a.peer().clone()]);
        assert_eq!(b.advertised(), BTreeSet::from(["only-b".to_string()]));
    }
}
