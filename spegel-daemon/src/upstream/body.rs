//! Reading upstream response bodies: every body bounded by the idle timeout, whole reads with a
//! cap, and the checks a streamed object gets on its way through (digest and length).
use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
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
