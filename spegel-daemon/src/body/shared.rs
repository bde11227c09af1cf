//! One fetch per blob per node: concurrent GETs of one blob share one fetch from the wrapped
//! source (upstream), each reading a [`Tee`] of it at its own pace (see `body::tee`: a spool
//! file, so memory stays bounded and a slow reader slows nobody).
//!
//! - The first whole-blob GET of a digest *leads*: it asks the inner source for the whole blob
//!   and, once it has an answer, starts the tee. GETs of the same digest that arrive while it
//!   waits for that answer wait with it (bounded by the inner source's own response timeouts);
//!   GETs that arrive later read what is spooled, then follow. Ranges are cut from a copy in
//!   flight; a range with no copy in flight goes to the inner source as before (containerd's
//!   resume of an aborted blob must not cost a second whole download).
//! - If the leader's fetch fails, each waiting GET asks the inner source itself (its own
//!   credentials may get a different answer); if the leader goes away before an answer, one of
//!   them leads instead.
//! - A peer's GET (`X-Spegel-Mirrored`) never starts a fetch (a peer request is never
//!   forwarded), but is served from a copy in flight: that is this node's own fetch, which is
//!   what lets a cold burst cost one upstream download (see `peers::burst`).
//! - When the spool is off or its budget is spent, GETs go to the inner source one by one, as
//!   before: sharing is an optimisation, never a reason to fail.
//!
//! Keys are digests alone: the bytes are checked against the digest, so a copy fetched for one
//! repository serves another (as the local store does).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use super::{
    BodyCheck,
    spool::Spool,
    tee::{Tee, WeakTee},
};
use crate::{
    oci::{Kind, Reference, digest::Digest},
    routing::Router,
    source::{Object, ObjectRequest, Payload, Source, SourceError},
};

/// A copy in flight, as the table keeps it.
#[derive(Clone)]
struct Flight {
    tee: WeakTee,
    media_type: String,
    source: &'static str,
}

/// What became of a leader's fetch, for those waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    Pending,
    /// A copy is in the table.
    Flying,
    /// The fetch failed: ask the inner source yourself.
    Failed,
    /// The leader went away before an answer: try to lead.
    Gone,
}

enum Slot {
    Starting(watch::Receiver<Lead>),
    Flying(Flight),
}

type Table = Arc<Mutex<HashMap<Digest, Slot>>>;

/// Shares concurrent whole-blob GETs of one digest. See the module docs.
pub struct SharedFetch {
    inner: Arc<dyn Source>,
    spool: Option<Spool>,
    table: Table,
    /// Told about each copy this node starts, so peers can find it while it is in flight.
    announce: Option<Arc<dyn Router>>,
}

/// What one request does, decided under the table's lock.
enum Step {
    Join(Tee, Flight),
    Wait(watch::Receiver<Lead>),
    Lead(LeadGuard),
    Alone,
}

impl SharedFetch {
    /// Shares GETs of `inner`, spooling copies in `spool` (`None`: no sharing).
    pub fn new(inner: Arc<dyn Source>, spool: Option<Spool>) -> Self {
        Self {
            inner,
            spool,
            table: Arc::default(),
            announce: None,
        }
    }

    /// Advertise every blob this node starts fetching through `router` before its first byte
    /// arrives (and withdraw it if the fetch fails), so peers find it in flight.
    pub fn with_announce(mut self, router: Arc<dyn Router>) -> Self {
        self.announce = Some(router);
        self
    }

    /// A handle on the copies in flight, for peers' requests.
    pub fn in_flight(&self) -> InFlight {
        InFlight {
            table: Arc::clone(&self.table),
        }
    }

    fn step(&self, digest: Digest, may_lead: bool) -> Step {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&digest) {
            Some(Slot::Flying(flight)) => {
                if let Some(tee) = flight.tee.upgrade().filter(|tee| !tee.failed()) {
                    return Step::Join(tee, flight.clone());
                }
            }
            Some(Slot::Starting(rx)) => return Step::Wait(rx.clone()),
            None => {}
        }
        table.remove(&digest);
        if !may_lead {
            return Step::Alone;
        }
        let (tx, rx) = watch::channel(Lead::Pending);
        table.insert(digest, Slot::Starting(rx));
        Step::Lead(LeadGuard {
            table: Arc::clone(&self.table),
            digest,
            tx,
        })
    }

    /// Leads the fetch of `digest`: the whole blob from the inner source, then a tee of it.
    async fn lead(
        &self,
        request: &ObjectRequest,
        digest: Digest,
        guard: LeadGuard,
    ) -> Result<Object, SourceError> {
        let Some(spool) = &self.spool else {
            guard.finish(Lead::Failed);
            return self.inner.fetch(request).await;
        };
        if let Some(router) = &self.announce {
            // Alongside the upstream request, not before it: the announcement must not delay
            // this node's own pull.
            tokio::spawn(announce(Arc::clone(router), digest));
        }
        let whole = ObjectRequest {
            range: None,
            ..request.clone()
        };
        let mut object = match self.inner.fetch(&whole).await {
            Ok(object) => object,
            Err(err) => {
                guard.finish(Lead::Failed);
                self.withdraw(digest).await;
                return Err(err);
            }
        };
        // Whatever is served from here on is the shared stream (a file's reads, if the source
        // answered with a file), never the file itself.
        let body = match (object.body.take(), object.range.is_none()) {
            (Some(body), true) => body,
            (body, _) => {
                // Not a whole body (the source answered a range anyway): nothing to share.
                guard.finish(Lead::Failed);
                object.body = body.into();
                return Ok(object);
            }
        };
        let Some(share) = spool.reserve(object.size) else {
            tracing::info!(%digest, size = object.size, available = spool.available(), "spool budget spent; this blob's fetch is not shared");
            guard.finish(Lead::Failed);
            object.body = Payload::Stream(body);
            return Ok(object);
        };
        let file = match spool.file().await {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(%digest, %error, "cannot create a spool file; this blob's fetch is not shared");
                guard.finish(Lead::Failed);
                object.body = Payload::Stream(body);
                return Ok(object);
            }
        };
        let check = BodyCheck::whole(digest, object.size);
        let tee = Tee::start(body, check, object.size, file, share, object.source);
        let flight = Flight {
            tee: tee.downgrade(),
            media_type: object.media_type.clone(),
            source: object.source,
        };
        guard.fly(flight.clone());
        tracing::debug!(%digest, size = object.size, "shared fetch started");
        serve(request, digest, &tee, &flight)
    }

    async fn withdraw(&self, digest: Digest) {
        if let Some(router) = &self.announce
            && let Err(error) = router.withdraw(vec![digest.to_string()]).await
        {
            tracing::debug!(%digest, %error, "cannot withdraw an in-flight announcement");
        }
    }
}

/// Advertises `digest` as in flight. Best effort: a failure costs sharing, never the pull.
async fn announce(router: Arc<dyn Router>, digest: Digest) {
    if let Err(error) = router.advertise(vec![digest.to_string()]).await {
        tracing::debug!(%digest, %error, "cannot announce a blob in flight");
    }
}

/// The object a request gets from a copy in flight: the whole blob or its range.
fn serve(
    request: &ObjectRequest,
    digest: Digest,
    tee: &Tee,
    flight: &Flight,
) -> Result<Object, SourceError> {
    let size = tee.size();
    let range = request.resolve_range(size)?;
    let bytes = range.as_ref().map_or(0..size, |r| *r.start()..*r.end() + 1);
    Ok(Object {
        digest,
        media_type: flight.media_type.clone(),
        size,
        range,
        body: (!request.head).then(|| tee.reader(bytes)).into(),
        source: flight.source,
    })
}

/// The blob GET a request is, if it is one.
fn blob_get(request: &ObjectRequest) -> Option<Digest> {
    match (&request.kind, &request.reference, request.head) {
        (Kind::Blob, Reference::Digest(digest), false) => Some(*digest),
        _ => None,
    }
}

#[async_trait::async_trait]
impl Source for SharedFetch {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let Some(digest) = blob_get(request) else {
            return self.inner.fetch(request).await;
        };
        if request.mirrored {
            // Never forwarded; only this node's own copy in flight.
            return self.in_flight().serve(request).ok_or(SourceError::NotFound);
        }
        // Only intercepted requests reach an upstream; others are not worth a claim (or an
        // announcement).
        let may_lead = request.range.is_none() && request.origin.is_some() && self.spool.is_some();
        loop {
            match self.step(digest, may_lead) {
                Step::Join(tee, flight) => {
                    tracing::debug!(%digest, written = tee.written(), "joining a fetch in flight");
                    return serve(request, digest, &tee, &flight);
                }
                Step::Lead(guard) => return self.lead(request, digest, guard).await,
                Step::Alone => return self.inner.fetch(request).await,
                Step::Wait(mut rx) => {
                    let lead = match rx.wait_for(|lead| *lead != Lead::Pending).await {
                        Ok(lead) => *lead,
                        Err(_) => Lead::Gone,
                    };
                    if lead == Lead::Failed {
                        return self.inner.fetch(request).await;
                    }
                }
            }
        }
    }
}

/// The copies in flight on this node, for peers' GETs.
#[derive(Clone)]
pub struct InFlight {
    table: Table,
}

impl InFlight {
    /// `request` served from a copy in flight, if there is one.
    ///
    /// TODO(access): a peer's request is subject to the same access rules as one for a stored
    /// blob (`serve/access.rs`, `x-spegel-public-only`): the caller decides before asking; a
    /// copy fetched with credentials must not go to a peer that asked for public content only
    /// until the lead's rule says it may.
    pub fn serve(&self, request: &ObjectRequest) -> Option<Object> {
        let digest = blob_get(request)?;
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(Slot::Flying(flight)) = table.get(&digest) else {
            return None;
        };
        let tee = flight.tee.upgrade().filter(|tee| !tee.failed())?;
        serve(request, digest, &tee, flight).ok()
    }

    /// Whether a copy of `digest` is in flight here.
    pub fn has(&self, digest: &Digest) -> bool {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        matches!(table.get(digest), Some(Slot::Flying(flight)) if flight.tee.upgrade().is_some())
    }
}

/// The leader's claim on a digest: tells the waiters what became of it, and clears the slot if
/// the leader goes away first.
struct LeadGuard {
    table: Table,
    digest: Digest,
    tx: watch::Sender<Lead>,
}

impl LeadGuard {
    fn fly(self, flight: Flight) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.insert(self.digest, Slot::Flying(flight));
        drop(table);
        self.tx.send_replace(Lead::Flying);
    }

    fn finish(self, lead: Lead) {
        self.tx.send_replace(lead);
        // Drop clears the slot.
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        if *self.tx.borrow() == Lead::Flying {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // Nobody else replaces a starting slot: if one is there, it is this leader's.
        if matches!(table.get(&self.digest), Some(Slot::Starting(_))) {
            table.remove(&self.digest);
        }
        drop(table);
        self.tx.send_if_modified(|lead| {
            let pending = *lead == Lead::Pending;
            if pending {
                *lead = Lead::Gone;
            }
            pending
        });
    }
}

#[cfg(test)]
mod tests;
