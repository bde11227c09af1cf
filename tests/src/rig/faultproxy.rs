//! A fault-injecting proxy in front of the rig's real registry: a registry that misbehaves on
//! demand (answers 503 or 429 with `Retry-After`, stalls or breaks blob bodies, resets
//! connections, redirects blob requests elsewhere), switchable while a test runs, counting every
//! request.
//!
//! Where it sits: it listens *inside the registry's network namespace*, on the registry's own
//! address and [`FaultProxy::PORT`], so `registry.<prefix>.test:6443` (the name every node
//! resolves to the registry's IP) leads to it, exactly as a registry would be reached. The
//! listening socket is made on a short-lived thread that entered that namespace; the proxy
//! itself runs on the test's runtime, and reaches the registry's plain-HTTP listener over the
//! bridge.
//!
//! TLS: HTTP-level faults need the requests in clear, so the proxy terminates TLS itself, with a
//! leaf for the registry's name and IP issued by the rig's test CA — the CA the daemons trust
//! for upstreams (`--upstream-ca-file`) and containerd trusts in its bundle. Behind it, requests
//! go to the registry's plain listener (`:5000`) over HTTP/1.1, so every image pushed at rig
//! start-up can be pulled through it.
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, BodyStream, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{Endpoint, Rig, TestImage};

/// How long a stalled body stays silent before the proxy gives up on it (far beyond any idle
/// timeout a test sets, so the client always gives up first).
const STALL: Duration = Duration::from_secs(120);
/// Bound on a client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy does; see [`FaultProxy::set_fault`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every request goes to the registry and back untouched.
    PassThrough,
    /// Every request is answered with `status` (e.g. 503, 429) and an OCI error body, with
    /// `Retry-After: <retry_after>` when set; the registry is not asked.
    Answer {
        status: u16,
        retry_after: Option<String>,
    },
    /// The next `times` blob GETs longer than `after` bytes send `after` bytes of their body,
    /// then nothing more (for minutes); then everything passes through again.
    StallBlobs { after: u64, times: usize },
    /// Like [`Fault::StallBlobs`], but the connection is reset after `after` bytes.
    ResetBlobs { after: u64, times: usize },
    /// Every new connection is reset at once (TCP RST, before TLS).
    ResetConnections,
    /// Every blob request (GET or HEAD) is answered `307` with `Location: <to><path>`, e.g.
    /// `https://127.0.0.1:8443` + `/v2/<repository>/blobs/<digest>`; the registry is not asked.
    RedirectBlobs { to: String },
}

/// A request the proxy saw, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// Who sent it (a node's IP for its daemon or its containerd).
    pub peer: IpAddr,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Its `Range` header.
    pub range: Option<String>,
    /// The status the client got.
    pub status: u16,
    /// The fault applied to it, if any.
    pub fault: Option<Fault>,
}

impl ProxiedRequest {
    /// A blob request for `digest`.
    pub fn is_blob(&self, digest: &str) -> bool {
        self.path.contains("/blobs/") && self.path.ends_with(digest)
    }

    /// A manifest request by `tag` (`/manifests/<tag>`).
    pub fn is_tag(&self, tag: &str) -> bool {
        self.path.ends_with(&format!("/manifests/{tag}"))
    }
}

#[derive(Debug)]
struct State {
    fault: Mutex<Fault>,
    seen: Mutex<Vec<ProxiedRequest>>,
    resets: AtomicUsize,
}

impl State {
    fn fault(&self) -> Fault {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The body fault for a blob response of `len` bytes, if one applies (using up one of its
    /// `times`).
    fn take_body_fault(&self, len: Option<u64>) -> Option<Fault> {
        let mut fault = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        let stall = matches!(&*fault, Fault::StallBlobs { .. });
        let (Fault::StallBlobs { after, times } | Fault::ResetBlobs { after, times }) = &mut *fault
        else {
            return None;
        };
        if *times == 0 || len.is_none_or(|len| len <= *after) {
            return None;
        }
        *times -= 1;
        let after = *after;
        let applied = if stall {
            Fault::StallBlobs { after, times: 1 }
        } else {
            Fault::ResetBlobs { after, times: 1 }
        };
        Some(applied)
    }

    fn record(&self, request: ProxiedRequest) {
        tracing::debug!(?request, "fault proxy");
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }
}

/// The running proxy; stopped when dropped.
pub struct FaultProxy {
    hostname: String,
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("fault", &self.state.fault())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

impl FaultProxy {
    /// The TLS port it listens on, on the registry's address.
    pub const PORT: u16 = 6443;

    /// Starts the proxy in `rig`'s registry namespace, passing everything through.
    pub async fn start(rig: &Rig) -> Result<Self> {
        let registry = rig.registry();
        let addr = SocketAddr::from((registry.ip(), Self::PORT));
        let dir = rig.scratch_dir().join("faultproxy");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert = rig.ca().issue(
            &dir,
            "faultproxy",
            &[registry.hostname().to_owned(), registry.ip().to_string()],
        )?;
        let tls = tls_config(&cert.cert_path, &cert.key_path)?;
        let netns = registry.netns().to_owned();
        let listener = tokio::task::spawn_blocking(move || listen_in_netns(&netns, addr))
            .await
            .context("listener thread failed")??;
        let listener = TcpListener::from_std(listener).context("registering the listener")?;
        let state = Arc::new(State {
            fault: Mutex::new(Fault::PassThrough),
            seen: Mutex::new(Vec::new()),
            resets: AtomicUsize::new(0),
        });
        let backend = registry.addr(Endpoint::Plain);
        let task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            Arc::clone(&state),
            backend,
        ));
        Ok(Self {
            hostname: registry.hostname().to_owned(),
            addr,
            state,
            task,
        })
    }

    /// From now on, do `fault`.
    pub fn set_fault(&self, fault: Fault) {
        tracing::info!(?fault, "fault proxy switched");
        *self
            .state
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fault;
    }

    /// The fault in force (with what is left of its `times`).
    pub fn fault(&self) -> Fault {
        self.state.fault()
    }

    /// `registry.<prefix>.test:6443`: the registry as pulls through the proxy name it.
    pub fn host(&self) -> String {
        format!("{}:{}", self.hostname, Self::PORT)
    }

    /// `<ip>:6443`.
    pub fn ip_host(&self) -> String {
        self.addr.to_string()
    }

    /// `registry.<prefix>.test:6443/<repository>:<tag>`.
    pub fn reference(&self, image: &TestImage) -> String {
        format!("{}/{}:{}", self.host(), image.repository, image.tag)
    }

    /// `registry.<prefix>.test:6443/<repository>@<digest>`.
    pub fn digest_reference(&self, image: &TestImage) -> String {
        format!("{}/{}@{}", self.host(), image.repository, image.digest())
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests so far from `peer`.
    pub fn requests_from(&self, peer: impl Into<IpAddr>) -> Vec<ProxiedRequest> {
        let peer = peer.into();
        self.requests()
            .into_iter()
            .filter(|r| r.peer == peer)
            .collect()
    }

    /// Connections reset at accept so far ([`Fault::ResetConnections`]).
    pub fn connection_resets(&self) -> usize {
        self.state.resets.load(Ordering::SeqCst)
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the proxy's certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A listening socket on `addr` in network namespace `netns`.
pub(crate) fn listen_in_netns(netns: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    super::net::in_netns(netns, || {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("listening on {addr} in {netns}"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
}

type ProxyBody = UnsyncBoxBody<Bytes, io::Error>;

async fn accept_loop(
    listener: TcpListener,
    tls: TlsAcceptor,
    state: Arc<State>,
    backend: SocketAddr,
) {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match state.fault() {
            Fault::ResetConnections => {
                state.resets.fetch_add(1, Ordering::SeqCst);
                reset(tcp);
                continue;
            }
            // A body cut short closes the connection: make that a reset, not a clean close.
            Fault::ResetBlobs { .. } => {
                let _ = tcp.set_zero_linger();
            }
            _ => {}
        }
        let (tls, state, client) = (tls.clone(), Arc::clone(&state), client.clone());
        connections.spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                return;
            };
            let service = service_fn(move |request: Request<Incoming>| {
                let (state, client) = (Arc::clone(&state), client.clone());
                async move {
                    Ok::<_, Infallible>(handle(&state, &client, backend, peer.ip(), request).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn handle(
    state: &State,
    client: &Client<HttpConnector, Incoming>,
    backend: SocketAddr,
    peer: IpAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut seen = ProxiedRequest {
        peer,
        method,
        path: path.clone(),
        range,
        status: 0,
        fault: None,
    };
    if let Fault::Answer {
        status,
        retry_after,
    } = state.fault()
    {
        let response = answer(status, retry_after.as_deref());
        seen.status = response.status().as_u16();
        seen.fault = Some(Fault::Answer {
            status,
            retry_after,
        });
        state.record(seen);
        return response;
    }
    if let Fault::RedirectBlobs { to } = state.fault()
        && path.contains("/blobs/")
    {
        let response = redirect(&format!("{to}{path}"));
        seen.status = response.status().as_u16();
        seen.fault = Some(Fault::RedirectBlobs { to });
        state.record(seen);
        return response;
    }
    let (mut parts, body) = request.into_parts();
    parts.uri = match format!("http://{backend}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return answer(400, None),
    };
    let is_blob_get = parts.method == http::Method::GET && path.contains("/blobs/");
    let response = match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, "fault proxy: the registry failed");
            seen.status = 502;
            state.record(seen);
            return answer(502, None);
        }
    };
    seen.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let fault = if is_blob_get && parts.status.is_success() {
        state.take_body_fault(len)
    } else {
        None
    };
    seen.fault = fault.clone();
    state.record(seen);
    let body = match fault {
        Some(Fault::StallBlobs { after, .. }) => cut(body, after, false),
        Some(Fault::ResetBlobs { after, .. }) => cut(body, after, true),
        _ => body.map_err(io::Error::other).boxed_unsync(),
    };
    Response::from_parts(parts, body)
}

/// `body`'s first `after` bytes, then silence (`reset == false`) or a broken connection.
fn cut(body: Incoming, after: u64, reset: bool) -> ProxyBody {
    let frames = BodyStream::new(body)
        .scan(after, |left, frame| {
            let item = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(mut data) if *left > 0 => {
                        let keep = (*left).min(data.len() as u64);
                        data.truncate(keep as usize);
                        *left -= keep;
                        Some(Ok(Frame::data(data)))
                    }
                    _ => None,
                },
                Err(error) => Some(Err(io::Error::other(error))),
            };
            let go_on = *left > 0 || item.is_some();
            std::future::ready(go_on.then_some(item))
        })
        .filter_map(std::future::ready);
    let end = futures::stream::once(async move {
        if reset {
            // A moment first, so the bytes leave before the connection breaks.
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            tokio::time::sleep(STALL).await;
        }
        Err(io::Error::other("fault proxy cut the body"))
    });
    StreamBody::new(frames.chain(end)).boxed_unsync()
}

/// A `307` to `location`, with an empty body.
fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The proxy's own answer: an OCI error body, `Retry-After` when given.
fn answer(status: u16, retry_after: Option<&str>) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
        StatusCode::BAD_REQUEST => "UNSUPPORTED",
        _ => "UNAVAILABLE",
    };
    let body = format!(
        r#"{{"errors":[{{"code":"{code}","message":"fault proxy answers {}"}}]}}"#,
        status.as_u16()
    );
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_faults_apply_to_long_blobs_only_and_are_used_up() {
        let state = State {
            fault: Mutex::new(Fault::StallBlobs {
                after: 100,
                times: 2,
            }),
            seen: Mutex::new(Vec::new()),
            resets: AtomicUsize::new(0),
        };
        assert_eq!(
            state.take_body_fault(Some(100)),
            None,
            "not longer than after"
        );
        assert_eq!(state.take_body_fault(None), None, "length unknown");
        let applied = Some(Fault::StallBlobs {
            after: 100,
            times: 1,
        });
        assert_eq!(state.take_body_fault(Some(101)), applied);
        assert_eq!(state.take_body_fault(Some(101)), applied);
        assert_eq!(state.take_body_fault(Some(101)), None, "used up");
        assert_eq!(
            state.fault(),
            Fault::StallBlobs {
                after: 100,
                times: 0
            }
        );
    }

    #[tokio::test]
    async fn answers_carry_retry_after_and_an_oci_error() {
        let response = answer(429, Some("30"));
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "30");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("TOOMANYREQUESTS"),
            "{body:?}"
        );
        assert!(
            !answer(503, None)
                .headers()
                .contains_key(header::RETRY_AFTER)
        );
    }
}
