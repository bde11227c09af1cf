//! Command line and environment: clap (every flag has a `SPEGEL_*` env twin) → one validated
//! config per subcommand, built before anything binds. Each subsystem owns its own `Args` struct,
//! flattened here.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// spegel: peer-to-peer, transparent container image distribution for Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "spegel", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Run(Box<RunArgs>),
    /// Write containerd hosts.toml files that point at this node's daemon (mirror mode), or
    /// restore what was there before with --undo.
    ConfigureMirror(crate::mirror::MirrorArgs),
    /// Install this node's CA into the host trust store (transparent mode).
    InstallCa(crate::tls::ca::InstallCaArgs),
    /// Make containerd trust this node's CA (as install-ca) and restart it once, only when its
    /// trust changed; --undo puts back what earlier runs changed. For a DaemonSet init container.
    NodeSetup(crate::node_setup::NodeSetupArgs),
    /// Print this node's status from the daemon's admin endpoint (exit 0 ready, 1 not ready,
    /// 3 unreachable).
    Status(crate::admin::client::StatusArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,spegel=debug`).
    #[arg(long, env = "SPEGEL_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log format.
    #[arg(long, env = "SPEGEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Where the daemon keeps its state (libp2p key, node CA). Created if missing.
    #[arg(long, env = "SPEGEL_DATA_DIR", default_value = "/var/lib/spegel")]
    pub data_dir: PathBuf,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SPEGEL_SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Transparent mode: answer intercepted manifest requests by tag from upstream first (tags
    /// move), and from this node or its peers only when upstream fails or times out. `false`
    /// asks this node's own store first, then upstream; peers still only when upstream fails.
    #[arg(long, env = "SPEGEL_TAG_UPSTREAM_FIRST", action = clap::ArgAction::Set, default_value_t = true)]
    pub tag_upstream_first: bool,
    /// How often the advertised keys are re-read from the store even without a change event.
    #[arg(long, env = "SPEGEL_ADVERTISE_RESYNC", value_parser = humantime::parse_duration, default_value = "60s")]
    pub advertise_resync: Duration,
    #[command(flatten)]
    pub containerd: crate::store::containerd::ContainerdArgs,
    #[command(flatten)]
    pub registry: crate::serve::api::RegistryArgs,
    #[command(flatten)]
    pub membership: crate::membership::MembershipArgs,
    #[command(flatten)]
    pub router: crate::p2p::RouterArgs,
    #[command(flatten)]
    pub fetch: crate::peers::FetchArgs,
    #[command(flatten)]
    pub access: crate::serve::access::AccessArgs,
    #[command(flatten)]
    pub buffer: crate::body::buffered::BufferArgs,
    #[command(flatten)]
    pub burst: crate::peers::burst::BurstArgs,
    #[command(flatten)]
    pub intercept: crate::intercept::InterceptArgs,
    #[command(flatten)]
    pub upstream: crate::upstream::UpstreamArgs,
    #[command(flatten)]
    pub ca: crate::tls::args::CaArgs,
    #[command(flatten)]
    pub admin: crate::admin::AdminArgs,
    /// Test-only fault injection; exists only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[command(flatten)]
    pub fault: crate::fault::FaultArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_humantime() {
        let cli = Cli::try_parse_from(["spegel", "run", "--shutdown-grace", "1m 30s"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.shutdown_grace, Duration::from_secs(90));
        assert!(
            Cli::try_parse_from(["spegel", "run", "--shutdown-grace", "3 fortnights"]).is_err()
        );
    }

    #[test]
    fn cli_parses_defaults() {
        let cli = Cli::try_parse_from(["spegel", "run"]).unwrap();
        assert!(matches!(cli.command, Command::Run(_)));
        assert!(Cli::try_parse_from(["spegel", "run", "--no-such-flag"]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// One `--mirrored-registries` value, as written in a DaemonSet shared by all subcommands.
    const MIRRORED: &str = "docker.io, https://GHCR.io/,http://10.1.2.3:5000,[fd00::1]:5443,";
    /// Set for the child process of `mirrored_registries_mean_the_same_to_every_subcommand`.
    const CHILD_MARK: &str = "SPEGEL_TEST_MIRRORED_REGISTRIES_CHILD";

    /// The same registries as `MIRRORED`, given by repeating the flag (with an empty and a
    /// comma-separated occurrence).
    const MIRRORED_REPEATED: &[&str] = &[
        "--mirrored-registries",
        "docker.io",
        "--mirrored-registries",
        "",
        "--mirrored-registries",
        " https://GHCR.io/,http://10.1.2.3:5000",
        "--mirrored-registries=[fd00::1]:5443,",
    ];

    /// The registries each subcommand parsed from the flags `flags` (none: from the
    /// environment).
    fn registries_of_every_subcommand(flags: &[&'static str]) -> Vec<Vec<crate::oci::Registry>> {
        let with_flag = |mut argv: Vec<&'static str>| {
            argv.extend(flags);
            Cli::try_parse_from(argv).unwrap().command
        };
        let mut parsed = Vec::new();
        for command in [
            with_flag(vec!["spegel", "run"]),
            with_flag(vec!["spegel", "install-ca"]),
            with_flag(vec!["spegel", "node-setup"]),
            with_flag(vec![
                "spegel",
                "configure-mirror",
                "--mirror-targets",
                "http://127.0.0.1:5000",
            ]),
        ] {
            parsed.push(
                match command {
                    Command::Run(args) => args.intercept.mirrored_registries,
                    Command::InstallCa(args) => args.trust.mirrored_registries,
                    Command::ConfigureMirror(args) => args.mirrored_registries,
                    Command::NodeSetup(args) => args.trust.mirrored_registries,
                    Command::Status(_) => unreachable!("status names no registry"),
                }
                .iter()
                .flatten()
                .cloned()
                .collect(),
            );
        }
        parsed
    }

    #[track_caller]
    fn check_same_registries(parsed: Vec<Vec<crate::oci::Registry>>) {
        let expected: Vec<crate::oci::Registry> = [
            "docker.io",
            "ghcr.io",
            "http://10.1.2.3:5000",
            "[fd00::1]:5443",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        assert_eq!(parsed.len(), 4);
        for registries in parsed {
            assert_eq!(registries, expected);
        }
    }

    #[test]
    fn mirrored_registries_mean_the_same_to_every_subcommand() {
        check_same_registries(registries_of_every_subcommand(&[
            "--mirrored-registries",
            MIRRORED,
        ]));
        check_same_registries(registries_of_every_subcommand(MIRRORED_REPEATED));
        // The environment variable: clap reads it when the command is built, so the check runs
        // in a child process of this test binary with the variable set.
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "config::tests::mirrored_registries_from_the_environment",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_MARK, "1")
            .env("SPEGEL_MIRRORED_REGISTRIES", MIRRORED)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    #[ignore = "run by mirrored_registries_mean_the_same_to_every_subcommand with the environment set"]
    fn mirrored_registries_from_the_environment() {
        if std::env::var_os(CHILD_MARK).is_none() {
            return;
        }
        check_same_registries(registries_of_every_subcommand(&[]));
    }
}
