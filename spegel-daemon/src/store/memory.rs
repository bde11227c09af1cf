//! An in-memory [`Store`] for tests, with the containerd store's semantics: blobs by digest,
//! images by name, tags and advertised digests derived by the same walk.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
};

use bytes::Bytes;
use tokio::sync::watch;

use crate::{
    oci::digest::Digest,
    store::{
        Descriptor, Ingests, Keys, Reader, Store, StoreError,
        growing::Growing,
        walk::{self, Blobs, ImageRecord, Index, MAX_DOCUMENT_SIZE, ParseCache},
    },
};

/// Blobs and image records held in memory. Every change re-walks the images and moves
/// [`Store::changes`] when the advertised keys changed.
pub struct MemoryStore {
    state: Mutex<State>,
    /// Serialises re-walks so the last change always wins.
    walk: tokio::sync::Mutex<ParseCache>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Bytes>,
    images: BTreeMap<String, ImageRecord>,
    index: Index,
    /// Every [`Ingests::discard`], in order.
    discarded: Vec<Digest>,
    /// Files standing in for partial ingests: path and final size.
    growing: HashMap<Digest, (std::path::PathBuf, u64)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            walk: tokio::sync::Mutex::default(),
            changes: watch::Sender::new(0),
        }
    }

    /// Adds content; returns its digest.
    pub async fn insert(&self, bytes: impl Into<Bytes>) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::of(&bytes);
        self.lock().blobs.insert(digest, bytes);
        self.rewalk().await;
        digest
    }

    /// Removes content; returns whether it was there.
    pub async fn remove(&self, digest: &Digest) -> bool {
        let removed = self.lock().blobs.remove(digest).is_some();
        self.rewalk().await;
        removed
    }

    /// Creates or updates the image record `name` (any containerd image name: `registry/repo:tag`,
    /// `registry/repo@sha256:…`, `sha256:…`) pointing at `target`, which has `media_type`.
    pub async fn set_image(&self, name: &str, target: Digest, media_type: Option<&str>) {
        let record = ImageRecord {
            name: name.to_owned(),
            target,
            media_type: media_type.map(str::to_owned),
        };
        self.lock().images.insert(name.to_owned(), record);
        self.rewalk().await;
    }

    /// Removes an image record; returns whether it was there. Its content stays.
    pub async fn remove_image(&self, name: &str) -> bool {
        let removed = self.lock().images.remove(name).is_some();
        self.rewalk().await;
        removed
    }

    /// The digests [`Ingests::discard`] was asked for, in order.
    pub fn discarded(&self) -> Vec<Digest> {
        self.lock().discarded.clone()
    }

    /// Makes the file at `path` (to be `size` bytes) the partial ingest of `digest`.
    pub fn set_growing(&self, digest: Digest, path: std::path::PathBuf, size: u64) {
        self.lock().growing.insert(digest, (path, size));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is only ever replaced whole, so a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn rewalk(&self) {
        let mut cache = self.walk.lock().await;
        let (images, blobs) = {
            let state = self.lock();
            let images: Vec<_> = state.images.values().cloned().collect();
            (images, Snapshot(state.blobs.clone()))
        };
        let index = match walk::walk(&images, &blobs, &mut cache).await {
            Ok(index) => index,
            // In memory every read succeeds; keep the old index if that ever changes.
            Err(err) => {
                tracing::warn!(%err, "memory store walk failed");
                return;
            }
        };
        let changed = {
            let mut state = self.lock();
            let changed = state.index.keys() != index.keys();
            state.index = index;
            changed
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }
}

struct Snapshot(HashMap<Digest, Bytes>);

#[async_trait::async_trait]
impl Blobs for Snapshot {
    fn size(&self, digest: &Digest) -> Option<u64> {
        self.0.get(digest).map(|b| b.len() as u64)
    }

    async fn read(&self, digest: &Digest, _size: u64) -> Result<Bytes, StoreError> {
        self.0.get(digest).cloned().ok_or(StoreError::NotFound)
    }
}

/// Partial ingests are the files [`MemoryStore::set_growing`] names; discarding records what
/// it was asked for (and forgets the digest's file).
#[async_trait::async_trait]
impl Ingests for MemoryStore {
    async fn discard(&self, digest: &Digest) -> Result<usize, StoreError> {
        let mut state = self.lock();
        state.discarded.push(*digest);
        Ok(usize::from(state.growing.remove(digest).is_some()))
    }

    async fn growing(&self, digest: &Digest) -> Option<Growing> {
        let (path, size) = self.lock().growing.get(digest).cloned()?;
        Growing::open(path, size).await.ok()
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn resolve(&self, reference: &str) -> Result<Digest, StoreError> {
        let state = self.lock();
        let tag = walk::tag_reference(reference).ok_or(StoreError::NotFound)?;
        let image = state.images.get(tag).ok_or(StoreError::NotFound)?;
        if !state.blobs.contains_key(&image.target) {
            return Err(StoreError::NotFound);
        }
        Ok(image.target)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let state = self.lock();
        let bytes = state.blobs.get(digest).ok_or(StoreError::NotFound)?;
        let size = bytes.len() as u64;
        let media_type = state.index.media_type(digest).or_else(|| {
            (size <= MAX_DOCUMENT_SIZE)
                .then(|| walk::sniff_media_type(bytes))
                .flatten()
        });
        Ok(Descriptor {
            digest: *digest,
            size,
            media_type,
        })
    }

    async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError> {
        let bytes = self
            .lock()
            .blobs
            .get(digest)
            .cloned()
            .ok_or(StoreError::NotFound)?;
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= bytes.len() as u64)
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "range {offset}+{len} is outside an object of {} bytes",
                    bytes.len()
                ))
            })?;
        // Both bounds fit in usize: they are at most the length of an in-memory buffer.
        let slice = bytes.slice(offset as usize..end as usize);
        Ok(Box::pin(std::io::Cursor::new(slice)))
    }

    async fn keys(&self) -> Result<Keys, StoreError> {
        Ok(self.lock().index.keys())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::store::conformance::{self, Sample};

    async fn loaded(sample: &Sample) -> MemoryStore {
        let store = MemoryStore::new();
        for blob in &sample.blobs {
            store.insert(blob.clone()).await;
        }
        for image in &sample.images {
            store
                .set_image(&image.name, image.target, Some(&image.media_type))
                .await;
        }
        store
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let sample = Sample::new("registry.test:5000");
        let store = loaded(&sample).await;
        conformance::check(&store, &sample.fixture).await.unwrap();
    }

    #[tokio::test]
    async fn conformance_catches_a_wrong_store() {
        let sample = Sample::new("registry.test:5000");
        let store = loaded(&sample).await;
        // A store that lost a layer and a tag must fail the suite.
        let layer = sample
            .fixture
            .objects
            .iter()
            .find(|o| o.media_type.as_deref().is_some_and(|m| m.contains("layer")))
            .unwrap();
        assert!(store.remove(&layer.digest).await);
        let err = conformance::check(&store, &sample.fixture)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&layer.digest.to_string()), "{err}");
        let (tag, _) = &sample.fixture.tags[0];
        assert!(store.remove_image(tag).await);
        let err = conformance::check(&store, &sample.fixture)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(tag.as_str()), "{err}");
    }

    #[tokio::test]
    async fn changes_move_only_when_keys_change() {
        let store = MemoryStore::new();
        let mut changes = store.changes();
        let blob = store.insert(&b"{\"schemaVersion\":2}"[..]).await;
        assert!(
            !changes.has_changed().unwrap(),
            "an unreferenced blob is not advertised"
        );
        store.set_image("r.test/a:v1", blob, None).await;
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(
            store.keys().await.unwrap(),
            Keys {
                digests: [blob].into(),
                tags: ["r.test/a:v1".to_owned()].into()
            }
        );
        store.set_image("r.test/a:v1", blob, None).await;
        assert!(!changes.has_changed().unwrap());
        assert!(store.remove_image("r.test/a:v1").await);
        assert!(changes.has_changed().unwrap());
        assert_eq!(store.keys().await.unwrap(), Keys::default());
    }

    #[tokio::test]
    async fn resolve_needs_the_target_content() {
        let store = MemoryStore::new();
        let digest = Digest::of(b"never inserted");
        store.set_image("r.test/a:v1", digest, None).await;
        assert!(matches!(
            store.resolve("r.test/a:v1").await,
            Err(StoreError::NotFound)
        ));
        assert!(store.keys().await.unwrap().tags.is_empty());
    }

    #[tokio::test]
    async fn open_rejects_ranges_outside_the_object() {
        let store = MemoryStore::new();
        let digest = store.insert(&b"0123456789"[..]).await;
        let mut out = String::new();
        store
            .open(&digest, 8, 2)
            .await
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "89");
        assert!(matches!(
            store.open(&digest, 8, 3).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.open(&digest, u64::MAX, 2).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
