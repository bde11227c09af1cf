//! Which intercepted connections are registry traffic spegel terminates: an explicit list of
//! registries (no wildcards), matched on host and port against SNI / `Host`, or — for registries
//! addressed by IP literal — against the original destination. An entry's scheme plays no part:
//! the connection itself says whether it is TLS.
use std::net::SocketAddr;

use crate::oci::{Host, Registry, RegistryList};

/// Well-known public registries, mirrored by default. Blob CDNs the registries redirect to are
/// deliberately absent: the registry handler follows those redirects itself.
pub const DEFAULT_MIRRORED_REGISTRIES: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "k8s.gcr.io",
    "gcr.io",
    "mcr.microsoft.com",
    "public.ecr.aws",
    "nvcr.io",
    "registry.gitlab.com",
    "docker.elastic.co",
    "cgr.dev",
];

/// [`DEFAULT_MIRRORED_REGISTRIES`] as the default of `--mirrored-registries`.
pub fn default_mirrored_registries() -> RegistryList {
    // Constants, all valid (checked by `defaults_parse`).
    DEFAULT_MIRRORED_REGISTRIES
        .iter()
        .filter_map(|entry| entry.parse::<Registry>().ok())
        .collect()
}

/// The port a `host` entry without a port stands for.
fn default_port(tls: bool) -> u16 {
    if tls { 443 } else { 80 }
}

/// The mirrored registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirroredRegistries {
    entries: Vec<Registry>,
}

impl MirroredRegistries {
    /// The given registries.
    pub fn new(entries: impl IntoIterator<Item = Registry>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// Parses `[http(s)://]host[:port]` entries ([`Registry`]); a bad entry is an error naming it.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.as_ref();
                e.parse::<Registry>()
                    .map_err(|err| format!("mirrored registry `{e}`: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// The entries.
    pub fn entries(&self) -> &[Registry] {
        &self.entries
    }

    /// Ports named explicitly by entries: connects to them must be redirected too.
    pub fn explicit_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries.iter().filter_map(Registry::port)
    }

    /// The host names of the entries (IP literals left out), each once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| match e.host() {
                Host::Name(name) => Some(name.to_ascii_lowercase()),
                Host::Ip(_) => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The addresses of the IP-literal entries.
    pub fn ips(&self) -> impl Iterator<Item = std::net::IpAddr> + '_ {
        self.entries.iter().filter_map(Registry::ip)
    }

    /// Whether a connection that named `name` (SNI, or the `Host` header) is mirrored. `port` is
    /// the port it asked for: the `Host` header's, else the original destination's.
    pub fn matches_name(&self, name: &str, port: u16, tls: bool) -> bool {
        let ip = name.parse::<std::net::IpAddr>().ok();
        self.entries.iter().any(|e| {
            let host_matches = match (ip, e.host()) {
                (Some(a), Host::Ip(b)) => a == *b,
                (None, Host::Name(host)) => host.eq_ignore_ascii_case(name),
                _ => false,
            };
            host_matches && e.port().unwrap_or(default_port(tls)) == port
        })
    }

    /// Whether a connection that named no host (TLS without SNI, HTTP without `Host`) is
    /// mirrored: only IP-literal entries can match, on the original destination.
    pub fn matches_addr(&self, dst: SocketAddr, tls: bool) -> bool {
        self.entries.iter().any(|e| {
            e.ip() == Some(dst.ip()) && e.port().unwrap_or(default_port(tls)) == dst.port()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let r = MirroredRegistries::parse(DEFAULT_MIRRORED_REGISTRIES).unwrap();
        assert!(r.matches_name("registry-1.docker.io", 443, true));
        assert!(r.matches_name("GHCR.io", 443, true));
        assert!(!r.matches_name("ghcr.io", 8443, true));
        assert!(!r.matches_name("example.com", 443, true));
        assert!(!r.matches_name("pkg-containers.githubusercontent.com", 443, true));
        assert_eq!(r.explicit_ports().count(), 0);
        assert_eq!(
            default_mirrored_registries().len(),
            DEFAULT_MIRRORED_REGISTRIES.len()
        );
    }

    #[test]
    fn ports_and_ip_literals() {
        let r = MirroredRegistries::parse(&[
            "registry.local:5000",
            "10.1.2.3:5000",
            "[fd00::5]",
            "plain.local",
        ])
        .unwrap();
        assert!(r.matches_name("registry.local", 5000, true));
        assert!(r.matches_name("registry.local", 5000, false));
        assert!(!r.matches_name("registry.local", 443, true));
        assert!(r.matches_name("plain.local", 80, false));
        assert!(!r.matches_name("plain.local", 443, false));
        assert!(r.matches_name("plain.local", 443, true));
        // An IP literal in Host matches the IP entry, however it is spelled.
        assert!(r.matches_name("10.1.2.3", 5000, false));
        assert!(r.matches_name("fd00:0::5", 443, true));
        assert!(r.matches_addr("10.1.2.3:5000".parse().unwrap(), true));
        assert!(!r.matches_addr("10.1.2.3:5001".parse().unwrap(), true));
        assert!(r.matches_addr("[fd00::5]:443".parse().unwrap(), true));
        assert!(r.matches_addr("[fd00::5]:80".parse().unwrap(), false));
        // Name entries never match an address.
        assert!(!r.matches_addr("10.9.9.9:443".parse().unwrap(), true));
        let mut ports: Vec<_> = r.explicit_ports().collect();
        ports.sort_unstable();
        assert_eq!(ports, [5000, 5000]);
        assert_eq!(r.names(), ["plain.local", "registry.local"]);
        let ips: Vec<std::net::IpAddr> = r.ips().collect();
        assert_eq!(
            ips,
            [
                "10.1.2.3".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn bad_entries() {
        for bad in ["ftp://ghcr.io", "*.docker.io", "ghcr.io/foo", "a:b", ""] {
            assert!(MirroredRegistries::parse(&[bad]).is_err(), "{bad}");
        }
        // The one registry grammar: a scheme is accepted (and ignored for matching).
        let r = MirroredRegistries::parse(&["https://ghcr.io", "http://10.1.2.3:5000/"]).unwrap();
        assert!(r.matches_name("ghcr.io", 443, true));
        assert!(r.matches_addr("10.1.2.3:5000".parse().unwrap(), true));
    }
}
