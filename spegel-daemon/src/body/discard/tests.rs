use futures::StreamExt as _;

use super::*;
use crate::store::memory::MemoryStore;

const BLOB: &[u8] = b"0123456789";

fn digest() -> Digest {
    Digest::of(BLOB)
}

/// A body yielding `parts`, then an error of `kind` if given.
fn body(parts: &[&'static [u8]], error: Option<io::ErrorKind>) -> Body {
    let mut items: Vec<io::Result<Bytes>> = parts
        .iter()
        .map(|part| Ok(Bytes::from_static(part)))
        .collect();
    if let Some(kind) = error {
        items.push(Err(io::Error::new(kind, "peer failed")));
    }
    Box::pin(futures::stream::iter(items))
}

/// Drains `body`: the bytes, and the error it ended with along with the discards made by the
/// time the error came out.
async fn drain(
    mut body: Body,
    store: &MemoryStore,
) -> (Vec<u8>, Option<(io::ErrorKind, Vec<Digest>)>) {
    let mut out = Vec::new();
    while let Some(item) = body.next().await {
        match item {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(err) => return (out, Some((err.kind(), store.discarded()))),
        }
    }
    (out, None)
}

fn wrapped(body: Body, store: &Arc<MemoryStore>) -> Body {
    discard_unverified(body, digest(), BLOB.len() as u64, Arc::clone(store) as _)
}

/// Lets spawned discards run.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_blob_verified_to_its_end_discards_nothing() {
    let store = Arc::new(MemoryStore::new());
    let streamed = wrapped(body(&[b"01234", b"56789"], None), &store);
    let (bytes, error) = drain(streamed, &store).await;
    assert_eq!(bytes, BLOB);
    assert!(error.is_none());
    settle().await;
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn a_failure_after_bytes_went_out_discards_before_the_error_goes_out() {
    let store = Arc::new(MemoryStore::new());
    let failing = body(&[b"01234"], Some(io::ErrorKind::InvalidData));
    let (bytes, error) = drain(wrapped(failing, &store), &store).await;
    assert_eq!(bytes, b"01234");
    assert_eq!(error, Some((io::ErrorKind::InvalidData, vec![digest()])));
}

#[tokio::test]
async fn a_failure_before_any_byte_discards_nothing() {
    let store = Arc::new(MemoryStore::new());
    let failing = body(&[], Some(io::ErrorKind::InvalidData));
    let (bytes, error) = drain(wrapped(failing, &store), &store).await;
    assert!(bytes.is_empty());
    assert_eq!(error, Some((io::ErrorKind::InvalidData, vec![])));
    settle().await;
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn a_body_ending_short_fails_after_discarding() {
    let store = Arc::new(MemoryStore::new());
    let (bytes, error) = drain(wrapped(body(&[b"0123"], None), &store), &store).await;
    assert_eq!(bytes, b"0123");
    assert_eq!(error, Some((io::ErrorKind::UnexpectedEof, vec![digest()])));
}

#[tokio::test]
async fn a_client_gone_after_taking_bytes_discards() {
    let store = Arc::new(MemoryStore::new());
    let mut streamed = wrapped(body(&[b"01234", b"56789"], None), &store);
    assert_eq!(streamed.next().await.unwrap().unwrap(), &b"01234"[..]);
    drop(streamed);
    settle().await;
    assert_eq!(store.discarded(), vec![digest()]);
}

#[tokio::test]
async fn a_client_gone_before_any_byte_discards_nothing() {
    let store = Arc::new(MemoryStore::new());
    drop(wrapped(body(&[b"01234", b"56789"], None), &store));
    settle().await;
    assert!(store.discarded().is_empty());
}

#[tokio::test]
async fn the_inner_body_is_read_to_its_end() {
    let store = Arc::new(MemoryStore::new());
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&ended);
    let end = futures::stream::poll_fn(move |_| {
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
        std::task::Poll::Ready(None)
    });
    let inner: Body = Box::pin(body(&[b"01234", b"56789"], None).chain(end));
    let (bytes, error) = drain(wrapped(inner, &store), &store).await;
    assert_eq!((bytes.as_slice(), error), (BLOB, None));
    assert!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        "an observer of the inner body's end (peer timings) never saw it"
    );
}

#[tokio::test]
async fn an_empty_body_for_a_blob_fails_once_then_ends() {
    let store = Arc::new(MemoryStore::new());
    let mut streamed = wrapped(body(&[], None), &store);
    let first = streamed.next().await.unwrap();
    assert_eq!(first.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    assert!(
        streamed.next().await.is_none(),
        "polled again after failing"
    );
    assert!(store.discarded().is_empty());
}
