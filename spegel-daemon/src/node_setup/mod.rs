//! The `node-setup` subcommand, run by the DaemonSet's init container (`hostPID`): makes
//! containerd trust the node CA as `install-ca` does (scoped to containerd by default,
//! `--host-wide` opt-in), then restarts containerd **once, and only when what it trusts
//! changed** — a rerun restarts nothing, and running containers are untouched (their shims keep
//! them). What it changed is kept in a ledger (`ledger.rs`), so `--undo` puts exactly that back
//! and restarts containerd once more. The restart is a command template (`restart.rs`).
pub mod ledger;
pub mod restart;

use std::path::Path;

use anyhow::Context as _;

use self::{
    ledger::{Ledger, snapshot},
    restart::{DEFAULT_RESTART_COMMAND, RestartCommand, check_unit},
};
use crate::tls::{
    ca::{TrustArgs, install_trust, refresh_if_anchor},
    scoped,
};

/// Flags of the `node-setup` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeSetupArgs {
    #[command(flatten)]
    pub trust: TrustArgs,
    /// How containerd is restarted: words and `&&`-joined steps (no shell), `{unit}` replaced by
    /// `--containerd-unit`. The default reloads systemd (a drop-in is read only then) and
    /// restarts the unit in the host's namespaces (needs `hostPID`).
    #[arg(long, env = "SPEGEL_RESTART_COMMAND", default_value = DEFAULT_RESTART_COMMAND)]
    pub restart_command: String,
    /// Put back what earlier runs changed (from the ledger in `<data-dir>/node-setup/`) and
    /// restart containerd once.
    #[arg(long, env = "SPEGEL_UNDO")]
    pub undo: bool,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// containerd was restarted (its trust changed, or an earlier restart had failed).
    Restarted,
    /// Nothing containerd reads changed: no restart.
    Unchanged,
}

/// Run the `node-setup` subcommand.
pub async fn main(args: NodeSetupArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run(&args).map(drop)).await?
}

/// Sets up (or, with `--undo`, tears down) the node. Blocking.
pub fn run(args: &NodeSetupArgs) -> anyhow::Result<Done> {
    check_unit(&args.trust.containerd_unit)?;
    let restart = RestartCommand::parse(&args.restart_command)?;
    if args.undo {
        undo(&args.trust, &restart)
    } else {
        setup(&args.trust, &restart)
    }
}

fn setup(trust: &TrustArgs, restart: &RestartCommand) -> anyhow::Result<Done> {
    let data_dir = &trust.data_dir;
    let mut ledger = Ledger::load(data_dir)?.unwrap_or_default();
    let before = snapshot(
        &trust
            .touched_files()
            .context("cannot resolve the node's trust files")?,
    )?;
    install_trust(trust)?;
    let changed = ledger.record(data_dir, &before)?;
    if changed {
        ledger.unit = trust.containerd_unit.clone();
        // Saved before the restart: a restart that fails is retried by the next run.
        ledger.restart_pending = true;
        ledger.save(data_dir)?;
    }
    if !ledger.restart_pending {
        println!("containerd's trust is unchanged: not restarting it");
        return Ok(Done::Unchanged);
    }
    restart_once(&mut ledger, data_dir, restart, &trust.containerd_unit)?;
    Ok(Done::Restarted)
}

fn undo(trust: &TrustArgs, restart: &RestartCommand) -> anyhow::Result<Done> {
    let data_dir = &trust.data_dir;
    let Some(mut ledger) = Ledger::load(data_dir)? else {
        println!("node-setup changed nothing here: nothing to undo");
        return Ok(Done::Unchanged);
    };
    ledger.restore(data_dir, |path| {
        println!("restored {}", path.display());
        refresh_if_anchor(&trust.trust_root, path)
    })?;
    // A bundle that is gone must not be written again by a running daemon.
    let ca_dir = data_dir.join("ca");
    if scoped::read_scope(&ca_dir).is_some_and(|scope| !scope.bundle.exists()) {
        scoped::forget_scope(&ca_dir)?;
    }
    if !ledger.files.is_empty() {
        ledger.files.clear();
        ledger.created_dirs.clear();
        ledger.restart_pending = true;
        ledger.save(data_dir)?;
    }
    let done = if ledger.restart_pending {
        let unit = if ledger.unit.is_empty() {
            trust.containerd_unit.clone()
        } else {
            ledger.unit.clone()
        };
        restart_once(&mut ledger, data_dir, restart, &unit)?;
        Done::Restarted
    } else {
        Done::Unchanged
    };
    Ledger::remove(data_dir)?;
    println!("undone: the node is as it was before node-setup");
    Ok(done)
}

fn restart_once(
    ledger: &mut Ledger,
    data_dir: &Path,
    restart: &RestartCommand,
    unit: &str,
) -> anyhow::Result<()> {
    println!("restarting {unit} (its trust changed)");
    restart
        .run(unit)
        .context("containerd was not restarted; the next run retries")?;
    ledger.restart_pending = false;
    ledger.save(data_dir)?;
    println!("restarted {unit}");
    Ok(())
}

#[cfg(test)]
mod tests;
