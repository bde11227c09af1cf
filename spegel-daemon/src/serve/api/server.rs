//! The HTTP server: HTTP/1.1 and h2c on one port, a bounded number of connections, graceful
//! shutdown; and the entry point for connections the interception layer accepted itself.
use std::{convert::Infallible, sync::Arc, time::Duration};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto::Builder,
        graceful::{GracefulConnection, GracefulShutdown},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

use super::{BoxError, Registry, RequestContext};

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
/// connections still open when the runtime stops are cut.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(registry.max_connections.get()));
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, max_connections = registry.max_connections.get(), "registry API listening");
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
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "cannot set TCP_NODELAY");
        }
        let connection = graceful.watch(registry.connection(stream, RequestContext::default()));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, err = %err, "registry connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "registry API draining");
    graceful.shutdown().await;
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
    /// [`GracefulShutdown`].
    pub fn connection<I>(
        self: &Arc<Self>,
        io: I,
        ctx: RequestContext,
    ) -> impl GracefulConnection<Error = BoxError> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let registry = Arc::clone(self);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let registry = Arc::clone(&registry);
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(registry.handle(request, ctx).await) }
        });
        self.builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned()
    }
}
