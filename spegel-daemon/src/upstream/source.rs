//! The upstream registry as a [`Source`]: object requests of intercepted pulls become GET/HEAD
//! requests upstream, and the answers become verified [`Object`]s or the upstream's own error.
//! Every answer and failure is noted in the [`Backoff`]; blob bodies resume with `Range` when
//! they stall or break.
use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use hyper::body::Incoming;

use super::{
    UpstreamClient, UpstreamError,
    backoff::Backoff,
    body::{ReadError, read_capped, read_truncated},
    hop_by_hop::strip_hop_by_hop,
    resume::{Resumable, resuming},
    retry_after::retry_after,
};
use crate::{
    body::BodyCheck,
    oci::{self, Kind, Reference, digest::Digest},
    source::{Body, Object, ObjectRequest, Origin, Source, SourceError},
};

/// Manifests are read whole before they are returned; larger ones are refused.
const MANIFEST_CAP: usize = 4 << 20;
/// How much of an upstream error body is kept for the client.
const ERROR_BODY_CAP: usize = 64 << 10;
/// Client headers forwarded to the registry for object requests: containerd's own credentials
/// and content negotiation.
const FORWARDED_HEADERS: [HeaderName; 3] =
    [header::AUTHORIZATION, header::ACCEPT, header::USER_AGENT];

/// How many times a blob body is resumed unless told otherwise.
const DEFAULT_RESUMES: usize = 3;

/// The upstream registry as a [`Source`] for transparently intercepted requests.
#[derive(Debug, Clone)]
pub struct UpstreamSource {
    client: UpstreamClient,
    backoff: Arc<Backoff>,
    resumes: usize,
}

impl UpstreamSource {
    /// A source asking upstreams with `client`, with a backoff of its own and the default
    /// number of blob resumes.
    pub fn new(client: UpstreamClient) -> Self {
        Self {
            client,
            backoff: Arc::new(Backoff::default()),
            resumes: DEFAULT_RESUMES,
        }
    }

    /// Notes failures and answers in `backoff` (shared with the serve policy).
    pub fn with_backoff(mut self, backoff: Arc<Backoff>) -> Self {
        self.backoff = backoff;
        self
    }

    /// Resumes a stalled or broken blob body at most `resumes` times.
    pub fn with_resumes(mut self, resumes: usize) -> Self {
        self.resumes = resumes;
        self
    }

    /// Where failures and answers are noted.
    pub fn backoff(&self) -> &Arc<Backoff> {
        &self.backoff
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
            self.client.timeouts().tag_response
        } else {
            self.client.timeouts().response
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
                HeaderValue::from_static(oci::MANIFEST_ACCEPT),
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
            let response = match self
                .client
                .get_following_redirects(
                    origin,
                    method.clone(),
                    &path,
                    headers.clone(),
                    header_timeout,
                )
                .await
            {
                Ok(response) => response,
                Err(err) => {
                    if !matches!(err, UpstreamError::InvalidRequest(_)) {
                        let wait = self.backoff.failed(origin, None);
                        tracing::debug!(host = %origin.host, ?wait, %err, "upstream failed; backing off");
                    }
                    return Err(err.into());
                }
            };
            let status = response.status();
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                let asked = retry_after(response.headers(), SystemTime::now());
                let wait = self.backoff.failed(origin, asked);
                tracing::info!(host = %origin.host, %status, ?asked, ?wait, "upstream failed; backing off");
            } else {
                self.backoff.answered(origin);
            }
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
                    self.blob(request, *digest, response, origin, &path, &headers)
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
        let body = read_truncated(body, self.client.timeouts().idle, ERROR_BODY_CAP).await;
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
        let (digest, size, body) = if sent_head {
            let Some(digest) = expected else {
                return Ok(None);
            };
            let size = oci::content_length(response.headers())
                .ok_or_else(|| "upstream sent no Content-Length".to_owned())?;
            (digest, size, None)
        } else {
            let (digest, bytes) = self.read_manifest(response, expected).await?;
            let size = bytes.len() as u64;
            let body: Option<Body> = (!request.head)
                .then(|| Box::pin(futures::stream::once(async move { Ok(bytes) })) as Body);
            (digest, size, body)
        };
        Ok(Some(Object {
            digest,
            media_type,
            size,
            range: None,
            body: body.into(),
            source: "upstream",
        }))
    }

    /// A manifest's bytes, read whole (capped), and their digest, which must be `expected`.
    async fn read_manifest(
        &self,
        response: Response<Incoming>,
        expected: Option<Digest>,
    ) -> Result<(Digest, Bytes), String> {
        if oci::content_length(response.headers()).is_some_and(|len| len > MANIFEST_CAP as u64) {
            return Err(format!(
                "upstream manifest is larger than {MANIFEST_CAP} bytes"
            ));
        }
        let bytes = read_capped(
            response.into_body(),
            self.client.timeouts().idle,
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
        Ok((digest, bytes))
    }

    /// A blob: whole bodies are verified as they stream; a 206 range is passed through with
    /// its length checked (a part cannot be verified; containerd verifies the whole blob when
    /// it commits it). Either resumes with `Range` when it stalls or breaks (see `resume`).
    fn blob(
        &self,
        request: &ObjectRequest,
        digest: Digest,
        response: Response<Incoming>,
        origin: &Origin,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Object, String> {
        check_announced(digest, oci::content_digest(response.headers()))?;
        let media_type = media_type(response.headers(), Kind::Blob);
        let (start, len, size, range, check) = if response.status() == StatusCode::PARTIAL_CONTENT {
            let (range, size) = oci::content_range(response.headers())
                .ok_or_else(|| "upstream sent 206 without a usable Content-Range".to_owned())?;
            let len = range.end() - range.start() + 1;
            if oci::content_length(response.headers()).is_some_and(|cl| cl != len) {
                return Err("upstream Content-Length disagrees with its Content-Range".to_owned());
            }
            (*range.start(), len, size, Some(range), BodyCheck::part(len))
        } else {
            let size = oci::content_length(response.headers())
                .ok_or_else(|| "upstream sent no Content-Length for a blob".to_owned())?;
            // A 200 to a Range request: upstream ignored the range, which HTTP allows; the
            // whole blob is served (and verified), with `range: None` saying so.
            (0, size, size, None, BodyCheck::whole(digest, size))
        };
        let body = (!request.head).then(|| {
            let from = Resumable {
                client: self.client.clone(),
                origin: origin.clone(),
                path: path.to_owned(),
                headers: headers.clone(),
                start,
                total: size,
                attempts: self.resumes,
            };
            let idle = self.client.timeouts().idle;
            resuming(response.into_body(), idle, check, len, from)
        });
        Ok(Object {
            digest,
            media_type,
            size,
            range,
            body: body.into(),
            source: "upstream",
        })
    }
}

/// `/v2/<repository>/<manifests|blobs>/<reference>`, refusing anything that could step outside
/// that path (the parts came from a client).
fn object_path(request: &ObjectRequest) -> Result<String, String> {
    let repository = &request.repository;
    oci::validate_repository(repository)
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
            oci::validate_tag(tag).map_err(|e| format!("invalid tag `{tag}`: {e}"))?;
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
                Kind::Manifest => oci::OCI_MANIFEST.to_owned(),
                Kind::Blob => oci::OCTET_STREAM.to_owned(),
            },
            str::to_owned,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: Kind, repository: &str, reference: Reference) -> ObjectRequest {
        ObjectRequest {
            kind,
            registry: None,
            repository: repository.to_owned(),
            reference,
            range: None,
            head: false,
            headers: HeaderMap::new(),
            origin: None,
            mirrored: false,
            public_only: false,
        }
    }

    #[test]
    fn object_paths_stay_inside_the_registry_api() {
        let digest = Digest::of(b"x");
        let tag = |tag: &str| Reference::Tag(tag.to_owned());
        let cases = [
            (
                Kind::Manifest,
                "library/app",
                tag("v1.2"),
                Ok("/v2/library/app/manifests/v1.2".to_owned()),
            ),
            (
                Kind::Manifest,
                "app",
                Reference::Digest(digest),
                Ok(format!("/v2/app/manifests/{digest}")),
            ),
            (
                Kind::Blob,
                "a/b/c",
                Reference::Digest(digest),
                Ok(format!("/v2/a/b/c/blobs/{digest}")),
            ),
            (
                Kind::Blob,
                "app",
                tag("v1"),
                Err("blobs are addressed by digest"),
            ),
            (
                Kind::Manifest,
                "../../etc",
                tag("v1"),
                Err("invalid repository name"),
            ),
            (
                Kind::Manifest,
                "App",
                tag("v1"),
                Err("invalid repository name"),
            ),
            (Kind::Manifest, "app", tag("v1/../x"), Err("invalid tag")),
            (Kind::Manifest, "app", tag("v1?x=1"), Err("invalid tag")),
        ];
        for (kind, repository, reference, want) in cases {
            let got = object_path(&request(kind, repository, reference.clone()));
            match want {
                Ok(path) => assert_eq!(got, Ok(path), "{repository} {reference:?}"),
                Err(reason) => {
                    let err = got.expect_err(repository);
                    assert!(err.contains(reason), "{repository} {reference:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn announced_digests_must_match() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(check_announced(a, None), Ok(()));
        assert_eq!(check_announced(a, Some(a)), Ok(()));
        assert_eq!(
            check_announced(a, Some(b)),
            Err(format!("upstream announced {b} for {a}"))
        );
    }

    #[test]
    fn media_types_fall_back_by_kind() {
        let cases = [
            (
                Some("application/vnd.oci.image.index.v1+json"),
                Kind::Manifest,
                oci::OCI_INDEX,
            ),
            (
                Some("application/json; charset=utf-8"),
                Kind::Manifest,
                "application/json",
            ),
            (
                Some(" application/x-tar ;q=1"),
                Kind::Blob,
                "application/x-tar",
            ),
            (None, Kind::Manifest, oci::OCI_MANIFEST),
            (None, Kind::Blob, oci::OCTET_STREAM),
            (Some(""), Kind::Blob, oci::OCTET_STREAM),
            (Some("; charset=utf-8"), Kind::Manifest, oci::OCI_MANIFEST),
        ];
        for (content_type, kind, want) in cases {
            let mut headers = HeaderMap::new();
            if let Some(value) = content_type {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            }
            assert_eq!(media_type(&headers, kind), want, "{content_type:?}");
        }
        let mut binary = HeaderMap::new();
        binary.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        assert_eq!(media_type(&binary, Kind::Blob), oci::OCTET_STREAM);
    }
}
