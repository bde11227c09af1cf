//! The verified body against exact, short, long, corrupt, empty and resumed streams, cut at every
//! chunk boundary.
use std::io;

use bytes::Bytes;
use futures::{FutureExt as _, Stream, StreamExt as _, stream};

use super::*;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 37 % 253) as u8).collect()
}

fn chunks_of(data: &[u8], size: usize) -> Vec<io::Result<Bytes>> {
    data.chunks(size.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

/// What a client got: the bytes delivered, and the error that ended the body, if any.
fn drain(mut body: impl Stream<Item = io::Result<Bytes>> + Unpin) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    loop {
        match body
            .next()
            .now_or_never()
            .expect("the body is always ready")
        {
            None => return (out, None),
            Some(Ok(bytes)) => out.extend_from_slice(&bytes),
            Some(Err(err)) => {
                assert!(
                    matches!(body.next().now_or_never(), Some(None)),
                    "nothing follows an error"
                );
                return (out, Some(err));
            }
        }
    }
}

fn whole(data: &[u8], chunks: Vec<io::Result<Bytes>>) -> (Vec<u8>, Option<io::Error>) {
    let check = BodyCheck::whole(Digest::of(data), data.len() as u64);
    drain(VerifiedBody::new(stream::iter(chunks), check, "test"))
}

#[test]
fn exact_length_passes_every_byte() {
    let data = data(10_000);
    let (got, err) = whole(&data, chunks_of(&data, 1000));
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, data);
    // The same as the boxed body sources return.
    let check = BodyCheck::whole(Digest::of(&data), 10_000);
    let body = VerifiedBody::new(stream::iter(chunks_of(&data, 999)), check, "test").into_body();
    assert_eq!(drain(body).0, data);
}

#[test]
fn a_short_stream_ends_with_an_error() {
    let data = data(10_000);
    let (got, err) = whole(&data, chunks_of(&data[..9_999], 1000));
    let err = err.expect("short body must fail");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string().contains("sent 9999 of 10000 bytes"),
        "{err}"
    );
    assert_eq!(got, data[..9_999]);
}

#[test]
fn a_long_stream_never_delivers_its_tail() {
    let data = data(10_000);
    let mut long = data.clone();
    long.push(0);
    // The extra byte in the completing chunk, and in a chunk of its own.
    for size in [1000, 10_000, 10_001] {
        let (got, err) = whole(&data, chunks_of(&long, size));
        let err = err.expect("long body must fail");
        assert!(err.to_string().contains("more than 10000 bytes"), "{err}");
        assert!(got.len() < data.len(), "chunk size {size}");
    }
    let mut chunks = chunks_of(&data, 1000);
    chunks.push(Ok(Bytes::from_static(b"x")));
    let (got, err) = whole(&data, chunks);
    assert!(err.is_some());
    assert_eq!(got, data[..9_000], "the held-back tail is dropped");
}

#[test]
fn a_corrupt_byte_anywhere_withholds_the_tail() {
    let data = data(10_000);
    for at in [0, 1, 4_999, 9_000, 9_998, 9_999] {
        let mut bad = data.clone();
        bad[at] ^= 0xff;
        let (got, err) = whole(&data, chunks_of(&bad, 1000));
        let err = err.expect("corrupt body must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .starts_with("test sent content that does not match sha256:"),
            "{err}"
        );
        assert_eq!(got, bad[..9_000], "byte {at}: the last chunk is withheld");
    }
}

#[test]
fn the_tail_waits_for_the_end_of_the_stream() {
    let data = data(3000);
    let check = BodyCheck::whole(Digest::of(&data), 3000);
    let inner = stream::iter(chunks_of(&data, 1000)).chain(stream::pending());
    let mut body = VerifiedBody::new(inner, check, "test");
    for _ in 0..2 {
        assert!(matches!(body.next().now_or_never(), Some(Some(Ok(_)))));
    }
    assert!(
        body.next().now_or_never().is_none(),
        "the completing chunk is held until the stream ends"
    );
}

#[test]
fn empty_blobs() {
    let empty = Digest::of(b"");
    let (got, err) = drain(VerifiedBody::new(
        stream::iter(Vec::new()),
        BodyCheck::whole(empty, 0),
        "test",
    ));
    assert!(got.is_empty() && err.is_none());
    // Empty chunks are no bytes.
    let (got, err) = drain(VerifiedBody::new(
        stream::iter(vec![Ok(Bytes::new())]),
        BodyCheck::whole(empty, 0),
        "test",
    ));
    assert!(got.is_empty() && err.is_none());
    let (_, err) = drain(VerifiedBody::new(
        stream::iter(Vec::new()),
        BodyCheck::whole(Digest::of(b"x"), 0),
        "test",
    ));
    assert!(
        err.expect("wrong empty digest")
            .to_string()
            .contains("does not match")
    );
    let (got, err) = drain(VerifiedBody::new(
        stream::iter(vec![Ok(Bytes::from_static(b"x"))]),
        BodyCheck::whole(empty, 0),
        "test",
    ));
    assert!(got.is_empty() && err.is_some());
}

#[test]
fn a_failure_of_the_stream_is_passed_on() {
    let data = data(3000);
    let mut chunks = chunks_of(&data[..1000], 1000);
    chunks.push(Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone")));
    chunks.push(Ok(Bytes::copy_from_slice(&data[1000..])));
    let (got, err) = whole(&data, chunks);
    assert_eq!(err.expect("failed").kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(got, data[..1000]);
}

#[test]
fn resumes_from_an_offset_with_the_same_hash() {
    let data = data(10_000);
    for offset in [0, 1, 4_096, 9_999, 10_000] {
        let mut first = chunks_of(&data[..offset], 1000);
        first.push(Err(io::Error::other("source died")));
        let mut body = VerifiedBody::new(
            stream::iter(first),
            BodyCheck::whole(Digest::of(&data), 10_000),
            "test",
        );
        let (mut got, err) = drain(&mut body);
        assert!(err.is_some());
        let check = body.into_check();
        assert_eq!(check.seen(), offset as u64);
        let rest = chunks_of(&data[offset..], 777);
        let (more, err) = drain(VerifiedBody::new(stream::iter(rest), check.clone(), "test"));
        assert!(err.is_none(), "offset {offset}: {err:?}");
        got.extend_from_slice(&more);
        assert_eq!(got, data);
        // The resumed part is held to the digest of the whole.
        if offset < 10_000 {
            let mut bad = data[offset..].to_vec();
            bad[0] ^= 1;
            let (_, err) = drain(VerifiedBody::new(
                stream::iter(chunks_of(&bad, 777)),
                check,
                "test",
            ));
            assert!(
                err.expect("corrupt resume")
                    .to_string()
                    .contains("does not match")
            );
        }
    }
}

#[test]
fn every_chunk_boundary() {
    let data = data(300);
    // Two chunks, split anywhere.
    for split in 0..=data.len() {
        let chunks = vec![
            Ok(Bytes::copy_from_slice(&data[..split])),
            Ok(Bytes::copy_from_slice(&data[split..])),
        ];
        let (got, err) = whole(&data, chunks);
        assert!(err.is_none(), "split {split}");
        assert_eq!(got, data);
    }
    // Every chunk size, with and without a corrupt byte in each chunk position.
    for size in 1..=data.len() {
        let (got, err) = whole(&data, chunks_of(&data, size));
        assert!(err.is_none(), "size {size}");
        assert_eq!(got, data);
        for at in (0..data.len()).step_by(size) {
            let mut bad = data.clone();
            bad[at] ^= 0x80;
            let (got, err) = whole(&data, chunks_of(&bad, size));
            assert!(err.is_some(), "size {size}, byte {at}");
            let last = (data.len() - 1) / size * size;
            assert_eq!(got, bad[..last], "size {size}, byte {at}");
        }
    }
}

#[test]
fn a_part_checks_only_its_length_and_holds_nothing() {
    let data = data(3000);
    let part = |chunks| {
        drain(VerifiedBody::new(
            stream::iter(chunks),
            BodyCheck::part(3000),
            "test",
        ))
    };
    assert_eq!(part(chunks_of(&data, 1000)).0, data);
    // Any bytes of the right length pass: a part cannot be checked against a digest.
    let (got, err) = part(chunks_of(&[7u8; 3000], 1000));
    assert!(err.is_none() && got.len() == 3000);
    let (got, err) = part(chunks_of(&data[..2999], 1000));
    assert_eq!(got.len(), 2999);
    assert!(
        err.expect("short")
            .to_string()
            .contains("sent 2999 of 3000 bytes")
    );
    let mut long = data.clone();
    long.push(1);
    let (got, err) = part(chunks_of(&long, 1000));
    assert_eq!(got.len(), 3000, "a part's last chunk is not held back");
    assert!(
        err.expect("long")
            .to_string()
            .contains("more than 3000 bytes")
    );
    // Released before the stream ends.
    let inner = stream::iter(chunks_of(&data, 3000)).chain(stream::pending());
    let mut body = VerifiedBody::new(inner, BodyCheck::part(3000), "test");
    assert!(matches!(body.next().now_or_never(), Some(Some(Ok(_)))));
}

#[test]
fn errors_read_after_the_sender() {
    let d = Digest::of(b"");
    let cases = [
        (
            VerifyError::TooLong {
                expected: 5,
                digest: None,
            },
            "upstream sent more than 5 bytes",
        ),
        (
            VerifyError::TooShort {
                got: 3,
                expected: 5,
                digest: Some(d),
            },
            "upstream sent 3 of 5 bytes for sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
        (
            VerifyError::Mismatch { digest: d },
            "upstream sent content that does not match sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
    ];
    for (err, want) in cases {
        assert_eq!(err.into_io("upstream").to_string(), want);
    }
}

#[test]
fn a_failed_check_stays_failed() {
    let mut check = BodyCheck::whole(Digest::of(b"ab"), 2);
    assert_eq!(
        check.push(Bytes::from_static(b"a")),
        Ok(Some(Bytes::from_static(b"a")))
    );
    assert!(check.push(Bytes::from_static(b"x")).is_err());
    assert!(check.push(Bytes::new()).is_err());
    assert!(check.finish().is_err());
}

#[tokio::test]
async fn read_whole_returns_only_checked_bodies() {
    let data = data(5000);
    let digest = Digest::of(&data);
    let read = |chunks, check| read_whole(stream::iter(chunks), check);
    let got = read(chunks_of(&data, 1000), BodyCheck::whole(digest, 5000)).await;
    assert_eq!(got.expect("good body"), data);
    let got = read(chunks_of(&data, 1000), BodyCheck::part(5000)).await;
    assert_eq!(got.expect("good part"), data);
    let mut bad = data.clone();
    bad[2500] = !bad[2500];
    assert!(matches!(
        read(chunks_of(&bad, 1000), BodyCheck::whole(digest, 5000)).await,
        Err(ReadError::Verify(VerifyError::Mismatch { .. }))
    ));
    assert!(matches!(
        read(chunks_of(&data[..10], 1000), BodyCheck::part(5000)).await,
        Err(ReadError::Verify(VerifyError::TooShort { got: 10, .. }))
    ));
    assert!(matches!(
        read(vec![Err(io::Error::other("x"))], BodyCheck::part(5000)).await,
        Err(ReadError::Io(_))
    ));
}
