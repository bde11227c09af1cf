//! containerd's gRPC API as the store uses it: namespaced requests with deadlines, the queries
//! (content root, info, image and content listings), and their errors.
use std::{collections::HashMap, future::Future, path::PathBuf, time::Duration};

use containerd_client::{
    services::v1::{
        GetImageRequest, InfoRequest, ListContentRequest, ListImagesRequest, PluginsRequest,
        content_client::ContentClient, images_client::ImagesClient,
        introspection_client::IntrospectionClient,
    },
    tonic::{self, Code, Request, Status},
};
use tokio::time::timeout;

use super::Inner;
use crate::{
    oci::digest::Digest,
    store::{StoreError, walk::ImageRecord},
};

/// Unary calls and the walk's listings must not hang the daemon on a wedged containerd.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
const CONTENT_PLUGIN_FILTER: &str = r#"type=="io.containerd.content.v1",id=="content""#;
pub(super) const NAMESPACE_HEADER: &str = "containerd-namespace";

/// Why the containerd store could not start or refresh.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The namespace is not one containerd accepts.
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    /// The socket could not be reached.
    #[error("cannot connect to containerd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd did not answer in time.
    #[error("containerd did not answer {call} within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// containerd answered with an error.
    #[error("containerd {call} failed: {code:?}: {message}")]
    Call {
        call: &'static str,
        code: Code,
        message: String,
    },
    /// Reading content for the walk failed.
    #[error("reading content failed: {0}")]
    Content(#[from] StoreError),
}

impl Inner {
    /// `message` as a request in the store's namespace.
    pub(super) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        request
    }

    /// containerd's content root, from the content plugin's exports. `Plugins` rather than
    /// `PluginInfo`: the latter only exists from containerd 2.0.
    pub(super) async fn content_root(&self) -> Result<PathBuf, ContainerdError> {
        let mut client = IntrospectionClient::new(self.channel.clone());
        let response = call(
            "introspection.plugins",
            client.plugins(self.request(PluginsRequest {
                filters: vec![CONTENT_PLUGIN_FILTER.to_owned()],
            })),
        )
        .await?;
        response
            .plugins
            .iter()
            .find_map(|plugin| plugin.exports.get("root"))
            .filter(|root| !root.is_empty())
            .map(PathBuf::from)
            .ok_or(ContainerdError::Call {
                call: "introspection.plugins",
                code: Code::NotFound,
                message: "the content plugin exports no root".to_owned(),
            })
    }

    /// The digest the image record `name` points at; `None` when it names no (servable) digest.
    pub(super) async fn image_target(&self, name: &str) -> Result<Option<Digest>, ContainerdError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let response = call(
            "images.get",
            client.get(self.request(GetImageRequest {
                name: name.to_owned(),
            })),
        )
        .await?;
        Ok(response
            .image
            .and_then(|image| image.target)
            .and_then(|target| target.digest.parse().ok()))
    }

    /// The size of a present object.
    pub(super) async fn info(&self, digest: &Digest) -> Result<u64, ContainerdError> {
        let mut client = ContentClient::new(self.channel.clone());
        let response = call(
            "content.info",
            client.info(self.request(InfoRequest {
                digest: digest.to_string(),
            })),
        )
        .await?;
        let size = response.info.map_or(-1, |info| info.size);
        u64::try_from(size).map_err(|_| ContainerdError::Call {
            call: "content.info",
            code: Code::Internal,
            message: format!("invalid size {size} for {digest}"),
        })
    }

    pub(super) async fn list_images(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let response = call_within(
            "images.list",
            LIST_TIMEOUT,
            client.list(self.request(ListImagesRequest { filters: vec![] })),
        )
        .await?;
        Ok(response
            .images
            .into_iter()
            .filter_map(|image| {
                let target = image.target?;
                let Ok(digest) = target.digest.parse() else {
                    tracing::debug!(image = %image.name, digest = %target.digest, "skipping image with an unsupported digest");
                    return None;
                };
                Some(ImageRecord {
                    name: image.name,
                    target: digest,
                    media_type: Some(target.media_type).filter(|m| !m.is_empty()),
                })
            })
            .collect())
    }

    /// Every object in the namespace and its size: one streamed listing instead of an Info per
    /// descriptor the walk meets.
    pub(super) async fn list_content(&self) -> Result<HashMap<Digest, u64>, ContainerdError> {
        let listing = async {
            let mut client = ContentClient::new(self.channel.clone());
            let mut stream = client
                .list(self.request(ListContentRequest { filters: vec![] }))
                .await?
                .into_inner();
            let mut present = HashMap::new();
            while let Some(response) = stream.message().await? {
                for info in response.info {
                    if let (Ok(digest), Ok(size)) = (info.digest.parse(), u64::try_from(info.size))
                    {
                        present.insert(digest, size);
                    }
                }
            }
            Ok::<_, Status>(present)
        };
        match timeout(LIST_TIMEOUT, listing).await {
            Ok(Ok(present)) => Ok(present),
            Ok(Err(status)) => Err(status_error("content.list", status)),
            Err(_) => Err(ContainerdError::Timeout {
                call: "content.list",
                timeout: LIST_TIMEOUT,
            }),
        }
    }
}

impl From<ContainerdError> for StoreError {
    fn from(err: ContainerdError) -> Self {
        match err {
            ContainerdError::Call {
                code: Code::NotFound,
                ..
            } => StoreError::NotFound,
            ContainerdError::Content(err) => err,
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

pub(super) async fn call<T>(
    name: &'static str,
    request: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ContainerdError> {
    call_within(name, CALL_TIMEOUT, request).await
}

pub(super) async fn call_within<T>(
    name: &'static str,
    limit: Duration,
    request: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ContainerdError> {
    match timeout(limit, request).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status_error(name, status)),
        Err(_) => Err(ContainerdError::Timeout {
            call: name,
            timeout: limit,
        }),
    }
}

pub(super) fn status_error(call: &'static str, status: Status) -> ContainerdError {
    ContainerdError::Call {
        call,
        code: status.code(),
        message: status.message().to_owned(),
    }
}
