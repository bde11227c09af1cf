//! Names, the /24 subnet, and the bridge + one network namespace per role that the rig runs on.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::cmd;

/// Longest accepted prefix: keeps `<prefix>v-n200` (a host veth) within Linux's 15-byte limit.
pub const MAX_PREFIX_LEN: usize = 8;

/// Where `ip netns add` puts its namespace handles.
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";
/// Per-namespace files that `ip netns exec` bind-mounts over `/etc` (we use `hosts`).
pub(crate) const NETNS_ETC_DIR: &str = "/etc/netns";

/// Every name the rig derives from its prefix, in one place so teardown and
/// [`leftovers`](super::leftovers) look for exactly what start-up creates.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        validate_prefix(prefix)?;
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bridge joining all namespaces; its host side holds `.1`.
    pub(crate) fn bridge(&self) -> String {
        format!("{}br0", self.prefix)
    }

    /// The namespace of a role (`reg`, `n1`, `n2`, ...).
    pub(crate) fn netns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// The host end of a role's veth pair (the namespace end is always `eth0`).
    pub(crate) fn host_veth(&self, role: &str) -> String {
        format!("{}v-{role}", self.prefix)
    }

    /// Prefix shared by all host veths, for discovery during teardown.
    pub(crate) fn host_veth_prefix(&self) -> String {
        format!("{}v-", self.prefix)
    }

    /// Prefix shared by all namespaces, for discovery during teardown.
    pub(crate) fn netns_prefix(&self) -> String {
        format!("{}-", self.prefix)
    }

    /// The scratch folder. Fixed under `/tmp` (not `$TMPDIR`) so that [`leftovers`](super::leftovers)
    /// can find it from the prefix alone, and short because Unix socket paths are capped at 108 bytes.
    pub(crate) fn scratch_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/spegel-{}", self.prefix))
    }

    /// The registry's DNS name, resolvable inside every rig namespace via `/etc/netns/<ns>/hosts`.
    pub(crate) fn registry_host(&self) -> String {
        format!("registry.{}.test", self.prefix)
    }

    /// A node's DNS name (`n1.<prefix>.test`), also written into every namespace's hosts file.
    pub(crate) fn node_host(&self, role: &str) -> String {
        format!("{role}.{}.test", self.prefix)
    }
}

/// Rejects prefixes that would produce invalid or over-long interface, namespace or DNS names.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    ensure!(
        !prefix.is_empty() && prefix.len() <= MAX_PREFIX_LEN,
        "rig prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} characters long"
    );
    ensure!(
        prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "rig prefix {prefix:?} must be a lowercase letter followed by lowercase letters or digits"
    );
    Ok(())
}

/// A fresh random prefix such as `spk3x9`: unique enough that concurrent rigs never collide.
pub fn random_prefix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bits = random_u64();
    let mut prefix = String::from("sp");
    for _ in 0..4 {
        prefix.push(char::from(ALPHABET[(bits % 36) as usize]));
        bits /= 36;
    }
    prefix
}

/// A random number without a `rand` dependency: std's per-process random hash keys mixed with the
/// clock and the pid. Good enough to pick names and subnets, not for anything secret.
pub(crate) fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// The rig's IPv4 /24: `.1` bridge (host side), `.10` registry, `.11`.. nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    base: Ipv4Addr,
}

impl Subnet {
    /// A /24 starting at `base`; the last octet must be 0.
    pub fn new(base: Ipv4Addr) -> Result<Self> {
        ensure!(
            base.octets()[3] == 0,
            "subnet base {base} is not the start of a /24"
        );
        Ok(Self { base })
    }

    /// The `.n` address of this subnet.
    pub fn host(&self, n: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.base.octets();
        Ipv4Addr::new(a, b, c, n)
    }

    /// The network address (`x.y.z.0`).
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    fn overlaps(&self, network: Ipv4Addr, len: u8) -> bool {
        let common = u32::from(len.min(24));
        let mask = if common == 0 {
            0
        } else {
            u32::MAX << (32 - common)
        };
        u32::from(self.base) & mask == u32::from(network) & mask
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/24", self.base)
    }
}

/// Picks a random `10.<x>.<y>.0/24` that overlaps no IPv4 address or route on this machine.
///
/// A default route (`0.0.0.0/0`) overlaps everything and is ignored: our namespaces are reached
/// through the bridge's more specific connected route.
pub(crate) async fn choose_subnet() -> Result<Subnet> {
    let addrs = cmd::run("ip", ["-o", "-4", "addr", "show"]).await?;
    let routes = cmd::run("ip", ["-4", "route", "show", "table", "all"]).await?;
    let mut taken = parse_ip_addr_networks(&String::from_utf8_lossy(&addrs.stdout));
    taken.extend(parse_route_networks(&String::from_utf8_lossy(
        &routes.stdout,
    )));
    let mut bits = random_u64();
    for _ in 0..256 {
        // 10.64.0.0 - 10.254.255.0: stays clear of the low 10.x ranges that tools and our own notes use.
        let x = 64 + (bits % 191) as u8;
        let y = ((bits >> 8) % 256) as u8;
        bits = bits.rotate_left(17) ^ random_u64();
        let candidate = Subnet::new(Ipv4Addr::new(10, x, y, 0))?;
        if !taken
            .iter()
            .any(|&(network, len)| len > 0 && candidate.overlaps(network, len))
        {
            return Ok(candidate);
        }
    }
    bail!("no free 10.x.y.0/24 subnet found after 256 random tries")
}

/// Networks (`addr/len`) from `ip -o -4 addr show` lines (`2: eth0    inet 192.0.2.2/24 brd ...`).
fn parse_ip_addr_networks(text: &str) -> Vec<(Ipv4Addr, u8)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            parse_cidr(words.next()?)
        })
        .collect()
}

/// Destination networks from `ip -4 route show table all` lines (`local 10.0.0.0/8 dev ...`).
fn parse_route_networks(text: &str) -> Vec<(Ipv4Addr, u8)> {
    const ROUTE_TYPES: &[&str] = &[
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
        "nat",
        "anycast",
    ];
    text.lines()
        .filter_map(|line| {
            let destination = line
                .split_whitespace()
                .find(|word| !ROUTE_TYPES.contains(word))?;
            parse_cidr(destination)
        })
        .collect()
}

/// Parses `a.b.c.d/len` or a bare `a.b.c.d` (a /32); `default` and anything else give `None`.
fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, len.parse().ok()?),
        None => (text, 32),
    };
    (len <= 32).then_some(())?;
    Some((addr.parse().ok()?, len))
}

/// Creates the bridge and gives its host side the `.1` address.
pub(crate) async fn create_bridge(names: &Names, subnet: Subnet) -> Result<()> {
    let bridge = names.bridge();
    cmd::run("ip", ["link", "add", &bridge, "type", "bridge"]).await?;
    let address = format!("{}/24", subnet.host(1));
    cmd::run("ip", ["addr", "add", &address, "dev", &bridge]).await?;
    cmd::run("ip", ["link", "set", &bridge, "up"]).await?;
    Ok(())
}

/// Creates namespace `<prefix>-<role>` with `eth0` at `ip` on the bridge; no default route.
pub(crate) async fn create_netns(names: &Names, role: &str, ip: Ipv4Addr) -> Result<()> {
    let netns = names.netns(role);
    let veth = names.host_veth(role);
    cmd::run("ip", ["netns", "add", &netns]).await?;
    cmd::run(
        "ip",
        [
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ],
    )
    .await?;
    cmd::run(
        "ip",
        ["link", "set", &veth, "master", &names.bridge(), "up"],
    )
    .await?;
    let address = format!("{ip}/24");
    cmd::run("ip", ["-n", &netns, "addr", "add", &address, "dev", "eth0"]).await?;
    cmd::run("ip", ["-n", &netns, "link", "set", "lo", "up"]).await?;
    cmd::run("ip", ["-n", &netns, "link", "set", "eth0", "up"]).await?;
    Ok(())
}

/// Writes `/etc/netns/<netns>/hosts`, which `ip netns exec` (and our nsenter mode) make the
/// namespace's `/etc/hosts`; registry TLS needs a name because clients send no SNI for IPs.
pub(crate) fn write_hosts_file(netns: &str, entries: &[(Ipv4Addr, String)]) -> Result<PathBuf> {
    let dir = Path::new(NETNS_ETC_DIR).join(netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (ip, name) in entries {
        text.push_str(&format!("{ip}\t{name}\n"));
    }
    let path = dir.join("hosts");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Names of the network namespaces under `/run/netns` starting with `prefix`.
pub(crate) fn list_netns(prefix: &str) -> Vec<String> {
    list_dir_names(Path::new(NETNS_RUN_DIR))
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// Names of host network interfaces matching `keep`.
pub(crate) fn list_links(keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let output = cmd::run_sync("ip", ["-o", "link", "show"])?;
    Ok(parse_link_names(&String::from_utf8_lossy(&output.stdout))
        .into_iter()
        .filter(|name| keep(name))
        .collect())
}

/// Interface names from `ip -o link show` lines (`5: spv-n1@if2: <BROADCAST,...`).
fn parse_link_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_owned())
        })
        .collect()
}

pub(crate) fn list_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `make` on a thread of its own that has entered network namespace `netns`: what it
/// creates (a socket, a listener) stays in that namespace for life. `setns` changes the
/// namespace of the calling thread only, and the thread ends right after `make`.
pub(crate) fn in_netns<T: Send>(netns: &str, make: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    use std::os::fd::AsRawFd as _;
    let path = Path::new(NETNS_RUN_DIR).join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<T> {
                let handle = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: `handle` is an open namespace file for the duration of the call, and
                // setns affects only this thread, which ends once `make` returns.
                let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!(
                        "setns into {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                make()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("sp1a2b").is_ok());
        assert!(validate_prefix("abcdefgh").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("abcdefghi").is_err());
        assert!(validate_prefix("1abc").is_err());
        assert!(validate_prefix("ab-c").is_err());
        assert!(validate_prefix("Abc").is_err());
    }

    #[test]
    fn random_prefixes_are_valid_and_differ() {
        let a = random_prefix();
        let b = random_prefix();
        validate_prefix(&a).unwrap();
        assert_eq!(a.len(), 6);
        assert_ne!(a, b);
        let names = Names::new(&a).unwrap();
        assert!(names.bridge().len() <= 15);
        assert!(names.host_veth("n200").len() <= 15);
        assert!(names.host_veth("reg").len() <= 15);
    }

    #[test]
    fn subnet_overlap() {
        let subnet = Subnet::new(Ipv4Addr::new(10, 64, 3, 0)).unwrap();
        assert!(subnet.overlaps(Ipv4Addr::new(10, 0, 0, 0), 8));
        assert!(subnet.overlaps(Ipv4Addr::new(10, 64, 3, 77), 32));
        assert!(subnet.overlaps(Ipv4Addr::new(10, 64, 3, 128), 25));
        assert!(!subnet.overlaps(Ipv4Addr::new(10, 64, 4, 0), 24));
        assert!(!subnet.overlaps(Ipv4Addr::new(192, 0, 2, 0), 24));
        assert_eq!(subnet.host(10), Ipv4Addr::new(10, 64, 3, 10));
        assert!(Subnet::new(Ipv4Addr::new(10, 1, 2, 3)).is_err());
    }

    #[test]
    fn parses_ip_output() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                     4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\n";
        assert_eq!(
            parse_ip_addr_networks(addrs),
            vec![
                (Ipv4Addr::new(127, 0, 0, 1), 8),
                (Ipv4Addr::new(192, 0, 2, 2), 24)
            ]
        );
        let routes = "default via 192.0.2.1 dev eth0\n\
                      10.20.0.0/16 dev br0 proto kernel\n\
                      local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1\n\
                      broadcast 192.0.2.255 dev eth0 table local\n";
        assert_eq!(
            parse_route_networks(routes),
            vec![
                (Ipv4Addr::new(10, 20, 0, 0), 16),
                (Ipv4Addr::new(127, 0, 0, 1), 32),
                (Ipv4Addr::new(192, 0, 2, 255), 32)
            ]
        );
        let links = "1: lo: <LOOPBACK,UP> mtu 65536\n7: spabv-n1@if2: <BROADCAST> mtu 1500\n";
        assert_eq!(parse_link_names(links), vec!["lo", "spabv-n1"]);
    }
}
