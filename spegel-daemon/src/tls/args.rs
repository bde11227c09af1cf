//! The node CA's flags, shared by `spegel run` and `spegel install-ca` so both judge the CA alike.
use std::time::Duration;

use super::{
    ca::{CA_VALIDITY, CaError, DEFAULT_LEAF_VALIDITY},
    continuity::CaPolicy,
};

/// Flags of the node CA.
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// A node CA expiring sooner than this gets a successor minted beside it (with a warning and
    /// `spegel_ca_next_pending`); the old one keeps serving until containerd trusts the new one.
    /// A humantime duration ("30days", "720h"); must be shorter than the CA's 10-year validity.
    #[arg(long, env = "SPEGEL_CA_RENEW_BEFORE", value_parser = humantime::parse_duration, default_value = "30days")]
    pub ca_renew_before: Duration,
}

impl Default for CaArgs {
    fn default() -> Self {
        Self {
            ca_renew_before: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl CaArgs {
    /// The validated policy.
    pub fn policy(&self) -> Result<CaPolicy, CaError> {
        if self.ca_renew_before >= CA_VALIDITY / 2 {
            return Err(CaError::Config(format!(
                "--ca-renew-before {} must be under half the CA validity ({})",
                humantime::format_duration(self.ca_renew_before),
                humantime::format_duration(CA_VALIDITY / 2)
            )));
        }
        Ok(CaPolicy {
            renew_before: self.ca_renew_before,
            leaf_validity: DEFAULT_LEAF_VALIDITY,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }

    #[test]
    fn renew_before_is_a_humantime_flag_with_a_bound() {
        let cli = Cli::try_parse_from(["t"]).unwrap();
        assert_eq!(cli.ca.ca_renew_before, CaArgs::default().ca_renew_before);
        assert!(cli.ca.policy().is_ok());
        let cli = Cli::try_parse_from(["t", "--ca-renew-before", "90days"]).unwrap();
        assert_eq!(
            cli.ca.policy().unwrap().renew_before,
            Duration::from_secs(90 * 24 * 3600)
        );
        let cli = Cli::try_parse_from(["t", "--ca-renew-before", "9years"]).unwrap();
        assert!(cli.ca.policy().is_err());
        assert!(Cli::try_parse_from(["t", "--ca-renew-before", "soon"]).is_err());
    }
}
