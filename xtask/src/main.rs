//! Project tasks, run as `cargo xtask <task>` (the alias in `.cargo/config.toml`).
//!
//! Each task lives in its own module; `main` only parses the command line and dispatches.
//!
//! - `cargo xtask ipc-bench`: one-way throughput of `cluster-ipc` channels between two
//!   processes (see [`ipc_bench`]).

mod ipc_bench;

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
    /// Measure one-way frames/s and fds/s of a cluster-ipc channel between two processes.
    IpcBench(ipc_bench::Args),
    /// The receiving end of `ipc-bench`, started by it; not for direct use.
    #[command(hide = true)]
    IpcBenchPeer,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::IpcBench(args) => ipc_bench::run(&args),
        Task::IpcBenchPeer => ipc_bench::peer(),
    }
}
