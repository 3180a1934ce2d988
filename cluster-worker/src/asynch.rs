//! The `tokio` feature: an async listener, stream and messages, for hyper and axum.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};

use crate::stream::OpenConnection;
use crate::sys::{Readiness, register};
use crate::{Listener, Message, Stream, Worker};

/// A cluster [`Listener`] for tokio: [`accept`](AsyncListener::accept) waits without blocking
/// a thread. Made by [`Listener::into_async`] inside a tokio runtime with I/O enabled.
///
/// It keeps the blocking listener's semantics: a round-robin listener acks each batch of
/// connections to the primary before it hands the first one out, every accept attempt
/// beats the worker's heartbeat when one is due (and an idle `accept` wakes for it, which
/// needs the runtime's time driver when the primary asks for heartbeats), and once the
/// listener is closed (the worker disconnects, or [`close`](AsyncListener::close)) `accept`
/// fails with [`NotConnected`](io::ErrorKind::NotConnected).
#[derive(Debug)]
pub struct AsyncListener {
    inner: AsyncFd<Readiness>,
}

impl Listener {
    /// This listener for tokio (see [`AsyncListener`]). Must be called inside a tokio
    /// runtime with I/O enabled; outside one it fails with [`Other`](io::ErrorKind::Other)
    /// (and the listener is closed).
    pub fn into_async(self) -> io::Result<AsyncListener> {
        AsyncListener::new(self)
    }
}

impl AsyncListener {
    /// The same as [`Listener::into_async`].
    pub fn new(listener: Listener) -> io::Result<AsyncListener> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other(
                "an async cluster listener needs a tokio runtime (none is running here)",
            ));
        }
        Ok(AsyncListener {
            inner: register(listener)?,
        })
    }

    /// Waits for a connection: the stream, and its peer's address.
    ///
    /// Cancel-safe: a connection is taken only in the poll that returns it.
    pub async fn accept(&self) -> io::Result<(AsyncStream, SocketAddr)> {
        let listener = &self.inner.get_ref().0;
        loop {
            let due_in = listener.heartbeat();
            let ready = match due_in {
                None => self.inner.readable().await,
                Some(due_in) => {
                    match tokio::time::timeout(due_in, self.inner.readable()).await {
                        Ok(ready) => ready,
                        // A heartbeat is due: beat, and wait again.
                        Err(_) => continue,
                    }
                }
            };
            let mut guard = ready?;
            // `try_io` clears the readiness only when the listener says `WouldBlock`, so no
            // wake-up is lost between the attempt and the next wait.
            match guard.try_io(|inner| inner.get_ref().0.try_accept()) {
                Ok(Ok((stream, peer))) => return Ok((AsyncStream::new(stream)?, peer)),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    /// The address the primary bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.get_ref().0.local_addr()
    }

    /// True once the listener is closed (the worker disconnects, or it was closed).
    pub fn is_closed(&self) -> bool {
        self.inner.get_ref().0.is_closed()
    }

    /// Stops accepting (see [`Listener::close`]); a waiting `accept` fails.
    pub fn close(&self) {
        self.inner.get_ref().0.close();
    }

    /// The blocking listener back, out of the runtime.
    pub fn into_inner(self) -> Listener {
        self.inner.into_inner().0
    }
}

/// The listener's readiness fd (see [`Listener`]'s `AsFd`).
impl AsFd for AsyncListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().0.as_fd()
    }
}

/// A connection from an [`AsyncListener`]: a `tokio::net::TcpStream` that the worker counts
/// as open until it is dropped (a disconnecting worker waits for it before it exits), and
/// that reads the bytes a handed-back connection brought along before the socket's.
///
/// It cannot be handed back itself (use the blocking [`Stream`] for that).
#[derive(Debug)]
pub struct AsyncStream {
    tcp: tokio::net::TcpStream,
    /// What another worker read and did not answer, and how much of it was read here.
    unread: Vec<u8>,
    read: usize,
    _open: OpenConnection,
}

impl AsyncStream {
    /// Makes a cluster [`Stream`] async, keeping its place in the open-connection count and
    /// the bytes it brought along. Must be called inside a tokio runtime with I/O enabled.
    pub fn new(stream: Stream) -> io::Result<AsyncStream> {
        let (tcp, unread, open, _listener) = stream.into_parts();
        tcp.set_nonblocking(true)?;
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        Ok(AsyncStream {
            tcp,
            unread,
            read: 0,
            _open: open,
        })
    }

    /// The address of the peer.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Takes the bytes this connection brought along and not yet read (see
    /// [`Stream::take_unread`]); reads go to the socket after this.
    pub fn take_unread(&mut self) -> Vec<u8> {
        let mut left = std::mem::take(&mut self.unread);
        left.drain(..self.read);
        self.read = 0;
        left
    }

    /// The tokio stream underneath, for its options (`set_nodelay`, ...). Read through the
    /// `AsyncStream`, not this, or the bytes it brought along are skipped.
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.tcp
    }
}

impl AsFd for AsyncStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}

impl AsyncRead for AsyncStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let left = this.unread.get(this.read..).unwrap_or_default();
        if !left.is_empty() && buf.remaining() > 0 {
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.read += n;
            if this.read == this.unread.len() {
                this.unread = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for AsyncStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Messages from the primary, received with `.await`: see [`Worker::messages`].
#[derive(Debug)]
pub struct AsyncMessages {
    rx: mpsc::UnboundedReceiver<Message>,
}

impl AsyncMessages {
    /// The next message from the primary, in order; `None` once the control channel is
    /// closed and every message was received. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A message if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}

impl Worker {
    /// Resolves once the worker is disconnecting, whatever made it (at once if it already
    /// is), after its listeners are closed: the graceful-shutdown signal of a server, e.g.
    /// axum's `with_graceful_shutdown(worker.disconnected())`. Needs no runtime of its own:
    /// any executor can poll it.
    pub fn disconnected(&self) -> impl Future<Output = ()> + Send + 'static {
        let sender = self.state.disconnected.get_or_init(|| {
            let sender = Arc::new(watch::channel(false).0);
            let setter = Arc::clone(&sender);
            self.on_disconnect(move |_| {
                setter.send_replace(true);
            });
            sender
        });
        let mut rx = sender.subscribe();
        async move {
            // An error means the worker's state is gone, which it is only after the end.
            let _ = rx.wait_for(|disconnecting| *disconnecting).await;
        }
    }

    /// The messages from the primary as an async stream: sets the worker's
    /// [`on_message`](Worker::on_message) callback (replacing any earlier one) to queue each
    /// message, unbounded, for [`AsyncMessages::recv`]. Messages already queued for
    /// [`recv_message`](Worker::recv_message) come first, in order. Messages that arrive
    /// after the `AsyncMessages` is dropped are dropped too.
    ///
    /// Sending needs nothing async: [`send`](Worker::send) queues the message for the
    /// control thread and returns at once (it waits only while more than 4 MiB of messages
    /// wait for a primary that does not read).
    pub fn messages(&self) -> AsyncMessages {
        let (tx, rx) = mpsc::unbounded_channel();
        self.on_message(move |message| {
            let _ = tx.send(message);
        });
        AsyncMessages { rx }
    }
}

// Servers move these across tasks and threads (axum needs `Send + Unpin` streams).
const _: () = {
    const fn assert_send_sync_unpin<T: Send + Sync + Unpin>() {}
    assert_send_sync_unpin::<AsyncListener>();
    assert_send_sync_unpin::<AsyncStream>();
    assert_send_sync_unpin::<AsyncMessages>();
};
