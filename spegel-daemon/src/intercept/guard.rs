//! The daemon's own cgroup, and the refusal to attach to a cgroup that contains it.
//!
//! The programs run for every socket of the cgroup they are attached to and of its descendants.
//! Were the daemon among them, its own upstream connects would be redirected to itself. So the
//! daemon finds its own cgroup (the `0::` line of `/proc/self/cgroup`, under the cgroup2 mount,
//! checked against that directory's `cgroup.procs`; in a cgroup namespace of its own, the
//! directory of the host's cgroup2 mount whose `cgroup.procs` lists it), refuses a target that
//! is that cgroup or an ancestor of it (the root cgroup, a kind or k3s node's), and tells the
//! programs its cgroup id (the directory's inode on cgroup2, what `bpf_get_current_cgroup_id`
//! returns), whose connects they never redirect. Unlike a PID, the cgroup id is the same in
//! every PID namespace.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use crate::intercept::ebpf::CgroupDir;

/// Why the daemon will not attach (or cannot tell whether it may).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "refusing to attach the eBPF redirect to cgroup {}: it contains this daemon's own cgroup {}, so the daemon's own connections would be redirected to itself; run the daemon outside containerd's cgroup (e.g. as a pod) or name containerd's own cgroup with --containerd-cgroup",
        target.display(),
        own.display()
    )]
    ContainsDaemon { target: PathBuf, own: PathBuf },
    #[error("cannot tell this daemon's own cgroup: reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tell this daemon's own cgroup: {0}")]
    Unknown(String),
}

/// The cgroup2 directory this process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCgroup {
    /// The directory, under the cgroup2 mount.
    pub path: PathBuf,
    /// Its cgroup id: the directory's inode.
    pub id: u64,
}

impl OwnCgroup {
    /// This process's cgroup under `mount`, from `/proc/self/cgroup`.
    pub fn current(mount: &Path) -> Result<Self, GuardError> {
        Self::find(mount, Path::new("/proc/self"), std::process::id(), None)
    }

    /// This process's cgroup again (it may have been moved), trying where it was last first.
    pub fn again(&self, mount: &Path) -> Result<Self, GuardError> {
        Self::find(
            mount,
            Path::new("/proc/self"),
            std::process::id(),
            Some(&self.path),
        )
    }

    /// The cgroup of the process whose `/proc/<pid>` is `proc_dir`, under `mount`; `pid` is how
    /// this process's PID namespace numbers it (what `cgroup.procs` lists, read from here).
    /// `last`: where it was found before, tried before searching the mount.
    pub(crate) fn find(
        mount: &Path,
        proc_dir: &Path,
        pid: u32,
        last: Option<&Path>,
    ) -> Result<Self, GuardError> {
        let file = proc_dir.join("cgroup");
        let content = fs::read_to_string(&file).map_err(|source| GuardError::Read {
            path: file.clone(),
            source,
        })?;
        let line = unified_line(&content).ok_or_else(|| {
            GuardError::Unknown(format!("{} has no cgroup2 (`0::`) line", file.display()))
        })?;
        let relative = relative_cgroup_path(line).ok_or_else(|| {
            GuardError::Unknown(format!(
                "{} says `{line}`, above this cgroup namespace's root; run the daemon in the host's cgroup namespace",
                file.display()
            ))
        })?;
        // In a cgroup namespace the line is relative to the namespace's root, which need not be
        // the mount's root: a pod that is not privileged has a cgroup namespace of its own (its
        // line reads `0::/`) while `mount` is the host's cgroup2, bind-mounted. So the directory
        // counts only if its `cgroup.procs` lists this process; else it is searched for.
        let candidates = [Some(mount.join(&relative)), last.map(Path::to_path_buf)];
        let path = match candidates
            .into_iter()
            .flatten()
            .find(|dir| is_own(dir, &relative, pid))
        {
            Some(path) => path,
            None => search(mount, &relative, pid)?.ok_or_else(|| {
                GuardError::Unknown(format!(
                    "{} says `{line}`, but no cgroup under {} lists this process (PID {pid}) in its cgroup.procs: is {} the host's cgroup2 mount?",
                    file.display(),
                    mount.display(),
                    mount.display()
                ))
            })?,
        };
        let id = fs::metadata(&path)
            .map_err(|source| GuardError::Read {
                path: path.clone(),
                source,
            })?
            .ino();
        Ok(Self { path, id })
    }

    /// Refuses `target` when it is this cgroup or one of its ancestors.
    pub fn check_target(&self, target: &CgroupDir) -> Result<(), GuardError> {
        if contains(&target.path, &self.path) || target.ino == self.id {
            return Err(GuardError::ContainsDaemon {
                target: target.path.clone(),
                own: self.path.clone(),
            });
        }
        Ok(())
    }
}

/// Cgroup directories [`search`] reads at most: a node has a few thousand.
const SEARCH_LIMIT: usize = 100_000;

/// Whether `dir` is the cgroup of the process numbered `pid` here: its `cgroup.procs` lists
/// `pid`, and it ends with `relative` (the process's path in its own cgroup namespace).
///
/// `cgroup.procs` prints each process's PID in the PID namespace of whoever reads it (the
/// kernel's `cgroup_procs_show` prints `task_pid_vnr`, the number in the reader's active PID
/// namespace; processes outside it print as 0 or are skipped). cgroup-v2.rst documents the file
/// as the PIDs of the cgroup's processes and says nothing of namespaces; the source is the
/// authority here. So read from inside a pod without `hostPID`, the host's files list this
/// process under the PID it knows itself by (`std::process::id`), and no other process can show
/// that number: exactly one directory matches.
fn is_own(dir: &Path, relative: &Path, pid: u32) -> bool {
    dir.ends_with(relative)
        && fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|listed| listed.lines().any(|line| line.trim() == pid.to_string()))
}

/// The directory under `mount` that [`is_own`] says is `pid`'s, read breadth-first (iteration,
/// not recursion); directories that vanish or cannot be read are skipped.
fn search(mount: &Path, relative: &Path, pid: u32) -> Result<Option<PathBuf>, GuardError> {
    let mut queue = std::collections::VecDeque::from([mount.to_path_buf()]);
    let mut read = 0usize;
    while let Some(dir) = queue.pop_front() {
        if is_own(&dir, relative, pid) {
            return Ok(Some(dir));
        }
        read += 1;
        if read > SEARCH_LIMIT {
            return Err(GuardError::Unknown(format!(
                "more than {SEARCH_LIMIT} cgroups under {} and none lists this process",
                mount.display()
            )));
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        queue.extend(
            entries
                .flatten()
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path()),
        );
    }
    Ok(None)
}

/// The path of the `0::` (cgroup v2) line of a `/proc/<pid>/cgroup` file.
pub(crate) fn unified_line(content: &str) -> Option<&str> {
    content.lines().find_map(|line| line.strip_prefix("0::"))
}

/// A `0::` path made relative (no leading `/`), to join to the cgroup2 mount; `None` when it
/// lies above the cgroup namespace's root (`/..`), where no path under the mount leads.
pub(crate) fn relative_cgroup_path(line: &str) -> Option<PathBuf> {
    let path = Path::new(line);
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return None;
    }
    Some(
        path.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect(),
    )
}

/// Whether cgroup directory `outer` is `inner` or one of its ancestors. Both are paths under the
/// same cgroup2 mount; compared component by component (`.` and repeated or trailing `/` do not
/// matter; cgroupfs has no symbolic links).
pub fn contains(outer: &Path, inner: &Path) -> bool {
    fn normal(path: &Path) -> Vec<Component<'_>> {
        path.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    }
    let (outer, inner) = (normal(outer), normal(inner));
    inner.len() >= outer.len() && inner[..outer.len()] == outer[..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc/self` and cgroup2 tree in a temporary directory, removed on drop.
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("spegel-guard-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc/self")).unwrap();
            fs::create_dir_all(root.join("cg")).unwrap();
            Self { root }
        }

        fn mount(&self) -> PathBuf {
            self.root.join("cg")
        }

        fn proc_self(&self) -> PathBuf {
            self.root.join("proc/self")
        }

        /// `/proc/self/cgroup` says `line`; `dir` (under the mount) lists `pids`.
        fn place(&self, line: &str, dir: &str, pids: &[u32]) {
            fs::write(
                self.proc_self().join("cgroup"),
                format!("12:pids:/x\n1:name=systemd:/y\n0::{line}\n"),
            )
            .unwrap();
            let dir = self.mount().join(dir);
            fs::create_dir_all(&dir).unwrap();
            let listed: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
            fs::write(dir.join("cgroup.procs"), listed).unwrap();
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn dir(path: &Path) -> CgroupDir {
        CgroupDir::stat(path).unwrap()
    }

    #[test]
    fn containment_is_by_whole_components() {
        let c = |outer: &str, inner: &str| contains(Path::new(outer), Path::new(inner));
        let cg = "/sys/fs/cgroup";
        assert!(
            c(cg, "/sys/fs/cgroup/kubepods/pod1/spegel"),
            "the root contains all"
        );
        assert!(
            c("/sys/fs/cgroup/n1", "/sys/fs/cgroup/n1"),
            "a cgroup contains itself"
        );
        assert!(c("/sys/fs/cgroup/n1", "/sys/fs/cgroup/n1/spegel"));
        assert!(c("/sys/fs/cgroup/n1/", "/sys/fs/cgroup//n1/./spegel/"));
        assert!(
            !c("/sys/fs/cgroup/n1", "/sys/fs/cgroup/n10/spegel"),
            "not a string prefix"
        );
        assert!(
            !c("/sys/fs/cgroup/n1/spegel", "/sys/fs/cgroup/n1"),
            "a child does not"
        );
        assert!(!c(
            "/sys/fs/cgroup/system.slice/containerd.service",
            "/sys/fs/cgroup/kubepods.slice/spegel"
        ));
    }

    #[test]
    fn parses_the_unified_line() {
        let hybrid = "12:pids:/system.slice/x\n1:name=systemd:/x\n0::/kubepods/pod1/spegel\n";
        assert_eq!(unified_line(hybrid), Some("/kubepods/pod1/spegel"));
        assert_eq!(unified_line("0::/\n"), Some("/"));
        assert_eq!(unified_line("1:cpu:/x\n"), None);
        assert_eq!(
            relative_cgroup_path("/kubepods/pod1/spegel"),
            Some(PathBuf::from("kubepods/pod1/spegel"))
        );
        assert_eq!(relative_cgroup_path("/"), Some(PathBuf::new()));
        assert_eq!(relative_cgroup_path("/../../system.slice"), None);
    }

    #[test]
    fn own_cgroup_from_proc_self_checked_against_cgroup_procs() {
        let fake = Fake::new("own");
        fake.place("/pods/spegel", "pods/spegel", &[7, 42]);
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None).unwrap();
        assert_eq!(own.path, fake.mount().join("pods/spegel"));
        assert_eq!(own.id, fs::metadata(&own.path).unwrap().ino());
        // PID 1 of a PID namespace: listed as such when read from inside it.
        fake.place("/pods/spegel", "pods/spegel", &[1]);
        assert!(OwnCgroup::find(&fake.mount(), &fake.proc_self(), 1, None).is_ok());
        // Not listed there: the path is not this process's cgroup (a cgroup namespace).
        let error = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None).unwrap_err();
        assert!(matches!(error, GuardError::Unknown(_)), "{error}");
        fake.place("/../../system.slice", "pods/spegel", &[42]);
        let error = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None).unwrap_err();
        assert!(error.to_string().contains("cgroup namespace"), "{error}");
        fs::write(fake.proc_self().join("cgroup"), "1:cpu:/x\n").unwrap();
        assert!(OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None).is_err());
        fs::remove_file(fake.proc_self().join("cgroup")).unwrap();
        assert!(matches!(
            OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None),
            Err(GuardError::Read { .. })
        ));
    }

    /// A pod that is not privileged: its own cgroup namespace (`0::/`) and PID namespace, the
    /// host's cgroup2 bind-mounted. Processes outside the PID namespace list as 0.
    #[test]
    fn own_cgroup_in_a_cgroup_namespace_is_searched_on_the_host_mount() {
        let fake = Fake::new("cgns");
        fake.place("/", "system.slice/containerd.service", &[0, 0]);
        fs::write(fake.mount().join("cgroup.procs"), "0\n").unwrap();
        let pod = "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope";
        fake.place("/", pod, &[1]);
        fake.place("/", "kubepods.slice/kubepods-pod2.slice/cri-x.scope", &[0]);
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 1, None).unwrap();
        assert_eq!(own.path, fake.mount().join(pod));
        assert_eq!(own.id, fs::metadata(&own.path).unwrap().ino());
        // Where it was last is tried first, and still checked.
        let last = fake.mount().join(pod);
        let again = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 1, Some(&last)).unwrap();
        assert_eq!(again, own);
        let stale = fake.mount().join("system.slice/containerd.service");
        let again = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 1, Some(&stale)).unwrap();
        assert_eq!(again, own);
        // Below the namespace's root: the directory found must end with the namespaced path.
        fake.place("/sub", "elsewhere", &[7]);
        fake.place("/sub", "kubepods.slice/pod3/sub", &[7]);
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 7, None).unwrap();
        assert_eq!(own.path, fake.mount().join("kubepods.slice/pod3/sub"));
        // Listed nowhere: not the host's cgroup2, or the daemon's PID is not what it reads.
        let error = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 9, None).unwrap_err();
        assert!(error.to_string().contains("PID 9"), "{error}");
    }

    #[test]
    fn refuses_targets_that_contain_the_daemon_naming_both() {
        let fake = Fake::new("refuse");
        fake.place("/n1/spegel", "n1/spegel", &[42]);
        fs::create_dir_all(fake.mount().join("n2")).unwrap();
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42, None).unwrap();
        for target in [fake.mount().join("n1"), fake.mount(), own.path.clone()] {
            let error = own.check_target(&dir(&target)).unwrap_err();
            assert!(matches!(error, GuardError::ContainsDaemon { .. }));
            let message = error.to_string();
            assert!(message.contains(&target.display().to_string()), "{message}");
            assert!(
                message.contains(&own.path.display().to_string()),
                "{message}"
            );
        }
        assert!(own.check_target(&dir(&fake.mount().join("n2"))).is_ok());
        // The same directory under another spelling is still the daemon's (same cgroup id).
        let aliased = CgroupDir {
            path: PathBuf::from("/elsewhere/n1/spegel"),
            ino: own.id,
        };
        assert!(own.check_target(&aliased).is_err());
    }
}
