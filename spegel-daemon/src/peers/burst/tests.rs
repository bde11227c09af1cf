//! The coordinator choice, the claims and the gate in front of upstream, with fake sources,
//! members and coordinators.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use http::HeaderMap;

use super::*;
use crate::source::{Origin, Payload};

fn peer(id: &str) -> Peer {
    Peer {
        id: id.into(),
        addr: SocketAddr::from(([10, 0, 0, 1], 5000)),
    }
}

#[test]
fn every_node_picks_the_same_coordinator_and_blobs_spread() {
    let ids = ["a", "b", "c", "d"];
    let mut picked = std::collections::BTreeSet::new();
    for n in 0..64u32 {
        let digest = Digest::of(&n.to_le_bytes());
        let choices: Vec<String> = ids
            .iter()
            .map(|me| {
                let others: Vec<Peer> = ids
                    .iter()
                    .filter(|id| *id != me)
                    .map(|id| peer(id))
                    .collect();
                coordinator(&digest, me, &others).map_or_else(|| me.to_string(), |p| p.id)
            })
            .collect();
        assert!(
            choices.windows(2).all(|w| w[0] == w[1]),
            "{digest}: {choices:?}"
        );
        picked.insert(choices[0].clone());
    }
    assert_eq!(picked.len(), ids.len(), "blobs spread over every node");
    assert!(
        coordinator(&Digest::of(b"x"), "a", &[]).is_none(),
        "alone: itself"
    );
}

/// Members as a router tells them.
struct Members {
    me: &'static str,
    others: Vec<Peer>,
}

#[async_trait::async_trait]
impl Router for Members {
    fn has_peers(&self) -> bool {
        !self.others.is_empty()
    }
    async fn lookup(&self, _: &str, _: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        Ok(mpsc::channel(1).1)
    }
    async fn advertise(&self, _: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }
    async fn withdraw(&self, _: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }
    async fn members(&self) -> Option<(String, Vec<Peer>)> {
        Some((self.me.into(), self.others.clone()))
    }
}

/// Answers with its name after `misses` calls answered `NotFound`.
struct Counted {
    name: &'static str,
    misses: usize,
    calls: AtomicUsize,
}

impl Counted {
    fn new(name: &'static str, misses: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            misses,
            calls: AtomicUsize::new(0),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Source for Counted {
    async fn fetch(&self, _: &ObjectRequest) -> Result<Object, SourceError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.misses {
            return Err(SourceError::NotFound);
        }
        Ok(Object {
            digest: Digest::of(b""),
            media_type: "x".into(),
            size: 0,
            range: None,
            body: Payload::Empty,
            source: self.name,
        })
    }
}

fn blob(digest: Digest) -> ObjectRequest {
    ObjectRequest {
        kind: Kind::Blob,
        registry: Some("r.test".into()),
        repository: "a/b".into(),
        reference: Reference::Digest(digest),
        range: None,
        head: false,
        headers: HeaderMap::new(),
        origin: Some(Origin {
            addr: ([10, 0, 0, 9], 443).into(),
            host: "r.test".into(),
            tls: true,
        }),
        mirrored: false,
        public_only: false,
    }
}

/// A digest whose coordinator, seen from `me` among `ids`, is (`true`) or is not `me`.
fn digest_coordinated_by_me(me: &str, ids: &[&str], mine: bool) -> Digest {
    let others: Vec<Peer> = ids
        .iter()
        .filter(|id| **id != me)
        .map(|id| peer(id))
        .collect();
    (0u32..)
        .map(|n| Digest::of(&n.to_le_bytes()))
        .find(|d| coordinator(d, me, &others).is_none() == mine)
        .unwrap()
}

/// A coordinator that answers every claim with `holder` (or fails).
struct Coordinator {
    holder: Result<String, String>,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl Claimer for Coordinator {
    async fn claim(&self, _: &Peer, _: Digest, _: &str) -> Result<String, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.holder.clone()
    }
}

struct Gate {
    gate: BurstGate,
    upstream: Arc<Counted>,
    holder: Arc<Counted>,
    claims: Arc<Claims>,
    coordinator: Arc<Coordinator>,
}

/// Node "a" among b, c, d; the holder misses `holder_misses` times; remote coordinators answer
/// `remote`.
fn gate(holder_misses: usize, remote: Result<&str, &str>, wait: Duration) -> Gate {
    let router = Arc::new(Members {
        me: "a",
        others: vec![peer("b"), peer("c"), peer("d")],
    });
    let upstream = Counted::new("upstream", 0);
    let holder = Counted::new("peer", holder_misses);
    let shared = crate::body::shared::SharedFetch::new(upstream.clone(), None);
    let claims = Arc::new(Claims::new("a".into(), shared.in_flight()));
    let coordinator = Arc::new(Coordinator {
        holder: remote.map(str::to_owned).map_err(str::to_owned),
        calls: AtomicUsize::new(0),
    });
    let gate = BurstGate::new(
        upstream.clone(),
        shared.in_flight(),
        (holder.clone(), Arc::new(HolderRouter::new(router))),
        (Arc::clone(&claims), coordinator.clone()),
        wait,
    );
    Gate {
        gate,
        upstream,
        holder,
        claims,
        coordinator,
    }
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

#[test]
fn the_first_claimant_holds_until_its_claim_expires() {
    let shared = crate::body::shared::SharedFetch::new(Counted::new("upstream", 0), None);
    let claims = Claims::new("me".into(), shared.in_flight());
    let digest = Digest::of(b"blob");
    assert_eq!(claims.claim(digest, "b"), "b");
    assert_eq!(claims.claim(digest, "c"), "b");
    assert_eq!(claims.claim(digest, "b"), "b");
    assert_eq!(claims.claim(Digest::of(b"other"), "c"), "c");
}

#[tokio::test(start_paused = true)]
async fn an_expired_claim_goes_to_the_next_claimant() {
    let shared = crate::body::shared::SharedFetch::new(Counted::new("upstream", 0), None);
    let claims = Claims::new("me".into(), shared.in_flight());
    let digest = Digest::of(b"blob");
    assert_eq!(claims.claim(digest, "b"), "b");
    tokio::time::advance(CLAIM_TTL).await;
    assert_eq!(claims.claim(digest, "c"), "c");
}

#[tokio::test(start_paused = true)]
async fn a_holder_claiming_again_keeps_its_claim() {
    let shared = crate::body::shared::SharedFetch::new(Counted::new("upstream", 0), None);
    let claims = Claims::new("me".into(), shared.in_flight());
    let digest = Digest::of(b"blob");
    assert_eq!(claims.claim(digest, "b"), "b");
    for _ in 0..4 {
        tokio::time::advance(CLAIM_TTL - Duration::from_secs(1)).await;
        assert_eq!(
            claims.claim(digest, "c"),
            "b",
            "another claimant does not renew"
        );
        assert_eq!(claims.claim(digest, "b"), "b");
    }
    tokio::time::advance(CLAIM_TTL).await;
    assert_eq!(claims.claim(digest, "c"), "c", "unrenewed, it expires");
}

#[test]
fn claims_stay_bounded() {
    let shared = crate::body::shared::SharedFetch::new(Counted::new("upstream", 0), None);
    let claims = Claims::new("me".into(), shared.in_flight());
    for n in 0..(MAX_CLAIMS as u32 + 100) {
        // Unrecorded past the bound: every claimant is granted its own claim.
        assert_eq!(claims.claim(Digest::of(&n.to_le_bytes()), "b"), "b");
    }
    assert_eq!(claims.held.lock().unwrap().len(), MAX_CLAIMS);
}

#[tokio::test(start_paused = true)]
async fn holders_stay_bounded_and_expire() {
    let router = Arc::new(Members {
        me: "me",
        others: Vec::new(),
    });
    let holders = HolderRouter::new(router);
    for n in 0..(MAX_CLAIMS as u32 + 100) {
        holders.set(Digest::of(&n.to_le_bytes()), peer("holder"));
    }
    assert_eq!(holders.holders.lock().unwrap().len(), MAX_CLAIMS);
    let first = Digest::of(&0u32.to_le_bytes()).to_string();
    assert_eq!(holders.get(&first).map(|p| p.id), Some("holder".into()));
    tokio::time::advance(CLAIM_TTL).await;
    assert!(
        holders.get(&first).is_none(),
        "an expired holder is still named"
    );
    // Full of expired entries: a new one replaces them.
    let fresh = Digest::of(b"fresh");
    holders.set(fresh, peer("new"));
    assert_eq!(holders.holders.lock().unwrap().len(), 1);
    assert_eq!(
        holders.get(&fresh.to_string()).map(|p| p.id),
        Some("new".into())
    );
}

#[test]
fn peer_ids_in_claims_are_plain_and_short() {
    assert!(valid_peer_id(
        "12D3KooWFxQ5kpdbTsNZ1RBiaNqjb4w9WxSDrrbZkX8yr9LRGp4h"
    ));
    for bad in [
        "",
        "a b",
        "a&by=b",
        "../x",
        "ü",
        &"a".repeat(MAX_PEER_ID_LEN + 1),
    ] {
        assert!(!valid_peer_id(bad), "{bad:?}");
    }
}

#[tokio::test]
async fn the_first_to_claim_at_itself_goes_upstream_at_once() {
    let g = gate(0, Err("unused"), Duration::from_secs(5));
    let digest = digest_coordinated_by_me("a", &IDS, true);
    let got = g.gate.fetch(&blob(digest)).await.unwrap();
    assert_eq!(got.source, "upstream");
    assert_eq!(g.holder.calls(), 0);
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), 0);
    assert_eq!(g.claims.claim(digest, "b"), "a", "a holds it now");
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_claimed_by_another_fetches_from_the_holder() {
    let g = gate(3, Err("unused"), Duration::from_secs(5));
    let digest = digest_coordinated_by_me("a", &IDS, true);
    assert_eq!(g.claims.claim(digest, "c"), "c");
    let got = g.gate.fetch(&blob(digest)).await.unwrap();
    assert_eq!(got.source, "peer");
    assert_eq!(g.holder.calls(), 4);
    assert_eq!(g.upstream.calls(), 0, "no second upstream download");
}

#[tokio::test]
async fn the_first_to_claim_elsewhere_goes_upstream_at_once() {
    let g = gate(0, Ok("a"), Duration::from_secs(5));
    let got = g
        .gate
        .fetch(&blob(digest_coordinated_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "upstream");
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), 1);
    assert_eq!(g.holder.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_later_claimant_waits_for_the_holder_to_start() {
    let g = gate(3, Ok("c"), Duration::from_secs(5));
    let got = g
        .gate
        .fetch(&blob(digest_coordinated_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "peer");
    assert_eq!(g.holder.calls(), 4);
    assert_eq!(g.upstream.calls(), 0, "no second upstream download");
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_never_serves_costs_at_most_the_wait() {
    let wait = Duration::from_millis(300);
    let g = gate(usize::MAX, Ok("c"), wait);
    let started = Instant::now();
    let got = g
        .gate
        .fetch(&blob(digest_coordinated_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "upstream");
    assert!(started.elapsed() <= wait);
    assert!(g.holder.calls() >= 2);
}

#[tokio::test]
async fn an_unanswered_claim_or_an_unknown_holder_fetches_at_once() {
    for remote in [Err("coordinator answered 503"), Ok("zz")] {
        let g = gate(0, remote, Duration::from_secs(5));
        let got = g
            .gate
            .fetch(&blob(digest_coordinated_by_me("a", &IDS, false)))
            .await
            .unwrap();
        assert_eq!(got.source, "upstream", "{remote:?}");
        assert_eq!(g.holder.calls(), 0, "{remote:?}");
    }
}

#[tokio::test]
async fn ranges_heads_peers_and_a_zero_wait_are_not_gated() {
    let digest = digest_coordinated_by_me("a", &IDS, false);
    let requests = [
        ObjectRequest {
            head: true,
            ..blob(digest)
        },
        ObjectRequest {
            range: Some(crate::oci::ByteRange::Suffix(10)),
            ..blob(digest)
        },
        ObjectRequest {
            mirrored: true,
            public_only: false,
            ..blob(digest)
        },
    ];
    let g = gate(0, Ok("c"), Duration::from_secs(5));
    for request in &requests {
        assert_eq!(g.gate.fetch(request).await.unwrap().source, "upstream");
    }
    let g = gate(0, Ok("c"), Duration::ZERO);
    assert_eq!(
        g.gate.fetch(&blob(digest)).await.unwrap().source,
        "upstream"
    );
    assert_eq!(g.holder.calls(), 0);
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), 0);
}

/// A mirror-mode request from this node's containerd (`?ns=r.test`).
fn mirror_blob(digest: Digest) -> ObjectRequest {
    ObjectRequest {
        origin: None,
        ..blob(digest)
    }
}

/// A peer asking this node (`X-Spegel-Mirrored`).
fn from_peer(digest: Digest) -> ObjectRequest {
    ObjectRequest {
        mirrored: true,
        ..mirror_blob(digest)
    }
}

/// Node "a" in mirror mode (its upstream never answers: containerd asks upstream itself),
/// with `store` as its containerd's ingests.
fn mirror_gate(
    holder_misses: usize,
    remote: Result<&str, &str>,
    wait: Duration,
    store: Arc<crate::store::memory::MemoryStore>,
) -> Gate {
    let mut g = gate(holder_misses, remote, wait);
    let upstream = Counted::new("upstream", usize::MAX);
    g.gate.upstream = upstream.clone();
    g.upstream = upstream;
    g.gate = g.gate.for_mirror(store);
    g
}

async fn read_all(object: Object) -> Vec<u8> {
    use futures::StreamExt as _;
    let mut body = object.body.into_body().expect("a body");
    let mut got = Vec::new();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.expect("no error"));
    }
    got
}

#[tokio::test]
async fn in_mirror_mode_the_holder_leaves_upstream_to_containerd_and_serves_its_download() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut writer = std::fs::File::create(&data).unwrap();
    writer.write_all(b"first half, ").unwrap();
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let digest = digest_coordinated_by_me("a", &IDS, true);
    store.set_growing(digest, data, 24);
    let g = mirror_gate(0, Err("unused"), Duration::from_secs(5), Arc::clone(&store));

    let mine = g.gate.fetch(&mirror_blob(digest)).await;
    assert!(matches!(mine, Err(SourceError::NotFound)), "{mine:?}");
    assert_eq!(g.holder.calls(), 0, "the holder asks nobody");
    assert_eq!(g.claims.claim(digest, "b"), "a", "a holds it now");

    let object = g.gate.fetch(&from_peer(digest)).await.unwrap();
    assert_eq!((object.size, object.range.clone()), (24, None));
    let reader = tokio::spawn(read_all(object));
    tokio::time::sleep(Duration::from_millis(30)).await;
    writer.write_all(b"second half!").unwrap();
    assert_eq!(reader.await.unwrap(), b"first half, second half!");

    let ranged = ObjectRequest {
        range: Some(crate::oci::ByteRange::From {
            start: 12,
            end: None,
        }),
        ..from_peer(digest)
    };
    let object = g.gate.fetch(&ranged).await.unwrap();
    assert_eq!(object.range, Some(12..=23));
    assert_eq!(read_all(object).await, b"second half!");
}

#[tokio::test]
async fn in_mirror_mode_a_download_this_node_does_not_hold_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"partial").unwrap();
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let digest = digest_coordinated_by_me("a", &IDS, true);
    store.set_growing(digest, data, 100);
    let g = mirror_gate(0, Err("unused"), Duration::from_secs(5), store);
    // Its containerd may be downloading it from a peer through this daemon: never served on.
    let got = g.gate.fetch(&from_peer(digest)).await;
    assert!(matches!(got, Err(SourceError::NotFound)), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn in_mirror_mode_a_download_with_nothing_written_is_served_only_while_it_starts() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut writer = std::fs::File::create(&data).unwrap();
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let digest = digest_coordinated_by_me("a", &IDS, true);
    store.set_growing(digest, data, 4);
    let g = mirror_gate(0, Err("unused"), Duration::from_secs(5), store);
    assert!(g.gate.fetch(&mirror_blob(digest)).await.is_err());
    // Just claimed: containerd's first bytes are on their way.
    let object = g.gate.fetch(&from_peer(digest)).await.unwrap();
    writer.write_all(b"blob").unwrap();
    assert_eq!(read_all(object).await, b"blob");
    // A download that wrote nothing since its claim long ago never started.
    std::fs::File::create(dir.path().join("data")).unwrap();
    tokio::time::advance(STARTING).await;
    let got = g.gate.fetch(&from_peer(digest)).await;
    assert!(matches!(got, Err(SourceError::NotFound)), "{got:?}");
}

#[tokio::test(start_paused = true)]
async fn in_mirror_mode_a_later_claimant_gets_the_blob_from_its_holder() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let g = mirror_gate(2, Ok("c"), Duration::from_secs(5), store);
    let got = g
        .gate
        .fetch(&mirror_blob(digest_coordinated_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "peer");
    assert_eq!(g.holder.calls(), 3);
    assert_eq!(g.upstream.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn in_mirror_mode_a_holder_that_never_serves_leaves_the_blob_to_containerd() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let wait = Duration::from_millis(300);
    let g = mirror_gate(usize::MAX, Ok("c"), wait, store);
    let started = Instant::now();
    let got = g
        .gate
        .fetch(&mirror_blob(digest_coordinated_by_me("a", &IDS, false)))
        .await;
    assert!(matches!(got, Err(SourceError::NotFound)), "{got:?}");
    assert!(started.elapsed() <= wait);
    assert!(g.holder.calls() >= 2);
}

#[tokio::test]
async fn in_mirror_mode_intercepted_and_nameless_requests_are_not_gated() {
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    let g = mirror_gate(0, Ok("c"), Duration::from_secs(5), store);
    let digest = digest_coordinated_by_me("a", &IDS, false);
    for request in [
        blob(digest),
        ObjectRequest {
            registry: None,
            ..mirror_blob(digest)
        },
    ] {
        assert!(g.gate.fetch(&request).await.is_err());
    }
    assert_eq!(g.holder.calls(), 0);
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), 0);
}

/// A containerd whose download of `digest` (100 bytes) has written 10 so far, in a directory
/// that lives as long as the first value.
fn downloading(digest: Digest) -> (tempfile::TempDir, Arc<crate::store::memory::MemoryStore>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"some of it").unwrap();
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    store.set_growing(digest, data, 100);
    (dir, store)
}

#[tokio::test(start_paused = true)]
async fn in_mirror_mode_a_holder_renews_its_claim_while_its_download_runs() {
    // Coordinated elsewhere; the coordinator names this node ("a") the holder.
    let digest = digest_coordinated_by_me("a", &IDS, false);
    let (_dir, store) = downloading(digest);
    let g = mirror_gate(0, Ok("a"), Duration::from_secs(5), Arc::clone(&store));
    assert!(g.gate.fetch(&mirror_blob(digest)).await.is_err());
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), 1);
    // A download longer than a claim lives: renewed, and still served to peers.
    tokio::time::sleep(CLAIM_TTL * 2).await;
    let renewals = g.coordinator.calls.load(Ordering::SeqCst) - 1;
    assert!(renewals >= 5, "{renewals} renewals in {:?}", CLAIM_TTL * 2);
    let object = g.gate.fetch(&from_peer(digest)).await.unwrap();
    assert_eq!(object.size, 100);
    // Its download ends (containerd commits or drops the ingest): no more renewals.
    crate::store::Ingests::discard(store.as_ref(), &digest)
        .await
        .unwrap();
    tokio::time::sleep(RENEW * 2).await;
    let calls = g.coordinator.calls.load(Ordering::SeqCst);
    tokio::time::sleep(RENEW * 3).await;
    assert_eq!(g.coordinator.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test(start_paused = true)]
async fn a_holder_stops_renewing_when_another_node_holds_the_blob() {
    // This node coordinates: its own claims say who holds.
    let digest = digest_coordinated_by_me("a", &IDS, true);
    let (_dir, store) = downloading(digest);
    let g = mirror_gate(0, Err("unused"), Duration::from_secs(5), Arc::clone(&store));
    assert!(g.gate.fetch(&mirror_blob(digest)).await.is_err());
    tokio::time::sleep(CLAIM_TTL * 2).await;
    assert_eq!(g.claims.claim(digest, "b"), "a", "renewed at itself");
    // Its claim taken over (it lapsed while, say, the node was paused): it stops renewing.
    g.claims.held.lock().unwrap().entries.clear();
    assert_eq!(g.claims.claim(digest, "b"), "b");
    tokio::time::sleep(RENEW * 2).await;
    assert_eq!(g.claims.claim(digest, "c"), "b");
    assert!(g.gate.renewing.lock().unwrap().is_empty());
}

/// Answers with a body of `chunks` one-byte chunks, `every` apart.
struct Slow {
    chunks: usize,
    every: Duration,
}

#[async_trait::async_trait]
impl Source for Slow {
    async fn fetch(&self, _: &ObjectRequest) -> Result<Object, SourceError> {
        let (chunks, every) = (self.chunks, self.every);
        let body = futures::stream::unfold(0, move |sent| async move {
            if sent == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(bytes::Bytes::from_static(b"x")), sent + 1))
        });
        Ok(Object {
            digest: Digest::of(b""),
            media_type: "x".into(),
            size: chunks as u64,
            range: None,
            body: Payload::Stream(Box::pin(body)),
            source: "peer",
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_stays_named_while_its_blob_arrives() {
    let router = Arc::new(Members {
        me: "a",
        others: vec![peer("b"), peer("c"), peer("d")],
    });
    let upstream = Counted::new("upstream", 0);
    let shared = crate::body::shared::SharedFetch::new(upstream.clone(), None);
    let claims = Arc::new(Claims::new("a".into(), shared.in_flight()));
    let coordinator = Arc::new(Coordinator {
        holder: Ok("c".into()),
        calls: AtomicUsize::new(0),
    });
    let holders = Arc::new(HolderRouter::new(router));
    // A long transfer from the holder: 8 chunks 5 s apart, 40 s in all.
    let from_holder = Arc::new(Slow {
        chunks: 8,
        every: Duration::from_secs(5),
    });
    let gate = BurstGate::new(
        upstream.clone(),
        shared.in_flight(),
        (from_holder, Arc::clone(&holders)),
        (claims, coordinator),
        Duration::from_secs(5),
    );
    let digest = digest_coordinated_by_me("a", &IDS, false);
    let object = gate.fetch(&blob(digest)).await.unwrap();
    assert_eq!(object.source, "peer");
    assert_eq!(read_all(object).await.len(), 8);
    assert_eq!(upstream.calls(), 0);
    // Past CLAIM_TTL since the holder was learnt: still the one a resume would ask.
    let named = || holders.get(&digest.to_string()).map(|peer| peer.id);
    assert_eq!(named(), Some("c".to_owned()));
    // Once nothing arrives from it, the record lapses as before.
    tokio::time::sleep(CLAIM_TTL).await;
    assert_eq!(named(), None);
}
