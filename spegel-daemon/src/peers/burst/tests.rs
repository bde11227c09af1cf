//! The fetcher choice and the gate in front of upstream, with fake sources and members.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use http::HeaderMap;

use super::*;
use crate::source::Origin;

fn peer(id: &str) -> Peer {
    Peer {
        id: id.into(),
        addr: SocketAddr::from(([10, 0, 0, 1], 5000)),
    }
}

#[test]
fn every_node_picks_the_same_fetcher_and_blobs_spread() {
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
                fetcher(&digest, me, &others).map_or_else(|| me.to_string(), |p| p.id)
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
        fetcher(&Digest::of(b"x"), "a", &[]).is_none(),
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
            body: None,
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

/// A digest whose fetcher, seen from `me` among `ids`, is (`true`) or is not `me`.
fn digest_fetched_by_me(me: &str, ids: &[&str], mine: bool) -> Digest {
    let others: Vec<Peer> = ids
        .iter()
        .filter(|id| **id != me)
        .map(|id| peer(id))
        .collect();
    (0u32..)
        .map(|n| Digest::of(&n.to_le_bytes()))
        .find(|d| fetcher(d, me, &others).is_none() == mine)
        .unwrap()
}

struct Gate {
    gate: BurstGate,
    upstream: Arc<Counted>,
    fetcher: Arc<Counted>,
}

fn gate(fetcher_misses: usize, wait: Duration) -> Gate {
    let router = Arc::new(Members {
        me: "a",
        others: vec![peer("b"), peer("c"), peer("d")],
    });
    let upstream = Counted::new("upstream", 0);
    let fetcher = Counted::new("peer", fetcher_misses);
    let dir_spool = None;
    let shared = crate::body::shared::SharedFetch::new(upstream.clone(), dir_spool);
    let gate = BurstGate::new(
        upstream.clone(),
        shared.in_flight(),
        fetcher.clone(),
        Arc::new(FetcherRouter::new(router)),
        wait,
    );
    Gate {
        gate,
        upstream,
        fetcher,
    }
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

#[tokio::test]
async fn the_fetcher_goes_upstream_at_once() {
    let g = gate(0, Duration::from_secs(5));
    let got = g
        .gate
        .fetch(&blob(digest_fetched_by_me("a", &IDS, true)))
        .await
        .unwrap();
    assert_eq!(got.source, "upstream");
    assert_eq!(g.fetcher.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_others_wait_for_the_fetcher_to_start() {
    let g = gate(3, Duration::from_secs(5));
    let got = g
        .gate
        .fetch(&blob(digest_fetched_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "peer");
    assert_eq!(g.fetcher.calls(), 4);
    assert_eq!(g.upstream.calls(), 0, "no second upstream download");
}

#[tokio::test(start_paused = true)]
async fn a_fetcher_that_never_serves_costs_at_most_the_wait() {
    let wait = Duration::from_millis(300);
    let g = gate(usize::MAX, wait);
    let started = Instant::now();
    let got = g
        .gate
        .fetch(&blob(digest_fetched_by_me("a", &IDS, false)))
        .await
        .unwrap();
    assert_eq!(got.source, "upstream");
    assert!(started.elapsed() <= wait);
    assert!(g.fetcher.calls() >= 2);
}

#[tokio::test]
async fn ranges_heads_peers_and_a_zero_wait_are_not_gated() {
    let digest = digest_fetched_by_me("a", &IDS, false);
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
    let g = gate(0, Duration::from_secs(5));
    for request in &requests {
        assert_eq!(g.gate.fetch(request).await.unwrap().source, "upstream");
    }
    let g = gate(0, Duration::ZERO);
    assert_eq!(
        g.gate.fetch(&blob(digest)).await.unwrap().source,
        "upstream"
    );
    assert_eq!(g.fetcher.calls(), 0);
}
