//! spegel's end-to-end support: a multi-node rig of real containerd daemons and a real registry.
//!
//! # Layout
//!
//! - [`rig`]: [`rig::Rig`] brings up N "nodes" (a network namespace, a bridge port and an own
//!   containerd 1.6 each) plus a CNCF distribution registry (plain HTTP and TLS), pushes
//!   deterministic test images, and tears everything down again (also on panic, via `Drop`).
//! - [`e2e_enabled`] / [`require_e2e!`]: the check every end-to-end test starts with. The tests
//!   themselves are `#[cfg_attr(not(spegel_e2e), ignore = ...)]`: `build.rs` sets `spegel_e2e`
//!   when `SPEGEL_E2E=1` at build time, so a plain `cargo test` lists them as ignored.
//! - [`serial`]: a process-wide lock so end-to-end tests in one binary never overlap (two rigs
//!   pulling at once would saturate a 2-core CI machine and make timings meaningless).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use spegel_tests::rig::{Endpoint, Rig};
//!
//! let _serial = spegel_tests::serial().await;
//! let rig = Rig::builder().nodes(3).start().await?;
//! let four = rig.images().four.clone();
//! rig.node(0).cri_pull(&four.reference(Endpoint::Plain)).await?;
//! let log = rig.registry_log().await?;
//! assert_eq!(log.blob_gets_by(rig.node(0).ip()).len(), 5);
//! rig.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod cluster;
pub mod rig;

use std::path::Path;

/// Environment variable that turns the end-to-end tests on (`SPEGEL_E2E=1`).
pub const E2E_ENV: &str = "SPEGEL_E2E";

/// Programs the rig runs; checked by [`e2e_enabled`] so a misconfigured machine fails loudly.
const REQUIRED_PROGRAMS: &[&str] = &[
    "containerd",
    "ctr",
    "docker-registry",
    "skopeo",
    "ip",
    "nsenter",
    "unshare",
    "mount",
    "umount",
    "sh",
];

/// Returns whether end-to-end tests may run, printing a one-line reason when not.
///
/// End-to-end tests run only when `SPEGEL_E2E=1`. Setting it is a promise that the machine can run
/// them (root, the Debian packages containerd, runc, docker-registry, skopeo and iproute2): if that
/// promise is broken this panics with what is missing instead of silently skipping, because a CI
/// job that asked for end-to-end tests must not go green without running them.
pub fn e2e_enabled() -> bool {
    match std::env::var(E2E_ENV) {
        Ok(value) if value == "1" => {}
        _ => {
            eprintln!(
                "end-to-end test not enabled: set {E2E_ENV}=1 (as root, with containerd, docker-registry and skopeo installed) to run it"
            );
            return false;
        }
    }
    if let Err(missing) = check_prerequisites() {
        panic!("{E2E_ENV}=1 but this machine cannot run the end-to-end tests: {missing}");
    }
    true
}

/// Panics unless [`e2e_enabled`] says yes: an end-to-end test only runs when built with
/// `SPEGEL_E2E=1` or asked for with `--ignored`, and then must not pass without running.
#[macro_export]
macro_rules! require_e2e {
    () => {
        assert!(
            $crate::e2e_enabled(),
            "end-to-end test run without {}=1",
            $crate::E2E_ENV
        );
    };
}

/// Serialises end-to-end tests within one test binary: hold the guard for the whole test.
///
/// It is a tokio mutex so that it can be held across `.await`; it works across the separate
/// runtimes that `#[tokio::test]` creates per test, and it is not poisoned when a test panics.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Polls `check` every 200 ms until it yields a value; fails with `what` and the last reason
/// (`not yet`, or the check's error) after `timeout`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let started = std::time::Instant::now();
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "not yet".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        if started.elapsed() >= timeout {
            anyhow::bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Checks for root and the required programs; the error lists everything that is missing.
fn check_prerequisites() -> Result<(), String> {
    let mut problems = Vec::new();
    if !running_as_root() {
        problems.push("not running as root".to_owned());
    }
    let missing: Vec<&str> = REQUIRED_PROGRAMS
        .iter()
        .copied()
        .filter(|program| find_in_path(program).is_none())
        .collect();
    if !missing.is_empty() {
        problems.push(format!("programs not on PATH: {}", missing.join(", ")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Reads the effective uid from `/proc/self/status` (no `unsafe` libc call needed).
fn running_as_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|effective| effective == "0")
}

/// Finds an executable on `PATH` (plus the sbin directories, which a non-login root shell may lack).
pub(crate) fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(Into::into))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
