//! The upstream registry: Debian's CNCF distribution 2.8 in its own namespace, plain, TLS, and
//! TLS with basic auth (private images).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::accesslog::RegistryLog;
use super::pki::IssuedCert;
use super::process::{DEFAULT_STOP_GRACE, Process, ProcessSpec};

/// The registry binary from Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long a listener may take to accept TCP connections after start.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the registry's listeners (they share one storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// Plain HTTP on port 5000.
    Plain,
    /// HTTPS on port 5443, with a certificate from the rig's [`TestCa`](super::pki::TestCa).
    Tls,
    /// HTTPS on port 5444 that answers only with basic auth ([`AUTH_USER`], [`AUTH_PASSWORD`]):
    /// every image is private there.
    Auth,
}

/// The user the [`Endpoint::Auth`] listener accepts.
pub const AUTH_USER: &str = "rig";
/// [`AUTH_USER`]'s password.
pub const AUTH_PASSWORD: &str = "rig-password";
/// [`AUTH_USER`]:[`AUTH_PASSWORD`] as distribution's htpasswd file wants it (bcrypt, cost 4).
const AUTH_HTPASSWD: &str = "rig:$2b$04$Z1sAEBJwOxev1QxXIpiKgOBHpNe0JrIF2I0yYe77AgW28VuyXTfLq\n";

impl Endpoint {
    /// Every listener.
    pub const ALL: [Endpoint; 3] = [Endpoint::Plain, Endpoint::Tls, Endpoint::Auth];

    /// The TCP port.
    pub fn port(self) -> u16 {
        match self {
            Endpoint::Plain => 5000,
            Endpoint::Tls => 5443,
            Endpoint::Auth => 5444,
        }
    }

    /// `http` or `https`.
    pub fn scheme(self) -> &'static str {
        match self {
            Endpoint::Plain => "http",
            Endpoint::Tls | Endpoint::Auth => "https",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Endpoint::Plain => "plain",
            Endpoint::Tls => "tls",
            Endpoint::Auth => "auth",
        }
    }
}

/// The rig's upstream registry: three `docker-registry serve` processes (one per listener) sharing
/// one storage folder, in namespace `<prefix>-reg` at `.10`, known to the nodes as
/// `registry.<prefix>.test`.
#[derive(Debug)]
pub struct Registry {
    ip: Ipv4Addr,
    hostname: String,
    netns: String,
    data_dir: PathBuf,
    /// One per [`Endpoint::ALL`], in that order.
    processes: Vec<Process>,
}

impl Registry {
    /// Writes the configs and starts every listener; returns once all accept connections.
    pub(crate) async fn launch(
        spawn: impl Fn(ProcessSpec) -> Result<Process>,
        hostname: String,
        netns: String,
        ip: Ipv4Addr,
        dir: &Path,
        cert: &IssuedCert,
        secret: &str,
    ) -> Result<Self> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, AUTH_HTPASSWD)
            .with_context(|| format!("writing {}", htpasswd.display()))?;
        let mut processes = Vec::new();
        for endpoint in Endpoint::ALL {
            let config = dir.join(format!("{}.yml", endpoint.label()));
            let tls = (endpoint != Endpoint::Plain).then_some(cert);
            let auth = (endpoint == Endpoint::Auth).then_some(htpasswd.as_path());
            let text = config_yaml(
                &data_dir,
                SocketAddr::from((ip, endpoint.port())),
                tls,
                auth,
                secret,
            );
            std::fs::write(&config, text)
                .with_context(|| format!("writing {}", config.display()))?;
            let spec = ProcessSpec::new(format!("registry-{}", endpoint.label()), REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                // The access log goes to stdout, the registry's own messages to stderr.
                .separate_stdout();
            processes.push(spawn(spec)?);
        }
        let registry = Self {
            ip,
            hostname,
            netns,
            data_dir,
            processes,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    /// The registry's IP address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its DNS name (`registry.<prefix>.test`), resolvable in every rig namespace (not on the host).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The network namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `hostname:port`, the registry part of image references (`registry.sp1234.test:5000`).
    pub fn host(&self, endpoint: Endpoint) -> String {
        format!("{}:{}", self.hostname, endpoint.port())
    }

    /// `ip:port`, for clients that cannot resolve the name (the host, or IP-based references).
    pub fn ip_host(&self, endpoint: Endpoint) -> String {
        format!("{}:{}", self.ip, endpoint.port())
    }

    /// The socket address of a listener.
    pub fn addr(&self, endpoint: Endpoint) -> SocketAddr {
        SocketAddr::from((self.ip, endpoint.port()))
    }

    /// `http://registry.<prefix>.test:5000` or `https://...:5443`.
    pub fn url(&self, endpoint: Endpoint) -> String {
        format!("{}://{}", endpoint.scheme(), self.host(endpoint))
    }

    /// The shared storage folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process behind one listener (e.g. to SIGSTOP it).
    pub fn process(&self, endpoint: Endpoint) -> &Process {
        let slot = Endpoint::ALL
            .iter()
            .position(|e| *e == endpoint)
            .unwrap_or_default();
        &self.processes[slot]
    }

    /// Where a listener's access log goes.
    pub fn access_log_path(&self, endpoint: Endpoint) -> PathBuf {
        self.process(endpoint)
            .stdout_path()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.process(endpoint).log_path().to_path_buf())
    }

    /// Whether every listener is running.
    pub fn is_running(&self) -> bool {
        self.processes.iter().all(Process::is_running)
    }

    /// Stops every listener (pulls then fail or must be served by peers). Logs are kept.
    pub async fn stop(&self) -> Result<()> {
        let stopped = futures::future::join_all(
            self.processes
                .iter()
                .map(|process| process.stop(DEFAULT_STOP_GRACE)),
        )
        .await;
        for result in stopped {
            result?;
        }
        Ok(())
    }

    /// Starts whichever listeners are stopped and waits until all accept connections.
    pub async fn start(&self) -> Result<()> {
        for process in &self.processes {
            if !process.is_running() {
                process.start().await?;
            }
        }
        self.wait_ready().await
    }

    /// The access log of every listener so far (waits for in-flight lines to land).
    pub async fn log(&self) -> Result<RegistryLog> {
        let paths = Endpoint::ALL.map(|endpoint| (endpoint, self.access_log_path(endpoint)));
        let paths: Vec<(Endpoint, &Path)> = paths
            .iter()
            .map(|(endpoint, path)| (*endpoint, path.as_path()))
            .collect();
        RegistryLog::read(&paths).await
    }

    async fn wait_ready(&self) -> Result<()> {
        for endpoint in Endpoint::ALL {
            wait_for_tcp(self.addr(endpoint), self.process(endpoint), READY_TIMEOUT).await?;
        }
        Ok(())
    }
}

/// Polls until `addr` accepts a TCP connection; fails early if `process` dies.
pub(crate) async fn wait_for_tcp(
    addr: SocketAddr,
    process: &Process,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !process.is_running() {
            bail!(
                "{} exited before listening on {addr}; log tail:\n{}",
                process.name(),
                process.log_tail(20)
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} did not listen on {addr} within {timeout:?}; log tail:\n{}",
                process.name(),
                process.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A distribution 2.8 config for one listener. Upload purging is off: it is a background job that
/// only adds noise in a registry living for seconds. No `draintimeout`: SIGTERM exits at once.
fn config_yaml(
    data_dir: &Path,
    addr: SocketAddr,
    tls: Option<&IssuedCert>,
    htpasswd: Option<&Path>,
    secret: &str,
) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: {secret}\n",
        data_dir.display()
    );
    if let Some(cert) = tls {
        yaml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.cert_path.display(),
            cert.key_path.display()
        ));
    }
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: rig\n    path: {}\n",
            path.display()
        ));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_tls_only_when_asked() {
        let addr: SocketAddr = "10.1.2.10:5000".parse().unwrap();
        let plain = config_yaml(Path::new("/d"), addr, None, None, "s");
        assert!(plain.contains("addr: 10.1.2.10:5000\n"));
        assert!(plain.contains("rootdirectory: /d\n"));
        assert!(!plain.contains("tls:"));
        let cert = IssuedCert {
            cert_path: "/c.crt".into(),
            key_path: "/c.key".into(),
        };
        let tls = config_yaml(Path::new("/d"), addr, Some(&cert), None, "s");
        assert!(tls.contains("  tls:\n    certificate: /c.crt\n    key: /c.key\n"));
        assert!(!tls.contains("auth:"));
        let auth = config_yaml(
            Path::new("/d"),
            addr,
            Some(&cert),
            Some(Path::new("/h")),
            "s",
        );
        assert!(auth.contains("auth:\n  htpasswd:\n    realm: rig\n    path: /h\n"));
    }

    #[test]
    fn endpoints() {
        assert_eq!(Endpoint::Plain.port(), 5000);
        assert_eq!(Endpoint::Tls.port(), 5443);
        assert_eq!(Endpoint::Tls.scheme(), "https");
        assert_eq!(Endpoint::Auth.port(), 5444);
        assert_eq!(Endpoint::Auth.scheme(), "https");
    }
}
