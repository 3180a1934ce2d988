//! Accepted connections, counted while they are open, and handed back to the primary when the
//! worker drains.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cluster_ipc::ListenerId;
use cluster_ipc::proto::{Encoded, MAX_UNREAD_LEN, ToPrimary};
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::state::{WorkerState, lock};

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

/// Bytes another worker read from a connection and did not answer: the application reads them
/// before the socket's own.
struct Unread {
    /// True while `bytes` holds something not yet read, so that reading a drained buffer
    /// takes no lock.
    pending: AtomicBool,
    /// The bytes, and how many of them were read. A lock rather than `&mut`, because
    /// `Read for &Stream` reads through a shared reference.
    bytes: Mutex<(Vec<u8>, usize)>,
}

impl Unread {
    fn new(bytes: Vec<u8>) -> Option<Unread> {
        (!bytes.is_empty()).then(|| Unread {
            pending: AtomicBool::new(true),
            bytes: Mutex::new((bytes, 0)),
        })
    }

    /// Copies what is left into `bufs`; `None` when nothing is left (the caller reads the
    /// socket then).
    fn read(&self, bufs: &mut [IoSliceMut<'_>]) -> Option<usize> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut guard = lock(&self.bytes);
        let (bytes, read) = &mut *guard;
        let mut copied = 0;
        for buf in bufs.iter_mut() {
            let left = &bytes[*read..];
            if left.is_empty() {
                break;
            }
            let n = left.len().min(buf.len());
            buf[..n].copy_from_slice(&left[..n]);
            *read += n;
            copied += n;
        }
        if *read == bytes.len() {
            self.pending.store(false, Ordering::Release);
            *bytes = Vec::new();
            *read = 0;
        }
        // A caller that passed no room gets what an empty read of the socket gives: 0.
        (copied > 0).then_some(copied)
    }

    /// Takes what is left.
    fn take(&mut self) -> Vec<u8> {
        self.pending.store(false, Ordering::Relaxed);
        let (bytes, read) = match self.bytes.get_mut() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut left = std::mem::take(bytes);
        left.drain(..*read);
        *read = 0;
        left
    }

    /// A copy of what is left.
    fn peek(&self) -> Vec<u8> {
        if !self.pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let guard = lock(&self.bytes);
        guard
            .0
            .get(guard.1..)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Up to 64 KiB of someone's request is no help in a log line.
        f.debug_struct("Unread")
            .field("len", &self.peek().len())
            .finish()
    }
}

/// A connection accepted by a cluster [`Listener`](crate::Listener).
///
/// It is a [`TcpStream`] (through `Deref`, [`Read`] and [`Write`]) that the worker counts as
/// open until it is dropped: [`Worker::open_connections`](crate::Worker::open_connections)
/// and a disconnecting worker's decision to exit depend on it. [`into_tcp`](Stream::into_tcp)
/// gives up the count and returns the plain `TcpStream`.
///
/// # Connections that move between workers
///
/// A worker that drains gives idle keep-alive connections back to the primary
/// ([`hand_back`](Stream::hand_back)), with the bytes it had read of the next request and not
/// answered; the primary gives such a connection to another worker, where it arrives with
/// those bytes. The stream's [`Read`] impls (on `Stream` and on `&Stream`) return them before
/// anything from the socket; [`take_unread`](Stream::take_unread) takes them out instead. Read
/// through the `Stream`, not through the `TcpStream` it dereferences to, which would skip
/// them; and a server that waits for the socket to become readable (with `mio`) must read or
/// take them first, since no readiness announces them.
#[derive(Debug)]
pub struct Stream {
    tcp: TcpStream,
    /// Bytes to read before the socket's (a connection another worker handed back).
    unread: Option<Unread>,
    /// The round-robin listener it came from: only those connections can be handed back.
    listener: Option<ListenerId>,
    open: OpenConnection,
}

impl Stream {
    pub(crate) fn new(
        tcp: TcpStream,
        open: OpenConnection,
        listener: Option<ListenerId>,
        unread: Vec<u8>,
    ) -> Stream {
        Stream {
            tcp,
            unread: Unread::new(unread),
            listener,
            open,
        }
    }

    /// Takes the stream apart, keeping everything that makes it a cluster connection: the
    /// socket, the bytes it brought along and nobody read, its place in the open-connection
    /// count and the round-robin listener it came from.
    #[cfg(feature = "tokio")]
    pub(crate) fn into_parts(mut self) -> (TcpStream, Vec<u8>, OpenConnection, Option<ListenerId>) {
        let unread = self.take_unread();
        (self.tcp, unread, self.open, self.listener)
    }

    /// The address of the peer.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    /// Takes the bytes that came with this connection and have not been read yet: what another
    /// worker read and did not answer before it handed the connection back. Empty for every
    /// other connection, and once read. After this, reads go to the socket.
    pub fn take_unread(&mut self) -> Vec<u8> {
        self.unread.as_mut().map(Unread::take).unwrap_or_default()
    }

    /// The plain `TcpStream`. The worker stops counting this connection as open at once, so a
    /// disconnecting worker may exit while it is still in use: keep the [`Stream`] if the
    /// connection should hold the worker up.
    ///
    /// The `TcpStream` reads from the socket only: bytes the connection brought along and not
    /// yet read (see [`take_unread`](Stream::take_unread)) are dropped, and logged as a
    /// warning. Take them first.
    pub fn into_tcp(mut self) -> TcpStream {
        let dropped = self.take_unread().len();
        if dropped > 0 {
            tracing::warn!(
                bytes = dropped,
                "into_tcp dropped bytes a handed-back connection brought along (take_unread first)"
            );
        }
        self.tcp
    }

    /// True when [`hand_back`](Stream::hand_back) would take this connection now, given
    /// unread bytes that fit: it came from a round-robin listener and the worker is
    /// disconnecting. A server asks before it takes the connection out of its event loop.
    /// (The hand-back itself may still refuse it, if the control channel closed meanwhile.)
    pub fn can_hand_back(&self) -> bool {
        self.listener.is_some() && self.open.worker.is_disconnecting()
    }

    /// Gives this connection back to the primary, for another worker to serve, when the
    /// worker drains: call it when the connection is idle between two requests (the last
    /// response fully written), with the bytes read of the next request and not answered in
    /// `unread`. The next worker reads `unread` first, then whatever this stream had not read
    /// yet, then the socket.
    ///
    /// It is taken only when all of these hold: the worker is disconnecting; the connection
    /// came from a round-robin listener (the primary hands those out; a shared listener's
    /// connections have nowhere to go); `unread`, with any bytes this stream brought along and
    /// the application did not read, is at most [`MAX_UNREAD_LEN`] bytes and fits the control
    /// channel's message limit; the control channel is open. Then the socket is made
    /// non-blocking (as the primary hands connections out) and the connection is queued for
    /// the control thread, which sends it without blocking and closes this worker's copy; it
    /// no longer counts as open, so the worker may exit. Otherwise the stream comes back
    /// untouched, and the caller decides: typically it closes it, as it would have without a
    /// hand-back.
    ///
    /// The socket's options (`TCP_NODELAY`, timeouts) travel with it.
    pub fn hand_back(self, unread: &[u8]) -> Result<(), Stream> {
        let Some(listener) = self.listener else {
            return Err(self);
        };
        let worker = Arc::clone(&self.open.worker);
        if !worker.is_disconnecting() {
            return Err(self);
        }
        // What this stream brought along and the application did not read comes after what
        // the caller read: copied, so that a refused hand-back leaves the stream as it was.
        let brought = self.unread.as_ref().map(Unread::peek).unwrap_or_default();
        if unread.len().saturating_add(brought.len()) > MAX_UNREAD_LEN {
            return Err(self);
        }
        let mut bytes = Vec::with_capacity(unread.len() + brought.len());
        bytes.extend_from_slice(unread);
        bytes.extend_from_slice(&brought);
        let message = ToPrimary::HandBack {
            listener,
            unread: bytes,
        };
        let Ok(message) = Encoded::new(&message, &worker.send_limits) else {
            // Over the message limit the primary announced.
            return Err(self);
        };
        // The next worker may take it with `try_accept`, which expects the primary's
        // non-blocking socket and makes no system call to check. The flag belongs to the
        // socket's open file, which the copy sent shares: set it here, and put it back if
        // the hand-back fails.
        let Ok(flags) = fcntl(self.tcp.as_fd(), FcntlArg::F_GETFL) else {
            return Err(self);
        };
        let was_blocking = !OFlag::from_bits_retain(flags).contains(OFlag::O_NONBLOCK);
        if was_blocking && self.tcp.set_nonblocking(true).is_err() {
            return Err(self);
        }
        let Stream {
            tcp,
            unread: brought,
            listener,
            open,
        } = self;
        match worker.push_hand_back(message, OwnedFd::from(tcp), true) {
            Ok(()) => {
                // Queued first, uncounted second: a worker that sees no connection left
                // exits only after sending what is queued.
                drop(open);
                Ok(())
            }
            Err(fd) => {
                let tcp = TcpStream::from(fd);
                if was_blocking {
                    let _ = tcp.set_nonblocking(false);
                }
                Err(Stream {
                    tcp,
                    unread: brought,
                    listener,
                    open,
                })
            }
        }
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
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(n) = self
            .unread
            .as_ref()
            .and_then(|unread| unread.read(&mut [IoSliceMut::new(buf)]))
        {
            return Ok(n);
        }
        (&self.tcp).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if let Some(n) = self.unread.as_ref().and_then(|unread| unread.read(bufs)) {
            return Ok(n);
        }
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
