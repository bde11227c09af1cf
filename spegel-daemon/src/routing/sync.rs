//! The advertise loop: keeps what the router advertises in step with what the store holds.
//!
//! The loop re-reads [`Store::keys`] on start, shortly after every [`Store::changes`] bump
//! (debounced, since one image pull bumps the counter once per object), on a fixed period (a
//! safety net for missed events), and after failures (with backoff). It advertises the keys that
//! are new since the last successful pass and withdraws the ones that are gone. Errors are logged
//! and retried; the loop only ends on shutdown.
use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::Router;
use crate::store::{Keys, Store};

/// Quiet time after a change before the store is re-read, so changes a moment apart cost one
/// read. Short: the containerd store already coalesces a pull's events into one bump, and until
/// this pass a new image's manifest and tag cannot be found by the next node to pull it.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Under a steady stream of changes, re-read at least this often.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// First retry delay after a failed pass; doubles up to the period.
const RETRY_MIN: Duration = Duration::from_secs(1);

/// Run the advertise loop until `shutdown` is cancelled. `period` is the full re-read interval.
pub async fn run(
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    shutdown: CancellationToken,
    period: Duration,
) {
    let mut changes = store.changes();
    let mut changes_open = true;
    let mut advertised = BTreeSet::new();
    let mut retry = RETRY_MIN;
    // When the next unconditional pass is due (start, period, retry), and when the pending
    // change-triggered pass is due, with the time of the first change it covers.
    let mut periodic_at = Instant::now();
    let mut change: Option<(Instant, Instant)> = None;

    loop {
        let due = change.map_or(periodic_at, |(at, _)| at.min(periodic_at));
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(due) => {
                let outcome = tokio::select! {
                    () = shutdown.cancelled() => break,
                    outcome = sync_once(store.as_ref(), router.as_ref(), &mut advertised) => outcome,
                };
                change = None;
                periodic_at = Instant::now() + match outcome {
                    Ok(()) => {
                        retry = RETRY_MIN;
                        period
                    }
                    Err(()) => {
                        let delay = retry;
                        retry = (retry * 2).min(period.max(RETRY_MIN));
                        tracing::debug!(retry_in = ?delay, "advertise pass incomplete, retrying");
                        delay
                    }
                };
            }
            changed = changes.changed(), if changes_open => {
                if changed.is_err() {
                    // The store dropped its sender: only the periodic pass is left.
                    tracing::debug!("store change notifications ended");
                    changes_open = false;
                    continue;
                }
                let now = Instant::now();
                let first = change.map_or(now, |(_, first)| first);
                change = Some(((now + DEBOUNCE).min(first + MAX_DEBOUNCE), first));
            }
        }
    }
    tracing::debug!(advertised = advertised.len(), "advertise loop stopped");
}

/// One pass: read the store, advertise what is new, withdraw what is gone. `advertised` holds
/// what the router accepted; a key only moves in or out of it on success, so a failed call is
/// simply retried on the next pass. `Err` means some step failed (already logged).
async fn sync_once(
    store: &dyn Store,
    router: &dyn Router,
    advertised: &mut BTreeSet<String>,
) -> Result<(), ()> {
    let keys = match store.keys().await {
        Ok(keys) => key_strings(keys),
        Err(error) => {
            tracing::warn!(%error, "cannot list the store's keys");
            return Err(());
        }
    };
    let new: Vec<String> = keys.difference(advertised).cloned().collect();
    let gone: Vec<String> = advertised.difference(&keys).cloned().collect();
    let mut outcome = Ok(());

    if !new.is_empty() {
        match router.advertise(new.clone()).await {
            Ok(()) => {
                tracing::debug!(count = new.len(), "advertised keys");
                advertised.extend(new);
            }
            Err(error) => {
                tracing::warn!(%error, count = new.len(), "cannot advertise keys");
                outcome = Err(());
            }
        }
    }
    if !gone.is_empty() {
        match router.withdraw(gone.clone()).await {
            Ok(()) => {
                tracing::debug!(count = gone.len(), "withdrew keys");
                for key in &gone {
                    advertised.remove(key);
                }
            }
            Err(error) => {
                tracing::warn!(%error, count = gone.len(), "cannot withdraw keys");
                outcome = Err(());
            }
        }
    }
    outcome
}

/// The DHT keys of a store listing: `sha256:<hex>` digests and `registry/repo:tag` tags.
fn key_strings(keys: Keys) -> BTreeSet<String> {
    keys.digests
        .iter()
        .map(ToString::to_string)
        .chain(keys.tags)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::{
        oci::digest::Digest,
        routing::{Peer, RouterError, memory::MemoryRouter},
        store::{Descriptor, Reader, StoreError},
    };

    /// A store whose key listing the test sets, optionally failing the next few reads.
    struct FakeStore {
        keys: Mutex<Keys>,
        failures: AtomicUsize,
        reads: AtomicUsize,
        changes: watch::Sender<u64>,
    }

    impl FakeStore {
        fn new(keys: Keys) -> Arc<Self> {
            Arc::new(Self {
                keys: Mutex::new(keys),
                failures: AtomicUsize::new(0),
                reads: AtomicUsize::new(0),
                changes: watch::channel(0).0,
            })
        }

        fn set(&self, keys: Keys) {
            *self.keys.lock().unwrap() = keys;
            self.changes.send_modify(|n| *n += 1);
        }
    }

    #[async_trait::async_trait]
    impl Store for FakeStore {
        async fn resolve(&self, _: &str) -> Result<Digest, StoreError> {
            Err(StoreError::NotFound)
        }
        async fn descriptor(&self, _: &Digest) -> Result<Descriptor, StoreError> {
            Err(StoreError::NotFound)
        }
        async fn open(&self, _: &Digest, _: u64, _: u64) -> Result<Reader, StoreError> {
            Err(StoreError::NotFound)
        }
        async fn keys(&self) -> Result<Keys, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Unavailable("injected".into()));
            }
            Ok(self.keys.lock().unwrap().clone())
        }
        fn changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
    }

    /// A [`MemoryRouter`] whose next `failures` advertise calls fail.
    struct FlakyRouter {
        inner: MemoryRouter,
        failures: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Router for FlakyRouter {
        fn has_peers(&self) -> bool {
            self.inner.has_peers()
        }
        async fn lookup(
            &self,
            key: &str,
            count: usize,
        ) -> Result<mpsc::Receiver<Peer>, RouterError> {
            self.inner.lookup(key, count).await
        }
        async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(RouterError::Failed("injected".into()));
            }
            self.inner.advertise(keys).await
        }
        async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
            self.inner.withdraw(keys).await
        }
    }

    fn keys(digests: &[&[u8]], tags: &[&str]) -> Keys {
        Keys {
            digests: digests.iter().map(|d| Digest::of(d)).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn set(items: &[String]) -> BTreeSet<String> {
        items.iter().cloned().collect()
    }

    fn router() -> MemoryRouter {
        MemoryRouter::network().router("self", SocketAddr::from(([127, 0, 0, 1], 5000)))
    }

    const PERIOD: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn follows_store_changes_with_debounce() {
        let store = FakeStore::new(keys(&[b"a"], &["docker.io/library/x:1"]));
        let router = router();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            store.clone(),
            Arc::new(router.clone()),
            shutdown.clone(),
            PERIOD,
        ));

        tokio::time::sleep(Duration::from_millis(10)).await;
        let a = Digest::of(b"a").to_string();
        let b = Digest::of(b"b").to_string();
        assert_eq!(
            router.advertised(),
            set(&[a.clone(), "docker.io/library/x:1".into()]),
            "initial pass advertises everything"
        );

        store.set(keys(&[b"b"], &["docker.io/library/x:1"]));
        tokio::time::sleep(DEBOUNCE / 2).await;
        assert!(router.advertised().contains(&a), "still debouncing");
        tokio::time::sleep(DEBOUNCE).await;
        assert_eq!(
            router.advertised(),
            set(&[b.clone(), "docker.io/library/x:1".into()]),
            "new key advertised, gone keys withdrawn"
        );

        // A burst of changes is read once after it settles, not once per change.
        let reads = store.reads.load(Ordering::SeqCst);
        for _ in 0..5 {
            store.set(keys(&[b"b", b"c"], &[]));
            tokio::time::sleep(DEBOUNCE / 4).await;
        }
        tokio::time::sleep(DEBOUNCE * 2).await;
        assert_eq!(store.reads.load(Ordering::SeqCst), reads + 1);
        assert_eq!(
            router.advertised(),
            set(&[b.clone(), Digest::of(b"c").to_string()])
        );

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retries_store_and_router_failures() {
        let store = FakeStore::new(keys(&[b"a"], &[]));
        store.failures.store(2, Ordering::SeqCst);
        let memory = router();
        let router = Arc::new(FlakyRouter {
            inner: memory.clone(),
            failures: AtomicUsize::new(1),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), router, shutdown.clone(), PERIOD));

        // Store fails at 0 s and 1 s, the router at 3 s; the pass at 7 s succeeds.
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        assert!(memory.advertised().is_empty());
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(memory.advertised(), set(&[Digest::of(b"a").to_string()]));
        assert!(!task.is_finished(), "errors never end the loop");

        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_pass_without_change_events() {
        let store = FakeStore::new(keys(&[b"a"], &[]));
        let memory = router();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            store.clone(),
            Arc::new(memory.clone()),
            shutdown.clone(),
            PERIOD,
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;

        // Change the listing without bumping the counter: only the periodic pass sees it.
        *store.keys.lock().unwrap() = keys(&[b"z"], &[]);
        tokio::time::sleep(PERIOD / 2).await;
        assert_eq!(memory.advertised(), set(&[Digest::of(b"a").to_string()]));
        tokio::time::sleep(PERIOD).await;
        assert_eq!(memory.advertised(), set(&[Digest::of(b"z").to_string()]));

        shutdown.cancel();
        task.await.unwrap();
    }
}
