//! The crate's one error type.

use std::io;

/// Everything that can go wrong in `cluster-ipc`.
///
/// Every error from receiving, and every failed `sendmsg`, is fatal for the channel it came
/// from: the channel closes itself, closes any fds that did arrive, and answers every later
/// call with [`Error::Closed`] ([`Channel::is_closed`](crate::Channel::is_closed) tells). Errors
/// about the caller's own input (a message over the frame limit at send, too many fds, a full
/// send queue) and deadlines that pass leave the channel usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// The operation that failed, such as `sendmsg` or `socketpair`.
        op: &'static str,
        /// The error the operating system reported.
        #[source]
        source: io::Error,
    },
    /// The peer closed the channel, or an earlier fatal error closed it.
    #[error("the channel is closed")]
    Closed,
    /// The frame does not start with the protocol's magic bytes.
    #[error("bad frame magic {found:#06x} (expected {expected:#06x})")]
    BadMagic {
        /// The two bytes found, big-endian.
        found: u16,
        /// The magic this crate speaks.
        expected: u16,
    },
    /// The frame uses a wire format this crate does not speak.
    #[error("unsupported frame version {found} (this side speaks {expected})")]
    UnsupportedVersion {
        /// The version found in the header.
        found: u8,
        /// The version this crate speaks.
        expected: u8,
    },
    /// The header names a message kind this crate does not know.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// The kind byte found in the header.
        kind: u8,
    },
    /// The header has flag or reserved bits set that this version does not define.
    #[error("undefined header bits set: flags {flags:#04x}, reserved {reserved:#06x}")]
    UndefinedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
    },
    /// A frame is larger than the configured limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The frame's length, header included (or at least this much, when still encoding).
        len: usize,
        /// The configured maximum frame length.
        max: usize,
    },
    /// A message is longer than the message limit (at encoding, or while its fragments
    /// arrive).
    #[error("a message of {len} bytes or more exceeds the {max}-byte message limit")]
    MessageTooLarge {
        /// The message's encoded length (at least this much, when still encoding).
        len: usize,
        /// The configured limit on one message's encoded length.
        max: usize,
    },
    /// Fragments of a message arrived out of order, or carried fds where none belong.
    #[error("bad message fragment: {reason}")]
    BadFragment {
        /// What was wrong.
        reason: &'static str,
    },
    /// A typed channel received a frame that does not belong on it: a message of another
    /// channel, or of the other direction.
    #[error("a {found:?} frame arrived on a channel that carries {expected:?} frames")]
    WrongKind {
        /// The kind this channel receives.
        expected: crate::Kind,
        /// The kind that arrived.
        found: crate::Kind,
    },
    /// A frame carries more fds than allowed.
    #[error("{count} fds in one frame exceeds the limit of {max}")]
    TooManyFds {
        /// The number of fds.
        count: usize,
        /// The configured maximum per frame.
        max: usize,
    },
    /// The header announced a number of fds that is not the number that arrived.
    #[error("header announced {expected} fds but {received} arrived")]
    FdCountMismatch {
        /// What the header said.
        expected: usize,
        /// What arrived (all of them were closed).
        received: usize,
    },
    /// The kernel dropped fds because the control buffer was too small (`MSG_CTRUNC`).
    #[error(
        "control data truncated: the kernel dropped fds ({closed} that did arrive were closed)"
    )]
    ControlTruncated {
        /// How many fds did arrive, and were closed.
        closed: usize,
    },
    /// A record was longer than the receive buffer (`MSG_TRUNC`).
    #[error("record truncated: longer than the {max}-byte frame limit")]
    RecordTruncated {
        /// The receive buffer size, which is the frame limit.
        max: usize,
    },
    /// A record's length is not the length its header announces (one record must hold exactly
    /// one frame).
    #[error("record of {record_len} bytes holds a frame of {frame_len} bytes")]
    RecordLengthMismatch {
        /// The frame length the header announces (or the header's length, when the record is
        /// shorter than a header).
        frame_len: usize,
        /// The record's length.
        record_len: usize,
    },
    /// A received byte stream ended in the middle of a frame.
    #[error("the peer closed the stream in the middle of a frame ({buffered} bytes buffered)")]
    TruncatedStream {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
    /// More fds arrived ahead of their frames than the limits allow.
    #[error("{queued} fds are waiting for their frames, more than the {max} allowed")]
    TooManyQueuedFds {
        /// Fds received and not yet claimed by a frame.
        queued: usize,
        /// The bound.
        max: usize,
    },
    /// A message could not be encoded.
    #[error("could not encode a message")]
    Encode(#[source] postcard::Error),
    /// A frame's body could not be decoded as the expected type.
    #[error("could not decode the body of a {kind:?} frame")]
    Decode {
        /// The frame's kind.
        kind: crate::Kind,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// The limits asked for are not possible.
    #[error("invalid limits: {reason}")]
    InvalidLimits {
        /// Why.
        reason: &'static str,
    },
    /// The frame limit does not fit in the socket's send buffer (a record larger than the send
    /// buffer fails with `EMSGSIZE`).
    #[error(
        "the {max_frame_len}-byte frame limit does not fit the socket send buffer of {sndbuf} bytes"
    )]
    SendBufferTooSmall {
        /// The configured frame limit.
        max_frame_len: usize,
        /// The send buffer the kernel granted.
        sndbuf: usize,
    },
    /// The outgoing queue is full: the peer is not reading.
    #[error("{queued} bytes already queued for a peer that is not reading (limit {max})")]
    SendQueueFull {
        /// Bytes waiting to be sent.
        queued: usize,
        /// The bound on queued bytes.
        max: usize,
    },
    /// While waiting for a reply, more frames arrived than can be set aside.
    #[error("more than {max} frames arrived while waiting for a reply")]
    InboxFull {
        /// How many frames may be set aside.
        max: usize,
    },
    /// A request was registered twice under the same sequence number.
    #[error("a request with seq {seq} is already pending")]
    DuplicateSeq {
        /// The sequence number.
        seq: u64,
    },
    /// A blocking call reached its deadline.
    #[error("timed out waiting to {op}")]
    TimedOut {
        /// What was being waited for.
        op: &'static str,
    },
    /// An fd has the wrong type to be a channel.
    #[error("fd is not a usable channel: {reason}")]
    WrongSocket {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An fd cannot be placed at that number in a child.
    #[error("cannot map an fd to number {target} in a child: {reason}")]
    InvalidFdTarget {
        /// The target number asked for.
        target: i32,
        /// Why not.
        reason: &'static str,
    },
    /// The environment variable naming an inherited fd is missing or malformed.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An inherited fd was adopted a second time.
    #[error("the fd named by {var} was already adopted by this process")]
    AlreadyAdopted {
        /// The variable naming the fd.
        var: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }

    pub(crate) fn errno(op: &'static str, errno: nix::errno::Errno) -> Error {
        Error::Io {
            op,
            source: io::Error::from(errno),
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> io::Error {
        let kind = match &err {
            Error::Io { source, .. } => source.kind(),
            Error::Closed | Error::TruncatedStream { .. } => io::ErrorKind::BrokenPipe,
            Error::TimedOut { .. } => io::ErrorKind::TimedOut,
            Error::SendQueueFull { .. } | Error::InboxFull { .. } => io::ErrorKind::WouldBlock,
            Error::InvalidLimits { .. }
            | Error::FrameTooLarge { .. }
            | Error::MessageTooLarge { .. }
            | Error::TooManyFds { .. }
            | Error::Encode(_)
            | Error::Env { .. }
            | Error::AlreadyAdopted { .. }
            | Error::DuplicateSeq { .. }
            | Error::InvalidFdTarget { .. }
            | Error::WrongSocket { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}

/// An error and its causes on one line, for a log or a terminal: `"spawn worker failed: No
/// such file or directory (os error 2)"`. A cause whose text the line already holds (an error
/// that quotes its source in its own message) is not repeated.
///
/// ```
/// use std::io;
///
/// let err = cluster_ipc::Error::Io {
///     op: "bind",
///     source: io::Error::from(io::ErrorKind::AddrInUse),
/// };
/// assert_eq!(
///     cluster_ipc::ErrorChain(&err).to_string(),
///     "bind failed: address in use"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::{Error, ErrorChain};

    /// An error that quotes its source in its own message, as some libraries' errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("listen refused: {0}")]
    struct Quoting(#[source] io::Error);

    #[test]
    fn a_chain_names_each_cause_once() {
        let quoting = Quoting(io::Error::from(io::ErrorKind::AddrInUse));
        assert_eq!(
            ErrorChain(&quoting).to_string(),
            "listen refused: address in use"
        );
        let plain = Error::Io {
            op: "sendmsg",
            source: io::Error::from(io::ErrorKind::BrokenPipe),
        };
        assert_eq!(
            ErrorChain(&plain).to_string(),
            "sendmsg failed: broken pipe"
        );
    }
}
