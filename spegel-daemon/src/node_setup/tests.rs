use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use super::*;
use crate::tls::args::CaArgs;

/// A node root: Debian trust store layout, system roots, systemd.
fn node_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("usr/local/share/ca-certificates")).unwrap();
    fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    fs::write(
        root.join("etc/ssl/certs/ca-certificates.crt"),
        "SYSTEM ROOTS",
    )
    .unwrap();
    root
}

/// Every file under `dir` (and every directory, as `None`) with its contents.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.clone());
                out.insert(path, None);
            } else {
                out.insert(path.clone(), Some(fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn args(dir: &Path, restart_command: String) -> NodeSetupArgs {
    NodeSetupArgs {
        trust: TrustArgs {
            data_dir: dir.join("data"),
            mirrored_registries: vec!["docker.io".parse().unwrap()],
            trust_root: dir.join("root"),
            ca: CaArgs::default(),
            bundle: None,
            containerd_unit: "containerd.service".to_owned(),
            host_wide: false,
        },
        restart_command,
        undo: false,
    }
}

/// A restart command appending the unit to `log`.
fn counting(log: &Path) -> String {
    format!("sh -c 'echo {{unit}} >> {}'", log.display())
}

fn restarts(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn restarts_once_when_trust_changes_and_undo_puts_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = node_root(dir.path());
    let log = dir.path().join("restarts");
    let pristine = tree(&root);
    let args = args(dir.path(), counting(&log));

    assert_eq!(run(&args).unwrap(), Done::Restarted);
    assert_eq!(restarts(&log), ["containerd.service"]);
    let drop_in = root.join("etc/systemd/system/containerd.service.d/50-spegel-trust.conf");
    assert!(drop_in.is_file());
    let bundle = args.trust.data_dir.join("containerd-trust.pem");
    assert!(bundle.is_file());

    // Again: nothing changed, nothing restarted.
    assert_eq!(run(&args).unwrap(), Done::Unchanged);
    assert_eq!(restarts(&log).len(), 1);

    // Undo: the node's files as before, the bundle gone, one more restart.
    let undo = NodeSetupArgs {
        undo: true,
        ..args.clone()
    };
    assert_eq!(run(&undo).unwrap(), Done::Restarted);
    assert_eq!(restarts(&log).len(), 2);
    assert_eq!(tree(&root), pristine);
    assert!(!bundle.exists());
    assert!(!args.trust.data_dir.join(ledger::LEDGER_DIR).exists());
    assert_eq!(scoped::read_scope(&args.trust.data_dir.join("ca")), None);
    // Undo again: nothing to do.
    assert_eq!(run(&undo).unwrap(), Done::Unchanged);
    assert_eq!(restarts(&log).len(), 2);
}

#[test]
fn undo_restores_what_was_there_before() {
    let dir = tempfile::tempdir().unwrap();
    let root = node_root(dir.path());
    // An earlier host-wide install and someone else's drop-in content at our path.
    let anchor = root.join("usr/local/share/ca-certificates/spegel-node-ca.crt");
    fs::write(&anchor, "OLD NODE CA").unwrap();
    let drop_in_dir = root.join("etc/systemd/system/containerd.service.d");
    fs::create_dir_all(&drop_in_dir).unwrap();
    fs::write(drop_in_dir.join("50-spegel-trust.conf"), "[Service]\n").unwrap();
    let pristine = tree(&root);
    let log = dir.path().join("restarts");
    let args = args(dir.path(), counting(&log));
    assert_eq!(run(&args).unwrap(), Done::Restarted);
    assert!(
        !anchor.exists(),
        "the default install removes host-wide trust"
    );
    run(&NodeSetupArgs { undo: true, ..args }).unwrap();
    assert_eq!(tree(&root), pristine);
    assert_eq!(restarts(&log).len(), 2);
}

#[test]
fn a_failed_restart_is_retried_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    node_root(dir.path());
    let log = dir.path().join("restarts");
    let failing = args(dir.path(), "false".to_owned());
    let err = run(&failing).unwrap_err();
    assert!(format!("{err:#}").contains("not restarted"), "{err:#}");
    // Nothing changes on disk now, but containerd still owes its restart.
    let args = args(dir.path(), counting(&log));
    assert_eq!(run(&args).unwrap(), Done::Restarted);
    assert_eq!(restarts(&log).len(), 1);
    assert_eq!(run(&args).unwrap(), Done::Unchanged);
}

#[test]
fn bad_units_and_commands_are_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = node_root(dir.path());
    let pristine = tree(&root);
    let mut bad_unit = args(dir.path(), "true".to_owned());
    bad_unit.trust.containerd_unit = "x; reboot".to_owned();
    assert!(run(&bad_unit).is_err());
    assert!(run(&args(dir.path(), "'unterminated".to_owned())).is_err());
    assert_eq!(tree(&root), pristine);
    assert!(!dir.path().join("data").exists());
}
