//! Transparent interception: the eBPF programs send containerd's registry connects to a listener
//! on loopback; per connection the listener recovers the original destination, peeks at the
//! ClientHello SNI or `Host`, and either hands the connection to the [`MirroredHandler`] (a
//! mirrored registry) or splices it, untouched, to where it was going.

pub mod cgroup;
pub mod ebpf;
pub mod registries;
pub mod sni;
pub mod splice;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::ArgAction;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use self::{
    cgroup::{CgroupError, CgroupFinder, Locator},
    registries::{MirroredRegistries, default_mirrored_registries},
    sni::{HttpRequest, TlsHello},
};
use crate::{
    intercept::ebpf::EbpfError, intercept::ebpf::OrigDstTable, intercept::ebpf::RedirectConfig,
    intercept::ebpf::Redirector, source::Origin,
};

/// At most this many bytes are peeked at to find the SNI or `Host`.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// Flags of transparent interception (`spegel run`).
#[derive(Debug, Clone, clap::Args)]
pub struct InterceptArgs {
    /// Redirect containerd's registry connections to this daemon with eBPF (transparent mode).
    /// Needs CAP_BPF and CAP_NET_ADMIN, and the daemon in containerd's network namespace.
    #[arg(
        long = "intercept",
        env = "SPEGEL_INTERCEPT",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true"
    )]
    pub enabled: bool,
    /// Port of the interception listener on 127.0.0.1 and [::1].
    #[arg(long, env = "SPEGEL_INTERCEPT_PORT", default_value_t = 15001)]
    pub intercept_port: u16,
    /// Destination ports whose TCP connects from containerd's cgroup are redirected.
    #[arg(long, env = "SPEGEL_INTERCEPT_PORTS", value_delimiter = ',', default_values_t = [443u16, 80])]
    pub intercept_ports: Vec<u16>,
    /// Destination addresses whose connects are redirected whatever the port.
    #[arg(long, env = "SPEGEL_INTERCEPT_IPS", value_delimiter = ',')]
    pub intercept_ips: Vec<IpAddr>,
    /// Registries (`[http(s)://]host[:port]`, comma-separated, no wildcards) whose intercepted
    /// connections this daemon serves; every other connection is passed through untouched. A
    /// port-less entry means 443 (TLS) or 80 (plain HTTP). An empty value mirrors nothing.
    #[arg(long, env = "SPEGEL_MIRRORED_REGISTRIES", default_value_t = default_mirrored_registries())]
    pub mirrored_registries: crate::oci::RegistryList,
    /// containerd's cgroup2 directory (absolute, or relative to the cgroup2 mount). Default: the
    /// cgroup of containerd's process (see --containerd-pid, --containerd-pidfile).
    #[arg(long, env = "SPEGEL_CONTAINERD_CGROUP")]
    pub containerd_cgroup: Option<PathBuf>,
    /// containerd's PID, to find its cgroup.
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_PID",
        conflicts_with = "containerd_cgroup"
    )]
    pub containerd_pid: Option<u32>,
    /// A file holding containerd's PID, to find its cgroup.
    #[arg(long, env = "SPEGEL_CONTAINERD_PIDFILE", conflicts_with_all = ["containerd_cgroup", "containerd_pid"])]
    pub containerd_pidfile: Option<PathBuf>,
    /// The cgroup2 mount point (default: from /proc/mounts; `/sys/fs/cgroup/unified` on hybrid
    /// hosts, `/sys/fs/cgroup` on pure cgroup v2).
    #[arg(long, env = "SPEGEL_CGROUP2_MOUNT")]
    pub cgroup2_mount: Option<PathBuf>,
    /// How often containerd's cgroup is checked, to re-attach after containerd restarts.
    #[arg(long, env = "SPEGEL_CGROUP_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "3s")]
    pub cgroup_poll_interval: Duration,
    /// How long to wait for a client's first bytes (ClientHello, request head) before passing
    /// the connection through.
    #[arg(long, env = "SPEGEL_INTERCEPT_PEEK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub intercept_peek_timeout: Duration,
    /// Timeout for connecting to a passed-through connection's original destination.
    #[arg(long, env = "SPEGEL_INTERCEPT_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub intercept_connect_timeout: Duration,
    /// Intercepted connections handled at once; more wait in the listen backlog.
    #[arg(long, env = "SPEGEL_INTERCEPT_MAX_CONNECTIONS", default_value_t = 4096)]
    pub intercept_max_connections: usize,
}

/// Errors of the interception subsystem.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("invalid interception settings: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// Validated interception settings.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub listener_port: u16,
    /// Ports redirected: `--intercept-ports` plus ports named by mirrored registries.
    pub redirect_ports: Vec<u16>,
    pub redirect_ips: Vec<IpAddr>,
    pub mirrored: MirroredRegistries,
    pub locator: Locator,
    pub cgroup2_mount: Option<PathBuf>,
    pub poll_interval: Duration,
    pub peek_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_connections: usize,
}

impl InterceptConfig {
    /// Validates the flags. `containerd_socket`: containerd's gRPC socket; when no cgroup, PID or
    /// pidfile is given, containerd is the process listening on it (else the process named
    /// `containerd`, which must be unique).
    pub fn from_args(
        args: &InterceptArgs,
        containerd_socket: Option<&Path>,
    ) -> Result<Self, InterceptError> {
        let mirrored = MirroredRegistries::new(args.mirrored_registries.iter().cloned());
        let mut redirect_ports = args.intercept_ports.clone();
        redirect_ports.extend(mirrored.explicit_ports());
        redirect_ports.sort_unstable();
        redirect_ports.dedup();
        if args.intercept_port == 0 {
            return Err(InterceptError::Config(
                "--intercept-port must not be 0".into(),
            ));
        }
        if redirect_ports.contains(&args.intercept_port) {
            return Err(InterceptError::Config(format!(
                "--intercept-port {} is also a redirected port",
                args.intercept_port
            )));
        }
        if args.intercept_max_connections == 0 {
            return Err(InterceptError::Config(
                "--intercept-max-connections must be at least 1".into(),
            ));
        }
        let locator = if let Some(path) = &args.containerd_cgroup {
            Locator::Cgroup(path.clone())
        } else if let Some(pid) = args.containerd_pid {
            Locator::Pid(pid)
        } else if let Some(file) = &args.containerd_pidfile {
            Locator::PidFile(file.clone())
        } else if let Some(socket) = containerd_socket {
            Locator::Socket(socket.to_path_buf())
        } else {
            Locator::Comm("containerd".into())
        };
        let mut redirect_ips = args.intercept_ips.clone();
        redirect_ips.sort_unstable();
        redirect_ips.dedup();
        Ok(Self {
            listener_port: args.intercept_port,
            redirect_ports,
            redirect_ips,
            mirrored,
            locator,
            cgroup2_mount: args.cgroup2_mount.clone(),
            poll_interval: args.cgroup_poll_interval.max(Duration::from_millis(100)),
            peek_timeout: args.intercept_peek_timeout,
            connect_timeout: args.intercept_connect_timeout,
            max_connections: args.intercept_max_connections,
        })
    }
}

/// Serves connections to mirrored registries. Implementations terminate TLS (when
/// `origin.tls`) and speak the registry API.
#[async_trait::async_trait]
pub trait MirroredHandler: Send + Sync + 'static {
    /// Serves one intercepted connection. `stream` is untouched: what the client sent first
    /// (ClientHello, request head) was only peeked at and is still unread. Errors are the
    /// handler's to log; the connection is closed when `stream` drops.
    async fn handle(&self, stream: TcpStream, origin: Origin);
}

/// The fallback handler: passes mirrored connections through like any other.
#[derive(Debug, Clone)]
pub struct SpliceHandler {
    pub connect_timeout: Duration,
}

#[async_trait::async_trait]
impl MirroredHandler for SpliceHandler {
    async fn handle(&self, stream: TcpStream, origin: Origin) {
        match splice::splice(stream, origin.addr, self.connect_timeout).await {
            Ok(done) => tracing::debug!(up = done.up, down = done.down, "spliced"),
            Err(error) => tracing::debug!(%error, "splice failed"),
        }
    }
}

/// The registry name an intercepted connection stands for, as image references spell it:
/// `host` when the port is the default for the protocol, else `host:port`.
pub fn origin_registry(origin: &Origin) -> String {
    let default = if origin.tls { 443 } else { 80 };
    let host = if origin.host.contains(':') {
        format!("[{}]", origin.host)
    } else {
        origin.host.clone()
    };
    if origin.addr.port() == default {
        host
    } else {
        format!("{host}:{}", origin.addr.port())
    }
}

/// Where an accepted connection was going.
pub trait OriginalDst: Send + Sync + 'static {
    /// The original destination of the connection accepted from `peer` (once: the record is
    /// consumed); `None` when the connection was not redirected.
    fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError>;
}

impl OriginalDst for OrigDstTable {
    fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError> {
        OrigDstTable::take(self, peer)
    }
}

/// Counters of the listener.
#[derive(Debug, Default)]
pub struct InterceptStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Accepted connections with no recorded original destination (closed at once).
    pub no_origin: AtomicU64,
    /// Connections passed through to their original destination.
    pub spliced: AtomicU64,
    /// Connections handed to the mirrored-registry handler.
    pub mirrored: AtomicU64,
}

/// The loopback listeners: 127.0.0.1 always, [::1] when IPv6 is available.
#[derive(Debug)]
pub struct Listener {
    v4: TcpListener,
    v6: Option<TcpListener>,
    port: u16,
}

impl Listener {
    /// Binds 127.0.0.1:`port` and, best-effort, [::1]:`port`. Port 0 picks a free port (for
    /// tests); IPv6 then uses the same one.
    pub async fn bind(port: u16) -> Result<Self, InterceptError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let v4 = TcpListener::bind(addr)
            .await
            .map_err(|source| InterceptError::Bind { addr, source })?;
        let port = v4
            .local_addr()
            .map_err(|source| InterceptError::Bind { addr, source })?
            .port();
        let addr6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let v6 = match TcpListener::bind(addr6).await {
            Ok(l) => Some(l),
            Err(error) => {
                tracing::warn!(%error, addr = %addr6, "no IPv6 interception listener; IPv6 connects will not be redirected");
                None
            }
        };
        Ok(Self { v4, v6, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }
}

/// Decides, per accepted connection, between the mirrored handler and a splice.
pub struct Interceptor {
    orig: Arc<dyn OriginalDst>,
    mirrored: MirroredRegistries,
    handler: Arc<dyn MirroredHandler>,
    peek_timeout: Duration,
    connect_timeout: Duration,
    max_connections: usize,
    stats: Arc<InterceptStats>,
}

impl Interceptor {
    pub fn new(
        config: &InterceptConfig,
        orig: Arc<dyn OriginalDst>,
        handler: Arc<dyn MirroredHandler>,
    ) -> Self {
        Self {
            orig,
            mirrored: config.mirrored.clone(),
            handler,
            peek_timeout: config.peek_timeout,
            connect_timeout: config.connect_timeout,
            max_connections: config.max_connections,
            stats: Arc::default(),
        }
    }

    /// Counts into `stats` (e.g. counters the metrics endpoint already holds).
    pub fn with_stats(mut self, stats: Arc<InterceptStats>) -> Self {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> Arc<InterceptStats> {
        self.stats.clone()
    }

    /// Accepts until `shutdown` is cancelled, then lets open connections finish for up to
    /// `grace` and drops the rest.
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let mut loops = Vec::new();
        for l in std::iter::once(listener.v4).chain(listener.v6) {
            let this = self.clone();
            let (tracker, abort, limit, shutdown) = (
                tracker.clone(),
                abort.clone(),
                limit.clone(),
                shutdown.clone(),
            );
            loops.push(tokio::spawn(async move {
                this.accept_loop(l, tracker, abort, limit, shutdown).await;
            }));
        }
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                open = tracker.len(),
                "closing intercepted connections still open"
            );
            abort.cancel();
            tracker.wait().await;
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tracker: TaskTracker,
        abort: CancellationToken,
        limit: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let local = listener.local_addr().ok();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return, // never closed
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, ?local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let abort = abort.clone();
            let span = tracing::debug_span!("intercept", %peer);
            tracker.spawn(
                async move {
                    tokio::select! {
                        _ = abort.cancelled() => {}
                        _ = this.handle(stream, peer) => {}
                    }
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }

    /// One accepted connection.
    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let dst = match self.orig.take(peer) {
            Ok(Some(dst)) => dst,
            Ok(None) => {
                self.stats.no_origin.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("no original destination recorded; closing");
                return;
            }
            Err(error) => {
                self.stats.no_origin.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "original destination lookup failed; closing");
                return;
            }
        };
        let sniffed = sniff(&stream, self.peek_timeout).await;
        tracing::debug!(%dst, ?sniffed, "intercepted");
        match self.decide(dst, &sniffed) {
            Some(origin) => {
                self.stats.mirrored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(host = %origin.host, tls = origin.tls, "mirrored registry");
                self.handler.handle(stream, origin).await;
            }
            None if sniffed == Sniffed::Closed => {}
            None => {
                self.stats.spliced.fetch_add(1, Ordering::Relaxed);
                match splice::splice(stream, dst, self.connect_timeout).await {
                    Ok(done) => {
                        tracing::debug!(%dst, up = done.up, down = done.down, "splice done")
                    }
                    Err(error) => tracing::debug!(%dst, %error, "splice failed"),
                }
            }
        }
    }

    /// The origin to hand to the mirrored handler, or `None` to splice.
    fn decide(&self, dst: SocketAddr, sniffed: &Sniffed) -> Option<Origin> {
        let (name, port, tls) = match sniffed {
            Sniffed::Tls { sni } => (sni.clone(), dst.port(), true),
            Sniffed::Http { host } => (
                host.as_ref().map(|h| h.host.clone()),
                host.as_ref().and_then(|h| h.port).unwrap_or(dst.port()),
                false,
            ),
            Sniffed::Opaque(_) | Sniffed::TimedOut | Sniffed::Oversized | Sniffed::Closed => {
                return None;
            }
        };
        let mirrored = match &name {
            Some(name) => self.mirrored.matches_name(name, port, tls),
            None => self.mirrored.matches_addr(dst, tls),
        };
        mirrored.then(|| Origin {
            addr: dst,
            host: name.unwrap_or_else(|| dst.ip().to_string()),
            tls,
        })
    }
}

/// What the first bytes of a connection said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sniffed {
    Tls {
        sni: Option<String>,
    },
    Http {
        host: Option<sni::Authority>,
    },
    /// Neither TLS nor HTTP/1.x, or a malformed one of them.
    Opaque(&'static str),
    /// The client sent nothing (or not enough) in time: maybe a server-speaks-first protocol.
    TimedOut,
    /// The head did not fit into [`PEEK_LIMIT`].
    Oversized,
    /// The client closed without sending anything.
    Closed,
}

fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.first() == Some(&0x16) {
        return match sni::parse_tls_client_hello(buf) {
            TlsHello::NeedMore => None,
            TlsHello::NotTls => Some(Sniffed::Opaque("not TLS")),
            TlsHello::Malformed(why) => Some(Sniffed::Opaque(why)),
            TlsHello::Hello { sni } => Some(Sniffed::Tls { sni }),
        };
    }
    match sni::parse_http_host(buf) {
        HttpRequest::NeedMore => None,
        HttpRequest::NotHttp => Some(Sniffed::Opaque("neither TLS nor HTTP/1.x")),
        HttpRequest::Malformed(why) => Some(Sniffed::Opaque(why)),
        HttpRequest::Head { host } => Some(Sniffed::Http { host }),
    }
}

/// Peeks (never reads) at the stream until its first bytes are classified, the buffer is full
/// or the timeout expires.
async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK_LIMIT];
    let mut backoff = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Sniffed::TimedOut,
            Ok(Err(error)) => {
                tracing::debug!(%error, "peek failed");
                return Sniffed::Closed;
            }
            Ok(Ok(0)) => return Sniffed::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(sniffed) = classify(&buf[..n]) {
            return sniffed;
        }
        if n == buf.len() {
            return Sniffed::Oversized;
        }
        // peek() returns at once while any byte is buffered, so wait for more with a short
        // backoff. Heads almost always arrive in one segment; this is the rare fragmented case.
        if n > seen {
            backoff = Duration::from_millis(1);
            seen = n;
        }
        if Instant::now() + backoff >= deadline {
            return Sniffed::TimedOut;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// Runs transparent interception until `shutdown`: binds the listener, loads the eBPF programs,
/// attaches them to containerd's cgroup (and re-attaches whenever containerd moves to another
/// cgroup or its cgroup is recreated), and serves intercepted connections. On shutdown the
/// programs are detached first, so new connects go direct while open ones drain for `grace`.
pub async fn run(
    config: InterceptConfig,
    handler: Arc<dyn MirroredHandler>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), InterceptError> {
    run_with_stats(config, handler, Arc::default(), shutdown, grace).await
}

/// [`run`], counting connections into `stats`.
pub async fn run_with_stats(
    config: InterceptConfig,
    handler: Arc<dyn MirroredHandler>,
    stats: Arc<InterceptStats>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), InterceptError> {
    // Listen before attaching, so a redirected connect never meets a closed port.
    let listener = Listener::bind(config.listener_port).await?;
    let mut redirector = Redirector::load(&RedirectConfig {
        listener_port: listener.port(),
        ipv6_listener: listener.has_ipv6(),
        ports: config.redirect_ports.clone(),
        ips: config.redirect_ips.clone(),
        own_tgid: std::process::id(),
    })?;
    let mut finder = CgroupFinder::new(config.locator.clone(), config.cgroup2_mount.clone())?;
    let mut watcher = CgroupWatcher::default();
    // A first attach that fails for lack of privileges or a verifier error will not get better:
    // report it. A cgroup that vanished between finding and attaching is retried like any other.
    match watcher.check(&mut finder, &mut redirector) {
        Ok(()) => {}
        Err(error @ EbpfError::Cgroup { .. }) => {
            tracing::warn!(%error, "cannot attach the eBPF redirect yet; retrying");
        }
        Err(error) => return Err(error.into()),
    }

    let interceptor = Arc::new(
        Interceptor::new(&config, Arc::new(redirector.orig_dst_table()), handler).with_stats(stats),
    );
    tracing::info!(
        port = listener.port(),
        ipv6 = listener.has_ipv6(),
        ports = ?config.redirect_ports,
        ips = ?config.redirect_ips,
        mirrored = config.mirrored.entries().len(),
        "transparent interception listening"
    );
    let serve_stop = CancellationToken::new();
    let server = tokio::spawn(interceptor.serve(listener, serve_stop.clone(), grace));

    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Err(error) = watcher.check(&mut finder, &mut redirector) {
                    tracing::warn!(%error, "cannot attach the eBPF redirect; retrying");
                }
            }
        }
    }
    drop(redirector); // detach: from here on connects go direct
    serve_stop.cancel();
    let _ = server.await;
    Ok(())
}

/// Keeps the programs attached to containerd's current cgroup.
#[derive(Debug, Default)]
pub struct CgroupWatcher {
    /// The last "cannot find" message, so a lasting condition is logged once.
    last_error: Option<String>,
}

impl CgroupWatcher {
    /// Finds containerd's cgroup and attaches there if it is not where the programs are. Not
    /// finding it is logged (once per distinct reason) and retried later; failing to attach is
    /// an error.
    pub fn check(
        &mut self,
        finder: &mut CgroupFinder,
        redirector: &mut Redirector,
    ) -> Result<(), EbpfError> {
        let found = match finder.find() {
            Ok(found) => {
                if self.last_error.take().is_some() {
                    tracing::info!(cgroup = %found.path.display(), "containerd's cgroup found again");
                }
                found
            }
            Err(error) => {
                let message = error.to_string();
                if self.last_error.as_ref() != Some(&message) {
                    tracing::warn!(%error, "cannot find containerd's cgroup; connections go direct until it is found");
                    self.last_error = Some(message);
                }
                return Ok(());
            }
        };
        if redirector.attached() == Some(&found) {
            return Ok(());
        }
        redirector.attach(&found)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Original destinations handed out by the test instead of the eBPF map.
    #[derive(Default)]
    struct FakeOrig(Mutex<std::collections::HashMap<u16, SocketAddr>>);

    impl OriginalDst for FakeOrig {
        fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError> {
            Ok(self.0.lock().unwrap().remove(&peer.port()))
        }
    }

    /// Records what it was handed and answers with a fixed body.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Origin>>);

    #[async_trait::async_trait]
    impl MirroredHandler for Recorder {
        async fn handle(&self, mut stream: TcpStream, origin: Origin) {
            self.0.lock().unwrap().push(origin);
            let mut head = [0u8; 256];
            let n = stream.read(&mut head).await.unwrap_or(0);
            let reply = format!("mirrored {} bytes", n);
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    }

    #[derive(clap::Parser)]
    struct TestCli {
        #[command(flatten)]
        intercept: InterceptArgs,
    }

    fn args(extra: &[&str]) -> InterceptArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(extra);
        TestCli::try_parse_from(argv).unwrap().intercept
    }

    fn config(extra: &[&str]) -> InterceptConfig {
        InterceptConfig::from_args(&args(extra), None).unwrap()
    }

    #[test]
    fn flags_and_validation() {
        let c = config(&[]);
        assert_eq!(c.listener_port, 15001);
        assert_eq!(c.redirect_ports, [80, 443]);
        assert!(c.mirrored.matches_name("registry-1.docker.io", 443, true));
        assert_eq!(c.locator, Locator::Comm("containerd".into()));
        let c = config(&[
            "--mirrored-registries",
            "reg.local:5000,10.1.2.3:5001",
            "--intercept-ports",
            "443",
        ]);
        assert_eq!(c.redirect_ports, [443, 5000, 5001]);
        let c = config(&["--mirrored-registries", ""]);
        assert!(c.mirrored.entries().is_empty());
        let c = config(&["--containerd-pid", "42"]);
        assert_eq!(c.locator, Locator::Pid(42));
        let sock = Path::new("/run/containerd/containerd.sock");
        let c = InterceptConfig::from_args(&args(&[]), Some(sock)).unwrap();
        assert_eq!(c.locator, Locator::Socket(sock.into()));
        let c =
            InterceptConfig::from_args(&args(&["--containerd-cgroup", "/x"]), Some(sock)).unwrap();
        assert_eq!(c.locator, Locator::Cgroup("/x".into()));
        assert!(args(&[]).enabled);
        assert!(args(&["--intercept"]).enabled);
        assert!(!args(&["--intercept", "false"]).enabled);
        assert!(!args(&["--intercept=false"]).enabled);
        let bad = |extra: &[&str]| InterceptConfig::from_args(&args(extra), None).is_err();
        assert!(bad(&["--intercept-port", "0"]));
        assert!(bad(&["--intercept-port", "443"]));
        // One registry grammar for every subcommand: a scheme is accepted; a bad entry is
        // refused by the flag parser itself.
        let c = config(&["--mirrored-registries", "https://ghcr.io"]);
        assert!(c.mirrored.matches_name("ghcr.io", 443, true));
        assert!(TestCli::try_parse_from(["t", "--mirrored-registries", "ftp://ghcr.io"]).is_err());
        assert!(bad(&["--intercept-max-connections", "0"]));
        assert!(
            TestCli::try_parse_from(["t", "--containerd-pid", "1", "--containerd-cgroup", "/x"])
                .is_err()
        );
    }

    #[test]
    fn registry_names_from_origins() {
        let o = |addr: &str, host: &str, tls| Origin {
            addr: addr.parse().unwrap(),
            host: host.into(),
            tls,
        };
        assert_eq!(
            origin_registry(&o("1.2.3.4:443", "ghcr.io", true)),
            "ghcr.io"
        );
        assert_eq!(origin_registry(&o("1.2.3.4:5000", "reg", true)), "reg:5000");
        assert_eq!(origin_registry(&o("1.2.3.4:80", "reg", false)), "reg");
        assert_eq!(origin_registry(&o("1.2.3.4:443", "reg", false)), "reg:443");
        assert_eq!(
            origin_registry(&o("[fd00::1]:5000", "fd00::1", false)),
            "[fd00::1]:5000"
        );
    }

    #[test]
    fn decisions() {
        let c = config(&[
            "--mirrored-registries",
            "ghcr.io,reg.local:5000,10.1.2.3:5000",
        ]);
        let i = Interceptor::new(
            &c,
            Arc::new(FakeOrig::default()),
            Arc::new(Recorder::default()),
        );
        let dst = |s: &str| s.parse::<SocketAddr>().unwrap();
        let tls = |sni: Option<&str>| Sniffed::Tls {
            sni: sni.map(str::to_owned),
        };
        let http = |host: &str| Sniffed::Http {
            host: sni::Authority::parse(host),
        };
        let origin = i
            .decide(dst("140.82.1.1:443"), &tls(Some("ghcr.io")))
            .unwrap();
        assert_eq!(
            origin,
            Origin {
                addr: dst("140.82.1.1:443"),
                host: "ghcr.io".into(),
                tls: true
            }
        );
        assert!(
            i.decide(dst("140.82.1.1:443"), &tls(Some("github.com")))
                .is_none()
        );
        assert!(
            i.decide(dst("10.0.0.9:5000"), &tls(Some("reg.local")))
                .is_some()
        );
        assert!(
            i.decide(dst("10.0.0.9:5000"), &http("reg.local:5000"))
                .is_some()
        );
        assert!(i.decide(dst("10.0.0.9:80"), &http("reg.local")).is_none());
        // IP literal registries: no SNI, matched on the destination.
        let o = i.decide(dst("10.1.2.3:5000"), &tls(None)).unwrap();
        assert_eq!(o.host, "10.1.2.3");
        assert!(i.decide(dst("10.1.2.4:5000"), &tls(None)).is_none());
        assert!(
            i.decide(dst("10.1.2.3:5000"), &http("10.1.2.3:5000"))
                .is_some()
        );
        for other in [
            Sniffed::Opaque("x"),
            Sniffed::TimedOut,
            Sniffed::Oversized,
            Sniffed::Closed,
        ] {
            assert!(i.decide(dst("10.1.2.3:5000"), &other).is_none());
        }
    }

    /// A listener with fake original destinations: unknown peers are closed, non-mirrored
    /// connections are spliced, mirrored ones reach the handler with the bytes still unread.
    #[tokio::test]
    async fn listener_routes_connections() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = upstream.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = s.write_all(b"upstream saw: ").await;
                    let _ = s.write_all(&buf[..n]).await;
                });
            }
        });
        let c = config(&[
            "--mirrored-registries",
            "mirror.test",
            "--intercept-peek-timeout",
            "300ms",
        ]);
        let orig = Arc::new(FakeOrig::default());
        let recorder = Arc::new(Recorder::default());
        let interceptor = Arc::new(Interceptor::new(&c, orig.clone(), recorder.clone()));
        let stats = interceptor.stats();
        let listener = Listener::bind(0).await.unwrap();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, listener.port()));
        let stop = CancellationToken::new();
        let server =
            tokio::spawn(interceptor.serve(listener, stop.clone(), Duration::from_secs(1)));

        // Binds the client first so the fake map can be keyed by its port.
        let connect = |orig_dst: Option<SocketAddr>| {
            let orig = orig.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let port = socket.local_addr().unwrap().port();
                if let Some(d) = orig_dst {
                    orig.0.lock().unwrap().insert(port, d);
                }
                socket.connect(addr).await.unwrap()
            }
        };
        let exchange = |mut s: TcpStream, send: &'static [u8]| async move {
            if !send.is_empty() {
                s.write_all(send).await.unwrap();
            }
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };

        // No original destination: closed without a byte.
        let s = connect(None).await;
        assert_eq!(exchange(s, b"GET / HTTP/1.1\r\n\r\n").await, "");
        // Plain HTTP to a non-mirrored host: spliced, the request arrives intact.
        let req = b"GET /x HTTP/1.1\r\nHost: other.test\r\n\r\n";
        let s = connect(Some(upstream_addr)).await;
        let got = exchange(s, req).await;
        assert_eq!(
            got,
            format!("upstream saw: {}", String::from_utf8_lossy(req))
        );
        // Opaque bytes: spliced.
        let s = connect(Some(upstream_addr)).await;
        assert_eq!(
            exchange(s, b"\x00\x01binary").await,
            "upstream saw: \x00\x01binary"
        );
        // Mirrored host: the handler gets the connection with the head unread.
        let req = b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n\r\n";
        let s = connect(Some(SocketAddr::from(([10, 231, 0, 9], 80)))).await;
        assert_eq!(
            exchange(s, req).await,
            format!("mirrored {} bytes", req.len())
        );
        // A client that sends nothing first: spliced once the peek times out.
        let mut s = connect(Some(upstream_addr)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"late").await.unwrap();
        assert_eq!(exchange(s, b"").await, "upstream saw: late");

        let recorded = recorder.0.lock().unwrap().clone();
        assert_eq!(
            recorded,
            [Origin {
                addr: SocketAddr::from(([10, 231, 0, 9], 80)),
                host: "mirror.test".into(),
                tls: false
            }]
        );
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 5);
        assert_eq!(stats.no_origin.load(Ordering::Relaxed), 1);
        assert_eq!(stats.spliced.load(Ordering::Relaxed), 3);
        assert_eq!(stats.mirrored.load(Ordering::Relaxed), 1);
        stop.cancel();
        server.await.unwrap();
    }

    /// A ClientHello split over two writes is still classified once the rest arrives.
    #[tokio::test]
    async fn sniff_waits_for_a_fragmented_hello() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut hello = vec![22, 3, 1, 0, 0];
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0]);
        let name = b"ghcr.io";
        let mut sni = vec![0, 0];
        let list_len = (name.len() + 3) as u16;
        sni.extend_from_slice(&(list_len + 2).to_be_bytes());
        sni.extend_from_slice(&list_len.to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni);
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        hello[3..5].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        hello.extend_from_slice(&msg);
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&hello[..20]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&hello[20..]).await.unwrap();
            s
        });
        let (server, _) = l.accept().await.unwrap();
        let got = sniff(&server, Duration::from_secs(5)).await;
        assert_eq!(
            got,
            Sniffed::Tls {
                sni: Some("ghcr.io".into())
            }
        );
        drop(client.await.unwrap());
        // Nothing was consumed.
        let mut first = [0u8; 1];
        server.peek(&mut first).await.unwrap();
        assert_eq!(first[0], 22);
    }
}
