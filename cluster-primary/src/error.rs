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
    /// The primary is no longer running (a handle outlived it).
    #[error("the primary is not running")]
    NotRunning,
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
                    _ => io::ErrorKind::BrokenPipe,
                };
                io::Error::new(kind, other)
            }
        }
    }
}
