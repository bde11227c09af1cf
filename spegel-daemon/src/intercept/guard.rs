//! The daemon's own cgroup, and the refusal to attach to a cgroup that contains it.
//!
//! The programs run for every socket of the cgroup they are attached to and of its descendants.
//! Were the daemon among them, its own upstream connects would be redirected to itself. So the
//! daemon finds its own cgroup (the `0::` line of `/proc/self/cgroup`, under the cgroup2 mount,
//! checked against that directory's `cgroup.procs`), refuses a target that is that cgroup or an
//! ancestor of it (the root cgroup, a kind or k3s node's), and tells the programs its cgroup id
//! (the directory's inode on cgroup2, what `bpf_get_current_cgroup_id` returns), whose connects
//! they never redirect. Unlike a PID, the cgroup id is the same in every PID namespace.
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
        Self::find(mount, Path::new("/proc/self"), std::process::id())
    }

    /// The cgroup of the process whose `/proc/<pid>` is `proc_dir`, under `mount`; `pid` is how
    /// this process's PID namespace numbers it (what `cgroup.procs` lists, read from here).
    pub(crate) fn find(mount: &Path, proc_dir: &Path, pid: u32) -> Result<Self, GuardError> {
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
        let path = mount.join(relative);
        // In a cgroup namespace the line is relative to the namespace's root, which need not be
        // the mount's root (a host cgroup2 mount seen from a private cgroup namespace): check.
        let procs = path.join("cgroup.procs");
        let listed = fs::read_to_string(&procs).map_err(|source| GuardError::Read {
            path: procs.clone(),
            source,
        })?;
        if !listed.lines().any(|line| line.trim() == pid.to_string()) {
            return Err(GuardError::Unknown(format!(
                "{} says {}, but {} does not list this process (PID {pid}): is the daemon in a cgroup namespace of its own while {} is the host's cgroup2? Run it in the host's cgroup namespace",
                file.display(),
                path.display(),
                procs.display(),
                mount.display()
            )));
        }
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
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42).unwrap();
        assert_eq!(own.path, fake.mount().join("pods/spegel"));
        assert_eq!(own.id, fs::metadata(&own.path).unwrap().ino());
        // PID 1 of a PID namespace: listed as such when read from inside it.
        fake.place("/pods/spegel", "pods/spegel", &[1]);
        assert!(OwnCgroup::find(&fake.mount(), &fake.proc_self(), 1).is_ok());
        // Not listed there: the path is not this process's cgroup (a cgroup namespace).
        let error = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42).unwrap_err();
        assert!(matches!(error, GuardError::Unknown(_)), "{error}");
        fake.place("/../../system.slice", "pods/spegel", &[42]);
        let error = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42).unwrap_err();
        assert!(error.to_string().contains("cgroup namespace"), "{error}");
        fs::write(fake.proc_self().join("cgroup"), "1:cpu:/x\n").unwrap();
        assert!(OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42).is_err());
        fs::remove_file(fake.proc_self().join("cgroup")).unwrap();
        assert!(matches!(
            OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42),
            Err(GuardError::Read { .. })
        ));
    }

    #[test]
    fn refuses_targets_that_contain_the_daemon_naming_both() {
        let fake = Fake::new("refuse");
        fake.place("/n1/spegel", "n1/spegel", &[42]);
        fs::create_dir_all(fake.mount().join("n2")).unwrap();
        let own = OwnCgroup::find(&fake.mount(), &fake.proc_self(), 42).unwrap();
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
