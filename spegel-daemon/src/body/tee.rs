//! A tee of one body for many readers, each at its own pace: the body is copied through its
//! [`BodyCheck`] into an unlinked file of the disk spool, and every reader reads that file up to
//! what has been written, then waits for more.
//!
//! - **One fetch, many readers.** A task of its own drains the source body as fast as the
//!   source sends, whatever the readers do: a slow (or stuck) reader never slows the fetch or
//!   the other readers, and memory stays bounded (what is in flight is on disk, within the
//!   spool's byte budget, one share for the whole object taken before the first byte).
//! - **Nothing unverified beyond what the check lets through.** Only bytes the check released
//!   are written, so the chunk that completes a whole object reaches the file — and a reader —
//!   only once the digest checks (the held-back tail); a failure of the source or of the check
//!   reaches every reader as an error before its last byte.
//! - **Readers come and go.** A reader arriving late reads what is spooled, then follows; one
//!   that goes away (a cancelled pull) costs nobody else anything. The copy stops when the last
//!   reader, and the last [`Tee`] handle, are gone: nobody is left to want the bytes.
use std::{
    fs::File,
    io,
    ops::Range,
    os::unix::fs::FileExt as _,
    sync::{Arc, Weak},
};

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;

use super::{
    budget::Share,
    spool::{READ_CHUNK, blocking},
    verify::BodyCheck,
};
use crate::source::Body;

/// Bytes gathered (of chunks already there) before one write to the file.
const WRITE_BATCH: usize = 1 << 20;

/// How far the copy is.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Bytes in the file, all released by the check.
    written: u64,
    /// `Some` once the copy is over: `Ok` when every byte passed, else why not.
    end: Option<Result<(), String>>,
}

/// A handle on one copy; readers are made from it. Cloning it is cheap.
#[derive(Clone)]
pub struct Tee {
    shared: Arc<Shared>,
}

/// A handle that does not keep the copy going.
#[derive(Clone)]
pub struct WeakTee {
    shared: Weak<Shared>,
}

struct Shared {
    file: Arc<File>,
    size: u64,
    progress: watch::Receiver<Progress>,
    /// The file's space in the spool budget, until the last reader is done with it.
    _share: Share,
}

impl Tee {
    /// Starts copying `body` (of `size` bytes) through `check` into `file` (an unlinked spool
    /// file whose space `share` covers). `from` names the sender in errors.
    pub fn start(
        body: Body,
        check: BodyCheck,
        size: u64,
        file: File,
        share: Share,
        from: &'static str,
    ) -> Self {
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(Progress::default());
        tokio::spawn(copy(body, check, Arc::clone(&file), tx, from));
        Self {
            shared: Arc::new(Shared {
                file,
                size,
                progress: rx,
                _share: share,
            }),
        }
    }

    /// The size of the whole object.
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// Bytes written so far (all of them released by the check).
    pub fn written(&self) -> u64 {
        self.shared.progress.borrow().written
    }

    /// Whether the copy failed (a new reader would only get the error).
    pub fn failed(&self) -> bool {
        matches!(self.shared.progress.borrow().end, Some(Err(_)))
    }

    /// A handle that lets the copy stop once every reader is gone.
    pub fn downgrade(&self) -> WeakTee {
        WeakTee {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The bytes `range` (half-open, within the object) as a body: what is written, then the
    /// rest as it comes. An error of the copy ends it with an error.
    pub fn reader(&self, range: Range<u64>) -> Body {
        let end = range.end.min(self.shared.size);
        let state = Reader {
            tee: Some(self.clone()),
            progress: self.shared.progress.clone(),
            at: range.start.min(end),
            end,
        };
        Box::pin(futures::stream::unfold(state, Reader::next))
    }
}

impl WeakTee {
    /// The copy, if anyone still reads it.
    pub fn upgrade(&self) -> Option<Tee> {
        self.shared.upgrade().map(|shared| Tee { shared })
    }
}

/// One reader's place in the file.
struct Reader {
    /// `None` once the reader is done (the file is released with it).
    tee: Option<Tee>,
    progress: watch::Receiver<Progress>,
    at: u64,
    end: u64,
}

impl Reader {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Self)> {
        let tee = self.tee.clone()?;
        loop {
            let progress = self.progress.borrow_and_update().clone();
            if self.at < self.end && progress.written > self.at {
                let n = READ_CHUNK.min(progress.written.min(self.end) - self.at);
                let file = Arc::clone(&tee.shared.file);
                let at = self.at;
                let read = blocking(move || {
                    let mut buf = vec![0; n as usize];
                    file.read_exact_at(&mut buf, at)?;
                    Ok(Bytes::from(buf))
                })
                .await;
                return match read {
                    Ok(bytes) => {
                        self.at += n;
                        Some((Ok(bytes), self))
                    }
                    Err(err) => {
                        self.tee = None;
                        let err = io::Error::other(format!("cannot read the spool file: {err}"));
                        Some((Err(err), self))
                    }
                };
            }
            // A reader whose range ends at the object's end is done only once the whole
            // object checked (this matters for the empty object, which has no tail to hold).
            let done = self.at >= self.end
                && (self.end < tee.shared.size || matches!(progress.end, Some(Ok(()))));
            if done {
                return None;
            }
            match progress.end {
                Some(Err(reason)) => {
                    self.tee = None;
                    return Some((Err(io::Error::other(reason)), self));
                }
                Some(Ok(())) => {
                    self.tee = None;
                    let err = io::Error::other("the shared copy ended short");
                    return Some((Err(err), self));
                }
                None => {
                    if self.progress.changed().await.is_err() {
                        self.tee = None;
                        let err = io::Error::other("the shared copy stopped");
                        return Some((Err(err), self));
                    }
                }
            }
        }
    }
}

/// The copy: `body` through `check` into `file`, progress told on `tx`. Ends early, dropping
/// the body (and so its source), when nobody holds a receiver any more.
async fn copy(
    mut body: Body,
    mut check: BodyCheck,
    file: Arc<File>,
    tx: watch::Sender<Progress>,
    from: &'static str,
) {
    let mut written = 0u64;
    let outcome = loop {
        let next = tokio::select! {
            biased;
            () = tx.closed() => {
                tracing::debug!(written, "shared copy abandoned: no reader left");
                return;
            }
            next = body.next() => next,
        };
        let mut batch = Vec::new();
        let mut batched = 0usize;
        let mut ended = None;
        let mut item = next;
        loop {
            match item {
                Some(Ok(chunk)) => match check.push(chunk) {
                    Ok(Some(bytes)) => {
                        batched += bytes.len();
                        batch.push(bytes);
                    }
                    Ok(None) => {}
                    Err(err) => {
                        ended = Some(Err(err.into_io(from).to_string()));
                        break;
                    }
                },
                Some(Err(err)) => {
                    ended = Some(Err(format!("{from} failed: {err}")));
                    break;
                }
                None => {
                    match check.finish() {
                        Ok(tail) => {
                            batch.extend(tail);
                            ended = Some(Ok(()));
                        }
                        Err(err) => ended = Some(Err(err.into_io(from).to_string())),
                    }
                    break;
                }
            }
            if batched >= WRITE_BATCH {
                break;
            }
            // Gather what is already there; never wait here.
            match body.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        if let Some(Err(reason)) = &ended {
            // Bytes released before the failure are still good, but nobody needs more of them.
            break Err(reason.clone());
        }
        match write(&file, batch, written).await {
            Ok(at) => written = at,
            Err(err) => break Err(format!("cannot write the spool file: {err}")),
        }
        tx.send_modify(|p| p.written = written);
        if let Some(outcome) = ended {
            break outcome;
        }
    };
    drop(body);
    if let Err(reason) = &outcome {
        tracing::info!(written, %reason, "shared copy failed; its readers see the error");
    }
    tx.send_modify(|p| p.end = Some(outcome));
}

async fn write(file: &Arc<File>, chunks: Vec<Bytes>, offset: u64) -> io::Result<u64> {
    if chunks.is_empty() {
        return Ok(offset);
    }
    let file = Arc::clone(file);
    blocking(move || {
        let mut at = offset;
        for chunk in &chunks {
            file.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
        Ok(at)
    })
    .await
}

#[cfg(test)]
mod tests;
