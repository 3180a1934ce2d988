//! Cluster listeners: what [`Worker::listen`](crate::Worker::listen) returns.
//!
//! Two kinds sit behind one type. A *round-robin* listener reads connections the primary
//! accepted from a handoff socket ([`handoff`]); a *shared* listener accepts on the listening
//! socket every worker holds ([`shared`]). Either can be closed by another thread (the
//! control thread, on disconnect) while a thread is blocked in `accept`: the blocked call
//! wakes and reports the listener closed. Closing never closes an fd another thread could be
//! polling; fds close when the last owner drops them.

mod handoff;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod shared;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_ipc::ErrorChain;
use cluster_ipc::ListenerId;
use cluster_ipc::proto::{Delivery, ListenAddr, ListenGranted};
use nix::poll::PollTimeout;

use crate::Error;
use crate::state::{Command, WorkerState, deadline_after};
use crate::stream::{OpenConnection, Stream};

/// What delivers a listener's connections.
// One per listener, behind an `Arc`: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Handoff(handoff::Handoff),
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Shared(shared::SharedSocket),
}

/// The state of one listener, shared by the application's [`Listener`] and (weakly) the
/// worker's control thread, which closes it on disconnect.
pub(crate) struct ListenerCore {
    id: ListenerId,
    local_addr: SocketAddr,
    worker: Arc<WorkerState>,
    kind: Kind,
    /// Someone has taken on telling the primary that this listener closed (`CloseListener`);
    /// it must be said once.
    close_announced: AtomicBool,
}

/// A connection taken from a listener, not yet wrapped.
pub(crate) struct Taken {
    pub(crate) tcp: TcpStream,
    /// Its place in the open-connection count, taken while the listener could not close, so
    /// that a disconnecting worker never exits between the two.
    pub(crate) open: OpenConnection,
    /// Its peer's address, when the listener already knows it.
    pub(crate) peer: Option<SocketAddr>,
    /// Bytes to read before the socket's (a connection another worker handed back).
    pub(crate) unread: Vec<u8>,
}

impl ListenerCore {
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn is_closed(&self) -> bool {
        match &self.kind {
            Kind::Handoff(handoff) => handoff.is_closed(),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(shared) => shared.is_closed(),
        }
    }

    /// Stops accepting (idempotent), and returns true if the caller is the one to tell the
    /// primary (`CloseListener`).
    pub(crate) fn shut(&self) -> bool {
        match &self.kind {
            Kind::Handoff(handoff) => handoff.close(),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(shared) => shared.close(),
        };
        !self.close_announced.swap(true, Ordering::AcqRel)
    }

    /// Stops accepting, and has the control thread tell the primary.
    fn shut_and_announce(&self) {
        if self.shut() {
            // If the control thread is gone the primary is too; nobody needs telling.
            let _ = self.worker.push(Command::CloseListener(self.id));
        }
    }

    /// One connection if one is ready; `Ok(None)` if not.
    fn take(&self, nonblocking: bool) -> Result<Option<Taken>, Error> {
        let taken = match &self.kind {
            Kind::Handoff(handoff) => handoff.take(&self.worker, nonblocking),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(shared) => shared.take(&self.worker, nonblocking),
        };
        if taken.is_err() && self.is_closed() {
            // The listener closed itself (the primary closed the handoff socket, or broke
            // the protocol on it); the primary must hear that this worker let go of it.
            self.shut_and_announce();
        }
        taken
    }

    fn wait(&self, timeout: PollTimeout) -> Result<(), Error> {
        match &self.kind {
            Kind::Handoff(handoff) => handoff.wait(timeout),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(shared) => shared.wait(timeout),
        }
    }

    /// One connection with its peer's address if one is ready. A connection whose peer is
    /// already gone (no address to report) is dropped and the next one taken. A blocking
    /// accept is the serving path at work, and beats the worker's heartbeat when one is due;
    /// a non-blocking one does not: an event loop calls it only when a connection came, so
    /// its beats would stop whenever the server is idle and make it look hung. Event loops
    /// beat with [`Worker::heartbeat`](crate::Worker::heartbeat) once per turn.
    fn take_with_addr(&self, nonblocking: bool) -> Result<Option<(Stream, SocketAddr)>, Error> {
        if !nonblocking {
            self.worker.heartbeat();
        }
        // Only a round-robin listener's connections can be handed back: the primary holds
        // nothing of a shared listener's.
        let origin = matches!(self.kind, Kind::Handoff(_)).then_some(self.id);
        loop {
            let Some(taken) = self.take(nonblocking)? else {
                return Ok(None);
            };
            let addr = match taken.peer {
                Some(addr) => Ok(addr),
                None => taken.tcp.peer_addr(),
            };
            match addr {
                Ok(addr) => {
                    let stream = Stream::new(taken.tcp, taken.open, origin, taken.unread);
                    return Ok(Some((stream, addr)));
                }
                Err(err) => {
                    tracing::debug!(
                        listener = self.id.0,
                        error = %ErrorChain(&err),
                        "dropping a connection whose peer is already gone"
                    );
                }
            }
        }
    }

    /// Waits for a connection until `deadline` (for ever with `None`), waking at least once
    /// per heartbeat interval so that an idle worker still says it is alive.
    fn accept_until(&self, deadline: Option<Instant>) -> Result<(Stream, SocketAddr), Error> {
        loop {
            if let Some(accepted) = self.take_with_addr(false)? {
                return Ok(accepted);
            }
            let timeout = poll_timeout(deadline)?;
            let timeout = match self.worker.heartbeat_due_in() {
                Some(due_in) => shorter(timeout, rounded_up(due_in)),
                None => timeout,
            };
            self.wait(timeout)?;
        }
    }
}

impl std::fmt::Debug for ListenerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Handoff(_) => "round-robin",
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(_) => "shared",
        };
        f.debug_struct("Listener")
            .field("id", &self.id.0)
            .field("local_addr", &self.local_addr)
            .field("kind", &kind)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The time left until `deadline` as a poll timeout, rounded up so that a sub-millisecond
/// remainder does not spin; an error once it has passed.
fn poll_timeout(deadline: Option<Instant>) -> Result<PollTimeout, Error> {
    let Some(deadline) = deadline else {
        return Ok(PollTimeout::NONE);
    };
    let left = cluster_ipc::deadline::left(deadline).ok_or_else(|| {
        Error::io(
            "accept",
            io::Error::new(io::ErrorKind::TimedOut, "no connection before the deadline"),
        )
    })?;
    Ok(rounded_up(left))
}

/// `duration` as a poll timeout in whole milliseconds, rounded up (poll's own conversion
/// rounds down, and a 0 ms poll would spin until the time comes).
fn rounded_up(duration: Duration) -> PollTimeout {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
}

/// The shorter of two poll timeouts (`NONE` is for ever).
fn shorter(a: PollTimeout, b: PollTimeout) -> PollTimeout {
    // `PollTimeout::as_millis` panics on `NONE` (nix 0.32 converts the -1 before it looks),
    // so the infinite cases are settled first.
    if a.is_none() {
        return b;
    }
    if b.is_none() {
        return a;
    }
    match (a.as_millis(), b.as_millis()) {
        (Some(x), Some(y)) if x > y => b,
        _ => a,
    }
}

/// A listener granted by the primary: round-robin or shared, used like a `TcpListener`.
///
/// [`accept`](Listener::accept) blocks (the stream it returns is blocking);
/// [`try_accept`](Listener::try_accept) never blocks (the stream it returns is
/// non-blocking) and suits an event loop, for which the listener is a
/// [`mio::event::Source`]: register it for `READABLE` and call `try_accept` until it reports
/// [`WouldBlock`](io::ErrorKind::WouldBlock).
///
/// Once the listener is closed, by [`close`](Listener::close), by dropping it, by the worker's
/// disconnect or by the primary, `accept` (even one already blocked in another thread) fails
/// with [`NotConnected`](io::ErrorKind::NotConnected) and [`incoming`](Listener::incoming)
/// ends. A primary that breaks the protocol on a round-robin listener's handoff socket
/// closes the listener too; the `accept` that met the error returns it
/// ([`InvalidData`](io::ErrorKind::InvalidData), wrapping this crate's [`Error`]). Connections a round-robin listener had received but not handed out go back to the
/// primary, which gives them to another worker.
#[derive(Debug)]
pub struct Listener {
    core: Arc<ListenerCore>,
}

impl Listener {
    /// Builds the listener the primary granted, from the fd that came with the grant.
    pub(crate) fn from_grant(
        worker: Arc<WorkerState>,
        granted: &ListenGranted,
        fd: OwnedFd,
    ) -> Result<Listener, Error> {
        let ListenAddr::Tcp(local_addr) = granted.local_addr else {
            return Err(Error::protocol(
                "setting up a listener",
                format!("a TCP listen was granted {:?}", granted.local_addr),
            ));
        };
        let kind = match granted.delivery {
            Delivery::Handoff { window } => Kind::Handoff(handoff::Handoff::new(
                fd,
                window,
                worker.options.request_timeout,
            )?),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Delivery::Shared => Kind::Shared(shared::SharedSocket::new(fd)?),
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            Delivery::Shared => {
                return Err(Error::Unsupported {
                    what: "shared listeners outside Linux",
                });
            }
            Delivery::ReusePort => {
                return Err(Error::protocol(
                    "setting up a listener",
                    "reuse-port delivery is not served by this worker yet",
                ));
            }
        };
        Ok(Listener {
            core: Arc::new(ListenerCore {
                id: granted.listener,
                local_addr,
                worker,
                kind,
                close_announced: AtomicBool::new(false),
            }),
        })
    }

    pub(crate) fn core(&self) -> &Arc<ListenerCore> {
        &self.core
    }

    /// The id the primary gave this listener.
    pub fn id(&self) -> ListenerId {
        self.core.id
    }

    /// The address the primary bound (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.core.local_addr)
    }

    /// True for a round-robin listener (the primary accepts and hands connections over),
    /// false for a shared one (the worker accepts on the shared socket).
    pub fn is_round_robin(&self) -> bool {
        matches!(self.core.kind, Kind::Handoff(_))
    }

    /// Waits for a connection. The stream is in blocking mode.
    ///
    /// Every blocking accept (this one, [`accept_timeout`](Listener::accept_timeout),
    /// [`incoming`](Listener::incoming)) also sends the worker's heartbeat when one is due (see
    /// [`Worker::heartbeat`](crate::Worker::heartbeat)), and wakes for it while it waits.
    /// [`try_accept`](Listener::try_accept) does not: an event-loop server calls
    /// `Worker::heartbeat` once per turn instead.
    pub fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        Ok(self.core.accept_until(None)?)
    }

    /// Waits up to `timeout` for a connection; [`TimedOut`](io::ErrorKind::TimedOut) if none
    /// came. The stream is in blocking mode.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<(Stream, SocketAddr)> {
        Ok(self.core.accept_until(Some(deadline_after(timeout)))?)
    }

    /// A connection if one is ready now, else [`WouldBlock`](io::ErrorKind::WouldBlock). The
    /// stream is in non-blocking mode.
    pub fn try_accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self.core.take_with_addr(true)? {
            Some(accepted) => Ok(accepted),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// The connections as they come (blocking), like `TcpListener::incoming`; the iterator
    /// ends once the listener is closed, so a `for` loop over it ends when the worker
    /// disconnects.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// The worker's heartbeat, for the async accept (see [`Worker::heartbeat`]).
    ///
    /// [`Worker::heartbeat`]: crate::Worker::heartbeat
    #[cfg(feature = "tokio")]
    pub(crate) fn heartbeat(&self) -> Option<Duration> {
        self.core.worker.heartbeat();
        self.core.worker.heartbeat_due_in()
    }

    /// True once the listener is closed.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Stops accepting, gives back to the primary what it will not serve, and tells the
    /// primary. Threads blocked in [`accept`](Listener::accept) wake with an error. Dropping
    /// the listener does the same.
    pub fn close(&self) {
        self.core.shut_and_announce();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.core.shut_and_announce();
    }
}

/// The fd that becomes readable when a connection can be taken: the handoff socket of a
/// round-robin listener, the private epoll instance of a shared one. It also becomes readable
/// when the listener closes, so that a loop learns of it from `try_accept`. This is what the
/// listener registers as a `mio` event source; poll it to wait for connections.
impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.core.kind {
            Kind::Handoff(handoff) => handoff.readiness_fd(),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Kind::Shared(shared) => shared.readiness_fd(),
        }
    }
}

cluster_ipc::impl_fd_source!(Listener, |listener| std::os::fd::AsFd::as_fd(listener));

/// The iterator of [`Listener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<Stream>;

    fn next(&mut self) -> Option<io::Result<Stream>> {
        match self.listener.core.accept_until(None) {
            Ok((stream, _)) => Some(Ok(stream)),
            Err(_) if self.listener.is_closed() => None,
            Err(err) => Some(Err(err.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shorter_timeout_wins_and_none_is_for_ever() {
        let ms = |n: u16| PollTimeout::from(n);
        assert_eq!(shorter(PollTimeout::NONE, ms(5)), ms(5));
        assert_eq!(shorter(ms(5), PollTimeout::NONE), ms(5));
        assert_eq!(
            shorter(PollTimeout::NONE, PollTimeout::NONE),
            PollTimeout::NONE
        );
        assert_eq!(shorter(ms(3), ms(5)), ms(3));
        assert_eq!(shorter(ms(5), ms(3)), ms(3));
    }

    #[test]
    fn timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(
            rounded_up(Duration::from_micros(1)),
            PollTimeout::from(1u16)
        );
        assert_eq!(
            rounded_up(Duration::from_millis(7)),
            PollTimeout::from(7u16)
        );
        assert_eq!(rounded_up(Duration::from_secs(u64::MAX)), PollTimeout::MAX);
    }
}
