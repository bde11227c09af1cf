//! Verify-before-send against a fake source: memory buffers, the disk spool, their budgets,
//! ranges, and the spool's clean start.
use std::{io, sync::Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use http::HeaderMap;

use super::*;
use crate::{
    oci::{ByteRange, Reference, digest::Digest},
    source::Payload,
    store::memory::MemoryStore,
};

/// Serves `data` in 1 KiB chunks, failing before the last chunk when `fail` (as a peer body does
/// on a digest mismatch); remembers the ranges it was asked for.
struct Chunked {
    data: Bytes,
    fail: bool,
    asked: Mutex<Vec<Option<ByteRange>>>,
}

fn chunked_source(data: &Bytes, fail: bool) -> Arc<Chunked> {
    Arc::new(Chunked {
        data: data.clone(),
        fail,
        asked: Mutex::new(Vec::new()),
    })
}

#[async_trait::async_trait]
impl Source for Chunked {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        self.asked.lock().unwrap().push(request.range);
        let mut chunks: Vec<io::Result<Bytes>> = self
            .data
            .chunks(1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        if self.fail {
            chunks.pop();
            chunks.push(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "digest mismatch",
            )));
        }
        Ok(Object {
            digest: Digest::of(&self.data),
            media_type: "application/octet-stream".into(),
            size: self.data.len() as u64,
            range: None,
            body: Payload::Stream(Box::pin(futures::stream::iter(chunks))),
            source: "peer",
        })
    }
}

fn request(range: Option<ByteRange>) -> ObjectRequest {
    ObjectRequest {
        kind: Kind::Blob,
        registry: None,
        repository: "r".into(),
        reference: Reference::Digest(Digest::of(b"x")),
        range,
        head: false,
        headers: HeaderMap::new(),
        origin: None,
        mirrored: false,
        public_only: false,
    }
}

/// Memory up to `max` within `budget`; a spool of `spool` bytes (0: off).
fn args(max: u64, budget: u64, spool: u64) -> BufferArgs {
    BufferArgs {
        peer_stream_min: 1 << 20,
        peer_buffer_max: max,
        peer_buffer_budget: budget,
        peer_spool_dir: None,
        peer_spool_budget: spool,
        shared_fetch_budget: 0,
    }
}

/// A `Buffered` over `source` with its spool in a fresh directory (kept alive by the guard).
fn buffered(source: Arc<Chunked>, args: BufferArgs) -> (Buffered, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let buffered = Buffered::new(source, &args, data_dir.path()).unwrap();
    (buffered, data_dir)
}

fn spool_of(buffered: &Buffered) -> &Spool {
    buffered.spool.as_ref().expect("spool on")
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

async fn collect(object: Object) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut body = object.body.into_body().expect("body");
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

fn data(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 7 % 253) as u8)
        .collect::<Vec<_>>()
        .into()
}

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_bad_blob_becomes_unavailable_before_any_byte_is_sent() {
    let (source, _dir) = buffered(chunked_source(&data(10_000), true), args(MIB, MIB, 0));
    assert!(matches!(
        source.fetch(&request(None)).await,
        Err(SourceError::Unavailable(_))
    ));
    assert_eq!(
        source.memory_available(),
        MIB,
        "a failed read returns its share"
    );
}

#[tokio::test]
async fn a_good_blob_arrives_whole_from_memory() {
    let data = data(600_000);
    let (source, _dir) = buffered(chunked_source(&data, false), args(MIB, MIB, 0));
    let object = source.fetch(&request(None)).await.unwrap();
    assert_eq!(collect(object).await.unwrap(), data);
    assert_eq!(source.memory_available(), MIB, "budget returned");
}

/// The memory share stands for bytes not yet handed on: a client that has not read (or not
/// finished reading) the body still holds it; finishing or dropping the body returns it.
#[tokio::test]
async fn the_memory_share_is_held_until_the_body_is_done() {
    let data = data(600_000);
    let (source, _dir) = buffered(chunked_source(&data, false), args(MIB, MIB, 0));

    let object = source.fetch(&request(None)).await.unwrap();
    let mut body = object.body.into_body().unwrap();
    assert!(
        source.memory_available() < MIB,
        "an unread body holds its share"
    );
    let first = body.next().await.unwrap().unwrap();
    assert!(first.len() < data.len(), "served piece by piece");
    assert!(
        source.memory_available() < MIB,
        "a half-read body holds its share"
    );
    let mut got = first.to_vec();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, data);
    assert_eq!(source.memory_available(), MIB, "returned at the end");

    let unread = source.fetch(&request(None)).await.unwrap();
    assert!(source.memory_available() < MIB);
    drop(unread);
    assert_eq!(source.memory_available(), MIB, "returned when dropped");
}

#[tokio::test]
async fn a_corrupt_big_blob_is_unavailable_before_any_byte_is_sent() {
    let data = data(3 * MIB as usize);
    let (source, dir) = buffered(chunked_source(&data, true), args(MIB, MIB, 64 * MIB));
    let result = source.fetch(&request(None)).await;
    assert!(
        matches!(result, Err(SourceError::Unavailable(_))),
        "{result:?}"
    );
    assert_eq!(spool_of(&source).available(), 64 * MIB, "share returned");
    assert!(files_in(&dir.path().join("spool")).is_empty());
}

#[tokio::test]
async fn a_good_big_blob_is_served_exactly_from_the_spool() {
    let data = data(3 * MIB as usize + 123);
    let (source, dir) = buffered(chunked_source(&data, false), args(MIB, 8 * MIB, 64 * MIB));
    let object = source.fetch(&request(None)).await.unwrap();
    assert_eq!(object.range, None);
    assert_eq!(source.memory_available(), 8 * MIB, "not in memory");
    assert!(
        spool_of(&source).available() < 64 * MIB,
        "holds spool space"
    );
    assert!(
        files_in(&dir.path().join("spool")).is_empty(),
        "the spool file is unlinked while in use"
    );
    assert_eq!(collect(object).await.unwrap(), data);
    assert_eq!(spool_of(&source).available(), 64 * MIB, "space returned");
}

#[tokio::test]
async fn a_spent_memory_budget_spools_small_blobs() {
    let data = data(100_000);
    let (source, _dir) = buffered(chunked_source(&data, false), args(MIB, 64 << 10, 64 * MIB));
    let object = source.fetch(&request(None)).await.unwrap();
    assert_eq!(
        source.memory_available(),
        64 << 10,
        "too big for the memory budget"
    );
    assert!(spool_of(&source).available() < 64 * MIB);
    assert_eq!(collect(object).await.unwrap(), data);
}

#[tokio::test]
async fn the_spool_share_is_held_until_the_body_is_done_or_dropped() {
    let data = data(2 * MIB as usize);
    let (source, _dir) = buffered(chunked_source(&data, false), args(0, 0, 3 * MIB));
    let first = source.fetch(&request(None)).await.unwrap();
    // The first blob's file still counts: a second does not fit and streams (unverified up
    // front; this one is good, so it arrives whole).
    let second = source.fetch(&request(None)).await.unwrap();
    assert_eq!(
        spool_of(&source).available(),
        MIB,
        "only the first is spooled"
    );
    drop(first);
    assert_eq!(spool_of(&source).available(), 3 * MIB);
    assert_eq!(collect(second).await.unwrap(), data);
}

#[tokio::test]
async fn a_spent_spool_budget_streams_with_the_tail_held_back() {
    let data = data(2 * MIB as usize);
    let (source, _dir) = buffered(chunked_source(&data, true), args(MIB, MIB, MIB));
    let object = source.fetch(&request(None)).await.unwrap();
    assert!(
        collect(object).await.is_err(),
        "the failure reaches the body"
    );
}

#[tokio::test]
async fn with_memory_and_spool_off_everything_passes_through() {
    let data = data(10_000);
    let inner = chunked_source(&data, true);
    let (source, dir) = buffered(Arc::clone(&inner), args(0, MIB, 0));
    let range = Some(ByteRange::From {
        start: 5,
        end: None,
    });
    assert!(
        collect(source.fetch(&request(range)).await.unwrap())
            .await
            .is_err()
    );
    assert_eq!(*inner.asked.lock().unwrap(), vec![range], "asked as is");
    assert!(!dir.path().join("spool").exists(), "no spool directory");
}

/// A range is cut from the verified whole: the source is asked for the whole blob.
#[tokio::test]
async fn ranges_are_served_from_the_verified_whole() {
    let data = data(3 * MIB as usize);
    for (max, what) in [(4 * MIB, "memory"), (MIB, "spool")] {
        let inner = chunked_source(&data, false);
        let (source, _dir) = buffered(Arc::clone(&inner), args(max, 4 * MIB, 64 * MIB));
        let range = ByteRange::From {
            start: 1000,
            end: Some(MIB + 4),
        };
        let object = source.fetch(&request(Some(range))).await.unwrap();
        assert_eq!(object.range, Some(1000..=MIB + 4), "{what}");
        assert_eq!(object.size, data.len() as u64);
        assert_eq!(
            collect(object).await.unwrap(),
            data[1000..=MIB as usize + 4],
            "{what}"
        );
        assert_eq!(*inner.asked.lock().unwrap(), vec![None], "{what}");

        // The tail a resuming client asks for.
        let tail = ByteRange::Suffix(10);
        let object = source.fetch(&request(Some(tail))).await.unwrap();
        assert_eq!(
            collect(object).await.unwrap(),
            data[data.len() - 10..],
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_corrupt_blob_fails_a_range_before_any_byte_is_sent() {
    let data = data(3 * MIB as usize);
    let (source, _dir) = buffered(chunked_source(&data, true), args(MIB, MIB, 64 * MIB));
    let range = Some(ByteRange::From {
        start: 0,
        end: Some(99),
    });
    assert!(matches!(
        source.fetch(&request(range)).await,
        Err(SourceError::Unavailable(_))
    ));
}

#[tokio::test]
async fn an_unsatisfiable_range_is_left_to_the_next_source() {
    let (source, _dir) = buffered(chunked_source(&data(1000), false), args(MIB, MIB, 0));
    let range = Some(ByteRange::From {
        start: 1000,
        end: None,
    });
    assert!(matches!(
        source.fetch(&request(range)).await,
        Err(SourceError::NotFound)
    ));
    assert_eq!(source.memory_available(), MIB);
}

#[tokio::test]
async fn the_spool_starts_clean_but_touches_only_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("elsewhere");
    std::fs::create_dir_all(spool_dir.join("spegel-spool-subdir")).unwrap();
    std::fs::write(spool_dir.join("spegel-spool-abc123"), b"left by a crash").unwrap();
    std::fs::write(spool_dir.join("spegel-spool-def456"), b"and another").unwrap();
    std::fs::write(spool_dir.join("precious"), b"not ours").unwrap();
    let mut args = args(MIB, MIB, MIB);
    args.peer_spool_dir = Some(spool_dir.clone());
    let _source = Buffered::new(chunked_source(&data(10), false), &args, dir.path()).unwrap();
    let mut left = files_in(&spool_dir);
    left.sort();
    assert_eq!(left, ["precious", "spegel-spool-subdir"]);
    assert!(
        !dir.path().join("spool").exists(),
        "the flag replaces the default"
    );
}

#[tokio::test]
async fn heads_and_manifests_pass_through() {
    let data = data(10_000);
    let inner = chunked_source(&data, true);
    let (source, _dir) = buffered(Arc::clone(&inner), args(MIB, MIB, MIB));
    let mut head = request(None);
    head.head = true;
    let object = source.fetch(&head).await.unwrap();
    assert!(collect(object).await.is_err(), "not read by the buffer");
    let mut manifest = request(None);
    manifest.kind = Kind::Manifest;
    let object = source.fetch(&manifest).await.unwrap();
    assert!(collect(object).await.is_err());
}

/// `buffered` streaming whole blobs of at least `stream_min` bytes (with a MiB of memory and of
/// spool to verify smaller ones in), discarding through `store`.
fn streaming(
    source: Arc<dyn Source>,
    stream_min: u64,
    store: &Arc<MemoryStore>,
) -> (Buffered, tempfile::TempDir) {
    guarded(source, args(MIB, MIB, MIB), stream_min, store)
}

/// `buffered` with `args`, streaming whole blobs of at least `stream_min` bytes, discarding
/// through `store`.
fn guarded(
    source: Arc<dyn Source>,
    args: BufferArgs,
    stream_min: u64,
    store: &Arc<MemoryStore>,
) -> (Buffered, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let args = BufferArgs {
        peer_stream_min: stream_min,
        ..args
    };
    let buffered = Buffered::new(source, &args, data_dir.path())
        .unwrap()
        .with_ingests(Arc::clone(store) as _);
    (buffered, data_dir)
}

/// Sends the first KiB of `data`, then nothing, ever (a peer still sending the rest).
struct Stalling {
    data: Bytes,
}

#[async_trait::async_trait]
impl Source for Stalling {
    async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
        let first = futures::stream::iter([Ok(self.data.slice(..1024))]);
        Ok(Object {
            digest: Digest::of(&self.data),
            media_type: "application/octet-stream".into(),
            size: self.data.len() as u64,
            range: None,
            body: Payload::Stream(Box::pin(first.chain(futures::stream::pending()))),
            source: "peer",
        })
    }
}

#[tokio::test]
async fn a_big_whole_blob_for_containerd_streams_as_it_arrives() {
    let store = Arc::new(MemoryStore::new());
    let data = data(MIB as usize);
    let (source, _dir) = streaming(Arc::new(Stalling { data: data.clone() }), MIB, &store);
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let object = source.fetch(&request(None)).await.unwrap();
        object.body.into_body().unwrap().next().await
    })
    .await
    .expect("the first bytes come before the peer sent the rest");
    assert_eq!(first.unwrap().unwrap(), data.slice(..1024));
}

#[tokio::test]
async fn a_corrupt_streamed_blob_has_containerds_partial_copy_discarded() {
    let store = Arc::new(MemoryStore::new());
    let data = data(MIB as usize);
    let (source, _dir) = streaming(chunked_source(&data, true), MIB, &store);
    let object = source.fetch(&request(None)).await.unwrap();
    assert!(
        collect(object).await.is_err(),
        "the failure reaches the body"
    );
    assert_eq!(store.discarded(), vec![Digest::of(&data)]);
}

#[tokio::test]
async fn a_blob_below_the_stream_minimum_is_verified_whole_first() {
    let store = Arc::new(MemoryStore::new());
    let (source, _dir) = streaming(chunked_source(&data(10_000), true), MIB, &store);
    assert!(matches!(
        source.fetch(&request(None)).await,
        Err(SourceError::Unavailable(_))
    ));
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn a_blob_for_another_node_is_verified_whole_first() {
    let store = Arc::new(MemoryStore::new());
    let (source, _dir) = streaming(chunked_source(&data(MIB as usize), true), 1, &store);
    let mut mirrored = request(None);
    mirrored.mirrored = true;
    assert!(matches!(
        source.fetch(&mirrored).await,
        Err(SourceError::Unavailable(_))
    ));
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn a_range_of_a_streamable_blob_is_verified_whole_first() {
    let store = Arc::new(MemoryStore::new());
    let (source, _dir) = streaming(chunked_source(&data(MIB as usize), true), 1, &store);
    let range = Some(ByteRange::From {
        start: 5,
        end: None,
    });
    assert!(matches!(
        source.fetch(&request(range)).await,
        Err(SourceError::Unavailable(_))
    ));
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn a_small_blob_nothing_can_take_whole_streams_guarded() {
    let store = Arc::new(MemoryStore::new());
    let data = data(10_000);
    // Below the stream minimum, but no memory and no spool to verify it in first.
    let (source, _dir) = guarded(chunked_source(&data, true), args(0, MIB, 0), MIB, &store);
    let object = source.fetch(&request(None)).await.unwrap();
    assert!(
        collect(object).await.is_err(),
        "the failure reaches the body"
    );
    assert_eq!(store.discarded(), vec![Digest::of(&data)]);
}
