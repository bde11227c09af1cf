//! Entry points for the fuzz targets (`spegel-daemon/fuzz/`, see docs/fuzzing.md): the parsers
//! that see network or disk input but are private to their module, each behind the smallest
//! wrapper that lets a target call it and check what it returns. Not an API; hidden from docs.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration, time::SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use libp2p::{
    PeerId,
    identity::Keypair,
    kad::{ProviderRecord, RecordKey, store::RecordStore as _},
};

pub use crate::{
    intercept::sni::{TlsHello, parse_tls_client_hello},
    p2p::RegistryAdvertise,
    tls::{
        ca::{LeafName, PermittedNames},
        trust::{BootInstant, InstallRecord, parse_record, trusts},
    },
};
use crate::{
    oci::digest::Digest,
    p2p::{registry_addr, store},
    peers::wire,
    store::walk,
    tls::{ca, trust},
    upstream::{
        hop_by_hop,
        redirect::{self, Decision, Hop},
        retry_after,
        target::Target,
    },
};

/// A manifest or index as the image walk reads it (`store/walk.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub media_type: Option<String>,
    pub children: Vec<(Digest, Option<String>)>,
}

/// The image walk's reading of a blob: a manifest or index, `None` for anything else.
pub fn parse_document(bytes: &[u8]) -> Option<Document> {
    walk::parse_document(bytes).map(|parsed| Document {
        media_type: parsed.media_type,
        children: parsed.children,
    })
}

/// The media type the walk sniffs from a blob's bytes.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    walk::sniff_media_type(bytes)
}

/// The image name itself when it is a `registry/repo:tag` reference (containerd image records).
pub fn tag_reference(name: &str) -> Option<&str> {
    walk::tag_reference(name)
}

/// The registry a peer announces in its Identify agent version.
pub fn parse_agent_version(agent: &str) -> Option<RegistryAdvertise> {
    registry_addr::parse_agent_version(agent)
}

/// The agent version this node announces.
pub fn agent_version(registry: RegistryAdvertise) -> String {
    registry_addr::agent_version(registry)
}

/// How long an upstream's `Retry-After` asks to wait from `now`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    retry_after::retry_after(headers, now)
}

/// Removes the hop-by-hop headers of an upstream response (`Connection` and the standard ones).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    hop_by_hop::strip_hop_by_hop(headers);
}

/// The span (start, length, total) a peer's 200 or 206 answer covers.
pub fn response_span(status: StatusCode, headers: &HeaderMap) -> Result<(u64, u64, u64), String> {
    wire::span(status, headers).map(|span| (span.start, span.len, span.total))
}

/// The start time in a `/proc/<pid>/stat` line (whose command name the process chose).
pub fn start_time_in_stat(stat: &str, ticks: f64) -> Option<f64> {
    trust::start_time_in_stat(stat, ticks)
}

/// A `/proc/mounts` path field, unescaped.
pub fn unescape_mount_path(field: &str) -> String {
    crate::intercept::cgroup::unescape_mount_path(field)
}

/// Where an upstream request goes, as the redirect policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub pinned: Option<SocketAddr>,
    pub path_and_query: String,
    /// Whether the request still carries `Authorization`.
    pub authorization: bool,
    /// The target read back from the synthetic URI the connector is handed.
    pub decoded: Option<(bool, String, u16, Option<SocketAddr>)>,
}

/// What the redirect policy makes of `status` and `location` for a GET of `url` (pinned at
/// `pinned`, with an `Authorization` header), after `redirects` redirects. `Ok(None)`: not a
/// redirect. `url` must be an `http(s)` URL; otherwise `Err`.
pub fn follow_redirect(
    url: &str,
    pinned: Option<SocketAddr>,
    redirects: usize,
    status: StatusCode,
    location: Option<&HeaderValue>,
) -> Result<Option<RedirectTarget>, String> {
    let url = url::Url::parse(url).map_err(|e| e.to_string())?;
    let mut target = Target::from_url(&url)?;
    target.pinned = pinned;
    let path_and_query = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer token"),
    );
    let current = Hop {
        target: target.clone(),
        path_and_query,
        headers,
    };
    let next = match redirect::decide(&target, &current, redirects, status, location)? {
        Decision::Stop => return Ok(None),
        Decision::Follow(next) => next,
    };
    let decoded = next
        .target
        .uri(&next.path_and_query)
        .ok()
        .map(|uri| Target::decode(&uri).map(|t| (t.tls, t.host, t.port, t.pinned)))
        .transpose()
        .map_err(|e| format!("cannot decode the synthetic URI: {e}"))?;
    Ok(Some(RedirectTarget {
        tls: next.target.tls,
        host: next.target.host,
        port: next.target.port,
        pinned: next.target.pinned,
        path_and_query: next.path_and_query,
        authorization: next.headers.contains_key(http::header::AUTHORIZATION),
        decoded,
    }))
}

/// A CA (key and certificate PEM) constrained to `names`, as the daemon mints it, for targets
/// that mutate a valid certificate. Slow (key generation): call once.
pub fn sample_ca_pem(names: &[&str]) -> (String, String) {
    let registries: Vec<crate::oci::Registry> = names
        .iter()
        .map(|name| name.parse().expect("a registry name"))
        .collect();
    let permitted = PermittedNames::from_registries(&registries).expect("names");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = ca::ca_params(&permitted)
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    (key.serialize_pem(), cert.pem())
}

/// The names a CA certificate (DER) read from disk permits, or why it is unusable.
pub fn ca_constraints(der: &[u8]) -> Result<PermittedNames, String> {
    ca::existing_constraints(der)
        .map(|constraints| PermittedNames::from_constraints(&constraints))
        .map_err(|e| e.to_string())
}

/// Loads a CA from its key and certificate PEM as read from disk; the names it vouches for.
pub fn load_ca(key_pem: &str, cert_pem: &str) -> Result<PermittedNames, String> {
    ca::NodeCa::from_pem(key_pem, cert_pem.to_owned(), Duration::from_secs(3600))
        .map(|ca| ca.permitted().clone())
        .map_err(|e| e.to_string())
}

/// The bounded provider-record store, driven with small numbers for keys and peers: peer 0 is
/// this node, key `k` is the one-byte key `[k]`.
pub struct ProviderStore {
    store: store::ProviderStore,
    peers: Vec<PeerId>,
}

impl ProviderStore {
    /// How many peers the numbers name (peer numbers are taken modulo this).
    pub const PEERS: u8 = 32;

    pub fn new(max_keys: usize) -> Self {
        // Deriving peer ids is slow next to the store: once per process.
        static PEERS: std::sync::OnceLock<Vec<PeerId>> = std::sync::OnceLock::new();
        let peers = PEERS
            .get_or_init(|| {
                (0..Self::PEERS)
                    .map(|n| {
                        Keypair::ed25519_from_bytes([n; 32])
                            .expect("32 bytes")
                            .public()
                            .to_peer_id()
                    })
                    .collect()
            })
            .clone();
        Self {
            store: store::ProviderStore::new(peers[0], max_keys),
            peers,
        }
    }

    fn peer(&self, n: u8) -> PeerId {
        self.peers[usize::from(n % Self::PEERS)]
    }

    /// A provider record of `peer` for `key`, expiring at `expires` (if any); whether it was
    /// accepted.
    pub fn add(&mut self, key: u8, peer: u8, expires: Option<std::time::Instant>) -> bool {
        let record = ProviderRecord {
            key: RecordKey::new(&[key]),
            provider: self.peer(peer),
            expires,
            addresses: Vec::new(),
        };
        self.store.add_provider(record).is_ok()
    }

    pub fn remove(&mut self, key: u8, peer: u8) {
        let provider = self.peer(peer);
        self.store
            .remove_provider(&RecordKey::new(&[key]), &provider);
    }

    pub fn purge_expired(&mut self, now: std::time::Instant) -> usize {
        self.store.purge_expired(now)
    }

    /// The providers of `key` (peer numbers, in store order) with their expiry.
    pub fn providers(&self, key: u8) -> Vec<(u8, Option<std::time::Instant>)> {
        self.store
            .providers(&RecordKey::new(&[key]))
            .into_iter()
            .map(|record| (self.number(&record.provider), record.expires))
            .collect()
    }

    /// The keys this node provides.
    pub fn provided(&self) -> BTreeSet<u8> {
        self.store
            .provided()
            .map(|record| record.key.as_ref().first().copied().unwrap_or(u8::MAX))
            .collect()
    }

    fn number(&self, peer: &PeerId) -> u8 {
        self.peers
            .iter()
            .position(|p| p == peer)
            .and_then(|n| u8::try_from(n).ok())
            .unwrap_or(u8::MAX)
    }
}
