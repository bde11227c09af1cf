//! The `install-ca` subcommand: makes containerd trust the node CA bundle (`continuity.rs`: the
//! current CA and, while one waits, the next CA). By default only containerd: a bundle of the
//! system roots plus the node CA for its `SSL_CERT_FILE`, and a systemd drop-in setting it
//! (`scoped.rs`). With `--host-wide`, the host trust store (Debian or RHEL layout) instead; or
//! the bundle printed. Every install is recorded (`trust.rs`), so the daemon knows when a
//! containerd restarted after it trusts the next CA.
use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use anyhow::Context as _;

use super::{
    args::CaArgs,
    ca::write_file_atomically,
    continuity::CaSet,
    names::PermittedNames,
    scoped::{self, Scope},
    trust::record_install,
};
use crate::oci::RegistryList;

/// The name the CA gets in the host trust store.
const TRUST_FILE_NAME: &str = "spegel-node-ca.crt";

/// Which CA containerd is made to trust, and how: the flags `install-ca` and `node-setup` share.
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// Where the daemon keeps its state; the CA lives in `<data-dir>/ca/`.
    #[arg(long, env = "SPEGEL_DATA_DIR", default_value = "/var/lib/spegel")]
    pub data_dir: PathBuf,
    /// Registries the node CA may vouch for (`[http(s)://]host[:port]`, comma-separated or the
    /// flag repeated): the same flag, environment variable, grammar and default as `spegel run`,
    /// so both mint the same CA.
    #[arg(
        long,
        env = "SPEGEL_MIRRORED_REGISTRIES",
        default_values_t = [crate::intercept::registries::default_mirrored_registries()]
    )]
    pub mirrored_registries: Vec<RegistryList>,
    /// Operate on the node under this root instead of `/`: its system roots, systemd unit
    /// directory and trust store (the trust store's refresh command is then not run: it only
    /// knows the real root).
    #[arg(long, env = "SPEGEL_TRUST_ROOT", default_value = "/")]
    pub trust_root: PathBuf,
    #[command(flatten)]
    pub ca: CaArgs,
    /// Where to write containerd's trust bundle (the system roots plus the node CA bundle, for
    /// its `SSL_CERT_FILE`); default `<data-dir>/containerd-trust.pem`. The running daemon keeps
    /// it in step with the system roots and the node CA.
    #[arg(long, env = "SPEGEL_CA_BUNDLE", value_name = "OUT")]
    pub bundle: Option<PathBuf>,
    /// containerd's systemd unit: when `<trust-root>/etc/systemd/system` exists, a drop-in
    /// `<unit>.d/50-spegel-trust.conf` there sets its `SSL_CERT_FILE` to the bundle.
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_UNIT",
        default_value = "containerd.service"
    )]
    pub containerd_unit: String,
    /// Install into the host trust store instead, so that every process on the node trusts the
    /// node CA for the mirrored registries (not only containerd).
    #[arg(long, env = "SPEGEL_CA_HOST_WIDE", conflicts_with = "bundle")]
    pub host_wide: bool,
}

impl TrustArgs {
    /// containerd's trust bundle (absolute): `--bundle`, or `<data-dir>/containerd-trust.pem`.
    pub fn bundle_path(&self) -> io::Result<PathBuf> {
        std::path::absolute(
            self.bundle
                .clone()
                .unwrap_or_else(|| self.data_dir.join(scoped::DEFAULT_BUNDLE_FILE)),
        )
    }

    /// Every file an install may write or remove on the node (whether or not it exists): the
    /// bundle, the drop-in, the host trust store's anchors (both layouts).
    pub fn touched_files(&self) -> io::Result<Vec<PathBuf>> {
        let root = &self.trust_root;
        let mut files = vec![
            self.bundle_path()?,
            scoped::drop_in_path(root, &self.containerd_unit),
        ];
        files.extend(TrustLayout::ALL.map(|layout| layout.anchor_path(root)));
        Ok(files)
    }
}

/// Flags of the `install-ca` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCaArgs {
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Only print the CA bundle (PEM: the current CA and, while one waits, the next) on stdout,
    /// for installing elsewhere; recorded as installed like the other forms.
    #[arg(long, env = "SPEGEL_CA_PRINT", conflicts_with_all = ["bundle", "host_wide"])]
    pub print: bool,
}

/// Where a distribution keeps locally added CAs and how it rebuilds its bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustLayout {
    /// Debian, Ubuntu: `update-ca-certificates`.
    Debian,
    /// RHEL, Fedora, Azure Linux: `update-ca-trust extract`.
    Rhel,
}

impl TrustLayout {
    const ALL: [TrustLayout; 2] = [TrustLayout::Debian, TrustLayout::Rhel];

    fn detect(root: &Path) -> Option<Self> {
        if root.join("etc/pki/ca-trust/source/anchors").is_dir() {
            Some(TrustLayout::Rhel)
        } else if root.join("usr/local/share/ca-certificates").is_dir() {
            Some(TrustLayout::Debian)
        } else {
            None
        }
    }

    fn anchor_path(self, root: &Path) -> PathBuf {
        match self {
            TrustLayout::Debian => root.join("usr/local/share/ca-certificates"),
            TrustLayout::Rhel => root.join("etc/pki/ca-trust/source/anchors"),
        }
        .join(TRUST_FILE_NAME)
    }

    fn refresh_command(self) -> (&'static str, &'static [&'static str]) {
        match self {
            TrustLayout::Debian => ("update-ca-certificates", &[]),
            TrustLayout::Rhel => ("update-ca-trust", &["extract"]),
        }
    }

    /// Rebuilds the trust store on the real root; under another root only says it did not.
    fn refresh(self, root: &Path) -> anyhow::Result<()> {
        let (program, program_args) = self.refresh_command();
        if root != Path::new("/") {
            println!(
                "alternate trust root {}: not running {program}",
                root.display()
            );
            return Ok(());
        }
        let status = Command::new(program)
            .args(program_args)
            .status()
            .with_context(|| format!("cannot run {program}"))?;
        anyhow::ensure!(status.success(), "{program} failed: {status}");
        Ok(())
    }
}

/// Run the `install-ca` subcommand.
pub async fn main(args: InstallCaArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || install(&args).map(drop)).await?
}

/// Whether an install changed what containerd reads (so it must be restarted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

fn install(args: &InstallCaArgs) -> anyhow::Result<Outcome> {
    if args.print {
        let cas = open_cas(&args.trust)?;
        print!("{}", cas.bundle_pem());
        record_install(cas.dir(), cas.bundle_fingerprints())?;
        return Ok(Outcome::Changed);
    }
    let outcome = install_trust(&args.trust)?;
    match outcome {
        Outcome::Changed => println!(
            "containerd must be restarted to trust it (Go loads its roots once per process): \
             systemctl daemon-reload && systemctl restart {}",
            args.trust.containerd_unit
        ),
        Outcome::Unchanged => println!("nothing changed: containerd needs no restart"),
    }
    Ok(outcome)
}

fn open_cas(args: &TrustArgs) -> anyhow::Result<CaSet> {
    let permitted = PermittedNames::from_registries(args.mirrored_registries.iter().flatten())?;
    Ok(CaSet::open(
        &args.data_dir,
        permitted,
        args.ca.policy()?,
        Arc::default(),
    )?)
}

/// Makes containerd trust the node CA bundle as `args` say (scoped by default, or host-wide),
/// creating the CA if needed. Prints what it wrote or kept; never restarts containerd. Blocking.
pub fn install_trust(args: &TrustArgs) -> anyhow::Result<Outcome> {
    let cas = open_cas(args)?;
    if args.host_wide {
        install_host_wide(args, &cas)
    } else {
        install_scoped(args, &cas)
    }
}

/// Rebuilds the host trust store under `root` if `path` is one of its anchors (after an anchor
/// was restored or removed). Blocking.
pub fn refresh_if_anchor(root: &Path, path: &Path) -> anyhow::Result<()> {
    for layout in TrustLayout::ALL {
        if layout.anchor_path(root) == path {
            layout.refresh(root)?;
        }
    }
    Ok(())
}

/// The default: the bundle for containerd's `SSL_CERT_FILE` and the drop-in setting it; the host
/// trust store holds no node CA afterwards.
fn install_scoped(args: &TrustArgs, cas: &CaSet) -> anyhow::Result<Outcome> {
    let root = &args.trust_root;
    let bundle = args
        .bundle_path()
        .context("cannot resolve the bundle path")?;
    let (system_roots, roots) = scoped::find_system_roots(root)?;
    let system_roots = std::path::absolute(system_roots)?;
    let mut changed = scoped::write_if_changed(
        &bundle,
        &scoped::bundle_bytes(&roots, &cas.bundle_pem()),
        0o644,
    )?;
    println!(
        "{} {} (system roots from {} plus the spegel node CA bundle)",
        if changed { "wrote" } else { "kept" },
        bundle.display(),
        system_roots.display()
    );
    // The daemon keeps this bundle in step from now on.
    scoped::record_scope(
        cas.dir(),
        &Scope {
            bundle: bundle.clone(),
            system_roots,
        },
    )?;
    if root.join(scoped::SYSTEMD_UNIT_DIR).is_dir() {
        let drop_in = scoped::drop_in_path(root, &args.containerd_unit);
        let text = scoped::drop_in(&as_seen_from(root, &bundle))?;
        if let Some(dir) = drop_in.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let wrote = scoped::write_if_changed(&drop_in, text.as_bytes(), 0o644)?;
        println!(
            "{} {}",
            if wrote { "wrote" } else { "kept" },
            drop_in.display()
        );
        changed |= wrote;
    } else {
        println!(
            "no systemd unit directory under {}: start containerd with SSL_CERT_FILE={}",
            root.display(),
            as_seen_from(root, &bundle).display()
        );
    }
    changed |= remove_host_wide(root)?;
    // Recorded once the bundle holds them: a containerd started after this trusts them.
    record_install(cas.dir(), cas.bundle_fingerprints())?;
    Ok(if changed {
        Outcome::Changed
    } else {
        Outcome::Unchanged
    })
}

/// `path` as the node under `root` names it: without the root's prefix.
fn as_seen_from(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(root) {
        Ok(rest) if root != Path::new("/") => Path::new("/").join(rest),
        _ => path.to_owned(),
    }
}

/// Removes a node CA an earlier host-wide install left in the host trust store (and rebuilds
/// it): in the default mode no process but containerd trusts the node CA. Returns whether there
/// was one.
fn remove_host_wide(root: &Path) -> anyhow::Result<bool> {
    let mut removed = false;
    for layout in TrustLayout::ALL {
        let anchor = layout.anchor_path(root);
        match fs::remove_file(&anchor) {
            Ok(()) => {
                println!(
                    "removed {} (host-wide trust is only installed with --host-wide)",
                    anchor.display()
                );
                layout.refresh(root)?;
                removed = true;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot remove {}", anchor.display()));
            }
        }
    }
    Ok(removed)
}

/// `--host-wide`: the node CA bundle into the host trust store; every process on the node trusts
/// it.
fn install_host_wide(args: &TrustArgs, cas: &CaSet) -> anyhow::Result<Outcome> {
    let pem = cas.bundle_pem();
    let layout = TrustLayout::detect(&args.trust_root).with_context(|| {
        format!(
            "unknown trust store layout under {}: neither usr/local/share/ca-certificates \
             (Debian/Ubuntu) nor etc/pki/ca-trust/source/anchors (RHEL/Azure Linux) exists",
            args.trust_root.display()
        )
    })?;
    let anchor = layout.anchor_path(&args.trust_root);
    let unchanged = fs::read(&anchor).is_ok_and(|old| old == pem.as_bytes());
    if !unchanged {
        write_file_atomically(&anchor, pem.as_bytes(), 0o644)?;
    }
    println!(
        "{} the spegel node CA bundle at {} (host-wide: every process on the node trusts it)",
        if unchanged { "kept" } else { "installed" },
        anchor.display()
    );
    layout.refresh(&args.trust_root)?;
    // Recorded once the trust store holds it: a containerd started after this trusts it.
    record_install(cas.dir(), cas.bundle_fingerprints())?;
    Ok(if unchanged {
        Outcome::Unchanged
    } else {
        Outcome::Changed
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{names::LeafName, names::tests::permitted};

    fn tempdir() -> PathBuf {
        tempfile::tempdir().unwrap().keep()
    }

    #[test]
    fn default_registries_make_a_valid_ca() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: InstallCaArgs,
        }
        let cli = Cli::try_parse_from(["install-ca"]).unwrap();
        let p =
            PermittedNames::from_registries(cli.args.trust.mirrored_registries.iter().flatten())
                .unwrap();
        for name in ["registry-1.docker.io", "ghcr.io", "registry.k8s.io"] {
            assert!(p.permits(&LeafName::parse(name).unwrap()), "{name}");
        }
        assert!(!p.permits(&LeafName::parse("example.com").unwrap()));
        let cli =
            Cli::try_parse_from(["install-ca", "--mirrored-registries", "a.io,b.io:5000"]).unwrap();
        let list: RegistryList = cli.args.trust.mirrored_registries.into_iter().collect();
        assert_eq!(list.to_string(), "a.io,b.io:5000");
    }

    /// A node root: Debian trust store layout with system roots, and optionally systemd.
    fn node_root(systemd: bool) -> PathBuf {
        let root = tempdir();
        fs::create_dir_all(root.join("usr/local/share/ca-certificates")).unwrap();
        fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        fs::write(
            root.join("etc/ssl/certs/ca-certificates.crt"),
            "SYSTEM ROOTS",
        )
        .unwrap();
        if systemd {
            fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
        }
        root
    }

    fn args(root: &Path, data: &Path) -> InstallCaArgs {
        InstallCaArgs {
            trust: TrustArgs {
                data_dir: data.to_owned(),
                mirrored_registries: vec!["docker.io".parse().unwrap()],
                trust_root: root.to_owned(),
                ca: CaArgs::default(),
                bundle: None,
                containerd_unit: "containerd.service".to_owned(),
                host_wide: false,
            },
            print: false,
        }
    }

    /// `args` changed by `edit`.
    fn with(root: &Path, data: &Path, edit: impl FnOnce(&mut TrustArgs)) -> InstallCaArgs {
        let mut args = args(root, data);
        edit(&mut args.trust);
        args
    }

    fn open(data: &Path) -> CaSet {
        CaSet::open(
            data,
            permitted(&["docker.io"]),
            CaArgs::default().policy().unwrap(),
            Arc::default(),
        )
        .unwrap()
    }

    #[test]
    fn by_default_only_containerd_trusts_the_ca() {
        let root = node_root(true);
        let data = tempdir();
        // A node CA an earlier host-wide install left behind.
        let anchor = root.join("usr/local/share/ca-certificates/spegel-node-ca.crt");
        fs::write(&anchor, "OLD NODE CA").unwrap();
        assert_eq!(install(&args(&root, &data)).unwrap(), Outcome::Changed);

        let cas = open(&data);
        let ca = cas.next().unwrap();
        let bundle = data.join("containerd-trust.pem");
        assert_eq!(
            fs::read_to_string(&bundle).unwrap(),
            format!("SYSTEM ROOTS\n{}", ca.cert_pem())
        );
        let drop_in = root.join("etc/systemd/system/containerd.service.d/50-spegel-trust.conf");
        let text = fs::read_to_string(&drop_in).unwrap();
        assert!(
            text.contains(&format!(
                "[Service]\nEnvironment=SSL_CERT_FILE={}\n",
                bundle.display()
            )),
            "{text}"
        );
        // The host trust store holds no node CA, and the system roots are untouched.
        assert!(!anchor.exists());
        assert_eq!(
            fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap(),
            "SYSTEM ROOTS"
        );
        let record = crate::tls::trust::read_record(cas.dir()).unwrap();
        assert_eq!(record.fingerprints, [ca.fingerprint()]);
        let scope = scoped::read_scope(cas.dir()).unwrap();
        assert_eq!(scope.bundle, bundle);
        assert_eq!(
            scope.system_roots,
            root.join("etc/ssl/certs/ca-certificates.crt")
        );

        // Again: nothing written, nothing to restart.
        let inode = |path: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(path).unwrap());
        let (bundle_inode, drop_in_inode) = (inode(&bundle), inode(&drop_in));
        assert_eq!(install(&args(&root, &data)).unwrap(), Outcome::Unchanged);
        assert_eq!(inode(&bundle), bundle_inode);
        assert_eq!(inode(&drop_in), drop_in_inode);
        assert_eq!(crate::tls::trust::read_record(cas.dir()).unwrap(), record);

        // Another unit, another bundle path: both follow.
        let other = data.join("elsewhere.pem");
        let changed = install(&with(&root, &data, |trust| {
            trust.bundle = Some(other.clone());
            trust.containerd_unit = "k3s-agent.service".to_owned();
        }))
        .unwrap();
        assert_eq!(changed, Outcome::Changed);
        let text = fs::read_to_string(
            root.join("etc/systemd/system/k3s-agent.service.d/50-spegel-trust.conf"),
        )
        .unwrap();
        assert!(text.contains(&format!("SSL_CERT_FILE={}\n", other.display())));
        assert_eq!(scoped::read_scope(cas.dir()).unwrap().bundle, other);
        for dir in [root, data] {
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_bundle_under_the_root_is_named_as_the_node_sees_it() {
        let root = node_root(true);
        let data = root.join("var/lib/spegel");
        fs::create_dir_all(&data).unwrap();
        install(&args(&root, &data)).unwrap();
        let text = fs::read_to_string(
            root.join("etc/systemd/system/containerd.service.d/50-spegel-trust.conf"),
        )
        .unwrap();
        assert!(
            text.contains("SSL_CERT_FILE=/var/lib/spegel/containerd-trust.pem\n"),
            "{text}"
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn without_systemd_only_the_bundle_is_written() {
        let root = node_root(false);
        let data = tempdir();
        assert_eq!(install(&args(&root, &data)).unwrap(), Outcome::Changed);
        assert!(data.join("containerd-trust.pem").is_file());
        assert!(!root.join("etc/systemd").exists());
        // No system roots at all: a clear error.
        let empty = tempdir();
        let err = install(&args(&empty, &data)).unwrap_err();
        assert!(err.to_string().contains("no system CA bundle"), "{err}");
        for dir in [root, data, empty] {
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn modes_exclude_each_other() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: InstallCaArgs,
        }
        let cli = Cli::try_parse_from(["install-ca"]).unwrap();
        assert!(!cli.args.trust.host_wide && !cli.args.print && cli.args.trust.bundle.is_none());
        assert_eq!(cli.args.trust.containerd_unit, "containerd.service");
        for bad in [
            &["install-ca", "--host-wide", "--bundle", "/x"][..],
            &["install-ca", "--host-wide", "--print"],
            &["install-ca", "--print", "--bundle", "/x"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_wide_installs_into_an_alternate_root() {
        let root = node_root(true);
        let data = tempdir();
        let host_wide = with(&root, &data, |trust| trust.host_wide = true);
        assert_eq!(install(&host_wide).unwrap(), Outcome::Changed);
        let installed =
            fs::read_to_string(root.join("usr/local/share/ca-certificates/spegel-node-ca.crt"))
                .unwrap();
        let cas = open(&data);
        // A first install: the CA is the next one, recorded as installed.
        let ca = cas.next().unwrap();
        assert_eq!(installed, ca.cert_pem());
        let record = crate::tls::trust::read_record(cas.dir()).unwrap();
        assert_eq!(record.fingerprints, [ca.fingerprint()]);
        // No containerd bundle and no drop-in.
        assert!(!data.join("containerd-trust.pem").exists());
        assert!(
            !root
                .join("etc/systemd/system/containerd.service.d")
                .exists()
        );
        assert_eq!(install(&host_wide).unwrap(), Outcome::Unchanged);

        // No known layout: a clear error.
        let empty = tempdir();
        let err = install(&with(&empty, &data, |trust| trust.host_wide = true)).unwrap_err();
        assert!(
            err.to_string().contains("unknown trust store layout"),
            "{err}"
        );
        for dir in [root, data, empty] {
            fs::remove_dir_all(dir).unwrap();
        }
    }
}
