//! (stub, being written)

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct MirrorArgs {}

/// Run the `configure-mirror` subcommand.
pub async fn main(_args: MirrorArgs) -> anyhow::Result<()> {
    anyhow::bail!("configure-mirror is not implemented yet")
}
