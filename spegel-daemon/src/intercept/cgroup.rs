//! Finds containerd's cgroup2 directory: given explicitly, or from containerd's PID (given, read
//! from a pidfile, found as the owner of containerd's listening socket, or by scanning
//! `/proc/*/comm`), its `0::` line in `/proc/<pid>/cgroup`, and the cgroup2 mount point.
use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use crate::intercept::ebpf::CgroupDir;

/// Why containerd's cgroup could not be found.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 file system is mounted (see /proc/mounts); mount one or pass --cgroup2-mount"
    )]
    NoCgroup2Mount,
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a cgroup2 directory ({source})", path.display())]
    NotADirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pidfile {}: `{content}` is not a PID", path.display())]
    BadPidFile { path: PathBuf, content: String },
    #[error("no process named `{0}` found in /proc; pass --containerd-cgroup or --containerd-pid")]
    NoProcess(String),
    #[error(
        "processes named `{name}` run in different cgroups ({cgroups}); pass --containerd-cgroup or --containerd-pid"
    )]
    Ambiguous { name: String, cgroups: String },
    #[error("no process holds the listening socket {}", path.display())]
    NoSocketOwner { path: PathBuf },
    #[error("process {pid} has no cgroup2 (`0::`) entry in /proc/{pid}/cgroup")]
    NoUnifiedEntry { pid: u32 },
    #[error(
        "process {pid}'s cgroup `{cgroup}` lies outside this cgroup namespace; pass --containerd-cgroup"
    )]
    OutsideNamespace { pid: u32, cgroup: String },
}

/// How to find containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    /// This cgroup directory: absolute under the cgroup2 mount, or relative to it (the form
    /// `/proc/<pid>/cgroup` prints).
    Cgroup(PathBuf),
    /// The cgroup of this process.
    Pid(u32),
    /// The cgroup of the process whose PID this file holds.
    PidFile(PathBuf),
    /// The cgroup of the process listening on this unix socket (containerd's gRPC socket).
    /// Only sockets of the daemon's own network namespace are visible.
    Socket(PathBuf),
    /// The cgroup of the process(es) with this `comm`; they must all share one cgroup.
    Comm(String),
}

/// Resolves a [`Locator`] to a cgroup directory, again on every call (containerd may restart).
#[derive(Debug)]
pub struct CgroupFinder {
    locator: Locator,
    mount: PathBuf,
    proc_root: PathBuf,
    /// The PID found last time, checked first to avoid scanning /proc on every poll.
    cached_pid: Option<u32>,
}

impl CgroupFinder {
    /// `mount`: the cgroup2 mount point; found in `/proc/mounts` when `None`.
    pub fn new(locator: Locator, mount: Option<PathBuf>) -> Result<Self, CgroupError> {
        Self::with_proc_root(locator, mount, PathBuf::from("/proc"))
    }

    fn with_proc_root(
        locator: Locator,
        mount: Option<PathBuf>,
        proc_root: PathBuf,
    ) -> Result<Self, CgroupError> {
        let mount = match mount {
            Some(mount) => mount,
            None => find_cgroup2_mount(&proc_root.join("mounts"))?,
        };
        Ok(Self {
            locator,
            mount,
            proc_root,
            cached_pid: None,
        })
    }

    /// The cgroup2 mount point in use.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Finds containerd's cgroup directory now.
    pub fn find(&mut self) -> Result<CgroupDir, CgroupError> {
        let path = match self.locator.clone() {
            Locator::Cgroup(path) => self.under_mount(&path),
            Locator::Pid(pid) => self.cgroup_of(pid)?,
            Locator::PidFile(file) => {
                let pid = read_pidfile(&file)?;
                self.cgroup_of(pid)?
            }
            Locator::Socket(socket) => {
                let pid = match self
                    .cached_pid
                    .filter(|&pid| self.holds_socket(pid, &socket))
                {
                    Some(pid) => pid,
                    None => self.socket_owner(&socket)?,
                };
                self.cached_pid = Some(pid);
                self.cgroup_of(pid)?
            }
            Locator::Comm(name) => self.cgroup_of_comm(&name)?,
        };
        CgroupDir::stat(&path).map_err(|source| CgroupError::NotADirectory { path, source })
    }

    /// An absolute path under the mount is taken as is; anything else is relative to the mount.
    fn under_mount(&self, path: &Path) -> PathBuf {
        if path.starts_with(&self.mount) {
            return path.to_path_buf();
        }
        let relative: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.mount.join(relative)
    }

    /// The cgroup2 directory of `pid`.
    fn cgroup_of(&self, pid: u32) -> Result<PathBuf, CgroupError> {
        let file = self.proc_root.join(pid.to_string()).join("cgroup");
        let content = read_to_string(&file)?;
        let cgroup = content
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or(CgroupError::NoUnifiedEntry { pid })?;
        // In a cgroup namespace, cgroups above its root print as `/..`: not reachable from here.
        if Path::new(cgroup)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(CgroupError::OutsideNamespace {
                pid,
                cgroup: cgroup.to_owned(),
            });
        }
        Ok(self.under_mount(Path::new(cgroup)))
    }

    fn comm_of(&self, pid: u32) -> Option<String> {
        let comm = fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm")).ok()?;
        Some(comm.trim_end_matches('\n').to_owned())
    }

    fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let entries = fs::read_dir(&self.proc_root).map_err(|source| CgroupError::Read {
            path: self.proc_root.clone(),
            source,
        })?;
        let mut pids: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    fn cgroup_of_comm(&mut self, name: &str) -> Result<PathBuf, CgroupError> {
        if let Some(pid) = self.cached_pid
            && self.comm_of(pid).as_deref() == Some(name)
            && let Ok(path) = self.cgroup_of(pid)
        {
            return Ok(path);
        }
        self.cached_pid = None;
        let mut found: Vec<(u32, PathBuf)> = Vec::new();
        for pid in self.pids()? {
            if self.comm_of(pid).as_deref() != Some(name) {
                continue;
            }
            // A process that exits mid-scan is skipped.
            if let Ok(path) = self.cgroup_of(pid) {
                found.push((pid, path));
            }
        }
        let Some((pid, path)) = found.first().cloned() else {
            return Err(CgroupError::NoProcess(name.to_owned()));
        };
        if found.iter().any(|(_, p)| *p != path) {
            let mut cgroups: Vec<String> =
                found.iter().map(|(_, p)| p.display().to_string()).collect();
            cgroups.dedup();
            return Err(CgroupError::Ambiguous {
                name: name.to_owned(),
                cgroups: cgroups.join(", "),
            });
        }
        self.cached_pid = Some(pid);
        Ok(path)
    }

    /// Inodes of listening unix sockets bound to `path`, from `/proc/net/unix`.
    fn socket_inodes(&self, path: &Path) -> Result<Vec<u64>, CgroupError> {
        let file = self.proc_root.join("net/unix");
        let content = read_to_string(&file)?;
        let canonical = fs::canonicalize(path).ok();
        Ok(content
            .lines()
            .skip(1)
            .filter_map(|line| {
                // Num RefCount Protocol Flags Type St Inode Path
                let mut fields = line.split_ascii_whitespace();
                let flags = fields.nth(3)?;
                let inode = fields.nth(2)?;
                let bound: String = fields.collect::<Vec<_>>().join(" ");
                let listening = u32::from_str_radix(flags, 16).ok()? & 0x0001_0000 != 0;
                let same =
                    Path::new(&bound) == path || canonical.as_deref() == Some(Path::new(&bound));
                (listening && same).then(|| inode.parse().ok())?
            })
            .collect())
    }

    fn holds_socket(&self, pid: u32, socket: &Path) -> bool {
        self.socket_inodes(socket)
            .is_ok_and(|inodes| self.fd_inodes(pid).iter().any(|i| inodes.contains(i)))
    }

    /// Socket inodes among the open files of `pid`.
    fn fd_inodes(&self, pid: u32) -> Vec<u64> {
        let Ok(fds) = fs::read_dir(self.proc_root.join(pid.to_string()).join("fd")) else {
            return Vec::new();
        };
        fds.filter_map(|fd| {
            let target = fs::read_link(fd.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
    }

    fn socket_owner(&self, socket: &Path) -> Result<u32, CgroupError> {
        let inodes = self.socket_inodes(socket)?;
        if inodes.is_empty() {
            return Err(CgroupError::NoSocketOwner {
                path: socket.to_path_buf(),
            });
        }
        let owners: Vec<u32> = self
            .pids()?
            .into_iter()
            .filter(|&pid| self.fd_inodes(pid).iter().any(|i| inodes.contains(i)))
            .collect();
        // Children may inherit the socket; prefer the one that is containerd itself.
        owners
            .iter()
            .copied()
            .find(|&pid| self.comm_of(pid).as_deref() == Some("containerd"))
            .or_else(|| owners.first().copied())
            .ok_or_else(|| CgroupError::NoSocketOwner {
                path: socket.to_path_buf(),
            })
    }
}

/// The content of `path`, or a [`CgroupError::Read`] naming it.
fn read_to_string(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_pidfile(path: &Path) -> Result<u32, CgroupError> {
    let content = read_to_string(path)?;
    content
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| CgroupError::BadPidFile {
            path: path.to_path_buf(),
            content: content.trim().chars().take(32).collect(),
        })
}

/// The first cgroup2 mount point listed in a `/proc/mounts`-format file: `/sys/fs/cgroup` on
/// pure-v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones.
fn find_cgroup2_mount(mounts: &Path) -> Result<PathBuf, CgroupError> {
    let content = read_to_string(mounts)?;
    content
        .lines()
        .find_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
        })
        .ok_or(CgroupError::NoCgroup2Mount)
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = octal
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake /proc and cgroup2 tree in a temporary directory, removed on drop.
    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("spegel-cgroup-test-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc/net")).unwrap();
            fs::create_dir_all(root.join("cg")).unwrap();
            let mounts = format!(
                "proc /proc proc rw 0 0\ncgroup2 {} cgroup2 rw 0 0\n",
                root.join("cg").display()
            );
            fs::write(root.join("proc/mounts"), mounts).unwrap();
            fs::write(
                root.join("proc/net/unix"),
                "Num       RefCount Protocol Flags    Type St Inode Path\n",
            )
            .unwrap();
            Self { root }
        }

        fn proc(&self) -> PathBuf {
            self.root.join("proc")
        }

        fn cg(&self) -> PathBuf {
            self.root.join("cg")
        }

        fn process(&self, pid: u32, comm: &str, cgroup: &str) {
            let dir = self.proc().join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(
                dir.join("cgroup"),
                format!("9:name=systemd:/\n1:cpu:/x\n0::{cgroup}\n"),
            )
            .unwrap();
            fs::create_dir_all(self.cg().join(cgroup.trim_start_matches('/'))).unwrap();
        }

        fn finder(&self, locator: Locator) -> CgroupFinder {
            CgroupFinder::with_proc_root(locator, None, self.proc()).unwrap()
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn mount_point_from_proc_mounts() {
        let host = FakeHost::new("mount");
        assert_eq!(host.finder(Locator::Pid(1)).mount(), host.cg());
        let mounts = host.root.join("mounts2");
        fs::write(&mounts, "cgroup2 /sys/fs/cgroup\\040x cgroup2 rw 0 0\n").unwrap();
        assert_eq!(
            find_cgroup2_mount(&mounts).unwrap(),
            Path::new("/sys/fs/cgroup x")
        );
        fs::write(&mounts, "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n").unwrap();
        assert!(matches!(
            find_cgroup2_mount(&mounts),
            Err(CgroupError::NoCgroup2Mount)
        ));
        assert_eq!(unescape_mount_path("a\\134b\\0"), "a\\b\\0");
    }

    #[test]
    fn explicit_cgroup_absolute_or_relative() {
        let host = FakeHost::new("explicit");
        fs::create_dir_all(host.cg().join("system.slice/containerd.service")).unwrap();
        let want = host.cg().join("system.slice/containerd.service");
        for given in [
            want.clone(),
            PathBuf::from("/system.slice/containerd.service"),
            PathBuf::from("system.slice/containerd.service"),
        ] {
            let found = host.finder(Locator::Cgroup(given)).find().unwrap();
            assert_eq!(found.path, want);
        }
        // A recreated directory is a different cgroup.
        let mut finder = host.finder(Locator::Cgroup(want.clone()));
        let before = finder.find().unwrap();
        // The replacement exists while the original does, so it cannot reuse its inode.
        let replacement = host.cg().join("replacement");
        fs::create_dir(&replacement).unwrap();
        fs::remove_dir(&want).unwrap();
        assert!(matches!(
            finder.find(),
            Err(CgroupError::NotADirectory { .. })
        ));
        fs::rename(&replacement, &want).unwrap();
        let after = finder.find().unwrap();
        assert_eq!(after.path, before.path);
        assert_ne!(after.ino, before.ino);
    }

    #[test]
    fn by_pid_pidfile_and_comm() {
        let host = FakeHost::new("pid");
        host.process(40, "containerd", "/node-a/containerd");
        host.process(41, "containerd-shim", "/node-a/shims");
        host.process(50, "bash", "/");
        let want = host.cg().join("node-a/containerd");
        assert_eq!(host.finder(Locator::Pid(40)).find().unwrap().path, want);
        let pidfile = host.root.join("containerd.pid");
        fs::write(&pidfile, "40\n").unwrap();
        assert_eq!(
            host.finder(Locator::PidFile(pidfile.clone()))
                .find()
                .unwrap()
                .path,
            want
        );
        fs::write(&pidfile, "forty").unwrap();
        assert!(matches!(
            host.finder(Locator::PidFile(pidfile)).find(),
            Err(CgroupError::BadPidFile { .. })
        ));
        let mut by_comm = host.finder(Locator::Comm("containerd".into()));
        assert_eq!(by_comm.find().unwrap().path, want);
        // containerd restarted into another cgroup under a new PID.
        fs::remove_dir_all(host.proc().join("40")).unwrap();
        host.process(60, "containerd", "/node-a/containerd-2");
        assert_eq!(
            by_comm.find().unwrap().path,
            host.cg().join("node-a/containerd-2")
        );
        // Two containerds in different cgroups: ambiguous.
        host.process(70, "containerd", "/node-b/containerd");
        assert!(matches!(
            host.finder(Locator::Comm("containerd".into())).find(),
            Err(CgroupError::Ambiguous { .. })
        ));
        assert!(matches!(
            host.finder(Locator::Comm("dockerd".into())).find(),
            Err(CgroupError::NoProcess(_))
        ));
        assert!(matches!(
            host.finder(Locator::Pid(999)).find(),
            Err(CgroupError::Read { .. })
        ));
    }

    #[test]
    fn cgroup_outside_the_namespace_is_refused() {
        let host = FakeHost::new("ns");
        host.process(40, "containerd", "/x");
        fs::write(host.proc().join("40/cgroup"), "0::/../../system.slice\n").unwrap();
        assert!(matches!(
            host.finder(Locator::Pid(40)).find(),
            Err(CgroupError::OutsideNamespace { .. })
        ));
        fs::write(host.proc().join("40/cgroup"), "1:cpu:/\n").unwrap();
        assert!(matches!(
            host.finder(Locator::Pid(40)).find(),
            Err(CgroupError::NoUnifiedEntry { pid: 40 })
        ));
    }

    #[test]
    fn by_socket_owner() {
        let host = FakeHost::new("sock");
        host.process(40, "containerd", "/node-a/containerd");
        host.process(41, "containerd", "/node-b/containerd");
        let sock_a = host.root.join("a/containerd.sock");
        let sock_b = host.root.join("b/containerd.sock");
        let unix = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 1111 {}\n\
             0000000000000000: 00000002 00000000 00000000 0001 03 2222 {}\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 3333 {}\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 4444\n",
            sock_a.display(),
            sock_b.display(),
            sock_b.display()
        );
        fs::write(host.proc().join("net/unix"), unix).unwrap();
        symlink("socket:[1111]", host.proc().join("40/fd/3")).unwrap();
        symlink("socket:[3333]", host.proc().join("41/fd/7")).unwrap();
        symlink("/dev/null", host.proc().join("41/fd/0")).unwrap();
        let mut a = host.finder(Locator::Socket(sock_a.clone()));
        assert_eq!(a.find().unwrap().path, host.cg().join("node-a/containerd"));
        assert_eq!(a.cached_pid, Some(40));
        assert_eq!(
            host.finder(Locator::Socket(sock_b)).find().unwrap().path,
            host.cg().join("node-b/containerd")
        );
        assert!(matches!(
            host.finder(Locator::Socket(host.root.join("nope.sock")))
                .find(),
            Err(CgroupError::NoSocketOwner { .. })
        ));
        // The cached owner no longer holds the socket: found again.
        fs::remove_file(host.proc().join("40/fd/3")).unwrap();
        host.process(45, "containerd", "/node-a/containerd-new");
        symlink("socket:[1111]", host.proc().join("45/fd/3")).unwrap();
        assert_eq!(
            a.find().unwrap().path,
            host.cg().join("node-a/containerd-new")
        );
    }
}
