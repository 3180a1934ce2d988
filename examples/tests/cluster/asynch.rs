//! The async path of the facade (`run_async`, `cluster_net::tokio`, axum), through the
//! `test-async` helper run as a user would run a server: its own primary.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use cluster_primary::Signal;
use nix::sys::wait::WaitStatus;

use crate::support::{Guard, Lines, Slot, connect, http_get, init, pid, signal};

const TEST_ASYNC: &str = env!("CARGO_BIN_EXE_test-async");

/// A started `test-async`: the process, its stdout and stderr (logs at `warn` and above), its
/// workers' pids and the address they serve.
struct Started {
    primary: Guard,
    lines: Lines,
    logs: Lines,
    workers: Vec<u32>,
    addr: SocketAddr,
}

/// Starts `test-async` with `workers` workers.
fn start(workers: usize) -> Started {
    init();
    let mut child = Command::new(TEST_ASYNC)
        .env("TA_WORKERS", workers.to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let logs = Lines::new(child.stderr.take().unwrap());
    let mut guard = Guard::new(child);
    let mut pids = Vec::new();
    loop {
        let line = lines.next().expect("fork and ready lines");
        if let Some(worker) = line.strip_prefix("fork ") {
            pids.push(worker.parse().unwrap());
            guard.others.push(*pids.last().unwrap());
        } else if let Some(addr) = line.strip_prefix("ready ") {
            assert_eq!(pids.len(), workers, "{:?}", lines.seen);
            return Started {
                primary: guard,
                lines,
                logs,
                workers: pids,
                addr: addr.parse().unwrap(),
            };
        } else {
            panic!("unexpected line {line:?}");
        }
    }
}

/// The names of a process's threads.
fn thread_names(process: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{process}/task"))
        .unwrap()
        .map(|task| {
            let comm = task.unwrap().path().join("comm");
            std::fs::read_to_string(comm).unwrap().trim().to_owned()
        })
        .collect()
}

/// tokio names its runtime's threads `tokio-runtime-worker` (`tokio-rt-worker` in later
/// versions; `comm` keeps 15 bytes).
fn is_tokio_thread(name: &str) -> bool {
    name.starts_with("tokio-")
}

/// Waits for the primary (SIGTERM sent) and expects it and every worker to exit with 0, and
/// nothing logged at `warn` or above: a listener closed by the disconnect is the end of
/// accepting, not an accept error to log and retry.
fn expect_clean_exit(started: Started) {
    let Started {
        mut primary,
        mut lines,
        mut logs,
        workers,
        ..
    } = started;
    let primary_pid = primary.pid();
    assert_eq!(primary.wait(), WaitStatus::Exited(pid(primary_pid), 0));
    let rest = lines.rest();
    for worker in workers {
        let exit = format!("exit {worker} code=0");
        assert!(rest.contains(&exit), "{exit:?} in {rest:?}");
    }
    let logged = logs.rest();
    assert!(logged.is_empty(), "logged: {logged:#?}");
}

#[test]
fn run_async_builds_runtimes_in_the_workers_and_none_in_the_primary() {
    let _slot = Slot::take();
    let started = start(2);
    let (status, body) = http_get(started.addr);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body:?}");
    assert!(body.starts_with("handled by process."), "{body:?}");

    let names = thread_names(started.primary.pid());
    assert!(
        !names.iter().any(|name| is_tokio_thread(name)),
        "the primary has runtime threads: {names:?}"
    );
    for &worker in &started.workers {
        let names = thread_names(worker);
        assert!(
            names.iter().any(|name| is_tokio_thread(name)),
            "worker {worker} has no runtime thread: {names:?}"
        );
    }
    signal(started.primary.pid(), Signal::SIGTERM);
    expect_clean_exit(started);
}

#[test]
fn a_disconnect_lets_an_in_flight_request_finish_and_the_worker_exit_cleanly() {
    let _slot = Slot::take();
    let mut started = start(1);
    let mut slow = connect(started.addr);
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    // In flight: the handler has it, and holds it until the worker disconnects.
    assert_eq!(started.lines.next().as_deref(), Some("slow-started"));

    // The cluster stops: the worker disconnects, the handler answers, axum closes the
    // connection (graceful shutdown: no keep-alive), and the worker exits with 0.
    signal(started.primary.pid(), Signal::SIGTERM);
    let mut response = String::new();
    slow.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response:?}");
    assert!(response.ends_with("finished slow\n"), "{response:?}");
    expect_clean_exit(started);
}

/// How long the early connection of the test below is watched for a close before it sends.
const IDLE_CLOSE_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads from `stream` until what it got ends with `end` (the read timeout bounds each read).
fn read_until(stream: &mut std::net::TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0; 1024];
    while !got.ends_with(end.as_bytes()) {
        match stream.read(&mut buf) {
            Ok(0) => panic!("closed before {end:?}: {:?}", String::from_utf8_lossy(&got)),
            Ok(read) => got.extend_from_slice(&buf[..read]),
            Err(err) => panic!("{err} before {end:?}: {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8(got).unwrap()
}

/// A connection the worker accepted before it disconnects, whose request comes only after the
/// disconnect began, is served: the graceful-shutdown signal (`Worker::disconnected`) waits
/// for its first read, where hyper would otherwise close it as idle and fail the request.
#[test]
fn a_connection_accepted_before_the_disconnect_is_served_when_its_request_comes_after() {
    let _slot = Slot::take();
    let mut started = start(1);
    // Accepted first: one worker takes its connections in order (the primary hands them over
    // in the order it accepted them), so once the second one's request is in a handler the
    // first was accepted too, with nothing to read yet.
    let mut early = connect(started.addr);
    let mut held = connect(started.addr);
    held.write_all(b"GET /disconnecting HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert_eq!(started.lines.next().as_deref(), Some("slow-started"));

    // The cluster stops; the held request's answer says the worker is disconnecting (its
    // listeners closed), and only then does the early connection send its request.
    signal(started.primary.pid(), Signal::SIGTERM);
    let answer = read_until(&mut held, "disconnecting\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer:?}");
    // Without the wait for first reads, the graceful shutdown starts with the disconnect and
    // closes the early connection as idle within moments of that answer; give that a window
    // to show (well under the wait's one-second cap, which only a silent client meets).
    early.set_read_timeout(Some(IDLE_CLOSE_WINDOW)).unwrap();
    match early.peek(&mut [0; 1]) {
        Ok(0) => panic!("the early connection was closed as idle before its request"),
        Ok(_) => panic!("the early connection got bytes before its request"),
        Err(err) => assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the early connection failed before its request: {err}"
        ),
    }
    early.set_read_timeout(Some(crate::support::WAIT)).unwrap();
    early
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    early.read_to_string(&mut response).unwrap_or_else(|err| {
        panic!("reading the early connection's answer: {err} ({response:?})")
    });
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response:?}");
    assert!(response.contains("handled by process."), "{response:?}");
    drop(held);
    expect_clean_exit(started);
}
