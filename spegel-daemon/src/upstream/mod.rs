//! The upstream registry: a [`Source`] for transparently intercepted pulls (content verified
//! against its digest), and verbatim passthrough of every other intercepted request.
//!
//! Intercepted requests go to the address containerd originally dialled (`Origin::addr`), with
//! the real host name for SNI, `Host` and certificate verification; redirects to other hosts
//! (blob storage, CDNs) are resolved with DNS as usual. Connections are pooled per
//! (scheme, host, dialled address) by hyper-util's client: the target is encoded into a
//! synthetic authority that only our connector understands and that never reaches the wire.
use std::{
    fmt, io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{
    body::BoxBody, body::BoxError, oci, oci::Kind, oci::Reference, oci::digest::Digest,
    oci::digest::Verifier, source::Body, source::Object, source::ObjectRequest, source::Origin,
    source::Source, source::SourceError,
};

/// Redirects followed for one object before giving up (as many as containerd's Go client would
/// follow for a registry is far more than any registry needs; five covers CDN chains).
const MAX_REDIRECTS: usize = 5;
/// Manifests are read whole before they are returned; larger ones are refused.
const MANIFEST_CAP: usize = 4 << 20;
/// How much of an upstream error body is kept for the client.
const ERROR_BODY_CAP: usize = 64 << 10;
/// Suffix of the synthetic authorities encoding a [`Target`] (`.invalid` never resolves).
const SYNTHETIC_SUFFIX: &str = ".spegel.invalid";
/// Client headers forwarded to the registry for object requests: containerd's own credentials
/// and content negotiation.
const FORWARDED_HEADERS: [HeaderName; 3] =
    [header::AUTHORIZATION, header::ACCEPT, header::USER_AGENT];

/// Flags of the upstream client.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Extra CA certificates (PEM files) trusted for upstream registries, on top of the system
    /// roots. Repeatable, or comma-separated in the environment.
    #[arg(
        long = "upstream-ca-file",
        env = "SPEGEL_UPSTREAM_CA_FILE",
        value_delimiter = ',',
        value_name = "PEM"
    )]
    pub upstream_ca_files: Vec<PathBuf>,
    /// Bound on DNS lookup, TCP connect and TLS handshake to an upstream, together.
    #[arg(long, env = "SPEGEL_UPSTREAM_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub upstream_connect_timeout: Duration,
    /// Bound on waiting for an upstream's response headers (blobs, manifests by digest,
    /// passthrough).
    #[arg(long, env = "SPEGEL_UPSTREAM_RESPONSE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub upstream_response_timeout: Duration,
    /// Bound on waiting for an upstream's response headers for manifests by tag.
    #[arg(long, env = "SPEGEL_UPSTREAM_TAG_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub upstream_tag_timeout: Duration,
    /// An upstream body that sends nothing for this long is aborted.
    #[arg(long, env = "SPEGEL_UPSTREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub upstream_idle_timeout: Duration,
}

/// Every wait on an upstream is bounded by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// DNS, TCP connect and TLS handshake together.
    pub connect: Duration,
    /// Response headers, except manifests by tag.
    pub response: Duration,
    /// Response headers of manifests by tag.
    pub tag_response: Duration,
    /// Longest silence inside a body.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(30),
            tag_response: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

impl From<&UpstreamArgs> for Timeouts {
    fn from(args: &UpstreamArgs) -> Self {
        Self {
            connect: args.upstream_connect_timeout,
            response: args.upstream_response_timeout,
            tag_response: args.upstream_tag_timeout,
            idle: args.upstream_idle_timeout,
        }
    }
}

/// Why the upstream client failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An `--upstream-ca-file` could not be read.
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An `--upstream-ca-file` holds no usable certificate.
    #[error("CA file {path} holds no usable certificate")]
    NoCertificates { path: PathBuf },
    /// No response headers in time.
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    /// Connecting, the TLS handshake (including certificate verification) or the exchange failed.
    #[error("request to {target} failed: {detail}")]
    Request { target: String, detail: String },
    /// A redirect could not be followed.
    #[error("bad redirect from {target}: {reason}")]
    Redirect { target: String, reason: String },
    /// The TLS client configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// The request cannot be expressed upstream (bad origin host, bad path).
    #[error("invalid upstream request: {0}")]
    InvalidRequest(String),
}

impl UpstreamError {
    /// The status a client should see for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A short text answer of our own (not the upstream's).
fn plain_response(status: StatusCode, message: String) -> Response<BoxBody> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(message))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl From<UpstreamError> for SourceError {
    fn from(err: UpstreamError) -> Self {
        match err {
            UpstreamError::InvalidRequest(msg) => SourceError::Invalid(msg),
            other => SourceError::Unavailable(other.to_string()),
        }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// Host name or IP literal (no brackets): SNI, certificate verification and `Host`.
    host: String,
    port: u16,
    /// The exact address to dial (intercepted origins); `None` resolves `host` with DNS.
    pinned: Option<SocketAddr>,
}

impl Target {
    fn from_origin(origin: &Origin) -> Result<Self, UpstreamError> {
        let host = host_only(&origin.host).to_ascii_lowercase();
        if host.is_empty() || ServerName::try_from(host.as_str()).is_err() {
            return Err(UpstreamError::InvalidRequest(format!(
                "origin host `{}` is not a DNS name or IP address",
                origin.host
            )));
        }
        Ok(Self {
            tls: origin.tls,
            host,
            port: origin.addr.port(),
            pinned: Some(origin.addr),
        })
    }

    fn from_url(url: &url::Url) -> Result<Self, String> {
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("unsupported scheme `{other}`")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(domain)) => domain.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("no host".to_owned()),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| "no port".to_owned())?;
        Ok(Self {
            tls,
            host,
            port,
            pinned: None,
        })
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `host[:port]` as it belongs in `Host` and URLs (IPv6 bracketed, default port omitted).
    fn authority(&self) -> String {
        let host = match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    fn same_server(&self, other: &Target) -> bool {
        self.tls == other.tls && self.host == other.host && self.port == other.port
    }

    /// The URI handed to hyper: real scheme and path, synthetic authority carrying the target
    /// (hex keeps every part a valid reg-name). The pool keys connections by it.
    fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let pinned = self
            .pinned
            .map_or_else(|| "dns".to_owned(), |addr| hex::encode(addr.to_string()));
        let uri = format!(
            "{}://{}.{}.{}{SYNTHETIC_SUFFIX}{path_and_query}",
            self.scheme(),
            hex::encode(&self.host),
            self.port,
            pinned
        );
        uri.parse()
            .map_err(|e| UpstreamError::InvalidRequest(format!("cannot build a request URI: {e}")))
    }

    /// Inverse of [`Self::uri`], in the connector.
    fn decode(uri: &Uri) -> io::Result<Self> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "not an upstream target URI");
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid()),
        };
        let encoded = uri
            .host()
            .and_then(|host| host.strip_suffix(SYNTHETIC_SUFFIX))
            .ok_or_else(invalid)?;
        let mut parts = encoded.split('.');
        let (Some(host), Some(port), Some(pinned), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let host = hex::decode(host)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(invalid)?;
        let port = port.parse().map_err(|_| invalid())?;
        let pinned = match pinned {
            "dns" => None,
            hexed => Some(
                hex::decode(hexed)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .and_then(|addr| addr.parse().ok())
                    .ok_or_else(invalid)?,
            ),
        };
        Ok(Self {
            tls,
            host,
            port,
            pinned,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())?;
        if let Some(addr) = self.pinned {
            write!(f, " (at {addr})")?;
        }
        Ok(())
    }
}

/// `registry:5000` → `registry`, `[fd00::1]:5000` → `fd00::1`; other forms are returned as is.
fn host_only(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.split_once(':') {
        Some((name, port)) if !port.contains(':') => name,
        _ => host,
    }
}

/// A plain or TLS connection to an upstream.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream) => stream.is_write_vectored(),
            Conn::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

/// Dials [`Target`]s decoded from the synthetic URI: the pinned address, or DNS otherwise.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    timeout: Duration,
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
            Some(addr) => vec![addr],
            None => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await?
                .collect(),
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
            return Ok(Conn::Plain(tcp));
        }
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = self.tls.connect(server_name, tcp).await?;
        Ok(Conn::Tls(Box::new(tls)))
    }
}

/// An HTTP client for upstream registries: verified TLS, pooled connections, bounded waits.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, BoxBody>,
    timeouts: Timeouts,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// A client trusting the system roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus the
    /// `--upstream-ca-file`s. Blocking file IO: call at startup.
    pub fn new(args: &UpstreamArgs) -> Result<Self, UpstreamError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for err in &native.errors {
            tracing::warn!(%err, "problem loading system CA certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system CA certificates loaded");
        for path in &args.upstream_ca_files {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| UpstreamError::CaFile {
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| UpstreamError::CaFile {
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(UpstreamError::NoCertificates { path: path.clone() });
            }
        }
        if roots.is_empty() {
            tracing::warn!("no trusted CA certificates: every TLS upstream will be refused");
        }
        Self::with_roots(roots, Timeouts::from(args))
    }

    /// A client trusting exactly `roots`.
    pub fn with_roots(roots: RootCertStore, timeouts: Timeouts) -> Result<Self, UpstreamError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(UpstreamError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = Connector {
            tls: TlsConnector::from(Arc::new(config)),
            timeout: timeouts.connect,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(connector);
        Ok(Self { client, timeouts })
    }

    /// The waits this client bounds.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Forwards an intercepted request verbatim to `origin` (token endpoints, `/v2/` probes,
    /// anything that is not a pull): same method, path, query, headers and body, minus
    /// hop-by-hop headers; the response comes back the same way, streamed. Redirects are
    /// returned to the client, not followed.
    pub async fn forward<B>(
        &self,
        origin: &Origin,
        request: Request<B>,
    ) -> Result<Response<BoxBody>, UpstreamError>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let target = Target::from_origin(origin)?;
        let (mut parts, body) = request.into_parts();
        // HTTP/2 clients carry the host in the URI (`:authority`), HTTP/1.1 ones in `Host`.
        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| {
                parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            })
            .map_or_else(|| host_header(&target), Ok)?;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, host);
        parts.uri = target.uri(&path_and_query)?;
        parts.version = Version::HTTP_11;
        let request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        tracing::debug!(%target, method = %request.method(), path = %path_and_query, "passthrough");
        let response = self.send(&target, request, self.timeouts.response).await?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            IdleTimeout::new(body, self.timeouts.idle).boxed_unsync(),
        ))
    }

    /// [`Self::forward`] for callers that need an answer whatever happens: no origin (mirror
    /// mode has nowhere to forward to) is a 404, a timeout a 504, any other failure a 502.
    pub async fn forward_or_respond<B>(
        &self,
        origin: Option<&Origin>,
        request: Request<B>,
    ) -> Response<BoxBody>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(origin) = origin else {
            return plain_response(
                StatusCode::NOT_FOUND,
                "no upstream for this request".to_owned(),
            );
        };
        match self.forward(origin, request).await {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(host = %origin.host, %err, "passthrough failed");
                plain_response(err.status(), err.to_string())
            }
        }
    }

    async fn send(
        &self,
        target: &Target,
        request: Request<BoxBody>,
        header_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(header_timeout, self.client.request(request)).await {
            Err(_) => Err(UpstreamError::Timeout {
                target: target.to_string(),
                timeout: header_timeout,
            }),
            Ok(Err(err)) => Err(UpstreamError::Request {
                target: target.to_string(),
                detail: error_chain(&err),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// GET/HEAD `path` on `origin`, following redirects; returns the final response.
    async fn get_following_redirects(
        &self,
        origin: &Origin,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        header_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin_target = Target::from_origin(origin)?;
        let mut target = origin_target.clone();
        let mut path_and_query = path.to_owned();
        for hop in 0..=MAX_REDIRECTS {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(target.uri(&path_and_query)?)
                .body(
                    Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .map_err(|e| UpstreamError::InvalidRequest(e.to_string()))?;
            *request.headers_mut() = headers.clone();
            request
                .headers_mut()
                .insert(header::HOST, host_header(&target)?);
            let response = self.send(&target, request, header_timeout).await?;
            if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(response);
            }
            let redirect_error = |reason: String| UpstreamError::Redirect {
                target: target.to_string(),
                reason,
            };
            if hop == MAX_REDIRECTS {
                return Err(redirect_error(format!(
                    "more than {MAX_REDIRECTS} redirects"
                )));
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| redirect_error("no usable Location header".to_owned()))?;
            let base = url::Url::parse(&format!(
                "{}://{}{path_and_query}",
                target.scheme(),
                target.authority()
            ))
            .map_err(|e| redirect_error(e.to_string()))?;
            let next_url = base
                .join(location)
                .map_err(|e| redirect_error(format!("Location `{location}`: {e}")))?;
            let mut next = Target::from_url(&next_url).map_err(redirect_error)?;
            if target.tls && !next.tls {
                // Tag manifests have no digest to check: never let a redirect downgrade them.
                return Err(redirect_error(format!(
                    "refusing https → http ({next_url})"
                )));
            }
            if next.same_server(&origin_target) {
                next.pinned = origin_target.pinned;
            }
            if !next.same_server(&target) {
                // As Go's client does: credentials for one host are not handed to another.
                headers.remove(header::AUTHORIZATION);
            }
            tracing::debug!(from = %target, to = %next, status = %response.status(), "following redirect");
            path_and_query = match next_url.query() {
                Some(query) => format!("{}?{query}", next_url.path()),
                None => next_url.path().to_owned(),
            };
            target = next;
        }
        unreachable!("the loop returns on its last hop")
    }
}

/// `Host` for a target we address ourselves.
fn host_header(target: &Target) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(&target.authority())
        .map_err(|e| UpstreamError::InvalidRequest(format!("bad host `{}`: {e}", target.host)))
}

/// An error and its sources, `: `-joined (hyper-util's own message is only "client error").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A body that fails when the inner one stays silent for `idle`.
struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("upstream body sent nothing for {:?}", this.idle),
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The data of an upstream body as a stream of `io::Result<Bytes>`, bounded by `idle`.
fn data_stream(
    body: Incoming,
    idle: Duration,
) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
    http_body_util::BodyDataStream::new(IdleTimeout::new(body, idle)).map(|item| {
        item.map_err(|err| match err.downcast::<io::Error>() {
            Ok(io_err) => *io_err,
            Err(other) => io::Error::other(other),
        })
    })
}

/// Reads a whole body, failing past `cap` bytes.
async fn read_capped(body: Incoming, idle: Duration, cap: usize) -> Result<Bytes, ReadError> {
    let mut stream = data_stream(body, idle);
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Io)?;
        if buf.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads at most `cap` bytes of a body; the rest is dropped.
async fn read_truncated(body: Incoming, idle: Duration, cap: usize) -> Bytes {
    let mut stream = data_stream(body, idle);
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() == cap {
            break;
        }
    }
    buf.freeze()
}

#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    TooLarge,
}

/// Streams a blob through a [`Verifier`], holding back the last chunk until the whole content
/// checks out: a client that reads the body to its end without error got the right bytes. On
/// a mismatch (or a wrong length) the body ends with an error instead of its tail.
fn verified_body(
    inner: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    digest: Digest,
    size: u64,
) -> Body {
    struct State<S> {
        inner: S,
        verifier: Verifier,
        held: Option<Bytes>,
        done: bool,
    }
    let state = State {
        inner,
        verifier: Verifier::new(digest),
        held: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(
        state,
        move |mut state| async move {
            if state.done {
                return None;
            }
            loop {
                match state.inner.next().await {
                    Some(Ok(chunk)) => {
                        state.verifier.update(&chunk);
                        if state.verifier.len() > size {
                            state.done = true;
                            let err = invalid_data(format!(
                                "upstream sent more than {size} bytes for {digest}"
                            ));
                            return Some((Err(err), state));
                        }
                        if let Some(previous) = state.held.replace(chunk) {
                            return Some((Ok(previous), state));
                        }
                    }
                    Some(Err(err)) => {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                    None => {
                        state.done = true;
                        let len = state.verifier.len();
                        if len != size {
                            let err = invalid_data(format!(
                                "upstream sent {len} of {size} bytes for {digest}"
                            ));
                            return Some((Err(err), state));
                        }
                        if !state.verifier.clone().verify() {
                            tracing::warn!(%digest, "upstream blob does not match its digest");
                            let err =
                                invalid_data(format!("upstream content does not match {digest}"));
                            return Some((Err(err), state));
                        }
                        return state.held.take().map(|last| (Ok(last), state));
                    }
                }
            }
        },
    ))
}

/// Passes a range's bytes through, failing if upstream sends more or fewer than `len`.
fn length_checked_body(
    inner: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    len: u64,
) -> Body {
    Box::pin(futures::stream::unfold(
        (inner, 0u64, false),
        move |(mut inner, mut seen, done)| async move {
            if done {
                return None;
            }
            match inner.next().await {
                Some(Ok(chunk)) => {
                    seen += chunk.len() as u64;
                    if seen > len {
                        let err = invalid_data(format!("upstream sent more than {len} bytes"));
                        return Some((Err(err), (inner, seen, true)));
                    }
                    Some((Ok(chunk), (inner, seen, false)))
                }
                Some(Err(err)) => Some((Err(err), (inner, seen, true))),
                None if seen == len => None,
                None => {
                    let err = invalid_data(format!("upstream sent {seen} of {len} bytes"));
                    Some((Err(err), (inner, seen, true)))
                }
            }
        },
    ))
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The upstream registry as a [`Source`] for transparently intercepted requests.
#[derive(Debug, Clone)]
pub struct UpstreamSource {
    client: UpstreamClient,
}

impl UpstreamSource {
    pub fn new(client: UpstreamClient) -> Self {
        Self { client }
    }
}

#[async_trait::async_trait]
impl Source for UpstreamSource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        // Only intercepted requests know where upstream is; peers' requests are never forwarded.
        let Some(origin) = &request.origin else {
            return Err(SourceError::NotFound);
        };
        if request.mirrored {
            return Err(SourceError::NotFound);
        }
        let path = object_path(request).map_err(SourceError::Invalid)?;
        let by_tag = matches!(request.reference, Reference::Tag(_));
        let header_timeout = if by_tag {
            self.client.timeouts.tag_response
        } else {
            self.client.timeouts.response
        };
        let mut headers = HeaderMap::new();
        for name in FORWARDED_HEADERS {
            for value in request.headers.get_all(&name) {
                headers.append(name.clone(), value.clone());
            }
        }
        if request.kind == Kind::Manifest && !headers.contains_key(header::ACCEPT) {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(crate::oci::MANIFEST_ACCEPT),
            );
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static("spegel"));
        }
        // Ranges only for blob GETs: manifests are read whole to be verified, and a HEAD
        // answers for the whole object.
        if let (Kind::Blob, false, Some(range)) = (request.kind, request.head, request.range) {
            headers.insert(header::RANGE, range.header_value());
        }
        let mut method = if request.head {
            Method::HEAD
        } else {
            Method::GET
        };
        loop {
            let response = self
                .client
                .get_following_redirects(
                    origin,
                    method.clone(),
                    &path,
                    headers.clone(),
                    header_timeout,
                )
                .await?;
            let status = response.status();
            tracing::debug!(
                host = %origin.host,
                %path,
                %method,
                %status,
                "upstream answered"
            );
            match status {
                StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
                StatusCode::NOT_FOUND => return Err(SourceError::NotFound),
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    if let Some(size) = oci::unsatisfied_range_size(response.headers()) {
                        return Err(SourceError::RangeNotSatisfiable { size });
                    }
                    return Err(self.upstream_error(response).await);
                }
                _ => return Err(self.upstream_error(response).await),
            }
            let object = match (request.kind, &request.reference) {
                (Kind::Manifest, _) => self
                    .manifest(request, response, method == Method::HEAD)
                    .await
                    .map_err(SourceError::Unavailable)?,
                (Kind::Blob, Reference::Digest(digest)) => Some(
                    self.blob(request, *digest, response)
                        .map_err(SourceError::Unavailable)?,
                ),
                // object_path refused it already.
                (Kind::Blob, Reference::Tag(_)) => {
                    return Err(SourceError::Invalid(
                        "blobs are addressed by digest".to_owned(),
                    ));
                }
            };
            match object {
                Some(object) => return Ok(object),
                // A HEAD by tag without Docker-Content-Digest: the digest needs the bytes.
                None => method = Method::GET,
            }
        }
    }
}

impl UpstreamSource {
    /// A non-success answer as the client should see it (401 with its challenge, 429, 5xx…).
    async fn upstream_error(&self, response: Response<Incoming>) -> SourceError {
        let (parts, body) = response.into_parts();
        let body = read_truncated(body, self.client.timeouts.idle, ERROR_BODY_CAP).await;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The body may have been truncated; whoever answers sets the length.
        headers.remove(header::CONTENT_LENGTH);
        SourceError::Upstream {
            status: parts.status,
            headers,
            body,
        }
    }

    /// A manifest: read whole (capped) and checked against the digest asked for, or the one
    /// upstream announced. `None`: a HEAD by tag told no digest; ask again with GET.
    async fn manifest(
        &self,
        request: &ObjectRequest,
        response: Response<Incoming>,
        sent_head: bool,
    ) -> Result<Option<Object>, String> {
        if response.status() != StatusCode::OK {
            return Err(format!(
                "upstream answered a manifest request with {}",
                response.status()
            ));
        }
        let announced = oci::content_digest(response.headers());
        let expected = match &request.reference {
            Reference::Digest(digest) => {
                check_announced(*digest, announced)?;
                Some(*digest)
            }
            Reference::Tag(_) => announced,
        };
        let media_type = media_type(response.headers(), Kind::Manifest);
        if sent_head {
            let Some(digest) = expected else {
                return Ok(None);
            };
            let size = oci::content_length(response.headers())
                .ok_or_else(|| "upstream sent no Content-Length".to_owned())?;
            return Ok(Some(Object {
                digest,
                media_type,
                size,
                range: None,
                body: None,
                source: "upstream",
            }));
        }
        if oci::content_length(response.headers()).is_some_and(|len| len > MANIFEST_CAP as u64) {
            return Err(format!(
                "upstream manifest is larger than {MANIFEST_CAP} bytes"
            ));
        }
        let bytes = read_capped(
            response.into_body(),
            self.client.timeouts.idle,
            MANIFEST_CAP,
        )
        .await
        .map_err(|err| match err {
            ReadError::Io(err) => {
                format!("reading the upstream manifest: {err}")
            }
            ReadError::TooLarge => format!("upstream manifest is larger than {MANIFEST_CAP} bytes"),
        })?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = expected
            && expected != digest
        {
            tracing::warn!(%expected, got = %digest, "upstream manifest does not match its digest");
            return Err(format!(
                "upstream manifest does not match {expected} (got {digest})"
            ));
        }
        let size = bytes.len() as u64;
        let body: Option<Body> = (!request.head)
            .then(|| Box::pin(futures::stream::once(async move { Ok(bytes) })) as Body);
        Ok(Some(Object {
            digest,
            media_type,
            size,
            range: None,
            body,
            source: "upstream",
        }))
    }

    /// A blob: whole bodies are verified as they stream; a 206 range is passed through with
    /// its length checked (a part cannot be verified; containerd verifies the whole blob when
    /// it commits it).
    fn blob(
        &self,
        request: &ObjectRequest,
        digest: Digest,
        response: Response<Incoming>,
    ) -> Result<Object, String> {
        check_announced(digest, oci::content_digest(response.headers()))?;
        let media_type = media_type(response.headers(), Kind::Blob);
        let idle = self.client.timeouts.idle;
        if response.status() == StatusCode::PARTIAL_CONTENT {
            let (range, size) = oci::content_range(response.headers())
                .ok_or_else(|| "upstream sent 206 without a usable Content-Range".to_owned())?;
            let len = range.end() - range.start() + 1;
            if oci::content_length(response.headers()).is_some_and(|cl| cl != len) {
                return Err("upstream Content-Length disagrees with its Content-Range".to_owned());
            }
            let body = (!request.head)
                .then(|| length_checked_body(data_stream(response.into_body(), idle), len));
            return Ok(Object {
                digest,
                media_type,
                size,
                range: Some(range),
                body,
                source: "upstream",
            });
        }
        let size = oci::content_length(response.headers())
            .ok_or_else(|| "upstream sent no Content-Length for a blob".to_owned())?;
        // A 200 to a Range request: upstream ignored the range, which HTTP allows; the whole
        // blob is served (and verified), with `range: None` saying so.
        let body = (!request.head)
            .then(|| verified_body(data_stream(response.into_body(), idle), digest, size));
        Ok(Object {
            digest,
            media_type,
            size,
            range: None,
            body,
            source: "upstream",
        })
    }
}

/// `/v2/<repository>/<manifests|blobs>/<reference>`, refusing anything that could step outside
/// that path (the parts came from a client).
fn object_path(request: &ObjectRequest) -> Result<String, String> {
    let repository = &request.repository;
    crate::oci::validate_repository(repository)
        .map_err(|e| format!("invalid repository name `{repository}`: {e}"))?;
    let kind = match request.kind {
        Kind::Manifest => "manifests",
        Kind::Blob => "blobs",
    };
    let reference = match &request.reference {
        Reference::Digest(digest) => digest.to_string(),
        Reference::Tag(tag) if request.kind == Kind::Blob => {
            return Err(format!("blobs are addressed by digest, not `{tag}`"));
        }
        Reference::Tag(tag) => {
            crate::oci::validate_tag(tag).map_err(|e| format!("invalid tag `{tag}`: {e}"))?;
            tag.clone()
        }
    };
    Ok(format!("/v2/{repository}/{kind}/{reference}"))
}

fn check_announced(expected: Digest, announced: Option<Digest>) -> Result<(), String> {
    match announced {
        Some(announced) if announced != expected => {
            Err(format!("upstream announced {announced} for {expected}"))
        }
        _ => Ok(()),
    }
}

fn media_type(headers: &HeaderMap, kind: Kind) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or(value).trim())
        .filter(|value| !value.is_empty())
        .map_or_else(
            || match kind {
                Kind::Manifest => "application/vnd.oci.image.manifest.v1+json".to_owned(),
                Kind::Blob => "application/octet-stream".to_owned(),
            },
            str::to_owned,
        )
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, sync::Mutex};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::ServerConfig;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::oci::ByteRange;

    /// What a fake registry saw.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path_and_query: String,
        headers: HeaderMap,
        body: Bytes,
    }

    enum Reply {
        Respond(Response<Full<Bytes>>),
        /// Accept the request and never answer.
        Hang,
    }

    type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

    /// A registry fake on 127.0.0.1:0, TLS when given a server config.
    struct Fake {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Fake {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    async fn fake(tls: Option<Arc<ServerConfig>>, handler: Handler) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_server = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&seen_by_server);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let handler = Arc::clone(&handler);
                        let seen = Arc::clone(&seen);
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let record = Seen {
                                method: parts.method,
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|pq| pq.to_string())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                            };
                            seen.lock().unwrap().push(record.clone());
                            match handler(&record) {
                                Reply::Respond(response) => Ok::<_, Infallible>(response),
                                Reply::Hang => std::future::pending().await,
                            }
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(config) => {
                            let Ok(stream) = TlsAcceptor::from(config).accept(tcp).await else {
                                return;
                            };
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        None => builder.serve_connection(TokioIo::new(tcp), service).await,
                    };
                });
            }
        });
        Fake { addr, seen, task }
    }

    /// A test CA and a server certificate for `registry.test`, `localhost` and 127.0.0.1.
    struct Pki {
        roots: RootCertStore,
        server: Arc<ServerConfig>,
    }

    fn pki() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![
            "registry.test".to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .unwrap();
        Pki {
            roots,
            server: Arc::new(server),
        }
    }

    fn short_timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(500),
            response: Duration::from_millis(500),
            tag_response: Duration::from_millis(500),
            idle: Duration::from_millis(500),
        }
    }

    fn source(pki: &Pki) -> UpstreamSource {
        UpstreamSource::new(
            UpstreamClient::with_roots(pki.roots.clone(), Timeouts::default()).unwrap(),
        )
    }

    fn origin(fake: &Fake, tls: bool) -> Origin {
        Origin {
            addr: fake.addr,
            host: "registry.test".to_owned(),
            tls,
        }
    }

    fn request(kind: Kind, reference: Reference, origin: Option<Origin>) -> ObjectRequest {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("containerd/2.1"),
        );
        headers.insert("x-not-forwarded", HeaderValue::from_static("1"));
        ObjectRequest {
            kind,
            registry: Some("registry.test".to_owned()),
            repository: "library/app".to_owned(),
            reference,
            range: None,
            head: false,
            headers,
            origin,
            mirrored: false,
        }
    }

    fn respond(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> Reply {
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, *value);
        }
        Reply::Respond(response.body(Full::new(Bytes::from_static(body))).unwrap())
    }

    async fn collect(body: Body) -> Result<Vec<u8>, io::Error> {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    const BLOB: &[u8] = b"0123456789";

    fn blob_handler() -> Handler {
        Arc::new(|seen: &Seen| {
            if seen.path_and_query.contains(&Digest::of(BLOB).to_string()) {
                if let Some(range) = seen.headers.get(header::RANGE) {
                    assert_eq!(range, "bytes=2-5");
                    return respond(206, &[("content-range", "bytes 2-5/10")], b"2345");
                }
                return respond(200, &[("content-type", "application/octet-stream")], BLOB);
            }
            // Any other digest: serve the wrong bytes.
            respond(200, &[], b"not the content")
        })
    }

    #[tokio::test]
    async fn fetches_and_verifies_a_blob() {
        let pki = pki();
        let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        let digest = Digest::of(BLOB);
        let req = request(
            Kind::Blob,
            Reference::Digest(digest),
            Some(origin(&registry, true)),
        );
        let object = source(&pki).fetch(&req).await.unwrap();
        assert_eq!(object.digest, digest);
        assert_eq!(object.size, 10);
        assert_eq!(object.source, "upstream");
        assert_eq!(collect(object.body.unwrap()).await.unwrap(), BLOB);
        let seen = registry.seen();
        assert_eq!(seen[0].method, Method::GET);
        assert_eq!(
            seen[0].path_and_query,
            format!("/v2/library/app/blobs/{digest}")
        );
        assert_eq!(
            seen[0].headers[header::HOST],
            format!("registry.test:{}", registry.addr.port())
        );
        assert_eq!(seen[0].headers[header::AUTHORIZATION], "Bearer secret");
        assert_eq!(seen[0].headers[header::USER_AGENT], "containerd/2.1");
        assert!(!seen[0].headers.contains_key("x-not-forwarded"));
    }

    #[tokio::test]
    async fn wrong_bytes_end_the_body_with_an_error() {
        let pki = pki();
        let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        // Same length as the served bytes, so only the digest can tell.
        let digest = Digest::of(b"NOT THE CONTENT");
        let req = request(
            Kind::Blob,
            Reference::Digest(digest),
            Some(origin(&registry, true)),
        );
        let object = source(&pki).fetch(&req).await.unwrap();
        let err = collect(object.body.unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn forwards_ranges() {
        let pki = pki();
        let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        let mut req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin(&registry, true)),
        );
        req.range = Some(ByteRange::From {
            start: 2,
            end: Some(5),
        });
        let object = source(&pki).fetch(&req).await.unwrap();
        assert_eq!(object.range, Some(2..=5));
        assert_eq!(object.size, 10);
        assert_eq!(collect(object.body.unwrap()).await.unwrap(), b"2345");
        assert_eq!(registry.seen()[0].headers[header::RANGE], "bytes=2-5");
    }

    #[tokio::test]
    async fn manifests_are_verified() {
        const MANIFEST: &[u8] = br#"{"schemaVersion":2}"#;
        let pki = pki();
        let digest = Digest::of(MANIFEST);
        let announced = digest.to_string();
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(move |seen: &Seen| {
                let headers = [
                    ("content-type", "application/vnd.oci.image.manifest.v1+json"),
                    ("docker-content-digest", announced.as_str()),
                ];
                if seen.path_and_query.ends_with("/manifests/latest") {
                    respond(200, &headers, MANIFEST)
                } else if seen.path_and_query.ends_with("/manifests/lying") {
                    // Announces a digest the bytes do not have.
                    respond(200, &headers, b"{}")
                } else if seen.path_and_query.ends_with(&announced) {
                    respond(200, &headers, MANIFEST)
                } else {
                    respond(200, &[], b"{}")
                }
            }),
        )
        .await;
        let upstream = source(&pki);
        let at = Some(origin(&registry, true));

        let object = upstream
            .fetch(&request(
                Kind::Manifest,
                Reference::Digest(digest),
                at.clone(),
            ))
            .await
            .unwrap();
        assert_eq!(
            object.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(collect(object.body.unwrap()).await.unwrap(), MANIFEST);
        // containerd's Accept was absent: the manifest types were asked for.
        assert!(
            registry.seen()[0].headers[header::ACCEPT]
                .to_str()
                .unwrap()
                .contains("application/vnd.oci.image.index.v1+json")
        );

        let by_tag = upstream
            .fetch(&request(
                Kind::Manifest,
                Reference::Tag("latest".into()),
                at.clone(),
            ))
            .await
            .unwrap();
        assert_eq!(by_tag.digest, digest);
        assert_eq!(by_tag.size, MANIFEST.len() as u64);

        let lying = upstream
            .fetch(&request(
                Kind::Manifest,
                Reference::Tag("lying".into()),
                at.clone(),
            ))
            .await;
        assert!(
            matches!(lying, Err(SourceError::Unavailable(_))),
            "{lying:?}"
        );

        let other = Digest::of(b"something else");
        let wrong = upstream
            .fetch(&request(Kind::Manifest, Reference::Digest(other), at))
            .await;
        assert!(
            matches!(wrong, Err(SourceError::Unavailable(_))),
            "{wrong:?}"
        );
    }

    #[tokio::test]
    async fn challenges_pass_through_and_404_is_not_found() {
        let pki = pki();
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(|seen: &Seen| {
                if seen.path_and_query.contains("/missing/") {
                    return respond(404, &[], b"");
                }
                respond(
                    401,
                    &[
                        (
                            "www-authenticate",
                            r#"Bearer realm="https://auth.test/token",service="registry.test""#,
                        ),
                        ("content-type", "application/json"),
                        ("connection", "close"),
                    ],
                    br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                )
            }),
        )
        .await;
        let upstream = source(&pki);
        let at = Some(origin(&registry, true));
        let err = upstream
            .fetch(&request(
                Kind::Manifest,
                Reference::Tag("v1".into()),
                at.clone(),
            ))
            .await
            .unwrap_err();
        let SourceError::Upstream {
            status,
            headers,
            body,
        } = err
        else {
            panic!("expected the upstream answer, got {err:?}");
        };
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            headers[header::WWW_AUTHENTICATE],
            r#"Bearer realm="https://auth.test/token",service="registry.test""#
        );
        assert!(!headers.contains_key(header::CONNECTION));
        assert_eq!(&body[..], br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);

        let mut missing = request(Kind::Manifest, Reference::Tag("v1".into()), at);
        missing.repository = "missing/app".into();
        assert!(matches!(
            upstream.fetch(&missing).await,
            Err(SourceError::NotFound)
        ));
    }

    #[tokio::test]
    async fn follows_redirects_and_drops_credentials_across_hosts() {
        let pki = pki();
        let cdn = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        let cdn_port = cdn.addr.port();
        let digest = Digest::of(BLOB);
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(move |seen: &Seen| {
                if seen.path_and_query.starts_with("/v2/") {
                    // First hop: same host, relative Location.
                    let location = format!("/redirected/{digest}");
                    return Reply::Respond(
                        Response::builder()
                            .status(302)
                            .header(header::LOCATION, location)
                            .body(Full::default())
                            .unwrap(),
                    );
                }
                // Second hop: another host (resolved with DNS), carrying a signed query.
                let location = format!("https://localhost:{cdn_port}/v2/x/blobs/{digest}?sig=abc");
                Reply::Respond(
                    Response::builder()
                        .status(307)
                        .header(header::LOCATION, location)
                        .body(Full::default())
                        .unwrap(),
                )
            }),
        )
        .await;
        let req = request(
            Kind::Blob,
            Reference::Digest(digest),
            Some(origin(&registry, true)),
        );
        let object = source(&pki).fetch(&req).await.unwrap();
        assert_eq!(collect(object.body.unwrap()).await.unwrap(), BLOB);

        let at_registry = registry.seen();
        assert_eq!(at_registry.len(), 2);
        assert!(
            at_registry
                .iter()
                .all(|seen| seen.headers[header::AUTHORIZATION] == "Bearer secret")
        );
        let at_cdn = cdn.seen();
        assert_eq!(at_cdn.len(), 1);
        assert_eq!(
            at_cdn[0].path_and_query,
            format!("/v2/x/blobs/{digest}?sig=abc")
        );
        assert_eq!(
            at_cdn[0].headers[header::HOST],
            format!("localhost:{cdn_port}")
        );
        assert!(!at_cdn[0].headers.contains_key(header::AUTHORIZATION));
        assert_eq!(at_cdn[0].headers[header::USER_AGENT], "containerd/2.1");
    }

    #[tokio::test]
    async fn redirect_loops_are_bounded() {
        let pki = pki();
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(|_: &Seen| respond(302, &[("location", "/again")], b"")),
        )
        .await;
        let req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin(&registry, true)),
        );
        let result = source(&pki).fetch(&req).await;
        assert!(
            matches!(result, Err(SourceError::Unavailable(_))),
            "{result:?}"
        );
        assert_eq!(registry.seen().len(), MAX_REDIRECTS + 1);
    }

    #[tokio::test]
    async fn untrusted_certificates_are_refused() {
        let pki = pki();
        let other = self::pki();
        let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        let req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin(&registry, true)),
        );
        let result = source(&other).fetch(&req).await;
        let Err(SourceError::Unavailable(msg)) = result else {
            panic!("expected a TLS failure, got {result:?}");
        };
        assert!(msg.contains("certificate"), "{msg}");
        assert!(registry.seen().is_empty());
        // The right CA but the wrong name: refused too.
        let mut wrong_name = origin(&registry, true);
        wrong_name.host = "elsewhere.test".to_owned();
        let req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(wrong_name),
        );
        assert!(matches!(
            source(&pki).fetch(&req).await,
            Err(SourceError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn plain_http_origins_work() {
        let registry = fake(None, blob_handler()).await;
        let req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin(&registry, false)),
        );
        let object = source(&pki()).fetch(&req).await.unwrap();
        assert_eq!(collect(object.body.unwrap()).await.unwrap(), BLOB);
    }

    #[tokio::test]
    async fn only_intercepted_requests_are_fetched() {
        let pki = pki();
        let upstream = source(&pki);
        let req = request(Kind::Blob, Reference::Digest(Digest::of(BLOB)), None);
        assert!(matches!(
            upstream.fetch(&req).await,
            Err(SourceError::NotFound)
        ));
        let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
        let mut mirrored = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin(&registry, true)),
        );
        mirrored.mirrored = true;
        assert!(matches!(
            upstream.fetch(&mirrored).await,
            Err(SourceError::NotFound)
        ));
        let mut bad = request(
            Kind::Manifest,
            Reference::Tag("v1".into()),
            Some(origin(&registry, true)),
        );
        bad.repository = "../../etc".into();
        assert!(matches!(
            upstream.fetch(&bad).await,
            Err(SourceError::Invalid(_))
        ));
        assert!(registry.seen().is_empty());
    }

    #[tokio::test]
    async fn every_wait_is_bounded() {
        let pki = pki();
        let client = UpstreamClient::with_roots(pki.roots.clone(), short_timeouts()).unwrap();
        let upstream = UpstreamSource::new(client.clone());
        let digest = Digest::of(BLOB);

        // A peer that accepts TCP and never speaks TLS.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_origin = Origin {
            addr: silent.local_addr().unwrap(),
            host: "registry.test".into(),
            tls: true,
        };
        let req = request(Kind::Blob, Reference::Digest(digest), Some(silent_origin));
        let result = tokio::time::timeout(Duration::from_secs(10), upstream.fetch(&req))
            .await
            .expect("bounded by the connect timeout");
        assert!(
            matches!(result, Err(SourceError::Unavailable(_))),
            "{result:?}"
        );

        // A registry that takes the request and never answers.
        let hanging = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(|_: &Seen| Reply::Hang),
        )
        .await;
        let req = request(
            Kind::Blob,
            Reference::Digest(digest),
            Some(origin(&hanging, true)),
        );
        let result = tokio::time::timeout(Duration::from_secs(10), upstream.fetch(&req))
            .await
            .expect("bounded by the response timeout");
        let Err(SourceError::Unavailable(msg)) = result else {
            panic!("expected a timeout, got {result:?}");
        };
        assert!(msg.contains("did not answer"), "{msg}");
        assert_eq!(hanging.seen().len(), 1);
    }

    #[tokio::test]
    async fn a_stalled_body_is_aborted() {
        // Headers and half the body, then silence: hand-written HTTP over plain TCP.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await.unwrap();
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let client = UpstreamClient::with_roots(RootCertStore::empty(), short_timeouts()).unwrap();
        let origin = Origin {
            addr,
            host: "registry.test".into(),
            tls: false,
        };
        let req = request(
            Kind::Blob,
            Reference::Digest(Digest::of(BLOB)),
            Some(origin),
        );
        let object = UpstreamSource::new(client).fetch(&req).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), collect(object.body.unwrap()))
            .await
            .expect("bounded by the idle timeout")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        server.abort();
    }

    #[tokio::test]
    async fn forward_passes_requests_through_verbatim() {
        let pki = pki();
        let registry = fake(
            Some(Arc::clone(&pki.server)),
            Arc::new(|seen: &Seen| {
                Reply::Respond(
                    Response::builder()
                        .status(if seen.path_and_query.starts_with("/token") {
                            200
                        } else {
                            401
                        })
                        .header("www-authenticate", "Bearer realm=x")
                        .header("connection", "keep-alive, x-hop")
                        .header("x-hop", "1")
                        .header("x-end", "2")
                        .body(Full::new(seen.body.clone()))
                        .unwrap(),
                )
            }),
        )
        .await;
        let client = UpstreamClient::with_roots(pki.roots.clone(), Timeouts::default()).unwrap();
        let at = origin(&registry, true);

        let request = Request::builder()
            .method(Method::POST)
            .uri("/token?scope=repository%3Alibrary%2Fapp%3Apull")
            .header(header::HOST, "registry.test")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("connection", "x-client-hop")
            .header("x-client-hop", "1")
            .body(Full::new(Bytes::from_static(b"grant_type=refresh_token")))
            .unwrap();
        let response = client.forward(&at, request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-end"], "2");
        assert!(!response.headers().contains_key("x-hop"));
        assert!(!response.headers().contains_key(header::CONNECTION));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"grant_type=refresh_token");

        let seen = registry.seen();
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(
            seen[0].path_and_query,
            "/token?scope=repository%3Alibrary%2Fapp%3Apull"
        );
        assert_eq!(seen[0].headers[header::HOST], "registry.test");
        assert_eq!(
            seen[0].headers[header::CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert!(!seen[0].headers.contains_key("x-client-hop"));

        // An HTTP/2-style request: the host is in the URI, not in a Host header.
        let probe = Request::builder()
            .method(Method::GET)
            .uri("https://registry.test/v2/")
            .version(Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = client.forward(&at, probe).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], "Bearer realm=x");
        let seen = registry.seen();
        assert_eq!(seen[1].path_and_query, "/v2/");
        assert_eq!(seen[1].headers[header::HOST], "registry.test");
    }

    #[tokio::test]
    async fn forward_failures_become_gateway_errors() {
        let client = UpstreamClient::with_roots(RootCertStore::empty(), short_timeouts()).unwrap();
        let request = || Request::new(Empty::<Bytes>::new());
        let response = client.forward_or_respond(None, request()).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        // Nothing listens there any more: connection refused.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let refused = Origin {
            addr,
            host: "registry.test".into(),
            tls: false,
        };
        let response = client.forward_or_respond(Some(&refused), request()).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);

        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hanging = Origin {
            addr: silent.local_addr().unwrap(),
            host: "registry.test".into(),
            tls: false,
        };
        let response = client.forward_or_respond(Some(&hanging), request()).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn targets_round_trip_through_the_synthetic_uri() {
        for target in [
            Target {
                tls: true,
                host: "registry-1.docker.io".into(),
                port: 443,
                pinned: Some("[2001:db8::1]:443".parse().unwrap()),
            },
            Target {
                tls: false,
                host: "10.0.0.1".into(),
                port: 5000,
                pinned: None,
            },
        ] {
            let uri = target.uri("/v2/x/blobs/y?a=b").unwrap();
            assert_eq!(Target::decode(&uri).unwrap(), target);
            assert_eq!(uri.path_and_query().unwrap(), "/v2/x/blobs/y?a=b");
        }
        assert!(Target::decode(&"https://registry.test/".parse().unwrap()).is_err());
        assert_eq!(host_only("registry:5000"), "registry");
        assert_eq!(host_only("[fd00::1]:5000"), "fd00::1");
        assert_eq!(host_only("fd00::1"), "fd00::1");
    }
}
