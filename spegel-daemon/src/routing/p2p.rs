//! (stub, being written)

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {}
