//! Flags of the containerd store, and the grammar of their values.
use std::{path::PathBuf, time::Duration};

/// Flags of the containerd store.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdArgs {
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_sock: PathBuf,
    /// The containerd namespace whose images are served (the kubelet's is `k8s.io`).
    #[arg(long, env = "SPEGEL_CONTAINERD_NAMESPACE", default_value = "k8s.io", value_parser = parse_namespace)]
    pub containerd_namespace: String,
    /// containerd's content store directory (holding `blobs/sha256/`), read directly when
    /// readable. Unset or empty: ask containerd, else /var/lib/containerd/io.containerd.content.v1.content.
    #[arg(long, env = "SPEGEL_CONTAINERD_CONTENT_PATH")]
    pub containerd_content_path: Option<PathBuf>,
    /// How often to re-walk every image even without events (containerd before 2.1 sends no
    /// content events, so layers arriving for an existing image are only seen this way).
    #[arg(long, env = "SPEGEL_STORE_RESYNC", value_parser = parse_resync, default_value = "60s")]
    pub store_resync: Duration,
}

/// containerd's namespace grammar: alphanumeric labels joined by `.`, `_` or `-`, at most 76
/// characters.
pub(super) fn parse_namespace(s: &str) -> Result<String, String> {
    let labels_ok = s
        .split(['.', '_', '-'])
        .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric()));
    if s.is_empty() || s.len() > 76 || !labels_ok {
        return Err(format!(
            "invalid containerd namespace `{s}` (alphanumeric labels joined by `.`, `_` or `-`)"
        ));
    }
    Ok(s.to_owned())
}

pub(super) fn parse_resync(s: &str) -> Result<Duration, String> {
    let period =
        humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))?;
    if period < Duration::from_secs(1) {
        return Err(format!("--store-resync must be at least 1s, got `{s}`"));
    }
    Ok(period)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn namespaces() {
        for good in ["k8s.io", "default", "a", "a-b_c.d9", &"a".repeat(76)] {
            assert_eq!(parse_namespace(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            ".k8s",
            "k8s.",
            "a..b",
            "a/b",
            "a b",
            "ä",
            "a\nb",
            &"a".repeat(77),
        ] {
            assert!(parse_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ContainerdArgs,
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(
            cli.args.containerd_sock,
            Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(cli.args.containerd_namespace, "k8s.io");
        assert_eq!(cli.args.store_resync, Duration::from_secs(60));
        let cli = Cli::try_parse_from([
            "x",
            "--containerd-content-path",
            "/c",
            "--store-resync",
            "5m",
            "--containerd-namespace",
            "default",
        ])
        .unwrap();
        assert_eq!(
            cli.args.containerd_content_path.as_deref(),
            Some(Path::new("/c"))
        );
        assert_eq!(cli.args.store_resync, Duration::from_secs(300));
        assert!(Cli::try_parse_from(["x", "--store-resync", "0s"]).is_err());
        assert!(Cli::try_parse_from(["x", "--containerd-namespace", "a/b"]).is_err());
    }
}
