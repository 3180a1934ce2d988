//! Shared helpers for the integration tests: an fd-leak check and a stand-in primary.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    Control, Delivery, ListenAddr, ListenGranted, ListenRefused, ListenRequest, ListenerId,
    PROTOCOL_VERSION, PeerAddr,
};
use cluster_ipc::{Channel, Frame, Kind};
use cluster_worker::{Worker, WorkerOptions};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// The drain timeout the stand-in primary announces.
pub const DRAIN_MS: u64 = 5_000;

pub fn deadline() -> Option<Instant> {
    Some(Instant::now() + WAIT)
}

// ----- fd leak checks (as in cluster-ipc's tests) -----

/// Tests in one binary run on parallel threads that share one fd table; every test that
/// opens fds takes this lock, so a count taken by one is not disturbed by another.
static FD_TABLE: Mutex<()> = Mutex::new(());

/// The open fds of this process and what each points at.
pub fn open_fds() -> BTreeMap<i32, PathBuf> {
    let mut fds = BTreeMap::new();
    let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        let Ok(number) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Skip the directory handle of this very listing.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target != listing {
                fds.insert(number, target);
            }
        }
    }
    fds
}

/// Runs `test` under the fd-table lock and checks that it leaves the fd table as it found
/// it.
pub fn no_leak(test: impl FnOnce()) {
    let _lock: MutexGuard<'static, ()> = FD_TABLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let before = open_fds();
    test();
    let now = open_fds();
    let opened: Vec<_> = now
        .iter()
        .filter(|(n, t)| before.get(n) != Some(t))
        .collect();
    let closed: Vec<_> = before.keys().filter(|n| !now.contains_key(n)).collect();
    assert!(
        opened.is_empty() && closed.is_empty(),
        "fds leaked: {opened:?}; closed: {closed:?}"
    );
}

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
    pub channel: Channel,
    /// Pass over `LoadReport`s (a worker from `Worker::start` sends them).
    pub skip_load_reports: bool,
}

impl FakePrimary {
    pub fn new(channel: Channel) -> FakePrimary {
        FakePrimary {
            channel,
            skip_load_reports: false,
        }
    }

    /// Receives the next frame (failing the test after `WAIT`).
    pub fn recv(&mut self) -> Frame {
        loop {
            let frame = self.channel.recv(deadline()).unwrap();
            let is_load_report = frame.kind() == Kind::Control
                && matches!(frame.decode(), Ok(Control::LoadReport { .. }));
            if !(self.skip_load_reports && is_load_report) {
                return frame;
            }
        }
    }

    /// Receives the next control message.
    pub fn recv_control(&mut self) -> (Frame, Control) {
        let frame = self.recv();
        assert_eq!(frame.kind(), Kind::Control, "expected a control frame");
        let message = frame.decode().unwrap();
        (frame, message)
    }

    /// Receives the next control message and checks it.
    pub fn expect(&mut self, expected: Control) -> Frame {
        let (frame, message) = self.recv_control();
        assert_eq!(message, expected);
        frame
    }

    /// Answers `Hello` with `Welcome`.
    pub fn welcome(&mut self) -> Control {
        let (frame, hello) = self.recv_control();
        let welcome = Control::Welcome {
            primary_pid: 4242,
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms: DRAIN_MS,
        };
        self.channel
            .send(Kind::Control, Some(frame.seq()), &welcome, &[])
            .unwrap();
        hello
    }

    /// Receives a `Listen` request.
    pub fn recv_listen(&mut self) -> (u64, ListenRequest) {
        match self.recv_control() {
            (frame, Control::Listen(request)) => (frame.seq(), request),
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
        let granted = Control::ListenGranted(ListenGranted {
            listener,
            local_addr: ListenAddr::Tcp(local_addr),
            delivery,
        });
        self.channel
            .send(Kind::Control, Some(seq), &granted, fds)
            .unwrap();
        request
    }

    /// Answers the next `Listen` with a refusal.
    pub fn refuse(&mut self, errno: i32) -> ListenRequest {
        let (seq, request) = self.recv_listen();
        let refused = Control::ListenRefused(ListenRefused {
            errno,
            message: "bind".into(),
        });
        self.channel
            .send(Kind::Control, Some(seq), &refused, &[])
            .unwrap();
        request
    }

    /// Answers the next `Listen` with a round-robin grant; returns the primary's end of the
    /// handoff socket.
    pub fn grant_round_robin(
        &mut self,
        listener: ListenerId,
        local_addr: SocketAddr,
        window: u32,
    ) -> Channel {
        let (handoff, worker_end) = Channel::pair().unwrap();
        let worker_end = worker_end.into_fd();
        self.grant(
            listener,
            local_addr,
            Delivery::Handoff { window },
            &[worker_end.as_fd()],
        );
        handoff
    }
}

/// A worker connected to a stand-in primary that answered its handshake.
pub fn connect_worker(options: WorkerOptions) -> (Worker, FakePrimary) {
    let (primary, worker_end) = Channel::pair().unwrap();
    let primary = std::thread::spawn(move || {
        let mut primary = FakePrimary::new(primary);
        primary.welcome();
        primary
    });
    let worker = Worker::connect(worker_end, 7, 3, options).unwrap();
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
) -> (cluster_worker::Listener, Channel) {
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let (listener, handoff) = std::thread::scope(|scope| {
        let answer = scope.spawn(|| primary.grant_round_robin(ListenerId(id), addr, window));
        let listener = worker
            .listen(addr, Some(cluster_ipc::proto::ListenMode::RoundRobin))
            .unwrap();
        (listener, answer.join().unwrap())
    });
    primary.expect(Control::Listening {
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

/// Reads a handoff socket to its end: the last frames the worker sent, then end of file.
pub fn read_to_end(handoff: &mut Channel) -> Vec<(Frame, Control)> {
    let mut frames = Vec::new();
    loop {
        match handoff.recv(deadline()) {
            Ok(frame) => {
                let message = frame.decode().unwrap();
                frames.push((frame, message));
            }
            Err(cluster_ipc::Error::Closed) => return frames,
            Err(err) => panic!("the handoff socket failed: {err}"),
        }
    }
}

/// Sends a `Connections` batch carrying `fds`, without peer addresses.
pub fn send_batch(handoff: &mut Channel, fds: &[OwnedFd]) {
    send_batch_with_peers(handoff, fds, Vec::new());
}

/// Sends a `Connections` batch carrying `fds` and naming `peers`.
pub fn send_batch_with_peers(handoff: &mut Channel, fds: &[OwnedFd], peers: Vec<PeerAddr>) {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let count = u32::try_from(fds.len()).unwrap();
    handoff
        .send(
            Kind::Control,
            None,
            &Control::Connections { count, peers },
            &borrowed,
        )
        .unwrap();
}

/// Waits until thread `tid` of this process is asleep in the kernel (blocked in a system
/// call), so that a test can act while another thread is known to be blocked.
pub fn wait_until_blocked(tid: i32) {
    let path = format!("/proc/self/task/{tid}/stat");
    let until = Instant::now() + WAIT;
    loop {
        let stat = std::fs::read_to_string(&path).unwrap();
        // The state follows the command name, which is in parentheses.
        let state = stat.rsplit(')').next().unwrap().trim_start().chars().next();
        if state == Some('S') {
            return;
        }
        assert!(Instant::now() < until, "thread {tid} never blocked");
        std::thread::yield_now();
    }
}
