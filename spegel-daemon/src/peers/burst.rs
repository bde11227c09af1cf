//! One upstream fetch per blob per cluster, also in a cold burst: every node misses the same
//! new blob at once, before anyone has it or has announced it.
//!
//! **The design, and why.** Each node's upstream fetch of a blob is shared by every GET of it on
//! that node and served to peers while it is in flight (`body::shared`: a spooled tee, the
//! verified bytes as they arrive). What remains is to make the other nodes ask that fetch
//! instead of upstream, without a central component and without waiting for the DHT:
//!
//! - **Rendezvous hashing picks a coordinator.** For a blob's digest, every node ranks itself
//!   and the cluster members it is connected to (authenticated by the membership handshake) by
//!   `sha256(digest "/" peer id)`; the lowest is the blob's *coordinator*. Nodes that see the
//!   same members agree without talking; different blobs spread over different coordinators.
//! - **The first node to ask the coordinator fetches.** A node that misses a blob *claims* it at
//!   its coordinator (`POST /spegel/v1/burst/claim/<digest>?by=<peer id>`, or its own [`Claims`]
//!   when it is the coordinator). The coordinator records the first claimant (the *holder*) for
//!   [`CLAIM_TTL`] and answers every claim with the holder's id; the holder claims again every
//!   [`RENEW`] while its download runs, so a long one stays held. The holder goes upstream at
//!   once; every other node asks the holder (a peer GET with `X-Spegel-Mirrored`, through the
//!   ordinary peer client: cluster mTLS, verification, resume), again every [`POLL`] while it
//!   answers 404 (its fetch has not registered yet), for at most `--burst-wait`; then it goes
//!   upstream itself. Who comes first does not matter, nor how far apart the nodes start: the
//!   tie is broken by arrival at one place, not by a timer. The DHT alone cannot break it: a
//!   lookup made at the instant of the miss finds nobody, and "nobody" is cached for a moment.
//! - **Bytes from the holder are peer bytes**: verified whole before containerd gets the first
//!   one (`body::buffered`, verify-before-send), and a holder that dies or stalls mid-blob is
//!   replaced by the peer client's resume (`Range`, same hash) from upstream: a dead holder
//!   costs at most `--burst-wait` plus the peer stall bound, never a stalled pull.
//! - **Never a forward.** The holder serves only its *own* fetch in flight (or its store); a
//!   peer's request never makes a node go upstream. A claim only names who fetches; the holder
//!   fetches because its own containerd asked.
//! - **Mirror mode** (containerd asks upstream itself after its mirror's 404; the daemon never
//!   does): the holder answers its own containerd 404 at once, so containerd downloads the
//!   blob with its own credentials, and serves that download to peers as it arrives, read from
//!   containerd's partial ingest (`store::Ingests::growing`); from the claim on, since the
//!   first MiB lands a while after the download starts (containerd writes in 1 MiB steps), and
//!   an asking node waits for it within its stall bound ([`STARTING`]) rather than give up.
//!   The others ask the holder as above; where they would go upstream they answer 404, and
//!   their containerd goes itself. The holder serves only a download its 404 started, never an
//!   ingest fed by a peer, so two nodes can never wait on each other.
//!
//! The price: one round trip to the coordinator per blob a node misses (none when it is the
//! coordinator). An unreachable coordinator costs at most `--burst-wait`, then the node fetches
//! itself. Nodes that disagree on the members (a partition, a node just joined) may ask different
//! coordinators: at most one extra upstream download per view, never a failure. Claims are
//! made by authenticated members only; a member that lies about who it is can only delay others
//! by `--burst-wait`, never feed them bytes that do not hash to the digest.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

use crate::{
    body::shared::InFlight,
    oci::{Kind, OCTET_STREAM, Reference, digest::Digest},
    routing::{Peer, Router, RouterError},
    source::{Object, ObjectRequest, Payload, Source, SourceError},
    store::Ingests,
};

/// How often a node asks a blob's holder again while its fetch has not started.
pub const POLL: Duration = Duration::from_millis(50);

/// How long a coordinator names a blob's first claimant as its holder after its last claim.
/// The holder claims again every [`RENEW`] while its download runs, so a long one (a 1 GiB
/// layer at 100 Mbit/s takes minutes) stays held; past it, the holder has the blob in its store
/// (and advertises it) or failed, and a new claim starts over.
pub const CLAIM_TTL: Duration = Duration::from_secs(30);

/// How often a holder renews its claim while its download runs.
pub const RENEW: Duration = Duration::from_secs(10);

/// How long after its claim a holder serves its containerd's download before a byte of it is
/// written (containerd writes an ingest in 1 MiB steps, so the first lands a while after the
/// download starts); past it, only a download with bytes. The default `--peer-stall-timeout`:
/// an asking node waits no longer than that for a byte either way.
pub const STARTING: Duration = Duration::from_secs(5);

/// Most claims a coordinator keeps; past it, expired ones are dropped, and if none are, new
/// claims are granted without being recorded (each claimant fetches: fail open, bounded memory).
const MAX_CLAIMS: usize = 4096;

/// Where a coordinator takes claims: `POST {CLAIM_PATH}<digest>?by=<peer id>`, answered with
/// the holder's peer id as the body.
pub const CLAIM_PATH: &str = "/spegel/v1/burst/claim/";

/// Longest peer id a claim may name (libp2p ids in base58 are about 52 characters).
pub const MAX_PEER_ID_LEN: usize = 128;

/// Flags of the cold-burst coordination.
#[derive(Debug, Clone, clap::Args)]
pub struct BurstArgs {
    /// A node that is not a new blob's holder (the first node to claim it at its coordinator,
    /// chosen by rendezvous hashing over the cluster members) asks the holder for at most this
    /// long before going upstream itself; 0: no coordination, every node goes upstream at once.
    #[arg(long, env = "SPEGEL_BURST_WAIT", value_parser = humantime::parse_duration, default_value = "300ms")]
    pub burst_wait: Duration,
}

/// The coordinator of `digest` among `me` and `members`: `None` when it is `me`.
pub fn coordinator(digest: &Digest, me: &str, members: &[Peer]) -> Option<Peer> {
    let score = |id: &str| Digest::of(format!("{digest}/{id}").as_bytes()).to_string();
    let best = members
        .iter()
        .filter(|peer| peer.id != me)
        .min_by_key(|peer| score(&peer.id))?;
    (score(&best.id) < score(me)).then(|| best.clone())
}

/// Whether `id` may be named in a claim: a libp2p peer id's alphabet, bounded.
pub fn valid_peer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_PEER_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Per-blob entries that expire [`CLAIM_TTL`] after they were set, at most [`MAX_CLAIMS`] of
/// them: when full, expired ones are dropped, and if none are, a new entry is not kept.
struct Expiring<V> {
    entries: HashMap<Digest, (V, Instant)>,
}

impl<V> Default for Expiring<V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<V> Expiring<V> {
    /// The entry for `digest`, unless it expired by `now`.
    fn get(&self, digest: &Digest, now: Instant) -> Option<&V> {
        let (value, at) = self.entries.get(digest)?;
        (now.duration_since(*at) < CLAIM_TTL).then_some(value)
    }

    /// Sets `digest`'s entry as of `now`, unless the map is full of live entries.
    fn insert(&mut self, digest: Digest, value: V, now: Instant) {
        if self.entries.len() >= MAX_CLAIMS && !self.entries.contains_key(&digest) {
            self.entries
                .retain(|_, (_, at)| now.duration_since(*at) < CLAIM_TTL);
            if self.entries.len() >= MAX_CLAIMS {
                return;
            }
        }
        self.entries.insert(digest, (value, now));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A coordinator's record of who fetches which blob.
pub struct Claims {
    me: String,
    in_flight: InFlight,
    held: Mutex<Expiring<String>>,
}

impl Claims {
    /// Claims coordinated by this node (`me`), whose own fetches in flight `in_flight` lists.
    pub fn new(me: String, in_flight: InFlight) -> Self {
        Self {
            me,
            in_flight,
            held: Mutex::default(),
        }
    }

    /// `by` claims `digest`: the holder's id, `by` itself when it is the first (or the last
    /// holder's claim expired). The holder claiming again renews its claim for another
    /// [`CLAIM_TTL`]. This node holds what it is fetching already.
    pub fn claim(&self, digest: Digest, by: &str) -> String {
        let now = Instant::now();
        let mut held = lock(&self.held);
        if let Some(holder) = held.get(&digest, now) {
            let holder = holder.clone();
            if holder == by {
                // The holder renewing its claim while its download runs.
                held.insert(digest, holder.clone(), now);
            }
            return holder;
        }
        if self.in_flight.has(&digest) {
            return self.me.clone();
        }
        held.insert(digest, by.to_owned(), now);
        by.to_owned()
    }
}

/// Asks another node, the coordinator of a blob, to record a claim.
#[async_trait::async_trait]
pub trait Claimer: Send + Sync {
    /// `me` claims `digest` at `coordinator`: the holder's id, or why the coordinator did not
    /// answer.
    async fn claim(&self, coordinator: &Peer, digest: Digest, me: &str) -> Result<String, String>;
}

/// A router whose only provider of a digest is its holder, as the gate last learnt it (named
/// again while a body from it arrives): it points the ordinary peer client, and its resumes,
/// at the holder.
pub struct HolderRouter {
    router: Arc<dyn Router>,
    holders: Mutex<Expiring<Peer>>,
}

impl HolderRouter {
    pub fn new(router: Arc<dyn Router>) -> Self {
        Self {
            router,
            holders: Mutex::default(),
        }
    }

    fn set(&self, digest: Digest, holder: Peer) {
        lock(&self.holders).insert(digest, holder, Instant::now());
    }

    fn get(&self, key: &str) -> Option<Peer> {
        let digest: Digest = key.parse().ok()?;
        lock(&self.holders).get(&digest, Instant::now()).cloned()
    }
}

#[async_trait::async_trait]
impl Router for HolderRouter {
    fn has_peers(&self) -> bool {
        self.router.has_peers()
    }

    async fn lookup(&self, key: &str, _count: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        let (tx, rx) = mpsc::channel(1);
        if let Some(peer) = self.get(key) {
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

/// In front of the (shared) upstream: a blob is claimed at its coordinator first, and fetched
/// from its holder when that is another node, for at most `wait`. See the module docs.
pub struct BurstGate {
    upstream: Arc<dyn Source>,
    in_flight: InFlight,
    /// The peer client pointed at holders (verify-before-send in front of it).
    from_holder: Arc<dyn Source>,
    holders: Arc<HolderRouter>,
    /// This node's own claims, as a coordinator.
    claims: Arc<Claims>,
    claimer: Arc<dyn Claimer>,
    wait: Duration,
    /// Mirror mode: this node's containerd, whose own download a holder serves as it arrives.
    mirror: Option<Arc<dyn Ingests>>,
    /// Blobs this node was the first to claim, as their coordinators said, with when it first
    /// claimed each (the entry itself is renewed with the claim).
    held: Arc<Mutex<Expiring<Instant>>>,
    /// Blobs whose claim a task is renewing while this node downloads them.
    renewing: Arc<Mutex<std::collections::HashSet<Digest>>>,
}

impl BurstGate {
    /// `upstream`: the shared upstream whose copies `in_flight` lists; `from_holder`: a peer
    /// source asking through `holders`; `claims`: this node's as a coordinator; `claimer`: asks
    /// other coordinators.
    pub fn new(
        upstream: Arc<dyn Source>,
        in_flight: InFlight,
        (from_holder, holders): (Arc<dyn Source>, Arc<HolderRouter>),
        (claims, claimer): (Arc<Claims>, Arc<dyn Claimer>),
        wait: Duration,
    ) -> Self {
        Self {
            upstream,
            in_flight,
            from_holder,
            holders,
            claims,
            claimer,
            wait,
            mirror: None,
            held: Arc::default(),
            renewing: Arc::default(),
        }
    }

    /// Mirror mode, where containerd asks upstream itself: a holder answers its containerd
    /// 404 at once (so it downloads the blob from upstream) and serves peers that download,
    /// read from containerd's partial ingest in `ingests` as it grows; a node that is not the
    /// holder asks it as in transparent mode, and where it would go upstream it answers 404
    /// (its containerd then goes itself).
    pub fn for_mirror(mut self, ingests: Arc<dyn Ingests>) -> Self {
        self.mirror = Some(ingests);
        self
    }

    /// A peer's request for a blob this node holds in mirror mode: its containerd's download
    /// in flight (`None` once it is gone, or when nothing of it is written [`STARTING`] after
    /// the claim: a download that never started).
    async fn download_in_flight(&self, request: &ObjectRequest, digest: Digest) -> Option<Object> {
        let ingests = self.mirror.as_ref()?;
        let now = Instant::now();
        let age = now.duration_since(*lock(&self.held).get(&digest, now)?);
        let growing = ingests.growing(&digest).await?;
        if age >= STARTING && growing.written().await.ok()? == 0 {
            tracing::debug!(%digest, ?age, "this node's download of a blob it holds has not started");
            return None;
        }
        let size = growing.size();
        let range = request.resolve_range(size).ok()?;
        let bytes = range.as_ref().map_or(0..size, |r| *r.start()..*r.end() + 1);
        tracing::debug!(%digest, ?range, "serving a peer this node's download in flight");
        Some(Object {
            digest,
            media_type: OCTET_STREAM.into(),
            size,
            range,
            body: match request.head {
                true => Payload::Empty,
                false => Payload::Stream(growing.body(bytes)),
            },
            source: "local",
        })
    }

    /// The holder of `digest` when it is another member; `None`: this node fetches.
    async fn holder(&self, digest: Digest) -> Option<Peer> {
        let (me, members) = self.holders.router.members().await?;
        let coordinator = coordinator(&digest, &me, &members);
        let holder = match &coordinator {
            None => self.claims.claim(digest, &me),
            Some(coordinator) => {
                let asked = self.claimer.claim(coordinator, digest, &me);
                match tokio::time::timeout(self.wait, asked).await {
                    Ok(Ok(holder)) => holder,
                    Ok(Err(err)) => {
                        tracing::debug!(%digest, coordinator = %coordinator.id, %err, "burst coordinator did not answer; fetching");
                        return None;
                    }
                    Err(_) => {
                        tracing::debug!(%digest, coordinator = %coordinator.id, wait = ?self.wait, "burst coordinator did not answer in time; fetching");
                        return None;
                    }
                }
            }
        };
        if holder == me {
            hold(&self.held, digest);
            self.keep_holding(digest, coordinator, me);
            return None;
        }
        let found = members.into_iter().find(|peer| peer.id == holder);
        if found.is_none() {
            tracing::debug!(%digest, %holder, "burst holder is not a member this node knows; fetching");
        }
        found
    }
}

impl BurstGate {
    /// Names `holder` as `digest`'s holder again every [`RENEW`] while `object`'s body
    /// arrives, so that a resume late in a long transfer (the peer client looks the holder up
    /// again when its stream breaks) still finds it after [`CLAIM_TTL`].
    fn keep_naming(&self, object: &mut Object, digest: Digest, holder: Peer) {
        let holders = Arc::clone(&self.holders);
        let named = Mutex::new(Instant::now());
        object.body.observe(move |_| {
            let mut named = lock(&named);
            if named.elapsed() >= RENEW {
                holders.set(digest, holder.clone());
                *named = Instant::now();
            }
        });
    }

    /// While this node downloads `digest` (its shared upstream fetch, or in mirror mode its
    /// containerd's ingest), claims it again at its coordinator every [`RENEW`], so that nodes
    /// asking later still find this node the holder; stops when the download ends or another
    /// node holds the blob.
    fn keep_holding(&self, digest: Digest, coordinator: Option<Peer>, me: String) {
        if !lock(&self.renewing).insert(digest) {
            return; // already renewed
        }
        let (claims, claimer) = (Arc::clone(&self.claims), Arc::clone(&self.claimer));
        let (in_flight, mirror) = (self.in_flight.clone(), self.mirror.clone());
        let (held, renewing) = (Arc::clone(&self.held), Arc::clone(&self.renewing));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW).await;
                let downloading = match &mirror {
                    None => in_flight.has(&digest),
                    Some(ingests) => ingests.growing(&digest).await.is_some(),
                };
                if !downloading {
                    break;
                }
                let holder = match &coordinator {
                    None => claims.claim(digest, &me),
                    Some(coordinator) => match claimer.claim(coordinator, digest, &me).await {
                        Ok(holder) => holder,
                        Err(err) => {
                            tracing::debug!(%digest, coordinator = %coordinator.id, %err, "cannot renew a burst claim; trying again");
                            continue;
                        }
                    },
                };
                if holder != me {
                    tracing::debug!(%digest, %holder, "another node holds a blob this node downloads");
                    break;
                }
                hold(&held, digest);
            }
            lock(&renewing).remove(&digest);
        });
    }
}

/// Records (or renews) that this node holds `digest`, keeping when it first claimed it.
fn hold(held: &Mutex<Expiring<Instant>>, digest: Digest) {
    let now = Instant::now();
    let mut held = lock(held);
    let first = held.get(&digest, now).copied().unwrap_or(now);
    held.insert(digest, first, now);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[async_trait::async_trait]
impl Source for BurstGate {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let digest = match (&request.kind, &request.reference) {
            (Kind::Blob, Reference::Digest(digest)) => *digest,
            _ => return self.upstream.fetch(request).await,
        };
        if request.mirrored {
            // A peer asking: never a claim, never a forward; in mirror mode, what this node's
            // containerd is downloading as the blob's holder.
            if let Some(object) = self.download_in_flight(request, digest).await {
                return Ok(object);
            }
            return self.upstream.fetch(request).await;
        }
        // Where this node's containerd would otherwise download it: through this daemon
        // (intercepted), or itself after a mirror-mode 404 (`?ns=` names the registry).
        let downloads = match self.mirror {
            None => request.origin.is_some(),
            Some(_) => request.origin.is_none() && request.registry.is_some(),
        };
        let gated = !request.head
            && request.range.is_none()
            && downloads
            && !self.wait.is_zero()
            && !self.in_flight.has(&digest);
        if !gated {
            return self.upstream.fetch(request).await;
        }
        let Some(holder) = self.holder(digest).await else {
            return self.upstream.fetch(request).await;
        };
        self.holders.set(digest, holder.clone());
        let deadline = Instant::now() + self.wait;
        loop {
            match self.from_holder.fetch(request).await {
                Ok(mut object) => {
                    tracing::debug!(%digest, holder = %holder.id, "blob from its burst holder");
                    self.keep_naming(&mut object, digest, holder);
                    return Ok(object);
                }
                Err(err) => {
                    tracing::trace!(%digest, holder = %holder.id, %err, "burst holder has not started")
                }
            }
            if Instant::now() + POLL >= deadline || self.in_flight.has(&digest) {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::debug!(%digest, holder = %holder.id, wait = ?self.wait, "burst holder did not serve in time; going upstream");
        self.upstream.fetch(request).await
    }
}

#[cfg(test)]
mod tests;
