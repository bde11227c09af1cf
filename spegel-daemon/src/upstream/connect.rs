//! Dialling upstreams: the [`Connector`] hyper-util's pool calls with a synthetic URI, which
//! decodes the [`Target`], connects (pinned address, or DNS for redirect targets, whose resolved
//! addresses must pass the redirect address policy; bounded by the connect timeout) and does the
//! verified TLS handshake.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::TlsConnector;

use super::{redirect_addr::RedirectAddrs, target::Target};

/// Any byte stream to an upstream: plain TCP or TLS over it.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A plain or TLS connection to an upstream (tokio implements the IO traits for the box).
pub(super) type Conn = Box<dyn Io>;

impl Connection for Box<dyn Io> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Dials [`Target`]s decoded from the synthetic URI: the pinned address, or DNS otherwise.
#[derive(Clone)]
pub(super) struct Connector {
    tls: TlsConnector,
    timeout: Duration,
    redirects: RedirectAddrs,
}

impl Connector {
    /// Dials with `tls` for TLS targets, giving up on a connection after `timeout`; redirect
    /// targets only at addresses `redirects` allows.
    pub(super) fn new(tls: TlsConnector, timeout: Duration, redirects: RedirectAddrs) -> Self {
        Self {
            tls,
            timeout,
            redirects,
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Conn>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let target = Target::decode(&uri)?;
            let deadline = Instant::now() + this.timeout;
            match tokio::time::timeout_at(deadline, this.connect(&target)).await {
                Ok(result) => result.map(TokioIo::new),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {target} took longer than {:?}", this.timeout),
                )),
            }
        })
    }
}

impl Connector {
    async fn connect(&self, target: &Target) -> io::Result<Conn> {
        let addrs: Vec<SocketAddr> = match target.pinned {
            // The intercepted origin, at the address containerd dialled: not a redirect.
            Some(addr) => vec![addr],
            // Only redirect targets are resolved with DNS: checked on what they resolve to,
            // which is exactly what is dialled below.
            None => {
                let addrs: Vec<SocketAddr> =
                    tokio::net::lookup_host((target.host.as_str(), target.port))
                        .await?
                        .collect();
                self.redirects.check(&target.host, &addrs)?;
                addrs
            }
        };
        let mut last_error = None;
        let mut tcp = None;
        // Addresses in resolver order; a refused one falls through to the next. The caller's
        // deadline bounds the whole walk.
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            last_error.unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolved to no address", target.host),
                )
            })
        })?;
        // Small request/response exchanges: don't let Nagle delay them.
        let _ = tcp.set_nodelay(true);
        if !target.tls {
            return Ok(Box::new(tcp));
        }
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = self.tls.connect(server_name, tcp).await?;
        Ok(Box::new(tls))
    }
}
