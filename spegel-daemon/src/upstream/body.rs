//! Reading upstream response bodies: every body bounded by the idle timeout, whole reads with a
//! cap, and the checks a streamed object gets on its way through (digest and length).
use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::{
    body::{BoxBody, BoxError},
    oci::digest::{Digest, Verifier},
    source::Body,
};

/// An upstream body that fails with [`io::ErrorKind::TimedOut`] when upstream stays silent for
/// `idle` while it is being read.
pub(super) fn idle_bounded(body: Incoming, idle: Duration) -> BoxBody {
    if body.is_end_stream() {
        // Nothing to wait for. Passed as is, the body still says it is empty (TimeoutBody would
        // hide that), so a passthrough answer to a HEAD, a 204 or a 304 without Content-Length
        // is framed as before instead of closing the connection to delimit it.
        return body.map_err(BoxError::from).boxed_unsync();
    }
    TimeoutBody::new(idle, body)
        .map_err(move |err: BoxError| -> BoxError {
            if err.is::<TimeoutError>() {
                Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("upstream body sent nothing for {idle:?}"),
                ))
            } else {
                err
            }
        })
        .boxed_unsync()
}

/// The data of an upstream body as a stream of `io::Result<Bytes>`, bounded by `idle`.
pub(super) fn data_stream(
    body: Incoming,
    idle: Duration,
) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
    http_body_util::BodyDataStream::new(idle_bounded(body, idle)).map(|item| {
        item.map_err(|err| match err.downcast::<io::Error>() {
            Ok(io_err) => *io_err,
            Err(other) => io::Error::other(other),
        })
    })
}

/// Reads a whole body, failing past `cap` bytes.
pub(super) async fn read_capped(
    body: Incoming,
    idle: Duration,
    cap: usize,
) -> Result<Bytes, ReadError> {
    let mut stream = data_stream(body, idle);
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Io)?;
        if buf.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads at most `cap` bytes of a body; the rest is dropped.
pub(super) async fn read_truncated(body: Incoming, idle: Duration, cap: usize) -> Bytes {
    let mut stream = data_stream(body, idle);
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = cap - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() == cap {
            break;
        }
    }
    buf.freeze()
}

/// Why [`read_capped`] failed.
#[derive(Debug)]
pub(super) enum ReadError {
    /// Reading failed (including the idle timeout).
    Io(io::Error),
    /// The body is longer than the cap.
    TooLarge,
}

/// Streams a blob through a [`Verifier`], holding back the last chunk until the whole content
/// checks out: a client that reads the body to its end without error got the right bytes. On
/// a mismatch (or a wrong length) the body ends with an error instead of its tail.
pub(super) fn verified_body(
    inner: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    digest: Digest,
    size: u64,
) -> Body {
    struct State<S> {
        inner: S,
        verifier: Verifier,
        held: Option<Bytes>,
        done: bool,
    }
    let state = State {
        inner,
        verifier: Verifier::new(digest),
        held: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(
        state,
        move |mut state| async move {
            if state.done {
                return None;
            }
            loop {
                match state.inner.next().await {
                    Some(Ok(chunk)) => {
                        state.verifier.update(&chunk);
                        if state.verifier.len() > size {
                            state.done = true;
                            let err = invalid_data(format!(
                                "upstream sent more than {size} bytes for {digest}"
                            ));
                            return Some((Err(err), state));
                        }
                        if let Some(previous) = state.held.replace(chunk) {
                            return Some((Ok(previous), state));
                        }
                    }
                    Some(Err(err)) => {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                    None => {
                        state.done = true;
                        let len = state.verifier.len();
                        if len != size {
                            let err = invalid_data(format!(
                                "upstream sent {len} of {size} bytes for {digest}"
                            ));
                            return Some((Err(err), state));
                        }
                        if !state.verifier.clone().verify() {
                            tracing::warn!(%digest, "upstream blob does not match its digest");
                            let err =
                                invalid_data(format!("upstream content does not match {digest}"));
                            return Some((Err(err), state));
                        }
                        return state.held.take().map(|last| (Ok(last), state));
                    }
                }
            }
        },
    ))
}

/// Passes a range's bytes through, failing if upstream sends more or fewer than `len`.
pub(super) fn length_checked_body(
    inner: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
    len: u64,
) -> Body {
    Box::pin(futures::stream::unfold(
        (inner, 0u64, false),
        move |(mut inner, mut seen, done)| async move {
            if done {
                return None;
            }
            match inner.next().await {
                Some(Ok(chunk)) => {
                    seen += chunk.len() as u64;
                    if seen > len {
                        let err = invalid_data(format!("upstream sent more than {len} bytes"));
                        return Some((Err(err), (inner, seen, true)));
                    }
                    Some((Ok(chunk), (inner, seen, false)))
                }
                Some(Err(err)) => Some((Err(err), (inner, seen, true))),
                None if seen == len => None,
                None => {
                    let err = invalid_data(format!("upstream sent {seen} of {len} bytes"));
                    Some((Err(err), (inner, seen, true)))
                }
            }
        },
    ))
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, chunks upstream sends, whether an error follows them, the expected length, the
    /// bytes the body yields, and the kind of error it ends with.
    type Case = (
        &'static str,
        &'static [&'static [u8]],
        bool,
        u64,
        &'static [u8],
        Option<io::ErrorKind>,
    );

    /// A stream of the given chunks, then `error` if set.
    fn chunks(
        parts: &[&'static [u8]],
        error: bool,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
        let mut items: Vec<io::Result<Bytes>> = parts
            .iter()
            .map(|part| Ok(Bytes::from_static(part)))
            .collect();
        if error {
            items.push(Err(io::Error::other("reset")));
        }
        futures::stream::iter(items)
    }

    /// The bytes a body yields before it ends, and the kind of the error it ends with, if any.
    async fn drain(mut body: Body) -> (Vec<u8>, Option<io::ErrorKind>) {
        let mut out = Vec::new();
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(err) => return (out, Some(err.kind())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn verified_bodies_hold_back_the_tail_until_it_checks_out() {
        let digest = Digest::of(b"0123456789");
        let invalid = Some(io::ErrorKind::InvalidData);
        let cases: [Case; 6] = [
            (
                "whole and right",
                &[b"0123", b"456789"],
                false,
                10,
                b"0123456789",
                None,
            ),
            (
                "one chunk",
                &[b"0123456789"],
                false,
                10,
                b"0123456789",
                None,
            ),
            (
                "wrong bytes: the tail is withheld",
                &[b"0123", b"45678X"],
                false,
                10,
                b"0123",
                invalid,
            ),
            (
                "too short",
                &[b"0123", b"4567"],
                false,
                10,
                b"0123",
                invalid,
            ),
            (
                "too long: stops at once",
                &[b"0123", b"456789", b"!"],
                false,
                10,
                b"0123",
                invalid,
            ),
            (
                "upstream error",
                &[b"0123", b"4567"],
                true,
                10,
                b"0123",
                Some(io::ErrorKind::Other),
            ),
        ];
        for (name, parts, error, size, bytes, ends_with) in cases {
            let body = verified_body(chunks(parts, error), digest, size);
            assert_eq!(drain(body).await, (bytes.to_vec(), ends_with), "{name}");
        }
    }

    #[tokio::test]
    async fn length_checked_bodies_pass_exactly_len_bytes() {
        let invalid = Some(io::ErrorKind::InvalidData);
        let cases: [Case; 5] = [
            ("exact", &[b"23", b"45"], false, 4, b"2345", None),
            ("empty", &[], false, 0, b"", None),
            ("too short", &[b"23"], false, 4, b"23", invalid),
            ("too long", &[b"23", b"456"], false, 4, b"23", invalid),
            (
                "upstream error",
                &[b"23"],
                true,
                4,
                b"23",
                Some(io::ErrorKind::Other),
            ),
        ];
        for (name, parts, error, len, bytes, ends_with) in cases {
            let body = length_checked_body(chunks(parts, error), len);
            assert_eq!(drain(body).await, (bytes.to_vec(), ends_with), "{name}");
        }
    }
}
