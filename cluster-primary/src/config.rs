//! How a primary is set up: the builder.

use std::ffi::OsString;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_ipc::Limits;
use cluster_ipc::proto::ListenMode;

use crate::{Error, Signal};

/// The default credit window: how many connections a worker may have handed to it and not
/// yet acknowledged. 1 is Node's protocol; a few more let the handoff pipeline.
pub const DEFAULT_WINDOW: u32 = 8;
/// The default time a worker has to say Hello after it was spawned.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time workers have to finish their connections when the cluster stops, before
/// they are killed (Gunicorn's `graceful_timeout`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest credit window: far more than any worker needs in flight, small enough that a
/// misconfiguration cannot make the primary hold an unbounded number of connections per
/// worker.
pub const MAX_WINDOW: u32 = 65_536;
/// The default time a replacement started by a roll-out or a recycling has to listen on
/// every address of the worker it replaces.
pub const DEFAULT_READINESS_TIMEOUT: Duration = Duration::from_secs(30);
/// The default hang timeout: a worker that holds handed connections without acknowledging
/// any, or whose serving path sends no heartbeat, for this long is hung (Gunicorn's
/// `timeout`).
pub const DEFAULT_HANG_TIMEOUT: Duration = Duration::from_secs(30);
/// The default crash-loop guard: this many worker failures ...
pub const DEFAULT_CRASH_LOOP_FAILURES: u32 = 5;
/// ... within this long stop the cluster.
pub const DEFAULT_CRASH_LOOP_WITHIN: Duration = Duration::from_secs(10);
/// The default listen backlog of the primary's sockets. While every worker is saturated the
/// primary stops accepting and this backlog holds new clients.
pub const DEFAULT_BACKLOG: u32 = 1024;

/// How a listener's connections are shared out among its workers, in round-robin mode (the
/// primary accepts and hands connections down). Either way a worker holds at most the credit
/// window of connections it has not acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Policy {
    /// Workers take connections in turn (Node's `SCHED_RR`, with a credit window).
    #[default]
    RoundRobin,
    /// The worker with the fewest open connections takes the next one. Workers report their
    /// count (the primary asks for it in the handshake), so long-lived connections do not pile
    /// up on one worker.
    LeastConnections,
}

/// Whether a worker that exits without the primary asking it to is replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Respawn {
    /// Always (the default): a crash, a kill from outside, or a worker that disconnected by
    /// itself.
    #[default]
    Always,
    /// Only when it failed: a non-zero exit code, a crash signal (SIGSEGV, SIGABRT, ...), or
    /// the primary killed it for a fault (hung, no Hello in time, a protocol violation). A
    /// worker that exits with code 0 by itself leaves its slot empty.
    OnFailure,
    /// Never: the cluster shrinks as workers exit, and stops when the last one has.
    Never,
}

/// How a rolling restart replaces workers: `surge` replacements may start before the workers
/// they replace leave, and `unavailable` workers may leave before their replacements are
/// ready (Kubernetes' `maxSurge` and `maxUnavailable`). The default, one surge and none
/// unavailable, replaces one worker at a time and never serves with fewer workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Replacements started ahead of the workers they replace, at once.
    pub surge: u32,
    /// Workers asked to leave before their replacements are ready, at once.
    pub unavailable: u32,
}

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            surge: 1,
            unavailable: 0,
        }
    }
}

/// When a worker is replaced to keep it fresh: after a number of connections (with a jitter,
/// so workers do not all go at once) or past a memory limit. The replacement starts first;
/// the old worker drains once it is ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recycle {
    /// Replace a worker after it took this many connections (plus its jitter).
    pub after_connections: Option<u64>,
    /// Up to this many more connections, different for each worker.
    pub jitter: u64,
    /// Replace a worker whose unique memory (USS: private pages, so that pages shared
    /// copy-on-write with other processes do not count) passes this many bytes.
    pub max_memory: Option<u64>,
}

/// Which program a worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Program {
    /// The primary's own executable, resolved once when the primary is built.
    CurrentExe,
    /// Another program.
    Path(PathBuf),
}

/// Everything a primary needs to know, settled by [`Builder::build`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) envs: Vec<(OsString, Option<OsString>)>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) mode: ListenMode,
    pub(crate) policy: Policy,
    pub(crate) window: NonZeroU32,
    pub(crate) backlog: u32,
    pub(crate) start_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) respawn: Respawn,
    pub(crate) crash_loop: (u32, Duration),
    pub(crate) readiness_timeout: Duration,
    pub(crate) hang_timeout: Option<Duration>,
    pub(crate) rollout: Rollout,
    pub(crate) recycle: Recycle,
    pub(crate) parent_death_signal: Option<Signal>,
    pub(crate) handle_signals: bool,
    pub(crate) control_socket: Option<PathBuf>,
    /// The limits of every worker's control channel (the message limit is announced to the
    /// worker in `Welcome`).
    pub(crate) control_limits: Limits,
}

/// Sets up a [`Primary`](crate::Primary).
///
/// ```
/// use std::time::Duration;
/// use cluster_primary::{Builder, ListenMode};
///
/// let primary = Builder::new()
///     .workers(4)
///     .mode(ListenMode::RoundRobin)
///     .window(8)
///     .shutdown_timeout(Duration::from_secs(10))
///     .build()?;
/// # drop(primary);
/// # Ok::<(), cluster_primary::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    workers: Option<usize>,
    program: Program,
    args: Option<Vec<OsString>>,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    mode: ListenMode,
    policy: Policy,
    window: u32,
    backlog: u32,
    start_timeout: Duration,
    shutdown_timeout: Duration,
    respawn: Respawn,
    crash_loop: (u32, Duration),
    readiness_timeout: Duration,
    hang_timeout: Option<Duration>,
    rollout: Rollout,
    recycle: Recycle,
    parent_death_signal: Option<Signal>,
    handle_signals: bool,
    control_socket: Option<PathBuf>,
    max_message_len: usize,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            workers: None,
            program: Program::CurrentExe,
            args: None,
            envs: Vec::new(),
            cwd: None,
            mode: ListenMode::RoundRobin,
            policy: Policy::RoundRobin,
            window: DEFAULT_WINDOW,
            backlog: DEFAULT_BACKLOG,
            start_timeout: DEFAULT_START_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            respawn: Respawn::Always,
            crash_loop: (DEFAULT_CRASH_LOOP_FAILURES, DEFAULT_CRASH_LOOP_WITHIN),
            readiness_timeout: DEFAULT_READINESS_TIMEOUT,
            hang_timeout: Some(DEFAULT_HANG_TIMEOUT),
            rollout: Rollout::default(),
            recycle: Recycle::default(),
            parent_death_signal: Some(Signal::SIGTERM),
            handle_signals: true,
            control_socket: None,
            max_message_len: Limits::DEFAULT_MAX_MESSAGE_LEN,
        }
    }
}

impl Builder {
    /// The defaults: one worker per available CPU running this very program with the same
    /// arguments, round-robin with a window of [`DEFAULT_WINDOW`], respawn on, SIGTERM to
    /// workers whose primary dies, and the primary handles SIGTERM, SIGINT and SIGQUIT.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// How many workers to keep running (default: the available parallelism).
    pub fn workers(mut self, count: usize) -> Builder {
        self.workers = Some(count);
        self
    }

    /// Run `path` as the worker program instead of this executable.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Builder {
        self.program = Program::Path(path.into());
        self
    }

    /// The workers' arguments (default: the primary's own, without the program name).
    pub fn args<I, S>(mut self, args: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets an environment variable for workers (they inherit the primary's otherwise).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Builder {
        self.envs.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable from the workers' environment.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Builder {
        self.envs.push((key.into(), None));
        self
    }

    /// The workers' working directory (default: the primary's).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.cwd = Some(dir.into());
        self
    }

    /// How listeners deliver connections when a worker does not say (default round-robin).
    /// [`ListenMode::ReusePort`] is not served yet: [`build`](Builder::build) refuses it.
    pub fn mode(mut self, mode: ListenMode) -> Builder {
        self.mode = mode;
        self
    }

    /// Who gets the next connection of a round-robin listener (default
    /// [`Policy::RoundRobin`]).
    pub fn policy(mut self, policy: Policy) -> Builder {
        self.policy = policy;
        self
    }

    /// The round-robin credit window per worker (default [`DEFAULT_WINDOW`]; 1 is Node's
    /// protocol; at most [`MAX_WINDOW`]). A handoff carries at most 253 connections per
    /// message (the kernel's limit on fds per message); a larger window sends several.
    pub fn window(mut self, window: u32) -> Builder {
        self.window = window;
        self
    }

    /// The listen backlog of the primary's sockets (default [`DEFAULT_BACKLOG`]).
    pub fn backlog(mut self, backlog: u32) -> Builder {
        self.backlog = backlog;
        self
    }

    /// How long a new worker has to say Hello before it is killed (default 10 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Builder {
        self.start_timeout = timeout;
        self
    }

    /// How long disconnecting workers have to finish before they are killed, when the cluster
    /// stops or a worker is disconnected (default 30 s). Workers use the same value as their
    /// drain timeout when the primary dies.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Builder {
        self.shutdown_timeout = timeout;
        self
    }

    /// Whether a worker that exits without the primary asking it to is replaced (default
    /// true): a crash, a kill, or a worker that disconnected by itself (its own `disconnect`,
    /// or a SIGTERM from outside). A retiring worker's replacement starts before it leaves.
    ///
    /// `true` is [`Respawn::Always`], `false` [`Respawn::Never`]; see
    /// [`respawn_policy`](Builder::respawn_policy) for the choice in between.
    pub fn respawn(mut self, respawn: bool) -> Builder {
        self.respawn = if respawn {
            Respawn::Always
        } else {
            Respawn::Never
        };
        self
    }

    /// Which workers that exit by themselves are replaced (default [`Respawn::Always`]).
    /// Replacements after failures in a row wait longer each time (100 ms doubling up to
    /// 5 s; a worker that stayed up reset the count).
    pub fn respawn_policy(mut self, respawn: Respawn) -> Builder {
        self.respawn = respawn;
        self
    }

    /// The crash-loop guard: `failures` worker failures within `within` stop the cluster,
    /// and [`Primary::run`](crate::Primary::run) returns [`Error::CrashLoop`] naming the last
    /// cause (default 5 within 10 s). A failure is an exit the primary did not ask for with a
    /// non-zero code or a crash signal, or a worker the primary killed for a fault (hung, no
    /// Hello in time, a protocol violation); a kill from outside (SIGKILL, SIGTERM) is not.
    pub fn crash_loop(mut self, failures: u32, within: Duration) -> Builder {
        self.crash_loop = (failures, within);
        self
    }

    /// How long a replacement started by a roll-out or a recycling has to listen on every
    /// address its predecessor listened on (default 30 s); one that takes longer is stopped
    /// and the roll-out aborted, the old worker keeps serving.
    pub fn readiness_timeout(mut self, timeout: Duration) -> Builder {
        self.readiness_timeout = timeout;
        self
    }

    /// The hang timeout (default 30 s; `None` turns hang detection off): a worker that holds
    /// handed connections and acknowledges none of them for this long, or whose serving path
    /// sent heartbeats and then stopped, is hung. Its un-acknowledged connections go to
    /// other workers at once; it gets SIGABRT (for a core dump or a backtrace), SIGKILL a
    /// moment later, and a replacement. Workers send heartbeats when they accept, and when
    /// the server calls `Worker::heartbeat`.
    pub fn hang_timeout(mut self, timeout: Option<Duration>) -> Builder {
        self.hang_timeout = timeout;
        self
    }

    /// How a rolling restart replaces workers (default one at a time, replacement first).
    pub fn rollout(mut self, rollout: Rollout) -> Builder {
        self.rollout = rollout;
        self
    }

    /// When workers are replaced to keep them fresh (default never).
    pub fn recycle(mut self, recycle: Recycle) -> Builder {
        self.recycle = recycle;
        self
    }

    /// The signal a worker gets when the primary dies (`PR_SET_PDEATHSIG`, Linux only;
    /// default SIGTERM, which workers treat as "disconnect"). `None` leaves only the end of
    /// file on the control channel to tell them.
    pub fn parent_death_signal(mut self, signal: Option<Signal>) -> Builder {
        self.parent_death_signal = signal;
        self
    }

    /// The longest user message either side may send, in encoded bytes (default
    /// [`Limits::DEFAULT_MAX_MESSAGE_LEN`], 16 MiB). Workers learn it in the handshake; a
    /// longer message is refused at `send`, on either side, with an error that names the
    /// limit. Messages take memory in the sender's queue until the receiver reads them.
    pub fn max_message_len(mut self, len: usize) -> Builder {
        self.max_message_len = len;
        self
    }

    /// Whether the primary handles SIGTERM and SIGINT (graceful stop; a second one stops at
    /// once), SIGQUIT (stop at once), SIGHUP (rolling restart), SIGTTIN and SIGTTOU (one
    /// worker more or fewer). Default true; turn it off when the application handles signals
    /// itself and steers the primary through its [`Handle`](crate::Handle).
    pub fn handle_signals(mut self, handle: bool) -> Builder {
        self.handle_signals = handle;
        self
    }

    /// Serves the control socket at `path` while the primary runs: a Unix socket, mode
    /// 0600, that answers its own user and root (checked with the peer's credentials) with
    /// the cluster's status and metrics, and takes reload, scale and stop orders. The
    /// protocol is in [`control`](crate::control); `clusterctl` (in `cluster-net`, feature
    /// `cli`) is its command-line client. A stale socket file left by a killed primary is
    /// replaced; one a live primary serves is refused. The file is removed when `run` ends.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Builder {
        self.control_socket = Some(path.into());
        self
    }

    /// Checks the settings and resolves the program.
    pub(crate) fn settle(self) -> Result<Config, Error> {
        let invalid = |reason: &str| Error::InvalidConfig {
            reason: reason.to_owned(),
        };
        let window =
            NonZeroU32::new(self.window).ok_or_else(|| invalid("window must be at least 1"))?;
        if self.window > MAX_WINDOW {
            return Err(invalid(&format!("window may not exceed {MAX_WINDOW}")));
        }
        if self.mode == ListenMode::ReusePort {
            return Err(invalid(
                "the reuse-port listen mode is not served yet; use round-robin or shared",
            ));
        }
        if self.crash_loop.0 == 0 || self.crash_loop.1.is_zero() {
            return Err(invalid(
                "the crash-loop guard needs at least one failure within a non-zero time",
            ));
        }
        if self.rollout.surge == 0 && self.rollout.unavailable == 0 {
            return Err(invalid(
                "a roll-out needs a surge or an unavailable count of at least one",
            ));
        }
        if self
            .hang_timeout
            .is_some_and(|t| t < Duration::from_millis(100))
        {
            return Err(invalid("the hang timeout must be at least 100 ms"));
        }
        if self.recycle.after_connections == Some(0) || self.recycle.max_memory == Some(0) {
            return Err(invalid(
                "recycling after 0 connections or 0 bytes would replace workers forever",
            ));
        }
        let control_limits = Limits::default()
            .with_max_message_len(self.max_message_len)
            .map_err(|err| invalid(&format!("max_message_len: {err}")))?;
        let workers = match self.workers {
            Some(count) => count,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        if workers == 0 {
            return Err(invalid(
                "a primary needs at least one worker (run in-process for none)",
            ));
        }
        let program = match self.program {
            Program::Path(path) => path,
            Program::CurrentExe => {
                std::env::current_exe().map_err(|source| Error::io("current_exe", source))?
            }
        };
        check_program(&program)?;
        if let Some(dir) = &self.cwd {
            if !dir.is_dir() {
                return Err(invalid(&format!(
                    "the workers' directory {} is not a directory this process can reach \
                     (Builder::current_dir)",
                    dir.display()
                )));
            }
        }
        if let Some(path) = &self.control_socket {
            check_control_socket(path).map_err(|reason| invalid(&reason))?;
        }
        if self.start_timeout.is_zero() {
            return Err(invalid(
                "the start timeout must be more than 0: no worker could say Hello in time",
            ));
        }
        let args = self
            .args
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        Ok(Config {
            workers,
            program,
            args,
            envs: self.envs,
            cwd: self.cwd,
            mode: self.mode,
            policy: self.policy,
            window,
            backlog: self.backlog,
            start_timeout: self.start_timeout,
            shutdown_timeout: self.shutdown_timeout,
            respawn: self.respawn,
            crash_loop: self.crash_loop,
            readiness_timeout: self.readiness_timeout,
            hang_timeout: self.hang_timeout,
            rollout: self.rollout,
            recycle: self.recycle,
            parent_death_signal: self.parent_death_signal,
            handle_signals: self.handle_signals,
            control_socket: self.control_socket,
            control_limits,
        })
    }
}

/// Why the control socket cannot be made at `path`, if it cannot: its directory is missing,
/// or the path is too long for a socket address (108 bytes on Linux, with the final NUL).
fn check_control_socket(path: &Path) -> Result<(), String> {
    const SUN_PATH_MAX: usize = 107;
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(format!(
            "the control socket path {} is {len} bytes; a socket path holds at most \
             {SUN_PATH_MAX} (Builder::control_socket)",
            path.display()
        ));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if parent.is_some_and(|dir| !dir.is_dir()) {
        return Err(format!(
            "the control socket's directory {} does not exist (Builder::control_socket)",
            parent
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// Refuses a worker program that could not be executed: missing, a directory, or not
/// executable by this process. A bare name is looked up on `PATH`, as the spawn will.
fn check_program(program: &Path) -> Result<(), Error> {
    let not_executable = |errno: i32| Error::ProgramNotExecutable {
        program: program.to_owned(),
        errno,
    };
    let bare_name = program.components().count() == 1 && !program.has_root();
    let candidates: Vec<PathBuf> = if bare_name {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .collect()
    } else {
        vec![program.to_owned()]
    };
    let mut last = libc::ENOENT;
    for candidate in candidates {
        if candidate.is_dir() {
            last = libc::EISDIR;
            continue;
        }
        match nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK) {
            Ok(()) => return Ok(()),
            Err(errno) if errno != nix::errno::Errno::ENOENT => last = errno as i32,
            Err(_) => {}
        }
    }
    Err(not_executable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_program_that_cannot_be_executed_is_refused_at_build() {
        let missing = Builder::new().workers(1).program("/nonexistent/worker");
        match missing.settle() {
            Err(err @ Error::ProgramNotExecutable { errno, .. }) => {
                assert_eq!(errno, libc::ENOENT);
                let text = err.to_string();
                assert!(text.contains("/nonexistent/worker"), "{text}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let directory = Builder::new().workers(1).program("/");
        assert!(matches!(
            directory.settle(),
            Err(Error::ProgramNotExecutable {
                errno: libc::EISDIR,
                ..
            })
        ));
        // A file that is not executable (this crate's manifest).
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert!(matches!(
            Builder::new().workers(1).program(manifest).settle(),
            Err(Error::ProgramNotExecutable {
                errno: libc::EACCES,
                ..
            })
        ));
        // A bare name is looked up on PATH, as the spawn does.
        assert!(Builder::new().workers(1).program("sh").settle().is_ok());
        assert!(matches!(
            Builder::new()
                .workers(1)
                .program("no-such-program-anywhere")
                .settle(),
            Err(Error::ProgramNotExecutable {
                errno: libc::ENOENT,
                ..
            })
        ));
    }

    #[test]
    fn a_control_socket_in_a_missing_directory_or_too_long_a_path_is_refused() {
        let reason = refusal(
            Builder::new()
                .workers(1)
                .control_socket("/nonexistent/ctl.sock"),
        );
        assert!(reason.contains("/nonexistent"), "{reason}");
        let long = format!("/tmp/{}.sock", "x".repeat(120));
        let reason = refusal(Builder::new().workers(1).control_socket(long));
        assert!(reason.contains("at most 107"), "{reason}");
        assert!(
            Builder::new()
                .workers(1)
                .control_socket("ctl.sock")
                .settle()
                .is_ok()
        );
    }

    #[test]
    fn a_missing_working_directory_and_a_zero_start_timeout_are_refused() {
        let reason = refusal(Builder::new().workers(1).current_dir("/nonexistent/dir"));
        assert!(reason.contains("/nonexistent/dir"), "{reason}");
        let reason = refusal(Builder::new().workers(1).start_timeout(Duration::ZERO));
        assert!(reason.contains("start timeout"), "{reason}");
    }

    fn refusal(builder: Builder) -> String {
        match builder.settle() {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn the_reuse_port_mode_is_refused_at_build_until_it_is_served() {
        let reason = refusal(Builder::new().workers(1).mode(ListenMode::ReusePort));
        assert!(reason.contains("reuse-port"), "{reason}");
    }

    #[test]
    fn windows_and_message_limits_are_checked() {
        assert!(refusal(Builder::new().workers(1).window(0)).contains("window"));
        assert!(refusal(Builder::new().workers(1).window(MAX_WINDOW + 1)).contains("window"));
        let too_long = usize::try_from(u64::from(u32::MAX) + 1).unwrap_or(usize::MAX);
        assert!(
            refusal(Builder::new().workers(1).max_message_len(too_long))
                .contains("max_message_len")
        );
        let config = Builder::new()
            .workers(1)
            .window(256)
            .max_message_len(1 << 20)
            .settle()
            .map_err(|err| err.to_string());
        assert_eq!(
            config.map(|c| c.control_limits.max_message_len()),
            Ok(1 << 20)
        );
    }
}
