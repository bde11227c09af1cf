//! The verified body: bytes checked against the length (and, for a whole object, the digest) they
//! must have, with the tail held back until the check is done.
//!
//! [`BodyCheck`] is the check itself, fed chunk by chunk: it hashes what passes, refuses a byte
//! beyond the expected length, and keeps the chunk that completes a digest-checked object until
//! the end of the stream shows nothing more follows — so a client that reads a body to its end
//! without an error got exactly the right bytes, and a mismatch ends the body with an error
//! *before* its last byte. [`VerifiedBody`] wraps a byte stream in that check; code that drives
//! its own loop (the peer body with its resumes, whole-body reads) uses [`BodyCheck`] directly.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};

use crate::{
    oci::digest::{Digest, Verifier},
    source::Body,
};

/// Why a body failed its check. `Display` reads after the sender's name: "upstream sent …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A byte arrived beyond the expected end.
    #[error("sent more than {expected} bytes{}", of(.digest))]
    TooLong {
        expected: u64,
        digest: Option<Digest>,
    },
    /// The stream ended before the expected end.
    #[error("sent {got} of {expected} bytes{}", of(.digest))]
    TooShort {
        got: u64,
        expected: u64,
        digest: Option<Digest>,
    },
    /// All bytes arrived, but they do not hash to the digest.
    #[error("sent content that does not match {digest}")]
    Mismatch { digest: Digest },
}

fn of(digest: &Option<Digest>) -> String {
    digest.map(|d| format!(" for {d}")).unwrap_or_default()
}

impl VerifyError {
    /// The error as a body item, naming who sent the bytes (`upstream`, `peers`).
    pub fn into_io(self, from: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("{from} {self}"))
    }
}

/// The check of one body, fed chunk by chunk.
///
/// Two kinds: [`whole`](Self::whole) objects are hashed and their completing chunk held back
/// (the check is the hash state, so it carries over when a body resumes from another source);
/// a [`part`](Self::part) of an object (a range) cannot be checked against the digest of the
/// whole, so only its length is checked and nothing is held back.
#[derive(Clone)]
pub struct BodyCheck {
    /// Bytes counted so far, including those before a resume.
    seen: u64,
    /// Where the body must end, on the same count.
    end: u64,
    /// The digest to check; `None` for a part, and once checked.
    verifier: Option<Verifier>,
    digest: Option<Digest>,
    /// The completing chunk, verified, until the end of the stream.
    held: Option<Bytes>,
    /// The first failure: every later call repeats it.
    failed: Option<VerifyError>,
}

impl BodyCheck {
    /// A whole object of `size` bytes that must hash to `digest`.
    ///
    /// To resume such a body from another stream after its source failed, keep the check: take
    /// it back with [`VerifiedBody::into_check`], ask the new source for bytes from
    /// [`seen`](Self::seen) on, and wrap the new stream in the same check.
    pub fn whole(digest: Digest, size: u64) -> Self {
        Self {
            seen: 0,
            end: size,
            verifier: Some(Verifier::new(digest)),
            digest: Some(digest),
            held: None,
            failed: None,
        }
    }

    /// A part of an object: exactly `len` bytes, passed on as they come.
    pub fn part(len: u64) -> Self {
        Self {
            seen: 0,
            end: len,
            verifier: None,
            digest: None,
            held: None,
            failed: None,
        }
    }

    /// Bytes counted so far, from the first byte of the object or part: where a resumed body
    /// must continue.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Take the next chunk. Returns the bytes that may go to the client now: the chunk itself,
    /// or nothing when it is held back (the completing chunk of a whole object) or empty.
    pub fn push(&mut self, chunk: Bytes) -> Result<Option<Bytes>, VerifyError> {
        self.fail_again()?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let len = chunk.len() as u64;
        if self.held.is_some() || len > self.end.saturating_sub(self.seen) {
            return Err(self.fail(VerifyError::TooLong {
                expected: self.end,
                digest: self.digest,
            }));
        }
        self.seen += len;
        let Some(verifier) = &mut self.verifier else {
            return Ok(Some(chunk));
        };
        verifier.update(&chunk);
        if self.seen < self.end {
            return Ok(Some(chunk));
        }
        self.check_digest()?;
        self.held = Some(chunk);
        Ok(None)
    }

    /// The stream ended: returns the held-back tail, if any, once the length (and digest) are
    /// right.
    pub fn finish(&mut self) -> Result<Option<Bytes>, VerifyError> {
        self.fail_again()?;
        if self.seen != self.end {
            let err = if self.seen > self.end {
                VerifyError::TooLong {
                    expected: self.end,
                    digest: self.digest,
                }
            } else {
                VerifyError::TooShort {
                    got: self.seen,
                    expected: self.end,
                    digest: self.digest,
                }
            };
            return Err(self.fail(err));
        }
        // An empty object completes without a chunk: its digest is checked here.
        self.check_digest()?;
        Ok(self.held.take())
    }

    fn check_digest(&mut self) -> Result<(), VerifyError> {
        if let (Some(verifier), Some(digest)) = (self.verifier.take(), self.digest)
            && !verifier.verify()
        {
            return Err(self.fail(VerifyError::Mismatch { digest }));
        }
        Ok(())
    }

    fn fail(&mut self, err: VerifyError) -> VerifyError {
        self.held = None;
        self.failed = Some(err.clone());
        err
    }

    fn fail_again(&self) -> Result<(), VerifyError> {
        self.failed.clone().map_or(Ok(()), Err)
    }
}

/// A byte stream passed through a [`BodyCheck`]: the first failure, of the inner stream or of
/// the check, is the last item. Failures of the check name `from` as the sender.
pub struct VerifiedBody<S> {
    inner: S,
    check: BodyCheck,
    from: &'static str,
    done: bool,
}

impl<S> VerifiedBody<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    /// `inner` checked by `check`; `from` names the sender in errors (`upstream`, `peers`).
    pub fn new(inner: S, check: BodyCheck, from: &'static str) -> Self {
        Self {
            inner,
            check,
            from,
            done: false,
        }
    }

    /// As the body type sources return.
    pub fn into_body(self) -> Body
    where
        S: Send + 'static,
    {
        Box::pin(self)
    }

    /// The check, to continue the object from another stream after this one failed (its
    /// state then covers every byte this stream delivered).
    pub fn into_check(self) -> BodyCheck {
        self.check
    }

    fn end(&mut self, item: io::Result<Bytes>) -> Poll<Option<io::Result<Bytes>>> {
        self.done = true;
        Poll::Ready(Some(item))
    }
}

impl<S> Stream for VerifiedBody<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let step = match ready!(this.inner.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => this.check.push(chunk),
                Some(Err(err)) => return this.end(Err(err)),
                None => {
                    this.done = true;
                    this.check.finish()
                }
            };
            match step {
                Ok(Some(bytes)) => return Poll::Ready(Some(Ok(bytes))),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(from = this.from, %err, "body failed verification");
                    return this.end(Err(err.into_io(this.from)));
                }
            }
        }
    }
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed.
    #[error(transparent)]
    Io(io::Error),
    /// The bytes failed the check.
    #[error(transparent)]
    Verify(VerifyError),
}

/// Reads a whole body through `check`. Nothing is returned unless every byte passed: this is
/// verify-before-send. The buffer is sized to what the check expects, so a cap on that size
/// caps memory.
pub async fn read_whole<S>(mut body: S, mut check: BodyCheck) -> Result<Bytes, ReadError>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    let capacity = usize::try_from(check.end.saturating_sub(check.seen)).unwrap_or(0);
    let mut buffer = BytesMut::with_capacity(capacity);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(ReadError::Io)?;
        if let Some(bytes) = check.push(chunk).map_err(ReadError::Verify)? {
            buffer.extend_from_slice(&bytes);
        }
    }
    if let Some(tail) = check.finish().map_err(ReadError::Verify)? {
        buffer.extend_from_slice(&tail);
    }
    Ok(buffer.freeze())
}

#[cfg(test)]
mod tests;
