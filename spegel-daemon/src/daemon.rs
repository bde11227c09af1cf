//! The `run` subcommand: wires store, registry API, router, fetchers and interception together,
//! runs them until the shutdown future resolves, then drains within the grace period.
use std::future::Future;

use crate::config::RunArgs;

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; the daemon can only be killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Run the daemon until `shutdown` resolves.
pub async fn run(args: RunArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(data_dir = %args.data_dir.display(), "spegel starting");
    shutdown.await;
    Ok(())
}
