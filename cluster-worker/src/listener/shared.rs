//! Shared delivery: every worker accepts on the one listening socket the primary bound.
//!
//! The socket's `O_NONBLOCK` lives on the open file every worker shares, so it is never
//! changed here: the primary made it non-blocking and every `accept4` here is non-blocking.
//! Waiting goes through a private epoll instance in which the socket is registered with
//! `EPOLLEXCLUSIVE`, so a new connection wakes one waiting worker instead of all of them (the
//! thundering herd). An eventfd, registered without `EPOLLEXCLUSIVE`, wakes every waiter
//! when the listener closes.

use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{self, SockFlag, SockType, sockopt};

use super::Taken;
use crate::Error;
use crate::state::{WorkerState, lock};
use crate::stream::OpenConnection;

const SOCKET_EVENT: u64 = 0;
const CLOSE_EVENT: u64 = 1;

/// A shared listening socket with its private epoll instance.
pub(super) struct SharedSocket {
    socket: OwnedFd,
    epoll: Epoll,
    close_event: EventFd,
    /// Held across each `accept4` and the count of the connection it returns, so that a
    /// disconnect (which takes it to close) never sees an accepted connection uncounted.
    closed: Mutex<bool>,
}

impl SharedSocket {
    pub(super) fn new(socket: OwnedFd) -> Result<SharedSocket, Error> {
        check_listening_socket(socket.as_fd())?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|errno| Error::errno("epoll_create1", errno))?;
        let exclusive = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE,
            SOCKET_EVENT,
        );
        match epoll.add(&socket, exclusive) {
            Ok(()) => {}
            // Kernels before 4.5, and some sandboxes (gVisor), refuse the flag: accept then
            // works, only with every waiting worker woken for each connection.
            Err(Errno::EINVAL) => {
                tracing::warn!(
                    "EPOLLEXCLUSIVE is not supported; every worker wakes per connection"
                );
                epoll
                    .add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, SOCKET_EVENT))
                    .map_err(|errno| Error::errno("epoll_ctl", errno))?;
            }
            Err(errno) => return Err(Error::errno("epoll_ctl(EPOLLEXCLUSIVE)", errno)),
        }
        let close_event = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|errno| Error::errno("eventfd", errno))?;
        epoll
            .add(
                &close_event,
                EpollEvent::new(EpollFlags::EPOLLIN, CLOSE_EVENT),
            )
            .map_err(|errno| Error::errno("epoll_ctl", errno))?;
        Ok(SharedSocket {
            socket,
            epoll,
            close_event,
            closed: Mutex::new(false),
        })
    }

    pub(super) fn readiness_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    pub(super) fn is_closed(&self) -> bool {
        *lock(&self.closed)
    }

    /// Accepts one connection if one is waiting; `Ok(None)` if none is.
    pub(super) fn take(
        &self,
        worker: &Arc<WorkerState>,
        nonblocking: bool,
    ) -> Result<Option<Taken>, Error> {
        let closed = lock(&self.closed);
        if *closed {
            return Err(Error::ListenerClosed);
        }
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblocking {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        loop {
            match socket::accept4(&self.socket, flags) {
                Ok(fd) => {
                    let open = OpenConnection::new(Arc::clone(worker));
                    drop(closed);
                    return Ok(Some(Taken {
                        tcp: TcpStream::from(fd),
                        open,
                        peer: None,
                        unread: Vec::new(),
                    }));
                }
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(Error::errno("accept4", errno)),
            }
        }
    }

    /// Waits until a connection may be waiting, the listener closes, or the timeout passes.
    pub(super) fn wait(&self, timeout: PollTimeout) -> Result<(), Error> {
        let mut events = [EpollEvent::empty(); 2];
        match self.epoll.wait(&mut events, timeout) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(errno) => Err(Error::errno("epoll_wait", errno)),
        }
    }

    /// Stops accepting; returns false if already closed.
    pub(super) fn close(&self) -> bool {
        let mut closed = lock(&self.closed);
        if *closed {
            return false;
        }
        *closed = true;
        drop(closed);
        // Out of the socket's wait queue, so that an exclusive wake-up goes to a worker that
        // still accepts instead of being swallowed here.
        if let Err(errno) = self.epoll.delete(&self.socket) {
            tracing::warn!(error = %errno, "cannot remove the shared socket from epoll");
        }
        // Level-triggered and never read: every waiter, now and later, wakes.
        if let Err(errno) = self.close_event.write(1) {
            tracing::warn!(error = %errno, "cannot wake threads waiting on a closed listener");
        }
        tracing::debug!("shared listener closed");
        true
    }
}

/// A shared listener's fd must be a listening TCP socket, already non-blocking.
fn check_listening_socket(fd: BorrowedFd<'_>) -> Result<(), Error> {
    const CONTEXT: &str = "setting up a shared listener";
    let sock_type = socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|errno| Error::protocol(CONTEXT, format!("the fd is not a socket ({errno})")))?;
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|errno| Error::errno("getsockopt(SO_ACCEPTCONN)", errno))?;
    if sock_type != SockType::Stream || !listening {
        return Err(Error::protocol(
            CONTEXT,
            "the fd is not a listening stream socket",
        ));
    }
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|errno| Error::errno("fcntl", errno))?;
    if !OFlag::from_bits_retain(flags).contains(OFlag::O_NONBLOCK) {
        // Changing it would change every worker's socket; accepting on a blocking one could
        // hang this worker with its lock held.
        return Err(Error::protocol(
            CONTEXT,
            "the shared socket is not non-blocking",
        ));
    }
    Ok(())
}
