//! Chores for spegel, in Rust so they run wherever cargo does:
//!
//! - `cargo xtask prereqs` — install what building and testing need (idempotent).
//! - `cargo xtask test`    — prereqs, build everything (eBPF included), run every test, e2e too,
//!   then check that a release build of the daemon carries no test-only fault switch, then a
//!   short smoke run of every fuzz target.
//! - `cargo xtask no-faults [binary]` — fail if a daemon binary (default: the release one) has a
//!   test-only fault switch compiled in (the check `test` ends with).
//! - `cargo xtask demo`    — prereqs, build, bring up a local multi-node cluster and pull through it.
//! - `cargo xtask bench [all|rollout|burst|preflight|micro] [flags]` — prereqs, build (release), run the
//!   benchmarks on a rig with a shaped upstream (ratios against a direct baseline in the same run;
//!   `--help` lists the flags).
//! - `cargo xtask fuzz [--time SECS | --runs N] [target…]` — prereqs and cargo-fuzz, then every
//!   fuzz target of `spegel-daemon/fuzz/` (or the ones named) in turn; see docs/fuzzing.md.
//!
//! xtask itself depends on nothing heavy, so it builds before protoc or bpf-linker exist.
use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};

/// The names of the daemon's test-only fault switches (one list, shared with the daemon).
// `pub` is for the daemon, where the module is public.
#[allow(unreachable_pub)]
#[path = "../../spegel-daemon/src/fault/switches.rs"]
mod fault_switches;

/// Debian packages the build, the rig and the daemon need.
const APT_PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "docker-registry",
    "skopeo",
    "protobuf-compiler",
    "openssl",
    "curl",
    "iproute2",
    "util-linux",
    "ca-certificates",
    // promtool checks `/metrics` in unit tests; the e2e suite scrapes the rig with prometheus.
    "prometheus",
    // The load tests count the daemon's eBPF map entries before and after.
    "bpftool",
    // bpf-linker links LLVM 22, the same major as rustc's own LLVM.
    "llvm-22-dev",
    // The status page test loads the admin endpoint in a real headless browser.
    "chromium",
];

/// `tests/tests/deploy.rs` renders `deploy/` with `kubectl kustomize`; the manifests need the
/// kustomize of kubectl 1.27 or later. Not a Debian package: the machine must have it.
const KUBECTL_MIN: (u32, u32) = (1, 27);

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds each fuzz target runs in `cargo xtask test` (the smoke run; 17 targets).
const SMOKE_SECS: u64 = 5;

const USAGE: &str = "usage: cargo xtask <prereqs | test [cargo test args…] | no-faults [binary] | demo | bench [all|rollout|burst|preflight|micro] [--help] | fuzz [--time SECS | --runs N] [target…]>";

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    let Some(command) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(64);
    };
    let rest: Vec<OsString> = args.collect();
    let result = match command.to_str() {
        Some("prereqs") => prereqs().map(|_| ()),
        Some("test") => test(&rest),
        Some("no-faults") => no_faults(
            &rest
                .first()
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target/release/spegel")),
        ),
        Some("demo") => run_tool("spegel-demo", &rest),
        Some("bench") => run_tool("spegel-bench", &rest),
        Some("fuzz") => FuzzArgs::parse(&rest).and_then(|args| fuzz(&args)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ lives directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where bpf-linker is installed: `$SPEGEL_TOOLS`, else `$HOME/.spegel-tools` (outside the
/// checkout, so fresh clones on the same machine reuse it).
fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("SPEGEL_TOOLS") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".spegel-tools")
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Debian packages only the benchmarks need: nginx is the micro benchmarks' file-serving
/// baseline (Debian's package does not start a service when installed without an init).
const BENCH_APT_PACKAGES: &[&str] = &["nginx"];

/// Installs whatever is missing; returns the PATH to build with (bpf-linker first).
fn prereqs() -> anyhow::Result<OsString> {
    prereqs_with(&[])
}

/// [`prereqs`] plus the Debian packages `extra`.
fn prereqs_with(extra: &[&str]) -> anyhow::Result<OsString> {
    check_kubectl()?;
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(extra)
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !out.is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root (or install them yourself)");
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    // The eBPF crate is built with nightly and -Z build-std=core, which needs rust-src.
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        });
    if !has_src {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let tools = tools_dir();
    let linker = tools.join("bin/bpf-linker");
    let have_linker = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !have_linker {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} (LLVM 22) into {}",
            tools.display()
        );
        status(
            Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["install", "--locked", "--root"])
                .arg(&tools)
                .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }

    let mut paths = vec![tools.join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).context("PATH")
}

/// Fails unless `kubectl` on PATH is at least [`KUBECTL_MIN`] (nothing is downloaded).
fn check_kubectl() -> anyhow::Result<()> {
    let (major, minor) = KUBECTL_MIN;
    let want = format!(
        "the deploy tests (tests/tests/deploy.rs) need kubectl >= {major}.{minor} on PATH for \
         `kubectl kustomize`; install it from your distribution or \
         https://kubernetes.io/docs/tasks/tools/ (xtask does not download it)"
    );
    let output = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .with_context(|| format!("cannot run kubectl: {want}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(found) = kubectl_client_version(&text) else {
        bail!(
            "cannot tell kubectl's version from `kubectl version --client -o json` ({}): {want}",
            if output.status.success() {
                text.trim().to_owned()
            } else {
                format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )
            }
        );
    };
    if found < KUBECTL_MIN {
        bail!("kubectl is {}.{}: {want}", found.0, found.1);
    }
    Ok(())
}

/// The client's `(major, minor)` from `kubectl version --client -o json`: its `gitVersion`
/// (`"v1.32.4-dispatcher"`), which distributions keep exact while they decorate `minor`
/// (`"32+"`).
fn kubectl_client_version(json: &str) -> Option<(u32, u32)> {
    let client = &json[json.find("\"clientVersion\"")?..];
    let after = &client[client.find("\"gitVersion\"")? + "\"gitVersion\"".len()..];
    let version = after.trim_start().strip_prefix(':')?.trim_start();
    let version = version.strip_prefix("\"v")?;
    let mut numbers = version.split(|c: char| !c.is_ascii_digit());
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

fn cargo(path: &OsString) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", path);
    cmd
}

/// Builds every default member once, in one profile (the eBPF crate comes in through the daemon's
/// build script; the daemon binary the end-to-end tests run is the one just built, with fault
/// injection, which the suite's dependency turns on), then runs every test with the end-to-end
/// suite enabled. Last, builds the release binary the way an operator does and fails if it has
/// any fault-injection switch.
fn test(extra: &[OsString]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the end-to-end tests need root (network namespaces, cgroups, eBPF)");
    }
    let path = prereqs()?;
    // With SPEGEL_E2E as for the tests (it un-ignores them at build time), so they reuse this build.
    status(
        cargo(&path)
            .args(["build", "--all-targets", "--locked"])
            .env("SPEGEL_E2E", "1"),
    )?;
    let bin = workspace_root().join("target/debug/spegel");
    status(
        cargo(&path)
            .args(["test", "--locked"])
            .args(extra)
            .env("SPEGEL_E2E", "1")
            .env("SPEGEL_BIN", &bin),
    )?;
    status(cargo(&path).args(["build", "--release", "--locked", "-p", "spegel-daemon"]))?;
    no_faults(&workspace_root().join("target/release/spegel"))?;
    fuzz(&FuzzArgs {
        limit: FuzzLimit::Seconds(SMOKE_SECS),
        targets: Vec::new(),
    })
}

/// Fails if the daemon binary at `binary` has any test-only fault switch compiled in.
fn no_faults(binary: &Path) -> anyhow::Result<()> {
    let found = fault_switches_in(binary)?;
    if !found.is_empty() {
        bail!(
            "{} has test-only fault switches compiled in: {found:?}",
            binary.display()
        );
    }
    eprintln!("xtask: {} has no fault-injection switch", binary.display());
    Ok(())
}

/// The fault switch names found in the file at `binary` (like `strings | grep`, on raw bytes).
fn fault_switches_in(binary: &Path) -> anyhow::Result<Vec<&'static str>> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    Ok(switches_in(&bytes))
}

/// The fault switch names occurring anywhere in `bytes`.
fn switches_in(bytes: &[u8]) -> Vec<&'static str> {
    fault_switches::ALL
        .iter()
        .copied()
        .filter(|name| {
            bytes
                .windows(name.len())
                .any(|window| window == name.as_bytes())
        })
        .collect()
}

/// How long each fuzz target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FuzzLimit {
    /// libFuzzer's `-max_total_time`.
    Seconds(u64),
    /// libFuzzer's `-runs`: this many executions.
    Runs(u64),
}

/// `cargo xtask fuzz` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FuzzArgs {
    limit: FuzzLimit,
    /// Empty: every target.
    targets: Vec<String>,
}

impl FuzzArgs {
    fn parse(args: &[OsString]) -> anyhow::Result<Self> {
        let mut parsed = FuzzArgs {
            limit: FuzzLimit::Seconds(SMOKE_SECS),
            targets: Vec::new(),
        };
        let mut args = args
            .iter()
            .map(|a| a.to_str().context("non-UTF-8 argument"));
        while let Some(arg) = args.next().transpose()? {
            let mut number = |flag: &str| -> anyhow::Result<u64> {
                let value = args
                    .next()
                    .transpose()?
                    .with_context(|| format!("{flag} needs a number"))?;
                value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("{flag} {value}: not a positive number"))
            };
            match arg {
                "--time" => parsed.limit = FuzzLimit::Seconds(number(arg)?),
                "--runs" => parsed.limit = FuzzLimit::Runs(number(arg)?),
                flag if flag.starts_with('-') => bail!("unknown option {flag}\n{USAGE}"),
                target => parsed.targets.push(target.to_owned()),
            }
        }
        Ok(parsed)
    }

    /// The libFuzzer options for one run.
    fn libfuzzer_args(&self) -> Vec<String> {
        let limit = match self.limit {
            FuzzLimit::Seconds(secs) => format!("-max_total_time={secs}"),
            FuzzLimit::Runs(runs) => format!("-runs={runs}"),
        };
        // The final stats carry the execution count the summary reports.
        vec![limit, "-print_final_stats=1".to_owned()]
    }
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("spegel-daemon/fuzz")
}

/// Every fuzz target: the files of `spegel-daemon/fuzz/fuzz_targets/`, sorted.
fn fuzz_targets() -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            targets.push(stem.to_owned());
        }
    }
    targets.sort();
    Ok(targets)
}

/// Builds the fuzz targets once (nightly, no sanitizer: the daemon's parsers are safe Rust, and
/// libFuzzer's coverage and the overflow checks are what find their bugs), then runs each in
/// turn; a crash stops the run with the failing input left in `fuzz/artifacts/<target>/`.
fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    let path = prereqs()?;
    let tools = tools_dir();
    let have_fuzz = Command::new(tools.join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !have_fuzz {
        eprintln!(
            "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
            tools.display()
        );
        status(
            Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["install", "--locked", "--root"])
                .arg(&tools)
                .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")),
        )?;
    }
    let all = fuzz_targets()?;
    let targets = if args.targets.is_empty() {
        all
    } else {
        if let Some(unknown) = args.targets.iter().find(|t| !all.contains(t)) {
            bail!("no fuzz target {unknown}; there are {all:?}");
        }
        args.targets.clone()
    };
    let cargo_fuzz = |subcommand: &str| {
        // `rustup run` rather than `$CARGO`: the fuzz build needs nightly (`-Z` sanitizer flags).
        let mut cmd = Command::new("rustup");
        cmd.args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            subcommand,
            "--sanitizer=none",
        ])
        .current_dir(fuzz_dir())
        .env("PATH", &path)
        // The daemon's own cfg for the privileged tests; not wanted in fuzz builds.
        .env_remove("SPEGEL_E2E");
        cmd
    };
    status(&mut cargo_fuzz("build"))?;
    let mut summary = Vec::new();
    for target in &targets {
        let mut cmd = cargo_fuzz("run");
        cmd.arg(target).arg("--").args(args.libfuzzer_args());
        let execs = run_counting_execs(&mut cmd).with_context(|| {
            format!("fuzz target {target} failed; see spegel-daemon/fuzz/artifacts/{target}/")
        })?;
        summary.push(format!(
            "{target}: {}",
            execs.map_or("?".to_owned(), |n| n.to_string())
        ));
    }
    eprintln!(
        "xtask: fuzzed, executions per target: {}",
        summary.join(", ")
    );
    Ok(())
}

/// Runs `cmd`, passing its stderr through, and returns the execution count from libFuzzer's
/// final stats.
fn run_counting_execs(cmd: &mut Command) -> anyhow::Result<Option<u64>> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    let mut execs = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            eprintln!("{line}");
            execs = execs.or(executed_units(&line));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(execs)
}

/// The count in libFuzzer's `stat::number_of_executed_units: N` line.
fn executed_units(line: &str) -> Option<u64> {
    line.strip_prefix("stat::number_of_executed_units:")?
        .trim()
        .parse()
        .ok()
}

/// Runs one of the tools of the `spegel-tests` crate (the demo, the benchmarks).
fn run_tool(bin: &str, extra: &[OsString]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{bin} needs root (network namespaces, cgroups, eBPF)");
    }
    let (path, profile) = if bin == "spegel-bench" {
        (prereqs_with(BENCH_APT_PACKAGES)?, "release")
    } else {
        (prereqs()?, "dev")
    };
    status(cargo(&path).args([
        "build",
        "--locked",
        "--profile",
        profile,
        "-p",
        "spegel-daemon",
        "-p",
        "spegel-tests",
    ]))?;
    let dir = if profile == "dev" { "debug" } else { profile };
    let target = workspace_root().join("target").join(dir);
    status(
        Command::new(target.join(bin))
            .args(extra)
            .env("PATH", &path)
            .env("SPEGEL_BIN", target.join("spegel")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_versions_are_read_from_git_version() {
        let json = |git: &str| {
            format!(
                r#"{{
  "clientVersion": {{
    "major": "1",
    "minor": "32+",
    "gitVersion": "{git}",
    "platform": "linux/amd64"
  }},
  "kustomizeVersion": "v5.5.0"
}}"#
            )
        };
        assert_eq!(
            kubectl_client_version(&json("v1.32.4-dispatcher")),
            Some((1, 32))
        );
        assert_eq!(kubectl_client_version(&json("v1.27.0")), Some((1, 27)));
        assert!(kubectl_client_version(&json("v1.26.15")).unwrap() < KUBECTL_MIN);
        assert!(kubectl_client_version(&json("v1.9.0")).unwrap() < KUBECTL_MIN);
        assert!(kubectl_client_version(&json("v2.0.0")).unwrap() >= KUBECTL_MIN);
        assert_eq!(kubectl_client_version(&json("devel")), None);
        assert_eq!(kubectl_client_version("error: unknown flag"), None);
    }

    #[test]
    fn finds_fault_switches_in_bytes() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"", &[]),
            (b"\0\0run --registry-addr SPEGEL_LOG\0", &[]),
            (
                b"\x7fELF\0test-corrupt-peer-blobs\0",
                &[fault_switches::CORRUPT_PEER_BLOBS_FLAG],
            ),
            (
                b"SPEGEL_TEST_THROTTLE_PEER_BYTESSPEGEL_TEST_CORRUPT_PEER_BLOBS",
                &[
                    fault_switches::CORRUPT_PEER_BLOBS_ENV,
                    fault_switches::THROTTLE_PEER_BYTES_ENV,
                ],
            ),
            // A prefix is not a name.
            (b"test-throttle-peer-byte", &[]),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                switches_in(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn fuzz_arguments() {
        let parse =
            |args: &[&str]| FuzzArgs::parse(&args.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(
            parse(&[]).unwrap(),
            FuzzArgs {
                limit: FuzzLimit::Seconds(SMOKE_SECS),
                targets: vec![]
            }
        );
        let args = parse(&["--runs", "10000000", "sni", "range"]).unwrap();
        assert_eq!(args.limit, FuzzLimit::Runs(10_000_000));
        assert_eq!(args.targets, ["sni", "range"]);
        assert_eq!(
            args.libfuzzer_args(),
            ["-runs=10000000", "-print_final_stats=1"]
        );
        let args = parse(&["--time", "600"]).unwrap();
        assert_eq!(args.libfuzzer_args()[0], "-max_total_time=600");
        for bad in [
            &["--time"][..],
            &["--time", "0"],
            &["--runs", "x"],
            &["-j", "2"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_libfuzzer_final_stats() {
        assert_eq!(
            executed_units("stat::number_of_executed_units: 10485760"),
            Some(10_485_760)
        );
        assert_eq!(executed_units("stat::peak_rss_mb: 71"), None);
        assert_eq!(executed_units("#1048576 pulse cov: 1"), None);
    }

    #[test]
    fn every_fuzz_target_is_declared() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let targets = fuzz_targets().unwrap();
        assert!(targets.len() > 10, "{targets:?}");
        for target in targets {
            assert!(
                manifest.contains(&format!(
                    "name = \"{target}\"\npath = \"fuzz_targets/{target}.rs\""
                )),
                "{target} is not a [[bin]] of spegel-daemon/fuzz/Cargo.toml"
            );
        }
    }
}
