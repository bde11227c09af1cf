//! [`Cidr`]: an IP network (`10.0.0.0/8`, `fd00::/8`, or one address) as operators write them
//! in flags.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IP network: every address sharing the first `prefix` bits of `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address, host bits cleared.
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR `{input}` (use `10.0.0.0/8`, `fd00::/8` or an address): {reason}")]
pub struct CidrError {
    input: String,
    reason: &'static str,
}

impl Cidr {
    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses count as the IPv4 address
    /// they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(ip, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(ip, self.prefix) == net,
            _ => false,
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(ip) & mask)
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (`/32`, `/128`). Host bits are cleared:
    /// `10.1.2.3/8` is `10.0.0.0/8`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let fail = |reason| CidrError {
            input: input.to_owned(),
            reason,
        };
        let (ip, prefix) = match input.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (input, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| fail("not an IP address"))?;
        // IPv4-mapped networks are written as IPv4 ones; anything else would never match.
        let ip = ip.to_canonical();
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|prefix| *prefix <= max)
                .ok_or_else(|| fail("bad prefix length"))?,
        };
        let addr = match ip {
            IpAddr::V4(v4) => IpAddr::V4(mask_v4(v4, prefix)),
            IpAddr::V6(v6) => IpAddr::V6(mask_v6(v6, prefix)),
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints() {
        for (input, printed) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            (" 10.1.2.3/8 ", "10.0.0.0/8"),
            ("10.0.0.7", "10.0.0.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("fd00::/8", "fd00::/8"),
            ("fd00::1", "fd00::1/128"),
            ("::/0", "::/0"),
            ("::ffff:10.0.0.0/8", "10.0.0.0/8"),
            ("127.0.0.0/8", "127.0.0.0/8"),
        ] {
            assert_eq!(cidr(input).to_string(), printed, "{input}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "host/8",
            "10.0.0/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "`{bad}` accepted");
        }
    }

    #[test]
    fn contains_addresses_of_its_family() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
            ("10.0.0.7", "10.0.0.7", true),
            ("10.0.0.7", "10.0.0.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "fd00::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("fd00::/8", "10.0.0.1", false),
            ("::/0", "2001:db8::1", true),
            ("127.0.0.0/8", "127.0.0.53", true),
            ("192.168.0.0/23", "192.168.1.255", true),
            ("192.168.0.0/23", "192.168.2.0", false),
        ];
        for (net, ip, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(cidr(net).contains(ip), *want, "{net} ∋ {ip}");
        }
    }
}
