//! Accepted connections, counted while they are open.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crate::state::WorkerState;

/// Counts one open connection of a worker for as long as it lives.
#[derive(Debug)]
pub(crate) struct OpenConnection {
    worker: Arc<WorkerState>,
}

impl OpenConnection {
    pub(crate) fn new(worker: Arc<WorkerState>) -> OpenConnection {
        worker.connection_opened();
        OpenConnection { worker }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.worker.connection_closed();
    }
}

/// A connection accepted by a cluster [`Listener`](crate::Listener).
///
/// It is a [`TcpStream`] (through `Deref`, [`Read`] and [`Write`]) that the worker counts as
/// open until it is dropped: [`Worker::open_connections`](crate::Worker::open_connections)
/// and a disconnecting worker's decision to exit depend on it. [`into_tcp`](Stream::into_tcp)
/// gives up the count and returns the plain `TcpStream`.
#[derive(Debug)]
pub struct Stream {
    tcp: TcpStream,
    _open: OpenConnection,
}

impl Stream {
    pub(crate) fn new(tcp: TcpStream, open: OpenConnection) -> Stream {
        Stream { tcp, _open: open }
    }

    /// The address of the peer.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// The plain `TcpStream`. The worker stops counting this connection as open at once, so a
    /// disconnecting worker may exit while it is still in use: keep the [`Stream`] if the
    /// connection should hold the worker up.
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

impl Deref for Stream {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.tcp).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.tcp).read_vectored(bufs)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.tcp).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.tcp).read_vectored(bufs)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.tcp).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.tcp).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&self.tcp).flush()
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.tcp).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.tcp).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&self.tcp).flush()
    }
}

// Registers the connection's socket, for a stream made non-blocking (as
// `Listener::try_accept` returns it).
cluster_ipc::impl_fd_source!(Stream, |stream| stream.tcp);
