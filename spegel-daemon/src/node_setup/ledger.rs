//! What `node-setup` changed on the node, kept in `<data-dir>/node-setup/` so `--undo` reverses
//! exactly that: each file it wrote or removed with what was there before (a backup copy, or
//! "absent"), the directories it created, and whether containerd still owes a restart.
use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::tls::scoped::write_if_changed;

/// The ledger's folder under the data directory.
pub const LEDGER_DIR: &str = "node-setup";
const LEDGER_FILE: &str = "ledger.json";

/// One file `node-setup` changed, and how it was before its first change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: PathBuf,
    /// The copy of the previous contents in the ledger folder; `None`: the file did not exist.
    pub backup: Option<String>,
    /// The previous permission bits.
    pub mode: Option<u32>,
}

/// What `node-setup` changed, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// containerd's unit the changes were for (restarted by `--undo`).
    pub unit: String,
    pub files: Vec<FileChange>,
    /// Directories created, parents first.
    pub created_dirs: Vec<PathBuf>,
    /// Files changed but containerd not (successfully) restarted since.
    pub restart_pending: bool,
}

/// A file's state before an install.
#[derive(Debug, Clone)]
pub struct Before {
    path: PathBuf,
    contents: Option<Vec<u8>>,
    mode: Option<u32>,
    /// Ancestors (up to the first existing one) that did not exist, nearest last.
    missing_dirs: Vec<PathBuf>,
}

/// The state of each of `paths`. Blocking.
pub fn snapshot(paths: &[PathBuf]) -> anyhow::Result<Vec<Before>> {
    paths
        .iter()
        .map(|path| -> anyhow::Result<Before> {
            let (contents, mode) = match fs::read(path) {
                Ok(bytes) => (Some(bytes), Some(fs::metadata(path)?.permissions().mode())),
                Err(err) if err.kind() == io::ErrorKind::NotFound => (None, None),
                Err(err) => {
                    return Err(err).with_context(|| format!("cannot read {}", path.display()));
                }
            };
            let mut missing_dirs: Vec<PathBuf> = path
                .ancestors()
                .skip(1)
                .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
                .map(Path::to_owned)
                .collect();
            missing_dirs.reverse();
            Ok(Before {
                path: path.clone(),
                contents,
                mode,
                missing_dirs,
            })
        })
        .collect()
}

impl Ledger {
    fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(LEDGER_DIR).join(LEDGER_FILE)
    }

    /// The ledger in `data_dir`, if `node-setup` left one. Blocking.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(data_dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not a node-setup ledger", path.display())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the ledger to `data_dir` (atomically). Blocking.
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let dir = data_dir.join(LEDGER_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(self).context("cannot encode the ledger")?;
        write_if_changed(&Self::path(data_dir), &json, 0o600)?;
        Ok(())
    }

    /// Records every file of `before` whose contents differ now (keeping the state before the
    /// *first* change of a file already recorded), and the directories created for them.
    /// Returns whether any file changed. Blocking.
    pub fn record(&mut self, data_dir: &Path, before: &[Before]) -> anyhow::Result<bool> {
        let mut changed = false;
        for state in before {
            let now = match fs::read(&state.path) {
                Ok(bytes) => Some(bytes),
                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("cannot read {}", state.path.display()));
                }
            };
            if now == state.contents {
                continue;
            }
            changed = true;
            for dir in &state.missing_dirs {
                if dir.exists() && !self.created_dirs.contains(dir) {
                    self.created_dirs.push(dir.clone());
                }
            }
            if self.files.iter().any(|change| change.path == state.path) {
                continue;
            }
            let backup = match &state.contents {
                Some(contents) => {
                    let name = format!("backup-{}", self.files.len());
                    let dir = data_dir.join(LEDGER_DIR);
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    write_if_changed(&dir.join(&name), contents, 0o600)?;
                    Some(name)
                }
                None => None,
            };
            self.files.push(FileChange {
                path: state.path.clone(),
                backup,
                mode: state.mode,
            });
        }
        Ok(changed)
    }

    /// Puts every recorded file back as it was and removes the directories created (when
    /// empty), newest first; calls `restored` with each file's path. Blocking.
    pub fn restore(
        &self,
        data_dir: &Path,
        mut restored: impl FnMut(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        for change in self.files.iter().rev() {
            match &change.backup {
                Some(name) => {
                    let backup = data_dir.join(LEDGER_DIR).join(name);
                    let contents = fs::read(&backup)
                        .with_context(|| format!("cannot read the backup {}", backup.display()))?;
                    write_if_changed(&change.path, &contents, change.mode.unwrap_or(0o644))?;
                }
                None => match fs::remove_file(&change.path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("cannot remove {}", change.path.display()));
                    }
                },
            }
            restored(&change.path)?;
        }
        for dir in self.created_dirs.iter().rev() {
            // Only if empty: whatever else was put there since is not ours to remove.
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    /// Removes the ledger folder. Blocking.
    pub fn remove(data_dir: &Path) -> anyhow::Result<()> {
        let dir = data_dir.join(LEDGER_DIR);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_exactly_what_was_there_before_the_first_change() {
        let dir = tempfile::tempdir().unwrap();
        let (data, node) = (dir.path().join("data"), dir.path().join("node"));
        fs::create_dir_all(&node).unwrap();
        let existing = node.join("existing.conf");
        fs::write(&existing, "old").unwrap();
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o640)).unwrap();
        let created = node.join("unit.d/new.conf");
        let untouched = node.join("untouched");
        let paths = vec![existing.clone(), created.clone(), untouched.clone()];

        let mut ledger = Ledger::default();
        let before = snapshot(&paths).unwrap();
        assert!(
            !ledger.record(&data, &before).unwrap(),
            "nothing changed yet"
        );
        fs::write(&existing, "new").unwrap();
        fs::create_dir_all(created.parent().unwrap()).unwrap();
        fs::write(&created, "ours").unwrap();
        assert!(ledger.record(&data, &before).unwrap());
        assert_eq!(ledger.files.len(), 2);
        assert_eq!(ledger.created_dirs, [node.join("unit.d")]);
        ledger.save(&data).unwrap();

        // A second change keeps the first "before".
        let before = snapshot(&paths).unwrap();
        fs::write(&existing, "newer").unwrap();
        let mut ledger = Ledger::load(&data).unwrap().unwrap();
        assert!(ledger.record(&data, &before).unwrap());
        assert_eq!(ledger.files.len(), 2);

        let mut seen = Vec::new();
        ledger
            .restore(&data, |path| {
                seen.push(path.to_owned());
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [created.clone(), existing.clone()]);
        assert_eq!(fs::read_to_string(&existing).unwrap(), "old");
        assert_eq!(
            fs::metadata(&existing).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(!created.exists() && !node.join("unit.d").exists());
        assert!(!untouched.exists());
        Ledger::remove(&data).unwrap();
        assert_eq!(Ledger::load(&data).unwrap(), None);
    }
}
