//! This node's listen addresses: which of them are announced as external addresses, and callers
//! waiting for the first one.
use libp2p::{Multiaddr, Swarm};
use tokio::sync::oneshot;

use super::{behaviour::Behaviour, registry_addr};

/// Callers waiting for the first listen address, at most.
const MAX_LISTEN_WAITERS: usize = 64;

/// The addresses the swarm listens on.
pub(super) struct Listening {
    addrs: Vec<Multiaddr>,
    /// Whether loopback listen addresses are announced (only when told to listen on loopback).
    announce_loopback: bool,
    waiters: Vec<oneshot::Sender<Vec<Multiaddr>>>,
}

impl Listening {
    /// Nothing bound yet; `configured` are the addresses the swarm was told to listen on.
    pub(super) fn new(configured: &[Multiaddr]) -> Self {
        Self {
            addrs: Vec::new(),
            announce_loopback: configured
                .iter()
                .all(|addr| registry_addr::ip_of(addr).is_some_and(|ip| ip.is_loopback())),
            waiters: Vec::new(),
        }
    }

    /// The addresses bound so far.
    pub(super) fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// Answers at once if an address is bound, else when the first one is (or at once, empty,
    /// when too many callers wait).
    pub(super) fn request(&mut self, reply: oneshot::Sender<Vec<Multiaddr>>) {
        if !self.addrs.is_empty() {
            let _ = reply.send(self.addrs.clone());
        } else if self.waiters.len() < MAX_LISTEN_WAITERS {
            self.waiters.push(reply);
        } else {
            let _ = reply.send(Vec::new());
        }
    }

    /// A listener is up on `address`.
    pub(super) fn added(&mut self, swarm: &mut Swarm<Behaviour>, address: Multiaddr) {
        tracing::info!(%address, "p2p router listening");
        // Kademlia announces only external addresses in provider records; without them other
        // nodes learn where a provider is only if it happens to be in their routing table. Every
        // listen address but loopback is one here (pod and node networks are flat, and nodes
        // have no NAT between them).
        let loopback = registry_addr::ip_of(&address).is_some_and(|ip| ip.is_loopback());
        if !loopback || self.announce_loopback {
            swarm.add_external_address(address.clone());
        }
        self.addrs.push(address);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(self.addrs.clone());
        }
    }

    /// The listener on `address` is gone.
    pub(super) fn expired(&mut self, swarm: &mut Swarm<Behaviour>, address: &Multiaddr) {
        swarm.remove_external_address(address);
        self.addrs.retain(|a| a != address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_announced_only_when_only_loopback_is_configured() {
        for (configured, announce) in [
            (&["/ip4/127.0.0.1/tcp/0"][..], true),
            (&["/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"][..], true),
            (&["/ip4/0.0.0.0/tcp/5001"][..], false),
            (&["/ip4/127.0.0.1/tcp/0", "/ip4/10.0.0.1/tcp/0"][..], false),
            (&["/memory/0"][..], false),
        ] {
            let addrs: Vec<Multiaddr> = configured.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(
                Listening::new(&addrs).announce_loopback,
                announce,
                "{configured:?}"
            );
        }
    }

    #[test]
    fn waiters_get_the_first_address() {
        let mut listening = Listening::new(&[]);
        let (tx, mut rx) = oneshot::channel();
        listening.request(tx);
        assert!(rx.try_recv().is_err(), "nothing bound yet");
        listening.addrs.push("/memory/7".parse().unwrap());
        let (tx, mut rx) = oneshot::channel();
        listening.request(tx);
        assert_eq!(rx.try_recv().unwrap().len(), 1);
    }
}
