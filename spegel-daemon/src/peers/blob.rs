//! A blob body streamed from peers: hashed as it passes, the chunk that completes the object held
//! back until the digest checks, and continued elsewhere with `Range` when its source fails.
use std::{collections::HashSet, io, ops::Range, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, header};
use tokio::time::{Instant, timeout};

use super::{
    Inner,
    attempt::{AttemptError, PeerResponse, ReadFailure},
    bump,
};
use crate::{
    body::{BodyCheck, VerifyError},
    oci::{ByteRange, digest::Digest},
    routing::Peer,
    source::{Body, ObjectRequest},
};

/// Where the bytes currently come from.
enum Current {
    // Boxed: the response (headers, body, guards) is many times the size of the other variants.
    Peer {
        peer: Peer,
        response: Box<PeerResponse>,
    },
    Fallback(Body),
    Nothing,
}

pub(super) struct BlobStream {
    inner: Arc<Inner>,
    /// The client's request, for resumes.
    request: ObjectRequest,
    key: String,
    digest: Digest,
    total: u64,
    /// Absolute offset of the next byte to deliver.
    next: u64,
    /// One past the last byte to deliver.
    end: u64,
    /// The check of the bytes delivered: digest and length when the whole object is delivered
    /// (a part cannot be verified), else the length only. It carries over resumes.
    check: BodyCheck,
    current: Current,
    /// Bytes the current source sends before `next` (it started earlier than asked).
    skip: u64,
    /// Peers that failed this body: never asked again for it.
    tried: HashSet<String>,
    /// Peers whose bytes are in the hash: all are suspects when it does not match.
    contributors: Vec<Peer>,
    resumes: usize,
    /// Time spent waiting on the current peer, and bytes it delivered, since the last rate check.
    window: Duration,
    window_bytes: u64,
    done: bool,
}

/// What takes over a body from a failed or slow source.
enum Replacement {
    Peer(Peer, Box<PeerResponse>),
    /// A body from the fallback source, and the offset its first byte is at.
    Fallback(Body, u64),
}

impl BlobStream {
    /// The body for `want` (half-open, absolute) of the blob `digest`, starting with the answer
    /// `peer` gave.
    pub(super) fn start(
        inner: Arc<Inner>,
        mut request: ObjectRequest,
        key: String,
        digest: Digest,
        peer: Peer,
        response: PeerResponse,
        want: Range<u64>,
    ) -> Body {
        let span = response.span;
        // The client's own Range header must not reach the fallback: ranges are set explicitly.
        request.headers.remove(header::RANGE);
        let stream = BlobStream {
            inner,
            request,
            key,
            digest,
            total: span.total,
            next: want.start,
            end: want.end,
            check: if want.start == 0 && want.end == span.total {
                BodyCheck::whole(digest, span.total)
            } else {
                BodyCheck::part(want.end - want.start)
            },
            skip: want.start.saturating_sub(span.start),
            tried: HashSet::new(),
            contributors: vec![peer.clone()],
            current: Current::Peer {
                peer,
                response: Box::new(response),
            },
            resumes: 0,
            window: Duration::ZERO,
            window_bytes: 0,
            done: false,
        };
        Box::pin(futures::stream::unfold(stream, |mut s| async move {
            let item = s.next_item().await?;
            Some((item, s))
        }))
    }

    async fn next_item(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            if self.next >= self.end {
                // An empty object or range: nothing to send (its digest was checked up front).
                return self.complete(Ok(None));
            }
            let stall = self.inner.config.stall_timeout;
            let waiting = Instant::now();
            let read = match &mut self.current {
                Current::Peer { response, .. } => match response.data(stall).await {
                    Err(ReadFailure::Stalled) => Err(format!("no bytes for {stall:?}")),
                    Err(ReadFailure::Broken(e)) => Err(e.to_string()),
                    Ok(data) => Ok(data),
                },
                Current::Fallback(body) => match timeout(stall, body.next()).await {
                    Err(_) => Err(format!("no bytes for {stall:?}")),
                    Ok(None) => Ok(None),
                    Ok(Some(Err(e))) => Err(e.to_string()),
                    Ok(Some(Ok(data))) => Ok(Some(data)),
                },
                Current::Nothing => Err("no source".to_owned()),
            };
            let from_peer = matches!(self.current, Current::Peer { .. });
            if from_peer {
                self.window += waiting.elapsed();
            }
            let failure = match read {
                Ok(Some(data)) => {
                    if from_peer {
                        self.window_bytes += data.len() as u64;
                    }
                    let item = self.accept(data);
                    if !self.done && self.too_slow() {
                        // Cannot fail: a slow source is kept when nothing replaces it.
                        let _ = self.resume("too slow".to_owned(), true).await;
                    }
                    match item {
                        Some(item) => return Some(item),
                        None => continue,
                    }
                }
                Ok(None) => "the source ended early".to_owned(),
                Err(e) => e,
            };
            if let Err(err) = self.resume(failure, false).await {
                self.done = true;
                self.current = Current::Nothing;
                return Some(Err(err));
            }
        }
    }

    /// Whether the current peer delivered below the minimum rate over the last window (which
    /// counts only time spent waiting for it: a slow client is not the peer's fault).
    fn too_slow(&mut self) -> bool {
        let min_rate = self.inner.config.min_rate;
        if min_rate == 0 || self.window < self.inner.config.stall_timeout {
            return false;
        }
        let slow = (self.window_bytes as f64) < min_rate as f64 * self.window.as_secs_f64();
        self.window = Duration::ZERO;
        self.window_bytes = 0;
        slow
    }

    /// Take `data` from the current source. Returns what to hand to the client, if anything.
    fn accept(&mut self, mut data: Bytes) -> Option<io::Result<Bytes>> {
        if self.skip > 0 {
            let n = self.skip.min(data.len() as u64);
            data = data.slice(n as usize..);
            self.skip -= n;
        }
        if matches!(self.current, Current::Peer { .. }) {
            bump(&self.inner.metrics.bytes, data.len() as u64);
        }
        // Only the bytes asked for count; a source that sends more is cut off at the end.
        let left = self.end - self.next;
        if data.len() as u64 > left {
            data.truncate(left as usize);
        }
        if data.is_empty() {
            return None;
        }
        self.next += data.len() as u64;
        let pushed = self.check.push(data);
        if self.next < self.end || pushed.is_err() {
            return self.checked(pushed);
        }
        // This chunk completes what was asked (sources are cut off here). The check held it
        // back: it is released only if everything hashes right, so a client never holds a
        // complete but wrong object.
        self.complete(pushed)
    }

    /// End the body: the last bytes to hand out (or the failure), then nothing.
    fn complete(
        &mut self,
        pushed: Result<Option<Bytes>, VerifyError>,
    ) -> Option<io::Result<Bytes>> {
        self.done = true;
        self.current = Current::Nothing;
        let last = pushed.and_then(|first| Ok(first.or(self.check.finish()?)));
        self.checked(last)
    }

    /// What the check said, as a body item; a mismatch quarantines every peer that contributed.
    fn checked(&mut self, result: Result<Option<Bytes>, VerifyError>) -> Option<io::Result<Bytes>> {
        match result {
            Ok(bytes) => bytes.map(Ok),
            Err(err) => {
                self.done = true;
                self.current = Current::Nothing;
                if let VerifyError::Mismatch { .. } = err {
                    bump(&self.inner.metrics.verify_failures, 1);
                    for peer in &self.contributors {
                        self.inner.quarantine(peer, self.digest);
                    }
                }
                Some(Err(err.into_io("peers")))
            }
        }
    }

    /// Continue the body from `next` with another peer, else the fallback source. When `slow`,
    /// the current source still works and is kept if nothing can take over; otherwise it has
    /// failed and the body fails with it if nothing can take over.
    async fn resume(&mut self, failure: String, slow: bool) -> io::Result<()> {
        if slow {
            if self.resumes >= self.inner.config.max_resumes {
                return Ok(());
            }
            if let Current::Peer { peer, .. } = &self.current {
                tracing::info!(peer = %peer.id, digest = %self.digest, offset = self.next, "peer too slow; looking for another source");
                self.tried.insert(peer.id.clone());
            }
        } else {
            match std::mem::replace(&mut self.current, Current::Nothing) {
                Current::Peer { peer, response } => {
                    drop(response);
                    tracing::warn!(peer = %peer.id, digest = %self.digest, offset = self.next, %failure, "peer transfer failed mid-stream");
                    self.tried.insert(peer.id.clone());
                    self.inner
                        .note_failure(&peer, &AttemptError::Unreachable(failure.clone()));
                }
                Current::Fallback(_) => {
                    tracing::warn!(digest = %self.digest, offset = self.next, %failure, "fallback transfer failed mid-stream");
                }
                Current::Nothing => {}
            }
            if self.resumes >= self.inner.config.max_resumes {
                return Err(io::Error::other(format!(
                    "giving up after {} resumes: {failure}",
                    self.resumes
                )));
            }
        }
        self.resumes += 1;
        let inner = Arc::clone(&self.inner);
        let replacement = find_replacement(
            &inner,
            &self.request,
            &self.key,
            &self.tried,
            self.digest,
            self.next..self.end,
            self.total,
        )
        .await;
        let from = self.next;
        match replacement {
            Some(Replacement::Peer(peer, response)) => {
                tracing::info!(peer = %peer.id, digest = %self.digest, offset = from, "resumed from another peer");
                self.skip = from - response.span.start;
                self.contributors.push(peer.clone());
                self.current = Current::Peer { peer, response };
            }
            Some(Replacement::Fallback(body, start)) => {
                tracing::info!(digest = %self.digest, offset = from, "resumed from the fallback source");
                bump(&self.inner.metrics.resume_fallbacks, 1);
                self.skip = from - start;
                self.current = Current::Fallback(body);
            }
            None if slow => {
                tracing::debug!(digest = %self.digest, "no other source; staying with the slow peer");
                return Ok(());
            }
            None => {
                return Err(io::Error::other(format!(
                    "transfer of {} failed at byte {from} of {} and nothing could resume it: {failure}",
                    self.digest, self.total
                )));
            }
        }
        bump(&self.inner.metrics.resumes, 1);
        self.window = Duration::ZERO;
        self.window_bytes = 0;
        Ok(())
    }
}

/// A source for bytes `want` of the blob `digest` (of `total` bytes): a peer not in `tried`,
/// else the fallback source. A free function, not a method: the stream's state holds a body
/// that is `Send` but not `Sync`, so it must not be borrowed whole across these awaits.
async fn find_replacement(
    inner: &Inner,
    request: &ObjectRequest,
    key: &str,
    tried: &HashSet<String>,
    digest: Digest,
    want: Range<u64>,
    total: u64,
) -> Option<Replacement> {
    let (from, end) = (want.start, want.end);
    let range = ByteRange::From {
        start: from,
        end: Some(end - 1),
    };
    let reference = digest.to_string();
    let reference = reference.as_str();
    let resumed = inner
        .race(key, tried, |peer| async move {
            let response = inner
                .send(&peer, Method::GET, request, reference, Some(range))
                .await?;
            let span = response.span;
            if span.total != total || span.start > from || span.end() < end {
                return Err(AttemptError::Failed(format!(
                    "peer answered bytes {}..{} of {} to a resume from {from}",
                    span.start,
                    span.end(),
                    span.total
                )));
            }
            Ok(response)
        })
        .await;
    match resumed {
        Ok((peer, response)) => return Some(Replacement::Peer(peer, Box::new(response))),
        Err(err) => tracing::debug!(%digest, %err, "no peer can resume"),
    }

    let fallback = inner.fallback.as_ref()?;
    let mut request = request.clone();
    request.range = Some(range);
    request.head = false;
    match timeout(inner.config.fallback_timeout, fallback.fetch(&request)).await {
        Ok(Ok(object)) => {
            let (start, stop) = object
                .range
                .as_ref()
                .map_or((0, object.size), |r| (*r.start(), *r.end() + 1));
            match object.body.into_body() {
                Some(body) if object.size == total && start <= from && stop >= end => {
                    return Some(Replacement::Fallback(body, start));
                }
                _ => {
                    tracing::warn!(%digest, size = object.size, range = ?object.range, "fallback answered a resume with other bytes");
                }
            }
        }
        Ok(Err(err)) => tracing::warn!(%digest, %err, "fallback cannot resume"),
        Err(_) => tracing::warn!(%digest, "fallback resume timed out"),
    }
    None
}
