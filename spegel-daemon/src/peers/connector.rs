//! Dialling peers: TCP (hyper-util's connector: connect timeout, `TCP_NODELAY`), then mutual TLS
//! with this node's cluster leaf unless the cluster runs open or authenticated plaintext. The
//! TLS connection is made for the address dialled, so each peer resumes its own sessions.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use crate::membership::PeerTls;

/// A plain or TLS connection to a peer.
pub(super) trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> PeerIo for T {}

/// What the pool holds (tokio implements the IO traits for the box).
pub(super) type PeerConn = Box<dyn PeerIo>;

impl Connection for Box<dyn PeerIo> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Connects to peers' registry APIs.
#[derive(Clone)]
pub(super) struct PeerConnector {
    http: HttpConnector,
    tls: Option<PeerTls>,
    timeout: Duration,
}

impl PeerConnector {
    /// Dials within `timeout` (TCP, and the TLS handshake again), with TLS when `tls` is given.
    pub(super) fn new(timeout: Duration, tls: Option<PeerTls>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        Self { http, tls, timeout }
    }
}

impl tower_service::Service<Uri> for PeerConnector {
    type Response = TokioIo<PeerConn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        Box::pin(async move {
            let tcp = connecting.await.map_err(io::Error::other)?.into_inner();
            let Some(tls) = tls else {
                return Ok(TokioIo::new(Box::new(tcp) as PeerConn));
            };
            let connector = TlsConnector::from(tls.client_config());
            let peer = tcp.peer_addr().ok().map(|addr| addr.ip());
            let handshake = connector.connect(tls.server_name(peer), tcp);
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(Box::new(stream) as PeerConn)),
                Ok(Err(err)) => Err(io::Error::new(
                    err.kind(),
                    format!("TLS with the peer failed: {err}"),
                )),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with the peer took longer than {timeout:?}"),
                )),
            }
        })
    }
}
