//! Transparent mode's glue: an intercepted connection to a mirrored registry is TLS-terminated
//! with a leaf from the node CA (or read as plain HTTP) and served by the registry API, with
//! everything that is not a pull passed through to the original upstream. A TLS connection to a
//! registry the CA containerd trusts does not cover (the mirrored list changed, the next CA is
//! not trusted yet) is not ours: it is spliced through untouched, never failed.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use http::{Request, Response};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    body::BoxBody as HttpBody,
    intercept::{InterceptStats, MirroredHandler, SpliceHandler, origin_registry},
    serve::api::{Caller, Passthrough, Registry, RequestContext, is_write_timeout},
    source::Origin,
    tls::{TlsTerminator, continuity::CaStats},
    upstream::UpstreamClient,
};

/// The registry name images use for the host an intercepted connection went to. Docker Hub is
/// reached as `registry-1.docker.io` (or `index.docker.io`) but its images are `docker.io/...`.
pub fn image_registry(origin: &Origin) -> String {
    let registry = origin_registry(origin);
    match registry.as_str() {
        "registry-1.docker.io" | "index.docker.io" => "docker.io".to_owned(),
        _ => registry,
    }
}

/// Passes non-pull requests through to the upstream the connection was headed for.
pub struct UpstreamPassthrough(pub UpstreamClient);

#[async_trait::async_trait]
impl Passthrough for UpstreamPassthrough {
    async fn forward(
        &self,
        request: Request<HttpBody>,
        origin: Option<&Origin>,
    ) -> Response<HttpBody> {
        self.0.forward_or_respond(origin, request).await
    }
}

/// Serves intercepted connections to mirrored registries with the registry API.
pub struct RegistryHandler {
    pub registry: Arc<Registry>,
    pub tls: TlsTerminator,
    pub passthrough: Arc<dyn Passthrough>,
    /// Dials the origin while containerd is still in its handshake with this daemon, so the
    /// connection's first request (a tag's `HEAD`, always asked upstream) does not wait for
    /// the upstream's TCP and TLS round trips ([`UpstreamClient::warm_up`]).
    pub upstream: UpstreamClient,
    pub shutdown: CancellationToken,
    /// Where TLS connections the trusted CA does not cover go: to their original destination,
    /// untouched (what the client sent first was only peeked at, so it is replayed as is).
    pub uncovered: SpliceHandler,
    /// Counts those connections (`spegel_ca_spliced_uncovered_total`).
    pub ca_stats: Arc<CaStats>,
    /// A served connection whose client reads nothing of what is written to it for this long
    /// is closed (`--intercept-write-timeout`), freeing what its response held. The listener
    /// also sets it as the socket's `TCP_USER_TIMEOUT`; this bound holds in user space too
    /// (a client whose window never quite closes, a kernel that ignores the option).
    pub write_timeout: Duration,
    /// Counts those (`spegel_intercept_write_timeouts_total`).
    pub intercept_stats: Arc<InterceptStats>,
}

#[async_trait::async_trait]
impl MirroredHandler for RegistryHandler {
    async fn handle(&self, stream: TcpStream, origin: Origin) {
        let ctx = RequestContext {
            // containerd on this node, redirected here.
            caller: Caller::Local,
            registry: Some(image_registry(&origin)),
            passthrough: Some(Arc::clone(&self.passthrough)),
            origin: Some(origin.clone()),
        };
        if origin.tls && !self.tls.covers(&origin.host) {
            self.ca_stats
                .spliced_uncovered
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                host = %origin.host,
                "the node CA containerd trusts does not cover this registry: passed through"
            );
            return self.uncovered.handle(stream, origin).await;
        }
        if self.upstream.warm_up(&origin) {
            tracing::debug!(host = %origin.host, "dialling the upstream ahead");
        }
        let result = if origin.tls {
            match self.tls.accept(stream, origin.addr).await {
                Ok(accepted) => {
                    tracing::debug!(host = %origin.host, alpn = ?accepted.alpn, "TLS terminated");
                    self.registry
                        .serve_connection(
                            accepted.stream,
                            ctx,
                            self.shutdown.clone(),
                            self.write_timeout,
                        )
                        .await
                }
                Err(error) => {
                    tracing::warn!(host = %origin.host, %error, "TLS handshake with containerd failed");
                    return;
                }
            }
        } else {
            self.registry
                .serve_connection(stream, ctx, self.shutdown.clone(), self.write_timeout)
                .await
        };
        match result {
            Err(error) if is_write_timeout(&*error) => {
                self.intercept_stats
                    .write_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(host = %origin.host, %error, "intercepted connection closed: the client stopped reading");
            }
            Err(error) => {
                tracing::debug!(host = %origin.host, %error, "intercepted connection ended with an error");
            }
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(host: &str, port: u16, tls: bool) -> Origin {
        Origin {
            addr: ([10, 0, 0, 1], port).into(),
            host: host.into(),
            tls,
        }
    }

    #[test]
    fn registry_names() {
        assert_eq!(
            image_registry(&origin("registry-1.docker.io", 443, true)),
            "docker.io"
        );
        assert_eq!(
            image_registry(&origin("index.docker.io", 443, true)),
            "docker.io"
        );
        assert_eq!(image_registry(&origin("ghcr.io", 443, true)), "ghcr.io");
        assert_eq!(
            image_registry(&origin("registry.test", 5443, true)),
            "registry.test:5443"
        );
        assert_eq!(
            image_registry(&origin("registry.test", 80, false)),
            "registry.test"
        );
        assert_eq!(
            image_registry(&origin("10.0.0.1", 5000, false)),
            "10.0.0.1:5000"
        );
    }
}
