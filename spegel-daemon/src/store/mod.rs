//! What this node's containerd holds: the [`Store`] seam, its containerd implementation, an
//! in-memory one for unit tests, and the conformance suite both must pass.
use std::{collections::BTreeSet, pin::Pin};

use tokio::io::AsyncRead;

use crate::oci::digest::Digest;

/// A local object: digest, size, and media type when the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: u64,
    /// Known from the parent that references the object (index → manifest → config/layers), or
    /// from the object's own JSON for manifests. `None` when nothing says.
    pub media_type: Option<String>,
}

/// Everything this node can serve, as DHT keys: every digest present locally and reachable from
/// an image, and every `registry/repo:tag` an image is known by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub digests: BTreeSet<Digest>,
    pub tags: BTreeSet<String>,
}

/// A reader positioned at the requested offset, yielding exactly the requested bytes.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// `len` bytes at `offset` of an open file holding an object: what a server can hand to
/// `sendfile(2)` instead of reading the bytes through this process.
#[derive(Debug)]
pub struct FileRegion {
    pub file: std::fs::File,
    pub offset: u64,
    pub len: u64,
}

impl FileRegion {
    /// A reader over the region, on the region's own descriptor (moved to the region's start).
    pub fn into_reader(self) -> std::io::Result<Reader> {
        use std::io::{Seek as _, SeekFrom};
        let mut file = self.file;
        file.seek(SeekFrom::Start(self.offset))?;
        let file = tokio::fs::File::from_std(file);
        Ok(Box::pin(walk::Exact::new(file, self.len)))
    }
}

/// An object's bytes as [`Store::open_region`] opened them.
pub enum Opened {
    /// A region of a file this process can hand to `sendfile(2)`.
    File(FileRegion),
    /// A reader, when the store keeps no such file (or could not open it).
    Reader(Reader),
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not in the store.
    #[error("not found")]
    NotFound,
    /// The store (containerd) could not be reached or failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A node-local content store.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `registry/repo:tag` → the digest the tag points at.
    async fn resolve(&self, reference: &str) -> Result<Digest, StoreError>;
    /// Size and media type of a digest present locally.
    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError>;
    /// Read `len` bytes of a present object starting at `offset`. The caller has checked the
    /// bounds against [`Store::descriptor`].
    async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError>;
    /// The same bytes as [`Store::open`], as a region of a file when the store keeps content
    /// in files this process can open (one attempt: a file that cannot be opened is read the
    /// other way, not tried twice).
    async fn open_region(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Opened, StoreError> {
        self.open(digest, offset, len).await.map(Opened::Reader)
    }
    /// Everything to advertise.
    async fn keys(&self) -> Result<Keys, StoreError>;
    /// A counter that moves whenever images may have changed; watchers re-read [`Store::keys`].
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// What containerd has half-received: blobs it is fetching, or whose transfer was cut.
///
/// containerd resumes a cut blob after the bytes it already holds, in any pull that finds its
/// partial ingest. When those bytes went to it unverified (a peer blob streamed as it arrived)
/// and the blob then failed, they must go, so no later pull resumes after them.
#[async_trait::async_trait]
pub trait Ingests: Send + Sync + 'static {
    /// Throws away every partial ingest of `digest`, in every namespace, so containerd's next
    /// attempt starts from the first byte. Returns how many there were.
    async fn discard(&self, digest: &Digest) -> Result<usize, StoreError>;

    /// The partial ingest of `digest` containerd is writing now, to read as it grows: the one
    /// furthest along when there are several (possibly nothing written yet), `None` when there
    /// is none with a known size (or it cannot be read here).
    async fn growing(&self, digest: &Digest) -> Option<growing::Growing>;
}

pub mod conformance;
pub mod containerd;
pub mod growing;
pub mod memory;
pub(crate) mod walk;
