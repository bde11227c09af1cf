//! Reading content: straight from containerd's content directory when we can, else streamed
//! over its API; whole small documents for the walk, and media types sniffed from the bytes.
use std::{collections::HashMap, io, path::Path, sync::PoisonError};

use bytes::Bytes;
use containerd_client::services::v1::{ReadContentRequest, content_client::ContentClient};
use futures::StreamExt as _;
use tokio::{io::AsyncReadExt as _, time::timeout};
use tokio_util::io::StreamReader;

use super::{
    Inner,
    api::{CALL_TIMEOUT, ContainerdError, call, status_error},
};
use crate::{
    oci::digest::Digest,
    store::{
        FileRegion, Opened, Reader, StoreError,
        walk::{self, Blobs, Exact, MAX_DOCUMENT_SIZE},
    },
};

/// Media types sniffed for content no walk has typed, remembered up to this many digests.
const SNIFF_CACHE: usize = 1024;

impl Inner {
    /// `len` bytes at `offset`: from the content directory, else over gRPC.
    pub(super) async fn open(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Reader, StoreError> {
        if let Some(dir) = &self.blobs_dir {
            match open_file(&dir.join(digest.hex()), offset, len).await {
                Ok(reader) => return Ok(reader),
                Err(err) => {
                    tracing::debug!(%digest, %err, "reading through containerd's API instead")
                }
            }
        }
        self.open_grpc(digest, offset, len).await
    }

    /// `len` bytes at `offset` as a region of the content file, else (no content directory, or
    /// the file cannot be opened) over gRPC.
    pub(super) async fn open_region(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Opened, StoreError> {
        if let Some(dir) = &self.blobs_dir {
            match region_of(&dir.join(digest.hex()), offset, len).await {
                Ok(region) => return Ok(Opened::File(region)),
                Err(err) => {
                    tracing::debug!(%digest, %err, "reading through containerd's API instead")
                }
            }
        }
        self.open_grpc(digest, offset, len)
            .await
            .map(Opened::Reader)
    }

    /// The whole content of a small object: from the content directory, else over gRPC.
    pub(super) async fn read_small(&self, digest: &Digest, size: u64) -> Result<Bytes, StoreError> {
        if size > MAX_DOCUMENT_SIZE {
            return Err(StoreError::Unavailable(format!(
                "{digest} is too large to read whole"
            )));
        }
        if let Some(dir) = &self.blobs_dir {
            match read_file(&dir.join(digest.hex()), size).await {
                Ok(bytes) => return Ok(bytes),
                Err(err) => {
                    tracing::debug!(%digest, %err, "reading through containerd's API instead")
                }
            }
        }
        let mut reader = self.open_grpc(digest, 0, size).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
        reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|err| StoreError::Unavailable(format!("reading {digest}: {err}")))?;
        Ok(Bytes::from(bytes))
    }

    async fn open_grpc(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Reader, StoreError> {
        let (Ok(offset), Ok(size)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(StoreError::Unavailable(format!(
                "range {offset}+{len} is out of containerd's range"
            )));
        };
        if size == 0 {
            return Ok(Box::pin(tokio::io::empty()));
        }
        let mut client = ContentClient::new(self.channel.clone());
        let mut stream = call(
            "content.read",
            client.read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset,
                size,
            })),
        )
        .await
        .map_err(StoreError::from)?;
        // A missing digest may be reported with the first message rather than the response
        // headers: look at it so that absence is `NotFound`, not a broken body later.
        let first = match timeout(CALL_TIMEOUT, stream.message()).await {
            Ok(Ok(first)) => first,
            Ok(Err(status)) => return Err(status_error("content.read", status).into()),
            Err(_) => {
                return Err(ContainerdError::Timeout {
                    call: "content.read",
                    timeout: CALL_TIMEOUT,
                }
                .into());
            }
        };
        let body = futures::stream::iter(first.map(Ok))
            .chain(stream)
            .map(|message| {
                message
                    .map(|m| Bytes::from(m.data))
                    .map_err(io::Error::other)
            });
        Ok(Box::pin(Exact::new(StreamReader::new(body), len)))
    }

    /// The media type of content the walk did not type, sniffed from its bytes.
    pub(super) async fn sniff(&self, digest: &Digest, size: u64) -> Option<String> {
        if size > MAX_DOCUMENT_SIZE {
            return None;
        }
        if let Some(known) = self.sniffed_cache().get(digest) {
            return known.clone();
        }
        let bytes = match self.read_small(digest, size).await {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::debug!(%digest, %err, "cannot read content to sniff its media type");
                return None;
            }
        };
        if Digest::of(&bytes) != *digest {
            return None;
        }
        let media_type = walk::sniff_media_type(&bytes);
        let mut cache = self.sniffed_cache();
        if cache.len() >= SNIFF_CACHE {
            cache.clear();
        }
        cache.insert(*digest, media_type.clone());
        media_type
    }

    fn sniffed_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Option<String>>> {
        // A cache: whatever a panicking holder left behind is still a valid cache.
        self.sniffed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The walk's view of containerd: sizes from one listing, reads through [`Inner::read_small`].
pub(super) struct ContentBlobs<'a> {
    pub(super) inner: &'a Inner,
    pub(super) present: HashMap<Digest, u64>,
}

#[async_trait::async_trait]
impl Blobs for ContentBlobs<'_> {
    fn size(&self, digest: &Digest) -> Option<u64> {
        self.present.get(digest).copied()
    }

    async fn read(&self, digest: &Digest, size: u64) -> Result<Bytes, StoreError> {
        self.inner.read_small(digest, size).await
    }
}

/// `len` bytes at `offset` of a blob file, refusing files shorter than that (a file being
/// replaced, or not what containerd says it is).
async fn region_of(path: &Path, offset: u64, len: u64) -> io::Result<FileRegion> {
    let file = tokio::fs::File::open(path).await?.into_std().await;
    let file_len = file.metadata()?.len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("range {offset}+{len} is outside a file of {file_len} bytes"),
        ));
    }
    Ok(FileRegion { file, offset, len })
}

/// A reader over `len` bytes at `offset` of a blob file ([`region_of`]'s checks).
async fn open_file(path: &Path, offset: u64, len: u64) -> io::Result<Reader> {
    region_of(path, offset, len).await?.into_reader()
}

async fn read_file(path: &Path, size: u64) -> io::Result<Bytes> {
    let mut reader = open_file(path, 0, size).await?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
    reader.read_to_end(&mut bytes).await?;
    Ok(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, path::PathBuf};

    use super::*;

    #[tokio::test]
    async fn file_reads_are_exact() {
        let mut file = tempfile();
        file.1.write_all(b"0123456789").unwrap();
        let mut out = String::new();
        open_file(&file.0, 3, 4)
            .await
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "3456");
        assert!(open_file(&file.0, 8, 3).await.is_err());
        assert!(open_file(&file.0, u64::MAX, 1).await.is_err());
        assert_eq!(&read_file(&file.0, 10).await.unwrap()[..], b"0123456789");
        assert!(read_file(&file.0, 11).await.is_err());
        assert!(
            open_file(Path::new("/nonexistent/spegel/blob"), 0, 1)
                .await
                .is_err()
        );
        std::fs::remove_file(&file.0).unwrap();
    }

    fn tempfile() -> (PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!(
            "spegel-containerd-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }
}
