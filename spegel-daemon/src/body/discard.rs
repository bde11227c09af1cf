//! A peer blob streamed to this node's containerd as it arrives, made safe to stream.
//!
//! The peer body holds the chunk that completes the blob back until the digest checks, so
//! containerd never gets a complete, wrong blob. But it does get the bytes before that chunk,
//! unverified, and containerd resumes a cut blob after the bytes it already holds: at once,
//! within the same pull (containerd 1.6 reconnects with a `Range`), so that pull fails on the
//! digest; and in a later pull too whenever the partial ingest outlives the failed one — a
//! client whose lease does not end with its pull, or containerd restarted mid-transfer. So when
//! the body ends any way but verified — a failed check, a transfer nothing could resume, a
//! client that went away after taking bytes — containerd's partial ingest of the blob is thrown
//! away ([`Ingests::discard`]), and the next attempt starts from the first byte whatever the
//! client's leases. On a failure the error is held until the discard is done: containerd's
//! writer stays open and locked meanwhile, so no other writer can pick up those bytes.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, future::BoxFuture};

use crate::{oci::digest::Digest, source::Body, store::Ingests};

/// How long a discard may take before the failure goes to the client anyway.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(15);

/// `body` (a whole blob of `size` bytes, checked against `digest` with its tail held back) as
/// it goes to containerd, discarding containerd's partial ingest if it ends unverified.
pub fn discard_unverified(
    body: Body,
    digest: Digest,
    size: u64,
    ingests: Arc<dyn Ingests>,
) -> Body {
    Box::pin(DiscardUnverified {
        body,
        digest,
        size,
        sent: 0,
        ingests,
        state: State::Streaming,
    })
}

struct DiscardUnverified {
    body: Body,
    digest: Digest,
    size: u64,
    /// Bytes handed on so far.
    sent: u64,
    ingests: Arc<dyn Ingests>,
    state: State,
}

enum State {
    Streaming,
    /// The body failed after bytes went out: discarding, then the error.
    Discarding(BoxFuture<'static, ()>, Option<io::Error>),
    /// Verified to the end, failed before any byte went out, or failed and discarded.
    Done,
}

impl DiscardUnverified {
    fn discard(&self, why: &'static str) -> BoxFuture<'static, ()> {
        let (ingests, digest, sent) = (Arc::clone(&self.ingests), self.digest, self.sent);
        Box::pin(async move {
            match tokio::time::timeout(DISCARD_TIMEOUT, ingests.discard(&digest)).await {
                Ok(Ok(count)) => {
                    tracing::info!(%digest, sent, count, why, "discarded containerd's partial copy of a peer blob that did not verify; its next attempt starts from the first byte")
                }
                Ok(Err(err)) => {
                    tracing::warn!(%digest, sent, %err, why, "cannot discard containerd's partial copy of a peer blob that did not verify; its next attempt may resume after unverified bytes")
                }
                Err(_) => {
                    tracing::warn!(%digest, sent, why, timeout = ?DISCARD_TIMEOUT, "containerd did not discard its partial copy of a peer blob that did not verify in time")
                }
            }
        })
    }
}

impl Stream for DiscardUnverified {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Discarding(discard, error) => {
                    ready!(discard.as_mut().poll(cx));
                    let error = error.take();
                    this.state = State::Done;
                    return Poll::Ready(error.map(Err));
                }
                State::Streaming => match ready!(this.body.as_mut().poll_next(cx)) {
                    Some(Ok(chunk)) => {
                        this.sent += chunk.len() as u64;
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    // Nothing went out, or everything did (the last byte only once the digest
                    // checked): nothing unverified to discard.
                    Some(Err(error)) if this.sent == 0 || this.sent >= this.size => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(error)));
                    }
                    Some(Err(error)) => {
                        this.state = State::Discarding(this.discard("failed"), Some(error));
                    }
                    // The inner body is read to its end, so what observes it (timings) sees it.
                    None if this.sent >= this.size => {
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    None => {
                        let short = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "peer body for {} ended after {} of {} bytes",
                                this.digest, this.sent, this.size
                            ),
                        );
                        if this.sent == 0 {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(short)));
                        }
                        this.state = State::Discarding(this.discard("ended short"), Some(short));
                    }
                },
            }
        }
    }
}

impl Drop for DiscardUnverified {
    fn drop(&mut self) {
        let discard = match std::mem::replace(&mut self.state, State::Done) {
            State::Streaming if self.sent > 0 && self.sent < self.size => {
                self.discard("client gone")
            }
            State::Discarding(discard, _) => discard,
            State::Streaming | State::Done => return,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard);
        }
    }
}

#[cfg(test)]
mod tests;
