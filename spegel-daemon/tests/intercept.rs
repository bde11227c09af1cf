//! End-to-end check of transparent interception with the real eBPF programs: a cgroup, a network
//! namespace with an HTTP and a TLS server behind a veth pair, the listener in this process, and
//! curl (or python) started inside the cgroup. Needs root; ignored unless built with `SPEGEL_E2E=1`
//! (`cargo xtask test`; see `build.rs`).
//!
//! Everything it creates (netns, veth, cgroup, child processes, files) is removed by drop guards,
//! also when an assertion fails.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command as StdCommand,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spegel::{
    intercept::CgroupWatcher,
    intercept::InterceptConfig,
    intercept::Interceptor,
    intercept::Listener,
    intercept::MirroredHandler,
    intercept::bypass::{Bypass, PassTable as _, Resolve},
    intercept::cgroup::CgroupFinder,
    intercept::cgroup::Locator,
    intercept::ebpf::RedirectConfig,
    intercept::ebpf::Redirector,
    intercept::guard::OwnCgroup,
    intercept::registries::MirroredRegistries,
    source::Origin,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = StdCommand::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A network namespace joined to this one by a veth pair: 10.231.<net>.1 here, .2 inside.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn create(tag: u32, net: u8) -> anyhow::Result<Self> {
        let name = format!("spegel-it-{tag}");
        let host_if = format!("spit{tag}h");
        let ns_if = format!("spit{tag}n");
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name, host_if };
        let name = ns.name.as_str();
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns_if,
                "netns",
                name,
            ],
        )?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.231.{net}.1/24"),
                "dev",
                &ns.host_if,
            ],
        )?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        run(
            "ip",
            &[
                "-n",
                name,
                "addr",
                "add",
                &format!("10.231.{net}.2/24"),
                "dev",
                &ns_if,
            ],
        )?;
        run("ip", &["-n", name, "link", "set", &ns_if, "up"])?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Binds listeners inside the namespace: a thread joins it, binds, and hands them back. The
    /// sockets stay in the namespace whichever thread uses them.
    fn bind(&self, addrs: Vec<SocketAddr>) -> anyhow::Result<Vec<TcpListener>> {
        let path = format!("/var/run/netns/{}", self.name);
        let std_listeners = std::thread::spawn(move || -> anyhow::Result<Vec<_>> {
            let ns = File::open(&path).with_context(|| path.clone())?;
            // SAFETY: setns only switches this (short-lived) thread's network namespace; the fd
            // is open for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            addrs
                .iter()
                .map(|addr| {
                    let l = std::net::TcpListener::bind(addr).with_context(|| addr.to_string())?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .collect()
        })
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))??;
        std_listeners
            .into_iter()
            .map(|l| TcpListener::from_std(l).map_err(Into::into))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A cgroup2 directory; on drop its processes move to the parent and it is removed.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create(path: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir(&path).with_context(|| path.display().to_string())?;
        Ok(Self { path })
    }

    /// Removes and recreates the directory: a new cgroup under the same path.
    fn recreate(&self) -> anyhow::Result<()> {
        self.evacuate();
        std::fs::remove_dir(&self.path)?;
        std::fs::create_dir(&self.path)?;
        Ok(())
    }

    fn evacuate(&self) {
        let Some(parent) = self.path.parent() else {
            return;
        };
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            self.evacuate();
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.path.display());
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA (PEM, for curl's --cacert) and a leaf it signed for `names`.
fn ca_and_leaf(
    cn: &str,
    names: &[&str],
) -> anyhow::Result<(String, CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let leaf = rcgen::CertificateParams::new(names)?.signed_by(&leaf_key, &ca)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok((ca.pem(), leaf.der().clone(), key))
}

fn tls_acceptor(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reads a request head and answers `200` with `body`, then closes.
async fn answer<S>(mut stream: S, body: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Serves plain HTTP (no acceptor) or HTTPS with a fixed body; counts connections.
fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    body: &'static str,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::Relaxed);
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            answer(stream, body).await;
                        }
                    }
                    None => answer(stream, body).await,
                }
            });
        }
    })
}

/// The mirrored-registry handler of the test: terminates TLS with its own certificate.
struct TestHandler {
    tls: TlsAcceptor,
    seen: Mutex<Vec<Origin>>,
}

#[async_trait::async_trait]
impl MirroredHandler for TestHandler {
    async fn handle(&self, stream: TcpStream, origin: Origin) {
        self.seen.lock().unwrap().push(origin.clone());
        if origin.tls {
            if let Ok(stream) = self.tls.accept(stream).await {
                answer(stream, "mirrored-tls-ok").await;
            }
        } else {
            answer(stream, "mirrored-ok").await;
        }
    }
}

/// What curl got: the body and `%{remote_ip}:%{remote_port}` (what getpeername said).
#[derive(Debug)]
struct Curled {
    body: String,
    remote: String,
}

/// Runs curl, inside `cgroup` when given (the shell joins it, then execs curl).
async fn curl(cgroup: Option<&Path>, args: &[&str]) -> anyhow::Result<Curled> {
    let base = [
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-w",
        "|%{remote_ip}:%{remote_port}",
    ];
    let mut cmd = match cgroup {
        Some(cg) => {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec curl "$@""#)
                .arg(cg);
            cmd
        }
        None => tokio::process::Command::new("curl"),
    };
    cmd.args(base).args(args).kill_on_drop(true);
    let out = cmd.output().await.context("spawning curl")?;
    ensure!(
        out.status.success(),
        "curl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let stdout = String::from_utf8(out.stdout)?;
    let (body, remote) = stdout
        .rsplit_once('|')
        .ok_or_else(|| anyhow!("no -w output in {stdout:?}"))?;
    Ok(Curled {
        body: body.to_owned(),
        remote: remote.to_owned(),
    })
}

fn accepted(stats: &spegel::intercept::InterceptStats) -> u64 {
    stats.accepted.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn transparent_interception_end_to_end() -> anyhow::Result<()> {
    let tag = std::process::id() % 100_000;
    let ground = Ground::new(tag, u8::try_from(tag % 200 + 20)?)?;
    let (scratch, cgroup, origin_ip) = (&ground.scratch, &ground.cgroup, ground.origin_ip);
    let cg = Some(cgroup.path.as_path());

    // The "registry" side: plain HTTP and HTTPS on 10.231.<net>.2 in the namespace, and an
    // HTTP server on [::1] here for the IPv6 path.
    let origin = ground.serve_origin()?;
    let (origin_ca_file, origin_hits) = (&origin.ca_file, &origin.hits);
    let (mirror_ca, mirror_cert, mirror_key) = ca_and_leaf("mirror CA", &["mirror.test"])?;
    let mirror_ca_file = scratch.0.join("mirror-ca.pem");
    std::fs::write(&mirror_ca_file, &mirror_ca)?;
    let v6 = TcpListener::bind("[::1]:0").await?;
    let v6_port = v6.local_addr()?.port();
    let _v6 = serve(v6, None, "v6-ok", origin_hits.clone());

    let handler = Arc::new(TestHandler {
        tls: tls_acceptor(mirror_cert, mirror_key)?,
        seen: Mutex::new(Vec::new()),
    });
    let origin_ca_arg = origin_ca_file.to_string_lossy().into_owned();
    let mirror_ca_arg = mirror_ca_file.to_string_lossy().into_owned();
    let resolve = |host: &str, port: u16| format!("{host}:{port}:{origin_ip}");

    // ---- Part 1: the building blocks, with the loader handle held here. ----
    let listener = Listener::bind(0).await?;
    ensure!(listener.has_ipv6(), "no [::1] listener");
    let mirrored = MirroredRegistries::parse(&["mirror.test"]).map_err(|e| anyhow!(e))?;
    // Every connect stays redirected here; learning has its own test below.
    let config = ground.config(&listener, vec!["::1".parse()?], &mirrored, Duration::ZERO);
    let redirector = ground.redirector(&config, listener.has_ipv6())?;
    let interceptor = Arc::new(Interceptor::new(
        &config,
        Arc::new(redirector.orig_dst_table()),
        handler.clone(),
    ));
    let stats = interceptor.stats();
    let stop = CancellationToken::new();
    let server = tokio::spawn(interceptor.serve(listener, stop.clone(), Duration::from_secs(1)));

    // A non-mirrored TLS destination is spliced: the client verifies the real server's
    // certificate, and getpeername reports the original destination.
    let got = curl(
        cg,
        &[
            "--cacert",
            &origin_ca_arg,
            "--resolve",
            &resolve("origin.test", 443),
            "https://origin.test/",
        ],
    )
    .await?;
    assert_eq!(got.body, "tls-ok");
    assert_eq!(got.remote, format!("{origin_ip}:443"));
    assert_eq!(
        accepted(&stats),
        1,
        "the TLS connection was not intercepted"
    );
    assert_eq!(stats.spliced.load(Ordering::Relaxed), 1);

    // Plain HTTP to a non-mirrored host is spliced too.
    let got = curl(cg, &[&format!("http://{origin_ip}/")]).await?;
    assert_eq!(got.body, "plain-ok");
    assert_eq!(got.remote, format!("{origin_ip}:80"));
    assert_eq!(accepted(&stats), 2);
    assert_eq!(stats.spliced.load(Ordering::Relaxed), 2);

    // Mirrored registry names reach the handler, plain and TLS.
    let got = curl(
        cg,
        &[
            "--resolve",
            &resolve("mirror.test", 80),
            "http://mirror.test/",
        ],
    )
    .await?;
    assert_eq!(got.body, "mirrored-ok");
    let got = curl(
        cg,
        &[
            "--cacert",
            &mirror_ca_arg,
            "--resolve",
            &resolve("mirror.test", 443),
            "https://mirror.test/",
        ],
    )
    .await?;
    assert_eq!(got.body, "mirrored-tls-ok");
    assert_eq!(got.remote, format!("{origin_ip}:443"));
    assert_eq!(
        *handler.seen.lock().unwrap(),
        [
            Origin {
                addr: SocketAddr::new(origin_ip, 80),
                host: "mirror.test".into(),
                tls: false
            },
            Origin {
                addr: SocketAddr::new(origin_ip, 443),
                host: "mirror.test".into(),
                tls: true
            },
        ]
    );
    assert_eq!(stats.mirrored.load(Ordering::Relaxed), 2);

    // IPv6: a listed address ([::1]) is redirected whatever the port.
    let got = curl(cg, &["-g", &format!("http://[::1]:{v6_port}/")]).await?;
    assert_eq!(got.body, "v6-ok");
    assert_eq!(got.remote, format!("::1:{v6_port}"));
    assert_eq!(accepted(&stats), 5);

    // An AF_INET6 socket dialling a v4-mapped address is redirected and sees the original peer.
    if which("python3") {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s.connect(('::ffff:{origin_ip}', 80))\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
             data = b''\n\
             while True:\n    \
                 d = s.recv(4096)\n    \
                 if not d: break\n    \
                 data += d\n\
             peer = s.getpeername()\n\
             print(peer[0], peer[1], data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
        );
        assert_eq!(
            python_in(&cgroup.path, &script).await?,
            format!("::ffff:{origin_ip} 80 plain-ok")
        );
        assert_eq!(
            accepted(&stats),
            6,
            "the v4-mapped connect was not intercepted"
        );
    } else {
        eprintln!("python3 not found: v4-mapped check skipped");
    }

    // Outside the cgroup nothing is redirected: the listener sees nothing.
    let before = accepted(&stats);
    let got = curl(
        None,
        &[
            "--resolve",
            &resolve("mirror.test", 80),
            "http://mirror.test/",
        ],
    )
    .await?;
    assert_eq!(got.body, "plain-ok");
    assert_eq!(accepted(&stats), before);

    // Nothing left behind in the hand-over map.
    assert_eq!(stats.no_origin.load(Ordering::Relaxed), 0);

    // Fail-open: with the loader handle dropped, the cgroup's traffic goes direct.
    drop(redirector);
    let got = curl(
        cg,
        &[
            "--resolve",
            &resolve("mirror.test", 80),
            "http://mirror.test/",
        ],
    )
    .await?;
    assert_eq!(got.body, "plain-ok");
    assert_eq!(got.remote, format!("{origin_ip}:80"));
    assert_eq!(accepted(&stats), before);
    stop.cancel();
    server.await?;

    // ---- Discovery on the real /proc: a process in the cgroup listening on a unix socket is
    // found by its socket and by its PID. ----
    if which("python3") {
        let socket = scratch.0.join("fake-containerd.sock");
        let script = format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind({:?})\n\
             s.listen()\n\
             time.sleep(60)\n",
            socket.display().to_string()
        );
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec python3 -c "$1""#)
            .arg(&cgroup.path)
            .arg(&script)
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("child pid")?;
        wait_for(|| async { socket.exists() }).await?;
        let by_socket = CgroupFinder::new(Locator::Socket(socket.clone()), None)?.find()?;
        assert_eq!(by_socket.path, cgroup.path);
        let by_pid = CgroupFinder::new(Locator::Pid(pid), None)?.find()?;
        assert_eq!(by_pid, by_socket);
        child.kill().await?;
    }

    // ---- Part 2: `run`, re-attaching when the cgroup is recreated. ----
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let config = InterceptConfig {
        listener_port: port,
        redirect_ips: Vec::new(),
        ..config
    };
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(spegel::intercept::run(
        config,
        handler.clone(),
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    let mirrored = || async {
        curl(
            cg,
            &[
                "--resolve",
                &resolve("mirror.test", 80),
                "http://mirror.test/",
            ],
        )
        .await
        .map(|c| c.body)
    };
    wait_for(|| async { mirrored().await.is_ok_and(|b| b == "mirrored-ok") }).await?;
    // A recreated cgroup has lost its programs until the watcher re-attaches.
    cgroup.recreate()?;
    wait_for(|| async { mirrored().await.is_ok_and(|b| b == "mirrored-ok") })
        .await
        .context("not re-attached to the recreated cgroup")?;
    shutdown.cancel();
    running.await??;
    assert_eq!(
        mirrored().await?,
        "plain-ok",
        "still redirected after run returned"
    );
    Ok(())
}

/// The names the bypass test's mirrored registry resolves to, as a resolver would say.
struct FixedNames(Vec<(String, IpAddr)>);

#[async_trait::async_trait]
impl Resolve for FixedNames {
    async fn resolve(&self, name: &str) -> Vec<IpAddr> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, ip)| *ip)
            .collect()
    }
}

/// A destination whose connection was passed through goes direct afterwards (the real programs
/// read the `PASS` map), per address and port, never where a mirrored registry's name resolves,
/// and only until its entry expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn passed_through_destinations_go_direct_once_learned() -> anyhow::Result<()> {
    // Apart from the other test's namespace, address and cgroup (the two may run at once).
    let pid_tag = std::process::id() % 100_000;
    let tag = pid_tag + 100_000;
    let net = u8::try_from((pid_tag + 100) % 200 + 20)?;
    let ground = Ground::new(tag, net)?;
    let (cgroup, ns, origin_ip) = (&ground.cgroup, &ground.ns, ground.origin_ip);
    let cg = Some(cgroup.path.as_path());
    // A second address in the namespace, where the mirrored registry's name resolves.
    let registry_ip = IpAddr::V4(Ipv4Addr::new(10, 231, net, 3));
    run(
        "ip",
        &[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{registry_ip}/24"),
            "dev",
            &format!("spit{tag}n"),
        ],
    )?;

    let origin = ground.serve_origin()?;
    let (origin_ca_file, hits) = (&origin.ca_file, &origin.hits);
    let (_, mirror_cert, mirror_key) = ca_and_leaf("mirror CA", &["mirror.test"])?;
    let registry_http = ns
        .bind(vec![SocketAddr::new(registry_ip, 80)])?
        .pop()
        .context("registry listener")?;
    let _registry = serve(registry_http, None, "registry-ok", hits.clone());
    let handler = Arc::new(TestHandler {
        tls: tls_acceptor(mirror_cert, mirror_key)?,
        seen: Mutex::new(Vec::new()),
    });

    let listener = Listener::bind(0).await?;
    let mirrored = MirroredRegistries::parse(&["mirror.test"]).map_err(|e| anyhow!(e))?;
    let config = ground.config(&listener, Vec::new(), &mirrored, Duration::from_secs(300));
    let redirector = ground.redirector(&config, listener.has_ipv6())?;
    let pass = redirector.pass_map();
    let bypass = Bypass::new(
        Arc::new(pass.clone()),
        config.bypass_ttl,
        &mirrored,
        Arc::new(FixedNames(vec![("mirror.test".into(), registry_ip)])),
    );
    let interceptor = Arc::new(
        Interceptor::new(
            &config,
            Arc::new(redirector.orig_dst_table()),
            handler.clone(),
        )
        .with_bypass(Arc::new(bypass)),
    );
    let stats = interceptor.stats();
    let learned = || stats.bypass_learned.load(Ordering::Relaxed);
    let stop = CancellationToken::new();
    let server = tokio::spawn(interceptor.serve(listener, stop.clone(), Duration::from_secs(1)));
    let plain = format!("http://{origin_ip}/");

    // The first connection is redirected and passed through; its destination is learned.
    let got = curl(cg, &[&plain]).await?;
    assert_eq!((got.body.as_str(), accepted(&stats)), ("plain-ok", 1));
    wait_for(|| async { learned() == 1 }).await?;
    // The next ones go direct: the listener sees nothing, the server answers.
    let hits_before = hits.load(Ordering::Relaxed);
    for _ in 0..3 {
        let got = curl(cg, &[&plain]).await?;
        assert_eq!(got.body, "plain-ok");
        assert_eq!(got.remote, format!("{origin_ip}:80"));
    }
    assert_eq!(accepted(&stats), 1, "a learned destination was redirected");
    assert_eq!(hits.load(Ordering::Relaxed), hits_before + 3);
    // connect6 finds it too, for an AF_INET6 socket dialling the v4-mapped address.
    ensure!(
        which("python3"),
        "python3 is needed for the v4-mapped check"
    );
    {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s.connect(('::ffff:{origin_ip}', 80))\n\
             s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n\
             print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
        );
        assert_eq!(python_in(&cgroup.path, &script).await?, "HTTP/1.1 200 OK");
        assert_eq!(accepted(&stats), 1, "the v4-mapped connect was redirected");
    }

    // Learned per port: TLS on the same address is still redirected the first time.
    let tls = [
        "--cacert",
        &origin_ca_file.to_string_lossy(),
        "--resolve",
        &format!("origin.test:443:{origin_ip}"),
        "https://origin.test/",
    ]
    .map(String::from);
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    assert_eq!(curl(cg, &tls).await?.body, "tls-ok");
    assert_eq!(accepted(&stats), 2);
    wait_for(|| async { learned() == 2 }).await?;
    assert_eq!(curl(cg, &tls).await?.body, "tls-ok");
    assert_eq!(accepted(&stats), 2);

    // Where the mirrored registry's name resolves, another name is passed through but never
    // learned, and the registry itself still reaches the handler.
    let other = ["-H", "Host: other.test", &format!("http://{registry_ip}/")].map(String::from);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    for n in 1..=2 {
        assert_eq!(curl(cg, &other).await?.body, "registry-ok");
        assert_eq!(accepted(&stats), 2 + n, "not redirected on try {n}");
    }
    let mirror = format!("mirror.test:80:{registry_ip}");
    let got = curl(cg, &["--resolve", &mirror, "http://mirror.test/"]).await?;
    assert_eq!(got.body, "mirrored-ok");
    assert_eq!(learned(), 2);

    // The programs and the daemon read the same clock: an entry past its time redirects again.
    pass.pass(SocketAddr::new(origin_ip, 80), Duration::from_millis(1))?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = accepted(&stats);
    assert_eq!(curl(cg, &[&plain]).await?.body, "plain-ok");
    assert_eq!(
        accepted(&stats),
        before + 1,
        "an expired entry still went direct"
    );

    stop.cancel();
    server.await?;
    Ok(())
}

/// The servers [`Ground::serve_origin`] started; they stop when it drops.
struct OriginServers {
    /// The CA that signed the HTTPS server's leaf (for curl's `--cacert`).
    ca_file: PathBuf,
    /// Connections the servers accepted.
    hits: Arc<AtomicU64>,
    _servers: Vec<AbortOnDrop>,
}

/// A task aborted when this drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What both tests stand on: a scratch directory, a cgroup, and a namespace at 10.231.<net>.2,
/// all named after `tag`.
struct Ground {
    scratch: Scratch,
    cgroup: Cgroup,
    ns: Netns,
    origin_ip: IpAddr,
}

impl Ground {
    fn new(tag: u32, net: u8) -> anyhow::Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,spegel=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let scratch = Scratch(std::env::temp_dir().join(format!("spegel-it-{tag}")));
        std::fs::create_dir_all(&scratch.0)?;
        let finder_probe = CgroupFinder::new(Locator::Pid(std::process::id()), None)?;
        let cgroup = Cgroup::create(finder_probe.mount().join(format!("spegel-it-{tag}")))?;
        let ns = Netns::create(tag, net)?;
        Ok(Self {
            scratch,
            cgroup,
            ns,
            origin_ip: IpAddr::V4(Ipv4Addr::new(10, 231, net, 2)),
        })
    }

    /// Plain HTTP ("plain-ok") and HTTPS ("tls-ok", a leaf for `origin.test` and the address
    /// from a CA written to the scratch directory) on the namespace's address, ports 80 and 443.
    fn serve_origin(&self) -> anyhow::Result<OriginServers> {
        let (ca, cert, key) =
            ca_and_leaf("origin CA", &["origin.test", &self.origin_ip.to_string()])?;
        let ca_file = self.scratch.0.join("origin-ca.pem");
        std::fs::write(&ca_file, &ca)?;
        let mut listeners = self.ns.bind(vec![
            SocketAddr::new(self.origin_ip, 80),
            SocketAddr::new(self.origin_ip, 443),
        ])?;
        let https = listeners.pop().context("https listener")?;
        let http = listeners.pop().context("http listener")?;
        let hits = Arc::new(AtomicU64::new(0));
        let servers = vec![
            AbortOnDrop(serve(http, None, "plain-ok", hits.clone())),
            AbortOnDrop(serve(
                https,
                Some(tls_acceptor(cert, key)?),
                "tls-ok",
                hits.clone(),
            )),
        ];
        Ok(OriginServers {
            ca_file,
            hits,
            _servers: servers,
        })
    }

    /// Interception settings for `listener`, redirecting ports 80 and 443 (and `ips`) from the
    /// cgroup, mirroring `mirrored`.
    fn config(
        &self,
        listener: &Listener,
        ips: Vec<IpAddr>,
        mirrored: &MirroredRegistries,
        bypass_ttl: Duration,
    ) -> InterceptConfig {
        InterceptConfig {
            listener_port: listener.port(),
            redirect_ports: vec![80, 443],
            redirect_ips: ips,
            mirrored: mirrored.clone(),
            locator: Locator::Cgroup(self.cgroup.path.clone()),
            cgroup2_mount: None,
            poll_interval: Duration::from_millis(200),
            peek_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            splice_idle_timeout: Duration::from_secs(600),
            bypass_ttl,
            max_connections: 64,
            write_timeout: Duration::from_secs(30),
            health: spegel::intercept::health::HealthPolicy {
                wedge_timeout: Duration::from_secs(5),
                recover_after: Duration::from_secs(10),
            },
            probe_interval: Duration::from_secs(1),
            #[cfg(feature = "fault-injection")]
            accept_wedge: None,
            #[cfg(feature = "fault-injection")]
            attach_containing_cgroup: false,
        }
    }

    /// The real programs, loaded for `config` and attached to the cgroup.
    fn redirector(&self, config: &InterceptConfig, ipv6: bool) -> anyhow::Result<Redirector> {
        let mut finder = CgroupFinder::new(config.locator.clone(), None)?;
        let own = OwnCgroup::current(finder.mount())?;
        let mut redirector = Redirector::load(&RedirectConfig {
            listener_port: config.listener_port,
            ipv6_listener: ipv6,
            ports: config.redirect_ports.clone(),
            ips: config.redirect_ips.clone(),
            own_cgroup: own.id,
        })?;
        CgroupWatcher::new(own).check(&mut finder, &mut redirector)?;
        ensure!(
            redirector.attached().map(|c| c.path.as_path()) == Some(self.cgroup.path.as_path()),
            "not attached: {:?}",
            redirector.attached()
        );
        Ok(redirector)
    }
}

/// Runs a python `script` inside `cgroup`; what it printed, trimmed.
async fn python_in(cgroup: &Path, script: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec python3 -c "$1""#)
        .arg(cgroup)
        .arg(script)
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn which(program: &str) -> bool {
    StdCommand::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Polls `check` until it holds, for at most 15 s.
async fn wait_for<F, Fut>(check: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("condition not met within 15 s")
}
