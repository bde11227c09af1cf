//! One upstream fetch per blob per cluster, also in a cold burst: every node misses the same
//! new blob at the same instant, before anyone has it or has announced it.
//!
//! **The design, and why.** Each node's upstream fetch of a blob is shared by every GET of it on
//! that node and served to peers while it is in flight (`body::shared`: a spooled tee, the
//! verified bytes as they arrive). What remains is to make the other nodes ask that fetch
//! instead of upstream, without a central component and without waiting for the DHT:
//!
//! - **Rendezvous hashing picks the fetcher.** For a blob's digest, every node ranks itself and
//!   the cluster members it is connected to (authenticated by the membership handshake) by
//!   `sha256(digest "/" peer id)`; the lowest is the blob's *fetcher*. Nodes that see the same
//!   members agree without talking, so the tie of a cold burst is broken at once; different
//!   blobs of one image spread over different fetchers.
//! - **The fetcher goes upstream at once** (and also announces the blob in the DHT, so nodes
//!   that ask later find it by the usual lookup). **Every other node asks the fetcher directly**
//!   (a peer GET with `X-Spegel-Mirrored`, through the ordinary peer client: cluster mTLS,
//!   verification, resume) and, while the fetcher answers 404 (its own containerd has not asked
//!   yet), asks again every [`POLL`] for at most `--burst-wait`; then it goes upstream itself.
//!   The DHT alone cannot break the tie: a lookup made at the instant of the miss finds nobody,
//!   and "nobody" is cached for a moment.
//! - **Bytes from the fetcher are peer bytes**: verified whole before containerd gets the first
//!   one (`body::buffered`, verify-before-send), and a fetcher that dies or stalls mid-blob is
//!   replaced by the peer client's resume (`Range`, same hash) from upstream: a dead fetcher
//!   costs at most `--burst-wait` plus the peer stall bound, never a stalled pull.
//! - **Never a forward.** The fetcher serves only its *own* fetch in flight (or its store); a
//!   peer's request never makes it go upstream.
//!
//! The price: a node that is not a blob's fetcher and pulls it alone (a rolling update's first
//! node) waits up to `--burst-wait` before going upstream. `--burst-wait 0` turns it off.
//! Nodes that disagree on the members (a partition, a node just joined) may each fetch: at most
//! one extra upstream download per view, never a failure.
use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use crate::{
    body::shared::InFlight,
    oci::{Kind, Reference, digest::Digest},
    routing::{Peer, Router, RouterError},
    source::{Object, ObjectRequest, Source, SourceError},
};

/// How often a node asks a blob's fetcher again while it has not started.
pub const POLL: Duration = Duration::from_millis(50);

/// Flags of the cold-burst fetcher choice.
#[derive(Debug, Clone, clap::Args)]
pub struct BurstArgs {
    /// A node that is not a new blob's chosen fetcher (rendezvous hashing over the cluster
    /// members) asks that fetcher for at most this long before going upstream itself; 0: every
    /// node goes upstream at once.
    #[arg(long, env = "SPEGEL_BURST_WAIT", value_parser = humantime::parse_duration, default_value = "300ms")]
    pub burst_wait: Duration,
}

/// The fetcher of `digest` among `me` and `members`: `None` when it is `me`.
pub fn fetcher(digest: &Digest, me: &str, members: &[Peer]) -> Option<Peer> {
    let score = |id: &str| Digest::of(format!("{digest}/{id}").as_bytes()).to_string();
    let best = members
        .iter()
        .filter(|peer| peer.id != me)
        .min_by_key(|peer| score(&peer.id))?;
    (score(&best.id) < score(me)).then(|| best.clone())
}

/// A router whose only provider of a digest is its fetcher (when that is another node): it
/// points the ordinary peer client at the fetcher.
pub struct FetcherRouter {
    router: Arc<dyn Router>,
}

impl FetcherRouter {
    pub fn new(router: Arc<dyn Router>) -> Self {
        Self { router }
    }

    /// The fetcher of the blob `key` names, if another node.
    pub async fn fetcher_of(&self, key: &str) -> Option<Peer> {
        let digest: Digest = key.parse().ok()?;
        let (me, members) = self.router.members().await?;
        fetcher(&digest, &me, &members)
    }
}

#[async_trait::async_trait]
impl Router for FetcherRouter {
    fn has_peers(&self) -> bool {
        self.router.has_peers()
    }

    async fn lookup(&self, key: &str, _count: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        let (tx, rx) = mpsc::channel(1);
        if let Some(peer) = self.fetcher_of(key).await {
            // Room for one: cannot fail.
            let _ = tx.try_send(peer);
        }
        Ok(rx)
    }

    async fn advertise(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }

    async fn withdraw(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }
}

/// In front of the (shared) upstream: a blob this node is not the fetcher of is asked of its
/// fetcher first, for at most `wait`. See the module docs.
pub struct BurstGate {
    upstream: Arc<dyn Source>,
    in_flight: InFlight,
    /// The peer client pointed at fetchers (verify-before-send in front of it).
    from_fetcher: Arc<dyn Source>,
    router: Arc<FetcherRouter>,
    wait: Duration,
}

impl BurstGate {
    /// `upstream`: the shared upstream whose copies `in_flight` lists; `from_fetcher`: a peer
    /// source asking through `router`.
    pub fn new(
        upstream: Arc<dyn Source>,
        in_flight: InFlight,
        from_fetcher: Arc<dyn Source>,
        router: Arc<FetcherRouter>,
        wait: Duration,
    ) -> Self {
        Self {
            upstream,
            in_flight,
            from_fetcher,
            router,
            wait,
        }
    }
}

#[async_trait::async_trait]
impl Source for BurstGate {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let digest = match (&request.kind, &request.reference) {
            (Kind::Blob, Reference::Digest(digest)) => *digest,
            _ => return self.upstream.fetch(request).await,
        };
        let gated = !request.head
            && !request.mirrored
            && request.range.is_none()
            && request.origin.is_some()
            && !self.wait.is_zero()
            && !self.in_flight.has(&digest);
        if !gated {
            return self.upstream.fetch(request).await;
        }
        let Some(fetcher) = self.router.fetcher_of(&digest.to_string()).await else {
            return self.upstream.fetch(request).await;
        };
        let deadline = Instant::now() + self.wait;
        loop {
            match self.from_fetcher.fetch(request).await {
                Ok(object) => {
                    tracing::debug!(%digest, fetcher = %fetcher.id, "blob from its burst fetcher");
                    return Ok(object);
                }
                Err(err) => {
                    tracing::trace!(%digest, fetcher = %fetcher.id, %err, "burst fetcher has not started")
                }
            }
            if Instant::now() + POLL >= deadline || self.in_flight.has(&digest) {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::debug!(%digest, fetcher = %fetcher.id, wait = ?self.wait, "burst fetcher did not serve in time; going upstream");
        self.upstream.fetch(request).await
    }
}

#[cfg(test)]
mod tests;
