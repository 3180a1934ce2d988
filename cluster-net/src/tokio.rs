//! Async `TcpListener` and `TcpStream` on tokio (the `tokio` feature): answered by the
//! primary inside a worker, plain tokio sockets anywhere else.
//!
//! They need a tokio runtime with I/O (and time) enabled: the one
//! [`Builder::run_async`](crate::Builder::run_async) builds, or one of your own made in the
//! worker (after the worker started, never in the primary).

use std::io::{self, IoSlice};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use cluster_worker::{AsyncListener, AsyncStream};

/// An async TCP listener. In a cluster worker, [`bind`](TcpListener::bind) asks the primary
/// (as the blocking [`crate::TcpListener::bind`] does) and accepts through the worker's
/// async listener; anywhere else it wraps a `tokio::net::TcpListener`.
#[derive(Debug)]
pub struct TcpListener {
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Plain(::tokio::net::TcpListener),
    Cluster(AsyncListener),
}

impl TcpListener {
    /// Listens on `addr`; see [`crate::TcpListener::bind`]. It does not wait: in a worker it
    /// is a quick request to the primary (which the runtime thread waits for, briefly), and
    /// alone a plain bind. Call it inside a tokio runtime with I/O enabled; outside one it
    /// fails with [`Other`](io::ErrorKind::Other).
    pub fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<TcpListener> {
        crate::TcpListener::bind(addr)?.into_tokio()
    }

    /// Makes a blocking facade listener async (see [`crate::TcpListener::into_tokio`]).
    pub(crate) fn from_plain(listener: std::net::TcpListener) -> io::Result<TcpListener> {
        require_runtime()?;
        listener.set_nonblocking(true)?;
        Ok(TcpListener {
            inner: ListenerInner::Plain(::tokio::net::TcpListener::from_std(listener)?),
        })
    }

    /// A listener of a worker you started yourself (`cluster_worker::Worker::listen`), made
    /// async. Call it inside a tokio runtime with I/O enabled (see
    /// [`cluster_worker::Listener::into_async`]).
    pub fn from_cluster(listener: cluster_worker::Listener) -> io::Result<TcpListener> {
        Ok(TcpListener {
            inner: ListenerInner::Cluster(listener.into_async()?),
        })
    }

    /// Waits for a connection. In a worker that disconnects, this fails with
    /// [`NotConnected`](io::ErrorKind::NotConnected) (and [`is_closed`](TcpListener::is_closed)
    /// turns true).
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match &self.inner {
            ListenerInner::Plain(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((TcpStream::plain(stream), peer))
            }
            ListenerInner::Cluster(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((
                    TcpStream {
                        inner: StreamInner::Cluster(stream),
                        fresh: Fresh::new(),
                    },
                    peer,
                ))
            }
        }
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

    /// True once a cluster listener was closed (the worker disconnects); never for a plain one.
    pub fn is_closed(&self) -> bool {
        match &self.inner {
            ListenerInner::Plain(_) => false,
            ListenerInner::Cluster(listener) => listener.is_closed(),
        }
    }
}

fn require_runtime() -> io::Result<()> {
    match ::tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other(
            "an async listener needs a tokio runtime (none is running here)",
        )),
    }
}

/// The listening socket alone, the worker listener's readiness fd in a cluster.
impl AsFd for TcpListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            ListenerInner::Plain(listener) => listener.as_fd(),
            ListenerInner::Cluster(listener) => listener.as_fd(),
        }
    }
}

/// An async TCP connection from a [`TcpListener`]: in a worker it counts as open until
/// dropped (a disconnecting worker waits for it) and reads a handed-back connection's bytes
/// first (see [`cluster_worker::AsyncStream`]); alone, a `tokio::net::TcpStream`.
#[derive(Debug)]
pub struct TcpStream {
    inner: StreamInner,
    /// A worker's connection whose first bytes were not read yet (see [`Fresh`]).
    fresh: Option<Fresh>,
}

/// Counts a worker's connections from their accept to their first read.
///
/// A server's graceful shutdown (hyper's, under `axum::serve`) closes at once every
/// connection whose first request it has not read: to it they are idle. A connection the
/// worker accepted just before it was asked to disconnect is such a connection, with its
/// client's request on the way or already in the socket, and closing it fails that
/// request. [`first_reads_done`] lets the shutdown signal wait until every accepted
/// connection has been read from once (or closed).
#[derive(Debug)]
struct Fresh(());

static FRESH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn fresh_changed() -> &'static ::tokio::sync::Notify {
    static CHANGED: std::sync::OnceLock<::tokio::sync::Notify> = std::sync::OnceLock::new();
    CHANGED.get_or_init(::tokio::sync::Notify::new)
}

impl Fresh {
    fn new() -> Option<Fresh> {
        FRESH.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Some(Fresh(()))
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        FRESH.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        fresh_changed().notify_waiters();
    }
}

/// Resolves once every connection the worker accepted has been read from (or closed), or
/// after `at_most`: a client that connects and sends nothing is as idle as any.
pub(crate) async fn first_reads_done(at_most: std::time::Duration) {
    let deadline = ::tokio::time::Instant::now() + at_most;
    loop {
        let changed = fresh_changed().notified();
        if FRESH.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        if ::tokio::time::timeout_at(deadline, changed).await.is_err() {
            return;
        }
    }
}

#[derive(Debug)]
enum StreamInner {
    Plain(::tokio::net::TcpStream),
    Cluster(AsyncStream),
}

impl TcpStream {
    fn plain(stream: ::tokio::net::TcpStream) -> TcpStream {
        TcpStream {
            inner: StreamInner::Plain(stream),
            fresh: None,
        }
    }

    /// The address of the peer.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket().peer_addr()
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket().local_addr()
    }

    /// Sets `TCP_NODELAY`.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.socket().set_nodelay(nodelay)
    }

    /// The tokio socket underneath, for its options. Read through the `TcpStream`, not this,
    /// or the bytes a handed-back connection brought along are skipped.
    pub fn socket(&self) -> &::tokio::net::TcpStream {
        match &self.inner {
            StreamInner::Plain(stream) => stream,
            StreamInner::Cluster(stream) => stream.get_ref(),
        }
    }
}

impl AsFd for TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            StreamInner::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            StreamInner::Cluster(stream) => Pin::new(stream).poll_read(cx, buf),
        };
        if polled.is_ready() {
            // Read from (or ended): the server has its first bytes, in this same poll.
            this.fresh = None;
        }
        polled
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            StreamInner::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            StreamInner::Cluster(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            StreamInner::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            StreamInner::Cluster(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            StreamInner::Plain(stream) => stream.is_write_vectored(),
            StreamInner::Cluster(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            StreamInner::Plain(stream) => Pin::new(stream).poll_flush(cx),
            StreamInner::Cluster(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            StreamInner::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            StreamInner::Cluster(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// `axum::serve` over a cluster listener (the `axum` feature).
///
/// axum's `accept` must not fail, so errors are handled here, as axum does for its own
/// listeners: a connection that failed before it was taken is skipped, and any other error
/// (out of fds, say) is logged and retried after a second. A listener closed because the
/// worker is disconnecting never gives another connection: `accept` then stays pending for
/// ever, and `with_graceful_shutdown(worker.disconnected())` (which resolves once the
/// listener is closed) ends the serve after its connections finish. Without graceful
/// shutdown the serve never returns, and the worker exits once its last connection closes.
#[cfg(feature = "axum")]
impl axum::serve::Listener for TcpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match TcpListener::accept(self).await {
                Ok(accepted) => return accepted,
                Err(_) if self.is_closed() => std::future::pending::<()>().await,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(err) => {
                    tracing::error!(
                        error = %crate::ErrorChain(&err),
                        "accept failed; trying again in a second"
                    );
                    ::tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpListener::local_addr(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::time::Duration;

    use ::tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn block_on<T>(test: impl Future<Output = T>) -> T {
        let runtime = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async { ::tokio::time::timeout(WAIT, test).await.unwrap() })
    }

    /// One connection to `listener` from a std client: a byte each way.
    async fn round_trip(listener: &TcpListener) {
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        let (mut stream, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(stream.peer_addr().unwrap(), peer);
        assert_eq!(stream.local_addr().unwrap(), addr);
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        stream.write_all(b"y").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!((byte, answer.as_slice()), ([b'x'], &b"y"[..]));
    }

    #[test]
    fn alone_bind_is_a_plain_tokio_listener() {
        block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            assert!(!listener.is_clustered());
            assert!(!listener.is_closed());
            assert_ne!(listener.local_addr().unwrap().port(), 0);
            round_trip(&listener).await;
        });
    }

    #[test]
    fn a_blocking_facade_listener_converts() {
        block_on(async {
            let listener = crate::TcpListener::bind("127.0.0.1:0").unwrap();
            let listener = TcpListener::try_from(listener).unwrap();
            round_trip(&listener).await;
        });
    }

    #[test]
    fn outside_a_runtime_bind_fails_instead_of_panicking() {
        let err = TcpListener::bind("127.0.0.1:0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
    }

    #[test]
    fn run_async_alone_runs_the_future_in_this_process_on_the_runtime_asked_for() {
        for runtime in [
            crate::Runtime::CurrentThread,
            crate::Runtime::MultiThread {
                worker_threads: Some(2),
            },
        ] {
            let ran = crate::Cluster::builder()
                .workers(0)
                .runtime(runtime)
                .run_async(|worker| async move {
                    assert!(!worker.is_clustered());
                    assert!(matches!(
                        worker.messages(),
                        Err(crate::Error::NotClustered { .. })
                    ));
                    // Alone, nothing disconnects the program.
                    let disconnected =
                        ::tokio::time::timeout(Duration::from_millis(10), worker.disconnected());
                    assert!(disconnected.await.is_err());
                    let listener = TcpListener::bind("127.0.0.1:0")?;
                    round_trip(&listener).await;
                    Err(crate::Error::app("the future's own result"))
                });
            assert_eq!(ran.unwrap_err().to_string(), "the future's own result");
        }
    }

    #[cfg(feature = "axum")]
    #[test]
    fn axum_accepts_through_it() {
        block_on(async {
            let mut listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = axum::serve::Listener::local_addr(&listener).unwrap();
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (stream, peer) = axum::serve::Listener::accept(&mut listener).await;
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(stream.peer_addr().unwrap(), peer);
        });
    }
}
