//! One hedged race over the peers a lookup finds: the first attempt starts as soon as the first
//! peer is known, more start when the running ones are slower than the p90 estimate or fail, and
//! the first good answer wins (the others are dropped, which cancels them).
use std::{collections::HashSet, future::Future};

use futures::{StreamExt, stream::FuturesUnordered};
use http::Method;
use tokio::{
    sync::mpsc::error::TryRecvError,
    time::{Instant, sleep_until, timeout_at},
};

use super::{AttemptError, Inner, Target, attempt::PeerResponse, bump};
use crate::{
    oci::ByteRange,
    routing::{Peer, RouterError},
    source::{ObjectRequest, miss::PeerMiss},
};

/// Why a race produced nothing.
#[derive(Debug, thiserror::Error)]
pub(super) enum RaceError {
    /// No peer had it in time: a miss.
    #[error("no peer served it ({reason}, {attempts} attempts)")]
    Miss {
        reason: &'static str,
        attempts: usize,
        /// The same, for the serve policy's count of why requests went upstream.
        kind: PeerMiss,
    },
    /// The router could not look the key up.
    #[error("peer lookup failed: {0}")]
    Router(#[from] RouterError),
}

impl Inner {
    /// Race the peers holding `target`: send each a `method` request (with `range`), and let
    /// `accept` turn its answer into the result or reject it.
    pub(super) async fn ask<T, F, Fut>(
        &self,
        request: &ObjectRequest,
        target: &Target,
        method: Method,
        range: Option<ByteRange>,
        accept: F,
    ) -> Result<(Peer, T), RaceError>
    where
        F: Fn(PeerResponse) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let no_exclusions = HashSet::new();
        let (method, accept) = (&method, &accept);
        self.race(&target.key, &no_exclusions, |peer| async move {
            let response = self
                .send(&peer, method.clone(), request, &target.reference, range)
                .await?;
            accept(response).await
        })
        .await
    }

    /// Look `key` up and run `attempt` against the peers found (never those in `exclude`, nor
    /// banned ones) until one succeeds.
    ///
    /// Every wait is bounded: with nothing in flight, a new peer must turn up within the resolve
    /// timeout; with attempts in flight, one must answer within max(2×p90, floor) of the first
    /// of them starting.
    pub(super) async fn race<T, F, Fut>(
        &self,
        key: &str,
        exclude: &HashSet<String>,
        mut attempt: F,
    ) -> Result<(Peer, T), RaceError>
    where
        F: FnMut(Peer) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let config = &self.config;
        let started = Instant::now();
        if !self.router.has_peers() {
            return Err(RaceError::Miss {
                reason: "this node knows no peers",
                attempts: 0,
                kind: PeerMiss::NoPeers,
            });
        }
        let lookup = self.router.lookup(key, config.lookup_count);
        let mut found = match timeout_at(started + config.resolve_timeout, lookup).await {
            Ok(found) => found?,
            Err(_) => {
                return Err(RaceError::Miss {
                    reason: "lookup did not start in time",
                    attempts: 0,
                    kind: PeerMiss::LookupTimeout,
                });
            }
        };
        let mut lookup_open = true;
        let mut queue: Vec<Peer> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut inflight = FuturesUnordered::new();
        let mut attempts = 0usize;
        // When the in-flight set last became empty (the race starts idle).
        let mut idle_since = started;
        // Set when an attempt starts with nothing else in flight.
        let mut race_deadline = started;
        // When another attempt may start alongside those in flight.
        let mut next_hedge = started;
        let mut last_failure = "no peer found";

        loop {
            let now = Instant::now();
            let may_start = attempts < config.max_attempts
                && !queue.is_empty()
                && (inflight.is_empty() || next_hedge <= now);
            if may_start {
                // Every peer the lookup has named by now is a candidate, not only the first:
                // the pick prefers one whose connection is still pooled.
                while lookup_open {
                    match found.try_recv() {
                        Ok(peer) => {
                            if seen.insert(peer.id.clone()) {
                                queue.push(peer);
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => lookup_open = false,
                    }
                }
                let (picked, banned) = self.peers.pick(
                    &mut queue,
                    |p| p.id.as_str(),
                    |id| exclude.contains(id),
                    now,
                );
                bump(&self.metrics.banned_skipped, banned as u64);
                if let Some(peer) = picked {
                    let p90 = self.latency.p90();
                    if inflight.is_empty() {
                        race_deadline = now + (2 * p90).max(config.race_timeout_floor);
                    } else {
                        bump(&self.metrics.hedges, 1);
                        tracing::debug!(%key, peer = %peer.id, ?p90, "hedging to another peer");
                    }
                    next_hedge = now + p90;
                    attempts += 1;
                    bump(&self.metrics.attempts, 1);
                    let fut = attempt(peer.clone());
                    inflight.push(async move { (peer, fut.await) });
                }
                continue;
            }
            if inflight.is_empty()
                && queue.is_empty()
                && (!lookup_open || attempts >= config.max_attempts)
            {
                return Err(RaceError::Miss {
                    reason: last_failure,
                    attempts,
                    kind: match attempts {
                        0 => PeerMiss::NoProviders,
                        _ => PeerMiss::PeersFailed,
                    },
                });
            }
            if inflight.is_empty() && attempts >= config.max_attempts {
                return Err(RaceError::Miss {
                    reason: "attempt budget spent",
                    attempts,
                    kind: PeerMiss::PeersFailed,
                });
            }
            let (deadline, why, kind) = if inflight.is_empty() {
                (
                    idle_since + config.resolve_timeout,
                    "no peer found in time with nothing in flight",
                    match attempts {
                        0 => PeerMiss::LookupTimeout,
                        _ => PeerMiss::PeersFailed,
                    },
                )
            } else {
                (
                    race_deadline,
                    "peers did not answer in time",
                    PeerMiss::PeersTimeout,
                )
            };
            let hedge_armed =
                !inflight.is_empty() && !queue.is_empty() && attempts < config.max_attempts;
            tokio::select! {
                biased;
                Some((peer, result)) = inflight.next(), if !inflight.is_empty() => match result {
                    Ok(value) => return Ok((peer, value)),
                    Err(err) => {
                        last_failure = err.summary();
                        self.note_failure(&peer, &err);
                        // A failure frees its slot at once instead of waiting for the hedge timer.
                        next_hedge = Instant::now();
                        if inflight.is_empty() {
                            idle_since = next_hedge;
                        }
                    }
                },
                peer = found.recv(), if lookup_open => match peer {
                    Some(peer) => {
                        if seen.insert(peer.id.clone()) {
                            queue.push(peer);
                        }
                    }
                    None => lookup_open = false,
                },
                () = sleep_until(next_hedge), if hedge_armed => {}
                () = sleep_until(deadline) => {
                    return Err(RaceError::Miss {
                        reason: why,
                        attempts,
                        kind,
                    });
                }
            }
        }
    }
}
