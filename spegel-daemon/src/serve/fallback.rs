//! Counting why requests end at upstream: the peer source wrapped so that its failures always
//! leave a reason (`source::miss`), and upstream wrapped so that each request it is asked for
//! counts the reason noted so far ([`FallbackStats`]).
use std::sync::Arc;

use crate::{
    metrics::{FallbackReason, FallbackStats},
    source::{
        Object, ObjectRequest, Source, SourceError,
        miss::{self, PeerMiss},
    },
};

/// The peers, noting `PeersFailed` when they fail without saying why (a peer blob that failed
/// verification or could not be buffered).
pub(super) struct NotingPeers(pub(super) Arc<dyn Source>);

#[async_trait::async_trait]
impl Source for NotingPeers {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let result = self.0.fetch(request).await;
        if matches!(result, Err(SourceError::Unavailable(_))) && miss::noted().is_none() {
            miss::note(PeerMiss::PeersFailed);
        }
        result
    }
}

/// Upstream as the last source for digests: counts why an intercepted request got this far.
pub(super) struct CountedUpstream {
    pub(super) upstream: Arc<dyn Source>,
    pub(super) stats: Arc<FallbackStats>,
}

#[async_trait::async_trait]
impl Source for CountedUpstream {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        // Upstream answers intercepted requests only; the others are a miss, not a fallback.
        if request.origin.is_some() {
            self.stats.count(peers_reason());
        }
        self.upstream.fetch(request).await
    }
}

/// Why the peers did not serve the current request, as a fallback reason.
pub(super) fn peers_reason() -> FallbackReason {
    miss::noted().map_or(FallbackReason::Unknown, FallbackReason::Peers)
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::{
        oci::{Kind, Reference, digest::Digest},
        serve::policy::ServePolicy,
        source::{Origin, Payload},
    };

    /// Misses, noting `why` (if any), or fails with `Unavailable`.
    struct Missing {
        why: Option<PeerMiss>,
        unavailable: bool,
    }

    #[async_trait::async_trait]
    impl Source for Missing {
        async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
            if let Some(why) = self.why {
                miss::note(why);
            }
            match self.unavailable {
                true => Err(SourceError::Unavailable("verification failed".into())),
                false => Err(SourceError::NotFound),
            }
        }
    }

    struct Upstream;

    #[async_trait::async_trait]
    impl Source for Upstream {
        async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
            Ok(Object {
                digest: Digest::of(b"x"),
                media_type: "x".into(),
                size: 0,
                range: None,
                body: Payload::Empty,
                source: "upstream",
            })
        }
    }

    fn policy(peers: Missing) -> (ServePolicy, Arc<FallbackStats>) {
        let stats = Arc::new(FallbackStats::default());
        let local = Arc::new(Missing {
            why: None,
            unavailable: false,
        });
        let policy = ServePolicy::new(local, Arc::new(peers), Some(Arc::new(Upstream)), true)
            .with_fallback_stats(Arc::clone(&stats));
        (policy, stats)
    }

    fn request(reference: Reference, intercepted: bool) -> ObjectRequest {
        ObjectRequest {
            kind: Kind::Manifest,
            registry: Some("r.test".into()),
            repository: "a/b".into(),
            reference,
            range: None,
            head: false,
            headers: HeaderMap::new(),
            origin: intercepted.then(|| Origin {
                addr: ([10, 0, 0, 1], 443).into(),
                host: "r.test".into(),
                tls: true,
            }),
            mirrored: false,
            public_only: false,
        }
    }

    fn digest() -> Reference {
        Reference::Digest(Digest::of(b"d"))
    }

    #[tokio::test]
    async fn digests_count_the_reason_the_peers_noted() {
        let (policy, stats) = policy(Missing {
            why: Some(PeerMiss::NoProviders),
            unavailable: false,
        });
        let got = policy.fetch(&request(digest(), true)).await.unwrap();
        assert_eq!(got.source, "upstream");
        assert_eq!(stats.get(FallbackReason::Peers(PeerMiss::NoProviders)), 1);
        assert_eq!(stats.get(FallbackReason::Unknown), 0);
    }

    #[tokio::test]
    async fn peers_failing_without_a_reason_count_as_failed() {
        let (policy, stats) = policy(Missing {
            why: None,
            unavailable: true,
        });
        policy.fetch(&request(digest(), true)).await.unwrap();
        assert_eq!(stats.get(FallbackReason::Peers(PeerMiss::PeersFailed)), 1);
    }

    #[tokio::test]
    async fn a_miss_without_a_note_is_unknown_and_notes_do_not_leak() {
        let (policy, stats) = policy(Missing {
            why: None,
            unavailable: false,
        });
        // A note made outside the request does not reach it.
        miss::scope(async {
            miss::note(PeerMiss::PeersTimeout);
            policy.fetch(&request(digest(), true)).await.unwrap();
        })
        .await;
        assert_eq!(stats.get(FallbackReason::Unknown), 1);
        assert_eq!(stats.get(FallbackReason::Peers(PeerMiss::PeersTimeout)), 0);
    }

    #[tokio::test]
    async fn intercepted_tags_count_as_tag_and_mirror_mode_counts_nothing() {
        let (policy, stats) = policy(Missing {
            why: Some(PeerMiss::NoProviders),
            unavailable: false,
        });
        policy
            .fetch(&request(Reference::Tag("v1".into()), true))
            .await
            .unwrap();
        assert_eq!(stats.get(FallbackReason::Tag), 1);
        // Not intercepted: upstream is not asked for real, so nothing went upstream.
        let _ = policy.fetch(&request(digest(), false)).await;
        assert_eq!(stats.get(FallbackReason::Peers(PeerMiss::NoProviders)), 0);
    }
}
