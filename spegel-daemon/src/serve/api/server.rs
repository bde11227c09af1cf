//! The HTTP server: HTTP/1.1 and h2c on one port, a bounded number of connections (in all and
//! per client IP), idle connections closed, graceful shutdown; and the entry point for
//! connections the interception layer accepted itself.
use std::{convert::Infallible, sync::Arc, time::Duration};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulConnection},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    BoxError, HttpBody, Registry, RequestContext,
    bounds::{Activity, Tracked},
};

/// How long a client may take to send a request's headers before its connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to back off after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// The connection builder every connection uses.
pub(super) fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Serve `registry` on `listener` until `shutdown` is cancelled, then stop accepting and wait
/// for in-flight requests to finish. The caller bounds that wait (the daemon's grace period);
/// connections still open when the runtime stops are cut. A client IP already holding its share
/// of connections has further ones closed at once; a connection with no request in flight for
/// the idle timeout is closed.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(registry.max_connections.get()));
    let connections = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            max_connections = registry.max_connections.get(),
            max_connections_per_client = registry.max_connections_per_client.get(),
            idle_timeout = %humantime::format_duration(registry.idle_timeout),
            "registry API listening"
        );
    }
    loop {
        // Take a connection slot before accepting, so that a full server leaves new clients in
        // the listen backlog instead of accepting and starving them.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "cannot accept a registry connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    }
                }
            },
        };
        let Some(slot) = registry.client_slots.take(peer.ip()) else {
            tracing::debug!(
                %peer,
                max = registry.max_connections_per_client.get(),
                refused = registry.client_slots.refused(),
                "registry connection refused: the client holds its share of connections"
            );
            drop(stream);
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "cannot set TCP_NODELAY");
        }
        let activity = Activity::new();
        let connection = registry.tracked_connection(
            stream,
            RequestContext::default(),
            Some(Arc::clone(&activity)),
        );
        let (idle, shutdown) = (registry.idle_timeout, shutdown.clone());
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = activity.idle_for(idle) => {
                    tracing::debug!(%peer, "registry connection idle, closing");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, err = %err, "registry connection ended with an error");
            }
            drop((slot, permit));
        });
    }
    drop(listener);
    connections.close();
    tracing::info!(connections = connections.len(), "registry API draining");
    connections.wait().await;
    tracing::info!("registry API stopped");
}

impl Registry {
    /// Serve one already-accepted connection (e.g. TLS-terminated by the interception layer)
    /// with `ctx` for every request on it, until the client closes it or `shutdown` is cancelled,
    /// after which in-flight requests finish and the connection closes.
    pub async fn serve_connection<I>(
        self: &Arc<Self>,
        io: I,
        ctx: RequestContext,
        shutdown: CancellationToken,
    ) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut connection = std::pin::pin!(self.connection(io, ctx));
        tokio::select! {
            result = connection.as_mut() => return result,
            () = shutdown.cancelled() => {}
        }
        connection.as_mut().graceful_shutdown();
        connection.await
    }

    /// One connection as a future, for callers that track connections with their own hyper-util
    /// [`GracefulShutdown`](hyper_util::server::graceful::GracefulShutdown).
    pub fn connection<I>(
        self: &Arc<Self>,
        io: I,
        ctx: RequestContext,
    ) -> impl GracefulConnection<Error = BoxError> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.tracked_connection(io, ctx, None)
    }

    /// One connection as a future; with `activity`, each request counts as in flight there
    /// from its head until its response body is sent or dropped.
    fn tracked_connection<I>(
        self: &Arc<Self>,
        io: I,
        ctx: RequestContext,
        activity: Option<Arc<Activity>>,
    ) -> impl GracefulConnection<Error = BoxError> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let registry = Arc::clone(self);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let registry = Arc::clone(&registry);
            let ctx = ctx.clone();
            let in_flight = activity.as_ref().map(Activity::begin);
            async move {
                let response = registry.handle(request, ctx).await;
                Ok::<_, Infallible>(match in_flight {
                    Some(in_flight) => {
                        response.map(|body| HttpBody::new(Tracked::new(body, in_flight)))
                    }
                    None => response,
                })
            }
        });
        self.builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned()
    }
}
