//! Teardown (synchronous, so `Drop` can run it) and the leftovers check for a prefix.
//!
//! Everything is found again from the prefix rather than from a list of what start-up created,
//! so a start-up that failed halfway is cleaned up by the same code.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cgroup;
use super::cmd;
use super::net::{self, Names};
use super::process::{self, ProcessTable, Signal};

/// File in the scratch folder holding the PID of the process that started the rig.
pub(crate) const OWNER_FILE: &str = "owner.pid";

/// How long teardown waits after SIGTERM before SIGKILL (containerd needs ~1.5-2 s).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops every recorded process, then removes mounts, veths, namespaces, the bridge,
/// `/etc/netns` folders, cgroups and the scratch folder. Best effort: every step runs even if an
/// earlier one failed; the problems are returned.
pub(crate) fn teardown(
    names: &Names,
    processes: &ProcessTable,
    cgroup_dir: Option<&Path>,
) -> Vec<String> {
    let started = Instant::now();
    let mut problems = processes.stop_all(STOP_GRACE);
    problems.extend(remove_system_state(names, cgroup_dir));
    tracing::debug!(prefix = names.prefix(), elapsed = ?started.elapsed(), "rig torn down");
    problems
}

/// Removes a stale rig's remains, e.g. after a test binary was killed before it could clean up:
/// processes whose command line or cgroup mentions the prefix's scratch folder or cgroup are
/// terminated, then the same removal steps as teardown run.
pub fn cleanup(prefix: &str) -> anyhow::Result<()> {
    let names = Names::new(prefix)?;
    let pids = stray_processes(&names);
    for &pid in &pids {
        process::send_signal(pid, Signal::Term).ok();
        process::send_signal(pid, Signal::Cont).ok();
    }
    let deadline = Instant::now() + STOP_GRACE;
    while pids.iter().any(|pid| is_alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids.iter().filter(|pid| is_alive(**pid)) {
        process::send_signal(pid, Signal::Kill).ok();
    }
    let cgroup_dir = cgroup::cgroup2_mount()
        .ok()
        .map(|root| root.join(names.prefix()));
    let problems = remove_system_state(&names, cgroup_dir.as_deref());
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleanup of {prefix} incomplete: {}", problems.join("; "))
    }
}

/// Cleans up every rig whose starting process has died without tearing it down (killed test
/// binary, Ctrl-C'ed demo): scratch folders `/tmp/spegel-<prefix>` whose `owner.pid` names a
/// process that no longer exists. Live rigs, and folders without an owner file, are left alone.
/// Returns the prefixes cleaned.
pub fn cleanup_stale() -> anyhow::Result<Vec<String>> {
    let stale = stale_prefixes(Path::new("/tmp"));
    for prefix in &stale {
        cleanup(prefix)?;
    }
    Ok(stale)
}

/// Prefixes of `<tmp>/spegel-<prefix>` folders whose owner process is gone.
fn stale_prefixes(tmp: &Path) -> Vec<String> {
    net::list_dir_names(tmp)
        .into_iter()
        .filter_map(|entry| {
            let prefix = entry.strip_prefix("spegel-")?;
            net::validate_prefix(prefix).ok()?;
            let owner = std::fs::read_to_string(tmp.join(&entry).join(OWNER_FILE)).ok()?;
            let pid: u32 = owner.trim().parse().ok()?;
            (!is_alive(pid)).then(|| prefix.to_owned())
        })
        .collect()
}

/// Everything that still exists for `prefix`, one human-readable line each; empty after a
/// clean teardown. Checks namespaces, host links, processes (by command line and cgroup),
/// cgroup directories, mounts, `/etc/netns` folders and the scratch folder.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let names = match Names::new(prefix) {
        Ok(names) => names,
        Err(error) => return vec![format!("invalid prefix: {error:#}")],
    };
    let mut found = Vec::new();
    for netns in net::list_netns(&names.netns_prefix()) {
        found.push(format!("network namespace {netns}"));
    }
    match net::list_links(|link| is_rig_link(&names, link)) {
        Ok(links) => found.extend(links.into_iter().map(|link| format!("link {link}"))),
        Err(error) => found.push(format!("could not list links: {error:#}")),
    }
    for pid in stray_processes(&names) {
        found.push(format!("process {pid}: {}", command_line(pid)));
    }
    if let Ok(root) = cgroup::cgroup2_mount() {
        let dir = root.join(names.prefix());
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    for mount in rig_mounts(&names) {
        found.push(format!("mount {mount}"));
    }
    for dir in etc_netns_dirs(&names) {
        found.push(format!("folder {}", dir.display()));
    }
    let scratch = names.scratch_dir();
    if scratch.exists() {
        found.push(format!("scratch folder {}", scratch.display()));
    }
    found
}

fn remove_system_state(names: &Names, cgroup_dir: Option<&Path>) -> Vec<String> {
    let mut problems = Vec::new();
    // Deepest first, so nested mounts come off before their parents.
    let mut mounts = rig_mounts(names);
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.len()));
    for mount in mounts
        .iter()
        .filter(|mount| !mount.starts_with(net::NETNS_RUN_DIR))
    {
        note(
            &mut problems,
            cmd::run_sync("umount", ["-l", mount.as_str()]).map(drop),
        );
    }
    // Host veths first: deleting one removes its peer synchronously, whereas `ip netns del`
    // frees them asynchronously (they would linger for about a second).
    match net::list_links(|link| link.starts_with(&names.host_veth_prefix())) {
        Ok(links) => {
            for link in links {
                note(
                    &mut problems,
                    cmd::run_sync("ip", ["link", "del", &link]).map(drop),
                );
            }
        }
        Err(error) => problems.push(format!("{error:#}")),
    }
    for netns in net::list_netns(&names.netns_prefix()) {
        note(
            &mut problems,
            cmd::run_sync("ip", ["netns", "del", &netns]).map(drop),
        );
    }
    let bridge = names.bridge();
    if net::list_links(|link| link == bridge).is_ok_and(|links| !links.is_empty()) {
        note(
            &mut problems,
            cmd::run_sync("ip", ["link", "del", &bridge]).map(drop),
        );
    }
    for dir in etc_netns_dirs(names) {
        note(
            &mut problems,
            std::fs::remove_dir_all(&dir)
                .map_err(|error| anyhow::anyhow!("removing {}: {error}", dir.display())),
        );
    }
    if let Some(dir) = cgroup_dir {
        note(
            &mut problems,
            cgroup::remove_tree(dir, Duration::from_secs(5)),
        );
    }
    let scratch = names.scratch_dir();
    if scratch.exists() {
        note(
            &mut problems,
            std::fs::remove_dir_all(&scratch)
                .map_err(|error| anyhow::anyhow!("removing {}: {error}", scratch.display())),
        );
    }
    problems
}

/// Records a failed step and carries on: teardown is best effort.
fn note<T>(problems: &mut Vec<String>, result: anyhow::Result<T>) {
    if let Err(error) = result {
        problems.push(format!("{error:#}"));
    }
}

fn is_rig_link(names: &Names, link: &str) -> bool {
    link == names.bridge() || link.starts_with(&names.host_veth_prefix())
}

/// Mount points under the scratch folder or for the rig's namespace handles.
fn rig_mounts(names: &Names) -> Vec<String> {
    let scratch = names.scratch_dir();
    let netns_handles = Path::new(net::NETNS_RUN_DIR).join(names.netns_prefix());
    let netns_handles = netns_handles.to_string_lossy();
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(cgroup::unescape_mount_path)
        .filter(|mount| {
            is_under(Path::new(mount), &scratch) || mount.starts_with(netns_handles.as_ref())
        })
        .collect()
}

fn etc_netns_dirs(names: &Names) -> Vec<PathBuf> {
    net::list_dir_names(Path::new(net::NETNS_ETC_DIR))
        .into_iter()
        .filter(|name| name.starts_with(&names.netns_prefix()))
        .map(|name| Path::new(net::NETNS_ETC_DIR).join(name))
        .collect()
}

/// PIDs (other than ours) whose command line names the scratch folder or whose cgroup2 path is
/// inside the rig's cgroup.
fn stray_processes(names: &Names) -> Vec<u32> {
    let scratch = names.scratch_dir();
    let own = std::process::id();
    let cgroup_line = format!("0::/{}", names.prefix());
    net::list_dir_names(Path::new("/proc"))
        .into_iter()
        .filter_map(|entry| entry.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|&pid| {
            let mentions_scratch = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| raw.split(|&b| b == 0).any(|arg| mentions(arg, &scratch)))
                .unwrap_or(false);
            let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map(|text| {
                    text.lines().any(|line| {
                        line == cgroup_line || line.starts_with(&format!("{cgroup_line}/"))
                    })
                })
                .unwrap_or(false);
            mentions_scratch || in_cgroup
        })
        .collect()
}

/// Whether an argument contains the scratch path as a path component (`--config=/tmp/spegel-x/..`).
fn mentions(arg: &[u8], scratch: &Path) -> bool {
    let arg = String::from_utf8_lossy(arg);
    let scratch = scratch.to_string_lossy();
    arg.match_indices(scratch.as_ref()).any(|(start, _)| {
        let rest = &arg[start + scratch.len()..];
        rest.is_empty() || rest.starts_with('/')
    })
}

fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(") ")
                    .next()
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
            .unwrap_or(false)
}

fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_mentions_respect_path_boundaries() {
        let scratch = Path::new("/tmp/spegel-sp12");
        assert!(mentions(
            b"--config=/tmp/spegel-sp12/n1/config.toml",
            scratch
        ));
        assert!(mentions(b"/tmp/spegel-sp12", scratch));
        assert!(!mentions(b"/tmp/spegel-sp123/n1", scratch));
        assert!(is_under(Path::new("/tmp/spegel-sp12/n1/root"), scratch));
        assert!(!is_under(Path::new("/tmp/spegel-sp123"), scratch));
    }

    #[test]
    fn rig_links_are_matched_exactly() {
        let names = Names::new("sp12").unwrap();
        assert!(is_rig_link(&names, "sp12br0"));
        assert!(is_rig_link(&names, "sp12v-n1"));
        assert!(!is_rig_link(&names, "sp123br0"));
        assert!(!is_rig_link(&names, "sp123v-n1"));
        assert!(!is_rig_link(&names, "eth0"));
    }

    #[test]
    fn unknown_prefix_has_no_leftovers() {
        assert_eq!(leftovers("zzunused"), Vec::<String>::new());
        assert!(!leftovers("Bad Prefix").is_empty());
    }

    #[test]
    fn stale_rigs_are_those_with_a_dead_owner() {
        let tmp = std::env::temp_dir().join(format!("spegel-stale-test-{}", std::process::id()));
        let rig = |name: &str, owner: Option<String>| {
            let dir = tmp.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER_FILE), owner).unwrap();
            }
        };
        // A pid above the kernel's maximum (4194304) can never be alive.
        rig("spegel-spdead", Some("4194305\n".to_owned()));
        rig("spegel-splive", Some(std::process::id().to_string()));
        rig("spegel-spnoown", None);
        rig("spegel-Not-A-Prefix", Some("4194305".to_owned()));
        rig("unrelated", Some("4194305".to_owned()));
        assert_eq!(stale_prefixes(&tmp), ["spdead"]);
        std::fs::remove_dir_all(tmp).unwrap();
    }

    #[test]
    fn own_process_is_alive() {
        assert!(is_alive(std::process::id()));
    }
}
