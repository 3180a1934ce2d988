//! `cargo xtask bench`: the cluster against what users would run instead, measured side by
//! side in one run: a single process with the same HTTP code (`hello --workers 0`) and Node's
//! cluster (round-robin and shared policies) from `xtask/bench/node_cluster.js`, when `node`
//! is installed. The dispatch and keep-alive scenarios also run `axum_hello` (axum on a tokio
//! runtime per worker) alone (`axum single`), round-robin and shared.
//!
//! Every figure is a ratio between runs of the same invocation on the same machine, so the
//! machine's speed cancels out; nothing is asserted, this is a measurement. The report goes
//! to `target/bench/report.{json,md,svg}`; the server logs to `target/bench/logs/`.
//!
//! Besides requests per second, the dispatch scenario reports the primary's CPU time per
//! connection (`primary_cpu_us_per_conn`, in µs, the median round's): the user+system time
//! `/proc/<primary>/stat` counts over the measured window (read as it opens and closes, off the
//! load's path), over the connections the load generator completed in it. It is the cost of a
//! handoff in our round-robin primary (`rr1_` for window 1) and in Node's
//! (`node_primary_cpu_us_per_conn`); shared primaries (`shared_`, `node_shared_`) hand
//! nothing and only supervise. The kernel counts in 10 ms ticks, so a short `--duration` makes
//! it coarse (a note says when).
//!
//! The rollout and scale scenarios (see [`operations`]) measure the zero-downtime operations
//! under load: a rolling restart (SIGHUP) and scaling (SIGTTIN, SIGTTOU) of `hello --workers
//! 4` and of Node's cluster, timed from the signal by watching the primary's children in
//! `/proc`, with every failed request counted.

mod affinity;
mod chart;
mod children;
mod loadgen;
mod operations;
mod procstat;
mod report;
mod scenarios;
mod target;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use indicatif::MultiProgress;

use report::{Machine, Ratios, Report, Scenario, Settings};
use scenarios::Context;
use target::Programs;

/// The scenarios, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum ScenarioName {
    /// A new connection per request, trivial handler, every server; with the primaries' CPU
    /// time per connection.
    Dispatch,
    /// Keep-alive connections, trivial handler, every server.
    Keepalive,
    /// The seed's benchmark: a CPU-bound handler, single process against 1 and N workers.
    Cpu,
    /// How evenly round-robin and shared spread connections: per-worker shares and max/min.
    Balance,
    /// SIGKILL of the only worker to the first answer from its replacement.
    Respawn,
    /// SIGHUP (rolling restart of 4 workers) under new-connection and keep-alive load.
    Rollout,
    /// SIGTTIN, SIGTTOU twice, SIGTTIN (4 to 5 to 3 to 4 workers) under load.
    Scale,
    /// The primary's peak RSS under load.
    Memory,
    /// The cluster-ipc micro-benchmarks.
    Ipc,
}

const ALL: [ScenarioName; 9] = [
    ScenarioName::Dispatch,
    ScenarioName::Keepalive,
    ScenarioName::Cpu,
    ScenarioName::Balance,
    ScenarioName::Respawn,
    ScenarioName::Rollout,
    ScenarioName::Scale,
    ScenarioName::Memory,
    ScenarioName::Ipc,
];

/// The flags of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Run every scenario briefly (a smoke run, about 50 s; figures are rough).
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeat for several); all of them by default.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<ScenarioName>,
    /// Measured seconds per run (default 6, or 1 with --quick), after a warm-up.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Concurrent client connections (default 16).
    #[arg(long, value_name = "N")]
    connections: Option<usize>,
    /// Workers per cluster (default 2).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Load generator threads (default 1: on a small machine the load takes a core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Iterations of CPU work per request in the cpu scenario (default 10,000,000, the
    /// seed's `for (i < 1e7) {}`).
    #[arg(long, value_name = "N")]
    work: Option<u64>,
    /// Interleaved rounds per server in the throughput scenarios (default 3, or 1 with
    /// --quick); the median round counts.
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// SIGKILLs per server in the respawn scenario (default 20, or 3 with --quick).
    #[arg(long, value_name = "N")]
    respawns: Option<usize>,
    /// Rolling restarts per server in the rollout scenario, and scaling cycles per server in
    /// the scale scenario (default 3, or 1 with --quick).
    #[arg(long, value_name = "N")]
    rolls: Option<usize>,
    /// Also write the JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Pin the servers to these CPUs (a list like `0-7` or `0,2,4`), so that they do not
    /// share cores with the load generator.
    #[arg(long, value_name = "CPUS")]
    server_cpus: Option<String>,
    /// Pin the load generator to these CPUs.
    #[arg(long, value_name = "CPUS")]
    load_cpus: Option<String>,
}

/// Runs the selected scenarios and writes the report.
pub(crate) fn run(args: &Args) -> Result<()> {
    // Before any pinning narrows what this process sees.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut ctx = context(args)?;
    let selected: Vec<ScenarioName> = if args.scenarios.is_empty() {
        ALL.to_vec()
    } else {
        let mut chosen = args.scenarios.clone();
        chosen.sort();
        chosen.dedup();
        chosen
    };
    if ctx.workers != 2 {
        ctx.notes.push(format!(
            "cpu_scaling_2w_over_1w compares {} workers with 1 (--workers {})",
            ctx.workers, ctx.workers
        ));
    }
    if ctx.programs.node.is_none() {
        ctx.notes
            .push("node is not on PATH: the Node.js baselines were skipped".into());
    }
    let started = std::time::Instant::now();
    let mut scenarios: Vec<Scenario> = Vec::new();
    for name in selected {
        let dispatch = scenarios.iter().find(|s| s.name == "dispatch").cloned();
        let scenario = match name {
            ScenarioName::Dispatch => scenarios::throughput(&mut ctx, false)?,
            ScenarioName::Keepalive => {
                let wrk_rps = scenarios::wrk_reference(&mut ctx)?;
                let mut scenario = scenarios::throughput(&mut ctx, true)?;
                if let Some(rps) = wrk_rps {
                    scenario
                        .figures
                        .insert("wrk_single_keepalive_rps".into(), rps);
                }
                scenario
            }
            ScenarioName::Cpu => scenarios::cpu(&mut ctx)?,
            ScenarioName::Balance => scenarios::balance(&mut ctx, dispatch.as_ref())?,
            ScenarioName::Respawn => scenarios::respawn(&mut ctx)?,
            ScenarioName::Rollout => operations::rollout(&mut ctx)?,
            ScenarioName::Scale => operations::scale(&mut ctx)?,
            ScenarioName::Memory => scenarios::memory(&mut ctx, dispatch.as_ref())?,
            ScenarioName::Ipc => scenarios::ipc(&mut ctx)?,
        };
        scenarios.push(scenario);
    }
    let ratios = ratios(&scenarios, ctx.workers);
    let report = Report {
        finished_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        machine: machine(cpus, ctx.programs.node.as_deref()),
        settings: Settings {
            quick: ctx.quick,
            seconds_per_run: ctx.duration.as_secs_f64(),
            rounds: ctx.rounds,
            warmup_seconds: ctx.warmup.as_secs_f64(),
            connections: ctx.connections,
            workers: ctx.workers,
            loadgen_threads: ctx.threads,
            command: command_line(),
        },
        ratios,
        notes: ctx.notes,
        scenarios,
    };
    let dir = bench_dir();
    report.write(&dir, args.json.as_deref())?;
    print!("{}", report.table());
    println!(
        "\nreport: {}/report.{{json,md,svg}} ({:.0} s of measuring)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn context(args: &Args) -> Result<Context> {
    let quick = args.quick;
    let load_cpus = args
        .load_cpus
        .as_deref()
        .map(affinity::parse_cpus)
        .transpose()?;
    if let Some(cpus) = &args.server_cpus {
        // Servers are this process's children and inherit its affinity; the load threads set
        // their own.
        affinity::pin_current_thread(&affinity::parse_cpus(cpus)?)?;
    }
    let logs = bench_dir().join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let programs = Programs {
        hello: crate::release::sibling_binary("hello")?,
        axum_hello: crate::release::sibling_binary("axum_hello")?,
        node: target::find_program("node"),
        node_script: workspace_root().join("xtask/bench/node_cluster.js"),
        logs,
    };
    let default_seconds = if quick { 1.0 } else { 6.0 };
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(default_seconds).max(0.1));
    Ok(Context {
        programs,
        progress: MultiProgress::new(),
        quick,
        workers: args.workers.unwrap_or(2).max(1),
        connections: args.connections.unwrap_or(16).max(1),
        warmup: if quick {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        },
        duration,
        threads: args.threads.unwrap_or(1).max(1),
        work: args.work.unwrap_or(10_000_000),
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        respawns: args.respawns.unwrap_or(if quick { 3 } else { 20 }).max(1),
        rolls: args.rolls.unwrap_or(if quick { 1 } else { 3 }).max(1),
        load_cpus,
        notes: Vec::new(),
    })
}

/// The workspace's root: where xtask was built, or (for a copied binary, as on a lent
/// benchmark machine) the current directory.
fn workspace_root() -> PathBuf {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if built_in.join("xtask/bench/node_cluster.js").exists() {
        built_in.canonicalize().unwrap_or(built_in)
    } else {
        PathBuf::from(".")
    }
}

/// `target/bench` of the workspace.
fn bench_dir() -> PathBuf {
    workspace_root().join("target/bench")
}

/// The tracked ratios, from whichever scenarios ran.
fn ratios(scenarios: &[Scenario], workers: usize) -> Ratios {
    let find = |name: &str| scenarios.iter().find(|s| s.name == name);
    let rps =
        |scenario: &str, target: String| find(scenario).and_then(|s| s.run(&target)).map(|r| r.rps);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let rr = format!("rr {workers}w");
    let rr1 = format!("rr window 1 {workers}w");
    let shared = format!("shared {workers}w");
    let node_rr = format!("node rr {workers}w");
    let figure =
        |scenario: &str, name: &str| find(scenario).and_then(|s| s.figures.get(name).copied());
    let balance_run = |target: &str| find("balance").and_then(|s| s.run(target));
    let balance = |target: &str| balance_run(target).and_then(|r| r.balance_max_over_min);
    let max_share = |target: &str| {
        balance_run(target)
            .and_then(|r| r.balance.as_ref())
            .map(|b| b.max_share)
    };
    Ratios {
        rr_close_vs_node_rr: ratio(
            rps("dispatch", rr.clone()),
            rps("dispatch", node_rr.clone()),
        ),
        rr1_close_vs_node_rr: ratio(rps("dispatch", rr1), rps("dispatch", node_rr.clone())),
        rr_close_vs_single: ratio(
            rps("dispatch", rr.clone()),
            rps("dispatch", "single".into()),
        ),
        shared_close_vs_single: ratio(
            rps("dispatch", shared.clone()),
            rps("dispatch", "single".into()),
        ),
        rr_balance_max_over_min: balance(&rr),
        shared_balance_max_over_min: balance(&shared),
        rr_balance_max_share: max_share(&rr),
        shared_balance_max_share: max_share(&shared),
        respawn_median_ms: figure("respawn", "respawn_ms_median"),
        node_respawn_median_ms: figure("respawn", "node_respawn_ms_median"),
        primary_rss_mib: figure("memory", "primary_peak_rss_mib"),
        primary_cpu_us_per_conn: figure("dispatch", "primary_cpu_us_per_conn"),
        node_primary_cpu_us_per_conn: figure("dispatch", "node_primary_cpu_us_per_conn"),
        cpu_scaling_2w_over_1w: ratio(rps("cpu", rr.clone()), rps("cpu", "rr 1w".into())),
        keepalive_vs_node_rr: ratio(rps("keepalive", rr), rps("keepalive", node_rr)),
        rollout_ms_per_worker: figure("rollout", "rollout_ms_per_worker_median"),
        node_rollout_ms_per_worker: figure("rollout", "node_rollout_ms_per_worker_median"),
        rollout_failed_requests: figure("rollout", "rollout_failed_requests"),
        rollout_keepalive_errors: figure("rollout", "rollout_keepalive_errors"),
        scale_failed_requests: figure("scale", "scale_failed_requests"),
        loadgen_ceiling_rps: find("keepalive")
            .and_then(|s| s.runs.iter().map(|r| r.rps).max_by(f64::total_cmp)),
    }
}

fn machine(cpus: usize, node: Option<&Path>) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|k| k.trim().to_owned());
    let node = node.and_then(|node| {
        let output = std::process::Command::new(node)
            .arg("--version")
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    });
    Machine {
        cpus,
        cpu_model,
        kernel,
        node,
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}
