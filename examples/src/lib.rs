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
use cluster_net::{Event, ListenMode, Policy, PrimaryCluster, TcpListener, Worker};

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
        cluster_net::Cluster::builder()
            .workers(self.worker_count())
            .mode(self.listen_mode())
            .window(self.window)
            .policy(match self.policy {
                PolicyArg::RoundRobin => Policy::RoundRobin,
                PolicyArg::LeastConnections => Policy::LeastConnections,
            })
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
            if let Event::Ready { addrs } = &event {
                if let Some(addr) = addrs.first() {
                    println!("{}", ready.ready_line(*addr));
                }
            }
            on_event(cluster, &event);
        })
        .run(|worker| {
            let listener = TcpListener::bind(args.addr())?;
            if !worker.is_clustered() {
                println!("{}", args.ready_line(listener.local_addr()?));
            }
            Ok(serve(worker, listener)?)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings and errors).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

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
