//! `hello` as an operator runs it, for the end-to-end tests: a primary in its own process
//! with its ready line read and its log kept when asked, and clients that count every
//! failed request.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cluster_primary::Signal;
use nix::sys::wait::WaitStatus;

use crate::support::{Guard, Lines, Slot, WAIT, init, signal, wait_until};

pub(crate) const HELLO: &str = env!("CARGO_BIN_EXE_hello");

/// A running `hello` primary.
pub(crate) struct Hello {
    pub(crate) guard: Guard,
    pub(crate) addr: SocketAddr,
    _lines: Lines,
    /// Its log (the primary's at `info`), when asked for.
    log: Option<Lines>,
    _slot: Slot,
}

impl Hello {
    /// Starts `hello --port 0` with `args` and waits for its ready line.
    pub(crate) fn start(args: &[&str]) -> Hello {
        Hello::start_with_log(args, false)
    }

    /// The same, keeping the primary's log lines (at `info`) when `log` is set.
    pub(crate) fn start_with_log(args: &[&str], log: bool) -> Hello {
        let level = if log { "cluster_primary=info" } else { "error" };
        Hello::spawn(args, Some(level), log)
    }

    /// The same, with its whole log at the default level (no `RUST_LOG`), as an operator
    /// sees it.
    pub(crate) fn start_with_default_log(args: &[&str]) -> Hello {
        Hello::spawn(args, None, true)
    }

    fn spawn(args: &[&str], rust_log: Option<&str>, keep_log: bool) -> Hello {
        init();
        let slot = Slot::take();
        let mut command = Command::new(HELLO);
        command.args(["--port", "0"]).args(args);
        match rust_log {
            Some(level) => command.env("RUST_LOG", level),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if keep_log {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        let log = child.stderr.take().map(Lines::new);
        let mut lines = Lines::new(child.stdout.take().unwrap());
        let guard = Guard::new(child);
        let line = lines.next().expect("a ready line");
        let addr = line
            .strip_prefix("ready http://")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("not the ready line: {line:?}"))
            .parse()
            .unwrap();
        Hello {
            guard,
            addr,
            _lines: lines,
            log,
            _slot: slot,
        }
    }

    /// Waits for a log line that contains `text`.
    pub(crate) fn wait_log(&mut self, text: &str) {
        self.wait_log_line(|line| line.contains(text));
    }

    /// Waits for a log line that `matches`, and returns it.
    pub(crate) fn wait_log_line(&mut self, mut matches: impl FnMut(&str) -> bool) -> String {
        let log = self.log.as_mut().expect("started with its log");
        while let Some(line) = log.next() {
            if matches(&line) {
                return line;
            }
        }
        panic!("the log ended without the line looked for");
    }

    pub(crate) fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The primary's child processes: its workers.
    pub(crate) fn workers(&self) -> BTreeSet<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect()
    }

    /// Waits until the primary has exactly `count` workers, none of them in `not`.
    pub(crate) fn wait_workers(&self, count: usize, not: &BTreeSet<u32>) -> BTreeSet<u32> {
        let mut workers = BTreeSet::new();
        wait_until(&format!("{count} workers, none of {not:?}"), || {
            workers = self.workers();
            workers.len() == count && workers.is_disjoint(not)
        });
        workers
    }

    /// Stops it with SIGTERM and checks that it exits 0.
    pub(crate) fn stop(mut self) {
        let primary = self.pid();
        signal(primary, Signal::SIGTERM);
        assert_eq!(
            self.guard.wait(),
            WaitStatus::Exited(crate::support::pid(primary), 0),
            "a clean stop exits 0"
        );
    }
}

/// What a request came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Answered 200 by this pid.
    Ok(u32),
    /// Anything else, with what happened.
    Failed(String),
}

/// Reads one HTTP response (head and `Content-Length` body) off `stream`.
pub(crate) fn read_response(stream: &mut TcpStream) -> Outcome {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]);
                if !head.starts_with("HTTP/1.1 200") {
                    return Outcome::Failed(format!("status {head:?}"));
                }
                return body
                    .lines()
                    .next()
                    .and_then(|line| line.strip_prefix("handled by process."))
                    .and_then(|pid| pid.parse().ok())
                    .map_or_else(|| Outcome::Failed(format!("body {body:?}")), Outcome::Ok);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Outcome::Failed(format!("closed after {} bytes", buffer.len())),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(err) => return Outcome::Failed(format!("read: {err}")),
        }
    }
}

/// One request on a new connection.
pub(crate) fn get_once(addr: SocketAddr, path: &str) -> Outcome {
    let mut stream = match TcpStream::connect(addr) {
        Ok(stream) => stream,
        Err(err) => return Outcome::Failed(format!("connect: {err}")),
    };
    let _ = stream.set_read_timeout(Some(WAIT));
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    if let Err(err) = stream.write_all(request.as_bytes()) {
        return Outcome::Failed(format!("write: {err}"));
    }
    read_response(&mut stream)
}

/// Concurrent clients sending requests until stopped: each on a new connection, or each on
/// one keep-alive connection that it never replaces (a failure on it counts, and only then
/// does the client reconnect).
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    pids: Arc<Mutex<BTreeSet<u32>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr, clients: usize, keep_alive: bool) -> Load {
        let load = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failures: Arc::default(),
            pids: Arc::default(),
            clients: Vec::new(),
        };
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok) = (Arc::clone(&load.stop), Arc::clone(&load.ok));
                let (failures, pids) = (Arc::clone(&load.failures), Arc::clone(&load.pids));
                std::thread::spawn(move || {
                    let mut connection: Option<TcpStream> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = if keep_alive {
                            keep_alive_request(addr, &mut connection)
                        } else {
                            get_once(addr, "/")
                        };
                        match outcome {
                            Outcome::Ok(pid) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                pids.lock().unwrap().insert(pid);
                            }
                            Outcome::Failed(what) => {
                                connection = None;
                                failures.lock().unwrap().push(what);
                            }
                        }
                    }
                })
            })
            .collect();
        Load { clients, ..load }
    }

    pub(crate) fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests more than now were answered.
    pub(crate) fn wait_for_more(&self, more: u64) {
        let target = self.ok() + more;
        wait_until(&format!("{target} answered requests"), || {
            self.ok() >= target || !self.failures.lock().unwrap().is_empty()
        });
    }

    pub(crate) fn pids(&self) -> BTreeSet<u32> {
        self.pids.lock().unwrap().clone()
    }

    /// Stops the clients; returns the requests answered and the failures.
    pub(crate) fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

pub(crate) fn keep_alive_request(addr: SocketAddr, connection: &mut Option<TcpStream>) -> Outcome {
    if connection.is_none() {
        match TcpStream::connect(addr) {
            Ok(stream) => {
                let _ = stream.set_read_timeout(Some(WAIT));
                *connection = Some(stream);
            }
            Err(err) => return Outcome::Failed(format!("connect: {err}")),
        }
    }
    let Some(stream) = connection.as_mut() else {
        return Outcome::Failed("no connection".into());
    };
    if let Err(err) = stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n") {
        return Outcome::Failed(format!("write: {err}"));
    }
    read_response(stream)
}

/// Runs `program` with `args` and no `RUST_LOG` (the default level), waits at most `within`
/// for it to exit; its exit code and stderr.
pub(crate) fn run_to_exit(program: &str, args: &[&str], within: Duration) -> (Option<i32>, String) {
    init();
    let _slot = Slot::take();
    let mut child = Command::new(program)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut guard = Guard::new(child);
    let started = Instant::now();
    let status = cluster_test_support::reap(guard.pid(), within);
    let elapsed = started.elapsed();
    let code = match status {
        WaitStatus::Exited(_, code) => Some(code),
        // The guard kills it.
        other => panic!("{program} did not exit within {within:?} ({elapsed:?}): {other:?}"),
    };
    // Reaped already: nothing for the guard to do.
    guard.child = None;
    (code, reader.join().unwrap())
}
