//! Debian's `nginx` as the baseline file server: `sendfile` for plain HTTP, TLS 1.3 for HTTPS,
//! serving one directory in a rig namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use spegel_tests::rig::{Process, ProcessSpec, Rig};
use tokio::time::Instant;

/// A running nginx.
pub(crate) struct Nginx {
    process: Process,
    pub(crate) plain: SocketAddr,
    pub(crate) tls: Option<SocketAddr>,
}

/// The name in nginx's certificate (from the rig CA).
pub(crate) const TLS_NAME: &str = "nginx.bench.test";

impl Nginx {
    /// nginx in `netns` (`None`: the host's) serving `root` on `ip:plain_port` and, with
    /// `tls_port`, HTTPS with a certificate from the rig CA for [`TLS_NAME`].
    pub(crate) async fn start(
        rig: &Rig,
        name: &str,
        netns: Option<&str>,
        ip: Ipv4Addr,
        root: &Path,
        plain_port: u16,
        tls_port: Option<u16>,
    ) -> Result<Self> {
        if which("nginx").is_none() {
            bail!(
                "nginx is not installed (`apt-get install nginx`; `cargo xtask bench` installs it)"
            );
        }
        let dir = rig.scratch_dir().join(name);
        std::fs::create_dir_all(dir.join("tmp"))?;
        let tls_listen = match tls_port {
            Some(port) => {
                let cert = rig.ca().issue(&dir, "nginx", &[TLS_NAME.to_owned()])?;
                format!(
                    "listen {ip}:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.3;\n",
                    cert.cert_path.display(),
                    cert.key_path.display()
                )
            }
            None => String::new(),
        };
        let tmp = dir.join("tmp");
        let tmp = tmp.display();
        let conf = format!(
            "user root;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen {ip}:{plain_port};
    {tls_listen}
    root {root};
  }}
}}
",
            dir = dir.display(),
            root = root.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let spec = ProcessSpec::new(name, "nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        let process = rig.spawn_in_netns(netns, spec)?;
        let nginx = Self {
            process,
            plain: SocketAddr::from((ip, plain_port)),
            tls: tls_port.map(|p| SocketAddr::from((ip, p))),
        };
        Ok(nginx)
    }

    /// Waits until nginx answers on its plain port, as seen from `node`.
    pub(crate) async fn wait_listening(&self, node: &spegel_tests::rig::Node) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if node.tcp_socket()?.connect(self.plain).await.is_ok() {
                return Ok(());
            }
            if !self.process.is_running() || Instant::now() > deadline {
                bail!(
                    "nginx did not start listening on {}: {}",
                    self.plain,
                    self.process.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn stop(&self) -> Result<()> {
        self.process
            .stop(Duration::from_secs(5))
            .await
            .context("stopping nginx")?;
        Ok(())
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}
