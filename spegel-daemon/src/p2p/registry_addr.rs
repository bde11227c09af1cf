//! Where a peer's registry API listens: announced in its Identify agent version and completed
//! with the IP we reach the peer at (pure functions; the per-peer cache is in `addresses`).
//!
//! **Address policy.** A peer may announce a full `IP:port`, but the IP is used only if it is
//! the IP we reach the peer at (its connection's remote IP) or lies within the operator's
//! `--node-cidrs`; loopback, link-local, unspecified and multicast IPs are always refused,
//! except loopback from a peer that is itself on this host (its connection is over loopback or
//! the in-process memory transport), the rule [`routable_listen_addrs`] applies to listen
//! addresses. Otherwise any peer could make this node send requests to its own loopback, the
//! cloud metadata service or any host of the network.
//!
//! A refused announcement is not dropped: its IP is ignored and its port paired with the IP we
//! reach the peer at, as if the peer had announced `:port`. That trusts the peer exactly as far
//! as a port-only announcement already does (nothing more), and keeps an honest but
//! misconfigured node (its advertise address outside `--node-cidrs`) serving its peers;
//! dropping the peer's registry instead would gain no safety.
use std::net::{IpAddr, SocketAddr};

use libp2p::{Multiaddr, core::ConnectedPoint, multiaddr::Protocol};

use super::RegistryAdvertise;
use crate::net::{self, Cidr, Special};

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

/// Why an announced registry IP was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Loopback, link-local, unspecified or multicast.
    Special(Special),
    /// Neither the IP we reach the peer at nor within `--node-cidrs`.
    NotThePeer,
}

/// Where a peer's registry is, as far as its announcement tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The registry's address and how far to trust it; `None` if no IP is known.
    pub(crate) addr: Option<(SocketAddr, Quality)>,
    /// The announced IP, if it was refused (and only its port used), and why.
    pub(crate) refused: Option<(IpAddr, Refused)>,
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
/// was announced on, the peer's listen addresses and the operator's node CIDRs.
pub(crate) fn resolve(
    advertise: RegistryAdvertise,
    endpoint: &ConnectedPoint,
    listen_addrs: &[Multiaddr],
    node_cidrs: &[Cidr],
) -> Resolved {
    let port = match advertise {
        RegistryAdvertise::Addr(addr) => {
            match check_announced(addr.ip(), endpoint.get_remote_address(), node_cidrs) {
                Ok(()) => {
                    return Resolved {
                        addr: Some((addr, Quality::Advertised)),
                        refused: None,
                    };
                }
                Err(refused) => {
                    let mut resolved = resolve_port(addr.port(), endpoint, listen_addrs);
                    resolved.refused = Some((addr.ip(), refused));
                    return resolved;
                }
            }
        }
        RegistryAdvertise::Port(port) => port,
    };
    resolve_port(port, endpoint, listen_addrs)
}

/// Whether a peer reached at `remote` may announce its registry at `ip` (see the module doc).
pub(crate) fn check_announced(
    ip: IpAddr,
    remote: &Multiaddr,
    node_cidrs: &[Cidr],
) -> Result<(), Refused> {
    let ip = ip.to_canonical();
    let remote_ip = ip_of(remote).map(|ip| ip.to_canonical());
    if let Some(special) = net::special(ip) {
        return match special {
            Special::Loopback if on_this_host(remote) => Ok(()),
            special => Err(Refused::Special(special)),
        };
    }
    if remote_ip == Some(ip) || node_cidrs.iter().any(|cidr| cidr.contains(ip)) {
        Ok(())
    } else {
        Err(Refused::NotThePeer)
    }
}

/// Whether the peer at `remote` is on this host: reached over loopback, or over the memory
/// transport, which only connects peers in this process.
fn on_this_host(remote: &Multiaddr) -> bool {
    match remote.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.to_canonical().is_loopback(),
        Some(Protocol::Memory(_)) => true,
        _ => false,
    }
}

/// The registry of a peer that announced only `port` (or an IP that was refused): the IP we
/// reached it at, else one it listens on (never a special one, but loopback from a peer on this
/// host).
fn resolve_port(port: u16, endpoint: &ConnectedPoint, listen_addrs: &[Multiaddr]) -> Resolved {
    let remote = endpoint.get_remote_address();
    let remote_ip = ip_of(remote).filter(|ip| !ip.is_unspecified());
    let found = |ip: IpAddr, quality| Resolved {
        addr: Some((SocketAddr::new(ip, port), quality)),
        refused: None,
    };
    if endpoint.is_dialer()
        && let Some(ip) = remote_ip
    {
        return found(ip, Quality::Dialed);
    }
    let local_peer = on_this_host(remote);
    let listen_ips: Vec<IpAddr> = listen_addrs
        .iter()
        .filter_map(ip_of)
        .filter(|ip| match net::special(*ip) {
            None => true,
            Some(Special::Loopback) => local_peer,
            Some(_) => false,
        })
        .collect();
    if let Some(ip) = remote_ip
        && listen_ips.contains(&ip)
    {
        return found(ip, Quality::ListenMatched);
    }
    // The peer connected from an address it does not listen on (a second interface, SNAT):
    // prefer an address it listens on, and a non-loopback one, since loopback would be us.
    let guess = listen_ips
        .iter()
        .copied()
        .find(|ip| !ip.is_loopback())
        .or(remote_ip)
        .or_else(|| listen_ips.first().copied());
    Resolved {
        addr: guess.map(|ip| (SocketAddr::new(ip, port), Quality::Guessed)),
        refused: None,
    }
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

    /// What `resolve` found, without the refusal.
    fn found(
        advertise: RegistryAdvertise,
        endpoint: &ConnectedPoint,
        listens: &[Multiaddr],
    ) -> Option<(SocketAddr, Quality)> {
        let resolved = resolve(advertise, endpoint, listens, &[]);
        assert_eq!(resolved.refused, None);
        resolved.addr
    }

    #[test]
    fn resolves_registry_addresses() {
        let port = RegistryAdvertise::Port(5000);
        let listens = [ma("/ip4/127.0.0.1/tcp/5001"), ma("/ip4/10.0.0.7/tcp/5001")];

        // A full address wins over everything (when the policy allows it).
        let full = RegistryAdvertise::Addr(sa("10.0.0.7:30020"));
        assert_eq!(
            found(full, &dialer("/ip4/10.0.0.7/tcp/5001"), &listens),
            Some((sa("10.0.0.7:30020"), Quality::Advertised))
        );
        // The IP we dialed and reached, even loopback (the peer is on this host then).
        assert_eq!(
            found(
                port,
                &dialer(
                    "/ip4/10.0.0.8/tcp/5001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                ),
                &listens
            ),
            Some((sa("10.0.0.8:5000"), Quality::Dialed))
        );
        assert_eq!(
            found(port, &dialer("/ip4/127.0.0.1/tcp/5001"), &[]),
            Some((sa("127.0.0.1:5000"), Quality::Dialed))
        );
        // Inbound: the source IP if the peer listens on it.
        assert_eq!(
            found(port, &listener("/ip4/10.0.0.7/tcp/40000"), &listens),
            Some((sa("10.0.0.7:5000"), Quality::ListenMatched))
        );
        // Inbound from elsewhere: a non-loopback listen IP.
        assert_eq!(
            found(port, &listener("/ip4/172.16.0.1/tcp/40000"), &listens),
            Some((sa("10.0.0.7:5000"), Quality::Guessed))
        );
        // Nothing better known: the source IP.
        assert_eq!(
            found(port, &listener("/ip6/fd00::9/tcp/40000"), &[]),
            Some((sa("[fd00::9]:5000"), Quality::Guessed))
        );
        // No IP anywhere (memory transport): unknown.
        assert_eq!(
            found(port, &dialer("/memory/1234"), &[ma("/memory/1234")]),
            None
        );
        // Dialed by DNS name (no remote IP): never a loopback or link-local listen IP.
        assert_eq!(
            found(
                port,
                &dialer("/dns4/peer.test/tcp/5001"),
                &[
                    ma("/ip4/127.0.0.1/tcp/5001"),
                    ma("/ip4/169.254.1.1/tcp/5001")
                ]
            ),
            None
        );
    }

    #[test]
    fn announced_addresses_follow_the_policy() {
        use Refused::{NotThePeer, Special as S};
        let cidrs: Vec<Cidr> = vec![
            "10.10.0.0/16".parse().unwrap(),
            "fd10::/16".parse().unwrap(),
        ];
        // Announced IP, connection's remote address, verdict.
        let cases: &[(&str, &str, Result<(), Refused>)] = &[
            // The IP we reach the peer at.
            ("10.0.0.7", "/ip4/10.0.0.7/tcp/5001", Ok(())),
            ("fd00::7", "/ip6/fd00::7/tcp/5001", Ok(())),
            (
                "10.0.0.7",
                "/ip4/10.0.0.7/tcp/5001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                Ok(()),
            ),
            ("::ffff:10.0.0.7", "/ip4/10.0.0.7/tcp/5001", Ok(())),
            // Within the node CIDRs, whatever the peer is reached at.
            ("10.10.3.4", "/ip4/10.0.0.7/tcp/5001", Ok(())),
            ("fd10::4", "/ip4/10.0.0.7/tcp/5001", Ok(())),
            ("10.10.3.4", "/dns4/peer.test/tcp/5001", Ok(())),
            // Anywhere else.
            ("10.0.0.8", "/ip4/10.0.0.7/tcp/5001", Err(NotThePeer)),
            ("192.168.1.1", "/ip4/10.0.0.7/tcp/5001", Err(NotThePeer)),
            ("10.0.0.7", "/dns4/peer.test/tcp/5001", Err(NotThePeer)),
            ("10.0.0.7", "/memory/12", Err(NotThePeer)),
            // Special classes, even from a peer reached at that very IP.
            (
                "127.0.0.1",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::Loopback)),
            ),
            ("::1", "/ip6/fd00::7/tcp/5001", Err(S(Special::Loopback))),
            (
                "::ffff:127.0.0.1",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::Loopback)),
            ),
            (
                "127.0.0.1",
                "/dns4/peer.test/tcp/5001",
                Err(S(Special::Loopback)),
            ),
            (
                "169.254.169.254",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::LinkLocal)),
            ),
            (
                "169.254.0.9",
                "/ip4/169.254.0.9/tcp/5001",
                Err(S(Special::LinkLocal)),
            ),
            (
                "fe80::1",
                "/ip6/fe80::1/tcp/5001",
                Err(S(Special::LinkLocal)),
            ),
            (
                "224.0.0.1",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::Multicast)),
            ),
            (
                "ff02::1",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::Multicast)),
            ),
            (
                "0.0.0.0",
                "/ip4/10.0.0.7/tcp/5001",
                Err(S(Special::Unspecified)),
            ),
            ("::", "/ip4/10.0.0.7/tcp/5001", Err(S(Special::Unspecified))),
            // Loopback only from a peer on this host (loopback or the memory transport).
            ("127.0.0.1", "/ip4/127.0.0.1/tcp/5001", Ok(())),
            ("127.0.0.1", "/ip6/::1/tcp/5001", Ok(())),
            ("127.0.0.1", "/memory/12", Ok(())),
            (
                "169.254.0.9",
                "/ip4/127.0.0.1/tcp/5001",
                Err(S(Special::LinkLocal)),
            ),
        ];
        for (ip, remote, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                check_announced(ip, &ma(remote), &cidrs),
                *want,
                "{ip} from {remote}"
            );
        }
    }

    #[test]
    fn refused_announcements_keep_only_their_port() {
        let listens = [ma("/ip4/10.0.0.7/tcp/5001")];
        for (announced, endpoint, addr, quality, refused) in [
            (
                "127.0.0.1:5000",
                dialer("/ip4/10.0.0.7/tcp/5001"),
                "10.0.0.7:5000",
                Quality::Dialed,
                Refused::Special(Special::Loopback),
            ),
            (
                "169.254.169.254:80",
                listener("/ip4/10.0.0.7/tcp/40000"),
                "10.0.0.7:80",
                Quality::ListenMatched,
                Refused::Special(Special::LinkLocal),
            ),
            (
                "192.168.1.1:30020",
                listener("/ip4/172.16.0.1/tcp/40000"),
                "10.0.0.7:30020",
                Quality::Guessed,
                Refused::NotThePeer,
            ),
        ] {
            let announced = sa(announced);
            let resolved = resolve(RegistryAdvertise::Addr(announced), &endpoint, &listens, &[]);
            assert_eq!(
                resolved,
                Resolved {
                    addr: Some((sa(addr), quality)),
                    refused: Some((announced.ip(), refused)),
                },
                "{announced}"
            );
        }
        // Within the node CIDRs: taken as announced.
        let cidrs = ["192.168.0.0/16".parse().unwrap()];
        let resolved = resolve(
            RegistryAdvertise::Addr(sa("192.168.1.1:30020")),
            &listener("/ip4/172.16.0.1/tcp/40000"),
            &listens,
            &cidrs,
        );
        assert_eq!(
            resolved.addr,
            Some((sa("192.168.1.1:30020"), Quality::Advertised))
        );
        assert_eq!(resolved.refused, None);
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
