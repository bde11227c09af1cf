//! Who may be given content that came from peers: private images stay private.
//!
//! Another node may hold a blob or manifest because it pulled it with credentials. So nothing a
//! peer holds reaches this node's containerd until upstream has confirmed, with the client's own
//! credentials (the `Authorization` containerd sent), that the client may read that object in
//! that repository: a `HEAD` of the object by digest, asked while the peers are asked, so it
//! costs no time on the way. Upstream's confirmation is remembered per registry × repository ×
//! credential hash for `--access-cache-ttl`.
//!
//! - **Refused** (401, 403, 404): the client gets upstream's answer (its challenge included),
//!   never the peer's bytes.
//! - **Upstream unreachable**, failing, or resting after a failure: peers are asked for *public*
//!   content only (`x-spegel-public-only`), and a node answers such a request only with what it
//!   knows to be public ([`PublicBook`]: objects upstream let anyone read, i.e. confirmed without
//!   credentials). Tags reach peers only on this path (see `serve::policy`).
//! - **Mirror mode**: containerd never sends its credentials to a mirror, so nothing can be
//!   confirmed: public content only, as above.
//! - `--public-registries` (or `--all-public`) says everything from those registries is public:
//!   no confirmation, and peers answer for it freely.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use clap::Args;
use http::header;
use sha2::{Digest as _, Sha256};

use crate::{
    metrics::AccessStats,
    oci::{Host, Reference, Registry, RegistryList, digest::Digest},
    source::{Object, ObjectRequest, Source, SourceError},
    upstream::Backoff,
};

/// Confirmations remembered at most (registry × repository × credential hash).
const MAX_CONFIRMATIONS: usize = 4096;
/// Digests confirmed per entry at most.
const MAX_DIGESTS_PER_ENTRY: usize = 4096;
/// Public digests remembered at most.
const MAX_PUBLIC: usize = 65_536;

/// Flags: which content is public, and how long upstream's word is trusted.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// Registries (`[http(s)://]host[:port]`, comma-separated or repeated) whose every image is
    /// public: peers serve their content to any member node without asking upstream first.
    /// Everything else is served from peers only after upstream has confirmed that the
    /// pulling client may read it (private images stay private).
    #[arg(long, env = "SPEGEL_PUBLIC_REGISTRIES")]
    pub public_registries: Vec<RegistryList>,
    /// Every image from every registry is public (a cluster with no private images): peers
    /// serve any content without confirmation. Off by default.
    #[arg(long, env = "SPEGEL_ALL_PUBLIC", action = clap::ArgAction::Set, default_value_t = false)]
    pub all_public: bool,
    /// How long upstream's confirmation that a client (by credential hash) may read objects of
    /// a repository is remembered.
    #[arg(long, env = "SPEGEL_ACCESS_CACHE_TTL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub access_cache_ttl: Duration,
}

impl AccessArgs {
    /// The access book these flags describe.
    pub fn access(&self, stats: Arc<AccessStats>) -> Access {
        Access {
            public_registries: self.public_registries.iter().flatten().cloned().collect(),
            all_public: self.all_public,
            ttl: self.access_cache_ttl,
            confirmed: Mutex::default(),
            public: PublicBook::default(),
            stats,
        }
    }
}

/// What this node knows about who may read what.
#[derive(Debug)]
pub struct Access {
    public_registries: Vec<Registry>,
    all_public: bool,
    ttl: Duration,
    confirmed: Mutex<HashMap<Key, Confirmed>>,
    public: PublicBook,
    stats: Arc<AccessStats>,
}

/// Registry, repository and the hash of the client's credentials.
type Key = (String, String, [u8; 32]);

#[derive(Debug)]
struct Confirmed {
    until: Instant,
    digests: HashSet<Digest>,
}

impl Access {
    /// Whether an operator declared everything from `registry` public.
    pub fn public_registry(&self, registry: Option<&str>) -> bool {
        if self.all_public {
            return true;
        }
        let Some(asked) = registry.and_then(|r| Registry::parse_authority(r).ok()) else {
            return false;
        };
        self.public_registries
            .iter()
            .any(|entry| same_registry(entry, &asked))
    }

    /// Whether upstream confirmed (within the TTL) that this client may read `digest` here.
    fn is_confirmed(&self, request: &ObjectRequest, digest: Digest) -> bool {
        let key = key(request);
        let mut confirmed = lock(&self.confirmed);
        match confirmed.get(&key) {
            Some(entry) if entry.until > Instant::now() => entry.digests.contains(&digest),
            Some(_) => {
                confirmed.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Remember upstream's confirmation; one without credentials also makes `digest` public.
    fn confirm(&self, request: &ObjectRequest, digest: Digest) {
        if !request.headers.contains_key(header::AUTHORIZATION) {
            self.public.insert(digest);
        }
        let now = Instant::now();
        let mut confirmed = lock(&self.confirmed);
        if confirmed.len() >= MAX_CONFIRMATIONS {
            confirmed.retain(|_, entry| entry.until > now);
            if confirmed.len() >= MAX_CONFIRMATIONS {
                confirmed.clear();
            }
        }
        let entry = confirmed.entry(key(request)).or_insert_with(|| Confirmed {
            until: now + self.ttl,
            digests: HashSet::new(),
        });
        if entry.until <= now {
            entry.until = now + self.ttl;
            entry.digests.clear();
        }
        if entry.digests.len() < MAX_DIGESTS_PER_ENTRY {
            entry.digests.insert(digest);
        }
    }

    /// Whether `digest` may be given to a peer that asked for public content only.
    pub fn is_public(&self, registry: Option<&str>, digest: Digest) -> bool {
        self.public_registry(registry) || self.public.contains(digest)
    }

    /// The counters.
    pub fn stats(&self) -> &AccessStats {
        &self.stats
    }
}

/// Same host, and the same port (a port-less entry stands for the scheme's default port, so it
/// matches a registry named without one, or with 443 or 80).
fn same_registry(entry: &Registry, asked: &Registry) -> bool {
    let host_matches = match (entry.host(), asked.host()) {
        (Host::Name(a), Host::Name(b)) => a == b,
        (Host::Ip(a), Host::Ip(b)) => a == b,
        _ => false,
    };
    host_matches
        && match (entry.port(), asked.port()) {
            (Some(a), Some(b)) => a == b,
            (None, None) => true,
            (None, Some(port)) => port == 443 || port == 80,
            (Some(_), None) => false,
        }
}

fn key(request: &ObjectRequest) -> Key {
    let mut hasher = Sha256::new();
    for value in request.headers.get_all(header::AUTHORIZATION) {
        hasher.update(value.as_bytes());
        hasher.update(b"\n");
    }
    (
        request.registry.clone().unwrap_or_default(),
        request.repository.clone(),
        hasher.finalize().into(),
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Digests upstream let anyone read (confirmed without credentials), oldest forgotten first.
#[derive(Debug, Default)]
pub struct PublicBook {
    inner: Mutex<(HashSet<Digest>, VecDeque<Digest>)>,
}

impl PublicBook {
    fn insert(&self, digest: Digest) {
        let mut inner = lock(&self.inner);
        let (set, order) = &mut *inner;
        if set.insert(digest) {
            order.push_back(digest);
            if order.len() > MAX_PUBLIC
                && let Some(oldest) = order.pop_front()
            {
                set.remove(&oldest);
            }
        }
    }

    fn contains(&self, digest: Digest) -> bool {
        lock(&self.inner).0.contains(&digest)
    }
}

/// Peers, behind upstream's confirmation that the client may read what it asks for.
pub struct ConfirmedPeers {
    peers: Arc<dyn Source>,
    /// Upstream, for intercepted requests (transparent mode).
    upstream: Option<Arc<dyn Source>>,
    backoff: Option<Arc<Backoff>>,
    access: Arc<Access>,
}

impl ConfirmedPeers {
    /// `peers`, confirmed with `upstream` (transparent mode) as the module docs say.
    pub fn new(
        peers: Arc<dyn Source>,
        upstream: Option<Arc<dyn Source>>,
        access: Arc<Access>,
    ) -> Self {
        Self {
            peers,
            upstream,
            backoff: None,
            access,
        }
    }

    /// While `backoff` says upstream is resting, ask peers for public content only.
    pub fn with_backoff(mut self, backoff: Arc<Backoff>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Peers, for public content only.
    async fn public_only(
        &self,
        request: &ObjectRequest,
        why: &'static str,
    ) -> Result<Object, SourceError> {
        let mut request = request.clone();
        request.public_only = true;
        let result = self.peers.fetch(&request).await;
        if let Ok(object) = &result {
            // A member vouched that it is public; this node may pass it on as such.
            self.access.public.insert(object.digest);
            self.access
                .stats
                .public_only
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(registry = request.registry.as_deref().unwrap_or_default(), repository = %request.repository, reference = ?request.reference, why, "public content from peers, unconfirmed by upstream");
        }
        result
    }
}

#[async_trait::async_trait]
impl Source for ConfirmedPeers {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        // Another node asking is never forwarded to peers (the peer source refuses it).
        if request.mirrored || self.access.public_registry(request.registry.as_deref()) {
            return self.peers.fetch(request).await;
        }
        let Reference::Digest(digest) = request.reference else {
            // Tags come from peers only when upstream could not answer.
            return self.public_only(request, "tag").await;
        };
        let (Some(upstream), Some(origin)) = (&self.upstream, &request.origin) else {
            return self.public_only(request, "mirror mode").await;
        };
        if self.access.is_confirmed(request, digest) {
            return self.peers.fetch(request).await;
        }
        if self
            .backoff
            .as_ref()
            .is_some_and(|backoff| backoff.remaining(origin).is_some())
        {
            return self.public_only(request, "upstream is backing off").await;
        }
        let mut head = request.clone();
        head.head = true;
        head.range = None;
        // Ask upstream and the peers at once; the peers' answer is used only once upstream
        // has confirmed, and dropped (its transfer cancelled) if it refuses.
        let mut peers = Box::pin(self.peers.fetch(request));
        let mut check = Box::pin(upstream.fetch(&head));
        let mut fetched = None;
        let check = tokio::select! {
            check = &mut check => check,
            result = &mut peers => {
                fetched = Some(result);
                (&mut check).await
            }
        };
        match check {
            Ok(_) => {
                self.access.confirm(request, digest);
                self.access.stats.confirmed.fetch_add(1, Ordering::Relaxed);
                match fetched {
                    Some(result) => result,
                    None => peers.await,
                }
            }
            // Upstream failed rather than answered: public content only.
            Err(SourceError::Unavailable(_)) => {
                drop((peers, fetched));
                self.public_only(request, "upstream unreachable").await
            }
            Err(SourceError::Upstream { status, .. })
                if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS =>
            {
                drop((peers, fetched));
                self.public_only(request, "upstream failing").await
            }
            // Refused or unknown there: upstream's answer, never the peer's bytes. `NotFound`
            // moves on to upstream, which answers the request itself.
            Err(refusal) => {
                drop((peers, fetched));
                self.access.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    registry = request.registry.as_deref().unwrap_or_default(),
                    repository = %request.repository,
                    %digest,
                    %refusal,
                    "upstream did not confirm the client may read it: not served from peers"
                );
                Err(refusal)
            }
        }
    }
}

/// Upstream, noting what it gave: to this client, a confirmation that it may read that digest
/// in that repository (so a manifest fetched by tag needs no second `HEAD` before peers may
/// serve it by digest); without credentials, also public, so this node may later give it to
/// nodes asking for public content only (when upstream cannot answer them).
///
/// It must wrap the upstream fetch itself, never a fetch shared between requests (`body::shared`)
/// or coordinated with peers (`peers::burst`): only an answer upstream gave to *this* request's
/// credentials says anything about them.
pub struct NotesPublic {
    upstream: Arc<dyn Source>,
    access: Arc<Access>,
}

impl NotesPublic {
    pub fn new(upstream: Arc<dyn Source>, access: Arc<Access>) -> Self {
        Self { upstream, access }
    }
}

#[async_trait::async_trait]
impl Source for NotesPublic {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let object = self.upstream.fetch(request).await?;
        // A peer's request carries no credentials of its own: it says nothing about who may
        // read the object.
        if !request.mirrored {
            self.access.confirm(request, object.digest);
        }
        Ok(object)
    }
}

/// What this node serves other nodes — its store, or its own upstream fetch in flight
/// (`body::shared`) — answering one that asked for public content only with what this node
/// knows to be public.
pub struct PublicOnly {
    inner: Arc<dyn Source>,
    access: Arc<Access>,
}

impl PublicOnly {
    pub fn new(inner: Arc<dyn Source>, access: Arc<Access>) -> Self {
        Self { inner, access }
    }
}

#[async_trait::async_trait]
impl Source for PublicOnly {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let object = self.inner.fetch(request).await?;
        if request.mirrored
            && request.public_only
            && !self
                .access
                .is_public(request.registry.as_deref(), object.digest)
        {
            self.access.stats.withheld.fetch_add(1, Ordering::Relaxed);
            return Err(SourceError::NotFound);
        }
        Ok(object)
    }
}

#[cfg(test)]
mod tests;
