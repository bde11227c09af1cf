//! The `configure-mirror` subcommand: containerd `hosts.toml` files that put this node's daemon
//! in front of the mirrored registries (mirror mode), and `--undo` to put back what was there.
//!
//! The directory is reconciled, not patched: the desired state is always "the backup taken on
//! the first run, plus our hosts.toml files", so running twice gives the same result, a changed
//! registry list leaves no stale files, and `--undo` restores the backup byte for byte.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::ArgAction;

use crate::oci::{Host, Registry, RegistryList};

/// Flags of `configure-mirror`.
#[derive(Debug, Clone, clap::Args)]
pub struct MirrorArgs {
    /// containerd's registry configuration directory (its `config_path`).
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_REGISTRY_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub containerd_registry_config_path: PathBuf,
    /// Registries to mirror, as `[http(s)://]host[:port]` (comma-separated or the flag repeated;
    /// `https` unless `http://` is given): the same grammar as `run` and `install-ca`. None:
    /// every registry, through `_default/hosts.toml`.
    #[arg(
        long,
        env = "SPEGEL_MIRRORED_REGISTRIES",
        default_value = "",
        hide_default_value = true
    )]
    pub mirrored_registries: Vec<RegistryList>,
    /// The daemons containerd tries first, in order, e.g. `http://127.0.0.1:5000` (comma-separated).
    #[arg(
        long,
        env = "SPEGEL_MIRROR_TARGETS",
        value_delimiter = ',',
        value_parser = parse_target,
        required_unless_present = "undo"
    )]
    pub mirror_targets: Vec<Target>,
    /// Let the mirrors resolve tags (capabilities `pull` and `resolve`); `false`: `pull` only.
    #[arg(long, env = "SPEGEL_RESOLVE_TAGS", action = ArgAction::Set, default_value_t = true)]
    pub resolve_tags: bool,
    /// Restore the configuration backed up on the first run and remove what spegel wrote.
    #[arg(long, env = "SPEGEL_UNDO")]
    pub undo: bool,
}

/// A daemon URL containerd should try: `http(s)://host[:port]`, the scheme mandatory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target(Registry);

impl Target {
    /// `scheme://host[:port]`.
    pub fn url(&self) -> String {
        self.0.url()
    }
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Empty: every registry (`_default`).
    pub registries: Vec<Registry>,
    pub targets: Vec<Target>,
    pub resolve_tags: bool,
}

/// Why the configuration could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// A flag value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The directory holds something we will not copy (a socket, a device, a huge file, a
    /// tree too big or too deep to be a registry configuration).
    #[error("refusing to handle {}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
}

/// The backup of the directory as it was before the first run.
const BACKUP: &str = "_backup";
/// Where a backup is assembled before it is renamed into place.
const BACKUP_TMP: &str = "_backup.tmp";
const DEFAULT_HOST: &str = "_default";
const HOSTS_TOML: &str = "hosts.toml";
/// Ignored by containerd 1.6, honoured from 2.1 (Spegel writes it too): a dead peer then costs
/// 200 ms instead of a full dial timeout.
const DIAL_TIMEOUT: &str = "200ms";
/// Bounds on what is copied: a registry configuration is a handful of small files.
const MAX_ENTRIES: usize = 10_000;
const MAX_FILE_SIZE: u64 = 16 << 20;
const MAX_DEPTH: usize = 16;
/// How our temporary files end: nothing containerd reads, and recognisable after a crash.
const TEMP_SUFFIX: &str = ".spegel-tmp";

/// Runs `configure-mirror`.
pub async fn main(args: MirrorArgs) -> anyhow::Result<()> {
    let path = args.containerd_registry_config_path.clone();
    let undo = args.undo;
    let config = MirrorConfig {
        registries: args
            .mirrored_registries
            .into_iter()
            .flat_map(RegistryList::into_vec)
            .collect(),
        targets: args.mirror_targets,
        resolve_tags: args.resolve_tags,
    };
    // Blocking file work, on a thread that may block.
    tokio::task::spawn_blocking(move || {
        if undo {
            let restored = self::undo(&path)?;
            if restored {
                tracing::info!(path = %path.display(), "restored the registry configuration from its backup");
            } else {
                tracing::info!(path = %path.display(), "no backup: nothing to undo");
            }
        } else {
            let written = configure(&path, &config)?;
            for file in &written {
                tracing::info!(file = %file.display(), "wrote mirror configuration");
            }
        }
        Ok::<_, MirrorError>(())
    })
    .await
    .context("configure-mirror task failed")??;
    Ok(())
}

/// Backs up `path` on the first run, then makes it exactly the backup plus one `hosts.toml` per
/// mirrored registry. Returns the files written.
pub fn configure(path: &Path, config: &MirrorConfig) -> Result<Vec<PathBuf>, MirrorError> {
    if config.targets.is_empty() {
        return Err(MirrorError::Invalid(
            "at least one --mirror-targets URL is needed".to_owned(),
        ));
    }
    let files = hosts_files(config)?;
    create_dir_all(path)?;
    let backup = ensure_backup(path)?;
    let mut desired = backup;
    for (host, content) in &files {
        let dir = PathBuf::from(host);
        // The upstream's own TLS settings (a private CA, a client certificate) in the file we
        // replace must survive: containerd falls back to the upstream with them.
        let content = match desired.get(&dir.join(HOSTS_TOML)) {
            Some(Node::File {
                content: previous, ..
            }) => keep_server_tls(content, &String::from_utf8_lossy(previous)),
            _ => content.clone(),
        };
        if !matches!(desired.get(&dir), Some(Node::Dir { .. })) {
            desired.retain(|p, _| !p.starts_with(&dir));
            desired.insert(dir.clone(), Node::Dir { mode: 0o755 });
        }
        desired.insert(
            dir.join(HOSTS_TOML),
            Node::File {
                content: content.into_bytes(),
                mode: 0o644,
            },
        );
    }
    reconcile(path, &desired)?;
    Ok(files
        .keys()
        .map(|host| path.join(host).join(HOSTS_TOML))
        .collect())
}

/// Restores the backup exactly and removes it. Returns `false` when there was none (nothing
/// was ever written over).
pub fn undo(path: &Path) -> Result<bool, MirrorError> {
    let backup = path.join(BACKUP);
    // A backup still being assembled means the first run never got to write anything.
    remove_all(&path.join(BACKUP_TMP))?;
    if !exists(&backup)? {
        return Ok(false);
    }
    let tree = read_tree(&backup)?;
    reconcile(path, &tree)?;
    remove_all(&backup)?;
    Ok(true)
}

/// The `hosts.toml` of every mirrored registry, by directory name.
pub fn hosts_files(config: &MirrorConfig) -> Result<BTreeMap<String, String>, MirrorError> {
    let mut targets: Vec<&Target> = Vec::new();
    for target in &config.targets {
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    let capabilities = if config.resolve_tags {
        r#"["pull", "resolve"]"#
    } else {
        r#"["pull"]"#
    };
    let mut hosts = String::new();
    for target in targets {
        hosts.push_str(&format!(
            "\n[host.\"{}\"]\n  capabilities = {capabilities}\n  dial_timeout = \"{DIAL_TIMEOUT}\"\n",
            target.url()
        ));
    }
    let header = "# Written by `spegel configure-mirror`; `spegel configure-mirror --undo` restores \
                  what was here before.\n";
    let mut files = BTreeMap::new();
    if config.registries.is_empty() {
        files.insert(DEFAULT_HOST.to_owned(), format!("{header}{hosts}"));
    }
    for registry in &config.registries {
        let content = format!("{header}server = \"{}\"\n{hosts}", server_url(registry));
        let host = registry.authority();
        if let Some(previous) = files.insert(host.clone(), content.clone())
            && previous != content
        {
            return Err(MirrorError::Invalid(format!(
                "registry {host} is listed with two different schemes"
            )));
        }
    }
    Ok(files)
}

/// Top-level keys of a `hosts.toml` that configure TLS to the `server` itself.
const SERVER_TLS_KEYS: [&str; 3] = ["ca", "client", "skip_verify"];

/// `content` (one of our files) with the top-level TLS settings of `previous` (the file it
/// replaces) added after its `server` line. Only top-level keys are read, before the first
/// table; a value spans lines until its brackets balance.
fn keep_server_tls(content: &str, previous: &str) -> String {
    let mut kept = Vec::new();
    let mut open = 0i64;
    for line in previous.lines() {
        let trimmed = line.trim_start();
        if open == 0 {
            if trimmed.starts_with('[') {
                break;
            }
            let key = trimmed.split('=').next().unwrap_or_default().trim();
            if !trimmed.contains('=') || !SERVER_TLS_KEYS.contains(&key) {
                continue;
            }
        }
        kept.push(line);
        open += line.matches('[').count() as i64 - line.matches(']').count() as i64;
        open = open.max(0);
    }
    if kept.is_empty() {
        return content.to_owned();
    }
    let mut out = String::with_capacity(content.len() + 128);
    let mut added = false;
    for line in content.lines() {
        out.push_str(line);
        out.push('\n');
        if !added && line.starts_with("server = ") {
            out.push_str("# The upstream's TLS settings, kept from the file this one replaced:\n");
            for line in &kept {
                out.push_str(line);
                out.push('\n');
            }
            added = true;
        }
    }
    out
}

/// The upstream URL for `server =`: the registry's own URL, except that `docker.io` is served
/// by `registry-1.docker.io`.
fn server_url(registry: &Registry) -> String {
    match registry.host() {
        Host::Name(name) if name == "docker.io" => {
            let port = registry
                .port()
                .map(|port| format!(":{port}"))
                .unwrap_or_default();
            format!("{}://registry-1.docker.io{port}", registry.scheme())
        }
        _ => registry.url(),
    }
}

/// Parses `--mirror-targets` entries: `http(s)://host[:port][/]` ([`Registry::parse_url`]).
pub fn parse_target(s: &str) -> Result<Target, String> {
    Registry::parse_url(s)
        .map(Target)
        .map_err(|err| format!("invalid URL `{s}`: {err}"))
}

/// One entry of a directory tree, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { content: Vec<u8>, mode: u32 },
    Symlink { target: PathBuf },
}

type Tree = BTreeMap<PathBuf, Node>;

/// The backup, taken now if there is none yet (assembled aside, then renamed into place, so a
/// crash never leaves a partial backup that looks complete).
fn ensure_backup(path: &Path) -> Result<Tree, MirrorError> {
    let backup = path.join(BACKUP);
    if exists(&backup)? {
        return read_tree(&backup);
    }
    let mut current = read_tree(path)?;
    // Our own leftovers from a crashed write are not part of what was there.
    current.retain(|relative, _| !is_temp(relative));
    let tmp = path.join(BACKUP_TMP);
    remove_all(&tmp)?;
    create_dir_all(&tmp)?;
    reconcile(&tmp, &current)?;
    fs::rename(&tmp, &backup).map_err(io_error("renaming", &tmp))?;
    sync_dir(path)?;
    tracing::info!(backup = %backup.display(), entries = current.len(), "backed up the registry configuration");
    Ok(current)
}

/// Reads a tree, skipping our own bookkeeping at its top level.
fn read_tree(root: &Path) -> Result<Tree, MirrorError> {
    let mut tree = Tree::new();
    read_dir_into(root, Path::new(""), 0, &mut tree)?;
    Ok(tree)
}

fn read_dir_into(
    root: &Path,
    relative: &Path,
    depth: usize,
    tree: &mut Tree,
) -> Result<(), MirrorError> {
    let dir = root.join(relative);
    if depth > MAX_DEPTH {
        return Err(MirrorError::Unsupported {
            path: dir,
            reason: "nested too deep".to_owned(),
        });
    }
    let entries = fs::read_dir(&dir).map_err(io_error("listing", &dir))?;
    for entry in entries {
        let entry = entry.map_err(io_error("listing", &dir))?;
        let name = entry.file_name();
        if depth == 0 && (name == BACKUP || name == BACKUP_TMP) {
            continue;
        }
        let relative = relative.join(&name);
        let path = root.join(&relative);
        let meta = fs::symlink_metadata(&path).map_err(io_error("inspecting", &path))?;
        let mode = meta.permissions().mode() & 0o7777;
        let node = if meta.is_dir() {
            Node::Dir { mode }
        } else if meta.file_type().is_symlink() {
            Node::Symlink {
                target: fs::read_link(&path).map_err(io_error("reading", &path))?,
            }
        } else if meta.is_file() {
            if meta.len() > MAX_FILE_SIZE {
                return Err(MirrorError::Unsupported {
                    path,
                    reason: format!("larger than {MAX_FILE_SIZE} bytes"),
                });
            }
            Node::File {
                content: fs::read(&path).map_err(io_error("reading", &path))?,
                mode,
            }
        } else {
            return Err(MirrorError::Unsupported {
                path,
                reason: "not a file, directory or symlink".to_owned(),
            });
        };
        let is_dir = matches!(node, Node::Dir { .. });
        tree.insert(relative.clone(), node);
        if tree.len() > MAX_ENTRIES {
            return Err(MirrorError::Unsupported {
                path: root.to_owned(),
                reason: format!("more than {MAX_ENTRIES} entries"),
            });
        }
        if is_dir {
            read_dir_into(root, &relative, depth + 1, tree)?;
        }
    }
    Ok(())
}

/// Makes `root` hold exactly `desired` (our bookkeeping at its top level aside): removes what
/// is not wanted, creates directories, and replaces every file that differs atomically
/// (temporary file + rename), so containerd, which re-reads hosts.toml on every pull, never
/// sees a half-written one.
fn reconcile(root: &Path, desired: &Tree) -> Result<(), MirrorError> {
    let current = read_tree(root)?;
    let mut removed: Vec<&Path> = Vec::new();
    for (relative, node) in &current {
        if removed.iter().any(|r| relative.starts_with(r)) {
            continue;
        }
        let keep = match (node, desired.get(relative)) {
            (Node::Dir { .. }, Some(Node::Dir { .. })) => true,
            (Node::Dir { .. }, _) => false,
            (_, Some(Node::Dir { .. }) | None) => false,
            (_, Some(_)) => true, // a file or symlink: replaced below if it differs
        };
        if !keep {
            remove_all(&root.join(relative))?;
            removed.push(relative);
        }
    }
    let mut touched_dirs = BTreeSet::new();
    // BTreeMap order puts every directory before its contents.
    for (relative, node) in desired {
        let path = root.join(relative);
        let unchanged =
            !removed.iter().any(|r| relative.starts_with(r)) && current.get(relative) == Some(node);
        if unchanged {
            continue;
        }
        match node {
            Node::Dir { mode } => {
                match fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(io_error("creating", &path)(err)),
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(io_error("setting permissions of", &path))?;
            }
            Node::File { content, mode } => write_atomic(&path, content, *mode)?,
            Node::Symlink { target } => {
                let tmp = temp_path(&path);
                remove_all(&tmp)?;
                std::os::unix::fs::symlink(target, &tmp).map_err(io_error("creating", &tmp))?;
                fs::rename(&tmp, &path).map_err(io_error("renaming", &tmp))?;
            }
        }
        if let Some(parent) = path.parent() {
            touched_dirs.insert(parent.to_owned());
        }
    }
    for dir in touched_dirs {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Writes `path` through a temporary sibling (named like [`is_temp`] expects, so a crash's
/// leftover is recognised) that [`tempfile::NamedTempFile::persist`] renames into place.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), MirrorError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let result = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.unwrap_or_default()))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .and_then(|mut file| {
            file.write_all(content)?;
            file.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))?;
            file.as_file().sync_all()?;
            file.persist(path).map_err(|err| err.error)?;
            Ok(())
        });
    result.map_err(io_error("writing", path))
}

/// A sibling of `path` that no registry directory or backup entry can be named like; a
/// leftover from a crash is removed by the next reconcile since nothing desires it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{}{TEMP_SUFFIX}", name.unwrap_or_default()))
}

fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.ends_with(TEMP_SUFFIX))
}

fn sync_dir(dir: &Path) -> Result<(), MirrorError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

fn create_dir_all(path: &Path) -> Result<(), MirrorError> {
    fs::create_dir_all(path).map_err(io_error("creating", path))
}

fn exists(path: &Path) -> Result<bool, MirrorError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(io_error("inspecting", path)(err)),
    }
}

/// Removes a file, symlink or directory tree; absent is fine.
fn remove_all(path: &Path) -> Result<(), MirrorError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error("removing", path)(err)),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MirrorError {
    let path = path.to_owned();
    move |source| MirrorError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("spegel-mirror-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn config(registries: &[&str], targets: &[&str], resolve_tags: bool) -> MirrorConfig {
        MirrorConfig {
            registries: registries
                .iter()
                .map(|r| r.parse::<Registry>().unwrap())
                .collect(),
            targets: targets.iter().map(|t| parse_target(t).unwrap()).collect(),
            resolve_tags,
        }
    }

    /// Everything under `root`, as comparable data.
    fn snapshot(root: &Path) -> Tree {
        let mut tree = Tree::new();
        // Unlike `read_tree`, include the backup: tests want to see it.
        for entry in fs::read_dir(root).unwrap() {
            let name = PathBuf::from(entry.unwrap().file_name());
            let path = root.join(&name);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                tree.insert(
                    name.clone(),
                    Node::Dir {
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
                for (relative, node) in read_tree(&path).unwrap() {
                    tree.insert(name.join(relative), node);
                }
            } else {
                let mut one = Tree::new();
                read_dir_into(root, Path::new(""), 0, &mut one).unwrap();
                tree.insert(name.clone(), one.remove(&name).unwrap());
            }
        }
        tree
    }

    #[test]
    fn the_upstreams_tls_settings_survive() {
        let ours = "# header\nserver = \"https://r.test:5443\"\n\n[host.\"http://10.0.0.1:5000\"]\n  capabilities = [\"pull\"]\n";
        let previous = "server = \"https://r.test:5443\"\nca = \"/etc/r/ca.crt\"\nclient = [\n  [\"/c.crt\", \"/c.key\"],\n]\nskip_verify = false\noverride_path = true\n\n[host.\"https://m.test\"]\n  ca = \"/m.crt\"\n";
        assert_eq!(
            keep_server_tls(ours, previous),
            "# header\nserver = \"https://r.test:5443\"\n# The upstream's TLS settings, kept from the file this one replaced:\nca = \"/etc/r/ca.crt\"\nclient = [\n  [\"/c.crt\", \"/c.key\"],\n]\nskip_verify = false\n\n[host.\"http://10.0.0.1:5000\"]\n  capabilities = [\"pull\"]\n"
        );
        assert_eq!(keep_server_tls(ours, "server = \"https://x\"\n"), ours);
        assert_eq!(
            keep_server_tls(ours, "[host.\"https://m\"]\n  ca = \"/m.crt\"\n"),
            ours
        );
    }

    #[test]
    fn configure_keeps_the_replaced_files_ca_and_undo_restores_it() {
        let dir = TempDir::new("keep-ca");
        let root = &dir.0;
        fs::create_dir_all(root.join("r.test:5443")).unwrap();
        let original = "server = \"https://r.test:5443\"\nca = \"/etc/r/ca.crt\"\n";
        fs::write(root.join("r.test:5443/hosts.toml"), original).unwrap();
        let config = config(&["https://r.test:5443"], &["http://10.0.0.1:5000"], false);
        for _ in 0..2 {
            configure(root, &config).unwrap();
            let written = fs::read_to_string(root.join("r.test:5443/hosts.toml")).unwrap();
            assert!(written.contains("\nca = \"/etc/r/ca.crt\"\n"), "{written}");
            assert_eq!(written.matches("ca = ").count(), 1, "{written}");
            assert!(
                written.contains("[host.\"http://10.0.0.1:5000\"]"),
                "{written}"
            );
        }
        assert!(undo(root).unwrap());
        assert_eq!(
            fs::read_to_string(root.join("r.test:5443/hosts.toml")).unwrap(),
            original
        );
    }

    fn populate(root: &Path) {
        fs::create_dir_all(root.join("docker.io")).unwrap();
        fs::write(
            root.join("docker.io/hosts.toml"),
            "server = \"https://mirror.example\"\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("private.test:5000")).unwrap();
        fs::write(
            root.join("private.test:5000/hosts.toml"),
            "server = \"https://private.test:5000\"\n",
        )
        .unwrap();
        fs::write(root.join("private.test:5000/ca.crt"), "CERT").unwrap();
        fs::set_permissions(
            root.join("private.test:5000/ca.crt"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("private.test:5000", root.join("alias.test")).unwrap();
    }

    #[test]
    fn writes_exact_files() {
        let files = hosts_files(&config(
            &[
                "https://docker.io",
                "http://10.1.2.3:5000/",
                "https://[fd00::1]:5443",
            ],
            &[
                "http://127.0.0.1:5000",
                "http://10.0.0.2:30020",
                "http://127.0.0.1:5000",
            ],
            true,
        ))
        .unwrap();
        let header = "# Written by `spegel configure-mirror`; `spegel configure-mirror --undo` restores what was here before.\n";
        let hosts = "\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"200ms\"\n\
                     \n[host.\"http://10.0.0.2:30020\"]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = \"200ms\"\n";
        assert_eq!(
            files,
            BTreeMap::from([
                (
                    "docker.io".to_owned(),
                    format!("{header}server = \"https://registry-1.docker.io\"\n{hosts}")
                ),
                (
                    "10.1.2.3:5000".to_owned(),
                    format!("{header}server = \"http://10.1.2.3:5000\"\n{hosts}")
                ),
                (
                    "[fd00::1]:5443".to_owned(),
                    format!("{header}server = \"https://[fd00::1]:5443\"\n{hosts}")
                ),
            ])
        );
        let files = hosts_files(&config(&[], &["http://127.0.0.1:5000"], false)).unwrap();
        assert_eq!(
            files,
            BTreeMap::from([(
                "_default".to_owned(),
                format!(
                    "{header}\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\"]\n  dial_timeout = \"200ms\"\n"
                )
            )])
        );
    }

    #[test]
    fn configure_backs_up_is_idempotent_and_undoes_exactly() {
        let dir = TempDir::new("roundtrip");
        let root = dir.0.join("certs.d");
        fs::create_dir_all(&root).unwrap();
        populate(&root);
        let before = snapshot(&root);

        let first = config(
            &["https://docker.io", "http://10.1.2.3:5000"],
            &["http://127.0.0.1:5000"],
            true,
        );
        let written = configure(&root, &first).unwrap();
        assert_eq!(
            written,
            vec![
                root.join("10.1.2.3:5000/hosts.toml"),
                root.join("docker.io/hosts.toml")
            ]
        );
        let after = snapshot(&root);
        // The backup holds exactly what was there.
        let backup: Tree = after
            .iter()
            .filter_map(|(p, n)| Some((p.strip_prefix(BACKUP).ok()?.to_owned(), n.clone())))
            .filter(|(p, _)| !p.as_os_str().is_empty())
            .collect();
        assert_eq!(backup, before);
        // Ours replaced docker.io's; other registries' files are untouched.
        let docker = fs::read_to_string(root.join("docker.io/hosts.toml")).unwrap();
        assert!(
            docker.contains("server = \"https://registry-1.docker.io\""),
            "{docker}"
        );
        assert_eq!(
            fs::read(root.join("private.test:5000/ca.crt")).unwrap(),
            b"CERT"
        );
        assert_eq!(
            fs::read_link(root.join("alias.test")).unwrap(),
            Path::new("private.test:5000")
        );

        // Twice: the same result, and the backup is not retaken over our own files.
        configure(&root, &first).unwrap();
        assert_eq!(snapshot(&root), after);

        // A different registry list leaves nothing of the previous one behind.
        let second = config(&[], &["http://127.0.0.1:5000"], false);
        configure(&root, &second).unwrap();
        assert!(!root.join("10.1.2.3:5000").exists());
        assert_eq!(
            fs::read_to_string(root.join("docker.io/hosts.toml")).unwrap(),
            "server = \"https://mirror.example\"\n"
        );
        assert!(
            fs::read_to_string(root.join("_default/hosts.toml"))
                .unwrap()
                .contains("[\"pull\"]")
        );

        assert!(undo(&root).unwrap());
        assert_eq!(snapshot(&root), before);
        assert!(!undo(&root).unwrap(), "a second undo has nothing to do");
        assert_eq!(snapshot(&root), before);
    }

    #[test]
    fn works_on_a_missing_or_empty_directory() {
        let dir = TempDir::new("empty");
        let root = dir.0.join("certs.d");
        configure(
            &root,
            &config(&["https://ghcr.io"], &["http://127.0.0.1:5000"], true),
        )
        .unwrap();
        assert!(root.join("ghcr.io/hosts.toml").is_file());
        assert!(root.join(BACKUP).is_dir());
        assert!(undo(&root).unwrap());
        assert!(
            fs::read_dir(&root).unwrap().next().is_none(),
            "the directory is empty again"
        );
    }

    #[test]
    fn recovers_from_interrupted_runs() {
        let dir = TempDir::new("interrupted");
        let root = dir.0.clone();
        populate(&root);
        let before = snapshot(&root);
        // A backup that was never completed, and a temporary file left by a crashed write.
        fs::create_dir_all(root.join(BACKUP_TMP)).unwrap();
        fs::write(root.join(BACKUP_TMP).join("junk"), "x").unwrap();
        fs::write(root.join("docker.io/.hosts.toml.spegel-tmp"), "half").unwrap();
        configure(
            &root,
            &config(&["https://quay.io"], &["http://127.0.0.1:5000"], true),
        )
        .unwrap();
        assert!(!root.join(BACKUP_TMP).exists());
        assert!(!root.join("docker.io/.hosts.toml.spegel-tmp").exists());
        assert!(undo(&root).unwrap());
        // The leftover was ours, not part of the configuration: it is not restored.
        assert_eq!(snapshot(&root), before);
    }

    #[test]
    fn rejects_bad_input() {
        // A registry without a scheme is `https` (the grammar `run` and `install-ca` share); a
        // mirror target must say its scheme.
        assert_eq!(
            "docker.io".parse::<Registry>().map(|r| r.url()),
            Ok("https://docker.io".to_owned())
        );
        assert!(parse_target("docker.io").is_err());
        for bad in [
            "ftp://docker.io",
            "https://",
            "https://user:pw@docker.io",
            "https://docker.io/v2",
            "https://docker.io?x=1",
            "https://docker.io#x",
            "https://..",
            "https://../etc",
            "https://a/../b",
            "https://.",
            "https://a..b",
            "https://-a.test",
            "https://docker.io:",
            "https://docker.io:0",
            "https://docker.io:65536",
            "https://docker.io:5000:1",
            "https://[::1",
            "https://[nope]:5000",
            "https://::1",
            "https://a b",
            "https://a\"b",
            "https://a\\b",
            "HTTPS://docker.io",
        ] {
            assert!(bad.parse::<Registry>().is_err(), "{bad}");
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        let dir = TempDir::new("bad");
        let err = configure(&dir.0, &config(&["https://docker.io"], &[], true)).unwrap_err();
        assert!(err.to_string().contains("--mirror-targets"), "{err}");
        let err = hosts_files(&config(
            &["https://r.test", "http://r.test"],
            &["http://127.0.0.1:1"],
            true,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("r.test"), "{err}");
        assert!(
            fs::read_dir(&dir.0).unwrap().next().is_none(),
            "nothing written on bad input"
        );
    }

    #[test]
    fn server_urls() {
        for (registry, server) in [
            ("docker.io", "https://registry-1.docker.io"),
            ("http://docker.io:5000", "http://registry-1.docker.io:5000"),
            ("registry-1.docker.io", "https://registry-1.docker.io"),
            ("ghcr.io/", "https://ghcr.io"),
            ("http://[fd00::1]:5000", "http://[fd00::1]:5000"),
            ("10.1.2.3", "https://10.1.2.3"),
        ] {
            let parsed: Registry = registry.parse().unwrap();
            assert_eq!(server_url(&parsed), server, "{registry}");
        }
    }

    #[test]
    fn refuses_special_files() {
        let dir = TempDir::new("special");
        let socket = dir.0.join("registry.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = configure(&dir.0, &config(&[], &["http://127.0.0.1:5000"], true)).unwrap_err();
        assert!(matches!(err, MirrorError::Unsupported { .. }), "{err}");
        assert!(!dir.0.join(BACKUP).exists());
    }

    #[test]
    fn cli_flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: MirrorArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--mirrored-registries",
            "https://docker.io,http://10.1.2.3:5000",
            "--mirror-targets",
            "http://127.0.0.1:5000",
            "--resolve-tags=false",
        ])
        .unwrap();
        assert_eq!(
            cli.args.containerd_registry_config_path,
            Path::new("/etc/containerd/certs.d")
        );
        let registries: RegistryList = cli.args.mirrored_registries.into_iter().collect();
        assert_eq!(registries.len(), 2);
        assert_eq!(registries[1].authority(), "10.1.2.3:5000");
        assert!(!cli.args.resolve_tags);
        let cli = Cli::try_parse_from(["x", "--mirror-targets", "http://127.0.0.1:5000"]).unwrap();
        assert!(cli.args.resolve_tags && cli.args.mirrored_registries.iter().all(|l| l.is_empty()));
        assert!(Cli::try_parse_from(["x"]).is_err(), "targets are required");
        assert!(Cli::try_parse_from(["x", "--undo"]).is_ok());
        assert!(Cli::try_parse_from(["x", "--mirror-targets", "http://127.0.0.1:5000/x"]).is_err());
    }
}
