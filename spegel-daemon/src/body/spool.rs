//! The disk spool of verify-before-send: a peer blob too big for memory is written to a file
//! under the spool directory while its bytes pass their check, and served from that file only
//! once every byte has passed — so containerd never gets a byte of it before it is known good.
//!
//! A spool file is unlinked as soon as it is created: the open file is all there is, and the
//! kernel frees its blocks when the last reader closes it, even if the daemon dies. Its size
//! comes out of the spool's byte [`Budget`] before the first byte is written and goes back when
//! the response body reading it is done (or dropped). Files a previous run could have left
//! behind (a crash between creating and unlinking one) are removed when the spool opens; only
//! files with the spool's own name prefix are touched, whatever directory it is given.
use std::{
    fs::File,
    io,
    ops::Range,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;
use futures::StreamExt as _;

use super::{
    budget::{Budget, Share},
    verify::{BodyCheck, ReadError},
};
use crate::source::Body;

/// Name prefix of spool files: the only files the spool ever creates or removes.
const PREFIX: &str = "spegel-spool-";
/// Bytes gathered before one write to the file.
const WRITE_BATCH: usize = 1 << 20;
/// Bytes read from the file per body chunk.
pub(crate) const READ_CHUNK: u64 = 256 << 10;

/// Why a spooled copy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The source failed, or its bytes failed the check: the source's fault.
    #[error(transparent)]
    Read(ReadError),
    /// Writing or creating the file failed: this node's fault (disk full, permissions).
    #[error("cannot write the spool file: {0}")]
    Disk(io::Error),
}

/// The spool directory and its byte budget.
pub struct Spool {
    dir: PathBuf,
    budget: Budget,
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir` with `budget` bytes, removing the files
    /// a previous run left there.
    pub fn open(dir: &Path, budget: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let ours = entry.file_name().to_string_lossy().starts_with(PREFIX);
            if ours && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "removed spool files left by a previous run");
        }
        Ok(Self {
            dir: dir.to_owned(),
            budget: Budget::new(budget),
        })
    }

    /// Space for an object of `size` bytes, if the budget has it now.
    pub fn reserve(&self, size: u64) -> Option<Share> {
        self.budget.try_take(size)
    }

    /// Bytes of the budget not reserved.
    pub fn available(&self) -> u64 {
        self.budget.available()
    }

    /// A new, already unlinked file in the spool directory: nothing outlives the open file.
    /// Its space must come out of a [`reserve`](Self::reserve)d share.
    pub async fn file(&self) -> io::Result<File> {
        let dir = self.dir.clone();
        blocking(move || {
            let named = tempfile::Builder::new().prefix(PREFIX).tempfile_in(&dir)?;
            let (file, path) = named.into_parts();
            path.close()?;
            Ok(file)
        })
        .await
    }

    /// Writes `body` through `check` to a new spool file. Nothing comes back unless every byte
    /// passed; the body is dropped (its source released) before this returns.
    pub async fn fill(
        &self,
        mut body: Body,
        mut check: BodyCheck,
        share: Share,
    ) -> Result<Spooled, SpoolError> {
        let file = Arc::new(self.file().await.map_err(SpoolError::Disk)?);
        let mut written = 0u64;
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| SpoolError::Read(ReadError::Io(e)))?;
            if let Some(bytes) = check
                .push(chunk)
                .map_err(|e| SpoolError::Read(ReadError::Verify(e)))?
            {
                batched += bytes.len();
                batch.push(bytes);
            }
            if batched >= WRITE_BATCH {
                written = write(&file, std::mem::take(&mut batch), written).await?;
                batched = 0;
            }
        }
        drop(body);
        if let Some(tail) = check
            .finish()
            .map_err(|e| SpoolError::Read(ReadError::Verify(e)))?
        {
            batch.push(tail);
        }
        let len = write(&file, batch, written).await?;
        Ok(Spooled {
            file,
            len,
            _share: share,
        })
    }
}

/// Appends `chunks` to `file` at `offset`; returns the new end.
async fn write(file: &Arc<File>, chunks: Vec<Bytes>, offset: u64) -> Result<u64, SpoolError> {
    if chunks.is_empty() {
        return Ok(offset);
    }
    let file = Arc::clone(file);
    blocking(move || {
        let mut at = offset;
        for chunk in &chunks {
            file.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
        Ok(at)
    })
    .await
    .map_err(SpoolError::Disk)
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("spool task failed: {e}")))?
}

/// A verified object in a spool file, with its share of the budget.
pub struct Spooled {
    file: Arc<File>,
    len: u64,
    _share: Share,
}

impl Spooled {
    /// The object's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `range` (half-open, within [`len`](Self::len)) as a body. The file and its
    /// budget share are released once the last chunk has been read, or when the body is dropped.
    pub fn into_body(self, range: Range<u64>) -> Body {
        let end = range.end.min(self.len);
        let state = (Some(self), range.start, end);
        Box::pin(futures::stream::unfold(
            state,
            |(spooled, at, end)| async move {
                let spooled = spooled?;
                if at >= end {
                    return None;
                }
                let n = READ_CHUNK.min(end - at);
                let file = Arc::clone(&spooled.file);
                let read = blocking(move || {
                    let mut buf = vec![0; n as usize];
                    file.read_exact_at(&mut buf, at)?;
                    Ok(Bytes::from(buf))
                })
                .await;
                match read {
                    Ok(bytes) => {
                        let next = at + n;
                        // Done with the file: close it and give its space back now.
                        let keep = (next < end).then_some(spooled);
                        Some((Ok(bytes), (keep, next, end)))
                    }
                    Err(err) => Some((
                        Err(io::Error::other(format!(
                            "cannot read the spool file: {err}"
                        ))),
                        (None, end, end),
                    )),
                }
            },
        ))
    }
}
