//! Deterministic test images: seeded layer data, gzip tar layers, an OCI layout, skopeo pushes.
//!
//! The same [`ImageSpec`] always yields byte-identical blobs (and so identical digests) on every
//! machine: layer data comes from a seeded splitmix64 stream, tar headers carry fixed metadata
//! (mtime 0, uid/gid 0), gzip headers have mtime 0, and JSON documents are serialised in a fixed
//! key order. Change the seed or the name and every digest changes, which is how tests make
//! "new" images that no node has seen yet.

use std::io::{self, BufWriter, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::cmd;
use super::registry::Endpoint;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// OCI media type of a gzip-compressed tar layer.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI media type of an image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI media type of an image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI media type of an image index.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The annotation naming a manifest in an OCI layout's `index.json`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An OS/architecture pair, as in an OCI index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
}

impl Platform {
    /// `linux/<architecture>`.
    pub fn linux(architecture: &str) -> Self {
        Self {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
        }
    }

    /// The platform containerd on this machine pulls (`linux/amd64` on x86_64).
    pub fn host() -> Self {
        Self::linux(match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

/// What to build: name, layer sizes, seed, and either one manifest or an index of platforms.
///
/// Layer sizes are the amount of random payload per layer; the gzip blob is a little larger
/// (tar headers and stored-block framing: random data does not compress, so layers are gzip
/// streams of stored deflate blocks, which keeps image generation fast).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub(crate) name: String,
    pub(crate) repository: String,
    pub(crate) tag: String,
    seed: u64,
    layers: Vec<u64>,
    index_platforms: Option<Vec<Platform>>,
}

impl ImageSpec {
    /// An image called `name` (unique per rig), pushed as `rig/<name>:v1`, seed 0, no layers yet.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            repository: format!("rig/{name}"),
            name,
            tag: "v1".to_owned(),
            seed: 0,
            layers: Vec::new(),
            index_platforms: None,
        }
    }

    /// `small`: one ~1 MiB layer.
    pub fn small() -> Self {
        Self::new("small").layers([MIB])
    }

    /// `four`: four layers of 64 KiB, 1 MiB, 4 MiB and 16 MiB.
    pub fn four() -> Self {
        Self::new("four").layers([64 * KIB, MIB, 4 * MIB, 16 * MIB])
    }

    /// `multi`: an index with linux/amd64 and linux/arm64 manifests, one 1 MiB layer each.
    pub fn multi() -> Self {
        Self::new("multi")
            .layers([MIB])
            .index([Platform::linux("amd64"), Platform::linux("arm64")])
    }

    /// Sets the layer payload sizes in bytes (one layer per entry).
    pub fn layers(mut self, sizes: impl IntoIterator<Item = u64>) -> Self {
        self.layers = sizes.into_iter().collect();
        self
    }

    /// Sets the seed; a different seed gives different data and digests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the tag (default `v1`).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Sets the repository (default `rig/<name>`).
    pub fn repository(mut self, repository: impl Into<String>) -> Self {
        self.repository = repository.into();
        self
    }

    /// Makes it an index with one manifest per platform (each with the configured layer sizes
    /// and its own data). Without this the image is a single manifest for [`Platform::host`].
    pub fn index(mut self, platforms: impl IntoIterator<Item = Platform>) -> Self {
        self.index_platforms = Some(platforms.into_iter().collect());
        self
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<()> {
        let name_ok = |text: &str| {
            !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        };
        ensure!(
            name_ok(&self.name),
            "image name {:?} must be non-empty lowercase [a-z0-9._-]",
            self.name
        );
        ensure!(
            self.repository.split('/').all(name_ok),
            "repository {:?} is not a valid OCI repository name",
            self.repository
        );
        ensure!(
            !self.tag.is_empty()
                && self
                    .tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "tag {:?} is not a valid OCI tag",
            self.tag
        );
        ensure!(!self.layers.is_empty(), "image {} has no layers", self.name);
        if let Some(platforms) = &self.index_platforms {
            ensure!(
                !platforms.is_empty(),
                "index {} has no platforms",
                self.name
            );
        }
        Ok(())
    }
}

/// A content descriptor: digest, size and media type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// The OCI media type.
    pub media_type: String,
}

/// One platform's manifest with its config and layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    /// The platform it is for.
    pub platform: Platform,
    /// The manifest document itself.
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// The layers (compressed blobs), bottom first.
    pub layers: Vec<Blob>,
    /// The uncompressed layer digests (`rootfs.diff_ids`), as in containerd's
    /// `containerd.io/uncompressed` labels.
    pub diff_ids: Vec<String>,
}

impl ImageManifest {
    /// Config and layers: the blobs a pull of this manifest downloads from `/blobs/`.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// A built image, before it is pushed anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BuiltImage {
    pub(crate) spec: ImageSpec,
    pub(crate) index: Option<Blob>,
    pub(crate) manifests: Vec<ImageManifest>,
}

/// A test image pushed to the rig's registry, with every digest tests may want to assert on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestImage {
    /// The image's name (its ref name in the OCI layout).
    pub name: String,
    /// The repository (`rig/four`).
    pub repository: String,
    /// The tag (`v1`).
    pub tag: String,
    /// The index, for multi-platform images.
    pub index: Option<Blob>,
    /// One manifest per platform (exactly one for single-manifest images).
    pub manifests: Vec<ImageManifest>,
    registry_hostname: String,
    registry_ip: Ipv4Addr,
}

impl TestImage {
    pub(crate) fn new(built: BuiltImage, registry_hostname: String, registry_ip: Ipv4Addr) -> Self {
        Self {
            name: built.spec.name,
            repository: built.spec.repository,
            tag: built.spec.tag,
            index: built.index,
            manifests: built.manifests,
            registry_hostname,
            registry_ip,
        }
    }

    /// `registry.<prefix>.test:<port>`: the registry part of its references (what `?ns=` names).
    pub fn registry(&self, endpoint: Endpoint) -> String {
        format!("{}:{}", self.registry_hostname, endpoint.port())
    }

    /// `registry.<prefix>.test:<port>/<repository>:<tag>`: what to pull.
    pub fn reference(&self, endpoint: Endpoint) -> String {
        format!(
            "{}/{}:{}",
            self.registry(endpoint),
            self.repository,
            self.tag
        )
    }

    /// The same reference with the registry's IP instead of its name.
    pub fn reference_by_ip(&self, endpoint: Endpoint) -> String {
        format!(
            "{}:{}/{}:{}",
            self.registry_ip,
            endpoint.port(),
            self.repository,
            self.tag
        )
    }

    /// `registry.<prefix>.test:<port>/<repository>@<digest>`: a pull by digest.
    pub fn digest_reference(&self, endpoint: Endpoint) -> String {
        format!(
            "{}:{}/{}@{}",
            self.registry_hostname,
            endpoint.port(),
            self.repository,
            self.digest()
        )
    }

    /// The top-level digest: the index's, or the single manifest's. CRI's `repo@digest` record
    /// and containerd's image target both use it.
    pub fn digest(&self) -> &str {
        match &self.index {
            Some(index) => &index.digest,
            None => &self.host_manifest().manifest.digest,
        }
    }

    /// The manifest for `platform`, if the image has one.
    pub fn manifest_for(&self, platform: &Platform) -> Option<&ImageManifest> {
        self.manifests
            .iter()
            .find(|manifest| &manifest.platform == platform)
    }

    /// The manifest a pull on this machine resolves to: the host platform's, or the only one.
    ///
    /// # Panics
    ///
    /// If [`manifests`](Self::manifests) was emptied by hand (the rig never builds such images).
    pub fn host_manifest(&self) -> &ImageManifest {
        self.manifest_for(&Platform::host())
            .or(self.manifests.first())
            .unwrap_or_else(|| unreachable!("built images always have a manifest"))
    }

    /// The host manifest's config.
    pub fn config(&self) -> &Blob {
        &self.host_manifest().config
    }

    /// The host manifest's layers.
    pub fn layers(&self) -> &[Blob] {
        &self.host_manifest().layers
    }

    /// Config + layers of the host manifest: exactly the `/blobs/` a pull here downloads.
    pub fn pulled_blobs(&self) -> Vec<&Blob> {
        self.host_manifest().blobs().collect()
    }

    /// Every blob and manifest of every platform (and the index): all the registry stores.
    pub fn all_content(&self) -> Vec<&Blob> {
        let mut all: Vec<&Blob> = self.index.iter().collect();
        for manifest in &self.manifests {
            all.push(&manifest.manifest);
            all.extend(manifest.blobs());
        }
        all
    }
}

/// An OCI image layout on disk that all of a rig's images are built into.
pub(crate) struct Layout {
    dir: PathBuf,
    blobs: PathBuf,
    refs: Mutex<Vec<Value>>,
    /// Names of images built or being built: reserved before building so that two concurrent
    /// builds of one name cannot both succeed.
    names: Mutex<std::collections::BTreeSet<String>>,
    temp_counter: AtomicU64,
}

impl Layout {
    /// Creates an empty layout at `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        write_file(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let layout = Self {
            dir: dir.to_path_buf(),
            blobs,
            refs: Mutex::new(Vec::new()),
            names: Mutex::new(std::collections::BTreeSet::new()),
            temp_counter: AtomicU64::new(0),
        };
        layout.write_index(&[])?;
        Ok(layout)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Builds an image into the layout and tags it with its name. Blocking (CPU and disk bound).
    pub(crate) fn build(&self, spec: &ImageSpec) -> Result<BuiltImage> {
        spec.validate()?;
        let reserved = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(spec.name.clone());
        if !reserved {
            bail!(
                "an image called {:?} was already built in this rig",
                spec.name
            );
        }
        let platforms = spec
            .index_platforms
            .clone()
            .unwrap_or_else(|| vec![Platform::host()]);
        let mut manifests = Vec::with_capacity(platforms.len());
        for platform in platforms {
            manifests.push(self.build_manifest(spec, platform)?);
        }
        let index = match &spec.index_platforms {
            Some(_) => {
                let entries: Vec<Value> = manifests
                    .iter()
                    .map(|m| {
                        json!({
                            "mediaType": m.manifest.media_type,
                            "digest": m.manifest.digest,
                            "size": m.manifest.size,
                            "platform": {"architecture": m.platform.architecture, "os": m.platform.os},
                        })
                    })
                    .collect();
                let document = json!({
                    "schemaVersion": 2,
                    "mediaType": MEDIA_TYPE_INDEX,
                    "manifests": entries,
                });
                Some(self.write_json_blob(&document, MEDIA_TYPE_INDEX)?)
            }
            None => None,
        };
        let top = index
            .clone()
            .or_else(|| manifests.first().map(|m| m.manifest.clone()))
            .context("image without manifests")?;
        {
            let mut refs = self.lock_refs();
            refs.push(json!({
                "mediaType": top.media_type,
                "digest": top.digest,
                "size": top.size,
                "annotations": {REF_NAME_ANNOTATION: spec.name},
            }));
            self.write_index(&refs)?;
        }
        Ok(BuiltImage {
            spec: spec.clone(),
            index,
            manifests,
        })
    }

    fn build_manifest(&self, spec: &ImageSpec, platform: Platform) -> Result<ImageManifest> {
        let mut layers = Vec::with_capacity(spec.layers.len());
        let mut diff_ids = Vec::with_capacity(spec.layers.len());
        for (position, &size) in spec.layers.iter().enumerate() {
            let (layer, diff_id) = self.write_layer(spec, &platform, position, size)?;
            layers.push(layer);
            diff_ids.push(diff_id);
        }
        let config = json!({
            "architecture": platform.architecture,
            "os": platform.os,
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Cmd": ["/bin/true"],
                "Labels": {"dev.spegel.rig.image": spec.name},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.write_json_blob(&config, MEDIA_TYPE_CONFIG)?;
        let layer_descriptors: Vec<Value> = layers
            .iter()
            .map(|layer: &Blob| {
                json!({"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size})
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
            "layers": layer_descriptors,
        });
        let manifest = self.write_json_blob(&manifest, MEDIA_TYPE_MANIFEST)?;
        Ok(ImageManifest {
            platform,
            manifest,
            config,
            layers,
            diff_ids,
        })
    }

    /// Streams one layer (tar → gzip → file) while hashing both the tar (diff id) and the gzip
    /// (blob digest), so even 256 MiB layers never sit in memory.
    fn write_layer(
        &self,
        spec: &ImageSpec,
        platform: &Platform,
        position: usize,
        size: u64,
    ) -> Result<(Blob, String)> {
        let temp = self.temp_path();
        let file =
            std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let gzip = StoredGzipWriter::new(compressed)?;
        let mut tar = tar::Builder::new(HashingWriter::new(gzip));
        let dir = format!("rig/{}", spec.name);
        for path in ["rig/", &format!("{dir}/")] {
            let mut header = fixed_header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut header, path, io::empty())?;
        }
        let stem = format!("{dir}/{}-layer{position}", platform.architecture);
        let note = format!(
            "image {} platform {platform} layer {position} seed {} size {size}\n",
            spec.name, spec.seed
        );
        let mut header = fixed_header(tar::EntryType::Regular, 0o644, note.len() as u64);
        tar.append_data(&mut header, format!("{stem}.txt"), note.as_bytes())?;
        let seed = layer_seed(spec, platform, position);
        let mut header = fixed_header(tar::EntryType::Regular, 0o644, size);
        tar.append_data(
            &mut header,
            format!("{stem}.bin"),
            RandomReader::new(seed, size),
        )?;
        let uncompressed = tar.into_inner()?;
        let (diff_id, _) = uncompressed.finish_hash();
        let gzip = uncompressed.inner;
        let compressed = gzip.finish()?;
        let (digest, blob_size) = compressed.finish_hash();
        let mut file = compressed.inner;
        file.flush()?;
        drop(file);
        let blob = self.commit_temp(&temp, digest, blob_size, MEDIA_TYPE_LAYER)?;
        Ok((blob, diff_id))
    }

    fn write_json_blob(&self, document: &Value, media_type: &str) -> Result<Blob> {
        let bytes = serde_json::to_vec(document)?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let temp = self.temp_path();
        write_file(&temp, &bytes)?;
        self.commit_temp(&temp, digest, bytes.len() as u64, media_type)
    }

    /// Moves a finished temp file to `blobs/sha256/<hex>` (identical content may already exist).
    fn commit_temp(
        &self,
        temp: &Path,
        digest: String,
        size: u64,
        media_type: &str,
    ) -> Result<Blob> {
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest without sha256: prefix")?;
        let target = self.blobs.join(hex);
        if target.exists() {
            std::fs::remove_file(temp).with_context(|| format!("removing {}", temp.display()))?;
        } else {
            std::fs::rename(temp, &target)
                .with_context(|| format!("renaming {} to {}", temp.display(), target.display()))?;
        }
        Ok(Blob {
            digest,
            size,
            media_type: media_type.to_owned(),
        })
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.blobs.join(format!(".tmp-{n}"))
    }

    fn lock_refs(&self) -> std::sync::MutexGuard<'_, Vec<Value>> {
        self.refs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_index(&self, refs: &[Value]) -> Result<()> {
        let index = json!({"schemaVersion": 2, "manifests": refs});
        let temp = self.dir.join("index.json.tmp");
        write_file(&temp, &serde_json::to_vec(&index)?)?;
        let target = self.dir.join("index.json");
        std::fs::rename(&temp, &target).with_context(|| format!("writing {}", target.display()))
    }
}

/// Pushes the layout image `name` to `registry_ip_host` (the plain listener, by IP: the host
/// cannot resolve the registry's name) as `repository:tag`, keeping digests byte-identical.
pub(crate) async fn push(
    layout: &Path,
    name: &str,
    registry_ip_host: &str,
    repository: &str,
    tag: &str,
) -> Result<()> {
    let source = format!("oci:{}:{name}", layout.display());
    let destination = format!("docker://{registry_ip_host}/{repository}:{tag}");
    cmd::run(
        "skopeo",
        [
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &source,
            &destination,
        ],
    )
    .await
    .with_context(|| format!("pushing image {name}"))?;
    Ok(())
}

fn fixed_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Derives a layer's stream seed from everything that identifies it, so layers never repeat.
fn layer_seed(spec: &ImageSpec, platform: &Platform, position: usize) -> u64 {
    let mut seed = SplitMix64(spec.seed ^ fnv1a(spec.name.as_bytes()));
    let mut mixed = seed.next() ^ fnv1a(platform.to_string().as_bytes());
    mixed ^= (position as u64).wrapping_mul(0xA24B_AED4_963E_E407);
    SplitMix64(mixed).next()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and statistically fine for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Bytes per data block: the splitmix64 pool size.
const POOL_SIZE: u64 = 1 << 20;

/// `size` bytes of seeded pseudo-random data, independent of read sizes.
///
/// The first MiB is splitmix64 output (the pool). Every further MiB is the pool rotated by a
/// seeded offset with its block index XORed into the first 8 bytes. Test builds compile this crate
/// without optimisation, where a word-by-word generator manages only ~100 MB/s; rotations are
/// two `memcpy`s, so a 256 MiB layer costs milliseconds. Data still looks random to gzip (its
/// 32 KiB window never sees a repeat), and since every MiB differs, a server returning the wrong
/// range still breaks the digest.
struct RandomReader {
    seed: u64,
    size: u64,
    position: u64,
    pool: Vec<u8>,
    block: Vec<u8>,
    block_index: Option<u64>,
}

impl RandomReader {
    fn new(seed: u64, size: u64) -> Self {
        let pool_len = usize::try_from(size.min(POOL_SIZE))
            .unwrap_or(0)
            .next_multiple_of(8);
        let mut pool = vec![0u8; pool_len];
        let mut rng = SplitMix64(seed);
        for word in pool.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        Self {
            seed,
            size,
            position: 0,
            pool,
            block: Vec::new(),
            block_index: None,
        }
    }

    /// Makes `self.block` hold block `index`.
    fn load_block(&mut self, index: u64) {
        if self.block_index == Some(index) {
            return;
        }
        self.block.clear();
        if index == 0 {
            self.block.extend_from_slice(&self.pool);
        } else {
            let mut rng = SplitMix64(self.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
            let len = self.pool.len() as u64;
            let offset = usize::try_from(rng.next() % len).unwrap_or(0);
            self.block.extend_from_slice(&self.pool[offset..]);
            self.block.extend_from_slice(&self.pool[..offset]);
            for (byte, stamp) in self.block.iter_mut().zip(index.to_le_bytes()) {
                *byte ^= stamp;
            }
        }
        self.block_index = Some(index);
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.size - self.position;
        let want = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let mut filled = 0;
        while filled < want {
            let index = self.position / POOL_SIZE;
            let offset = usize::try_from(self.position % POOL_SIZE).unwrap_or(0);
            self.load_block(index);
            let take = (self.block.len() - offset).min(want - filled);
            buf[filled..filled + take].copy_from_slice(&self.block[offset..offset + take]);
            filled += take;
            self.position += take as u64;
        }
        Ok(want)
    }
}

/// A gzip writer (RFC 1952) whose deflate stream consists only of stored blocks (RFC 1951
/// §3.2.4). Random layer data does not compress anyway, and miniz_oxide's level 0 still runs
/// its compressor (about 100 MB/s in test builds), whereas this is a copy plus a CRC.
/// The header has mtime 0 and OS "unknown", so output is deterministic.
struct StoredGzipWriter<W: Write> {
    inner: W,
    crc: flate2::Crc,
    block: Vec<u8>,
}

/// Largest stored block: LEN is a 16-bit field.
const STORED_BLOCK_MAX: usize = 0xFFFF;

impl<W: Write> StoredGzipWriter<W> {
    fn new(mut inner: W) -> io::Result<Self> {
        // ID1 ID2, CM=8 (deflate), FLG=0, MTIME=0 (4 bytes), XFL=0, OS=255 (unknown).
        inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(Self {
            inner,
            crc: flate2::Crc::new(),
            block: Vec::with_capacity(STORED_BLOCK_MAX),
        })
    }

    /// Emits the buffered bytes as one stored block. Blocks always start byte-aligned (the
    /// previous one ended on a byte), so the 3 header bits plus padding make one byte.
    fn emit_block(&mut self, last: bool) -> io::Result<()> {
        let len = u16::try_from(self.block.len()).map_err(io::Error::other)?;
        let mut header = [0u8; 5];
        header[0] = u8::from(last); // BFINAL, BTYPE=00 (stored)
        header[1..3].copy_from_slice(&len.to_le_bytes());
        header[3..5].copy_from_slice(&(!len).to_le_bytes());
        self.inner.write_all(&header)?;
        self.inner.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Writes the final block and the trailer (CRC-32 and length mod 2^32), returning the inner writer.
    fn finish(mut self) -> io::Result<W> {
        self.emit_block(true)?;
        self.inner.write_all(&self.crc.sum().to_le_bytes())?;
        self.inner.write_all(&self.crc.amount().to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for StoredGzipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = STORED_BLOCK_MAX - self.block.len();
        let taken = &buf[..buf.len().min(room)];
        self.block.extend_from_slice(taken);
        self.crc.update(taken);
        if self.block.len() == STORED_BLOCK_MAX {
            self.emit_block(false)?;
        }
        Ok(taken.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Blocks are emitted when full or at finish; flushing the inner writer is all we can do
        // without producing tiny blocks.
        self.inner.flush()
    }
}

/// A writer that hashes (sha256) and counts everything passing through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// `(sha256:<hex>, bytes)` of everything written so far.
    fn finish_hash(&self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.clone().finalize())),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spegel-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn random_reader_is_independent_of_read_sizes() {
        let mut whole = Vec::new();
        RandomReader::new(7, 1000).read_to_end(&mut whole).unwrap();
        assert_eq!(whole.len(), 1000);
        let mut pieces = Vec::new();
        let mut reader = RandomReader::new(7, 1000);
        let mut buf = [0u8; 13];
        loop {
            let n = reader.read(&mut buf[..(pieces.len() % 13) + 1]).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, pieces);
        let mut other = Vec::new();
        RandomReader::new(8, 1000).read_to_end(&mut other).unwrap();
        assert_ne!(whole, other);
    }

    #[test]
    fn random_blocks_all_differ() {
        let size = 4 * POOL_SIZE + 100;
        let mut data = Vec::new();
        RandomReader::new(3, size).read_to_end(&mut data).unwrap();
        assert_eq!(data.len() as u64, size);
        let blocks: Vec<&[u8]> = data.chunks(POOL_SIZE as usize).collect();
        for (i, a) in blocks.iter().enumerate() {
            for b in &blocks[i + 1..] {
                assert_ne!(a[..b.len().min(a.len())], b[..b.len().min(a.len())]);
            }
        }
        // Reading across block boundaries in odd pieces gives the same bytes.
        let mut pieces = Vec::new();
        let mut reader = RandomReader::new(3, size);
        let mut buf = vec![0u8; 300_007];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(pieces, data);
    }

    #[test]
    fn stored_gzip_round_trips_through_flate2() {
        for size in [
            0usize,
            1,
            STORED_BLOCK_MAX - 1,
            STORED_BLOCK_MAX,
            3 * STORED_BLOCK_MAX + 17,
        ] {
            let mut data = vec![0u8; size];
            RandomReader::new(size as u64, size as u64)
                .read_exact(&mut data)
                .unwrap();
            let mut writer = StoredGzipWriter::new(Vec::new()).unwrap();
            // Odd write sizes exercise blocks filled across writes.
            for piece in data.chunks(4099) {
                writer.write_all(piece).unwrap();
            }
            let gz = writer.finish().unwrap();
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut decoded)
                .unwrap();
            assert_eq!(decoded, data, "size {size}");
            let blocks = size / STORED_BLOCK_MAX + 1;
            assert_eq!(gz.len(), 10 + 5 * blocks + size + 8, "size {size}");
        }
    }

    #[test]
    fn builds_are_deterministic_and_seed_sensitive() {
        let spec = ImageSpec::new("det").layers([3 * KIB, 10 * KIB]).seed(5);
        let first = Layout::create(&scratch("det-a"))
            .unwrap()
            .build(&spec)
            .unwrap();
        let second = Layout::create(&scratch("det-b"))
            .unwrap()
            .build(&spec)
            .unwrap();
        assert_eq!(first, second);
        let reseeded = Layout::create(&scratch("det-c"))
            .unwrap()
            .build(&spec.clone().seed(6))
            .unwrap();
        assert_ne!(first.manifests[0].layers, reseeded.manifests[0].layers);
        for dir in ["det-a", "det-b", "det-c"] {
            std::fs::remove_dir_all(scratch(dir)).ok();
        }
    }

    #[test]
    fn layout_blobs_match_their_digests_and_layers_unpack() {
        let dir = scratch("layout");
        let layout = Layout::create(&dir).unwrap();
        let built = layout
            .build(&ImageSpec::multi().layers([20 * KIB]))
            .unwrap();
        assert!(built.index.is_some());
        assert_eq!(built.manifests.len(), 2);
        assert_ne!(built.manifests[0].layers, built.manifests[1].layers);
        let image = TestImage::new(built, "registry.x.test".into(), Ipv4Addr::new(10, 1, 2, 10));
        for blob in image.all_content() {
            let hex = blob.digest.strip_prefix("sha256:").unwrap();
            let bytes = std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap();
            assert_eq!(bytes.len() as u64, blob.size);
            assert_eq!(hex::encode(Sha256::digest(&bytes)), hex);
        }
        // The layer is a gzip tar whose uncompressed digest is the diff id and whose data file
        // has exactly the requested size.
        let manifest = image.host_manifest();
        let hex = manifest.layers[0].digest.strip_prefix("sha256:").unwrap();
        let gz = std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&raw))),
            manifest.diff_ids[0]
        );
        let mut archive = tar::Archive::new(&raw[..]);
        let sizes: Vec<(String, u64)> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (entry.path().unwrap().display().to_string(), entry.size())
            })
            .collect();
        let data = format!("rig/multi/{}-layer0.bin", Platform::host().architecture);
        assert!(sizes.contains(&(data, 20 * KIB)), "{sizes:?}");
        // index.json names the image; a second build with the same name is refused.
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"][REF_NAME_ANNOTATION],
            "multi"
        );
        assert_eq!(index["manifests"][0]["digest"], image.digest());
        assert!(layout.build(&ImageSpec::multi()).is_err());
        assert_eq!(
            image.reference(Endpoint::Plain),
            "registry.x.test:5000/rig/multi:v1"
        );
        assert_eq!(
            image.reference_by_ip(Endpoint::Tls),
            "10.1.2.10:5443/rig/multi:v1"
        );
        assert_eq!(image.pulled_blobs().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn specs_are_validated() {
        let layout_dir = scratch("validate");
        let layout = Layout::create(&layout_dir).unwrap();
        assert!(layout.build(&ImageSpec::new("empty")).is_err());
        assert!(layout.build(&ImageSpec::new("Bad").layers([1])).is_err());
        assert!(
            layout
                .build(&ImageSpec::new("ok").layers([1]).tag(""))
                .is_err()
        );
        assert!(
            layout
                .build(&ImageSpec::new("ok").layers([1]).index([]))
                .is_err()
        );
        std::fs::remove_dir_all(layout_dir).unwrap();
    }
}
