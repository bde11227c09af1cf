//! Dialling upstreams: the [`Connector`] hyper-util's pool calls with a synthetic URI, which
//! decodes the [`Target`], connects (pinned address, or DNS for redirect targets, whose resolved
//! addresses must pass the redirect address policy; bounded by the connect timeout) and does the
//! verified TLS handshake.
//!
//! A connection may also be dialled *ahead* ([`Connector::warm_up`]): when containerd opens a
//! connection to a mirrored registry, its first request (a tag's `HEAD`, which always asks
//! upstream) follows a TLS handshake with this daemon; dialling the upstream meanwhile takes
//! its TCP and TLS round trips off that request's path. The pool's next dial for that target
//! takes the warm connection, or waits for the dial in progress, instead of starting another.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::oneshot,
    time::Instant,
};
use tokio_rustls::TlsConnector;

use super::{redirect_addr::RedirectAddrs, target::Target};

/// Any byte stream to an upstream: plain TCP or TLS over it.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A plain or TLS connection to an upstream (tokio implements the IO traits for the box).
pub(super) type Conn = Box<dyn Io>;

impl Connection for Box<dyn Io> {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// How long a connection dialled ahead waits for a request to take it; then it is closed.
pub(super) const WARM_KEEP: Duration = Duration::from_secs(10);

/// A target used this recently (a request answered, a dial failed) is not dialled ahead: the
/// pool most likely holds an idle connection to it (hyper-util keeps them 90 s), or it is
/// failing.
pub(super) const WARM_RECENT: Duration = Duration::from_secs(30);

/// Most targets dialled ahead at once, and most targets whose last use is remembered.
const WARM_MAX: usize = 64;

/// Dials [`Target`]s decoded from the synthetic URI: the pinned address, or DNS otherwise.
#[derive(Clone)]
pub(super) struct Connector {
    tls: TlsConnector,
    timeout: Duration,
    redirects: RedirectAddrs,
    warm: Arc<Warm>,
}

/// What became of the upstream dials made ahead (`spegel_upstream_dials_ahead_*`).
#[derive(Debug, Default)]
pub struct DialsAhead {
    /// Dials started ahead of a request.
    pub started: AtomicU64,
    /// Connections a request took.
    pub taken: AtomicU64,
    /// Dials that failed (the request then dials itself).
    pub failed: AtomicU64,
}

/// Connections dialled ahead, by pool key (the synthetic authority), and when each target was
/// last used.
pub(super) struct Warm {
    ahead: Mutex<HashMap<String, Ahead>>,
    recent: Mutex<HashMap<String, Instant>>,
    next_id: AtomicU64,
    /// [`WARM_KEEP`], shorter in tests.
    keep: Duration,
    stats: Arc<DialsAhead>,
}

impl Default for Warm {
    fn default() -> Self {
        Self {
            ahead: Mutex::default(),
            recent: Mutex::default(),
            next_id: AtomicU64::new(0),
            keep: WARM_KEEP,
            stats: Arc::default(),
        }
    }
}

/// A dial made ahead: send it where to deliver the connection (once dialled) to take it.
struct Ahead {
    id: u64,
    take: oneshot::Sender<oneshot::Sender<io::Result<Conn>>>,
}

impl Warm {
    /// Notes that `key` was just used: no dial ahead for it for [`WARM_RECENT`].
    pub(super) fn used(&self, key: &str) {
        let now = Instant::now();
        let mut recent = lock(&self.recent);
        if recent.len() >= WARM_MAX && !recent.contains_key(key) {
            recent.retain(|_, at| now.duration_since(*at) < WARM_RECENT);
            if recent.len() >= WARM_MAX {
                return;
            }
        }
        recent.insert(key.to_owned(), now);
    }

    fn used_recently(&self, key: &str) -> bool {
        lock(&self.recent)
            .get(key)
            .is_some_and(|at| at.elapsed() < WARM_RECENT)
    }

    /// Takes the dial made ahead for `key`, if any.
    fn take(&self, key: &str) -> Option<Ahead> {
        lock(&self.ahead).remove(key)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: nothing a panicking holder could leave half-done.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Connector {
    /// Dials with `tls` for TLS targets, giving up on a connection after `timeout`; redirect
    /// targets only at addresses `redirects` allows.
    pub(super) fn new(tls: TlsConnector, timeout: Duration, redirects: RedirectAddrs) -> Self {
        Self {
            tls,
            timeout,
            redirects,
            warm: Arc::default(),
        }
    }

    /// Dials made ahead wait `keep` instead of [`WARM_KEEP`] to be taken.
    #[cfg(test)]
    pub(super) fn with_warm_keep(mut self, keep: Duration) -> Self {
        self.warm = Arc::new(Warm {
            keep,
            ..Warm::default()
        });
        self
    }

    /// What the pool's dials and the client's requests share about dials made ahead.
    pub(super) fn warm(&self) -> Arc<Warm> {
        Arc::clone(&self.warm)
    }

    /// The counters of dials made ahead.
    pub(super) fn dials_ahead(&self) -> Arc<DialsAhead> {
        Arc::clone(&self.warm.stats)
    }

    /// Starts dialling `target` ahead of a request, unless it was used within
    /// [`WARM_RECENT`], a dial ahead for it is pending, or [`WARM_MAX`] are. The next dial the
    /// pool makes for it (its [`Target::pool_key`]) within [`WARM_KEEP`] takes it; otherwise it is closed. Whether a
    /// dial started.
    pub(super) fn warm_up(&self, target: Target) -> bool {
        let key = target.pool_key();
        if self.warm.used_recently(&key) {
            return false;
        }
        let (take, taken) = oneshot::channel();
        let id = self.warm.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut ahead = lock(&self.warm.ahead);
            if ahead.contains_key(&key) || ahead.len() >= WARM_MAX {
                return false;
            }
            ahead.insert(key.clone(), Ahead { id, take });
        }
        self.warm.stats.started.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let dialled = this.connect_within(&target, started + this.timeout).await;
            if let Err(err) = &dialled {
                tracing::debug!(%target, %err, "dialling an upstream ahead failed");
                this.warm.stats.failed.fetch_add(1, Ordering::Relaxed);
                this.warm.used(&key);
            }
            match tokio::time::timeout_at(started + this.warm.keep, taken).await {
                Ok(Ok(deliver)) => {
                    let connected = dialled.is_ok();
                    // Not taken after all when the dial that asked for it was given up.
                    if deliver.send(dialled).is_ok() && connected {
                        this.warm.stats.taken.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%target, ahead = ?started.elapsed(), "a request took the upstream connection dialled ahead");
                    }
                }
                // Nobody took it: dropped, so closed.
                _ => tracing::debug!(%target, "nothing took the upstream connection dialled ahead"),
            }
            let mut ahead = lock(&this.warm.ahead);
            if ahead.get(&key).is_some_and(|entry| entry.id == id) {
                ahead.remove(&key);
            }
        });
        true
    }

    /// [`Self::connect`] bounded by `deadline`.
    async fn connect_within(&self, target: &Target, deadline: Instant) -> io::Result<Conn> {
        match tokio::time::timeout_at(deadline, self.connect(target)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {target} took longer than {:?}", self.timeout),
            )),
        }
    }

    /// The connection dialled ahead for `key`, waiting for the dial if it is still going (by
    /// `deadline` at most); `None`: there is none, or it failed.
    async fn take_warm(&self, key: &str, deadline: Instant) -> Option<Conn> {
        let ahead = self.warm.take(key)?;
        let (deliver, delivered) = oneshot::channel();
        ahead.take.send(deliver).ok()?;
        match tokio::time::timeout_at(deadline, delivered).await {
            Ok(Ok(Ok(conn))) => Some(conn),
            _ => None,
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Conn>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let target = Target::decode(&uri)?;
            let deadline = Instant::now() + this.timeout;
            if let Some(key) = uri.authority().map(|a| a.as_str())
                && let Some(conn) = this.take_warm(key, deadline).await
            {
                return Ok(TokioIo::new(conn));
            }
            this.connect_within(&target, deadline)
                .await
                .map(TokioIo::new)
        })
    }
}

impl Connector {
    async fn connect(&self, target: &Target) -> io::Result<Conn> {
        let addrs: Vec<SocketAddr> = match target.pinned {
            // The intercepted origin, at the address containerd dialled: not a redirect.
            Some(addr) => vec![addr],
            // Only redirect targets are resolved with DNS: checked on what they resolve to,
            // which is exactly what is dialled below.
            None => {
                let addrs: Vec<SocketAddr> =
                    tokio::net::lookup_host((target.host.as_str(), target.port))
                        .await?
                        .collect();
                self.redirects.check(&target.host, &addrs)?;
                addrs
            }
        };
        let mut last_error = None;
        let mut tcp = None;
        // Addresses in resolver order; a refused one falls through to the next. The caller's
        // deadline bounds the whole walk.
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            last_error.unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolved to no address", target.host),
                )
            })
        })?;
        // Small request/response exchanges: don't let Nagle delay them.
        let _ = tcp.set_nodelay(true);
        if !target.tls {
            return Ok(Box::new(tcp));
        }
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tls = self.tls.connect(server_name, tcp).await?;
        Ok(Box::new(tls))
    }
}
