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
