//! The order in which sources answer a request.
//!
//! - **Digests**: local containerd, then peers, then upstream (upstream answers only intercepted
//!   requests): the bytes are verified against the digest, so whoever has them may answer.
//! - **Tags** are only as good as whoever resolves them, so peers answer a tag only when upstream
//!   cannot be reached, never before asking it, and the peers' own tag filters still apply
//!   (`--tag-filters`: such tags never come from peers). Every tag answered in upstream's place
//!   is logged and counted by source ([`TagStats`]).
//!   - Intercepted (transparent mode): upstream first (or, with `--tag-upstream-first=false`,
//!     this node's own store first, then upstream); on a connection failure, timeout, server
//!     error or rate limiting, this node's store, then peers; if nobody has it, upstream's own
//!     answer. 401, 403 and 404 are answers and go back as they are. While that upstream is
//!     backing off after a failure (its `Retry-After`, or a short default: see [`Backoff`]), it
//!     counts as unreachable: store and peers first, upstream only when they have nothing.
//!   - Mirror mode (containerd asks with `?ns=`): the registry is probed ([`Reachability`]). If
//!     it accepts connections the answer is 404 and containerd asks it itself; if not, this
//!     node's store, then peers.
//!   - A peer asking (`X-Spegel-Mirrored`): this node's own store only; the asking node has
//!     already found upstream unreachable.
//!
//! Every intercepted request sent upstream is counted by why ([`FallbackStats`]): the reason
//! the peers noted (`source::miss`), or `tag` for tags upstream answers first.
use std::sync::{Arc, atomic::Ordering};

use super::fallback::{self, CountedUpstream, NotingPeers};
use crate::{
    metrics::{FallbackReason, FallbackStats, TagStats},
    oci::Reference,
    source::{Chain, Object, ObjectRequest, Origin, Source, SourceError, miss},
    upstream::{Backoff, Reachability},
};

/// Tries sources in the order a request needs.
pub struct ServePolicy {
    local: Arc<dyn Source>,
    peers: Arc<dyn Source>,
    upstream: Option<Arc<dyn Source>>,
    by_digest: Chain,
    /// Intercepted tags: upstream before this node's store.
    tags_upstream_first: bool,
    /// Which upstreams are resting; `None`: never skip upstream.
    backoff: Option<Arc<Backoff>>,
    reachability: Arc<Reachability>,
    stats: Arc<TagStats>,
    fallbacks: Arc<FallbackStats>,
}

impl ServePolicy {
    /// `local`, then `peers`, then `upstream` (which answers only intercepted requests) for
    /// digests; tags as the module docs say. `tags_upstream_first`: intercepted tags ask
    /// upstream before `local`.
    pub fn new(
        local: Arc<dyn Source>,
        peers: Arc<dyn Source>,
        upstream: Option<Arc<dyn Source>>,
        tags_upstream_first: bool,
    ) -> Self {
        let peers: Arc<dyn Source> = Arc::new(NotingPeers(peers));
        let fallbacks = Arc::new(FallbackStats::default());
        Self {
            by_digest: digest_chain(&local, &peers, upstream.as_ref(), &fallbacks),
            local,
            peers,
            upstream,
            tags_upstream_first,
            backoff: None,
            reachability: Arc::new(Reachability::default()),
            stats: Arc::default(),
            fallbacks,
        }
    }

    /// Count why requests were sent upstream into `stats` (for `/metrics`).
    pub fn with_fallback_stats(mut self, stats: Arc<FallbackStats>) -> Self {
        self.by_digest = digest_chain(&self.local, &self.peers, self.upstream.as_ref(), &stats);
        self.fallbacks = stats;
        self
    }

    /// Skips upstream for intercepted tags while `backoff` says it is resting (the upstream
    /// source notes its failures there).
    pub fn with_backoff(mut self, backoff: Arc<Backoff>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Probe mirror-mode registries with `reachability`.
    pub fn with_reachability(mut self, reachability: Arc<Reachability>) -> Self {
        self.reachability = reachability;
        self
    }

    /// Count tags answered in upstream's place into `stats` (for `/metrics`).
    pub fn with_tag_stats(mut self, stats: Arc<TagStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The tag counters.
    pub fn tag_stats(&self) -> Arc<TagStats> {
        Arc::clone(&self.stats)
    }

    /// This node's store, then peers, for a tag upstream could not answer (`why`); logged and
    /// counted by who answered.
    async fn in_upstreams_place(
        &self,
        request: &ObjectRequest,
        why: &str,
    ) -> Result<Object, SourceError> {
        let (object, counter) = match self.local.fetch(request).await {
            Ok(object) => (object, &self.stats.from_local),
            Err(_) => (self.peers.fetch(request).await?, &self.stats.from_peers),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            registry = request.registry.as_deref().unwrap_or_default(),
            repository = %request.repository,
            reference = ?request.reference,
            digest = %object.digest,
            source = object.source,
            why,
            "tag answered in upstream's place"
        );
        Ok(object)
    }

    /// A tag on an intercepted connection.
    async fn intercepted_tag(
        &self,
        request: &ObjectRequest,
        origin: &Origin,
        upstream: &Arc<dyn Source>,
    ) -> Result<Object, SourceError> {
        let resting = self
            .backoff
            .as_ref()
            .and_then(|backoff| backoff.remaining(origin));
        if let Some(remaining) = resting {
            return match self
                .in_upstreams_place(request, "upstream is backing off")
                .await
            {
                Ok(object) => Ok(object),
                // Nobody here has it: upstream after all, and its answer as it is.
                Err(err) => {
                    tracing::debug!(host = %origin.host, repository = %request.repository, ?remaining, %err, "upstream is backing off, but nobody else has the tag");
                    self.fallbacks.count(fallback::peers_reason());
                    upstream.fetch(request).await
                }
            };
        }
        if !self.tags_upstream_first
            && let Ok(object) = self.local.fetch(request).await
        {
            return Ok(object);
        }
        self.fallbacks.count(FallbackReason::Tag);
        match upstream.fetch(request).await {
            // Upstream is down or slow: what this node or a peer knows beats failing the pull.
            Err(SourceError::Unavailable(reason)) => {
                self.in_upstreams_place(request, &format!("upstream unreachable: {reason}"))
                    .await
            }
            // Upstream answered, but with a failure of its own (5xx, rate limited): same as
            // down. If nobody here has the tag either, the client sees upstream's answer
            // (with its `Retry-After`), not ours.
            Err(SourceError::Upstream {
                status,
                headers,
                body,
            }) if upstream_failed(status) => self
                .in_upstreams_place(request, &format!("upstream answered {status}"))
                .await
                .map_err(|_| SourceError::Upstream {
                    status,
                    headers,
                    body,
                }),
            other => other,
        }
    }

    /// A tag asked for by this node's containerd in mirror mode.
    async fn mirror_tag(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let Some(registry) = request.registry.as_deref() else {
            return Err(SourceError::NotFound);
        };
        if self.reachability.reachable(registry).await {
            self.stats.left_to_upstream.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%registry, repository = %request.repository, "upstream reachable: the tag is left to it");
            return Err(SourceError::NotFound);
        }
        self.in_upstreams_place(request, "upstream unreachable")
            .await
    }
}

#[async_trait::async_trait]
impl Source for ServePolicy {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        // The peers note why they missed in this request's own slot.
        miss::scope(self.route(request)).await
    }
}

impl ServePolicy {
    async fn route(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        if !matches!(request.reference, Reference::Tag(_)) {
            return self.by_digest.fetch(request).await;
        }
        match (&request.origin, &self.upstream) {
            (Some(origin), Some(upstream)) => self.intercepted_tag(request, origin, upstream).await,
            (Some(_), None) => self.by_digest.fetch(request).await,
            (None, _) if request.mirrored => self.local.fetch(request).await,
            (None, _) => self.mirror_tag(request).await,
        }
    }
}

/// Digests: `local`, then `peers`, then `upstream` (counting why it was asked into `stats`).
fn digest_chain(
    local: &Arc<dyn Source>,
    peers: &Arc<dyn Source>,
    upstream: Option<&Arc<dyn Source>>,
    stats: &Arc<FallbackStats>,
) -> Chain {
    let mut chain = vec![Arc::clone(local), Arc::clone(peers)];
    chain.extend(upstream.map(|upstream| -> Arc<dyn Source> {
        Arc::new(CountedUpstream {
            upstream: Arc::clone(upstream),
            stats: Arc::clone(stats),
        })
    }));
    Chain::new(chain)
}

/// Whether an upstream's answer means it failed rather than answered: a server error or rate
/// limiting. 401, 403 and 404 are answers and go back to the client as they are.
fn upstream_failed(status: http::StatusCode) -> bool {
    status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderMap;

    use super::*;
    use crate::{
        oci::{Kind, digest::Digest},
        source::Payload,
    };

    /// Answers with its name, or the configured error; counts calls.
    struct Named {
        name: &'static str,
        fail: Option<fn() -> SourceError>,
        calls: AtomicUsize,
    }

    impl Named {
        fn ok(name: &'static str) -> Arc<Self> {
            Arc::new(Self {
                name,
                fail: None,
                calls: AtomicUsize::new(0),
            })
        }
        fn failing(name: &'static str, fail: fn() -> SourceError) -> Arc<Self> {
            Arc::new(Self {
                name,
                fail: Some(fail),
                calls: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait::async_trait]
    impl Source for Named {
        async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(fail) = self.fail {
                return Err(fail());
            }
            Ok(Object {
                digest: Digest::of(self.name.as_bytes()),
                media_type: "x".into(),
                size: 0,
                range: None,
                body: Payload::Empty,
                source: self.name,
            })
        }
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
            origin: intercepted.then(|| crate::source::Origin {
                addr: ([10, 0, 0, 1], 443).into(),
                host: "r.test".into(),
                tls: true,
            }),
            mirrored: false,
            public_only: false,
        }
    }

    fn tag() -> Reference {
        Reference::Tag("v1".into())
    }

    #[tokio::test]
    async fn digests_prefer_local() {
        let (local, peers, upstream) =
            (Named::ok("local"), Named::ok("peer"), Named::ok("upstream"));
        let policy = ServePolicy::new(local.clone(), peers.clone(), Some(upstream.clone()), true);
        let got = policy
            .fetch(&request(Reference::Digest(Digest::of(b"d")), true))
            .await
            .unwrap();
        assert_eq!(got.source, "local");
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn intercepted_tags_ask_upstream_first() {
        let (local, peers, upstream) =
            (Named::ok("local"), Named::ok("peer"), Named::ok("upstream"));
        let policy = ServePolicy::new(local.clone(), peers, Some(upstream), true);
        assert_eq!(
            policy.fetch(&request(tag(), true)).await.unwrap().source,
            "upstream"
        );
        assert_eq!(local.calls.load(Ordering::SeqCst), 0);
        // Mirror mode (no origin) keeps Spegel's order.
        assert_eq!(
            policy.fetch(&request(tag(), false)).await.unwrap().source,
            "local"
        );
    }

    #[tokio::test]
    async fn tags_fall_back_when_upstream_is_down_but_not_on_its_answers() {
        let local = Named::failing("local", || SourceError::NotFound);
        let peers = Named::ok("peer");
        let down = Named::failing("upstream", || SourceError::Unavailable("timeout".into()));
        let policy = ServePolicy::new(local.clone(), peers.clone(), Some(down), true);
        assert_eq!(
            policy.fetch(&request(tag(), true)).await.unwrap().source,
            "peer"
        );

        let denied = Named::failing("upstream", || SourceError::Upstream {
            status: http::StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: bytes::Bytes::new(),
        });
        let policy = ServePolicy::new(local, peers.clone(), Some(denied), true);
        let before = peers.calls.load(Ordering::SeqCst);
        assert!(matches!(
            policy.fetch(&request(tag(), true)).await,
            Err(SourceError::Upstream { .. })
        ));
        assert_eq!(
            peers.calls.load(Ordering::SeqCst),
            before,
            "a 401 challenge must reach the client"
        );
    }

    #[tokio::test]
    async fn tags_fall_back_when_upstream_fails_with_5xx_or_429() {
        fn answer(status: http::StatusCode) -> SourceError {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("7"),
            );
            SourceError::Upstream {
                status,
                headers,
                body: bytes::Bytes::from_static(b"busy"),
            }
        }
        let unavailable = || answer(http::StatusCode::SERVICE_UNAVAILABLE);
        let limited = || answer(http::StatusCode::TOO_MANY_REQUESTS);
        let failing: [fn() -> SourceError; 2] = [unavailable, limited];
        for fail in failing {
            let SourceError::Upstream { status, .. } = fail() else {
                unreachable!("every case is an upstream answer")
            };
            let local = Named::failing("local", || SourceError::NotFound);
            let peers = Named::ok("peer");
            let upstream = Named::failing("upstream", fail);
            let policy = ServePolicy::new(local.clone(), peers.clone(), Some(upstream), true);
            let object = policy.fetch(&request(tag(), true)).await.unwrap();
            assert_eq!(object.source, "peer", "{status}: the peers' answer");

            // Nobody here has it: the client sees upstream's own answer, Retry-After included.
            let nobody = Named::failing("peer", || SourceError::NotFound);
            let upstream = Named::failing("upstream", fail);
            let policy = ServePolicy::new(local, nobody, Some(upstream), true);
            match policy.fetch(&request(tag(), true)).await {
                Err(SourceError::Upstream {
                    status: got,
                    headers,
                    body,
                }) => {
                    assert_eq!(got, status);
                    assert_eq!(headers[http::header::RETRY_AFTER], "7");
                    assert_eq!(&body[..], b"busy");
                }
                other => panic!("{status}: expected upstream's answer, got {other:?}"),
            }
        }
    }

    #[test]
    fn which_upstream_answers_are_failures() {
        use http::StatusCode;
        for (status, failed) in [
            (StatusCode::INTERNAL_SERVER_ERROR, true),
            (StatusCode::BAD_GATEWAY, true),
            (StatusCode::SERVICE_UNAVAILABLE, true),
            (StatusCode::GATEWAY_TIMEOUT, true),
            (StatusCode::TOO_MANY_REQUESTS, true),
            (StatusCode::UNAUTHORIZED, false),
            (StatusCode::FORBIDDEN, false),
            (StatusCode::NOT_FOUND, false),
            (StatusCode::BAD_REQUEST, false),
        ] {
            assert_eq!(upstream_failed(status), failed, "{status}");
        }
    }

    #[tokio::test]
    async fn while_upstream_backs_off_tags_ask_local_and_peers_first() {
        let backoff = Arc::new(Backoff::new(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(60),
        ));
        let req = request(tag(), true);
        let origin = req.origin.clone().unwrap();
        let (local, peers, upstream) = (
            Named::failing("local", || SourceError::NotFound),
            Named::ok("peer"),
            Named::ok("upstream"),
        );
        let policy = ServePolicy::new(local, peers.clone(), Some(upstream.clone()), true)
            .with_backoff(Arc::clone(&backoff));
        assert_eq!(policy.fetch(&req).await.unwrap().source, "upstream");
        assert_eq!(peers.calls.load(Ordering::SeqCst), 0, "not backing off yet");

        // The upstream source noted a failure (e.g. a 503 with Retry-After).
        backoff.failed(&origin, Some(std::time::Duration::from_secs(30)));
        assert_eq!(policy.fetch(&req).await.unwrap().source, "peer");
        assert_eq!(
            upstream.calls.load(Ordering::SeqCst),
            1,
            "skipped while backing off"
        );
        // Digests were never upstream-first: unchanged.
        let by_digest = request(Reference::Digest(Digest::of(b"d")), true);
        assert_eq!(policy.fetch(&by_digest).await.unwrap().source, "peer");

        // Nobody here has the tag: upstream after all, whatever the backoff says.
        let nobody = Named::failing("peer", || SourceError::NotFound);
        let upstream = Named::ok("upstream");
        let policy = ServePolicy::new(
            Named::failing("local", || SourceError::NotFound),
            nobody.clone(),
            Some(upstream.clone()),
            true,
        )
        .with_backoff(Arc::clone(&backoff));
        assert_eq!(policy.fetch(&req).await.unwrap().source, "upstream");
        assert_eq!(nobody.calls.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);

        // Another registry is not backing off.
        let mut other = request(tag(), true);
        other.origin.as_mut().unwrap().host = "other.test".into();
        assert_eq!(policy.fetch(&other).await.unwrap().source, "upstream");
        assert_eq!(nobody.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn local_first_tags_still_ask_upstream_before_peers() {
        let (local, peers, upstream) =
            (Named::ok("local"), Named::ok("peer"), Named::ok("upstream"));
        let policy = ServePolicy::new(local, peers.clone(), Some(upstream.clone()), false);
        assert_eq!(
            policy.fetch(&request(tag(), true)).await.unwrap().source,
            "local"
        );
        let nobody = Named::failing("local", || SourceError::NotFound);
        let policy = ServePolicy::new(nobody, peers.clone(), Some(upstream), false);
        assert_eq!(
            policy.fetch(&request(tag(), true)).await.unwrap().source,
            "upstream"
        );
        assert_eq!(peers.calls.load(Ordering::SeqCst), 0);
    }

    fn mirror_policy(reachable: bool, local: Arc<Named>, peers: Arc<Named>) -> ServePolicy {
        ServePolicy::new(local, peers, None, true)
            .with_reachability(Arc::new(Reachability::fixed(reachable)))
    }

    #[tokio::test]
    async fn mirror_tags_are_left_to_a_reachable_upstream() {
        let (local, peers) = (Named::ok("local"), Named::ok("peer"));
        let policy = mirror_policy(true, local.clone(), peers.clone());
        let err = policy.fetch(&request(tag(), false)).await.unwrap_err();
        assert!(matches!(err, SourceError::NotFound), "{err}");
        assert_eq!(local.calls.load(Ordering::SeqCst), 0);
        assert_eq!(peers.calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            policy.tag_stats().left_to_upstream.load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn mirror_tags_come_from_store_then_peers_when_upstream_is_unreachable() {
        let nobody = Named::failing("local", || SourceError::NotFound);
        let peers = Named::ok("peer");
        let policy = mirror_policy(false, nobody, peers.clone());
        let object = policy.fetch(&request(tag(), false)).await.unwrap();
        assert_eq!(object.source, "peer");
        assert_eq!(policy.tag_stats().from_peers.load(Ordering::Relaxed), 1);
        let policy = mirror_policy(false, Named::ok("local"), peers);
        assert_eq!(
            policy.fetch(&request(tag(), false)).await.unwrap().source,
            "local"
        );
        assert_eq!(policy.tag_stats().from_local.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_peer_asking_for_a_tag_gets_this_nodes_store_only() {
        let (local, peers) = (
            Named::failing("local", || SourceError::NotFound),
            Named::ok("peer"),
        );
        let policy = mirror_policy(false, local, peers.clone());
        let mut asked = request(tag(), false);
        asked.mirrored = true;
        assert!(matches!(
            policy.fetch(&asked).await,
            Err(SourceError::NotFound)
        ));
        assert_eq!(peers.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn digests_in_mirror_mode_ignore_reachability() {
        let (local, peers) = (
            Named::failing("local", || SourceError::NotFound),
            Named::ok("peer"),
        );
        let policy = mirror_policy(true, local, peers);
        let digest = request(Reference::Digest(Digest::of(b"d")), false);
        assert_eq!(policy.fetch(&digest).await.unwrap().source, "peer");
    }
}
