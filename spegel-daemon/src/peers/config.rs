//! The flags of peer fetching and the settings validated from them.
use std::time::Duration;

use regex::Regex;

/// Flags of this subsystem.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// How many peers to look up per object; also bounds how many are tried.
    #[arg(long, env = "SPEGEL_MIRROR_RESOLVE_RETRIES", default_value_t = 3)]
    pub mirror_resolve_retries: usize,
    /// With no request to a peer in flight, how long to wait for a peer to turn up before
    /// treating the object as a miss.
    #[arg(long, env = "SPEGEL_MIRROR_RESOLVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20ms")]
    pub mirror_resolve_timeout: Duration,
    /// Resolve tags through peers (`true`/`false`). Tags from peers are checked against the
    /// manifest the peer serves, but not against what upstream says the tag is now.
    #[arg(long, env = "SPEGEL_RESOLVE_TAGS", default_value_t = true, action = clap::ArgAction::Set)]
    pub resolve_tags: bool,
    /// Regular expressions over `registry/repository:tag`; matching tags always come from
    /// upstream. Comma-separated in the environment; an empty value clears the default.
    #[arg(
        long = "tag-filter",
        env = "SPEGEL_TAG_FILTERS",
        value_delimiter = ',',
        default_value = ":latest$"
    )]
    pub tag_filters: Vec<String>,
    /// Most requests to peers in progress at once: a blob transfer holds its slot until its last
    /// byte has arrived from the peer (streamed blobs: as fast as the client reads).
    #[arg(long, env = "SPEGEL_PEER_CONCURRENCY", default_value_t = 128)]
    pub peer_concurrency: usize,
    /// How long a peer that served bytes not matching their digest is skipped.
    #[arg(long, env = "SPEGEL_PEER_QUARANTINE", value_parser = humantime::parse_duration, default_value = "60s")]
    pub peer_quarantine: Duration,
    /// How long a peer that could not be reached, or died mid-transfer, is skipped.
    #[arg(long, env = "SPEGEL_PEER_BACKOFF", value_parser = humantime::parse_duration, default_value = "10s")]
    pub peer_backoff: Duration,
    /// A transfer from a peer with no byte for this long is resumed elsewhere.
    #[arg(long, env = "SPEGEL_PEER_STALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub peer_stall_timeout: Duration,
    /// A peer delivering less than this many bytes per second (measured over the stall timeout,
    /// counting only time spent waiting for it) is replaced if another peer or the fallback can
    /// take over; 0 disables the check.
    #[arg(long, env = "SPEGEL_PEER_MIN_RATE", default_value_t = 512 * 1024)]
    pub peer_min_rate: u64,
    /// Cap on a whole manifest or HEAD request to peers.
    #[arg(long, env = "SPEGEL_PEER_MANIFEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub peer_manifest_timeout: Duration,
}

/// Why the fetch flags are unusable.
#[derive(Debug, thiserror::Error)]
pub enum FetchConfigError {
    #[error("invalid --tag-filter `{pattern}`: {source}")]
    TagFilter {
        pattern: String,
        source: regex::Error,
    },
    #[error("--{0} must be greater than zero")]
    Zero(&'static str),
}

/// Validated settings of [`PeerSource`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Peers asked of the router per lookup.
    pub lookup_count: usize,
    /// See [`FetchArgs::mirror_resolve_timeout`].
    pub resolve_timeout: Duration,
    pub resolve_tags: bool,
    /// Tag keys (`registry/repository:tag`) matching any of these are never asked of peers.
    pub tag_filters: Vec<Regex>,
    pub max_concurrent: usize,
    pub quarantine: Duration,
    pub backoff: Duration,
    pub stall_timeout: Duration,
    /// See [`FetchArgs::peer_min_rate`].
    pub min_rate: u64,
    /// Cap on a manifest fetch or a HEAD, all attempts and the body included.
    pub manifest_timeout: Duration,
    /// TCP connect timeout to a peer (races are bounded tighter; this bounds the socket).
    pub connect_timeout: Duration,
    /// The hedge delay before enough latency samples exist.
    pub hedge_initial: Duration,
    /// With attempts in flight, give up after max(2×p90, this).
    pub race_timeout_floor: Duration,
    /// Attempts per race, hedges included (each peer found is tried at most once per race, so
    /// `lookup_count` bounds this too).
    pub max_attempts: usize,
    /// Resumes per blob body (each may try several peers, then the fallback).
    pub max_resumes: usize,
    /// Cap on getting the headers of a resume from the fallback source.
    pub fallback_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            lookup_count: 3,
            resolve_timeout: Duration::from_millis(20),
            resolve_tags: true,
            tag_filters: vec![Regex::new(":latest$").unwrap_or_else(|_| unreachable!())],
            max_concurrent: 128,
            quarantine: Duration::from_secs(60),
            backoff: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            min_rate: 512 * 1024,
            manifest_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            hedge_initial: Duration::from_millis(50),
            race_timeout_floor: Duration::from_millis(100),
            max_attempts: 4,
            max_resumes: 3,
            fallback_timeout: Duration::from_secs(30),
        }
    }
}

impl TryFrom<&FetchArgs> for FetchConfig {
    type Error = FetchConfigError;

    fn try_from(args: &FetchArgs) -> Result<Self, Self::Error> {
        let positive = |d: Duration, flag| {
            if d.is_zero() {
                Err(FetchConfigError::Zero(flag))
            } else {
                Ok(d)
            }
        };
        if args.mirror_resolve_retries == 0 {
            return Err(FetchConfigError::Zero("mirror-resolve-retries"));
        }
        if args.peer_concurrency == 0 {
            return Err(FetchConfigError::Zero("peer-concurrency"));
        }
        let tag_filters = args
            .tag_filters
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                Regex::new(p).map_err(|source| FetchConfigError::TagFilter {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            lookup_count: args.mirror_resolve_retries,
            resolve_timeout: positive(args.mirror_resolve_timeout, "mirror-resolve-timeout")?,
            resolve_tags: args.resolve_tags,
            tag_filters,
            max_concurrent: args.peer_concurrency,
            quarantine: args.peer_quarantine,
            backoff: args.peer_backoff,
            stall_timeout: positive(args.peer_stall_timeout, "peer-stall-timeout")?,
            min_rate: args.peer_min_rate,
            manifest_timeout: positive(args.peer_manifest_timeout, "peer-manifest-timeout")?,
            ..Self::default()
        })
    }
}
