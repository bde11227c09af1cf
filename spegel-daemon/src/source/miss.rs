//! Why peers did not serve a request, passed from the peer source to the serve policy, which
//! counts why requests ended at upstream (`spegel_upstream_fallbacks_total{reason}`).
//!
//! A [`Source`](super::Source) answers only "not found" or "unavailable"; the finer reason (no
//! provider, providers failing, a timeout) is known deep in the peer race. Rather than widen
//! every source's error for one counter, the policy opens a task-local slot around a request
//! ([`scope`]) and the peer source [`note`]s its reason there. A note made outside a scope
//! (tests, or work moved to another task) is dropped: the policy then counts the reason as
//! unknown, never a wrong one.
use std::{cell::Cell, future::Future};

tokio::task_local! {
    static NOTE: Cell<Option<PeerMiss>>;
}

/// Why the peers did not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMiss {
    /// This node knows no other node (empty routing table).
    NoPeers,
    /// The lookup ended without naming a provider: the content is not in the cluster.
    NoProviders,
    /// No provider was found within the lookup's time.
    LookupTimeout,
    /// The router could not look the key up (it stopped).
    LookupFailed,
    /// Providers were found, but every attempt failed (refused, 404, broken, corrupt).
    PeersFailed,
    /// Providers were asked, but none answered in time.
    PeersTimeout,
    /// The request is not one peers may answer (a peer asking, a filtered tag).
    NotForPeers,
}

/// Notes why the peers did not serve the current request (the last note wins).
pub fn note(miss: PeerMiss) {
    let _ = NOTE.try_with(|slot| slot.set(Some(miss)));
}

/// What the peers noted for the current request, if anything.
pub fn noted() -> Option<PeerMiss> {
    NOTE.try_with(Cell::get).ok().flatten()
}

/// Runs `request` with a slot of its own for notes.
pub async fn scope<F: Future>(request: F) -> F::Output {
    NOTE.scope(Cell::new(None), request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notes_stay_in_their_scope() {
        note(PeerMiss::NoPeers);
        assert_eq!(noted(), None, "outside a scope nothing is kept");
        let inside = scope(async {
            assert_eq!(noted(), None);
            note(PeerMiss::NoProviders);
            note(PeerMiss::PeersTimeout);
            noted()
        })
        .await;
        assert_eq!(inside, Some(PeerMiss::PeersTimeout), "the last note wins");
        let other = scope(async { noted() }).await;
        assert_eq!(other, None, "each request starts clean");
    }
}
