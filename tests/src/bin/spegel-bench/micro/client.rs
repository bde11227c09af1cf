//! A small HTTP/1.1 client for the micro benchmarks: one connection from inside a node's network
//! namespace, optionally over TLS; it times the transfer and counts the body without keeping it.
//! And `curl`, for transfers that must come from inside containerd's cgroup.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use spegel_tests::rig::Node;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// TLS for a connection: the client configuration and the name to verify.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) name: ServerName<'static>,
}

impl Tls {
    /// Trusting only the CA in `ca_pem` (a file), verifying `name`.
    pub(crate) fn with_ca(ca_pem: &std::path::Path, name: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem)
            .with_context(|| format!("reading {}", ca_pem.display()))?
        {
            roots.add(cert?)?;
        }
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            name: ServerName::try_from(name.to_owned())?,
        })
    }
}

/// One answered request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fetched {
    pub(crate) status: u16,
    /// From sending the request to the body's end.
    pub(crate) body: Duration,
    pub(crate) bytes: u64,
}

impl Fetched {
    /// Body goodput in bytes per second.
    pub(crate) fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.body.as_secs_f64().max(1e-9)
    }
}

/// `GET path` on a fresh connection to `addr` from inside `node`'s namespace.
pub(crate) async fn get(
    node: &Node,
    addr: SocketAddr,
    tls: Option<&Tls>,
    path: &str,
    headers: &[(&str, String)],
) -> Result<Fetched> {
    let tcp = node
        .tcp_socket()?
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    match tls {
        None => send(tcp, addr, path, headers).await,
        Some(tls) => {
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
                .connect(tls.name.clone(), tcp)
                .await
                .with_context(|| format!("TLS with {addr}"))?;
            send(stream, addr, path, headers).await
        }
    }
}

/// [`get`], failing unless the answer is 200 with a body of `size` bytes.
pub(crate) async fn get_ok(
    node: &Node,
    addr: SocketAddr,
    tls: Option<&Tls>,
    path: &str,
    headers: &[(&str, String)],
    size: u64,
) -> Result<Fetched> {
    let fetched = get(node, addr, tls, path, headers).await?;
    ensure!(
        fetched.status == 200 && fetched.bytes == size,
        "GET {path} from {addr}: {} with {} bytes, expected 200 with {size}",
        fetched.status,
        fetched.bytes
    );
    Ok(fetched)
}

async fn send<S>(io: S, addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> Result<Fetched>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let start = Instant::now();
    let response = sender.send_request(request).await.context("request")?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.context("reading the body")?.data_ref() {
            bytes += data.len() as u64;
        }
    }
    let elapsed = start.elapsed();
    driver.abort();
    Ok(Fetched {
        status,
        body: elapsed,
        bytes,
    })
}

/// What `curl --write-out` reported for one transfer (seconds from the start, as curl counts).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CurlTimes {
    pub(crate) status: u16,
    /// TLS established (0 for plain HTTP).
    pub(crate) app_connect: f64,
    /// First body byte.
    pub(crate) first_byte: f64,
    /// Bytes per second of the body.
    pub(crate) speed: f64,
    pub(crate) bytes: u64,
}

/// Runs `curl` (body discarded) from `node`'s namespace, inside containerd's cgroup (so the
/// node's spegel intercepts it) or not.
pub(crate) async fn curl(
    node: &Node,
    in_cgroup: bool,
    ca_file: Option<&std::path::Path>,
    url: &str,
) -> Result<CurlTimes> {
    let mut command = node.command(in_cgroup, "curl");
    command
        .args(["--silent", "--show-error", "--output", "/dev/null"])
        .args(["--max-time", "120"])
        .args([
            "--write-out",
            "%{http_code} %{time_appconnect} %{time_starttransfer} %{speed_download} %{size_download}",
        ]);
    if let Some(ca) = ca_file {
        command.arg("--cacert").arg(ca);
    }
    let output = command.arg(url).output().await.context("running curl")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "curl {url} ({}): {}{}",
        if in_cgroup {
            "in containerd's cgroup"
        } else {
            "outside"
        },
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    let fields: Vec<&str> = text.split_whitespace().collect();
    ensure!(fields.len() == 5, "unexpected curl output {text:?}");
    let number = |i: usize| -> Result<f64> {
        fields[i]
            .parse()
            .with_context(|| format!("curl field {i} in {text:?}"))
    };
    Ok(CurlTimes {
        status: fields[0].parse()?,
        app_connect: number(1)?,
        first_byte: number(2)?,
        speed: number(3)?,
        bytes: fields[4].parse()?,
    })
}
