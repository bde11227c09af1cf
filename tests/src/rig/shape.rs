//! A shaped upstream: the registry's link made a WAN link — a rate limit (`tc tbf`, both
//! directions) and a round-trip delay (a [`DelayLine`] of two TAP devices, since these kernels
//! have no `sch_netem`) — and the checks that prove the shaping before anything is measured.
//!
//! ```text
//!  nodes ── bridge ── <prefix>v-wan (TAP, tbf: upload) ⇄ delay line ⇄ wan0 (TAP, tbf: download,
//!                                                                      registry IP and MAC) ── registry
//! ```
//!
//! The registry's veth is replaced by the TAP pair; `wan0` takes over its MAC and address, so
//! nothing else (hosts files, ARP caches, certificates) changes. Traffic between nodes stays on
//! the bridge, unshaped, as on a cluster's LAN.

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use super::delay::{DelayLine, Tap};
use super::registry::Endpoint;
use super::{Node, Rig, cmd, net};

/// The registry side's TAP (inside the registry's namespace).
const REGISTRY_TAP: &str = "wan0";

/// Rate and latency of the registry's link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shaping {
    /// Bits per second in each direction; `None`: no rate limit.
    pub rate_bps: Option<u64>,
    /// Round-trip time added (half each way); zero: no delay line.
    pub rtt: Duration,
}

impl Shaping {
    /// The default WAN link of the benchmarks: 100 Mbit/s, 20 ms RTT.
    pub const WAN: Shaping = Shaping {
        rate_bps: Some(100_000_000),
        rtt: Duration::from_millis(20),
    };

    /// `100mbit/20ms`-style summary.
    pub fn describe(&self) -> String {
        let rate = match self.rate_bps {
            Some(bps) => format!("{} Mbit/s", bps as f64 / 1e6),
            None => "unlimited".to_owned(),
        };
        format!("{rate}, {} ms RTT", self.rtt.as_millis())
    }

    /// The tbf burst: 10 ms at the rate, at least 32 KiB (tbf needs rate/HZ at least).
    fn burst_bytes(rate_bps: u64) -> u64 {
        (rate_bps / 8 / 100).max(32 * 1024)
    }
}

/// The registry's link, shaped. Call [`ShapedLink::remove`] before the rig shuts down: a TAP
/// still open when its namespace goes away would move to the host's namespace.
#[derive(Debug)]
pub struct ShapedLink {
    shaping: Shaping,
    line: Option<DelayLine>,
}

/// What [`ShapedLink::verify`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Preflight {
    /// Median TCP connect time from a node to the registry.
    pub connect_median_ms: f64,
    /// Smallest connect time seen.
    pub connect_min_ms: f64,
    /// Body bytes per second of one blob download (after its first byte).
    pub goodput_bps: f64,
    /// Size of the downloaded blob.
    pub blob_bytes: u64,
}

impl Rig {
    /// Shapes the registry's link as `shaping` says. Push images before: pushes cross it too.
    pub async fn shape_upstream(&self, shaping: Shaping) -> Result<ShapedLink> {
        let reg_netns = self.registry().netns().to_owned();
        let host_veth = self.names.host_veth("reg");
        let host_tap = self.names.host_veth("wan");
        let shown = cmd::run("ip", ["-n", &reg_netns, "-o", "link", "show", "eth0"]).await?;
        let mac = parse_mac(&String::from_utf8_lossy(&shown.stdout))
            .context("the registry's eth0 has no MAC address")?;
        let line = if shaping.rtt.is_zero() {
            None
        } else {
            let inner = net::in_netns(&reg_netns, || Tap::create(REGISTRY_TAP))?;
            let outer = Tap::create(&host_tap)?;
            ensure!(outer.name() == host_tap && inner.name() == REGISTRY_TAP);
            // The veth goes (its namespace end with it); the TAP takes over MAC and address.
            cmd::run("ip", ["link", "del", &host_veth]).await?;
            let address = format!("{}/24", self.registry().ip());
            let ns = |args: &[&str]| {
                let mut all = vec!["-n", reg_netns.as_str()];
                all.extend_from_slice(args);
                all.into_iter().map(str::to_owned).collect::<Vec<_>>()
            };
            cmd::run("ip", ns(&["link", "set", REGISTRY_TAP, "address", &mac])).await?;
            cmd::run("ip", ns(&["addr", "add", &address, "dev", REGISTRY_TAP])).await?;
            cmd::run("ip", ns(&["link", "set", REGISTRY_TAP, "up"])).await?;
            let bridge = self.names.bridge();
            cmd::run("ip", ["link", "set", &host_tap, "master", &bridge, "up"]).await?;
            Some(DelayLine::start(inner, outer, shaping.rtt / 2)?)
        };
        if let Some(rate) = shaping.rate_bps {
            let (download, upload) = if line.is_some() {
                (REGISTRY_TAP, host_tap.as_str())
            } else {
                ("eth0", host_veth.as_str())
            };
            let tbf = |dev: &str| -> Vec<String> {
                [
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{rate}bit"),
                    "burst",
                    &Shaping::burst_bytes(rate).to_string(),
                    "latency",
                    "100ms",
                ]
                .into_iter()
                .map(str::to_owned)
                .collect()
            };
            let mut in_reg = vec!["netns".to_owned(), "exec".to_owned(), reg_netns.clone()];
            in_reg.push("tc".to_owned());
            in_reg.extend(tbf(download));
            cmd::run("ip", in_reg).await?;
            cmd::run("tc", tbf(upload)).await?;
        }
        let link = ShapedLink { shaping, line };
        self.wait_registry_reachable().await?;
        Ok(link)
    }

    async fn wait_registry_reachable(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = self.node(0);
        loop {
            let socket = node.tcp_socket()?;
            if socket
                .connect(self.registry().addr(Endpoint::Plain))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the registry is unreachable from node 1 after shaping its link");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl ShapedLink {
    /// What was asked for.
    pub fn shaping(&self) -> Shaping {
        self.shaping
    }

    /// Measures the link from `node`: TCP connect time to the registry (20 connects) and the
    /// goodput of one download of `blob` (digest, size) from repository `repository`, whose
    /// bytes are checked against the digest.
    pub async fn verify(
        &self,
        rig: &Rig,
        node: &Node,
        repository: &str,
        blob: (&str, u64),
    ) -> Result<Preflight> {
        let addr = rig.registry().addr(Endpoint::Plain);
        let mut connects = Vec::new();
        for _ in 0..20 {
            let socket = node.tcp_socket()?;
            let start = Instant::now();
            let stream = socket
                .connect(addr)
                .await
                .context("connecting to the registry")?;
            connects.push(start.elapsed().as_secs_f64() * 1e3);
            drop(stream);
        }
        connects.sort_by(f64::total_cmp);
        let (digest, size) = blob;
        let mut stream = node.tcp_socket()?.connect(addr).await?;
        let request = format!(
            "GET /v2/{repository}/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(
                stream.read(&mut byte).await? == 1,
                "the registry closed early"
            );
            head.push(byte[0]);
            ensure!(head.len() < 16 * 1024, "response head too long");
        }
        let status = String::from_utf8_lossy(&head);
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "blob GET answered {}",
            status.lines().next().unwrap_or_default()
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        let start = Instant::now();
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            got += n as u64;
        }
        let elapsed = start.elapsed().as_secs_f64();
        ensure!(got == size, "blob of {size} bytes arrived with {got}");
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        ensure!(actual == digest, "blob bytes changed on the shaped link");
        Ok(Preflight {
            connect_median_ms: connects[connects.len() / 2],
            connect_min_ms: connects[0],
            goodput_bps: got as f64 * 8.0 / elapsed.max(1e-9),
            blob_bytes: got,
        })
    }

    /// Removes the delay line (the TAP devices go with it); the registry is unreachable after.
    pub async fn remove(mut self) {
        if let Some(line) = self.line.take() {
            line.stop().await;
        }
    }
}

/// The MAC in an `ip -o link show` line (`... link/ether 02:42:ac:11:00:02 brd ...`).
fn parse_mac(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "link/ether")?;
    let mac = words.next()?;
    (mac.len() == 17 && mac.split(':').count() == 6).then(|| mac.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_from_ip_link() {
        let line = "2: eth0@if9: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP \\    link/ether 9a:1f:00:12:ab:cd brd ff:ff:ff:ff:ff:ff link-netnsid 0";
        assert_eq!(parse_mac(line).as_deref(), Some("9a:1f:00:12:ab:cd"));
        assert_eq!(
            parse_mac("1: lo: <LOOPBACK> link/loopback 00:00:00:00:00:00"),
            None
        );
    }

    #[test]
    fn burst_covers_ten_milliseconds() {
        assert_eq!(Shaping::burst_bytes(100_000_000), 125_000);
        assert_eq!(Shaping::burst_bytes(1_000_000), 32 * 1024);
    }

    #[test]
    fn describes_the_link() {
        assert_eq!(Shaping::WAN.describe(), "100 Mbit/s, 20 ms RTT");
    }
}
