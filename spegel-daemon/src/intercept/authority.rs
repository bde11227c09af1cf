//! `host[:port]` authorities as the wire spells them (the `Host` header, SNI): parsed,
//! normalised (lowercase, no trailing dot, IPv6 without brackets) and printed back.
//!
//! Deliberately more lenient than the registry grammar ([`crate::oci::Registry`], used for what
//! an operator configures): what a client sends is only matched against the configured
//! registries, never trusted, so underscores, a trailing dot and a bare IPv6 address are
//! accepted here. The port and bracket handling is the registry grammar's
//! ([`split_authority`]); only the host check differs.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use crate::oci::{Host, SplitHost, split_authority};

/// Longest DNS name (without the trailing dot).
const MAX_HOST_LEN: usize = 253;

/// A host with an optional port, as in `Host:` or a `host[:port]` list entry. The host is
/// lowercased, without a trailing dot, and without brackets for IPv6 literals.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    pub host: String,
    pub port: Option<u16>,
}

impl Authority {
    /// Parses `host`, `host:port`, `[v6]`, `[v6]:port`. A bare IPv6 address without brackets is
    /// accepted too (there is no port then). Host names must be DNS-like: letters, digits, `-`,
    /// `_`, `.` (see [`normalize_host`]).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<Ipv6Addr>() {
            return Some(Self {
                host: ip.to_string(),
                port: None,
            });
        }
        let (host, port) = split_authority(s).ok()?;
        let host = match host {
            SplitHost::Bracketed(ip) => ip.to_string(),
            SplitHost::Text(name) => normalize_host(name)?,
        };
        Some(Self { host, port })
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Authority {
    /// `host[:port]`, an IPv6 host bracketed as in [`Host`]'s display.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(ip) => write!(f, "{}", Host::Ip(ip))?,
            None => f.write_str(&self.host)?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Lowercases a DNS-like name and drops one trailing dot; `None` if it is not one. Lenient on
/// purpose (underscores, a trailing dot, labels of any length): the wire's names, not the
/// registry grammar's.
pub(crate) fn normalize_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !host.starts_with('.')
        && !host.ends_with('.')
        && !host.contains("..");
    valid.then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let a = |s: &str| Authority::parse(s);
        assert_eq!(
            a("Docker.IO."),
            Some(Authority {
                host: "docker.io".into(),
                port: None
            })
        );
        assert_eq!(
            a("10.1.2.3:5000").unwrap().ip(),
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(a("[::1]:443").unwrap().to_string(), "[::1]:443");
        assert_eq!(a("fd00::1").unwrap().to_string(), "[fd00::1]");
        assert_eq!(a("ghcr.io:443").unwrap().to_string(), "ghcr.io:443");
        for bad in [
            "", ":80", "a:", "a:0", "a:65536", "a b", "[::1", "[x]:1", "a..b", ".a", "[::1]x",
        ] {
            assert_eq!(a(bad), None, "{bad}");
        }
    }

    /// Found by the `authority` fuzz target: only one trailing dot is dropped, so a second one
    /// used to survive normalisation (`j1.`), breaking "no trailing dot" and display → parse.
    #[test]
    fn two_trailing_dots_are_refused() {
        assert_eq!(Authority::parse("J1.."), None);
        assert_eq!(Authority::parse("docker.io..:443"), None);
        assert_eq!(normalize_host("a.."), None);
        assert_eq!(normalize_host("a.").as_deref(), Some("a"));
    }
}
