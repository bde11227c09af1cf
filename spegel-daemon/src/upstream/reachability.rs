//! Whether a registry named by `?ns=` can be reached at all, for mirror mode: tags are answered
//! from peers only when it cannot (their answer is only as good as the peer that gives it).
//!
//! A TCP connect to the registry's server (`docker.io` is served by `registry-1.docker.io`; the
//! port is the one named, else 443) within a timeout, remembered per registry for a short while
//! so a burst of tag requests costs one probe. A refused, unresolvable or silent server is
//! unreachable; anything that accepts a connection is reachable, and containerd, which goes to
//! it next, gets its real answer.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::oci::{Host, Registry};

/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe's result is reused.
const PROBE_TTL: Duration = Duration::from_secs(5);
/// Registries remembered at most (a client names them; bound the table).
const MAX_ENTRIES: usize = 256;

/// Probes registries' reachability, caching the results briefly.
#[derive(Debug, Default)]
pub struct Reachability {
    seen: Mutex<HashMap<String, (Instant, bool)>>,
    /// Tests: every registry is (or is not) reachable, without probing.
    fixed: Option<bool>,
}

/// `host:port` of the server behind `registry` (as `?ns=` names it); `None` if it is not a
/// registry name.
fn server(registry: &str) -> Option<(String, u16)> {
    let parsed: Registry = registry.parse().ok()?;
    let port = parsed.port().unwrap_or(443);
    let host = match parsed.host() {
        Host::Name(name) if name == "docker.io" => "registry-1.docker.io".to_owned(),
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    Some((host, port))
}

impl Reachability {
    /// Whether `registry` accepts a connection (cached for a few seconds).
    pub async fn reachable(&self, registry: &str) -> bool {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        let now = Instant::now();
        if let Some((at, reachable)) = self.lock().get(registry).copied()
            && now.duration_since(at) < PROBE_TTL
        {
            return reachable;
        }
        let reachable = match server(registry) {
            None => false,
            Some((host, port)) => matches!(
                tokio::time::timeout(
                    PROBE_TIMEOUT,
                    tokio::net::TcpStream::connect((host.as_str(), port))
                )
                .await,
                Ok(Ok(_))
            ),
        };
        let mut seen = self.lock();
        if seen.len() >= MAX_ENTRIES {
            seen.retain(|_, (at, _)| now.duration_since(*at) < PROBE_TTL);
            if seen.len() >= MAX_ENTRIES {
                seen.clear();
            }
        }
        seen.insert(registry.to_owned(), (now, reachable));
        reachable
    }

    /// Says `reachable` for every registry without probing (tests).
    #[cfg(test)]
    pub(crate) fn fixed(reachable: bool) -> Self {
        Self {
            fixed: Some(reachable),
            ..Self::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, bool)>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_behind_registry_names() {
        assert_eq!(
            server("docker.io"),
            Some(("registry-1.docker.io".into(), 443))
        );
        assert_eq!(server("ghcr.io"), Some(("ghcr.io".into(), 443)));
        assert_eq!(server("r.test:5000"), Some(("r.test".into(), 5000)));
        assert_eq!(server("10.0.0.1:5000"), Some(("10.0.0.1".into(), 5000)));
        assert_eq!(server("[fd00::1]:5000"), Some(("fd00::1".into(), 5000)));
        assert_eq!(server("not a registry"), None);
    }

    #[tokio::test]
    async fn a_listening_server_is_reachable_and_a_closed_port_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let probe = Reachability::default();
        assert!(probe.reachable(&open.to_string()).await);
        assert!(!probe.reachable(&closed.to_string()).await);
        // Remembered: the listener going away is seen only after the TTL.
        drop(listener);
        assert!(probe.reachable(&open.to_string()).await);
    }
}
