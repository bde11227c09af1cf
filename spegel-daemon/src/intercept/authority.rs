//! `host[:port]` authorities as the `Host` header, SNI and the mirrored-registry list spell them:
//! parsed, normalised (lowercase, no trailing dot, IPv6 without brackets) and printed back.
use std::{fmt, net::IpAddr};

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
    /// `_`, `.`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']')?;
            let ip: std::net::Ipv6Addr = inner.parse().ok()?;
            let port = match after {
                "" => None,
                p => Some(parse_port(p.strip_prefix(':')?)?),
            };
            return Some(Self {
                host: ip.to_string(),
                port,
            });
        }
        if let Ok(ip) = s.parse::<std::net::Ipv6Addr>() {
            return Some(Self {
                host: ip.to_string(),
                port: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (s, None),
        };
        Some(Self {
            host: normalize_host(host)?,
            port,
        })
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

/// Lowercases a DNS-like name and drops one trailing dot; `None` if it is not one.
pub(crate) fn normalize_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !host.starts_with('.')
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
}
