//! The pull-only OCI distribution API (Spegel-compatible): routing, the answer to every request,
//! and the HTTP/1.1 + h2c server that carries it.
//!
//! One [`Registry`] serves two kinds of client. In mirror mode containerd (via `hosts.toml`) and
//! other spegel nodes talk to the registry port, naming the upstream with `?ns=`; a miss is a 404
//! so containerd falls back to the next host. In transparent mode the interception layer hands
//! over connections containerd meant for the upstream itself, with a [`RequestContext`] saying
//! where they were going; pulls are answered from the [`Source`] chain and everything else goes to
//! a [`Passthrough`].
use std::{net::SocketAddr, num::NonZeroUsize, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};

use crate::{
    body::{BoxBody as HttpBody, BoxError},
    membership::{AUTH_HEADER, PeerAuth},
    metrics,
    oci::{
        self, API_VERSION_HEADER, CONTENT_DIGEST_HEADER, ErrorBody, ErrorCode, Kind,
        MIRRORED_HEADER, PUBLIC_ONLY_HEADER, ParseError, Reference, digest::Digest,
    },
    peers::burst::{CLAIM_PATH, Claims, valid_peer_id},
    source::{Object, ObjectRequest, Origin, Payload, Source, SourceError},
    store::{Store, StoreError},
};

mod body;
mod bounds;
mod sendfile;
mod server;
#[cfg(test)]
mod tests;

pub use server::{is_write_timeout, serve};

/// Renders the metrics registry in the OpenMetrics text format (`# EOF` included), for
/// `/metrics`; the route re-renders it in the Prometheus text format for clients that prefer it.
pub type MetricsEncoder = Arc<dyn Fn() -> Result<String, std::fmt::Error> + Send + Sync>;

/// Connections served at once unless told otherwise (the flag's default too).
const DEFAULT_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();
/// Connections one client IP may hold at once unless told otherwise (the flag's default too).
const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: NonZeroUsize = NonZeroUsize::new(64).unwrap();
/// How long a connection may go without a request in flight unless told otherwise (the flag's
/// default too): longer than clients' own idle pool timeouts (Go's and hyper's are 90s), so
/// they, not we, close idle connections and never reuse one we are closing.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `/readyz` waits for the readiness check before saying no.
const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// Flags of the registry API.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// Address of the registry API: containerd's mirror endpoint, peers, probes and metrics.
    #[arg(long, env = "SPEGEL_REGISTRY_ADDR", default_value = "0.0.0.0:5000")]
    pub registry_addr: SocketAddr,
    /// Most client connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "SPEGEL_REGISTRY_MAX_CONNECTIONS", default_value = "1024")]
    pub registry_max_connections: NonZeroUsize,
    /// Most connections one client IP may hold at once; a further one is closed at once (and
    /// counted), so one host cannot hold every slot.
    #[arg(
        long,
        env = "SPEGEL_REGISTRY_MAX_CONNECTIONS_PER_CLIENT",
        default_value = "64"
    )]
    pub registry_max_connections_per_client: NonZeroUsize,
    /// A connection (HTTP/1.1 keep-alive or h2c) with no request in flight for this long is
    /// closed. A humantime duration ("90s", "2m"); must not be zero.
    #[arg(long, env = "SPEGEL_REGISTRY_IDLE_TIMEOUT", value_parser = parse_idle_timeout, default_value = "2m")]
    pub registry_idle_timeout: Duration,
    /// A connection whose response writes make no progress for this long (the client stopped
    /// reading) is closed, freeing its slot and what its response held. Not zero.
    #[arg(long, env = "SPEGEL_REGISTRY_WRITE_TIMEOUT", value_parser = parse_idle_timeout, default_value = "30s")]
    pub registry_write_timeout: Duration,
    /// A client must send a request's headers within this long of starting them (HTTP/1.1),
    /// or its connection is closed. Not zero.
    #[arg(long, env = "SPEGEL_REGISTRY_HEADER_TIMEOUT", value_parser = parse_idle_timeout, default_value = "30s")]
    pub registry_header_timeout: Duration,
}

/// A humantime duration that is not zero.
fn parse_idle_timeout(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration.is_zero() => Err("must not be zero".into()),
        Ok(duration) => Ok(duration),
        Err(err) => Err(err.to_string()),
    }
}

/// Whether this node can serve. `/readyz` answers 200 when [`Readiness::check`] is `Ok`.
#[async_trait::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not.
    async fn check(&self) -> Result<(), String>;
}

/// Ready when the content store answers. A node without peers is still ready: it serves what it
/// has, and mirror-mode clients fall back on a miss.
pub struct StoreReadiness {
    store: Arc<dyn Store>,
}

impl StoreReadiness {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Readiness for StoreReadiness {
    async fn check(&self) -> Result<(), String> {
        // A tag no image can have: a cheap round trip through the store that must say NotFound.
        match self.store.resolve("readyz.spegel.invalid/probe:none").await {
            Ok(_) | Err(StoreError::NotFound) => Ok(()),
            Err(StoreError::Unavailable(reason)) => Err(reason),
        }
    }
}

/// Where requests that are not pulls go in transparent mode: the upstream the connection was
/// meant for (token flows, `/v2/` probes, pushes, unknown paths). Implemented by the upstream
/// client.
#[async_trait::async_trait]
pub trait Passthrough: Send + Sync + 'static {
    /// Forward `request` unchanged and return the upstream's answer. Failures are answered by
    /// the implementation (typically 502).
    async fn forward(
        &self,
        request: Request<HttpBody>,
        origin: Option<&Origin>,
    ) -> Response<HttpBody>;
}

/// Who sent a request, as the connection it arrived on shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Caller {
    /// Nothing known: plain HTTP from another host.
    #[default]
    Remote,
    /// A process on this node: loopback, or a connection to this node's own address from it.
    Local,
    /// A cluster member: its TLS client certificate comes from a cluster CA.
    Member,
}

/// What the connection a request arrived on says about it.
#[derive(Clone, Default)]
pub struct RequestContext {
    /// Who sent it.
    pub caller: Caller,
    /// Set for transparently intercepted connections: where containerd was going.
    pub origin: Option<Origin>,
    /// The registry the request is for, from the intercepted host; overrides `?ns=`.
    pub registry: Option<String>,
    /// Transparent mode: where everything but pulls goes.
    pub passthrough: Option<Arc<dyn Passthrough>>,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("caller", &self.caller)
            .field("origin", &self.origin)
            .field("registry", &self.registry)
            .field("passthrough", &self.passthrough.is_some())
            .finish()
    }
}

/// The registry API: routes requests to the source, probes and metrics.
pub struct Registry {
    source: Arc<dyn Source>,
    readiness: Option<Arc<dyn Readiness>>,
    metrics: Option<MetricsEncoder>,
    max_connections: NonZeroUsize,
    max_connections_per_client: NonZeroUsize,
    client_slots: Arc<bounds::ClientSlots>,
    idle_timeout: Duration,
    write_timeout: Duration,
    stats: Arc<metrics::ConnectionStats>,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    /// Who may read content besides this node itself and intercepted connections.
    peer_auth: PeerAuth,
    header_timeout: Duration,
    /// Where each finished response is recorded for the admin status page.
    recent: Option<Arc<crate::metrics::recent::RecentServed>>,
    /// Cold-burst claims this node coordinates (`peers::burst`); `None`: claims get 404.
    claims: Option<Arc<Claims>>,
}

/// What a request asks for, before anything is fetched.
enum Route {
    Livez,
    Readyz,
    Metrics,
    /// `GET /v2/`: the API version check.
    ApiVersion,
    Pull(Box<ObjectRequest>),
    /// A member claims a blob at its cold-burst coordinator (`peers::burst`).
    Claim {
        digest: Digest,
        by: String,
    },
    /// Answered without asking anyone: a bad or unsupported request.
    Reject(Rejection),
}

/// An error answer decided while routing.
struct Rejection {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl Registry {
    /// A registry answering pulls from `source`, ready unless told otherwise, without metrics.
    pub fn new(source: Arc<dyn Source>) -> Self {
        Self {
            source,
            readiness: None,
            metrics: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            client_slots: bounds::ClientSlots::new(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            write_timeout: server::DEFAULT_WRITE_TIMEOUT,
            stats: Arc::default(),
            builder: server::builder(server::DEFAULT_HEADER_TIMEOUT),
            peer_auth: PeerAuth::Open,
            header_timeout: server::DEFAULT_HEADER_TIMEOUT,
            recent: None,
            claims: None,
        }
    }

    /// Coordinates cold-burst claims with `claims` (members only, like content); `None`:
    /// claims get 404.
    pub fn with_claims(mut self, claims: Option<Arc<Claims>>) -> Self {
        self.claims = claims;
        self
    }

    /// Records every served object (source, size, duration) into `recent`.
    pub fn with_recent(mut self, recent: Arc<crate::metrics::recent::RecentServed>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// Content goes to other hosts only when `auth` admits them: a TLS client certificate from
    /// a cluster CA, or an authenticated-plaintext request; anyone else gets 401. This node's
    /// own processes and intercepted connections are always served. Default: open.
    pub fn with_peer_auth(mut self, auth: PeerAuth) -> Self {
        self.peer_auth = auth;
        self
    }

    /// Whether `request` may be answered with content; for authenticated-plaintext requests,
    /// the token the answer must be signed for.
    fn authorize<B>(
        &self,
        request: &Request<B>,
        ctx: &RequestContext,
    ) -> Result<Option<HeaderValue>, Response<HttpBody>> {
        if ctx.origin.is_some() || matches!(ctx.caller, Caller::Local | Caller::Member) {
            return Ok(None);
        }
        match &self.peer_auth {
            PeerAuth::Open => return Ok(None),
            PeerAuth::Plaintext(auth) => {
                let token = request.headers().get(AUTH_HEADER);
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                if auth.verify_request(request.method(), path, token, std::time::SystemTime::now())
                {
                    return Ok(token.cloned());
                }
            }
            PeerAuth::Tls(_) => {}
        }
        self.stats
            .unauthorized
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(
            path = request.uri().path(),
            "content request refused: not a cluster member"
        );
        Err(Rejection {
            status: StatusCode::UNAUTHORIZED,
            code: ErrorCode::Unauthorized,
            message: "content is served to cluster members only".into(),
        }
        .into_response())
    }

    /// Answer `/readyz` with `readiness`.
    pub fn with_readiness(mut self, readiness: Arc<dyn Readiness>) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// Serve `/metrics` with `encoder`.
    pub fn with_metrics(mut self, encoder: MetricsEncoder) -> Self {
        self.metrics = Some(encoder);
        self
    }

    /// Serve at most `max` connections at once in [`serve`].
    pub fn with_max_connections(mut self, max: NonZeroUsize) -> Self {
        self.max_connections = max;
        self
    }

    /// In [`serve`], let one client IP hold at most `max` connections at once.
    pub fn with_max_connections_per_client(mut self, max: NonZeroUsize) -> Self {
        self.max_connections_per_client = max;
        self.client_slots = bounds::ClientSlots::new(max);
        self
    }

    /// In [`serve`], close a connection with no request in flight for `idle`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Connections [`serve`] refused so far because their client held its share.
    pub fn refused_connections(&self) -> u64 {
        self.stats
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Answer one request. Never fails: every problem is an HTTP answer. A response body may
    /// still fail mid-stream (a source dying), which aborts the response instead of ending it.
    pub async fn handle<B>(&self, request: Request<B>, ctx: RequestContext) -> Response<HttpBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (response, log) = self.respond(request, ctx).await;
        log.finish(response)
    }

    /// [`Registry::handle`] without the access log attached: the caller writes it, through
    /// [`body::AccessLog::finish`] or, for a body it sends another way, [`body::AccessLog::sent`].
    async fn respond<B>(
        &self,
        request: Request<B>,
        ctx: RequestContext,
    ) -> (Response<HttpBody>, body::AccessLog)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut log = body::AccessLog::new(request.method(), request.uri().path());
        if let Some(recent) = &self.recent {
            log.record_into(Arc::clone(recent));
        }
        let head = request.method() == Method::HEAD;
        let route = route(&request, &ctx);
        let mut plaintext_token = None;
        if matches!(route, Route::Pull(_) | Route::Claim { .. }) {
            match self.authorize(&request, &ctx) {
                Ok(token) => plaintext_token = token,
                Err(refusal) => return (refusal, log),
            }
        }
        let mut response = match (route, &ctx.passthrough) {
            (Route::Pull(object_request), _) => self.pull(*object_request, &ctx, &mut log).await,
            // Transparent mode: the upstream answers everything that is not a pull we can serve,
            // including requests we would reject: it is the authority on its own API.
            (_, Some(passthrough)) => {
                log.set_source("passthrough");
                let request = request.map(|body| body.map_err(Into::into).boxed_unsync());
                let response = passthrough.forward(request, ctx.origin.as_ref()).await;
                return (response, log);
            }
            (Route::Claim { digest, by }, None) => match &self.claims {
                Some(claims) => text_response(StatusCode::OK, claims.claim(digest, &by)),
                None => Rejection::not_found("this node coordinates no claims").into_response(),
            },
            (Route::Livez, None) => text_response(StatusCode::OK, "ok"),
            (Route::Readyz, None) => self.readyz().await,
            (Route::Metrics, None) => self.metrics(request.headers()),
            (Route::ApiVersion, None) => api_version_response(),
            (Route::Reject(rejection), None) => rejection.into_response(),
        };
        if head {
            // Headers only, `Content-Length` included: what a GET would have sent.
            *response.body_mut() = empty_body();
        }
        if let (Some(token), PeerAuth::Plaintext(auth)) = (&plaintext_token, &self.peer_auth) {
            let tag = auth.sign_response(
                token,
                response.status(),
                response.headers().get(CONTENT_DIGEST_HEADER),
            );
            response.headers_mut().insert(AUTH_HEADER, tag);
        }
        (response, log)
    }

    async fn pull(
        &self,
        request: ObjectRequest,
        ctx: &RequestContext,
        log: &mut body::AccessLog,
    ) -> Response<HttpBody> {
        let intercepted = ctx.origin.is_some();
        let result = match self.source.fetch(&request).await {
            Ok(object) => check_object(&request, object),
            Err(err) => Err(err),
        };
        match result {
            Ok(object) => {
                log.set_source(object.source);
                object_response(&request, object)
            }
            Err(err) => source_error_response(err, &request, intercepted),
        }
    }

    async fn readyz(&self) -> Response<HttpBody> {
        let Some(readiness) = &self.readiness else {
            return text_response(StatusCode::OK, "ok");
        };
        match tokio::time::timeout(READINESS_TIMEOUT, readiness.check()).await {
            Ok(Ok(())) => text_response(StatusCode::OK, "ok"),
            Ok(Err(reason)) => {
                tracing::warn!(%reason, "not ready");
                text_response(StatusCode::SERVICE_UNAVAILABLE, reason)
            }
            Err(_) => {
                tracing::warn!("readiness check timed out");
                text_response(StatusCode::SERVICE_UNAVAILABLE, "readiness check timed out")
            }
        }
    }

    /// The metrics, in the exposition format the request's `Accept` prefers.
    fn metrics(&self, headers: &HeaderMap) -> Response<HttpBody> {
        let Some(encoder) = &self.metrics else {
            return Rejection::not_found("metrics are not enabled").into_response();
        };
        let format =
            metrics::Format::negotiate(headers.get(header::ACCEPT).map(HeaderValue::as_bytes));
        match encoder() {
            Ok(text) => {
                let mut response = full_response(StatusCode::OK, Bytes::from(format.render(text)));
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(format.content_type()),
                );
                // The format depends on `Accept`: caches must not hand one client's to another.
                headers.insert(header::VARY, HeaderValue::from_static("accept"));
                response
            }
            Err(err) => {
                tracing::warn!(%err, "cannot encode metrics");
                text_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics")
            }
        }
    }
}

/// Decide what a request asks for. Pure: no I/O, no allocation proportional to hostile input.
fn route<B>(request: &Request<B>, ctx: &RequestContext) -> Route {
    let method = request.method();
    let path = request.uri().path();
    let readable = *method == Method::GET || *method == Method::HEAD;
    let fixed = match path {
        "/livez" => Some(Route::Livez),
        "/readyz" => Some(Route::Readyz),
        "/metrics" => Some(Route::Metrics),
        "/v2" | "/v2/" => Some(Route::ApiVersion),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return if readable {
            fixed
        } else {
            Route::Reject(Rejection::method_not_allowed())
        };
    }
    if let Some(digest) = path.strip_prefix(CLAIM_PATH) {
        return claim_route(method, digest, request.uri().query());
    }
    let object = match oci::parse_object_path(path) {
        Ok(object) => object,
        Err(ParseError::Unsupported) if !path.starts_with("/v2/") => {
            return Route::Reject(Rejection::not_found("unknown path"));
        }
        Err(err) => return Route::Reject(Rejection::from(err)),
    };
    if !readable {
        return Route::Reject(Rejection::method_not_allowed());
    }
    let registry = match &ctx.registry {
        Some(registry) => Some(registry.clone()),
        None => match oci::parse_ns_query(request.uri().query()) {
            Ok(registry) => registry,
            Err(err) => return Route::Reject(Rejection::from(err)),
        },
    };
    if registry.is_none() && matches!(object.reference, Reference::Tag(_)) {
        // As Spegel: tags are per registry, so without one there is nothing to look up.
        return Route::Reject(Rejection {
            status: StatusCode::NOT_FOUND,
            code: ErrorCode::ManifestUnknown,
            message: "registry parameter needs to be set for tag references".into(),
        });
    }
    let mut ranges = request.headers().get_all(header::RANGE).iter();
    let range = match (ranges.next(), ranges.next()) {
        (None, _) => None,
        (Some(value), None) if object.kind == Kind::Blob => {
            match oci::parse_range(value.as_bytes()) {
                Ok(range) => Some(range),
                Err(err) => return Route::Reject(Rejection::from(err)),
            }
        }
        (Some(_), None) => {
            return Route::Reject(Rejection::from(ParseError::Range(
                "ranges are only served for blobs",
            )));
        }
        _ => {
            return Route::Reject(Rejection::from(ParseError::Range("multiple Range headers")));
        }
    };
    let flag = |name: &HeaderName| {
        request
            .headers()
            .get(name)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
    };
    let mirrored = flag(&MIRRORED_HEADER);
    // Only another node asks for public content only.
    let public_only = mirrored && flag(&PUBLIC_ONLY_HEADER);
    Route::Pull(Box::new(ObjectRequest {
        kind: object.kind,
        registry,
        repository: object.repository,
        reference: object.reference,
        range,
        head: *method == Method::HEAD,
        headers: forwardable_headers(request.headers()),
        origin: ctx.origin.clone(),
        mirrored,
        public_only,
    }))
}

/// Headers that describe one hop, or that this layer represents otherwise (the range is parsed,
/// the mirrored flag must never travel further).
const LOCAL_HEADERS: [HeaderName; 13] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
    header::RANGE,
    MIRRORED_HEADER,
    PUBLIC_ONLY_HEADER,
];

/// The client's headers a source may forward: everything but [`LOCAL_HEADERS`].
fn forwardable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in &LOCAL_HEADERS {
        out.remove(name);
    }
    out
}

/// Reject objects a correct source cannot produce, so a buggy or lying source never reaches the
/// client with wrong headers: a different digest than asked for, a range outside the object, or
/// no body for a GET.
fn check_object(request: &ObjectRequest, object: Object) -> Result<Object, SourceError> {
    if let Reference::Digest(digest) = &request.reference
        && object.digest != *digest
    {
        return Err(SourceError::Unavailable(format!(
            "{} answered {} for {digest}",
            object.source, object.digest
        )));
    }
    if let Some(range) = &object.range
        && (range.start() > range.end() || *range.end() >= object.size)
    {
        return Err(SourceError::Unavailable(format!(
            "{} answered range {range:?} for an object of {} bytes",
            object.source, object.size
        )));
    }
    if !request.head && object.body.is_empty() && content_length(&object) > 0 {
        return Err(SourceError::Unavailable(format!(
            "{} answered without a body",
            object.source
        )));
    }
    Ok(object)
}

fn content_length(object: &Object) -> u64 {
    match &object.range {
        Some(range) => range.end() - range.start() + 1,
        None => object.size,
    }
}

/// 200 or 206 with the object's headers; the body is checked to be exactly as long as announced.
fn object_response(request: &ObjectRequest, object: Object) -> Response<HttpBody> {
    let length = content_length(&object);
    let content_type = match object.range {
        Some(_) => HeaderValue::from_static(oci::OCTET_STREAM),
        None => HeaderValue::from_str(&object.media_type)
            .unwrap_or(HeaderValue::from_static(oci::OCTET_STREAM)),
    };
    let status = match object.range {
        Some(_) => StatusCode::PARTIAL_CONTENT,
        None => StatusCode::OK,
    };
    // A file goes both ways: the plain loop takes it from the extensions and sends it with
    // `sendfile`; hyper polls the body, which takes it then and reads it. Whichever comes first
    // owns it, so a response holds one descriptor however it is sent.
    let mut file = None;
    let body = match object.body {
        _ if request.head => empty_body(),
        Payload::Empty => empty_body(),
        Payload::Stream(stream) => body::ObjectBody::new(stream, length).boxed_unsync(),
        Payload::File(region) => {
            let shared = sendfile::FileResponse::new(region);
            file = Some(shared.clone());
            body::ObjectBody::new(shared.into_stream(), length).boxed_unsync()
        }
    };
    let mut response = Response::new(body);
    if let Some(file) = file {
        response.extensions_mut().insert(file);
    }
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(CONTENT_DIGEST_HEADER, digest_value(&object.digest));
    if request.kind == Kind::Blob {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    if let Some(range) = &object.range {
        let value = format!("bytes {}-{}/{}", range.start(), range.end(), object.size);
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::CONTENT_RANGE, value);
        }
    }
    response
}

fn digest_value(digest: &crate::oci::digest::Digest) -> HeaderValue {
    // `sha256:` and hex digits are always a valid header value.
    HeaderValue::from_str(&digest.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// The one place a source's failure becomes an HTTP answer.
///
/// A miss is a 404 in both modes. A failed source is a 404 in mirror mode too, so containerd
/// falls back to the next host, but a 502 for intercepted requests, where nobody else will try.
fn source_error_response(
    err: SourceError,
    request: &ObjectRequest,
    intercepted: bool,
) -> Response<HttpBody> {
    let unknown = match request.kind {
        Kind::Manifest => ErrorCode::ManifestUnknown,
        Kind::Blob => ErrorCode::BlobUnknown,
    };
    let reference = reference_text(request);
    match err {
        SourceError::NotFound => Rejection {
            status: StatusCode::NOT_FOUND,
            code: unknown,
            message: format!("{reference} not found"),
        }
        .into_response(),
        SourceError::RangeNotSatisfiable { size } => {
            let mut response = Rejection {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                code: ErrorCode::RangeInvalid,
                message: format!("range not satisfiable for {reference} of {size} bytes"),
            }
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            response
        }
        SourceError::Invalid(message) => Rejection {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::Unsupported,
            message,
        }
        .into_response(),
        SourceError::Upstream {
            status,
            headers,
            body,
        } => {
            let mut response = full_response(status, body);
            let response_headers = response.headers_mut();
            for (name, value) in &headers {
                if !LOCAL_HEADERS.contains(name) {
                    response_headers.append(name, value.clone());
                }
            }
            response
        }
        SourceError::Unavailable(reason) => {
            tracing::warn!(%reason, %reference, intercepted, "no source could serve the object");
            if intercepted {
                Rejection {
                    status: StatusCode::BAD_GATEWAY,
                    code: ErrorCode::Unavailable,
                    message: format!("{reference}: {reason}"),
                }
                .into_response()
            } else {
                Rejection {
                    status: StatusCode::NOT_FOUND,
                    code: unknown,
                    message: format!("{reference} not available: {reason}"),
                }
                .into_response()
            }
        }
    }
}

/// `registry/repository:tag` or `…@digest`, for messages.
fn reference_text(request: &ObjectRequest) -> String {
    let registry = request
        .registry
        .as_deref()
        .map(|registry| format!("{registry}/"))
        .unwrap_or_default();
    match &request.reference {
        Reference::Tag(tag) => format!("{registry}{}:{tag}", request.repository),
        Reference::Digest(digest) => format!("{registry}{}@{digest}", request.repository),
    }
}

/// `POST {CLAIM_PATH}<digest>?by=<peer id>`.
fn claim_route(method: &Method, digest: &str, query: Option<&str>) -> Route {
    if *method != Method::POST {
        return Route::Reject(Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: ErrorCode::Unsupported,
            message: "claims are POSTed".into(),
        });
    }
    let Ok(digest) = digest.parse::<Digest>() else {
        return Route::Reject(Rejection {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::DigestInvalid,
            message: "a claim names a sha256 digest".into(),
        });
    };
    let by = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("by="));
    match by {
        Some(by) if valid_peer_id(by) => Route::Claim {
            digest,
            by: by.to_owned(),
        },
        _ => Route::Reject(Rejection {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::Unsupported,
            message: "a claim names its claimant as by=<peer id>".into(),
        }),
    }
}

impl Rejection {
    fn not_found(message: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: ErrorCode::Unsupported,
            message: message.into(),
        }
    }

    fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: ErrorCode::Unsupported,
            message: "only GET and HEAD are supported".into(),
        }
    }

    fn into_response(self) -> Response<HttpBody> {
        let body = ErrorBody::new(self.code, self.message, None).to_bytes();
        let mut response = full_response(self.status, body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}

impl From<ParseError> for Rejection {
    fn from(err: ParseError) -> Self {
        Self {
            status: err.status(),
            code: err.code(),
            message: err.to_string(),
        }
    }
}

fn api_version_response() -> Response<HttpBody> {
    let mut response = full_response(StatusCode::OK, Bytes::from_static(b"{}"));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    response
}

fn text_response(status: StatusCode, text: impl Into<String>) -> Response<HttpBody> {
    let mut response = full_response(status, Bytes::from(text.into()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response with a complete body and its `Content-Length`.
fn full_response(status: StatusCode, body: Bytes) -> Response<HttpBody> {
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length);
    response
}

fn empty_body() -> HttpBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}
