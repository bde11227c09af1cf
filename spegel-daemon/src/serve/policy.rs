//! The order in which sources answer a request: local containerd, then peers, then upstream — except
//! manifests by tag on an intercepted connection, which ask upstream first (tags move) and fall
//! back to what this node and its peers know only when upstream fails, times out, answers with a
//! server error or rate-limits. While that upstream is backing off (its `Retry-After`, or a
//! short default after a failure: see [`Backoff`]), the next tag requests ask this node and its
//! peers first, and upstream only when they have nothing: backoff never fails a pull, and never
//! delays the request that met the failure.
use std::sync::Arc;

use crate::{
    oci::Reference,
    source::{Chain, Object, ObjectRequest, Source, SourceError},
    upstream::Backoff,
};

/// Tries sources in the order a request needs.
pub struct ServePolicy {
    by_digest: Chain,
    /// For tags on intercepted connections: `None` = same as digests.
    tags_upstream_first: Option<(Arc<dyn Source>, Chain)>,
    /// Which upstreams are resting; `None`: never skip upstream.
    backoff: Option<Arc<Backoff>>,
}

impl ServePolicy {
    /// `local`, then `peers`, then `upstream` (which answers only intercepted requests). With
    /// `tags_upstream_first`, an intercepted tag request goes to `upstream` first.
    pub fn new(
        local: Arc<dyn Source>,
        peers: Arc<dyn Source>,
        upstream: Option<Arc<dyn Source>>,
        tags_upstream_first: bool,
    ) -> Self {
        let mut chain = vec![Arc::clone(&local), Arc::clone(&peers)];
        chain.extend(upstream.clone());
        let tags_upstream_first = match upstream {
            Some(upstream) if tags_upstream_first => {
                Some((upstream, Chain::new(vec![local, peers])))
            }
            _ => None,
        };
        Self {
            by_digest: Chain::new(chain),
            tags_upstream_first,
            backoff: None,
        }
    }

    /// Skips upstream for intercepted tags while `backoff` says it is resting (the upstream
    /// source notes its failures there).
    pub fn with_backoff(mut self, backoff: Arc<Backoff>) -> Self {
        self.backoff = Some(backoff);
        self
    }
}

#[async_trait::async_trait]
impl Source for ServePolicy {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        if let (Reference::Tag(_), Some(origin), Some((upstream, fallback))) = (
            &request.reference,
            &request.origin,
            &self.tags_upstream_first,
        ) {
            let resting = self
                .backoff
                .as_ref()
                .and_then(|backoff| backoff.remaining(origin));
            if let Some(remaining) = resting {
                match fallback.fetch(request).await {
                    Ok(object) => {
                        tracing::info!(host = %origin.host, repository = %request.repository, ?remaining, "upstream is backing off; tag answered by local store or peers");
                        return Ok(object);
                    }
                    // Nobody here has it: upstream after all, and its answer as it is.
                    Err(err) => {
                        tracing::debug!(host = %origin.host, repository = %request.repository, %err, "upstream is backing off, but nobody else has the tag");
                        return upstream.fetch(request).await;
                    }
                }
            }
            return match upstream.fetch(request).await {
                // Upstream is down or slow: what this node or a peer knows beats failing the pull.
                Err(SourceError::Unavailable(reason)) => {
                    tracing::info!(%reason, repository = %request.repository, "upstream failed for a tag; asking local store and peers");
                    fallback.fetch(request).await
                }
                // Upstream answered, but with a failure of its own (5xx, rate limited): same as
                // down. If nobody here has the tag either, the client sees upstream's answer
                // (with its `Retry-After`), not ours.
                Err(SourceError::Upstream {
                    status,
                    headers,
                    body,
                }) if upstream_failed(status) => {
                    tracing::info!(%status, repository = %request.repository, "upstream failed for a tag; asking local store and peers");
                    fallback
                        .fetch(request)
                        .await
                        .map_err(|_| SourceError::Upstream {
                            status,
                            headers,
                            body,
                        })
                }
                other => other,
            };
        }
        self.by_digest.fetch(request).await
    }
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
    use crate::oci::{Kind, digest::Digest};

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
                body: None,
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
    async fn configurable_peer_first_tags() {
        let (local, peers, upstream) =
            (Named::ok("local"), Named::ok("peer"), Named::ok("upstream"));
        let policy = ServePolicy::new(local, peers, Some(upstream), false);
        assert_eq!(
            policy.fetch(&request(tag(), true)).await.unwrap().source,
            "local"
        );
    }
}
