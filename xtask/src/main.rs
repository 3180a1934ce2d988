//! Project tasks, run as `cargo xtask <task>` (the alias in `.cargo/config.toml`).
//!
//! Each task lives in its own module; `main` only parses the command line and dispatches.
//!
//! - `cargo xtask bench`: the cluster against a single process and Node's cluster, side by
//!   side (see [`mod@bench`]).
//! - `cargo xtask ipc-bench`: one-way throughput of `cluster-ipc` channels between two
//!   processes (see [`ipc_bench`]).
//! - `cargo xtask mutants`: mutation testing of the primary's supervisor core (see
//!   [`mutants`]).
//! - `cargo xtask package`: every library crate packaged and built as a registry would get it
//!   (see [`package`]).
//!
//! The first two measure optimized code: from a debug build they build in release and re-run
//! themselves (see [`release`]).

mod bench;
mod ipc_bench;
mod mutants;
mod package;
mod release;

use clap::{Parser, Subcommand};

/// The command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks for the cluster workspace"
)]
struct Cli {
    /// The task to run.
    #[command(subcommand)]
    task: Task,
}

/// Every task `cargo xtask` knows.
#[derive(Debug, Subcommand)]
enum Task {
    /// Benchmark the cluster against a single process and Node's cluster.
    Bench(bench::Args),
    /// Measure one-way frames/s and fds/s of a cluster-ipc channel between two processes.
    IpcBench(ipc_bench::Args),
    /// Mutation testing of the primary's supervisor core (installs cargo-mutants if needed).
    Mutants(mutants::Args),
    /// Package every library crate and build each from its package alone (cargo package).
    Package(package::Args),
    /// The receiving end of `ipc-bench`, started by it; not for direct use.
    #[command(hide = true)]
    IpcBenchPeer,
}

fn main() -> anyhow::Result<()> {
    let task = Cli::parse().task;
    let measures = matches!(task, Task::Bench(_) | Task::IpcBench(_));
    if measures && cfg!(debug_assertions) {
        return release::rerun_in_release();
    }
    match task {
        Task::Bench(args) => bench::run(&args),
        Task::IpcBench(args) => ipc_bench::run(&args),
        Task::Mutants(args) => mutants::run(&args),
        Task::Package(args) => package::run(&args),
        Task::IpcBenchPeer => ipc_bench::peer(),
    }
}
