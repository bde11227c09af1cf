//! Running short-lived helper programs (`ip`, `skopeo`, `ctr`, `umount`) with readable errors.

use std::ffi::{OsStr, OsString};
use std::process::{Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `program args..` to completion; a non-zero exit becomes an error carrying its stderr.
pub(crate) async fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    let output = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        // A cancelled test must not leave a half-finished helper behind.
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("spawning `{}`", describe(program, &args)))?;
    check(program, &args, output)
}

/// Blocking twin of [`run`], for teardown in `Drop` where no runtime may be available.
pub(crate) fn run_sync<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args = collect(args);
    let output = std::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(program, &args)))?;
    check(program, &args, output)
}

/// Renders a command line for error messages.
pub(crate) fn describe(program: &str, args: &[OsString]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn collect<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .map(|arg| arg.as_ref().to_owned())
        .collect()
}

fn check(program: &str, args: &[OsString], output: Output) -> Result<Output> {
    if output.status.success() {
        return Ok(output);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let detail = if stderr.trim().is_empty() {
        stdout.trim()
    } else {
        stderr.trim()
    };
    bail!(
        "`{}` failed ({}): {}",
        describe(program, args),
        output.status,
        detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_stderr() {
        let error = run_sync("sh", ["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("boom"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
    }

    #[test]
    fn successful_command_returns_output() {
        let output = run_sync("sh", ["-c", "printf hi"]).unwrap();
        assert_eq!(output.stdout, b"hi");
    }
}
