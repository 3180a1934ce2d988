//! The example programs, run as a user would: `hello`, `crash`, `messages`, and `hello` on
//! axum (`axum_hello`) and on hyper's connection API (`hyper_hello`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use cluster_primary::Signal;
use nix::sys::wait::WaitStatus;

use crate::support::{Guard, Lines, Slot, http_get, init, is_alive, pid, signal};

const HELLO: &str = env!("CARGO_BIN_EXE_hello");
const CRASH: &str = env!("CARGO_BIN_EXE_crash");
const MESSAGES: &str = env!("CARGO_BIN_EXE_messages");
const AXUM_HELLO: &str = env!("CARGO_BIN_EXE_axum_hello");
const HYPER_HELLO: &str = env!("CARGO_BIN_EXE_hyper_hello");

/// Starts an example with `args` and waits for its ready line, which must be exactly
/// `ready http://127.0.0.1:PORT workers=N mode=rr`; returns the address.
fn start(program: &str, args: &[&str], workers: usize) -> (Guard, Lines, SocketAddr) {
    init();
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let guard = Guard::new(child);
    let line = lines.next().expect("a ready line");
    let addr = line
        .strip_prefix("ready http://")
        .and_then(|rest| rest.strip_suffix(&format!(" workers={workers} mode=rr")))
        .unwrap_or_else(|| panic!("not the ready line: {line:?}"));
    let addr: SocketAddr = addr.parse().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    (guard, lines, addr)
}

/// The pid in a `handled by process.<pid>` body.
fn handled_by(body: &str) -> u32 {
    body.lines()
        .next()
        .and_then(|line| line.strip_prefix("handled by process."))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

fn get_ok(addr: SocketAddr) -> u32 {
    let (status, body) = http_get(addr);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body:?}");
    handled_by(&body)
}

#[test]
fn hello_with_2_workers_is_ready_once_serves_from_both_and_ends_on_sigterm() {
    serves_from_both_workers_and_ends_on_sigterm(HELLO);
}

#[test]
fn hello_with_0_workers_serves_alone() {
    let _slot = Slot::take();
    let (mut process, _lines, addr) = start(HELLO, &["--workers", "0", "--port", "0"], 0);
    // A plain bind: the process itself answers.
    for _ in 0..3 {
        assert_eq!(get_ok(addr), process.pid());
    }
    signal(process.pid(), Signal::SIGTERM);
    process.wait();
}

#[test]
fn crash_with_2_workers_serves_200_sequential_requests_without_a_failure() {
    let _slot = Slot::take();
    let (mut primary, _lines, addr) = start(CRASH, &["--workers", "2", "--port", "0"], 2);
    let mut pids = BTreeSet::new();
    for request in 0..200 {
        let pid = get_ok(addr);
        // Each worker retires after its one request (it leaves the rotation before its
        // answer is written), so every request meets a fresh worker.
        assert!(pids.insert(pid), "request {request}: {pid} answered twice");
        primary.others.push(pid);
    }
    signal(primary.pid(), Signal::SIGTERM);
    let primary_pid = primary.pid();
    assert_eq!(primary.wait(), WaitStatus::Exited(pid(primary_pid), 0));
    primary.others.clear();
}

#[test]
fn messages_workers_hear_the_cluster_wide_count_from_the_primary() {
    let _slot = Slot::take();
    let (mut primary, _lines, addr) = start(MESSAGES, &["--workers", "2", "--port", "0"], 2);
    // Each response carries the latest cluster-wide count its worker heard, plus one. Once a
    // worker reports more requests than it answered itself, the other worker's reports went
    // through the primary and back: the count is global. Broadcasts are asynchronous, so ask
    // until that shows (bounded by the deadline).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut answered: std::collections::BTreeMap<u32, u64> = Default::default();
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the count never spread: {answered:?}"
        );
        let (status, body) = http_get(addr);
        assert_eq!(status, "HTTP/1.1 200 OK", "{body:?}");
        let worker = handled_by(&body);
        let own = answered.entry(worker).or_default();
        *own += 1;
        let count: u64 = body
            .lines()
            .find_map(|line| line.strip_prefix("requests served by the cluster: "))
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no count in {body:?}"));
        if count > *own {
            break;
        }
    }
    primary.others.extend(answered.keys());
    signal(primary.pid(), Signal::SIGTERM);
    let primary_pid = primary.pid();
    assert_eq!(primary.wait(), WaitStatus::Exited(pid(primary_pid), 0));
    primary.others.clear();
}

/// `hello` or one of its async twins with 2 workers: ready once, answers from both workers
/// (never the primary) with `hello`'s body, and a SIGTERM ends it with 0, every worker reaped
/// (the primary returns only once they are), nothing printed but the one ready line.
fn serves_from_both_workers_and_ends_on_sigterm(program: &str) {
    let _slot = Slot::take();
    let (mut primary, mut lines, addr) = start(program, &["--workers", "2", "--port", "0"], 2);
    // rr hands connections to the workers in turn, so a few requests reach both.
    let pids: BTreeSet<u32> = (0..4).map(|_| get_ok(addr)).collect();
    assert_eq!(pids.len(), 2, "both workers answer: {pids:?}");
    assert!(!pids.contains(&primary.pid()), "the primary serves nothing");
    primary.others.extend(&pids);

    signal(primary.pid(), Signal::SIGTERM);
    let primary_pid = primary.pid();
    assert_eq!(primary.wait(), WaitStatus::Exited(pid(primary_pid), 0));
    for &worker in &pids {
        assert!(!is_alive(worker), "worker {worker} outlived its primary");
    }
    assert_eq!(lines.rest(), Vec::<String>::new());
    primary.others.clear();
}

/// An async `hello` with 0 workers serves alone: the process itself answers.
fn async_hello_serves_alone(program: &str) {
    let _slot = Slot::take();
    let (mut process, _lines, addr) = start(program, &["--workers", "0", "--port", "0"], 0);
    for _ in 0..3 {
        assert_eq!(get_ok(addr), process.pid());
    }
    signal(process.pid(), Signal::SIGTERM);
    process.wait();
}

#[test]
fn axum_hello_with_2_workers_serves_from_both_and_ends_on_sigterm() {
    serves_from_both_workers_and_ends_on_sigterm(AXUM_HELLO);
}

#[test]
fn axum_hello_with_0_workers_serves_alone() {
    async_hello_serves_alone(AXUM_HELLO);
}

#[test]
fn hyper_hello_with_2_workers_serves_from_both_and_ends_on_sigterm() {
    serves_from_both_workers_and_ends_on_sigterm(HYPER_HELLO);
}

#[test]
fn hyper_hello_with_0_workers_serves_alone() {
    async_hello_serves_alone(HYPER_HELLO);
}
