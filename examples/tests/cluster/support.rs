//! Shared helpers: an in-process primary on a thread with its events collected, clients, and
//! child-process bookkeeping. Every wait has a deadline, so a broken build fails instead of
//! hanging.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Condvar, Mutex, Once};
use std::time::Duration;

use cluster_primary::{
    Builder, Cluster, Event, ExitStatus, Handle, Message, Signal, SlotId, Status, WorkerId,
    WorkerInfo,
};
use cluster_test_support::{Deadline, ProcStat};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

pub use cluster_test_support::is_alive;

/// How long any single wait may take before the test fails. Generous: these machines are
/// shared and noisy; it only catches hangs.
pub const WAIT: Duration = Duration::from_secs(20);

/// The worker program of every in-process primary.
pub const TEST_WORKER: &str = env!("CARGO_BIN_EXE_test-worker");
/// A primary in a process of its own.
pub const TEST_PRIMARY: &str = env!("CARGO_BIN_EXE_test-primary");

/// A test-worker message: a kind and its fields.
pub type Msg = (String, Vec<String>);

pub fn msg<const N: usize>(kind: &str, fields: [&str; N]) -> Msg {
    (
        kind.to_owned(),
        fields.iter().map(|field| (*field).to_owned()).collect(),
    )
}

pub fn decode(message: &Message) -> Msg {
    message.decode::<Msg>().expect("a test-worker message")
}

/// Once per test process: make it a child subreaper, so that the workers of a primary that
/// dies (a `test-primary` the test killed, an example program) become its children instead of
/// init's, and the test can reap them and read how they ended.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// At most this many clusters (each with its processes) run at once in this test binary, so
/// that the spawn-heavy tests do not starve each other on a small machine.
const MAX_CLUSTERS: usize = 2;
static RUNNING: Mutex<usize> = Mutex::new(0);
static RUNNING_CHANGED: Condvar = Condvar::new();

/// A place among the clusters allowed to run at once; released when dropped.
pub struct Slot(());

impl Slot {
    pub fn take() -> Slot {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        while *running >= MAX_CLUSTERS {
            running = RUNNING_CHANGED
                .wait(running)
                .unwrap_or_else(|p| p.into_inner());
        }
        *running += 1;
        Slot(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        RUNNING_CHANGED.notify_one();
    }
}

/// A primary set up for an in-process test: the test worker as its program with no
/// arguments, no signal handling (the test process's signals are not the cluster's), bounded
/// timeouts.
pub fn builder(workers: usize) -> Builder {
    Builder::new()
        .workers(workers)
        .program(TEST_WORKER)
        .args(Vec::<String>::new())
        .handle_signals(false)
        .start_timeout(WAIT)
        .shutdown_timeout(WAIT)
}

// ----- an in-process primary -----

/// A primary running `Primary::run` on a thread of the test process; its events come to the
/// test through a channel and are kept in order.
pub struct Harness {
    pub handle: Handle,
    events: Receiver<Event>,
    /// Every event so far, in order, and whether a wait has taken it.
    log: Vec<(Event, bool)>,
    done: Receiver<Result<(), String>>,
    finished: bool,
    _slot: Slot,
}

impl Harness {
    pub fn start(builder: Builder) -> Harness {
        Harness::start_with(builder, |_, _| {})
    }

    /// Starts the primary; `hook` runs on its loop for every event, before the test sees it.
    pub fn start_with(
        builder: Builder,
        hook: impl FnMut(&mut Cluster, &Event) + Send + 'static,
    ) -> Harness {
        Harness::launch(move || builder.build(), hook)
    }

    /// Runs the primary `make` builds on the primary's thread (a test may change the world
    /// between the build and the run there).
    pub fn start_making(
        make: impl FnOnce() -> Result<cluster_primary::Primary, cluster_primary::Error> + Send + 'static,
    ) -> Harness {
        Harness::launch(make, |_, _| {})
    }

    fn launch(
        make: impl FnOnce() -> Result<cluster_primary::Primary, cluster_primary::Error> + Send + 'static,
        mut hook: impl FnMut(&mut Cluster, &Event) + Send + 'static,
    ) -> Harness {
        init();
        let slot = Slot::take();
        let (event_tx, events) = mpsc::channel();
        let (handle_tx, handle_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("primary".into())
            .spawn(move || {
                let primary = match make() {
                    Ok(primary) => primary,
                    Err(err) => {
                        let _ = done_tx.send(Err(format!("build: {err}")));
                        return;
                    }
                };
                let _ = handle_tx.send(primary.handle());
                let result = primary.run(|cluster, event| {
                    hook(cluster, &event);
                    let _ = event_tx.send(event);
                });
                let _ = done_tx.send(result.map_err(|err| err.to_string()));
            })
            .expect("spawn the primary's thread");
        let handle = match handle_rx.recv_timeout(WAIT) {
            Ok(handle) => handle,
            Err(_) => panic!(
                "the primary did not start: {:?}",
                done.recv_timeout(Duration::ZERO)
            ),
        };
        Harness {
            handle,
            events,
            log: Vec::new(),
            done,
            finished: false,
            _slot: slot,
        }
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.log.iter().map(|(event, _)| event.clone()).collect()
    }

    /// Waits for the first event not yet taken by a wait for which `matches` says `Some`,
    /// and takes it.
    pub fn wait_for<T>(&mut self, what: &str, mut matches: impl FnMut(&Event) -> Option<T>) -> T {
        for (event, taken) in &mut self.log {
            if !*taken {
                if let Some(found) = matches(event) {
                    *taken = true;
                    return found;
                }
            }
        }
        let deadline = Deadline::after(WAIT);
        loop {
            let event = match self.events.recv_timeout(deadline.left()) {
                Ok(event) => event,
                Err(_) => panic!(
                    "no {what} within {WAIT:?}; events so far: {:#?}",
                    self.events()
                ),
            };
            let found = matches(&event);
            self.log.push((event, found.is_some()));
            if let Some(found) = found {
                return found;
            }
        }
    }

    /// Waits for `Ready` and returns its addresses.
    pub fn wait_ready(&mut self) -> Vec<SocketAddr> {
        self.wait_for("Ready", |event| match event {
            Event::Ready { addrs } => Some(addrs.clone()),
            _ => None,
        })
    }

    /// Waits for a message of `kind` (from `from`, if given); returns its sender and fields.
    pub fn wait_message(&mut self, from: Option<WorkerId>, kind: &str) -> (WorkerId, Vec<String>) {
        self.wait_for(&format!("message {kind:?} from {from:?}"), |event| {
            let Event::Message { worker, message } = event else {
                return None;
            };
            let (got, fields) = decode(message);
            (got == kind && from.is_none_or(|from| from == *worker)).then_some((*worker, fields))
        })
    }

    /// Waits for the `Exit` of `worker`; returns its status and `after_disconnect`.
    pub fn wait_exit(&mut self, worker: WorkerId) -> (ExitStatus, bool) {
        self.wait_for(&format!("Exit of {worker}"), |event| match event {
            Event::Exit {
                worker: w,
                status,
                after_disconnect,
                ..
            } if *w == worker => Some((*status, *after_disconnect)),
            _ => None,
        })
    }

    /// Waits for a `Fork`; returns the worker, its pid and its slot.
    pub fn wait_fork(&mut self) -> (WorkerId, u32, SlotId) {
        self.wait_for("Fork", |event| match event {
            Event::Fork { worker, pid, slot } => Some((*worker, *pid, *slot)),
            _ => None,
        })
    }

    pub fn wait_listening(&mut self, worker: WorkerId) -> SocketAddr {
        self.wait_for(&format!("Listening of {worker}"), |event| match event {
            Event::Listening { worker: w, addr } if *w == worker => Some(*addr),
            _ => None,
        })
    }

    /// A status snapshot from the primary's loop.
    pub fn status(&self) -> Status {
        self.handle.status(WAIT).expect("the primary's status")
    }

    /// The live worker in `slot`.
    pub fn worker_in_slot(&self, slot: impl Into<SlotOf>) -> WorkerInfo {
        let SlotOf(slot) = slot.into();
        let status = self.status();
        status
            .workers
            .into_iter()
            .find(|worker| worker.slot == slot)
            .unwrap_or_else(|| panic!("no worker in slot {slot}"))
    }

    pub fn send(&self, worker: WorkerId, message: &Msg) {
        self.handle.send(worker, message).expect("send to a worker");
    }

    /// Waits for `Primary::run` to return (by itself, or after a stop) and for every event.
    pub fn wait_finished(&mut self) -> Result<(), String> {
        let result = match self.done.recv_timeout(WAIT) {
            Ok(result) => result,
            Err(_) => panic!(
                "the primary did not finish within {WAIT:?}; events: {:#?}",
                self.events()
            ),
        };
        self.finished = true;
        // Every event was sent before `run` returned.
        while let Ok(event) = self.events.try_recv() {
            self.log.push((event, false));
        }
        result
    }

    /// Stops the cluster gracefully, waits for it to finish, and returns every event.
    pub fn stop(mut self) -> Vec<Event> {
        self.handle.stop(true).expect("stop the primary");
        let result = self.wait_finished();
        assert_eq!(result, Ok(()), "the primary failed");
        self.events()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // A test that failed half-way: kill every worker at once and wait for the loop.
        let _ = self.handle.stop(false);
        let _ = self.done.recv_timeout(WAIT);
    }
}

/// The workers each event names, in order of their `Fork`.
pub fn forks(events: &[Event]) -> Vec<(WorkerId, u32, SlotId)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Fork { worker, pid, slot } => Some((*worker, *pid, *slot)),
            _ => None,
        })
        .collect()
}

/// The worker an event is about, if any.
pub fn worker_of(event: &Event) -> Option<WorkerId> {
    match event {
        Event::Fork { worker, .. }
        | Event::Online { worker }
        | Event::Listening { worker, .. }
        | Event::Message { worker, .. }
        | Event::Disconnect { worker }
        | Event::Exit { worker, .. } => Some(*worker),
        _ => None,
    }
}

/// Polls `condition` until it holds; fails at the deadline. For states that no event
/// announces (a count in the primary's status), never as a stand-in for an event.
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    cluster_test_support::wait_until(what, WAIT, condition);
}

// ----- clients -----

/// What a test worker says on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub worker: u64,
    pub pid: u32,
    pub port: u16,
}

pub fn parse_greeting(line: &str) -> Greeting {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["worker", id, "pid", pid, "port", port] => Greeting {
            worker: id.parse().expect("worker id"),
            pid: pid.parse().expect("pid"),
            port: port.parse().expect("port"),
        },
        _ => panic!("not a greeting: {line:?}"),
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|err| panic!("connect {addr}: {err}"));
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream
}

/// Reads everything a connection says until the worker closes it; it must be exactly one
/// greeting line (a connection served twice would say two).
pub fn read_greeting(stream: &mut TcpStream) -> Greeting {
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .unwrap_or_else(|err| panic!("reading an answer: {err} (got {text:?})"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one answer, got {text:?}");
    parse_greeting(lines[0])
}

/// One connection, answered by a serving test worker.
pub fn greet(addr: SocketAddr) -> Greeting {
    read_greeting(&mut connect(addr))
}

/// Reads one line (the greeting of a holding worker), byte by byte so that nothing after it
/// is consumed, and leaves the connection open. Empty at the end of the stream.
pub fn read_line(mut stream: &TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(err) => panic!("reading a line: {err} (got {line:?})"),
        }
    }
    String::from_utf8(line).expect("a text line")
}

/// Counts by key.
pub fn tally<K: Ord>(items: impl IntoIterator<Item = K>) -> BTreeMap<K, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_insert(0) += 1;
    }
    counts
}

/// An HTTP/1.1 GET with `Connection: close`; returns the status line and the body.
pub fn http_get(addr: SocketAddr) -> (String, String) {
    use std::io::Write;
    let mut stream = connect(addr);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send a request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|err| panic!("reading a response: {err} (got {response:?})"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

// ----- processes -----

pub fn pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("a pid"))
}

pub fn signal(target: u32, signal: Signal) {
    let number = nix::sys::signal::Signal::try_from(signal.as_raw()).expect("a signal");
    nix::sys::signal::kill(pid(target), number)
        .unwrap_or_else(|err| panic!("kill({target}, {signal}): {err}"));
}

/// A child process's stdout, read line by line on a thread.
pub struct Lines {
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stdout: impl Read + Send + 'static) -> Lines {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line, or `None` at the end of the output; fails at the deadline.
    pub fn next(&mut self) -> Option<String> {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("no output within {WAIT:?}; so far: {:#?}", self.seen)
            }
        }
    }

    /// Everything up to the end of the output (every holder of the pipe closed it).
    pub fn rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(line) = self.next() {
            rest.push(line);
        }
        rest
    }
}

/// A child process that is killed (and reaped) if the test ends without reaping it, together
/// with any other pids (its workers) it is responsible for.
pub struct Guard {
    pub child: Option<Child>,
    pub others: Vec<u32>,
}

impl Guard {
    pub fn new(child: Child) -> Guard {
        Guard {
            child: Some(child),
            others: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the child to exit and reaps it; fails (killing it) at the deadline.
    // Reaped by pid (with a deadline), which `Child` cannot see.
    #[allow(clippy::zombie_processes)]
    pub fn wait(&mut self) -> WaitStatus {
        let child = self.child.take().expect("a child to wait for");
        // Reaped by pid here; the `Child` has nothing left to wait for.
        cluster_test_support::reap(child.id(), WAIT)
    }

    /// Reaps one of the other processes (an orphan that came to this process) and forgets it.
    pub fn reap_other(&mut self, other: u32) -> WaitStatus {
        let status = cluster_test_support::reap(other, WAIT);
        self.others.retain(|&known| known != other);
        status
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its processes that are still around have come to this process by now (it is a
        // subreaper); kill only those, so that a recycled pid is never hit.
        for &other in &self.others {
            if ProcStat::of_process(other).map(|stat| stat.ppid) == Some(std::process::id()) {
                let _ = nix::sys::signal::kill(pid(other), nix::sys::signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid(other), None);
            }
        }
    }
}

/// A slot, given as a number or as a `SlotId`.
pub struct SlotOf(pub SlotId);

impl From<u32> for SlotOf {
    fn from(slot: u32) -> SlotOf {
        SlotOf(SlotId(slot))
    }
}

impl From<SlotId> for SlotOf {
    fn from(slot: SlotId) -> SlotOf {
        SlotOf(slot)
    }
}
