//! containerd's partial ingests: found by the digest their ref ends with (containerd's fetch
//! names them `<kind>-<digest>`, e.g. `layer-sha256:…`), in every namespace, and aborted.
//!
//! Aborting an ingest whose writer is still open is what containerd's own garbage collection
//! does to stale ones: the record and the partial file go, the writer's further bytes land in an
//! unlinked file, and its commit fails; the next writer for that ref starts at offset 0.
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
    store::{Ingests, StoreError},
};

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
}

/// `message` as a request in the namespace `header` names.
fn namespaced<T>(header: &AsciiMetadataValue, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(NAMESPACE_HEADER, header.clone());
    request
}
