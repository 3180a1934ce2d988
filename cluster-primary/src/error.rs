//! The crate's one error type.

use std::io;

use cluster_ipc::WorkerId;

/// Everything that can go wrong in the primary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call or I/O operation failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
    /// The transport failed.
    #[error(transparent)]
    Ipc(#[from] cluster_ipc::Error),
    /// The configuration cannot work.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// No worker with this id is alive.
    #[error("no live worker {worker}")]
    NoSuchWorker {
        /// The id asked for.
        worker: WorkerId,
    },
    /// The cluster is stopping: it starts nothing new.
    #[error("the cluster is stopping")]
    Stopping,
    /// The primary is no longer running (a handle outlived it).
    #[error("the primary is not running")]
    NotRunning,
    /// A worker exited with [`BOOT_FAILURE_EXIT_CODE`](crate::BOOT_FAILURE_EXIT_CODE) before it
    /// listened: it cannot start, and starting it again would not help. The cluster stopped.
    #[error("worker boot failed: {worker} exited with code {exit_code} before it listened")]
    BootFailed {
        /// The worker that said so.
        worker: WorkerId,
        /// Its exit code.
        exit_code: i32,
    },
    /// Workers failed too often (the crash-loop guard, see
    /// [`Builder::crash_loop`](crate::Builder::crash_loop)). The cluster stopped.
    #[error("workers keep failing: {failures} failures within {within:?}, the last: {last}")]
    CrashLoop {
        /// Failures counted within the window.
        failures: usize,
        /// The window.
        within: std::time::Duration,
        /// What the last failure was (`exit code 1`, `killed by SIGSEGV`, `hung: ...`).
        last: String,
    },
    /// The primary cannot listen on an address a worker asked for, for a reason a respawn
    /// cannot fix: the address is in use, binding it is not permitted, or it is not an
    /// address of this host. The cluster stopped.
    #[error("cannot listen on {addr}: {}", describe_listen_errno(*errno))]
    ListenFailed {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error number the bind got (`EADDRINUSE`, `EACCES`, ...).
        errno: i32,
    },
    /// The worker program cannot be executed: it does not exist, is not executable, or is
    /// not a program. The cluster stopped.
    #[error("cannot execute the worker program {}: {}", program.display(), describe_exec_errno(*errno))]
    ProgramNotExecutable {
        /// The program.
        program: std::path::PathBuf,
        /// The OS error number the exec got (`ENOENT`, `EACCES`, `ENOEXEC`, ...).
        errno: i32,
    },
    /// The control socket could not be opened at this path.
    #[error("cannot open the control socket {}", path.display())]
    ControlSocket {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cluster stopped, but not cleanly: workers were still running when the stop's
    /// time ran out (or the stop was immediate) and were killed, or gave up at their drain
    /// timeout with connections still open
    /// ([`DRAIN_TIMEOUT_EXIT_CODE`](crate::DRAIN_TIMEOUT_EXIT_CODE)).
    #[error(
        "the stop was not clean: {killed} workers were killed or cut connections off at the \
         shutdown timeout"
    )]
    StopNotClean {
        /// How many.
        killed: usize,
    },
    /// A rolling restart was aborted; the workers it had not replaced yet keep serving.
    #[error("the roll-out was aborted: {reason}")]
    RolloutAborted {
        /// Why.
        reason: String,
    },
    /// The primary's loop did not answer in time.
    #[error("the primary did not answer {op} within {timeout:?}")]
    TimedOut {
        /// What was asked.
        op: &'static str,
        /// How long the caller waited.
        timeout: std::time::Duration,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }

    /// The OS error number behind this error, if the OS reported one.
    pub(crate) fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Why a bind failed, in words that say what to do about the common cases.
fn describe_listen_errno(errno: i32) -> String {
    match errno {
        libc::EADDRINUSE => "address in use (another process listens there)".to_owned(),
        libc::EACCES | libc::EPERM => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_owned()
        }
        libc::EADDRNOTAVAIL => {
            "address not available (no interface of this host has it)".to_owned()
        }
        other => io::Error::from_raw_os_error(other).to_string(),
    }
}

/// Why an exec failed.
fn describe_exec_errno(errno: i32) -> String {
    match errno {
        libc::ENOENT => "no such file".to_owned(),
        libc::EACCES => "permission denied (is it executable?)".to_owned(),
        libc::ENOEXEC => "not an executable this system can run".to_owned(),
        other => io::Error::from_raw_os_error(other).to_string(),
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        match err {
            Error::Io { source, .. } => source,
            Error::Ipc(err) => err.into(),
            other => {
                let kind = match other {
                    Error::InvalidConfig { .. } => io::ErrorKind::InvalidInput,
                    Error::NoSuchWorker { .. } => io::ErrorKind::NotFound,
                    Error::TimedOut { .. } => io::ErrorKind::TimedOut,
                    Error::ListenFailed { errno, .. }
                    | Error::ProgramNotExecutable { errno, .. } => {
                        io::Error::from_raw_os_error(errno).kind()
                    }
                    _ => io::ErrorKind::BrokenPipe,
                };
                io::Error::new(kind, other)
            }
        }
    }
}
