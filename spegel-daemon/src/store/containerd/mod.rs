//! The node's containerd as a [`Store`]: images and content over its gRPC socket, blobs read
//! straight from its content directory when we can, and an index of what to advertise that
//! follows containerd's image events and a periodic resync.

mod api;
mod args;
mod events;
mod ingests;
mod reads;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use containerd_client::tonic::{metadata::AsciiMetadataValue, transport::Channel};
use tokio::{
    sync::{Notify, watch},
    time::{Instant, timeout},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument as _;

use self::{
    api::CALL_TIMEOUT,
    args::parse_namespace,
    events::{refresh_loop, watch_events},
    reads::ContentBlobs,
};
pub use self::{api::ContainerdError, args::ContainerdArgs};
use crate::{
    oci::digest::Digest,
    store::{
        Descriptor, Keys, Opened, Reader, Store, StoreError,
        walk::{self, Index, ParseCache},
    },
};

/// The node's containerd. Cheap to clone; the background tasks (event subscription, resync)
/// stop when the last clone is dropped.
#[derive(Clone)]
pub struct ContainerdStore {
    inner: Arc<Inner>,
    _background: Arc<DropGuard>,
}

const DEFAULT_CONTENT_ROOT: &str = "/var/lib/containerd/io.containerd.content.v1.content";

struct Inner {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    /// `<content root>/blobs/sha256`, when it was readable at start.
    blobs_dir: Option<PathBuf>,
    index: RwLock<Arc<Index>>,
    /// Held for a whole walk: walks never overlap, and the last one wins.
    walk: tokio::sync::Mutex<ParseCache>,
    sniffed: Mutex<HashMap<Digest, Option<String>>>,
    changes: watch::Sender<u64>,
    /// Asks the background loop for a (debounced) walk.
    refresh: Notify,
}

impl ContainerdStore {
    /// Connects to containerd, finds its content directory, walks every image once, and starts
    /// following image events. Fails when containerd cannot be reached or cannot list images.
    pub async fn connect(args: &ContainerdArgs) -> Result<Self, ContainerdError> {
        let namespace = parse_namespace(&args.containerd_namespace)
            .map_err(|_| ContainerdError::Namespace(args.containerd_namespace.clone()))?;
        let namespace_header = AsciiMetadataValue::try_from(namespace.as_str())
            .map_err(|_| ContainerdError::Namespace(namespace.clone()))?;
        let channel = timeout(
            CALL_TIMEOUT,
            containerd_client::connect(&args.containerd_sock),
        )
        .await
        .map_err(|_| ContainerdError::Timeout {
            call: "connect",
            timeout: CALL_TIMEOUT,
        })?
        .map_err(|source| ContainerdError::Connect {
            path: args.containerd_sock.clone(),
            source,
        })?;
        let mut inner = Inner {
            channel,
            namespace,
            namespace_header,
            blobs_dir: None,
            index: RwLock::default(),
            walk: tokio::sync::Mutex::default(),
            sniffed: Mutex::default(),
            changes: watch::Sender::new(0),
            refresh: Notify::new(),
        };
        let root = match args
            .containerd_content_path
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            Some(path) => path.clone(),
            None => inner.content_root().await.unwrap_or_else(|err| {
                tracing::warn!(%err, default = DEFAULT_CONTENT_ROOT, "cannot ask containerd for its content directory");
                PathBuf::from(DEFAULT_CONTENT_ROOT)
            }),
        };
        let blobs_dir = root.join("blobs").join("sha256");
        // Decide on the content root, not on `blobs/sha256`: containerd creates that only with
        // the first blob, and a node that starts empty must still read files directly once it
        // has some (each read falls back to the API if its file is not there).
        inner.blobs_dir = match tokio::fs::metadata(&root).await {
            Ok(meta) if meta.is_dir() => {
                tracing::info!(dir = %blobs_dir.display(), "reading blobs from containerd's content directory");
                Some(blobs_dir)
            }
            _ => {
                tracing::info!(dir = %blobs_dir.display(), "content directory not readable; reading blobs through containerd's API");
                None
            }
        };
        let inner = Arc::new(inner);
        inner.rebuild().await?;

        let cancel = CancellationToken::new();
        let span = tracing::info_span!("containerd_store", namespace = %inner.namespace);
        tokio::spawn(watch_events(inner.clone(), cancel.clone()).instrument(span.clone()));
        // The flag parser enforces this too; a zero period would make the interval panic.
        let resync = args.store_resync.max(Duration::from_secs(1));
        tokio::spawn(refresh_loop(inner.clone(), cancel.clone(), resync).instrument(span));
        Ok(Self {
            inner,
            _background: Arc::new(cancel.drop_guard()),
        })
    }

    /// Re-walks every image now, and moves [`Store::changes`] if the keys changed.
    pub async fn refresh(&self) -> Result<(), ContainerdError> {
        self.inner.rebuild().await.map(|_| ())
    }

    /// The directory blobs are read from directly, if any.
    pub fn blobs_dir(&self) -> Option<&Path> {
        self.inner.blobs_dir.as_deref()
    }

    /// The containerd namespace served.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

impl Inner {
    fn index(&self) -> Arc<Index> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-walks every image; returns whether the advertised keys changed (and if so, moves
    /// the change counter).
    async fn rebuild(&self) -> Result<bool, ContainerdError> {
        let mut cache = self.walk.lock().await;
        let started = Instant::now();
        let images = self.list_images().await?;
        let present = self.list_content().await?;
        let blobs = ContentBlobs {
            inner: self,
            present,
        };
        let index = walk::walk(&images, &blobs, &mut cache).await?;
        let (objects, tags) = (index.objects.len(), index.tags.len());
        let changed = {
            let mut slot = self.index.write().unwrap_or_else(PoisonError::into_inner);
            let changed = slot.keys() != index.keys();
            *slot = Arc::new(index);
            changed
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        tracing::debug!(
            images = images.len(),
            objects,
            tags,
            changed,
            elapsed = ?started.elapsed(),
            "walked containerd images"
        );
        Ok(changed)
    }
}

#[async_trait::async_trait]
impl Store for ContainerdStore {
    async fn resolve(&self, reference: &str) -> Result<Digest, StoreError> {
        // Asked live rather than from the index: a tag moved by a pull a moment ago must not
        // resolve to the old digest until the next walk.
        let name = walk::tag_reference(reference).ok_or(StoreError::NotFound)?;
        let digest = self
            .inner
            .image_target(name)
            .await?
            .ok_or(StoreError::NotFound)?;
        // An image record whose content is gone (or still arriving) is not ours to serve.
        self.inner.info(&digest).await?;
        Ok(digest)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let size = self.inner.info(digest).await?;
        let media_type = match self.inner.index().media_type(digest) {
            Some(known) => Some(known),
            None => self.inner.sniff(digest, size).await,
        };
        Ok(Descriptor {
            digest: *digest,
            size,
            media_type,
        })
    }

    async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError> {
        self.inner.open(digest, offset, len).await
    }

    async fn open_region(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Opened, StoreError> {
        self.inner.open_region(digest, offset, len).await
    }

    async fn keys(&self) -> Result<Keys, StoreError> {
        Ok(self.inner.index().keys())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_fails_cleanly_without_containerd() {
        let args = ContainerdArgs {
            containerd_sock: PathBuf::from("/nonexistent/spegel/containerd.sock"),
            containerd_namespace: "k8s.io".into(),
            containerd_content_path: None,
            store_resync: Duration::from_secs(60),
        };
        let err = ContainerdStore::connect(&args).await.err().unwrap();
        assert!(
            matches!(
                err,
                ContainerdError::Connect { .. } | ContainerdError::Call { .. }
            ),
            "{err}"
        );
        let bad = ContainerdArgs {
            containerd_namespace: "no/slashes".into(),
            ..args
        };
        assert!(matches!(
            ContainerdStore::connect(&bad).await,
            Err(ContainerdError::Namespace(_))
        ));
    }
}
