//! Round-robin delivery: connections the primary accepted arrive in batches on a handoff
//! socket.
//!
//! The conversation (see `cluster_ipc::proto`): the primary sends `Connections { count }`
//! with `count` sockets attached; the worker answers `ConnectionsAck { count }` as soon as
//! `recvmsg` returned them, before any reaches the application, keeps them in a local FIFO and
//! hands them out one by one. It reads the next batch only once the FIFO is empty, so the
//! primary's credit window bounds what waits in this worker. A connection another worker
//! handed back comes alone, as `Resumed` with the bytes that worker read and did not answer;
//! it is acked like a batch of one (`ConnectionsAck { count: 1 }`, in turn with the batches:
//! the primary matches acks to what it sent in order) and its stream reads those bytes first.
//! To close, the worker sends the connections still in its FIFO back (`ConnectionsReturned`,
//! fds attached) and shuts the socket down, so that the primary reads to the end before it
//! re-dispatches anything. A resumed connection is never among them: it arrives alone and is
//! handed out by the `take` that read it (`ConnectionsReturned` could not carry its bytes).
//!
//! The socket is a typed channel ([`WorkerHandoff`]) with the limits both ends derive from
//! the window ([`handoff_limits`]). A frame that does not belong on it (a control-channel
//! message, the wrong direction: `WrongKind`), garbage, or a malformed batch is a protocol
//! error: the listener closes, and the `accept` that met it returns the error.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_ipc::proto::{
    Envelope, HandoffToPrimary, HandoffToWorker, MAX_UNREAD_LEN, WorkerHandoff, handoff_limits,
};
use cluster_ipc::{Channel, ErrorChain};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Taken;
use crate::Error;
use crate::state::{WorkerState, deadline_after, lock};
use crate::stream::OpenConnection;

/// An acked connection not yet handed out.
struct Queued {
    fd: OwnedFd,
    /// The peer's address, when the primary said.
    peer: Option<SocketAddr>,
    /// What another worker read from it and did not answer (a `Resumed` connection).
    unread: Vec<u8>,
}

struct State {
    channel: Channel<WorkerHandoff>,
    fifo: VecDeque<Queued>,
    closed: bool,
}

/// A round-robin listener's handoff socket.
pub(super) struct Handoff {
    state: Mutex<State>,
    /// A second fd for the same socket, polled by blocked `accept`s outside the lock (and
    /// registered with mio). Shutting the socket down wakes every poller; the fd itself closes
    /// only when the listener is dropped, so nobody ever polls a closed (or reused) number.
    poll_fd: OwnedFd,
    /// How long a send on the handoff socket may wait for a primary that is not reading.
    send_timeout: Duration,
}

impl Handoff {
    pub(super) fn new(fd: OwnedFd, window: u32, send_timeout: Duration) -> Result<Handoff, Error> {
        // The same limits the primary uses for this socket: room for a whole batch.
        let channel =
            Channel::from_fd(fd, handoff_limits(window))?.into_protocol::<WorkerHandoff>();
        let poll_fd = channel
            .as_fd()
            .try_clone_to_owned()
            .map_err(|err| Error::io("fcntl(F_DUPFD_CLOEXEC)", err))?;
        Ok(Handoff {
            state: Mutex::new(State {
                channel,
                fifo: VecDeque::new(),
                closed: false,
            }),
            poll_fd,
            send_timeout,
        })
    }

    pub(super) fn readiness_fd(&self) -> BorrowedFd<'_> {
        self.poll_fd.as_fd()
    }

    pub(super) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The next connection, reading a new batch when the FIFO is empty; `Ok(None)` when
    /// nothing is there. The connection is counted as open before the lock is released, so
    /// a disconnect that closes this listener cannot slip in between.
    pub(super) fn take(
        &self,
        worker: &Arc<WorkerState>,
        nonblocking: bool,
    ) -> Result<Option<Taken>, Error> {
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return Err(Error::ListenerClosed);
            }
            if let Some(Queued { fd, peer, unread }) = state.fifo.pop_front() {
                let open = OpenConnection::new(Arc::clone(worker));
                drop(state);
                let tcp = TcpStream::from(fd);
                // Connections arrive non-blocking (the primary accepts with SOCK_NONBLOCK);
                // this socket's open file is this connection's alone, so changing it for the
                // blocking API is safe (and the non-blocking one needs no system call).
                if !nonblocking {
                    tcp.set_nonblocking(false)
                        .map_err(|err| Error::io("fcntl(F_SETFL)", err))?;
                }
                return Ok(Some(Taken {
                    tcp,
                    open,
                    peer,
                    unread,
                }));
            }
            match state.channel.try_recv() {
                Ok(None) => return Ok(None),
                Ok(Some(batch)) => self.accept_batch(&mut state, batch)?,
                Err(cluster_ipc::Error::Closed) => {
                    tracing::debug!("the primary closed the handoff socket");
                    self.close_locked(&mut state);
                    return Err(Error::ListenerClosed);
                }
                Err(err) => {
                    // A frame that does not belong here (`WrongKind`), garbage, a broken
                    // socket: the channel has closed itself, and so does the listener.
                    tracing::error!(
                        error = %ErrorChain(&err),
                        "handoff socket failed: closing the listener"
                    );
                    self.close_locked(&mut state);
                    return Err(Error::Ipc(err));
                }
            }
        }
    }

    /// Checks a batch (or a resumed connection, a batch of one), acks it, and queues its
    /// connections. A malformed batch closes the listener: its fds were not acked, so the
    /// primary still owns them.
    fn accept_batch(
        &self,
        state: &mut State,
        batch: Envelope<HandoffToWorker>,
    ) -> Result<(), Error> {
        let queued = match check_batch(batch) {
            Ok(queued) => queued,
            Err(err) => {
                tracing::error!(error = %ErrorChain(&err), "bad batch on the handoff socket: closing the listener");
                self.close_locked(state);
                return Err(err);
            }
        };
        if queued.is_empty() {
            return Ok(());
        }
        // At most the kernel's fd limit per frame: fits.
        let count = u32::try_from(queued.len()).unwrap_or(u32::MAX);
        let ack = HandoffToPrimary::ConnectionsAck { count };
        let deadline = Some(deadline_after(self.send_timeout));
        if let Err(err) = state.channel.send_blocking(None, &ack, &[], deadline) {
            tracing::warn!(error = %ErrorChain(&err), "cannot ack a batch: closing the listener");
            drop(queued);
            self.close_locked(state);
            return Err(Error::protocol(
                "acking connections",
                ErrorChain(&err).to_string(),
            ));
        }
        tracing::trace!(count, "acked a batch of connections");
        state.fifo.extend(queued);
        Ok(())
    }

    /// Waits until the socket has something to read (or is shut down) or the timeout passes.
    pub(super) fn wait(&self, timeout: PollTimeout) -> Result<(), Error> {
        let mut fds = [PollFd::new(self.poll_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(errno) => Err(Error::errno("poll", errno)),
        }
    }

    /// Closes the listener; returns false if it already was.
    pub(super) fn close(&self) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        self.close_locked(&mut state);
        true
    }

    fn close_locked(&self, state: &mut State) {
        if state.closed {
            return;
        }
        state.closed = true;
        let unserved: Vec<OwnedFd> = state
            .fifo
            .drain(..)
            .map(|queued| {
                // Resumed connections are handed out as soon as they are read (see the module
                // docs): returned, their bytes would be lost.
                debug_assert!(
                    queued.unread.is_empty(),
                    "a resumed connection was left unserved"
                );
                queued.fd
            })
            .collect();
        if !state.channel.is_closed() {
            self.return_connections(&mut state.channel, &unserved);
        }
        // Both directions: the primary reads to the end of what we sent and then sees end of
        // file; anything it still sends fails there instead of piling up here.
        let _ = nix::sys::socket::shutdown(
            state.channel.as_fd().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        // Batches the primary sent that were never read (so never acked) sit in this socket's
        // receive queue, and every fd in them keeps its connection open for as long as the
        // socket lives, which is as long as the application keeps the `Listener` (`poll_fd`
        // is a dup). The primary gives those connections to another worker once it reads our
        // end of file; if we kept them, their clients would never see the connection close
        // after that worker answered. So read them now and close our copies. Nothing more
        // can arrive: after the shutdown the primary's sends fail.
        let mut discarded = 0;
        while let Ok(Some(batch)) = state.channel.try_recv() {
            discarded += batch.fds.len();
        }
        tracing::debug!(
            returned = unserved.len(),
            discarded,
            "round-robin listener closed"
        );
        // Dropping `unserved` closes this worker's copies; the primary has its own.
    }

    /// Sends the connections this worker will not serve back to the primary, in frames of at
    /// most the fd limit (always at least one frame, so the primary sees the close in order).
    fn return_connections(&self, channel: &mut Channel<WorkerHandoff>, unserved: &[OwnedFd]) {
        let max_fds = channel.limits().max_fds().max(1);
        let deadline = Some(deadline_after(self.send_timeout));
        let mut chunks: Vec<&[OwnedFd]> = unserved.chunks(max_fds).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(AsFd::as_fd).collect();
            let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
            let returned = HandoffToPrimary::ConnectionsReturned { count };
            if let Err(err) = channel.send_blocking(None, &returned, &fds, deadline) {
                // The primary is gone or stuck; it will re-dispatch what it never saw acked,
                // and what it did see acked is lost with this worker.
                tracing::warn!(error = %ErrorChain(&err), count, "could not return connections to the primary");
                return;
            }
        }
    }
}

/// The connections of a `Connections` batch or a `Resumed` one, checked against the fds
/// that came with it.
fn check_batch(batch: Envelope<HandoffToWorker>) -> Result<Vec<Queued>, Error> {
    const CONTEXT: &str = "receiving connections";
    let fds = batch.fds;
    match batch.msg {
        HandoffToWorker::Connections { count, peers } => {
            if usize::try_from(count).ok() != Some(fds.len()) {
                return Err(Error::protocol(
                    CONTEXT,
                    format!(
                        "a batch announced {count} connections but carried {} fds",
                        fds.len()
                    ),
                ));
            }
            if !peers.is_empty() && peers.len() != fds.len() {
                return Err(Error::protocol(
                    CONTEXT,
                    format!("a batch of {count} connections named {} peers", peers.len()),
                ));
            }
            // Peer addresses come with the batch, or not at all (the worker then asks the
            // kernel).
            let mut peers = peers.into_iter().map(|peer| Some(peer.0));
            Ok(fds
                .into_iter()
                .map(|fd| Queued {
                    fd,
                    peer: peers.next().flatten(),
                    unread: Vec::new(),
                })
                .collect())
        }
        HandoffToWorker::Resumed { peer, unread } => {
            let Ok([fd]) = <[OwnedFd; 1]>::try_from(fds) else {
                return Err(Error::protocol(
                    CONTEXT,
                    "a resumed connection must carry exactly one fd",
                ));
            };
            if unread.len() > MAX_UNREAD_LEN {
                return Err(Error::protocol(
                    CONTEXT,
                    format!(
                        "a resumed connection carried {} unread bytes (at most {MAX_UNREAD_LEN})",
                        unread.len()
                    ),
                ));
            }
            Ok(vec![Queued {
                fd,
                peer: peer.map(|peer| peer.0),
                unread,
            }])
        }
    }
}
