//! What the status page shows, gathered from the running subsystems: readiness and why not,
//! interception, the node CA and whether containerd trusts it, peers, advertised keys and the
//! last objects served. `Status` is also `/status.json`'s schema, read back by `spegel status`.
use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    intercept::InterceptStats,
    metrics::recent::{RecentServed, ServedRecord},
    p2p::P2pRouter,
    serve::api::Readiness,
    tls::continuity::CaSet,
};

/// How long gathering one part of the status may take.
const PART_TIMEOUT: Duration = Duration::from_secs(2);

/// The running subsystems the status is read from; `None` where a subsystem is off.
#[derive(Default)]
pub struct AdminState {
    pub readiness: Option<Arc<dyn Readiness>>,
    /// `None`: `--intercept=false`.
    pub intercept: Option<Arc<InterceptStats>>,
    pub cas: Option<Arc<CaSet>>,
    pub router: Option<P2pRouter>,
    pub recent: Option<Arc<RecentServed>>,
}

/// The node's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Whether this node serves pulls as configured.
    pub ready: bool,
    /// Why not, when not.
    pub reasons: Vec<String>,
    /// Worth knowing, but the node still serves (no peers yet).
    pub warnings: Vec<String>,
    /// This node's libp2p peer id.
    pub peer_id: Option<String>,
    pub interception: Interception,
    /// `None` when interception is off (no node CA in use).
    pub ca: Option<CaStatus>,
    /// Connected peers.
    pub peers: Vec<PeerEntry>,
    /// Peers in the routing table.
    pub routing_table_size: usize,
    /// Keys (digests, image names) this node advertises.
    pub advertised_keys: usize,
    /// The last objects served, newest first.
    pub recent: Vec<ServedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interception {
    pub enabled: bool,
    pub attached: bool,
    /// The cgroup the redirect is attached to.
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// SHA-256 fingerprint of the CA containerd trusts (the one serving).
    pub trusted_fingerprint: Option<String>,
    /// A CA waiting until containerd trusts it (first install, or renewal).
    pub next_fingerprint: Option<String>,
    /// Whether containerd trusts the CA leaves are minted from.
    pub containerd_trusts: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub id: String,
    /// Remote addresses of its libp2p connections.
    pub addresses: Vec<String>,
    /// Its registry API, if learned.
    pub registry: Option<String>,
}

impl AdminState {
    /// Reads the status now.
    pub async fn status(&self) -> Status {
        let mut reasons = Vec::new();
        let mut warnings = Vec::new();
        if let Some(readiness) = &self.readiness {
            match tokio::time::timeout(PART_TIMEOUT, readiness.check()).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => reasons.push(format!("containerd's store: {reason}")),
                Err(_) => reasons.push("containerd's store: the check timed out".to_owned()),
            }
        }
        let interception = match &self.intercept {
            None => Interception {
                enabled: false,
                attached: false,
                cgroup: None,
            },
            Some(stats) => {
                let cgroup = stats.attached_cgroup();
                if cgroup.is_none() {
                    reasons.push(
                        "interception is not attached to containerd's cgroup: containerd pulls \
                         directly (see the daemon's log)"
                            .to_owned(),
                    );
                }
                Interception {
                    enabled: true,
                    attached: cgroup.is_some(),
                    cgroup: cgroup.map(|path| path.display().to_string()),
                }
            }
        };
        let ca = match (&self.intercept, &self.cas) {
            (Some(_), Some(cas)) => {
                let trusted = cas.trusted().map(|ca| ca.fingerprint());
                let next = cas.next().map(|ca| ca.fingerprint());
                if trusted.is_none() {
                    reasons.push(
                        "containerd does not trust the node CA yet: run `spegel node-setup` \
                         (or `spegel install-ca` and restart containerd)"
                            .to_owned(),
                    );
                } else if next.is_some() {
                    warnings.push(
                        "a next node CA waits until containerd trusts it: run `spegel \
                         node-setup`"
                            .to_owned(),
                    );
                }
                Some(CaStatus {
                    containerd_trusts: trusted.is_some(),
                    trusted_fingerprint: trusted,
                    next_fingerprint: next,
                })
            }
            (Some(_), None) => {
                reasons.push("the node CA is not loaded yet".to_owned());
                None
            }
            (None, _) => None,
        };
        let (peer_id, peers, routing_table_size, advertised_keys) = match &self.router {
            None => (None, Vec::new(), 0, 0),
            Some(router) => {
                let peers = match tokio::time::timeout(PART_TIMEOUT, router.peers()).await {
                    Ok(Ok(peers)) => peers
                        .into_iter()
                        .map(|peer| PeerEntry {
                            id: peer.id.to_string(),
                            addresses: peer.addresses.iter().map(ToString::to_string).collect(),
                            registry: peer.registry.map(|addr| addr.to_string()),
                        })
                        .collect(),
                    _ => {
                        warnings.push("the router did not list its peers in time".to_owned());
                        Vec::new()
                    }
                };
                (
                    Some(router.peer_id().to_string()),
                    peers,
                    router.routing_table_size(),
                    router.advertised_keys(),
                )
            }
        };
        if self.router.is_some() && peers.is_empty() {
            warnings.push(
                "no peers connected: this node serves only what it has (check \
                 --bootstrap-peers/--bootstrap-dns and the cluster secret)"
                    .to_owned(),
            );
        }
        Status {
            ready: reasons.is_empty(),
            reasons,
            warnings,
            peer_id,
            interception,
            ca,
            peers,
            routing_table_size,
            advertised_keys,
            recent: self
                .recent
                .as_ref()
                .map(|recent| recent.newest_first())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    struct NotReady;

    #[async_trait::async_trait]
    impl Readiness for NotReady {
        async fn check(&self) -> Result<(), String> {
            Err("containerd is not answering".to_owned())
        }
    }

    #[tokio::test]
    async fn says_why_it_is_not_ready() {
        let intercept = Arc::new(InterceptStats::default());
        let state = AdminState {
            readiness: Some(Arc::new(NotReady)),
            intercept: Some(Arc::clone(&intercept)),
            ..AdminState::default()
        };
        let status = state.status().await;
        assert!(!status.ready);
        assert_eq!(status.reasons.len(), 3, "{:?}", status.reasons);
        assert!(status.reasons[0].contains("containerd is not answering"));
        assert!(status.reasons[1].contains("not attached"));
        assert!(status.reasons[2].contains("node CA"));
        assert!(status.interception.enabled && !status.interception.attached);

        intercept.set_attached(Some(std::path::Path::new("/sys/fs/cgroup/system.slice/c")));
        assert!(intercept.attached.load(Ordering::Relaxed));
        let status = AdminState {
            intercept: Some(intercept),
            ..AdminState::default()
        }
        .status()
        .await;
        assert_eq!(
            status.interception.cgroup.as_deref(),
            Some("/sys/fs/cgroup/system.slice/c")
        );
    }

    #[tokio::test]
    async fn mirror_mode_without_subsystems_is_ready() {
        let status = AdminState::default().status().await;
        assert!(status.ready, "{:?}", status.reasons);
        assert!(status.ca.is_none() && !status.interception.enabled);
        // The JSON round-trips (what `spegel status` reads).
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }
}
