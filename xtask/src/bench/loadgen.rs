//! A closed-loop HTTP load generator: N clients, each sending its next request as soon as the
//! previous one was answered, on a new connection per request or over keep-alive.
//!
//! Each thread runs a `mio` loop over its share of the clients. Only requests completed inside
//! the measured window (after the warm-up) count; latencies go into an HDR histogram; errors
//! are counted by kind; the `process.<pid>` in each body tells which worker answered.
//!
//! [`run`] loads for a fixed time; [`start`] loads until [`Load::stop`], for a scenario that
//! acts on the server in the middle of the load. Both keep [`Live`] counters that can be read
//! while the load runs.
//!
//! A client that fails (refused, reset, closed before the whole answer, timed out) counts an
//! error and connects again. A keep-alive client reconnects only then, or when the server
//! answers `Connection: close` (counted apart, not as an error).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// What load to apply.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    /// The measured window of [`run`]; [`start`] ignores it (its load runs until stopped).
    pub(crate) duration: Duration,
    pub(crate) keep_alive: bool,
    pub(crate) threads: usize,
    /// The CPUs the load threads run on, if pinned.
    pub(crate) cpus: Option<Vec<usize>>,
    /// A request not answered by then counts as a `timeout` error.
    pub(crate) request_timeout: Duration,
}

/// What the load found.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Requests answered inside the measured window.
    pub(crate) requests: u64,
    /// The measured window.
    pub(crate) window: Duration,
    /// Latency of the answered requests, in microseconds.
    pub(crate) latency_us: Histogram<u64>,
    /// Errors by kind, inside the measured window.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Answers per worker process id, inside the measured window.
    pub(crate) per_pid: BTreeMap<u32, u64>,
    /// Keep-alive clients whose connection the server closed with its answer (`Connection:
    /// close`), inside the measured window: they connected again, which is no error.
    pub(crate) server_closes: u64,
}

impl LoadResult {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }
}

/// What the load threads count as they go, readable while the load runs.
#[derive(Debug, Default)]
pub(crate) struct Live {
    answered: AtomicU64,
    errors: AtomicU64,
    server_closes: AtomicU64,
    first_answers: Mutex<BTreeMap<u32, Instant>>,
}

impl Live {
    /// Requests answered so far, warm-up included.
    pub(crate) fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Errors so far, inside the measured window (those the result counts).
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Keep-alive connections the server closed with its answer so far, inside the measured
    /// window (those the result counts).
    pub(crate) fn server_closes(&self) -> u64 {
        self.server_closes.load(Ordering::Relaxed)
    }

    /// When process `pid` first answered (when its whole answer had arrived), warm-up
    /// included.
    pub(crate) fn first_answer(&self, pid: u32) -> Option<Instant> {
        self.first_answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pid)
            .copied()
    }

    fn answered_by(&self, pid: u32, at: Instant) {
        self.first_answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pid)
            .or_insert(at);
    }
}

/// Runs the load for `spec.duration` after the warm-up. `live` counts as the load goes.
///
/// `at_edge` runs on the calling thread, off the load threads' path, once when the measured
/// window opens and once when it closes (the instants after which the load threads start and
/// stop counting); what it returns comes back with the result, opening first.
pub(crate) fn run<T>(
    spec: &LoadSpec,
    live: Arc<Live>,
    mut at_edge: impl FnMut() -> T,
) -> Result<(LoadResult, [T; 2])> {
    let start = Instant::now();
    let end = start + spec.warmup + spec.duration;
    let load = Load::spawn(spec, live, start, Some(end))?;
    std::thread::sleep(load.window_start.saturating_duration_since(Instant::now()));
    let opened = at_edge();
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let closed = at_edge();
    let total = load.join(spec.duration)?;
    Ok((total, [opened, closed]))
}

/// Starts the load, which runs until [`Load::stop`]; the measured window opens after
/// `spec.warmup` (`spec.duration` is not used).
pub(crate) fn start(spec: &LoadSpec, live: Arc<Live>) -> Result<Load> {
    Load::spawn(spec, live, Instant::now(), None)
}

/// A load that runs until stopped (dropped without [`Load::stop`], its threads stop soon
/// after, unwaited).
pub(crate) struct Load {
    threads: Vec<JoinHandle<Result<LoadResult>>>,
    stop: Arc<AtomicBool>,
    window_start: Instant,
}

impl Load {
    fn spawn(
        spec: &LoadSpec,
        live: Arc<Live>,
        start: Instant,
        end: Option<Instant>,
    ) -> Result<Load> {
        let window_start = start + spec.warmup;
        let stop = Arc::new(AtomicBool::new(false));
        let count = spec.threads.clamp(1, spec.connections.max(1));
        let threads = (0..count)
            .map(|i| {
                let clients = spec.connections / count + usize::from(i < spec.connections % count);
                let spec = spec.clone();
                let live = Arc::clone(&live);
                let stop = Arc::clone(&stop);
                std::thread::Builder::new()
                    .name(format!("loadgen-{i}"))
                    .spawn(move || {
                        if let Some(cpus) = &spec.cpus {
                            super::affinity::pin_current_thread(cpus)?;
                        }
                        Generator::new(spec, clients, window_start, end, stop, live)?.run()
                    })
            })
            .collect::<io::Result<_>>()
            .context("starting load threads")?;
        Ok(Load {
            threads,
            stop,
            window_start,
        })
    }

    /// When the measured window opens (or opened).
    pub(crate) fn window_start(&self) -> Instant {
        self.window_start
    }

    /// Stops the load and returns what it found; the measured window is from its opening to
    /// now (none if the warm-up is not over).
    pub(crate) fn stop(self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        let window = Instant::now().saturating_duration_since(self.window_start);
        self.join(window)
    }

    /// Waits for the load threads and adds up their results.
    fn join(mut self, window: Duration) -> Result<LoadResult> {
        let mut total = LoadResult {
            requests: 0,
            window,
            latency_us: new_histogram()?,
            errors: BTreeMap::new(),
            per_pid: BTreeMap::new(),
            server_closes: 0,
        };
        for thread in std::mem::take(&mut self.threads) {
            let part = thread
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            total.requests += part.requests;
            total.server_closes += part.server_closes;
            total
                .latency_us
                .add(&part.latency_us)
                .context("merging histograms")?;
            for (kind, count) in part.errors {
                *total.errors.entry(kind).or_default() += count;
            }
            for (pid, count) in part.per_pid {
                *total.per_pid.entry(pid).or_default() += count;
            }
        }
        Ok(total)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn new_histogram() -> Result<Histogram<u64>> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("creating a histogram")
}

/// Where one client is in its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected; connect at this time (a short pause after a refused connect).
    Waiting(Instant),
    Connecting,
    Writing,
    Reading,
}

struct Client {
    stream: Option<TcpStream>,
    phase: Phase,
    sent_at: Instant,
    written: usize,
    input: Vec<u8>,
}

/// One load thread.
struct Generator {
    spec: LoadSpec,
    poll: Poll,
    clients: Vec<Client>,
    request: Vec<u8>,
    window_start: Instant,
    /// When to stop, for a load of fixed length.
    end: Option<Instant>,
    /// Set when a load that runs until stopped is to stop.
    stop: Arc<AtomicBool>,
    live: Arc<Live>,
    /// The processes that answered this thread so far.
    seen: BTreeSet<u32>,
    result: LoadResult,
}

/// A client whose connect was refused waits this long before trying again, so that a
/// restarting server is not hammered by a spin loop.
const REFUSED_PAUSE: Duration = Duration::from_millis(1);

impl Generator {
    fn new(
        spec: LoadSpec,
        clients: usize,
        window_start: Instant,
        end: Option<Instant>,
        stop: Arc<AtomicBool>,
        live: Arc<Live>,
    ) -> Result<Generator> {
        let connection = if spec.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: {connection}\r\n\r\n",
            spec.addr
        );
        let now = Instant::now();
        let clients = (0..clients)
            .map(|_| Client {
                stream: None,
                phase: Phase::Waiting(now),
                sent_at: now,
                written: 0,
                input: Vec::with_capacity(512),
            })
            .collect();
        Ok(Generator {
            poll: Poll::new().context("creating a poll")?,
            clients,
            request: request.into_bytes(),
            window_start,
            end,
            stop,
            live,
            seen: BTreeSet::new(),
            result: LoadResult {
                requests: 0,
                window: spec.duration,
                latency_us: new_histogram()?,
                errors: BTreeMap::new(),
                per_pid: BTreeMap::new(),
                server_closes: 0,
            },
            spec,
        })
    }

    fn run(mut self) -> Result<LoadResult> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if self.end.is_some_and(|end| now >= end) || self.stop.load(Ordering::Relaxed) {
                return Ok(self.result);
            }
            for index in 0..self.clients.len() {
                self.check_client(index, now);
            }
            let mut timeout = Duration::from_millis(5);
            if let Some(end) = self.end {
                timeout = timeout.min(end - now);
            }
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("polling"),
            }
            for event in events.iter() {
                self.drive(event.token().0);
            }
        }
    }

    /// Starts clients that are due to connect and times out stuck requests.
    fn check_client(&mut self, index: usize, now: Instant) {
        match self.clients[index].phase {
            Phase::Waiting(at) if at <= now => self.connect(index),
            Phase::Connecting | Phase::Writing | Phase::Reading
                if now.duration_since(self.clients[index].sent_at) > self.spec.request_timeout =>
            {
                self.fail(index, "timeout");
            }
            _ => {}
        }
    }

    fn connect(&mut self, index: usize) {
        let now = Instant::now();
        match TcpStream::connect(self.spec.addr) {
            Ok(mut stream) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if let Err(err) = self
                    .poll
                    .registry()
                    .register(&mut stream, Token(index), interest)
                {
                    self.count_error(&format!("register: {err}"));
                    self.clients[index].phase = Phase::Waiting(now + REFUSED_PAUSE);
                    return;
                }
                let client = &mut self.clients[index];
                client.stream = Some(stream);
                client.phase = Phase::Connecting;
                client.sent_at = now;
                client.written = 0;
                client.input.clear();
            }
            Err(err) => {
                self.count_error(&error_kind(&err));
                self.clients[index].phase = Phase::Waiting(now + REFUSED_PAUSE);
            }
        }
    }

    /// Moves a client as far as its socket allows.
    fn drive(&mut self, index: usize) {
        loop {
            let step = match self.clients[index].phase {
                Phase::Waiting(_) => return,
                Phase::Connecting => self.finish_connect(index),
                Phase::Writing => self.write_request(index),
                Phase::Reading => self.read_response(index),
            };
            match step {
                Ok(true) => {}
                Ok(false) => return,
                Err(kind) => {
                    self.fail(index, &kind);
                    return;
                }
            }
        }
    }

    /// Ok(true): moved on, try the next phase now; Ok(false): wait for readiness.
    fn finish_connect(&mut self, index: usize) -> Result<bool, String> {
        let client = &mut self.clients[index];
        let Some(stream) = client.stream.as_ref() else {
            return Ok(false);
        };
        if let Ok(Some(err)) | Err(err) = stream.take_error() {
            return Err(error_kind(&err));
        }
        match stream.peer_addr() {
            Ok(_) => {
                let _ = stream.set_nodelay(true);
                client.phase = Phase::Writing;
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(err) => Err(error_kind(&err)),
        }
    }

    fn write_request(&mut self, index: usize) -> Result<bool, String> {
        let client = &mut self.clients[index];
        let Some(stream) = client.stream.as_mut() else {
            return Ok(false);
        };
        while client.written < self.request.len() {
            match stream.write(&self.request[client.written..]) {
                Ok(0) => return Err("write-zero".into()),
                Ok(n) => client.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(error_kind(&err)),
            }
        }
        client.phase = Phase::Reading;
        Ok(true)
    }

    fn read_response(&mut self, index: usize) -> Result<bool, String> {
        let client = &mut self.clients[index];
        let Some(stream) = client.stream.as_mut() else {
            return Ok(false);
        };
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err("closed-early".into()),
                Ok(n) => client.input.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(error_kind(&err)),
            }
            if let Some(done) = parse_response(&client.input)? {
                self.answered(index, done);
                return Ok(self.clients[index].phase == Phase::Writing);
            }
        }
        match parse_response(&client.input)? {
            Some(done) => {
                self.answered(index, done);
                Ok(self.clients[index].phase == Phase::Writing)
            }
            None => Ok(false),
        }
    }

    fn answered(&mut self, index: usize, answer: Answer) {
        let now = Instant::now();
        self.live.answered.fetch_add(1, Ordering::Relaxed);
        if let Some(pid) = answer.pid {
            if self.seen.insert(pid) {
                self.live.answered_by(pid, now);
            }
        }
        let in_window = now >= self.window_start;
        if in_window && answer.status != 200 {
            self.count_error(&format!("status-{}", answer.status));
        }
        let client = &mut self.clients[index];
        if in_window {
            self.result.requests += 1;
            let micros = now.duration_since(client.sent_at).as_micros();
            let _ = self
                .result
                .latency_us
                .record(u64::try_from(micros).unwrap_or(u64::MAX).max(1));
            if let Some(pid) = answer.pid {
                *self.result.per_pid.entry(pid).or_default() += 1;
            }
        }
        if self.spec.keep_alive && answer.keep_alive {
            client.input.clear();
            client.written = 0;
            client.sent_at = now;
            client.phase = Phase::Writing;
        } else {
            if self.spec.keep_alive && in_window {
                self.result.server_closes += 1;
                self.live.server_closes.fetch_add(1, Ordering::Relaxed);
            }
            self.close(index);
            self.connect(index);
        }
    }

    fn fail(&mut self, index: usize, kind: &str) {
        self.count_error(kind);
        self.close(index);
        self.clients[index].phase = Phase::Waiting(Instant::now() + REFUSED_PAUSE);
    }

    fn close(&mut self, index: usize) {
        if let Some(mut stream) = self.clients[index].stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    fn count_error(&mut self, kind: &str) {
        if Instant::now() >= self.window_start {
            *self.result.errors.entry(kind.to_owned()).or_default() += 1;
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A whole response.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    keep_alive: bool,
    pid: Option<u32>,
}

/// Parses a response once it is whole: `Ok(None)` while more bytes are needed.
fn parse_response(input: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("bad-response".into()),
    };
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let Some(length) = header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) else {
        return Err("no-content-length".into());
    };
    if input.len() < head_len + length {
        return Ok(None);
    }
    let keep_alive = match (response.version, header("connection").as_deref()) {
        (_, Some(value)) if value.contains("close") => false,
        (Some(1), _) => true,
        (_, Some(value)) => value.contains("keep-alive"),
        _ => false,
    };
    let body = &input[head_len..head_len + length];
    Ok(Some(Answer {
        status: response.code.unwrap_or(0),
        keep_alive,
        pid: pid_in(body),
    }))
}

/// The `<pid>` of a body that starts `handled by process.<pid>`.
pub(crate) fn pid_in(body: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.split("process.").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn error_kind(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::ConnectionAborted => "aborted".into(),
        io::ErrorKind::BrokenPipe => "broken-pipe".into(),
        io::ErrorKind::AddrNotAvailable => "no-local-port".into(),
        kind => format!("{kind:?}").to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_whole_only_with_its_body() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n";
        let body = b"handled by process.4242\nxyz";
        assert_eq!(parse_response(head), Ok(None));
        let whole = [&head[..], &body[..]].concat();
        let answer = parse_response(&whole).unwrap().unwrap();
        assert_eq!(
            answer,
            Answer {
                status: 200,
                keep_alive: true,
                pid: Some(4242)
            }
        );
    }

    #[test]
    fn connection_close_and_http_1_0_end_keep_alive() {
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_response(close).unwrap().unwrap().keep_alive);
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(!parse_response(old).unwrap().unwrap().keep_alive);
    }

    #[test]
    fn garbage_is_a_bad_response() {
        assert!(parse_response(b"\x00\x01 nonsense\r\n\r\n").is_err());
    }

    /// A server that answers each connection's first request as process 4242 and closes it,
    /// even when the client asked for keep-alive.
    fn closing_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\nConnection: close\r\n\r\n\
                      handled by process.4242\n",
                );
            }
        });
        addr
    }

    #[test]
    fn a_started_load_runs_until_stopped_and_counts_as_it_goes() {
        let spec = LoadSpec {
            addr: closing_server(),
            connections: 2,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            keep_alive: true,
            threads: 1,
            cpus: None,
            request_timeout: Duration::from_secs(10),
        };
        let live = Arc::new(Live::default());
        let load = start(&spec, Arc::clone(&live)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while live.answered() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = load.stop().unwrap();
        assert!(live.answered() >= 10, "{} answered", live.answered());
        assert!(live.first_answer(4242).is_some());
        assert_eq!(live.first_answer(1), None);
        assert_eq!(live.errors(), 0, "{:?}", result.errors);
        assert!(result.requests >= 10);
        assert_eq!(result.per_pid.keys().copied().collect::<Vec<_>>(), [4242]);
        assert_eq!(live.server_closes(), result.server_closes);
        assert_eq!(
            result.server_closes, result.requests,
            "every answer closed a keep-alive connection, and that is no error"
        );
    }
}
