//! gRPC clients for a node's containerd: CRI image calls (as kubelet makes them) and the native
//! image, content and namespace services.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use containerd_client::services::v1::{
    DeleteImageRequest, InfoRequest, ListContentRequest, ListImagesRequest, ListNamespacesRequest,
    ReadContentRequest, content_client::ContentClient, images_client::ImagesClient,
    namespaces_client::NamespacesClient, version_client::VersionClient,
};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest, RemoveImageRequest};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// The containerd namespace CRI (and so kubelet) uses.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// An image as CRI lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriImage {
    /// The image ID: the config digest.
    pub id: String,
    /// `registry/repo:tag` names.
    pub repo_tags: Vec<String>,
    /// `registry/repo@sha256:..` names.
    pub repo_digests: Vec<String>,
    /// Size as CRI reports it.
    pub size: u64,
}

/// An image record in containerd's image store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// The record's name (`registry/repo:tag`, `registry/repo@sha256:..`, or `sha256:..` for the
    /// CRI image-ID record).
    pub name: String,
    /// Digest of the target (manifest or index).
    pub target_digest: String,
    /// Media type of the target.
    pub target_media_type: String,
    /// Size of the target document.
    pub target_size: u64,
    /// The record's labels (`io.cri-containerd.image=managed` for CRI pulls).
    pub labels: HashMap<String, String>,
}

/// A blob in containerd's content store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentInfo {
    /// `sha256:..`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Labels such as `containerd.io/distribution.source.<host>` and `containerd.io/uncompressed`.
    pub labels: HashMap<String, String>,
}

/// Opens a gRPC channel over containerd's Unix socket.
pub(crate) async fn connect(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket)
        .await
        .with_context(|| format!("connecting to containerd at {}", socket.display()))
}

/// containerd's version string (also the readiness probe).
pub(crate) async fn version(socket: &Path) -> Result<String> {
    let response = VersionClient::new(connect(socket).await?)
        .version(())
        .await?;
    Ok(response.into_inner().version)
}

/// CRI `PullImage`: the pull happens inside containerd, exactly as for kubelet; with
/// `credentials` (user, password) as kubelet passes a pod's image pull secret.
pub(crate) async fn cri_pull(
    socket: &Path,
    image: &str,
    credentials: Option<(&str, &str)>,
) -> Result<String> {
    let request = PullImageRequest {
        image: Some(image_spec(image)),
        auth: credentials.map(|(username, password)| AuthConfig {
            username: username.to_owned(),
            password: password.to_owned(),
            ..AuthConfig::default()
        }),
        sandbox_config: None,
    };
    let response = ImageServiceClient::new(connect(socket).await?)
        .pull_image(request)
        .await
        .with_context(|| format!("CRI pull of {image} via {}", socket.display()))?;
    Ok(response.into_inner().image_ref)
}

/// CRI `ListImages`.
pub(crate) async fn cri_images(socket: &Path) -> Result<Vec<CriImage>> {
    let response = ImageServiceClient::new(connect(socket).await?)
        .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
        .await
        .context("CRI ListImages")?;
    Ok(response
        .into_inner()
        .images
        .into_iter()
        .map(|image| CriImage {
            id: image.id,
            repo_tags: image.repo_tags,
            repo_digests: image.repo_digests,
            size: image.size,
        })
        .collect())
}

/// CRI `RemoveImage` (by name or ID); removes all of the image's records.
pub(crate) async fn cri_remove(socket: &Path, image: &str) -> Result<()> {
    ImageServiceClient::new(connect(socket).await?)
        .remove_image(RemoveImageRequest {
            image: Some(image_spec(image)),
        })
        .await
        .with_context(|| format!("CRI RemoveImage {image}"))?;
    Ok(())
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// The image records in `namespace`.
pub(crate) async fn images(socket: &Path, namespace: &str) -> Result<Vec<ImageRecord>> {
    let request = namespaced(ListImagesRequest { filters: vec![] }, namespace)?;
    let response = ImagesClient::new(connect(socket).await?)
        .list(request)
        .await
        .context("listing images")?;
    Ok(response
        .into_inner()
        .images
        .into_iter()
        .map(|image| {
            let target = image.target.unwrap_or_default();
            ImageRecord {
                name: image.name,
                target_digest: target.digest,
                target_media_type: target.media_type,
                target_size: u64::try_from(target.size).unwrap_or_default(),
                labels: image.labels,
            }
        })
        .collect())
}

/// Deletes one image record; with `sync`, waits for garbage collection to drop unreferenced content.
pub(crate) async fn delete_image(
    socket: &Path,
    namespace: &str,
    name: &str,
    sync: bool,
) -> Result<()> {
    let request = namespaced(
        DeleteImageRequest {
            name: name.to_owned(),
            sync,
            target: None,
        },
        namespace,
    )?;
    ImagesClient::new(connect(socket).await?)
        .delete(request)
        .await
        .with_context(|| format!("deleting image {name}"))?;
    Ok(())
}

/// All containerd namespaces.
pub(crate) async fn namespaces(socket: &Path) -> Result<Vec<String>> {
    let response = NamespacesClient::new(connect(socket).await?)
        .list(ListNamespacesRequest {
            filter: String::new(),
        })
        .await
        .context("listing namespaces")?;
    Ok(response
        .into_inner()
        .namespaces
        .into_iter()
        .map(|namespace| namespace.name)
        .collect())
}

/// Content.Info for one blob; `None` if the namespace does not have it.
pub(crate) async fn content_info(
    socket: &Path,
    namespace: &str,
    digest: &str,
) -> Result<Option<ContentInfo>> {
    let request = namespaced(
        InfoRequest {
            digest: digest.to_owned(),
        },
        namespace,
    )?;
    match ContentClient::new(connect(socket).await?)
        .info(request)
        .await
    {
        Ok(response) => Ok(response.into_inner().info.map(content_info_from)),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status).with_context(|| format!("content info of {digest}")),
    }
}

/// Every blob in `namespace`.
pub(crate) async fn list_content(socket: &Path, namespace: &str) -> Result<Vec<ContentInfo>> {
    let request = namespaced(ListContentRequest { filters: vec![] }, namespace)?;
    let mut stream = ContentClient::new(connect(socket).await?)
        .list(request)
        .await
        .context("listing content")?
        .into_inner();
    let mut all = Vec::new();
    while let Some(batch) = stream.message().await.context("listing content")? {
        all.extend(batch.info.into_iter().map(content_info_from));
    }
    Ok(all)
}

/// Content.Read of a whole blob, checked against its sha256 digest.
pub(crate) async fn read_content(socket: &Path, namespace: &str, digest: &str) -> Result<Vec<u8>> {
    let request = namespaced(
        ReadContentRequest {
            digest: digest.to_owned(),
            offset: 0,
            size: 0,
        },
        namespace,
    )?;
    let mut stream = ContentClient::new(connect(socket).await?)
        .read(request)
        .await
        .with_context(|| format!("reading content {digest}"))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .with_context(|| format!("reading content {digest}"))?
    {
        data.extend_from_slice(&chunk.data);
    }
    if let Some(expected) = digest.strip_prefix("sha256:") {
        let actual = hex::encode(Sha256::digest(&data));
        if actual != expected {
            bail!("content {digest} read back with digest sha256:{actual}");
        }
    }
    Ok(data)
}

fn content_info_from(info: containerd_client::services::v1::Info) -> ContentInfo {
    ContentInfo {
        digest: info.digest,
        size: u64::try_from(info.size).unwrap_or_default(),
        labels: info.labels,
    }
}

/// Wraps a message in a request carrying containerd's namespace header.
fn namespaced<T>(message: T, namespace: &str) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value = namespace
        .parse()
        .with_context(|| format!("invalid containerd namespace {namespace:?}"))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}
