//! Content routing over a libp2p Kademlia DHT: the [`P2pRouter`] handle and its event loop.
//!
//! # Design
//!
//! - **One owner.** The libp2p `Swarm` lives in one task, the [`EventLoop`] (`event_loop.rs`:
//!   only its `select!` and the dispatch of commands, swarm events and timers). [`P2pRouter`]
//!   (`handle.rs`) is a cheap, cloneable handle that sends it commands over a bounded channel and
//!   gets answers over oneshot channels (rust-libp2p's "swarm as an actor" shape).
//! - **Wire** (`transport.rs`, `behaviour.rs`). TCP + noise + yamux (or the in-process memory
//!   transport, for tests); Kademlia in server mode on `/spegel/kad/1.0.0` over a bounded,
//!   provider-only record store (`store.rs`); Identify, whose listen addresses are fed into
//!   Kademlia's routing table (rust-libp2p does not do that by itself).
//! - **Keys** (`key.rs`). A key string (`sha256:<hex>` or `registry/repo:tag`) maps to the
//!   Kademlia key `0x12 0x20 || sha256(utf8(key))` (a sha2-256 multihash, as in Spegel's CIDs).
//! - **Where a provider's registry is** (`registry_addr.rs`, `addresses.rs`). Kademlia only says
//!   *which peer* provides a key. Each node announces how to reach its registry API in its
//!   Identify agent version (`spegel/<version> registry=:5000` or `registry=10.0.0.5:5000`).
//!   Identify runs over the noise-authenticated connection, so the claim comes from the peer
//!   itself and is refreshed on every connection; no extra DHT record can go stale or be
//!   overwritten by someone else. With a bare port, the IP is the one we actually reached the
//!   peer at (the address we dialed), so nodes may use different registry ports and need not
//!   know their own routable IP. A lookup dials providers it has no entry for (using the
//!   addresses from the provider records) and waits for their Identify; results are cached per
//!   peer (an LRU cache with a TTL).
//! - **Providing** (`provide.rs`). Kademlia's own republish job is off: it republishes every key
//!   at once. Each key is re-provided on its own schedule (interval minus random jitter) with a
//!   cap on concurrent provide queries, and only while the routing table is non-empty.
//! - **Lookups** (`lookup.rs`, `lookup_cache.rs`) stream providers as they are found, skip this
//!   node, stop at `count` or at the lookup timeout, collapse concurrent lookups of one key into
//!   one query, and cache results briefly (an LRU cache with a TTL).
//! - **Bootstrap** (`seeds.rs`, `bootstrap.rs`). Static multiaddrs (with or without
//!   `/p2p/<id>`) and/or a DNS name (a headless Service: the first few IPs per family, sorted, so
//!   all nodes converge on the same seeds). While the routing table is empty the seeds are
//!   retried with backoff (50 ms → 10 s); after that the node re-bootstraps periodically.
//! - **Listening** (`listen.rs`): which listen addresses are announced as external addresses.
//! - **Configuration** (`config.rs`): flags, [`P2pConfig`], [`Tunables`]; the node key lives in
//!   `identity.rs`.

mod addresses;
mod behaviour;
mod bootstrap;
mod config;
mod event_loop;
mod handle;
mod identity;
mod key;
mod listen;
mod lookup;
mod lookup_cache;
mod provide;
pub(crate) mod registry_addr;
mod seeds;
pub(crate) mod store;
#[cfg(test)]
mod tests;
mod transport;

pub(crate) use config::socket_multiaddr;
pub use config::{
    NodeKey, P2pConfig, P2pError, ParseError, RegistryAdvertise, RouterArgs, TransportKind,
    Tunables,
};
pub use event_loop::EventLoop;
use handle::{Command, Shared};
pub use handle::{LookupDurations, LookupOutcome, P2pRouter, PeerStatus, Stats};
pub use seeds::DnsSeed;

pub use crate::routing::MAX_LOOKUP_COUNT;

/// The Kademlia protocol name; nodes with another name do not see each other.
pub const KAD_PROTOCOL: &str = "/spegel/kad/1.0.0";
/// The Identify protocol version this node announces.
const IDENTIFY_PROTOCOL_VERSION: &str = "/spegel/1.0.0";
/// The file, inside the data directory, that holds the node's Ed25519 key.
pub const NODE_KEY_FILE: &str = "node.key";
