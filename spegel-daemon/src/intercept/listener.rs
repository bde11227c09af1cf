//! The loopback listener of intercepted connections: accepts, looks up each connection's
//! original destination, classifies its first bytes, and either hands it to the
//! [`MirroredHandler`] (a mirrored registry) or splices it to where it was going. The listener's
//! own health probes ([`super::probe`]) are recognised and closed before any of that. Every
//! intercepted connection gets a write timeout: spliced ones in user space (with a clear error),
//! and all of them in the kernel (`TCP_USER_TIMEOUT`), which also bounds what the mirrored
//! handler writes to the raw stream it is handed.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    intercept::{
        InterceptConfig, InterceptError, MirroredHandler, OriginalDst,
        bypass::Bypass,
        probe::ProbeBook,
        registries::MirroredRegistries,
        sniff::{Sniffed, sniff},
        splice,
        stats::InterceptStats,
    },
    source::Origin,
};

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

    /// The port both listeners are bound to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the [::1] listener is bound.
    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// The addresses accepted on (what the health probes connect to).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))];
        if self.v6.is_some() {
            addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, self.port)));
        }
        addrs
    }
}

/// Decides, per accepted connection, between the mirrored handler and a splice.
pub struct Interceptor {
    orig: Arc<dyn OriginalDst>,
    mirrored: MirroredRegistries,
    handler: Arc<dyn MirroredHandler>,
    peek_timeout: Duration,
    splice: splice::SpliceTimeouts,
    /// Connection slots; the accept loop takes one before it accepts.
    limit: Arc<Semaphore>,
    probes: Arc<ProbeBook>,
    stats: Arc<InterceptStats>,
    /// Learns destinations that carry no mirrored registry (none: every connect is redirected).
    bypass: Option<Arc<Bypass>>,
    #[cfg(feature = "fault-injection")]
    accept_wedge: Option<Arc<crate::fault::wedge::AcceptWedge>>,
}

impl Interceptor {
    /// Routes connections whose original destination `orig` knows, handing mirrored ones to
    /// `handler`.
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
            splice: splice::SpliceTimeouts {
                connect: config.connect_timeout,
                idle: config.splice_idle_timeout,
                write: config.write_timeout,
            },
            limit: Arc::new(Semaphore::new(config.max_connections)),
            probes: Arc::default(),
            stats: Arc::default(),
            bypass: None,
            #[cfg(feature = "fault-injection")]
            accept_wedge: config.accept_wedge.clone(),
        }
    }

    /// Counts into `stats` (e.g. counters the metrics endpoint already holds).
    pub fn with_stats(mut self, stats: Arc<InterceptStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Lets passed-through destinations go direct from then on (see [`Bypass`]).
    pub fn with_bypass(mut self, bypass: Arc<Bypass>) -> Self {
        self.bypass = Some(bypass);
        self
    }

    /// The counters this interceptor counts into.
    pub fn stats(&self) -> Arc<InterceptStats> {
        self.stats.clone()
    }

    /// The book the health probes register in, so the accept loop recognises them.
    pub fn probes(&self) -> Arc<ProbeBook> {
        self.probes.clone()
    }

    /// Connection slots free right now.
    pub fn free_slots(&self) -> usize {
        self.limit.available_permits()
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
        let limit = self.limit.clone();
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
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = self.wedge_released() => {}
            }
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
                () = self.wedge_engaged() => continue,
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
            if self.probes.accepted(peer) {
                continue; // a health probe: closed here, never counted or routed
            }
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            set_user_timeout(&stream, self.splice.write);
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

    /// Test only: completes when the fault switch wedges the accept loop (never without it).
    async fn wedge_engaged(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(wedge) = &self.accept_wedge {
            return wedge.engaged().await;
        }
        std::future::pending().await
    }

    /// Test only: completes at once unless the fault switch wedges the accept loop.
    async fn wedge_released(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(wedge) = &self.accept_wedge {
            wedge.released().await;
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
                if let Some(bypass) = &self.bypass {
                    bypass.saw_mirrored(dst);
                }
                self.handler.handle(stream, origin).await;
            }
            None if sniffed == Sniffed::Closed => {}
            None => {
                self.stats.spliced.fetch_add(1, Ordering::Relaxed);
                // Learned alongside the splice: a name lookup never delays the connection.
                let learn = async {
                    if let Some(bypass) = &self.bypass
                        && sniffed.decisive()
                        && bypass.learn(dst).await
                    {
                        self.stats.bypass_learned.fetch_add(1, Ordering::Relaxed);
                    }
                };
                let (_, spliced) = tokio::join!(learn, splice::splice(stream, dst, self.splice));
                match spliced {
                    Ok(done) => {
                        tracing::debug!(%dst, up = done.up, down = done.down, "splice done")
                    }
                    Err(error @ splice::SpliceError::WriteTimeout { .. }) => {
                        self.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%dst, %error, "passed-through connection closed");
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
            Sniffed::Other
            | Sniffed::Malformed(_)
            | Sniffed::TimedOut
            | Sniffed::Oversized
            | Sniffed::Closed => {
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

/// Sets `TCP_USER_TIMEOUT`: data written to the client that stays unacknowledged, or a zero
/// window (a client that does not read), for longer than `timeout` aborts the connection.
fn set_user_timeout(stream: &TcpStream, timeout: Duration) {
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: the fd belongs to `stream`, open for the whole call; the option value is a c_uint
    // that lives on the stack for the call, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&raw const ms).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot set TCP_USER_TIMEOUT");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::intercept::{authority::Authority, ebpf::EbpfError, probe::probe, tests::config};

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
            host: Authority::parse(host),
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
            Sniffed::Other,
            Sniffed::Malformed("x"),
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

    /// Serves `interceptor` on a fresh listener; returns the v4 address, the stop token and the
    /// server task.
    async fn serving(
        interceptor: Arc<Interceptor>,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        serving_on(interceptor, Listener::bind(0).await.unwrap())
    }

    fn serving_on(
        interceptor: Arc<Interceptor>,
        listener: Listener,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, listener.port()));
        let stop = CancellationToken::new();
        let server =
            tokio::spawn(interceptor.serve(listener, stop.clone(), Duration::from_secs(1)));
        (addr, stop, server)
    }

    /// Health probes are accepted and closed by the listener, but never counted, looked up or
    /// routed.
    #[tokio::test]
    async fn probes_are_accepted_but_not_counted() {
        let c = config(&[]);
        let interceptor = Arc::new(Interceptor::new(
            &c,
            Arc::new(FakeOrig::default()),
            Arc::new(Recorder::default()),
        ));
        let (stats, book) = (interceptor.stats(), interceptor.probes());
        let (addr, stop, server) = serving(interceptor).await;
        for _ in 0..3 {
            let probed = probe(&book, addr, Duration::from_secs(10)).await;
            assert!(probed.is_accepted(), "{probed:?}");
        }
        assert_eq!(book.pending(), 0);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 0);
        assert_eq!(stats.no_origin.load(Ordering::Relaxed), 0);
        stop.cancel();
        server.await.unwrap();
    }

    /// With every slot taken, the accept loop waits for a slot: no free slots, and a probe is
    /// not accepted. Once the connection ends, the waiting probe is accepted late and still
    /// recognised. Each address's accept loop holds a slot while it waits in `accept()`, so
    /// the [::1] loop (if any) gets one slot and the 127.0.0.1 loop one, which a
    /// passed-through connection then holds.
    #[tokio::test]
    async fn no_free_slot_fails_the_probe() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await; // until the client closes
        });
        let listener = Listener::bind(0).await.unwrap();
        let slots = if listener.has_ipv6() { "2" } else { "1" };
        let c = config(&["--intercept-max-connections", slots]);
        let orig = Arc::new(FakeOrig::default());
        let interceptor = Arc::new(Interceptor::new(
            &c,
            orig.clone(),
            Arc::new(Recorder::default()),
        ));
        let (stats, book) = (interceptor.stats(), interceptor.probes());
        let slots = interceptor.clone();
        let (addr, stop, server) = serving_on(interceptor, listener);

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        orig.0.lock().unwrap().insert(port, upstream_addr);
        let mut client = socket.connect(addr).await.unwrap();
        client.write_all(b"\x00opaque").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while slots.free_slots() > 0 || slots.stats.spliced.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection never took the slot");

        let probed = probe(&book, addr, Duration::from_millis(300)).await;
        assert!(!probed.is_accepted(), "{probed:?}");
        assert_eq!(book.pending(), 1);
        drop(client);
        held.await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while book.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the late probe was never accepted");
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 1);
        assert_eq!(stats.no_origin.load(Ordering::Relaxed), 0);
        stop.cancel();
        server.await.unwrap();
    }

    /// The write timeout also bounds the mirrored handler, which writes to the raw stream: a
    /// client that never reads gets its connection aborted by the kernel (`TCP_USER_TIMEOUT`)
    /// once its window has stayed shut for the timeout, and the handler's write fails.
    #[tokio::test]
    async fn stuck_reader_of_a_mirrored_connection_is_aborted() {
        /// Writes until the write fails; reports how it ended.
        struct Flood(tokio::sync::mpsc::Sender<std::io::Result<()>>);

        #[async_trait::async_trait]
        impl MirroredHandler for Flood {
            async fn handle(&self, mut stream: TcpStream, _origin: Origin) {
                let chunk = vec![0x5au8; 64 * 1024];
                let ended = loop {
                    if let Err(error) = stream.write_all(&chunk).await {
                        break Err(error);
                    }
                };
                let _ = self.0.send(ended).await;
            }
        }

        let c = config(&[
            "--mirrored-registries",
            "mirror.test",
            "--intercept-write-timeout",
            "500ms",
        ]);
        let orig = Arc::new(FakeOrig::default());
        let (tx, mut ended) = tokio::sync::mpsc::channel(1);
        let interceptor = Arc::new(Interceptor::new(&c, orig.clone(), Arc::new(Flood(tx))));
        let (addr, stop, server) = serving(interceptor).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        orig.0
            .lock()
            .unwrap()
            .insert(port, SocketAddr::from(([10, 231, 0, 9], 80)));
        let mut client = socket.connect(addr).await.unwrap();
        client
            .write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror.test\r\n\r\n")
            .await
            .unwrap();
        // Never reads.
        let ended = tokio::time::timeout(Duration::from_secs(60), ended.recv())
            .await
            .expect("the handler's writes to a stuck reader never failed")
            .unwrap();
        assert!(ended.is_err());
        drop(client);
        stop.cancel();
        server.await.unwrap();
    }

    /// The test-only wedge switch stops the accept loop: probes fail while its file exists and
    /// the waiting probe is accepted (and recognised) once it is removed.
    #[cfg(feature = "fault-injection")]
    #[tokio::test]
    async fn fault_switch_wedges_the_accept_loop() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wedge");
        let mut c = config(&[]);
        c.accept_wedge = Some(Arc::new(crate::fault::wedge::AcceptWedge::new(
            file.clone(),
        )));
        let interceptor = Arc::new(Interceptor::new(
            &c,
            Arc::new(FakeOrig::default()),
            Arc::new(Recorder::default()),
        ));
        let (stats, book) = (interceptor.stats(), interceptor.probes());
        let (addr, stop, server) = serving(interceptor).await;
        assert!(
            probe(&book, addr, Duration::from_secs(10))
                .await
                .is_accepted()
        );
        std::fs::write(&file, b"").unwrap();
        // The loop notices within its poll; then nothing is accepted.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probed = probe(&book, addr, Duration::from_millis(500)).await;
        assert!(!probed.is_accepted(), "{probed:?}");
        std::fs::remove_file(&file).unwrap();
        assert!(
            probe(&book, addr, Duration::from_secs(10))
                .await
                .is_accepted()
        );
        assert_eq!(book.pending(), 0);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 0);
        stop.cancel();
        server.await.unwrap();
    }
}
