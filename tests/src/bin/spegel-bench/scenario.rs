//! The ways a node can get its images, each set up and torn down on the same rig.

use anyhow::{Context as _, Result};
use clap::ValueEnum;
use spegel_tests::{
    cluster,
    rig::{
        AUTH_PASSWORD, AUTH_USER, Endpoint, ImageSpec, Rig,
        proxycache::ProxyCache,
        spegel::{Spegel, SpegelOptions, configure_mirror, registry_urls, undo_mirror},
    },
};

/// One way of pulling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// Every node pulls from the registry (the baseline).
    Direct,
    /// A central pull-through cache (distribution in proxy mode) as every node's mirror.
    Proxy,
    /// spegel in mirror mode (`hosts.toml` points containerd at the node's daemon).
    Mirror,
    /// spegel in transparent mode (eBPF interception; no containerd configuration).
    Transparent,
}

impl Scenario {
    /// Its name in tables and charts.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Proxy => "proxy cache",
            Scenario::Mirror => "spegel mirror",
            Scenario::Transparent => "spegel transparent",
        }
    }
}

/// A scenario set up on the rig.
pub(crate) struct Running {
    pub(crate) scenario: Scenario,
    /// The daemons, for spegel scenarios (node order).
    pub(crate) daemons: Vec<Spegel>,
    cache: Option<ProxyCache>,
}

impl Running {
    /// Sets `scenario` up. `Transparent` changes containerd's trust and configuration for
    /// good; run it last. `log` is the daemons' `--log` filter.
    pub(crate) async fn start(rig: &Rig, scenario: Scenario, log: &str) -> Result<Self> {
        let mut running = Self {
            scenario,
            daemons: Vec::new(),
            cache: None,
        };
        match scenario {
            Scenario::Direct => {}
            Scenario::Proxy => {
                let cache = ProxyCache::start(rig).await?;
                for node in rig.nodes() {
                    node.set_mirrors(Endpoint::Tls, &[cache.mirror()])?;
                }
                running.cache = Some(cache);
            }
            Scenario::Mirror => {
                let mut upstream_ca = std::ffi::OsString::from("--upstream-ca-file=");
                upstream_ca.push(rig.ca().cert_path());
                let options = SpegelOptions::mirror().log(log).arg(upstream_ca);
                running.daemons = rig.start_spegel_everywhere(options).await?;
                for (node, daemon) in rig.nodes().iter().zip(&running.daemons) {
                    configure_mirror(node, &[daemon.url()], &registry_urls(rig, Endpoint::Tls))
                        .await?;
                }
            }
            Scenario::Transparent => {
                running.daemons =
                    cluster::transparent(rig, SpegelOptions::transparent().log(log)).await?;
            }
        }
        Ok(running)
    }

    /// Undoes what [`Running::start`] did (as far as the next scenario needs).
    pub(crate) async fn stop(self, rig: &Rig) -> Result<()> {
        if let Some(cache) = &self.cache {
            for node in rig.nodes() {
                node.set_mirrors(Endpoint::Tls, &[])?;
            }
            cache.stop().await?;
        }
        if self.scenario == Scenario::Mirror {
            for node in rig.nodes() {
                undo_mirror(node).await?;
            }
        }
        for daemon in &self.daemons {
            daemon.stop().await?;
        }
        Ok(())
    }

    /// Has every node's containerd pull a small image once, through what the scenario set up,
    /// before anything is measured: a node in a rollout is not a containerd that started a
    /// moment ago. Its first TLS connection loads the system roots (tens of milliseconds of
    /// parsing and garbage collection on these cores), and a scenario that restarts containerd
    /// (transparent mode trusts the node CA that way) would otherwise pay that in its first
    /// measured pull only. The image comes from the registry's other listener
    /// ([`Endpoint::Auth`], with its credentials), so no upstream connection, lookup or cached
    /// answer for the measured listener is warmed (a daemon's certificate for the registry's
    /// name is, as on any node that has pulled from it before); it is removed again.
    pub(crate) async fn warm_up(rig: &Rig) -> Result<()> {
        let image = rig.image(WARM_UP_IMAGE).context("warm-up image missing")?;
        let reference = image.reference(Endpoint::Auth);
        let host = reference
            .split_once('/')
            .map(|(host, _)| host)
            .context("warm-up reference without a host")?;
        let server = format!("https://{host}");
        for node in rig.nodes() {
            // That listener's certificate is the rig CA's, which containerd is told only for
            // the measured listener; this tells it for the warm-up's too.
            node.write_hosts_toml(host, Some(&server), Some(rig.ca().cert_path()), &[])?;
            node.cri_pull_with_credentials(&reference, AUTH_USER, AUTH_PASSWORD)
                .await
                .with_context(|| format!("warming up {} with {reference}", node.name()))?;
            node.cri_remove(&reference).await?;
        }
        Ok(())
    }

    /// Whether peers can serve what another node pulled.
    pub(crate) fn has_peers(&self) -> bool {
        !self.daemons.is_empty()
    }
}

const WARM_UP_IMAGE: &str = "bench-warm-up";

/// The image [`Running::warm_up`] pulls: one small layer.
pub(crate) fn warm_up_image() -> ImageSpec {
    ImageSpec::new(WARM_UP_IMAGE)
        .layers([64 << 10])
        .seed(0x3a4d)
}
