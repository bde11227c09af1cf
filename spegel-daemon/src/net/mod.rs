//! IP addresses as the address policies see them: the classes never trusted on someone else's
//! word ([`special`]: loopback, link-local, unspecified, multicast), operator CIDR lists
//! ([`Cidr`]) and this node's own interface addresses ([`local_addrs`]). Used by the p2p
//! router (which registry addresses peers may announce) and the upstream client (where
//! redirects may lead).
use std::{fmt, net::IpAddr};

mod cidr;
mod local;

pub use cidr::{Cidr, CidrError};
pub use local::local_addrs;

/// A class of addresses that is never a place to send a request on a remote party's word:
/// connecting there reaches this host, its link, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    /// `127.0.0.0/8`, `::1`: this host.
    Loopback,
    /// `169.254.0.0/16`, `fe80::/10`: this link only (cloud metadata services live here).
    LinkLocal,
    /// `0.0.0.0/8`, `::`: "this host" on Linux when connected to.
    Unspecified,
    /// `224.0.0.0/4`, `255.255.255.255`, `ff00::/8`: not a single host.
    Multicast,
}

/// The class `ip` falls into, if any. IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are
/// judged as the IPv4 address they carry.
pub fn special(ip: IpAddr) -> Option<Special> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_loopback() => Some(Special::Loopback),
        IpAddr::V4(v4) if v4.is_link_local() => Some(Special::LinkLocal),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(Special::Unspecified),
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => Some(Special::Multicast),
        IpAddr::V6(v6) if v6.is_loopback() => Some(Special::Loopback),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Special::LinkLocal),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(Special::Unspecified),
        IpAddr::V6(v6) if v6.is_multicast() => Some(Special::Multicast),
        IpAddr::V4(_) | IpAddr::V6(_) => None,
    }
}

impl fmt::Display for Special {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_addresses() {
        let cases: &[(&str, Option<Special>)] = &[
            ("127.0.0.1", Some(Special::Loopback)),
            ("127.255.0.9", Some(Special::Loopback)),
            ("::1", Some(Special::Loopback)),
            ("::ffff:127.0.0.1", Some(Special::Loopback)),
            ("169.254.169.254", Some(Special::LinkLocal)),
            ("169.254.0.1", Some(Special::LinkLocal)),
            ("fe80::1", Some(Special::LinkLocal)),
            ("febf::1", Some(Special::LinkLocal)),
            ("::ffff:169.254.1.1", Some(Special::LinkLocal)),
            ("0.0.0.0", Some(Special::Unspecified)),
            ("0.1.2.3", Some(Special::Unspecified)),
            ("::", Some(Special::Unspecified)),
            ("224.0.0.1", Some(Special::Multicast)),
            ("239.255.255.250", Some(Special::Multicast)),
            ("255.255.255.255", Some(Special::Multicast)),
            ("ff02::1", Some(Special::Multicast)),
            ("10.0.0.1", None),
            ("192.168.1.1", None),
            ("172.16.0.1", None),
            ("169.253.255.255", None),
            ("169.255.0.1", None),
            ("128.0.0.1", None),
            ("8.8.8.8", None),
            ("fec0::1", None),
            ("fd00::1", None),
            ("2001:db8::1", None),
            ("::ffff:10.0.0.1", None),
        ];
        for (ip, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(special(ip), *want, "{ip}");
        }
    }
}
