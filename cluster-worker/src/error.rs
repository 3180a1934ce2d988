//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong in a worker.
///
/// The conversion into an [`io::Error`] picks the [`kind`](Error::kind) a plain socket call
/// would have given, so that [`Worker::listen`](crate::Worker::listen) can stand in for
/// `TcpListener::bind`: a listen the primary refused with `EADDRINUSE` becomes an `io::Error`
/// of kind [`AddrInUse`](io::ErrorKind::AddrInUse). The `io::Error` wraps this error, so it
/// can be recovered with `downcast`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable of the worker contract (see [`cluster_ipc::env`]) is missing
    /// or malformed.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`Worker::start`](crate::Worker::start) was called again in a process where it had
    /// already succeeded.
    #[error("the worker was already started in this process")]
    AlreadyStarted,
    /// The control channel failed.
    #[error("control channel")]
    Ipc(#[from] cluster_ipc::Error),
    /// The primary did not answer `Hello` in time.
    #[error("the primary did not answer the handshake within {timeout:?}")]
    HandshakeTimedOut {
        /// The handshake timeout.
        timeout: Duration,
    },
    /// The primary refused this worker in the handshake.
    #[error("the primary refused this worker: {reason}")]
    Refused {
        /// The primary's reason.
        reason: String,
    },
    /// The primary speaks another version of the control protocol.
    #[error("protocol version mismatch: this worker speaks {worker}, the primary {primary}")]
    VersionMismatch {
        /// The version this worker speaks.
        worker: u32,
        /// The version the primary announced.
        primary: u32,
    },
    /// The primary broke the protocol: an unexpected reply, a missing fd, a malformed batch.
    #[error("protocol error from the primary while {context}: {detail}")]
    Protocol {
        /// What the worker was doing.
        context: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The primary refused to listen on an address.
    #[error("listen on {addr} refused: {message}")]
    ListenRefused {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error number the primary got (`EADDRINUSE`, `EACCES`, ...).
        errno: i32,
        /// The primary's description.
        message: String,
    },
    /// The worker is disconnecting, so it takes no new listeners.
    #[error("the worker is disconnecting")]
    Disconnecting,
    /// The control channel is closed: the primary is gone, or broke the protocol
    /// ([`Worker::channel_error`](crate::Worker::channel_error) says how).
    #[error("the control channel to the primary is closed")]
    ChannelClosed,
    /// A request to the primary got no answer in time.
    #[error("no answer from the primary to {op} within {timeout:?}")]
    TimedOut {
        /// The request.
        op: &'static str,
        /// How long the worker waited.
        timeout: Duration,
    },
    /// A user message is longer than the message limit of the control channel (the limit
    /// the primary announced in its `Welcome`, see
    /// [`Worker::max_message_len`](crate::Worker::max_message_len)).
    #[error("a message of {len} bytes or more exceeds the {max}-byte message limit")]
    MessageTooLarge {
        /// The message's encoded length, as sent (or at least this much: encoding stops at
        /// the limit).
        len: usize,
        /// The message limit.
        max: usize,
    },
    /// Too many user messages wait to be sent: the primary has not been reading for as long
    /// as [`Worker::send`](crate::Worker::send) waited for room.
    #[error("{queued} bytes of messages already wait for the primary (limit {max})")]
    SendQueueFull {
        /// Bytes waiting.
        queued: usize,
        /// The bound.
        max: usize,
    },
    /// A user message could not be encoded.
    #[error("could not encode a message")]
    Encode(#[source] postcard::Error),
    /// The listener is closed (by [`Listener::close`](crate::Listener::close), a disconnect, or
    /// the primary).
    #[error("the listener is closed")]
    ListenerClosed,
    /// A call that waits for the worker's control thread was made on that thread (from a
    /// message or disconnect callback), where it could never be answered.
    #[error("{op} cannot be called from a worker callback (it would wait for itself)")]
    OnControlThread {
        /// The call.
        op: &'static str,
    },
    /// What was asked for is not supported by this version of the worker.
    #[error("not supported: {what}")]
    Unsupported {
        /// What.
        what: &'static str,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// What the operating system reported.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }

    pub(crate) fn errno(op: &'static str, errno: nix::errno::Errno) -> Error {
        Error::io(op, io::Error::from(errno))
    }

    pub(crate) fn protocol(context: &'static str, detail: impl Into<String>) -> Error {
        Error::Protocol {
            context,
            detail: detail.into(),
        }
    }

    /// An error from encoding a user message: the limit and encoding failures are the
    /// caller's, with this crate's own variants; anything else is the channel's.
    pub(crate) fn from_encoding(err: cluster_ipc::Error) -> Error {
        match err {
            cluster_ipc::Error::MessageTooLarge { len, max } => Error::MessageTooLarge { len, max },
            cluster_ipc::Error::Encode(source) => Error::Encode(source),
            other => Error::Ipc(other),
        }
    }

    /// An error from adopting the control channel: a bad environment keeps the variable's
    /// name; anything else is the channel's.
    pub(crate) fn from_adoption(err: cluster_ipc::Error) -> Error {
        match err {
            cluster_ipc::Error::Env { var, reason } => Error::Env { var, reason },
            other => Error::Ipc(other),
        }
    }

    /// The [`io::ErrorKind`] this error converts to.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::ListenRefused { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            Error::Io { source, .. } => source.kind(),
            Error::Ipc(cluster_ipc::Error::Io { source, .. }) => source.kind(),
            Error::Ipc(cluster_ipc::Error::TimedOut { .. })
            | Error::HandshakeTimedOut { .. }
            | Error::TimedOut { .. } => io::ErrorKind::TimedOut,
            Error::Ipc(cluster_ipc::Error::Closed) | Error::ChannelClosed => {
                io::ErrorKind::BrokenPipe
            }
            Error::Disconnecting | Error::ListenerClosed => io::ErrorKind::NotConnected,
            Error::Refused { .. } => io::ErrorKind::ConnectionRefused,
            Error::SendQueueFull { .. } => io::ErrorKind::WouldBlock,
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::Env { .. }
            | Error::AlreadyStarted
            | Error::MessageTooLarge { .. }
            | Error::Encode(_)
            | Error::OnControlThread { .. } => io::ErrorKind::InvalidInput,
            Error::Ipc(_) | Error::VersionMismatch { .. } | Error::Protocol { .. } => {
                io::ErrorKind::InvalidData
            }
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        io::Error::new(err.kind(), err)
    }
}
