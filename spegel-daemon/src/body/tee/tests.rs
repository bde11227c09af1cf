//! The tee against concurrent, slow, late, cancelled and ranged readers, and against a source
//! that fails or sends the wrong bytes mid-stream.
use std::{io, time::Duration};

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;

use super::*;
use crate::{body::spool::Spool, oci::digest::Digest};

const WAIT: Duration = Duration::from_secs(10);

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// A source body fed by hand: the sender, and the body.
fn source(capacity: usize) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel(capacity);
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Box::pin(body))
}

struct Fixture {
    _dir: tempfile::TempDir,
    spool: Spool,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 64 << 20).unwrap();
        Self { _dir: dir, spool }
    }

    /// A tee of an object `content` claims to be, fed by the returned sender.
    async fn tee(&self, content: &[u8]) -> (mpsc::Sender<io::Result<Bytes>>, Tee) {
        self.tee_of(Digest::of(content), content.len() as u64, 4)
            .await
    }

    async fn tee_of(
        &self,
        digest: Digest,
        size: u64,
        capacity: usize,
    ) -> (mpsc::Sender<io::Result<Bytes>>, Tee) {
        let (tx, body) = source(capacity);
        let share = self.spool.reserve(size).unwrap();
        let file = self.spool.file().await.unwrap();
        let tee = Tee::start(
            body,
            BodyCheck::whole(digest, size),
            size,
            file,
            share,
            "test",
        );
        (tx, tee)
    }
}

async fn feed(tx: &mpsc::Sender<io::Result<Bytes>>, content: &[u8], chunk: usize) {
    for part in content.chunks(chunk) {
        tx.send(Ok(Bytes::copy_from_slice(part))).await.unwrap();
    }
}

/// Everything a body gives, and the error that ended it, if any.
async fn drain(mut body: Body) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, body.next())
            .await
            .expect("bounded")
        {
            None => return (out, None),
            Some(Ok(bytes)) => out.extend_from_slice(&bytes),
            Some(Err(err)) => return (out, Some(err)),
        }
    }
}

async fn written_reaches(tee: &Tee, n: u64) {
    tokio::time::timeout(WAIT, async {
        while tee.written() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the copy goes on");
}

#[tokio::test]
async fn concurrent_readers_each_get_every_byte() {
    let fixture = Fixture::new();
    let content = data(3 << 20);
    let (tx, tee) = fixture.tee(&content).await;
    let size = content.len() as u64;
    let readers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(drain(tee.reader(0..size))))
        .collect();
    feed(&tx, &content, 100_000).await;
    drop(tx);
    for reader in readers {
        let (got, err) = reader.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert!(got == content, "every reader gets the object");
    }
}

#[tokio::test]
async fn a_reader_that_never_reads_slows_neither_the_copy_nor_the_others() {
    let fixture = Fixture::new();
    let content = data(2 << 20);
    let size = content.len() as u64;
    // A source with room for one chunk: it can only finish if the copy keeps draining it.
    let (tx, tee) = fixture.tee_of(Digest::of(&content), size, 1).await;
    let stuck = tee.reader(0..size);
    let fast = tokio::spawn(drain(tee.reader(0..size)));
    feed(&tx, &content, 64 << 10).await;
    drop(tx);
    let (got, err) = fast.await.unwrap();
    assert!(err.is_none() && got == content);
    assert_eq!(
        tee.written(),
        size,
        "the copy finished without the stuck reader"
    );
    // The stuck reader, when it reads at last, gets everything too.
    let (got, err) = drain(stuck).await;
    assert!(err.is_none() && got == content);
}

#[tokio::test]
async fn a_failure_mid_stream_reaches_every_reader_as_an_error() {
    let fixture = Fixture::new();
    let content = data(1 << 20);
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let readers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(drain(tee.reader(0..size))))
        .collect();
    feed(&tx, &content[..300_000], 50_000).await;
    tx.send(Err(io::Error::other("connection reset")))
        .await
        .unwrap();
    for reader in readers {
        let (got, err) = reader.await.unwrap();
        let err = err.expect("the failure reaches the reader");
        assert!(err.to_string().contains("connection reset"), "{err}");
        assert!(got.len() < content.len());
        assert!(got[..] == content[..got.len()]);
    }
    assert!(tee.failed());
}

#[tokio::test]
async fn wrong_bytes_never_reach_a_reader_whole() {
    let fixture = Fixture::new();
    let content = data(500_000);
    let mut corrupt = content.clone();
    corrupt[400_000] ^= 1;
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let reader = tokio::spawn(drain(tee.reader(0..size)));
    feed(&tx, &corrupt, 100_000).await;
    drop(tx);
    let (got, err) = reader.await.unwrap();
    assert!(err.is_some(), "a mismatch ends the body with an error");
    assert!(
        (got.len() as u64) < size,
        "the completing chunk is held back"
    );
}

#[tokio::test]
async fn the_first_reader_going_away_does_not_stop_the_others() {
    let fixture = Fixture::new();
    let content = data(1 << 20);
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let mut first = tee.reader(0..size);
    let second = tokio::spawn(drain(tee.reader(0..size)));
    drop(tee);
    feed(&tx, &content[..200_000], 50_000).await;
    assert!(first.next().await.unwrap().is_ok());
    drop(first);
    feed(&tx, &content[200_000..], 50_000).await;
    drop(tx);
    let (got, err) = second.await.unwrap();
    assert!(err.is_none() && got == content);
}

#[tokio::test]
async fn a_late_reader_reads_what_is_spooled_then_follows() {
    let fixture = Fixture::new();
    let content = data(1 << 20);
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let early = tokio::spawn(drain(tee.reader(0..size)));
    feed(&tx, &content[..600_000], 60_000).await;
    written_reaches(&tee, 600_000).await;
    let late = tokio::spawn(drain(tee.reader(0..size)));
    feed(&tx, &content[600_000..], 60_000).await;
    drop(tx);
    for reader in [early, late] {
        let (got, err) = reader.await.unwrap();
        assert!(err.is_none() && got == content);
    }
}

#[tokio::test]
async fn a_range_gets_exactly_its_bytes() {
    let fixture = Fixture::new();
    let content = data(700_000);
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let middle = tokio::spawn(drain(tee.reader(100_000..400_001)));
    let tail = tokio::spawn(drain(tee.reader(650_000..size)));
    feed(&tx, &content, 70_000).await;
    drop(tx);
    let (got, err) = middle.await.unwrap();
    assert!(err.is_none() && got[..] == content[100_000..400_001]);
    let (got, err) = tail.await.unwrap();
    assert!(err.is_none() && got[..] == content[650_000..]);
}

#[tokio::test]
async fn the_copy_stops_when_nobody_is_left_to_read() {
    let fixture = Fixture::new();
    let content = data(1 << 20);
    let size = content.len() as u64;
    let (tx, tee) = fixture.tee(&content).await;
    let reader = tee.reader(0..size);
    feed(&tx, &content[..100_000], 50_000).await;
    drop(reader);
    drop(tee);
    tokio::time::timeout(WAIT, tx.closed())
        .await
        .expect("the source body is dropped once nobody reads");
    assert!(
        fixture.spool.available() >= 64 << 20,
        "the spool share came back"
    );
}

#[tokio::test]
async fn an_empty_object_ends_only_once_checked() {
    let fixture = Fixture::new();
    let (tx, tee) = fixture.tee_of(Digest::of(b"x"), 0, 1).await;
    let mut reader = tee.reader(0..0);
    assert!(
        reader.next().now_or_never().is_none(),
        "nothing is said before the source ends"
    );
    drop(tx);
    let (_, err) = drain(reader).await;
    assert!(err.is_some(), "an empty body is not the digest of x");
}
