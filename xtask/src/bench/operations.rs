//! The zero-downtime operations under load, ours against Node's cluster:
//!
//! - `rollout`: SIGHUP to the primary of `hello --workers 4` (round-robin) rolls every worker
//!   while new-connection and keep-alive clients keep asking. Timed from the signal until
//!   every old worker has exited and 4 new ones run (the primary's children in `/proc`), with
//!   every failed request of either kind of client counted.
//! - `scale`: SIGTTIN (timed until the new worker's first answer), then SIGTTOU twice (each
//!   timed until a worker has exited), then SIGTTIN back to 4, under new-connection load.
//!
//! Node's primary (`xtask/bench/node_cluster.js`) does the same by the common hand-written
//! recipe: fork a replacement, wait for its 'listening', `disconnect()` the old worker, wait
//! for its 'exit', next. Node's disconnect waits for the worker's open connections to end,
//! keep-alive ones included, so each step has a deadline: a step that does not finish by
//! then is reported as timed out (and the server is not asked for more), never waited on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::children::{self, Rollout};
use super::loadgen::{self, Live, LoadResult, LoadSpec};
use super::report::{Round, Run, Scenario, median};
use super::scenarios::Context;
use super::target::{Running, Server};

/// Workers of the servers these scenarios start.
const WORKERS: usize = 4;

/// How long things may take, shorter with `--quick`.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// A whole roll-out, or one scaling step, not finished by then has timed out.
    step_timeout: Duration,
    /// A request not answered by then counts as an error (`timeout`).
    request_timeout: Duration,
    /// The load goes on this long after each roll-out, so that a request the roll-out lost
    /// has timed out, and is counted, before the next one (or the end).
    settle: Duration,
    /// The load goes on this long between scaling steps.
    pause: Duration,
}

impl Timing {
    fn of(ctx: &Context) -> Timing {
        let (step_timeout, request_timeout, pause) = if ctx.quick {
            (
                Duration::from_secs(3),
                Duration::from_secs(1),
                Duration::from_millis(100),
            )
        } else {
            (
                Duration::from_secs(30),
                Duration::from_secs(2),
                Duration::from_millis(250),
            )
        };
        Timing {
            step_timeout,
            request_timeout,
            settle: request_timeout + Duration::from_millis(100),
            pause,
        }
    }
}

/// Our round-robin cluster and, when `node` is installed, Node's, with the prefix of their
/// figures.
fn servers(ctx: &Context) -> Vec<(Server, &'static str)> {
    let mut servers = vec![(
        Server::Rr {
            workers: WORKERS,
            window: None,
        },
        "",
    )];
    if ctx.node_available() {
        servers.push((Server::NodeRr { workers: WORKERS }, "node_"));
    }
    servers
}

/// Scenario `rollout`: a rolling restart under load, `ctx.rolls` times per server.
pub(crate) fn rollout(ctx: &mut Context) -> Result<Scenario> {
    let mut scenario = Scenario::new("rollout", "Rolling restart under load");
    scenario.about = Some(
        "SIGHUP to the primary of 4 round-robin workers, under 16 clients with a new \
         connection per request and 16 keep-alive clients: ms from the signal until every old \
         worker has exited and 4 new ones run (the primary's children in /proc), and the \
         failed requests of each kind of client (keep-alive reconnects after a `Connection: \
         close` answer are no error). Node: fork, 'listening', disconnect(), 'exit', one \
         worker at a time.",
    );
    let timing = Timing::of(ctx);
    for (server, prefix) in servers(ctx) {
        rollout_server(ctx, server, prefix, timing, &mut scenario)?;
    }
    Ok(scenario)
}

/// One roll-out: its time (`None`: timed out), how many old workers were left when it ended,
/// and what each kind of client met from its signal until after the settling time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Roll {
    ms: Option<f64>,
    old_left: usize,
    failed_requests: u64,
    keep_alive_errors: u64,
    keep_alive_reconnects: u64,
}

fn rollout_server(
    ctx: &mut Context,
    server: Server,
    prefix: &str,
    timing: Timing,
    scenario: &mut Scenario,
) -> Result<()> {
    let running = Running::start_logged(&ctx.programs, server, 0, &format!("rollout {server}"))?;
    let primary = running.pid();
    let bar = spinner(ctx, &format!("rollout {server}: warm-up"));
    let close_live = Arc::new(Live::default());
    let keep_live = Arc::new(Live::default());
    let close = loadgen::start(
        &load_spec(ctx, running.addr, false, timing),
        Arc::clone(&close_live),
    )?;
    let keep = loadgen::start(
        &load_spec(ctx, running.addr, true, timing),
        Arc::clone(&keep_live),
    )?;
    sleep_until(close.window_start().max(keep.window_start()));
    let mut rolls = Vec::with_capacity(ctx.rolls);
    let mut failure = None;
    for n in 1..=ctx.rolls {
        bar.set_message(format!("rollout {server}: roll {n}/{}", ctx.rolls));
        match roll(primary, timing, &close_live, &keep_live) {
            Ok(roll) => {
                rolls.push(roll);
                if roll.ms.is_none() {
                    break;
                }
            }
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let close = close.stop()?;
    let keep = keep.stop()?;
    running.stop();
    bar.finish_and_clear();
    if let Some(err) = failure {
        return Err(err.context(format!("rolling {server}")));
    }
    if let Some((n, roll)) = rolls.iter().enumerate().find(|(_, r)| r.ms.is_none()) {
        // Under --quick the short limit is reason enough.
        let why = if matches!(server, Server::NodeRr { .. }) && !ctx.quick {
            " (Node's worker.disconnect() waits until the worker's open connections, \
             keep-alive ones included, have ended)"
        } else {
            ""
        };
        ctx.notes.push(format!(
            "rollout: {server}: roll-out {} did not finish within {} s{}, {} of {WORKERS} old \
             workers still running{why}; {}",
            n + 1,
            timing.step_timeout.as_secs_f64(),
            if ctx.quick {
                " (the --quick limit)"
            } else {
                ""
            },
            roll.old_left,
            if n + 1 < ctx.rolls {
                "no further roll-out was tried"
            } else {
                "it was the last one"
            }
        ));
    }
    let figures = rollout_figures(&rolls, &close, &keep);
    for (name, value) in figures.values {
        scenario.figures.insert(format!("{prefix}{name}"), value);
    }
    for (name, values) in figures.samples {
        scenario.samples.insert(format!("{prefix}{name}"), values);
    }
    scenario
        .runs
        .push(run_of(ctx, server.label(), false, close, ROLLOUT_BALANCE));
    scenario.runs.push(run_of(
        ctx,
        format!("{server} keep-alive"),
        true,
        keep,
        ROLLOUT_BALANCE,
    ));
    Ok(())
}

/// Figures and samples, named without the server's prefix.
#[derive(Debug, Default)]
struct Figures {
    values: Vec<(&'static str, f64)>,
    samples: Vec<(&'static str, Vec<f64>)>,
}

fn rollout_figures(rolls: &[Roll], close: &LoadResult, keep: &LoadResult) -> Figures {
    let ms: Vec<f64> = rolls.iter().filter_map(|roll| roll.ms).collect();
    let mut figures = Figures::default();
    if !ms.is_empty() {
        let total = median(&ms);
        figures.values.push(("rollout_ms_median", total));
        figures
            .values
            .push(("rollout_ms_per_worker_median", total / WORKERS as f64));
    }
    let errors = |load: &LoadResult| load.errors.values().sum::<u64>() as f64;
    figures.values.extend([
        ("rollout_failed_requests", errors(close)),
        ("rollout_keepalive_errors", errors(keep)),
        ("rollout_keepalive_reconnects", keep.server_closes as f64),
        ("rollouts_finished", ms.len() as f64),
        (
            "rollouts_timed_out",
            rolls.iter().filter(|roll| roll.ms.is_none()).count() as f64,
        ),
    ]);
    figures.samples.extend([
        ("rollout_ms", ms),
        (
            "rollout_failed_requests_per_roll",
            rolls.iter().map(|r| r.failed_requests as f64).collect(),
        ),
        (
            "rollout_keepalive_errors_per_roll",
            rolls.iter().map(|r| r.keep_alive_errors as f64).collect(),
        ),
        (
            "rollout_keepalive_reconnects_per_roll",
            rolls
                .iter()
                .map(|r| r.keep_alive_reconnects as f64)
                .collect(),
        ),
    ]);
    figures
}

/// SIGHUP to `primary`, then waits until its old workers are gone and as many new ones run,
/// and for the settling time.
fn roll(primary: u32, timing: Timing, close: &Live, keep: &Live) -> Result<Roll> {
    let old = workers(primary, WORKERS, timing.step_timeout)?;
    let before = (close.errors(), keep.errors(), keep.server_closes());
    signal(primary, Signal::SIGHUP)?;
    let signalled = Instant::now();
    let finished = children::wait_for(primary, signalled + timing.step_timeout, |now| {
        Rollout::of(&old, now).finished(WORKERS)
    })?;
    let old_left = match finished {
        Some(_) => 0,
        None => Rollout::of(&old, &children::of(primary)?).old_left,
    };
    std::thread::sleep(timing.settle);
    Ok(Roll {
        ms: finished.map(|(at, _)| millis(at - signalled)),
        old_left,
        failed_requests: close.errors() - before.0,
        keep_alive_errors: keep.errors() - before.1,
        keep_alive_reconnects: keep.server_closes() - before.2,
    })
}

/// Scenario `scale`: one worker more, two fewer, one more, under new-connection load,
/// `ctx.rolls` times per server.
pub(crate) fn scale(ctx: &mut Context) -> Result<Scenario> {
    let mut scenario = Scenario::new("scale", "Scaling under load");
    scenario.about = Some(
        "4 round-robin workers under 16 clients with a new connection per request: SIGTTIN \
         (ms until the new worker's first answer), SIGTTOU twice (each: ms until a worker has \
         exited), SIGTTIN back to 4; the failed requests over all. Node: fork; disconnect() \
         the newest worker.",
    );
    let timing = Timing::of(ctx);
    for (server, prefix) in servers(ctx) {
        scale_server(ctx, server, prefix, timing, &mut scenario)?;
    }
    Ok(scenario)
}

/// A scaling step: one worker more or one fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Up,
    Down,
}

/// The steps of one cycle: 4 to 5, to 4, to 3, to 4.
const CYCLE: [Step; 4] = [Step::Up, Step::Down, Step::Down, Step::Up];

fn scale_server(
    ctx: &mut Context,
    server: Server,
    prefix: &str,
    timing: Timing,
    scenario: &mut Scenario,
) -> Result<()> {
    let running = Running::start_logged(&ctx.programs, server, 0, &format!("scale {server}"))?;
    let primary = running.pid();
    let bar = spinner(ctx, &format!("scale {server}: warm-up"));
    let live = Arc::new(Live::default());
    let load = loadgen::start(
        &load_spec(ctx, running.addr, false, timing),
        Arc::clone(&live),
    )?;
    sleep_until(load.window_start());
    let (mut up, mut down) = (Vec::new(), Vec::new());
    let mut timed_out = None;
    let mut failure = None;
    'cycles: for n in 1..=ctx.rolls {
        for step in CYCLE {
            bar.set_message(format!("scale {server}: cycle {n}/{}, {step:?}", ctx.rolls));
            std::thread::sleep(timing.pause);
            match scale_step(primary, step, timing, &live) {
                Ok(Some(ms)) => match step {
                    Step::Up => up.push(ms),
                    Step::Down => down.push(ms),
                },
                Ok(None) => {
                    timed_out = Some((n, step));
                    break 'cycles;
                }
                Err(err) => {
                    failure = Some(err);
                    break 'cycles;
                }
            }
        }
    }
    std::thread::sleep(timing.settle);
    let load = load.stop()?;
    running.stop();
    bar.finish_and_clear();
    if let Some(err) = failure {
        return Err(err.context(format!("scaling {server}")));
    }
    if let Some((n, step)) = timed_out {
        ctx.notes.push(format!(
            "scale: {server}: a scaling step ({}) of cycle {n} did not finish within {} s{}; \
             no further step was tried",
            match step {
                Step::Up => "SIGTTIN",
                Step::Down => "SIGTTOU",
            },
            timing.step_timeout.as_secs_f64(),
            if ctx.quick {
                " (the --quick limit)"
            } else {
                ""
            },
        ));
    }
    let failed = load.errors.values().sum::<u64>() as f64;
    let figures = &mut scenario.figures;
    if !up.is_empty() {
        figures.insert(format!("{prefix}scale_up_ms_median"), median(&up));
    }
    if !down.is_empty() {
        figures.insert(format!("{prefix}scale_down_ms_median"), median(&down));
    }
    figures.insert(format!("{prefix}scale_failed_requests"), failed);
    figures.insert(
        format!("{prefix}scale_steps_timed_out"),
        f64::from(u8::from(timed_out.is_some())),
    );
    scenario.samples.insert(format!("{prefix}scale_up_ms"), up);
    scenario
        .samples
        .insert(format!("{prefix}scale_down_ms"), down);
    scenario
        .runs
        .push(run_of(ctx, server.label(), false, load, SCALE_BALANCE));
    Ok(())
}

/// Signals one step and waits for it. `None`: it timed out.
fn scale_step(primary: u32, step: Step, timing: Timing, live: &Live) -> Result<Option<f64>> {
    let before = children::of(primary)?;
    match step {
        Step::Up => scale_up(primary, &before, timing, live),
        Step::Down => scale_down(primary, &before, timing),
    }
}

/// SIGTTIN, then waits until one worker more runs and has answered: the time is to its first
/// answer.
fn scale_up(
    primary: u32,
    before: &BTreeSet<u32>,
    timing: Timing,
    live: &Live,
) -> Result<Option<f64>> {
    signal(primary, Signal::SIGTTIN)?;
    let signalled = Instant::now();
    let first_answer = |now: &BTreeSet<u32>| {
        if now.len() != before.len() + 1 {
            return None;
        }
        children::the_new_one(before, now).and_then(|pid| live.first_answer(pid))
    };
    let deadline = signalled + timing.step_timeout;
    let Some((_, now)) = children::wait_for(primary, deadline, |now| first_answer(now).is_some())?
    else {
        return Ok(None);
    };
    let first = first_answer(&now).context("the new worker's first answer")?;
    Ok(Some(millis(first.saturating_duration_since(signalled))))
}

/// SIGTTOU, then waits until one worker fewer runs (and none new).
fn scale_down(primary: u32, before: &BTreeSet<u32>, timing: Timing) -> Result<Option<f64>> {
    signal(primary, Signal::SIGTTOU)?;
    let signalled = Instant::now();
    let fewer = |now: &BTreeSet<u32>| now.len() + 1 == before.len() && now.is_subset(before);
    Ok(
        children::wait_for(primary, signalled + timing.step_timeout, fewer)?
            .map(|(at, _)| millis(at - signalled)),
    )
}

/// Waits until `primary` has `count` children, and returns them.
fn workers(primary: u32, count: usize, timeout: Duration) -> Result<BTreeSet<u32>> {
    match children::wait_for(primary, Instant::now() + timeout, |now| now.len() == count)? {
        Some((_, workers)) => Ok(workers),
        None => bail!(
            "the primary {primary} did not get to {count} workers within {} s (it has {:?})",
            timeout.as_secs_f64(),
            children::of(primary)?
        ),
    }
}

fn signal(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).context("a pid out of range")?;
    kill(Pid::from_raw(raw), signal).with_context(|| format!("sending {signal} to {pid}"))
}

/// The load of these scenarios: `ctx.connections` clients, a new connection per request or
/// keep-alive, until stopped.
fn load_spec(ctx: &Context, addr: SocketAddr, keep_alive: bool, timing: Timing) -> LoadSpec {
    LoadSpec {
        addr,
        connections: ctx.connections,
        warmup: ctx.warmup,
        duration: Duration::ZERO,
        keep_alive,
        threads: ctx.threads,
        cpus: ctx.load_cpus.clone(),
        request_timeout: timing.request_timeout,
    }
}

/// Why a roll-out's run has no balance: each worker answered only part of the window.
const ROLLOUT_BALANCE: &str = "workers replaced";

/// Why a scaling run has no balance: the count of workers changed under it.
const SCALE_BALANCE: &str = "workers added, removed";

/// A run for the tables: the load over the whole measured window (the operations and the
/// time between them). Balance is left out, and says why (`no_balance`: old and new workers
/// answered in turn), and the primary's CPU is not watched.
fn run_of(
    ctx: &Context,
    target: String,
    keep_alive: bool,
    load: LoadResult,
    no_balance: &'static str,
) -> Run {
    let round = Round {
        load,
        primary_peak_rss_mib: None,
        primary_cpu: None,
    };
    let mut run = Run::from_rounds(
        target,
        WORKERS,
        keep_alive,
        ctx.connections,
        0,
        std::slice::from_ref(&round),
    );
    run.balance_max_over_min = None;
    run.balance = None;
    run.balance_not_applicable = Some(no_balance);
    run.primary_cpu_watched = false;
    run
}

fn spinner(ctx: &Context, message: &str) -> ProgressBar {
    let bar = ctx.progress.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn sleep_until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn load(errors: &[(&str, u64)], server_closes: u64) -> LoadResult {
        LoadResult {
            requests: 1000,
            window: Duration::from_secs(1),
            latency_us: hdrhistogram::Histogram::new(3).unwrap(),
            errors: errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            per_pid: BTreeMap::new(),
            server_closes,
        }
    }

    fn value(figures: &Figures, name: &str) -> Option<f64> {
        figures
            .values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    #[test]
    fn rollout_figures_are_medians_of_times_and_totals_of_errors() {
        let rolls = [
            Roll {
                ms: Some(40.0),
                old_left: 0,
                failed_requests: 1,
                keep_alive_errors: 0,
                keep_alive_reconnects: 0,
            },
            Roll {
                ms: Some(80.0),
                old_left: 0,
                failed_requests: 0,
                keep_alive_errors: 2,
                keep_alive_reconnects: 3,
            },
            Roll {
                ms: Some(60.0),
                old_left: 0,
                failed_requests: 0,
                keep_alive_errors: 1,
                keep_alive_reconnects: 4,
            },
        ];
        let figures = rollout_figures(
            &rolls,
            &load(&[("refused", 1)], 0),
            &load(&[("reset", 2), ("closed-early", 1)], 7),
        );
        assert_eq!(value(&figures, "rollout_ms_median"), Some(60.0));
        assert_eq!(value(&figures, "rollout_ms_per_worker_median"), Some(15.0));
        assert_eq!(value(&figures, "rollout_failed_requests"), Some(1.0));
        assert_eq!(value(&figures, "rollout_keepalive_errors"), Some(3.0));
        assert_eq!(value(&figures, "rollout_keepalive_reconnects"), Some(7.0));
        assert_eq!(value(&figures, "rollouts_finished"), Some(3.0));
        assert_eq!(value(&figures, "rollouts_timed_out"), Some(0.0));
        let per_roll = |name: &str| {
            figures
                .samples
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(per_roll("rollout_ms"), Some(vec![40.0, 80.0, 60.0]));
        assert_eq!(
            per_roll("rollout_keepalive_reconnects_per_roll"),
            Some(vec![0.0, 3.0, 4.0])
        );
    }

    #[test]
    fn a_timed_out_rollout_has_no_time_but_counts() {
        let rolls = [Roll {
            ms: None,
            old_left: 4,
            failed_requests: 0,
            keep_alive_errors: 0,
            keep_alive_reconnects: 0,
        }];
        let figures = rollout_figures(&rolls, &load(&[], 0), &load(&[], 0));
        assert_eq!(value(&figures, "rollout_ms_median"), None, "never NaN");
        assert_eq!(value(&figures, "rollout_ms_per_worker_median"), None);
        assert_eq!(value(&figures, "rollouts_timed_out"), Some(1.0));
        assert_eq!(value(&figures, "rollouts_finished"), Some(0.0));
    }
}
