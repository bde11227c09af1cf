//! The `install-ca` subcommand: the node CA bundle (`continuity.rs`: the current CA and, while
//! one waits, the next CA) into the host trust store (Debian or RHEL layout), or into a bundle
//! file, or printed. Every install is recorded (`trust.rs`), so the daemon knows when a
//! containerd restarted after it trusts the next CA.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use super::{
    args::CaArgs, ca::write_file_atomically, continuity::CaSet, names::PermittedNames,
    trust::record_install,
};
use crate::oci::RegistryList;

/// The name the CA gets in the host trust store.
const TRUST_FILE_NAME: &str = "spegel-node-ca.crt";

/// Flags of the `install-ca` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCaArgs {
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
    /// Operate on the trust store under this root instead of `/` (the refresh command is then
    /// not run: it only knows the real root).
    #[arg(long, env = "SPEGEL_TRUST_ROOT", default_value = "/")]
    pub trust_root: PathBuf,
    #[command(flatten)]
    pub ca: CaArgs,
    /// Only print the CA bundle (PEM: the current CA and, while one waits, the next) on stdout,
    /// for installing elsewhere; recorded as installed like the other forms.
    #[arg(long, env = "SPEGEL_CA_PRINT", conflicts_with = "bundle")]
    pub print: bool,
    /// Only write a bundle of the system roots plus the node CA to this file (for
    /// `SSL_CERT_FILE`); the trust store is left alone.
    #[arg(long, env = "SPEGEL_CA_BUNDLE", value_name = "OUT")]
    pub bundle: Option<PathBuf>,
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
}

/// System CA bundles, by distribution, relative to the trust root.
const SYSTEM_BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "etc/ssl/cert.pem",
];

/// Run the `install-ca` subcommand.
pub async fn main(args: InstallCaArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || install(&args)).await?
}

fn install(args: &InstallCaArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let permitted = PermittedNames::from_registries(args.mirrored_registries.iter().flatten())?;
    let cas = CaSet::open(&args.data_dir, permitted, args.ca.policy()?, Arc::default())?;
    let pem = cas.bundle_pem();
    if args.print {
        print!("{pem}");
        record_install(cas.dir(), cas.bundle_fingerprints())?;
        return Ok(());
    }
    if let Some(out) = &args.bundle {
        let (source, mut bundle) = SYSTEM_BUNDLES
            .iter()
            .map(|rel| args.trust_root.join(rel))
            .find_map(|path| fs::read(&path).ok().map(|bytes| (path, bytes)))
            .with_context(|| {
                format!(
                    "no system CA bundle under {} (looked for {})",
                    args.trust_root.display(),
                    SYSTEM_BUNDLES.join(", ")
                )
            })?;
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(pem.as_bytes());
        write_file_atomically(out, &bundle, 0o644)?;
        record_install(cas.dir(), cas.bundle_fingerprints())?;
        println!(
            "wrote {} (system roots from {} plus the spegel node CA bundle); restart containerd \
             to trust it",
            out.display(),
            source.display()
        );
        return Ok(());
    }
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
        "{} the spegel node CA bundle at {}",
        if unchanged { "kept" } else { "installed" },
        anchor.display()
    );
    if args.trust_root == Path::new("/") {
        let (program, program_args) = layout.refresh_command();
        let status = Command::new(program)
            .args(program_args)
            .status()
            .with_context(|| format!("cannot run {program}"))?;
        anyhow::ensure!(status.success(), "{program} failed: {status}");
    } else {
        println!(
            "alternate trust root {}: not running {}",
            args.trust_root.display(),
            layout.refresh_command().0
        );
    }
    // Recorded once the trust store holds it: a containerd started after this trusts it.
    record_install(cas.dir(), cas.bundle_fingerprints())?;
    if !unchanged {
        println!(
            "containerd must be restarted once to trust this CA (Go loads the system roots once \
             per process): systemctl restart containerd"
        );
    }
    Ok(())
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
            PermittedNames::from_registries(cli.args.mirrored_registries.iter().flatten()).unwrap();
        for name in ["registry-1.docker.io", "ghcr.io", "registry.k8s.io"] {
            assert!(p.permits(&LeafName::parse(name).unwrap()), "{name}");
        }
        assert!(!p.permits(&LeafName::parse("example.com").unwrap()));
        let cli =
            Cli::try_parse_from(["install-ca", "--mirrored-registries", "a.io,b.io:5000"]).unwrap();
        let list: RegistryList = cli.args.mirrored_registries.into_iter().collect();
        assert_eq!(list.to_string(), "a.io,b.io:5000");
    }

    #[test]
    fn installs_into_an_alternate_root() {
        let root = tempdir();
        let data = tempdir();
        fs::create_dir_all(root.join("usr/local/share/ca-certificates")).unwrap();
        fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        fs::write(
            root.join("etc/ssl/certs/ca-certificates.crt"),
            "SYSTEM ROOTS",
        )
        .unwrap();
        let args = InstallCaArgs {
            data_dir: data.clone(),
            mirrored_registries: vec!["docker.io".parse().unwrap()],
            trust_root: root.clone(),
            ca: CaArgs::default(),
            print: false,
            bundle: None,
        };
        install(&args).unwrap();
        let installed =
            fs::read_to_string(root.join("usr/local/share/ca-certificates/spegel-node-ca.crt"))
                .unwrap();
        let cas = CaSet::open(
            &data,
            permitted(&["docker.io"]),
            CaArgs::default().policy().unwrap(),
            Arc::default(),
        )
        .unwrap();
        // A first install: the CA is the next one, recorded as installed.
        let ca = cas.next().unwrap();
        assert_eq!(installed, ca.cert_pem());
        let record = crate::tls::trust::read_record(cas.dir()).unwrap();
        assert_eq!(record.fingerprints, [ca.fingerprint()]);

        let out = data.join("bundle.pem");
        install(&InstallCaArgs {
            bundle: Some(out.clone()),
            ..args.clone()
        })
        .unwrap();
        let bundle = fs::read_to_string(&out).unwrap();
        assert!(bundle.starts_with("SYSTEM ROOTS\n"));
        assert!(bundle.ends_with(ca.cert_pem()));

        // No known layout: a clear error.
        let empty = tempdir();
        let err = install(&InstallCaArgs {
            trust_root: empty.clone(),
            ..args
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown trust store layout"),
            "{err}"
        );
        for dir in [root, data, empty] {
            fs::remove_dir_all(dir).unwrap();
        }
    }
}
