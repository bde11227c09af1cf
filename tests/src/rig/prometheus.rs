//! A real Prometheus server (`/usr/bin/prometheus`) scraping the `/metrics` of the rig's spegel
//! daemons, and PromQL queries against its HTTP API.
//!
//! It runs in the host's network namespace, where the bridge reaches every node, and listens on
//! the host's bridge address only (unique per rig, so concurrent rigs never collide). Its config
//! and storage live in the rig's scratch folder; it is killed when the handle is dropped (and at
//! teardown like every rig process).
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize;

use super::{Process, ProcessSpec, Rig, Signal, spegel::Spegel};

/// The Prometheus binary (Debian package `prometheus`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// The port of its web listener (on the rig's bridge address).
pub const PROMETHEUS_PORT: u16 = 9090;
/// The scrape job every daemon is a target of.
pub const SCRAPE_JOB: &str = "spegel";
/// How often each daemon is scraped.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// How long Prometheus may take to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Per HTTP request to its API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Prometheus server; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    process: Process,
    addr: SocketAddr,
}

/// One series of an instant-vector query result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series' labels (`__name__` included when the query keeps it).
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or `""`.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

impl Rig {
    /// Starts Prometheus scraping every one of `daemons` (target label `node` = the node's
    /// name) every second, and waits until it is ready.
    pub async fn start_prometheus(&self, daemons: &[Spegel]) -> Result<Prometheus> {
        ensure!(
            std::path::Path::new(PROMETHEUS_BIN).exists(),
            "{PROMETHEUS_BIN} is missing: install the Debian package `prometheus` \
             (`cargo xtask prereqs` does)"
        );
        let dir = self.scratch_dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(daemons))
            .with_context(|| format!("writing {}", config.display()))?;
        let addr = SocketAddr::from((self.bridge_ip(), PROMETHEUS_PORT));
        let spec = ProcessSpec::new("prometheus", PROMETHEUS_BIN).args([
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=info".to_owned(),
        ]);
        let process = self.spawn_in_netns(None, spec)?;
        let prometheus = Prometheus { process, addr };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }
}

/// The config: one job, one static target per daemon, labelled with its node's name.
fn scrape_config(daemons: &[Spegel]) -> String {
    let interval = SCRAPE_INTERVAL.as_secs();
    let mut config = format!(
        "global:\n  scrape_interval: {interval}s\n  scrape_timeout: {interval}s\n\
         scrape_configs:\n  - job_name: {SCRAPE_JOB}\n    static_configs:\n"
    );
    for daemon in daemons {
        // Infallible: writing to a String.
        let _ = write!(
            config,
            "      - targets: ['{}']\n        labels:\n          node: '{}'\n",
            daemon.registry_addr(),
            daemon.node_name()
        );
    }
    config
}

impl Prometheus {
    /// Where its web listener is.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process (for its log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    async fn wait_ready(&self) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            if let Ok((status, _)) = self.http(&["/-/ready"]).await
                && status == 200
            {
                return Ok(());
            }
            if !self.process.is_running() || started.elapsed() > READY_TIMEOUT {
                bail!(
                    "prometheus on {} not ready after {:?}; log:\n{}",
                    self.addr,
                    started.elapsed(),
                    self.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Evaluates instant-vector `promql` now: every series of the result.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let query = format!("query={promql}");
        let (status, body) = self
            .http(&["--data-urlencode", &query, "/api/v1/query"])
            .await?;
        let response: QueryResponse = serde_json::from_slice(&body).with_context(|| {
            format!(
                "prometheus answered {status} to {promql:?}: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        ensure!(
            response.status == "success",
            "query {promql:?} failed: {}: {}",
            response.error_type.unwrap_or_default(),
            response.error.unwrap_or_default()
        );
        let data = response.data.context("a successful query without data")?;
        ensure!(
            data.result_type == "vector",
            "query {promql:?} gave a {}, not an instant vector",
            data.result_type
        );
        data.result
            .into_iter()
            .map(|series| {
                let value = series
                    .value
                    .1
                    .parse::<f64>()
                    .with_context(|| format!("value {:?} of {promql:?}", series.value.1))?;
                Ok(Sample {
                    labels: series.metric,
                    value,
                })
            })
            .collect()
    }

    /// `curl` from the host against `http://<addr><path>` (the last of `args`; `--data-urlencode`
    /// before it makes a form POST): status and body.
    async fn http(&self, args: &[&str]) -> Result<(u16, Vec<u8>)> {
        let (path, options) = args.split_last().context("no path")?;
        let output = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time"])
            .arg(HTTP_TIMEOUT.as_secs().to_string())
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(options)
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .await
            .context("spawning curl")?;
        ensure!(
            output.status.success(),
            "curl {path} on prometheus: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let mut body = output.stdout;
        let newline = body
            .iter()
            .rposition(|byte| *byte == b'\n')
            .context("curl wrote no status")?;
        let status = std::str::from_utf8(&body[newline + 1..])?
            .trim()
            .parse::<u16>()
            .context("curl's status code")?;
        body.truncate(newline);
        Ok((status, body))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if self.process.is_running() {
            // Best effort: teardown kills it anyway.
            let _ = self.process.signal(Signal::Kill);
        }
    }
}

#[derive(Deserialize)]
struct QueryResponse {
    status: String,
    data: Option<QueryData>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<QuerySeries>,
}

#[derive(Deserialize)]
struct QuerySeries {
    metric: BTreeMap<String, String>,
    /// `[unix time, "value"]`.
    value: (f64, String),
}
