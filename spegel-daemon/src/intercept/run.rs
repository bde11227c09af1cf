//! The interception lifecycle: listen, load the eBPF programs, keep them attached to
//! containerd's current cgroup, serve until shutdown, then detach and drain. Meanwhile the
//! listener is probed: when it is wedged the programs are detached (containerd connects
//! directly) until it has been healthy again for a while. A cgroup that contains the daemon's
//! own is never attached to: interception stops with that error (see [`guard`](super::guard)).
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::intercept::{
    InterceptConfig, InterceptError, InterceptStats, Interceptor, Listener, MirroredHandler,
    bypass::{Bypass, SystemResolver},
    cgroup::CgroupFinder,
    ebpf::{EbpfError, RedirectConfig, Redirector},
    guard::{GuardError, OwnCgroup},
    health::{Action, HealthWatch, Sample},
    probe::probe,
};

/// Runs transparent interception until `shutdown`: binds the listener, loads the eBPF programs,
/// attaches them to containerd's cgroup (and re-attaches whenever containerd moves to another
/// cgroup or its cgroup is recreated), and serves intercepted connections. A listener that is
/// wedged for the wedge timeout is bypassed: the programs are detached until it has been
/// healthy for the recovery time. On shutdown the programs are detached first, so new connects
/// go direct while open ones drain for `grace`.
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
    let mut finder = CgroupFinder::new(config.locator.clone(), config.cgroup2_mount.clone())?;
    // Without its own cgroup the daemon can neither be exempted nor tell a cgroup that contains
    // it: no interception.
    let own = OwnCgroup::current(finder.mount()).map_err(EbpfError::from)?;
    let mut redirector = Redirector::load(&RedirectConfig {
        listener_port: listener.port(),
        ipv6_listener: listener.has_ipv6(),
        ports: config.redirect_ports.clone(),
        ips: config.redirect_ips.clone(),
        own_cgroup: own.id,
    })?;
    let mut watcher = CgroupWatcher::new(own);
    #[cfg(feature = "fault-injection")]
    {
        watcher.attach_containing = config.attach_containing_cgroup;
    }
    // A first attach that fails for lack of privileges or a verifier error, or is refused (the
    // cgroup contains the daemon), will not get better: report it. A cgroup that vanished
    // between finding and attaching is retried like any other.
    match watcher.check(&mut finder, &mut redirector) {
        Ok(()) => {}
        Err(error @ EbpfError::Cgroup { .. }) => {
            tracing::warn!(%error, "cannot attach the eBPF redirect yet; retrying");
        }
        Err(error) => return Err(error.into()),
    }

    stats.set_attached(redirector.attached().map(|cgroup| cgroup.path.as_path()));

    let mut interceptor = Interceptor::new(&config, Arc::new(redirector.orig_dst_table()), handler)
        .with_stats(stats.clone());
    if !config.bypass_ttl.is_zero() {
        interceptor = interceptor.with_bypass(Arc::new(Bypass::new(
            Arc::new(redirector.pass_map()),
            config.bypass_ttl,
            &config.mirrored,
            Arc::new(SystemResolver),
        )));
    }
    let interceptor = Arc::new(interceptor);
    tracing::info!(
        port = listener.port(),
        ipv6 = listener.has_ipv6(),
        ports = ?config.redirect_ports,
        ips = ?config.redirect_ips,
        mirrored = config.mirrored.entries().len(),
        bypass_ttl = ?config.bypass_ttl,
        "transparent interception listening"
    );
    let serve_stop = CancellationToken::new();
    let (samples_tx, mut samples) = mpsc::channel(4);
    let prober = tokio::spawn(probe_loop(
        interceptor.clone(),
        listener.addrs(),
        config.probe_interval,
        samples_tx,
        serve_stop.clone(),
    ));
    let server = tokio::spawn(interceptor.serve(listener, serve_stop.clone(), grace));
    let mut health = HealthWatch::new(config.health);

    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tick.tick() => {
                // A bypassed listener stays bypassed until the health watch restores it.
                if !health.bypassed()
                    && let Err(error) = watcher.check(&mut finder, &mut redirector)
                {
                    if is_refusal(&error) {
                        break Err(error);
                    }
                    tracing::warn!(%error, "cannot attach the eBPF redirect; retrying");
                }
            }
            Some((at, sample)) = samples.recv() => {
                if !sample.accepted {
                    stats.probe_failures.fetch_add(1, Ordering::Relaxed);
                }
                match health.observe(at, sample) {
                    Some(Action::Bypass(trouble)) => {
                        stats.wedges.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            %trouble,
                            free_slots = sample.free_slots,
                            wedge_timeout = ?config.health.wedge_timeout,
                            "interception listener wedged: eBPF redirect detached, containerd connects directly until it recovers"
                        );
                        redirector.detach();
                    }
                    Some(Action::Restore) => {
                        tracing::info!(
                            recover_after = ?config.health.recover_after,
                            "interception listener healthy again: re-attaching the eBPF redirect"
                        );
                        if let Err(error) = watcher.check(&mut finder, &mut redirector) {
                            if is_refusal(&error) {
                                break Err(error);
                            }
                            tracing::warn!(%error, "cannot attach the eBPF redirect; retrying");
                        }
                    }
                    None => {}
                }
            }
        }
        stats.set_attached(redirector.attached().map(|cgroup| cgroup.path.as_path()));
    };
    drop(redirector); // detach: from here on connects go direct
    stats.set_attached(None);
    serve_stop.cancel();
    let _ = prober.await;
    let _ = server.await;
    outcome.map_err(Into::into)
}

/// Whether `error` is the guard's refusal of a cgroup that contains the daemon: not retried.
fn is_refusal(error: &EbpfError) -> bool {
    matches!(error, EbpfError::Guard(GuardError::ContainsDaemon { .. }))
}

/// Probes every listener address each `interval` (each probe must be accepted within the
/// interval) and sends a [`Sample`], stamped with the time its probes started, until `stop`.
pub async fn probe_loop(
    interceptor: Arc<Interceptor>,
    targets: Vec<SocketAddr>,
    interval: Duration,
    samples: mpsc::Sender<(Instant, Sample)>,
    stop: CancellationToken,
) {
    let book = interceptor.probes();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let at = Instant::now();
        let probes = targets.iter().map(|&target| probe(&book, target, interval));
        let probed = tokio::select! {
            _ = stop.cancelled() => return,
            probed = futures::future::join_all(probes) => probed,
        };
        for (target, outcome) in targets.iter().zip(&probed) {
            if !outcome.is_accepted() {
                tracing::debug!(%target, ?outcome, "interception listener probe failed");
            }
        }
        let sample = Sample {
            accepted: probed.iter().all(|p| p.is_accepted()),
            free_slots: interceptor.free_slots(),
        };
        if samples.send((at, sample)).await.is_err() {
            return;
        }
    }
}

/// Keeps the programs attached to containerd's current cgroup, never to one that contains the
/// daemon's own.
#[derive(Debug)]
pub struct CgroupWatcher {
    /// The last "cannot find" message, so a lasting condition is logged once.
    last_error: Option<String>,
    /// The daemon's own cgroup, as the programs were last told.
    own: OwnCgroup,
    /// TEST ONLY: attach even to a cgroup that contains the daemon's (warning once).
    #[cfg(feature = "fault-injection")]
    pub attach_containing: bool,
    #[cfg(feature = "fault-injection")]
    warned_containing: bool,
}

impl CgroupWatcher {
    /// A watcher for a daemon in cgroup `own` (what the programs were loaded with).
    pub fn new(own: OwnCgroup) -> Self {
        Self {
            last_error: None,
            own,
            #[cfg(feature = "fault-injection")]
            attach_containing: false,
            #[cfg(feature = "fault-injection")]
            warned_containing: false,
        }
    }

    /// Finds containerd's cgroup and attaches there if it is not where the programs are. Not
    /// finding it is logged (once per distinct reason) and retried later; a cgroup that
    /// contains the daemon's own is refused ([`GuardError::ContainsDaemon`]); failing to attach
    /// is an error.
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
        // Checked on every poll: the daemon, too, may have been moved.
        let own = self.own.again(finder.mount())?;
        if own != self.own {
            tracing::info!(
                cgroup = %own.path.display(),
                previous = %self.own.path.display(),
                "this daemon's own cgroup changed"
            );
            redirector.set_own_cgroup(own.id)?;
            self.own = own;
        }
        if let Err(refusal) = self.own.check_target(&found) {
            self.allow_containing(refusal)?;
        }
        if redirector.attached() == Some(&found) {
            return Ok(());
        }
        redirector.attach(&found)
    }

    /// The guard's refusal, unless a test switch turns it into a warning.
    fn allow_containing(&mut self, refusal: GuardError) -> Result<(), GuardError> {
        #[cfg(feature = "fault-injection")]
        if self.attach_containing {
            if !std::mem::replace(&mut self.warned_containing, true) {
                tracing::warn!(
                    error = %refusal,
                    "TEST FAULTS ARE ON: attaching although the cgroup contains this daemon; only the programs' exemption of its own cgroup keeps its connects direct"
                );
            }
            return Ok(());
        }
        Err(refusal)
    }
}
