//! [`LocalSource`]: serves objects from this node's content [`Store`], with Spegel's kind checks.
use std::sync::Arc;

use crate::{
    oci::{self, Kind, Reference, digest::Digest},
    source::{FileBody, Object, ObjectRequest, Payload, Source, SourceError, reader_body},
    store::{Descriptor, Opened, Store, StoreError},
};

/// A [`Source`] over the node-local store.
pub struct LocalSource {
    store: Arc<dyn Store>,
}

impl LocalSource {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The digest a request names: a tag is resolved through the store, which knows tags as
    /// `registry/repo:tag`, so a tag without a registry cannot be found.
    async fn digest(&self, request: &ObjectRequest) -> Result<Digest, SourceError> {
        match &request.reference {
            Reference::Digest(digest) => Ok(*digest),
            Reference::Tag(tag) => {
                let Some(registry) = &request.registry else {
                    return Err(SourceError::NotFound);
                };
                let name = format!("{registry}/{}:{tag}", request.repository);
                self.store.resolve(&name).await.map_err(store_error)
            }
        }
    }
}

#[async_trait::async_trait]
impl Source for LocalSource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let digest = self.digest(request).await?;
        let descriptor = self.store.descriptor(&digest).await.map_err(store_error)?;
        let media_type = served_media_type(request.kind, &descriptor)?;
        let size = descriptor.size;
        let range = match request.range {
            // Only blobs are served in pieces; the registry rejects ranged manifest requests
            // before they get here, and a whole manifest is the safe answer if one slips through.
            Some(range) if request.kind == Kind::Blob => Some(
                range
                    .resolve(size)
                    .ok_or(SourceError::RangeNotSatisfiable { size })?,
            ),
            _ => None,
        };
        let body = if request.head {
            Payload::Empty
        } else {
            let (offset, len) = match &range {
                Some(range) => (*range.start(), range.end() - range.start() + 1),
                None => (0, size),
            };
            match self.store.open_region(&digest, offset, len).await {
                Ok(Opened::File(region)) => Payload::File(FileBody::new(region)),
                Ok(Opened::Reader(reader)) => Payload::Stream(reader_body(reader)),
                Err(err) => return Err(store_error(err)),
            }
        };
        Ok(Object {
            digest,
            media_type,
            size,
            range,
            body,
            source: "local",
        })
    }
}

/// The media type to answer with, or `NotFound` when the object is of the wrong kind: as in
/// Spegel, a manifest asked for as a blob (or anything else asked for as a manifest) is a miss,
/// so the client moves on to a source that serves it the way it asked.
fn served_media_type(kind: Kind, descriptor: &Descriptor) -> Result<String, SourceError> {
    let media_type = descriptor.media_type.as_deref();
    let is_manifest = media_type.is_some_and(oci::is_manifest_media_type);
    match (kind, media_type) {
        (Kind::Manifest, Some(media_type)) if is_manifest => Ok(media_type.to_owned()),
        // The store sniffs manifests from their JSON; an object it could not type is not one.
        (Kind::Manifest, _) => Err(SourceError::NotFound),
        (Kind::Blob, _) if is_manifest => Err(SourceError::NotFound),
        (Kind::Blob, Some(media_type)) => Ok(media_type.to_owned()),
        (Kind::Blob, None) => Ok(oci::OCTET_STREAM.to_owned()),
    }
}

fn store_error(err: StoreError) -> SourceError {
    match err {
        StoreError::NotFound => SourceError::NotFound,
        StoreError::Unavailable(reason) => SourceError::Unavailable(reason),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use bytes::Bytes;
    use futures::TryStreamExt as _;
    use http::HeaderMap;

    use super::*;
    use crate::{
        oci::ByteRange,
        store::{Keys, Reader},
    };

    /// A store held in a map, for the local source's and the registry's tests.
    #[derive(Default)]
    pub(crate) struct FakeStore {
        pub(crate) objects: Mutex<HashMap<Digest, (Bytes, Option<String>)>>,
        pub(crate) tags: Mutex<HashMap<String, Digest>>,
        /// When set, every call fails as if containerd were down.
        pub(crate) down: std::sync::atomic::AtomicBool,
    }

    impl FakeStore {
        pub(crate) fn insert(&self, bytes: &[u8], media_type: Option<&str>) -> Digest {
            let digest = Digest::of(bytes);
            self.objects.lock().unwrap().insert(
                digest,
                (Bytes::copy_from_slice(bytes), media_type.map(str::to_owned)),
            );
            digest
        }

        pub(crate) fn tag(&self, name: &str, digest: Digest) {
            self.tags.lock().unwrap().insert(name.to_owned(), digest);
        }

        fn check_up(&self) -> Result<(), StoreError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Unavailable("containerd is down".into()));
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl Store for FakeStore {
        async fn resolve(&self, reference: &str) -> Result<Digest, StoreError> {
            self.check_up()?;
            let tags = self.tags.lock().unwrap();
            tags.get(reference).copied().ok_or(StoreError::NotFound)
        }

        async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
            self.check_up()?;
            let objects = self.objects.lock().unwrap();
            let (bytes, media_type) = objects.get(digest).ok_or(StoreError::NotFound)?;
            Ok(Descriptor {
                digest: *digest,
                size: bytes.len() as u64,
                media_type: media_type.clone(),
            })
        }

        async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError> {
            self.check_up()?;
            let objects = self.objects.lock().unwrap();
            let (bytes, _) = objects.get(digest).ok_or(StoreError::NotFound)?;
            let start = usize::try_from(offset).unwrap();
            let end = start + usize::try_from(len).unwrap();
            Ok(Box::pin(std::io::Cursor::new(bytes.slice(start..end))))
        }

        async fn keys(&self) -> Result<Keys, StoreError> {
            self.check_up()?;
            Ok(Keys::default())
        }

        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            tokio::sync::watch::Sender::new(0).subscribe()
        }
    }

    pub(crate) fn request(kind: Kind, reference: Reference) -> ObjectRequest {
        ObjectRequest {
            kind,
            registry: Some("docker.io".into()),
            repository: "library/nginx".into(),
            reference,
            range: None,
            head: false,
            headers: HeaderMap::new(),
            origin: None,
            mirrored: false,
            public_only: false,
        }
    }

    struct Fixture {
        store: Arc<FakeStore>,
        source: LocalSource,
        manifest: Digest,
        layer: Digest,
        untyped: Digest,
    }

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"layers":[]}"#;
    const LAYER: &[u8] = b"0123456789abcdefghij";

    fn fixture() -> Fixture {
        let store = Arc::new(FakeStore::default());
        let manifest = store.insert(MANIFEST, Some(oci::OCI_MANIFEST));
        let layer = store.insert(LAYER, Some(oci::OCI_LAYER_GZIP));
        let untyped = store.insert(b"who knows", None);
        store.tag("docker.io/library/nginx:1.27", manifest);
        let source = LocalSource::new(store.clone());
        Fixture {
            store,
            source,
            manifest,
            layer,
            untyped,
        }
    }

    async fn body_of(object: Object) -> Vec<u8> {
        let chunks: Vec<Bytes> = object
            .body
            .into_body()
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn serves_manifests_by_tag_and_digest() {
        let f = fixture();
        let by_tag = f
            .source
            .fetch(&request(Kind::Manifest, Reference::Tag("1.27".into())))
            .await
            .unwrap();
        assert_eq!(by_tag.digest, f.manifest);
        assert_eq!(by_tag.media_type, oci::OCI_MANIFEST);
        assert_eq!(by_tag.size, MANIFEST.len() as u64);
        assert_eq!(by_tag.range, None);
        assert_eq!(by_tag.source, "local");
        assert_eq!(body_of(by_tag).await, MANIFEST);

        let by_digest = f
            .source
            .fetch(&request(Kind::Manifest, Reference::Digest(f.manifest)))
            .await
            .unwrap();
        assert_eq!(body_of(by_digest).await, MANIFEST);
    }

    #[tokio::test]
    async fn tags_need_a_registry_and_must_exist() {
        let f = fixture();
        let mut no_registry = request(Kind::Manifest, Reference::Tag("1.27".into()));
        no_registry.registry = None;
        assert!(matches!(
            f.source.fetch(&no_registry).await,
            Err(SourceError::NotFound)
        ));
        let mut other_registry = request(Kind::Manifest, Reference::Tag("1.27".into()));
        other_registry.registry = Some("ghcr.io".into());
        assert!(matches!(
            f.source.fetch(&other_registry).await,
            Err(SourceError::NotFound)
        ));
        let missing = request(Kind::Manifest, Reference::Tag("1.28".into()));
        assert!(matches!(
            f.source.fetch(&missing).await,
            Err(SourceError::NotFound)
        ));
    }

    #[tokio::test]
    async fn kind_checks() {
        let f = fixture();
        let miss = |kind, digest| {
            let request = request(kind, Reference::Digest(digest));
            let source = &f.source;
            async move {
                let result = source.fetch(&request).await;
                assert!(
                    matches!(result, Err(SourceError::NotFound)),
                    "{kind:?} {digest} must miss, got {result:?}"
                );
            }
        };
        miss(Kind::Blob, f.manifest).await;
        miss(Kind::Manifest, f.layer).await;
        miss(Kind::Manifest, f.untyped).await;
        miss(Kind::Blob, Digest::of(b"absent")).await;

        let untyped = f
            .source
            .fetch(&request(Kind::Blob, Reference::Digest(f.untyped)))
            .await
            .unwrap();
        assert_eq!(untyped.media_type, oci::OCTET_STREAM);
        assert_eq!(body_of(untyped).await, b"who knows");

        let layer = f
            .source
            .fetch(&request(Kind::Blob, Reference::Digest(f.layer)))
            .await
            .unwrap();
        assert_eq!(layer.media_type, oci::OCI_LAYER_GZIP);
        assert_eq!(body_of(layer).await, LAYER);
    }

    #[tokio::test]
    async fn ranges() {
        let f = fixture();
        let ranged = |range| {
            let mut request = request(Kind::Blob, Reference::Digest(f.layer));
            request.range = Some(range);
            request
        };
        let from = |start, end| ByteRange::From { start, end };
        for (range, start, end) in [
            (from(2, Some(5)), 2, 5),
            (from(15, None), 15, 19),
            (from(10, Some(1000)), 10, 19),
            (ByteRange::Suffix(3), 17, 19),
            (ByteRange::Suffix(1000), 0, 19),
        ] {
            let object = f.source.fetch(&ranged(range)).await.unwrap();
            assert_eq!(object.range, Some(start..=end), "{range:?}");
            assert_eq!(object.size, LAYER.len() as u64);
            assert_eq!(
                body_of(object).await,
                &LAYER[start as usize..=end as usize],
                "{range:?}"
            );
        }
        for range in [from(20, None), from(100, Some(200)), ByteRange::Suffix(0)] {
            assert!(matches!(
                f.source.fetch(&ranged(range)).await,
                Err(SourceError::RangeNotSatisfiable { size: 20 })
            ));
        }
        // A range on a manifest is ignored, not honoured.
        let mut manifest = request(Kind::Manifest, Reference::Digest(f.manifest));
        manifest.range = Some(from(0, Some(1)));
        let object = f.source.fetch(&manifest).await.unwrap();
        assert_eq!(object.range, None);
        assert_eq!(body_of(object).await, MANIFEST);
    }

    #[tokio::test]
    async fn head_has_no_body() {
        let f = fixture();
        let mut head = request(Kind::Blob, Reference::Digest(f.layer));
        head.head = true;
        head.range = Some(ByteRange::Suffix(4));
        let object = f.source.fetch(&head).await.unwrap();
        assert!(object.body.is_empty());
        assert_eq!(object.range, Some(16..=19));
        assert_eq!(object.size, 20);
    }

    #[tokio::test]
    async fn store_outage_is_unavailable() {
        let f = fixture();
        f.store
            .down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for request in [
            request(Kind::Blob, Reference::Digest(f.layer)),
            request(Kind::Manifest, Reference::Tag("1.27".into())),
        ] {
            assert!(matches!(
                f.source.fetch(&request).await,
                Err(SourceError::Unavailable(_))
            ));
        }
    }
}
