//! Where a peer's registry API listens: announced in its Identify agent version and completed
//! with the IP we reach the peer at (pure functions; the per-peer cache is in `addresses`).
use std::net::{IpAddr, SocketAddr};

use libp2p::{Multiaddr, core::ConnectedPoint, multiaddr::Protocol};

use super::RegistryAdvertise;

/// Prefix of the agent version every spegel node announces.
const AGENT_PREFIX: &str = "spegel/";
/// The agent-version field carrying the registry address.
const REGISTRY_FIELD: &str = "registry=";
/// Listen addresses taken from one Identify message, at most: a peer cannot flood the table.
const MAX_LISTEN_ADDRS: usize = 16;

/// How much an address is to be trusted, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Quality {
    /// One of the peer's listen IPs, or the source IP of its connection to us.
    Guessed,
    /// The source IP of the peer's connection to us, which it also listens on.
    ListenMatched,
    /// The IP we dialed the peer at and reached it.
    Dialed,
    /// The peer announced a full address.
    Advertised,
}

/// The agent version announcing `registry`.
pub(crate) fn agent_version(registry: RegistryAdvertise) -> String {
    format!(
        "{AGENT_PREFIX}{} {REGISTRY_FIELD}{registry}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The registry announced in a peer's agent version; `None` for other software or a malformed
/// field. The `registry=` value is a [`RegistryAdvertise`] (`:port`, or a socket address
/// `IP:port` / `[v6]:port`), deliberately not the `host[:port]` registry grammar of
/// [`crate::oci::Registry`]: a peer is reached at an IP, never through a DNS name it announces.
pub(crate) fn parse_agent_version(agent: &str) -> Option<RegistryAdvertise> {
    agent
        .strip_prefix(AGENT_PREFIX)?
        .split_ascii_whitespace()
        .find_map(|field| field.strip_prefix(REGISTRY_FIELD))?
        .parse()
        .ok()
}

/// The IP of a multiaddr that starts with one (`/ip4/…`, `/ip6/…`): a multiaddr component, not
/// a textual host, so no `host[:port]` parsing is involved.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Where to reach the registry of a peer that announced `advertise`, given the connection it
/// was announced on and the peer's listen addresses.
pub(crate) fn resolve(
    advertise: RegistryAdvertise,
    endpoint: &ConnectedPoint,
    listen_addrs: &[Multiaddr],
) -> Option<(SocketAddr, Quality)> {
    let port = match advertise {
        RegistryAdvertise::Addr(addr) => return Some((addr, Quality::Advertised)),
        RegistryAdvertise::Port(port) => port,
    };
    let remote_ip = ip_of(endpoint.get_remote_address()).filter(|ip| !ip.is_unspecified());
    if endpoint.is_dialer()
        && let Some(ip) = remote_ip
    {
        return Some((SocketAddr::new(ip, port), Quality::Dialed));
    }
    let listen_ips: Vec<IpAddr> = listen_addrs
        .iter()
        .filter_map(ip_of)
        .filter(|ip| !ip.is_unspecified())
        .collect();
    if let Some(ip) = remote_ip
        && listen_ips.contains(&ip)
    {
        return Some((SocketAddr::new(ip, port), Quality::ListenMatched));
    }
    // The peer connected from an address it does not listen on (a second interface, SNAT):
    // prefer an address it listens on, and a non-loopback one, since loopback would be us.
    listen_ips
        .iter()
        .copied()
        .find(|ip| !ip.is_loopback())
        .or(remote_ip)
        .or_else(|| listen_ips.first().copied())
        .map(|ip| (SocketAddr::new(ip, port), Quality::Guessed))
}

/// The listen addresses of an identified peer worth putting into the routing table: no
/// unspecified IPs, loopback only when the peer itself is on loopback (otherwise dialing it
/// would reach whoever listens on our own loopback), and a bounded number.
pub(crate) fn routable_listen_addrs(
    listen_addrs: &[Multiaddr],
    remote: &Multiaddr,
) -> Vec<Multiaddr> {
    let remote_is_loopback = ip_of(remote).is_some_and(|ip| ip.is_loopback());
    listen_addrs
        .iter()
        .filter(|addr| match ip_of(addr) {
            Some(ip) => !ip.is_unspecified() && (remote_is_loopback || !ip.is_loopback()),
            None => true,
        })
        .take(MAX_LISTEN_ADDRS)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use libp2p::core::{Endpoint, transport::PortUse};

    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn dialer(addr: &str) -> ConnectedPoint {
        ConnectedPoint::Dialer {
            address: ma(addr),
            role_override: Endpoint::Dialer,
            port_use: PortUse::Reuse,
        }
    }

    fn listener(send_back: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: ma("/ip4/10.0.0.1/tcp/5001"),
            send_back_addr: ma(send_back),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn agent_version_round_trips() {
        for registry in [
            RegistryAdvertise::Port(5000),
            RegistryAdvertise::Addr(sa("10.0.0.5:30020")),
            RegistryAdvertise::Addr(sa("[fd00::5]:5000")),
        ] {
            let agent = agent_version(registry);
            assert!(agent.starts_with("spegel/"), "{agent}");
            assert_eq!(parse_agent_version(&agent), Some(registry), "{agent}");
        }
        assert_eq!(
            parse_agent_version("spegel/9.9.9 other=1 registry=:5002"),
            Some(RegistryAdvertise::Port(5002))
        );
        for other in [
            "rust-libp2p/0.48.0",
            "go-libp2p/0.49 registry=:5000",
            "spegel/0.0.0",
            "spegel/0.0.0 registry=",
            "spegel/0.0.0 registry=:0",
            "spegel/0.0.0 registry=nonsense",
            "spegel/0.0.0 registry=0.0.0.0:5000",
        ] {
            assert_eq!(parse_agent_version(other), None, "{other}");
        }
    }

    #[test]
    fn resolves_registry_addresses() {
        let port = RegistryAdvertise::Port(5000);
        let listens = [ma("/ip4/127.0.0.1/tcp/5001"), ma("/ip4/10.0.0.7/tcp/5001")];

        // A full address wins over everything.
        let full = RegistryAdvertise::Addr(sa("192.168.1.1:30020"));
        assert_eq!(
            resolve(full, &dialer("/ip4/10.0.0.7/tcp/5001"), &listens),
            Some((sa("192.168.1.1:30020"), Quality::Advertised))
        );
        // The IP we dialed and reached, even loopback (the peer is on this host then).
        assert_eq!(
            resolve(
                port,
                &dialer(
                    "/ip4/10.0.0.8/tcp/5001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                ),
                &listens
            ),
            Some((sa("10.0.0.8:5000"), Quality::Dialed))
        );
        assert_eq!(
            resolve(port, &dialer("/ip4/127.0.0.1/tcp/5001"), &[]),
            Some((sa("127.0.0.1:5000"), Quality::Dialed))
        );
        // Inbound: the source IP if the peer listens on it.
        assert_eq!(
            resolve(port, &listener("/ip4/10.0.0.7/tcp/40000"), &listens),
            Some((sa("10.0.0.7:5000"), Quality::ListenMatched))
        );
        // Inbound from elsewhere: a non-loopback listen IP.
        assert_eq!(
            resolve(port, &listener("/ip4/172.16.0.1/tcp/40000"), &listens),
            Some((sa("10.0.0.7:5000"), Quality::Guessed))
        );
        // Nothing better known: the source IP.
        assert_eq!(
            resolve(port, &listener("/ip6/fd00::9/tcp/40000"), &[]),
            Some((sa("[fd00::9]:5000"), Quality::Guessed))
        );
        // No IP anywhere (memory transport): unknown.
        assert_eq!(
            resolve(port, &dialer("/memory/1234"), &[ma("/memory/1234")]),
            None
        );
    }

    #[test]
    fn filters_listen_addresses() {
        let listens = [
            ma("/ip4/0.0.0.0/tcp/5001"),
            ma("/ip4/127.0.0.1/tcp/5001"),
            ma("/ip4/10.0.0.7/tcp/5001"),
            ma("/memory/77"),
        ];
        let kept = routable_listen_addrs(&listens, &ma("/ip4/10.0.0.7/tcp/40000"));
        assert_eq!(kept, [ma("/ip4/10.0.0.7/tcp/5001"), ma("/memory/77")]);
        let kept = routable_listen_addrs(&listens, &ma("/ip4/127.0.0.1/tcp/40000"));
        assert_eq!(kept.len(), 3, "a loopback peer keeps its loopback address");
        let many: Vec<Multiaddr> = (0..100).map(|i| ma(&format!("/memory/{i}"))).collect();
        assert_eq!(
            routable_listen_addrs(&many, &ma("/memory/1")).len(),
            MAX_LISTEN_ADDRS
        );
    }
}
