//! The membership flags.
use std::path::PathBuf;

use clap::ValueEnum;

use super::{ClusterSecrets, Membership, MembershipError};

/// How node-to-node requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum PeerTransport {
    /// Mutual TLS with leaves from the cluster CA: authenticated and encrypted.
    #[default]
    Tls,
    /// Plain HTTP with an HMAC on every request and answer: authenticated, not encrypted. For
    /// networks where nobody can read the traffic that should not.
    Plaintext,
}

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct MembershipArgs {
    /// File holding the cluster secret (at least 16 bytes; 32 random bytes recommended), the same
    /// on every node. Give two (repeat the flag or separate with commas) while rotating: the
    /// first signs, both are accepted.
    #[arg(
        long,
        env = "SPEGEL_CLUSTER_SECRET_FILE",
        value_delimiter = ',',
        conflicts_with = "insecure_open_cluster"
    )]
    pub cluster_secret_file: Vec<PathBuf>,
    /// How node-to-node content requests travel: `tls` (mutual TLS, encrypted) or `plaintext`
    /// (authenticated with an HMAC, not encrypted).
    #[arg(long, env = "SPEGEL_PEER_TRANSPORT", value_enum, default_value_t = PeerTransport::Tls)]
    pub peer_transport: PeerTransport,
    /// Run without a cluster secret: any host that reaches this node's ports can join the DHT
    /// and read every image this node has. Only for networks where every host is trusted.
    #[arg(long, env = "SPEGEL_INSECURE_OPEN_CLUSTER", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, default_value_t = false)]
    pub insecure_open_cluster: bool,
}

impl MembershipArgs {
    /// The membership these flags describe; no secret and no explicit opt-out is an error.
    pub fn to_membership(&self) -> Result<Membership, MembershipError> {
        if self.insecure_open_cluster {
            return Ok(Membership::Open);
        }
        if self.cluster_secret_file.is_empty() {
            return Err(MembershipError::None);
        }
        Ok(Membership::Secret {
            secrets: ClusterSecrets::read(&self.cluster_secret_file)?,
            transport: self.peer_transport,
        })
    }
}
