//! Reading upstream response bodies: every body bounded by the idle timeout, whole reads with a
//! cap. Streamed objects are checked by [`crate::body::VerifiedBody`] on their way through.
use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::body::{BoxBody, BoxError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        body::{BodyCheck, VerifiedBody},
        oci::digest::Digest,
        source::Body,
    };

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
                "too short: nothing completes the object",
                &[b"0123", b"4567"],
                false,
                10,
                b"01234567",
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
                b"01234567",
                Some(io::ErrorKind::Other),
            ),
        ];
        for (name, parts, error, size, bytes, ends_with) in cases {
            let body = VerifiedBody::new(
                chunks(parts, error),
                BodyCheck::whole(digest, size),
                "upstream",
            )
            .into_body();
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
            let body = VerifiedBody::new(chunks(parts, error), BodyCheck::part(len), "upstream")
                .into_body();
            assert_eq!(drain(body).await, (bytes.to_vec(), ends_with), "{name}");
        }
    }
}
