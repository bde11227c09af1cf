//! The HTTP server: HTTP/1.1 and h2c on one port, a bounded number of connections (in all and
//! per client IP), idle connections and connections whose client stopped reading closed,
//! graceful shutdown; and the entry point for connections the interception layer accepted
//! itself.
use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulConnection},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    BoxError, Caller, HttpBody, Registry, RequestContext,
    bounds::{self, Activity, Tracked},
};
use crate::{membership::PeerAuth, metrics::ConnectionStats};

/// How long a client may take to send a request's headers unless told otherwise (the flag's
/// default too).
pub(super) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a response write may make no progress unless told otherwise (the flag's default
/// too): far longer than any healthy client pauses, short enough that a stalled one does not
/// hold its slot and its response for long.
pub(super) const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to back off after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// The connection builder every connection uses: HTTP/1.1 clients must send a request's
/// headers within `header_timeout`.
pub(super) fn builder(header_timeout: Duration) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
}

/// Serve `registry` on `listener` until `shutdown` is cancelled, then stop accepting and wait
/// for in-flight requests to finish. The caller bounds that wait (the daemon's grace period);
/// connections still open when the runtime stops are cut. A client IP already holding its share
/// of connections has further ones closed at once; a connection with no request in flight for
/// the idle timeout is closed, and so is one whose writes make no progress for the write
/// timeout (its client stopped reading).
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(registry.max_connections.get()));
    let connections = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            max_connections = registry.max_connections.get(),
            max_connections_per_client = registry.max_connections_per_client.get(),
            idle_timeout = %humantime::format_duration(registry.idle_timeout),
            write_timeout = %humantime::format_duration(registry.write_timeout),
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
            let refused = registry.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(
                %peer,
                max = registry.max_connections_per_client.get(),
                refused,
                "registry connection refused: the client holds its share of connections"
            );
            drop(stream);
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "cannot set TCP_NODELAY");
        }
        // A process on this node connects from loopback, or from the address it connects to.
        let local =
            peer.ip().is_loopback() || stream.local_addr().is_ok_and(|addr| addr.ip() == peer.ip());
        let tls = match &registry.peer_auth {
            PeerAuth::Tls(tls) => Some(tls.server_config()),
            _ => None,
        };
        let registry = Arc::clone(&registry);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let result = match tls {
                Some(config) if starts_tls(&stream, registry.header_timeout).await => {
                    let accept = TlsAcceptor::from(config).accept(stream);
                    match tokio::time::timeout(registry.header_timeout, accept).await {
                        Ok(Ok(tls)) => registry.serve_accepted(tls, Caller::Member, &shutdown).await,
                        failed => {
                            registry.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                            let why = match failed {
                                Ok(Err(err)) => err.to_string(),
                                _ => "handshake timed out".to_owned(),
                            };
                            tracing::debug!(%peer, %why, "registry TLS handshake failed");
                            Ok(())
                        }
                    }
                }
                // Another host over plain HTTP, in a cluster that allows it: local blobs go
                // out with sendfile.
                _ if !local && !matches!(registry.peer_auth, PeerAuth::Tls(_)) => {
                    registry.serve_plain(stream, &shutdown).await
                }
                _ => {
                    let caller = if local { Caller::Local } else { Caller::Remote };
                    registry.serve_accepted(stream, caller, &shutdown).await
                }
            };
            match result {
                Err(err) if bounds::is_write_timeout(&*err) => {
                    registry.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "registry connection closed: the client stopped reading");
                }
                Err(err) => {
                    tracing::debug!(%peer, err = %err, "registry connection ended with an error");
                }
                Ok(()) => {}
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

/// Whether the client's first byte starts a TLS handshake record (plain HTTP starts with a
/// method name). Waits at most `timeout` for it; a silent or closed client is not TLS.
async fn starts_tls(stream: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut first)).await,
        Ok(Ok(1))
    ) && first[0] == TLS_HANDSHAKE_RECORD
}

/// The content type of a TLS handshake record, the first byte of a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs `connection` to its end; on `shutdown`, or once it has had no request in flight for
/// `idle`, it finishes what is in flight and closes.
async fn drive<C>(
    connection: C,
    activity: &Activity,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Result<(), BoxError>
where
    C: GracefulConnection<Error = BoxError>,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        () = shutdown.cancelled() => {}
        () = activity.idle_for(idle) => {
            tracing::debug!("connection idle, closing");
        }
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// Whether `err` (a connection's end, from [`serve`] or [`Registry::serve_connection`]) comes
/// from a write that made no progress for the write timeout: the client stopped reading.
pub fn is_write_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    bounds::is_write_timeout(err)
}

impl Registry {
    /// Serves one connection [`serve`] accepted (and TLS-terminated, for members) from `caller`,
    /// with the same bounds as [`Registry::serve_connection`].
    pub(super) async fn serve_accepted<I>(
        self: &Arc<Self>,
        io: I,
        caller: Caller,
        shutdown: &CancellationToken,
    ) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = RequestContext {
            caller,
            ..RequestContext::default()
        };
        self.serve_connection(io, ctx, shutdown.clone(), self.write_timeout)
            .await
    }

    /// In [`serve`], close a connection whose writes make no progress for `timeout`.
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Close an HTTP/1.1 connection whose client takes longer than `timeout` to send a
    /// request's headers.
    pub fn with_header_timeout(mut self, timeout: Duration) -> Self {
        self.builder = builder(timeout);
        self.header_timeout = timeout;
        self
    }

    /// Count [`serve`]'s refused and write-timed-out connections in `stats` (for `/metrics`).
    pub fn with_connection_stats(mut self, stats: Arc<ConnectionStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Serve one already-accepted connection (e.g. TLS-terminated by the interception layer)
    /// with `ctx` for every request on it, until the client closes it or `shutdown` is cancelled,
    /// after which in-flight requests finish and the connection closes. The bounds of [`serve`]
    /// hold here too: the header timeout, the idle timeout, and `write_timeout` for writes that
    /// make no progress (its error is recognised by [`is_write_timeout`]).
    pub async fn serve_connection<I>(
        self: &Arc<Self>,
        io: I,
        ctx: RequestContext,
        shutdown: CancellationToken,
        write_timeout: Duration,
    ) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let connection = self.tracked_connection(
            bounds::write_bounded(io, write_timeout),
            ctx,
            Some(Arc::clone(&activity)),
        );
        drive(connection, &activity, self.idle_timeout, &shutdown).await
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
    };

    use super::*;
    use crate::{
        oci::{self, Reference, digest::Digest},
        source::{Object, ObjectRequest, Payload, Source, SourceError},
    };

    const CHUNK: usize = 64 * 1024;
    /// 256 MiB announced: far more than the kernel buffers of both ends hold.
    const CHUNKS: usize = 4096;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];

    /// Any blob asked for by digest: 256 MiB of zeros, made as they are read.
    struct Large;

    #[async_trait::async_trait]
    impl Source for Large {
        async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
            let Reference::Digest(digest) = request.reference else {
                return Err(SourceError::NotFound);
            };
            let chunks = (0..CHUNKS).map(|_| Ok(Bytes::from_static(&ZEROS)));
            Ok(Object {
                digest,
                media_type: oci::OCTET_STREAM.into(),
                size: (CHUNK * CHUNKS) as u64,
                range: None,
                body: Payload::Stream(Box::pin(futures::stream::iter(chunks))),
                source: "large",
            })
        }
    }

    /// A connection from `ip` to `addr`, with a small receive buffer so that a client that does
    /// not read stalls the server's writes soon.
    async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// `GET /livez` on a fresh connection from `ip`: the status line.
    async fn livez_from(ip: [u8; 4], addr: SocketAddr) -> String {
        let mut stream = connect_from(ip, addr).await;
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nhost: spegel\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .expect("no answer to /livez")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        answer.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_disconnected_and_others_are_served() {
        let timeout = Duration::from_millis(500);
        let stats = Arc::new(ConnectionStats::default());
        let registry = Arc::new(
            Registry::new(Arc::new(Large))
                .with_max_connections_per_client(std::num::NonZeroUsize::MIN)
                .with_write_timeout(timeout)
                .with_connection_stats(Arc::clone(&stats)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::clone(&registry), shutdown.clone()));

        // 127.0.0.1 asks for a large blob and never reads; it holds its one slot meanwhile.
        let mut stalled = connect_from([127, 0, 0, 1], addr).await;
        let blob = Digest::of(b"large");
        stalled
            .write_all(
                format!("GET /v2/a/blobs/{blob} HTTP/1.1\r\nhost: spegel\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();

        // Another client is served meanwhile.
        assert_eq!(livez_from([127, 0, 0, 2], addr).await, "HTTP/1.1 200 OK");

        // The stalled connection is closed for it: counted, and its slot given back.
        let counted = async {
            while stats.write_timeouts.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), counted)
            .await
            .expect("the stalled connection was not closed");
        assert_eq!(stats.write_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(livez_from([127, 0, 0, 1], addr).await, "HTTP/1.1 200 OK");
        assert_eq!(registry.refused_connections(), 0);

        // What the stalled client gets is what was buffered, then the end: never the whole blob.
        let mut received = 0usize;
        let mut buf = vec![0; CHUNK];
        let drained = async {
            loop {
                match stalled.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received += n,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), drained)
            .await
            .expect("the stalled connection is still open");
        assert!(received < CHUNK * CHUNKS, "{received} bytes");

        shutdown.cancel();
        server.await.unwrap();
    }

    /// A connection accepted elsewhere (the interception layer) and handed to `registry`'s
    /// [`Registry::serve_connection`] with `write_timeout`: its serving task and the client.
    async fn handed_over(
        registry: Arc<Registry>,
        write_timeout: Duration,
    ) -> (tokio::task::JoinHandle<Result<(), BoxError>>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = connect_from([127, 0, 0, 1], listener.local_addr().unwrap()).await;
        let (server, _) = listener.accept().await.unwrap();
        let served = tokio::spawn(async move {
            registry
                .serve_connection(
                    server,
                    RequestContext::default(),
                    CancellationToken::new(),
                    write_timeout,
                )
                .await
        });
        (served, client)
    }

    #[tokio::test]
    async fn a_handed_over_connection_whose_client_stops_reading_ends_by_the_write_timeout() {
        let registry = Arc::new(Registry::new(Arc::new(Large)));
        let (served, mut client) = handed_over(registry, Duration::from_millis(300)).await;
        let blob = Digest::of(b"large");
        client
            .write_all(
                format!("GET /v2/a/blobs/{blob} HTTP/1.1\r\nhost: spegel\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(20), served)
            .await
            .expect("a connection whose client reads nothing is still served")
            .unwrap();
        let err = ended.expect_err("the connection ended without an error");
        assert!(is_write_timeout(&*err), "{err}");
    }

    #[tokio::test]
    async fn a_handed_over_idle_connection_is_closed() {
        let registry =
            Arc::new(Registry::new(Arc::new(Large)).with_idle_timeout(Duration::from_millis(200)));
        let (served, mut client) = handed_over(registry, Duration::from_secs(30)).await;
        client
            .write_all(b"GET /livez HTTP/1.1\r\nhost: spegel\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut answer))
            .await
            .expect("an idle handed-over connection is still open")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{answer:?}");
        served.await.unwrap().unwrap();
    }

    /// A response that takes longer than the header timeout to send, to a client that keeps
    /// reading, is not cut: the header timeout bounds request heads only.
    #[tokio::test]
    async fn a_long_response_outlives_the_header_timeout() {
        let registry = Arc::new(
            Registry::new(Arc::new(Large)).with_header_timeout(Duration::from_millis(200)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::clone(&registry), shutdown.clone()));
        let mut client = connect_from([127, 0, 0, 1], addr).await;
        let blob = Digest::of(b"large");
        client
            .write_all(
                format!("GET /v2/a/blobs/{blob} HTTP/1.1\r\nhost: spegel\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        // Read steadily for well over the header timeout.
        let started = std::time::Instant::now();
        let mut received = 0usize;
        let mut buf = vec![0; CHUNK];
        while started.elapsed() < Duration::from_millis(1500) {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "the response was cut after {:?} and {received} bytes",
            started.elapsed()
        );
        shutdown.cancel();
        drop(client);
        server.await.unwrap();
    }
}
