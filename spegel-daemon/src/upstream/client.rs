//! [`UpstreamClient`]: the HTTP client for upstream registries (verified TLS, pooled
//! connections, every wait bounded), verbatim passthrough of intercepted requests, and the
//! request loop that follows redirects as [`redirect::decide`] says.
use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioTimer},
};
use rustls::RootCertStore;
use tokio_rustls::TlsConnector;

use super::{
    Timeouts, UpstreamArgs, UpstreamError,
    body::idle_bounded,
    connect::{Connector, DialsAhead},
    error::error_chain,
    hop_by_hop::strip_hop_by_hop,
    redirect::{self, Decision, Hop},
    redirect_addr::{self, RedirectAddrs},
    target::Target,
    trust,
};
use crate::{
    body::{BoxBody, BoxError},
    net::Cidr,
    source::Origin,
};

/// An HTTP client for upstream registries: verified TLS, pooled connections, bounded waits.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, BoxBody>,
    /// The pool's connector, for dials made ahead of a request.
    connector: Connector,
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
    /// `--upstream-ca-file`s, following redirects to special or own addresses only within
    /// `--upstream-allow-redirect-to`. Blocking file IO: call at startup.
    pub fn new(args: &UpstreamArgs) -> Result<Self, UpstreamError> {
        let roots = trust::roots(&args.upstream_ca_files)?;
        Self::build(
            roots,
            Timeouts::from(args),
            RedirectAddrs::new(args.upstream_allow_redirect_to.clone()),
        )
    }

    /// A client trusting exactly `roots`, with the default redirect address policy.
    pub fn with_roots(roots: RootCertStore, timeouts: Timeouts) -> Result<Self, UpstreamError> {
        Self::build(roots, timeouts, RedirectAddrs::default())
    }

    /// [`Self::with_roots`], a connection dialled ahead closed after `keep` if nothing took it.
    #[cfg(test)]
    pub(super) fn with_warm_keep(
        roots: RootCertStore,
        timeouts: Timeouts,
        keep: Duration,
    ) -> Result<Self, UpstreamError> {
        let connector = Self::connector(roots, timeouts, RedirectAddrs::default())?;
        Ok(Self::pooled(connector.with_warm_keep(keep), timeouts))
    }

    /// [`Self::with_roots`], redirects allowed to any address within `allowed` too (tests
    /// whose servers are all on loopback).
    pub fn with_roots_allowing_redirects_to(
        roots: RootCertStore,
        timeouts: Timeouts,
        allowed: Vec<Cidr>,
    ) -> Result<Self, UpstreamError> {
        Self::build(roots, timeouts, RedirectAddrs::new(allowed))
    }

    fn build(
        roots: RootCertStore,
        timeouts: Timeouts,
        redirects: RedirectAddrs,
    ) -> Result<Self, UpstreamError> {
        Ok(Self::pooled(
            Self::connector(roots, timeouts, redirects)?,
            timeouts,
        ))
    }

    fn connector(
        roots: RootCertStore,
        timeouts: Timeouts,
        redirects: RedirectAddrs,
    ) -> Result<Connector, UpstreamError> {
        let config = trust::client_config(roots)?;
        Ok(Connector::new(
            TlsConnector::from(Arc::new(config)),
            timeouts.connect,
            redirects,
        ))
    }

    fn pooled(connector: Connector, timeouts: Timeouts) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(connector.clone());
        Self {
            client,
            connector,
            timeouts,
        }
    }

    /// What became of the dials [`Self::warm_up`] made (for `/metrics`).
    pub fn dials_ahead(&self) -> Arc<DialsAhead> {
        self.connector.dials_ahead()
    }

    /// Dials `origin` ahead of a request that is about to come (containerd is still in its
    /// TLS handshake with this daemon), unless this client used it within the last 30 s (the
    /// pool most likely has a connection) or is dialling it already. The request's own dial
    /// takes that connection, or waits for it; one nothing takes is closed after 10 s.
    /// Whether a dial started.
    pub fn warm_up(&self, origin: &Origin) -> bool {
        let Ok(target) = Target::from_origin(origin) else {
            return false;
        };
        self.connector.warm_up(target)
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
            .map_or_else(|| target.host_header(), Ok)?;
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
            idle_bounded(body, self.timeouts.idle),
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
        let key = request.uri().authority().map(|a| a.as_str().to_owned());
        let sent = tokio::time::timeout(header_timeout, self.client.request(request)).await;
        if let Some(key) = key {
            // Answered: the pool has a connection; failed: no point dialling ahead for a while.
            self.connector.warm().used(&key);
        }
        match sent {
            Err(_) => Err(UpstreamError::Timeout {
                target: target.to_string(),
                timeout: header_timeout,
            }),
            Ok(Err(err)) => match redirect_addr::refusal_in(&err) {
                Some(refused) => Err(UpstreamError::RedirectRefused(refused.to_string())),
                None => Err(UpstreamError::Request {
                    target: target.to_string(),
                    detail: error_chain(&err),
                }),
            },
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// GET/HEAD `path` on `origin` with `headers`, following redirects; returns the final
    /// response.
    pub(super) async fn get_following_redirects(
        &self,
        origin: &Origin,
        method: Method,
        path: &str,
        headers: HeaderMap,
        header_timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let origin_target = Target::from_origin(origin)?;
        let mut hop = Hop {
            target: origin_target.clone(),
            path_and_query: path.to_owned(),
            headers,
        };
        let mut redirects = 0;
        loop {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(hop.target.uri(&hop.path_and_query)?)
                .body(
                    Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .map_err(|e| UpstreamError::InvalidRequest(e.to_string()))?;
            *request.headers_mut() = hop.headers.clone();
            request
                .headers_mut()
                .insert(header::HOST, hop.target.host_header()?);
            let response = self.send(&hop.target, request, header_timeout).await?;
            let status = response.status();
            let location = response.headers().get(header::LOCATION);
            match redirect::decide(&origin_target, &hop, redirects, status, location) {
                Ok(Decision::Stop) => return Ok(response),
                Ok(Decision::Follow(next)) => {
                    tracing::debug!(from = %hop.target, to = %next.target, %status, "following redirect");
                    hop = next;
                    redirects += 1;
                }
                Err(reason) => {
                    return Err(UpstreamError::Redirect {
                        target: hop.target.to_string(),
                        reason,
                    });
                }
            }
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
