//! The listener's connection counters and the redirect's health (read by the metrics endpoint).
use std::sync::atomic::{AtomicBool, AtomicU64};

/// Counters of the listener, and whether the redirect is in place.
#[derive(Debug, Default)]
pub struct InterceptStats {
    /// Connections accepted (the listener's own health probes are not counted).
    pub accepted: AtomicU64,
    /// Accepted connections with no recorded original destination (closed at once).
    pub no_origin: AtomicU64,
    /// Connections passed through to their original destination.
    pub spliced: AtomicU64,
    /// Destinations learned to carry no mirrored registry, whose connects then go direct for
    /// `--intercept-bypass-ttl` (a renewal counts again).
    pub bypass_learned: AtomicU64,
    /// Connections handed to the mirrored-registry handler.
    pub mirrored: AtomicU64,
    /// Passed-through connections closed because the client read nothing for the write timeout.
    pub write_timeouts: AtomicU64,
    /// Health probes of the listener that were not accepted in time.
    pub probe_failures: AtomicU64,
    /// Times the listener was found wedged and the eBPF programs were detached.
    pub wedges: AtomicU64,
    /// Whether the eBPF programs are attached to containerd's cgroup right now.
    pub attached: AtomicBool,
    /// The cgroup they are attached to (for the status page).
    pub attached_cgroup: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl InterceptStats {
    /// Records where the programs are attached (`None`: nowhere).
    pub fn set_attached(&self, cgroup: Option<&std::path::Path>) {
        self.attached
            .store(cgroup.is_some(), std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut attached) = self.attached_cgroup.lock() {
            *attached = cgroup.map(std::path::Path::to_owned);
        }
    }

    /// The cgroup the programs are attached to, if they are.
    pub fn attached_cgroup(&self) -> Option<std::path::PathBuf> {
        self.attached_cgroup.lock().ok().and_then(|c| c.clone())
    }
}
