//! Shared pieces of the example programs: command-line flags, logging, and a small HTTP
//! server.
//!
//! The programs themselves are the `[[bin]]` targets of this package:
//!
//! - `hello`: the seed's benchmark server; every response is `handled by process.<pid>`.
//! - `crash`: every worker answers one request, then retires; the primary starts its
//!   replacement first, so the cluster keeps serving.
//! - `messages`: workers report each request to the primary, which keeps the global count
//!   and broadcasts it; responses carry it.
//!
//! Three more binaries are test helpers, not examples: `test-worker` (a worker program whose
//! behaviour the end-to-end tests in `tests/` pick through environment variables),
//! `test-facade` (the same for a program built on the facade's `run`) and `test-primary` (a
//! primary in a process of its own that prints its events, for the tests that kill it).
//!
//! Run one with `cargo run --release -p cluster-examples --bin hello -- --help`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod http;

use std::net::{IpAddr, SocketAddr};

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use cluster_net::{Event, ListenMode, Policy, PrimaryCluster, Recycle, TcpListener, Worker};

/// The flags every example server takes.
#[derive(Debug, Clone, Parser)]
pub struct ServerArgs {
    /// How many worker processes; 0 runs one process with no cluster (the baseline).
    /// Default: one per available CPU.
    #[arg(long)]
    pub workers: Option<usize>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// The port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// How connections reach workers: the primary hands them out round-robin, or every
    /// worker accepts on the shared socket.
    #[arg(long, value_enum, default_value_t = Mode::Rr)]
    pub mode: Mode,
    /// Round-robin only: how many connections a worker may have handed to it and not yet
    /// acknowledged (1 is Node's protocol).
    #[arg(long, default_value_t = cluster_net::primary::DEFAULT_WINDOW)]
    pub window: u32,
    /// Round-robin only: who gets the next connection, in turn or the worker with the
    /// fewest open.
    #[arg(long, value_enum, default_value_t = PolicyArg::RoundRobin)]
    pub policy: PolicyArg,
    /// CPU work per request: a loop of this many iterations (the seed's benchmark used 1e7).
    #[arg(long, default_value_t = 0)]
    pub work: u64,
    /// Workers exit with the boot-failure code before they listen (to see the primary give
    /// up with a clear message instead of respawning forever).
    #[arg(long)]
    pub boot_fail: bool,
    /// Enables `GET /crash` (the handler panics: that request fails, the worker retires as
    /// failed) and `GET /hang` (the handler spins forever: the primary declares the worker
    /// hung, hands what it had not taken to others, and replaces it).
    #[arg(long)]
    pub faults: bool,
    /// Replace a worker after it took this many connections (plus up to 10% more, different
    /// for each worker, so they do not all go at once). With keep-alive clients a connection
    /// carries many requests.
    #[arg(long, value_name = "CONNECTIONS")]
    pub max_requests: Option<u64>,
    /// Replace a worker whose own memory (USS, shared pages not counted) passes this size:
    /// bytes, or with a K, M or G suffix (`512M`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Seconds after which a worker that holds handed connections without taking any, or
    /// whose server loop stopped sending heartbeats, is hung (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = cluster_net::primary::DEFAULT_HANG_TIMEOUT.as_secs_f64())]
    pub hang_timeout: f64,
    /// Seconds workers get to finish when they are stopped or replaced, before they are
    /// killed.
    #[arg(long, value_name = "SECONDS", default_value_t = cluster_net::primary::DEFAULT_SHUTDOWN_TIMEOUT.as_secs_f64())]
    pub shutdown_timeout: f64,
    /// Serve a control socket at this path (mode 0600) for `clusterctl`: status, metrics,
    /// reload, scale, stop.
    #[arg(long, value_name = "PATH")]
    pub control: Option<std::path::PathBuf>,
    /// How log lines are written to stderr: text for people, JSON (one object per line) for
    /// log shippers. `RUST_LOG` picks what is logged (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// A size in bytes, with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => (&text[..at], c.to_ascii_uppercase()),
        _ => (text, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        other => return Err(format!("unknown size unit {other:?}: use K, M or G")),
    };
    let number: u64 = digits
        .trim()
        .parse()
        .map_err(|err| format!("{text:?} is not a size: {err}"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))
}

/// Seconds as a duration; `None` for 0 or less (off), or what is not a finite number.
fn seconds(value: f64) -> Option<std::time::Duration> {
    (value.is_finite() && value > 0.0).then(|| std::time::Duration::from_secs_f64(value))
}

/// How listeners deliver connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Round-robin handoff by the primary.
    Rr,
    /// One listening socket shared by every worker.
    Shared,
}

/// Who gets the next connection of a round-robin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Workers take connections in turn.
    RoundRobin,
    /// The worker with the fewest open connections takes the next one.
    LeastConnections,
}

impl ServerArgs {
    /// The listen mode to configure.
    pub fn listen_mode(&self) -> ListenMode {
        match self.mode {
            Mode::Rr => ListenMode::RoundRobin,
            Mode::Shared => ListenMode::Shared,
        }
    }

    /// The worker count in effect.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// The address to bind.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// A cluster builder with these flags applied.
    pub fn builder(&self) -> cluster_net::Builder {
        let builder = cluster_net::Cluster::builder()
            .workers(self.worker_count())
            .mode(self.listen_mode())
            .window(self.window)
            .policy(match self.policy {
                PolicyArg::RoundRobin => Policy::RoundRobin,
                PolicyArg::LeastConnections => Policy::LeastConnections,
            })
            .hang_timeout(seconds(self.hang_timeout))
            .shutdown_timeout(seconds(self.shutdown_timeout).unwrap_or_default())
            .recycle(Recycle {
                after_connections: self.max_requests,
                jitter: self.max_requests.map_or(0, |n| n / 10),
                max_memory: self.max_memory,
            });
        match &self.control {
            Some(path) => builder.control_socket(path),
            None => builder,
        }
    }

    /// The line the primary prints once every worker listens (an IPv6 host in brackets).
    pub fn ready_line(&self, addr: SocketAddr) -> String {
        let mode = match self.mode {
            Mode::Rr => "rr",
            Mode::Shared => "shared",
        };
        format!(
            "ready http://{addr} workers={} mode={mode}",
            self.worker_count()
        )
    }
}

/// Runs an example server with these flags: a primary and its workers (or one process with
/// `--workers 0`). The ready line is printed once, by the primary when every worker
/// listens (or by the single process once bound); `on_event` sees every primary event too;
/// each worker binds the address and runs `serve` on the listener.
pub fn run(
    name: &str,
    args: &ServerArgs,
    mut on_event: impl FnMut(&mut PrimaryCluster, &Event) + 'static,
    serve: impl FnOnce(&Worker, TcpListener) -> std::io::Result<()>,
) -> ExitCode {
    let ready = args.clone();
    let result = args
        .builder()
        .on_event(move |cluster, event| {
            print_ready_line(&ready, &event);
            on_event(cluster, &event);
        })
        .run(|worker| {
            boot_fail_if_asked(args, worker);
            let listener = TcpListener::bind(args.addr())?;
            if !worker.is_clustered() {
                println!("{}", args.ready_line(listener.local_addr()?));
            }
            Ok(serve(worker, listener)?)
        });
    report(name, args, result)
}

/// [`run`] for servers on tokio: each worker (or the single process) builds a runtime,
/// binds the address with [`cluster_net::tokio::TcpListener`] and awaits `serve` on it.
pub fn run_async<F, Fut>(name: &str, args: &ServerArgs, serve: F) -> ExitCode
where
    F: FnOnce(Worker, cluster_net::tokio::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), cluster_net::Error>>,
{
    let ready = args.clone();
    let result = args
        .builder()
        .on_event(move |_, event| print_ready_line(&ready, &event))
        .run_async(|worker| async move {
            boot_fail_if_asked(args, &worker);
            let listener = cluster_net::tokio::TcpListener::bind(args.addr())?;
            if !worker.is_clustered() {
                println!("{}", args.ready_line(listener.local_addr()?));
            }
            serve(worker, listener).await
        });
    report(name, args, result)
}

/// The primary prints the ready line once every worker listens.
fn print_ready_line(args: &ServerArgs, event: &Event) {
    if let Event::Ready { addrs } = event {
        if let Some(addr) = addrs.first() {
            println!("{}", args.ready_line(*addr));
        }
    }
}

/// `--boot-fail`: a worker exits with the boot-failure code before it listens.
fn boot_fail_if_asked(args: &ServerArgs, worker: &Worker) {
    if args.boot_fail && worker.is_clustered() {
        tracing::error!("--boot-fail: this worker cannot boot");
        std::process::exit(cluster_net::BOOT_FAILURE_EXIT_CODE);
    }
}

/// The exit code for how the program ended; an error is reported here, once.
fn report(name: &str, args: &ServerArgs, result: Result<(), cluster_net::Error>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Reported once, here: the library returns what ended the cluster without
            // logging it.
            let chain = cluster_net::ErrorChain(&err);
            match args.log_format {
                LogFormat::Text => eprintln!("{name}: {chain}"),
                LogFormat::Json => tracing::error!(error = %chain, "{name} stopped"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The body every example answers with: `handled by process.<pid>` on its first line,
/// then spaces up to a fixed length. Pids have from 1 to 7 digits (Linux's largest
/// `pid_max` is 4194304) and wrap around, so a rolling restart can put workers with pids of
/// different widths behind one address; `ab` counts a response whose length differs from
/// the first one's as a failed request ("Length"), and would report failures that are not.
pub fn hello_body(pid: u32) -> String {
    const WIDTH: usize = "handled by process.\n".len() + 7;
    let mut body = format!("handled by process.{pid}\n");
    let padding = WIDTH.saturating_sub(body.len());
    body.extend(std::iter::repeat_n(' ', padding));
    body
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`: the primary's
/// lifecycle, every worker start, exit, respawn and roll-out step, and every warning and
/// error; nothing per connection).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
        }
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_bodies_have_one_length_whatever_the_pid() {
        assert_eq!(hello_body(7), "handled by process.7\n      ");
        assert_eq!(hello_body(4_194_304).len(), hello_body(1).len());
        assert!(hello_body(32_768).starts_with("handled by process.32768\n"));
    }

    #[test]
    fn sizes_take_k_m_g_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn the_ready_line_brackets_ipv6_hosts() {
        let args = ServerArgs::parse_from([
            "hello",
            "--workers",
            "3",
            "--host",
            "::1",
            "--mode",
            "shared",
        ]);
        let addr: SocketAddr = "[::1]:4321".parse().unwrap();
        assert_eq!(
            args.ready_line(addr),
            "ready http://[::1]:4321 workers=3 mode=shared"
        );
    }
}
