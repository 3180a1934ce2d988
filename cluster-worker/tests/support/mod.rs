//! Shared helpers for the integration tests: an fd-leak check and a stand-in primary.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Delivery, Envelope, HandoffToPrimary, HandoffToWorker, ListenAddr, ListenGranted,
    ListenRefused, ListenRequest, PROTOCOL_VERSION, PeerAddr, PrimaryControl, PrimaryHandoff,
    ToPrimary, ToWorker,
};
use cluster_ipc::{Channel, Limits, ListenerId, SlotId, UserMessage, WorkerId};
use cluster_test_support::{ProcStat, wait_until};
use cluster_worker::{Worker, WorkerOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// The drain timeout the stand-in primary announces.
pub const DRAIN_MS: u64 = 5_000;

pub fn deadline() -> Option<Instant> {
    Some(Instant::now() + WAIT)
}

// ----- fd leak checks -----

pub use cluster_test_support::no_leak;

// ----- a stand-in primary -----

/// Options for a worker driven in-process: it must never exit the test process.
pub fn options() -> WorkerOptions {
    WorkerOptions::new()
        .exit_when_disconnected(false)
        .handshake_timeout(WAIT)
        .request_timeout(WAIT)
}

/// The primary's end of one worker's control channel.
pub struct FakePrimary {
    pub channel: Channel<PrimaryControl>,
}

impl FakePrimary {
    pub fn new(channel: Channel<PrimaryControl>) -> FakePrimary {
        FakePrimary { channel }
    }

    /// Receives the next message (failing the test after `WAIT`).
    pub fn recv(&mut self) -> Envelope<ToPrimary> {
        self.channel.recv(deadline()).unwrap()
    }

    /// Receives the next control message.
    pub fn recv_control(&mut self) -> (Envelope<ToPrimary>, ToPrimary) {
        let envelope = self.recv();
        let message = envelope.msg.clone();
        (envelope, message)
    }

    /// Receives the next control message and checks it.
    pub fn expect(&mut self, expected: ToPrimary) -> Envelope<ToPrimary> {
        let envelope = self.recv();
        assert_eq!(envelope.msg, expected);
        envelope
    }

    /// Receives the next message, which must be a user message, as a `T`.
    pub fn recv_user<T: DeserializeOwned>(&mut self) -> T {
        match self.recv().msg {
            ToPrimary::User(message) => message.decode().unwrap(),
            other => panic!("expected a user message, got {other:?}"),
        }
    }

    /// Sends `msg` to the worker as a user message.
    pub fn send_user<T: Serialize + ?Sized>(&mut self, msg: &T) -> u64 {
        let message = UserMessage::encode(msg, &Limits::default()).unwrap();
        self.channel
            .send(None, &ToWorker::User(message), &[])
            .unwrap()
    }

    /// Answers `Hello` with `Welcome`, announcing the default message limit.
    pub fn welcome(&mut self) -> ToPrimary {
        self.welcome_with_limit(Limits::DEFAULT_MAX_MESSAGE_LEN)
    }

    /// Answers `Hello` with `Welcome`, announcing `max_message_len`.
    pub fn welcome_with_limit(&mut self, max_message_len: usize) -> ToPrimary {
        self.welcome_with(max_message_len, 0)
    }

    /// Answers `Hello` with `Welcome`, announcing `max_message_len` and asking for heartbeats
    /// every `heartbeat_interval_ms` (0: none).
    pub fn welcome_with(
        &mut self,
        max_message_len: usize,
        heartbeat_interval_ms: u64,
    ) -> ToPrimary {
        let (envelope, hello) = self.recv_control();
        let welcome = ToWorker::Welcome {
            primary_pid: 4242,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms: DRAIN_MS,
            max_message_len: u32::try_from(max_message_len).unwrap(),
            load_reports: false,
            heartbeat_interval_ms,
        };
        self.channel
            .send(Some(envelope.seq), &welcome, &[])
            .unwrap();
        hello
    }

    /// Receives a `Listen` request.
    pub fn recv_listen(&mut self) -> (u64, ListenRequest) {
        match self.recv_control() {
            (envelope, ToPrimary::Listen(request)) => (envelope.seq, request),
            (_, other) => panic!("expected Listen, got {other:?}"),
        }
    }

    /// Answers the next `Listen` with a grant carrying `fd`.
    pub fn grant(
        &mut self,
        listener: ListenerId,
        local_addr: SocketAddr,
        delivery: Delivery,
        fds: &[BorrowedFd<'_>],
    ) -> ListenRequest {
        let (seq, request) = self.recv_listen();
        let granted = ToWorker::ListenGranted(ListenGranted {
            listener,
            local_addr: ListenAddr::Tcp(local_addr),
            delivery,
        });
        self.channel.send(Some(seq), &granted, fds).unwrap();
        request
    }

    /// Answers the next `Listen` with a refusal.
    pub fn refuse(&mut self, errno: i32) -> ListenRequest {
        let (seq, request) = self.recv_listen();
        let refused = ToWorker::ListenRefused(ListenRefused {
            errno,
            message: "bind".into(),
        });
        self.channel.send(Some(seq), &refused, &[]).unwrap();
        request
    }

    /// Answers the next `Listen` with a round-robin grant; returns the primary's end of the
    /// handoff socket.
    pub fn grant_round_robin(
        &mut self,
        listener: ListenerId,
        local_addr: SocketAddr,
        window: u32,
    ) -> Channel<PrimaryHandoff> {
        let limits = cluster_ipc::proto::handoff_limits(window);
        let (handoff, worker_end) =
            Channel::pair_with(cluster_ipc::Transport::native(), limits).unwrap();
        let worker_end = worker_end.into_fd();
        self.grant(
            listener,
            local_addr,
            Delivery::Handoff { window },
            &[worker_end.as_fd()],
        );
        handoff.into_protocol()
    }
}

/// A worker connected to a stand-in primary that answered its handshake.
pub fn connect_worker(options: WorkerOptions) -> (Worker, FakePrimary) {
    connect_worker_with_limit(options, Limits::DEFAULT_MAX_MESSAGE_LEN)
}

/// A worker connected to a stand-in primary that announced `max_message_len`.
pub fn connect_worker_with_limit(
    options: WorkerOptions,
    max_message_len: usize,
) -> (Worker, FakePrimary) {
    connect_worker_with(options, max_message_len, 0)
}

/// A worker connected to a stand-in primary that asked for heartbeats every
/// `heartbeat_interval_ms` (0: none).
pub fn connect_worker_with_heartbeats(
    options: WorkerOptions,
    heartbeat_interval_ms: u64,
) -> (Worker, FakePrimary) {
    connect_worker_with(
        options,
        Limits::DEFAULT_MAX_MESSAGE_LEN,
        heartbeat_interval_ms,
    )
}

fn connect_worker_with(
    options: WorkerOptions,
    max_message_len: usize,
    heartbeat_interval_ms: u64,
) -> (Worker, FakePrimary) {
    let (primary, worker_end) = Channel::pair().unwrap();
    let primary = std::thread::spawn(move || {
        let mut primary = FakePrimary::new(primary.into_protocol());
        primary.welcome_with(max_message_len, heartbeat_interval_ms);
        primary
    });
    let worker =
        Worker::connect(worker_end.into_protocol(), WorkerId(7), SlotId(3), options).unwrap();
    (worker, primary.join().unwrap())
}

/// Closes the primary's end and waits for the worker's control thread to let go of
/// everything, so that a leak check after this sees only what the test itself still holds.
pub fn finish(worker: Worker, primary: FakePrimary) {
    drop(primary);
    assert!(
        worker.wait_closed(WAIT),
        "the control thread did not finish"
    );
    drop(worker);
}

/// A round-robin listener granted to `worker`: (listener, the primary's handoff end).
pub fn round_robin_listener(
    worker: &Worker,
    primary: &mut FakePrimary,
    id: u64,
    window: u32,
) -> (cluster_worker::Listener, Channel<PrimaryHandoff>) {
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let (listener, handoff) = std::thread::scope(|scope| {
        let answer = scope.spawn(|| primary.grant_round_robin(ListenerId(id), addr, window));
        let listener = worker
            .listen(addr, Some(cluster_worker::ListenMode::RoundRobin))
            .unwrap();
        (listener, answer.join().unwrap())
    });
    primary.expect(ToPrimary::Listening {
        listener: ListenerId(id),
        local_addr: ListenAddr::Tcp(addr),
    });
    (listener, handoff)
}

// ----- real TCP connections -----

/// `n` TCP connections over loopback: the clients, and the accepted server sides (made
/// non-blocking, as a primary that accepts with `SOCK_NONBLOCK` hands them over), in the
/// clients' order.
pub fn tcp_connections(n: usize) -> (Vec<TcpStream>, Vec<OwnedFd>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut accepted: Vec<TcpStream> = (0..n).map(|_| listener.accept().unwrap().0).collect();
    let mut ordered = Vec::new();
    for client in &clients {
        let local = client.local_addr().unwrap();
        let at = accepted
            .iter()
            .position(|server| server.peer_addr().unwrap() == local)
            .unwrap();
        let server = accepted.remove(at);
        server.set_nonblocking(true).unwrap();
        ordered.push(OwnedFd::from(server));
    }
    (clients, ordered)
}

/// Reads a handoff socket to its end: the last messages the worker sent, then end of file.
pub fn read_to_end(handoff: &mut Channel<PrimaryHandoff>) -> Vec<Envelope<HandoffToPrimary>> {
    let mut messages = Vec::new();
    loop {
        match handoff.recv(deadline()) {
            Ok(envelope) => messages.push(envelope),
            Err(cluster_ipc::Error::Closed) => return messages,
            Err(err) => panic!("the handoff socket failed: {err}"),
        }
    }
}

/// What [`read_to_end`] read, without the fds.
pub fn messages_to_end(handoff: &mut Channel<PrimaryHandoff>) -> Vec<HandoffToPrimary> {
    read_to_end(handoff)
        .into_iter()
        .map(|envelope| envelope.msg)
        .collect()
}

/// Sends a `Connections` batch carrying `fds`, without peer addresses.
pub fn send_batch(handoff: &mut Channel<PrimaryHandoff>, fds: &[OwnedFd]) {
    send_batch_with_peers(handoff, fds, Vec::new());
}

/// Sends a `Connections` batch carrying `fds` and naming `peers`.
pub fn send_batch_with_peers(
    handoff: &mut Channel<PrimaryHandoff>,
    fds: &[OwnedFd],
    peers: Vec<PeerAddr>,
) {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let count = u32::try_from(fds.len()).unwrap();
    handoff
        .send(
            None,
            &HandoffToWorker::Connections { count, peers },
            &borrowed,
        )
        .unwrap();
}

/// Sends a connection another worker handed back: `Resumed` with `fds` attached (one, unless
/// a test breaks the protocol on purpose).
pub fn send_resumed(
    handoff: &mut Channel<PrimaryHandoff>,
    fds: &[&OwnedFd],
    peer: Option<SocketAddr>,
    unread: &[u8],
) {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
    let message = HandoffToWorker::Resumed {
        peer: peer.map(PeerAddr),
        unread: unread.to_vec(),
    };
    handoff.send(None, &message, &borrowed).unwrap();
}

/// Waits until thread `tid` of this process is asleep in the kernel (blocked in a system
/// call), so that a test can act while another thread is known to be blocked.
pub fn wait_until_blocked(tid: i32) {
    wait_until(&format!("thread {tid} blocks"), WAIT, || {
        ProcStat::of_thread(tid).is_some_and(|stat| stat.state == 'S')
    });
}

/// The listener met a frame it could not take: `accept` fails with `InvalidData`, the
/// listener is closed, nothing was acked (it returns an empty batch, then its end of file:
/// what was sent is still the primary's), and the primary hears it closed.
pub fn expect_closed_by_a_bad_frame(
    listener: &cluster_worker::Listener,
    handoff: &mut Channel<PrimaryHandoff>,
    primary: &mut FakePrimary,
    id: u64,
) {
    let err = listener.accept_timeout(WAIT).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(listener.is_closed());
    assert_eq!(
        messages_to_end(handoff),
        [HandoffToPrimary::ConnectionsReturned { count: 0 }]
    );
    primary.expect(ToPrimary::CloseListener {
        listener: ListenerId(id),
    });
}

/// Whether the fd's open file is in non-blocking mode.
pub fn is_nonblocking(fd: impl AsFd) -> bool {
    let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    nix::fcntl::OFlag::from_bits_retain(flags).contains(nix::fcntl::OFlag::O_NONBLOCK)
}

/// Checks that `stream` is the server side of `client`: a byte each way.
pub fn assert_connected(stream: &mut cluster_worker::Stream, client: &mut TcpStream, tag: u8) {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(WAIT)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.write_all(&[tag]).unwrap();
    let mut byte = [0u8];
    stream.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], tag);
    stream.write_all(&[tag + 100]).unwrap();
    client.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], tag + 100);
}
