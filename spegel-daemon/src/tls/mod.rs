//! TLS termination for intercepted registry connections, with leaves minted by the node CA
//! containerd trusts for the name the client asked for (SNI, or the original destination IP when
//! it sent none). Which CA that is, and whether it covers a name at all, is `continuity.rs`'s.

pub mod args;
pub mod ca;
pub mod continuity;
mod install;
mod names;
pub mod scoped;
pub mod trust;
use std::{fmt, io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};

use crate::tls::{ca::CaError, continuity::CaSet};

/// How long a client may take to complete the handshake before the connection is dropped.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The application protocol negotiated with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    /// `http/1.1`, or no ALPN at all.
    Http1,
}

/// A terminated connection.
pub struct Accepted<IO> {
    pub stream: TlsStream<IO>,
    pub alpn: Alpn,
    /// The name the leaf was minted for: the SNI, or the original destination IP.
    pub server_name: String,
}

impl<IO> fmt::Debug for Accepted<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("alpn", &self.alpn)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a connection could not be terminated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The client did not finish the handshake in time.
    #[error("TLS handshake timed out")]
    Timeout,
    /// No leaf for the requested name (not mirrored, or not a valid name).
    #[error("no certificate for `{name}`: {source}")]
    Certificate {
        name: String,
        #[source]
        source: CaError,
    },
    /// The handshake failed (not TLS, alert, I/O).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// The server configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Terminates TLS on intercepted connections. Cheap to share (`Arc`); one per daemon.
pub struct TlsTerminator {
    cas: Arc<CaSet>,
    provider: Arc<CryptoProvider>,
    /// Shared by every connection with SNI, so TLS session resumption works across them.
    sni_config: Arc<ServerConfig>,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("cas", &self.cas)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsTerminator {
    /// A terminator minting leaves with the trusted CA of `cas`, with the default handshake
    /// timeout.
    pub fn new(cas: Arc<CaSet>) -> Result<Self, TlsError> {
        // The ring provider explicitly: another crate in the graph may enable aws-lc-rs, and
        // then rustls cannot pick a process default by itself.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let sni_config = server_config(
            &provider,
            Arc::new(SniResolver {
                cas: Arc::clone(&cas),
            }),
        )?;
        Ok(Self {
            cas,
            provider,
            sni_config,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Whether a TLS connection that asked for `host` can be terminated (see
    /// [`CaSet::covers`]); if not, it must be passed through untouched.
    pub fn covers(&self, host: &str) -> bool {
        self.cas.covers(host)
    }

    /// Changes how long a client may take for the whole handshake.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Completes the server side of the handshake on `stream`, which was originally headed for
    /// `original_dst`. The leaf is minted for the client's SNI; a client without SNI (it dialled
    /// an IP literal) gets a leaf for `original_dst`'s IP, if that IP is a mirrored registry.
    pub async fn accept<IO>(
        &self,
        stream: IO,
        original_dst: SocketAddr,
    ) -> Result<Accepted<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let start = tokio::time::timeout_at(
            deadline,
            LazyConfigAcceptor::new(Acceptor::default(), stream),
        )
        .await
        .map_err(|_| TlsError::Timeout)?
        .map_err(TlsError::Handshake)?;
        let ca = self.cas.trusted();
        let leaf_for = |name: &str| match &ca {
            Some(ca) => ca.leaf_for(name),
            None => Err(CaError::NotTrusted),
        };
        let (config, server_name) = match start.client_hello().server_name() {
            Some(sni) => {
                // Minted (or found in the cache) here rather than only in the resolver so a
                // refusal surfaces as a precise error instead of a generic handshake failure.
                let sni = sni.to_owned();
                leaf_for(&sni).map_err(|source| TlsError::Certificate {
                    name: sni.clone(),
                    source,
                })?;
                (Arc::clone(&self.sni_config), sni)
            }
            None => {
                let ip = original_dst.ip().to_canonical().to_string();
                let leaf = leaf_for(&ip).map_err(|source| TlsError::Certificate {
                    name: ip.clone(),
                    source,
                })?;
                let config = server_config(&self.provider, Arc::new(FixedCert(leaf)))?;
                (config, ip)
            }
        };
        let stream = tokio::time::timeout_at(deadline, start.into_stream(config))
            .await
            .map_err(|_| TlsError::Timeout)?
            .map_err(TlsError::Handshake)?;
        let alpn = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Alpn::H2,
            _ => Alpn::Http1,
        };
        tracing::debug!(%server_name, ?alpn, %original_dst, "TLS terminated");
        Ok(Accepted {
            stream,
            alpn,
            server_name,
        })
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Picks the leaf by SNI, minting through the trusted CA (which refuses names it may not vouch
/// for).
struct SniResolver {
    cas: Arc<CaSet>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name()?;
        match self.cas.trusted()?.leaf_for(name) {
            Ok(leaf) => Some(leaf),
            Err(err) => {
                tracing::debug!(name, %err, "no leaf for SNI");
                None
            }
        }
    }
}

/// Always the same leaf: for a connection without SNI, decided before the handshake.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::tls::ca::NodeCa;

    struct Fixture {
        dir: PathBuf,
        cas: Arc<CaSet>,
        ca: Arc<NodeCa>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "spegel-tls-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let permitted = crate::tls::names::tests::permitted(&["docker.io", "10.213.0.10:5443"]);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = NodeCa::mint(&dir, "ca", &permitted, ca::DEFAULT_LEAF_VALIDITY).unwrap();
        let cas = Arc::new(CaSet::trusting(ca));
        let ca = cas.trusted().unwrap();
        Fixture { dir, cas, ca }
    }

    fn client(ca: &NodeCa, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    /// Runs one handshake: the client dials with `name`, the server pretends the connection
    /// was headed for `original_dst`. Returns the server's result and whether the client
    /// completed its side (and echoed a byte through the tunnel).
    async fn handshake(
        fx: &Fixture,
        name: &str,
        alpn: &[&[u8]],
        original_dst: SocketAddr,
    ) -> (Result<(Alpn, String), TlsError>, bool) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let terminator = TlsTerminator::new(Arc::clone(&fx.cas)).unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut accepted = terminator.accept(tcp, original_dst).await?;
            let mut byte = [0u8; 1];
            accepted.stream.read_exact(&mut byte).await.unwrap();
            accepted.stream.write_all(&byte).await.unwrap();
            accepted.stream.flush().await.unwrap();
            Ok((accepted.alpn, accepted.server_name))
        });
        let connector = client(&fx.ca, alpn);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let client_ok = match connector.connect(server_name, tcp).await {
            Ok(mut tls) => {
                tls.write_all(b"x").await.unwrap();
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.is_ok() && byte == *b"x"
            }
            Err(_) => false,
        };
        let server = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server finished")
            .unwrap();
        (server, client_ok)
    }

    const DST: &str = "203.0.113.7:443";

    #[tokio::test]
    async fn terminates_with_sni_and_negotiates_alpn() {
        let fx = fixture();
        let dst = DST.parse().unwrap();
        for (offer, want) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], Alpn::H2),
            (&[b"http/1.1".as_slice()][..], Alpn::Http1),
            (&[][..], Alpn::Http1),
        ] {
            let (server, client_ok) = handshake(&fx, "registry-1.docker.io", offer, dst).await;
            assert_eq!(server.unwrap(), (want, "registry-1.docker.io".to_owned()));
            assert!(client_ok);
        }
    }

    #[tokio::test]
    async fn without_sni_uses_the_original_destination_ip() {
        let fx = fixture();
        let dst = "10.213.0.10:5443".parse().unwrap();
        // A client dialling an IP literal sends no SNI and verifies the IP SAN.
        let (server, client_ok) = handshake(&fx, "10.213.0.10", &[b"http/1.1"], dst).await;
        assert_eq!(server.unwrap(), (Alpn::Http1, "10.213.0.10".to_owned()));
        assert!(client_ok);
        // An IP that is not mirrored gets no certificate.
        let (server, client_ok) = handshake(&fx, "10.213.0.10", &[], DST.parse().unwrap()).await;
        assert!(
            matches!(server, Err(TlsError::Certificate { .. })),
            "{server:?}"
        );
        assert!(!client_ok);
    }

    #[tokio::test]
    async fn refuses_names_outside_the_constraints() {
        let fx = fixture();
        let (server, client_ok) = handshake(&fx, "ghcr.io", &[], DST.parse().unwrap()).await;
        assert!(
            matches!(server, Err(TlsError::Certificate { .. })),
            "{server:?}"
        );
        assert!(!client_ok);
    }

    #[tokio::test]
    async fn without_a_trusted_ca_nothing_is_covered_or_terminated() {
        let fx = fixture();
        // A fresh data dir: the CA is minted as the next one, not trusted until installed.
        let fresh = Arc::new(
            CaSet::open(
                &fx.dir.join("fresh"),
                crate::tls::names::tests::permitted(&["docker.io"]),
                crate::tls::args::CaArgs::default().policy().unwrap(),
                Arc::default(),
            )
            .unwrap(),
        );
        assert!(fresh.trusted().is_none() && fresh.next().is_some());
        let terminator = TlsTerminator::new(Arc::clone(&fresh)).unwrap();
        assert!(!terminator.covers("docker.io"));
        assert!(
            TlsTerminator::new(Arc::clone(&fx.cas))
                .unwrap()
                .covers("docker.io")
        );
        let fx = Fixture {
            dir: fx.dir.join("unused"),
            cas: fresh,
            ca: Arc::clone(&fx.ca),
        };
        let (server, client_ok) = handshake(&fx, "docker.io", &[], DST.parse().unwrap()).await;
        assert!(
            matches!(
                server,
                Err(TlsError::Certificate {
                    source: CaError::NotTrusted,
                    ..
                })
            ),
            "{server:?}"
        );
        assert!(!client_ok);
    }

    #[tokio::test]
    async fn a_silent_client_times_out() {
        let fx = fixture();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let terminator = TlsTerminator::new(Arc::clone(&fx.cas))
            .unwrap()
            .with_handshake_timeout(Duration::from_millis(100));
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let result = terminator.accept(tcp, DST.parse().unwrap()).await;
        assert!(matches!(result, Err(TlsError::Timeout)), "{result:?}");
    }
}
