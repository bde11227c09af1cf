//! CA continuity: the CA containerd trusts never changes behind the operator's back.
//!
//! `<data-dir>/ca/` keeps the **current** CA (`ca.key`, `ca.crt`: the one `install-ca` installed,
//! presumed trusted by containerd) and, when it is not enough, a **next** CA (`next.key`,
//! `next.crt`) minted *beside* it; `bundle.crt` holds both certificates, and is what
//! `install-ca` installs. The current CA is not enough when it does not cover every mirrored
//! registry (the list changed), expires within `--ca-renew-before`, is missing (first start) or
//! unreadable: then a loud warning is logged and counted ([`CaStats`]), and the next CA waits for
//! containerd to trust it. Meanwhile the current CA still terminates the registries it covers,
//! and connections to the others are spliced through untouched ([`CaSet::covers`]): a pull never
//! fails because of spegel. Once containerd trusts the next CA (see `trust.rs`), it is promoted:
//! the old files become `previous.*` and the next CA is used for every mirrored registry.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use time::OffsetDateTime;

use super::{
    ca::{CaError, NodeCa, Unusable, ensure_private_dir, write_file_atomically},
    names::{LeafName, PermittedNames},
    trust::INSTALL_HINT,
};

/// Under `<data-dir>`.
const CA_DIR: &str = "ca";
/// File stems (`<stem>.key`, `<stem>.crt`) inside `<data-dir>/ca/`.
const CURRENT: &str = "ca";
const NEXT: &str = "next";
const PREVIOUS: &str = "previous";
/// Every CA containerd should trust now: the current one (while it is valid) and the next one.
pub const BUNDLE_FILE: &str = "bundle.crt";

/// How CAs are judged and used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaPolicy {
    /// A CA expiring sooner than this gets a successor.
    pub renew_before: Duration,
    /// Validity of minted leaves.
    pub leaf_validity: Duration,
}

/// Whether a CA can go on serving the mirrored registries, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    /// It covers every mirrored registry and is not near expiry.
    Fine,
    /// No CA on disk.
    Missing,
    /// The files are unreadable or inconsistent.
    Unusable(String),
    /// It does not cover these mirrored names.
    Uncovered(Vec<LeafName>),
    /// It expires within the renewal threshold (or has expired).
    Expiring(OffsetDateTime),
}

impl std::fmt::Display for Assessment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Assessment::Fine => f.write_str("covers every mirrored registry"),
            Assessment::Missing => f.write_str("no CA yet"),
            Assessment::Unusable(reason) => write!(f, "unusable: {reason}"),
            Assessment::Uncovered(names) => {
                f.write_str("does not cover ")?;
                for (i, name) in names.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{name}")?;
                }
                Ok(())
            }
            Assessment::Expiring(at) => write!(f, "expires at {at}"),
        }
    }
}

/// Judges `ca` for the mirrored names `wanted` at `now`. A CA that covers more than `wanted`
/// (a registry was removed) is fine: containerd trusts it, and only mirrored names are ever
/// terminated.
pub fn assess(
    ca: &NodeCa,
    wanted: &PermittedNames,
    now: OffsetDateTime,
    renew_before: Duration,
) -> Assessment {
    if ca.not_after() - now < renew_before {
        return Assessment::Expiring(ca.not_after());
    }
    let uncovered = ca.permitted().uncovered(wanted);
    if uncovered.is_empty() {
        Assessment::Fine
    } else {
        Assessment::Uncovered(uncovered)
    }
}

/// CA continuity counters and gauges, exported at `/metrics` as `spegel_ca_*`.
#[derive(Debug, Default)]
pub struct CaStats {
    /// Gauge: mirrored names the CA containerd trusts does not cover (spliced until the next CA
    /// is trusted).
    pub uncovered_registries: AtomicU64,
    /// Gauge: 1 while a next CA waits for containerd to trust it.
    pub next_pending: AtomicU64,
    /// Gauge: when the current CA expires (Unix seconds), 0 without one.
    pub current_not_after: AtomicI64,
    /// Counter: next CAs minted.
    pub minted: AtomicU64,
    /// Counter: next CAs promoted to current.
    pub promoted: AtomicU64,
    /// Counter: connections to mirrored registries spliced because the trusted CA does not
    /// cover them.
    pub spliced_uncovered: AtomicU64,
}

struct State {
    /// The CA containerd trusts (the current one), unless it has expired or there is none.
    trusted: Option<Arc<NodeCa>>,
    /// The successor waiting to be trusted.
    next: Option<Arc<NodeCa>>,
}

/// The node's CAs: what terminates TLS now, and what waits to be trusted.
pub struct CaSet {
    dir: PathBuf,
    wanted: PermittedNames,
    state: RwLock<State>,
    stats: Arc<CaStats>,
}

impl std::fmt::Debug for CaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.read();
        f.debug_struct("CaSet")
            .field("dir", &self.dir)
            .field("trusted", &state.trusted)
            .field("next", &state.next)
            .finish_non_exhaustive()
    }
}

impl CaSet {
    /// Opens `<data_dir>/ca/` for the mirrored names `wanted`: keeps the current CA if it is
    /// [`Assessment::Fine`]; otherwise warns, keeps it for what it still covers, and loads or
    /// mints the next CA beside it. Writes `bundle.crt`. Blocking file IO: call at startup or
    /// from `spawn_blocking`. `install-ca` and the daemon both open it, so both agree.
    pub fn open(
        data_dir: &Path,
        wanted: PermittedNames,
        policy: CaPolicy,
        stats: Arc<CaStats>,
    ) -> Result<Self, CaError> {
        let dir = data_dir.join(CA_DIR);
        ensure_private_dir(&dir)?;
        let now = OffsetDateTime::now_utc();
        let (current, assessment) = match NodeCa::load(&dir, CURRENT, policy.leaf_validity) {
            Ok(ca) => {
                let assessment = assess(&ca, &wanted, now, policy.renew_before);
                (Some(ca), assessment)
            }
            Err(Unusable::Missing) => (None, Assessment::Missing),
            Err(reason) => (None, Assessment::Unusable(reason.to_string())),
        };
        let next = if assessment == Assessment::Fine {
            remove_stale_next(&dir);
            None
        } else {
            Some(Self::next_ca(
                &dir,
                &wanted,
                policy,
                now,
                &assessment,
                &stats,
            )?)
        };
        let trusted = current.filter(|ca| ca.not_after() > now).map(Arc::new);
        let set = Self {
            dir,
            wanted,
            state: RwLock::new(State {
                trusted,
                next: next.map(Arc::new),
            }),
            stats,
        };
        set.write_bundle()?;
        set.update_stats();
        Ok(set)
    }

    /// A set whose only CA is `ca`, trusted (tests and embedders that manage trust themselves).
    pub fn trusting(ca: NodeCa) -> Self {
        let set = Self {
            dir: PathBuf::new(),
            wanted: ca.permitted().clone(),
            state: RwLock::new(State {
                trusted: Some(Arc::new(ca)),
                next: None,
            }),
            stats: Arc::default(),
        };
        set.update_stats();
        set
    }

    /// Loads the next CA if one on disk is fine for `wanted`, else mints one; logs loudly why.
    fn next_ca(
        dir: &Path,
        wanted: &PermittedNames,
        policy: CaPolicy,
        now: OffsetDateTime,
        why: &Assessment,
        stats: &CaStats,
    ) -> Result<NodeCa, CaError> {
        if let Ok(next) = NodeCa::load(dir, NEXT, policy.leaf_validity)
            && assess(&next, wanted, now, policy.renew_before) == Assessment::Fine
        {
            tracing::warn!(
                path = %dir.display(),
                current = %why,
                "the node CA containerd trusts {why}; a next CA is already waiting: \
                 {INSTALL_HINT}. Until then registries it does not cover are passed through \
                 untouched (not served by spegel)"
            );
            return Ok(next);
        }
        let next = NodeCa::mint(dir, NEXT, wanted, policy.leaf_validity)?;
        stats.minted.fetch_add(1, Ordering::Relaxed);
        if *why == Assessment::Missing {
            tracing::info!(
                path = %dir.display(),
                permitted = %wanted,
                "minted the node CA: {INSTALL_HINT}; until then intercepted registry \
                 connections are passed through untouched"
            );
        } else {
            tracing::warn!(
                path = %dir.display(),
                current = %why,
                permitted = %wanted,
                "the node CA containerd trusts {why}: minted a NEXT CA beside it (the current one \
                 is kept): {INSTALL_HINT}. Until then registries it does not cover are passed \
                 through untouched (not served by spegel)"
            );
        }
        Ok(next)
    }

    /// The CA that terminates TLS now, if any.
    pub fn trusted(&self) -> Option<Arc<NodeCa>> {
        self.read().trusted.clone()
    }

    /// The next CA waiting for containerd's trust, if any.
    pub fn next(&self) -> Option<Arc<NodeCa>> {
        self.read().next.clone()
    }

    /// The counters this set keeps.
    pub fn stats(&self) -> Arc<CaStats> {
        Arc::clone(&self.stats)
    }

    /// Whether a TLS connection that asked for `host` (SNI, or the IP it dialled) can be
    /// terminated: the trusted CA vouches for it and has not expired. If not, the connection
    /// must be passed through untouched.
    pub fn covers(&self, host: &str) -> bool {
        let Ok(name) = LeafName::parse(host) else {
            return false;
        };
        self.read().trusted.as_ref().is_some_and(|ca| {
            ca.permitted().permits(&name) && ca.not_after() > OffsetDateTime::now_utc()
        })
    }

    /// The PEM of every CA containerd should trust now: the current one (while valid), then the
    /// next one.
    pub fn bundle_pem(&self) -> String {
        let state = self.read();
        let mut pem = String::new();
        for ca in state.trusted.iter().chain(state.next.iter()) {
            pem.push_str(ca.cert_pem());
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
        }
        pem
    }

    /// The fingerprints of the CAs in [`Self::bundle_pem`].
    pub fn bundle_fingerprints(&self) -> Vec<String> {
        let state = self.read();
        state
            .trusted
            .iter()
            .chain(state.next.iter())
            .map(|ca| ca.fingerprint())
            .collect()
    }

    /// `<data-dir>/ca/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the next CA current (containerd trusts it now): `ca.*` become `previous.*`, `next.*`
    /// become `ca.*`, the bundle is rewritten. Returns false if there was no next CA. Blocking.
    pub fn promote(&self) -> Result<bool, CaError> {
        let Some(next) = self.next() else {
            return Ok(false);
        };
        for ext in ["key", "crt"] {
            let current = self.dir.join(format!("{CURRENT}.{ext}"));
            let previous = self.dir.join(format!("{PREVIOUS}.{ext}"));
            match fs::rename(&current, &previous) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CaError::Io {
                        context: format!("cannot keep {} as previous", current.display()),
                        source,
                    });
                }
            }
        }
        for ext in ["key", "crt"] {
            let from = self.dir.join(format!("{NEXT}.{ext}"));
            let to = self.dir.join(format!("{CURRENT}.{ext}"));
            fs::rename(&from, &to).map_err(|source| CaError::Io {
                context: format!("cannot promote {}", from.display()),
                source,
            })?;
        }
        {
            let mut state = self.write();
            state.trusted = Some(next);
            state.next = None;
        }
        self.stats.promoted.fetch_add(1, Ordering::Relaxed);
        self.write_bundle()?;
        self.update_stats();
        tracing::warn!(
            path = %self.dir.display(),
            permitted = %self.wanted,
            "containerd trusts the next node CA: promoted it to current; every mirrored registry \
             is served by spegel again"
        );
        Ok(true)
    }

    fn write_bundle(&self) -> Result<(), CaError> {
        if self.dir.as_os_str().is_empty() {
            return Ok(());
        }
        write_file_atomically(
            &self.dir.join(BUNDLE_FILE),
            self.bundle_pem().as_bytes(),
            0o644,
        )
    }

    fn update_stats(&self) {
        let state = self.read();
        let uncovered = match &state.trusted {
            Some(ca) => ca.permitted().uncovered(&self.wanted).len(),
            None => self.wanted.len(),
        };
        self.stats
            .uncovered_registries
            .store(uncovered as u64, Ordering::Relaxed);
        self.stats
            .next_pending
            .store(u64::from(state.next.is_some()), Ordering::Relaxed);
        self.stats.current_not_after.store(
            state
                .trusted
                .as_ref()
                .map_or(0, |ca| ca.not_after().unix_timestamp()),
            Ordering::Relaxed,
        );
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // The state is two `Option<Arc>`s, replaced whole: nothing a panic could half-update.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A next CA left from an earlier configuration that the current CA covers again is removed.
fn remove_stale_next(dir: &Path) {
    for ext in ["key", "crt"] {
        let path = dir.join(format!("{NEXT}.{ext}"));
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "the current node CA covers every mirrored registry again; removed the next CA")
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot remove the stale next CA")
            }
        }
    }
}

#[cfg(test)]
#[path = "continuity/tests.rs"]
mod tests;
