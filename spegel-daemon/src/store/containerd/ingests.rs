//! containerd's partial ingests: found by the digest their ref ends with (containerd's fetch
//! names them `<kind>-<digest>`, e.g. `layer-sha256:…`), in every namespace, and aborted.
//!
//! Aborting an ingest whose writer is still open is what containerd's own garbage collection
//! does to stale ones: the record and the partial file go, the writer's further bytes land in an
//! unlinked file, and its commit fails; the next writer for that ref starts at offset 0.
//!
//! An ingest in progress is also read as it grows, from the content directory: containerd's
//! local content store keeps each one in `ingest/<sha256 of its ref>/`, with the ref in `ref`,
//! the size it will have in `total` (when the writer knew it) and the bytes so far in `data`.
use std::path::{Path, PathBuf};

use containerd_client::{
    services::v1::{
        AbortRequest, ListNamespacesRequest, ListStatusesRequest, content_client::ContentClient,
        namespaces_client::NamespacesClient,
    },
    tonic::{Request, metadata::AsciiMetadataValue},
};

use super::{
    ContainerdStore, Inner,
    api::{NAMESPACE_HEADER, call},
};
use crate::{
    oci::digest::Digest,
    store::{Ingests, StoreError, growing::Growing},
};

/// Most ingest directories looked at for one digest: containerd keeps a handful at a time.
const MAX_INGESTS_SCANNED: usize = 1024;

impl Inner {
    /// Every namespace containerd has.
    async fn namespaces(&self) -> Result<Vec<String>, StoreError> {
        let mut client = NamespacesClient::new(self.channel.clone());
        let response = call(
            "namespaces.list",
            client.list(Request::new(ListNamespacesRequest::default())),
        )
        .await?;
        Ok(response.namespaces.into_iter().map(|ns| ns.name).collect())
    }

    /// Aborts the partial ingests of `digest` in `namespace`; returns how many.
    async fn discard_in(&self, namespace: &str, digest: &Digest) -> Result<usize, StoreError> {
        let Ok(header) = AsciiMetadataValue::try_from(namespace) else {
            return Ok(0);
        };
        let mut client = ContentClient::new(self.channel.clone());
        let statuses = call(
            "content.list_statuses",
            client.list_statuses(namespaced(&header, ListStatusesRequest::default())),
        )
        .await?;
        let suffix = digest.to_string();
        let mut discarded = 0;
        for status in statuses.statuses {
            if !status.r#ref.ends_with(&suffix) {
                continue;
            }
            let aborted = call(
                "content.abort",
                client.abort(namespaced(
                    &header,
                    AbortRequest {
                        r#ref: status.r#ref.clone(),
                    },
                )),
            )
            .await;
            match aborted.map_err(StoreError::from) {
                Ok(_) => {
                    tracing::debug!(namespace, r#ref = %status.r#ref, offset = status.offset, "aborted a partial ingest");
                    discarded += 1;
                }
                // Committed or aborted since it was listed: gone either way.
                Err(StoreError::NotFound) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(discarded)
    }
}

#[async_trait::async_trait]
impl Ingests for ContainerdStore {
    async fn discard(&self, digest: &Digest) -> Result<usize, StoreError> {
        let mut discarded = 0;
        for namespace in self.inner.namespaces().await? {
            discarded += self.inner.discard_in(&namespace, digest).await?;
        }
        Ok(discarded)
    }

    async fn growing(&self, digest: &Digest) -> Option<Growing> {
        let root = ingest_root(self.inner.blobs_dir.as_deref()?)?;
        let data = furthest_ingest(&root, digest).await?;
        let size = tokio::fs::read_to_string(data.with_file_name("total"))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Growing::open(data, size).await.ok()
    }
}

/// `<content root>/ingest`, beside `<content root>/blobs/sha256`.
fn ingest_root(blobs_dir: &Path) -> Option<PathBuf> {
    Some(blobs_dir.parent()?.parent()?.join("ingest"))
}

/// The `data` file of the ingest of `digest` (its ref ends with the digest) that holds the most
/// bytes, under `root`.
async fn furthest_ingest(root: &Path, digest: &Digest) -> Option<PathBuf> {
    let suffix = digest.to_string();
    let mut entries = tokio::fs::read_dir(root).await.ok()?;
    let mut best: Option<(u64, PathBuf)> = None;
    for _ in 0..MAX_INGESTS_SCANNED {
        let Ok(Some(entry)) = entries.next_entry().await else {
            break;
        };
        let dir = entry.path();
        let Ok(r#ref) = tokio::fs::read_to_string(dir.join("ref")).await else {
            continue;
        };
        if !r#ref.trim_end().ends_with(&suffix) {
            continue;
        }
        let data = dir.join("data");
        let Ok(meta) = tokio::fs::metadata(&data).await else {
            continue;
        };
        if best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
            best = Some((meta.len(), data));
        }
    }
    best.map(|(_, data)| data)
}

/// `message` as a request in the namespace `header` names.
fn namespaced<T>(header: &AsciiMetadataValue, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(NAMESPACE_HEADER, header.clone());
    request
}
