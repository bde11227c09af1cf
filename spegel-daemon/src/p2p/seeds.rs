//! Bootstrap seeds: static multiaddrs and a DNS name (e.g. a headless Service) resolved to a
//! stable, sorted handful of addresses.
use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use super::{ParseError, socket_multiaddr};

/// A DNS name whose A/AAAA records are bootstrap peers, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSeed {
    /// The name (or a bare IP).
    pub host: String,
    /// `None`: the router's own listen port.
    pub port: Option<u16>,
}

/// A static seed, split into the address to dial and the peer id if the address named one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StaticSeed {
    pub(super) addr: Multiaddr,
    pub(super) peer: Option<PeerId>,
}

// === impl DnsSeed ===

impl FromStr for DnsSeed {
    type Err = ParseError;

    /// `name`, `name:port`, `[v6]:port` or a bare IP.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || ParseError(format!("invalid bootstrap DNS name `{s}`"));
        if s.is_empty() {
            return Err(invalid());
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self {
                host: addr.ip().to_string(),
                port: Some(addr.port()),
            });
        }
        if s.parse::<IpAddr>().is_ok() {
            return Ok(Self {
                host: s.to_owned(),
                port: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => {
                let port = port.parse::<u16>().map_err(|_| invalid())?;
                (host, Some(port))
            }
            None => (s, None),
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok || port == Some(0) {
            return Err(invalid());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for DnsSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.host.parse::<IpAddr>(), self.port) {
            (Ok(IpAddr::V6(ip)), Some(port)) => write!(f, "[{ip}]:{port}"),
            (_, Some(port)) => write!(f, "{}:{port}", self.host),
            (_, None) => write!(f, "{}", self.host),
        }
    }
}

impl DnsSeed {
    /// Resolves the name (A and AAAA) and picks the seeds to dial.
    pub(super) async fn resolve(
        &self,
        default_port: u16,
        per_family: usize,
    ) -> std::io::Result<Vec<Multiaddr>> {
        let port = self.port.unwrap_or(default_port);
        let addrs = tokio::net::lookup_host((self.host.as_str(), port)).await?;
        Ok(select_seeds(addrs, per_family)
            .into_iter()
            .map(socket_multiaddr)
            .collect())
    }
}

/// The first `per_family` addresses of each family in sorted order, IPv4 first, without
/// duplicates. Every node sorts the same answer the same way, so all nodes dial the same few
/// seeds and the DHT does not split into islands.
pub(super) fn select_seeds(
    addrs: impl IntoIterator<Item = SocketAddr>,
    per_family: usize,
) -> Vec<SocketAddr> {
    let (v4, v6): (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>) =
        addrs.into_iter().partition(SocketAddr::is_ipv4);
    v4.into_iter()
        .take(per_family)
        .chain(v6.into_iter().take(per_family))
        .collect()
}

// === impl StaticSeed ===

impl StaticSeed {
    /// Splits a trailing `/p2p/<id>` off the address.
    pub(super) fn new(mut addr: Multiaddr) -> Self {
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(peer)) => {
                addr.pop();
                Some(peer)
            }
            _ => None,
        };
        Self { addr, peer }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dns_seeds() {
        let seed = |host: &str, port| DnsSeed {
            host: host.into(),
            port,
        };
        assert_eq!(
            "spegel-bootstrap.spegel.svc.cluster.local".parse(),
            Ok(seed("spegel-bootstrap.spegel.svc.cluster.local", None))
        );
        assert_eq!("boot:5002".parse(), Ok(seed("boot", Some(5002))));
        assert_eq!("[fd00::1]:5001".parse(), Ok(seed("fd00::1", Some(5001))));
        assert_eq!("fd00::1".parse(), Ok(seed("fd00::1", None)));
        assert_eq!("10.0.0.1".parse(), Ok(seed("10.0.0.1", None)));
        for bad in [
            "", "boot:", "boot:0", "boot:x", "bad host", "a/b:1", ":5001",
        ] {
            assert!(bad.parse::<DnsSeed>().is_err(), "`{bad}` accepted");
        }
        for text in ["boot", "boot:5002", "[fd00::1]:5001", "10.0.0.1:1"] {
            assert_eq!(text.parse::<DnsSeed>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn selects_sorted_seeds_per_family() {
        let addrs: Vec<SocketAddr> = [
            "10.0.0.9:5001",
            "[fd00::3]:5001",
            "10.0.0.10:5001",
            "10.0.0.2:5001",
            "[fd00::1]:5001",
            "10.0.0.2:5001",
            "10.0.0.1:5001",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let chosen: Vec<String> = select_seeds(addrs.clone(), 3)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            chosen,
            [
                "10.0.0.1:5001",
                "10.0.0.2:5001",
                "10.0.0.9:5001",
                "[fd00::1]:5001",
                "[fd00::3]:5001"
            ]
        );
        // The order of the answer does not matter.
        let mut reversed = addrs;
        reversed.reverse();
        assert_eq!(
            select_seeds(reversed, 3)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            chosen
        );
        assert!(select_seeds(Vec::new(), 3).is_empty());
    }

    #[tokio::test]
    async fn resolves_localhost() {
        let seed: DnsSeed = "localhost".parse().unwrap();
        let addrs = seed.resolve(5001, 3).await.unwrap();
        assert!(!addrs.is_empty());
        for addr in &addrs {
            let text = addr.to_string();
            assert!(
                text == "/ip4/127.0.0.1/tcp/5001" || text == "/ip6/::1/tcp/5001",
                "unexpected {text}"
            );
        }
        let seed: DnsSeed = "localhost:6000".parse().unwrap();
        let addrs = seed.resolve(5001, 3).await.unwrap();
        assert!(addrs.iter().all(|a| a.to_string().ends_with("/tcp/6000")));
    }

    #[test]
    fn splits_peer_ids_off_static_seeds() {
        let peer = PeerId::random();
        let with: Multiaddr = format!("/ip4/10.0.0.1/tcp/5001/p2p/{peer}")
            .parse()
            .unwrap();
        let seed = StaticSeed::new(with);
        assert_eq!(seed.peer, Some(peer));
        assert_eq!(seed.addr.to_string(), "/ip4/10.0.0.1/tcp/5001");
        let without = StaticSeed::new("/dns4/boot/tcp/5001".parse().unwrap());
        assert_eq!(without.peer, None);
        assert_eq!(without.addr.to_string(), "/dns4/boot/tcp/5001");
    }
}
