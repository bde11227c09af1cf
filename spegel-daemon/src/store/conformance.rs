//! The conformance suite every [`Store`] must pass, plus a deterministic sample of images (OCI
//! and Docker schema 2, an index with a missing platform) to load into a store under test. Not
//! test-only code: the end-to-end crate runs it against real containerd.
use std::{collections::BTreeSet, fmt};

use bytes::Bytes;
use serde_json::json;
use tokio::io::AsyncReadExt as _;

use crate::{
    oci::digest::{Digest, Verifier},
    store::{Store, StoreError},
};

/// What a store loaded with some content must answer.
#[derive(Debug, Clone, Default)]
pub struct Fixture {
    /// `registry/repo:tag` → the digest it must resolve to.
    pub tags: Vec<(String, Digest)>,
    /// References that must not resolve: unknown tags, digest references, CRI image IDs, junk.
    pub unknown_tags: Vec<String>,
    /// Objects that must be present.
    pub objects: Vec<Expected>,
    /// Digests that must be absent: not described, not opened, not advertised.
    pub absent: Vec<Digest>,
}

/// One present object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub digest: Digest,
    pub size: u64,
    /// The media type the store must report; `None` to skip that check.
    pub media_type: Option<String>,
    /// Whether the object is reachable from an image and so must be in [`Store::keys`]; objects
    /// no image references must not be.
    pub advertised: bool,
}

/// Everything the suite found wrong, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Failures(pub Vec<String>);

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} store conformance failure(s):", self.0.len())?;
        for failure in &self.0 {
            writeln!(f, "  - {failure}")?;
        }
        Ok(())
    }
}

/// Ranged reads are checked in windows of at most this many bytes, so the suite's memory stays
/// small even for layers of hundreds of MiB.
const WINDOW: u64 = 64 << 10;

/// Runs the whole suite; collects every failure rather than stopping at the first.
pub async fn check(store: &dyn Store, fixture: &Fixture) -> Result<(), Failures> {
    let mut failures = Vec::new();
    for (tag, want) in &fixture.tags {
        match store.resolve(tag).await {
            Ok(got) if got == *want => {}
            Ok(got) => failures.push(format!("resolve({tag}) = {got}, want {want}")),
            Err(err) => failures.push(format!("resolve({tag}) failed: {err}, want {want}")),
        }
    }
    for tag in &fixture.unknown_tags {
        match store.resolve(tag).await {
            Err(StoreError::NotFound) => {}
            other => failures.push(format!("resolve({tag}) = {other:?}, want not found")),
        }
    }
    for object in &fixture.objects {
        check_object(store, object, &mut failures).await;
    }
    for digest in &fixture.absent {
        match store.descriptor(digest).await {
            Err(StoreError::NotFound) => {}
            other => failures.push(format!("descriptor({digest}) = {other:?}, want not found")),
        }
        match store.open(digest, 0, 1).await {
            Err(StoreError::NotFound) => {}
            Ok(_) => failures.push(format!("open({digest}) succeeded, want not found")),
            Err(err) => failures.push(format!("open({digest}) failed: {err}, want not found")),
        }
    }
    match store.keys().await {
        Ok(keys) => {
            for object in &fixture.objects {
                let listed = keys.digests.contains(&object.digest);
                if listed != object.advertised {
                    failures.push(format!(
                        "keys: {} listed = {listed}, want {}",
                        object.digest, object.advertised
                    ));
                }
            }
            for digest in fixture.absent.iter().filter(|d| keys.digests.contains(d)) {
                failures.push(format!("keys list absent {digest}"));
            }
            for (tag, _) in fixture.tags.iter().filter(|(t, _)| !keys.tags.contains(t)) {
                failures.push(format!("keys miss tag {tag}"));
            }
            for tag in fixture
                .unknown_tags
                .iter()
                .filter(|t| keys.tags.contains(*t))
            {
                failures.push(format!("keys list unknown tag {tag}"));
            }
        }
        Err(err) => failures.push(format!("keys() failed: {err}")),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Failures(failures))
    }
}

async fn check_object(store: &dyn Store, object: &Expected, failures: &mut Vec<String>) {
    let digest = object.digest;
    match store.descriptor(&digest).await {
        Ok(got) => {
            if got.digest != digest || got.size != object.size {
                failures.push(format!(
                    "descriptor({digest}) = {} bytes of {}, want {} bytes",
                    got.size, got.digest, object.size
                ));
            }
            if object.media_type.is_some() && got.media_type != object.media_type {
                failures.push(format!(
                    "descriptor({digest}) media type {:?}, want {:?}",
                    got.media_type, object.media_type
                ));
            }
        }
        Err(err) => {
            failures.push(format!("descriptor({digest}) failed: {err}"));
            return;
        }
    }
    let windows = windows(object.size);
    let captured = match read_whole(store, &digest, object.size, &windows).await {
        Ok(captured) => captured,
        Err(err) => {
            failures.push(format!("open({digest}) full read: {err}"));
            return;
        }
    };
    for ((offset, len), want) in windows.iter().zip(&captured) {
        let got = async {
            let reader = store.open(&digest, *offset, *len).await?;
            let mut got = Vec::new();
            // One byte more than asked: a reader must end exactly at `len`.
            reader
                .take(len + 1)
                .read_to_end(&mut got)
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok::<_, StoreError>(got)
        }
        .await;
        match got {
            Ok(got) if got == *want => {}
            Ok(got) => failures.push(format!(
                "open({digest}, {offset}, {len}) returned {} bytes that differ from the object's",
                got.len()
            )),
            Err(err) => failures.push(format!("open({digest}, {offset}, {len}) failed: {err}")),
        }
    }
}

/// The (offset, len) ranges checked for an object of `size` bytes: both ends, the middle, single
/// bytes, and for small objects every suffix shape too.
fn windows(size: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        return Vec::new();
    }
    let w = size.min(WINDOW);
    let mut windows = BTreeSet::from([
        (0, 1),
        (0, w),
        (size - w, w),
        (size / 2, w.min(size - size / 2)),
        (size - 1, 1),
    ]);
    if size > 1 {
        windows.insert((1, w.min(size - 1)));
    }
    if size > 2 {
        windows.insert((size / 3, (size / 3).clamp(1, WINDOW)));
    }
    windows.into_iter().collect()
}

/// Reads the whole object once, verifying its length and digest, and keeps the bytes of each
/// window.
async fn read_whole(
    store: &dyn Store,
    digest: &Digest,
    size: u64,
    windows: &[(u64, u64)],
) -> Result<Vec<Vec<u8>>, String> {
    let mut reader = store
        .open(digest, 0, size)
        .await
        .map_err(|e| e.to_string())?;
    let mut verifier = Verifier::new(*digest);
    let mut captured: Vec<Vec<u8>> = windows.iter().map(|_| Vec::new()).collect();
    let mut buf = vec![0u8; 256 << 10];
    let mut position = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        verifier.update(chunk);
        let chunk_end = position + n as u64;
        for ((offset, len), out) in windows.iter().zip(&mut captured) {
            let start = (*offset).max(position);
            let end = (offset + len).min(chunk_end);
            if start < end {
                out.extend_from_slice(
                    &chunk[(start - position) as usize..(end - position) as usize],
                );
            }
        }
        position = chunk_end;
        if position > size {
            return Err(format!("more than the {size} bytes asked for"));
        }
    }
    if position != size {
        return Err(format!("{position} bytes, want {size}"));
    }
    if !verifier.verify() {
        return Err("content does not hash to its digest".to_owned());
    }
    Ok(captured)
}

/// An image record to create in the store under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleImage {
    /// A containerd image name: `registry/repo:tag`, `registry/repo@sha256:…` or `sha256:…`.
    pub name: String,
    pub target: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A deterministic set of blobs and image records, and the [`Fixture`] a store holding exactly
/// them must satisfy. Layers are random bytes, not tarballs: stores never unpack them.
#[derive(Debug, Clone)]
pub struct Sample {
    pub blobs: Vec<Bytes>,
    /// Content the images reference but the sample leaves out (in [`Fixture::absent`] order):
    /// the arm64 manifest, config and layer of the index, and a Docker manifest of the list.
    /// Adding them later exercises a store's resync.
    pub unstored: Vec<Bytes>,
    pub images: Vec<SampleImage>,
    pub fixture: Fixture,
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

impl Sample {
    /// The sample, with image names under `registry` (e.g. `10.1.2.3:5000`).
    pub fn new(registry: &str) -> Self {
        let mut builder = Builder::default();
        let repo = |name: &str| format!("{registry}/conformance/{name}");

        // An OCI image with a layer above the 1 MiB gRPC chunk size and a tiny one.
        let oci_config = builder.config("amd64");
        let big = builder.random(3 * (1 << 20) + 17);
        let tiny = builder.random(100);
        let oci = builder.manifest(
            Some(OCI_MANIFEST),
            (OCI_CONFIG, &oci_config),
            &[(OCI_LAYER, &big), (OCI_LAYER, &tiny)],
        );
        // A Docker schema 2 image.
        let docker_config = builder.config("amd64");
        let docker_layer = builder.random(500 << 10);
        let docker = builder.manifest(
            Some(DOCKER_MANIFEST),
            (DOCKER_CONFIG, &docker_config),
            &[(DOCKER_LAYER, &docker_layer)],
        );
        // An OCI index whose amd64 entry has no media type (the manifest's JSON says) and whose
        // arm64 manifest and layer were never pulled.
        let amd64_config = builder.config("amd64");
        let amd64_layer = builder.random(64 << 10);
        let amd64 = builder.manifest(
            Some(OCI_MANIFEST),
            (OCI_CONFIG, &amd64_config),
            &[(OCI_LAYER, &amd64_layer)],
        );
        let arm64_config = builder.config("arm64");
        let arm64_layer = builder.random(1000);
        let arm64 = builder.manifest(
            None,
            (OCI_CONFIG, &arm64_config),
            &[(OCI_LAYER, &arm64_layer)],
        );
        let multi = builder.document(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"digest": Digest::of(&amd64).to_string(), "size": amd64.len(),
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": Digest::of(&arm64).to_string(), "size": arm64.len(),
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ],
        }));
        // A Docker manifest list sharing the Docker image, with a platform never pulled.
        let absent_docker = builder.manifest(
            Some(DOCKER_MANIFEST),
            (DOCKER_CONFIG, &arm64_config),
            &[(DOCKER_LAYER, &arm64_layer)],
        );
        let list = builder.document(&json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [descriptor(DOCKER_MANIFEST, &docker), descriptor(DOCKER_MANIFEST, &absent_docker)],
        }));
        // Content no image references.
        let orphan = builder.config("s390x");

        let present: Vec<(&Bytes, Option<&str>, bool)> = vec![
            (&oci, Some(OCI_MANIFEST), true),
            (&oci_config, Some(OCI_CONFIG), true),
            (&big, Some(OCI_LAYER), true),
            (&tiny, Some(OCI_LAYER), true),
            (&docker, Some(DOCKER_MANIFEST), true),
            (&docker_config, Some(DOCKER_CONFIG), true),
            (&docker_layer, Some(DOCKER_LAYER), true),
            (&multi, Some(OCI_INDEX), true),
            (&amd64, Some(OCI_MANIFEST), true),
            (&amd64_config, Some(OCI_CONFIG), true),
            (&amd64_layer, Some(OCI_LAYER), true),
            (&list, Some(DOCKER_LIST), true),
            (&orphan, Some(OCI_CONFIG), false),
        ];
        let image = |name: String, bytes: &Bytes, media_type: &str| SampleImage {
            name,
            target: Digest::of(bytes),
            size: bytes.len() as u64,
            media_type: media_type.to_owned(),
        };
        let images = vec![
            image(repo("oci:v1"), &oci, OCI_MANIFEST),
            image(repo("oci:latest"), &oci, OCI_MANIFEST),
            image(
                format!("{}@{}", repo("oci"), Digest::of(&oci)),
                &oci,
                OCI_MANIFEST,
            ),
            image(Digest::of(&oci_config).to_string(), &oci, OCI_MANIFEST),
            image(repo("docker:v1"), &docker, DOCKER_MANIFEST),
            image(repo("multi:v1"), &multi, OCI_INDEX),
            image(repo("list:v1"), &list, DOCKER_LIST),
            // An image record whose content is gone: its tag must not resolve.
            image(repo("gone:v1"), &arm64, OCI_MANIFEST),
        ];
        let tags = vec![
            (repo("oci:v1"), Digest::of(&oci)),
            (repo("oci:latest"), Digest::of(&oci)),
            (repo("docker:v1"), Digest::of(&docker)),
            (repo("multi:v1"), Digest::of(&multi)),
            (repo("list:v1"), Digest::of(&list)),
        ];
        let unknown_tags = vec![
            repo("oci:v2"),
            repo("absent:v1"),
            repo("gone:v1"),
            repo("oci"),
            format!("{}@{}", repo("oci"), Digest::of(&oci)),
            Digest::of(&oci_config).to_string(),
            "conformance/oci:v1".to_owned(),
            "not a reference".to_owned(),
        ];
        let objects = present
            .iter()
            .map(|(bytes, media_type, advertised)| Expected {
                digest: Digest::of(bytes),
                size: bytes.len() as u64,
                media_type: media_type.map(str::to_owned),
                advertised: *advertised,
            })
            .collect();
        let unstored: Vec<Bytes> = [&arm64, &arm64_config, &arm64_layer, &absent_docker]
            .into_iter()
            .cloned()
            .collect();
        let absent = unstored
            .iter()
            .map(|b| Digest::of(b))
            .chain([Digest::of(b"conformance: never stored")])
            .collect();
        let blobs = present.iter().map(|(b, _, _)| (*b).clone()).collect();
        Self {
            blobs,
            unstored,
            images,
            fixture: Fixture {
                tags,
                unknown_tags,
                objects,
                absent,
            },
        }
    }
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": Digest::of(bytes).to_string(), "size": bytes.len()})
}

/// Makes deterministic content: a xorshift generator, so no seedable RNG is needed and the
/// digests are the same on every machine.
struct Builder {
    state: u64,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl Builder {
    fn random(&mut self, len: usize) -> Bytes {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            out.extend_from_slice(&self.state.to_le_bytes());
        }
        out.truncate(len);
        Bytes::from(out)
    }

    fn config(&mut self, architecture: &str) -> Bytes {
        let salt = hex::encode(self.random(8));
        self.document(&json!({
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": [format!("SALT={salt}")]},
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
    }

    fn manifest(
        &mut self,
        media_type: Option<&str>,
        config: (&str, &[u8]),
        layers: &[(&str, &Bytes)],
    ) -> Bytes {
        let mut manifest = json!({
            "schemaVersion": 2,
            "config": descriptor(config.0, config.1),
            "layers": layers.iter().map(|(m, b)| descriptor(m, b)).collect::<Vec<_>>(),
        });
        if let (Some(media_type), Some(object)) = (media_type, manifest.as_object_mut()) {
            object.insert("mediaType".into(), media_type.into());
        }
        self.document(&manifest)
    }

    fn document(&mut self, value: &serde_json::Value) -> Bytes {
        // Serialising a `Value` cannot fail.
        Bytes::from(serde_json::to_vec(value).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_deterministic_and_consistent() {
        let a = Sample::new("r.test");
        let b = Sample::new("r.test");
        assert_eq!(a.blobs, b.blobs);
        let stored: BTreeSet<_> = a.blobs.iter().map(|b| Digest::of(b)).collect();
        assert_eq!(stored.len(), a.blobs.len(), "no duplicate blobs");
        for object in &a.fixture.objects {
            assert!(stored.contains(&object.digest));
        }
        for absent in &a.fixture.absent {
            assert!(!stored.contains(absent));
        }
        for (tag, digest) in &a.fixture.tags {
            assert!(stored.contains(digest), "{tag}");
        }
        assert!(a.fixture.objects.iter().any(|o| o.size > 1 << 20));
    }

    #[test]
    fn windows_stay_inside_the_object() {
        for size in [1, 2, 3, 10, WINDOW - 1, WINDOW, WINDOW + 1, 3 << 20] {
            let windows = windows(size);
            assert!(windows.contains(&(0, 1)));
            assert!(windows.contains(&(size - 1, 1)));
            for (offset, len) in windows {
                assert!(
                    (1..=WINDOW).contains(&len) && offset + len <= size,
                    "{size}"
                );
            }
        }
        assert!(windows(0).is_empty());
    }
}
