//! The names the node CA may vouch for: [`LeafName`] (a server name a leaf is minted for, as SNI
//! or an IP literal names it) and [`PermittedNames`] (the hosts of the mirrored registries, and
//! the X.509 NameConstraints that pin the CA to them).
use std::{collections::BTreeSet, fmt, net::IpAddr};

use rcgen::{CidrSubnet, GeneralSubtree, NameConstraints};
use rustls_pki_types::ServerName;

use super::ca::CaError;
use crate::oci::{Host, Registry};

/// The DNS subtree permitted when no DNS-named registry is mirrored. RFC 5280 constrains a name
/// form only when a subtree of that form is present, so without it a CA for IP registries alone
/// would be unconstrained for DNS names. `.invalid` is reserved (RFC 6761) and never resolves.
const DNS_SENTINEL: &str = "invalid";

/// A name a leaf certificate can be minted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeafName {
    /// A lowercase DNS name without trailing dot.
    Dns(String),
    Ip(IpAddr),
}

impl LeafName {
    /// Parses a DNS name or IP literal (`[v6]` brackets allowed), normalising case and a
    /// trailing dot.
    pub fn parse(name: &str) -> Result<Self, CaError> {
        let trimmed = name.trim();
        let unbracketed = trimmed
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(trimmed);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let dns = trimmed
            .strip_suffix('.')
            .unwrap_or(trimmed)
            .to_ascii_lowercase();
        // DNS names only: wildcards, underscores-as-labels and IPs were handled or are refused.
        match ServerName::try_from(dns.as_str()) {
            // One trailing dot is dropped above; rustls accepts a name that still ends in one.
            Ok(ServerName::DnsName(_))
                if !dns.contains('*') && !dns.is_empty() && !dns.ends_with('.') =>
            {
                Ok(LeafName::Dns(dns))
            }
            _ => Err(CaError::InvalidName(name.to_owned())),
        }
    }
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(name) => f.write_str(name),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The names the CA may vouch for: the mirrored registries' hosts (a DNS name covers its
/// subdomains too, as in X.509 name constraints: `docker.io` covers `registry-1.docker.io`),
/// and the exact IPs of IP-literal registries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PermittedNames {
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
}

impl PermittedNames {
    /// From the mirrored registries (the one `--mirrored-registries` grammar, [`Registry`]):
    /// their hosts. Ports and schemes are dropped (certificates name neither). An empty list is
    /// refused: the CA must be constrained.
    pub fn from_registries<'a>(
        registries: impl IntoIterator<Item = &'a Registry>,
    ) -> Result<Self, CaError> {
        let mut permitted = PermittedNames::default();
        for registry in registries {
            match registry.host() {
                Host::Name(name) => permitted.dns.insert(name.clone()),
                Host::Ip(ip) => permitted.ips.insert(*ip),
            };
        }
        if permitted.dns.is_empty() && permitted.ips.is_empty() {
            return Err(CaError::NoRegistries);
        }
        Ok(permitted)
    }

    /// The names a CA certificate's constraints permit (the inverse of
    /// [`Self::name_constraints`]): DNS subtrees but the `.invalid` sentinel, and single-address
    /// IP subtrees. Wider IP ranges are never minted by spegel and are ignored (not covered).
    pub(crate) fn from_constraints(constraints: &CanonicalConstraints) -> Self {
        let mut permitted = PermittedNames::default();
        for subtree in &constraints.permitted {
            match subtree {
                CanonicalSubtree::Dns(name) if name != DNS_SENTINEL => {
                    permitted.dns.insert(name.to_ascii_lowercase());
                }
                CanonicalSubtree::Dns(_) => {}
                CanonicalSubtree::Ip(bytes) => {
                    if let Some(ip) = single_address(bytes) {
                        permitted.ips.insert(ip);
                    }
                }
            }
        }
        permitted
    }

    /// Whether every name in `wanted` is inside these constraints (a DNS name is covered by
    /// itself or a parent subtree, an IP only by itself). Returns the names that are not.
    pub fn uncovered(&self, wanted: &PermittedNames) -> Vec<LeafName> {
        wanted
            .dns
            .iter()
            .map(|name| LeafName::Dns(name.clone()))
            .chain(wanted.ips.iter().map(|ip| LeafName::Ip(*ip)))
            .filter(|name| !self.permits(name))
            .collect()
    }

    /// How many names (DNS subtrees and IPs).
    pub fn len(&self) -> usize {
        self.dns.len() + self.ips.len()
    }

    /// Whether there is no name at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The permitted DNS subtrees.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().map(String::as_str)
    }

    /// The permitted IP addresses.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips.iter().copied()
    }

    /// Whether a leaf for `name` is inside the constraints (the same rule X.509 verifiers apply).
    pub fn permits(&self, name: &LeafName) -> bool {
        match name {
            LeafName::Ip(ip) => self.ips.contains(ip),
            LeafName::Dns(name) => self.dns.iter().any(|subtree| {
                name == subtree
                    || name
                        .strip_suffix(subtree.as_str())
                        .is_some_and(|prefix| prefix.ends_with('.'))
            }),
        }
    }

    /// The NameConstraints extension for this set. Beyond the permitted names it closes the
    /// name forms that would otherwise be unconstrained (RFC 5280 §4.2.1.10 constrains a form
    /// only when a subtree of that form is present): all IPv4 and/or IPv6 addresses are excluded
    /// when none of that family is mirrored, and the DNS form gets a sentinel when no DNS name is.
    pub(super) fn name_constraints(&self) -> NameConstraints {
        let mut permitted_subtrees: Vec<GeneralSubtree> = self
            .dns
            .iter()
            .map(|name| GeneralSubtree::DnsName(name.clone()))
            .collect();
        if self.dns.is_empty() {
            permitted_subtrees.push(GeneralSubtree::DnsName(DNS_SENTINEL.to_owned()));
        }
        permitted_subtrees.extend(self.ips.iter().map(|ip| {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(*ip, prefix))
        }));
        let mut excluded_subtrees = Vec::new();
        if !self.ips.iter().any(IpAddr::is_ipv4) {
            excluded_subtrees.push(GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])));
        }
        if !self.ips.iter().any(IpAddr::is_ipv6) {
            excluded_subtrees.push(GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])));
        }
        NameConstraints {
            permitted_subtrees,
            excluded_subtrees,
        }
    }

    /// The canonical form of [`Self::name_constraints`], as a CA read from disk gives it.
    #[cfg(test)]
    pub(super) fn canonical_constraints(&self) -> CanonicalConstraints {
        let constraints = self.name_constraints();
        let canon = |subtrees: &[GeneralSubtree]| {
            subtrees
                .iter()
                .filter_map(|subtree| match subtree {
                    GeneralSubtree::DnsName(name) => Some(CanonicalSubtree::Dns(name.clone())),
                    GeneralSubtree::IpAddress(CidrSubnet::V4(addr, mask)) => {
                        Some(CanonicalSubtree::Ip([&addr[..], &mask[..]].concat()))
                    }
                    GeneralSubtree::IpAddress(CidrSubnet::V6(addr, mask)) => {
                        Some(CanonicalSubtree::Ip([&addr[..], &mask[..]].concat()))
                    }
                    _ => None,
                })
                .collect()
        };
        CanonicalConstraints {
            permitted: canon(&constraints.permitted_subtrees),
            excluded: canon(&constraints.excluded_subtrees),
        }
    }
}

impl fmt::Display for PermittedNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for name in self
            .dns
            .iter()
            .cloned()
            .chain(self.ips.iter().map(ToString::to_string))
        {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(&name)?;
        }
        Ok(())
    }
}

/// The address of an IP subtree (address then mask) whose mask is all ones, else `None`.
fn single_address(bytes: &[u8]) -> Option<IpAddr> {
    let (addr, mask) = bytes.split_at(bytes.len() / 2);
    if mask.iter().any(|byte| *byte != 0xff) {
        return None;
    }
    match addr.len() {
        4 => <[u8; 4]>::try_from(addr).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(addr).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Name constraints reduced to comparable sets (order and unknown forms ignored).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CanonicalConstraints {
    pub(crate) permitted: BTreeSet<CanonicalSubtree>,
    pub(crate) excluded: BTreeSet<CanonicalSubtree>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CanonicalSubtree {
    Dns(String),
    /// Address then mask, network byte order.
    Ip(Vec<u8>),
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::oci::RegistryList;

    /// The permitted names of a `--mirrored-registries` value.
    pub(crate) fn from_list(list: &str) -> Result<PermittedNames, String> {
        let registries: RegistryList = list.parse().map_err(|e| format!("{e}"))?;
        PermittedNames::from_registries(&registries).map_err(|e| e.to_string())
    }

    /// The permitted names of valid entries.
    pub(crate) fn permitted(names: &[&str]) -> PermittedNames {
        from_list(&names.join(",")).unwrap()
    }

    #[test]
    fn parses_registry_entries() {
        let p = permitted(&[
            "docker.io",
            "https://GHCR.io/",
            "http://10.213.0.10:5000",
            "[fd00::1]:5443",
            "registry.k8s.io:443",
            "",
        ]);
        assert_eq!(
            p.dns_names().collect::<Vec<_>>(),
            ["docker.io", "ghcr.io", "registry.k8s.io"]
        );
        assert_eq!(
            p.ips().collect::<Vec<_>>(),
            [
                IpAddr::V4(Ipv4Addr::new(10, 213, 0, 10)),
                IpAddr::V6("fd00::1".parse::<Ipv6Addr>().unwrap())
            ]
        );
        for bad in [
            "_default",
            "*",
            "ftp://x.io",
            "docker.io/library",
            "u@docker.io",
            "docker.io:0",
            "docker.io:x",
            "[fd00::1",
            "bad host",
        ] {
            assert!(from_list(bad).is_err(), "{bad} was accepted");
        }
        assert!(matches!(
            PermittedNames::from_registries(&RegistryList::default()),
            Err(CaError::NoRegistries)
        ));
    }

    #[test]
    fn constraints_round_trip() {
        for names in [
            &["docker.io", "ghcr.io:443"][..],
            &["10.0.0.1:5000", "[fd00::1]"],
            &["10.0.0.1"],
            &["reg.test", "10.0.0.1", "[fd00::1]:5443"],
        ] {
            let p = permitted(names);
            assert_eq!(
                PermittedNames::from_constraints(&p.canonical_constraints()),
                p
            );
        }
        // The exclusions and the `.invalid` sentinel are not names; a range is not covered.
        let range = CanonicalConstraints {
            permitted: [CanonicalSubtree::Ip(vec![10, 0, 0, 0, 255, 0, 0, 0])].into(),
            excluded: BTreeSet::new(),
        };
        assert!(PermittedNames::from_constraints(&range).is_empty());
    }

    #[test]
    fn permits_subdomains_not_lookalikes() {
        let p = permitted(&["docker.io", "10.0.0.1:5000"]);
        let dns = |s: &str| LeafName::parse(s).unwrap();
        assert!(p.permits(&dns("docker.io")));
        assert!(p.permits(&dns("Registry-1.Docker.IO.")));
        assert!(!p.permits(&dns("evildocker.io")));
        assert!(!p.permits(&dns("docker.io.evil.com")));
        assert!(p.permits(&dns("10.0.0.1")));
        assert!(!p.permits(&dns("10.0.0.2")));
    }

    /// Found by the `leaf_name` fuzz target: `j..` lost one trailing dot and rustls accepted
    /// the rest, so a leaf name could end in a dot (and name the same host as `j` twice).
    #[test]
    fn two_trailing_dots_are_refused() {
        assert!(LeafName::parse("j..").is_err());
        assert!(LeafName::parse("docker.io..").is_err());
        assert_eq!(
            LeafName::parse("docker.io.").unwrap(),
            LeafName::Dns("docker.io".into())
        );
    }
}
