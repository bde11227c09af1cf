//! A registry's address, parsed once: [`Registry`] is `[http(s)://]host[:port][/]`, the one
//! grammar of `--mirrored-registries` / `SPEGEL_MIRRORED_REGISTRIES` for `run`, `install-ca` and
//! `configure-mirror` alike, of `--mirror-targets` (scheme mandatory), and of the `?ns=` parameter
//! (`host[:port]` only). [`RegistryList`] is one comma-separated flag value (the flag may be
//! repeated: each occurrence is one list, concatenated with `collect`).
//!
//! Hosts are normalised: DNS names lowercased, IPv4 and IPv6 literals in canonical form (IPv6
//! always bracketed when written). Each user takes what it needs: configure-mirror the scheme
//! (for `server =`), interception the host and port, the node CA the host (ports are not part
//! of a certificate name).
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Deref,
    str::FromStr,
};

/// Longest input considered: `https://`, a 253-character DNS name, `:65535` and a `/`.
const MAX_LEN: usize = 8 + 253 + 6 + 1;
/// Longest DNS name (RFC 1035), without a trailing dot.
const MAX_DNS_LEN: usize = 253;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// How a registry is spoken to. Without a scheme, a registry is `https`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS: the default.
    #[default]
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A registry's host: a DNS name (lowercase, no trailing dot) or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// Dot-separated labels of `[a-z0-9-]`, 1..=63 characters, not starting or ending with `-`.
    Name(String),
    /// An IPv4 or IPv6 literal (written bracketed in an authority when IPv6).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    /// The host as it appears in an authority: IPv6 bracketed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// A registry address: scheme, host and optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry {
    scheme: Scheme,
    host: Host,
    port: Option<u16>,
}

/// Why a registry address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected [http(s)://]host[:port]: {reason}")]
pub struct RegistryError {
    reason: &'static str,
}

impl RegistryError {
    fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// What was wrong, without the input.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl Registry {
    /// Parses `host[:port]` alone (no scheme, no `/`), as the `?ns=` parameter carries it. The
    /// scheme is `https`.
    pub fn parse_authority(s: &str) -> Result<Self, RegistryError> {
        if s.len() > MAX_LEN {
            return Err(RegistryError::new("too long"));
        }
        let (host, port) = parse_authority(s)?;
        Ok(Self {
            scheme: Scheme::Https,
            host,
            port,
        })
    }

    /// Parses `http(s)://host[:port][/]`: the scheme is mandatory (`--mirror-targets`, where
    /// guessing it would be wrong half the time).
    pub fn parse_url(s: &str) -> Result<Self, RegistryError> {
        Self::parse(s, true)
    }

    /// The shared grammar: `[http(s)://]host[:port][/]`, the scheme required or not.
    fn parse(s: &str, scheme_required: bool) -> Result<Self, RegistryError> {
        if s.len() > MAX_LEN {
            return Err(RegistryError::new("too long"));
        }
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = s.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if s.contains("://") {
            return Err(RegistryError::new("the scheme must be http:// or https://"));
        } else if scheme_required {
            return Err(RegistryError::new("must start with http:// or https://"));
        } else {
            (Scheme::Https, s)
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = parse_authority(authority)?;
        Ok(Self { scheme, host, port })
    }

    /// The scheme (`https` unless `http://` was given).
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port, when one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        }
    }

    /// `host[:port]`, normalised: how image references and containerd's `hosts.toml`
    /// directories name the registry.
    pub fn authority(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.to_string(),
        }
    }

    /// `scheme://host[:port]`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority())
    }
}

impl FromStr for Registry {
    type Err = RegistryError;

    /// `[http(s)://]host[:port][/]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, false)
    }
}

impl fmt::Display for Registry {
    /// The shortest form that parses back to the same value: `http://` only when plain HTTP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.scheme == Scheme::Http {
            f.write_str("http://")?;
        }
        f.write_str(&self.authority())
    }
}

/// `host[:port]` → (host, port). Refuses userinfo, paths, queries, fragments, bare IPv6
/// addresses, wildcards and anything a directory name or TOML string could trip over.
fn parse_authority(s: &str) -> Result<(Host, Option<u16>), RegistryError> {
    if s.is_empty() {
        return Err(RegistryError::new("empty"));
    }
    if s.contains('@') {
        return Err(RegistryError::new("no user information allowed"));
    }
    if s.contains(['/', '?', '#']) {
        return Err(RegistryError::new("no path, query or fragment allowed"));
    }
    let (host, port) = split_authority(s)?;
    let host = match host {
        SplitHost::Bracketed(ip) => Host::Ip(IpAddr::V6(ip)),
        SplitHost::Text(name) => parse_host(name)?,
    };
    Ok((host, port))
}

/// The host part of a `host[:port]` authority, as [`split_authority`] leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitHost<'a> {
    /// A bracketed IPv6 literal (`[fd00::1]`), parsed.
    Bracketed(Ipv6Addr),
    /// Anything else, as written and not yet validated: a name, an IPv4 literal, or junk.
    Text(&'a str),
}

/// Splits `host[:port]` or `[v6][:port]` at the port: brackets are opened (their content must
/// be an IPv6 address) and the port checked (decimal, 1..=65535), but an unbracketed host is
/// returned as written. The one port and bracket logic, shared by the strict [`Registry`]
/// grammar and the deliberately lenient parsers of names seen on the wire (SNI, `Host`), which
/// validate the host text their own way. A bare IPv6 address (`fd00::1`) is refused (its colons
/// are not a port); a caller that accepts one checks for it first.
pub fn split_authority(s: &str) -> Result<(SplitHost<'_>, Option<u16>), RegistryError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or(RegistryError::new("unclosed IPv6 bracket"))?;
        let ip = v6
            .parse::<Ipv6Addr>()
            .map_err(|_| RegistryError::new("not an IPv6 address in brackets"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or(RegistryError::new("junk after the IPv6 address"))?,
            ),
        };
        (SplitHost::Bracketed(ip), port)
    } else {
        match s.split_once(':') {
            Some((name, port)) => (SplitHost::Text(name), Some(port)),
            None => (SplitHost::Text(s), None),
        }
    };
    let port = port.map(parse_port).transpose()?;
    Ok((host, port))
}

/// An IPv4 literal or a DNS name (lowercased).
fn parse_host(name: &str) -> Result<Host, RegistryError> {
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if name.is_empty() || name.len() > MAX_DNS_LEN {
        return Err(RegistryError::new("bad host name length"));
    }
    let valid = name.split('.').all(|label| {
        let bytes = label.as_bytes();
        (1..=MAX_LABEL_LEN).contains(&bytes.len())
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    });
    if !valid {
        return Err(RegistryError::new(
            "the host must be a DNS name, an IPv4 address or a bracketed IPv6 address",
        ));
    }
    // `20`, `10.0.0` or `a.0x1f` is no DNS name: it "ends in a number" (WHATWG URL; decimal, or
    // hex after `0x`), which resolvers read as an IPv4 address and no certificate can name, so
    // TLS to it could never be mirrored.
    if name.rsplit('.').next().is_some_and(ends_in_a_number) {
        return Err(RegistryError::new(
            "a host name cannot end in a numeric label (not a full IPv4 address?)",
        ));
    }
    Ok(Host::Name(name.to_ascii_lowercase()))
}

/// Whether a label is a number as IPv4 parsers read one: decimal digits, or `0x` and hex digits.
fn ends_in_a_number(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Decimal digits only, 1..=65535.
fn parse_port(port: &str) -> Result<u16, RegistryError> {
    let bad = || RegistryError::new("the port must be a number from 1 to 65535");
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)
}

/// A comma-separated list of registries: the value of `--mirrored-registries`. Whitespace around
/// entries is ignored, and so are empty entries (an empty value is an empty list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryList(Vec<Registry>);

/// Why a registry list was refused: the first bad entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry `{entry}`: {source}")]
pub struct RegistryListError {
    /// The refused entry, as given.
    pub entry: String,
    /// What is wrong with it.
    pub source: RegistryError,
}

impl RegistryList {
    /// The registries, in the given order.
    pub fn into_vec(self) -> Vec<Registry> {
        self.0
    }
}

impl FromStr for RegistryList {
    type Err = RegistryListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry.parse().map_err(|source| RegistryListError {
                    entry: entry.to_owned(),
                    source,
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl fmt::Display for RegistryList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, registry) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{registry}")?;
        }
        Ok(())
    }
}

impl Deref for RegistryList {
    type Target = [Registry];

    fn deref(&self) -> &[Registry] {
        &self.0
    }
}

impl From<Vec<Registry>> for RegistryList {
    fn from(registries: Vec<Registry>) -> Self {
        Self(registries)
    }
}

impl FromIterator<Registry> for RegistryList {
    fn from_iter<I: IntoIterator<Item = Registry>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Concatenation: the lists of a repeated `--mirrored-registries`, in the given order.
impl FromIterator<RegistryList> for RegistryList {
    fn from_iter<I: IntoIterator<Item = RegistryList>>(iter: I) -> Self {
        Self(iter.into_iter().flat_map(|list| list.0).collect())
    }
}

impl<'a> IntoIterator for &'a RegistryList {
    type Item = &'a Registry;
    type IntoIter = std::slice::Iter<'a, Registry>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, scheme, host as written in an authority, port) for accepted entries.
    #[test]
    fn accepted() {
        let cases: &[(&str, Scheme, &str, Option<u16>)] = &[
            ("docker.io", Scheme::Https, "docker.io", None),
            ("Docker.IO", Scheme::Https, "docker.io", None),
            ("docker.io/", Scheme::Https, "docker.io", None),
            ("https://ghcr.io", Scheme::Https, "ghcr.io", None),
            ("https://GHCR.io/", Scheme::Https, "ghcr.io", None),
            ("http://10.1.2.3:5000", Scheme::Http, "10.1.2.3", Some(5000)),
            (
                "http://10.1.2.3:5000/",
                Scheme::Http,
                "10.1.2.3",
                Some(5000),
            ),
            ("registry:5000", Scheme::Https, "registry", Some(5000)),
            ("[fd00::1]", Scheme::Https, "[fd00::1]", None),
            ("[FD00:0::1]:5443", Scheme::Https, "[fd00::1]", Some(5443)),
            ("https://[::1]:65535", Scheme::Https, "[::1]", Some(65535)),
            ("a-b.c0.io:1", Scheme::Https, "a-b.c0.io", Some(1)),
        ];
        for &(input, scheme, host, port) in cases {
            let r: Registry = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                (r.scheme(), r.host().to_string(), r.port()),
                (scheme, host.to_owned(), port),
                "{input}"
            );
            // Display parses back to the same value.
            assert_eq!(r.to_string().parse::<Registry>(), Ok(r.clone()), "{input}");
        }
    }

    #[test]
    fn rejected() {
        for bad in [
            "",
            "/",
            "https://",
            "HTTPS://docker.io",
            "ftp://docker.io",
            "https://user:pw@docker.io",
            "u@docker.io",
            "docker.io/library",
            "https://docker.io/v2",
            "docker.io?x=1",
            "docker.io#x",
            "docker.io//",
            "..",
            ".",
            "a..b",
            "-a.test",
            "a-.test",
            "a_b.io",
            "_default",
            "*",
            "*.docker.io",
            "docker.io.",
            "docker.io:",
            "docker.io:0",
            "docker.io:x",
            "docker.io:+80",
            "docker.io:65536",
            "docker.io:5000:1",
            "::1",
            "[::1",
            "[::1]x",
            "[::g]",
            "[10.0.0.1]",
            "a b",
            "a\"b",
            "a\\b",
            "café.io",
        ] {
            assert!(bad.parse::<Registry>().is_err(), "{bad:?} was accepted");
        }
        let label = format!("{}.io", "a".repeat(64));
        assert!(label.parse::<Registry>().is_err());
        let long = "a.".repeat(200) + "io";
        assert!(long.parse::<Registry>().is_err());
        assert!("x".repeat(100_000).parse::<Registry>().is_err());
    }

    /// Found by the `leaf_name` fuzz target: `20` and `0x` were registry names, but no leaf
    /// certificate can be minted for them (they read as IPv4 addresses), so they could never be
    /// mirrored.
    #[test]
    fn numeric_last_labels_are_refused() {
        for bad in [
            "20",
            "20:5000",
            "10.0.0",
            "https://1.2.3.4.5",
            "registry.123",
        ] {
            assert!(bad.parse::<Registry>().is_err(), "{bad:?} was accepted");
        }
        for good in [
            "1password.com",
            "registry.1a",
            "10.0.0.1",
            "123.example",
            "a.0xg",
        ] {
            assert!(good.parse::<Registry>().is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn forms() {
        let r: Registry = "http://[fd00::1]:5000/".parse().unwrap();
        assert_eq!(r.authority(), "[fd00::1]:5000");
        assert_eq!(r.url(), "http://[fd00::1]:5000");
        assert_eq!(r.to_string(), "http://[fd00::1]:5000");
        assert_eq!(r.ip(), Some("fd00::1".parse().unwrap()));
        let r: Registry = "https://Docker.io".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io");
        assert_eq!(r.url(), "https://docker.io");
        assert_eq!(r.ip(), None);
        assert_eq!(r, "docker.io".parse().unwrap());
    }

    #[test]
    fn authority_and_url_grammars() {
        assert_eq!(
            Registry::parse_authority("10.0.0.1:5000").map(|r| r.authority()),
            Ok("10.0.0.1:5000".to_owned())
        );
        for bad in ["https://docker.io", "docker.io/", ""] {
            assert!(Registry::parse_authority(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Registry::parse_url("http://127.0.0.1:5000/").map(|r| r.url()),
            Ok("http://127.0.0.1:5000".to_owned())
        );
        for bad in ["127.0.0.1:5000", "docker.io", "HTTP://x.io"] {
            assert!(Registry::parse_url(bad).is_err(), "{bad}");
        }
    }

    /// (input, host, port) for `split_authority`; `None` when refused.
    #[test]
    fn splits_authorities() {
        let v6 = |s: &str| SplitHost::Bracketed(s.parse().unwrap());
        type Split<'a> = Option<(SplitHost<'a>, Option<u16>)>;
        let cases: &[(&str, Split<'_>)] = &[
            ("docker.io", Some((SplitHost::Text("docker.io"), None))),
            (
                "Docker.IO.:443",
                Some((SplitHost::Text("Docker.IO."), Some(443))),
            ),
            ("a_b:5000", Some((SplitHost::Text("a_b"), Some(5000)))),
            ("10.0.0.1:1", Some((SplitHost::Text("10.0.0.1"), Some(1)))),
            ("", Some((SplitHost::Text(""), None))),
            (":80", Some((SplitHost::Text(""), Some(80)))),
            ("[fd00::1]", Some((v6("fd00::1"), None))),
            ("[FD00:0::1]:65535", Some((v6("fd00::1"), Some(65535)))),
            ("fd00::1", None),
            ("a:", None),
            ("a:0", None),
            ("a:65536", None),
            ("a:+1", None),
            ("a:1:2", None),
            ("[::1", None),
            ("[::1]x", None),
            ("[::1]:", None),
            ("[x]:1", None),
            ("[10.0.0.1]", None),
        ];
        for (input, expected) in cases {
            assert_eq!(split_authority(input).ok(), *expected, "{input:?}");
        }
    }

    #[test]
    fn lists() {
        let list: RegistryList = " docker.io, http://10.1.2.3:5000/ ,,[fd00::1]:5443,"
            .parse()
            .unwrap();
        assert_eq!(
            list.to_string(),
            "docker.io,http://10.1.2.3:5000,[fd00::1]:5443"
        );
        assert_eq!(list.len(), 3);
        assert_eq!(list.to_string().parse::<RegistryList>(), Ok(list));
        assert_eq!("".parse::<RegistryList>(), Ok(RegistryList::default()));
        assert_eq!(" , ".parse::<RegistryList>(), Ok(RegistryList::default()));
        let err = "docker.io,bad host".parse::<RegistryList>().unwrap_err();
        assert_eq!(err.entry, "bad host");
        assert!(err.to_string().contains("`bad host`"), "{err}");
    }
}
