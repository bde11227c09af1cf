//! The image walk both stores share: image records → every present object they reference, each
//! with the media type its parent gives it, and the `registry/repo:tag` names they are known by.
use std::{
    collections::{HashMap, HashSet},
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncRead, ReadBuf};

use crate::{
    oci::digest::Digest,
    store::{Keys, StoreError},
};

/// Manifests, indexes and blobs sniffed for their media type are read whole only up to this size
/// (Spegel's cap too): anything larger is not a manifest any registry would accept.
pub(crate) const MAX_DOCUMENT_SIZE: u64 = 4 << 20;
/// Indexes may point at indexes; a walk deeper than this is treated as broken content.
const MAX_DEPTH: usize = 8;
/// The longest tag the distribution spec allows.
const MAX_TAG_LEN: usize = 128;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What the walk knows about one present object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) size: u64,
    pub(crate) media_type: Option<String>,
}

/// The result of a walk: every present object reachable from an image, and every tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    pub(crate) objects: HashMap<Digest, Entry>,
    pub(crate) tags: HashMap<String, Digest>,
}

impl Index {
    pub(crate) fn keys(&self) -> Keys {
        Keys {
            digests: self.objects.keys().copied().collect(),
            tags: self.tags.keys().cloned().collect(),
        }
    }

    pub(crate) fn media_type(&self, digest: &Digest) -> Option<String> {
        self.objects.get(digest)?.media_type.clone()
    }
}

/// One image record as containerd keeps it: a name and the descriptor it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRecord {
    pub(crate) name: String,
    pub(crate) target: Digest,
    pub(crate) media_type: Option<String>,
}

/// A manifest or index, reduced to what the walk needs. Content-addressed, so it can be cached
/// for as long as the digest stays present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The document's own `mediaType`, or what its shape says when it has none.
    pub(crate) media_type: Option<String>,
    /// Index entries, or config then layers, with the media type the document gives them.
    pub(crate) children: Vec<(Digest, Option<String>)>,
}

/// Parsed documents by digest; `None` records content that is not a manifest or index.
pub(crate) type ParseCache = HashMap<Digest, Option<Parsed>>;

/// What the walk reads: the store's content.
#[async_trait::async_trait]
pub(crate) trait Blobs: Send + Sync {
    /// The size of a present object; `None` when absent.
    fn size(&self, digest: &Digest) -> Option<u64>;
    /// The whole content of a present object of `size` bytes (at most [`MAX_DOCUMENT_SIZE`]).
    async fn read(&self, digest: &Digest, size: u64) -> Result<Bytes, StoreError>;
}

/// Walks every image: index → manifests → config and layers. Objects that are absent (other
/// platforms of an index, layers a node discarded) are skipped with everything below them.
/// Fails only when the content cannot be read at all, so callers keep their previous index
/// rather than advertising half of it. `cache` keeps what it parsed, and only that.
pub(crate) async fn walk(
    images: &[ImageRecord],
    blobs: &dyn Blobs,
    cache: &mut ParseCache,
) -> Result<Index, StoreError> {
    let mut index = Index::default();
    let mut used = ParseCache::new();
    let mut expanded = HashSet::new();
    for image in images {
        let Some(size) = blobs.size(&image.target) else {
            tracing::debug!(image = %image.name, target = %image.target, "image target not present");
            continue;
        };
        if let Some(tag) = tag_reference(&image.name) {
            index.tags.insert(tag.to_owned(), image.target);
        }
        let mut stack = vec![(image.target, size, image.media_type.clone(), 0usize)];
        while let Some((digest, size, media_type, depth)) = stack.pop() {
            let entry = index.objects.entry(digest).or_insert(Entry {
                size,
                media_type: None,
            });
            if entry.media_type.is_none() {
                entry.media_type = media_type.filter(|m| !m.is_empty());
            }
            if !expanded.insert(digest) || !worth_parsing(entry.media_type.as_deref()) {
                continue;
            }
            if depth >= MAX_DEPTH {
                tracing::warn!(%digest, "manifests nested too deep, not walking further");
                continue;
            }
            let parsed = match cache.get(&digest) {
                Some(parsed) => parsed.clone(),
                None => {
                    let Some(parsed) = read_document(blobs, &digest, size).await? else {
                        continue;
                    };
                    parsed
                }
            };
            used.insert(digest, parsed.clone());
            let Some(parsed) = parsed else { continue };
            if entry.media_type.is_none() {
                entry.media_type = parsed.media_type.clone();
            }
            for (child, child_media_type) in parsed.children.iter().rev() {
                match blobs.size(child) {
                    Some(child_size) => {
                        stack.push((*child, child_size, child_media_type.clone(), depth + 1))
                    }
                    None => tracing::trace!(parent = %digest, %child, "child not present"),
                }
            }
        }
    }
    *cache = used;
    Ok(index)
}

/// Whether an object with this media type may be a manifest or index. Unknown types are tried
/// (image records and index entries normally say; when they do not, the JSON does).
fn worth_parsing(media_type: Option<&str>) -> bool {
    media_type.is_none_or(|m| {
        let essence = m.split(';').next().unwrap_or_default().trim();
        [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST_LIST,
            DOCKER_MANIFEST,
        ]
        .iter()
        .any(|known| known.eq_ignore_ascii_case(essence))
    })
}

/// Reads and parses one document. `Ok(None)` when it is too big or the read lost a race with a
/// deletion; `Ok(Some(None))` when it is not a manifest or index.
async fn read_document(
    blobs: &dyn Blobs,
    digest: &Digest,
    size: u64,
) -> Result<Option<Option<Parsed>>, StoreError> {
    if size > MAX_DOCUMENT_SIZE {
        tracing::warn!(%digest, size, "manifest larger than 4 MiB, not walking it");
        return Ok(Some(None));
    }
    let bytes = match blobs.read(digest, size).await {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound) => return Ok(None),
        Err(err) => return Err(err),
    };
    if Digest::of(&bytes) != *digest {
        // Not cached: a torn read is not a property of the content.
        tracing::warn!(%digest, "content does not match its digest, not walking it");
        return Ok(None);
    }
    let parsed = parse_document(&bytes);
    if parsed.is_none() {
        tracing::debug!(%digest, "not a manifest or index");
    }
    Ok(Some(parsed))
}

/// A descriptor as found in indexes and manifests; only what the walk uses, everything lenient.
#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
}

/// The union of the index, manifest and image-config shapes (Docker schema 2 uses the same
/// field names as OCI). Not oci-spec's `ImageManifest` / `ImageIndex`: they reject a whole
/// document over one odd descriptor (a descriptor without `mediaType` or `size`, a digest
/// oci-spec does not accept such as a short `sha512:`) or a missing `schemaVersion`, where the
/// walk keeps every child it can serve; and they accept digest algorithms we cannot serve. So
/// the walk reads only these fields itself.
#[derive(Deserialize)]
struct Document {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    /// A descriptor in a manifest, the container config in an image config.
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    architecture: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    os: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    rootfs: Option<serde::de::IgnoredAny>,
}

/// Parses a manifest or index; `None` for anything else (including image configs and broken
/// JSON). Children whose digest is not sha256 are left out: nothing could serve them.
pub(crate) fn parse_document(bytes: &[u8]) -> Option<Parsed> {
    let document = read_object(bytes)?;
    let child = |d: RawDescriptor| Some((d.digest.parse().ok()?, d.media_type));
    if let Some(manifests) = document.manifests {
        return Some(Parsed {
            media_type: document.media_type.or_else(|| Some(OCI_INDEX.to_owned())),
            children: manifests.into_iter().filter_map(child).collect(),
        });
    }
    let (Some(config), Some(layers)) = (document.config, document.layers) else {
        return None;
    };
    let config = serde_json::from_value::<RawDescriptor>(config).ok()?;
    Some(Parsed {
        media_type: document
            .media_type
            .or_else(|| Some(OCI_MANIFEST.to_owned())),
        children: std::iter::once(config)
            .chain(layers)
            .filter_map(child)
            .collect(),
    })
}

/// The media type a blob's own bytes suggest, for content no walk has typed (after Spegel's
/// fingerprinting): manifests and indexes by their `mediaType` or shape, image configs by theirs.
pub(crate) fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    if let Some(parsed) = parse_document(bytes) {
        return parsed.media_type;
    }
    let document = read_object(bytes)?;
    if document.architecture.is_some() && document.os.is_some() && document.rootfs.is_some() {
        return Some(OCI_CONFIG.to_owned());
    }
    None
}

/// The JSON object in `bytes` as a [`Document`]. Only an object: serde would also fill a struct
/// from a JSON array, field by field, which would make `["<anything>", []]` an index.
fn read_object(bytes: &[u8]) -> Option<Document> {
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// The name itself when an image name is a `registry/repo:tag` reference; `None` for digest
/// references (`repo@sha256:…`), CRI's image IDs (`sha256:…`) and names without a registry.
pub(crate) fn tag_reference(name: &str) -> Option<&str> {
    if name.contains('@') {
        return None;
    }
    let (path, last) = name.rsplit_once('/')?;
    let (repository, tag) = last.split_once(':')?;
    let registry = path.split('/').next().unwrap_or_default();
    if registry.is_empty() || repository.is_empty() || path.split('/').any(str::is_empty) {
        return None;
    }
    let valid_tag = tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    valid_tag.then_some(name)
}

/// Yields exactly `len` bytes of `inner`, and fails rather than ending early: a reader that
/// stops short must not look like a complete object to whoever streams it.
pub(crate) struct Exact<R> {
    inner: tokio::io::Take<R>,
    remaining: u64,
}

impl<R: AsyncRead + Unpin> Exact<R> {
    pub(crate) fn new(inner: R, len: u64) -> Self {
        use tokio::io::AsyncReadExt as _;
        Self {
            inner: inner.take(len),
            remaining: len,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Exact<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.remaining == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = (buf.filled().len() - before) as u64;
        if read == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("content ended {} bytes early", self.remaining),
            )));
        }
        self.remaining = self.remaining.saturating_sub(read);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    struct Map(HashMap<Digest, Bytes>);

    impl Map {
        fn new(blobs: &[&[u8]]) -> Self {
            Self(
                blobs
                    .iter()
                    .map(|b| (Digest::of(b), Bytes::copy_from_slice(b)))
                    .collect(),
            )
        }
    }

    #[async_trait::async_trait]
    impl Blobs for Map {
        fn size(&self, digest: &Digest) -> Option<u64> {
            self.0.get(digest).map(|b| b.len() as u64)
        }
        async fn read(&self, digest: &Digest, _size: u64) -> Result<Bytes, StoreError> {
            self.0.get(digest).cloned().ok_or(StoreError::NotFound)
        }
    }

    fn desc(media_type: &str, bytes: &[u8]) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": Digest::of(bytes).to_string(), "size": bytes.len()})
    }

    #[test]
    fn tag_references() {
        for good in [
            "docker.io/library/nginx:1.27",
            "10.1.2.3:5000/probe/small:v1",
            "registry.test/a/b/c:_x.y-z",
            "localhost:5000/x:latest",
        ] {
            assert_eq!(tag_reference(good), Some(good), "{good}");
        }
        for bad in [
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "docker.io/library/nginx@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "docker.io/library/nginx:1.27@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "docker.io/library/nginx",
            "nginx:1.27",
            "10.1.2.3:5000/probe",
            "docker.io//nginx:1",
            "/nginx:1",
            "docker.io/nginx:",
            "docker.io/nginx:.x",
            "docker.io/nginx:a/b",
            "docker.io/:tag",
            &format!("docker.io/nginx:{}", "a".repeat(129)),
        ] {
            assert_eq!(tag_reference(bad), None, "{bad}");
        }
    }

    /// Found by the `manifest` fuzz target: serde fills a struct from a JSON array too, so
    /// `["<media type>", []]` read as an index with any media type at all.
    #[test]
    fn json_arrays_are_not_documents() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for bytes in [
            r#"["xxxxxxxxxxe [",[]]"#.to_owned(),
            format!(r#"[null, [{{"digest": "{digest}"}}]]"#),
            format!(r#"[null, null, {{"digest": "{digest}"}}, []]"#),
            r#"[null, null, null, null, "amd64", "linux", {}]"#.to_owned(),
        ] {
            assert_eq!(parse_document(bytes.as_bytes()), None, "{bytes}");
            assert_eq!(sniff_media_type(bytes.as_bytes()), None, "{bytes}");
        }
        let index = format!(r#" {{"manifests": [{{"digest": "{digest}"}}]}}"#);
        assert_eq!(
            sniff_media_type(index.as_bytes()).as_deref(),
            Some(OCI_INDEX)
        );
    }

    #[test]
    fn parses_indexes_and_manifests() {
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Cmd":["/bin/true"]}}"#;
        let layer = b"layer";
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": desc("application/vnd.docker.container.image.v1+json", config),
            "layers": [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", layer),
                       {"mediaType": "x", "digest": "sha512:abcd", "size": 1}],
        }))
        .unwrap();
        let parsed = parse_document(&manifest).unwrap();
        assert_eq!(parsed.media_type.as_deref(), Some(DOCKER_MANIFEST));
        assert_eq!(
            parsed.children,
            vec![
                (
                    Digest::of(config),
                    Some("application/vnd.docker.container.image.v1+json".into())
                ),
                (
                    Digest::of(layer),
                    Some("application/vnd.docker.image.rootfs.diff.tar.gzip".into())
                ),
            ]
        );
        // No mediaType: the shape decides.
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"digest": Digest::of(&manifest).to_string(), "size": manifest.len()}],
        }))
        .unwrap();
        let parsed = parse_document(&index).unwrap();
        assert_eq!(parsed.media_type.as_deref(), Some(OCI_INDEX));
        assert_eq!(parsed.children, vec![(Digest::of(&manifest), None)]);

        assert_eq!(parse_document(config), None);
        assert_eq!(sniff_media_type(config).as_deref(), Some(OCI_CONFIG));
        assert_eq!(sniff_media_type(&index).as_deref(), Some(OCI_INDEX));
        for junk in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"\x1f\x8b\x08\0",
            br#"{"mediaType": 5, "manifests": []}"#,
            br#"{"config": {"digest": 5}, "layers": []}"#,
            br#"{"manifests": {"not": "a list"}}"#,
        ] {
            assert_eq!(parse_document(junk), None);
            assert_eq!(sniff_media_type(junk), None);
        }
    }

    #[tokio::test]
    async fn walks_present_content_only() {
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{}}"#;
        let layer = b"layer bytes";
        let absent_layer = b"absent";
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, config),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar", layer),
                       desc("application/vnd.oci.image.layer.v1.tar", absent_layer)],
        }))
        .unwrap();
        let other_platform = b"{\"schemaVersion\":2}";
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            // The entry carries no media type: the manifest's own JSON supplies it.
            "manifests": [{"digest": Digest::of(&manifest).to_string(), "size": manifest.len()},
                          desc(OCI_MANIFEST, other_platform)],
        }))
        .unwrap();
        let blobs = Map::new(&[config, layer, &manifest, &index]);
        let images = [
            ImageRecord {
                name: "registry.test/app:v1".into(),
                target: Digest::of(&index),
                media_type: Some(OCI_INDEX.into()),
            },
            ImageRecord {
                name: format!("registry.test/app@{}", Digest::of(&index)),
                target: Digest::of(&index),
                media_type: Some(OCI_INDEX.into()),
            },
            ImageRecord {
                name: "registry.test/gone:v1".into(),
                target: Digest::of(b"gone"),
                media_type: Some(OCI_MANIFEST.into()),
            },
        ];
        let mut cache = ParseCache::new();
        let index_out = walk(&images, &blobs, &mut cache).await.unwrap();
        let media = |b: &[u8]| index_out.media_type(&Digest::of(b));
        assert_eq!(index_out.objects.len(), 4);
        assert_eq!(media(&index).as_deref(), Some(OCI_INDEX));
        assert_eq!(media(&manifest).as_deref(), Some(OCI_MANIFEST));
        assert_eq!(media(config).as_deref(), Some(OCI_CONFIG));
        assert_eq!(
            media(layer).as_deref(),
            Some("application/vnd.oci.image.layer.v1.tar")
        );
        assert_eq!(
            index_out.objects[&Digest::of(layer)].size,
            layer.len() as u64
        );
        assert_eq!(
            index_out.tags,
            HashMap::from([("registry.test/app:v1".to_owned(), Digest::of(&index))])
        );
        // Only the two documents were parsed; the config and layer were never read.
        assert_eq!(cache.len(), 2);

        // The cache answers without reading: a store that can no longer read still walks.
        struct SizesOnly(Map);
        #[async_trait::async_trait]
        impl Blobs for SizesOnly {
            fn size(&self, digest: &Digest) -> Option<u64> {
                self.0.size(digest)
            }
            async fn read(&self, _: &Digest, _: u64) -> Result<Bytes, StoreError> {
                Err(StoreError::Unavailable("down".into()))
            }
        }
        let again = walk(&images, &SizesOnly(blobs), &mut cache).await.unwrap();
        assert_eq!(again, index_out);
        let err = walk(
            &images,
            &SizesOnly(Map::new(&[&index])),
            &mut ParseCache::new(),
        )
        .await;
        assert!(matches!(err, Err(StoreError::Unavailable(_))));
    }

    #[tokio::test]
    async fn skips_oversized_documents() {
        let huge = vec![b' '; MAX_DOCUMENT_SIZE as usize + 1];
        let blobs = Map::new(&[&huge]);
        let images = [ImageRecord {
            name: "r.test/huge:v1".into(),
            target: Digest::of(&huge),
            media_type: Some(OCI_MANIFEST.into()),
        }];
        let index = walk(&images, &blobs, &mut ParseCache::new()).await.unwrap();
        assert_eq!(index.objects.len(), 1);
        assert_eq!(index.tags.len(), 1);
    }

    #[tokio::test]
    async fn exact_reader_fails_on_short_content() {
        let mut out = Vec::new();
        Exact::new(&b"0123456789"[..], 4)
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"0123");
        let err = Exact::new(&b"0123"[..], 5)
            .read_to_end(&mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
