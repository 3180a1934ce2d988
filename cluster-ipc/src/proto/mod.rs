//! The control protocol of a cluster: the messages a primary and its workers exchange.
//!
//! Two kinds of socket carry these messages: the *control channel*, one per worker, and a
//! *handoff socket* per (worker, round-robin listener). Each direction of each has its own
//! message type ([`ToWorker`], [`ToPrimary`], [`HandoffToWorker`], [`HandoffToPrimary`]) and
//! frame [`Kind`], and each end its own [`Protocol`] ([`PrimaryControl`], [`WorkerControl`],
//! [`PrimaryHandoff`], [`WorkerHandoff`]): a `Channel<WorkerControl>` can only send a
//! `ToPrimary`, and refuses anything but a `ToWorker` on arrival ([`Error::WrongKind`]), so
//! a message sent where it does not belong can neither be built nor slip through. An
//! application's own messages travel inside the control messages as [`UserMessage`]s.
//! Requests and replies are correlated by the frame's `seq`/`ack`, never by the body.
//!
//! The conversations:
//!
//! 1. **Handshake.** The worker's first frame is the request `Hello`. The primary replies
//!    `Welcome` (same protocol version), or `Refused` and closes the channel.
//! 2. **Listen.** The worker sends the request `Listen`. The primary replies `ListenGranted`
//!    with one fd attached (what the fd is depends on [`Delivery`]), or `ListenRefused` with an
//!    errno. Once its listener is set up the worker sends `Listening`.
//! 3. **Round-robin delivery**, on the handoff socket. The primary sends `Connections` batches
//!    with the accepted sockets attached; it keeps its own copies until they are acked. The
//!    worker answers each batch with `ConnectionsAck` as soon as `recvmsg` returned it, before
//!    any of them reaches the application, so an acked connection is never handed to a second
//!    worker and an un-acked one is never lost. To close the listener the worker sends
//!    `ConnectionsReturned` with the acked connections it will not serve, then shuts the
//!    socket down (and sends `CloseListener` on the control channel). The primary reads the
//!    handoff socket to its end before it re-dispatches what is un-acked or returned.
//! 4. **Shared delivery.** The attached fd is the listening socket; the worker accepts on it
//!    itself and sends `CloseListener` when it stops.
//! 5. **Disconnect.** The primary sends `Disconnect`; or the worker decides by itself and
//!    sends `Disconnecting` first, so the primary can tell its exit from a crash; or the worker
//!    sends the request `Retire` ("start my replacement first"), the primary starts the
//!    replacement and replies `Ack`, and the worker disconnects. Disconnecting means: close
//!    every listener as above, let open connections finish (up to the drain timeout from
//!    `Welcome`), exit.
//! 6. **Messages.** `User` messages go either way at any time after the handshake, up to the
//!    message limit announced in `Welcome` (longer ones are refused at `send`, with an error
//!    that names the limit).
//!
//! End of file on the control channel means the other side is gone.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::frame::{HEADER_LEN, KERNEL_MAX_FDS, Kind, Limits};
use crate::ids::{ListenerId, WorkerId};

/// The version of the control protocol, exchanged in the handshake. A primary refuses a worker
/// that speaks another version (postcard is not self-describing, so both ends must agree on
/// every message's shape).
pub const PROTOCOL_VERSION: u32 = 3;

/// The most bytes a connection handed back to the primary may carry that the worker read and
/// did not answer ([`ToPrimary::HandBack`], [`HandoffToWorker::Resumed`]): a request head and a
/// little more. A connection holding more is not handed back; its worker finishes it.
pub const MAX_UNREAD_LEN: usize = 64 * 1024;

/// An address a worker asks to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ListenAddr {
    /// A TCP address, IPv4 or IPv6.
    Tcp(#[serde(with = "full_socket_addr")] SocketAddr),
    /// A UDP address, IPv4 or IPv6.
    Udp(#[serde(with = "full_socket_addr")] SocketAddr),
    /// A Unix-domain stream socket path, as raw bytes (paths need not be UTF-8).
    Unix(Vec<u8>),
}

impl ListenAddr {
    /// The Unix-domain address of `path`.
    pub fn unix(path: impl AsRef<Path>) -> ListenAddr {
        use std::os::unix::ffi::OsStrExt;
        ListenAddr::Unix(path.as_ref().as_os_str().as_bytes().to_vec())
    }

    /// The path of a Unix-domain address.
    pub fn unix_path(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        match self {
            ListenAddr::Unix(bytes) => Some(Path::new(std::ffi::OsStr::from_bytes(bytes)).into()),
            _ => None,
        }
    }
}

/// serde's own `SocketAddr` form drops an IPv6 address's scope id and flow info, and a
/// link-local address (`fe80::1%2`) cannot be bound without its scope; this form keeps both.
mod full_socket_addr {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    enum Wire {
        V4 {
            ip: [u8; 4],
            port: u16,
        },
        V6 {
            ip: [u8; 16],
            port: u16,
            flowinfo: u32,
            scope_id: u32,
        },
    }

    pub(super) fn serialize<S: Serializer>(
        addr: &SocketAddr,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            SocketAddr::V4(v4) => Wire::V4 {
                ip: v4.ip().octets(),
                port: v4.port(),
            },
            SocketAddr::V6(v6) => Wire::V6 {
                ip: v6.ip().octets(),
                port: v6.port(),
                flowinfo: v6.flowinfo(),
                scope_id: v6.scope_id(),
            },
        }
        .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SocketAddr, D::Error> {
        Ok(match Wire::deserialize(deserializer)? {
            Wire::V4 { ip, port } => SocketAddrV4::new(Ipv4Addr::from(ip), port).into(),
            Wire::V6 {
                ip,
                port,
                flowinfo,
                scope_id,
            } => SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id).into(),
        })
    }
}

/// The address of a connection's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerAddr(#[serde(with = "full_socket_addr")] pub SocketAddr);

/// How a listener's connections reach its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ListenMode {
    /// Only the primary accepts, and hands connections down a handoff socket (Node's
    /// `SCHED_RR`).
    RoundRobin,
    /// Every worker accepts on the same listening socket (Node's `SCHED_NONE`).
    Shared,
    /// Each worker slot has its own `SO_REUSEPORT` socket, owned by the primary.
    ReusePort,
}

/// A worker's request to listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenRequest {
    /// Where to listen.
    pub addr: ListenAddr,
    /// The mode asked for; `None` leaves it to the primary's configuration.
    pub mode: Option<ListenMode>,
    /// Counts this worker's listens on port 0, so that one worker can listen on `:0` twice
    /// and get two ports, while every worker's first `:0` shares one (as in Node).
    pub index: u32,
}

/// How a granted listener delivers connections; says what the attached fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// The fd is the listening socket itself, shared with other workers.
    Shared,
    /// The fd is a handoff socket; connections arrive on it in `Connections` batches, at
    /// most `window` un-acked at a time.
    Handoff {
        /// The credit window.
        window: u32,
    },
    /// The fd is this worker slot's own `SO_REUSEPORT` listening socket.
    ReusePort,
}

/// The primary's yes to a [`ListenRequest`]. One fd travels with it (see [`Delivery`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenGranted {
    /// The listener's id, used in `Listening` and `CloseListener`.
    pub listener: ListenerId,
    /// The address actually bound (the real port when `:0` was asked).
    pub local_addr: ListenAddr,
    /// What the attached fd is.
    pub delivery: Delivery,
}

/// The primary's no to a [`ListenRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenRefused {
    /// The OS error number (`EADDRINUSE`, `EACCES`, ...), so the worker can build an
    /// `io::Error` of the right kind.
    pub errno: i32,
    /// A description for people.
    pub message: String,
}

impl ListenRefused {
    fn with(errno: i32, message: impl Into<String>) -> ListenRefused {
        ListenRefused {
            errno,
            message: message.into(),
        }
    }

    /// `EADDRINUSE`: the address is taken (in another mode, or by this worker already).
    pub fn address_in_use(message: impl Into<String>) -> ListenRefused {
        ListenRefused::with(libc::EADDRINUSE, message)
    }

    /// `ESHUTDOWN`: the worker or the cluster is on its way out.
    pub fn shutting_down(message: impl Into<String>) -> ListenRefused {
        ListenRefused::with(libc::ESHUTDOWN, message)
    }

    /// `EAFNOSUPPORT`: an address family the primary does not serve.
    pub fn family_not_supported(message: impl Into<String>) -> ListenRefused {
        ListenRefused::with(libc::EAFNOSUPPORT, message)
    }

    /// `EOPNOTSUPP`: a listen mode the primary does not serve.
    pub fn not_supported(message: impl Into<String>) -> ListenRefused {
        ListenRefused::with(libc::EOPNOTSUPP, message)
    }

    /// `EINVAL`: the request names something that does not exist.
    pub fn invalid(message: impl Into<String>) -> ListenRefused {
        ListenRefused::with(libc::EINVAL, message)
    }

    /// The refusal as the `io::Error` a plain `bind` would have returned.
    pub fn to_io_error(&self) -> std::io::Error {
        let os = std::io::Error::from_raw_os_error(self.errno);
        std::io::Error::new(os.kind(), format!("{}: {}", self.message, os))
    }
}

/// One direction of one channel: the type of the messages it carries, and the frame [`Kind`]
/// that names them on the wire.
pub trait Message: Serialize + DeserializeOwned + fmt::Debug {
    /// The frame kind of this message type; a typed channel refuses every other kind.
    const KIND: Kind;
}

/// One end of a typed channel: what it sends and what it receives. See
/// [`Channel`](crate::Channel)'s type parameter.
pub trait Protocol {
    /// The messages this end sends.
    type Send: Message;
    /// The messages this end receives.
    type Recv: Message;
}

/// The primary's end of a worker's control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryControl;

/// A worker's end of its control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerControl;

/// The primary's end of a handoff socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryHandoff;

/// A worker's end of a handoff socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerHandoff;

impl Protocol for PrimaryControl {
    type Send = ToWorker;
    type Recv = ToPrimary;
}

impl Protocol for WorkerControl {
    type Send = ToPrimary;
    type Recv = ToWorker;
}

impl Protocol for PrimaryHandoff {
    type Send = HandoffToWorker;
    type Recv = HandoffToPrimary;
}

impl Protocol for WorkerHandoff {
    type Send = HandoffToPrimary;
    type Recv = HandoffToWorker;
}

/// A message received on a typed channel, with its frame's sequence numbers and fds.
#[derive(Debug)]
pub struct Envelope<M> {
    /// The sender's sequence number.
    pub seq: u64,
    /// The request this message answers, if it is a reply.
    pub ack: Option<u64>,
    /// The message.
    pub msg: M,
    /// The fds that travelled with it, in the order they were sent.
    pub fds: Vec<OwnedFd>,
}

/// A message encoded once, to be sent on several channels (see
/// [`Channel::send_encoded`](crate::Channel::send_encoded)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded<M> {
    body: Vec<u8>,
    message: PhantomData<fn() -> M>,
}

impl<M: Message> Encoded<M> {
    /// Encodes `msg`, refusing it when it is longer than `limits` allow.
    pub fn new(msg: &M, limits: &Limits) -> Result<Encoded<M>, Error> {
        let mut body = Vec::new();
        crate::frame::encode_body(&mut body, msg, limits)?;
        Ok(Encoded {
            body,
            message: PhantomData,
        })
    }

    /// The encoded bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// An application's own message, carried by [`ToWorker::User`] and [`ToPrimary::User`]: any
/// `serde` type, encoded with postcard by the sender and decoded by the receiver as the same
/// type.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMessage {
    body: Vec<u8>,
}

impl UserMessage {
    /// Encodes `msg`, refusing it when its encoding is longer than `limits` allow
    /// ([`Error::MessageTooLarge`] names the limit).
    pub fn encode<T: Serialize + ?Sized>(msg: &T, limits: &Limits) -> Result<UserMessage, Error> {
        let mut body = Vec::new();
        crate::frame::encode_body(&mut body, msg, limits)?;
        Ok(UserMessage { body })
    }

    /// A message of already encoded bytes.
    pub fn from_bytes(body: Vec<u8>) -> UserMessage {
        UserMessage { body }
    }

    /// Decodes the body as a `T`. Decoding as another type than the one sent may fail or give
    /// nonsense: postcard is not self-describing.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        postcard::from_bytes(&self.body).map_err(|source| Error::Decode {
            kind: Kind::User,
            source,
        })
    }

    /// The encoded body.
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }

    /// Takes the encoded body.
    pub fn into_bytes(self) -> Vec<u8> {
        self.body
    }
}

impl fmt::Debug for UserMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A multi-megabyte body is no help in a log line.
        f.debug_struct("UserMessage")
            .field("len", &self.body.len())
            .finish()
    }
}

/// A control message from the primary to a worker, on its control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The reply to `Hello` when the versions agree.
    Welcome {
        /// The primary's process id.
        primary_pid: u32,
        /// [`PROTOCOL_VERSION`] as the primary knows it.
        protocol_version: u32,
        /// How long a disconnecting worker may take to finish its open connections before it
        /// exits anyway, in milliseconds.
        drain_timeout_ms: u64,
        /// The longest message either side may send on this channel, in encoded bytes.
        max_message_len: u32,
        /// Send [`ToPrimary::LoadReport`]s: the primary dispatches by open connections.
        load_reports: bool,
        /// How often the worker's serving path should send [`ToPrimary::Heartbeat`], in
        /// milliseconds; 0 when the primary does not watch for hung workers.
        heartbeat_interval_ms: u64,
    },
    /// The reply to `Hello` when the worker cannot join; the primary closes the channel
    /// after it.
    Refused {
        /// Why.
        reason: String,
    },
    /// The reply granting a listen request, with one fd attached.
    ListenGranted(ListenGranted),
    /// The reply refusing a listen request.
    ListenRefused(ListenRefused),
    /// Disconnect gracefully (stop accepting, finish open connections, exit).
    Disconnect,
    /// A reply that carries nothing but its `ack`.
    Ack,
    /// Are you alive? The reply is [`ToPrimary::Ack`].
    Heartbeat,
    /// An application's message.
    User(UserMessage),
}

/// A control message from a worker to the primary, on its control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPrimary {
    /// The first message a worker sends.
    Hello {
        /// The id the primary gave this worker.
        worker_id: WorkerId,
        /// The worker's process id.
        pid: u32,
        /// [`PROTOCOL_VERSION`] as the worker knows it.
        protocol_version: u32,
    },
    /// A request to listen; the reply is `ListenGranted` or `ListenRefused`.
    Listen(ListenRequest),
    /// The granted listener is in use.
    Listening {
        /// Which listener.
        listener: ListenerId,
        /// Its local address.
        local_addr: ListenAddr,
    },
    /// The worker closed a listener. For a round-robin listener the worker also closes its
    /// handoff socket, after returning what it will not serve.
    CloseListener {
        /// Which listener.
        listener: ListenerId,
    },
    /// This worker is disconnecting of its own accord; its exit is not a crash.
    Disconnecting,
    /// Start my replacement first; I will then disconnect. The reply is
    /// [`ToWorker::Ack`].
    Retire,
    /// A reply that carries nothing but its `ack`.
    Ack,
    /// How many connections the worker has open now (sent when `Welcome` asked for load
    /// reports, after the count changed, at most every few milliseconds).
    LoadReport {
        /// Open connections.
        open_connections: u32,
    },
    /// The worker's serving path is alive (sent from the path that accepts connections, at
    /// the interval `Welcome` asked for, never from a helper thread): a worker that stops
    /// sending it is hung.
    Heartbeat {
        /// Connections the worker accepted so far, on every listener.
        connections: u64,
    },
    /// A connection the draining worker gives back between two requests, attached (one
    /// fd), for the primary to hand to another worker with `unread` (bytes the worker read
    /// from it and did not answer, at most [`MAX_UNREAD_LEN`]).
    HandBack {
        /// The round-robin listener the connection came from.
        listener: ListenerId,
        /// What was read and not answered, to be read first by the next worker.
        unread: Vec<u8>,
    },
    /// An application's message.
    User(UserMessage),
}

/// A message from the primary to a worker on a handoff socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffToWorker {
    /// `count` accepted connections, attached, in non-blocking mode.
    Connections {
        /// How many sockets are attached.
        count: u32,
        /// Their peers' addresses, in the same order, as `accept` reported them (so the worker
        /// need not ask the kernel again); empty when the primary does not know them.
        peers: Vec<PeerAddr>,
    },
    /// One connection another worker handed back between two requests, attached, with the
    /// bytes it had read from it and not answered: the application reads those first.
    /// Acked like a batch of one.
    Resumed {
        /// The peer's address, when the primary knows it.
        peer: Option<PeerAddr>,
        /// Bytes to read before the socket's own (at most [`MAX_UNREAD_LEN`]).
        unread: Vec<u8>,
    },
}

/// A message from a worker to the primary on a handoff socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffToPrimary {
    /// `count` more connections arrived (the oldest un-acked ones, in order); the primary may
    /// close its copies.
    ConnectionsAck {
        /// How many.
        count: u32,
    },
    /// Connections the worker will not serve, attached, for the primary to hand to another
    /// worker.
    ConnectionsReturned {
        /// How many sockets are attached.
        count: u32,
    },
}

impl Message for ToWorker {
    const KIND: Kind = Kind::ToWorker;
}

impl Message for ToPrimary {
    const KIND: Kind = Kind::ToPrimary;
}

impl Message for HandoffToWorker {
    const KIND: Kind = Kind::HandoffToWorker;
}

impl Message for HandoffToPrimary {
    const KIND: Kind = Kind::HandoffToPrimary;
}

/// The most bytes one peer address takes in a `Connections` message (an IPv6 address with
/// its port, flow info and scope id, postcard-encoded, with its variant tag).
const MAX_PEER_WIRE_LEN: usize = 1 + 16 + 3 + 5 + 5;

/// The room a `Connections` message needs besides its peers (variant tag, count, length).
const CONNECTIONS_OVERHEAD: usize = 1 + 5 + 5;

/// The limits of a handoff socket whose worker may hold `window` un-acked connections: a
/// batch carries at most `min(window, 253)` fds (the kernel's limit per message), and a frame
/// has room for that many peer addresses, IPv6 included, or for one `Resumed` connection
/// with its unread bytes. Both ends use the same.
pub fn handoff_limits(window: u32) -> Limits {
    let max_fds = usize::try_from(window)
        .unwrap_or(KERNEL_MAX_FDS)
        .clamp(1, KERNEL_MAX_FDS);
    let batch = CONNECTIONS_OVERHEAD + max_fds * MAX_PEER_WIRE_LEN;
    // A `Resumed`: its tag, the peer (with its option tag) and the unread bytes' length.
    let resumed = 1 + 1 + MAX_PEER_WIRE_LEN + 5 + MAX_UNREAD_LEN;
    let max_frame_len = HEADER_LEN + batch.max(resumed);
    // Always valid: more than a header, far below u32::MAX, at most the kernel's fd limit.
    Limits::new(max_frame_len, max_fds).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_paths_round_trip_even_when_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff.sock"));
        let addr = ListenAddr::unix(path);
        let bytes = postcard::to_stdvec(&addr).unwrap();
        let back: ListenAddr = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.unix_path().as_deref(), Some(path));
    }

    #[test]
    fn a_refusal_becomes_an_io_error_of_the_right_kind() {
        let refused = ListenRefused {
            errno: libc::EADDRINUSE,
            message: "bind 0.0.0.0:80".into(),
        };
        assert_eq!(refused.to_io_error().kind(), std::io::ErrorKind::AddrInUse);
    }
}
