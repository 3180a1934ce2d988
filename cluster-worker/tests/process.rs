//! A real worker process: this test binary re-runs itself as a child that calls
//! `Worker::start`, while the test plays its primary. These cover what only a separate
//! process can show: adopting the channel from the environment, and exiting by itself once
//! disconnected (after the primary vanished, on `SIGTERM`, after draining its connections,
//! or at the drain timeout), with the exit code the worker set.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_ipc::proto::{
    HandoffToPrimary, ListenAddr, PROTOCOL_VERSION, PrimaryHandoff, ToPrimary, ToWorker,
};
use cluster_ipc::{Channel, ListenerId, SlotId, WorkerId};
use cluster_worker::{
    Error, IPC_FD_ENV, ListenMode, PRIMARY_PID_ENV, WORKER_ID_ENV, WORKER_SLOT_ENV, Worker,
    WorkerOptions,
};
use support::{FakePrimary, WAIT, messages_to_end, send_batch, tcp_connections};

/// Names the part a re-run of this binary plays.
const CHILD_ENV: &str = "CLUSTER_WORKER_TEST_CHILD";

/// The exit code a serving child sets with `Worker::set_exit_code`, if any.
const CHILD_EXIT_CODE_ENV: &str = "CLUSTER_WORKER_TEST_EXIT_CODE";

/// Exit code of a child whose `Worker::start` failed as the test expected.
const EXPECTED_FAILURE: i32 = 3;

/// Exit code a failing worker sets.
const FAILED_WORK: i32 = 7;

// ----- the child -----

/// Not a test of its own: the entry point of the child processes. Without the variable it
/// does nothing.
#[test]
fn child() {
    let Ok(part) = std::env::var(CHILD_ENV) else {
        return;
    };
    match part.as_str() {
        "idle" => idle_worker(),
        "serve" => serving_worker(),
        "start-twice" => start_twice(),
        "bad-env" => bad_env(),
        "fail" => failing_worker(),
        other => panic!("unknown child part {other}"),
    }
}

/// Starts, says so, and waits for the worker to end the process.
fn idle_worker() -> ! {
    let worker = Worker::start(WorkerOptions::new()).unwrap().unwrap();
    assert_eq!((worker.id(), worker.slot()), (WorkerId(5), SlotId(2)));
    // Adoption took the contract out of the environment: a program this worker starts is
    // not a worker, but this process still is.
    for var in [IPC_FD_ENV, WORKER_ID_ENV, WORKER_SLOT_ENV, PRIMARY_PID_ENV] {
        assert!(std::env::var_os(var).is_none(), "{var} is still set");
    }
    assert!(cluster_worker::is_worker());
    worker.send("ready").unwrap();
    park_forever()
}

/// Listens, and echoes on every connection until its client closes it.
fn serving_worker() -> ! {
    let worker = Worker::start(WorkerOptions::new()).unwrap().unwrap();
    if let Ok(code) = std::env::var(CHILD_EXIT_CODE_ENV) {
        worker.set_exit_code(code.parse().unwrap());
    }
    let listener = worker
        .listen("127.0.0.1:0".parse().unwrap(), Some(ListenMode::RoundRobin))
        .unwrap();
    for stream in listener.incoming() {
        let mut stream = stream.unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => stream.write_all(&buf[..n]).unwrap(),
                }
            }
        });
    }
    // The worker disconnected; it exits once every connection is finished.
    park_forever()
}

fn start_twice() -> ! {
    let worker = Worker::start(WorkerOptions::new()).unwrap().unwrap();
    let again = Worker::start(WorkerOptions::new());
    let report = match again {
        Err(Error::AlreadyStarted) => "already started",
        _ => "started twice",
    };
    assert_eq!(Worker::current().unwrap().id(), worker.id());
    worker.send(report).unwrap();
    worker.disconnect();
    park_forever()
}

/// A start that fails on its environment, and a second one that must not think the first
/// succeeded.
fn bad_env() -> ! {
    let first_failed = matches!(
        Worker::start(WorkerOptions::new()),
        Err(Error::Env { var, .. }) if var == WORKER_ID_ENV
    );
    // The failed start took the variables out of the environment: this process is no
    // longer a worker, and certainly not one that already started.
    let second_found_nothing = matches!(Worker::start(WorkerOptions::new()), Ok(None));
    let code = if first_failed && second_found_nothing {
        EXPECTED_FAILURE
    } else {
        1
    };
    std::process::exit(code)
}

/// A worker whose work failed: it sets its exit code, then disconnects.
fn failing_worker() -> ! {
    let worker = Worker::start(WorkerOptions::new()).unwrap().unwrap();
    worker.set_exit_code(FAILED_WORK);
    worker.disconnect();
    park_forever()
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

// ----- the primary's side -----

struct WorkerProcess {
    pid: nix::unistd::Pid,
    exited: mpsc::Receiver<ExitStatus>,
    primary: Option<FakePrimary>,
}

impl WorkerProcess {
    fn spawn(part: &str, env: &[(&str, &str)]) -> WorkerProcess {
        let (primary, worker_end) = Channel::pair().unwrap();
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, part)
            .stdout(Stdio::null());
        cluster_ipc::env::prepare_worker(
            &mut command,
            worker_end.into_fd(),
            WorkerId(5),
            SlotId(2),
        )
        .unwrap();
        // After the contract's variables, so that a test can spoil them.
        for (var, value) in env {
            command.env(var, value);
        }
        let child = command.spawn().unwrap();
        // The command holds the parent's copy of the child's end; only the child may.
        drop(command);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        WorkerProcess {
            pid,
            exited: wait_in_thread(child),
            primary: Some(FakePrimary::new(primary.into_protocol())),
        }
    }

    fn primary(&mut self) -> &mut FakePrimary {
        self.primary.as_mut().unwrap()
    }

    fn welcome(&mut self, drain_timeout_ms: u64) {
        let (envelope, hello) = self.primary().recv_control();
        let ToPrimary::Hello {
            worker_id,
            pid,
            protocol_version,
        } = hello
        else {
            panic!("expected Hello, got {hello:?}");
        };
        assert_eq!(
            (worker_id, protocol_version),
            (WorkerId(5), PROTOCOL_VERSION)
        );
        assert_eq!(nix::unistd::Pid::from_raw(pid as i32), self.pid);
        let welcome = ToWorker::Welcome {
            primary_pid: std::process::id(),
            protocol_version: PROTOCOL_VERSION,
            drain_timeout_ms,
            max_message_len: 1 << 20,
            load_reports: false,
            heartbeat_interval_ms: 0,
        };
        self.primary()
            .channel
            .send(Some(envelope.seq), &welcome, &[])
            .unwrap();
    }

    fn recv_text(&mut self) -> String {
        self.primary().recv_user()
    }

    fn send_disconnect(&mut self) {
        self.primary()
            .channel
            .send(None, &ToWorker::Disconnect, &[])
            .unwrap();
    }

    fn is_running(&self) -> bool {
        matches!(self.exited.try_recv(), Err(mpsc::TryRecvError::Empty))
    }

    /// Waits up to `timeout` for the child to exit; kills it if it does not.
    fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        match self.exited.recv_timeout(timeout) {
            Ok(status) => status,
            Err(_) => {
                let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
                panic!("the worker did not exit within {timeout:?}");
            }
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Never leave a child behind, whatever the test did.
        if self.is_running() {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn wait_in_thread(mut child: Child) -> mpsc::Receiver<ExitStatus> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().unwrap());
    });
    rx
}

#[test]
fn an_idle_worker_exits_at_once_when_its_primary_vanishes() {
    let mut worker = WorkerProcess::spawn("idle", &[]);
    // A long drain timeout: only the idle path can make the worker exit in time.
    worker.welcome(60_000);
    assert_eq!(worker.recv_text(), "ready");
    let gone = Instant::now();
    drop(worker.primary.take());
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        gone.elapsed() < Duration::from_secs(1),
        "took {:?}",
        gone.elapsed()
    );
}

#[test]
fn sigterm_disconnects_and_exits_cleanly() {
    let mut worker = WorkerProcess::spawn("idle", &[]);
    worker.welcome(60_000);
    assert_eq!(worker.recv_text(), "ready");
    nix::sys::signal::kill(worker.pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    worker.primary().expect(ToPrimary::Disconnecting);
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_worker_that_set_an_exit_code_exits_with_it() {
    let mut worker = WorkerProcess::spawn("fail", &[]);
    worker.welcome(60_000);
    worker.primary().expect(ToPrimary::Disconnecting);
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(FAILED_WORK), "{status:?}");
}

/// Grants the serving child its listener and hands it one connection: returns the client
/// and the primary's end of the handoff socket.
fn serve_one_connection(
    worker: &mut WorkerProcess,
) -> (std::net::TcpStream, Channel<PrimaryHandoff>) {
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let mut handoff = worker.primary().grant_round_robin(ListenerId(1), addr, 4);
    worker.primary().expect(ToPrimary::Listening {
        listener: ListenerId(1),
        local_addr: ListenAddr::Tcp(addr),
    });
    let (mut clients, fds) = tcp_connections(1);
    send_batch(&mut handoff, &fds);
    drop(fds);
    let ack = handoff.recv(support::deadline()).unwrap();
    assert_eq!(ack.msg, HandoffToPrimary::ConnectionsAck { count: 1 });
    let mut client = clients.remove(0);
    client.set_read_timeout(Some(WAIT)).unwrap();
    echo(&mut client, b"before");
    (client, handoff)
}

fn echo(client: &mut std::net::TcpStream, text: &[u8]) {
    client.write_all(text).unwrap();
    let mut back = vec![0u8; text.len()];
    client.read_exact(&mut back).unwrap();
    assert_eq!(back, text);
}

#[test]
fn a_disconnected_worker_finishes_its_connections_then_exits() {
    let mut worker = WorkerProcess::spawn("serve", &[]);
    worker.welcome(60_000);
    let (mut client, mut handoff) = serve_one_connection(&mut worker);

    worker.send_disconnect();
    worker.primary().expect(ToPrimary::CloseListener {
        listener: ListenerId(1),
    });
    assert_eq!(
        messages_to_end(&mut handoff),
        [HandoffToPrimary::ConnectionsReturned { count: 0 }]
    );

    // Still serving the open connection after the disconnect...
    echo(&mut client, b"after");
    assert!(worker.is_running());
    // ...and gone once it closes.
    drop(client);
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_worker_exits_at_the_drain_timeout_even_with_connections_open_and_keeps_its_code() {
    let code = FAILED_WORK.to_string();
    let mut worker = WorkerProcess::spawn("serve", &[(CHILD_EXIT_CODE_ENV, code.as_str())]);
    let drain = Duration::from_millis(300);
    worker.welcome(drain.as_millis() as u64);
    let (client, _handoff) = serve_one_connection(&mut worker);
    let asked = Instant::now();
    worker.send_disconnect();
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(FAILED_WORK), "{status:?}");
    assert!(asked.elapsed() >= drain, "exited before the drain timeout");
    drop(client);
}

#[test]
fn a_second_start_in_one_process_is_refused() {
    let mut worker = WorkerProcess::spawn("start-twice", &[]);
    worker.welcome(60_000);
    assert_eq!(worker.recv_text(), "already started");
    worker.primary().expect(ToPrimary::Disconnecting);
    let status = worker.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_malformed_environment_fails_start_and_a_second_start_is_not_refused_as_a_repeat() {
    for id in ["not a number", "0"] {
        let worker = WorkerProcess::spawn("bad-env", &[(WORKER_ID_ENV, id)]);
        let status = worker.wait_exit(WAIT);
        assert_eq!(
            status.code(),
            Some(EXPECTED_FAILURE),
            "id {id:?}: {status:?}"
        );
    }
}
