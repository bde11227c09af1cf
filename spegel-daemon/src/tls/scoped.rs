//! Trust scoped to containerd, `install-ca`'s default: the node CA goes into a bundle for
//! containerd's `SSL_CERT_FILE` (the system roots plus the node CA bundle), set by a systemd
//! drop-in for containerd's unit, instead of into the host trust store every process reads.
//!
//! `SSL_CERT_FILE` replaces the system bundle for containerd, so the bundle carries the system
//! roots and must follow them: `install-ca` records which bundle it wrote from which system roots
//! (`<data-dir>/ca/containerd-trust.json`), and the daemon ([`sync`], from the trust watch)
//! rewrites it whenever the system roots or the node CA bundle (a next CA minted, one promoted)
//! change. A rewrite that adds a CA is recorded as an install (`trust.rs`), so a containerd
//! started after it trusts that CA.
use std::{
    ffi::OsString,
    fs, io,
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    ca::{CaError, write_file_atomically},
    continuity::CaSet,
    trust::record_install,
};

/// The bundle's file name under `<data-dir>` unless `--bundle` names another path.
pub const DEFAULT_BUNDLE_FILE: &str = "containerd-trust.pem";
/// The drop-in's file name inside `<unit>.d/`.
pub const DROP_IN_FILE: &str = "50-spegel-trust.conf";
/// Where systemd keeps the administrator's units, relative to the trust root.
pub const SYSTEMD_UNIT_DIR: &str = "etc/systemd/system";
/// The record of the scoped install, in `<data-dir>/ca/`.
const SCOPE_FILE: &str = "containerd-trust.json";

/// System CA bundles, by distribution, relative to the trust root: the first one found is the
/// system roots.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "etc/ssl/cert.pem",
];

/// Which bundle `install-ca` wrote for containerd, and from which system roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// The bundle containerd's `SSL_CERT_FILE` names.
    pub bundle: PathBuf,
    /// The system CA bundle it copies.
    pub system_roots: PathBuf,
}

/// What [`sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// No scoped install was recorded: nothing to keep in step.
    NotScoped,
    /// The bundle already held the system roots and the node CA bundle.
    Unchanged,
    /// The bundle was rewritten; containerd loads it at its next start.
    Rewritten,
}

/// Symbolic links followed while resolving one path, at most (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// The first system CA bundle under `root` and its bytes. Symbolic links are followed as the
/// node sees them, with `root` as `/` (RHEL's `etc/pki/tls/certs/ca-bundle.crt` is an absolute
/// link into `/etc/pki/ca-trust/`), so a node root mounted at `/host` never reads this
/// machine's own files; the path returned is the resolved one.
pub fn find_system_roots(root: &Path) -> Result<(PathBuf, Vec<u8>), CaError> {
    SYSTEM_BUNDLES
        .iter()
        .filter_map(|rel| resolve_in_root(root, Path::new(rel)))
        .find_map(|path| fs::read(&path).ok().map(|bytes| (path, bytes)))
        .ok_or_else(|| CaError::Io {
            context: format!(
                "no system CA bundle under {} (looked for {})",
                root.display(),
                SYSTEM_BUNDLES.join(", ")
            ),
            source: io::ErrorKind::NotFound.into(),
        })
}

/// `rel` under `root`, every symbolic link on the way followed with `root` as `/`: an absolute
/// target starts again at `root`, and `..` stops at `root`. `None` after [`MAX_SYMLINKS`] links
/// (a loop). Components that do not exist are kept as they are (reading them then fails).
fn resolve_in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = Vec::new();
    let push = |pending: &mut Vec<OsString>, path: &Path| {
        pending.extend(
            path.components()
                .rev()
                .filter_map(|component| match component {
                    Component::Normal(name) => Some(name.to_owned()),
                    Component::ParentDir => Some("..".into()),
                    Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
                }),
        );
    };
    push(&mut pending, rel);
    // Components resolved so far, below `root`.
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let path: PathBuf = std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(OsString::as_os_str))
            .chain(std::iter::once(name.as_os_str()))
            .collect();
        match fs::read_link(&path) {
            Ok(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return None;
                }
                if target.is_absolute() {
                    resolved.clear();
                }
                push(&mut pending, &target);
            }
            // Not a link (or not there): a plain component.
            Err(_) => resolved.push(name),
        }
    }
    Some(
        std::iter::once(root.as_os_str())
            .chain(resolved.iter().map(OsString::as_os_str))
            .collect(),
    )
}

/// The bundle: the system roots, then the node CA bundle, each ending in a newline.
pub fn bundle_bytes(system_roots: &[u8], ca_pem: &str) -> Vec<u8> {
    let mut bundle = system_roots.to_vec();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle
}

/// Writes `contents` to `path` atomically unless it already holds exactly them. Returns whether
/// it wrote. Blocking.
pub fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool, CaError> {
    if fs::read(path).is_ok_and(|old| old == contents) {
        return Ok(false);
    }
    write_file_atomically(path, contents, mode)?;
    Ok(true)
}

/// The drop-in for containerd's unit that points `SSL_CERT_FILE` at `bundle` (as containerd's
/// host sees the path). Paths systemd would need escaped are refused rather than escaped.
pub fn drop_in(bundle: &Path) -> Result<String, CaError> {
    let path = bundle.to_str().filter(|path| {
        path.starts_with('/')
            && !path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "\"'\\%$".contains(c))
    });
    let Some(path) = path else {
        return Err(CaError::Config(format!(
            "the bundle path {} cannot go into a systemd drop-in: it must be absolute, UTF-8, \
             and free of whitespace, quotes, backslashes, `%` and `$` (choose another --bundle)",
            bundle.display()
        )));
    };
    Ok(format!(
        "# Written by `spegel install-ca`: containerd alone trusts the spegel node CA.\n\
         [Service]\nEnvironment=SSL_CERT_FILE={path}\n"
    ))
}

/// The drop-in's path for `unit` under `root`'s systemd unit directory.
pub fn drop_in_path(root: &Path, unit: &str) -> PathBuf {
    root.join(SYSTEMD_UNIT_DIR)
        .join(format!("{unit}.d"))
        .join(DROP_IN_FILE)
}

/// Records that `install-ca` set up `scope` (kept if unchanged). Blocking.
pub fn record_scope(ca_dir: &Path, scope: &Scope) -> Result<(), CaError> {
    let json = serde_json::to_vec_pretty(scope).map_err(|err| CaError::Io {
        context: "cannot encode the containerd trust record".to_owned(),
        source: io::Error::other(err),
    })?;
    write_if_changed(&ca_dir.join(SCOPE_FILE), &json, 0o644).map(drop)
}

/// Forgets the scoped install (`node-setup --undo`): the daemon then no longer rewrites the
/// bundle. Blocking.
pub fn forget_scope(ca_dir: &Path) -> Result<(), CaError> {
    match fs::remove_file(ca_dir.join(SCOPE_FILE)) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaError::Io {
            context: "cannot remove the containerd trust record".to_owned(),
            source,
        }),
    }
}

/// The scoped install `install-ca` recorded, if there is a readable one.
pub fn read_scope(ca_dir: &Path) -> Option<Scope> {
    serde_json::from_slice(&fs::read(ca_dir.join(SCOPE_FILE)).ok()?).ok()
}

/// Keeps the bundle of the recorded scoped install in step with its system roots and with
/// `cas`'s bundle: rewritten atomically when either changed, and the CAs it now holds recorded
/// as installed. Blocking file IO.
pub fn sync(cas: &CaSet) -> Result<Synced, CaError> {
    let Some(scope) = read_scope(cas.dir()) else {
        return Ok(Synced::NotScoped);
    };
    let system_roots = fs::read(&scope.system_roots).map_err(|source| CaError::Io {
        context: format!(
            "cannot read the system roots {} for containerd's trust bundle (run `spegel \
             node-setup` or `spegel install-ca` again if they moved)",
            scope.system_roots.display()
        ),
        source,
    })?;
    let contents = bundle_bytes(&system_roots, &cas.bundle_pem());
    if !write_if_changed(&scope.bundle, &contents, 0o644)? {
        return Ok(Synced::Unchanged);
    }
    // Recorded once the bundle holds them: a containerd started after this trusts them.
    record_install(cas.dir(), cas.bundle_fingerprints())?;
    Ok(Synced::Rewritten)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::symlink, sync::Arc};

    use super::*;
    use crate::tls::{args::CaArgs, names::tests::permitted, trust::read_record};

    /// Writes `contents` at `rel` under `root`, making its directories.
    fn put(root: &Path, rel: &str, contents: &[u8]) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    /// Makes `rel` under `root` a symbolic link to `target` (as written, absolute or not).
    fn link(root: &Path, rel: &str, target: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    #[test]
    fn rhel_absolute_links_resolve_inside_the_trust_root() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        // RHEL / Azure Linux / AL2023: the classic bundle is an absolute link into ca-trust,
        // and the node's /etc/pki/tls/certs is itself reached through a link.
        put(
            root,
            "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
            b"node roots\n",
        );
        link(root, "etc/pki/tls/certs", "/etc/pki/tls/real-certs");
        link(
            root,
            "etc/pki/tls/real-certs/ca-bundle.crt",
            "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        );
        let target = root.join("etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem");
        assert_eq!(
            resolve_in_root(root, Path::new("etc/pki/tls/certs/ca-bundle.crt")),
            Some(target.clone())
        );
        let (path, bytes) = find_system_roots(root).unwrap();
        assert_eq!(bytes, b"node roots\n");
        assert_eq!(path, target);
    }

    #[test]
    fn absolute_links_never_read_this_machines_files() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        // /etc/passwd exists on this machine too: following the link as it stands would
        // read that one.
        put(root, "etc/passwd", b"node roots\n");
        link(root, "etc/ssl/certs/ca-certificates.crt", "/etc/passwd");
        let (path, bytes) = find_system_roots(root).unwrap();
        assert_eq!(bytes, b"node roots\n");
        assert_eq!(path, root.join("etc/passwd"));
    }

    #[test]
    fn relative_links_stop_at_the_trust_root_and_loops_end() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        put(root, "roots.pem", b"node roots\n");
        // `..` past the root stays at the root.
        link(
            root,
            "etc/ssl/certs/ca-certificates.crt",
            "../../../../../../roots.pem",
        );
        assert_eq!(
            resolve_in_root(root, Path::new(SYSTEM_BUNDLES[0])).unwrap(),
            root.join("roots.pem")
        );
        // A loop is no bundle: the next candidate is used.
        link(
            root,
            "etc/pki/tls/certs/ca-bundle.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
        );
        assert_eq!(resolve_in_root(root, Path::new(SYSTEM_BUNDLES[1])), None);
        fs::remove_file(root.join(SYSTEM_BUNDLES[0])).unwrap();
        put(root, SYSTEM_BUNDLES[2], b"ca-trust\n");
        let (_, bytes) = find_system_roots(root).unwrap();
        assert_eq!(bytes, b"ca-trust\n");
    }

    fn open(data: &Path, names: &[&str]) -> CaSet {
        CaSet::open(
            data,
            permitted(names),
            CaArgs::default().policy().unwrap(),
            Arc::default(),
        )
        .unwrap()
    }

    #[test]
    fn the_bundle_follows_the_system_roots_and_the_cas() {
        let dir = tempfile::tempdir().unwrap();
        let (data, roots, bundle) = (
            dir.path().join("data"),
            dir.path().join("roots.pem"),
            dir.path().join("containerd-trust.pem"),
        );
        fs::create_dir_all(&data).unwrap();
        fs::write(&roots, "SYSTEM ROOTS v1").unwrap();
        let cas = open(&data, &["docker.io"]);
        // Nothing recorded: nothing written.
        assert_eq!(sync(&cas).unwrap(), Synced::NotScoped);
        assert!(!bundle.exists());

        let scope = Scope {
            bundle: bundle.clone(),
            system_roots: roots.clone(),
        };
        record_scope(cas.dir(), &scope).unwrap();
        assert_eq!(read_scope(cas.dir()), Some(scope));
        assert_eq!(sync(&cas).unwrap(), Synced::Rewritten);
        let first = fs::read_to_string(&bundle).unwrap();
        assert_eq!(first, format!("SYSTEM ROOTS v1\n{}", cas.bundle_pem()));
        let record = read_record(cas.dir()).unwrap();
        assert_eq!(record.fingerprints, cas.bundle_fingerprints());
        // In step: no write (the inode stays), the record keeps its time.
        let inode = |path: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(path).unwrap());
        let before = inode(&bundle);
        assert_eq!(sync(&cas).unwrap(), Synced::Unchanged);
        assert_eq!(inode(&bundle), before);
        assert_eq!(read_record(cas.dir()).unwrap(), record);

        // The system roots change: rewritten, with the same CAs.
        fs::write(&roots, "SYSTEM ROOTS v2\n").unwrap();
        assert_eq!(sync(&cas).unwrap(), Synced::Rewritten);
        assert_eq!(
            fs::read_to_string(&bundle).unwrap(),
            format!("SYSTEM ROOTS v2\n{}", cas.bundle_pem())
        );
        assert_ne!(inode(&bundle), before, "not replaced atomically");
        assert_eq!(read_record(cas.dir()).unwrap(), record);

        // A registry added: a next CA is minted beside the current one, and the bundle gets it,
        // recorded as installed.
        // Promoting the first CA changes nothing containerd reads.
        assert!(cas.promote().unwrap());
        assert_eq!(sync(&cas).unwrap(), Synced::Unchanged);
        let cas = open(&data, &["docker.io", "ghcr.io"]);
        let next = cas.next().expect("a next CA");
        assert_eq!(sync(&cas).unwrap(), Synced::Rewritten);
        let pem = fs::read_to_string(&bundle).unwrap();
        assert!(pem.starts_with("SYSTEM ROOTS v2\n"));
        assert!(pem.contains(cas.trusted().unwrap().cert_pem()));
        assert!(pem.ends_with(next.cert_pem()));
        assert!(
            read_record(cas.dir())
                .unwrap()
                .fingerprints
                .contains(&next.fingerprint())
        );

        // Unreadable system roots: an error, and the bundle is left as it was.
        fs::remove_file(&roots).unwrap();
        let err = sync(&cas).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the system roots"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&bundle).unwrap(), pem);
    }

    #[test]
    fn drop_ins_name_absolute_plain_paths_only() {
        let text = drop_in(Path::new("/var/lib/spegel/containerd-trust.pem")).unwrap();
        assert!(text.contains(
            "\n[Service]\nEnvironment=SSL_CERT_FILE=/var/lib/spegel/containerd-trust.pem\n"
        ));
        for bad in [
            "relative.pem",
            "/a b/c.pem",
            "/a%b.pem",
            "/a\"b.pem",
            "/a\\b",
        ] {
            assert!(drop_in(Path::new(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            drop_in_path(Path::new("/r"), "containerd.service"),
            Path::new("/r/etc/systemd/system/containerd.service.d/50-spegel-trust.conf")
        );
    }

    #[test]
    fn bundles_end_every_part_with_a_newline() {
        assert_eq!(bundle_bytes(b"A", "B"), b"A\nB\n");
        assert_eq!(bundle_bytes(b"A\n", "B\n"), b"A\nB\n");
        assert_eq!(bundle_bytes(b"", "B\n"), b"B\n");
    }
}
