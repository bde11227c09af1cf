//! Learning which destinations carry no mirrored registry, so that containerd's later connects
//! to them go direct instead of through the daemon's splice.
//!
//! A passed-through connection costs the node a second TCP connection and the daemon's CPU for
//! every byte; for a destination that is never a mirrored registry that buys nothing. When the
//! listener passes a connection through because of what the client said first (an SNI or `Host`
//! that is not mirrored, or bytes that are neither TLS nor HTTP), its destination goes into the
//! programs' `PASS` map for `--intercept-bypass-ttl`; connects to it are then not redirected.
//!
//! The map is keyed by address and port, and one address can serve several names (an ingress, a
//! CDN), so a destination is never learned when its address
//! - has carried a mirrored connection while this daemon runs (remembered, bounded), or
//! - is what a mirrored registry's name resolves to (looked up when there is something to
//!   learn, the answers kept for [`RESOLVED_FOR`]), or is a mirrored IP-literal entry.
//!
//! What slips through (a mirrored name served from an address first seen with another name, and
//! that resolves elsewhere from here) only goes direct, as without spegel, until the entry
//! expires; a mirrored connection that still reaches the listener for a learned address (one
//! redirected just before) removes the entry at once.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::intercept::{
    ebpf::{EbpfError, PassMap},
    registries::MirroredRegistries,
};

/// How long the answers for the mirrored registries' names are used.
pub const RESOLVED_FOR: Duration = Duration::from_secs(60);
/// How long one name lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Addresses remembered for having carried a mirrored connection.
const MIRRORED_MAX: usize = 4096;
/// Destinations remembered as learned (the map's own capacity).
const LEARNED_MAX: usize = spegel_common::PASS_MAP_ENTRIES as usize;

/// Where learned destinations go: the programs' map, or a test's table.
pub trait PassTable: Send + Sync + 'static {
    /// Connects to `dst` go direct for `ttl`.
    fn pass(&self, dst: SocketAddr, ttl: Duration) -> Result<(), EbpfError>;
    /// Connects to `dst` are redirected again.
    fn unpass(&self, dst: SocketAddr) -> Result<(), EbpfError>;
}

impl PassTable for PassMap {
    fn pass(&self, dst: SocketAddr, ttl: Duration) -> Result<(), EbpfError> {
        let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        self.insert(dst, monotonic_ns().saturating_add(ttl_ns))
    }

    fn unpass(&self, dst: SocketAddr) -> Result<(), EbpfError> {
        self.remove(dst)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec on the stack for the call; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Looks up names (the system resolver; a table in tests).
#[async_trait::async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// The addresses `name` resolves to; none when it does not (or not in time).
    async fn resolve(&self, name: &str) -> Vec<IpAddr>;
}

/// The system resolver (`getaddrinfo`, as containerd's Go resolver mostly agrees with).
#[derive(Debug, Default)]
pub struct SystemResolver;

#[async_trait::async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, name: &str) -> Vec<IpAddr> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            Ok(Err(error)) => {
                tracing::debug!(name, %error, "mirrored registry name does not resolve");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!(name, "mirrored registry name lookup timed out");
                Vec::new()
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Addresses that carried a mirrored connection, and when last.
    mirrored: HashMap<IpAddr, Instant>,
    /// Destinations learned, and when (not learned again before half the TTL has passed).
    learned: HashMap<SocketAddr, Instant>,
    /// The mirrored registries' addresses, and when they were looked up.
    resolved: Option<(Instant, Arc<HashSet<IpAddr>>)>,
}

/// Decides which passed-through destinations go direct from now on.
pub struct Bypass {
    table: Arc<dyn PassTable>,
    ttl: Duration,
    names: Vec<String>,
    ips: HashSet<IpAddr>,
    resolver: Arc<dyn Resolve>,
    state: Mutex<State>,
    /// Serialises lookups, so a burst of new destinations resolves the names once.
    lookup: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Bypass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bypass")
            .field("ttl", &self.ttl)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Bypass {
    /// Learns into `table` for `ttl` (not zero), guarding `mirrored`'s names and addresses.
    pub fn new(
        table: Arc<dyn PassTable>,
        ttl: Duration,
        mirrored: &MirroredRegistries,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        Self {
            table,
            ttl,
            names: mirrored.names(),
            ips: mirrored.ips().collect(),
            resolver,
            state: Mutex::default(),
            lookup: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps inconsistent: every update is one insert.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `dst` was handed to the mirrored handler: its address is never learned,
    /// and is redirected again at once if it was.
    pub fn saw_mirrored(&self, dst: SocketAddr) {
        let now = Instant::now();
        let unlearn: Vec<SocketAddr> = {
            let mut state = self.state();
            if state.mirrored.len() >= MIRRORED_MAX && !state.mirrored.contains_key(&dst.ip()) {
                evict_oldest(&mut state.mirrored);
            }
            state.mirrored.insert(dst.ip(), now);
            let unlearn = state
                .learned
                .keys()
                .filter(|d| d.ip() == dst.ip())
                .copied()
                .collect();
            state.learned.retain(|d, _| d.ip() != dst.ip());
            unlearn
        };
        for d in unlearn {
            tracing::info!(dst = %d, "a mirrored connection reached a learned destination; redirecting it again");
            if let Err(error) = self.table.unpass(d) {
                tracing::warn!(dst = %d, %error, "cannot forget a learned destination");
            }
        }
    }

    /// A connection to `dst` was passed through because of what its client said: connects to
    /// `dst` go direct from now on, unless its address may carry a mirrored registry. Whether it
    /// was learned (or renewed) now.
    pub async fn learn(&self, dst: SocketAddr) -> bool {
        if self.ips.contains(&dst.ip()) || self.blocked_or_fresh(dst) {
            return false;
        }
        let guarded = self.mirrored_addresses().await;
        if guarded.contains(&dst.ip()) {
            tracing::debug!(%dst, "a mirrored registry's name resolves here; not learned");
            return false;
        }
        {
            let mut state = self.state();
            // A mirrored connection may have arrived while the names were looked up.
            if state.mirrored.contains_key(&dst.ip()) {
                return false;
            }
            let now = Instant::now();
            if state.learned.len() >= LEARNED_MAX && !state.learned.contains_key(&dst) {
                let ttl = self.ttl;
                state.learned.retain(|_, at| now.duration_since(*at) < ttl);
                if state.learned.len() >= LEARNED_MAX {
                    evict_oldest(&mut state.learned);
                }
            }
            state.learned.insert(dst, now);
        }
        match self.table.pass(dst, self.ttl) {
            Ok(()) => {
                tracing::debug!(%dst, ttl = ?self.ttl, "no mirrored registry here; its connects go direct");
                true
            }
            Err(error) => {
                self.state().learned.remove(&dst);
                tracing::warn!(%dst, %error, "cannot let a destination go direct");
                false
            }
        }
    }

    /// Whether `dst` must not be learned (its address carried mirrored traffic), or was learned
    /// recently enough that its entry still holds for most of the TTL.
    fn blocked_or_fresh(&self, dst: SocketAddr) -> bool {
        let state = self.state();
        state.mirrored.contains_key(&dst.ip())
            || state
                .learned
                .get(&dst)
                .is_some_and(|at| at.elapsed() < self.ttl / 2)
    }

    /// The addresses the mirrored registries' names resolve to, looked up at most every
    /// [`RESOLVED_FOR`].
    async fn mirrored_addresses(&self) -> Arc<HashSet<IpAddr>> {
        let fresh = |state: &State| {
            state
                .resolved
                .as_ref()
                .filter(|(at, _)| at.elapsed() < RESOLVED_FOR)
                .map(|(_, set)| set.clone())
        };
        if let Some(set) = fresh(&self.state()) {
            return set;
        }
        let _one_at_a_time = self.lookup.lock().await;
        if let Some(set) = fresh(&self.state()) {
            return set;
        }
        let lookups = self.names.iter().map(|name| self.resolver.resolve(name));
        let set: HashSet<IpAddr> = futures::future::join_all(lookups)
            .await
            .into_iter()
            .flatten()
            .collect();
        let set = Arc::new(set);
        self.state().resolved = Some((Instant::now(), set.clone()));
        set
    }
}

/// Removes the entry seen longest ago.
fn evict_oldest<K: Copy + Eq + std::hash::Hash>(map: &mut HashMap<K, Instant>) {
    if let Some(oldest) = map.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests;
