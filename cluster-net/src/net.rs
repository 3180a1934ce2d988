//! `TcpListener` and `TcpStream` that are answered by the primary inside a worker, and plain
//! sockets anywhere else.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// A TCP listener. In a cluster worker, [`bind`](TcpListener::bind) asks the primary, which
/// owns the socket and either hands this worker connections (round-robin) or shares the
/// listening socket with it; anywhere else it is a plain bind. The API is the same.
#[derive(Debug)]
pub struct TcpListener {
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    /// Non-blocking, so that `try_accept` and `mio` work; `accept` waits with `poll`.
    Plain(std::net::TcpListener),
    Cluster(cluster_worker::Listener),
}

impl TcpListener {
    /// Listens on `addr` (the first of its addresses that works, like
    /// `std::net::TcpListener::bind`). In a worker the primary answers: every worker that
    /// binds the same address shares it, `:0` gives every worker the same port, and errors
    /// such as `AddrInUse` or `PermissionDenied` come back as they would from a plain bind.
    pub fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<TcpListener> {
        let Some(worker) = cluster_worker::Worker::current() else {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            return Ok(TcpListener {
                inner: ListenerInner::Plain(listener),
            });
        };
        let mut last_error = None;
        for addr in addr.to_socket_addrs()? {
            match worker.listen(addr, None) {
                Ok(listener) => {
                    return Ok(TcpListener {
                        inner: ListenerInner::Cluster(listener),
                    });
                }
                Err(err) => last_error = Some(io::Error::from(err)),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "could not resolve to any addresses",
            )
        }))
    }

    /// The address listened on (the real port when port 0 was asked).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            ListenerInner::Plain(listener) => listener.local_addr(),
            ListenerInner::Cluster(listener) => listener.local_addr(),
        }
    }

    /// True when the primary answered this listener (this process is a cluster worker).
    pub fn is_clustered(&self) -> bool {
        matches!(self.inner, ListenerInner::Cluster(_))
    }

    /// Waits for a connection. The stream is in blocking mode. In a worker that disconnects,
    /// waiting ends with [`NotConnected`](io::ErrorKind::NotConnected).
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match &self.inner {
            ListenerInner::Plain(listener) => loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        stream.set_nonblocking(false)?;
                        return Ok((TcpStream::plain(stream), peer));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        wait_readable(listener.as_fd(), None)?;
                    }
                    Err(err) => return Err(err),
                }
            },
            ListenerInner::Cluster(listener) => {
                let (stream, peer) = listener.accept()?;
                Ok((TcpStream::cluster(stream), peer))
            }
        }
    }

    /// A connection if one is ready now, else [`WouldBlock`](io::ErrorKind::WouldBlock). The
    /// stream is in non-blocking mode, ready for `mio`.
    pub fn try_accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match &self.inner {
            ListenerInner::Plain(listener) => {
                let (stream, peer) = listener.accept()?;
                stream.set_nonblocking(true)?;
                Ok((TcpStream::plain(stream), peer))
            }
            ListenerInner::Cluster(listener) => {
                let (stream, peer) = listener.try_accept()?;
                Ok((TcpStream::cluster(stream), peer))
            }
        }
    }

    /// The connections as they come (blocking). In a worker the iterator ends when the worker
    /// disconnects, so `for stream in listener.incoming()` ends by itself.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<TcpStream>> + '_ {
        std::iter::from_fn(move || match self.accept() {
            Ok((stream, _)) => Some(Ok(stream)),
            Err(_) if self.is_closed() => None,
            Err(err) => Some(Err(err)),
        })
    }

    /// True once a cluster listener was closed (the worker disconnects); never for a plain one.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            ListenerInner::Plain(_) => false,
            ListenerInner::Cluster(listener) => listener.is_closed(),
        }
    }

    /// This listener for tokio (the `tokio` feature): see [`crate::tokio::TcpListener`].
    /// Call it inside a tokio runtime with I/O enabled; outside one it fails with
    /// [`Other`](io::ErrorKind::Other) (and a cluster listener is closed).
    #[cfg(feature = "tokio")]
    pub fn into_tokio(self) -> io::Result<crate::tokio::TcpListener> {
        match self.inner {
            ListenerInner::Plain(listener) => crate::tokio::TcpListener::from_plain(listener),
            ListenerInner::Cluster(listener) => crate::tokio::TcpListener::from_cluster(listener),
        }
    }
}

#[cfg(feature = "tokio")]
impl TryFrom<TcpListener> for crate::tokio::TcpListener {
    type Error = io::Error;

    /// See [`TcpListener::into_tokio`].
    fn try_from(listener: TcpListener) -> io::Result<crate::tokio::TcpListener> {
        listener.into_tokio()
    }
}

/// The fd that becomes readable when a connection can be taken (the listening socket alone,
/// the worker listener's readiness fd in a cluster); the listener registers it as a `mio`
/// event source, after which [`TcpListener::try_accept`] takes connections until it says
/// `WouldBlock`.
impl AsFd for TcpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            ListenerInner::Plain(listener) => listener.as_fd(),
            ListenerInner::Cluster(listener) => listener.as_fd(),
        }
    }
}

cluster_ipc::impl_fd_source!(TcpListener, |listener| listener.as_fd());

/// Waits until `fd` is readable, or the timeout passes.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(timeout) => PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
    };
    match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// A TCP connection from a [`TcpListener`]. It dereferences to a `std::net::TcpStream` and
/// reads and writes like one; in a worker it also counts as open until dropped, which a
/// disconnecting worker waits for before it exits.
///
/// In a worker a connection may also move: a draining worker gives an idle keep-alive
/// connection back ([`hand_back`](TcpStream::hand_back)) and the primary gives it to another
/// worker, where it arrives with the bytes the first one read and did not answer. The
/// [`Read`] impls (on `TcpStream` and `&TcpStream`) return those first;
/// [`take_unread`](TcpStream::take_unread) takes them out instead (an event loop must, or
/// read, before it waits for the socket to become readable: no readiness announces them).
/// Read through this type, not through the `std::net::TcpStream` it dereferences to.
/// See [`cluster_worker::Stream`].
#[derive(Debug)]
pub struct TcpStream {
    inner: StreamInner,
}

#[derive(Debug)]
enum StreamInner {
    Plain(std::net::TcpStream),
    Cluster(cluster_worker::Stream),
}

impl TcpStream {
    fn plain(stream: std::net::TcpStream) -> TcpStream {
        TcpStream {
            inner: StreamInner::Plain(stream),
        }
    }

    fn cluster(stream: cluster_worker::Stream) -> TcpStream {
        TcpStream {
            inner: StreamInner::Cluster(stream),
        }
    }

    /// The plain `std::net::TcpStream`. In a worker the connection stops counting as open, so
    /// a disconnecting worker may exit while it is still in use. Bytes the connection brought
    /// along and not yet read are dropped (and logged): [`take_unread`](TcpStream::take_unread)
    /// first.
    pub fn into_std(self) -> std::net::TcpStream {
        match self.inner {
            StreamInner::Plain(stream) => stream,
            StreamInner::Cluster(stream) => stream.into_tcp(),
        }
    }

    /// Takes the bytes this connection brought along and not yet read: what another worker
    /// read and did not answer before it handed the connection back. Empty for every other
    /// connection (and always outside a cluster).
    pub fn take_unread(&mut self) -> Vec<u8> {
        match &mut self.inner {
            StreamInner::Plain(_) => Vec::new(),
            StreamInner::Cluster(stream) => stream.take_unread(),
        }
    }

    /// True when [`hand_back`](TcpStream::hand_back) would take this connection now, given
    /// unread bytes that fit (see [`cluster_worker::Stream::can_hand_back`]); always false
    /// outside a cluster.
    pub fn can_hand_back(&self) -> bool {
        match &self.inner {
            StreamInner::Plain(_) => false,
            StreamInner::Cluster(stream) => stream.can_hand_back(),
        }
    }

    /// Gives this connection back to the primary for another worker to serve, when this
    /// worker is draining: call it when the connection is idle between two requests, with the
    /// bytes read of the next request and not answered. See
    /// [`cluster_worker::Stream::hand_back`] for when it is taken; otherwise (always outside a
    /// cluster, or for a shared listener's connection) the stream comes back untouched, and
    /// the caller typically closes it.
    pub fn hand_back(self, unread: &[u8]) -> Result<(), TcpStream> {
        match self.inner {
            StreamInner::Plain(_) => Err(self),
            StreamInner::Cluster(stream) => stream.hand_back(unread).map_err(TcpStream::cluster),
        }
    }
}

impl Deref for TcpStream {
    type Target = std::net::TcpStream;

    fn deref(&self) -> &std::net::TcpStream {
        match &self.inner {
            StreamInner::Plain(stream) => stream,
            StreamInner::Cluster(stream) => stream,
        }
    }
}

impl AsFd for TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        (**self).as_fd()
    }
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

// Through the worker's stream, which returns a handed-back connection's unread bytes first.
impl Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.inner {
            StreamInner::Plain(stream) => (&*stream).read(buf),
            StreamInner::Cluster(stream) => (&*stream).read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match &self.inner {
            StreamInner::Plain(stream) => (&*stream).read_vectored(bufs),
            StreamInner::Cluster(stream) => (&*stream).read_vectored(bufs),
        }
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

// Writes need nothing of the worker's stream: straight to the socket.
impl Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let socket: &std::net::TcpStream = self;
        (&*socket).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let socket: &std::net::TcpStream = self;
        (&*socket).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        let socket: &std::net::TcpStream = self;
        (&*socket).flush()
    }
}

cluster_ipc::impl_fd_source!(TcpStream, |stream| stream.as_fd());
