//! A central pull-through cache, the usual alternative to spegel: CNCF distribution (Debian's
//! `docker-registry`) in proxy mode (`proxy: remoteurl:`), in the host's namespace on the
//! bridge address — on the cluster's side of the registry's (possibly shaped) link, as a cache
//! in the cluster would be. Nodes reach it as a `hosts.toml` mirror ([`ProxyCache::mirror`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};

use super::Rig;
use super::node::HostEntry;
use super::process::{DEFAULT_STOP_GRACE, Process, ProcessSpec};
use super::registry::{Endpoint, REGISTRY_BIN, wait_for_tcp};

/// The cache's plain HTTP port on the bridge address.
pub const PROXY_CACHE_PORT: u16 = 5100;

/// A running pull-through cache; stops with the rig, or earlier with [`ProxyCache::stop`].
#[derive(Debug)]
pub struct ProxyCache {
    addr: SocketAddr,
    process: Process,
}

impl ProxyCache {
    /// Starts an empty cache in front of the rig registry's TLS listener.
    pub async fn start(rig: &Rig) -> Result<Self> {
        let dir = rig.scratch_dir().join("proxycache");
        let data = dir.join("data");
        // Every start is a cold cache.
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let addr = SocketAddr::from((rig.bridge_ip(), PROXY_CACHE_PORT));
        let remote = format!("https://{}", rig.registry().ip_host(Endpoint::Tls));
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: spegel-bench-proxy\n\
                 proxy:\n  remoteurl: {remote}\n",
                data.display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let spec = ProcessSpec::new("proxycache", REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            // Go reads its roots from here: the rig's CA signed the registry's certificate.
            .env("SSL_CERT_FILE", rig.ca().cert_path())
            .separate_stdout();
        let process = rig.spawn_in_netns(None, spec)?;
        wait_for_tcp(addr, &process, Duration::from_secs(15)).await?;
        Ok(Self { addr, process })
    }

    /// `http://<bridge ip>:5100`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `hosts.toml` entry that sends a node's pulls here first.
    pub fn mirror(&self) -> HostEntry {
        HostEntry::mirror(self.url())
    }

    /// Stops the cache.
    pub async fn stop(&self) -> Result<()> {
        self.process.stop(DEFAULT_STOP_GRACE).await?;
        Ok(())
    }
}
