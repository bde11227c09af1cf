//! Long-running processes started "in a node": spawning, logs, signals, restarts, PID tracking.
//!
//! Every process the rig starts is recorded in one [`ProcessTable`], which teardown walks: TERM
//! to all at once, wait, KILL what is left. Processes are plain `std::process::Child`ren so that
//! teardown also works synchronously inside `Drop`.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{cgroup, net};

/// How long [`Process::stop`] waits after SIGTERM before it sends SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How a process enters its node's network namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetnsMode {
    /// Like `ip netns exec NS cmd`: the namespace's `/etc/netns/NS/*` files are bind-mounted over
    /// `/etc` (so `/etc/hosts` knows the registry's name), but `/sys` is remounted for the
    /// namespace, which hides the cgroup2 mount. Right for containerd, `ctr`, curl and the like.
    #[default]
    IpNetnsExec,
    /// Like `nsenter --net=/run/netns/NS cmd`: only the network namespace changes, so `/sys` (and
    /// cgroup2) stay visible, as the eBPF-attaching daemon needs. The process also gets a private
    /// mount namespace in which the node's hosts file is bind-mounted over `/etc/hosts`, so
    /// registry names resolve exactly as they do for containerd.
    Nsenter,
}

/// Signals the rig can send to its processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: graceful shutdown.
    Term,
    /// SIGKILL: immediate death (a crashed peer).
    Kill,
    /// SIGINT.
    Int,
    /// SIGHUP.
    Hup,
    /// SIGSTOP: freeze the process (a hung peer whose sockets stay open).
    Stop,
    /// SIGCONT: resume after [`Signal::Stop`].
    Cont,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// What to run: program, arguments, environment and placement. Build with the chained setters.
///
/// The environment is *not* inherited: the process gets `PATH` plus exactly what is set here,
/// so tests do not depend on the shell they were started from (which, for example, sets
/// `SSL_CERT_FILE` on the project's machines).
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    name: String,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    mode: NetnsMode,
    cgroup: Option<String>,
    separate_stdout: bool,
}

impl ProcessSpec {
    /// A process called `name` (used for its log file, `<scratch>/logs/<name>.log`) running `program`.
    pub fn new(name: impl Into<String>, program: impl AsRef<OsStr>) -> Self {
        Self {
            name: name.into(),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            mode: NetnsMode::default(),
            cgroup: None,
            separate_stdout: false,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Sets (or replaces) one environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        set_env(&mut self.env, key.as_ref(), value.as_ref());
        self
    }

    /// Sets (or replaces) several environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            set_env(&mut self.env, key.as_ref(), value.as_ref());
        }
        self
    }

    /// Chooses how the process enters the namespace (default [`NetnsMode::IpNetnsExec`]).
    pub fn mode(mut self, mode: NetnsMode) -> Self {
        self.mode = mode;
        self
    }

    /// Starts the process inside cgroup2 directory `<cg2>/<prefix>/<name>` (created on demand,
    /// removed at teardown). Without this it stays in the test's own cgroup.
    pub fn cgroup(mut self, name: impl Into<String>) -> Self {
        self.cgroup = Some(name.into());
        self
    }

    /// Sends stdout to `<scratch>/logs/<name>.stdout` instead of mixing it into the log.
    pub fn separate_stdout(mut self) -> Self {
        self.separate_stdout = true;
        self
    }

    /// The name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_env(env: &mut Vec<(OsString, OsString)>, key: &OsStr, value: &OsStr) {
    env.retain(|(existing, _)| existing != key);
    env.push((key.to_owned(), value.to_owned()));
}

/// A handle to a process started by the rig (cheap to clone; all clones control the same process).
///
/// Teardown stops it whatever happens to the handles.
#[derive(Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    netns: Option<String>,
    log_path: PathBuf,
    stdout_path: Option<PathBuf>,
    cgroup_root: PathBuf,
    state: Mutex<State>,
}

struct State {
    spec: ProcessSpec,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
}

impl Process {
    /// The unique name (the spec's name, with `-2`, `-3`.. appended if it was taken).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The network namespace it runs in (`None`: the host's).
    pub fn netns(&self) -> Option<&str> {
        self.inner.netns.as_deref()
    }

    /// The PID while running. The wrappers (`sh`, `ip netns exec`, `nsenter`) all `exec`, so this
    /// is the program's own PID.
    pub fn pid(&self) -> Option<u32> {
        let mut state = self.inner.lock();
        state.refresh();
        state.child.as_ref().map(Child::id)
    }

    /// Whether it is still running (reaps it if it has exited).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// The exit status of the last run, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut state = self.inner.lock();
        state.refresh();
        state.last_exit
    }

    /// Its log file (stderr, and stdout unless [`ProcessSpec::separate_stdout`] was set).
    /// Appended to across restarts; the rig writes a `--- rig:` line before every start.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Where stdout goes when [`ProcessSpec::separate_stdout`] was set.
    pub fn stdout_path(&self) -> Option<&Path> {
        self.inner.stdout_path.as_deref()
    }

    /// The log so far (lossy UTF-8; empty if unreadable).
    pub fn read_log(&self) -> String {
        std::fs::read(&self.inner.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.read_log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The cgroup2 directory it is started in, if any.
    pub fn cgroup_dir(&self) -> Option<PathBuf> {
        let state = self.inner.lock();
        state
            .spec
            .cgroup
            .as_ref()
            .map(|name| self.inner.cgroup_root.join(name))
    }

    /// Sends a signal; an error if the process is not running.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut state = self.inner.lock();
        state.refresh();
        let Some(child) = state.child.as_ref() else {
            bail!("process {} is not running", self.inner.name);
        };
        send_signal(child.id(), signal)
            .with_context(|| format!("sending {signal:?} to {}", self.inner.name))
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running then.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let mut state = self.inner.lock();
                state.refresh();
                if state.child.is_none() {
                    return Ok(state.last_exit);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status (or `None` if it was
    /// never started). Stopping a stopped process is a no-op.
    pub async fn stop(&self, grace: Duration) -> Result<Option<ExitStatus>> {
        if !self.is_running() {
            return Ok(self.exit_status());
        }
        // A frozen (SIGSTOP) process would not act on TERM until continued.
        for signal in [Signal::Term, Signal::Cont] {
            self.signal(signal).ok();
        }
        if let Some(status) = self.wait_exit(grace).await? {
            return Ok(Some(status));
        }
        self.kill().await
    }

    /// SIGKILL and reap (a crash, as far as its peers can tell).
    pub async fn kill(&self) -> Result<Option<ExitStatus>> {
        if !self.is_running() {
            return Ok(self.exit_status());
        }
        self.signal(Signal::Kill).ok();
        match self.wait_exit(Duration::from_secs(10)).await? {
            Some(status) => Ok(Some(status)),
            None => bail!("process {} survived SIGKILL for 10 s", self.inner.name),
        }
    }

    /// Starts it again with its (possibly updated) spec; an error if it is running.
    pub async fn start(&self) -> Result<()> {
        self.inner.launch()
    }

    /// [`stop`](Self::stop) (with [`DEFAULT_STOP_GRACE`]) and [`start`](Self::start) again.
    pub async fn restart(&self) -> Result<()> {
        self.stop(DEFAULT_STOP_GRACE).await?;
        self.start().await
    }

    /// Sets an environment variable for the next (re)start.
    pub fn set_env(&self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) {
        let mut state = self.inner.lock();
        set_env(&mut state.spec.env, key.as_ref(), value.as_ref());
    }

    /// Removes an environment variable for the next (re)start.
    pub fn remove_env(&self, key: impl AsRef<OsStr>) {
        let mut state = self.inner.lock();
        state
            .spec
            .env
            .retain(|(existing, _)| existing != key.as_ref());
    }

    /// The full command line the next start runs (wrappers included), for debugging.
    pub fn command_line(&self) -> String {
        let state = self.inner.lock();
        let argv = self.inner.argv(&state.spec);
        argv.iter()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.inner.name)
            .field("netns", &self.inner.netns)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (it only holds data), so
        // a poisoned lock is still usable; teardown in particular must go on after a panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wrapper + program argv: `[sh -c 'join cgroup; exec "$@"'] (ip netns exec | nsenter ..) prog args`.
    fn argv(&self, spec: &ProcessSpec) -> Vec<OsString> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(cgroup) = &spec.cgroup {
            // Joining the cgroup before exec makes every descendant (and every socket it opens)
            // belong to it from the first instruction, with no `unsafe` pre_exec hook.
            let procs = self.cgroup_root.join(cgroup).join("cgroup.procs");
            argv.extend(["sh", "-c", r#"echo $$ > "$0" && exec "$@""#].map(OsString::from));
            argv.push(procs.into_os_string());
        }
        if let Some(netns) = &self.netns {
            match spec.mode {
                NetnsMode::IpNetnsExec => {
                    argv.extend(["ip", "netns", "exec"].map(OsString::from));
                    argv.push(netns.into());
                }
                NetnsMode::Nsenter => {
                    let handle = Path::new(net::NETNS_RUN_DIR).join(netns);
                    let mut net_arg = OsString::from("--net=");
                    net_arg.push(handle);
                    argv.push("nsenter".into());
                    argv.push(net_arg);
                    argv.push("--".into());
                    let hosts = Path::new(net::NETNS_ETC_DIR).join(netns).join("hosts");
                    if hosts.exists() {
                        argv.extend(
                            [
                                "unshare",
                                "--mount",
                                "--propagation",
                                "private",
                                "--",
                                "sh",
                                "-c",
                                r#"mount --bind "$0" /etc/hosts && exec "$@""#,
                            ]
                            .map(OsString::from),
                        );
                        argv.push(hosts.into_os_string());
                    }
                }
            }
        }
        argv.push(spec.program.clone());
        argv.extend(spec.args.iter().cloned());
        argv
    }

    fn launch(&self) -> Result<()> {
        let mut state = self.lock();
        state.refresh();
        if state.child.is_some() {
            bail!("process {} is already running", self.name);
        }
        if let Some(cgroup) = &state.spec.cgroup {
            cgroup::create(&self.cgroup_root.join(cgroup))?;
        }
        let argv = self.argv(&state.spec);
        let mut log = open_append(&self.log_path)?;
        writeln!(
            log,
            "--- rig: starting {}",
            argv.iter()
                .map(|arg| arg.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )
        .with_context(|| format!("writing {}", self.log_path.display()))?;
        let stdout = match &self.stdout_path {
            Some(path) => open_append(path)?,
            None => log.try_clone().context("duplicating a log file handle")?,
        };
        let (program, args) = argv.split_first().context("empty command line")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(default_path),
            )
            .envs(state.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", self.name))?;
        tracing::debug!(name = %self.name, pid = child.id(), "process started");
        state.child = Some(child);
        state.last_exit = None;
        Ok(())
    }
}

impl State {
    /// Reaps the child if it has exited, remembering its status.
    fn refresh(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.last_exit = Some(status);
            self.child = None;
        }
    }
}

fn default_path() -> OsString {
    OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Sends `signal` to `pid`. Callers make sure the PID is theirs: rig children are signalled only
/// before they are reaped (so the PID cannot have been recycled), and `cleanup` signals only
/// processes whose command line or cgroup names the rig.
pub(crate) fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // kill(2) treats 0 and negative numbers as process groups; never signal one by accident.
    if pid <= 0 {
        bail!("refusing to signal pid {pid}");
    }
    // SAFETY: kill(2) takes two plain integers and touches no memory of ours; it cannot violate
    // memory safety whatever the arguments are.
    let result = unsafe { libc::kill(pid, signal.number()) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().into())
    }
}

/// Every process the rig started; teardown stops them all.
pub(crate) struct ProcessTable {
    logs_dir: PathBuf,
    cgroup_root: PathBuf,
    entries: Mutex<Vec<Arc<Inner>>>,
}

impl std::fmt::Debug for ProcessTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessTable")
            .field("logs_dir", &self.logs_dir)
            .field("processes", &self.lock().len())
            .finish()
    }
}

impl ProcessTable {
    /// `logs_dir` receives the log files; `cgroup_root` is the rig's cgroup2 directory, parent of
    /// every [`ProcessSpec::cgroup`].
    pub(crate) fn new(logs_dir: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            logs_dir,
            cgroup_root,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Records and starts a process in `netns` (or the host namespace for `None`).
    pub(crate) fn spawn(&self, spec: ProcessSpec, netns: Option<String>) -> Result<Process> {
        let inner = {
            let mut entries = self.lock();
            let name = unique_name(&spec.name, entries.iter().map(|entry| entry.name.as_str()));
            let log_path = self.logs_dir.join(format!("{name}.log"));
            let stdout_path = spec
                .separate_stdout
                .then(|| self.logs_dir.join(format!("{name}.stdout")));
            let inner = Arc::new(Inner {
                name,
                netns,
                log_path,
                stdout_path,
                cgroup_root: self.cgroup_root.clone(),
                state: Mutex::new(State {
                    spec,
                    child: None,
                    last_exit: None,
                }),
            });
            entries.push(Arc::clone(&inner));
            inner
        };
        inner.launch()?;
        Ok(Process { inner })
    }

    /// TERM every running process at once, wait up to `grace`, KILL the rest, reap everything.
    /// Returns a description of anything that would not die.
    pub(crate) fn stop_all(&self, grace: Duration) -> Vec<String> {
        let entries: Vec<Arc<Inner>> = self.lock().clone();
        let mut running: Vec<&Arc<Inner>> = entries
            .iter()
            .filter(|inner| {
                let mut state = inner.lock();
                state.refresh();
                state.child.is_some()
            })
            .collect();
        for signal in [Signal::Term, Signal::Cont] {
            for inner in &running {
                if let Some(child) = inner.lock().child.as_ref() {
                    send_signal(child.id(), signal).ok();
                }
            }
        }
        let mut problems = Vec::new();
        for (signal, patience) in [(None, grace), (Some(Signal::Kill), Duration::from_secs(5))] {
            if let Some(signal) = signal {
                for inner in &running {
                    if let Some(child) = inner.lock().child.as_ref() {
                        tracing::warn!(name = %inner.name, pid = child.id(), "process ignored SIGTERM; killing it");
                        send_signal(child.id(), signal).ok();
                    }
                }
            }
            let deadline = Instant::now() + patience;
            loop {
                running.retain(|inner| {
                    let mut state = inner.lock();
                    state.refresh();
                    state.child.is_some()
                });
                if running.is_empty() || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if running.is_empty() {
                break;
            }
        }
        for inner in running {
            problems.push(format!("process {} survived SIGKILL", inner.name));
        }
        problems
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Inner>>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unique_name<'a>(wanted: &str, taken: impl Iterator<Item = &'a str> + Clone) -> String {
    let is_taken = |candidate: &str| taken.clone().any(|name| name == candidate);
    if !is_taken(wanted) {
        return wanted.to_owned();
    }
    (2..)
        .map(|n| format!("{wanted}-{n}"))
        .find(|candidate| !is_taken(candidate))
        .unwrap_or_else(|| wanted.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> (ProcessTable, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("spegel-proc-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        (ProcessTable::new(dir.clone(), dir.join("cg")), dir)
    }

    /// The shell prints before it execs `sleep`; wait for that so signals do not race it.
    async fn wait_for_log(process: &Process, needle: &str) {
        for _ in 0..500 {
            if process.read_log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{needle:?} never appeared in {}", process.read_log());
    }

    #[test]
    fn refuses_to_signal_process_groups() {
        assert!(send_signal(0, Signal::Cont).is_err());
        assert!(send_signal(u32::MAX, Signal::Cont).is_err());
    }

    #[test]
    fn unique_names() {
        let taken = ["a", "a-2", "b"];
        assert_eq!(unique_name("a", taken.iter().copied()), "a-3");
        assert_eq!(unique_name("c", taken.iter().copied()), "c");
    }

    #[test]
    fn argv_wraps_namespace_and_cgroup() {
        let inner = Inner {
            name: "d".into(),
            netns: Some("spx-n1".into()),
            log_path: "/dev/null".into(),
            stdout_path: None,
            cgroup_root: "/cg/spx".into(),
            state: Mutex::new(State {
                spec: ProcessSpec::new("d", "prog"),
                child: None,
                last_exit: None,
            }),
        };
        let spec = ProcessSpec::new("d", "prog").arg("--x").cgroup("n1");
        let argv: Vec<String> = inner
            .argv(&spec)
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        assert_eq!(argv[0], "sh");
        assert_eq!(argv[3], "/cg/spx/n1/cgroup.procs");
        assert_eq!(&argv[4..], ["ip", "netns", "exec", "spx-n1", "prog", "--x"]);
        let spec = ProcessSpec::new("d", "prog").mode(NetnsMode::Nsenter);
        let argv: Vec<String> = inner
            .argv(&spec)
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        // No /etc/netns/spx-n1/hosts on the test machine: no mount namespace wrapper.
        assert_eq!(argv, ["nsenter", "--net=/run/netns/spx-n1", "--", "prog"]);
    }

    #[tokio::test]
    async fn start_stop_restart_and_logs() {
        let (table, dir) = table("lifecycle");
        let spec = ProcessSpec::new("sleeper", "sh")
            .args(["-c", "echo \"hello $GREETING\"; exec sleep 30"])
            .env("GREETING", "rig");
        let process = table.spawn(spec, None).unwrap();
        wait_for_log(&process, "hello rig").await;
        let first_pid = process.pid().unwrap();
        assert!(process.start().await.is_err(), "starting twice must fail");
        process.restart().await.unwrap();
        let second_pid = process.pid().unwrap();
        assert_ne!(first_pid, second_pid);
        process.set_env("GREETING", "again");
        let status = process.stop(Duration::from_secs(5)).await.unwrap().unwrap();
        assert!(!status.success(), "terminated by a signal");
        assert!(!process.is_running());
        process.start().await.unwrap();
        wait_for_log(&process, "hello again").await;
        process.kill().await.unwrap();
        let log = process.read_log();
        assert_eq!(log.matches("--- rig: starting").count(), 3, "{log}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stop_all_terminates_everything() {
        let (table, dir) = table("stopall");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = table
            .spawn(ProcessSpec::new("a", "sleep").arg("30"), None)
            .unwrap();
        // Ignores TERM: must be killed.
        let b = table
            .spawn(
                ProcessSpec::new("b", "sh")
                    .args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]),
                None,
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let problems = table.stop_all(Duration::from_millis(300));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!a.is_running());
        assert!(!b.is_running());
        runtime.block_on(async {
            assert!(a.wait_exit(Duration::ZERO).await.unwrap().is_some());
        });
        std::fs::remove_dir_all(dir).unwrap();
    }
}
