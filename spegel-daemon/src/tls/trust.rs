//! When containerd trusts the next CA, so it can be promoted (`continuity.rs`).
//!
//! Go, and so containerd, reads its trust roots once per process. containerd therefore trusts
//! the next CA once (1) `spegel install-ca` installed a bundle holding it — it records what it
//! installed in `<data-dir>/ca/installed.json` (the CA fingerprints, the boot ID and the time
//! since boot) — and (2) containerd's process started after that record. The daemon finds
//! containerd's process in containerd's cgroup (the one the eBPF programs attach to; a process
//! named `containerd`, else the oldest one there) and compares its start time (`/proc/<pid>/stat`,
//! on the boot clock like `/proc/uptime`) with the record. It checks at start and then every
//! `--cgroup-poll-interval`, and promotes the next CA when both hold.
//!
//! On the same schedule it keeps containerd's scoped trust bundle in step (`scoped.rs`): a
//! rewrite that adds the next CA is itself recorded as an install.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    ca::{CaError, write_file_atomically},
    continuity::CaSet,
    scoped::{self, Synced},
};
use crate::intercept::cgroup::{CgroupFinder, Locator};

/// What an operator runs so that containerd trusts the node CA, for every message that asks.
pub const INSTALL_HINT: &str = "run `spegel node-setup` (it installs the CA and restarts \
    containerd once), or `spegel install-ca` and restart containerd";

/// The record `install-ca` leaves in `<data-dir>/ca/`.
const RECORD_FILE: &str = "installed.json";

/// A moment on this machine's boot clock (`CLOCK_BOOTTIME`, what `/proc/uptime` and process
/// start times are measured on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootInstant {
    /// `/proc/sys/kernel/random/boot_id`: a new boot restarts the clock.
    pub boot_id: String,
    /// Seconds since boot (10 ms resolution).
    pub since_boot_secs: f64,
}

/// What `install-ca` installed, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstallRecord {
    /// SHA-256 fingerprints of the CA certificates installed.
    pub fingerprints: Vec<String>,
    pub at: BootInstant,
}

/// Whether a containerd that started at `started` trusts the CA with `fingerprint`, given what
/// `install-ca` last `recorded`. A process started in the same 10 ms tick as the record does not
/// count (it may have read the old bundle); after a reboot every process started after it.
pub fn trusts(recorded: &InstallRecord, fingerprint: &str, started: &BootInstant) -> bool {
    recorded.fingerprints.iter().any(|f| f == fingerprint)
        && (recorded.at.boot_id != started.boot_id
            || started.since_boot_secs > recorded.at.since_boot_secs)
}

/// Records that the CAs with `fingerprints` were installed now. A record already naming
/// exactly these CAs is kept with its time: re-running `install-ca` changes nothing containerd
/// reads, so it must not ask for yet another restart. Blocking.
pub fn record_install(ca_dir: &Path, fingerprints: Vec<String>) -> Result<(), CaError> {
    if read_record(ca_dir).is_some_and(|old| old.fingerprints == fingerprints) {
        return Ok(());
    }
    let at = boot_now().map_err(|source| CaError::Io {
        context: "cannot read the boot clock (/proc/uptime, boot_id)".to_owned(),
        source,
    })?;
    let record = InstallRecord { fingerprints, at };
    let json = serde_json::to_vec_pretty(&record).map_err(|err| CaError::Io {
        context: "cannot encode the install record".to_owned(),
        source: io::Error::other(err),
    })?;
    write_file_atomically(&ca_dir.join(RECORD_FILE), &json, 0o644)
}

/// The last install record, if there is a readable one.
pub fn read_record(ca_dir: &Path) -> Option<InstallRecord> {
    let bytes = fs::read(ca_dir.join(RECORD_FILE)).ok()?;
    parse_record(&bytes)
}

/// An install record from the bytes of `installed.json`; `None` if they are not one.
pub fn parse_record(bytes: &[u8]) -> Option<InstallRecord> {
    serde_json::from_slice(bytes).ok()
}

/// Now, on the boot clock.
fn boot_now() -> io::Result<BootInstant> {
    let uptime = fs::read_to_string("/proc/uptime")?;
    let since_boot_secs = uptime
        .split_whitespace()
        .next()
        .and_then(|secs| secs.parse::<f64>().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/uptime: {uptime:?}")))?;
    Ok(BootInstant {
        boot_id: boot_id()?,
        since_boot_secs,
    })
}

fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value; no pointers are involved.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The start time (seconds since boot) in a `/proc/<pid>/stat` line: field 22, counted after
/// the parenthesised command name (which may itself hold spaces and parentheses).
pub(crate) fn start_time_in_stat(stat: &str, ticks: f64) -> Option<f64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    let start: u64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    Some(start as f64 / ticks)
}

/// When containerd's process in `cgroup_dir` started: the earliest process named `containerd`
/// there, else the earliest process at all (shims outlive containerd restarts and are named
/// otherwise). `None` if the cgroup holds no process.
fn containerd_start(cgroup_dir: &Path) -> io::Result<Option<BootInstant>> {
    let procs = fs::read_to_string(cgroup_dir.join("cgroup.procs"))?;
    let ticks = clock_ticks();
    let mut named: Option<f64> = None;
    let mut any: Option<f64> = None;
    for pid in procs
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
    {
        // A process that exits meanwhile is skipped.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(start) = start_time_in_stat(&stat, ticks) else {
            continue;
        };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() == "containerd" {
            named = Some(named.map_or(start, |s| s.min(start)));
        }
        any = Some(any.map_or(start, |s| s.min(start)));
    }
    match named.or(any) {
        Some(since_boot_secs) => Ok(Some(BootInstant {
            boot_id: boot_id()?,
            since_boot_secs,
        })),
        None => Ok(None),
    }
}

/// Watches for containerd trusting the next CA, and promotes it.
pub struct TrustWatch {
    cas: Arc<CaSet>,
    locator: Locator,
    mount: Option<PathBuf>,
    finder: Option<CgroupFinder>,
    /// The last reason not to promote, logged once per change.
    last_note: Option<String>,
    /// The last failure to keep containerd's trust bundle in step, logged once per change.
    last_bundle_error: Option<String>,
}

impl std::fmt::Debug for TrustWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustWatch")
            .field("locator", &self.locator)
            .finish_non_exhaustive()
    }
}

impl TrustWatch {
    /// Finds containerd like the interception does (`locator`, cgroup2 `mount`).
    pub fn new(cas: Arc<CaSet>, locator: Locator, mount: Option<PathBuf>) -> Self {
        Self {
            cas,
            locator,
            mount,
            finder: None,
            last_note: None,
            last_bundle_error: None,
        }
    }

    /// Keeps containerd's trust bundle in step, then promotes the next CA if containerd trusts
    /// it (and brings the bundle in step with the promotion). Returns whether it promoted.
    /// Blocking file IO.
    pub fn poll(&mut self) -> bool {
        self.keep_bundle();
        let promoted = self.check();
        if promoted {
            self.keep_bundle();
        }
        promoted
    }

    /// Rewrites the bundle `install-ca` set up for containerd when the system roots or the CAs
    /// changed (`scoped::sync`).
    fn keep_bundle(&mut self) {
        match scoped::sync(&self.cas) {
            Ok(synced) => {
                if synced == Synced::Rewritten {
                    tracing::info!(
                        fingerprints = ?self.cas.bundle_fingerprints(),
                        "rewrote containerd's trust bundle (system roots plus the node CA bundle); \
                         containerd loads it when it next restarts"
                    );
                }
                self.last_bundle_error = None;
            }
            Err(error) => {
                let error = error.to_string();
                if self.last_bundle_error.as_ref() != Some(&error) {
                    tracing::warn!(%error, "cannot keep containerd's trust bundle in step");
                    self.last_bundle_error = Some(error);
                }
            }
        }
    }

    /// Checks once and promotes the next CA if containerd trusts it. Returns whether it did.
    /// Blocking file IO.
    pub fn check(&mut self) -> bool {
        let Some(next) = self.cas.next() else {
            return false;
        };
        let fingerprint = next.fingerprint();
        let verdict = self.containerd_trusts(&fingerprint);
        match verdict {
            Ok(()) => match self.cas.promote() {
                Ok(promoted) => {
                    self.last_note = None;
                    promoted
                }
                Err(error) => {
                    self.note(format!("cannot promote the next CA: {error}"), true);
                    false
                }
            },
            Err((note, loud)) => {
                self.note(note, loud);
                false
            }
        }
    }

    /// Ok if containerd trusts the CA with `fingerprint`; else why not (and whether that is
    /// worth a warning rather than the expected wait).
    fn containerd_trusts(&mut self, fingerprint: &str) -> Result<(), (String, bool)> {
        let Some(record) = read_record(self.cas.dir()) else {
            return Err((
                format!("the next node CA is not installed yet: {INSTALL_HINT}"),
                false,
            ));
        };
        if !record.fingerprints.iter().any(|f| f == fingerprint) {
            return Err((
                format!(
                    "the next node CA is not installed yet (the last install, by `spegel \
                     node-setup` or `spegel install-ca`, was of other CAs; it must run with the \
                     daemon's --mirrored-registries): {INSTALL_HINT}"
                ),
                false,
            ));
        }
        if self.finder.is_none() {
            match CgroupFinder::new(self.locator.clone(), self.mount.clone()) {
                Ok(finder) => self.finder = Some(finder),
                Err(error) => return Err((format!("cannot find containerd: {error}"), true)),
            }
        }
        let Some(finder) = self.finder.as_mut() else {
            return Err(("cannot find containerd".to_owned(), true));
        };
        let cgroup = finder
            .find()
            .map_err(|error| (format!("cannot find containerd: {error}"), false))?;
        let started = containerd_start(&cgroup.path)
            .map_err(|error| {
                (
                    format!(
                        "cannot read containerd's processes in {}: {error}",
                        cgroup.path.display()
                    ),
                    true,
                )
            })?
            .ok_or_else(|| ("containerd is not running".to_owned(), false))?;
        if trusts(&record, fingerprint, &started) {
            Ok(())
        } else {
            Err((
                "the next node CA is installed, but containerd has not restarted since: restart \
                 containerd to trust it"
                    .to_owned(),
                false,
            ))
        }
    }

    fn note(&mut self, note: String, loud: bool) {
        if self.last_note.as_ref() == Some(&note) {
            return;
        }
        if loud {
            tracing::warn!("{note}");
        } else {
            tracing::info!("{note}");
        }
        self.last_note = Some(note);
    }

    /// Polls every `interval` until `stop`.
    pub async fn run(mut self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self = match tokio::task::spawn_blocking(move || {
                self.poll();
                self
            })
            .await
            {
                Ok(this) => this,
                Err(error) => {
                    tracing::warn!(%error, "the CA trust check panicked; no longer checking");
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(boot_id: &str, secs: f64) -> BootInstant {
        BootInstant {
            boot_id: boot_id.to_owned(),
            since_boot_secs: secs,
        }
    }

    #[test]
    fn trusted_only_when_installed_and_restarted_after() {
        let record = InstallRecord {
            fingerprints: vec!["old".into(), "next".into()],
            at: at("boot-1", 100.0),
        };
        // Installed, and containerd started after: trusted.
        assert!(trusts(&record, "next", &at("boot-1", 100.5)));
        // Started before, or in the same tick: not yet.
        assert!(!trusts(&record, "next", &at("boot-1", 99.0)));
        assert!(!trusts(&record, "next", &at("boot-1", 100.0)));
        // A reboot since the record: every process is newer.
        assert!(trusts(&record, "next", &at("boot-2", 3.0)));
        // A CA the record does not name is never trusted.
        assert!(!trusts(&record, "other", &at("boot-1", 500.0)));
        assert!(!trusts(&record, "other", &at("boot-2", 500.0)));
    }

    #[test]
    fn parses_start_times() {
        // The command name may hold spaces and parentheses.
        let stat = "4242 (contai) nerd) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 \
                    0 123456 1000000 500";
        assert_eq!(start_time_in_stat(stat, 100.0), Some(1234.56));
        assert_eq!(start_time_in_stat("4242 (x) S 1 2", 100.0), None);
        assert_eq!(start_time_in_stat("garbage", 100.0), None);
        // Our own process: started after boot, before now.
        let own = fs::read_to_string("/proc/self/stat").unwrap();
        let start = start_time_in_stat(&own, clock_ticks()).unwrap();
        assert!(start > 0.0 && start <= boot_now().unwrap().since_boot_secs + 0.01);
    }

    #[test]
    fn records_are_kept_while_the_same_cas_are_installed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_record(dir.path()), None);
        record_install(dir.path(), vec!["a".into()]).unwrap();
        let first = read_record(dir.path()).unwrap();
        assert_eq!(first.fingerprints, ["a"]);
        assert_eq!(first.at.boot_id, boot_id().unwrap());
        std::thread::sleep(Duration::from_millis(30));
        record_install(dir.path(), vec!["a".into()]).unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), first);
        record_install(dir.path(), vec!["a".into(), "b".into()]).unwrap();
        let second = read_record(dir.path()).unwrap();
        assert_eq!(second.fingerprints, ["a", "b"]);
        assert!(second.at.since_boot_secs > first.at.since_boot_secs);
        // A corrupt record reads as none.
        fs::write(dir.path().join(RECORD_FILE), "{").unwrap();
        assert_eq!(read_record(dir.path()), None);
    }
}
