//! Transparent interception: the eBPF programs send containerd's registry connects to a listener
//! on loopback; per connection the listener recovers the original destination, peeks at the
//! ClientHello SNI or `Host`, and either hands the connection to the [`MirroredHandler`] (a
//! mirrored registry) or splices it, untouched, to where it was going.
//!
//! This file holds the flags and their validation into [`InterceptConfig`]; along the data path:
//! [`ebpf`] (the programs and the original-destination map) and [`cgroup`] (finding containerd's
//! cgroup) redirect, [`guard`] (the daemon's own cgroup) refuses a cgroup that contains the
//! daemon, [`run`] keeps them attached, [`listener`] accepts, [`origin`] says where a
//! connection was going, [`sniff`] classifies its first bytes with [`sni`] (ClientHello),
//! [`http_host`] (HTTP head) and [`authority`] (`host[:port]`), [`registries`] decides whether
//! it is mirrored, and [`handler`] serves it or [`splice`] passes it through; [`bypass`] then
//! lets a destination that carries no mirrored registry go direct; [`stats`] counts.
//! Beside the data path, [`probe`] checks that the listener still accepts and [`health`] decides
//! when a wedged listener is bypassed (programs detached) and when it is trusted again.

pub mod authority;
pub mod bypass;
pub mod cgroup;
pub mod ebpf;
pub mod guard;
pub mod handler;
pub mod health;
pub mod http_host;
pub mod listener;
pub mod origin;
pub mod probe;
pub mod registries;
pub mod run;
pub mod sni;
pub mod sniff;
pub mod splice;
pub mod stats;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::ArgAction;

use self::{
    cgroup::{CgroupError, Locator},
    ebpf::EbpfError,
    registries::{MirroredRegistries, default_mirrored_registries},
};
pub use self::{
    handler::{MirroredHandler, SpliceHandler},
    listener::{Interceptor, Listener},
    origin::{OriginalDst, origin_registry},
    run::{CgroupWatcher, run, run_with_stats},
    sniff::PEEK_LIMIT,
    stats::InterceptStats,
};

/// Flags of transparent interception (`spegel run`).
#[derive(Debug, Clone, clap::Args)]
pub struct InterceptArgs {
    /// Redirect containerd's registry connections to this daemon with eBPF (transparent mode).
    /// Needs CAP_BPF and CAP_NET_ADMIN, and the daemon in containerd's network namespace.
    #[arg(
        long = "intercept",
        env = "SPEGEL_INTERCEPT",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true"
    )]
    pub enabled: bool,
    /// Port of the interception listener on 127.0.0.1 and [::1].
    #[arg(long, env = "SPEGEL_INTERCEPT_PORT", default_value_t = 15001)]
    pub intercept_port: u16,
    /// Destination ports whose TCP connects from containerd's cgroup are redirected.
    #[arg(long, env = "SPEGEL_INTERCEPT_PORTS", value_delimiter = ',', default_values_t = [443u16, 80])]
    pub intercept_ports: Vec<u16>,
    /// Destination addresses whose connects are redirected whatever the port.
    #[arg(long, env = "SPEGEL_INTERCEPT_IPS", value_delimiter = ',')]
    pub intercept_ips: Vec<IpAddr>,
    /// Registries (`[http(s)://]host[:port]`, comma-separated or the flag repeated, no
    /// wildcards) whose intercepted connections this daemon serves; every other connection is
    /// passed through untouched. A port-less entry means 443 (TLS) or 80 (plain HTTP). An empty
    /// value mirrors nothing.
    #[arg(long, env = "SPEGEL_MIRRORED_REGISTRIES", default_values_t = [default_mirrored_registries()])]
    pub mirrored_registries: Vec<crate::oci::RegistryList>,
    /// containerd's cgroup2 directory (absolute, or relative to the cgroup2 mount). Default: the
    /// cgroup of containerd's process (see --containerd-pid, --containerd-pidfile).
    #[arg(long, env = "SPEGEL_CONTAINERD_CGROUP")]
    pub containerd_cgroup: Option<PathBuf>,
    /// containerd's PID, to find its cgroup.
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_PID",
        conflicts_with = "containerd_cgroup"
    )]
    pub containerd_pid: Option<u32>,
    /// A file holding containerd's PID, to find its cgroup.
    #[arg(long, env = "SPEGEL_CONTAINERD_PIDFILE", conflicts_with_all = ["containerd_cgroup", "containerd_pid"])]
    pub containerd_pidfile: Option<PathBuf>,
    /// The cgroup2 mount point (default: from /proc/mounts; `/sys/fs/cgroup/unified` on hybrid
    /// hosts, `/sys/fs/cgroup` on pure cgroup v2).
    #[arg(long, env = "SPEGEL_CGROUP2_MOUNT")]
    pub cgroup2_mount: Option<PathBuf>,
    /// How often containerd's cgroup is checked, to re-attach after containerd restarts.
    #[arg(long, env = "SPEGEL_CGROUP_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "3s")]
    pub cgroup_poll_interval: Duration,
    /// How long to wait for a client's first bytes (ClientHello, request head) before passing
    /// the connection through.
    #[arg(long, env = "SPEGEL_INTERCEPT_PEEK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub intercept_peek_timeout: Duration,
    /// Timeout for connecting to a passed-through connection's original destination.
    #[arg(long, env = "SPEGEL_INTERCEPT_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub intercept_connect_timeout: Duration,
    /// A passed-through (spliced) connection that moves no byte either way for this long is
    /// closed on both sides, so parked or dead connections do not hold a slot forever. A
    /// humantime duration ("90s", "10m"); must not be zero.
    #[arg(long, env = "SPEGEL_SPLICE_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub splice_idle_timeout: Duration,
    /// A destination whose connection was passed through because it named no mirrored registry
    /// (or spoke neither TLS nor HTTP) is left out of the redirect for this long: containerd's
    /// later connects to it go direct, not through the daemon. Never for an address a mirrored
    /// registry resolves to or was seen at. `0s` redirects every connect.
    #[arg(long, env = "SPEGEL_INTERCEPT_BYPASS_TTL", value_parser = humantime::parse_duration, default_value = "5m")]
    pub intercept_bypass_ttl: Duration,
    /// Intercepted connections handled at once; more wait in the listen backlog.
    #[arg(long, env = "SPEGEL_INTERCEPT_MAX_CONNECTIONS", default_value_t = 4096)]
    pub intercept_max_connections: usize,
    /// An intercepted connection whose client reads nothing of what is written to it for this
    /// long is closed (slow or stuck readers do not hold a slot and its buffers forever). A
    /// humantime duration; must not be zero.
    #[arg(long, env = "SPEGEL_INTERCEPT_WRITE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub intercept_write_timeout: Duration,
    /// When the interception listener is wedged (alive but not accepting, or every connection
    /// slot taken) for this long, the eBPF programs are detached so containerd connects to
    /// registries directly; connections already accepted keep running. Must not be zero.
    #[arg(long, env = "SPEGEL_INTERCEPT_WEDGE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub intercept_wedge_timeout: Duration,
    /// How often the daemon connects to its own interception listener to check that it still
    /// accepts; each probe must be accepted within this interval. Must not be zero.
    #[arg(long, env = "SPEGEL_INTERCEPT_PROBE_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub intercept_probe_interval: Duration,
    /// After a wedge, how long the listener must be healthy again before the programs are
    /// re-attached. Must not be zero.
    #[arg(long, env = "SPEGEL_INTERCEPT_RECOVER_AFTER", value_parser = humantime::parse_duration, default_value = "10s")]
    pub intercept_recover_after: Duration,
}

/// Errors of the interception subsystem.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("invalid interception settings: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Validated interception settings.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub listener_port: u16,
    /// Ports redirected: `--intercept-ports` plus ports named by mirrored registries.
    pub redirect_ports: Vec<u16>,
    pub redirect_ips: Vec<IpAddr>,
    pub mirrored: MirroredRegistries,
    pub locator: Locator,
    pub cgroup2_mount: Option<PathBuf>,
    pub poll_interval: Duration,
    pub peek_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a splice may move no byte before it is ended.
    pub splice_idle_timeout: Duration,
    /// How long a destination learned to carry no mirrored registry goes direct (zero: never).
    pub bypass_ttl: Duration,
    pub max_connections: usize,
    /// How long a write to an intercepted client may make no progress.
    pub write_timeout: Duration,
    /// When a wedged listener is bypassed and trusted again.
    pub health: health::HealthPolicy,
    /// How often the listener is probed (and each probe's deadline).
    pub probe_interval: Duration,
    /// Test only: a switch that stops the accept loop on demand.
    #[cfg(feature = "fault-injection")]
    pub accept_wedge: Option<std::sync::Arc<crate::fault::wedge::AcceptWedge>>,
    /// Test only: attach even to a cgroup that contains the daemon's own (warning instead).
    #[cfg(feature = "fault-injection")]
    pub attach_containing_cgroup: bool,
}

impl InterceptConfig {
    /// Validates the flags. `containerd_socket`: containerd's gRPC socket; when no cgroup, PID or
    /// pidfile is given, containerd is the process listening on it (else the process named
    /// `containerd`, which must be unique).
    pub fn from_args(
        args: &InterceptArgs,
        containerd_socket: Option<&Path>,
    ) -> Result<Self, InterceptError> {
        let mirrored = MirroredRegistries::new(args.mirrored_registries.iter().flatten().cloned());
        let mut redirect_ports = args.intercept_ports.clone();
        redirect_ports.extend(mirrored.explicit_ports());
        redirect_ports.sort_unstable();
        redirect_ports.dedup();
        if args.intercept_port == 0 {
            return Err(InterceptError::Config(
                "--intercept-port must not be 0".into(),
            ));
        }
        if redirect_ports.contains(&args.intercept_port) {
            return Err(InterceptError::Config(format!(
                "--intercept-port {} is also a redirected port",
                args.intercept_port
            )));
        }
        if args.intercept_max_connections == 0 {
            return Err(InterceptError::Config(
                "--intercept-max-connections must be at least 1".into(),
            ));
        }
        for (flag, value) in [
            ("--splice-idle-timeout", args.splice_idle_timeout),
            ("--intercept-write-timeout", args.intercept_write_timeout),
            ("--intercept-wedge-timeout", args.intercept_wedge_timeout),
            ("--intercept-probe-interval", args.intercept_probe_interval),
            ("--intercept-recover-after", args.intercept_recover_after),
        ] {
            if value.is_zero() {
                return Err(InterceptError::Config(format!("{flag} must not be zero")));
            }
        }
        let locator = if let Some(path) = &args.containerd_cgroup {
            Locator::Cgroup(path.clone())
        } else if let Some(pid) = args.containerd_pid {
            Locator::Pid(pid)
        } else if let Some(file) = &args.containerd_pidfile {
            Locator::PidFile(file.clone())
        } else if let Some(socket) = containerd_socket {
            Locator::Socket(socket.to_path_buf())
        } else {
            Locator::Comm("containerd".into())
        };
        let mut redirect_ips = args.intercept_ips.clone();
        redirect_ips.sort_unstable();
        redirect_ips.dedup();
        Ok(Self {
            listener_port: args.intercept_port,
            redirect_ports,
            redirect_ips,
            mirrored,
            locator,
            cgroup2_mount: args.cgroup2_mount.clone(),
            poll_interval: args.cgroup_poll_interval.max(Duration::from_millis(100)),
            peek_timeout: args.intercept_peek_timeout,
            connect_timeout: args.intercept_connect_timeout,
            splice_idle_timeout: args.splice_idle_timeout,
            bypass_ttl: args.intercept_bypass_ttl,
            max_connections: args.intercept_max_connections,
            write_timeout: args.intercept_write_timeout,
            health: health::HealthPolicy {
                wedge_timeout: args.intercept_wedge_timeout,
                recover_after: args.intercept_recover_after,
            },
            probe_interval: args.intercept_probe_interval,
            #[cfg(feature = "fault-injection")]
            accept_wedge: None,
            #[cfg(feature = "fault-injection")]
            attach_containing_cgroup: false,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct TestCli {
        #[command(flatten)]
        intercept: InterceptArgs,
    }

    fn args(extra: &[&str]) -> InterceptArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(extra);
        TestCli::try_parse_from(argv).unwrap().intercept
    }

    pub(crate) fn config(extra: &[&str]) -> InterceptConfig {
        InterceptConfig::from_args(&args(extra), None).unwrap()
    }

    #[test]
    fn flags_and_validation() {
        let c = config(&[]);
        assert_eq!(c.listener_port, 15001);
        assert_eq!(c.redirect_ports, [80, 443]);
        assert!(c.mirrored.matches_name("registry-1.docker.io", 443, true));
        assert_eq!(c.locator, Locator::Comm("containerd".into()));
        let c = config(&[
            "--mirrored-registries",
            "reg.local:5000,10.1.2.3:5001",
            "--intercept-ports",
            "443",
        ]);
        assert_eq!(c.redirect_ports, [443, 5000, 5001]);
        let c = config(&["--mirrored-registries", ""]);
        assert!(c.mirrored.entries().is_empty());
        let c = config(&["--containerd-pid", "42"]);
        assert_eq!(c.locator, Locator::Pid(42));
        let sock = Path::new("/run/containerd/containerd.sock");
        let c = InterceptConfig::from_args(&args(&[]), Some(sock)).unwrap();
        assert_eq!(c.locator, Locator::Socket(sock.into()));
        let c =
            InterceptConfig::from_args(&args(&["--containerd-cgroup", "/x"]), Some(sock)).unwrap();
        assert_eq!(c.locator, Locator::Cgroup("/x".into()));
        assert!(args(&[]).enabled);
        assert!(args(&["--intercept"]).enabled);
        assert!(!args(&["--intercept", "false"]).enabled);
        assert!(!args(&["--intercept=false"]).enabled);
        let bad = |extra: &[&str]| InterceptConfig::from_args(&args(extra), None).is_err();
        assert!(bad(&["--intercept-port", "0"]));
        assert!(bad(&["--intercept-port", "443"]));
        // One registry grammar for every subcommand: a scheme is accepted; a bad entry is
        // refused by the flag parser itself.
        let c = config(&["--mirrored-registries", "https://ghcr.io"]);
        assert!(c.mirrored.matches_name("ghcr.io", 443, true));
        assert!(TestCli::try_parse_from(["t", "--mirrored-registries", "ftp://ghcr.io"]).is_err());
        assert!(bad(&["--intercept-max-connections", "0"]));
        assert_eq!(c.splice_idle_timeout, Duration::from_secs(600));
        let c = config(&["--splice-idle-timeout", "90s"]);
        assert_eq!(c.splice_idle_timeout, Duration::from_secs(90));
        assert!(bad(&["--splice-idle-timeout", "0s"]));
        assert_eq!(c.bypass_ttl, Duration::from_secs(300));
        assert!(
            config(&["--intercept-bypass-ttl", "0s"])
                .bypass_ttl
                .is_zero()
        );
        assert_eq!(c.write_timeout, Duration::from_secs(30));
        assert_eq!(c.health.wedge_timeout, Duration::from_secs(5));
        assert_eq!(c.health.recover_after, Duration::from_secs(10));
        assert_eq!(c.probe_interval, Duration::from_secs(1));
        let c = config(&[
            "--intercept-write-timeout",
            "2m",
            "--intercept-wedge-timeout",
            "3s",
            "--intercept-recover-after",
            "20s",
            "--intercept-probe-interval",
            "250ms",
        ]);
        assert_eq!(c.write_timeout, Duration::from_secs(120));
        assert_eq!(c.health.wedge_timeout, Duration::from_secs(3));
        assert_eq!(c.health.recover_after, Duration::from_secs(20));
        assert_eq!(c.probe_interval, Duration::from_millis(250));
        for flag in [
            "--intercept-write-timeout",
            "--intercept-wedge-timeout",
            "--intercept-recover-after",
            "--intercept-probe-interval",
        ] {
            assert!(bad(&[flag, "0s"]), "{flag} 0s accepted");
        }
        assert!(
            TestCli::try_parse_from(["t", "--containerd-pid", "1", "--containerd-cgroup", "/x"])
                .is_err()
        );
    }
}
