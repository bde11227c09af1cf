//! (stub, being written)

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCaArgs {}

/// Run the `install-ca` subcommand.
pub async fn main(_args: InstallCaArgs) -> anyhow::Result<()> {
    anyhow::bail!("install-ca is not implemented yet")
}
