//! The `run` subcommand: wires store, router, sources, registry API and interception together,
//! runs them until the shutdown future resolves, then drains within the grace period.
use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    body::buffered::Buffered,
    config::RunArgs,
    intercept::{self, InterceptConfig},
    membership::Membership,
    metrics::{AccessStats, Instrumented, Metrics, TagStats},
    p2p::P2pRouter,
    peers::{
        FetchConfig, PeerSource,
        burst::{Claimer, Claims},
    },
    routing::Router,
    serve::{
        access::{Access, ConfirmedPeers, NotesPublic, PublicOnly},
        api::{self, Registry, StoreReadiness},
        policy::ServePolicy,
        transparent::{RegistryHandler, UpstreamPassthrough},
    },
    source::{Source, local::LocalSource},
    store::{Ingests, Store, containerd::ContainerdStore},
    tls::{
        TlsTerminator,
        ca::PermittedNames,
        continuity::{CaSet, CaStats},
        trust::TrustWatch,
    },
    upstream::{Backoff, UpstreamClient, UpstreamSource},
};

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; the daemon can only be killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Run the daemon until `shutdown` resolves.
pub async fn run(args: RunArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Validate everything before anything binds or connects.
    let fetch_config = FetchConfig::try_from(&args.fetch).context("invalid peer fetch flags")?;
    let intercept_config = match args.intercept.enabled {
        true => Some(
            InterceptConfig::from_args(&args.intercept, Some(&args.containerd.containerd_sock))
                .context("invalid interception flags")?,
        ),
        false => None,
    };
    #[cfg(feature = "fault-injection")]
    let intercept_config = intercept_config.map(|mut c| {
        c.accept_wedge = args.fault.accept_wedge();
        c.attach_containing_cgroup = args.fault.test_attach_containing_cgroup;
        c
    });
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let membership = args
        .membership
        .to_membership()
        .context("invalid cluster membership")?;
    let peer_auth = membership
        .peer_auth()
        .context("cannot set up peer authentication")?;
    match &membership {
        Membership::Open => tracing::warn!(
            "--insecure-open-cluster: any host that reaches this node can join the DHT and read its images"
        ),
        Membership::Secret { transport, .. } => {
            tracing::info!(
                ?transport,
                "only cluster members join the DHT and read content"
            )
        }
    }
    let p2p_config = args
        .router
        .to_config(
            &args.data_dir,
            args.registry.registry_addr.port(),
            membership.secrets(),
        )
        .context("invalid router flags")?;
    let upstream_client = UpstreamClient::new(&args.upstream).context("invalid upstream flags")?;
    let admin_addr = args.admin.validate()?;

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);

    let store = tokio::select! {
        store = connect_store(&args) => store,
        () = &mut shutdown => return Ok(()),
    };
    let ingests: Arc<dyn Ingests> = Arc::new(store.clone());
    let store: Arc<dyn Store> = Arc::new(store);

    let (router, event_loop) = P2pRouter::new(p2p_config).context("cannot start the router")?;
    tracing::info!(peer_id = %router.peer_id(), "router started");
    tasks.spawn(
        event_loop
            .run(stop.clone())
            .instrument(tracing::info_span!("router")),
    );
    let dyn_router: Arc<dyn Router> = Arc::new(router.clone());
    let admin_router = router.clone();
    tasks.spawn(
        crate::routing::sync::run(
            Arc::clone(&store),
            Arc::clone(&dyn_router),
            stop.clone(),
            args.advertise_resync,
        )
        .instrument(tracing::info_span!("advertise")),
    );

    let transparent = intercept_config.is_some();
    let backoff = Arc::new(args.upstream.backoff());
    let access_stats = Arc::new(AccessStats::default());
    let access = Arc::new(args.access.access(Arc::clone(&access_stats)));
    let upstream: Arc<dyn Source> = Arc::new(
        UpstreamSource::new(upstream_client.clone())
            .with_backoff(Arc::clone(&backoff))
            .with_resumes(args.upstream.upstream_blob_resumes),
    );
    // What upstream answers each request's own credentials (below the shared fetch, which
    // serves one request another's answer) confirms access and notes public content.
    let upstream: Arc<dyn Source> = Arc::new(NotesPublic::new(upstream, Arc::clone(&access)));
    let (upstream, claims) = shared_upstream(
        &args,
        upstream,
        (&dyn_router, router.peer_id().to_string()),
        &fetch_config,
        transparent,
        &peer_auth,
        (&access, &backoff, &ingests),
    )?;
    // Test faults on what is served to peers apply to copies in flight too.
    #[cfg(feature = "fault-injection")]
    let upstream = crate::fault::inject(upstream, &args.fault);
    let peers = PeerSource::new(
        dyn_router,
        fetch_config,
        transparent.then(|| Arc::clone(&upstream)),
        peer_auth.clone(),
    );
    let intercept_stats = Arc::new(intercept::InterceptStats::default());
    let ca_stats = Arc::new(CaStats::default());
    let metrics = Metrics::new(
        Some(peers.metrics()),
        transparent.then(|| Arc::clone(&intercept_stats)),
        Some(router),
    );
    let tag_stats = Arc::new(TagStats::default());
    let fallback_stats = Arc::new(crate::metrics::FallbackStats::default());
    let metrics = metrics
        .with_tags(Arc::clone(&tag_stats))
        .with_access(access_stats)
        .with_fallbacks(Arc::clone(&fallback_stats));
    let metrics = Arc::new(match transparent {
        true => metrics
            .with_ca(Arc::clone(&ca_stats))
            .with_dials_ahead(upstream_client.dials_ahead()),
        false => metrics,
    });
    let local: Arc<dyn Source> = Arc::new(LocalSource::new(Arc::clone(&store)));
    #[cfg(feature = "fault-injection")]
    let local = crate::fault::inject(local, &args.fault);
    // Other nodes asking for public content only get what this node knows to be public.
    let local: Arc<dyn Source> = Arc::new(PublicOnly::new(local, Arc::clone(&access)));
    let peers = buffered(Arc::new(peers), &args, &ingests)?;
    // Private images stay private: peers' copies only once upstream confirms the client may
    // read them (or, when it cannot answer, only what is known to be public).
    let peers: Arc<dyn Source> = Arc::new(
        ConfirmedPeers::new(
            peers,
            transparent.then(|| Arc::clone(&upstream)),
            Arc::clone(&access),
        )
        .with_backoff(Arc::clone(&backoff)),
    );
    // Its fetches in flight, served to other nodes, follow the same rule as its store.
    let upstream: Arc<dyn Source> = Arc::new(PublicOnly::new(upstream, access));
    let policy = ServePolicy::new(local, peers, Some(upstream), args.tag_upstream_first)
        .with_backoff(backoff)
        .with_tag_stats(tag_stats)
        .with_fallback_stats(fallback_stats);
    let source: Arc<dyn Source> =
        Arc::new(Instrumented::new(Arc::new(policy), Arc::clone(&metrics)));

    let encoder_metrics = Arc::clone(&metrics);
    let recent = Arc::new(crate::metrics::recent::RecentServed::default());
    let registry = Arc::new(
        Registry::new(source)
            .with_peer_auth(peer_auth)
            .with_claims(claims)
            .with_readiness(Arc::new(StoreReadiness::new(Arc::clone(&store))))
            .with_metrics(Arc::new(move || encoder_metrics.encode()))
            .with_max_connections(args.registry.registry_max_connections)
            .with_max_connections_per_client(args.registry.registry_max_connections_per_client)
            .with_idle_timeout(args.registry.registry_idle_timeout)
            .with_write_timeout(args.registry.registry_write_timeout)
            .with_header_timeout(args.registry.registry_header_timeout)
            .with_connection_stats(metrics.connection_stats())
            .with_recent(Arc::clone(&recent)),
    );
    let listener = tokio::net::TcpListener::bind(args.registry.registry_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.registry.registry_addr))?;
    tracing::info!(addr = %args.registry.registry_addr, "registry API listening");
    tasks.spawn(
        api::serve(listener, Arc::clone(&registry), stop.clone())
            .instrument(tracing::info_span!("registry")),
    );

    let admin_intercept = transparent.then(|| Arc::clone(&intercept_stats));
    let mut admin_cas = None;
    if let Some(config) = intercept_config {
        // The same list `install-ca` reads, so both derive the same CA.
        let permitted =
            PermittedNames::from_registries(args.intercept.mirrored_registries.iter().flatten())
                .context("cannot derive the CA's permitted names from the mirrored registries")?;
        let data_dir = args.data_dir.clone();
        let policy = args.ca.policy().context("invalid CA flags")?;
        let stats = Arc::clone(&ca_stats);
        // The CA containerd trusts is kept; a next one waits beside it when needed (continuity).
        let cas = tokio::task::spawn_blocking(move || {
            CaSet::open(&data_dir, permitted, policy, stats).map(Arc::new)
        })
        .await
        .context("CA task failed")?
        .context("cannot load or create the node CA")?;
        admin_cas = Some(Arc::clone(&cas));
        let mut watch = TrustWatch::new(
            Arc::clone(&cas),
            config.locator.clone(),
            config.cgroup2_mount.clone(),
        );
        // Checked once before serving, so an installed next CA is used from the first pull (and
        // containerd's trust bundle holds a CA minted just now).
        let watch = tokio::task::spawn_blocking(move || {
            watch.poll();
            watch
        })
        .await
        .context("CA trust check failed")?;
        tasks.spawn(watch.run(config.poll_interval, stop.clone()));
        let handler = RegistryHandler {
            registry: Arc::clone(&registry),
            tls: TlsTerminator::new(cas).context("cannot build the TLS terminator")?,
            passthrough: Arc::new(UpstreamPassthrough(upstream_client.clone())),
            upstream: upstream_client,
            shutdown: stop.clone(),
            uncovered: intercept::SpliceHandler {
                timeouts: intercept::splice::SpliceTimeouts {
                    connect: config.connect_timeout,
                    idle: config.splice_idle_timeout,
                    write: config.write_timeout,
                },
            },
            ca_stats,
            write_timeout: config.write_timeout,
            intercept_stats: Arc::clone(&intercept_stats),
        };
        let stop = stop.clone();
        let grace = args.shutdown_grace;
        tasks.spawn(
            async move {
                let handler = Arc::new(handler);
                if let Err(error) = intercept::run_with_stats(config, handler, intercept_stats, stop.clone(), grace).await {
                    // Fail open: without interception containerd talks to registries directly;
                    // the registry API keeps serving peers.
                    tracing::error!(%error, "transparent interception stopped; containerd now pulls directly");
                }
            }
            .instrument(tracing::info_span!("intercept")),
        );
    }

    let admin = crate::admin::AdminState {
        readiness: Some(Arc::new(StoreReadiness::new(Arc::clone(&store)))),
        intercept: admin_intercept,
        cas: admin_cas,
        router: Some(admin_router),
        recent: Some(recent),
    };
    // The status page is for people; a daemon that cannot offer it still serves pulls.
    match tokio::net::TcpListener::bind(admin_addr).await {
        Ok(listener) => {
            tracing::info!(addr = %admin_addr, "admin endpoint listening (status page)");
            tasks.spawn(
                crate::admin::serve(listener, Arc::new(admin), stop.clone())
                    .instrument(tracing::info_span!("admin")),
            );
        }
        Err(error) => {
            tracing::error!(addr = %admin_addr, %error, "cannot listen for the admin endpoint; no status page")
        }
    }

    shutdown.await;
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    stop.cancel();
    tasks.close();
    match tokio::time::timeout(args.shutdown_grace, tasks.wait()).await {
        Ok(()) => tracing::info!("shut down gracefully"),
        Err(_) => {
            tracing::warn!(grace = ?args.shutdown_grace, "did not drain in time; exiting anyway")
        }
    }
    Ok(())
}

/// Peer blobs on their way to containerd: big whole ones streamed with containerd's partial copy
/// discarded if they fail, the rest verified whole (in memory or the disk spool) before
/// containerd sees a byte (`body::buffered`).
fn buffered(
    peers: Arc<dyn Source>,
    args: &RunArgs,
    ingests: &Arc<dyn Ingests>,
) -> anyhow::Result<Arc<dyn Source>> {
    let buffered = Buffered::new(peers, &args.buffer, &args.data_dir)
        .context("cannot prepare the peer blob spool")?;
    Ok(Arc::new(buffered.with_ingests(Arc::clone(ingests))))
}

/// The cold-burst claims this node coordinates, when it coordinates any (`--burst-wait` > 0).
type CoordinatedClaims = Option<Arc<Claims>>;

/// The upstream as the serve policy asks it: one shared fetch per blob on this node, served to
/// peers while in flight (`body::shared`), behind the cold-burst gate that asks a blob's chosen
/// fetcher first (`peers::burst`).
fn shared_upstream(
    args: &RunArgs,
    upstream: Arc<dyn Source>,
    (router, me): (&Arc<dyn Router>, String),
    fetch_config: &crate::peers::FetchConfig,
    transparent: bool,
    peer_auth: &crate::membership::PeerAuth,
    (access, backoff, ingests): (&Arc<Access>, &Arc<Backoff>, &Arc<dyn Ingests>),
) -> anyhow::Result<(Arc<dyn Source>, CoordinatedClaims)> {
    use crate::{
        body::{shared::SharedFetch, spool::Spool},
        peers::burst::{BurstGate, HolderRouter},
    };
    let spool = match args.buffer.shared_fetch_budget {
        0 => None,
        budget => Some(
            Spool::open(&args.buffer.spool_dir(&args.data_dir), budget)
                .context("cannot prepare the shared fetch spool")?,
        ),
    };
    let shared = SharedFetch::new(Arc::clone(&upstream), spool).with_announce(Arc::clone(router));
    let in_flight = shared.in_flight();
    let shared: Arc<dyn Source> = Arc::new(shared);
    if args.burst.burst_wait.is_zero() {
        return Ok((shared, None));
    }
    let holders = Arc::new(HolderRouter::new(Arc::clone(router)));
    // A holder that stops mid-blob: the rest from upstream (transparent mode only).
    let client = PeerSource::new(
        Arc::clone(&holders) as Arc<dyn Router>,
        fetch_config.clone(),
        transparent.then(|| Arc::clone(&shared)),
        peer_auth.clone(),
    );
    let claimer: Arc<dyn Claimer> = Arc::new(client.clone());
    // Bytes from a holder are peer bytes, and guarded as such.
    let verified = buffered(Arc::new(client), args, ingests)?;
    // A holder's copy is a peer's copy: private content only once upstream confirmed this
    // client may read it, public content only when it cannot answer.
    let verified: Arc<dyn Source> = Arc::new(
        ConfirmedPeers::new(
            verified,
            transparent.then_some(upstream),
            Arc::clone(access),
        )
        .with_backoff(Arc::clone(backoff)),
    );
    let claims = Arc::new(Claims::new(me, in_flight.clone()));
    let gate = BurstGate::new(
        shared,
        in_flight,
        (verified, holders),
        (Arc::clone(&claims), claimer),
        args.burst.burst_wait,
    );
    let gate = match transparent {
        true => gate,
        false => gate.for_mirror(Arc::clone(ingests)),
    };
    Ok((Arc::new(gate), Some(claims)))
}

/// Connects to containerd, retrying with backoff: the daemon may start before containerd does.
async fn connect_store(args: &RunArgs) -> ContainerdStore {
    let mut backoff = Duration::from_millis(200);
    loop {
        match ContainerdStore::connect(&args.containerd).await {
            Ok(store) => return store,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot reach containerd");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
