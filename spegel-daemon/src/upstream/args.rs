//! The upstream client's flags (timeouts, backoff, blob resumes) and the [`Timeouts`] that bound
//! every wait on an upstream.
use std::{path::PathBuf, time::Duration};

use super::Backoff;
use crate::net::Cidr;

/// Flags of the upstream client.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Extra CA certificates (PEM files) trusted for upstream registries, on top of the system
    /// roots. Repeatable, or comma-separated in the environment.
    #[arg(
        long = "upstream-ca-file",
        env = "SPEGEL_UPSTREAM_CA_FILE",
        value_delimiter = ',',
        value_name = "PEM"
    )]
    pub upstream_ca_files: Vec<PathBuf>,
    /// Bound on DNS lookup, TCP connect and TLS handshake to an upstream, together.
    #[arg(long, env = "SPEGEL_UPSTREAM_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub upstream_connect_timeout: Duration,
    /// Bound on waiting for an upstream's response headers (blobs, manifests by digest,
    /// passthrough).
    #[arg(long, env = "SPEGEL_UPSTREAM_RESPONSE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub upstream_response_timeout: Duration,
    /// Bound on waiting for an upstream's response headers for manifests by tag.
    #[arg(long, env = "SPEGEL_UPSTREAM_TAG_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub upstream_tag_timeout: Duration,
    /// An upstream body that sends nothing for this long is aborted.
    #[arg(long, env = "SPEGEL_UPSTREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub upstream_idle_timeout: Duration,
    /// How long a registry that failed (5xx, connection failure, timeout) or rate-limited without
    /// `Retry-After` is backing off: meanwhile intercepted tag requests for it ask this node and
    /// its peers first (and upstream only if they have nothing). The failing request itself is
    /// never delayed.
    #[arg(long, env = "SPEGEL_UPSTREAM_BACKOFF", value_parser = humantime::parse_duration, default_value = "5s")]
    pub upstream_backoff: Duration,
    /// The longest backoff honoured, whatever an upstream's `Retry-After` asks; `0s` turns
    /// backoff off.
    #[arg(long, env = "SPEGEL_UPSTREAM_BACKOFF_MAX", value_parser = humantime::parse_duration, default_value = "5m")]
    pub upstream_backoff_max: Duration,
    /// How many times an upstream blob body that stalls (see `--upstream-idle-timeout`) or
    /// breaks is resumed with `Range` on a new request before the transfer fails.
    #[arg(long, env = "SPEGEL_UPSTREAM_BLOB_RESUMES", default_value_t = 3)]
    pub upstream_blob_resumes: usize,
    /// Networks (`127.0.0.1/32,169.254.169.254`) an upstream redirect may lead to although
    /// they are loopback, link-local, unspecified, multicast or this node's own addresses,
    /// which are refused otherwise (checked on every address a redirect's host resolves to).
    /// The intercepted registry itself is never subject to this.
    #[arg(
        long,
        env = "SPEGEL_UPSTREAM_ALLOW_REDIRECT_TO",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub upstream_allow_redirect_to: Vec<Cidr>,
}

impl UpstreamArgs {
    /// The backoff these flags describe.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.upstream_backoff, self.upstream_backoff_max)
    }
}

/// Every wait on an upstream is bounded by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// DNS, TCP connect and TLS handshake together.
    pub connect: Duration,
    /// Response headers, except manifests by tag.
    pub response: Duration,
    /// Response headers of manifests by tag.
    pub tag_response: Duration,
    /// Longest silence inside a body.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(30),
            tag_response: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

impl From<&UpstreamArgs> for Timeouts {
    fn from(args: &UpstreamArgs) -> Self {
        Self {
            connect: args.upstream_connect_timeout,
            response: args.upstream_response_timeout,
            tag_response: args.upstream_tag_timeout,
            idle: args.upstream_idle_timeout,
        }
    }
}
