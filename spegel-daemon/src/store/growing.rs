//! A blob containerd is writing right now (a partial ingest's `data` file), read as it grows.
//!
//! The file only ever holds the blob's own bytes at their own offsets: containerd appends what
//! it receives, and when it starts a transfer over it truncates and writes the same bytes again.
//! So whatever is read at an offset is the blob's byte there, or, if containerd was fed wrong
//! bytes, something the reader's own digest check rejects. A reader waits for bytes past the
//! end of the file, at most [`IDLE`] without any, and fails when the ingest goes away short
//! (aborted; a committed one keeps its inode, which the open descriptor goes on reading).
use std::{io, ops::Range, path::PathBuf, pin::Pin, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::{
    fs::File,
    io::{AsyncReadExt as _, AsyncSeekExt as _},
    time::Instant,
};

/// The bytes as they are written (the same type as `source::Body`).
pub type Body = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Longest a reader waits for the writer's next bytes before failing.
pub const IDLE: Duration = Duration::from_secs(30);

/// Largest chunk one read yields.
const CHUNK: usize = 256 * 1024;

/// First and longest pause between looks at a file that has not grown.
const PAUSE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(20));

/// A file another process is writing, `size` bytes when done.
#[derive(Debug)]
pub struct Growing {
    path: PathBuf,
    file: File,
    size: u64,
    idle: Duration,
}

impl Growing {
    /// The file at `path`, which will hold `size` bytes.
    pub async fn open(path: PathBuf, size: u64) -> io::Result<Self> {
        let file = File::open(&path).await?;
        Ok(Self {
            path,
            file,
            size,
            idle: IDLE,
        })
    }

    /// Waits at most `idle` for more bytes (default [`IDLE`]).
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// The size the file will have when the writer is done.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many bytes the writer has written so far.
    pub async fn written(&self) -> io::Result<u64> {
        Ok(self.file.metadata().await?.len())
    }

    /// `bytes` of the file (within its final size), each chunk as soon as it is written.
    pub fn body(self, bytes: Range<u64>) -> Body {
        let end = bytes.end.min(self.size);
        let state = Reading {
            growing: self,
            at: bytes.start,
            end,
            positioned: false,
        };
        Box::pin(futures::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.next().await {
                Ok(None) => None,
                Ok(Some(chunk)) => Some((Ok(chunk), Some(state))),
                // One error, then the end.
                Err(err) => Some((Err(err), None)),
            }
        }))
    }
}

struct Reading {
    growing: Growing,
    at: u64,
    end: u64,
    positioned: bool,
}

impl Reading {
    /// The next chunk, waiting for the writer; `None` at the end.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        if self.at >= self.end {
            return Ok(None);
        }
        if !self.positioned {
            self.growing.file.seek(io::SeekFrom::Start(self.at)).await?;
            self.positioned = true;
        }
        let want = usize::try_from(self.end - self.at).map_or(CHUNK, |left| left.min(CHUNK));
        let mut buf = BytesMut::zeroed(want);
        let mut pause = PAUSE.0;
        let mut last_growth = Instant::now();
        loop {
            let read = self.growing.file.read(&mut buf).await?;
            if read > 0 {
                buf.truncate(read);
                self.at += read as u64;
                return Ok(Some(buf.freeze()));
            }
            // Nothing past our offset yet. An ingest that went away is committed (its inode,
            // still ours, is whole: the read above would have found the rest) or aborted.
            if tokio::fs::metadata(&self.growing.path).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the partial ingest went away at byte {} of {}",
                        self.at, self.growing.size
                    ),
                ));
            }
            if last_growth.elapsed() >= self.growing.idle {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the partial ingest did not grow past byte {} of {} for {:?}",
                        self.at, self.growing.size, self.growing.idle
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PAUSE.1);
            // A writer that truncated and starts over is growing, too.
            if self.growing.written().await? > self.at {
                last_growth = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use futures::StreamExt as _;

    use super::*;

    async fn collect(mut body: Body) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(err) => return (got, Some(err)),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn a_reader_gets_the_bytes_as_the_writer_appends_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut writer = std::fs::File::create(&path).unwrap();
        writer.write_all(b"hello ").unwrap();
        let growing = Growing::open(path, 11).await.unwrap();
        assert_eq!(growing.written().await.unwrap(), 6);
        let reader = tokio::spawn(collect(growing.body(0..11)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.write_all(b"world").unwrap();
        let (got, err) = reader.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, b"hello world");
    }

    #[tokio::test]
    async fn a_range_starts_at_its_offset_and_stops_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"0123456789").unwrap();
        let growing = Growing::open(path, 10).await.unwrap();
        let (got, err) = collect(growing.body(3..7)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, b"3456");
    }

    #[tokio::test]
    async fn a_reader_past_the_written_end_waits_for_the_bytes_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut writer = std::fs::File::create(&path).unwrap();
        let growing = Growing::open(path, 8).await.unwrap();
        let reader = tokio::spawn(collect(growing.body(4..8)));
        writer.write_all(b"abcd").unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        writer.write_all(b"efgh").unwrap();
        let (got, err) = reader.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, b"efgh");
    }

    #[tokio::test]
    async fn an_ingest_removed_short_fails_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"abc").unwrap();
        let growing = Growing::open(path.clone(), 10).await.unwrap();
        let reader = tokio::spawn(collect(growing.body(0..10)));
        tokio::time::sleep(Duration::from_millis(30)).await;
        std::fs::remove_file(&path).unwrap();
        let (got, err) = reader.await.unwrap();
        assert_eq!(got, b"abc");
        assert_eq!(err.unwrap().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_committed_ingest_is_read_to_its_end_through_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"abcdef").unwrap();
        let growing = Growing::open(path.clone(), 6).await.unwrap();
        // containerd's commit renames the data file into the blob store.
        std::fs::rename(&path, dir.path().join("blob")).unwrap();
        let (got, err) = collect(growing.body(0..6)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, b"abcdef");
    }

    #[tokio::test]
    async fn a_writer_that_stops_fails_the_reader_after_the_idle_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"ab").unwrap();
        let growing = Growing::open(path, 4)
            .await
            .unwrap()
            .with_idle(Duration::from_millis(60));
        let started = std::time::Instant::now();
        let (got, err) = collect(growing.body(0..4)).await;
        assert_eq!(got, b"ab");
        assert_eq!(err.unwrap().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
